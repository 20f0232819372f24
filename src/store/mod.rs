//! Where accepted events live: lookup by id (idempotency) and by arrival
//! sequence, arrival order (pagination) and each event's outcome.
//!
//! [`Store`] is the seam for backends; [`MemoryStore`] is the default.

mod memory;

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::event::{Event, EventId};
use crate::time::UnixNanos;
use crate::trace_id::TraceId;

pub use memory::MemoryStore;

/// Fixed per-record cost added to the byte estimate (struct, map entries).
pub const RECORD_OVERHEAD_BYTES: usize = 256;

/// Processing state of a stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Accepted, not yet published.
    Pending,
    /// Transformed and published.
    Processed,
    /// Not published: a transform rejected it, or a sink could not write it
    /// (the record's `error` says which).
    Failed,
}

/// The facts of one processing run that the published event was derived
/// from. Transforms are pure functions of the event and these facts, so the
/// store keeps them instead of a copy of the published event, and readers
/// re-derive it with [`crate::pipeline::Reader::published`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Processing {
    /// The worker that ran the chain.
    pub worker: u32,
    /// When it ran.
    pub processed_at: UnixNanos,
}

/// How processing ended. The fields of [`Processing`] sit in the variant
/// itself so that the tag shares their padding. (Publication order is the
/// feed's: see [`crate::feed`].)
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Published: every sink wrote it.
    Processed {
        /// The worker that ran the chain.
        worker: u32,
        /// When it ran.
        processed_at: UnixNanos,
    },
    /// Not published: a transform rejected it, or a sink could not write it.
    Failed {
        /// Why.
        error: Box<str>,
    },
}

impl Outcome {
    /// What the published event was derived from, if it was published.
    pub fn processing(&self) -> Option<Processing> {
        match *self {
            Self::Processed {
                worker,
                processed_at,
                ..
            } => Some(Processing {
                worker,
                processed_at,
            }),
            Self::Failed { .. } => None,
        }
    }
}

/// One accepted event and what became of it.
///
/// A million of these are held by default, so its size is watched: with the
/// `Arc` header it fits allocator size class 128 (see the assertion below).
#[derive(Debug)]
pub struct Record {
    /// The event as accepted.
    pub event: Event,
    /// Arrival order, starting at 1.
    pub sequence: u64,
    /// When it was accepted.
    pub received_at: UnixNanos,
    /// Trace of the request that ingested it.
    pub trace_id: TraceId,
    outcome: OnceLock<Outcome>,
}

const _: () = assert!(std::mem::size_of::<Record>() <= 112);

impl Record {
    /// A pending record.
    pub fn new(event: Event, sequence: u64, received_at: SystemTime, trace_id: TraceId) -> Self {
        Self {
            event,
            sequence,
            received_at: received_at.into(),
            trace_id,
            outcome: OnceLock::new(),
        }
    }

    /// A record as a backend read it back, with its outcome if it has one.
    pub fn with_outcome(
        event: Event,
        sequence: u64,
        received_at: UnixNanos,
        trace_id: TraceId,
        outcome: Option<Outcome>,
    ) -> Self {
        let record = Self {
            event,
            sequence,
            received_at,
            trace_id,
            outcome: OnceLock::new(),
        };
        if let Some(outcome) = outcome {
            let _ = record.outcome.set(outcome);
        }
        record
    }

    /// Current status.
    pub fn status(&self) -> Status {
        match self.outcome.get() {
            None => Status::Pending,
            Some(Outcome::Processed { .. }) => Status::Processed,
            Some(Outcome::Failed { .. }) => Status::Failed,
        }
    }

    /// The outcome, once processing ended.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.get()
    }

    /// Whether `event` carries the same content as this record (idempotent retry).
    pub fn same_content(&self, event: &Event) -> bool {
        self.event == *event
    }

    /// Estimated memory held by this record, in bytes.
    pub fn footprint(&self) -> usize {
        let error = match self.outcome.get() {
            Some(Outcome::Failed { error }) => error.len(),
            _ => 0,
        };
        event_footprint(&self.event) + error
    }
}

/// Estimated memory an accepted event costs before processing, in bytes;
/// used for both the queue and the store budgets.
pub fn event_footprint(event: &Event) -> usize {
    RECORD_OVERHEAD_BYTES + event.id.as_str().len() + event.payload.len()
}

/// The outcome of offering an event to the store.
#[derive(Debug, Clone)]
pub enum Insert {
    /// New: stored as pending.
    Inserted(Arc<Record>),
    /// Same id and content already stored.
    Duplicate(Arc<Record>),
    /// Same id and content already stored, but maybe never queued (a crash
    /// between the store's write and the queue's): queued again, and
    /// answered as a duplicate. The queue's copy is marked as a possible
    /// repeat, so that it is published at most once.
    Requeue(Arc<Record>),
    /// Same id, different content.
    Conflict(Arc<Record>),
}

/// Why the store refused an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Full of pending events; nothing can be evicted.
    #[error("store is full of unprocessed events")]
    Full,
    /// The store cannot be reached or did not answer in time.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The event can never be stored, whatever the load (its message would
    /// pass the backend's size limit).
    #[error("{0}")]
    TooLarge(String),
}

/// A page of records in arrival order.
#[derive(Debug, Clone)]
pub struct Page {
    /// Records, ascending by sequence.
    pub records: Vec<Arc<Record>>,
    /// Cursor for the next page, if there may be more.
    pub next: Option<u64>,
    /// The scan for a status stopped at its budget (time or records read)
    /// before finding `limit` matches: more may follow `next`.
    pub incomplete: bool,
}

/// Which records a page contains.
#[derive(Debug, Clone, Copy, Default)]
pub struct PageQuery {
    /// Only records with a greater sequence.
    pub after: u64,
    /// At most this many.
    pub limit: usize,
    /// Only records with this status.
    pub status: Option<Status>,
}

/// Storage of accepted events, shared by handlers and workers.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Looks up `event.id`; stores the event as pending when it is new.
    async fn insert(
        &self,
        event: Event,
        received_at: SystemTime,
        trace_id: TraceId,
    ) -> Result<Insert, StoreError>;
    /// [`insert`](Self::insert) for each event, in order, with one result each.
    async fn insert_batch(
        &self,
        events: Vec<Event>,
        received_at: SystemTime,
        trace_id: TraceId,
    ) -> Vec<Result<Insert, StoreError>> {
        let mut results = Vec::with_capacity(events.len());
        for event in events {
            results.push(self.insert(event, received_at, trace_id).await);
        }
        results
    }
    /// The record for `id`, if held; an error when the store could not be
    /// asked (whether the event exists is then unknown).
    async fn get(&self, id: &EventId) -> Result<Option<Arc<Record>>, StoreError>;
    /// How processing of `record` ended, if it has, as the store knows it
    /// now (a shared store learns of outcomes set by other processes).
    async fn outcome(&self, record: &Record) -> Option<Outcome> {
        record.outcome().cloned()
    }
    /// Why the store cannot take events now, if it cannot (readiness and
    /// ingest answer 503 meanwhile).
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Whether a record without an outcome is surely in the queue: true in
    /// one process; false where a crash between the store's write and the
    /// queue's can leave it unqueued (a retry then queues it again).
    fn pending_is_queued(&self) -> bool {
        true
    }
    /// The record with arrival sequence `sequence`, if still held.
    async fn get_by_sequence(&self, sequence: u64) -> Option<Arc<Record>>;
    /// The records with these arrival sequences, each if still held.
    async fn get_many_by_sequence(&self, sequences: &[u64]) -> Vec<Option<Arc<Record>>> {
        let mut records = Vec::with_capacity(sequences.len());
        for &sequence in sequences {
            records.push(self.get_by_sequence(sequence).await);
        }
        records
    }
    /// Removes a record that could not be queued after all.
    async fn remove(&self, record: &Record);
    /// Records the outcome; `false` if the record already had one (it keeps it).
    async fn complete(&self, record: &Record, outcome: CompleteWith) -> bool;
    /// Records that `records` were processed (a worker's pass); whether
    /// each got this outcome (`false`: it already had one).
    async fn complete_processed(&self, records: &[&Record], processing: Processing) -> Vec<bool> {
        let mut results = Vec::with_capacity(records.len());
        for record in records {
            let completed = self
                .complete(record, CompleteWith::Processed(processing))
                .await;
            results.push(completed);
        }
        results
    }
    /// Makes a failed record pending again, for another processing attempt:
    /// the fresh record that replaces it (same event, same arrival
    /// sequence), or `None` when `record` is no longer the failed one held
    /// (a concurrent retry, or it was evicted).
    async fn retry(&self, record: &Record) -> Result<Option<Arc<Record>>, StoreError>;
    /// How many times `record`'s event was queued for processing: 1, and
    /// one more for each retry.
    fn attempts(&self, record: &Record) -> u32;
    /// Records in arrival order; an error when the store could not be asked.
    async fn page(&self, query: PageQuery) -> Result<Page, StoreError>;
    /// Number of records held.
    fn len(&self) -> usize;
    /// Records evicted since start.
    fn evictions(&self) -> u64;
    /// Whether no record is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to record when processing ends.
#[derive(Debug)]
pub enum CompleteWith {
    /// Published; derived with these facts.
    Processed(Processing),
    /// Failed for this reason.
    Failed(String),
}
