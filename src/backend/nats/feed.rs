//! The JetStream feed: the published stream. Its stream sequence is the
//! publication sequence (gap-free, the same on every replica); a
//! publication's subject is its event's arrival sequence, written once
//! (`Nats-Expected-Last-Subject-Sequence: 0`), so that a chunk delivered
//! twice (its ack lost, its replica frozen past `ack_wait`) publishes each
//! event once.
//!
//! Readers use the reader connection: a subscriber is an ordered consumer
//! that asks for a few messages at a time, and only when it has sent what
//! it had, so one that does not read holds little and makes the server
//! send nothing. While a request waits for publication (`?wait=published`),
//! the replica follows the stream's head (headers only), so that the wait
//! wakes when any replica publishes; with no one waiting it follows
//! nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{self};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Nats;
use super::codec;
use super::publisher::{Ack, Fast, Outgoing};
use crate::feed::{Feed, FeedError, FeedItem, FeedLine, Published, Subscription};

/// Most items a subscriber takes at once.
const READ_BATCH: usize = 256;
/// Messages one subscriber's pull asks for at most.
const SUBSCRIBER_PULL: i64 = 32;
/// Pause before following the stream again after an error.
const RETRY: Duration = Duration::from_secs(1);

/// The published-events feed on JetStream.
#[derive(Debug)]
pub struct NatsFeed {
    nats: Arc<Nats>,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    /// The highest publication sequence seen (bumped on outcome changes too).
    changes: watch::Sender<u64>,
    /// Wakes the follower when someone starts watching `changes`.
    watched: tokio::sync::Notify,
    subscribers: AtomicUsize,
}

impl Shared {
    fn seen(&self, sequence: u64) {
        self.changes.send_if_modified(|head| {
            let newer = sequence > *head;
            if newer {
                *head = sequence;
            }
            newer
        });
    }
}

impl NatsFeed {
    /// A feed whose follower starts once the backend is set up.
    pub(super) fn new(nats: Arc<Nats>) -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            nats,
            shared: Arc::new(Shared {
                changes,
                watched: tokio::sync::Notify::new(),
                subscribers: AtomicUsize::new(0),
            }),
            stop: CancellationToken::new(),
        }
    }

    /// Starts following the stream's head from `last_sequence`.
    pub(super) fn start(&self, last_sequence: u64) {
        self.shared.seen(last_sequence);
        tokio::spawn(follow(
            self.nats.published_read.clone(),
            Arc::clone(&self.shared),
            self.stop.clone(),
        ));
    }

    /// The publications of `events`: each on its arrival sequence's
    /// subject, which must hold nothing yet, so that an acceptance is
    /// published once whoever delivers it.
    fn outgoing(&self, events: &[Published<'_>]) -> Vec<Outgoing> {
        let nats = &self.nats;
        events
            .iter()
            .map(|event| {
                let mut headers = nats.expect_new.clone();
                codec::add_processed(
                    &mut headers,
                    event.processing.worker,
                    event.processing.processed_at,
                );
                codec::add_attempts(&mut headers, nats.attempts.of(event.sequence));
                if let Some(span) = event.span {
                    codec::add_span(&mut headers, span);
                }
                Outgoing {
                    subject: nats.subjects.published_event(event.sequence),
                    headers,
                    payload: Bytes::copy_from_slice(event.line.as_bytes()),
                }
            })
            .collect()
    }
}

impl Drop for NatsFeed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps `shared.changes` at the stream's head while someone watches it.
async fn follow(published: Stream<()>, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        if shared.changes.receiver_count() == 0 {
            tokio::select! {
                () = stop.cancelled() => return,
                () = shared.watched.notified() => {}
                // Watchers that came and went without a wake-up are
                // noticed here.
                () = tokio::time::sleep(RETRY) => continue,
            }
        }
        // New publications only: a waiter looks at the store itself first.
        let config = pull::OrderedConfig {
            headers_only: true,
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        };
        let messages = async { published.create_consumer(config).await?.messages().await };
        let mut messages = tokio::select! {
            () = stop.cancelled() => return,
            messages = messages => match messages {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::debug!(%error, "following the published stream failed");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            },
        };
        while shared.changes.receiver_count() > 0 {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = messages.next() => next,
                () = tokio::time::sleep(RETRY) => continue,
            };
            match next {
                Some(Ok(message)) => {
                    if let Ok(info) = message.info() {
                        shared.seen(info.stream_sequence);
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "following the published stream failed");
                    tokio::time::sleep(RETRY).await;
                    break;
                }
                None => break,
            }
        }
    }
}

#[async_trait]
impl Feed for NatsFeed {
    async fn append(&self, events: &[Published<'_>]) -> Result<(), FeedError> {
        let nats = &self.nats;
        let started = std::time::Instant::now();
        // A pass's publications go as one fast-ingest batch; when one was
        // refused (published before: a chunk delivered again) or the batch
        // broke off, the set goes again one by one, each message's ack
        // saying whether it is stored or was already.
        if events.len() > 1 && nats.publish.takes_fast_batches() {
            match nats
                .publish
                .publish_fast(self.outgoing(events), nats.deadline)
                .await
            {
                Ok(Fast::Stored(head)) => {
                    self.shared.seen(head);
                    return Ok(());
                }
                Ok(Fast::Incomplete(why)) => {
                    tracing::debug!(%why, "publishing a pass one by one");
                }
                Err(error) => return Err(FeedError(error.to_string())),
            }
        }
        let remaining = nats.deadline.saturating_sub(started.elapsed());
        let acks = nats
            .publish
            .publish(self.outgoing(events), remaining)
            .await
            .map_err(|error| FeedError(error.to_string()))?;
        let mut failure = None;
        let mut head = 0;
        for ack in acks {
            match ack {
                Ack::Stored(sequence) => head = head.max(sequence),
                // Published before (a chunk delivered again).
                Ack::Taken => {}
                Ack::Refused(why) => failure = Some(why),
            }
        }
        self.shared.seen(head);
        match failure {
            None => Ok(()),
            Some(error) => Err(FeedError(error)),
        }
    }

    fn outcomes_changed(&self) {
        self.shared.changes.send_modify(|_| {});
    }

    fn head(&self) -> u64 {
        *self.shared.changes.borrow()
    }

    fn subscribe(&self, after: Option<u64>, max_bytes: usize) -> Box<dyn Subscription> {
        self.shared.subscribers.fetch_add(1, Ordering::Relaxed);
        // What the client fetches ahead, besides what a read holds: async-nats
        // asks for another pull when half of one is left, so up to one and a
        // half pulls. A pull must take the longest message, or it would be
        // refused for good.
        let read_bytes = max_bytes / 2;
        let pull_bytes = (max_bytes / 4).max(self.nats.largest_message);
        Box::new(NatsSubscription {
            read_bytes,
            pull_bytes,
            held: None,
            published: self.nats.published_read.clone(),
            shared: Arc::clone(&self.shared),
            // New ones only: from what this replica knows is the head now
            // (an event published just before may be replayed, never missed).
            next: after.unwrap_or_else(|| self.head()).saturating_add(1),
            messages: None,
        })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        let receiver = self.shared.changes.subscribe();
        self.shared.watched.notify_one();
        receiver
    }

    fn subscribers(&self) -> usize {
        self.shared.subscribers.load(Ordering::Relaxed)
    }
}

/// A reader of the published stream.
struct NatsSubscription {
    published: Stream<()>,
    /// Most bytes one read holds.
    read_bytes: usize,
    /// Most bytes one pull asks for.
    pull_bytes: usize,
    /// A message taken that did not fit the last read: the next one's first.
    held: Option<jetstream::Message>,
    shared: Arc<Shared>,
    /// The publication sequence expected next.
    next: u64,
    messages: Option<pull::Ordered>,
}

impl std::fmt::Debug for NatsSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSubscription")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        self.shared.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An ordered consumer of `published` from publication sequence `next` on,
/// pulling a few messages at a time.
async fn open(
    published: Stream<()>,
    next: u64,
    pull_bytes: usize,
) -> Result<pull::Ordered, String> {
    let config = pull::OrderedConfig {
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: next,
        },
        max_batch: SUBSCRIBER_PULL,
        max_bytes: i64::try_from(pull_bytes).unwrap_or(i64::MAX),
        ..Default::default()
    };
    let consumer = published
        .create_consumer(config)
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

impl NatsSubscription {
    /// The item for a message, after a `lagged` item for what it skips.
    fn items(&mut self, message: &jetstream::Message, items: &mut Vec<FeedItem>) {
        let Ok(info) = message.info() else { return };
        let sequence = info.stream_sequence;
        if sequence > self.next {
            // Dropped from the history before this reader got to them.
            items.push(FeedItem::Lagged {
                from: self.next,
                to: sequence - 1,
            });
        }
        self.next = sequence + 1;
        items.push(FeedItem::Event {
            publish_seq: sequence,
            line: FeedLine::Json(Arc::from(String::from_utf8_lossy(&message.payload))),
        });
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next(&mut self) -> Option<Vec<FeedItem>> {
        loop {
            let mut messages = match self.messages.take() {
                Some(messages) => messages,
                None => match open(self.published.clone(), self.next, self.pull_bytes).await {
                    // It starts at `next`: a message held back comes again.
                    Ok(messages) => {
                        self.held = None;
                        messages
                    }
                    Err(error) => {
                        tracing::debug!(%error, "subscribing to the published stream failed");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                },
            };
            let first = match self.held.take() {
                Some(message) => message,
                None => match messages.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "reading the published stream failed");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                    None => continue,
                },
            };
            let mut items = Vec::new();
            let mut held = first.payload.len();
            self.items(&first, &mut items);
            while items.len() < READ_BATCH {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => {
                        held = held.saturating_add(message.payload.len());
                        if held > self.read_bytes {
                            self.held = Some(message);
                            break;
                        }
                        self.items(&message, &mut items);
                    }
                    _ => break,
                }
            }
            self.messages = Some(messages);
            return Some(items);
        }
    }
}
