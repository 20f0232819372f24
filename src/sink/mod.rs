//! Where processed events go.
//!
//! Every configured [`Sink`] receives every published event, already
//! serialized once by the worker. The SSE stream is fed separately by
//! [`EventBroadcast`] because it is always on and must never slow the
//! pipeline.

mod broadcast;
mod log;
mod stdout;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::SinkKind;
use crate::event::PublishedEvent;

pub use broadcast::{EventBroadcast, StreamMessage};
pub use log::LogSink;
pub use stdout::StdoutSink;

/// A published event together with its JSON form.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    /// The event.
    pub event: &'a PublishedEvent,
    /// Its arrival sequence.
    pub sequence: u64,
    /// Its JSON serialization, one line, no trailing newline.
    pub json: &'a str,
}

/// Why a sink could not take an event.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink has stopped (its writer is gone).
    #[error("sink `{0}` is closed")]
    Closed(&'static str),
    /// Writing failed.
    #[error("sink `{sink}` failed: {source}")]
    Io {
        /// The sink's name.
        sink: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A destination for published events.
#[async_trait]
pub trait Sink: Send + Sync + fmt::Debug {
    /// Name used in configuration, logs and metrics labels.
    fn name(&self) -> &'static str;
    /// Hands events to the sink, in order: one call per chunk a worker
    /// processes, so that a sink can write them together.
    async fn publish(&self, publications: &[Publication<'_>]) -> Result<(), SinkError>;
    /// Makes everything published so far durable at the destination.
    async fn flush(&self) -> Result<(), SinkError>;
}

/// Builds the sinks named in `publish.sinks`.
pub fn build_sinks(kinds: &[SinkKind]) -> Vec<Arc<dyn Sink>> {
    kinds
        .iter()
        .map(|kind| -> Arc<dyn Sink> {
            match kind {
                SinkKind::Stdout => Arc::new(StdoutSink::stdout()),
                SinkKind::Log => Arc::new(LogSink),
            }
        })
        .collect()
}
