//! `/events`: ingest (single and batch), listing, and lookup by id. The
//! handlers are here; their bodies in [`responses`], batch splitting in
//! [`batch`].

mod batch;
mod responses;
mod retry;

pub(crate) use retry::{__path_retry_event, __path_retry_events};
pub(crate) use retry::{retry_event, retry_events};

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::AppState;
use super::body::{MediaType, media_type, read_body};
use super::error::{ApiError, Problem, clip};
use super::query::{self, query_error};
use crate::event::{Event, EventId, decode_event};
use crate::pipeline::{Ingested, WaitOutcome, Writer};
use crate::store::{PageQuery, Status};
use crate::telemetry;
use crate::trace_id::TraceId;
use batch::{DecodedBatch, decode_batch};
use responses::{
    BatchParams, BatchRejected, BatchResponse, EventPage, IngestOk, IngestParams, IngestResponse,
    IngestStatus, ListParams, RecordView, WaitFor,
};

/// Default and maximum page sizes of `GET /events`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Most bytes of events in one page: a page holds fewer events than asked
/// for when they are large (1,000 payloads of 64 KiB, tripled when
/// uppercased, would be a 256 MB answer), and `next` goes on from there.
pub(crate) const MAX_PAGE_BYTES: usize = 4 << 20;
/// Most rejections a batch answer lists (`rejected_total` counts them all).
const MAX_LISTED_REJECTIONS: usize = 100;

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

fn trace_id(headers: &HeaderMap) -> TraceId {
    telemetry::trace_id_of(&tracing::Span::current(), headers)
}

/// The event id in the path, and the 404 that names it; a string that is
/// not an id is that 404 at once (no event can have it).
fn path_id(
    id: Result<Path<String>, PathRejection>,
) -> Result<(EventId, impl Fn() -> ApiError), ApiError> {
    let Path(raw) = id.map_err(|err| ApiError::BadRequest(err.body_text()))?;
    let parsed = EventId::parse(&raw);
    let not_found = move || ApiError::NotFound(format!("no event with id `{}`", clip(&raw)));
    let id = parsed.map_err(|_| not_found())?;
    Ok((id, not_found))
}

fn location(id: &EventId) -> Option<HeaderValue> {
    let path = format!("/events/{}", utf8_percent_encode(id.as_str(), PATH_SEGMENT));
    // Takes the string's buffer as it is (`from_str` would copy it).
    HeaderValue::from_maybe_shared(bytes::Bytes::from(path)).ok()
}

/// Counts a request refused before the pipeline saw its events (as one
/// event refused) and passes its error on.
fn refused(writer: &Writer, error: ApiError) -> ApiError {
    if let Some(reason) = error.reject_reason() {
        writer.admission().refused(reason);
    }
    error
}

/// Ingest one event.
#[utoipa::path(
    post,
    path = "/events",
    tag = "events",
    params(IngestParams),
    request_body(content = crate::event::EventInput, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted; `Location` names the event", body = IngestResponse,
            headers(("Location" = String, description = "URL of the event"))),
        (status = 200, description = "Duplicate (same id and content), or the published event with `?wait=published`", body = IngestOk),
        (status = 400, description = "Malformed JSON, or a malformed query string (an unknown or repeated parameter)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Same id, different content", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over `server.max_body_bytes`, or an event larger than even an empty pipeline holds", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or a `wait` value other than `published`", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`?wait=published` and the event failed: a transform refused it or a sink could not write it", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded (pipeline full, or request bodies in memory at their limit), shutting down, a sink broken, or the backend unreachable; see `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Not published within `server.request_timeout`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn post_event(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    // The request taken whole: axum's `HeaderMap` extractor would clone
    // every header of every request.
    let (parts, body) = request.into_parts();
    let writer = &state.writer;
    // What the pipeline never sees is counted here, as one event refused;
    // the pipeline counts the rest.
    let (event, deadline) = read_event(&state, &parts, body)
        .await
        .map_err(|error| refused(writer, error))?;
    let id = event.id.clone();
    let ingested = writer.ingest(event, trace_id(&parts.headers)).await?;
    match (ingested, deadline) {
        // A retry after a 504 waits for the same event all the same.
        (Ingested::Accepted(record) | Ingested::Duplicate(record), Some(deadline)) => {
            published_answer(writer.wait_published(&record, deadline).await, &state)
        }
        (Ingested::Duplicate(record), None) => Ok((
            StatusCode::OK,
            Json(IngestOk::Duplicate(IngestResponse {
                id: id.as_str(),
                status: IngestStatus::Duplicate,
                sequence: record.sequence,
            })),
        )
            .into_response()),
        (Ingested::Accepted(record), None) => {
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

/// The event of a `POST /events`, and when a `?wait=published` gives up.
async fn read_event(
    state: &AppState,
    parts: &axum::http::request::Parts,
    body: axum::body::Body,
) -> Result<(Event, Option<tokio::time::Instant>), ApiError> {
    let Query(params) = Query::<IngestParams>::try_from_uri(&parts.uri).map_err(query_error)?;
    // A wait ends at `request_timeout` from here, where the request's
    // backstop timeout (a second longer) started too, so that a late event
    // is answered with this 504 and not the backstop's 408.
    let deadline = match params.wait.as_deref() {
        None => None,
        Some(text) if WaitFor::from_query(text).is_some() => {
            Some(tokio::time::Instant::now() + state.server.request_timeout)
        }
        Some(other) => {
            return Err(ApiError::invalid_query(
                "wait",
                format!("must be `published`, got `{}`", clip(other)),
            ));
        }
    };
    let headers = &parts.headers;
    media_type(headers, &[MediaType::Json])?;
    let bytes = read_body(headers, body, state.server.max_body_bytes, &state.bodies).await?;
    // The body's share of the budget is given back (on return) before any wait.
    let event = decode_event(&bytes, state.writer.settings().max_payload_bytes)?;
    Ok((event, deadline))
}

/// The answer to `?wait=published`: the published event, or why there is
/// none (`None`: the deadline came first).
fn published_answer(outcome: Option<WaitOutcome>, state: &AppState) -> Result<Response, ApiError> {
    match outcome {
        Some(Ok(published)) => {
            Ok((StatusCode::OK, Json(IngestOk::Published(published))).into_response())
        }
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
            (Vec<crate::event::EventInput> = "application/json"),
            (String = "application/x-ndjson"),
        )
    ),
    responses(
        (status = 202, description = "The valid events were taken; invalid ones are listed", body = BatchResponse),
        (status = 400, description = "Malformed JSON array or gzip, or any query parameter (`wait` is not supported on batches)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or event count over the limits, or more new events than even an empty pipeline holds", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type or encoding", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No event in the batch is valid", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The valid events do not all fit now (or request bodies in memory are at their limit), shutting down, or a sink broken; nothing was stored; see `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn post_batch(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let writer = &state.writer;
    let admission = writer.admission();
    let refused = |error| refused(writer, error);
    let Query(params) = Query::<BatchParams>::try_from_uri(&parts.uri)
        .map_err(query_error)
        .map_err(refused)?;
    if params.wait.is_some() {
        return Err(refused(ApiError::BadRequest(
            "`wait` is not supported on POST /events/batch: post events one at a time with \
             ?wait=published, or look each one up with GET /events/{id}"
                .into(),
        )));
    }
    let media = media_type(&headers, &[MediaType::Json, MediaType::Ndjson]).map_err(refused)?;
    let bytes = read_body(
        &headers,
        body,
        state.server.max_batch_body_bytes,
        &state.bodies,
    )
    .await
    .map_err(refused)?;
    let settings = writer.settings();
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
    drop(bytes);
    if received == 0 {
        return Err(refused(ApiError::invalid_body(
            "the batch contains no events",
        )));
    }
    admission.read(received, rejected.len());
    if valid.is_empty() {
        let listed = rejected.len().min(MAX_LISTED_REJECTIONS);
        return Err(ApiError::Validation {
            detail: format!(
                "none of the {received} events is valid{}",
                if listed < rejected.len() {
                    format!(" (the first {listed} are listed)")
                } else {
                    String::new()
                }
            ),
            errors: rejected
                .iter()
                .take(listed)
                .map(|r| crate::event::FieldError {
                    field: format!("[{}]", r.index),
                    message: clip(&r.error).into_owned(),
                })
                .collect(),
        });
    }
    let mut outcome = writer.ingest_batch(valid, trace_id(&headers)).await?;
    rejected.append(&mut outcome.rejected);
    rejected.sort_by_key(|r| r.index);
    let body = BatchResponse {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        rejected_total: rejected.len(),
        rejected: rejected
            .into_iter()
            .take(MAX_LISTED_REJECTIONS)
            .map(|r| BatchRejected {
                index: r.index,
                id: r.id.map(|id| clip(&id).into_owned()),
                error: clip(&r.error).into_owned(),
            })
            .collect(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// List events in arrival order.
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(ListParams),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "A malformed query string (an unknown or repeated parameter)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A limit, cursor or status out of range", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The backend cannot be reached, or answers in memory are at `server.max_inflight_answer_bytes` (`Retry-After`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_events(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(query_error)?;
    let limit = query::count("limit", params.limit.as_deref(), DEFAULT_PAGE, MAX_PAGE)?;
    let after = query::cursor("after", params.after.as_deref())?;
    let status = match params.status.as_deref() {
        None => None,
        Some("pending") => Some(Status::Pending),
        Some("processed") => Some(Status::Processed),
        Some("failed") => Some(Status::Failed),
        Some(other) => {
            return Err(ApiError::invalid_query(
                "status",
                format!(
                    "must be pending, processed or failed, got `{}`",
                    clip(other)
                ),
            ));
        }
    };
    let store = state.reader.store();
    // A store it cannot ask is not "nothing there": 503, not an empty page.
    let page = store
        .page(PageQuery {
            after,
            limit,
            status,
        })
        .await
        .map_err(|error| ApiError::Unavailable(error.to_string()))?;
    // Rendered record by record, so that the page stops at MAX_PAGE_BYTES
    // (always holding at least one record), or at a quarter of the answers'
    // budget it is held against, so that one page never exhausts it.
    let page_bytes = MAX_PAGE_BYTES.min(state.answers.total() / 4);
    let mut events = state.answers.buffer();
    events.extend(b"{\"events\":[")?;
    let mut next = page.next;
    for (index, record) in page.records.iter().enumerate() {
        if !events.list_item(
            index == 0,
            &RecordView::of(record, &state.reader),
            page_bytes,
        )? {
            next = Some(page.records[index - 1].sequence);
            break;
        }
    }
    events.extend(b"],\"next\":")?;
    match next {
        Some(next) => {
            events.extend(b"\"")?;
            events.extend(itoa::Buffer::new().format(next).as_bytes())?;
            events.extend(b"\"")?;
        }
        None => events.extend(b"null")?,
    }
    if page.incomplete {
        // Say why a filtered page may hold fewer than `limit`: the scan
        // stopped at its budget, and more may follow `next`.
        events.extend(b",\"incomplete\":true")?;
    }
    events.extend(b"}")?;
    let body = events.into_body();
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
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
        (status = 503, description = "The backend cannot be reached, so whether the event exists is unknown; or answers in memory are at `server.max_inflight_answer_bytes` (`Retry-After`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_event(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let (id, not_found) = path_id(id)?;
    let store = state.reader.store();
    // A store it cannot ask does not know: not a 404 a client would take
    // for "never received".
    let Some(record) = store
        .get(&id)
        .await
        .map_err(|error| ApiError::Unavailable(error.to_string()))?
    else {
        return Err(not_found());
    };
    // Held against the answers' budget until sent: a reader that asks for
    // large events and never reads holds no more than the budget.
    let mut answer = state.answers.buffer();
    answer.json(&RecordView::of(&record, &state.reader))?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        answer.into_body(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_escapes_the_id() {
        let id = EventId::parse("a/b c?d").unwrap();
        assert_eq!(location(&id).unwrap(), "/events/a%2Fb%20c%3Fd");
    }
}
