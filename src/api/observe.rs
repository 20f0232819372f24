//! Per-request instrumentation: one server span per request, keyed on the
//! matched route template (never the raw path), joined to the caller's
//! trace through W3C `traceparent`, and the HTTP metrics.
//!
//! The response is handed back only after the runtime's current round of
//! ready requests (see [`answer_in_rounds`]).
//!
//! The sampling decision is taken here, once per request: an unsampled
//! request creates no span at all, and the trace layer's filter drops
//! every span that has no traced parent, so that tracing at a low sample
//! ratio costs little more than not tracing.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tracing::{Instrument, field};

use crate::telemetry::metrics::Metrics;
use crate::telemetry::{self, TraceSampling};

/// What the middleware needs (shared: cloned per request).
#[derive(Debug)]
pub(crate) struct ObserveState {
    pub(crate) metrics: Metrics,
    pub(crate) sampling: TraceSampling,
}

/// Route label for requests that matched no route.
const UNMATCHED: &str = "unmatched";

/// Wraps a request in its span and counts it.
pub(crate) async fn observe(
    State(observe): State<Arc<ObserveState>>,
    request: Request,
    next: Next,
) -> Response {
    let ObserveState { metrics, sampling } = &*observe;
    let started = Instant::now();
    let method = request.method().clone();
    let method_label = method_label(&method);
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    if !sampling.sample(request.headers()) {
        let response = next.run(request).await;
        answer_in_rounds().await;
        metrics.http_request(
            method_label,
            route,
            response.status().as_u16(),
            started.elapsed(),
        );
        return response;
    }
    let span = tracing::debug_span!(
        telemetry::REQUEST_SPAN,
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = field::Empty,
        http.request.method = %method,
        http.route = route,
        url.path = request.uri().path(),
        http.response.status_code = field::Empty,
    );
    telemetry::set_remote_parent(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    answer_in_rounds().await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    metrics.http_request(method_label, route, status.as_u16(), started.elapsed());
    response
}

/// The method as a metric label: the standard methods by name, any other
/// as `other`, because HTTP allows any token as a method and each label
/// value would be a series kept for the life of the process.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "CONNECT" => "CONNECT",
        _ => "other",
    }
}

/// Defers writing a response until the runtime has run the other tasks that
/// are ready now (one `yield_now`), so that the answers to the requests read
/// in one round leave together.
///
/// Why: a client that waits on many connections (a proxy, a load
/// generator, any event-loop client) is woken once per burst of answers
/// instead of once per answer, and on a loopback connection the wake-up is
/// paid inside the server's `writev` (in this VM an inter-processor
/// interrupt). Measured with wrk (docs/performance.md, 1.): single-event
/// throughput ×1.17–1.27, and p99 lower, not higher; the bare ceiling
/// server, fast enough to find its client awake, gains nothing from it.
async fn answer_in_rounds() {
    tokio::task::yield_now().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_standard_set_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::OPTIONS), "OPTIONS");
        for custom in ["PURGE", "X12345", "get"] {
            let method = Method::from_bytes(custom.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "other", "{custom}");
        }
    }
}
