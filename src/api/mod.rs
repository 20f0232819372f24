//! The HTTP API: router, shared state, and one module per resource.
//!
//! Routes are registered through `utoipa-axum`, so the OpenAPI document at
//! `GET /openapi.json` is generated from the same handlers and types that
//! serve requests.

mod body;
mod connections;
pub mod error;
mod events;
mod health;
mod metrics;
mod observe;
mod stream;

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

use crate::config::{PipelineSettings, ServerSettings};
use crate::pipeline::Pipeline;
use crate::shutdown::Readiness;
use crate::telemetry::TraceSampling;

pub use body::BodyBudget;
pub use connections::LimitedListener;
pub use error::{ApiError, Problem};

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
    /// The ingest pipeline (and through it the store).
    pub pipeline: Pipeline,
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
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "eventflow",
        description = "Event ingest and processing service. Errors are application/problem+json (RFC 9457)."
    ),
    tags(
        (name = "events", description = "Ingest, query and stream events"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
struct ApiDoc;

/// Builds the router (with its generated OpenAPI document).
pub fn router(state: AppState) -> Router {
    let (api_routes, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(events::post_event, events::list_events))
        .routes(routes!(events::post_batch))
        .routes(routes!(stream::stream_events))
        .routes(routes!(events::get_event))
        .routes(routes!(health::healthz))
        .routes(routes!(health::health))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .split_for_parts();
    let openapi = document(&openapi, state.pipeline.settings());
    // A backstop only: `?wait=published` answers 504 at `request_timeout`
    // from the handler's start; this ends, a second later, whatever else
    // takes too long (a body that arrives too slowly: 408). It wraps every
    // route and the fallback, which the connections' unanswered-request
    // check relies on (api::connections).
    let backstop = state
        .server
        .request_timeout
        .saturating_add(Duration::from_secs(1));
    let observe_state = Arc::new(observe::ObserveState {
        metrics: state.pipeline.metrics().clone(),
        sampling: state.sampling,
    });
    api_routes
        .route(
            "/openapi.json",
            get(move || {
                let openapi = openapi.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], openapi) }
            }),
        )
        .fallback(not_found)
        .with_state(state)
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
fn document(openapi: &utoipa::openapi::OpenApi, settings: &PipelineSettings) -> Bytes {
    let mut document = serde_json::to_value(openapi).unwrap_or_default();
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
