//! The JetStream store: the events stream is both the idempotency record
//! and the queue.
//!
//! Accepting an event is one write: a publish to `<prefix>.events.<key>`
//! that the stream takes only if that subject holds nothing yet
//! (`Nats-Expected-Last-Subject-Sequence: 0`), so the first writer wins
//! atomically whichever replica it reached; the stream sequence is the
//! arrival sequence. The outcome of a published event is its message on
//! the published stream (written by the feed); a failed one's is a message
//! on the failed stream. Reads ask JetStream (direct gets), so every
//! replica answers the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use async_nats::Client;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use async_nats::jetstream::{self};
use async_trait::async_trait;
use bytes::Bytes;

use super::codec::{self, Subjects};
use crate::event::{Event, EventId};
use crate::store::{CompleteWith, Insert, Outcome, Page, PageQuery, Record, Store, StoreError};
use crate::telemetry;
use crate::time::UnixNanos;
use crate::trace_id::TraceId;

/// Most stream messages one page request reads (a status filter may skip
/// many): the page then ends early with a cursor to go on from.
const PAGE_SCAN_MAX: usize = 10_000;

/// Accepted events, their outcomes and the reads of them, in JetStream.
#[derive(Debug)]
pub struct NatsStore {
    pub(super) client: Client,
    pub(super) js: jetstream::Context,
    pub(super) events: Stream,
    pub(super) published: Stream,
    pub(super) failed: Stream,
    pub(super) subjects: Subjects,
    /// Messages in the events stream, as last read by the upkeep task.
    pub(super) held: Arc<AtomicU64>,
    /// `eventflow_nats_publish_ack_seconds`.
    pub(super) ack_latency: metrics::Histogram,
}

impl NatsStore {
    /// What an ack error means for the event.
    fn refusal(error: &jetstream::context::PublishError) -> StoreError {
        let text = error.to_string();
        // JetStream's answer when a `discard: new` stream is at a limit.
        if text.contains("maximum") {
            StoreError::Full
        } else {
            StoreError::Unavailable(text)
        }
    }

    /// The stored event whose id is `id`, if the events stream holds it.
    async fn stored(&self, id: &EventId) -> Result<Option<Record>, StoreError> {
        match self
            .events
            .direct_get_last_for_subject(self.subjects.event(id))
            .await
        {
            Ok(message) => Ok(codec::decode_record(
                message.sequence,
                Some(&message.headers),
                &message.payload,
            )
            .map_err(|error| tracing::warn!(%error, "skipping a message"))
            .ok()),
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(StoreError::Unavailable(error.to_string())),
        }
    }

    /// An accepted event's outcome as JetStream holds it.
    async fn lookup_outcome(&self, id: &EventId) -> Option<Outcome> {
        if let Ok(message) = self
            .published
            .direct_get_last_for_subject(self.subjects.published_event(id))
            .await
        {
            return codec::processed_outcome(Some(&message.headers));
        }
        let message = self
            .failed
            .direct_get_last_for_subject(self.subjects.failed_event(id))
            .await
            .ok()?;
        Some(Outcome::Failed {
            error: String::from_utf8_lossy(&message.payload).into(),
        })
    }

    /// An accepted event as a reader sees it: with its outcome.
    async fn with_outcome(&self, record: Record) -> Arc<Record> {
        match self.lookup_outcome(&record.event.id).await {
            Some(outcome) => Arc::new(Record::with_outcome(
                record.event,
                record.sequence,
                record.received_at,
                record.trace_id,
                Some(outcome),
            )),
            None => Arc::new(record),
        }
    }

    /// A retry: the same content, or a conflict.
    async fn existing(&self, event: &Event) -> Result<Insert, StoreError> {
        let Some(stored) = self.stored(&event.id).await? else {
            // Held a moment ago and gone now (aged out): let the client retry.
            return Err(StoreError::Unavailable(format!(
                "event `{}` was being replaced; retry",
                event.id
            )));
        };
        let stored = self.with_outcome(stored).await;
        Ok(if stored.same_content(event) {
            Insert::Duplicate(stored)
        } else {
            Insert::Conflict(stored)
        })
    }
}

#[async_trait]
impl Store for NatsStore {
    async fn insert(
        &self,
        event: Event,
        received_at: SystemTime,
        trace_id: TraceId,
    ) -> Result<Insert, StoreError> {
        let mut results = self.insert_batch(vec![event], received_at, trace_id).await;
        results
            .pop()
            .unwrap_or_else(|| Err(StoreError::Unavailable("no answer".into())))
    }

    async fn insert_batch(
        &self,
        events: Vec<Event>,
        received_at: SystemTime,
        trace_id: TraceId,
    ) -> Vec<Result<Insert, StoreError>> {
        if let Some(why) = crate::nats::unreachable(&self.client) {
            return events
                .iter()
                .map(|_| Err(StoreError::Unavailable(why.clone())))
                .collect();
        }
        let received = UnixNanos::from(received_at);
        let traceparent = telemetry::traceparent_of(&tracing::Span::current());
        let started = Instant::now();
        // Every publish is sent before any ack is awaited: one round trip
        // for the batch, not one per event.
        let mut sent = Vec::with_capacity(events.len());
        for event in &events {
            let (headers, body) =
                codec::event_message(event, received, trace_id, traceparent.as_deref());
            let publish = PublishMessage::build()
                .payload(body)
                .headers(headers)
                .expected_last_subject_sequence(0);
            sent.push(
                self.js
                    .send_publish(self.subjects.event(&event.id), publish)
                    .await,
            );
        }
        let mut results = Vec::with_capacity(events.len());
        for (event, sent) in events.into_iter().zip(sent) {
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(error) => Err(error),
            };
            results.push(match acked {
                Ok(ack) => Ok(Insert::Inserted(Arc::new(Record::new(
                    event,
                    ack.sequence,
                    received_at,
                    trace_id,
                )))),
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    self.existing(&event).await
                }
                Err(error) => Err(Self::refusal(&error)),
            });
        }
        self.ack_latency.record(started.elapsed().as_secs_f64());
        results
    }

    async fn get(&self, id: &EventId) -> Option<Arc<Record>> {
        let record = self.stored(id).await.ok()??;
        Some(self.with_outcome(record).await)
    }

    async fn outcome(&self, record: &Record) -> Option<Outcome> {
        if let Some(outcome) = record.outcome() {
            return Some(outcome.clone());
        }
        self.lookup_outcome(&record.event.id).await
    }

    fn unavailable(&self) -> Option<String> {
        crate::nats::unreachable(&self.client)
    }

    async fn get_by_sequence(&self, sequence: u64) -> Option<Arc<Record>> {
        let message = self.events.direct_get(sequence).await.ok()?;
        let record =
            codec::decode_record(message.sequence, Some(&message.headers), &message.payload)
                .ok()?;
        Some(self.with_outcome(record).await)
    }

    async fn remove(&self, _record: &Record) {
        // Never needed: the events stream is the queue, so an event it
        // stored is queued.
    }

    async fn complete(&self, record: &Record, outcome: CompleteWith) -> bool {
        match outcome {
            // Its message on the published stream (the feed) is the record.
            CompleteWith::Processed(_) => true,
            CompleteWith::Failed(error) => {
                let subject = self.subjects.failed_event(&record.event.id);
                let published = match self.js.publish(subject, Bytes::from(error)).await {
                    Ok(ack) => ack.await.map(drop),
                    Err(error) => Err(error),
                };
                if let Err(error) = published {
                    tracing::error!(event.id = %record.event.id, %error, "could not record a failed event");
                }
                true
            }
        }
    }

    async fn page(&self, query: PageQuery) -> Page {
        let mut records = Vec::new();
        let mut next_sequence = query.after.saturating_add(1);
        let mut scanned = 0;
        let filter = self.subjects.events();
        let mut exhausted = false;
        while records.len() < query.limit && scanned < PAGE_SCAN_MAX {
            let message = match self
                .events
                .direct_get_next_for_subject(filter.as_str(), Some(next_sequence))
                .await
            {
                Ok(message) => message,
                Err(error) => {
                    if error.kind() != DirectGetErrorKind::NotFound {
                        tracing::warn!(%error, "reading a page of events failed");
                    }
                    exhausted = true;
                    break;
                }
            };
            scanned += 1;
            next_sequence = message.sequence + 1;
            let Ok(record) =
                codec::decode_record(message.sequence, Some(&message.headers), &message.payload)
            else {
                continue;
            };
            let record = self.with_outcome(record).await;
            if query.status.is_none_or(|status| record.status() == status) {
                records.push(record);
            }
        }
        Page {
            next: (!exhausted).then(|| next_sequence - 1),
            records,
        }
    }

    fn len(&self) -> usize {
        usize::try_from(self.held.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    fn evictions(&self) -> u64 {
        // JetStream ages events out by `backend.nats.max_age`; it does not
        // evict to make room (a full stream refuses new events).
        0
    }
}
