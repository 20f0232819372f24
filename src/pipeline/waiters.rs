//! Requests waiting for their event to be published (`?wait=published`).
//!
//! Workers check an atomic count before touching the map, so the common
//! case (nobody waiting) costs one relaxed load per event.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering, fence};

use dashmap::DashMap;
use tokio::sync::oneshot;

use super::Pipeline;
use crate::event::PublishedEvent;

/// What a waiting request learns.
pub type WaitOutcome = Result<Arc<PublishedEvent>, String>;

/// A request's wait for its event to be published. Dropping it (the
/// request timed out, or its client went away) gives the registration up.
#[derive(Debug)]
pub struct PublishedWait {
    receiver: oneshot::Receiver<WaitOutcome>,
    sequence: u64,
    pipeline: Pipeline,
}

impl PublishedWait {
    pub(super) fn new(pipeline: &Pipeline, sequence: u64) -> Self {
        let receiver = pipeline.inner.waiters.register(sequence);
        // Orders the registration before the caller's look at the outcome;
        // see [`Waiters::any`].
        fence(Ordering::SeqCst);
        Self {
            receiver,
            sequence,
            pipeline: pipeline.clone(),
        }
    }

    /// How processing ended, or `None` when `deadline` came first.
    pub async fn until(mut self, deadline: tokio::time::Instant) -> Option<WaitOutcome> {
        match tokio::time::timeout_at(deadline, &mut self.receiver).await {
            Ok(Ok(outcome)) => Some(outcome),
            Ok(Err(_)) => Some(Err("the worker stopped".into())),
            Err(_) => None,
        }
    }
}

impl Drop for PublishedWait {
    fn drop(&mut self) {
        self.receiver.close();
        self.pipeline.inner.waiters.cancel(self.sequence);
    }
}

/// Pending `?wait=published` requests keyed by arrival sequence. An event
/// can have several (the first request and its retries).
#[derive(Debug, Default)]
pub(super) struct Waiters {
    waiting: DashMap<u64, Vec<oneshot::Sender<WaitOutcome>>>,
    /// Sequences with at least one waiter.
    count: AtomicUsize,
}

impl Waiters {
    /// Registers interest in `sequence`.
    pub(super) fn register(&self, sequence: u64) -> oneshot::Receiver<WaitOutcome> {
        let (sender, receiver) = oneshot::channel();
        let mut senders = self.waiting.entry(sequence).or_default();
        if senders.is_empty() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        senders.push(sender);
        receiver
    }

    /// Forgets the waiters of `sequence` that gave up (closed their receiver).
    pub(super) fn cancel(&self, sequence: u64) {
        let removed = self
            .waiting
            .remove_if_mut(&sequence, |_, senders| {
                senders.retain(|sender| !sender.is_closed());
                senders.is_empty()
            })
            .is_some();
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether anyone waits, asked once by a worker that has just set the
    /// outcomes of the events it will then [`notify`](Self::notify) about.
    ///
    /// A waiter registers, then looks at the outcome; a worker sets the
    /// outcome, then looks for waiters. The two fences (here and in
    /// [`PublishedWait::new`]) make at least one side see the other's
    /// write, so that a waiter is never left to time out on an event that
    /// was published.
    pub(super) fn any(&self) -> bool {
        fence(Ordering::SeqCst);
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Tells the waiters for `sequence`, if any, how processing ended (after
    /// [`any`](Self::any) said someone waits).
    pub(super) fn notify(&self, sequence: u64, outcome: impl FnOnce() -> WaitOutcome) {
        if let Some((_, senders)) = self.waiting.remove(&sequence) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            let outcome = outcome();
            for sender in senders {
                // A requester may have timed out meanwhile; nothing to do then.
                let _ = sender.send(outcome.clone());
            }
        }
    }

    /// Sequences with a waiter.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_waiter_of_an_event_learns_its_outcome() {
        let waiters = Waiters::default();
        let mut first = waiters.register(7);
        let mut retry = waiters.register(7);
        waiters.notify(7, || Err("failed".into()));
        assert_eq!(first.try_recv().unwrap(), Err("failed".to_string()));
        assert_eq!(retry.try_recv().unwrap(), Err("failed".to_string()));
        assert_eq!(waiters.len(), 0);
    }

    #[test]
    fn cancel_forgets_only_waiters_that_gave_up() {
        let waiters = Waiters::default();
        let gave_up = waiters.register(3);
        let mut still_waiting = waiters.register(3);
        drop(gave_up);
        waiters.cancel(3);
        assert_eq!(waiters.len(), 1);
        waiters.notify(3, || Err("done".into()));
        assert!(still_waiting.try_recv().is_ok());
        drop(still_waiting);
        let last = waiters.register(4);
        drop(last);
        waiters.cancel(4);
        assert_eq!(waiters.len(), 0);
        assert_eq!(waiters.count.load(Ordering::Relaxed), 0);
    }
}
