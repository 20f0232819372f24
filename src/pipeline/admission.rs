//! Admission: whether an event gets a place in the pipeline, and the
//! counting of what came in and what became of it, in one place for every
//! front end (the HTTP handlers today).
//!
//! `eventflow_events_received_total` = accepted + duplicate + rejected once
//! the requests in progress are answered (an event is counted received when
//! it is read, and by its outcome a moment later): a front end reports what
//! it read ([`Admission::read`]) and what it refused before the pipeline saw
//! it ([`Admission::refused`]); the pipeline counts the rest as it decides.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use metrics::Counter;
use tracing::Instrument;

use super::Pipeline;
use crate::event::Event;
use crate::queue::{Attempt, Delivery, Overloaded, Permit, QueueError, QueuedEvents};
use crate::store::{Insert, Record, StoreError, event_footprint};
use crate::telemetry;
use crate::telemetry::metrics::{Metrics, names};
use crate::trace_id::TraceId;

/// Why an event was refused (the `reason` label of
/// `eventflow_events_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Malformed or invalid (400, 415, 422).
    Invalid,
    /// Same id, different content (409).
    Conflict,
    /// Over a size limit (413).
    TooLarge,
    /// No room: the pipeline's permits or the backlog are full (503).
    Overloaded,
    /// The backend cannot be reached or a sink is broken (503).
    Unavailable,
    /// The service is draining (503).
    ShuttingDown,
    /// Missing or wrong bearer token (401).
    Unauthorized,
}

impl RejectReason {
    /// Every reason, in declaration order.
    pub const ALL: [Self; 7] = [
        Self::Invalid,
        Self::Conflict,
        Self::TooLarge,
        Self::Overloaded,
        Self::Unavailable,
        Self::ShuttingDown,
        Self::Unauthorized,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Conflict => "conflict",
            Self::TooLarge => "too_large",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::ShuttingDown => "shutting_down",
            Self::Unauthorized => "unauthorized",
        }
    }
}

/// The admission counters.
#[derive(Debug)]
pub struct Admission {
    received: Counter,
    accepted: Counter,
    duplicate: Counter,
    rejected: [Counter; 7],
    retried: Counter,
}

impl Admission {
    /// Registers the counters, each at zero.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            received: metrics.counter(names::RECEIVED, &[]),
            accepted: metrics.counter(names::ACCEPTED, &[]),
            duplicate: metrics.counter(names::DUPLICATE, &[]),
            retried: metrics.counter(names::RETRIED, &[]),
            rejected: RejectReason::ALL
                .map(|reason| metrics.counter(names::REJECTED, &[("reason", reason.as_str())])),
        }
    }

    /// A request refused before any of its events could be read (a body
    /// too large, an unsupported media type, malformed JSON): it counts as
    /// one event received and refused.
    pub fn refused(&self, reason: RejectReason) {
        self.received.increment(1);
        self.rejected(reason, 1);
    }

    /// A request refused for its credentials (401) before its body was
    /// read: its events were never received, so only the refusal counts.
    pub fn unauthorized(&self) {
        self.rejected(RejectReason::Unauthorized, 1);
    }

    /// A front end read `received` events, of which `invalid` are not valid
    /// events (refused here); the pipeline counts what becomes of the rest.
    pub fn read(&self, received: usize, invalid: usize) {
        self.received.increment(received as u64);
        self.rejected(RejectReason::Invalid, invalid);
    }

    pub(super) fn rejected(&self, reason: RejectReason, n: usize) {
        // `ALL` lists the variants in declaration order.
        self.rejected[reason as usize].increment(n as u64);
    }

    pub(super) fn accepted(&self, n: usize) {
        self.accepted.increment(n as u64);
    }

    pub(super) fn retried(&self, n: usize) {
        self.retried.increment(n as u64);
    }

    pub(super) fn duplicate(&self, n: usize) {
        self.duplicate.increment(n as u64);
    }
}

/// Why an event was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// No room: the pipeline is at capacity (503 + `Retry-After`).
    #[error("the pipeline is at capacity")]
    Overloaded,
    /// The same id is stored with different content (409).
    #[error("event `{}` already exists with different content", .0.event.id)]
    Conflict(Arc<Record>),
    /// The service is draining and accepts nothing new (503).
    #[error("the service is shutting down")]
    ShuttingDown,
    /// A sink cannot write, so nothing accepted could be published (503).
    #[error("{0}")]
    SinkBroken(String),
    /// The backend cannot be reached, or did not answer in time (503).
    #[error("{0}")]
    Unavailable(String),
    /// An event the backend can never store, whatever its load (413).
    #[error("{0}")]
    TooLarge(String),
    /// More than the pipeline holds even when empty (413): a retry would
    /// be refused forever.
    #[error(
        "{events} new events of {bytes} bytes in all are more than the pipeline can hold \
         (pipeline.queue_capacity = {capacity} events, pipeline.queue_max_bytes = {max_bytes} bytes)"
    )]
    NeverFits {
        /// New events asking for room.
        events: usize,
        /// Their footprint.
        bytes: usize,
        /// The pipeline's event budget.
        capacity: usize,
        /// The pipeline's byte budget.
        max_bytes: usize,
    },
}

impl IngestError {
    /// How it counts in `eventflow_events_rejected_total`.
    pub fn reason(&self) -> RejectReason {
        match self {
            Self::Overloaded => RejectReason::Overloaded,
            Self::ShuttingDown => RejectReason::ShuttingDown,
            Self::SinkBroken(_) | Self::Unavailable(_) => RejectReason::Unavailable,
            Self::Conflict(_) => RejectReason::Conflict,
            Self::NeverFits { .. } | Self::TooLarge(_) => RejectReason::TooLarge,
        }
    }
}

impl From<Overloaded> for IngestError {
    fn from(_: Overloaded) -> Self {
        Self::Overloaded
    }
}

impl From<StoreError> for IngestError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Full => Self::Overloaded,
            StoreError::Unavailable(why) => Self::Unavailable(why),
            StoreError::TooLarge(why) => Self::TooLarge(why),
        }
    }
}

/// What happened to a single event that was taken.
#[derive(Debug)]
pub enum Ingested {
    /// New; queued for processing.
    Accepted(Arc<Record>),
    /// Already stored with the same content; not processed again.
    Duplicate(Arc<Record>),
}

impl Pipeline {
    /// Refuses new events while draining or while a sink is broken; the
    /// token marks an ingest call in progress (shutdown waits for them).
    pub(super) fn enter(
        &self,
    ) -> Result<tokio_util::task::task_tracker::TaskTrackerToken, IngestError> {
        if self.is_draining() {
            return Err(IngestError::ShuttingDown);
        }
        if let Some(broken) = self.broken_sink() {
            return Err(IngestError::SinkBroken(broken));
        }
        if let Some(why) = self.inner.store.unavailable() {
            return Err(IngestError::Unavailable(why));
        }
        Ok(self.inner.ingest_calls.token())
    }

    /// Accepts one event (or recognises a retry), counting it.
    pub async fn ingest(&self, event: Event, trace_id: TraceId) -> Result<Ingested, IngestError> {
        let span = telemetry::child_span(
            &tracing::Span::current(),
            || tracing::debug_span!("ingest", event.id = %event.id),
        );
        let admission = &self.inner.admission;
        admission.read(1, 0);
        let ingested = self
            .within_deadline(self.ingest_one(event, trace_id))
            .instrument(span)
            .await;
        match &ingested {
            Ok(Ingested::Accepted(_)) => admission.accepted(1),
            Ok(Ingested::Duplicate(_)) => admission.duplicate(1),
            Err(error) => admission.rejected(error.reason(), 1),
        }
        ingested
    }

    /// Runs an ingest call within the backend's deadline: a backend that
    /// does not answer makes the whole request 503 in time, never a hang.
    pub(super) async fn within_deadline<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, IngestError>>,
    ) -> Result<T, IngestError> {
        let Some(limit) = self.inner.write_deadline else {
            return call.await;
        };
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(IngestError::Unavailable(format!(
                "the backend did not answer within {limit:?}"
            )))
        })
    }

    async fn ingest_one(&self, event: Event, trace_id: TraceId) -> Result<Ingested, IngestError> {
        let _in_progress = self.enter()?;
        let store = &self.inner.store;
        // Room first: the insert recognises a retry itself, so a new event
        // (the usual case) is looked up once, not twice.
        let permit = match self.inner.backpressure.try_acquire(event_footprint(&event)) {
            Ok(permit) => permit,
            // Retries are answered even when the pipeline is full.
            Err(Overloaded) => {
                return match store.get(&event.id).await? {
                    Some(existing) if self.surely_queued(&existing) => {
                        classify_existing(existing, &event)
                    }
                    _ => Err(self.refusal(1, event_footprint(&event))),
                };
            }
        };
        match store.insert(event, SystemTime::now(), trace_id).await? {
            Insert::Inserted(record) => {
                self.enqueue(
                    vec![Arc::clone(&record)],
                    permit,
                    Instant::now(),
                    Vec::new(),
                )
                .await
                .map_err(|(err, _)| err)?;
                Ok(Ingested::Accepted(record))
            }
            Insert::Requeue(record) => {
                self.enqueue(
                    vec![Arc::clone(&record)],
                    permit,
                    Instant::now(),
                    vec![REQUEUED],
                )
                .await
                .map_err(|(err, _)| err)?;
                Ok(Ingested::Duplicate(record))
            }
            Insert::Duplicate(record) => Ok(Ingested::Duplicate(record)),
            Insert::Conflict(record) => Err(IngestError::Conflict(record)),
        }
    }

    /// Whether a stored record is surely in the queue or done with, so that
    /// a retry of it may be answered without queueing it again: always in
    /// one process; in a shared store not while it is pending, since a
    /// crash between two writes can have left it unqueued.
    pub(super) fn surely_queued(&self, record: &Record) -> bool {
        self.inner.store.pending_is_queued() || record.outcome().is_some()
    }

    /// Why `events` new events of `bytes` bytes got no room: the pipeline
    /// is full now, or they would not fit even in an empty one.
    pub(super) fn refusal(&self, events: usize, bytes: usize) -> IngestError {
        let backpressure = &self.inner.backpressure;
        let (capacity, max_bytes) = (backpressure.capacity(), backpressure.max_bytes());
        if events > capacity || bytes > max_bytes {
            IngestError::NeverFits {
                events,
                bytes,
                capacity,
                max_bytes,
            }
        } else {
            IngestError::Overloaded
        }
    }

    /// Queues stored records (`attempts`: one per record, or empty when
    /// each is new); on failure takes them back out of the store and
    /// returns them.
    pub(super) async fn enqueue(
        &self,
        records: Vec<Arc<Record>>,
        permit: Permit,
        enqueued_at: Instant,
        attempts: Vec<Attempt>,
    ) -> Result<(), (IngestError, Vec<Arc<Record>>)> {
        let item = QueuedEvents {
            records,
            delivery: Delivery {
                attempts,
                acknowledge: None,
            },
            permit,
            enqueued_at,
            span: tracing::Span::current(),
        };
        if let Err((err, item)) = self.inner.queue.push(item).await {
            // Not queued means not accepted: take them back out of the store.
            for record in &item.records {
                self.inner.store.remove(record).await;
            }
            let err = match err {
                QueueError::Closed => IngestError::ShuttingDown,
                QueueError::Full => IngestError::Overloaded,
                QueueError::Unavailable(why) => IngestError::Unavailable(why),
            };
            return Err((err, item.records));
        }
        Ok(())
    }
}

/// The attempt of an event queued again by a retry: it may have been
/// published already, so the worker looks before publishing it.
pub(super) const REQUEUED: Attempt = Attempt {
    redelivered: true,
    retryable: false,
};

/// A retry of a stored event: the same content, or a conflict.
pub(super) fn classify_existing(
    existing: Arc<Record>,
    event: &Event,
) -> Result<Ingested, IngestError> {
    if existing.same_content(event) {
        Ok(Ingested::Duplicate(existing))
    } else {
        Err(IngestError::Conflict(existing))
    }
}
