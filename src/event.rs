//! The event as clients send it, parsed into types that can only hold valid
//! values ("parse, don't validate"), and the event as it is published.
//!
//! Decoding takes a fast path (one typed `serde_json` pass) and only on
//! failure re-reads the body as a generic JSON value to name every offending
//! field, so valid traffic never pays for error reporting.

use std::borrow::Cow;
use std::fmt;
use std::time::SystemTime;

use compact_str::CompactString;
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;

use crate::trace_id::TraceId;

/// Longest accepted id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// An event id: 1..=256 bytes of UTF-8 without control characters.
///
/// Ids of up to 24 bytes (the usual UUIDs without dashes, ULIDs, counters)
/// live inline, without an allocation of their own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(CompactString);

impl EventId {
    /// Parses an id, explaining what is wrong when it is not valid.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        if raw.len() > MAX_ID_BYTES {
            return Err(format!(
                "must be at most {MAX_ID_BYTES} bytes, got {}",
                raw.len()
            ));
        }
        if has_control_characters(raw) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(CompactString::from(raw)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `text` holds a control character (Unicode category Cc). Ids are
/// nearly always ASCII, where that is a byte test the compiler runs over
/// many bytes at once; only other text is decoded character by character.
fn has_control_characters(text: &str) -> bool {
    if text.is_ascii() {
        text.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        text.chars().any(char::is_control)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

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

/// The wire shape, used by the fast path. The id is borrowed from the
/// body when it has no escapes: it is copied once, into its [`EventId`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEvent<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    timestamp: i64,
    payload: String,
}

/// Decodes and validates one JSON event.
pub fn decode_event(bytes: &[u8], max_payload_bytes: usize) -> Result<Event, DecodeError> {
    match from_json::<WireEvent>(bytes) {
        Ok(wire) => validate(wire, max_payload_bytes).map_err(DecodeError::Invalid),
        Err(fast_err) => Err(explain(bytes, max_payload_bytes, &fast_err)),
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
        while let Some(wire) = seq.next_element::<WireEvent<'de>>()? {
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

fn validate(wire: WireEvent<'_>, max_payload_bytes: usize) -> Result<Event, Vec<FieldError>> {
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
fn explain(bytes: &[u8], max_payload_bytes: usize, fast_err: &serde_json::Error) -> DecodeError {
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return DecodeError::Malformed(e.to_string()),
    };
    let serde_json::Value::Object(map) = value else {
        return DecodeError::Invalid(vec![FieldError::new("body", "must be a JSON object")]);
    };
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
    for key in map.keys() {
        if !matches!(key.as_str(), "id" | "timestamp" | "payload") {
            errors.push(FieldError::new(key.clone(), "unknown field"));
        }
    }
    if errors.is_empty() {
        // Valid as a generic value yet rejected by the typed pass: for
        // example a duplicated key. Report serde's own words.
        errors.push(FieldError::new("body", fast_err.to_string()));
    }
    DecodeError::Invalid(errors)
}

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
    /// Arrival order.
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

/// Serializes a time as RFC 3339 in UTC with microseconds.
pub fn rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(crate::time::rfc3339_micros(*time).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

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
