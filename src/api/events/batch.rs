//! Splitting a batch body (a JSON array or NDJSON) into its events.

use std::cell::Cell;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::MediaType;
use crate::api::error::ApiError;
use crate::event::{DecodeError, Event, decode_array, decode_event};
use crate::pipeline::BatchRejection;
use crate::pipeline::RejectReason;

fn too_many(max: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the batch holds more than pipeline.max_batch = {max} events"
    ))
}

/// A batch body's elements: the valid events with their index in the
/// request, and why each other one was refused.
pub(super) struct DecodedBatch {
    pub(super) received: usize,
    pub(super) valid: Vec<(usize, Event)>,
    pub(super) rejected: Vec<BatchRejection>,
}

/// The rejection of a batch element that is not a valid event.
fn invalid_element(index: usize, error: &DecodeError, id: Option<String>) -> BatchRejection {
    BatchRejection {
        index,
        reason: RejectReason::Invalid,
        id,
        error: error.summary(),
    }
}

/// Decodes a batch body into its elements.
pub(super) fn decode_batch(
    bytes: &[u8],
    media: MediaType,
    max_batch: usize,
    max_payload_bytes: usize,
) -> Result<DecodedBatch, ApiError> {
    let one_by_one = |items: Vec<&[u8]>| {
        let mut decoded = DecodedBatch {
            received: items.len(),
            valid: Vec::with_capacity(items.len()),
            rejected: Vec::new(),
        };
        for (index, item) in items.into_iter().enumerate() {
            match decode_event(item, max_payload_bytes) {
                Ok(event) => decoded.valid.push((index, event)),
                Err(error) => {
                    decoded
                        .rejected
                        .push(invalid_element(index, &error, readable_id(item)))
                }
            }
        }
        decoded
    };
    match media {
        MediaType::Json => match decode_array(bytes, max_payload_bytes, max_batch) {
            // One pass over a well-formed array (the usual case).
            Some(array) if array.len() <= max_batch => Ok(DecodedBatch {
                received: array.len(),
                valid: array.valid,
                rejected: array
                    .invalid
                    .into_iter()
                    .map(|invalid| invalid_element(invalid.index, &invalid.error, Some(invalid.id)))
                    .collect(),
            }),
            Some(_) => Err(too_many(max_batch)),
            None => split_array(bytes, max_batch).map(one_by_one),
        },
        MediaType::Ndjson => split_lines(bytes, max_batch).map(one_by_one),
    }
}

/// Splits a JSON array into its elements without decoding them, stopping
/// at the first element past `max` (so that a body of many tiny elements
/// costs no more than `max` of them).
fn split_array(bytes: &[u8], max: usize) -> Result<Vec<&[u8]>, ApiError> {
    let too_many_seen = Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let elements = serde::Deserializer::deserialize_seq(
        &mut deserializer,
        RawElements {
            max,
            too_many: &too_many_seen,
        },
    )
    .and_then(|elements| deserializer.end().map(|()| elements));
    match elements {
        Ok(elements) => Ok(elements
            .into_iter()
            .map(|raw| raw.get().as_bytes())
            .collect()),
        Err(_) if too_many_seen.get() => Err(too_many(max)),
        Err(err) if err.is_data() => Err(ApiError::invalid_body("must be a JSON array of events")),
        Err(err) => Err(ApiError::from(DecodeError::Malformed(err.to_string()))),
    }
}

/// Reads a JSON array's elements as raw JSON, at most `max` of them.
struct RawElements<'a> {
    max: usize,
    too_many: &'a Cell<bool>,
}

impl<'de> serde::de::Visitor<'de> for RawElements<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut elements = Vec::new();
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            if elements.len() == self.max {
                self.too_many.set(true);
                return Err(serde::de::Error::custom("too many events"));
            }
            elements.push(raw);
        }
        Ok(elements)
    }
}

/// Splits NDJSON into its non-blank lines.
fn split_lines(bytes: &[u8], max: usize) -> Result<Vec<&[u8]>, ApiError> {
    let mut lines = Vec::new();
    for line in bytes.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if lines.len() == max {
            return Err(too_many(max));
        }
        lines.push(line);
    }
    Ok(lines)
}

/// The `id` of an invalid event, if it has a string one.
fn readable_id(item: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<IdOnly>(item).ok()?.id? {
        serde_json::Value::String(id) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_skips_blank_lines_and_counts() {
        let body = b"{\"a\":1}\r\n\n  \n{\"b\":2}\n";
        let lines = split_lines(body, 10).unwrap();
        assert_eq!(lines, [&b"{\"a\":1}"[..], b"{\"b\":2}"]);
        assert!(matches!(
            split_lines(body, 1),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn arrays_are_split_without_decoding() {
        let items = split_array(br#"[{"id":"a"}, 5, "x"]"#, 10).unwrap();
        assert_eq!(items, [&br#"{"id":"a"}"#[..], b"5", b"\"x\""]);
        assert!(matches!(
            split_array(b"[1,", 10),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            split_array(b"{}", 10),
            Err(ApiError::InvalidBody(_))
        ));
        assert!(matches!(
            split_array(b"[1,2,3]", 2),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }
}
