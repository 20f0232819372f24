//! The event as the sinks publish it.

use std::time::SystemTime;

use serde::{Serialize, Serializer};
use utoipa::ToSchema;

use super::{EventId, JsonWriter};
use crate::trace_id::TraceId;

/// Metadata the `enrich` transform adds.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Metadata {
    /// When the service accepted the event (RFC 3339, UTC).
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub received_at: SystemTime,
    /// When a worker processed it (RFC 3339, UTC).
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub processed_at: SystemTime,
    /// Id of the worker that processed it.
    pub worker: u32,
    /// Arrival sequence: the order events were accepted (not the publication sequence of the SSE `id:`; in nats mode the two differ).
    pub sequence: u64,
    /// Time from acceptance until a worker took it, in milliseconds.
    pub queue_wait_ms: f64,
    /// W3C trace id (32 hex digits) of the request that ingested it.
    #[schema(value_type = String)]
    pub trace_id: TraceId,
}

/// The event as published by the sinks.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PublishedEvent {
    /// The client's id.
    #[schema(value_type = String)]
    pub id: EventId,
    /// The client's timestamp.
    pub timestamp: i64,
    /// The transformed payload.
    pub payload: String,
    /// Present when the `enrich` transform ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

impl PublishedEvent {
    /// The event as one line of JSON (no newline): the same JSON value its
    /// `Serialize` implementation gives, written directly. To write many
    /// events, a [`JsonWriter`] reuses what they share.
    pub fn to_json(&self) -> String {
        JsonWriter::default().write(self)
    }
}

/// Serializes a time as RFC 3339 in UTC with microseconds.
fn rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(crate::time::rfc3339_micros(*time).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_json_is_the_serde_json_value() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(1_700_000_000_123_456_789);
        let metadata = Metadata {
            received_at: t,
            processed_at: t + std::time::Duration::from_micros(1500),
            worker: 7,
            sequence: u64::MAX,
            queue_wait_ms: 1.5,
            trace_id: TraceId::from_bytes(0x0af7651916cd43dd8448eb211c80319c_u128.to_be_bytes())
                .unwrap(),
        };
        let awkward = [
            "plain ascii",
            "",
            "quote \" and backslash \\",
            "newline\n tab\t nul\u{0} del\u{7f}",
            "unicode straße ✓ \u{1f600}",
            "</script>",
        ];
        for text in awkward {
            for metadata in [Some(metadata.clone()), None] {
                let event = PublishedEvent {
                    // Ids cannot be empty or hold control characters.
                    id: EventId::parse(text).unwrap_or_else(|_| EventId::parse("id").unwrap()),
                    timestamp: i64::MIN,
                    payload: text.to_owned(),
                    metadata,
                };
                let fast: serde_json::Value = serde_json::from_str(&event.to_json())
                    .unwrap_or_else(|e| panic!("{text:?}: {e}: {}", event.to_json()));
                assert_eq!(fast, serde_json::to_value(&event).unwrap(), "{text:?}");
            }
        }
        let odd = PublishedEvent {
            id: EventId::parse("x").unwrap(),
            timestamp: 0,
            payload: String::new(),
            metadata: Some(Metadata {
                queue_wait_ms: f64::NAN,
                ..metadata
            }),
        };
        let value: serde_json::Value = serde_json::from_str(&odd.to_json()).unwrap();
        assert!(value["metadata"]["queue_wait_ms"].is_null());
    }

    #[test]
    fn published_event_serializes_metadata_as_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let event = PublishedEvent {
            id: EventId::parse("a").unwrap(),
            timestamp: 1,
            payload: "X".into(),
            metadata: Some(Metadata {
                received_at: t,
                processed_at: t,
                worker: 2,
                sequence: 9,
                queue_wait_ms: 0.5,
                trace_id: TraceId::from_bytes(
                    0x0af7651916cd43dd8448eb211c80319c_u128.to_be_bytes(),
                )
                .unwrap(),
            }),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json["metadata"]["received_at"],
            "2023-11-14T22:13:20.123000Z"
        );
        assert_eq!(json["metadata"]["sequence"], 9);
        assert_eq!(
            json["metadata"]["trace_id"],
            "0af7651916cd43dd8448eb211c80319c"
        );
        let bare = PublishedEvent {
            metadata: None,
            ..event
        };
        assert!(
            serde_json::to_value(&bare)
                .unwrap()
                .get("metadata")
                .is_none()
        );
    }
}
