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

use super::backpressure::Overloaded;
use super::queue::{Delivery, QueueError, QueuedEvents};
use super::{Permit, Pipeline};
use crate::event::Event;
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
    /// No room in the pipeline, draining, or a sink broken (503).
    Overloaded,
    /// Missing or wrong bearer token (401).
    Unauthorized,
}

impl RejectReason {
    /// Every reason, in declaration order.
    pub const ALL: [Self; 5] = [
        Self::Invalid,
        Self::Conflict,
        Self::TooLarge,
        Self::Overloaded,
        Self::Unauthorized,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Conflict => "conflict",
            Self::TooLarge => "too_large",
            Self::Overloaded => "overloaded",
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
    rejected: [Counter; 5],
}

impl Admission {
    /// Registers the counters, each at zero.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            received: metrics.counter(names::RECEIVED, &[]),
            accepted: metrics.counter(names::ACCEPTED, &[]),
            duplicate: metrics.counter(names::DUPLICATE, &[]),
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
    /// The backend cannot be reached (503).
    #[error("{0}")]
    Unavailable(String),
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
            Self::Overloaded | Self::ShuttingDown | Self::SinkBroken(_) | Self::Unavailable(_) => {
                RejectReason::Overloaded
            }
            Self::Conflict(_) => RejectReason::Conflict,
            Self::NeverFits { .. } => RejectReason::TooLarge,
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
        let ingested = self.ingest_one(event, trace_id).instrument(span).await;
        match &ingested {
            Ok(Ingested::Accepted(_)) => admission.accepted(1),
            Ok(Ingested::Duplicate(_)) => admission.duplicate(1),
            Err(error) => admission.rejected(error.reason(), 1),
        }
        ingested
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
                return match store.get(&event.id).await {
                    Some(existing) => classify_existing(existing, &event),
                    None => Err(self.refusal(1, event_footprint(&event))),
                };
            }
        };
        match store.insert(event, SystemTime::now(), trace_id).await? {
            Insert::Inserted(record) => {
                self.enqueue(vec![Arc::clone(&record)], permit, Instant::now())
                    .await
                    .map_err(|(err, _)| err)?;
                Ok(Ingested::Accepted(record))
            }
            Insert::Duplicate(record) => Ok(Ingested::Duplicate(record)),
            Insert::Conflict(record) => Err(IngestError::Conflict(record)),
        }
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

    /// Queues stored records; on failure takes them back out of the store
    /// and returns them.
    pub(super) async fn enqueue(
        &self,
        records: Vec<Arc<Record>>,
        permit: Permit,
        enqueued_at: Instant,
    ) -> Result<(), (IngestError, Vec<Arc<Record>>)> {
        let item = QueuedEvents {
            records,
            delivery: Delivery::default(),
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
            };
            return Err((err, item.records));
        }
        Ok(())
    }
}

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
