//! What a run measured: per-worker recorders merged into one summary.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, 1 µs to 10 min.
const MAX_MICROS: u64 = 600_000_000;

#[allow(clippy::expect_used)] // Constant bounds that hdrhistogram accepts.
fn histogram(significant: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, significant).expect("valid histogram bounds")
}

/// One second of the run.
#[derive(Debug, Clone)]
pub(crate) struct Second {
    pub(crate) latency: Histogram<u64>,
    pub(crate) requests: u64,
    pub(crate) events: u64,
    pub(crate) errors: u64,
}

impl Second {
    fn new() -> Self {
        Self {
            latency: histogram(2),
            requests: 0,
            events: 0,
            errors: 0,
        }
    }
}

/// Per-second measurements, shared by a run's recorders.
pub(crate) type Timeline = Arc<Mutex<Vec<Second>>>;

/// Measurements of one connection worker (merged at the end; only the
/// per-second timeline is shared, behind a lock held for a few additions).
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    start: Instant,
    pub(crate) latency: Histogram<u64>,
    /// Latency of 2xx answers only.
    pub(crate) latency_ok: Histogram<u64>,
    /// The run's seconds, shared by every worker of a run (one histogram
    /// a second, not one per connection a second).
    pub(crate) seconds: Timeline,
    pub(crate) statuses: BTreeMap<u16, u64>,
    pub(crate) transport_errors: u64,
    pub(crate) timeouts: u64,
    pub(crate) unsent: u64,
    /// Batch 202s whose body could not be read (which events were taken is unknown).
    pub(crate) unreadable_answers: u64,
    pub(crate) requests: u64,
    pub(crate) events_sent: u64,
    pub(crate) events_accepted: u64,
    /// Event numbers the service accepted (kept for --verify).
    pub(crate) accepted: Vec<Range<u64>>,
    track_accepted: bool,
}

/// How one request ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// An HTTP answer; `accepted` are the accepted event numbers.
    Answer {
        status: u16,
        accepted: Vec<Range<u64>>,
    },
    /// No answer within the timeout.
    Timeout,
    /// Connection or protocol failure.
    Transport,
    /// Due in an open-loop run but still waiting for a connection a
    /// timeout after the run's end: never sent.
    Unsent,
}

impl Recorder {
    /// A recorder with a timeline of its own.
    #[cfg(test)]
    pub(crate) fn new(start: Instant, track_accepted: bool) -> Self {
        Self::sharing(start, track_accepted, Timeline::default())
    }

    /// A recorder that adds its seconds to `seconds`.
    pub(crate) fn sharing(start: Instant, track_accepted: bool, seconds: Timeline) -> Self {
        Self {
            start,
            latency: histogram(3),
            latency_ok: histogram(3),
            seconds,
            statuses: BTreeMap::new(),
            transport_errors: 0,
            timeouts: 0,
            unsent: 0,
            unreadable_answers: 0,
            requests: 0,
            events_sent: 0,
            events_accepted: 0,
            accepted: Vec::new(),
            track_accepted,
        }
    }

    /// Measures from `start`: requests due earlier are the warm-up, kept
    /// only for --verify. (Recorders are made before the run's clock starts,
    /// so that making them is not measured.)
    pub(crate) fn restart_at(&mut self, start: Instant) {
        self.start = start;
    }

    /// Records one request of `events` events that was due at `due` and
    /// completed at `done`.
    pub(crate) fn record(&mut self, due: Instant, done: Instant, events: usize, outcome: Outcome) {
        if due < self.start {
            if let Outcome::Answer { accepted, .. } = outcome
                && self.track_accepted
            {
                self.accepted.extend(accepted);
            }
            return;
        }
        let micros = done
            .saturating_duration_since(due)
            .as_micros()
            .clamp(1, MAX_MICROS as u128) as u64;
        // Every request's latency counts, failed ones up to their failure
        // (a timeout at the timeout, an unsent one until the run gave up on
        // it): leaving them out would hide exactly the worst stalls.
        let _ = self.latency.record(micros);
        self.requests += 1;
        // An unsent request belongs to the second it was due in; the others
        // to the second they ended in.
        let at = if matches!(outcome, Outcome::Unsent) {
            due
        } else {
            done
        };
        let second = at.saturating_duration_since(self.start).as_secs() as usize;
        let mut seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        while seconds.len() <= second {
            seconds.push(Second::new());
        }
        let bucket = &mut seconds[second];
        bucket.requests += 1;
        let _ = bucket.latency.record(micros);
        if !matches!(outcome, Outcome::Unsent) {
            bucket.events += events as u64;
            self.events_sent += events as u64;
        }
        match outcome {
            Outcome::Answer { status, accepted } => {
                if (200..300).contains(&status) {
                    let _ = self.latency_ok.record(micros);
                }
                *self.statuses.entry(status).or_default() += 1;
                if status >= 500 {
                    bucket.errors += 1;
                }
                let count: u64 = accepted.iter().map(|r| r.end - r.start).sum();
                self.events_accepted += count;
                if self.track_accepted {
                    self.accepted.extend(accepted);
                }
            }
            Outcome::Timeout => {
                self.timeouts += 1;
                bucket.errors += 1;
            }
            Outcome::Transport => {
                self.transport_errors += 1;
                bucket.errors += 1;
            }
            Outcome::Unsent => {
                self.unsent += 1;
                bucket.errors += 1;
            }
        }
    }

    /// Folds another worker's measurements into this one.
    pub(crate) fn merge(&mut self, other: Recorder) {
        let _ = self.latency.add(&other.latency);
        let _ = self.latency_ok.add(&other.latency_ok);
        if !Arc::ptr_eq(&self.seconds, &other.seconds) {
            let theirs =
                std::mem::take(&mut *other.seconds.lock().unwrap_or_else(PoisonError::into_inner));
            let mut seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
            if seconds.len() < theirs.len() {
                seconds.resize_with(theirs.len(), Second::new);
            }
            for (mine, theirs) in seconds.iter_mut().zip(theirs) {
                let _ = mine.latency.add(&theirs.latency);
                mine.requests += theirs.requests;
                mine.events += theirs.events;
                mine.errors += theirs.errors;
            }
        }
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        self.timeouts += other.timeouts;
        self.unsent += other.unsent;
        self.unreadable_answers += other.unreadable_answers;
        self.requests += other.requests;
        self.events_sent += other.events_sent;
        self.events_accepted += other.events_accepted;
        self.accepted.extend(other.accepted);
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// One second of the timeline.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TimelinePoint {
    pub(crate) second: usize,
    pub(crate) requests: u64,
    pub(crate) events: u64,
    pub(crate) errors: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// The run's results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub(crate) mode: crate::args::Mode,
    pub(crate) connections: usize,
    pub(crate) batch_size: usize,
    pub(crate) target_rate: Option<f64>,
    pub(crate) elapsed_s: f64,
    /// Requests due: sent, or (open loop) never sent.
    pub(crate) requests: u64,
    /// Requests sent, per second.
    pub(crate) requests_per_s: f64,
    pub(crate) events_sent: u64,
    pub(crate) events_accepted: u64,
    pub(crate) events_per_s: f64,
    pub(crate) accepted_events_per_s: f64,
    pub(crate) status: BTreeMap<String, u64>,
    pub(crate) timeouts: u64,
    pub(crate) transport_errors: u64,
    /// Open-loop requests the run ended before sending (see [`Outcome::Unsent`]).
    pub(crate) unsent: u64,
    /// Batch 202s whose body could not be read.
    pub(crate) unreadable_answers: u64,
    /// Latency of every request: answers, and failures up to their failure.
    pub(crate) latency_ms: Percentiles,
    /// Latency of 2xx answers only.
    pub(crate) accepted_latency_ms: Percentiles,
    pub(crate) timeline: Vec<TimelinePoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<crate::sampler::ServiceStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) verify: Option<crate::verify::VerifyReport>,
    /// The consumers of a named subscription (`--consumers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) consume: Option<crate::consume::ConsumeReport>,
}

impl Summary {
    pub(crate) fn new(plan: &crate::args::Plan, all: &Recorder, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        // A last second that the run barely entered would plot as a drop.
        let all_seconds = all.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        let mut whole_seconds = all_seconds.len();
        if whole_seconds > 1 && secs.fract() < 0.5 && whole_seconds as f64 > secs {
            whole_seconds -= 1;
        }
        let timeline = all_seconds[..whole_seconds]
            .iter()
            .enumerate()
            .map(|(second, s)| TimelinePoint {
                second,
                requests: s.requests,
                events: s.events,
                errors: s.errors,
                p50_ms: s.latency.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: s.latency.value_at_quantile(0.99) as f64 / 1000.0,
            })
            .collect();
        Self {
            mode: plan.mode,
            connections: plan.connections,
            batch_size: plan.batch_size,
            target_rate: plan.rate,
            elapsed_s: secs,
            requests: all.requests,
            requests_per_s: (all.requests - all.unsent) as f64 / secs,
            events_sent: all.events_sent,
            events_accepted: all.events_accepted,
            events_per_s: all.events_sent as f64 / secs,
            accepted_events_per_s: all.events_accepted as f64 / secs,
            status: all
                .statuses
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            timeouts: all.timeouts,
            transport_errors: all.transport_errors,
            unsent: all.unsent,
            unreadable_answers: all.unreadable_answers,
            latency_ms: Percentiles::of(&all.latency),
            accepted_latency_ms: Percentiles::of(&all.latency_ok),
            timeline,
            service: None,
            verify: None,
            consume: None,
        }
    }

    /// A human-readable table.
    pub(crate) fn table(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "mode            {:?}, {} connections, batch {}",
            self.mode, self.connections, self.batch_size
        );
        if let Some(rate) = self.target_rate {
            let _ = writeln!(t, "target rate     {rate:.0} req/s");
        }
        let _ = writeln!(t, "elapsed         {:.2} s", self.elapsed_s);
        let _ = writeln!(
            t,
            "requests        {} ({:.0} req/s)",
            self.requests, self.requests_per_s
        );
        let _ = writeln!(
            t,
            "events sent     {} ({:.0} events/s)",
            self.events_sent, self.events_per_s
        );
        let _ = writeln!(
            t,
            "events accepted {} ({:.0} events/s)",
            self.events_accepted, self.accepted_events_per_s
        );
        let statuses: Vec<String> = self
            .status
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(t, "status codes    {}", statuses.join(", "));
        let _ = writeln!(
            t,
            "errors          {} timeouts, {} transport, {} never sent (the run ended first), {} unreadable 202s",
            self.timeouts, self.transport_errors, self.unsent, self.unreadable_answers
        );
        for (label, l) in [
            ("latency (ms)", &self.latency_ms),
            ("2xx latency", &self.accepted_latency_ms),
        ] {
            let _ = writeln!(
                t,
                "{label:<16}p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            );
        }
        if let Some(s) = &self.service {
            let _ = writeln!(
                t,
                "service         queue depth max {}, RSS max {:.1} MiB, CPU {:.2} s ({} samples)",
                s.queue_depth_max,
                s.rss_max_bytes as f64 / 1_048_576.0,
                s.cpu_seconds,
                s.samples
            );
        }
        if let Some(v) = &self.verify {
            let _ = writeln!(
                t,
                "verify          {} accepted: {} seen on stream, {} confirmed by lookup, {} FAILED (not published, reported failed), {} LOST, {} DUPLICATED among those seen on the stream ({} stream lag events, {} resumes{}); service publish errors during the run: {}",
                v.accepted,
                v.seen_on_stream,
                v.confirmed_by_lookup,
                v.failed,
                v.lost,
                v.duplicated,
                v.stream_lagged,
                v.stream_resumed,
                if v.stream_ended_early {
                    ", the stream ended early"
                } else {
                    ""
                },
                v.publish_errors
                    .map_or_else(|| "unknown".to_owned(), |n| n.to_string())
            );
        }
        if let Some(c) = &self.consume {
            let _ = writeln!(
                t,
                "consumed        {} acked by {} consumers of `{}` ({:.0} events/s), {} leases, {} redelivered, {} acks expired{}{}; committed {}, dead-lettered {}",
                c.acked,
                c.consumers,
                c.subscription,
                c.acked_per_s,
                c.delivered,
                c.redelivered,
                c.expired,
                if c.killed_held > 0 {
                    format!(", {} held by the consumer that died", c.killed_held)
                } else {
                    String::new()
                },
                if c.unfinished {
                    ", UNFINISHED (events still pending or in flight)"
                } else {
                    ""
                },
                c.committed
                    .map_or_else(|| "unknown".into(), |n| n.to_string()),
                c.dead_lettered
                    .map_or_else(|| "unknown".into(), |n| n.to_string()),
            );
            if let Some(unacked) = c.unacked {
                let _ = writeln!(
                    t,
                    "verify consume  {unacked} accepted events NEVER ACKED, {} ACKED TWICE, {} redelivered that the dead consumer did not hold",
                    c.acked_twice, c.unexpected_redeliveries
                );
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_requests_are_kept_for_verify_but_not_measured() {
        let start = Instant::now();
        let mut recorder = Recorder::new(start, true);
        recorder.restart_at(start + Duration::from_secs(1));
        let accepted = |range: Range<u64>| Outcome::Answer {
            status: 202,
            accepted: vec![range],
        };
        // Due during the warm-up, answered after it: still the warm-up.
        recorder.record(
            start,
            start + Duration::from_millis(1500),
            1,
            accepted(0..1),
        );
        let measured = start + Duration::from_millis(1200);
        recorder.record(
            measured,
            measured + Duration::from_millis(3),
            1,
            accepted(1..2),
        );
        assert_eq!((recorder.requests, recorder.events_accepted), (1, 1));
        assert_eq!(recorder.latency.len(), 1);
        assert!(recorder.latency.equivalent(recorder.latency.max(), 3000));
        assert_eq!(recorder.accepted, vec![0..1, 1..2]);
        assert_eq!(recorder.seconds.lock().unwrap().len(), 1);
    }

    #[test]
    fn recorders_merge() {
        let start = Instant::now();
        let mut a = Recorder::new(start, true);
        let mut b = Recorder::new(start, true);
        let later = start + Duration::from_millis(2);
        a.record(
            start,
            later,
            1,
            Outcome::Answer {
                status: 202,
                accepted: std::iter::once(0..1).collect(),
            },
        );
        b.record(
            start,
            later,
            10,
            Outcome::Answer {
                status: 503,
                accepted: vec![],
            },
        );
        b.record(start, later, 1, Outcome::Timeout);
        a.merge(b);
        assert_eq!((a.requests, a.events_sent, a.events_accepted), (3, 12, 1));
        assert_eq!(a.statuses[&202], 1);
        assert_eq!(a.statuses[&503], 1);
        assert_eq!(a.timeouts, 1);
        assert_eq!(a.accepted, vec![0..1]);
        assert_eq!(a.latency.len(), 3, "a timeout's latency counts too");
        assert_eq!(a.latency_ok.len(), 1);
        let p = Percentiles::of(&a.latency);
        assert!((p.p50 - 2.0).abs() < 0.01, "{p:?}");
        let mut c = Recorder::new(start, false);
        c.record(start, start + Duration::from_secs(40), 1, Outcome::Unsent);
        a.merge(c);
        assert_eq!((a.unsent, a.requests, a.events_sent), (1, 4, 12));
        assert!(
            Percentiles::of(&a.latency).max >= 40_000.0,
            "the unsent one's wait is the max"
        );
    }
}
