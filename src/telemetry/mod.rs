//! Logs, traces and metrics.
//!
//! - Logs are `tracing` events written as JSON lines to **stderr** (stdout
//!   belongs to the published events), with `trace_id`/`span_id` when
//!   inside a span. The level filter applies to the log layer only, so it
//!   never hides spans from the trace exporter.
//! - Traces go through `tracing-opentelemetry`; with
//!   `telemetry.otlp_endpoint` set they are exported over OTLP/gRPC by a
//!   batch processor with a parent-based ratio sampler.
//! - The per-request and per-event spans are DEBUG spans: without an OTLP
//!   endpoint (and at the default log level) they are disabled at their
//!   call sites and cost a relaxed atomic load each, which keeps the hot
//!   path cheap; with an endpoint the trace layer enables them.
//! - Metrics live in [`metrics`].

pub mod catalogue;
mod export;
mod histogram;
mod http_series;
pub mod metrics;
mod process;

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{DynFilterFn, EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, TelemetrySettings};
use crate::trace_id::{SpanRef, TraceId};

/// Name of the per-request server span, which starts a trace.
pub const REQUEST_SPAN: &str = "http_request";

/// Name of the span of an event delivered from a shared queue (nats mode),
/// which continues the trace of the request that ingested it, perhaps on
/// another replica; made only for events whose request was traced.
pub const DELIVERY_SPAN: &str = "deliver";

/// Which requests are traced: decided once per request, at the edge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampling {
    /// Whether traces are exported at all.
    pub exporting: bool,
    /// Fraction of new traces (without a sampled parent) traced.
    pub ratio: f64,
}

impl TraceSampling {
    /// From `telemetry.*`.
    pub fn from_settings(settings: &TelemetrySettings) -> Self {
        Self {
            exporting: settings.otlp_endpoint.is_some(),
            ratio: settings.sample_ratio,
        }
    }

    /// Parent-based ratio sampling: a valid `traceparent` decides by its
    /// sampled flag; otherwise a `ratio` coin flip.
    pub fn sample(&self, headers: &axum::http::HeaderMap) -> bool {
        if !self.exporting {
            return false;
        }
        match remote_parent(headers) {
            Some(parent) => parent.is_sampled(),
            None => self.ratio >= 1.0 || rand::random::<f64>() < self.ratio,
        }
    }
}

/// Keeps the trace pipeline alive; flush it with [`TelemetryGuard::shutdown`].
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl TelemetryGuard {
    /// Flushes buffered spans to the exporter and stops it.
    pub async fn shutdown(self) {
        if !self.exporting {
            return;
        }
        // The SDK's shutdown blocks; a direct call from the runtime can stall it.
        let provider = self.provider;
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match flushed {
            Ok(Ok(())) => tracing::debug!("trace exporter flushed"),
            Ok(Err(error)) => tracing::warn!(%error, "flushing the trace exporter failed"),
            Err(error) => tracing::warn!(%error, "flushing the trace exporter panicked"),
        }
    }
}

/// Installs the global subscriber writing logs to stderr. Must run inside
/// a tokio runtime when an OTLP endpoint is configured.
pub fn init_subscriber(settings: &TelemetrySettings) -> anyhow::Result<TelemetryGuard> {
    use std::io::IsTerminal;
    init_with_writer(settings, std::io::stderr, std::io::stderr().is_terminal())
}

/// Installs the global subscriber writing logs to `writer`; `ansi`: the
/// `pretty` format may colour its output (a terminal reads it).
pub fn init_with_writer<W>(
    settings: &TelemetrySettings,
    writer: W,
    ansi: bool,
) -> anyhow::Result<TelemetryGuard>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let log_filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(&directives)
            .with_context(|| format!("invalid RUST_LOG `{directives}`"))?,
        _ => EnvFilter::try_new(&settings.log_level)
            .with_context(|| format!("invalid telemetry.log_level `{}`", settings.log_level))?,
    };
    let (provider, exporting) = tracer_provider(settings)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Only when exporting: the layer is what makes every span cost.
    let otel = exporting.then(|| {
        // Only our own spans become traces: never the HTTP/gRPC client
        // internals of the exporter itself.
        let targets = Targets::new().with_target("eventflow", LevelFilter::DEBUG);
        // A span is traced only as the root of a sampled request (or of the
        // delivery of a sampled request's event) or inside a traced span
        // (see `api::observe`): unsampled requests have no root.
        let traced = DynFilterFn::new(|meta, cx| {
            meta.name() == REQUEST_SPAN
                || meta.name() == DELIVERY_SPAN
                || cx.lookup_current().is_some()
        });
        let trace_filter = targets.and(traced);
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("eventflow"))
            // Per-span extras we do not use: each costs clock reads or
            // attribute allocations on every span, sampled or not.
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(trace_filter)
    });
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match settings.log_format {
        LogFormat::Json => Box::new(json_layer(writer).with_filter(log_filter)),
        LogFormat::Pretty => Box::new(
            tracing_subscriber::fmt::layer()
                .pretty()
                .with_ansi(ansi)
                .with_writer(writer)
                .with_filter(log_filter),
        ),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init()
        .context("a global tracing subscriber is already installed")?;
    Ok(TelemetryGuard {
        provider,
        exporting,
    })
}

fn tracer_provider(settings: &TelemetrySettings) -> anyhow::Result<(SdkTracerProvider, bool)> {
    let resource = Resource::builder()
        .with_service_name("eventflow")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = settings.otlp_endpoint.as_deref() else {
        return Ok((builder.with_sampler(Sampler::AlwaysOff).build(), false));
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| {
            format!("cannot build the OTLP exporter for telemetry.otlp_endpoint `{endpoint}`")
        })?;
    // The ratio is applied per request at the edge (`TraceSampling`); a
    // span that reaches the SDK belongs to a sampled request.
    let sampler = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
    let provider = builder
        .with_sampler(sampler)
        .with_batch_exporter(export::Reporting::new(exporter, endpoint))
        .build();
    Ok((provider, true))
}

/// JSON log lines: timestamp, level, target, message and fields flattened,
/// the current span's fields, and `trace_id`/`span_id`.
fn json_layer<W>(writer: W) -> json_subscriber::JsonLayer<Registry, W>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let mut layer = json_subscriber::JsonLayer::new(writer);
    layer
        .with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime)
        .with_level("level")
        .with_target("target")
        .with_flattened_event()
        .with_current_span("span");
    // The current span as the whole subscriber sees it: the pipeline's
    // DEBUG spans are filtered out of this layer, yet carry the trace.
    layer.add_multiple_dynamic_fields(|_event, _context, writer| {
        let current = tracing::Span::current();
        if current.is_none() {
            return;
        }
        let otel = current.context();
        let otel_span = otel.span();
        let ids = otel_span.span_context();
        if ids.is_valid() {
            let _ = writer.write_field("trace_id", ids.trace_id().to_string());
            let _ = writer.write_field("span_id", ids.span_id().to_string());
        }
    });
    layer
}

/// Reads W3C trace context from HTTP headers.
struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A child of `parent` built by `make` when `parent` is traced; otherwise a
/// disabled span, without asking the subscriber: the pipeline work of an
/// untraced request then costs no filter evaluation at all.
pub fn child_span(parent: &tracing::Span, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if parent.is_none() {
        tracing::Span::none()
    } else {
        parent.in_scope(make)
    }
}

/// `span`'s trace and span ids, when it is exported (sampled): what a later
/// span links to (a subscription's poll to the event's processing).
pub fn exported_span(span: &tracing::Span) -> Option<SpanRef> {
    if span.is_none() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() || !span_context.is_sampled() {
        return None;
    }
    Some(SpanRef {
        trace_id: TraceId::from_bytes(span_context.trace_id().to_bytes())?,
        span_id: std::num::NonZeroU64::new(u64::from_be_bytes(span_context.span_id().to_bytes()))?,
    })
}

/// Links the current span (a request's) to `span`: a poll to the
/// processing of each event it hands out.
pub fn link_current(span: SpanRef) {
    let linked = SpanContext::new(
        span.trace_id.to_otel(),
        opentelemetry::trace::SpanId::from_bytes(span.span_id.get().to_be_bytes()),
        opentelemetry::trace::TraceFlags::SAMPLED,
        true,
        opentelemetry::trace::TraceState::default(),
    );
    tracing::Span::current().add_link(linked);
}

/// The caller's span context from a valid W3C `traceparent` in `headers`,
/// read by OpenTelemetry's propagator; `None` without one.
pub fn remote_parent(headers: &axum::http::HeaderMap) -> Option<SpanContext> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let span_context = parent.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// The W3C `traceparent` of `span`, written by OpenTelemetry's
/// propagator, so that work done elsewhere (another replica) can join its
/// trace; `None` when `span` is not traced.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_none() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The span context of a W3C `traceparent` value, read by OpenTelemetry's
/// propagator; `None` when it is not valid.
pub fn parent_from_traceparent(traceparent: &str) -> Option<SpanContext> {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let span_context = parent.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Makes `span` a child of `parent` (a remote span context).
pub fn set_parent_context(span: &tracing::Span, parent: SpanContext) {
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
}

/// Makes `span` a child of the W3C `traceparent` in `headers`, if any.
pub fn set_remote_parent(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if let Some(parent) = remote_parent(headers) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// The trace id of `span` when tracing is installed; otherwise the one in
/// `traceparent`, or a fresh one.
pub fn trace_id_of(span: &tracing::Span, headers: &axum::http::HeaderMap) -> TraceId {
    // An unsampled request has no span: no OpenTelemetry context to build.
    if !span.is_none() {
        let context = span.context();
        let otel_span = context.span();
        let span_context = otel_span.span_context();
        if span_context.is_valid()
            && let Some(id) = TraceId::from_bytes(span_context.trace_id().to_bytes())
        {
            return id;
        }
    }
    remote_parent(headers)
        .and_then(|parent| TraceId::from_bytes(parent.trace_id().to_bytes()))
        .unwrap_or_else(TraceId::random)
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue};

    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(traceparent) {
            headers.insert("traceparent", value);
        }
        headers
    }

    #[test]
    fn a_valid_traceparent_gives_the_callers_trace_and_sampled_flag() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let sampled = remote_parent(&headers(&format!("00-{id}-00f067aa0ba902b7-01"))).unwrap();
        assert_eq!(sampled.trace_id().to_string(), id);
        assert!(sampled.is_sampled());
        let unsampled = remote_parent(&headers(&format!("00-{id}-00f067aa0ba902b7-00"))).unwrap();
        assert!(!unsampled.is_sampled());
        let traced = trace_id_of(
            &tracing::Span::none(),
            &headers(&format!("00-{id}-00f067aa0ba902b7-01")),
        );
        assert_eq!(traced.to_hex(), id);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(remote_parent(&headers(bad)).is_none(), "{bad:?}");
        }
        // Without a usable parent the event still gets a trace id of its own.
        assert_eq!(
            trace_id_of(&tracing::Span::none(), &headers("garbage"))
                .to_hex()
                .len(),
            32
        );
    }
}
