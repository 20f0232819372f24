//! Signals, readiness, and the drain deadline.
//!
//! The drain order lives in [`crate::app::App::run_until_stopped`]; this
//! module holds the pieces it is made of.

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

/// The shutdown did not finish within `server.shutdown_grace`.
#[derive(Debug, thiserror::Error)]
#[error(
    "shutdown deadline of {grace:?} passed with {queued} queued and {in_flight} accepted events not yet published"
)]
pub struct DeadlineExceeded {
    /// The configured grace period.
    pub grace: std::time::Duration,
    /// Events still waiting in the queue.
    pub queued: usize,
    /// Accepted events not yet published (queued or being processed).
    pub in_flight: usize,
}

/// Waits for SIGINT or SIGTERM and returns the signal's name.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            _ => {
                tracing::error!("cannot install signal handlers; falling back to Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_moves_through_phases() {
        let r = Readiness::default();
        assert_eq!(r.phase(), Phase::Starting);
        r.set(Phase::Ready);
        assert_eq!(r.clone().phase(), Phase::Ready);
        r.set(Phase::Draining);
        assert_eq!(r.phase(), Phase::Draining);
    }
}
