//! `GET /metrics`: Prometheus text exposition.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::telemetry::metrics::PipelineSnapshot;

/// Content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let pipeline = &state.pipeline;
    let snapshot = PipelineSnapshot {
        queue_depth: pipeline.queue_depth(),
        queue_capacity: pipeline.backpressure().capacity(),
        inflight: pipeline.backpressure().in_use(),
        store_events: pipeline.store().len(),
        store_evictions: pipeline.store().evictions(),
        sse_subscribers: pipeline.feed().subscribers(),
        workers: pipeline.live_workers(),
    };
    let metrics = pipeline.metrics();
    for sink in pipeline.sinks() {
        metrics.sink_up(sink.name(), sink.broken().is_none());
    }
    let body = metrics.render(snapshot);
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    response
}
