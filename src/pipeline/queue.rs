//! The queue between ingest and the workers.
//!
//! Bounded by the backpressure permits each item carries, so a push never
//! has to wait. Closing the queue is how shutdown drains: workers keep
//! popping until it is closed *and* empty.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::backpressure::Permit;
use crate::store::Record;

/// An accepted event on its way to a worker.
#[derive(Debug)]
pub struct QueuedEvent {
    /// The stored record.
    pub record: Arc<Record>,
    /// Its place in the pipeline; released after publication.
    pub permit: Permit,
    /// When it was queued (for `queue_wait_ms`).
    pub enqueued_at: Instant,
    /// The ingest span, so processing lands in the request's trace.
    pub span: tracing::Span,
}

/// Why an event could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue is closed: the service is shutting down.
    #[error("queue is closed")]
    Closed,
    /// The queue is full (cannot happen while permits bound it).
    #[error("queue is full")]
    Full,
}

/// A multi-producer, multi-consumer queue of accepted events.
#[async_trait]
pub trait Queue: Send + Sync + std::fmt::Debug {
    /// Adds an event without waiting.
    async fn push(&self, item: QueuedEvent) -> Result<(), (QueueError, Box<QueuedEvent>)>;
    /// The next event, or `None` once the queue is closed and empty.
    async fn pop(&self) -> Option<QueuedEvent>;
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
#[derive(Debug, Clone)]
pub struct MemoryQueue {
    sender: async_channel::Sender<QueuedEvent>,
    receiver: async_channel::Receiver<QueuedEvent>,
}

impl MemoryQueue {
    /// A queue holding at most `capacity` events.
    pub fn new(capacity: usize) -> Arc<Self> {
        let (sender, receiver) = async_channel::bounded(capacity.max(1));
        Arc::new(Self { sender, receiver })
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn push(&self, item: QueuedEvent) -> Result<(), (QueueError, Box<QueuedEvent>)> {
        self.sender.try_send(item).map_err(|err| match err {
            async_channel::TrySendError::Full(item) => (QueueError::Full, Box::new(item)),
            async_channel::TrySendError::Closed(item) => (QueueError::Closed, Box::new(item)),
        })
    }

    async fn pop(&self) -> Option<QueuedEvent> {
        self.receiver.recv().await.ok()
    }

    fn close(&self) {
        self.sender.close();
    }

    fn len(&self) -> usize {
        self.receiver.len()
    }
}
