//! `/events`: ingest (single and batch), listing, and lookup by id.

use std::cell::Cell;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::body::{MediaType, media_type, read_body};
use super::error::{ApiError, Problem};
use crate::event::{DecodeError, Event, EventId, PublishedEvent, decode_array, decode_event};
use crate::pipeline::{BatchRejection, Ingested, Pipeline, WaitFor, WaitOutcome};
use crate::store::{Outcome, PageQuery, Record, Status};
use crate::telemetry;
use crate::telemetry::metrics::RejectReason;
use crate::trace_id::TraceId;

/// Default and maximum page sizes of `GET /events`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Characters escaped in the `Location` path segment.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|');

/// An event as clients send it.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // Documents the wire format; decoding lives in `event`.
pub(crate) struct EventInput {
    /// 1..=256 bytes, no control characters; the idempotency key.
    id: String,
    /// Unix seconds, a JSON integer in int64 range.
    timestamp: i64,
    /// At most `pipeline.max_payload_bytes` bytes.
    payload: String,
}

/// How an ingest request was taken.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum IngestStatus {
    /// New and queued for processing.
    Accepted,
    /// Already stored with the same content; not processed again.
    Duplicate,
}

/// Answer to `POST /events` (borrowing the event's id).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct IngestResponse<'a> {
    id: &'a str,
    status: IngestStatus,
    /// Arrival sequence.
    sequence: u64,
}

/// One refused event of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchRejected {
    /// Position in the batch, from 0.
    index: usize,
    /// The event's id, when it had a readable one.
    id: Option<String>,
    /// Why it was refused.
    error: String,
}

/// Answer to `POST /events/batch`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchResponse {
    /// Events newly accepted.
    accepted: usize,
    /// Events already stored with the same content.
    duplicates: usize,
    /// Events refused, with the reason.
    rejected: Vec<BatchRejected>,
}

/// A stored event and what became of it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RecordView {
    id: String,
    timestamp: i64,
    /// The payload as received.
    payload: String,
    status: Status,
    sequence: u64,
    /// When it was accepted (RFC 3339, UTC).
    #[schema(format = DateTime)]
    received_at: String,
    /// The published event, once processed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<PublishedEvent>)]
    result: Option<PublishedEvent>,
    /// Why processing failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl RecordView {
    pub(crate) fn of(record: &Record, pipeline: &Pipeline) -> Self {
        let (result, error) = match record.outcome() {
            Some(Outcome::Processed { .. }) => match pipeline.published(record) {
                Some(Ok(published)) => (Some(published), None),
                // Transforms are pure, so this re-derivation cannot fail where
                // the worker's run succeeded; say so rather than hide it.
                Some(Err(e)) => (None, Some(format!("re-deriving the result failed: {e}"))),
                None => (None, None),
            },
            Some(Outcome::Failed { error }) => (None, Some(error.to_string())),
            None => (None, None),
        };
        Self {
            id: record.event.id.to_string(),
            timestamp: record.event.timestamp,
            payload: record.event.payload.to_string(),
            status: record.status(),
            sequence: record.sequence,
            received_at: crate::time::rfc3339_micros(record.received_at.into())
                .as_str()
                .to_owned(),
            result,
            error,
        }
    }
}

/// A page of events in arrival order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventPage {
    events: Vec<RecordView>,
    /// Pass as `after` to get the next page; null on the last page.
    next: Option<String>,
}

/// Query of `POST /events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct IngestParams {
    /// `published`: answer only once the event is published (200 with the
    /// published event, or 504 after `server.request_timeout`).
    wait: Option<String>,
}

/// Query of `GET /events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Page size, 1..=1000 (larger values are capped); default 100.
    limit: Option<String>,
    /// Cursor from a previous page's `next`.
    after: Option<String>,
    /// Only events with this status: `pending`, `processed` or `failed`.
    status: Option<String>,
}

fn trace_id(headers: &HeaderMap) -> TraceId {
    telemetry::trace_id_of(&tracing::Span::current(), headers)
}

fn location(id: &EventId) -> Option<HeaderValue> {
    let path = format!("/events/{}", utf8_percent_encode(id.as_str(), PATH_SEGMENT));
    // Takes the string's buffer as it is (`from_str` would copy it).
    HeaderValue::from_maybe_shared(bytes::Bytes::from(path)).ok()
}

fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::BadRequest(format!("invalid query string: {}", rejection.body_text()))
}

/// Ingest one event.
#[utoipa::path(
    post,
    path = "/events",
    tag = "events",
    params(IngestParams),
    request_body(content = EventInput, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted; `Location` names the event", body = IngestResponse,
            headers(("Location" = String, description = "URL of the event"))),
        (status = 200, description = "Duplicate (same id and content), or the published event with `?wait=published`", body = IngestResponse),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Same id, different content", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over `server.max_body_bytes`, or an event larger than even an empty pipeline holds", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded (pipeline full, or request bodies in memory at their limit) or shutting down; see `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Not published within `server.request_timeout`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn post_event(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let answer = ingest_one(&state, request).await;
    // Events taken (accepted or duplicate) are counted where they are taken.
    if let Err(error) = &answer
        && let Some(reason) = error.reject_reason()
    {
        let metrics = state.pipeline.metrics();
        metrics.events_received(1);
        metrics.events_rejected(reason, 1);
    }
    answer
}

/// `POST /events` proper.
async fn ingest_one(state: &AppState, request: Request) -> Result<Response, ApiError> {
    // The request taken whole: axum's `HeaderMap` extractor would clone
    // every header of every request.
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let Query(params) = Query::<IngestParams>::try_from_uri(&parts.uri).map_err(query_error)?;
    // A wait ends at `request_timeout` from here, where the request's
    // backstop timeout (a second longer) started too, so that a late event
    // is answered with this 504 and not the backstop's 408.
    let deadline = match params.wait.as_deref() {
        None => None,
        Some("published") => Some(tokio::time::Instant::now() + state.server.request_timeout),
        Some(other) => {
            return Err(ApiError::invalid_field(
                "wait",
                format!("must be `published`, got `{other}`"),
            ));
        }
    };
    media_type(&headers, &[MediaType::Json])?;
    let bytes = read_body(&headers, body, state.server.max_body_bytes, &state.bodies).await?;
    let event = decode_event(&bytes, state.pipeline.settings().max_payload_bytes)?;
    // The body's share of the budget is given back before any wait.
    drop(bytes);
    let id = event.id.clone();
    let pipeline = &state.pipeline;
    let metrics = pipeline.metrics();
    let ingested = pipeline
        .ingest(event, trace_id(&headers), deadline.is_some())
        .await?;
    // Counted before any wait: the event is taken whatever the wait brings,
    // and a wait cut short (the client left) must not lose the count.
    metrics.events_received(1);
    match ingested {
        Ingested::Duplicate(record) => {
            metrics.events_duplicate(1);
            match deadline {
                // A retry after a 504 gets the published event all the same.
                Some(deadline) => match pipeline.wait_for(&record) {
                    WaitFor::Ended(outcome) => published_answer(Some(outcome), state),
                    WaitFor::Pending(waiter) => {
                        published_answer(waiter.until(deadline).await, state)
                    }
                },
                None => Ok((
                    StatusCode::OK,
                    Json(IngestResponse {
                        id: id.as_str(),
                        status: IngestStatus::Duplicate,
                        sequence: record.sequence,
                    }),
                )
                    .into_response()),
            }
        }
        Ingested::Accepted { record, waiter } => {
            metrics.events_accepted(1);
            if let (Some(waiter), Some(deadline)) = (waiter, deadline) {
                return published_answer(waiter.until(deadline).await, state);
            }
            let mut response = (
                StatusCode::ACCEPTED,
                Json(IngestResponse {
                    id: id.as_str(),
                    status: IngestStatus::Accepted,
                    sequence: record.sequence,
                }),
            )
                .into_response();
            if let Some(location) = location(&id) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            Ok(response)
        }
    }
}

/// The answer to `?wait=published`: the published event, or why there is
/// none (`None`: the deadline came first).
fn published_answer(outcome: Option<WaitOutcome>, state: &AppState) -> Result<Response, ApiError> {
    match outcome {
        Some(Ok(published)) => Ok((StatusCode::OK, Json(published)).into_response()),
        Some(Err(error)) => Err(ApiError::ProcessingFailed(error)),
        None => Err(ApiError::NotPublished(state.server.request_timeout)),
    }
}

/// Ingest many events: a JSON array or NDJSON, optionally gzip-compressed.
#[utoipa::path(
    post,
    path = "/events/batch",
    tag = "events",
    request_body(
        description = "A JSON array of events, or one event per line (NDJSON). `Content-Encoding: gzip` is accepted; `server.max_batch_body_bytes` applies after decompression.",
        content(
            (Vec<EventInput> = "application/json"),
            (String = "application/x-ndjson"),
        )
    ),
    responses(
        (status = 202, description = "The valid events were taken; invalid ones are listed", body = BatchResponse),
        (status = 400, description = "Malformed JSON array or gzip", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or event count over the limits, or more new events than even an empty pipeline holds", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type or encoding", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No event in the batch is valid", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The valid events do not all fit now (or request bodies in memory are at their limit), or shutting down; nothing was stored; see `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn post_batch(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let metrics = state.pipeline.metrics().clone();
    // A request refused before its events could be counted counts as one.
    let refused = |error: ApiError| {
        if let Some(reason) = error.reject_reason() {
            metrics.events_received(1);
            metrics.events_rejected(reason, 1);
        }
        error
    };
    let media = media_type(&headers, &[MediaType::Json, MediaType::Ndjson]).map_err(refused)?;
    let bytes = read_body(
        &headers,
        body,
        state.server.max_batch_body_bytes,
        &state.bodies,
    )
    .await
    .map_err(refused)?;
    let settings = state.pipeline.settings();
    let DecodedBatch {
        received,
        valid,
        mut rejected,
    } = decode_batch(
        &bytes,
        media,
        settings.max_batch,
        settings.max_payload_bytes,
    )
    .map_err(refused)?;
    if received == 0 {
        return Err(refused(ApiError::invalid_field(
            "body",
            "the batch contains no events",
        )));
    }
    metrics.events_received(received as u64);
    metrics.events_rejected(RejectReason::Invalid, rejected.len() as u64);
    if valid.is_empty() {
        return Err(ApiError::Validation {
            detail: format!("none of the {received} events is valid"),
            errors: rejected
                .iter()
                .map(|r| crate::event::FieldError {
                    field: format!("[{}]", r.index),
                    message: r.error.clone(),
                })
                .collect(),
        });
    }
    let valid_count = valid.len() as u64;
    let mut outcome = state
        .pipeline
        .ingest_batch(valid, trace_id(&headers))
        .await
        .map_err(ApiError::from)
        .inspect_err(|error| {
            if let Some(reason) = error.reject_reason() {
                metrics.events_rejected(reason, valid_count);
            }
        })?;
    metrics.events_accepted(outcome.accepted as u64);
    metrics.events_duplicate(outcome.duplicates as u64);
    for rejection in &outcome.rejected {
        metrics.events_rejected(rejection.reason, 1);
    }
    rejected.append(&mut outcome.rejected);
    rejected.sort_by_key(|r| r.index);
    let body = BatchResponse {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        rejected: rejected
            .into_iter()
            .map(|r| BatchRejected {
                index: r.index,
                id: r.id,
                error: r.error,
            })
            .collect(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn too_many(max: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the batch holds more than pipeline.max_batch = {max} events"
    ))
}

/// A batch body's elements: the valid events with their index in the
/// request, and why each other one was refused.
struct DecodedBatch {
    received: usize,
    valid: Vec<(usize, Event)>,
    rejected: Vec<BatchRejection>,
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
fn decode_batch(
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
        Err(err) if err.is_data() => Err(ApiError::invalid_field(
            "body",
            "must be a JSON array of events",
        )),
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

/// List events in arrival order.
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(ListParams),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 422, description = "Invalid limit, cursor or status", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_events(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let Query(params) = params.map_err(query_error)?;
    let limit = match params.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(raw) => match raw.parse::<u64>() {
            Ok(0) => return Err(ApiError::invalid_field("limit", "must be at least 1")),
            Ok(n) => usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE),
            Err(_) => {
                return Err(ApiError::invalid_field(
                    "limit",
                    format!("must be a positive integer, got `{raw}`"),
                ));
            }
        },
    };
    let after = match params.after.as_deref() {
        None | Some("") => 0,
        Some(raw) => raw.parse::<u64>().map_err(|_| {
            ApiError::invalid_field("after", format!("`{raw}` is not a cursor from `next`"))
        })?,
    };
    let status = match params.status.as_deref() {
        None | Some("") => None,
        Some("pending") => Some(Status::Pending),
        Some("processed") => Some(Status::Processed),
        Some("failed") => Some(Status::Failed),
        Some(other) => {
            return Err(ApiError::invalid_field(
                "status",
                format!("must be pending, processed or failed, got `{other}`"),
            ));
        }
    };
    let page = state
        .pipeline
        .store()
        .page(PageQuery {
            after,
            limit,
            status,
            published_up_to: None,
        })
        .await;
    Ok(Json(EventPage {
        events: page
            .records
            .iter()
            .map(|r| RecordView::of(r, &state.pipeline))
            .collect(),
        next: page.next.map(|n| n.to_string()),
    }))
}

/// Look up one event.
#[utoipa::path(
    get,
    path = "/events/{id}",
    tag = "events",
    params(("id" = String, Path, description = "The event id")),
    responses(
        (status = 200, description = "The event, its status and (once processed) its result", body = RecordView),
        (status = 404, description = "No such event (never received, or evicted)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_event(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RecordView>, ApiError> {
    let Path(raw) = id.map_err(|err| ApiError::BadRequest(err.body_text()))?;
    let not_found = || ApiError::NotFound(format!("no event with id `{raw}`"));
    let id = EventId::parse(&raw).map_err(|_| not_found())?;
    let record = state
        .pipeline
        .store()
        .get(&id)
        .await
        .ok_or_else(not_found)?;
    Ok(Json(RecordView::of(&record, &state.pipeline)))
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
            Err(ApiError::Validation { .. })
        ));
        assert!(matches!(
            split_array(b"[1,2,3]", 2),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn location_escapes_the_id() {
        let id = EventId::parse("a/b c?d").unwrap();
        assert_eq!(location(&id).unwrap(), "/events/a%2Fb%20c%3Fd");
    }
}
