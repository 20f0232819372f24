//! The HTTP API: router, shared state, and one module per resource.
//!
//! Routes are registered through `utoipa-axum`, so the OpenAPI document at
//! `GET /openapi.json` is generated from the same handlers and types that
//! serve requests.

mod answer;
mod auth;
mod body;
pub mod error;
mod events;
mod health;
mod limit;
mod metrics;
mod observe;
mod query;
pub mod serve;
mod stream;
mod subscriptions;

use std::sync::Arc;
use std::time::Duration;

use axum::BoxError;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::extract::Request;
use serde::de::DeserializeOwned;

use crate::auth::Tokens;
use crate::config::{PipelineSettings, ServerSettings};
use crate::pipeline::{Reader, Writer};
use crate::shutdown::Readiness;
use crate::subscription::Subscriptions;
use crate::telemetry::TraceSampling;
use body::{MediaType, media_type, read_body};
use error::clip;

pub use answer::AnswerBudget;
pub use body::BodyBudget;
pub use error::{ApiError, Problem};
pub use limit::RateLimit;

/// Everything a handler can reach. Every request clones it (axum's `State`),
/// so a clone is one reference count.
#[derive(Debug, Clone)]
pub struct AppState(Arc<SharedState>);

impl AppState {
    /// Wraps the parts.
    pub fn new(shared: SharedState) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// What [`AppState`] shares.
#[derive(Debug)]
pub struct SharedState {
    /// The write paths' handle: admission, ingest, waits for publication,
    /// readiness, the state `/metrics` samples.
    pub writer: Writer,
    /// Reads of stored and published events: the store, the feed, and the
    /// published form of a processed record.
    pub reader: Reader,
    /// Named subscriptions.
    pub subscriptions: Arc<dyn Subscriptions>,
    /// Readiness flag.
    pub readiness: Readiness,
    /// Server settings (limits, timeouts).
    pub server: Arc<ServerSettings>,
    /// Cancelled after the drain so that SSE streams end and the server can stop.
    pub stream_stop: CancellationToken,
    /// Which requests are traced.
    pub sampling: TraceSampling,
    /// Request bodies held in memory at once (`server.max_inflight_body_bytes`).
    pub bodies: BodyBudget,
    /// Answers held in memory at once (`server.max_inflight_answer_bytes`).
    pub answers: AnswerBudget,
    /// The bearer tokens the event routes ask for (none: no auth).
    pub tokens: Tokens,
    /// `eventflow_auth_failures_total`.
    pub auth_failures: ::metrics::Counter,
    /// The per-client rate limit on the event routes, when one is set.
    pub rate_limit: Option<RateLimit>,
    /// One permit per SSE subscriber (`server.max_subscribers`).
    pub subscribers: Arc<tokio::sync::Semaphore>,
    /// Subscribers rendering stored events again (a replay) at once.
    pub replays: Arc<tokio::sync::Semaphore>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "eventflow",
        description = "Event ingest and processing service. Errors are application/problem+json (RFC 9457)."
    ),
    tags(
        (name = "events", description = "Ingest, query and stream events"),
        (name = "subscriptions", description = "Named subscriptions: at-least-once consumers sharing a server-side cursor"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
struct ApiDoc;

/// The routers the service serves.
#[derive(Debug)]
pub struct Routers {
    /// The API (on `server.addr`).
    pub api: Router,
    /// Health, readiness and metrics on their own listener, when
    /// `server.admin_addr` is set (they are then not on the API's).
    pub admin: Option<Router>,
}

/// Builds the routers (with the API's generated OpenAPI document).
///
/// The event routes ask for a bearer token when `auth.tokens` is set;
/// health, readiness, metrics and `/openapi.json` never do.
pub fn routers(state: AppState) -> Routers {
    let separate_admin = state.server.admin_addr.is_some();
    let (events, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(events::post_event, events::list_events))
        .routes(routes!(events::post_batch))
        .routes(routes!(stream::stream_events))
        .routes(routes!(events::get_event))
        .routes(routes!(events::retry_event))
        .routes(routes!(events::retry_events))
        .routes(routes!(subscriptions::list_subscriptions))
        .routes(routes!(
            subscriptions::put_subscription,
            subscriptions::get_subscription,
            subscriptions::delete_subscription
        ))
        .routes(routes!(subscriptions::poll))
        .routes(routes!(subscriptions::ack))
        .routes(routes!(subscriptions::dead_letters))
        .routes(routes!(subscriptions::redeliver))
        .split_for_parts();
    // Layered only when there is something to guard: the middleware costs
    // a few per cent of a single-event request (docs/performance.md).
    let events = if state.tokens.enabled() || state.rate_limit.is_some() {
        events.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
    } else {
        events
    };
    let (open, open_doc) = OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::health))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .split_for_parts();
    let mut api = events;
    let mut admin = None;
    if separate_admin {
        admin = Some(layered(open.with_state(state.clone()), &state));
    } else {
        openapi.merge(open_doc);
        api = api.merge(open);
    }
    let openapi = document(
        &openapi,
        state.writer.settings(),
        state.tokens.enabled(),
        state.rate_limit.is_some(),
    );
    let api = api.route(
        "/openapi.json",
        get(move || {
            let openapi = openapi.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], openapi) }
        }),
    );
    Routers {
        api: layered(api.with_state(state.clone()), &state),
        admin,
    }
}

/// A JSON body (empty: `T::default()`), within `server.max_body_bytes`.
pub(crate) async fn json_body<T: DeserializeOwned + Default>(
    state: &AppState,
    request: Request,
) -> Result<T, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = read_body(
        &parts.headers,
        body,
        state.server.max_body_bytes,
        &state.bodies,
    )
    .await?;
    if bytes.is_empty() {
        return Ok(T::default());
    }
    media_type(&parts.headers, &[MediaType::Json])?;
    serde_json::from_slice(&bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::invalid_body(clip(&error.to_string())),
        _ => ApiError::MalformedJson(format!("malformed JSON: {}", clip(&error.to_string()))),
    })
}

/// The layers every router gets: the 404 and 405 problems, the backstop
/// timeout, panics caught, and each request observed (span, metrics).
fn layered(router: Router, state: &AppState) -> Router {
    // A backstop only: `?wait=published` answers 504 at `request_timeout`
    // from the handler's start; this ends, a second later, whatever else
    // takes too long (a body that arrives too slowly: 408).
    let backstop = state
        .server
        .request_timeout
        .saturating_add(Duration::from_secs(1));
    let observe_state = Arc::new(observe::ObserveState {
        metrics: state.writer.metrics().clone(),
        sampling: state.sampling,
    });
    router
        .fallback(not_found)
        .layer(axum::middleware::map_response(method_not_allowed))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |_: BoxError| async move {
                    ApiError::RequestTimeout(backstop)
                }))
                .timeout(backstop),
        )
        .layer(CatchPanicLayer::custom(panicked))
        // Outermost, so that timeouts and caught panics are counted too.
        .layer(axum::middleware::from_fn_with_state(
            observe_state,
            observe::observe,
        ))
}

/// The OpenAPI document as served: the derived one, with the limits that
/// come from configuration (payload size, batch length) filled in, so that
/// it states what this instance enforces. Rendered once, at start.
fn document(
    openapi: &utoipa::openapi::OpenApi,
    settings: &PipelineSettings,
    auth: bool,
    rate_limited: bool,
) -> Bytes {
    let mut document = serde_json::to_value(openapi).unwrap_or_default();
    if auth {
        require_bearer(&mut document);
    }
    common_answers(&mut document, rate_limited);
    extractor_rules(&mut document);
    let schemas = &mut document["components"]["schemas"];
    if let Some(payload) = schemas["EventInput"]["properties"].get_mut("payload") {
        payload["maxLength"] = settings.max_payload_bytes.into();
    }
    // The batch body's JSON array of events.
    if let Some(batch) = document["paths"]["/events/batch"]["post"]["requestBody"]["content"]
        .get_mut("application/json")
    {
        batch["schema"]["maxItems"] = settings.max_batch.into();
        batch["schema"]["minItems"] = 1.into();
    }
    Bytes::from(serde_json::to_vec(&document).unwrap_or_default())
}

/// The answers any operation may give that no handler states: 405 for a
/// method the route does not take, 408 for a request that took longer than
/// `server.request_timeout` (a body that stopped arriving), and, with a
/// rate limit on, 429 on the event routes.
fn common_answers(document: &mut serde_json::Value, rate_limited: bool) {
    use serde_json::json;
    let problem = json!({ "application/problem+json": {
        "schema": { "$ref": "#/components/schemas/Problem" }
    } });
    let Some(paths) = document["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let guarded = guarded(path);
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let takes_body = operation.get("requestBody").is_some();
            let takes_query = operation
                .get("parameters")
                .and_then(serde_json::Value::as_array)
                .is_some_and(|parameters| parameters.iter().any(|p| p["in"] == "query"));
            let responses = &mut operation["responses"];
            // What reading a body or a query string can answer, where the
            // operation does not say it in its own words.
            let mut default = |status: &str, description: &str| {
                if responses.get(status).is_none() {
                    responses[status] =
                        json!({ "description": description, "content": problem.clone() });
                }
            };
            if takes_body {
                default("400", "Malformed JSON");
                default("413", "Body over server.max_body_bytes");
                default(
                    "415",
                    "A body that is not application/json, or an unsupported Content-Encoding",
                );
            }
            if takes_query {
                default(
                    "400",
                    "A malformed query string (an unknown or repeated parameter)",
                );
            }
            if path.starts_with("/subscriptions/{name}") {
                default("404", "No such subscription");
                default("422", "Not a subscription name (`[A-Za-z0-9_-]{1,64}`)");
            }
            responses["405"] = json!({
                "description": "This route does not take the method; `Allow` lists those it takes",
                "headers": { "Allow": { "schema": { "type": "string" } } },
                "content": problem.clone()
            });
            responses["408"] = json!({
                "description": "The request did not complete within server.request_timeout (a body that stopped arriving)",
                "content": problem.clone()
            });
            if rate_limited && guarded {
                responses["429"] = json!({
                    "description": "This client's rate (server.rate_limit_per_second) is spent; retry after `Retry-After` seconds",
                    "headers": { "Retry-After": { "schema": { "type": "integer" } } },
                    "content": problem.clone()
                });
            }
        }
    }
}

/// A body field that may be left out but, when given, is not `null` (its
/// schema has no null): `#[serde(default, deserialize_with = "present")]`.
pub(crate) fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// Whether the route at `path` is behind the bearer token and the rate
/// limit (the event and subscription routes).
fn guarded(path: &str) -> bool {
    ["/events", "/subscriptions"].iter().any(|root| {
        path == *root
            || path
                .strip_prefix(root)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// The parts of the document axum's extractors decide, stated: a
/// subscription name's form, and the bodies that may be left out.
fn extractor_rules(document: &mut serde_json::Value) {
    let Some(paths) = document["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in operations.iter_mut() {
            if let Some(parameters) = operation
                .get_mut("parameters")
                .and_then(serde_json::Value::as_array_mut)
            {
                for parameter in parameters {
                    if parameter["in"] == "path" && parameter["name"] == "name" {
                        parameter["schema"]["pattern"] = "^[A-Za-z0-9_-]{1,64}$".into();
                    }
                }
            }
            // Every field optional, the body too: an empty one takes the defaults.
            let optional_body = matches!(
                (method.as_str(), path.as_str()),
                ("put", "/subscriptions/{name}")
                    | ("post", "/subscriptions/{name}/ack")
                    | ("post", "/subscriptions/{name}/dead-letters/redeliver")
                    | ("post", "/events/retry")
            );
            if optional_body && operation.get("requestBody").is_some() {
                operation["requestBody"]["required"] = false.into();
            }
        }
    }
}

/// With auth on: the bearer scheme, asked for by every event operation,
/// each of which can then answer 401.
fn require_bearer(document: &mut serde_json::Value) {
    use serde_json::json;
    document["components"]["securitySchemes"]["bearer"] = json!({
        "type": "http",
        "scheme": "bearer",
        "description": "One of auth.tokens or the lines of auth.tokens_file"
    });
    let Some(paths) = document["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        if !guarded(path) {
            continue;
        }
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            operation["security"] = json!([{ "bearer": [] }]);
            operation["responses"]["401"] = json!({
                "description": "No bearer token, or not a known one",
                "headers": { "WWW-Authenticate": { "schema": { "type": "string" } } },
                "content": { "application/problem+json": {
                    "schema": { "$ref": "#/components/schemas/Problem" }
                } }
            });
        }
    }
}

/// The answer to a request whose handler panicked: a problem document,
/// the panic itself in the log only.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    tracing::error!(panic = message, "a request handler panicked");
    ApiError::Internal.into_response()
}

/// The router's bare 405 (no body) as a problem document, keeping its `Allow`.
async fn method_not_allowed(response: axum::response::Response) -> axum::response::Response {
    if response.status() != axum::http::StatusCode::METHOD_NOT_ALLOWED
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let allowed = allow
        .as_ref()
        .and_then(|allow| allow.to_str().ok())
        .unwrap_or("other methods");
    let mut problem =
        ApiError::MethodNotAllowed(format!("this route takes {allowed}")).into_response();
    if let Some(allow) = allow {
        problem.headers_mut().insert(header::ALLOW, allow);
    }
    problem
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;

    use super::*;

    #[tokio::test]
    async fn a_panic_is_answered_with_a_problem_that_does_not_leak_it() {
        let response = panicked(Box::new("index out of bounds: secret"));
        assert_eq!(response.status(), 500);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body = to_bytes(response.into_body(), 10_000).await.unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["type"], "urn:eventflow:problem:internal");
        assert!(!problem["detail"].as_str().unwrap().contains("secret"));
    }
}
