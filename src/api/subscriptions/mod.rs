//! `/subscriptions`: named subscriptions (at-least-once consumers over
//! HTTP). The handlers are here, their bodies in [`bodies`]; the cursors,
//! leases and dead letters live behind [`crate::subscription::Subscriptions`].

mod bodies;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, Problem, clip};
use super::events::MAX_PAGE_BYTES;
use super::query::{self, query_error};
use super::{AppState, json_body};
use crate::feed::FeedLine;
use crate::subscription::{AckId, Lease, Put, SubscriptionName};
use crate::time::rfc3339_micros;
pub(crate) use bodies::{
    AckAnswer, AckInput, DeadLetterPage, DeadLetterParams, DeadLetterView, EventBody, PollAnswer,
    PollParams, PolledEvent, RedeliverAnswer, RedeliverInput, SubscriptionInput, SubscriptionList,
    SubscriptionView,
};

/// Default and most events a poll leases.
const DEFAULT_POLL: usize = 100;
const MAX_POLL: usize = 1000;
/// Default and most dead letters on a page.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The subscription name in the path, or 422.
fn name(path: Result<Path<String>, PathRejection>) -> Result<SubscriptionName, ApiError> {
    let Path(raw) = path.map_err(|err| ApiError::BadRequest(err.body_text()))?;
    SubscriptionName::parse(&raw).map_err(|message| ApiError::Validation {
        detail: format!("`{}` is not a subscription name: {message}", clip(&raw)),
        errors: vec![crate::event::FieldError {
            field: "name".into(),
            message,
        }],
    })
}

/// Create a subscription, or find it with the same settings.
#[utoipa::path(
    put,
    path = "/subscriptions/{name}",
    tag = "subscriptions",
    params(("name" = String, Path, description = "`[A-Za-z0-9_-]{1,64}`")),
    request_body(content = SubscriptionInput, content_type = "application/json", description = "Every field optional; an empty body takes the defaults"),
    responses(
        (status = 201, description = "Created; `Location` names it", body = SubscriptionView),
        (status = 200, description = "It exists with these settings", body = SubscriptionView),
        (status = 409, description = "It exists with different settings, or `subscriptions.max_count` exist", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A name or field out of range, or a start past the last publication sequence", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn put_subscription(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let name = name(path)?;
    let subscriptions = &state.subscriptions;
    let spec = json_body::<SubscriptionInput>(&state, request)
        .await?
        .spec()?;
    let (put, found) = subscriptions.put(&name, spec).await?;
    let view = Json(SubscriptionView::from(found));
    Ok(match put {
        Put::Existing => (StatusCode::OK, view).into_response(),
        Put::Created => {
            let mut response = (StatusCode::CREATED, view).into_response();
            // Names are plain ASCII: always a header value.
            if let Ok(location) = HeaderValue::try_from(format!("/subscriptions/{name}")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
    })
}

/// A subscription's settings and where it stands.
#[utoipa::path(
    get,
    path = "/subscriptions/{name}",
    tag = "subscriptions",
    params(("name" = String, Path, description = "The subscription's name")),
    responses(
        (status = 200, description = "Its state", body = SubscriptionView),
    )
)]
pub(crate) async fn get_subscription(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SubscriptionView>, ApiError> {
    let name = name(path)?;
    let found = state.subscriptions.state(&name).await?;
    Ok(Json(found.into()))
}

/// Every subscription.
#[utoipa::path(
    get,
    path = "/subscriptions",
    tag = "subscriptions",
    responses((status = 200, description = "Every subscription's state, by name", body = SubscriptionList))
)]
pub(crate) async fn list_subscriptions(
    State(state): State<AppState>,
) -> Result<Json<SubscriptionList>, ApiError> {
    let all = state.subscriptions.list().await?;
    Ok(Json(SubscriptionList {
        subscriptions: all.into_iter().map(Into::into).collect(),
    }))
}

/// Delete a subscription (its leases and dead letters with it).
#[utoipa::path(
    delete,
    path = "/subscriptions/{name}",
    tag = "subscriptions",
    params(("name" = String, Path, description = "The subscription's name")),
    responses(
        (status = 204, description = "Deleted"),
    )
)]
pub(crate) async fn delete_subscription(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let name = name(path)?;
    state.subscriptions.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lease up to `max` events, waiting up to `wait` for the first.
#[utoipa::path(
    post,
    path = "/subscriptions/{name}/poll",
    tag = "subscriptions",
    params(("name" = String, Path, description = "The subscription's name"), PollParams),
    responses(
        (status = 200, description = "The leased events, in publication order (possibly none)", body = PollAnswer),
        (status = 422, description = "`max` or `wait` out of range, or not a subscription name", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Answers in memory are at `server.max_inflight_answer_bytes` (`Retry-After`); the leases are handed back", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn poll(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<PollParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let name = name(path)?;
    let Query(params) = params.map_err(query_error)?;
    let max = query::count("max", params.max.as_deref(), DEFAULT_POLL, MAX_POLL)?;
    let wait = bodies::poll_wait(params.wait.as_deref(), state.server.request_timeout)?;
    let subscriptions = &state.subscriptions;
    let deadline = tokio::time::Instant::now() + wait;
    let leases = subscriptions.poll(&name, max, deadline).await?;
    // The poll's trace links to the processing of each event it hands out.
    for lease in &leases {
        if let Some(span) = lease.span {
            crate::telemetry::link_current(span);
        }
    }
    match render_poll(&state, &leases) {
        Ok((body, unsent)) => {
            if !unsent.is_empty() {
                subscriptions.release(&name, &unsent).await;
            }
            Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
        }
        Err(error) => {
            let all: Vec<AckId> = leases.iter().map(|lease| lease.ack_id).collect();
            subscriptions.release(&name, &all).await;
            Err(error)
        }
    }
}

/// A published event as an answer writes it: rendered from its record, or
/// the line as published (`None`: it does not render, or the stored line
/// is not JSON).
fn event_body<'a>(state: &AppState, line: &'a FeedLine) -> Option<EventBody<'a>> {
    match line {
        FeedLine::Stored(record) => state
            .reader
            .published(record)?
            .ok()
            .map(EventBody::Rendered),
        FeedLine::Json(json) => serde_json::from_str(json).ok().map(EventBody::Published),
    }
}

/// The poll's answer, held against the answers' budget, and the leases
/// that did not fit in one answer's bytes (handed back by the caller).
fn render_poll(
    state: &AppState,
    leases: &[Lease],
) -> Result<(axum::body::Body, Vec<AckId>), ApiError> {
    let answer_bytes = MAX_PAGE_BYTES.min(state.answers.total() / 4);
    let mut answer = state.answers.buffer();
    answer.extend(b"{\"events\":[")?;
    let mut unsent = Vec::new();
    let mut written = 0;
    for lease in leases {
        let Some(event) = event_body(state, &lease.line) else {
            // Transforms are pure: a published event renders again. Should
            // it not, the lease goes back rather than out half made.
            unsent.push(lease.ack_id);
            continue;
        };
        let polled = PolledEvent {
            ack_id: lease.ack_id.to_string(),
            sequence: lease.sequence,
            delivery: lease.delivery,
            event,
        };
        if answer.list_item(written == 0, &polled, answer_bytes)? {
            written += 1;
        } else {
            unsent.push(lease.ack_id);
        }
    }
    answer.extend(b"]}")?;
    Ok((answer.into_body(), unsent))
}

/// Acknowledge leases and hand others back.
#[utoipa::path(
    post,
    path = "/subscriptions/{name}/ack",
    tag = "subscriptions",
    params(("name" = String, Path, description = "The subscription's name")),
    request_body(content = AckInput, content_type = "application/json"),
    responses(
        (status = 200, description = "What became of the ids; one that matches no live lease is counted `expired`", body = AckAnswer),
        (status = 422, description = "An id this service never issued (nothing is applied), or not a subscription name", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn ack(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Json<AckAnswer>, ApiError> {
    let name = name(path)?;
    let subscriptions = &state.subscriptions;
    let input = json_body::<AckInput>(&state, request).await?;
    let parse = |field: &str, ids: &[String]| -> Result<Vec<AckId>, ApiError> {
        ids.iter()
            .enumerate()
            .map(|(i, raw)| {
                AckId::parse(raw).map_err(|message| ApiError::Validation {
                    detail: format!("{field}[{i}]: {message}"),
                    errors: vec![crate::event::FieldError {
                        field: format!("{field}[{i}]"),
                        message,
                    }],
                })
            })
            .collect()
    };
    let acks = parse("ack_ids", &input.ack_ids)?;
    let nacks = parse("nack_ids", &input.nack_ids)?;
    let done = subscriptions.ack(&name, &acks, &nacks).await?;
    Ok(Json(AckAnswer {
        acked: done.acked,
        nacked: done.nacked,
        expired: done.expired,
    }))
}

/// The events dead-lettered for a subscription.
#[utoipa::path(
    get,
    path = "/subscriptions/{name}/dead-letters",
    tag = "subscriptions",
    params(("name" = String, Path, description = "The subscription's name"), DeadLetterParams),
    responses(
        (status = 200, description = "A page of dead letters, in publication order", body = DeadLetterPage),
        (status = 422, description = "A limit or cursor out of range, or not a subscription name", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Answers in memory are at `server.max_inflight_answer_bytes` (`Retry-After`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<DeadLetterParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let name = name(path)?;
    let Query(params) = params.map_err(query_error)?;
    let limit = query::count("limit", params.limit.as_deref(), DEFAULT_PAGE, MAX_PAGE)?;
    let after = query::cursor("after", params.after.as_deref())?;
    let page = state
        .subscriptions
        .dead_letters(&name, after, limit)
        .await?;
    let answer_bytes = MAX_PAGE_BYTES.min(state.answers.total() / 4);
    let mut answer = state.answers.buffer();
    answer.extend(b"{\"events\":[")?;
    let mut next = page.next;
    let mut written = 0;
    for (index, letter) in page.letters.iter().enumerate() {
        let Some(event) = event_body(&state, &letter.line) else {
            continue;
        };
        let dead_lettered_at = rfc3339_micros(letter.dead_lettered_at);
        let view = DeadLetterView {
            sequence: letter.sequence,
            delivery: letter.delivery,
            dead_lettered_at: dead_lettered_at.as_str(),
            event,
        };
        if !answer.list_item(written == 0, &view, answer_bytes)? {
            next = Some(page.letters[index - 1].sequence);
            break;
        }
        written += 1;
    }
    answer.extend(b"],\"next\":")?;
    match next {
        Some(next) => answer.json(&next.to_string())?,
        None => answer.extend(b"null")?,
    }
    answer.extend(b"}")?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        answer.into_body(),
    )
        .into_response())
}

/// Hand dead letters out again, their delivery count starting over.
#[utoipa::path(
    post,
    path = "/subscriptions/{name}/dead-letters/redeliver",
    tag = "subscriptions",
    params(("name" = String, Path, description = "The subscription's name")),
    request_body(content = RedeliverInput, content_type = "application/json", description = "Absent or empty: all of them"),
    responses(
        (status = 202, description = "How many were handed out again", body = RedeliverAnswer),
        (status = 422, description = "A body that is not a list of sequences, or not a subscription name", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let name = name(path)?;
    let subscriptions = &state.subscriptions;
    let input = json_body::<RedeliverInput>(&state, request).await?;
    // Publication sequences are int64 in the document, as in JSON tools.
    if let Some(sequences) = &input.sequences
        && let Some(bad) = sequences.iter().find(|&&s| s > i64::MAX as u64)
    {
        return Err(ApiError::invalid_body(format!(
            "sequences: {bad} is not a publication sequence (at most {})",
            i64::MAX
        )));
    }
    let redelivered = subscriptions
        .redeliver(&name, input.sequences.as_deref())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(RedeliverAnswer { redelivered })).into_response())
}
