//! How events, publications and failures are written as JetStream
//! messages, and read back.
//!
//! Subjects end in the event id's key: the id's bytes in unpadded
//! base64url, since an id may hold any character and a subject token may
//! not (no spaces, dots or wildcards).

use async_nats::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde::Serialize;

use crate::event::{Event, EventId, decode_event};
use crate::store::{Outcome, Record};
use crate::time::UnixNanos;
use crate::trace_id::TraceId;

/// When the event was accepted (Unix nanoseconds).
pub(super) const RECEIVED_AT: &str = "Eventflow-Received-At";
/// The trace id the event's metadata carries (32 hex digits).
pub(super) const TRACE_ID: &str = "Eventflow-Trace-Id";
/// W3C trace context of the ingest span, when it was traced.
pub(super) const TRACEPARENT: &str = "traceparent";
/// Arrival sequence of a published event.
pub(super) const SEQUENCE: &str = "Eventflow-Sequence";
/// Worker that processed a published event.
pub(super) const WORKER: &str = "Eventflow-Worker";
/// When a published event was processed (Unix nanoseconds).
pub(super) const PROCESSED_AT: &str = "Eventflow-Processed-At";

/// The subjects of one deployment, under `backend.nats.subject_prefix`.
#[derive(Debug, Clone)]
pub(super) struct Subjects {
    prefix: String,
}

impl Subjects {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Every accepted event's subject.
    pub(super) fn events(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// Every published event's subject.
    pub(super) fn published(&self) -> String {
        format!("{}.published.>", self.prefix)
    }

    /// Every failed event's subject.
    pub(super) fn failed(&self) -> String {
        format!("{}.failed.>", self.prefix)
    }

    pub(super) fn event(&self, id: &EventId) -> String {
        format!("{}.events.{}", self.prefix, key(id))
    }

    pub(super) fn published_event(&self, id: &EventId) -> String {
        format!("{}.published.{}", self.prefix, key(id))
    }

    pub(super) fn failed_event(&self, id: &EventId) -> String {
        format!("{}.failed.{}", self.prefix, key(id))
    }
}

fn key(id: &EventId) -> String {
    URL_SAFE_NO_PAD.encode(id.as_str())
}

#[derive(Serialize)]
struct StoredEvent<'a> {
    id: &'a str,
    timestamp: i64,
    payload: &'a str,
}

/// An accepted event's message: its JSON and headers.
pub(super) fn event_message(
    event: &Event,
    received_at: UnixNanos,
    trace_id: TraceId,
    traceparent: Option<&str>,
) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(RECEIVED_AT, received_at.as_nanos().to_string().as_str());
    headers.insert(TRACE_ID, trace_id.to_hex().as_str());
    if let Some(traceparent) = traceparent {
        headers.insert(TRACEPARENT, traceparent);
    }
    let body = serde_json::to_vec(&StoredEvent {
        id: event.id.as_str(),
        timestamp: event.timestamp,
        payload: &event.payload,
    })
    .unwrap_or_default();
    (headers, Bytes::from(body))
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|value| value.as_str())
}

fn number(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    header(headers, name)?.parse().ok()
}

/// A message of the events stream that is not an event eventflow wrote.
#[derive(Debug, thiserror::Error)]
#[error("stream message {sequence} is not an eventflow event: {reason}")]
pub(super) struct Undecodable {
    sequence: u64,
    reason: String,
}

/// The record of an accepted event's message (stream sequence = arrival
/// sequence), without an outcome (that is on the other streams).
pub(super) fn decode_record(
    sequence: u64,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Record, Undecodable> {
    let undecodable = |reason: String| Undecodable { sequence, reason };
    // Validated when accepted; no payload limit applies on the way back.
    let event = decode_event(payload, usize::MAX).map_err(|e| undecodable(format!("{e:?}")))?;
    let received_at = number(headers, RECEIVED_AT)
        .map(UnixNanos::from_nanos)
        .ok_or_else(|| undecodable(format!("no {RECEIVED_AT} header")))?;
    let trace_id = header(headers, TRACE_ID)
        .and_then(|hex| u128::from_str_radix(hex, 16).ok())
        .and_then(|id| TraceId::from_bytes(id.to_be_bytes()))
        .unwrap_or_else(TraceId::random);
    Ok(Record::with_outcome(
        event,
        sequence,
        received_at,
        trace_id,
        None,
    ))
}

/// The W3C trace context of an accepted event's message.
pub(super) fn traceparent(headers: Option<&HeaderMap>) -> Option<&str> {
    header(headers, TRACEPARENT)
}

/// Headers of a published event's message.
pub(super) fn published_headers(sequence: u64, worker: u32, processed_at: UnixNanos) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(SEQUENCE, sequence.to_string().as_str());
    headers.insert(WORKER, worker.to_string().as_str());
    headers.insert(PROCESSED_AT, processed_at.as_nanos().to_string().as_str());
    headers
}

/// The outcome a published event's message records.
pub(super) fn processed_outcome(headers: Option<&HeaderMap>) -> Option<Outcome> {
    Some(Outcome::Processed {
        worker: u32::try_from(number(headers, WORKER)?).ok()?,
        processed_at: UnixNanos::from_nanos(number(headers, PROCESSED_AT)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_survives_its_message() {
        let event = Event {
            id: EventId::parse("order 1.*>/é").unwrap(),
            timestamp: -5,
            payload: "straße \"q\"\n".into(),
        };
        let trace_id = TraceId::random();
        let received_at = UnixNanos::from_nanos(1_700_000_000_123_456_789);
        let (headers, body) = event_message(&event, received_at, trace_id, Some("00-x"));
        let record = decode_record(7, Some(&headers), &body).unwrap();
        assert_eq!(record.event, event);
        assert_eq!(record.sequence, 7);
        assert_eq!(record.received_at, received_at);
        assert_eq!(record.trace_id, trace_id);
        assert_eq!(traceparent(Some(&headers)), Some("00-x"));
    }

    #[test]
    fn any_id_makes_a_valid_subject_token() {
        let subjects = Subjects::new("eventflow");
        let subject = subjects.event(&EventId::parse("a b.c*>").unwrap());
        let token = subject.strip_prefix("eventflow.events.").unwrap();
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{token}"
        );
    }

    #[test]
    fn a_foreign_message_is_reported_not_trusted() {
        assert!(
            decode_record(1, None, b"{\"id\":\"a\",\"timestamp\":1,\"payload\":\"p\"}").is_err()
        );
        assert!(decode_record(1, None, b"garbage").is_err());
    }
}
