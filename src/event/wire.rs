//! Request bodies into events.
//!
//! Decoding takes a fast path (one typed `serde_json` pass) and only on
//! failure re-reads the body as a generic JSON value to name every offending
//! field, so valid traffic never pays for error reporting.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Event, EventId};

/// Most field errors one event is answered with (a body of thousands of
/// unknown keys must not be echoed back whole).
const MAX_FIELD_ERRORS: usize = 20;

/// Most bytes of a client's string an error repeats.
pub const ECHO_MAX: usize = 128;

/// `text` cut to at most [`ECHO_MAX`] bytes (at a character boundary), with
/// `…` when cut: errors repeat what a client sent, never all of it.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= ECHO_MAX {
        return text.into();
    }
    let mut end = ECHO_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// One problem with one field of an incoming event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// Field name (`id`, `timestamp`, `payload`, an unknown field's name, or `body`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why bytes could not become an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all (→ 400).
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// JSON, but fields are missing, of the wrong type or out of range (→ 422).
    #[error("invalid event")]
    Invalid(Vec<FieldError>),
}

impl DecodeError {
    /// A one-line description, used for batch rejections.
    pub fn summary(&self) -> String {
        match self {
            Self::Malformed(msg) => format!("malformed JSON: {msg}"),
            Self::Invalid(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// An event as clients send it: the type the fast path decodes into, and
/// the request schema of the OpenAPI document, so that the document states
/// the constraints this module enforces. The id is borrowed from the body
/// when it has no escapes: it is copied once, into its [`EventId`].
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventInput<'a> {
    /// The idempotency key: 1 to 256 bytes of UTF-8 without control characters.
    #[serde(borrow)]
    #[schema(
        value_type = String,
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    id: Cow<'a, str>,
    /// Unix seconds: a JSON integer in the int64 range (no floats, no strings).
    timestamp: i64,
    /// Any text of at most `pipeline.max_payload_bytes` bytes (the served
    /// document states the configured limit).
    payload: String,
}

/// Decodes and validates one JSON event.
pub fn decode_event(bytes: &[u8], max_payload_bytes: usize) -> Result<Event, DecodeError> {
    match from_json::<EventInput>(bytes) {
        Ok(wire) => validate(wire, max_payload_bytes).map_err(DecodeError::Invalid),
        Err(fast_err) => explain(bytes, max_payload_bytes, &fast_err),
    }
}

/// An element of a batch that decoded but is not a valid event.
#[derive(Debug)]
pub struct InvalidElement {
    /// Its index in the array.
    pub index: usize,
    /// What is wrong with it.
    pub error: DecodeError,
    /// Its id, as sent.
    pub id: String,
}

/// A JSON array of events, decoded and validated.
#[derive(Debug, Default)]
pub struct DecodedArray {
    /// The valid events, with their index in the array.
    pub valid: Vec<(usize, Event)>,
    /// The elements that decoded but are not valid events.
    pub invalid: Vec<InvalidElement>,
}

impl DecodedArray {
    /// How many elements the array has.
    pub fn len(&self) -> usize {
        self.valid.len() + self.invalid.len()
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decodes a JSON array of events in one pass, validating each element as
/// it is read (no array of raw elements in between).
///
/// `None` when the body is not an array whose every element is a
/// well-formed event object, or has more than `max_events` elements
/// (decoding stops there, so a body of many tiny elements costs no more
/// than `max_events` of them): the caller then splits the array and decodes
/// element by element, to say which ones are wrong and how, or that there
/// are too many.
pub fn decode_array(
    bytes: &[u8],
    max_payload_bytes: usize,
    max_events: usize,
) -> Option<DecodedArray> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let decoded = serde::Deserializer::deserialize_seq(
        &mut deserializer,
        ArrayVisitor {
            max_payload_bytes,
            max_events,
        },
    )
    .ok()?;
    deserializer.end().ok()?;
    Some(decoded)
}

/// Reads the elements of a JSON array of events into a [`DecodedArray`].
struct ArrayVisitor {
    max_payload_bytes: usize,
    max_events: usize,
}

impl<'de> serde::de::Visitor<'de> for ArrayVisitor {
    type Value = DecodedArray;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<DecodedArray, A::Error> {
        let mut decoded = DecodedArray::default();
        while let Some(wire) = seq.next_element::<EventInput<'de>>()? {
            let index = decoded.len();
            if index == self.max_events {
                return Err(serde::de::Error::custom("too many events"));
            }
            // Free while borrowed; only a rejection makes it a `String`.
            let id = wire.id.clone();
            match validate(wire, self.max_payload_bytes) {
                Ok(event) => decoded.valid.push((index, event)),
                Err(errors) => decoded.invalid.push(InvalidElement {
                    index,
                    error: DecodeError::Invalid(errors),
                    id: id.into_owned(),
                }),
            }
        }
        Ok(decoded)
    }
}

/// Parses JSON bytes. Text that is valid UTF-8 (nearly every body) is
/// checked once, in one pass over the whole of it, rather than string by
/// string as `serde_json` checks bytes; other bytes go to `serde_json` as
/// they are, for its error.
fn from_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

fn validate(wire: EventInput<'_>, max_payload_bytes: usize) -> Result<Event, Vec<FieldError>> {
    let mut errors = Vec::new();
    let id = EventId::parse(&wire.id).map_err(|m| errors.push(FieldError::new("id", m)));
    if wire.payload.len() > max_payload_bytes {
        errors.push(payload_too_large(wire.payload.len(), max_payload_bytes));
    }
    match id {
        Ok(id) if errors.is_empty() => Ok(Event {
            id,
            timestamp: wire.timestamp,
            payload: wire.payload.into_boxed_str(),
        }),
        _ => Err(errors),
    }
}

fn payload_too_large(len: usize, max: usize) -> FieldError {
    FieldError::new("payload", format!("must be at most {max} bytes, got {len}"))
}

/// The slow path: say exactly which fields are wrong.
///
/// One event the fast path refuses is valid: `"timestamp": -0`, a JSON
/// integer that serde_json reads as the float -0.0; it is decoded here,
/// as 0.
fn explain(
    bytes: &[u8],
    max_payload_bytes: usize,
    fast_err: &serde_json::Error,
) -> Result<Event, DecodeError> {
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        // Valid JSON (`1e400`, a 5,000-digit integer) that no number type
        // here can hold: a value out of range (422), not malformed JSON.
        Err(e) if e.to_string().starts_with("number out of range") => {
            return Err(DecodeError::Invalid(vec![FieldError::new(
                "body",
                clip(&format!("{e}: numbers must fit an int64 or a double")).into_owned(),
            )]));
        }
        Err(e) => return Err(DecodeError::Malformed(clip(&e.to_string()).into_owned())),
    };
    let serde_json::Value::Object(map) = value else {
        return Err(DecodeError::Invalid(vec![FieldError::new(
            "body",
            "must be a JSON object",
        )]));
    };
    let mut negative_zero = false;
    let mut errors = Vec::new();
    match map.get("id") {
        None => errors.push(FieldError::new("id", "is required")),
        Some(serde_json::Value::String(s)) => {
            if let Err(m) = EventId::parse(s) {
                errors.push(FieldError::new("id", m));
            }
        }
        Some(_) => errors.push(FieldError::new("id", "must be a string")),
    }
    match map.get("timestamp") {
        None => errors.push(FieldError::new("timestamp", "is required")),
        Some(serde_json::Value::Number(n)) if n.is_i64() => {}
        Some(serde_json::Value::Number(n))
            if n.as_f64() == Some(0.0) && is_negative_zero(bytes) =>
        {
            negative_zero = true;
        }
        Some(serde_json::Value::Number(n)) if n.is_u64() => errors.push(FieldError::new(
            "timestamp",
            "must be within the int64 range",
        )),
        Some(serde_json::Value::Number(_)) => errors.push(FieldError::new(
            "timestamp",
            "must be an integer (Unix seconds) within the int64 range",
        )),
        Some(_) => errors.push(FieldError::new(
            "timestamp",
            "must be an integer (Unix seconds)",
        )),
    }
    match map.get("payload") {
        None => errors.push(FieldError::new("payload", "is required")),
        Some(serde_json::Value::String(s)) if s.len() > max_payload_bytes => {
            errors.push(payload_too_large(s.len(), max_payload_bytes));
        }
        Some(serde_json::Value::String(_)) => {}
        Some(_) => errors.push(FieldError::new("payload", "must be a string")),
    }
    let is_unknown = |key: &&String| !matches!(key.as_str(), "id" | "timestamp" | "payload");
    for key in map.keys().filter(is_unknown) {
        if errors.len() + 1 == MAX_FIELD_ERRORS {
            let more = map.keys().filter(is_unknown).count();
            errors.push(FieldError::new(
                "body",
                format!("{more} unknown fields in all (not all listed)"),
            ));
            break;
        }
        errors.push(FieldError::new(clip(key).into_owned(), "unknown field"));
    }
    if errors.is_empty()
        && negative_zero
        && let Some(event) = decode_with_negative_zero(bytes)
    {
        return Ok(event);
    }
    if errors.is_empty() {
        // Valid as a generic value yet rejected by the typed pass: for
        // example a duplicated key. Report serde's own words.
        errors.push(FieldError::new(
            "body",
            clip(&fast_err.to_string()).into_owned(),
        ));
    }
    Err(DecodeError::Invalid(errors))
}

/// The event, when it is valid but for a timestamp written `-0`: decoded
/// by the same rules as the fast path (a duplicated key is refused), with
/// the timestamp taken as written.
fn decode_with_negative_zero(bytes: &[u8]) -> Option<Event> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Exact<'a> {
        #[serde(borrow)]
        id: Cow<'a, str>,
        #[serde(borrow)]
        timestamp: &'a serde_json::value::RawValue,
        payload: String,
    }
    let exact: Exact<'_> = serde_json::from_slice(bytes).ok()?;
    (exact.timestamp.get().trim() == "-0").then_some(())?;
    Some(Event {
        id: EventId::parse(&exact.id).ok()?,
        timestamp: 0,
        payload: exact.payload.into_boxed_str(),
    })
}

/// Whether the event's timestamp is written `-0` (an integer), not `-0.0`
/// or `-0e0` (floats), which serde_json reads alike.
fn is_negative_zero(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Timestamp<'a> {
        #[serde(borrow)]
        timestamp: &'a serde_json::value::RawValue,
    }
    serde_json::from_slice::<Timestamp<'_>>(bytes)
        .is_ok_and(|raw| raw.timestamp.get().trim() == "-0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_states_the_id_limit_that_is_enforced() {
        use utoipa::PartialSchema;

        use crate::event::MAX_ID_BYTES;
        let schema = serde_json::to_value(EventInput::schema()).unwrap();
        assert_eq!(schema["properties"]["id"]["maxLength"], MAX_ID_BYTES);
        assert_eq!(schema["properties"]["id"]["minLength"], 1);
        assert_eq!(schema["additionalProperties"], false);
        let required = schema["required"].as_array().unwrap();
        assert_eq!(required.len(), 3, "{schema}");
    }

    const MAX: usize = 65_536;

    fn body(id: &str, timestamp: &str, payload: &str) -> Vec<u8> {
        format!(
            r#"{{"id":{},"timestamp":{timestamp},"payload":{}}}"#,
            serde_json::to_string(id).unwrap(),
            serde_json::to_string(payload).unwrap()
        )
        .into_bytes()
    }

    #[test]
    fn arrays_decode_in_one_pass_with_each_element_validated() {
        let decoded = decode_array(
            br#"[{"id":"a","timestamp":1,"payload":"p"},
                {"id":"","timestamp":3,"payload":"r"},
                {"id":"esc\u0061ped","timestamp":2,"payload":"q"}] "#,
            MAX,
            3,
        )
        .expect("well-formed elements");
        assert_eq!(decoded.len(), 3);
        let valid: Vec<(usize, &str)> = decoded
            .valid
            .iter()
            .map(|(index, event)| (*index, event.id.as_str()))
            .collect();
        assert_eq!(valid, [(0, "a"), (2, "escaped")]);
        let [invalid] = &decoded.invalid[..] else {
            panic!("{:?}", decoded.invalid)
        };
        assert_eq!((invalid.index, invalid.id.as_str()), (1, ""));
        assert!(invalid.error.summary().starts_with("id: "));
    }

    #[test]
    fn arrays_with_a_malformed_element_are_left_to_the_slow_path() {
        for body in [
            &br#"{"id":"a","timestamp":1,"payload":"p"}"#[..],
            br#"[{"id":"a","timestamp":1,"payload":"p","extra":1}]"#,
            br#"[{"id":"a","timestamp":"1","payload":"p"}]"#,
            br#"[{"id":"a","timestamp":1,"payload":"p"}, 5]"#,
            br#"[{"id":"a","timestamp":1,"payload":"p"}"#,
            b"[{\"id\":\"a\",\"timestamp\":1,\"payload\":\"\xe2\x82\"}]",
            br#"[{"id":"a","timestamp":1,"payload":"p"}] []"#,
        ] {
            assert!(
                decode_array(body, MAX, 10).is_none(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(decode_array(b"[]", MAX, 10).unwrap().len(), 0);
    }

    #[test]
    fn arrays_over_the_event_limit_stop_decoding_at_it() {
        let two =
            br#"[{"id":"a","timestamp":1,"payload":"p"},{"id":"b","timestamp":1,"payload":"p"}]"#;
        assert_eq!(decode_array(two, MAX, 2).unwrap().len(), 2);
        assert!(decode_array(two, MAX, 1).is_none());
    }

    fn fields(err: DecodeError) -> Vec<String> {
        match err {
            DecodeError::Invalid(errors) => errors.into_iter().map(|e| e.field).collect(),
            DecodeError::Malformed(m) => panic!("expected invalid, got malformed: {m}"),
        }
    }

    #[test]
    fn accepts_a_valid_event() {
        let event = decode_event(&body("a-1", "1700000000", "hello"), MAX).unwrap();
        assert_eq!(event.id.as_str(), "a-1");
        assert_eq!(event.timestamp, 1_700_000_000);
        assert_eq!(&*event.payload, "hello");
    }

    #[test]
    fn id_boundaries() {
        let ok = "x".repeat(256);
        assert!(decode_event(&body(&ok, "1", ""), MAX).is_ok());
        let long = "x".repeat(257);
        assert_eq!(
            fields(decode_event(&body(&long, "1", ""), MAX).unwrap_err()),
            ["id"]
        );
        assert_eq!(
            fields(decode_event(&body("", "1", ""), MAX).unwrap_err()),
            ["id"]
        );
        // 256 bytes of multi-byte characters is fine; 257 bytes is not.
        let multibyte = "é".repeat(128);
        assert!(decode_event(&body(&multibyte, "1", ""), MAX).is_ok());
        let multibyte_long = format!("{multibyte}x");
        assert!(decode_event(&body(&multibyte_long, "1", ""), MAX).is_err());
    }

    #[test]
    fn id_rejects_control_characters() {
        for id in [
            "a\nb",
            "a\u{0}b",
            "tab\t",
            "del\u{7f}",
            "c1\u{85}",
            "straße\u{9f}",
            "✓\u{1}",
        ] {
            assert_eq!(
                fields(decode_event(&body(id, "1", ""), MAX).unwrap_err()),
                ["id"],
                "{id:?}"
            );
        }
        for id in ["unicode ✓ id/with spaces", "straße", "\u{a0}nbsp", "~"] {
            assert!(decode_event(&body(id, "1", ""), MAX).is_ok(), "{id:?}");
        }
    }

    #[test]
    fn payload_boundaries() {
        let ok = "p".repeat(MAX);
        assert!(decode_event(&body("a", "1", &ok), MAX).is_ok());
        let over = "p".repeat(MAX + 1);
        let err = decode_event(&body("a", "1", &over), MAX).unwrap_err();
        assert_eq!(fields(err), ["payload"]);
        assert!(decode_event(&body("a", "1", ""), MAX).is_ok());
    }

    #[test]
    fn timestamp_must_be_an_int64_integer() {
        assert!(decode_event(&body("a", "9223372036854775807", ""), MAX).is_ok());
        assert!(decode_event(&body("a", "-9223372036854775808", ""), MAX).is_ok());
        for bad in [
            "9223372036854775808",
            "-9223372036854775809",
            "1.5",
            "1.0",
            "1e3",
            "\"1700000000\"",
            "null",
            "true",
        ] {
            let err = decode_event(&body("a", bad, ""), MAX).unwrap_err();
            assert_eq!(fields(err), ["timestamp"], "timestamp {bad}");
        }
    }

    #[test]
    fn missing_wrong_typed_and_unknown_fields_are_all_named() {
        let err = decode_event(br#"{"id":5,"extra":1}"#, MAX).unwrap_err();
        assert_eq!(fields(err), ["id", "timestamp", "payload", "extra"]);
        let err = decode_event(br#"{"id":"a","timestamp":1,"payload":["x"]}"#, MAX).unwrap_err();
        assert_eq!(fields(err), ["payload"]);
        let err = decode_event(br#"[1,2]"#, MAX).unwrap_err();
        assert_eq!(fields(err), ["body"]);
        let err =
            decode_event(br#"{"id":"a","id":"b","timestamp":1,"payload":""}"#, MAX).unwrap_err();
        assert_eq!(fields(err), ["body"]);
    }

    #[test]
    fn malformed_json_is_distinguished() {
        for bad in [
            &b"{"[..],
            b"",
            b"not json",
            b"{\"id\":\"a\",}",
            b"\xff\xfe",
            // Well-formed but for a string that is not UTF-8.
            b"{\"id\":\"a\",\"timestamp\":1,\"payload\":\"\xff\"}",
            b"{\"id\":\"\xc3\",\"timestamp\":1,\"payload\":\"\"}",
        ] {
            assert!(matches!(
                decode_event(bad, MAX),
                Err(DecodeError::Malformed(_))
            ));
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A valid event as JSON text, and its fields.
        fn valid_event() -> impl Strategy<Value = (String, i64, String)> {
            (
                "[^\\p{Cc}]{1,40}".prop_filter("an id", |id| EventId::parse(id).is_ok()),
                any::<i64>(),
                any::<String>().prop_map(|p| p.chars().take(200).collect::<String>()),
            )
        }

        fn json_of(id: &str, timestamp: i64, payload: &str) -> Vec<u8> {
            serde_json::to_vec(&serde_json::json!({
                "id": id, "timestamp": timestamp, "payload": payload,
            }))
            .unwrap()
        }

        proptest! {
            /// Any bytes: an event or an error, never a panic.
            #[test]
            fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode_event(&bytes, MAX);
                let _ = decode_array(&bytes, MAX, 100);
            }

            /// A valid event decodes to exactly its fields.
            #[test]
            fn valid_events_decode_to_their_fields((id, timestamp, payload) in valid_event()) {
                let event = decode_event(&json_of(&id, timestamp, &payload), MAX).unwrap();
                prop_assert_eq!(event.id.as_str(), id.as_str());
                prop_assert_eq!(event.timestamp, timestamp);
                prop_assert_eq!(&*event.payload, payload.as_str());
            }

            /// A valid event with one byte changed, inserted or removed:
            /// decoded or refused, never a panic, and when it decodes it is
            /// what serde_json reads in the same bytes.
            #[test]
            fn near_valid_json_is_decoded_or_refused(
                (id, timestamp, payload) in valid_event(),
                position in any::<prop::sample::Index>(),
                byte in any::<u8>(),
                edit in 0..3u8,
            ) {
                let mut bytes = json_of(&id, timestamp, &payload);
                let at = position.index(bytes.len());
                match edit {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => {
                        bytes.remove(at);
                    }
                }
                if let Ok(event) = decode_event(&bytes, MAX) {
                    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    prop_assert_eq!(value["id"].as_str(), Some(event.id.as_str()));
                    prop_assert_eq!(value["payload"].as_str(), Some(&*event.payload));
                }
                let mut array = b"[".to_vec();
                array.extend_from_slice(&bytes);
                array.push(b']');
                let _ = decode_array(&array, MAX, 100);
            }
        }
    }
}
