//! Prometheus metrics: handles registered once, each metric as the
//! [catalogue](super::catalogue) describes it.
//!
//! Each [`App`](crate::app::App) owns its own recorder (no global), so
//! several services in one process — as in the tests — count separately.
//! Hot-path counters and histograms are pre-registered handles (an atomic
//! add, no lookup). Gauges that move up and down with the pipeline (queue
//! depth, in-flight permits, store size, SSE subscribers) are read from
//! their source of truth at scrape time, so they can never drift.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::catalogue::{CATALOGUE, Kind};
use super::histogram::LatencyHistogram;
use super::http_series::{HttpCache, HttpHandles};
use super::process::render_process;

pub use super::catalogue::names;

/// Histogram buckets in seconds: 50 µs to 10 s, about three per decade.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Counters of one sink.
#[derive(Debug, Clone)]
struct SinkCounters {
    published: Counter,
    errors: Counter,
    /// Whether it can write (configured sinks only), set at scrape time.
    up: Gauge,
}

/// The service's metrics: a recorder plus pre-registered handles. Cloned
/// per request by the HTTP layer, so a clone is one reference count.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Handles>);

impl std::ops::Deref for Metrics {
    type Target = Handles;

    fn deref(&self) -> &Handles {
        &self.0
    }
}

/// What [`Metrics`] shares.
#[derive(Debug)]
pub struct Handles {
    recorder: Option<Arc<PrometheusRecorder>>,
    handle: Option<PrometheusHandle>,
    processed_ok: Counter,
    processed_error: Counter,
    sinks: HashMap<&'static str, SinkCounters>,
    /// The pipeline's latencies (`None` when disabled); see [`LatencyHistogram`].
    pipeline: Option<PipelineHistograms>,
    sse_lagged: Counter,
    gauges: ScrapeGauges,
    http: HttpCache,
}

/// Latencies the workers observe for many events at once.
#[derive(Debug)]
struct PipelineHistograms {
    queue_wait: LatencyHistogram,
    processing: LatencyHistogram,
    end_to_end: LatencyHistogram,
}

impl PipelineHistograms {
    fn new() -> Self {
        let histogram = |name| {
            let help = super::catalogue::find(name).map_or("", |metric| metric.help);
            LatencyHistogram::new(name, help, &LATENCY_BUCKETS)
        };
        Self {
            queue_wait: histogram(names::QUEUE_WAIT),
            processing: histogram(names::PROCESSING),
            end_to_end: histogram(names::END_TO_END),
        }
    }

    fn render(&self, text: &mut String) {
        self.queue_wait.render(text);
        self.processing.render(text);
        self.end_to_end.render(text);
    }
}

/// Gauges set from their sources at scrape time.
#[derive(Debug, Clone)]
struct ScrapeGauges {
    queue_depth: Gauge,
    queue_capacity: Gauge,
    inflight: Gauge,
    store_events: Gauge,
    store_evictions: Counter,
    sse_subscribers: Gauge,
    workers: Gauge,
}

/// One named subscription's figures at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionSample {
    /// Its name (the `subscription` label: `[A-Za-z0-9_-]`, nothing to escape).
    pub name: String,
    /// Published after its cursor, not leased now.
    pub pending: u64,
    /// Leased now, lease live.
    pub in_flight: u64,
    /// Leases handed out since it was made.
    pub delivered: u64,
    /// Leases acknowledged since it was made.
    pub acked: u64,
    /// Events dead-lettered since it was made.
    pub dead_lettered: u64,
}

/// Pipeline state sampled at scrape time.
#[derive(Debug, Clone, Default)]
pub struct PipelineSnapshot {
    /// Events waiting for a worker.
    pub queue_depth: usize,
    /// Queue capacity.
    pub queue_capacity: usize,
    /// Permits in use.
    pub inflight: usize,
    /// Records in the store.
    pub store_events: usize,
    /// Evictions since start.
    pub store_evictions: u64,
    /// SSE subscribers.
    pub sse_subscribers: usize,
    /// Worker tasks running.
    pub workers: usize,
    /// The named subscriptions there are now. Their series are written at
    /// scrape time, not registered: a deleted subscription's leave with it,
    /// so that names coming and going cannot grow the exposition.
    pub subscriptions: Vec<SubscriptionSample>,
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

const METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);

impl Metrics {
    /// A recorder with the service's buckets and every metric registered,
    /// labelled counters at zero for every known label value (so that
    /// dashboards show 0 instead of "no data"). `sinks` are the sink names.
    pub fn new(sinks: &[&'static str]) -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            // Only fails for an empty bucket list, which ours is not.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let recorder = Arc::new(recorder);
        let r = &*recorder;
        let counter = |name, labels: &[(&'static str, &str)]| {
            let c = r.register_counter(&key(name, labels), &METADATA);
            c.increment(0);
            c
        };
        let gauge = |name| r.register_gauge(&key(name, &[]), &METADATA);
        describe(r);
        let sinks = sinks
            .iter()
            .chain(std::iter::once(&"sse"))
            .map(|&sink| {
                (
                    sink,
                    SinkCounters {
                        published: counter(names::PUBLISHED, &[("sink", sink)]),
                        errors: counter(names::PUBLISH_ERRORS, &[("sink", sink)]),
                        up: if sink == "sse" {
                            Gauge::noop()
                        } else {
                            let up = r
                                .register_gauge(&key(names::SINK_UP, &[("sink", sink)]), &METADATA);
                            up.set(1.0);
                            up
                        },
                    },
                )
            })
            .collect();
        r.register_gauge(
            &key(names::BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]),
            &METADATA,
        )
        .set(1.0);
        Self(Arc::new(Handles {
            processed_ok: counter(names::PROCESSED, &[("outcome", "ok")]),
            processed_error: counter(names::PROCESSED, &[("outcome", "error")]),
            sinks,
            pipeline: Some(PipelineHistograms::new()),
            sse_lagged: counter(names::SSE_LAGGED, &[]),
            gauges: ScrapeGauges {
                queue_depth: gauge(names::QUEUE_DEPTH),
                queue_capacity: gauge(names::QUEUE_CAPACITY),
                inflight: gauge(names::INFLIGHT),
                store_events: gauge(names::STORE_EVENTS),
                store_evictions: counter(names::STORE_EVICTIONS, &[]),
                sse_subscribers: gauge(names::SSE_SUBSCRIBERS),
                workers: gauge(names::WORKERS),
            },
            handle: Some(handle),
            recorder: Some(recorder),
            http: HttpCache::default(),
        }))
    }

    /// Metrics that record nothing (benchmarks measure their cost against this).
    pub fn disabled() -> Self {
        Self(Arc::new(Handles {
            recorder: None,
            handle: None,
            processed_ok: Counter::noop(),
            processed_error: Counter::noop(),
            sinks: HashMap::new(),
            pipeline: None,
            sse_lagged: Counter::noop(),
            gauges: ScrapeGauges {
                queue_depth: Gauge::noop(),
                queue_capacity: Gauge::noop(),
                inflight: Gauge::noop(),
                store_events: Gauge::noop(),
                store_evictions: Counter::noop(),
                sse_subscribers: Gauge::noop(),
                workers: Gauge::noop(),
            },
            http: HttpCache::default(),
        }))
    }

    /// A counter of `name` with `labels`, registered (at zero, so that
    /// dashboards show 0 rather than "no data"); a no-op when disabled.
    /// For counters whose owner lives elsewhere (the pipeline's admission).
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        match &self.recorder {
            Some(recorder) => {
                let counter = recorder.register_counter(&key(name, labels), &METADATA);
                counter.increment(0);
                counter
            }
            None => Counter::noop(),
        }
    }

    /// A gauge of `name` (no labels); a no-op when disabled.
    pub fn gauge(&self, name: &'static str) -> Gauge {
        match &self.recorder {
            Some(recorder) => recorder.register_gauge(&key(name, &[]), &METADATA),
            None => Gauge::noop(),
        }
    }

    /// A histogram of `name` (no labels, the service's buckets); a no-op
    /// when disabled.
    pub fn histogram(&self, name: &'static str) -> Histogram {
        match &self.recorder {
            Some(recorder) => recorder.register_histogram(&key(name, &[]), &METADATA),
            None => Histogram::noop(),
        }
    }

    /// Whether sink `sink` can write (set at scrape time).
    pub fn sink_up(&self, sink: &str, up: bool) {
        if let Some(counters) = self.sinks.get(sink) {
            counters.up.set(if up { 1.0 } else { 0.0 });
        }
    }

    /// A worker finished `n` events (`ok`: published), each in `processing`.
    pub fn events_processed(&self, ok: bool, processing: Duration, n: usize) {
        if ok {
            self.processed_ok.increment(n as u64);
        } else {
            self.processed_error.increment(n as u64);
        }
        if let Some(histograms) = &self.pipeline {
            histograms.processing.record(processing, n);
        }
    }

    /// A worker took `n` events off the queue after `wait`.
    pub fn queue_waited(&self, wait: Duration, n: usize) {
        if let Some(histograms) = &self.pipeline {
            histograms.queue_wait.record(wait, n);
        }
    }

    /// `n` events were published `latency` after they were received.
    pub fn end_to_end(&self, latency: Duration, n: usize) {
        if let Some(histograms) = &self.pipeline {
            histograms.end_to_end.record(latency, n);
        }
    }

    /// A sink took (or failed to take) `n` events.
    pub fn sink_result(&self, sink: &str, ok: bool, n: usize) {
        if let Some(counters) = self.sinks.get(sink) {
            if ok {
                counters.published.increment(n as u64);
            } else {
                counters.errors.increment(n as u64);
            }
        }
    }

    /// An SSE subscriber fell behind.
    pub fn sse_lagged(&self) {
        self.sse_lagged.increment(1);
    }

    /// Records one HTTP request.
    pub fn http_request(&self, method: &str, route: &str, status: u16, duration: Duration) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let handles = match self.http.get(method, route, status) {
            Some(handles) => handles,
            None => {
                let status_label = status.to_string();
                let handles = HttpHandles {
                    requests: recorder.register_counter(
                        &key(
                            names::HTTP_REQUESTS,
                            &[
                                ("method", method),
                                ("route", route),
                                ("status", &status_label),
                            ],
                        ),
                        &METADATA,
                    ),
                    duration: recorder.register_histogram(
                        &key(
                            names::HTTP_DURATION,
                            &[("method", method), ("route", route)],
                        ),
                        &METADATA,
                    ),
                };
                self.http.insert(method, route, status, handles.clone());
                handles
            }
        };
        handles.requests.increment(1);
        handles.duration.record(duration.as_secs_f64());
    }

    /// Renders the Prometheus text exposition, sampling `snapshot` and the
    /// process first.
    pub fn render(&self, snapshot: PipelineSnapshot) -> String {
        let Some(handle) = &self.handle else {
            return String::new();
        };
        let g = &self.gauges;
        g.queue_depth.set(snapshot.queue_depth as f64);
        g.queue_capacity.set(snapshot.queue_capacity as f64);
        g.inflight.set(snapshot.inflight as f64);
        g.store_events.set(snapshot.store_events as f64);
        g.store_evictions.absolute(snapshot.store_evictions);
        g.sse_subscribers.set(snapshot.sse_subscribers as f64);
        g.workers.set(snapshot.workers as f64);
        let mut text = handle.render();
        if let Some(histograms) = &self.pipeline {
            histograms.render(&mut text);
        }
        render_subscriptions(&mut text, &snapshot.subscriptions);
        render_process(&mut text);
        text
    }

    /// Drains histogram buffers; call periodically.
    pub fn run_upkeep(&self) {
        if let Some(handle) = &self.handle {
            handle.run_upkeep();
        }
    }
}

/// The subscription series, one per subscription and metric.
fn render_subscriptions(text: &mut String, samples: &[SubscriptionSample]) {
    use std::fmt::Write;
    if samples.is_empty() {
        return;
    }
    type Figure = fn(&SubscriptionSample) -> u64;
    let series: [(&str, Figure); 5] = [
        (names::SUBSCRIPTION_PENDING, |s| s.pending),
        (names::SUBSCRIPTION_IN_FLIGHT, |s| s.in_flight),
        (names::SUBSCRIPTION_DELIVERED, |s| s.delivered),
        (names::SUBSCRIPTION_ACKED, |s| s.acked),
        (names::SUBSCRIPTION_DEAD_LETTERED, |s| s.dead_lettered),
    ];
    for (name, value) in series {
        let Some(metric) = super::catalogue::find(name) else {
            continue;
        };
        let _ = write!(
            text,
            "# HELP {name} {}\n# TYPE {name} {}\n",
            metric.help,
            metric.kind.as_str()
        );
        for sample in samples {
            let _ = writeln!(
                text,
                "{name}{{subscription=\"{}\"}} {}",
                sample.name,
                value(sample)
            );
        }
    }
}

/// Gives every catalogued metric its help and unit, by its kind.
fn describe(recorder: &PrometheusRecorder) {
    for metric in CATALOGUE {
        let key = metrics::KeyName::from_const_str(metric.name);
        let text = metrics::SharedString::const_str(metric.help);
        match metric.kind {
            Kind::Counter => recorder.describe_counter(key, metric.unit, text),
            Kind::Gauge => recorder.describe_gauge(key, metric.unit, text),
            Kind::Histogram => recorder.describe_histogram(key, metric.unit, text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn zero_initialised_and_counted() {
        let m = Metrics::new(&["stdout"]);
        let rejected = m.counter(names::REJECTED, &[("reason", "too_large")]);
        let accepted = m.counter(names::ACCEPTED, &[]);
        let text = m.render(PipelineSnapshot::default());
        assert!(text.contains("eventflow_events_rejected_total{reason=\"too_large\"} 0"));
        assert!(text.contains("eventflow_events_published_total{sink=\"stdout\"} 0"));
        assert!(text.contains("eventflow_sink_up{sink=\"stdout\"} 1"));
        assert!(!text.contains("eventflow_sink_up{sink=\"sse\"}"));
        assert!(text.contains("eventflow_build_info{version=\""));
        rejected.increment(2);
        accepted.increment(3);
        m.sink_up("stdout", false);
        m.http_request("POST", "/events", 202, Duration::from_micros(300));
        let text = m.render(PipelineSnapshot {
            queue_depth: 4,
            queue_capacity: 10,
            ..Default::default()
        });
        assert!(text.contains("eventflow_events_rejected_total{reason=\"too_large\"} 2"));
        assert!(text.contains("eventflow_events_accepted_total 3"));
        assert!(text.contains("eventflow_sink_up{sink=\"stdout\"} 0"));
        assert!(text.contains("eventflow_queue_depth 4"));
        assert!(text.contains(
            "eventflow_http_requests_total{method=\"POST\",route=\"/events\",status=\"202\"} 1"
        ));
        let bucket = line(
            &text,
            "eventflow_http_request_duration_seconds_bucket{method=\"POST\",route=\"/events\",le=\"0.0005\"}",
        )
        .expect("sub-millisecond bucket");
        assert!(bucket.ends_with(" 1"), "{bucket}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
        assert!(line(&text, "process_resident_memory_bytes ").is_some());
    }

    /// What a scrape declares is what the catalogue says (that every
    /// catalogued metric is registered is `tests/api/metrics.rs`'s, with
    /// the whole service).
    #[test]
    fn a_scrape_declares_its_metrics_as_catalogued() {
        let m = Metrics::new(&["stdout"]);
        m.http_request("GET", "/healthz", 200, Duration::from_micros(10));
        let text = m.render(PipelineSnapshot::default());
        let mut declared = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let metric = crate::telemetry::catalogue::find(name)
                    .unwrap_or_else(|| panic!("{name} is not in the catalogue"));
                assert_eq!(kind, metric.kind.as_str(), "{name}");
                declared += 1;
            }
        }
        assert!(declared > 10, "{text}");
    }

    #[test]
    fn separate_instances_do_not_share_counts() {
        let a = Metrics::new(&[]);
        let b = Metrics::new(&[]);
        let _ = b.counter(names::RECEIVED, &[]);
        a.counter(names::RECEIVED, &[]).increment(5);
        assert!(
            b.render(PipelineSnapshot::default())
                .contains("eventflow_events_received_total 0")
        );
        assert!(
            a.render(PipelineSnapshot::default())
                .contains("eventflow_events_received_total 5")
        );
    }

    #[test]
    fn disabled_metrics_render_nothing() {
        let m = Metrics::disabled();
        m.counter(names::ACCEPTED, &[]).increment(1);
        m.http_request("GET", "/x", 200, Duration::ZERO);
        assert!(m.render(PipelineSnapshot::default()).is_empty());
    }
}
