//! Events: as clients send them, parsed into types that can only hold
//! valid values ("parse, don't validate"), and as they are published.
//!
//! - [`id`]: the event id, the idempotency key.
//! - [`wire`]: decoding a request body into events, and explaining what is
//!   wrong with one that is not (the OpenAPI request schema is derived from
//!   the same type).
//! - [`published`]: the published event and its metadata.
//! - [`json`]: the fast JSON writer for published events.

mod id;
mod json;
mod published;
mod wire;

pub use id::{EventId, MAX_ID_BYTES};
pub use json::{JsonWriter, line_size_hint};
pub use published::{Metadata, PublishedEvent};
pub use wire::{
    DecodeError, DecodedArray, ECHO_MAX, EventInput, FieldError, InvalidElement, clip,
    decode_array, decode_event,
};

/// A validated incoming event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Idempotency key.
    pub id: EventId,
    /// Client-supplied Unix seconds.
    pub timestamp: i64,
    /// Opaque text, at most `pipeline.max_payload_bytes`.
    pub payload: Box<str>,
}
