//! The JetStream store: the ids stream holds each accepted event's record;
//! its outcome is its message on the published or the failed stream.
//!
//! Accepting an event is one write: a publish to `<prefix>.ids.<key>` that
//! the stream takes only if that subject holds nothing yet
//! (`Nats-Expected-Last-Subject-Sequence: 0`), so the first writer wins
//! atomically whichever replica it reached; the stream sequence is the
//! arrival sequence. The queue's write (the backlog chunk) follows; a
//! crash between the two leaves a record with no chunk, which the
//! client's retry heals: a retry of a record with no outcome is queued
//! again ([`Insert::Requeue`]), and publication is fenced per event, so
//! the event is published once either way.
//!
//! Reads ask JetStream on the reader connection (direct gets), so every
//! replica answers the same.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use async_trait::async_trait;
use futures_util::StreamExt;

use super::Nats;
use super::codec;
use super::publisher::{Ack, Outgoing};
use crate::event::{Event, EventId};
use crate::store::{CompleteWith, Insert, Outcome, Page, PageQuery, Record, Store, StoreError};
use crate::telemetry::metrics::{Metrics, names};
use crate::time::UnixNanos;
use crate::trace_id::TraceId;

/// Reads a page request has in flight at once.
const READS_IN_FLIGHT: usize = 64;
/// Most id records one page request reads while it looks for a status.
const SCAN_MAX: u64 = 100_000;

/// Accepted events, their outcomes and the reads of them, in JetStream.
#[derive(Debug)]
pub struct NatsStore {
    nats: Arc<Nats>,
    /// `eventflow_nats_publish_ack_seconds`.
    ack_latency: metrics::Histogram,
}

impl NatsStore {
    pub(super) fn new(nats: Arc<Nats>, metrics: &Metrics) -> Self {
        Self {
            nats,
            ack_latency: metrics.histogram(names::NATS_PUBLISH_ACK),
        }
    }

    fn unavailable(error: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(error.to_string())
    }

    /// The record of `id`, if the ids stream holds one.
    async fn stored(&self, id: &EventId) -> Result<Option<Record>, StoreError> {
        let subject = self.nats.subjects.id(id);
        match self
            .nats
            .ids_read
            .direct_get_last_for_subject(subject.as_str())
            .await
        {
            Ok(message) => Ok(codec::decode_record(message.sequence, &message.payload)
                .map_err(|error| tracing::warn!(%error, "skipping a message"))
                .ok()),
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(Self::unavailable(error)),
        }
    }

    /// The outcome of the acceptance with arrival sequence `sequence`:
    /// its publication, or its failure, or none yet.
    async fn lookup_outcome(
        &self,
        published: &Stream<()>,
        failed: &Stream<()>,
        sequence: u64,
    ) -> Result<Option<Outcome>, StoreError> {
        let subjects = &self.nats.subjects;
        let (publication, failure) = tokio::join!(
            published.direct_get_last_for_subject(subjects.published_event(sequence).to_string()),
            failed.direct_get_last_for_subject(subjects.failed_event(sequence).to_string()),
        );
        let attempts = &self.nats.attempts;
        match publication {
            Ok(message) => {
                attempts.note(sequence, codec::attempts_of(Some(&message.headers)));
                return Ok(codec::processed_outcome(Some(&message.headers)));
            }
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => {}
            Err(error) => return Err(Self::unavailable(error)),
        }
        match failure {
            Ok(message) => {
                attempts.note(sequence, codec::attempts_of(Some(&message.headers)));
                // Retried since it failed: pending again.
                Ok((!codec::is_retry(Some(&message.headers)))
                    .then(|| codec::failed_outcome(Some(&message.headers))))
            }
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(Self::unavailable(error)),
        }
    }

    /// A record with its outcome, as readers see it.
    async fn with_outcome(&self, record: Record) -> Result<Arc<Record>, StoreError> {
        let outcome = self
            .lookup_outcome(
                &self.nats.published_read,
                &self.nats.failed_read,
                record.sequence,
            )
            .await?;
        Ok(Arc::new(match outcome {
            Some(outcome) => Record::with_outcome(
                record.event,
                record.sequence,
                record.received_at,
                record.trace_id,
                Some(outcome),
            ),
            None => record,
        }))
    }

    /// A retry: the same content (queued again when it has no outcome), or
    /// a conflict.
    async fn existing(&self, event: &Event) -> Result<Insert, StoreError> {
        let Some(stored) = self.stored(&event.id).await? else {
            // Held a moment ago and gone now (forgotten): let the client retry.
            return Err(StoreError::Unavailable(format!(
                "event `{}` was being forgotten; retry",
                event.id
            )));
        };
        let stored = self.with_outcome(stored).await?;
        Ok(if !stored.same_content(event) {
            Insert::Conflict(stored)
        } else if stored.outcome().is_none() {
            Insert::Requeue(stored)
        } else {
            Insert::Duplicate(stored)
        })
    }

    /// Reads the id records after `after`, in arrival order, `READS_IN_FLIGHT`
    /// at a time, each with its outcome, until `limit` match `status`, the
    /// stream ends, or the budget runs out.
    async fn scan(&self, query: PageQuery) -> Result<Page, StoreError> {
        let info = self
            .nats
            .ids_read
            .get_info()
            .await
            .map_err(Self::unavailable)?;
        let last = info.state.last_sequence;
        let mut next = query.after.saturating_add(1).max(info.state.first_sequence);
        let budget = Instant::now() + self.nats.deadline / 2;
        let mut scanned = 0u64;
        let mut records = Vec::with_capacity(query.limit.min(1024));
        let mut incomplete = false;
        while next <= last && records.len() < query.limit {
            if query.status.is_some() && (scanned >= SCAN_MAX || Instant::now() >= budget) {
                incomplete = true;
                break;
            }
            // Unfiltered, a window of `limit` is all a page needs.
            let want = if query.status.is_some() {
                READS_IN_FLIGHT as u64 * 4
            } else {
                (query.limit - records.len()) as u64
            };
            let end = last.min(next.saturating_add(want - 1));
            let window: Vec<Result<Option<Arc<Record>>, StoreError>> =
                futures_util::stream::iter(next..=end)
                    .map(|sequence| self.read_sequence(sequence))
                    .buffered(READS_IN_FLIGHT)
                    .collect()
                    .await;
            scanned += end - next + 1;
            for (sequence, read) in (next..=end).zip(window) {
                next = sequence + 1;
                let Some(record) = read? else { continue };
                if query.status.is_none_or(|status| record.status() == status) {
                    records.push(record);
                    if records.len() == query.limit {
                        break;
                    }
                }
            }
        }
        let more = next <= last;
        Ok(Page {
            next: (more || incomplete).then(|| next - 1),
            records,
            incomplete,
        })
    }

    /// The record with arrival sequence `sequence`, with its outcome.
    async fn read_sequence(&self, sequence: u64) -> Result<Option<Arc<Record>>, StoreError> {
        let message = match self.nats.ids_read.direct_get(sequence).await {
            Ok(message) => message,
            // Forgotten, or taken back after a failed queue write.
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(Self::unavailable(error)),
        };
        let Ok(record) = codec::decode_record(message.sequence, &message.payload) else {
            return Ok(None);
        };
        self.with_outcome(record).await.map(Some)
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
        if let Some(why) = self.nats.unavailable() {
            return events
                .iter()
                .map(|_| Err(StoreError::Unavailable(why.clone())))
                .collect();
        }
        let received = UnixNanos::from(received_at);
        let started = Instant::now();
        let max_body = self.nats.max_body();
        // Every record is sent before any ack is awaited: one round trip for
        // the batch, not one per event, and one deadline for all of it.
        let mut outgoing = Vec::with_capacity(events.len());
        let mut too_large = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let body = codec::id_record(event, received, trace_id);
            if body.len() > max_body {
                too_large.push((index, body.len()));
                continue;
            }
            outgoing.push(Outgoing {
                subject: self.nats.subjects.id(&event.id),
                headers: self.nats.expect_new.clone(),
                payload: body,
            });
        }
        let acks = match self.nats.ingest.publish(outgoing, self.nats.deadline).await {
            Ok(acks) => acks,
            Err(error) => {
                return events
                    .iter()
                    .map(|_| Err(StoreError::Unavailable(error.to_string())))
                    .collect();
            }
        };
        let mut acks = acks.into_iter();
        let mut too_large = too_large.into_iter().peekable();
        let mut results = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            if let Some((_, bytes)) = too_large.next_if(|(at, _)| *at == index) {
                results.push(Err(StoreError::TooLarge(format!(
                    "the event's record of {bytes} bytes is larger than the NATS server \
                     takes ({max_body} bytes and headers: its max_payload)"
                ))));
                continue;
            }
            results.push(match acks.next() {
                Some(Ack::Stored(sequence)) => Ok(Insert::Inserted(Arc::new(Record::new(
                    event,
                    sequence,
                    received_at,
                    trace_id,
                )))),
                // The id is taken: a retry, or a conflict.
                Some(Ack::Taken) => self.existing(&event).await,
                Some(Ack::Refused(why)) => Err(StoreError::Unavailable(format!(
                    "NATS did not store the event's record: {why}"
                ))),
                None => Err(StoreError::Unavailable("no answer".into())),
            });
        }
        self.ack_latency.record(started.elapsed().as_secs_f64());
        results
    }

    async fn get(&self, id: &EventId) -> Result<Option<Arc<Record>>, StoreError> {
        if let Some(why) = self.nats.unavailable() {
            return Err(StoreError::Unavailable(why));
        }
        match self.stored(id).await? {
            Some(record) => self.with_outcome(record).await.map(Some),
            None => Ok(None),
        }
    }

    async fn outcome(&self, record: &Record) -> Option<Outcome> {
        if let Some(outcome) = record.outcome() {
            return Some(outcome.clone());
        }
        // The workers ask on the ingest connection: it is theirs.
        self.lookup_outcome(
            &self.nats.published_work,
            &self.nats.failed_work,
            record.sequence,
        )
        .await
        .ok()
        .flatten()
    }

    fn unavailable(&self) -> Option<String> {
        self.nats.unavailable()
    }

    fn pending_is_queued(&self) -> bool {
        false
    }

    async fn get_by_sequence(&self, sequence: u64) -> Option<Arc<Record>> {
        self.read_sequence(sequence).await.ok().flatten()
    }

    async fn remove(&self, record: &Record) {
        // Not queued after all: forget the id, so that a retry is new. (If
        // this fails, the retry finds the record and queues it again.)
        let removed = tokio::time::timeout(
            self.nats.deadline,
            self.nats.ids.delete_message(record.sequence),
        )
        .await;
        if !matches!(removed, Ok(Ok(_))) {
            tracing::debug!(event.id = %record.event.id, "could not take back an id record");
        }
    }

    async fn complete(&self, record: &Record, outcome: CompleteWith) -> bool {
        match outcome {
            // Its message on the published stream (the feed) is the record.
            CompleteWith::Processed(_) => true,
            CompleteWith::Failed(error) => {
                let attempts = self.nats.attempts.of(record.sequence);
                let (headers, body) = codec::failed_message(record, &error, attempts);
                let publish = PublishMessage::build().payload(body).headers(headers);
                // Once per acceptance, like a publication; a retried event's
                // subject holds its earlier failure and the retry already.
                let publish = if attempts > 1 {
                    publish
                } else {
                    publish.expected_last_subject_sequence(0)
                };
                let subject = self.nats.subjects.failed_event(record.sequence);
                let written = match self.nats.work.send_publish(subject, publish).await {
                    Ok(ack) => ack.await.map(drop),
                    Err(error) => Err(error),
                };
                match written {
                    Ok(()) => true,
                    Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => false,
                    Err(error) => {
                        tracing::error!(event.id = %record.event.id, %error, "could not record a failed event");
                        true
                    }
                }
            }
        }
    }

    async fn retry(&self, record: &Record) -> Result<Option<Arc<Record>>, StoreError> {
        if let Some(why) = self.nats.unavailable() {
            return Err(StoreError::Unavailable(why));
        }
        // The failure this retry replaces: the subject's last message, and
        // only if it is still a failure (not another replica's retry).
        let subject = self.nats.subjects.failed_event(record.sequence);
        let failure = match self
            .nats
            .failed_read
            .direct_get_last_for_subject(subject.as_str())
            .await
        {
            Ok(message) if !codec::is_retry(Some(&message.headers)) => message,
            Ok(_) => return Ok(None),
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(Self::unavailable(error)),
        };
        let attempts = codec::attempts_of(Some(&failure.headers)).saturating_add(1);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(codec::RETRIED, "1");
        codec::add_attempts(&mut headers, attempts);
        // Written only on top of that failure: of two replicas retrying it
        // at once, one wins.
        let publish = PublishMessage::build()
            .headers(headers)
            .expected_last_subject_sequence(failure.sequence);
        let written = tokio::time::timeout(self.nats.deadline, async {
            self.nats.js.send_publish(subject, publish).await?.await
        })
        .await
        .map_err(|_| StoreError::Unavailable("NATS did not confirm the retry in time".into()))?;
        match written {
            Ok(_) => {}
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => return Ok(None),
            Err(error) => return Err(Self::unavailable(error)),
        }
        self.nats.attempts.note(record.sequence, attempts);
        Ok(Some(Arc::new(Record::with_outcome(
            record.event.clone(),
            record.sequence,
            record.received_at,
            record.trace_id,
            None,
        ))))
    }

    fn attempts(&self, record: &Record) -> u32 {
        self.nats.attempts.of(record.sequence)
    }

    async fn page(&self, query: PageQuery) -> Result<Page, StoreError> {
        if let Some(why) = self.nats.unavailable() {
            return Err(StoreError::Unavailable(why));
        }
        self.scan(query).await
    }

    fn len(&self) -> usize {
        usize::try_from(self.nats.ids_held.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    fn evictions(&self) -> u64 {
        // JetStream forgets ids by age and bytes; the backlog never evicts.
        0
    }
}
