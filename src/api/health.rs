//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::shutdown::Phase;

/// Health or readiness state.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HealthStatus {
    /// `ok`, `ready`, `starting`, `draining`, `sink_broken` or `backend_unavailable`.
    status: &'static str,
    /// Why it is not ready, when a sink is broken or the backend unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl HealthStatus {
    fn of(status: &'static str) -> Json<Self> {
        Json(Self {
            status,
            detail: None,
        })
    }
}

/// Liveness: the process is up and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = HealthStatus)))]
pub(crate) async fn healthz() -> Json<HealthStatus> {
    HealthStatus::of("ok")
}

/// Liveness under its older name.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "Alive", body = HealthStatus)))]
pub(crate) async fn health() -> Json<HealthStatus> {
    healthz().await
}

/// Readiness: 200 while accepting events; 503 while starting, draining, or
/// while a sink is broken (nothing accepted could be published) or the
/// backend is unreachable.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Accepting events", body = HealthStatus),
        (status = 503, description = "Starting, draining, a sink is broken, or the backend is unreachable", body = HealthStatus),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<HealthStatus>) {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    match state.readiness.phase() {
        Phase::Starting => (unavailable, HealthStatus::of("starting")),
        Phase::Draining => (unavailable, HealthStatus::of("draining")),
        Phase::Ready => match state.writer.unavailable() {
            None => (StatusCode::OK, HealthStatus::of("ready")),
            Some((status, detail)) => (
                unavailable,
                Json(HealthStatus {
                    status,
                    detail: Some(detail),
                }),
            ),
        },
    }
}
