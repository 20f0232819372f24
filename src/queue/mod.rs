//! The queue between ingest and the workers, and the permits that bound
//! it: the seam both backends implement ([`MemoryQueue`] here, the
//! JetStream queue in [`crate::backend`]) and the pipeline uses.
//!
//! Bounded by the backpressure permits each item carries, so a push never
//! has to wait. Closing the queue is how shutdown drains: workers keep
//! popping until it is closed *and* empty.
//!
//! An item is data a durable log could carry (the records: event, arrival
//! sequence, trace id) with the local resources beside it (the permit, the
//! ingest span, the enqueue instant) and a [`Delivery`]: how the worker
//! acknowledges each event once every sink has published it, or asks for it
//! again. In memory the acknowledgement is nothing; a JetStream queue acks
//! or naks the messages.
//!
//! An item is a chunk of events accepted together: one for a single
//! ingest, up to [`CHUNK_EVENTS`] (and about [`CHUNK_BYTES`]) of a batch
//! request. Handing a worker a
//! chunk costs one queue operation, one permit release and one sink write
//! for all its events.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_trait::async_trait;

mod backpressure;

use crate::store::Record;
pub use backpressure::{Backpressure, Overloaded, Permit};

/// Most events a batch request puts in one queue item. Small enough that
/// the workers share a big batch, large enough that per-item costs vanish.
pub const CHUNK_EVENTS: usize = 64;

/// Most bytes of events (their footprint) in one queue item of a batch,
/// beyond its first event: a worker takes an item whole, so this bounds
/// what a pass of large events renders.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Accepted events (at least one, in arrival order) on their way to a worker.
#[derive(Debug)]
pub struct QueuedEvents {
    /// The stored records.
    pub records: Vec<Arc<Record>>,
    /// How they are acknowledged.
    pub delivery: Delivery,
    /// Their place in the pipeline; released after publication.
    pub permit: Permit,
    /// When they were queued (for `queue_wait_ms`).
    pub enqueued_at: Instant,
    /// The ingest span, so processing lands in the request's trace.
    pub span: tracing::Span,
}

/// Which delivery of an event a worker holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempt {
    /// Delivered before: it may have been published already (the worker
    /// checks the store before publishing it again).
    pub redelivered: bool,
    /// A sink error may be retried by delivering it again (otherwise the
    /// event fails at once).
    pub retryable: bool,
}

/// What became of one delivered event, as the worker tells the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Done with it: published, or failed for good (its outcome is stored).
    Done,
    /// Not published this time: deliver it again.
    Retry,
}

/// Acknowledges the events of one queue item.
#[async_trait]
pub trait Acknowledge: Send + Sync + std::fmt::Debug {
    /// Settles each event, in the item's order (`verdicts` has one per record).
    async fn settle(self: Box<Self>, verdicts: &[Verdict]);
}

/// The acknowledgement side of a queue item.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Per event, in order; empty: each is a first and only attempt.
    pub attempts: Vec<Attempt>,
    /// `None`: nothing to acknowledge (an in-process queue).
    pub acknowledge: Option<Box<dyn Acknowledge>>,
}

impl Delivery {
    /// The attempt of the `index`th event.
    pub fn attempt(&self, index: usize) -> Attempt {
        self.attempts.get(index).copied().unwrap_or_default()
    }

    /// Settles the item's events.
    pub async fn settle(self, verdicts: &[Verdict]) {
        if let Some(acknowledge) = self.acknowledge {
            acknowledge.settle(verdicts).await;
        }
    }
}

/// Why an event could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue is closed: the service is shutting down.
    #[error("queue is closed")]
    Closed,
    /// The queue is full (in memory, cannot happen while permits bound it;
    /// a shared backlog can be full of other replicas' events).
    #[error("queue is full")]
    Full,
    /// The queue cannot be reached, or did not answer in time.
    #[error("the queue is unavailable: {0}")]
    Unavailable(String),
}

/// A multi-producer, multi-consumer queue of accepted events.
#[async_trait]
pub trait Queue: Send + Sync + std::fmt::Debug {
    /// Adds accepted events without waiting.
    async fn push(&self, item: QueuedEvents) -> Result<(), (QueueError, Box<QueuedEvents>)>;
    /// The next events, or `None` once the queue is closed and empty.
    async fn pop(&self) -> Option<QueuedEvents>;
    /// The next events if some are waiting, without waiting.
    fn try_pop(&self) -> Option<QueuedEvents>;
    /// Refuses further pushes; pops drain what is left.
    fn close(&self);
    /// Events waiting for a worker.
    fn len(&self) -> usize;
    /// Whether no event is waiting.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The in-process queue.
#[derive(Debug)]
pub struct MemoryQueue {
    sender: async_channel::Sender<QueuedEvents>,
    receiver: async_channel::Receiver<QueuedEvents>,
    /// Events in the queued items.
    events: AtomicUsize,
}

impl MemoryQueue {
    /// A queue holding at most `capacity` events (items hold at least one).
    pub fn new(capacity: usize) -> Arc<Self> {
        let (sender, receiver) = async_channel::bounded(capacity.max(1));
        Arc::new(Self {
            sender,
            receiver,
            events: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn push(&self, item: QueuedEvents) -> Result<(), (QueueError, Box<QueuedEvents>)> {
        let events = item.records.len();
        // Counted before it is visible, so that `len` never goes below zero.
        self.events.fetch_add(events, Ordering::Relaxed);
        self.sender.try_send(item).map_err(|err| {
            self.events.fetch_sub(events, Ordering::Relaxed);
            match err {
                async_channel::TrySendError::Full(item) => (QueueError::Full, Box::new(item)),
                async_channel::TrySendError::Closed(item) => (QueueError::Closed, Box::new(item)),
            }
        })
    }

    async fn pop(&self) -> Option<QueuedEvents> {
        let item = self.receiver.recv().await.ok()?;
        self.events.fetch_sub(item.records.len(), Ordering::Relaxed);
        Some(item)
    }

    fn try_pop(&self) -> Option<QueuedEvents> {
        let item = self.receiver.try_recv().ok()?;
        self.events.fetch_sub(item.records.len(), Ordering::Relaxed);
        Some(item)
    }

    fn close(&self) {
        self.sender.close();
    }

    fn len(&self) -> usize {
        self.events.load(Ordering::Relaxed)
    }
}
