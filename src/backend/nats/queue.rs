//! The JetStream queue: one durable pull consumer on the events stream,
//! shared by every replica. Each replica runs one fetcher that pulls
//! deliveries only while it has local permits for them, and hands them to
//! its workers; a worker acks each event after every sink published it,
//! or naks it for redelivery (a sink error, up to `max_deliver`). A
//! delivery that is never acknowledged (the replica died) comes back after
//! `ack_wait`, to any replica.
//!
//! Pushing is nothing: the store's write already queued the event, so the
//! ingest request's permit is released on the publish ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{Consumer, pull};
use async_nats::jetstream::message::Acker;
use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use opentelemetry::trace::SpanContext;
use tokio_util::sync::CancellationToken;

use super::codec;
use crate::pipeline::{
    Acknowledge, Attempt, Backpressure, CHUNK_EVENTS, Delivery, Permit, Queue, QueueError,
    QueuedEvents, Verdict,
};
use crate::store::{Record, event_footprint};
use crate::telemetry;

/// Most deliveries one pull asks for.
const FETCH_MAX: usize = 256;
/// How long one pull waits for deliveries before asking again.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// How long past its expiry a pull is waited for.
const FETCH_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed pull (NATS unreachable, say).
const FETCH_RETRY: Duration = Duration::from_millis(250);

/// The queue of one replica: what its fetcher pulled, for its workers.
#[derive(Debug)]
pub struct NatsQueue {
    receiver: async_channel::Receiver<QueuedEvents>,
    /// Events pulled and not yet taken by a worker.
    waiting: Arc<AtomicUsize>,
    /// Stops the fetcher: shutdown stops pulling, and the workers finish
    /// what was pulled.
    stop: CancellationToken,
}

impl NatsQueue {
    /// Starts fetching from `consumer`, each delivery holding a permit of
    /// `backpressure` until it is acknowledged.
    pub(super) fn start(
        consumer: Consumer<pull::Config>,
        backpressure: Backpressure,
        max_deliver: i64,
        ack_wait: Duration,
        workers: usize,
        redeliveries: metrics::Counter,
    ) -> Arc<Self> {
        let (sender, receiver) = async_channel::bounded(workers.max(1) * 4);
        let waiting = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let fetcher = Fetcher {
            consumer,
            backpressure,
            max_deliver,
            ack_wait,
            sender,
            waiting: Arc::clone(&waiting),
            redeliveries,
        };
        tokio::spawn(fetcher.run(stop.clone()));
        Arc::new(Self {
            receiver,
            waiting,
            stop,
        })
    }

    fn taken(&self, item: QueuedEvents) -> QueuedEvents {
        self.waiting
            .fetch_sub(item.records.len(), Ordering::Relaxed);
        item
    }
}

#[async_trait]
impl Queue for NatsQueue {
    async fn push(&self, item: QueuedEvents) -> Result<(), (QueueError, Box<QueuedEvents>)> {
        // Already in the events stream; dropping the item releases the
        // ingest permit.
        drop(item);
        Ok(())
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
    }

    fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Acknowledges one item's deliveries; each with the delay before its
/// redelivery should it be retried.
struct Acks(Vec<(Acker, Duration)>);

impl std::fmt::Debug for Acks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Acks({} deliveries)", self.0.len())
    }
}

#[async_trait]
impl Acknowledge for Acks {
    async fn settle(self: Box<Self>, verdicts: &[Verdict]) {
        for (index, (acker, delay)) in self.0.into_iter().enumerate() {
            let kind = match verdicts.get(index) {
                Some(Verdict::Retry) => AckKind::Nak(Some(delay)),
                _ => AckKind::Ack,
            };
            if let Err(error) = acker.ack_with(kind).await {
                // Not acknowledged: it comes back after `ack_wait`, and the
                // worker then finds it processed.
                tracing::warn!(%error, "acknowledging a delivery failed");
            }
        }
    }
}

struct Fetcher {
    consumer: Consumer<pull::Config>,
    backpressure: Backpressure,
    max_deliver: i64,
    ack_wait: Duration,
    sender: async_channel::Sender<QueuedEvents>,
    waiting: Arc<AtomicUsize>,
    /// `eventflow_nats_redeliveries_total`.
    redeliveries: metrics::Counter,
}

/// Deliveries pulled together, before they are queued as one item.
#[derive(Default)]
struct Pulled {
    records: Vec<Arc<Record>>,
    attempts: Vec<Attempt>,
    ackers: Vec<(Acker, Duration)>,
    bytes: usize,
    /// The span of a traced event (which is then alone in its item).
    span: Option<tracing::Span>,
}

/// One delivery, read.
struct Pull {
    record: Record,
    attempt: Attempt,
    acker: Acker,
    /// How long to wait before delivering it again, should it be retried.
    retry_after: Duration,
    /// The ingest span's context, when the request was traced.
    parent: Option<SpanContext>,
}

impl Fetcher {
    async fn run(self, stop: CancellationToken) {
        loop {
            // Room for a pull's worth first, so that what this replica holds
            // stays within its permits (bytes are charged as events arrive).
            let mut room = tokio::select! {
                () = stop.cancelled() => break,
                room = self.backpressure.acquire(FETCH_MAX, 0) => room,
            };
            let pull = self
                .consumer
                .batch()
                .max_messages(FETCH_MAX)
                .expires(FETCH_EXPIRES)
                .messages();
            let batch = tokio::select! {
                () = stop.cancelled() => break,
                batch = tokio::time::timeout(FETCH_EXPIRES + FETCH_GRACE, pull) => batch,
            };
            let mut batch = match batch {
                Ok(Ok(batch)) => batch,
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
            let mut pulled = Pulled::default();
            let mut failed = false;
            loop {
                // What has arrived goes to the workers at once; the pull
                // itself may run on until it expires.
                let next = if pulled.records.is_empty() {
                    // A pull whose server end was lost (its consumer's
                    // leader moved to another node) would never end: it is
                    // given up a little after it should have expired.
                    tokio::select! {
                        () = stop.cancelled() => None,
                        () = tokio::time::sleep(FETCH_EXPIRES + FETCH_GRACE) => None,
                        next = batch.next() => next,
                    }
                } else {
                    match batch.next().now_or_never() {
                        Some(next) => next,
                        None => {
                            self.queue(std::mem::take(&mut pulled), &mut room).await;
                            continue;
                        }
                    }
                };
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        // No consumer leader for a moment (a cluster node
                        // lost), say: ask again shortly, not at once.
                        tracing::debug!(%error, "a pull ended with an error");
                        failed = true;
                        break;
                    }
                    None => break,
                };
                tracing::trace!("delivery pulled");
                let Some(mut pull) = self.read(message) else {
                    continue;
                };
                if let Some(parent) = pull.parent.take() {
                    // A traced event is processed alone, in its trace.
                    self.queue(std::mem::take(&mut pulled), &mut room).await;
                    let span = tracing::info_span!("deliver", messaging.system = "nats");
                    telemetry::set_parent_context(&span, parent);
                    let mut traced = Pulled {
                        span: Some(span),
                        ..Pulled::default()
                    };
                    traced.add(pull);
                    self.queue(traced, &mut room).await;
                    continue;
                }
                pulled.add(pull);
                if pulled.records.len() == CHUNK_EVENTS {
                    self.queue(std::mem::take(&mut pulled), &mut room).await;
                }
            }
            self.queue(pulled, &mut room).await;
            // Unused room goes back as `room` drops.
            drop(room);
            if failed {
                tokio::time::sleep(FETCH_RETRY).await;
            }
        }
        // Ends the queue once the workers have taken what was pulled.
        self.sender.close();
        tracing::debug!("stopped fetching deliveries");
    }

    /// Reads a delivery; one that is not an event is ended (`Term`).
    fn read(&self, message: async_nats::jetstream::Message) -> Option<Pull> {
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
        let headers = message.headers.as_ref();
        match codec::decode_record(sequence, headers, &message.payload, None) {
            Ok(record) => Some(Pull {
                record,
                attempt: Attempt {
                    redelivered: delivered > 1,
                    retryable: delivered < self.max_deliver,
                },
                acker,
                retry_after: retry_delay(delivered, self.ack_wait),
                parent: codec::traceparent(headers).and_then(telemetry::parent_from_traceparent),
            }),
            Err(error) => {
                tracing::error!(%error, "ending a delivery that is not an event");
                tokio::spawn(async move {
                    let _ = acker.ack_with(AckKind::Term).await;
                });
                None
            }
        }
    }

    /// Hands pulled deliveries to the workers as one item, with their share
    /// of `room` and a permit for their bytes.
    async fn queue(&self, pulled: Pulled, room: &mut Permit) {
        let Pulled {
            records,
            attempts,
            ackers,
            bytes,
            span,
        } = pulled;
        let events = records.len();
        if events == 0 {
            return;
        }
        let mut permit = self.backpressure.acquire(0, bytes).await;
        // A pull brings at most the room it asked for.
        if let Some(slots) = room.split(events, 0) {
            permit.merge(slots);
        }
        self.waiting.fetch_add(events, Ordering::Relaxed);
        let item = QueuedEvents {
            records,
            delivery: Delivery {
                attempts,
                acknowledge: Some(Box::new(Acks(ackers))),
            },
            permit,
            enqueued_at: Instant::now(),
            span: span.unwrap_or_else(tracing::Span::none),
        };
        if self.sender.send(item).await.is_err() {
            // No workers (shutdown): another replica gets these after
            // `ack_wait`.
            self.waiting.fetch_sub(events, Ordering::Relaxed);
        }
    }
}

/// The delay before the next delivery of an event that could not be
/// published on its `delivered`th delivery: 1 s, doubling, at most
/// `ack_wait`. A sink or JetStream that fails for a moment (a cluster
/// electing a leader) is waited out rather than used up in a burst of
/// redeliveries.
fn retry_delay(delivered: i64, ack_wait: Duration) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(1u64 << doublings).min(ack_wait)
}

impl Pulled {
    fn add(&mut self, pull: Pull) {
        self.bytes += event_footprint(&pull.record.event);
        self.records.push(Arc::new(pull.record));
        self.attempts.push(pull.attempt);
        self.ackers.push((pull.acker, pull.retry_after));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_the_ack_wait() {
        let ack_wait = Duration::from_secs(30);
        let delays: Vec<u64> = (1..=7)
            .map(|n| retry_delay(n, ack_wait).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(retry_delay(i64::MAX, ack_wait), ack_wait);
    }
}
