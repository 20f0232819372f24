//! The OTLP exporter, reporting its failures: an unreachable collector is
//! logged when exports start failing, then at most once a minute while
//! they keep failing (with how many batches were dropped), and once more
//! when they recover. (The SDK's batch processor drops a failed batch
//! silently: without this, traces would just stop arriving.)

use std::time::{Duration, Instant};

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use parking_lot::Mutex;

/// Shortest time between two reports of a failure that goes on.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// What to say about an export's result, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Report {
    /// The first failure after success (or at start).
    Failing,
    /// Still failing; `dropped` batches since the last report.
    StillFailing { dropped: u64 },
    /// Succeeded again after `dropped` failed batches in all.
    Recovered { dropped: u64 },
}

/// Whether exports are failing, and since when it was last said.
#[derive(Debug, Default)]
struct Health {
    /// When the current run of failures was last reported.
    reported_at: Option<Instant>,
    /// Failed batches since that report.
    unreported: u64,
    /// Failed batches in the current run of failures.
    dropped: u64,
}

impl Health {
    fn on_result(&mut self, ok: bool, now: Instant) -> Option<Report> {
        if ok {
            let dropped = std::mem::take(&mut self.dropped);
            self.unreported = 0;
            return self
                .reported_at
                .take()
                .map(|_| Report::Recovered { dropped });
        }
        self.dropped += 1;
        match self.reported_at {
            None => {
                self.reported_at = Some(now);
                Some(Report::Failing)
            }
            Some(at) if now.duration_since(at) >= REPORT_EVERY => {
                self.reported_at = Some(now);
                let dropped = std::mem::take(&mut self.unreported) + 1;
                Some(Report::StillFailing { dropped })
            }
            Some(_) => {
                self.unreported += 1;
                None
            }
        }
    }
}

/// An exporter that logs its inner exporter's failures (rate-limited).
#[derive(Debug)]
pub(super) struct Reporting<E> {
    inner: E,
    endpoint: String,
    health: Mutex<Health>,
}

impl<E> Reporting<E> {
    pub(super) fn new(inner: E, endpoint: &str) -> Self {
        Self {
            inner,
            endpoint: endpoint.to_owned(),
            health: Mutex::new(Health::default()),
        }
    }
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        let report = self.health.lock().on_result(result.is_ok(), Instant::now());
        let endpoint = &self.endpoint;
        match (report, &result) {
            (Some(Report::Failing), Err(error)) => tracing::warn!(
                endpoint,
                %error,
                spans,
                "exporting traces failed (telemetry.otlp_endpoint); spans are dropped until it recovers"
            ),
            (Some(Report::StillFailing { dropped }), Err(error)) => tracing::warn!(
                endpoint,
                %error,
                dropped_batches = dropped,
                "exporting traces still fails"
            ),
            (Some(Report::Recovered { dropped }), _) => tracing::info!(
                endpoint,
                dropped_batches = dropped,
                "exporting traces works again"
            ),
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_reported_once_then_at_most_once_a_minute_and_recovery_once() {
        let mut health = Health::default();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(health.on_result(true, at(0)), None, "success is quiet");
        assert_eq!(health.on_result(false, at(1)), Some(Report::Failing));
        for second in 2..61 {
            assert_eq!(health.on_result(false, at(second)), None, "{second}");
        }
        assert_eq!(
            health.on_result(false, at(61)),
            Some(Report::StillFailing { dropped: 60 })
        );
        assert_eq!(health.on_result(false, at(62)), None);
        assert_eq!(
            health.on_result(true, at(63)),
            Some(Report::Recovered { dropped: 62 })
        );
        assert_eq!(health.on_result(true, at(64)), None);
        assert_eq!(
            health.on_result(false, at(65)),
            Some(Report::Failing),
            "a new run of failures is reported at once"
        );
    }
}
