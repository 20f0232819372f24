//! The JetStream queue: the backlog stream and one durable pull consumer on
//! it, shared by every replica.
//!
//! Pushing writes the item's events as one chunk message (more when they
//! would pass the server's `max_payload`), so a batch request's 64-event
//! chunk costs one write, one delivery and one ack. Each replica runs one
//! fetcher that pulls chunks only while it has local permits for them and
//! hands them to its workers; a worker acks a chunk once every sink
//! published its events, or naks it for redelivery (a sink error, up to
//! `max_deliver`: its published events are then skipped by the fence on
//! the published stream). While a replica holds a chunk it reports it in
//! progress every third of `ack_wait`, so `ack_wait` can be short: a dead
//! replica's chunks come back within it, slow work is never taken away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{Consumer, pull};
use async_nats::jetstream::message::Acker;
use async_trait::async_trait;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Nats;
use super::codec;
use super::publisher::{Ack, Outgoing};
use crate::queue::{
    Acknowledge, Attempt, Backpressure, Delivery, Queue, QueueError, QueuedEvents, Verdict,
};
use crate::store::event_footprint;
use crate::telemetry;

/// Most chunks one pull request asks for: many small ones (single events
/// joined under load) flow without a round trip each...
const FETCH_MAX: usize = 256;
/// ...and few large ones (a chunk holds up to 256 events), by bytes.
const FETCH_MAX_BYTES: usize = 1024 * 1024;
/// Events a replica holds pulled and not yet taken by a worker, per
/// worker: a full pass waiting for each, and no more, so that a backlog is
/// shared among the replicas rather than held by the first to pull.
const WAITING_PER_WORKER: usize = 2048;
/// How long one pull waits for deliveries before asking again.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// How long past its expiry a pull is waited for.
const FETCH_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed pull (NATS unreachable, say).
const FETCH_RETRY: Duration = Duration::from_millis(250);
/// Largest chunk body: a few hundred KiB keeps a delivery's work short,
/// whatever the server's `max_payload`.
const CHUNK_BODY_MAX: usize = 512 * 1024;

/// The queue of one replica: chunks it writes, and what its fetcher pulled
/// for its workers.
#[derive(Debug)]
pub struct NatsQueue {
    nats: Arc<Nats>,
    /// To the backlog writer (group commit of pushes into chunks).
    writes: tokio::sync::mpsc::Sender<Write>,
    sender: async_channel::Sender<QueuedEvents>,
    receiver: async_channel::Receiver<QueuedEvents>,
    /// Events pulled and not yet taken by a worker.
    waiting: Arc<Waiting>,
    /// Stops the fetcher: shutdown stops pulling, and the workers finish
    /// what was pulled.
    stop: CancellationToken,
    backpressure: Backpressure,
    max_deliver: i64,
    /// `eventflow_nats_redeliveries_total`.
    redeliveries: metrics::Counter,
}

impl NatsQueue {
    /// A queue whose fetcher starts once the backend is set up
    /// ([`Self::start`]).
    pub(super) fn new(
        nats: Arc<Nats>,
        backpressure: Backpressure,
        workers: usize,
        max_deliver: i64,
        redeliveries: metrics::Counter,
    ) -> Arc<Self> {
        // Room for each worker to take a full pass (four chunks of up to 256
        // events): in nats mode a pass waits on JetStream's acks, so passes
        // must be large to keep up; what is held here is not another
        // replica's to take.
        // Bounded by the events it holds (`Waiting`), not by chunks.
        let (sender, receiver) = async_channel::bounded(workers.max(1) * WAITING_PER_WORKER);
        let (writes, written) = tokio::sync::mpsc::channel(WRITES_WAITING);
        tokio::spawn(write_backlog(Arc::clone(&nats), written));
        Arc::new(Self {
            nats,
            writes,
            sender,
            receiver,
            waiting: Arc::new(Waiting::new(workers.max(1) * WAITING_PER_WORKER)),
            stop: CancellationToken::new(),
            backpressure,
            max_deliver,
            redeliveries,
        })
    }

    /// Starts fetching from `consumer`, each chunk holding permits of the
    /// backpressure for its events until it is acknowledged.
    pub(super) fn start(&self, consumer: Consumer<pull::Config>, ack_wait: Duration) {
        let held = Arc::new(Held::default());
        tokio::spawn(report_progress(
            Arc::clone(&held),
            ack_wait,
            self.stop.clone(),
        ));
        let fetcher = Fetcher {
            nats: Arc::clone(&self.nats),
            consumer,
            backpressure: self.backpressure.clone(),
            max_deliver: self.max_deliver,
            sender: self.sender.clone(),
            waiting: Arc::clone(&self.waiting),
            redeliveries: self.redeliveries.clone(),
            held,
        };
        tokio::spawn(fetcher.run(self.stop.clone()));
    }

    fn taken(&self, item: QueuedEvents) -> QueuedEvents {
        self.waiting.taken(item.records.len());
        item
    }

    /// Writes `item`'s events to the backlog: joined with whatever other
    /// pushes wait meanwhile into one chunk (see [`write_backlog`]).
    async fn write(&self, item: &QueuedEvents) -> Result<(), QueueError> {
        if let Some(why) = self.nats.unavailable() {
            return Err(QueueError::Unavailable(why));
        }
        let traceparent = telemetry::traceparent_of(&item.span);
        let limit = self.nats.max_body().min(CHUNK_BODY_MAX);
        let events = item.records.iter().enumerate().map(|(index, record)| {
            (
                &**record,
                item.delivery.attempt(index).redelivered,
                self.nats.attempts.of(record.sequence),
            )
        });
        let pieces = codec::entries(events, traceparent.as_deref(), limit);
        let (done, written) = tokio::sync::oneshot::channel();
        let write = Write {
            pieces,
            alone: traceparent.is_some(),
            done: Arc::new(Pending::new(done)),
        };
        let closed = || QueueError::Unavailable("the backlog writer stopped".to_owned());
        self.writes.send(write).await.map_err(|_| closed())?;
        written.await.unwrap_or_else(|_| Err(closed()))
    }
}

/// Pushes waiting for the backlog writer at most.
const WRITES_WAITING: usize = 4096;
/// Chunks written and not yet acknowledged at once: the pushes that come
/// while they are in flight join the next one.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Most events one chunk joins from several pushes.
const CHUNK_EVENTS_MAX: usize = 256;

/// One push for the backlog writer: its events as chunk entries.
struct Write {
    pieces: Vec<codec::Entries>,
    /// A traced request's events travel alone, so that the delivery's span
    /// continues that request's trace.
    alone: bool,
    done: Arc<Pending>,
}

/// A push's chunks not yet acknowledged, and its answer once they all are.
struct Pending {
    chunks: AtomicUsize,
    error: Mutex<Option<QueueError>>,
    done: Mutex<Option<tokio::sync::oneshot::Sender<Result<(), QueueError>>>>,
}

impl Pending {
    fn new(done: tokio::sync::oneshot::Sender<Result<(), QueueError>>) -> Self {
        Self {
            chunks: AtomicUsize::new(0),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
        }
    }

    /// One of its chunks was written (or not).
    fn settle(&self, result: &Result<(), QueueError>) {
        if let Err(error) = result {
            self.error.lock().get_or_insert_with(|| error.clone());
        }
        if self.chunks.fetch_sub(1, Ordering::AcqRel) == 1 {
            let answer = self.error.lock().take().map_or(Ok(()), Err);
            if let Some(done) = self.done.lock().take() {
                let _ = done.send(answer);
            }
        }
    }
}

/// A chunk being put together: its pieces and the pushes they came from.
#[derive(Default)]
struct Joining<'a> {
    pieces: Vec<&'a codec::Entries>,
    events: usize,
    bytes: usize,
    pushes: Vec<Arc<Pending>>,
}

/// Writes pushes to the backlog, joining those that wait meanwhile into one
/// chunk (a group commit): under load, single-event requests share a chunk
/// and its write, delivery and ack instead of paying for one each; alone,
/// a push is written at once. Acks are awaited apart, so the next chunk is
/// put together while the last one is written.
async fn write_backlog(nats: Arc<Nats>, mut writes: tokio::sync::mpsc::Receiver<Write>) {
    let subject = async_nats::Subject::from(nats.subjects.backlog());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(CHUNKS_IN_FLIGHT));
    while let Some(first) = writes.recv().await {
        // Room first: while the chunks in flight are written, the pushes
        // that arrive meanwhile wait to join this one.
        let Ok(room) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let mut room = Some(room);
        let limit = nats.max_body().min(CHUNK_BODY_MAX);
        let mut batch = vec![first];
        let mut bytes: usize = batch[0].pieces.iter().map(|p| p.body.len()).sum();
        while bytes < limit {
            let Ok(more) = writes.try_recv() else { break };
            bytes += more.pieces.iter().map(|p| p.body.len()).sum::<usize>();
            batch.push(more);
        }
        let mut chunks: Vec<Joining<'_>> = Vec::new();
        for write in &batch {
            for (index, piece) in write.pieces.iter().enumerate() {
                // A traced request's first piece starts a chunk of its own.
                let fits = !(write.alone && index == 0)
                    && chunks.last().is_some_and(|chunk| {
                        chunk.events + piece.events <= CHUNK_EVENTS_MAX
                            && chunk.bytes + piece.body.len() + 3 <= limit
                    });
                if !fits {
                    chunks.push(Joining::default());
                }
                let Some(chunk) = chunks.last_mut() else {
                    continue;
                };
                chunk.pieces.push(piece);
                chunk.events += piece.events;
                chunk.bytes += piece.body.len() + 1;
                if !chunk.pushes.iter().any(|p| Arc::ptr_eq(p, &write.done)) {
                    write.done.chunks.fetch_add(1, Ordering::AcqRel);
                    chunk.pushes.push(Arc::clone(&write.done));
                }
            }
            if write.pieces.is_empty() {
                // Nothing to write (no event encoded): done at once.
                write.done.chunks.fetch_add(1, Ordering::AcqRel);
                write.done.settle(&Ok(()));
            }
            if write.alone {
                // Nothing else joins a traced request's chunk.
                chunks.push(Joining::default());
            }
        }
        for chunk in chunks.into_iter().filter(|chunk| chunk.events > 0) {
            let held = match room.take() {
                Some(held) => held,
                None => match Arc::clone(&in_flight).acquire_owned().await {
                    Ok(held) => held,
                    Err(_) => return,
                },
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(codec::EVENTS, itoa::Buffer::new().format(chunk.events));
            let outgoing = Outgoing {
                subject: subject.clone(),
                headers,
                payload: codec::chunk(chunk.pieces.iter().copied()),
            };
            let pushes = chunk.pushes;
            let nats = Arc::clone(&nats);
            tokio::spawn(async move {
                let result = match nats.ingest.publish(vec![outgoing], nats.deadline).await {
                    Ok(acks) => match acks.into_iter().next() {
                        Some(Ack::Stored(_)) => Ok(()),
                        Some(Ack::Refused(why)) => Err(refusal(why)),
                        Some(Ack::Taken) | None => {
                            Err(QueueError::Unavailable("no answer".to_owned()))
                        }
                    },
                    Err(error) => Err(QueueError::Unavailable(error.to_string())),
                };
                drop(held);
                for push in pushes {
                    push.settle(&result);
                }
            });
        }
    }
}

/// What a refused backlog write means.
fn refusal(why: String) -> QueueError {
    // JetStream's answer when a `discard: new` stream is at a limit.
    if why.contains("maximum") {
        QueueError::Full
    } else {
        QueueError::Unavailable(why)
    }
}

#[async_trait]
impl Queue for NatsQueue {
    async fn push(&self, item: QueuedEvents) -> Result<(), (QueueError, Box<QueuedEvents>)> {
        // Once in the backlog, dropping the item releases the ingest permit:
        // the delivery takes a permit of its own.
        match self.write(&item).await {
            Ok(()) => Ok(()),
            Err(error) => Err((error, Box::new(item))),
        }
    }

    async fn pop(&self) -> Option<QueuedEvents> {
        let item = self.receiver.recv().await.ok()?;
        Some(self.taken(item))
    }

    fn try_pop(&self) -> Option<QueuedEvents> {
        let item = self.receiver.try_recv().ok()?;
        Some(self.taken(item))
    }

    fn close(&self) {
        self.stop.cancel();
        // Not started (NATS never came): nothing was pulled, nothing to drain.
        if self.sender.receiver_count() > 0 && self.sender.sender_count() == 1 {
            self.sender.close();
        }
    }

    fn len(&self) -> usize {
        self.waiting.events.load(Ordering::Relaxed)
    }
}

/// Events pulled and not yet taken by a worker, and room for more.
#[derive(Debug)]
struct Waiting {
    events: AtomicUsize,
    room: tokio::sync::Semaphore,
}

impl Waiting {
    fn new(room: usize) -> Self {
        Self {
            events: AtomicUsize::new(0),
            room: tokio::sync::Semaphore::new(room),
        }
    }

    /// Waits for room for `events` more (a chunk larger than the room gets
    /// all of it), and counts them.
    async fn hold(&self, events: usize) {
        let wanted = u32::try_from(events).unwrap_or(u32::MAX).max(1);
        if let Ok(permit) = self.room.acquire_many(wanted).await {
            permit.forget();
        }
        self.events.fetch_add(events, Ordering::Relaxed);
    }

    /// `events` were taken by a worker (or dropped).
    fn taken(&self, events: usize) {
        self.events.fetch_sub(events, Ordering::Relaxed);
        self.room
            .add_permits(u32::try_from(events).unwrap_or(u32::MAX).max(1) as usize);
    }
}

/// The deliveries this replica holds, reported in progress now and then.
#[derive(Default)]
struct Held {
    next: AtomicU64,
    ackers: Mutex<HashMap<u64, Arc<Acker>>>,
}

impl Held {
    fn hold(&self, acker: Acker) -> (u64, Arc<Acker>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let acker = Arc::new(acker);
        self.ackers.lock().insert(key, Arc::clone(&acker));
        (key, acker)
    }

    fn release(&self, key: u64) {
        self.ackers.lock().remove(&key);
    }
}

/// Tells JetStream every third of `ack_wait` that the held deliveries are
/// in progress, so that only a dead replica's come back.
async fn report_progress(held: Arc<Held>, ack_wait: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval((ack_wait / 3).max(Duration::from_millis(100)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => {
                // Still held while the workers finish them.
                if held.ackers.lock().is_empty() {
                    return;
                }
                tokio::select! {
                    _ = every.tick() => {}
                    () = tokio::time::sleep(Duration::from_secs(30)) => return,
                }
            }
        }
        let ackers: Vec<Arc<Acker>> = held.ackers.lock().values().cloned().collect();
        for acker in ackers {
            // Fire and forget: a lost one is made up for by the next.
            let _ = acker.ack_with(AckKind::Progress).await;
        }
    }
}

/// Acknowledges one chunk.
struct Acks {
    acker: Arc<Acker>,
    key: u64,
    held: Arc<Held>,
    /// The delay before its redelivery, should it be retried.
    retry_after: Duration,
}

impl std::fmt::Debug for Acks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Acks(delivery {})", self.key)
    }
}

#[async_trait]
impl Acknowledge for Acks {
    async fn settle(self: Box<Self>, verdicts: &[Verdict]) {
        self.held.release(self.key);
        // One ack for the chunk: delivered again if any of its events is to
        // be retried (the published ones are then skipped).
        let kind = if verdicts.contains(&Verdict::Retry) {
            AckKind::Nak(Some(self.retry_after))
        } else {
            AckKind::Ack
        };
        if let Err(error) = self.acker.ack_with(kind).await {
            // Not acknowledged: it comes back after `ack_wait`, and the
            // worker then finds its events published.
            tracing::warn!(%error, "acknowledging a delivery failed");
        }
    }
}

struct Fetcher {
    nats: Arc<Nats>,
    consumer: Consumer<pull::Config>,
    backpressure: Backpressure,
    max_deliver: i64,
    sender: async_channel::Sender<QueuedEvents>,
    waiting: Arc<Waiting>,
    /// `eventflow_nats_redeliveries_total`.
    redeliveries: metrics::Counter,
    held: Arc<Held>,
}

impl Fetcher {
    async fn run(self, stop: CancellationToken) {
        'pull: loop {
            // One continuous pull: the client asks for the next chunks while
            // these are being taken, so deliveries never wait for a round
            // trip; it asks for more only as this loop takes what came, and
            // this loop takes nothing it has no permit for.
            let messages = self
                .consumer
                .stream()
                .max_messages_per_batch(FETCH_MAX)
                .max_bytes_per_batch(FETCH_MAX_BYTES)
                .expires(FETCH_EXPIRES)
                .heartbeat(FETCH_EXPIRES / 2)
                .messages();
            let messages = tokio::select! {
                () = stop.cancelled() => break,
                messages = tokio::time::timeout(FETCH_EXPIRES + FETCH_GRACE, messages) => messages,
            };
            let mut messages = match messages {
                Ok(Ok(messages)) => messages,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "pulling deliveries failed");
                    tokio::time::sleep(FETCH_RETRY).await;
                    continue;
                }
                Err(_) => {
                    tracing::debug!("a pull request was not answered; pulling again");
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => {
                        hand_back(&mut messages).await;
                        break 'pull;
                    }
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        if let Some(item) = self.read(message).await {
                            let events = item.records.len();
                            self.waiting.hold(events).await;
                            if self.sender.send(item).await.is_err() {
                                // No workers (shutdown): another replica gets
                                // it after `ack_wait`.
                                self.waiting.taken(events);
                            }
                        }
                    }
                    Some(Err(error)) => {
                        // No consumer leader for a moment (a cluster node
                        // lost), a missed heartbeat: pull afresh, shortly.
                        tracing::debug!(%error, "pulling deliveries failed");
                        tokio::time::sleep(FETCH_RETRY).await;
                        continue 'pull;
                    }
                    None => continue 'pull,
                }
            }
        }
        // Ends the queue once the workers have taken what was pulled.
        self.sender.close();
        tracing::debug!("stopped fetching deliveries");
    }

    /// Reads a chunk into a queue item once there is room for its events
    /// (a permit); one that is not a chunk is ended (`Term`).
    async fn read(&self, message: async_nats::jetstream::Message) -> Option<QueuedEvents> {
        let (sequence, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(error) => {
                tracing::warn!(%error, "a delivery without metadata");
                return None;
            }
        };
        if delivered > 1 {
            self.redeliveries.increment(1);
        }
        let (message, acker) = message.split();
        let queued = match codec::decode_chunk(sequence, &message.payload) {
            Ok(queued) if !queued.is_empty() => queued,
            Ok(_) => {
                let _ = acker.ack().await;
                return None;
            }
            Err(error) => {
                tracing::error!(%error, "ending a delivery that is not a chunk of events");
                let _ = acker.ack_with(AckKind::Term).await;
                return None;
            }
        };
        let (key, acker) = self.held.hold(acker);
        let span =
            match codec::chunk_traceparent(&queued).and_then(telemetry::parent_from_traceparent) {
                Some(parent) => {
                    let span = tracing::debug_span!(
                        telemetry::DELIVERY_SPAN,
                        otel.kind = "consumer",
                        messaging.system = "nats",
                    );
                    telemetry::set_parent_context(&span, parent);
                    span
                }
                None => tracing::Span::none(),
            };
        let mut records = Vec::with_capacity(queued.len());
        let mut attempts = Vec::with_capacity(queued.len());
        let mut bytes = 0;
        for queued in queued {
            bytes += event_footprint(&queued.record.event);
            // Its publication or failure says how many times it was queued.
            self.nats
                .attempts
                .note(queued.record.sequence, queued.attempts);
            attempts.push(Attempt {
                redelivered: delivered > 1 || queued.requeued,
                retryable: delivered < self.max_deliver,
            });
            records.push(Arc::new(queued.record));
        }
        let permit = self.backpressure.acquire(records.len(), bytes).await;
        Some(QueuedEvents {
            records,
            delivery: Delivery {
                attempts,
                acknowledge: Some(Box::new(Acks {
                    acker,
                    key,
                    held: Arc::clone(&self.held),
                    retry_after: retry_delay(delivered),
                })),
            },
            permit,
            enqueued_at: Instant::now(),
            span,
        })
    }
}

/// Naks what the pull brings that this replica will not take (it stops),
/// so that another replica gets it within a second rather than after
/// `ack_wait`: what has arrived, and what the pull requests still open
/// deliver until they expire.
async fn hand_back(messages: &mut pull::Stream) {
    let mut handed_back = 0;
    let until = tokio::time::Instant::now() + FETCH_EXPIRES;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until, messages.next()).await {
        // Delayed, or it would come straight back to this pull.
        if message
            .ack_with(AckKind::Nak(Some(FETCH_EXPIRES)))
            .await
            .is_ok()
        {
            handed_back += 1;
        }
    }
    if handed_back > 0 {
        tracing::info!(
            deliveries = handed_back,
            "handed back deliveries not started"
        );
    }
}

/// Longest wait before a chunk that could not be published is delivered again.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The delay before the next delivery of a chunk that could not be
/// published on its `delivered`th delivery: 1 s, doubling, at most
/// [`RETRY_MAX`]. A sink or JetStream that fails for a moment (a cluster
/// electing a leader) is waited out rather than used up in a burst of
/// redeliveries.
fn retry_delay(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(1u64 << doublings).min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_half_a_minute() {
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(retry_delay(i64::MAX), RETRY_MAX);
    }
}
