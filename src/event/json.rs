//! Published events as JSON lines, written directly.

use std::time::SystemTime;

use super::{Metadata, PublishedEvent};
use crate::trace_id::TraceId;

/// Writes published events as JSON lines, directly rather than through
/// `serde_json`'s generic path (escaping every string byte by byte,
/// formatting through its `Serializer`), which was the largest single cost
/// of a batched event.
///
/// The events of one request published in one worker pass have the same
/// metadata but for their sequence: the writer keeps the metadata text of
/// the event before and reuses it when only the sequence differs, since
/// formatting two timestamps, a float and a trace id was most of what was
/// left of the cost of a line.
#[derive(Debug, Default)]
pub struct JsonWriter {
    last: Option<MetadataText>,
}

/// The metadata of an event as JSON, split around its sequence.
#[derive(Debug)]
struct MetadataText {
    /// Everything it was written from, but the sequence.
    source: MetadataSource,
    /// `,"metadata":{` up to and including `"sequence":`.
    head: String,
    /// From `,"queue_wait_ms":` to the metadata's closing brace.
    tail: String,
}

#[derive(Debug, PartialEq)]
struct MetadataSource {
    received_at: SystemTime,
    processed_at: SystemTime,
    worker: u32,
    /// Compared bit for bit, so that a NaN equals itself.
    queue_wait_ms: u64,
    trace_id: TraceId,
}

impl MetadataSource {
    fn of(m: &Metadata) -> Self {
        Self {
            received_at: m.received_at,
            processed_at: m.processed_at,
            worker: m.worker,
            queue_wait_ms: m.queue_wait_ms.to_bits(),
            trace_id: m.trace_id,
        }
    }
}

impl MetadataText {
    fn new(m: &Metadata) -> Self {
        let mut head = String::with_capacity(128);
        head.push_str(",\"metadata\":{\"received_at\":\"");
        crate::time::push_rfc3339_micros(&mut head, m.received_at);
        head.push_str("\",\"processed_at\":\"");
        crate::time::push_rfc3339_micros(&mut head, m.processed_at);
        head.push_str("\",\"worker\":");
        head.push_str(itoa::Buffer::new().format(m.worker));
        head.push_str(",\"sequence\":");
        let mut tail = String::with_capacity(96);
        tail.push_str(",\"queue_wait_ms\":");
        if m.queue_wait_ms.is_finite() {
            tail.push_str(ryu::Buffer::new().format_finite(m.queue_wait_ms));
        } else {
            tail.push_str("null");
        }
        tail.push_str(",\"trace_id\":\"");
        m.trace_id.push_hex(&mut tail);
        tail.push_str("\"}");
        Self {
            source: MetadataSource::of(m),
            head,
            tail,
        }
    }
}

impl JsonWriter {
    /// `event` as one line of JSON (no newline); see [`PublishedEvent::to_json`].
    pub fn write(&mut self, event: &PublishedEvent) -> String {
        let mut out = String::new();
        self.append(event, &mut out);
        out
    }

    /// Appends `event` as one line of JSON (no newline) to `out`: a worker
    /// writes all the lines of a pass into one buffer, saving an allocation
    /// per line and letting a sink of lines copy them in one piece.
    pub fn append(&mut self, event: &PublishedEvent, out: &mut String) {
        // Everything but the id and payload takes at most ~300 bytes (keys,
        // two timestamps, numbers at their longest, the trace id): reserved
        // so that a line without escapes never reallocates halfway.
        out.reserve(line_size_hint(&event.payload, event.id.as_str()));
        out.push_str("{\"id\":");
        push_json_str(out, event.id.as_str());
        out.push_str(",\"timestamp\":");
        out.push_str(itoa::Buffer::new().format(event.timestamp));
        out.push_str(",\"payload\":");
        push_json_str(out, &event.payload);
        if let Some(m) = &event.metadata {
            let source = MetadataSource::of(m);
            if self.last.as_ref().is_some_and(|text| text.source != source) {
                self.last = None;
            }
            let text = self.last.get_or_insert_with(|| MetadataText::new(m));
            out.push_str(&text.head);
            out.push_str(itoa::Buffer::new().format(m.sequence));
            out.push_str(&text.tail);
        }
        out.push('}');
    }
}

/// Room for the JSON line of an event with this payload and id, unless
/// they need escaping.
pub fn line_size_hint(payload: &str, id: &str) -> usize {
    payload.len() + id.len() + 320
}

/// Appends `text` as a JSON string. Text without quotes, backslashes or
/// control characters (nearly every id and payload) is copied as is; the
/// rest goes through `serde_json`'s escaping.
fn push_json_str(out: &mut String, text: &str) {
    // A fold without an early exit, so that the compiler checks many bytes
    // per instruction.
    let needs_escaping = text.bytes().fold(false, |found, b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escaping {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        match serde_json::to_string(text) {
            Ok(escaped) => out.push_str(&escaped),
            // Serializing a str cannot fail; keep the output valid JSON anyway.
            Err(_) => out.push_str("null"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, MAX_ID_BYTES};

    #[test]
    fn a_writer_reuses_metadata_text_only_while_it_still_applies() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        let base = Metadata {
            received_at: t,
            processed_at: t + std::time::Duration::from_micros(250),
            worker: 3,
            sequence: 10,
            queue_wait_ms: 0.25,
            trace_id: TraceId::from_bytes([7; 16]).unwrap(),
        };
        let micro = std::time::Duration::from_micros(1);
        // Each differs from the one before in one field (or none).
        let sequence = [
            base.clone(),
            Metadata {
                sequence: 11,
                ..base.clone()
            },
            Metadata {
                sequence: 12,
                ..base.clone()
            },
            Metadata {
                received_at: t + micro,
                ..base.clone()
            },
            Metadata {
                processed_at: t + micro,
                ..base.clone()
            },
            Metadata {
                worker: 4,
                ..base.clone()
            },
            Metadata {
                queue_wait_ms: 0.5,
                ..base.clone()
            },
            Metadata {
                queue_wait_ms: f64::NAN,
                ..base.clone()
            },
            Metadata {
                queue_wait_ms: f64::NAN,
                sequence: 13,
                ..base.clone()
            },
            Metadata {
                trace_id: TraceId::from_bytes([8; 16]).unwrap(),
                ..base.clone()
            },
            base.clone(),
        ];
        let mut writer = JsonWriter::default();
        for (i, metadata) in sequence.into_iter().enumerate() {
            let event = PublishedEvent {
                id: EventId::parse(&format!("e{i}")).unwrap(),
                timestamp: i as i64,
                payload: format!("P{i}"),
                metadata: Some(metadata),
            };
            assert_eq!(writer.write(&event), event.to_json(), "event {i}");
            let value: serde_json::Value = serde_json::from_str(&writer.write(&event)).unwrap();
            let mut expected = serde_json::to_value(&event).unwrap();
            if event
                .metadata
                .as_ref()
                .is_some_and(|m| m.queue_wait_ms.is_nan())
            {
                expected["metadata"]["queue_wait_ms"] = serde_json::Value::Null;
            }
            assert_eq!(value, expected, "event {i}");
        }
        let bare = PublishedEvent {
            id: EventId::parse("bare").unwrap(),
            timestamp: 0,
            payload: "X".into(),
            metadata: None,
        };
        assert_eq!(
            writer.write(&bare),
            r#"{"id":"bare","timestamp":0,"payload":"X"}"#
        );
    }

    #[test]
    fn lines_appended_to_one_buffer_are_each_events_json() {
        let events: Vec<PublishedEvent> = ["plain", "with \"quotes\"\n", "straße"]
            .iter()
            .enumerate()
            .map(|(i, payload)| PublishedEvent {
                id: EventId::parse(&format!("e{i}")).unwrap(),
                timestamp: i as i64,
                payload: (*payload).into(),
                metadata: None,
            })
            .collect();
        let mut writer = JsonWriter::default();
        let mut lines = String::from("kept\n");
        for event in &events {
            writer.append(event, &mut lines);
            lines.push('\n');
        }
        let expected: Vec<String> = events.iter().map(PublishedEvent::to_json).collect();
        assert_eq!(lines, format!("kept\n{}\n", expected.join("\n")));
    }

    #[test]
    fn a_line_without_escapes_is_written_in_one_allocation() {
        // Every number at its longest.
        let event = PublishedEvent {
            id: EventId::parse(&"i".repeat(MAX_ID_BYTES)).unwrap(),
            timestamp: i64::MIN,
            payload: "p".repeat(100),
            metadata: Some(Metadata {
                received_at: SystemTime::UNIX_EPOCH
                    + std::time::Duration::from_secs(253_402_300_799),
                processed_at: SystemTime::UNIX_EPOCH,
                worker: u32::MAX,
                sequence: u64::MAX,
                queue_wait_ms: -1.234_567_890_123_456_7e-300,
                trace_id: TraceId::from_bytes([0xff; 16]).unwrap(),
            }),
        };
        let json = event.to_json();
        assert_eq!(
            json.capacity(),
            event.payload.len() + MAX_ID_BYTES + 320,
            "grew while writing {} bytes",
            json.len()
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::trace_id::TraceId;

        /// Any id the service accepts: 1..=256 bytes, no control characters.
        fn any_id() -> impl Strategy<Value = EventId> {
            "[^\\p{Cc}]{1,64}".prop_filter_map("an id", |text| EventId::parse(&text).ok())
        }

        fn any_metadata() -> impl Strategy<Value = Metadata> {
            (
                0u64..4_102_444_800_000_000, // microseconds up to 2100
                0u64..10_000_000,
                any::<u32>(),
                any::<u64>(),
                proptest::num::f64::NORMAL | proptest::num::f64::ZERO,
                any::<u128>().prop_filter_map("a trace id is not zero", |n| {
                    TraceId::from_bytes(n.to_be_bytes())
                }),
            )
                .prop_map(|(received, took, worker, sequence, wait, trace)| {
                    let received_at =
                        SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(received);
                    Metadata {
                        received_at,
                        processed_at: received_at + std::time::Duration::from_micros(took),
                        worker,
                        sequence,
                        queue_wait_ms: wait.abs(),
                        trace_id: trace,
                    }
                })
        }

        fn any_event() -> impl Strategy<Value = PublishedEvent> {
            (
                any_id(),
                any::<i64>(),
                any::<String>(),
                proptest::option::of(any_metadata()),
            )
                .prop_map(|(id, timestamp, payload, metadata)| PublishedEvent {
                    id,
                    timestamp,
                    payload,
                    metadata,
                })
        }

        proptest! {
            /// The hand-written writer and serde_json say the same thing:
            /// every line is serde_json's text of the event and parses back
            /// to it, one writer reused across events (its cached metadata
            /// text) too.
            #[test]
            fn the_writer_writes_what_serde_json_reads_back(events in proptest::collection::vec(any_event(), 1..8)) {
                let mut writer = JsonWriter::default();
                for event in &events {
                    let line = writer.write(event);
                    prop_assert!(!line.contains('\n'), "one line: {line:?}");
                    // Read back as serde_json reads its own text of the
                    // event (the two may differ in form only: `e294` and
                    // `e+294`).
                    let parsed: serde_json::Value = serde_json::from_str(&line)
                        .map_err(|e| TestCaseError::fail(format!("{e}: {line}")))?;
                    let reference: serde_json::Value =
                        serde_json::from_str(&serde_json::to_string(event).unwrap()).unwrap();
                    prop_assert_eq!(&parsed, &reference);
                    // And the float exactly (serde_json's own parsing of
                    // floats is fast, not exact).
                    if let Some(metadata) = &event.metadata {
                        let raw = line
                            .split("\"queue_wait_ms\":")
                            .nth(1)
                            .and_then(|rest| rest.split(',').next())
                            .unwrap();
                        prop_assert_eq!(raw.parse::<f64>().ok(), Some(metadata.queue_wait_ms));
                    }
                    prop_assert_eq!(&parsed["id"], event.id.as_str());
                    prop_assert_eq!(&parsed["payload"], event.payload.as_str());
                    prop_assert_eq!(parsed["timestamp"].as_i64(), Some(event.timestamp));
                }
            }
        }
    }
}
