//! Waiting until an instant with sub-millisecond precision, for the open
//! loop's schedule.
//!
//! tokio's timer fires on whole milliseconds, so a request scheduled by it
//! alone leaves up to a millisecond late; since open-loop latency counts
//! from the scheduled time, that lateness would be reported as the
//! server's (a bare server at light load measured p50 0.9 ms that way,
//! 0.09 ms without). So the timer only brings the schedule to within
//! [`COARSE_MARGIN`] of the instant, and the rest of the wait yields to the
//! runtime, which meanwhile reads answers and sends requests, until the
//! instant has come. The price: above ~1,000 requests/s the generator's
//! core never sleeps (benchmarks give it a core of its own).
//! (A `timerfd` would be precise without that, but registering one with
//! tokio now takes `unsafe`, which this crate forbids.)

use std::time::{Duration, Instant};

/// Waits longer than this sleep on tokio's timer until this close.
const COARSE_MARGIN: Duration = Duration::from_millis(2);

/// Returns at `due`, within the time the runtime's other ready tasks take
/// (at once if `due` has passed).
pub(crate) async fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if due <= now {
            return;
        }
        if due - now > COARSE_MARGIN {
            tokio::time::sleep_until((due - COARSE_MARGIN).into()).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_only_once_the_instant_has_come() {
        for wait in [0, 20, 300, 2_500] {
            let due = Instant::now() + Duration::from_micros(wait);
            wait_until(due).await;
            assert!(
                Instant::now() >= due,
                "returned before a {wait} µs wait was over"
            );
        }
    }
}
