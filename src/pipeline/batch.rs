//! Batch admission: the valid events of a batch request all fit, or none
//! is taken; repeats inside the batch and retries of stored events are
//! answered like single retries; accepted events are queued in chunks.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tracing::Instrument;

use super::Pipeline;
use super::admission::{IngestError, REQUEUED, RejectReason};
use crate::event::{Event, EventId};
use crate::queue::{Attempt, CHUNK_BYTES, CHUNK_EVENTS, Overloaded, Permit};
use crate::store::{Insert, Record, StoreError, event_footprint};
use crate::telemetry;
use crate::trace_id::TraceId;

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
    /// Per event, when one is queued again by a retry (else empty).
    attempts: Vec<Attempt>,
    /// Events queued again by a retry (answered as duplicates).
    requeued: usize,
}

impl Chunk {
    fn push(&mut self, index: usize, size: usize, record: Arc<Record>, requeued: bool) {
        if self.records.is_empty() {
            self.indexes.reserve(CHUNK_EVENTS);
            self.records.reserve(CHUNK_EVENTS);
        }
        if requeued {
            self.attempts.resize(self.records.len(), Attempt::default());
            self.attempts.push(REQUEUED);
            self.requeued += 1;
        } else if !self.attempts.is_empty() {
            self.attempts.push(Attempt::default());
        }
        self.indexes.push(index);
        self.bytes += size;
        self.records.push(record);
    }

    fn is_full(&self) -> bool {
        self.records.len() == CHUNK_EVENTS || self.bytes >= CHUNK_BYTES
    }
}

impl Pipeline {
    /// Accepts the valid events of a batch: all of the new ones fit, or the
    /// whole batch is refused with [`IngestError::Overloaded`] (or
    /// [`IngestError::NeverFits`] when they would not fit even in an empty
    /// pipeline). Counts what became of each (the front end has counted
    /// the batch's invalid events with [`super::Admission::read`]).
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
        let valid = events.len();
        let outcome = self
            .within_deadline(self.ingest_batch_inner(events, trace_id))
            .instrument(span)
            .await;
        let admission = &self.inner.admission;
        match &outcome {
            Ok(outcome) => {
                admission.accepted(outcome.accepted);
                admission.duplicate(outcome.duplicates);
                for rejection in &outcome.rejected {
                    admission.rejected(rejection.reason, 1);
                }
            }
            Err(error) => admission.rejected(error.reason(), valid),
        }
        outcome
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
                    match store.get(&event.id).await? {
                        Some(held) if held.same_content(&event) && self.surely_queued(&held) => {
                            outcome.duplicates += 1;
                        }
                        // Maybe never queued: it needs room to be queued again.
                        Some(held) if held.same_content(&event) => {
                            new_events.push(event);
                            new_placed.push(placed);
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
        let inserted = store.insert_batch(events, received_at, trace_id).await;
        // All or nothing when the store cannot be reached: what it did take
        // goes back out (a retry heals what cannot be taken back).
        if let Some(why) = inserted.iter().find_map(|inserted| match inserted {
            Err(StoreError::Unavailable(why)) => Some(why.clone()),
            _ => None,
        }) {
            for inserted in &inserted {
                if let Ok(Insert::Inserted(record)) = inserted {
                    store.remove(record).await;
                }
            }
            return Err(IngestError::Unavailable(why));
        }
        let mut chunks = Vec::new();
        let mut chunk = Chunk::default();
        for (placed, inserted) in placed.into_iter().zip(inserted) {
            let Placed {
                position,
                index,
                size,
                id,
            } = placed;
            match inserted {
                Ok(Insert::Inserted(record)) => {
                    chunk.push(index, size, record, false);
                    if chunk.is_full() {
                        chunks.push(std::mem::take(&mut chunk));
                    }
                    continue;
                }
                Ok(Insert::Requeue(record)) => {
                    chunk.push(index, size, record, true);
                    if chunk.is_full() {
                        chunks.push(std::mem::take(&mut chunk));
                    }
                    continue;
                }
                Ok(Insert::Duplicate(_)) => outcome.duplicates += 1,
                Ok(Insert::Conflict(_)) => {
                    conflicted[position] = true;
                    outcome.rejected.push(conflict(index, &id));
                }
                Err(err) => outcome.rejected.push(BatchRejection {
                    index,
                    reason: IngestError::from(err.clone()).reason(),
                    id: Some(id.to_string()),
                    error: err.to_string(),
                }),
            }
            // Not stored: give its room back now.
            drop(permit.split(1, size));
        }
        if !chunk.records.is_empty() {
            chunks.push(chunk);
        }
        self.enqueue_chunks(chunks, &mut permit, enqueued_at, &mut outcome)
            .await?;
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

    /// Queues a batch's chunks, each with its share of the batch's permit,
    /// all at once (a shared queue answers them in one round trip); counts
    /// their events as accepted (or, queued again, as duplicates). When
    /// none could be queued the batch is refused as a whole; otherwise the
    /// events of a chunk that could not be are listed as rejected.
    async fn enqueue_chunks(
        &self,
        chunks: Vec<Chunk>,
        permit: &mut Permit,
        enqueued_at: Instant,
        outcome: &mut BatchOutcome,
    ) -> Result<(), IngestError> {
        let mut queued = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let Chunk {
                indexes,
                bytes,
                records,
                attempts,
                requeued,
            } = chunk;
            let events = records.len();
            // The batch's permit covers every stored event by construction.
            let Some(share) = permit.split(events, bytes) else {
                for record in &records {
                    self.inner.store.remove(record).await;
                }
                return Err(IngestError::Overloaded);
            };
            queued.push(async move {
                let result = self.enqueue(records, share, enqueued_at, attempts).await;
                (indexes, requeued, result)
            });
        }
        let results = futures_util::future::join_all(queued).await;
        let any_queued = results.iter().any(|(_, _, result)| result.is_ok());
        for (indexes, requeued, result) in results {
            match result {
                Ok(()) => {
                    outcome.accepted += indexes.len() - requeued;
                    outcome.duplicates += requeued;
                }
                Err((err, _)) if !any_queued => return Err(err),
                Err((err, records)) => {
                    outcome
                        .rejected
                        .extend(indexes.into_iter().zip(records).map(|(index, record)| {
                            BatchRejection {
                                index,
                                reason: err.reason(),
                                id: Some(record.event.id.to_string()),
                                error: err.to_string(),
                            }
                        }));
                }
            }
        }
        Ok(())
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
