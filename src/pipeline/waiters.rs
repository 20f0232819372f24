//! Requests waiting for their event to be published (`?wait=published`).
//!
//! Workers check an atomic count before touching the map, so the common
//! case (nobody waiting) costs one relaxed load per event.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use tokio::sync::oneshot;

use crate::event::PublishedEvent;

/// What a waiting request learns.
pub type WaitOutcome = Result<Arc<PublishedEvent>, String>;

/// Pending `?wait=published` requests keyed by arrival sequence.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    waiting: DashMap<u64, oneshot::Sender<WaitOutcome>>,
    count: AtomicUsize,
}

impl Waiters {
    /// Registers interest in `sequence` before it is queued.
    pub(super) fn register(&self, sequence: u64) -> oneshot::Receiver<WaitOutcome> {
        let (sender, receiver) = oneshot::channel();
        if self.waiting.insert(sequence, sender).is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        receiver
    }

    /// Forgets a waiter that gave up.
    pub(super) fn cancel(&self, sequence: u64) {
        if self.waiting.remove(&sequence).is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Tells the waiter for `sequence`, if any, how processing ended.
    pub(super) fn notify(&self, sequence: u64, outcome: impl FnOnce() -> WaitOutcome) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some((_, sender)) = self.waiting.remove(&sequence) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            // The requester may have timed out meanwhile; nothing to do then.
            let _ = sender.send(outcome());
        }
    }
}
