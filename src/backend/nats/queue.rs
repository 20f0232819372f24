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
    Acknowledge, Attempt, Backpressure, CHUNK_EVENTS, Delivery, Queue, QueueError, QueuedEvents,
    Verdict,
};
use crate::store::{Record, event_footprint};
use crate::telemetry;

/// Most deliveries one pull request asks for (also what this replica may
/// hold beyond its permits).
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
        'pull: loop {
            // One continuous pull: the client asks for the next batch while
            // this one is being taken, so deliveries never wait for a round
            // trip; it asks for more only as this loop takes what came, and
            // this loop takes nothing it has no permit for.
            let messages = self
                .consumer
                .stream()
                .max_messages_per_batch(FETCH_MAX)
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
                let mut pulled = Pulled::default();
                // Wait for a first delivery, then take whatever else has
                // arrived, up to an item's worth.
                let mut next = tokio::select! {
                    () = stop.cancelled() => {
                        hand_back(&mut messages).await;
                        break 'pull;
                    }
                    next = messages.next() => next,
                };
                loop {
                    let message = match next {
                        Some(Ok(message)) => message,
                        Some(Err(error)) => {
                            // No consumer leader for a moment (a cluster
                            // node lost), a missed heartbeat: pull afresh,
                            // shortly.
                            tracing::debug!(%error, "pulling deliveries failed");
                            self.queue(pulled).await;
                            tokio::time::sleep(FETCH_RETRY).await;
                            continue 'pull;
                        }
                        None => {
                            self.queue(pulled).await;
                            continue 'pull;
                        }
                    };
                    tracing::trace!("delivery pulled");
                    if let Some(mut pull) = self.read(message) {
                        if let Some(parent) = pull.parent.take() {
                            // A traced event is processed alone, in its trace.
                            self.queue(std::mem::take(&mut pulled)).await;
                            let span = tracing::debug_span!(
                                telemetry::DELIVERY_SPAN,
                                otel.kind = "consumer",
                                messaging.system = "nats",
                            );
                            telemetry::set_parent_context(&span, parent);
                            let mut traced = Pulled {
                                span: Some(span),
                                ..Pulled::default()
                            };
                            traced.add(pull);
                            self.queue(traced).await;
                        } else {
                            pulled.add(pull);
                        }
                    }
                    if pulled.records.len() == CHUNK_EVENTS {
                        break;
                    }
                    match messages.next().now_or_never() {
                        Some(more) => next = more,
                        None => break,
                    }
                }
                self.queue(pulled).await;
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
        match codec::decode_record(sequence, headers, &message.payload) {
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

    /// Hands pulled deliveries to the workers as one item, once there is
    /// room for them (a permit).
    async fn queue(&self, pulled: Pulled) {
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
        let permit = self.backpressure.acquire(events, bytes).await;
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
