//! `ApiError`: every failure a client can see, rendered as RFC 9457
//! `application/problem+json`. Internal causes are logged, never sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Refusal;
use crate::event::{DecodeError, FieldError};
use crate::pipeline::{IngestError, RejectReason};
use crate::subscription::SubscriptionError;

/// Seconds a client should wait before retrying an overloaded request.
const RETRY_AFTER_OVERLOADED_SECS: u32 = 1;
/// Seconds a client should wait before retrying against a draining instance
/// (or one whose sink is broken: another instance may take it).
const RETRY_AFTER_DRAINING_SECS: u32 = 5;

pub use crate::event::{ECHO_MAX, clip};

/// A problem details document (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// Field-level validation errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// What a client sees of an [`ApiError`] besides its detail.
struct Kind {
    status: StatusCode,
    /// The problem type's last part: `urn:eventflow:problem:{slug}`.
    slug: &'static str,
    title: &'static str,
    /// How it counts in `eventflow_events_rejected_total`, if it refuses
    /// an event.
    reject: Option<RejectReason>,
    /// Seconds for `Retry-After`.
    retry_after: Option<u32>,
}

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON (400).
    #[error("{0}")]
    MalformedJson(String),
    /// The request is unusable for another reason (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong `Content-Type` (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Body or batch over its limit (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Fields are invalid (422).
    #[error("{detail}")]
    Validation {
        /// Summary.
        detail: String,
        /// Each offending field.
        errors: Vec<FieldError>,
    },
    /// A well-formed body that is not what the route takes (422).
    #[error("body: {0}")]
    InvalidBody(String),
    /// A query parameter's value is out of its range (422).
    #[error("{field}: {message}")]
    InvalidQuery {
        /// The parameter.
        field: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// The route does not take this method (405; the response keeps the
    /// router's `Allow` header).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Same id, different content (409).
    #[error("event `{id}` already exists with different content (sequence {sequence})")]
    Conflict {
        /// The id.
        id: String,
        /// Sequence of the stored event.
        sequence: u64,
    },
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The event is not failed, so there is nothing to retry (409).
    #[error("{0}")]
    NotRetryable(String),
    /// A subscription exists with other settings, or there are as many as
    /// `subscriptions.max_count` (409).
    #[error("{0}")]
    SubscriptionConflict(String),
    /// The pipeline is full (503).
    #[error("the pipeline is at capacity; retry later")]
    Overloaded,
    /// The service is draining (503).
    #[error("the service is shutting down")]
    ShuttingDown,
    /// A sink cannot write, so nothing could be published (503).
    #[error("{0}; nothing can be published until it is fixed")]
    SinkBroken(String),
    /// The backend cannot be reached (503).
    #[error("{0}; retry later")]
    Unavailable(String),
    /// `?wait=published` ran out of time (504).
    #[error("the event was accepted but not published within {0:?}")]
    NotPublished(std::time::Duration),
    /// The event was accepted but processing failed (500).
    #[error("the event was accepted but processing failed: {0}")]
    ProcessingFailed(String),
    /// Request bodies in memory are at `server.max_inflight_body_bytes` (503).
    #[error(
        "request bodies in memory are at their limit (server.max_inflight_body_bytes); retry later"
    )]
    BodiesOverBudget,
    /// Answers in memory are at `server.max_inflight_answer_bytes` (503):
    /// readers wait their turn, writers never do.
    #[error(
        "answers in memory are at their limit (server.max_inflight_answer_bytes): readers are \
         taking them more slowly than they ask; retry later"
    )]
    AnswersOverBudget,
    /// The client's address holds `server.max_connections_per_client`
    /// connections already (503, written at accept).
    #[error(
        "this client address holds server.max_connections_per_client connections already; \
         reuse one (keep-alive) or close one, then retry"
    )]
    TooManyConnections,
    /// The request did not complete in time, its body arriving too slowly
    /// say (408).
    #[error("the request did not complete within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// The body's next chunk did not come within `server.request_timeout` (408).
    #[error("the request body stopped arriving: no data for longer than server.request_timeout")]
    SlowBody,
    /// No bearer token, or not one of ours (401 + `WWW-Authenticate`).
    #[error("{}", match .0 {
        Refusal::Missing => "this route needs a bearer token: Authorization: Bearer <token>",
        Refusal::Invalid => "the bearer token is not valid",
    })]
    Unauthorized(Refusal),
    /// `server.max_subscribers` SSE subscribers are connected (503).
    #[error(
        "{0} subscribers are connected, the most this instance serves (server.max_subscribers); retry later or on another instance"
    )]
    TooManySubscribers(usize),
    /// The client's rate limit is spent (429 + `Retry-After`).
    #[error("too many requests from this client; retry in {0} s")]
    RateLimited(u32),
    /// A bug: a handler panicked (500). The panic is logged, not sent.
    #[error("internal error; the service's log has the details")]
    Internal,
}

impl ApiError {
    /// A 422 for a well-formed body the route does not take.
    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self::InvalidBody(message.into())
    }

    /// A 422 for a query parameter's value.
    pub fn invalid_query(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidQuery {
            field,
            message: message.into(),
        }
    }

    /// Everything a client sees of this error but its detail: one arm a
    /// variant, so that adding one is one place (a table, kept as one).
    #[rustfmt::skip]
    fn kind(&self) -> Kind {
        use RejectReason as R;
        use StatusCode as S;
        let (status, slug, title, reject, retry) = match self {
            Self::MalformedJson(_) => (S::BAD_REQUEST, "malformed-json", "Malformed JSON", Some(R::Invalid), None),
            Self::BadRequest(_) => (S::BAD_REQUEST, "bad-request", "Bad request", Some(R::Invalid), None),
            Self::UnsupportedMediaType(_) => (S::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type", Some(R::Invalid), None),
            Self::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large", Some(R::TooLarge), None),
            Self::Validation { .. } => (S::UNPROCESSABLE_ENTITY, "validation", "Invalid event", Some(R::Invalid), None),
            Self::InvalidBody(_) => (S::UNPROCESSABLE_ENTITY, "invalid-body", "Invalid request body", Some(R::Invalid), None),
            Self::InvalidQuery { .. } => (S::UNPROCESSABLE_ENTITY, "invalid-query", "Invalid query parameter", Some(R::Invalid), None),
            Self::MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed", None, None),
            Self::Conflict { .. } => (S::CONFLICT, "conflict", "Conflicting event", Some(R::Conflict), None),
            Self::NotFound(_) => (S::NOT_FOUND, "not-found", "Not found", None, None),
            Self::NotRetryable(_) => (S::CONFLICT, "not-failed", "Not a failed event", None, None),
            Self::SubscriptionConflict(_) => (S::CONFLICT, "subscription-conflict", "Conflicting subscription", None, None),
            Self::Overloaded => (S::SERVICE_UNAVAILABLE, "overloaded", "Overloaded", Some(R::Overloaded), Some(RETRY_AFTER_OVERLOADED_SECS)),
            Self::BodiesOverBudget => (S::SERVICE_UNAVAILABLE, "overloaded", "Overloaded", Some(R::Overloaded), Some(RETRY_AFTER_OVERLOADED_SECS)),
            Self::AnswersOverBudget => (S::SERVICE_UNAVAILABLE, "overloaded", "Overloaded", None, Some(RETRY_AFTER_OVERLOADED_SECS)),
            Self::TooManyConnections => (S::SERVICE_UNAVAILABLE, "too-many-connections", "Too many connections", None, Some(RETRY_AFTER_OVERLOADED_SECS)),
            Self::ShuttingDown => (S::SERVICE_UNAVAILABLE, "shutting-down", "Shutting down", Some(R::ShuttingDown), Some(RETRY_AFTER_DRAINING_SECS)),
            Self::SinkBroken(_) => (S::SERVICE_UNAVAILABLE, "sink-broken", "A sink is broken", Some(R::Unavailable), Some(RETRY_AFTER_DRAINING_SECS)),
            Self::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "unavailable", "Backend unavailable", Some(R::Unavailable), Some(RETRY_AFTER_DRAINING_SECS)),
            Self::TooManySubscribers(_) => (S::SERVICE_UNAVAILABLE, "too-many-subscribers", "Too many subscribers", None, Some(RETRY_AFTER_DRAINING_SECS)),
            Self::NotPublished(_) => (S::GATEWAY_TIMEOUT, "not-published", "Not published in time", None, None),
            Self::ProcessingFailed(_) => (S::INTERNAL_SERVER_ERROR, "processing-failed", "Processing failed", None, None),
            Self::Internal => (S::INTERNAL_SERVER_ERROR, "internal", "Internal error", None, None),
            Self::RequestTimeout(_) | Self::SlowBody => (S::REQUEST_TIMEOUT, "request-timeout", "Request timeout", None, None),
            Self::Unauthorized(_) => (S::UNAUTHORIZED, "unauthorized", "Unauthorized", Some(R::Unauthorized), None),
            Self::RateLimited(secs) => (S::TOO_MANY_REQUESTS, "rate-limited", "Too many requests", None, Some(*secs)),
        };
        Kind {
            status,
            slug,
            title,
            reject,
            retry_after: retry,
        }
    }

    /// How this error counts in `eventflow_events_rejected_total`, if it
    /// refuses an event.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        self.kind().reject
    }

    fn status(&self) -> StatusCode {
        self.kind().status
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let kind = self.kind();
        Problem {
            kind: format!("urn:eventflow:problem:{}", kind.slug),
            title: kind.title.to_owned(),
            status: kind.status.as_u16(),
            detail: self.to_string(),
            errors: match self {
                Self::Validation { errors, .. } => errors.clone(),
                Self::InvalidBody(message) => vec![FieldError {
                    field: "body".into(),
                    message: message.clone(),
                }],
                Self::InvalidQuery { field, message } => vec![FieldError {
                    field: (*field).into(),
                    message: message.clone(),
                }],
                _ => Vec::new(),
            },
        }
    }
}

impl From<DecodeError> for ApiError {
    fn from(err: DecodeError) -> Self {
        match err {
            DecodeError::Malformed(msg) => Self::MalformedJson(format!("malformed JSON: {msg}")),
            DecodeError::Invalid(errors) => Self::Validation {
                // The errors list has them all (clipped, at most
                // MAX_FIELD_ERRORS); the detail names the first few.
                detail: format!(
                    "invalid event: {}{}",
                    errors
                        .iter()
                        .take(3)
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                    if errors.len() > 3 {
                        format!("; and {} more", errors.len() - 3)
                    } else {
                        String::new()
                    }
                ),
                errors,
            },
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::Overloaded => Self::Overloaded,
            IngestError::ShuttingDown => Self::ShuttingDown,
            IngestError::SinkBroken(reason) => Self::SinkBroken(reason),
            IngestError::Unavailable(reason) => Self::Unavailable(reason),
            IngestError::TooLarge(reason) => Self::PayloadTooLarge(reason),
            never @ IngestError::NeverFits { .. } => {
                Self::PayloadTooLarge(format!("{never}; send fewer at a time"))
            }
            IngestError::Conflict(record) => Self::Conflict {
                id: record.event.id.to_string(),
                sequence: record.sequence,
            },
        }
    }
}

impl From<SubscriptionError> for ApiError {
    fn from(err: SubscriptionError) -> Self {
        match err {
            SubscriptionError::NotFound(_) => Self::NotFound(err.to_string()),
            SubscriptionError::Different(_) | SubscriptionError::TooMany(_) => {
                Self::SubscriptionConflict(err.to_string())
            }
            SubscriptionError::InvalidStart(message) => Self::invalid_body(message),
            SubscriptionError::Unavailable(reason) => Self::Unavailable(reason),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Only the service's own failures warn. A 503 for load is admission
        // control doing its job, counted in `eventflow_events_rejected_total`:
        // a log line for each would flood the logs when the service is
        // busiest, and cost more than the work it refuses.
        if matches!(
            self,
            Self::NotPublished(_)
                | Self::ProcessingFailed(_)
                | Self::SinkBroken(_)
                | Self::Unavailable(_)
                | Self::Internal
        ) {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request rejected");
        }
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Self::Unauthorized(refusal) = self {
            // RFC 6750 section 3: a wrong token says `invalid_token`.
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(match refusal {
                    Refusal::Missing => "Bearer realm=\"eventflow\"",
                    Refusal::Invalid => "Bearer realm=\"eventflow\", error=\"invalid_token\"",
                }),
            );
        }
        let retry_after = self.kind().retry_after;
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A log destination the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The status of `error`'s response and the WARN lines it logged.
    fn answer_and_warnings(error: ApiError) -> (StatusCode, String) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        let status =
            tracing::subscriber::with_default(subscriber, || error.into_response().status());
        let logged = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
        (status, logged)
    }

    #[test]
    fn refusals_for_load_answer_503_without_a_warning_each() {
        for error in [ApiError::Overloaded, ApiError::ShuttingDown] {
            let (status, logged) = answer_and_warnings(error);
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(logged, "");
        }
    }

    #[test]
    fn failures_of_the_service_are_warned() {
        let (status, logged) = answer_and_warnings(ApiError::ProcessingFailed("sink down".into()));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(logged.contains("request failed"), "{logged}");
        assert!(logged.contains("sink down"), "{logged}");
    }
}
