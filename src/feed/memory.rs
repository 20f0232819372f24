//! The in-process feed.
//!
//! Two bounded rings under one lock, both indexed by publication sequence:
//! the arrival sequence of each publication (8 bytes each, as many as the
//! store holds records: `store.max_events`), and the JSON lines of the most
//! recent [`LINE_WINDOW`] publications, kept only while someone subscribes
//! and only for lines up to [`INLINE_LINE_MAX`]. A subscriber reads lines
//! from the window, and anything older from the store by arrival sequence,
//! rendering it itself; what the store no longer holds is reported as a
//! `lagged` range. So a slow subscriber costs the pipeline nothing (it only
//! moves its own cursor), and the feed's memory is bounded whatever the
//! subscribers do: at most `LINE_WINDOW × INLINE_LINE_MAX` (32 MiB) of lines.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{Feed, FeedError, FeedItem, FeedLine, INLINE_LINE_MAX, Published, Subscription};
use crate::store::Store;
use crate::time::UnixNanos;
use crate::trace_id::SpanRef;

/// Publications whose lines are kept for subscribers.
pub const LINE_WINDOW: usize = 4096;

/// Most items a subscriber takes per hold of the lock.
const READ_BATCH: usize = 256;

/// The feed of one process.
#[derive(Debug, Clone)]
pub struct MemoryFeed {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped (to the head) on every append and outcome change.
    changes: watch::Sender<u64>,
    /// Where subscribers render the events whose lines are not kept.
    store: Arc<dyn Store>,
    subscribers: AtomicUsize,
}

#[derive(Debug)]
struct State {
    /// `index[i]` is the arrival sequence of publication `first + i`.
    index: VecDeque<u64>,
    /// `published_at[i]`: when publication `first + i` was appended (what a
    /// named subscription's `since` is compared with).
    published_at: VecDeque<UnixNanos>,
    /// The exported span that processed each traced publication still
    /// indexed, by publication sequence (empty while traces are not exported).
    spans: HashMap<u64, SpanRef>,
    /// Publication sequence of `index[0]`.
    first: u64,
    /// Most publications `index` holds.
    capacity: usize,
    /// Lines of the last `lines.len()` publications, up to the head (`None`:
    /// not kept: nobody subscribed then, or too long).
    lines: VecDeque<Option<Arc<str>>>,
}

impl State {
    fn head(&self) -> u64 {
        self.first + self.index.len() as u64 - 1
    }

    /// Publication sequence of `lines[0]`.
    fn lines_first(&self) -> u64 {
        self.head() + 1 - self.lines.len() as u64
    }
}

/// One read of the feed, before lines that were not kept are looked up.
enum Read {
    Line(u64, Arc<str>),
    Lookup(u64, u64),
    Lagged(u64, u64),
}

impl Read {
    /// The first publication sequence it covers.
    fn first(&self) -> u64 {
        match self {
            Self::Line(first, _) | Self::Lookup(first, _) | Self::Lagged(first, _) => *first,
        }
    }
}

impl MemoryFeed {
    /// An empty feed indexing up to `capacity` publications, reading older
    /// lines from `store`.
    pub fn new(store: Arc<dyn Store>, capacity: usize) -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    index: VecDeque::new(),
                    published_at: VecDeque::new(),
                    spans: HashMap::new(),
                    first: 1,
                    capacity: capacity.max(1),
                    lines: VecDeque::new(),
                }),
                changes,
                store,
                subscribers: AtomicUsize::new(0),
            }),
        }
    }

    /// The publications after `after`, at most `max` of them, under one
    /// hold of the lock: the arrival sequences of those still held, from
    /// `first` on (publications between `after` and `first` were dropped).
    pub fn arrivals_after(&self, after: u64, max: usize) -> Arrivals {
        let state = self.shared.state.lock();
        let first = (after + 1).max(state.first);
        let skip = usize::try_from(first - state.first).unwrap_or(usize::MAX);
        Arrivals {
            first,
            arrivals: state.index.iter().skip(skip).take(max).copied().collect(),
        }
    }

    /// The exported span that processed each of these publications, if
    /// any; `None` when no publication held has one (traces not exported).
    pub fn spans(&self, publish_seqs: &[u64]) -> Option<Vec<Option<SpanRef>>> {
        let state = self.shared.state.lock();
        if state.spans.is_empty() {
            return None;
        }
        Some(
            publish_seqs
                .iter()
                .map(|seq| state.spans.get(seq).copied())
                .collect(),
        )
    }

    /// The first publication sequence still held, and the head.
    pub fn bounds(&self) -> (u64, u64) {
        let state = self.shared.state.lock();
        (state.first, state.head())
    }

    /// The last publication sequence appended before `time` (0: none, or
    /// only ones no longer held).
    pub fn last_before(&self, time: UnixNanos) -> u64 {
        let state = self.shared.state.lock();
        let before = state.published_at.partition_point(|&at| at < time);
        state.first + before as u64 - 1
    }
}

/// Publications read from a [`MemoryFeed`]'s index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrivals {
    /// The publication sequence of the first of `arrivals`.
    pub first: u64,
    /// The arrival sequences of publications `first`, `first + 1`, … (the
    /// store holds each record while it holds it).
    pub arrivals: Vec<u64>,
}

#[async_trait]
impl Feed for MemoryFeed {
    async fn append(&self, events: &[Published<'_>]) -> Result<(), FeedError> {
        if events.is_empty() {
            return Ok(());
        }
        // Lines are copied only for subscribers, and before the lock.
        let keep = self.shared.subscribers.load(Ordering::Relaxed) > 0;
        let lines: Vec<Option<Arc<str>>> = events
            .iter()
            .map(|e| (keep && e.line.len() <= INLINE_LINE_MAX).then(|| Arc::from(e.line)))
            .collect();
        let head = {
            let mut state = self.shared.state.lock();
            // Read under the lock, so that times go up with the sequence.
            let now = UnixNanos::now();
            for (event, line) in events.iter().zip(lines) {
                if state.index.len() == state.capacity {
                    state.index.pop_front();
                    state.published_at.pop_front();
                    if !state.spans.is_empty() {
                        let dropped = state.first;
                        state.spans.remove(&dropped);
                    }
                    state.first += 1;
                }
                state.index.push_back(event.sequence);
                state.published_at.push_back(now);
                if let Some(span) = event.span {
                    let publish_seq = state.first + state.index.len() as u64 - 1;
                    state.spans.insert(publish_seq, span);
                }
                if state.lines.len() == LINE_WINDOW {
                    state.lines.pop_front();
                }
                state.lines.push_back(line);
            }
            state.head()
        };
        self.shared.changes.send_replace(head);
        Ok(())
    }

    fn outcomes_changed(&self) {
        self.shared.changes.send_modify(|_| {});
    }

    fn head(&self) -> u64 {
        self.shared.state.lock().head()
    }

    fn subscribe(&self, after: Option<u64>, max_bytes: usize) -> Box<dyn Subscription> {
        // Counted first, so that appends from here on keep their lines.
        self.shared.subscribers.fetch_add(1, Ordering::Relaxed);
        let changes = self.shared.changes.subscribe();
        let state = self.shared.state.lock();
        let head = state.head();
        let cursor = match after {
            None => head,
            // Past the head: an id from before a restart (sequences start
            // again at 1). Everything held is new to this reader.
            Some(after) if after > head => state.first - 1,
            Some(after) => after,
        };
        drop(state);
        Box::new(MemorySubscription {
            shared: Arc::clone(&self.shared),
            cursor,
            changes,
            max_bytes,
        })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    fn subscribers(&self) -> usize {
        self.shared.subscribers.load(Ordering::Relaxed)
    }
}

/// A reader of a [`MemoryFeed`]: only its cursor.
#[derive(Debug)]
struct MemorySubscription {
    shared: Arc<Shared>,
    /// The last publication sequence read.
    cursor: u64,
    changes: watch::Receiver<u64>,
    /// Most bytes one read holds.
    max_bytes: usize,
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.shared.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl MemorySubscription {
    /// Up to [`READ_BATCH`] publications after the cursor, moving it.
    fn read(&mut self) -> Vec<Read> {
        let state = self.shared.state.lock();
        let head = state.head();
        let mut next = self.cursor + 1;
        let mut reads = Vec::new();
        if next <= head && next < state.first {
            reads.push(Read::Lagged(next, state.first - 1));
            next = state.first;
        }
        let lines_first = state.lines_first();
        while next <= head && reads.len() < READ_BATCH {
            let line = next
                .checked_sub(lines_first)
                .and_then(|i| state.lines.get(usize::try_from(i).ok()?))
                .cloned()
                .flatten();
            let position = usize::try_from(next - state.first).unwrap_or(usize::MAX);
            reads.push(match (line, state.index.get(position)) {
                (Some(line), _) => Read::Line(next, line),
                (None, Some(&arrival)) => Read::Lookup(next, arrival),
                (None, None) => Read::Lagged(next, next),
            });
            next += 1;
        }
        self.cursor = next - 1;
        reads
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Vec<FeedItem>> {
        loop {
            // Seen before looking: an append after the look wakes the wait.
            self.changes.borrow_and_update();
            let reads = self.read();
            if !reads.is_empty() {
                let mut items: Vec<FeedItem> = Vec::with_capacity(reads.len());
                let mut held = 0usize;
                for read in reads {
                    let first = read.first();
                    let item = match read {
                        Read::Line(publish_seq, line) => FeedItem::Event {
                            publish_seq,
                            line: FeedLine::Json(line),
                        },
                        Read::Lookup(publish_seq, arrival) => {
                            match self.shared.store.get_by_sequence(arrival).await {
                                Some(record) => FeedItem::Event {
                                    publish_seq,
                                    line: FeedLine::Stored(record),
                                },
                                // Evicted from the store since.
                                None => FeedItem::Lagged {
                                    from: publish_seq,
                                    to: publish_seq,
                                },
                            }
                        }
                        Read::Lagged(from, to) => FeedItem::Lagged { from, to },
                    };
                    held = held.saturating_add(item.held_bytes());
                    if held > self.max_bytes && !items.is_empty() {
                        // The rest is read again next time.
                        self.cursor = first - 1;
                        break;
                    }
                    // Neighbouring gaps are one notice.
                    if let (
                        FeedItem::Lagged { to, .. },
                        Some(FeedItem::Lagged { to: last_to, .. }),
                    ) = (&item, items.last_mut())
                    {
                        *last_to = *to;
                        continue;
                    }
                    items.push(item);
                }
                return Some(items);
            }
            if self.changes.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests;
