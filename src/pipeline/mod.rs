//! The ingest pipeline: admission (backpressure), storage, queueing, and the
//! worker pool that transforms and publishes.
//!
//! Invariant: an event is *accepted* only once it holds a [`Permit`], is in
//! the store, and is in the queue. The permit is released only after the
//! event was published (or failed), so accepted always means "has a place
//! in the pipeline" and shutdown can drain by closing the queue.

pub mod backpressure;
pub mod queue;
pub mod transform;
mod waiters;
mod worker;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use crate::config::PipelineSettings;
use crate::event::{Event, EventId, PublishedEvent};
use crate::sink::{EventBroadcast, Sink};
use crate::store::{Insert, Outcome, Processing, Record, Store, StoreError, event_footprint};
use crate::telemetry;
use crate::telemetry::metrics::{Metrics, RejectReason};
use crate::trace_id::TraceId;

pub use backpressure::{Backpressure, Overloaded, Permit};
pub use queue::{CHUNK_BYTES, CHUNK_EVENTS, MemoryQueue, Queue, QueueError, QueuedEvents};
pub use transform::{TransformChain, TransformContext, TransformError};
pub use waiters::{PublishedWait, WaitOutcome};
pub use worker::WorkerPool;

use waiters::Waiters;

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

impl From<Overloaded> for IngestError {
    fn from(_: Overloaded) -> Self {
        Self::Overloaded
    }
}

impl From<StoreError> for IngestError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Full => Self::Overloaded,
        }
    }
}

/// What happened to an accepted single event.
#[derive(Debug)]
pub enum Ingested {
    /// New; queued for processing. `waiter` resolves on publication when asked for.
    Accepted {
        /// The stored record.
        record: Arc<Record>,
        /// Resolves when the event is published (only with `wait`).
        waiter: Option<PublishedWait>,
    },
    /// Already stored with the same content; not processed again.
    Duplicate(Arc<Record>),
}

/// Where a wait for an event's publication stands.
#[derive(Debug)]
pub enum WaitFor {
    /// Processing already ended.
    Ended(WaitOutcome),
    /// Still to come.
    Pending(PublishedWait),
}

/// Per-item result of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events newly accepted.
    pub accepted: usize,
    /// Events already stored with the same content (or repeated in the batch).
    pub duplicates: usize,
    /// Events refused, by index in the request.
    pub rejected: Vec<BatchRejection>,
}

/// One refused event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRejection {
    /// Position in the request, from 0.
    pub index: usize,
    /// Why, as counted in metrics.
    pub reason: RejectReason,
    /// The event's id when it had a readable one.
    pub id: Option<String>,
    /// Why it was refused.
    pub error: String,
}

/// An event repeated inside one batch, answered like a retry of its first
/// occurrence.
struct Repeat {
    index: usize,
    id: EventId,
    /// Whether its content differs from the first occurrence.
    differs: bool,
    /// Position of the first occurrence among the batch's unique events.
    position: usize,
}

/// Where a unique event of a batch came from, kept while the store has it.
struct Placed {
    /// Position among the batch's unique events.
    position: usize,
    /// Index in the request.
    index: usize,
    /// Footprint counted against `pipeline.queue_max_bytes`.
    size: usize,
    id: EventId,
}

/// Stored events of a batch waiting to be queued together.
#[derive(Default)]
struct Chunk {
    /// Each event's index in the request.
    indexes: Vec<usize>,
    /// Their total footprint.
    bytes: usize,
    records: Vec<Arc<Record>>,
}

impl Chunk {
    fn push(&mut self, index: usize, size: usize, record: Arc<Record>) {
        if self.records.is_empty() {
            self.indexes.reserve(CHUNK_EVENTS);
            self.records.reserve(CHUNK_EVENTS);
        }
        self.indexes.push(index);
        self.bytes += size;
        self.records.push(record);
    }
}

/// The shared pipeline handle: cheap to clone.
#[derive(Debug, Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: PipelineSettings,
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    backpressure: Backpressure,
    chain: TransformChain,
    sinks: Vec<Arc<dyn Sink>>,
    broadcast: EventBroadcast,
    waiters: Waiters,
    /// Closed at shutdown: new ingest requests are refused from then on.
    ingest_closed: AtomicBool,
    /// Ingest calls in progress; shutdown waits for them before closing the queue.
    ingest_calls: TaskTracker,
    /// Worker tasks running (a worker that died is not counted).
    live_workers: AtomicUsize,
    metrics: Metrics,
}

/// The components a pipeline is wired from.
#[derive(Debug)]
pub struct PipelineParts {
    /// Where accepted events are stored.
    pub store: Arc<dyn Store>,
    /// Between ingest and the workers.
    pub queue: Arc<dyn Queue>,
    /// Where processed events are published.
    pub sinks: Vec<Arc<dyn Sink>>,
    /// Transform chain (`None`: the one named in the settings).
    pub chain: Option<TransformChain>,
    /// Instrumentation.
    pub metrics: Metrics,
}

impl Pipeline {
    /// Wires a pipeline; workers are started separately.
    pub fn new(settings: PipelineSettings, parts: PipelineParts) -> Self {
        let backpressure = Backpressure::new(settings.queue_capacity, settings.queue_max_bytes);
        let chain = parts
            .chain
            .unwrap_or_else(|| TransformChain::from_kinds(&settings.transforms));
        Self {
            inner: Arc::new(Inner {
                settings,
                store: parts.store,
                queue: parts.queue,
                backpressure,
                chain,
                sinks: parts.sinks,
                broadcast: EventBroadcast::default(),
                waiters: Waiters::default(),
                ingest_closed: AtomicBool::new(false),
                ingest_calls: TaskTracker::new(),
                live_workers: AtomicUsize::new(0),
                metrics: parts.metrics,
            }),
        }
    }

    /// Starts `pipeline.workers` workers.
    pub fn start_workers(&self) -> WorkerPool {
        WorkerPool::start(self.clone(), self.inner.settings.workers)
    }

    /// The pipeline settings.
    pub fn settings(&self) -> &PipelineSettings {
        &self.inner.settings
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The live feed of published events.
    pub fn broadcast(&self) -> &EventBroadcast {
        &self.inner.broadcast
    }

    /// Instrumentation.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Admission state.
    pub fn backpressure(&self) -> &Backpressure {
        &self.inner.backpressure
    }

    /// Runs the transform chain over `record` with the facts of a processing
    /// run; the workers publish what this returns, and readers of the store
    /// call it again to re-derive the published event (see [`Processing`]).
    pub fn render(
        &self,
        record: &Record,
        processing: &Processing,
    ) -> Result<PublishedEvent, TransformError> {
        let ctx = TransformContext {
            worker: processing.worker,
            sequence: record.sequence,
            received_at: record.received_at.into(),
            processed_at: processing.processed_at.into(),
            queue_wait: processing.processed_at.since(record.received_at),
            trace_id: record.trace_id,
        };
        let mut event = PublishedEvent {
            id: record.event.id.clone(),
            timestamp: record.event.timestamp,
            payload: record.event.payload.to_string(),
            metadata: None,
        };
        self.inner.chain.apply(&mut event, &ctx)?;
        Ok(event)
    }

    /// The published event of a processed record (`None` while pending or
    /// when it failed).
    pub fn published(&self, record: &Record) -> Option<Result<PublishedEvent, TransformError>> {
        let processing = record.outcome()?.processing()?;
        Some(self.render(record, &processing))
    }

    /// Worker tasks running now.
    pub fn live_workers(&self) -> usize {
        self.inner.live_workers.load(Ordering::Relaxed)
    }

    /// Events waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.inner.queue.len()
    }

    fn enter(&self) -> Result<TaskTrackerToken, IngestError> {
        if self.inner.ingest_closed.load(Ordering::Acquire) {
            return Err(IngestError::ShuttingDown);
        }
        Ok(self.inner.ingest_calls.token())
    }

    /// Accepts one event (or recognises a retry).
    pub async fn ingest(
        &self,
        event: Event,
        trace_id: TraceId,
        wait: bool,
    ) -> Result<Ingested, IngestError> {
        let span = telemetry::child_span(
            &tracing::Span::current(),
            || tracing::debug_span!("ingest", event.id = %event.id),
        );
        self.ingest_inner(event, trace_id, wait)
            .instrument(span)
            .await
    }

    async fn ingest_inner(
        &self,
        event: Event,
        trace_id: TraceId,
        wait: bool,
    ) -> Result<Ingested, IngestError> {
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
                // Registered before it is queued: a worker may publish it at once.
                let waiter = wait.then(|| PublishedWait::new(self, record.sequence));
                self.enqueue(vec![Arc::clone(&record)], permit, Instant::now())
                    .await
                    .map_err(|(err, _)| err)?;
                Ok(Ingested::Accepted { record, waiter })
            }
            Insert::Duplicate(record) => Ok(Ingested::Duplicate(record)),
            Insert::Conflict(record) => Err(IngestError::Conflict(record)),
        }
    }

    /// Accepts the valid events of a batch: all of the new ones fit, or the
    /// whole batch is refused with [`IngestError::Overloaded`] (or
    /// [`IngestError::NeverFits`] when they would not fit even in an empty
    /// pipeline).
    ///
    /// `events` carries each event's index in the request.
    pub async fn ingest_batch(
        &self,
        events: Vec<(usize, Event)>,
        trace_id: TraceId,
    ) -> Result<BatchOutcome, IngestError> {
        let span = telemetry::child_span(&tracing::Span::current(), || {
            tracing::debug_span!("ingest_batch", batch.size = events.len())
        });
        self.ingest_batch_inner(events, trace_id)
            .instrument(span)
            .await
    }

    async fn ingest_batch_inner(
        &self,
        events: Vec<(usize, Event)>,
        trace_id: TraceId,
    ) -> Result<BatchOutcome, IngestError> {
        let _in_progress = self.enter()?;
        let store = &self.inner.store;
        let mut outcome = BatchOutcome::default();
        // Repeats inside the batch behave like retries of the first occurrence.
        // The unique events go to the store as they are; `placed` keeps, at
        // the same positions, where each came from.
        let mut first_seen: HashMap<EventId, usize> = HashMap::with_capacity(events.len());
        let mut unique: Vec<Event> = Vec::with_capacity(events.len());
        let mut placed: Vec<Placed> = Vec::with_capacity(events.len());
        let mut repeats: Vec<Repeat> = Vec::new();
        for (index, event) in events {
            // One hash per id: `entry` rather than `get` then `insert`.
            match first_seen.entry(event.id.clone()) {
                Entry::Occupied(first) => {
                    let position = *first.get();
                    repeats.push(Repeat {
                        index,
                        differs: unique[position] != event,
                        id: event.id,
                        position,
                    });
                }
                Entry::Vacant(slot) => {
                    let position = unique.len();
                    slot.insert(position);
                    placed.push(Placed {
                        position,
                        index,
                        size: event_footprint(&event),
                        id: event.id.clone(),
                    });
                    unique.push(event);
                }
            }
        }
        drop(first_seen);
        // Whether each unique event conflicts with what is already stored.
        let mut conflicted = vec![false; unique.len()];
        // Optimistic admission: most events of a batch are new, so take room
        // for all of them and let the store sort out retries (their shares
        // are given back). Only when that does not fit, look up which ones
        // are new: retries are answered even when the pipeline is full.
        let (events, placed, mut permit) = match self.acquire_for(&placed) {
            Ok(permit) => (unique, placed, permit),
            Err(Overloaded) => {
                let mut new_events = Vec::new();
                let mut new_placed = Vec::new();
                for (event, placed) in unique.into_iter().zip(placed) {
                    match store.get(&event.id).await {
                        Some(held) if held.same_content(&event) => {
                            outcome.duplicates += 1;
                        }
                        Some(_) => {
                            conflicted[placed.position] = true;
                            outcome.rejected.push(conflict(placed.index, &event.id));
                        }
                        None => {
                            new_events.push(event);
                            new_placed.push(placed);
                        }
                    }
                }
                let permit = self.acquire_for(&new_placed).map_err(|Overloaded| {
                    let bytes = new_placed
                        .iter()
                        .map(|e| e.size)
                        .fold(0, usize::saturating_add);
                    self.refusal(new_placed.len(), bytes)
                })?;
                (new_events, new_placed, permit)
            }
        };
        let received_at = SystemTime::now();
        let enqueued_at = Instant::now();
        let mut chunk = Chunk::default();
        let inserted = store.insert_batch(events, received_at, trace_id).await;
        for (placed, inserted) in placed.into_iter().zip(inserted) {
            let Placed {
                position,
                index,
                size,
                id,
            } = placed;
            match inserted {
                Ok(Insert::Inserted(record)) => {
                    chunk.push(index, size, record);
                    if chunk.records.len() == CHUNK_EVENTS || chunk.bytes >= CHUNK_BYTES {
                        let full = std::mem::take(&mut chunk);
                        self.enqueue_chunk(full, &mut permit, enqueued_at, &mut outcome)
                            .await;
                    }
                    continue;
                }
                Ok(Insert::Duplicate(_)) => outcome.duplicates += 1,
                Ok(Insert::Conflict(_)) => {
                    conflicted[position] = true;
                    outcome.rejected.push(conflict(index, &id));
                }
                // Only reachable in a narrow race between concurrent evictions.
                Err(err) => outcome.rejected.push(BatchRejection {
                    index,
                    reason: RejectReason::Overloaded,
                    id: Some(id.to_string()),
                    error: err.to_string(),
                }),
            }
            // Not stored: give its room back now.
            drop(permit.split(1, size));
        }
        if !chunk.records.is_empty() {
            self.enqueue_chunk(chunk, &mut permit, enqueued_at, &mut outcome)
                .await;
        }
        for repeat in repeats {
            if conflicted[repeat.position] || repeat.differs {
                outcome.rejected.push(conflict(repeat.index, &repeat.id));
            } else {
                outcome.duplicates += 1;
            }
        }
        outcome.rejected.sort_by_key(|r| r.index);
        Ok(outcome)
    }

    /// Why `events` new events of `bytes` bytes got no room: the pipeline
    /// is full now, or they would not fit even in an empty one.
    fn refusal(&self, events: usize, bytes: usize) -> IngestError {
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

    /// Room in the pipeline for all of `events`, or [`Overloaded`].
    fn acquire_for(&self, events: &[Placed]) -> Result<Permit, Overloaded> {
        let bytes = events
            .iter()
            .try_fold(0usize, |total, e| total.checked_add(e.size))
            .ok_or(Overloaded)?;
        self.inner
            .backpressure
            .try_acquire_many(events.len(), bytes)
    }

    /// Queues a chunk of a batch with its share of the batch's permit;
    /// counts its events as accepted, or as rejected when it cannot be queued.
    async fn enqueue_chunk(
        &self,
        chunk: Chunk,
        permit: &mut Permit,
        enqueued_at: Instant,
        outcome: &mut BatchOutcome,
    ) {
        let Chunk {
            indexes,
            bytes,
            records,
        } = chunk;
        let events = records.len();
        let queued = match permit.split(events, bytes) {
            Some(share) => self.enqueue(records, share, enqueued_at).await,
            None => {
                // The batch's permit covers every stored event by construction.
                for record in &records {
                    self.inner.store.remove(record).await;
                }
                Err((IngestError::Overloaded, records))
            }
        };
        match queued {
            Ok(()) => outcome.accepted += events,
            Err((err, records)) => {
                outcome
                    .rejected
                    .extend(indexes.into_iter().zip(records).map(|(index, record)| {
                        BatchRejection {
                            index,
                            reason: RejectReason::Overloaded,
                            id: Some(record.event.id.to_string()),
                            error: err.to_string(),
                        }
                    }));
            }
        }
    }

    /// Queues stored records; on failure takes them back out of the store
    /// and returns them.
    async fn enqueue(
        &self,
        records: Vec<Arc<Record>>,
        permit: Permit,
        enqueued_at: Instant,
    ) -> Result<(), (IngestError, Vec<Arc<Record>>)> {
        let item = QueuedEvents {
            records,
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

    /// Stops accepting new events; calls already in progress complete.
    pub fn close_ingest(&self) {
        self.inner.ingest_closed.store(true, Ordering::Release);
        self.inner.ingest_calls.close();
    }

    /// Waits until every ingest call in progress has returned.
    pub async fn ingest_idle(&self) {
        self.inner.ingest_calls.wait().await;
    }

    /// Closes the queue: workers drain what is left, then stop.
    pub fn close_queue(&self) {
        self.inner.queue.close();
    }

    /// Flushes every sink (at shutdown).
    pub async fn flush_sinks(&self) {
        for sink in &self.inner.sinks {
            if let Err(error) = sink.flush().await {
                tracing::error!(sink = sink.name(), %error, "flushing sink failed");
            }
            // The last writes may have failed after every pass was handed over.
            let lost = sink.take_lost();
            if lost > 0 {
                self.inner.metrics.sink_result(sink.name(), false, lost);
            }
        }
    }

    /// Waits for a stored event's publication (a retry with
    /// `?wait=published`): how it ended when it already has.
    pub fn wait_for(&self, record: &Record) -> WaitFor {
        if let Some(ended) = self.ended(record) {
            return WaitFor::Ended(ended);
        }
        let waiter = PublishedWait::new(self, record.sequence);
        // Processing may have ended between the look and the registration.
        match self.ended(record) {
            Some(ended) => WaitFor::Ended(ended),
            None => WaitFor::Pending(waiter),
        }
    }

    /// How processing of `record` ended, if it has.
    fn ended(&self, record: &Record) -> Option<WaitOutcome> {
        match record.outcome()? {
            Outcome::Processed { .. } => Some(
                self.published(record)?
                    .map(Arc::new)
                    .map_err(|e| e.to_string()),
            ),
            Outcome::Failed { error } => Some(Err(error.to_string())),
        }
    }
}

fn classify_existing(existing: Arc<Record>, event: &Event) -> Result<Ingested, IngestError> {
    if existing.same_content(event) {
        Ok(Ingested::Duplicate(existing))
    } else {
        Err(IngestError::Conflict(existing))
    }
}

fn conflict(index: usize, id: &EventId) -> BatchRejection {
    BatchRejection {
        index,
        reason: RejectReason::Conflict,
        id: Some(id.to_string()),
        error: "conflict: an event with this id exists with different content".into(),
    }
}
