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
    /// `ok`, `ready`, `starting` or `draining`.
    status: &'static str,
}

/// Liveness: the process is up and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = HealthStatus)))]
pub(crate) async fn healthz() -> Json<HealthStatus> {
    Json(HealthStatus { status: "ok" })
}

/// Liveness under its older name.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "Alive", body = HealthStatus)))]
pub(crate) async fn health() -> Json<HealthStatus> {
    healthz().await
}

/// Readiness: 200 while accepting events; 503 while starting or draining.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Accepting events", body = HealthStatus),
        (status = 503, description = "Starting or draining", body = HealthStatus),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<HealthStatus>) {
    match state.readiness.phase() {
        Phase::Ready => (StatusCode::OK, Json(HealthStatus { status: "ready" })),
        Phase::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(HealthStatus { status: "starting" }),
        ),
        Phase::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(HealthStatus { status: "draining" }),
        ),
    }
}
