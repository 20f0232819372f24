//! The metrics catalogue: each metric's name, kind, unit, labels and help,
//! written once. Registration ([`super::metrics::Metrics`]), the `# HELP`
//! and `# TYPE` lines and the table in docs/operations.md all come from
//! here; a test fails when the documented table drifts from it.

use metrics::Unit;

/// What a metric is to Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

impl Kind {
    /// The word Prometheus uses in `# TYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its name on `/metrics`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Its unit, when it has one.
    pub unit: Option<Unit>,
    /// Its labels and their values, as the docs show them (empty: none).
    pub labels: &'static str,
    /// One line saying what it counts: `# HELP` and the docs.
    pub help: &'static str,
}

macro_rules! catalogue {
    ($($(#[$doc:meta])* $id:ident = $name:literal, $kind:ident, $unit:expr, labels $labels:literal, $help:literal;)*) => {
        /// Metric names: the contract dashboards, alerts and users rely on.
        pub mod names {
            $($(#[$doc])* pub const $id: &str = $name;)*
        }

        /// Every metric the service exports, in the order the docs list them.
        pub const CATALOGUE: &[Metric] = &[
            $(Metric {
                name: $name,
                kind: Kind::$kind,
                unit: $unit,
                labels: $labels,
                help: $help,
            },)*
        ];
    };
}

catalogue! {
    /// HTTP requests by `method`, `route`, `status`.
    HTTP_REQUESTS = "eventflow_http_requests_total", Counter, None,
        labels "`method`, `route` (template, or `unmatched`), `status`",
        "HTTP requests by method, route template and status";
    /// HTTP request duration by `method`, `route`.
    HTTP_DURATION = "eventflow_http_request_duration_seconds", Histogram, Some(Unit::Seconds),
        labels "`method`, `route`",
        "HTTP request duration by method and route template";
    /// Events read from requests.
    RECEIVED = "eventflow_events_received_total", Counter, None,
        labels "",
        "Events read from ingest requests (received = accepted + duplicate + rejected)";
    /// Events newly accepted.
    ACCEPTED = "eventflow_events_accepted_total", Counter, None,
        labels "",
        "Events newly accepted into the pipeline";
    /// Retries of stored events.
    DUPLICATE = "eventflow_events_duplicate_total", Counter, None,
        labels "",
        "Events that repeated a stored event (not processed again)";
    /// Failed events queued again by a retry.
    RETRIED = "eventflow_events_retried_total", Counter, None,
        labels "",
        "Failed events queued again for processing by POST /events/{id}/retry or POST /events/retry";
    /// Refused events by `reason`.
    REJECTED = "eventflow_events_rejected_total", Counter, None,
        labels "`reason` = `invalid`, `conflict`, `too_large`, `overloaded` (no room: the permits, or in nats mode the backlog), `unavailable` (the backend unreachable or a sink broken), `shutting_down`, `unauthorized` (an ingest request refused with 401 counts once: its body is never read)",
        "Events refused, by reason";
    /// Requests refused with 401 (no or wrong bearer token).
    AUTH_FAILURES = "eventflow_auth_failures_total", Counter, None,
        labels "",
        "Requests refused with 401, any route: no bearer token, or not a known one";
    /// Requests refused with 429 by the per-client rate limit.
    RATE_LIMITED = "eventflow_rate_limited_total", Counter, None,
        labels "",
        "Requests refused with 429 by the per-client rate limit";
    /// Connections closed at accept: their client address held
    /// `server.max_connections_per_client` already.
    CONNECTIONS_REFUSED = "eventflow_connections_refused_total", Counter, None,
        labels "",
        "Connections closed at accept: their client address held server.max_connections_per_client already";
    /// Processed events by `outcome`.
    PROCESSED = "eventflow_events_processed_total", Counter, None,
        labels "`outcome` = `ok`, `error`",
        "Events processed by workers, by outcome";
    /// Events a sink wrote, by `sink`.
    PUBLISHED = "eventflow_events_published_total", Counter, None,
        labels "`sink`: the configured sinks, and `sse` (appended to the published-events feed)",
        "Events a sink wrote, by sink";
    /// Sink failures by `sink`.
    PUBLISH_ERRORS = "eventflow_publish_errors_total", Counter, None,
        labels "`sink`",
        "Events a sink failed to write (they are failed, not published), by sink";
    /// 1 while a sink can write, 0 once it is broken, by `sink`.
    SINK_UP = "eventflow_sink_up", Gauge, None,
        labels "`sink` (configured sinks)",
        "1 while a sink can write, 0 once a write failed and it is broken (it takes nothing more; /readyz and ingest answer 503)";
    /// Events waiting for a worker.
    QUEUE_DEPTH = "eventflow_queue_depth", Gauge, None,
        labels "",
        "Events waiting for a worker";
    /// Queue capacity (`pipeline.queue_capacity`).
    QUEUE_CAPACITY = "eventflow_queue_capacity", Gauge, None,
        labels "",
        "Maximum accepted-but-unpublished events (pipeline.queue_capacity)";
    /// Backpressure permits in use.
    INFLIGHT = "eventflow_inflight_events", Gauge, None,
        labels "",
        "Backpressure permits in use (accepted, not yet published)";
    /// Time from enqueue to a worker taking the event.
    QUEUE_WAIT = "eventflow_queue_wait_seconds", Histogram, Some(Unit::Seconds),
        labels "",
        "Time events wait in the queue";
    /// Transform + publish time.
    PROCESSING = "eventflow_processing_duration_seconds", Histogram, Some(Unit::Seconds),
        labels "",
        "Transform and publish time per event, until every sink wrote it (events published together in a worker pass share it)";
    /// Received → published.
    END_TO_END = "eventflow_end_to_end_latency_seconds", Histogram, Some(Unit::Seconds),
        labels "",
        "Time from receipt to publication";
    /// Records held by the store.
    STORE_EVENTS = "eventflow_store_events", Gauge, None,
        labels "",
        "Records held by the store";
    /// Records evicted from the store.
    STORE_EVICTIONS = "eventflow_store_evictions_total", Counter, None,
        labels "",
        "Records evicted from the store";
    /// Connected SSE subscribers.
    SSE_SUBSCRIBERS = "eventflow_sse_subscribers", Gauge, None,
        labels "",
        "Connected Server-Sent-Events subscribers";
    /// Times an SSE subscriber fell behind.
    SSE_LAGGED = "eventflow_sse_lagged_total", Counter, None,
        labels "",
        "lagged messages sent to SSE subscribers, one per range of events they missed";
    /// Worker tasks.
    WORKERS = "eventflow_workers", Gauge, None,
        labels "",
        "Worker tasks running (below pipeline.workers when one died)";
    /// Always 1, labelled with the `version`.
    BUILD_INFO = "eventflow_build_info", Gauge, None,
        labels "`version`",
        "Build information; always 1";
    /// Gauge (nats backend): accepted events no replica has been handed yet.
    NATS_PENDING = "eventflow_nats_consumer_pending", Gauge, None,
        labels "",
        "nats backend: backlog chunks (up to 256 events each) not yet handed to any replica (the lag)";
    /// Gauge (nats backend): deliveries handed out and not yet acknowledged.
    NATS_ACK_PENDING = "eventflow_nats_ack_pending", Gauge, None,
        labels "",
        "nats backend: deliveries (backlog chunks) handed out and not yet acknowledged";
    /// Gauge (nats backend): bytes of accepted, unpublished events in the backlog stream.
    NATS_BACKLOG_BYTES = "eventflow_nats_backlog_bytes", Gauge, Some(Unit::Bytes),
        labels "",
        "nats backend: bytes of accepted, unpublished events in the backlog stream";
    /// Gauge (nats backend): the backlog's bound (`backend.nats.backlog_max_bytes`).
    NATS_BACKLOG_LIMIT = "eventflow_nats_backlog_limit_bytes", Gauge, Some(Unit::Bytes),
        labels "",
        "nats backend: the backlog's bound in bytes (backend.nats.backlog_max_bytes); ingest is refused at it";
    /// Counter (nats backend): deliveries this replica got that had been delivered before.
    NATS_REDELIVERIES = "eventflow_nats_redeliveries_total", Counter, None,
        labels "",
        "nats backend: deliveries this replica received that had been delivered before";
    /// Histogram (nats backend): time for JetStream to acknowledge an ingest request's events.
    NATS_PUBLISH_ACK = "eventflow_nats_publish_ack_seconds", Histogram, Some(Unit::Seconds),
        labels "",
        "nats backend: time for JetStream to acknowledge an ingest request's events";
    /// Events published after a subscription's cursor and not leased now.
    SUBSCRIPTION_PENDING = "eventflow_subscription_pending", Gauge, None,
        labels "`subscription` (at most subscriptions.max_count; written at scrape time, so a deleted subscription's series leave with it)",
        "Events published after a subscription's cursor and not leased now (never delivered, handed back or expired)";
    /// A subscription's events leased now, lease live.
    SUBSCRIPTION_IN_FLIGHT = "eventflow_subscription_in_flight", Gauge, None,
        labels "`subscription`",
        "A subscription's events leased to a consumer now, lease live";
    /// Leases handed to a subscription's consumers.
    SUBSCRIPTION_DELIVERED = "eventflow_subscription_delivered_total", Counter, None,
        labels "`subscription`",
        "Events handed to a subscription's consumers (each lease counts: redeliveries too)";
    /// Leases a subscription's consumers acknowledged.
    SUBSCRIPTION_ACKED = "eventflow_subscription_acked_total", Counter, None,
        labels "`subscription`",
        "Leases a subscription's consumers acknowledged";
    /// Events dead-lettered for a subscription.
    SUBSCRIPTION_DEAD_LETTERED = "eventflow_subscription_dead_lettered_total", Counter, None,
        labels "`subscription`",
        "Events dead-lettered for a subscription after max_deliver leases without an ack";
    /// The process's CPU time.
    PROCESS_CPU = "process_cpu_seconds_total", Counter, Some(Unit::Seconds),
        labels "",
        "Total user and system CPU time spent in seconds.";
    /// The process's resident memory.
    PROCESS_RSS = "process_resident_memory_bytes", Gauge, Some(Unit::Bytes),
        labels "",
        "Resident memory size in bytes.";
    /// The process's open file descriptors.
    PROCESS_OPEN_FDS = "process_open_fds", Gauge, None,
        labels "",
        "Number of open file descriptors.";
    /// The process's file descriptor limit.
    PROCESS_MAX_FDS = "process_max_fds", Gauge, None,
        labels "",
        "Maximum number of open file descriptors.";
    /// When the process started.
    PROCESS_START = "process_start_time_seconds", Gauge, Some(Unit::Seconds),
        labels "",
        "Start time of the process since unix epoch in seconds.";
}

/// The catalogue entry of `name`.
pub fn find(name: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|metric| metric.name == name)
}

/// The catalogue as the markdown table docs/operations.md shows.
pub fn markdown_table() -> String {
    let mut table =
        String::from("| metric | type | unit | labels | meaning |\n|---|---|---|---|---|\n");
    for metric in CATALOGUE {
        let unit = metric.unit.map_or("", |unit| unit.as_str());
        table.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            metric.name,
            metric.kind.as_str(),
            unit,
            metric.labels,
            metric.help
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table in docs/operations.md is this catalogue's; with
    /// `EVENTFLOW_UPDATE_DOCS=1` the test writes it instead.
    #[test]
    fn the_documented_metrics_table_is_the_catalogue() {
        const BEGIN: &str = "<!-- metrics:begin -->\n";
        const END: &str = "<!-- metrics:end -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let start = doc
            .find(BEGIN)
            .expect("docs/operations.md has the metrics markers")
            + BEGIN.len();
        let end = start + doc[start..].find(END).expect("the end marker");
        let table = markdown_table();
        if std::env::var_os("EVENTFLOW_UPDATE_DOCS").is_some() {
            std::fs::write(path, format!("{}{table}{}", &doc[..start], &doc[end..])).unwrap();
            return;
        }
        assert_eq!(
            doc[start..end],
            table,
            "docs/operations.md's metrics table differs from src/telemetry/catalogue.rs; \
             run EVENTFLOW_UPDATE_DOCS=1 cargo test --lib catalogue"
        );
    }

    #[test]
    fn names_are_unique_and_follow_the_conventions() {
        for (i, metric) in CATALOGUE.iter().enumerate() {
            assert!(
                CATALOGUE[..i].iter().all(|other| other.name != metric.name),
                "{} twice",
                metric.name
            );
            // Prometheus conventions: counters end in _total, units are
            // suffixes.
            assert_eq!(
                metric.kind == Kind::Counter,
                metric.name.ends_with("_total"),
                "{}",
                metric.name
            );
            if let Some(unit) = metric.unit {
                let suffix = format!("_{}", unit.as_str());
                assert!(
                    metric.name.trim_end_matches("_total").ends_with(&suffix),
                    "{} lacks {suffix}",
                    metric.name
                );
            }
        }
    }
}
