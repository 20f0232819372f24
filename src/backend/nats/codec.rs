//! How ids records, backlog chunks, publications and failures are written
//! as JetStream messages, and read back.
//!
//! Subjects (under `backend.nats.subject_prefix`):
//!
//! - `<prefix>.ids.<key>`: an id's record; the key is the id's bytes in
//!   unpadded base64url, since an id may hold any character and a subject
//!   token may not (no spaces, dots or wildcards);
//! - `<prefix>.backlog`: chunks of accepted events (one subject: the
//!   backlog is read in order, never by key);
//! - `<prefix>.published.<sequence>` and `<prefix>.failed.<sequence>`: an
//!   accepted event's publication or failure, by its arrival sequence, so
//!   that each acceptance is published at most once
//!   (`Nats-Expected-Last-Subject-Sequence: 0`) and found again by it;
//! - `<prefix>.dead.<subscription>.<sequence>` and
//!   `<prefix>.again.<subscription>.<sequence>`: an event dead-lettered for
//!   a subscription, and one handed out again, by its publication sequence.

use async_nats::{HeaderMap, Subject};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventId, MAX_ID_BYTES, decode_event};
use crate::store::{Outcome, Record};
use crate::time::UnixNanos;
use crate::trace_id::{SpanRef, TraceId};

/// How a published event was processed: its worker and when (Unix
/// nanoseconds), space-separated.
pub(super) const PROCESSED: &str = "Eventflow-Processed";
/// Why a failed event failed.
pub(super) const ERROR: &str = "Eventflow-Error";
/// Events in a backlog chunk.
pub(super) const EVENTS: &str = "Eventflow-Events";
/// Times a retried event was queued (absent: once).
pub(super) const ATTEMPTS: &str = "Eventflow-Attempts";
/// The exported span that processed a published event (`<trace>-<span>`,
/// hex), when one did: a subscription's poll links to it.
pub(super) const SPAN: &str = "Eventflow-Span";
/// Marks a failed event's retry on its subject of the failed stream: it is
/// pending again.
pub(super) const RETRIED: &str = "Eventflow-Retried";

/// Room kept for a message's headers and subject beside its body when
/// sizes are compared with the server's `max_payload`.
pub(crate) const HEADROOM: usize = 2048;

/// The longest message an event of `max_payload_bytes` can make (its
/// record, its chunk entry or its published line): every byte of id and
/// payload escaped as `\u00XX` (6 bytes) is the worst case, which also
/// covers uppercase's growth (at most 3 bytes for 1), plus the metadata.
pub(crate) fn largest_message(max_payload_bytes: usize) -> usize {
    6usize
        .saturating_mul(MAX_ID_BYTES.saturating_add(max_payload_bytes))
        .saturating_add(HEADROOM)
}

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

    /// Every id record's subject.
    pub(super) fn ids(&self) -> String {
        format!("{}.ids.>", self.prefix)
    }

    /// The backlog's one subject.
    pub(super) fn backlog(&self) -> String {
        format!("{}.backlog", self.prefix)
    }

    /// Every published event's subject.
    pub(super) fn published(&self) -> String {
        format!("{}.published.>", self.prefix)
    }

    /// Every failed event's subject.
    pub(super) fn failed(&self) -> String {
        format!("{}.failed.>", self.prefix)
    }

    /// Every dead letter's and redelivery's subject.
    pub(super) fn dead_letters(&self) -> [String; 2] {
        [
            format!("{}.dead.>", self.prefix),
            format!("{}.again.>", self.prefix),
        ]
    }

    /// `subscription`'s dead letters (`event`: the one of that publication
    /// sequence; `None`: all of them).
    pub(super) fn dead(&self, subscription: &str, event: Option<u64>) -> String {
        Self::of_subscription(&self.prefix, "dead", subscription, event)
    }

    /// `subscription`'s redeliveries of dead letters.
    pub(super) fn again(&self, subscription: &str, event: Option<u64>) -> String {
        Self::of_subscription(&self.prefix, "again", subscription, event)
    }

    fn of_subscription(prefix: &str, kind: &str, subscription: &str, event: Option<u64>) -> String {
        match event {
            Some(sequence) => format!("{prefix}.{kind}.{subscription}.{sequence}"),
            None => format!("{prefix}.{kind}.{subscription}.>"),
        }
    }

    /// An id's subject. (Written without `format!`: one a record, on the
    /// hot path.)
    pub(super) fn id(&self, id: &EventId) -> Subject {
        let mut subject =
            String::with_capacity(self.prefix.len() + 5 + id.as_str().len() * 4 / 3 + 4);
        subject.push_str(&self.prefix);
        subject.push_str(".ids.");
        URL_SAFE_NO_PAD.encode_string(id.as_str(), &mut subject);
        Subject::from(subject)
    }

    pub(super) fn published_event(&self, sequence: u64) -> Subject {
        self.of_sequence(".published.", sequence)
    }

    pub(super) fn failed_event(&self, sequence: u64) -> Subject {
        self.of_sequence(".failed.", sequence)
    }

    fn of_sequence(&self, kind: &str, sequence: u64) -> Subject {
        let mut subject = String::with_capacity(self.prefix.len() + kind.len() + 20);
        subject.push_str(&self.prefix);
        subject.push_str(kind);
        subject.push_str(itoa::Buffer::new().format(sequence));
        Subject::from(subject)
    }
}

#[derive(Serialize)]
struct StoredEvent<'a> {
    id: &'a str,
    timestamp: i64,
    payload: &'a str,
}

/// A record's body: when the event was accepted and its trace id on a
/// first line (`<Unix nanoseconds> <32 hex digits>`), then its JSON. No
/// headers of its own: the one the write needs
/// (`Nats-Expected-Last-Subject-Sequence`) is all a record message carries.
fn record_body(event: &Event, received_at: UnixNanos, trace_id: TraceId) -> Bytes {
    let mut body = Vec::with_capacity(64 + event.id.as_str().len() + event.payload.len());
    body.extend_from_slice(
        itoa::Buffer::new()
            .format(received_at.as_nanos())
            .as_bytes(),
    );
    body.push(b' ');
    let mut hex = String::with_capacity(32);
    trace_id.push_hex(&mut hex);
    body.extend_from_slice(hex.as_bytes());
    body.push(b'\n');
    // Serializing strings and an integer cannot fail.
    let _ = serde_json::to_writer(
        &mut body,
        &StoredEvent {
            id: event.id.as_str(),
            timestamp: event.timestamp,
            payload: &event.payload,
        },
    );
    Bytes::from(body)
}

/// An id's record: the event, when it was accepted and its trace id.
pub(super) fn id_record(event: &Event, received_at: UnixNanos, trace_id: TraceId) -> Bytes {
    record_body(event, received_at, trace_id)
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|value| value.as_str())
}

/// A message that is not one eventflow wrote.
#[derive(Debug, thiserror::Error)]
#[error("stream message {sequence} is not an eventflow record: {reason}")]
pub(super) struct Undecodable {
    sequence: u64,
    reason: String,
}

/// The record in a record body (an id's record, or a failed event's
/// message), with arrival sequence `sequence` and no outcome (that is on
/// the other streams).
pub(super) fn decode_record(sequence: u64, payload: &[u8]) -> Result<Record, Undecodable> {
    let undecodable = |reason: &str| Undecodable {
        sequence,
        reason: reason.to_owned(),
    };
    let newline = payload
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| undecodable("no first line"))?;
    let (first, json) = payload.split_at(newline);
    let first = std::str::from_utf8(first).map_err(|_| undecodable("a first line not UTF-8"))?;
    let (received_at, trace) = first
        .split_once(' ')
        .ok_or_else(|| undecodable("a first line without a trace id"))?;
    let received_at = received_at
        .parse()
        .map(UnixNanos::from_nanos)
        .map_err(|_| undecodable("no time of receipt"))?;
    let trace_id = u128::from_str_radix(trace, 16)
        .ok()
        .and_then(|id| TraceId::from_bytes(id.to_be_bytes()))
        .unwrap_or_else(TraceId::random);
    // Validated when accepted; no payload limit applies on the way back.
    let event = decode_event(&json[1..], usize::MAX).map_err(|e| undecodable(&format!("{e:?}")))?;
    Ok(Record::with_outcome(
        event,
        sequence,
        received_at,
        trace_id,
        None,
    ))
}

/// One event of a backlog chunk.
#[derive(Serialize, Deserialize)]
struct ChunkEntry<'a> {
    /// Arrival sequence.
    s: u64,
    /// Received at (Unix nanoseconds).
    r: u64,
    /// Trace id, 32 hex digits.
    t: &'a str,
    /// W3C trace context of the ingest span, when it was traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<&'a str>,
    /// Queued again by a retry: it may have been published already.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    h: bool,
    /// Times it was queued, this one included (absent: once).
    #[serde(default = "once", skip_serializing_if = "is_once")]
    a: u32,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    timestamp: i64,
    #[serde(borrow)]
    payload: std::borrow::Cow<'a, str>,
}

fn once() -> u32 {
    1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_once(attempts: &u32) -> bool {
    *attempts <= 1
}

/// An event as the backlog carries it.
#[derive(Debug)]
pub(super) struct Queued {
    /// The record (arrival sequence, trace id, received at).
    pub(super) record: Record,
    /// The ingest span's context, when the request was traced.
    pub(super) traceparent: Option<String>,
    /// Queued again by a retry: it may have been published already.
    pub(super) requeued: bool,
    /// Times it was queued, this one included.
    pub(super) attempts: u32,
}

/// A queue item's events as chunk entries: JSON objects, comma-separated,
/// ready to be joined with other items' into one chunk.
#[derive(Debug, Default)]
pub(super) struct Entries {
    /// How many events.
    pub(super) events: usize,
    /// Their entries, comma-separated.
    pub(super) body: Vec<u8>,
}

/// Encodes events as chunk entries, in pieces of at most `limit` bytes (a
/// piece holds one event at least).
pub(super) fn entries<'a>(
    events: impl Iterator<Item = (&'a Record, bool, u32)>,
    traceparent: Option<&str>,
    limit: usize,
) -> Vec<Entries> {
    let mut pieces: Vec<Entries> = Vec::new();
    let mut trace = String::with_capacity(32);
    for (record, requeued, attempts) in events {
        trace.clear();
        record.trace_id.push_hex(&mut trace);
        let entry = ChunkEntry {
            s: record.sequence,
            r: record.received_at.as_nanos(),
            t: &trace,
            p: traceparent,
            h: requeued,
            a: attempts,
            id: record.event.id.as_str().into(),
            timestamp: record.event.timestamp,
            payload: (&*record.event.payload).into(),
        };
        let Ok(line) = serde_json::to_vec(&entry) else {
            continue;
        };
        let fits = pieces
            .last()
            // A separator, and the chunk's brackets.
            .is_some_and(|piece| piece.body.len() + line.len() + 3 <= limit);
        if !fits {
            pieces.push(Entries::default());
        }
        if let Some(piece) = pieces.last_mut() {
            if piece.events > 0 {
                piece.body.push(b',');
            }
            piece.body.extend_from_slice(&line);
            piece.events += 1;
        }
    }
    pieces
}

/// A chunk message's body: the entries of one or more items, as one array.
pub(super) fn chunk<'a>(pieces: impl Iterator<Item = &'a Entries>) -> Bytes {
    let mut body = vec![b'['];
    for piece in pieces {
        if body.len() > 1 {
            body.push(b',');
        }
        body.extend_from_slice(&piece.body);
    }
    body.push(b']');
    Bytes::from(body)
}

/// The events of a backlog chunk.
pub(super) fn decode_chunk(sequence: u64, payload: &[u8]) -> Result<Vec<Queued>, Undecodable> {
    let undecodable = |reason: String| Undecodable { sequence, reason };
    let entries: Vec<ChunkEntry<'_>> =
        serde_json::from_slice(payload).map_err(|e| undecodable(e.to_string()))?;
    entries
        .into_iter()
        .map(|entry| {
            let id = EventId::parse(&entry.id).map_err(undecodable)?;
            let trace_id = u128::from_str_radix(entry.t, 16)
                .ok()
                .and_then(|id| TraceId::from_bytes(id.to_be_bytes()))
                .unwrap_or_else(TraceId::random);
            let event = Event {
                id,
                timestamp: entry.timestamp,
                payload: entry.payload.into_owned().into_boxed_str(),
            };
            Ok(Queued {
                record: Record::with_outcome(
                    event,
                    entry.s,
                    UnixNanos::from_nanos(entry.r),
                    trace_id,
                    None,
                ),
                traceparent: entry.p.map(str::to_owned),
                requeued: entry.h,
                attempts: entry.a,
            })
        })
        .collect()
}

/// Adds to a published event's headers how it was processed. (Its arrival
/// sequence is its subject's last token.)
pub(super) fn add_processed(headers: &mut HeaderMap, worker: u32, processed_at: UnixNanos) {
    let mut value = String::with_capacity(32);
    value.push_str(itoa::Buffer::new().format(worker));
    value.push(' ');
    value.push_str(itoa::Buffer::new().format(processed_at.as_nanos()));
    headers.insert(PROCESSED, value.as_str());
}

/// The outcome a published event's message records.
pub(super) fn processed_outcome(headers: Option<&HeaderMap>) -> Option<Outcome> {
    let (worker, processed_at) = header(headers, PROCESSED)?.split_once(' ')?;
    Some(Outcome::Processed {
        worker: worker.parse().ok()?,
        processed_at: UnixNanos::from_nanos(processed_at.parse().ok()?),
    })
}

/// Longest error text a failed event's message keeps.
const ERROR_MAX: usize = 1024;

/// A failed event's message: its record (so that it can be read and
/// retried) and why it failed.
pub(super) fn failed_message(record: &Record, error: &str, attempts: u32) -> (HeaderMap, Bytes) {
    // A header value is one line of text.
    let mut text: String = error
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.len() > ERROR_MAX {
        let mut end = ERROR_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    let mut headers = HeaderMap::new();
    headers.insert(ERROR, text.as_str());
    add_attempts(&mut headers, attempts);
    (
        headers,
        record_body(&record.event, record.received_at, record.trace_id),
    )
}

/// Adds to a published event's headers the span that processed it.
pub(super) fn add_span(headers: &mut HeaderMap, span: SpanRef) {
    let mut value = String::with_capacity(49);
    span.trace_id.push_hex(&mut value);
    value.push('-');
    value.push_str(&format!("{:016x}", span.span_id));
    headers.insert(SPAN, value.as_str());
}

/// The span a published event's headers name, if any.
pub(super) fn span_of(headers: Option<&HeaderMap>) -> Option<SpanRef> {
    let (trace, span) = header(headers, SPAN)?.split_once('-')?;
    let trace = opentelemetry::trace::TraceId::from_hex(trace).ok()?;
    Some(SpanRef {
        trace_id: TraceId::from_bytes(trace.to_bytes())?,
        span_id: std::num::NonZeroU64::new(u64::from_str_radix(span, 16).ok()?)?,
    })
}

/// Adds the attempts to a message's headers when there were several.
pub(super) fn add_attempts(headers: &mut HeaderMap, attempts: u32) {
    if attempts > 1 {
        headers.insert(ATTEMPTS, itoa::Buffer::new().format(attempts));
    }
}

/// The attempts a message's headers record (1 when they say none).
pub(super) fn attempts_of(headers: Option<&HeaderMap>) -> u32 {
    header(headers, ATTEMPTS)
        .and_then(|value| value.parse().ok())
        .unwrap_or(1)
}

/// Whether a failed stream's message is a retry's marker (the event is
/// pending again), not a failure.
pub(super) fn is_retry(headers: Option<&HeaderMap>) -> bool {
    header(headers, RETRIED).is_some()
}

/// The outcome a failed event's message records.
pub(super) fn failed_outcome(headers: Option<&HeaderMap>) -> Outcome {
    Outcome::Failed {
        error: header(headers, ERROR)
            .unwrap_or("failed")
            .to_owned()
            .into_boxed_str(),
    }
}

/// The W3C trace context a chunk's events were ingested in (their first
/// traced one's).
pub(super) fn chunk_traceparent(events: &[Queued]) -> Option<&str> {
    events
        .iter()
        .find_map(|queued| queued.traceparent.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, payload: &str) -> Event {
        Event {
            id: EventId::parse(id).unwrap(),
            timestamp: -5,
            payload: payload.into(),
        }
    }

    #[test]
    fn an_event_survives_its_id_record() {
        let event = event("order 1.*>/é", "straße \"q\"\n");
        let trace_id = TraceId::random();
        let received_at = UnixNanos::from_nanos(1_700_000_000_123_456_789);
        let body = id_record(&event, received_at, trace_id);
        let record = decode_record(7, &body).unwrap();
        assert_eq!(record.event, event);
        assert_eq!(record.sequence, 7);
        assert_eq!(record.received_at, received_at);
        assert_eq!(record.trace_id, trace_id);
    }

    #[test]
    fn events_survive_their_chunks_which_keep_under_the_limit() {
        let records: Vec<Record> = (0..10)
            .map(|i| {
                Record::with_outcome(
                    event(&format!("e-{i}"), &"\u{1}".repeat(i * 5)),
                    100 + i as u64,
                    UnixNanos::from_nanos(i as u64),
                    TraceId::random(),
                    None,
                )
            })
            .collect();
        let pieces = entries(
            records
                .iter()
                .enumerate()
                .map(|(i, r)| (r, i == 4, if i == 4 { 2 } else { 1 })),
            Some("00-trace"),
            400,
        );
        assert!(pieces.len() > 1, "split into several");
        let mut decoded = Vec::new();
        for piece in &pieces {
            let body = chunk(std::iter::once(piece));
            assert!(body.len() <= 400 || piece.events == 1, "{}", body.len());
            let queued = decode_chunk(1, &body).unwrap();
            assert_eq!(queued.len(), piece.events);
            decoded.extend(queued);
        }
        // Pieces joined into one chunk read back the same.
        assert_eq!(
            decode_chunk(1, &chunk(pieces.iter())).unwrap().len(),
            records.len()
        );
        assert_eq!(decoded.len(), records.len());
        for (queued, record) in decoded.iter().zip(&records) {
            assert_eq!(queued.record.event, record.event);
            assert_eq!(queued.record.sequence, record.sequence);
            assert_eq!(queued.record.received_at, record.received_at);
            assert_eq!(queued.record.trace_id, record.trace_id);
            assert_eq!(queued.traceparent.as_deref(), Some("00-trace"));
        }
        assert!(decoded[4].requeued && !decoded[3].requeued);
        assert_eq!((decoded[4].attempts, decoded[3].attempts), (2, 1));
        assert_eq!(chunk_traceparent(&decoded), Some("00-trace"));
    }

    #[test]
    fn the_worst_case_message_is_bounded_by_the_formula() {
        let payload = "\u{1}".repeat(1000);
        let id = "\u{7f}".repeat(MAX_ID_BYTES);
        let record = Record::with_outcome(
            event(&id.replace('\u{7f}', "a"), &payload),
            u64::MAX,
            UnixNanos::from_nanos(u64::MAX),
            TraceId::random(),
            None,
        );
        let pieces = entries(
            std::iter::once((&record, true, u32::MAX)),
            Some(&"0".repeat(55)),
            usize::MAX,
        );
        let body = chunk(pieces.iter());
        assert!(body.len() <= largest_message(1000), "{}", body.len());
    }

    #[test]
    fn a_publication_says_how_it_was_processed_in_one_header() {
        let mut headers = HeaderMap::new();
        add_processed(
            &mut headers,
            3,
            UnixNanos::from_nanos(1_700_000_000_000_000_001),
        );
        match processed_outcome(Some(&headers)) {
            Some(Outcome::Processed {
                worker,
                processed_at,
            }) => {
                assert_eq!(worker, 3);
                assert_eq!(processed_at.as_nanos(), 1_700_000_000_000_000_001);
            }
            other => panic!("{other:?}"),
        }
        assert!(processed_outcome(None).is_none());
    }

    #[test]
    fn a_failed_message_keeps_the_content_and_one_line_of_error() {
        let record = Record::with_outcome(
            event("f-1", "p"),
            9,
            UnixNanos::from_nanos(5),
            TraceId::random(),
            None,
        );
        let (headers, body) = failed_message(&record, "disk\nfull", 1);
        let back = decode_record(9, &body).unwrap();
        assert_eq!(back.event, record.event);
        assert_eq!(attempts_of(Some(&headers)), 1);
        let (again, _) = failed_message(&record, "disk full", 3);
        assert_eq!(attempts_of(Some(&again)), 3);
        assert!(!is_retry(Some(&again)));
        match failed_outcome(Some(&headers)) {
            Outcome::Failed { error } => assert_eq!(&*error, "disk full"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_publication_names_the_span_that_processed_it() {
        let span = SpanRef {
            trace_id: TraceId::random(),
            span_id: std::num::NonZeroU64::new(0x00ab_cdef_0123_4567).unwrap(),
        };
        let mut headers = HeaderMap::new();
        add_span(&mut headers, span);
        assert_eq!(span_of(Some(&headers)), Some(span));
        assert_eq!(span_of(None), None);
    }

    #[test]
    fn any_id_makes_a_valid_subject_token() {
        let subjects = Subjects::new("eventflow");
        let subject = subjects.id(&EventId::parse("a b.c*>").unwrap());
        let token = subject.as_str().strip_prefix("eventflow.ids.").unwrap();
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{token}"
        );
    }

    #[test]
    fn a_foreign_message_is_reported_not_trusted() {
        assert!(decode_record(1, b"{\"id\":\"a\",\"timestamp\":1,\"payload\":\"p\"}").is_err());
        assert!(decode_record(1, b"garbage\n{}").is_err());
        assert!(decode_record(1, b"1 ab\n{\"id\":\"a\"}").is_err());
        assert!(decode_chunk(1, b"[{\"s\":1}]").is_err());
    }
}
