//! The published-events feed: every event that every sink has written, in
//! publication order, each with its **publication sequence** (1, 2, 3 …, no
//! gaps). It is what `GET /events/stream` serves (replay after a
//! `Last-Event-ID`, then live, as one sequence: no gap and no repeat at the
//! seam) and what `?wait=published` waits on.
//!
//! [`Feed`] is the seam for backends; [`MemoryFeed`] is the one-process
//! implementation.

mod memory;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::event::EventId;
use crate::store::{Processing, Record};

pub use memory::{Arrivals, LINE_WINDOW, MemoryFeed};

/// Longest published line a feed keeps as text; a longer one is rendered
/// again from the store for each subscriber, so that what the feed holds
/// is bounded by its line count times this, not by the largest payload.
pub const INLINE_LINE_MAX: usize = 8 * 1024;

/// An event every sink has published, as a worker hands it to the feed.
#[derive(Debug, Clone, Copy)]
pub struct Published<'a> {
    /// Its arrival sequence (the store's).
    pub sequence: u64,
    /// Its id (a durable feed refuses a second publication of it).
    pub id: &'a EventId,
    /// The facts its line was rendered with (a durable feed keeps them, so
    /// that readers can tell when and by whom it was processed).
    pub processing: Processing,
    /// Its JSON line, without the newline.
    pub line: &'a str,
    /// The exported span that processed it, if any (a subscription's poll
    /// links to it).
    pub span: Option<crate::trace_id::SpanRef>,
}

/// One published event's JSON, as a subscriber gets it.
#[derive(Debug, Clone)]
pub enum FeedLine {
    /// The line itself.
    Json(Arc<str>),
    /// The stored event, for the reader to render (its line was not kept).
    Stored(Arc<Record>),
}

/// What a subscriber reads.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// A published event.
    Event {
        /// Its publication sequence.
        publish_seq: u64,
        /// Its JSON.
        line: FeedLine,
    },
    /// Events `from..=to` were published but are no longer held (the
    /// subscriber fell that far behind, or resumed from that far back).
    Lagged {
        /// The first missing publication sequence.
        from: u64,
        /// The last missing one.
        to: u64,
    },
}

impl FeedItem {
    /// Memory this item holds for its reader, in bytes.
    pub fn held_bytes(&self) -> usize {
        match self {
            Self::Event {
                line: FeedLine::Json(line),
                ..
            } => line.len(),
            Self::Event {
                line: FeedLine::Stored(record),
                ..
            } => record.footprint(),
            Self::Lagged { .. } => 0,
        }
    }
}

/// A reader's place in the feed.
#[async_trait]
pub trait Subscription: Send + fmt::Debug {
    /// The next items in publication order, waiting until there are some;
    /// `None` once the feed is gone. They hold at most the subscription's
    /// `max_bytes` ([`FeedItem::held_bytes`]) between them, unless one
    /// alone holds more: then that one.
    async fn next(&mut self) -> Option<Vec<FeedItem>>;
}

/// Why events could not be appended (nothing is published then: the
/// worker retries them or marks them failed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the published-events feed could not take them: {0}")]
pub struct FeedError(pub String);

/// The published-events feed of one deployment.
#[async_trait]
pub trait Feed: Send + Sync + fmt::Debug {
    /// Appends events every sink has published, in this order; they get
    /// the next publication sequences. An event already on the feed (a
    /// redelivery) is not appended twice. On error, none of them counts as
    /// appended, though some may have been.
    async fn append(&self, events: &[Published<'_>]) -> Result<(), FeedError>;
    /// Wakes whoever waits for outcomes: some events ended without being
    /// published (they failed).
    fn outcomes_changed(&self);
    /// The publication sequence of the most recent event (0: none yet).
    fn head(&self) -> u64;
    /// A subscription to the events published after publication sequence
    /// `after` (replayed from what is still held), then to new ones;
    /// `None`: new ones only. Each read holds at most `max_bytes` (and
    /// what the subscription fetches ahead stays within it too).
    fn subscribe(&self, after: Option<u64>, max_bytes: usize) -> Box<dyn Subscription>;
    /// Changes each time events were appended or outcomes changed (what
    /// `?wait=published` waits on).
    fn changes(&self) -> watch::Receiver<u64>;
    /// Subscriptions open now.
    fn subscribers(&self) -> usize;
}
