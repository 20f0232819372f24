//! The live feed behind `GET /events/stream`.
//!
//! A `tokio::sync::broadcast` channel: sending never waits, and a
//! subscriber that falls more than the channel's capacity behind is told
//! how many it missed (a `lagged` event) instead of slowing the pipeline.
//!
//! The channel keeps its last [`STREAM_CAPACITY`] messages whatever their
//! size, so long lines are not kept in it: a message then names the event,
//! and subscribers render it from the store. The feed's memory is thus at
//! most [`STREAM_CAPACITY`] × [`INLINE_LINE_MAX`] (32 MiB), not a multiple
//! of the largest payload.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::event::EventId;

/// Messages a subscriber can fall behind before it lags.
pub(super) const STREAM_CAPACITY: usize = 4096;

/// Longest published line kept in the feed itself.
pub const INLINE_LINE_MAX: usize = 8 * 1024;

/// A published event's JSON line, as the feed carries it.
#[derive(Debug, Clone)]
pub enum StreamLine {
    /// The line itself.
    Inline(Arc<str>),
    /// A line longer than [`INLINE_LINE_MAX`]: the event to render from the store.
    Stored(EventId),
}

impl StreamLine {
    /// The line when it is short enough to carry, else the event's id.
    pub fn of(line: &str, id: &EventId) -> Self {
        if line.len() <= INLINE_LINE_MAX {
            Self::Inline(Arc::from(line))
        } else {
            Self::Stored(id.clone())
        }
    }
}

/// One published event on the live feed.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    /// Arrival sequence (the SSE `id:`).
    pub sequence: u64,
    /// Publication order; used to stitch replay and live feed together.
    pub publish_seq: u64,
    /// The published event as JSON.
    pub line: StreamLine,
}

/// Fan-out of published events to live subscribers.
#[derive(Debug, Clone)]
pub struct EventBroadcast {
    sender: broadcast::Sender<Arc<StreamMessage>>,
}

impl Default for EventBroadcast {
    fn default() -> Self {
        Self::new(STREAM_CAPACITY)
    }
}

impl EventBroadcast {
    /// A feed where subscribers may fall `capacity` messages behind.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self { sender }
    }

    /// Sends to current subscribers; never waits.
    pub fn send(&self, message: StreamMessage) {
        // An error only means nobody is subscribed.
        let _ = self.sender.send(Arc::new(message));
    }

    /// Whether anyone is listening (lets workers skip building messages).
    pub fn has_subscribers(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// A new subscription, starting with the next message sent.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StreamMessage>> {
        self.sender.subscribe()
    }

    /// Current number of subscribers.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }
}
