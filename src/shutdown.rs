//! Signals, readiness, and the report of what a shutdown left unpublished.
//!
//! The drain order and its deadline live in `app::App::run_until_stopped`;
//! this module holds the pieces it is made of.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Where the service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Built (workers started), not yet serving requests.
    Starting,
    /// Accepting events.
    Ready,
    /// A shutdown signal arrived; draining.
    Draining,
}

/// Shared readiness flag behind `GET /readyz`.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicU8>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(AtomicU8::new(Phase::Starting as u8)))
    }
}

impl Readiness {
    /// Moves to `phase`.
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Release);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }
}

/// Accepted events that shutdown leaves unpublished: the drain deadline
/// passed first, or a sink could not write some of them during the run.
/// Either way the process exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Unpublished {
    /// The configured grace period.
    pub grace: std::time::Duration,
    /// Whether `server.shutdown_grace` passed before the drain finished.
    pub deadline_passed: bool,
    /// Events still waiting in the queue at the deadline.
    pub queued: usize,
    /// Accepted events not yet published at the deadline (queued, being
    /// processed, or waiting for a sink to write them).
    pub in_flight: usize,
    /// Accepted events that failed because a sink could not write them.
    pub sink_failed: u64,
    /// Why the backend failed for good, when that is what stopped the service.
    pub backend_failed: Option<String>,
}

impl std::fmt::Display for Unpublished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(why) = &self.backend_failed {
            parts.push(format!("the backend failed: {why}"));
        }
        if self.deadline_passed {
            parts.push(format!(
                "shutdown deadline of {:?} passed with {} queued and {} accepted events not yet published",
                self.grace, self.queued, self.in_flight
            ));
        }
        if self.sink_failed > 0 {
            parts.push(format!(
                "{} accepted events were not published because a sink could not write them",
                self.sink_failed
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// SIGINT and SIGTERM, caught from the moment [`Signals::install`] runs:
/// installed before the service listens, so that a signal sent as soon as
/// it is ready starts a drain rather than killing the process.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Waits for the next SIGINT or SIGTERM and returns its name.
    pub async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_what_was_left_and_why() {
        let late = Unpublished {
            grace: std::time::Duration::from_secs(3),
            deadline_passed: true,
            queued: 10,
            in_flight: 12,
            sink_failed: 0,
            backend_failed: None,
        };
        assert_eq!(
            late.to_string(),
            "shutdown deadline of 3s passed with 10 queued and 12 accepted events not yet published"
        );
        let failed = Unpublished {
            deadline_passed: false,
            queued: 0,
            in_flight: 0,
            sink_failed: 4,
            ..late.clone()
        };
        assert_eq!(
            failed.to_string(),
            "4 accepted events were not published because a sink could not write them"
        );
        let both = Unpublished {
            sink_failed: 4,
            ..late
        };
        assert!(both.to_string().contains("; 4 accepted events"));
    }
}
