//! A Prometheus latency histogram that counts many observations of one
//! value in one step.
//!
//! The pipeline observes one latency for many events at once: every event
//! of a queued chunk waited as long, every event of a worker pass took as
//! long, and the events of one request in one pass were received and
//! published together. The exporter's histograms keep each sample, with a
//! clock read, until the next upkeep, one sample at a time; at three
//! samples per event that cost 13–20 % of batch throughput (see
//! `docs/performance.md`). This one adds to a bucket counter instead: a
//! few atomic additions per call, whatever the number of events.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Cumulative bucket counts with a sum, rendered in the Prometheus text
/// format like the exporter's histograms (same `le` labels).
#[derive(Debug)]
pub(super) struct LatencyHistogram {
    name: &'static str,
    help: &'static str,
    /// Upper bounds in seconds, ascending, as rendered in `le`.
    bounds: &'static [f64],
    /// The same bounds, for comparing without float conversion.
    limits: Box<[Duration]>,
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    /// Sum of observations in seconds, as `f64` bits.
    sum: AtomicU64,
}

impl LatencyHistogram {
    /// An empty histogram with the given upper bounds (seconds, ascending).
    pub(super) fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Self {
        Self {
            name,
            help,
            bounds,
            limits: bounds.iter().map(|&b| Duration::from_secs_f64(b)).collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0.0_f64.to_bits()),
        }
    }

    /// Counts `n` observations of `latency`.
    pub(super) fn record(&self, latency: Duration, n: usize) {
        if n == 0 {
            return;
        }
        // A value equal to a bound belongs to that bound's bucket (`le`).
        let bucket = self.limits.partition_point(|&limit| limit < latency);
        let n = n as u64;
        self.counts[bucket].fetch_add(n, Ordering::Relaxed);
        let add = latency.as_secs_f64() * n as f64;
        // A compare-and-swap loop: it retries only while another record
        // changes the sum in between, and the update itself never refuses.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + add).to_bits())
            });
    }

    /// Appends the histogram in the Prometheus text format. The count is
    /// the `+Inf` bucket, so the two always agree.
    pub(super) fn render(&self, text: &mut String) {
        let name = self.name;
        let _ = write!(
            text,
            "# HELP {name} {}\n# TYPE {name} histogram\n",
            self.help
        );
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(text, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        if let Some(overflow) = self.counts.last() {
            cumulative += overflow.load(Ordering::Relaxed);
        }
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let _ = write!(
            text,
            "{name}_bucket{{le=\"+Inf\"}} {cumulative}\n{name}_sum {sum}\n{name}_count {cumulative}\n\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];

    fn rendered(h: &LatencyHistogram) -> String {
        let mut text = String::new();
        h.render(&mut text);
        text
    }

    #[test]
    fn counts_many_at_once_into_cumulative_buckets() {
        let h = LatencyHistogram::new("t_seconds", "Test", &BOUNDS);
        h.record(Duration::from_micros(500), 3);
        // On a bound: that bound's bucket.
        h.record(Duration::from_millis(10), 2);
        h.record(Duration::from_secs(1), 1);
        h.record(Duration::from_secs(5), 0);
        assert_eq!(
            rendered(&h),
            "# HELP t_seconds Test\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{le=\"0.001\"} 3\n\
             t_seconds_bucket{le=\"0.01\"} 5\n\
             t_seconds_bucket{le=\"0.1\"} 5\n\
             t_seconds_bucket{le=\"+Inf\"} 6\n\
             t_seconds_sum 1.0215\n\
             t_seconds_count 6\n\n"
        );
    }

    #[test]
    fn concurrent_records_all_count() {
        let h = LatencyHistogram::new("t_seconds", "Test", &BOUNDS);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        h.record(Duration::from_millis(50), 2);
                    }
                });
            }
        });
        let text = rendered(&h);
        assert!(text.contains("t_seconds_count 8000\n"), "{text}");
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("t_seconds_sum "))
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!((sum - 400.0).abs() < 1e-6, "{sum}");
    }
}
