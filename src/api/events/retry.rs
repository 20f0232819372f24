//! `POST /events/{id}/retry` and `POST /events/retry`: failed events back
//! in the backlog.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::super::AppState;
use super::super::error::{ApiError, Problem, clip};
use super::super::json_body;
use super::super::query;
use crate::pipeline::RetryError;
use crate::store::Status;

/// Default and most failed events one `POST /events/retry` queues again.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A failed event queued again.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RetryAnswer {
    id: String,
    /// `pending`.
    status: Status,
    /// Processing attempts so far, this one included.
    attempts: u32,
}

/// The body of `POST /events/retry`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryManyInput {
    /// `"failed"` (the only status retried; the default).
    #[schema(schema_with = failed_only)]
    #[serde(default, deserialize_with = "crate::api::present")]
    status: Option<String>,
    /// A cursor from a previous answer's `next` (arrival order; empty or
    /// absent: from the start).
    #[schema(value_type = Option<String>, pattern = r"^[0-9]{0,19}$")]
    after: Option<String>,
    /// Most events to queue again, 1..=1000; default 100.
    #[schema(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

/// What `POST /events/retry` did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RetryManyAnswer {
    /// Failed events queued again.
    requeued: usize,
    /// Cursor for the next call, or null when none may follow.
    next: Option<String>,
}

/// Put a failed event back in the backlog.
#[utoipa::path(
    post,
    path = "/events/{id}/retry",
    tag = "events",
    params(("id" = String, Path, description = "The event id")),
    responses(
        (status = 202, description = "Queued again; published like any other once processed (with a new publication sequence)", body = RetryAnswer),
        (status = 404, description = "No such event", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The event is not failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No room in the pipeline, shutting down, or the backend unavailable (`Retry-After`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn retry_event(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let (id, not_found) = super::path_id(id)?;
    let retried = state.writer.retry(&id).await.map_err(|error| match error {
        RetryError::NotFound(_) => not_found(),
        RetryError::NotFailed { .. } => ApiError::NotRetryable(error.to_string()),
        RetryError::Refused(error) => error.into(),
    })?;
    let answer = RetryAnswer {
        id: id.to_string(),
        // Queued just now (a worker may have finished it since: the answer
        // says what the retry did).
        status: Status::Pending,
        attempts: retried.attempts,
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Put many failed events back in the backlog, in arrival order.
#[utoipa::path(
    post,
    path = "/events/retry",
    tag = "events",
    request_body(content = RetryManyInput, content_type = "application/json", description = "Every field optional"),
    responses(
        (status = 202, description = "How many were queued again, and where to go on", body = RetryManyAnswer),
        (status = 422, description = "A status other than `failed`, a cursor or limit out of range", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not even the first fits in the pipeline, shutting down, or the backend unavailable (`Retry-After`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn retry_events(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let input = json_body::<RetryManyInput>(&state, request).await?;
    match input.status.as_deref() {
        None | Some("failed") => {}
        Some(other) => {
            return Err(ApiError::invalid_body(format!(
                "status: only failed events are retried, got `{}`",
                clip(other)
            )));
        }
    }
    let after = query::cursor("after", input.after.as_deref()).map_err(|_| {
        ApiError::invalid_body("after must be a cursor from a previous answer's `next`")
    })?;
    let limit = match input.limit {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid_body(format!(
                "limit must be between 1 and {MAX_LIMIT}, got {n}"
            )));
        }
    };
    let done = state.writer.retry_failed(after, limit).await?;
    let answer = RetryManyAnswer {
        requeued: done.requeued,
        next: done.next.map(|next| next.to_string()),
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// The document's schema of `status`: `failed`, the one status retried.
fn failed_only() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["failed"]))
        .build()
}
