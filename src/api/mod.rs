//! The HTTP API: router, shared state, and one module per resource.
//!
//! Routes are registered through `utoipa-axum`, so the OpenAPI document at
//! `GET /openapi.json` is generated from the same handlers and types that
//! serve requests.

mod body;
pub mod error;
mod events;
mod health;
mod metrics;
mod observe;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::ServerSettings;
use crate::pipeline::Pipeline;
use crate::shutdown::Readiness;
use crate::telemetry::TraceSampling;

pub use body::BodyBudget;
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
    let openapi = Arc::new(openapi);
    // A backstop only: `?wait=published` answers 504 at `request_timeout`
    // from the handler's start; this ends, a second later, whatever else
    // takes too long (a body that arrives too slowly: 408).
    let backstop = state.server.request_timeout + Duration::from_secs(1);
    let observe_state = Arc::new(observe::ObserveState {
        metrics: state.pipeline.metrics().clone(),
        sampling: state.sampling,
    });
    api_routes
        .route(
            "/openapi.json",
            get(move || {
                let openapi = Arc::clone(&openapi);
                async move { Json(openapi) }
            }),
        )
        .fallback(not_found)
        .with_state(state)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            backstop,
        ))
        .layer(CatchPanicLayer::new())
        // Outermost, so that timeouts and caught panics are counted too.
        .layer(axum::middleware::from_fn_with_state(
            observe_state,
            observe::observe,
        ))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}
