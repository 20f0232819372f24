//! The in-memory store: a sharded hash table for lookup by id and a ring
//! buffer of dense sequence numbers for arrival order.
//!
//! Bounds: `store.max_events` records and `store.max_bytes` estimated bytes.
//! When an insert would pass either bound the oldest *finished* records are
//! evicted; pending ones never are (their count is bounded by the queue), so
//! an insert fails with [`StoreError::Full`] only when finished records
//! cannot make room.
//!
//! Locks: an insert holds its id shard, then briefly the order index (which
//! hands out the sequence); a large batch holds every id shard (taken in
//! shard order), then the order index. Eviction takes the order index alone
//! and removes from the id shards only after letting it go, so inserts and
//! eviction never wait on each other in opposite order.

mod by_id;
mod by_sequence;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{
    CompleteWith, Insert, Outcome, Page, PageQuery, Record, Status, Store, StoreError,
    event_footprint,
};
use crate::config::StoreSettings;
use crate::event::{Event, EventId};
use crate::trace_id::TraceId;
use by_id::{Found, IdIndex};
use by_sequence::{Scan, SequenceIndex, Verdict};

/// Eviction frees this fraction of a bound beyond what the insert needs
/// (244 records of the default 1,000,000), so that it runs for many inserts
/// at once rather than on every insert of a full store, while a pass's
/// records stay in the cache from one of its steps to the next (judging
/// them, removing them from the id index, freeing them). Passes of 1/64
/// made batch ingest 5–10 % slower (`docs/performance.md`).
const EVICTION_SLACK_DIVISOR: usize = 4096;

/// Slots a page scan looks at per hold of the order lock, so that a filtered
/// scan over a large store never stalls inserts for long.
const SCAN_SLOTS_PER_LOCK: usize = 4096;

/// The indexes are sized up front for at most this many records; beyond
/// that they grow on demand (and the id index may then double under churn).
const PRESIZE_LIMIT: usize = 1 << 24;

/// In-memory, bounded, concurrent event store.
#[derive(Debug)]
pub struct MemoryStore {
    by_id: IdIndex,
    by_sequence: Mutex<SequenceIndex>,
    /// Records held, including reservations of inserts in progress.
    len: AtomicUsize,
    /// Estimated bytes held, including reservations.
    bytes: AtomicUsize,
    max_events: usize,
    max_bytes: usize,
    /// Serialises eviction passes; the insert fast path never takes it.
    evicting: Mutex<()>,
    /// Retries so far of the events retried at least once, by arrival
    /// sequence (a record has no room for the count: see its size bound);
    /// an entry leaves with its record.
    retries: Mutex<HashMap<u64, u32>>,
    evictions: AtomicU64,
}

impl MemoryStore {
    /// An empty store with the given bounds.
    pub fn new(settings: &StoreSettings) -> Self {
        // Room for the bound plus the eviction slack and pending records
        // overtaken by finished ones, so that a full store does not grow it.
        let order_capacity = settings
            .max_events
            .saturating_add(settings.max_events / 8)
            .min(PRESIZE_LIMIT);
        Self {
            by_id: IdIndex::new(settings.max_events.min(PRESIZE_LIMIT)),
            by_sequence: Mutex::new(SequenceIndex::with_capacity(order_capacity)),
            len: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_events: settings.max_events,
            max_bytes: settings.max_bytes,
            evicting: Mutex::new(()),
            evictions: AtomicU64::new(0),
            retries: Mutex::new(HashMap::new()),
        }
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn existing(record: Arc<Record>, event: &Event) -> Insert {
        if record.same_content(event) {
            Insert::Duplicate(record)
        } else {
            Insert::Conflict(record)
        }
    }

    fn release(&self, records: usize, bytes: usize) {
        self.len.fetch_sub(records, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Inserts an event whose id (hashed to `hash`) was not found just now;
    /// a racing insert of the same id may still win.
    fn insert_absent(
        &self,
        hash: u64,
        event: Event,
        received_at: SystemTime,
        trace_id: TraceId,
    ) -> Result<Insert, StoreError> {
        let bytes = event_footprint(&event);
        // Eviction takes id shard locks, so it must run before this insert
        // holds one.
        self.reserve(1, bytes)?;
        let inserted = self.by_id.insert_new(hash, event, |event| {
            self.by_sequence
                .lock()
                .push_with(|sequence| Arc::new(Record::new(event, sequence, received_at, trace_id)))
        });
        match inserted {
            Ok(record) => Ok(Insert::Inserted(record)),
            Err((held, event)) => {
                self.release(1, bytes);
                Ok(Self::existing(held, &event))
            }
        }
    }

    /// Inserts `events` (whose ids hash to `hashes`), room for all of which
    /// is reserved, with each lock taken once: every id shard, then (lock
    /// order) the order index. A retry gives its room back.
    ///
    /// The steps are ordered for the cache (see [`by_id::AllShards`]): look
    /// every id up; build the new records (allocations and plain stores);
    /// take their references for the two indexes (atomic instructions, on
    /// lines just written); link them in (moves).
    fn insert_reserved(
        &self,
        events: Vec<Event>,
        hashes: Vec<u64>,
        received_at: SystemTime,
        trace_id: TraceId,
    ) -> Vec<Result<Insert, StoreError>> {
        let mut shards = self.by_id.lock_all();
        let found = shards.find_all(&events, &hashes);
        let mut order = self.by_sequence.lock();
        let mut sequence = order.next_sequence();
        let mut results: Vec<Result<Insert, StoreError>> = Vec::with_capacity(events.len());
        for (event, found) in events.into_iter().zip(found) {
            let result = match found {
                Found::New => {
                    let record = Record::new(event, sequence, received_at, trace_id);
                    sequence += 1;
                    Ok(Insert::Inserted(Arc::new(record)))
                }
                Found::Held(held) => {
                    self.release(1, event_footprint(&event));
                    Ok(Self::existing(held, &event))
                }
                Found::Earlier(position) => {
                    self.release(1, event_footprint(&event));
                    match results.get(position) {
                        Some(Ok(Insert::Inserted(first))) => {
                            Ok(Self::existing(Arc::clone(first), &event))
                        }
                        // Not reached: `Earlier` names a new event.
                        _ => Err(StoreError::Full),
                    }
                }
            };
            results.push(result);
        }
        let inserted = || {
            results
                .iter()
                .zip(&hashes)
                .filter_map(|(result, &hash)| match result {
                    Ok(Insert::Inserted(record)) => Some((hash, record)),
                    _ => None,
                })
        };
        order.push_all(inserted().map(|(_, record)| record));
        drop(order);
        let linked = inserted()
            .map(|(hash, record)| (hash, Arc::clone(record)))
            .collect();
        shards.insert_all(linked);
        results
    }

    /// Reserves room for `records` records of `bytes` in total, evicting
    /// finished records if a bound would be passed.
    fn reserve(&self, records: usize, bytes: usize) -> Result<(), StoreError> {
        let len = self.len.fetch_add(records, Ordering::Relaxed) + records;
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if len <= self.max_events && total <= self.max_bytes {
            return Ok(());
        }
        // A pass that reached its target did so with this reservation
        // counted, so the record fits, even if other inserts fill the room
        // before this one looks again (they evict for themselves).
        if self.evict() == EvictionPass::Exhausted
            && (self.len.load(Ordering::Relaxed) > self.max_events
                || self.bytes.load(Ordering::Relaxed) > self.max_bytes)
        {
            self.release(records, bytes);
            return Err(StoreError::Full);
        }
        Ok(())
    }

    /// Drops the retry counts of records that left.
    fn forget_retries(&self, gone: &[Arc<Record>]) {
        let mut retries = self.retries.lock();
        if !retries.is_empty() {
            for record in gone {
                retries.remove(&record.sequence);
            }
        }
    }

    /// Evicts the oldest finished records until both bounds have slack.
    fn evict(&self) -> EvictionPass {
        let _guard = self.evicting.lock();
        let target_len = self.max_events - self.max_events / EVICTION_SLACK_DIVISOR;
        let target_bytes = self.max_bytes - self.max_bytes / EVICTION_SLACK_DIVISOR;
        // What the pass frees is counted here and released once at the end:
        // an atomic per record would wait for each record's cache miss in turn.
        let mut freed_records = 0;
        let mut freed_bytes = 0;
        let (evicted, reached) = self.by_sequence.lock().evict_oldest(|record| {
            let below_target = self
                .len
                .load(Ordering::Relaxed)
                .saturating_sub(freed_records)
                <= target_len
                && self
                    .bytes
                    .load(Ordering::Relaxed)
                    .saturating_sub(freed_bytes)
                    <= target_bytes;
            if below_target {
                Verdict::Stop
            } else if record.status() == Status::Pending {
                Verdict::Keep
            } else {
                freed_records += 1;
                freed_bytes += record.footprint();
                Verdict::Evict
            }
        });
        self.len.fetch_sub(freed_records, Ordering::Relaxed);
        self.bytes.fetch_sub(freed_bytes, Ordering::Relaxed);
        self.by_id.remove_all(&evicted);
        self.forget_retries(&evicted);
        self.evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        if reached {
            EvictionPass::Reached
        } else {
            EvictionPass::Exhausted
        }
    }
}

/// How an eviction pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EvictionPass {
    /// Both bounds had their slack when it stopped (others may have used
    /// it up since).
    Reached,
    /// It ran out of finished records before the bounds had their slack.
    Exhausted,
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert(
        &self,
        event: Event,
        received_at: SystemTime,
        trace_id: TraceId,
    ) -> Result<Insert, StoreError> {
        let hash = self.by_id.hash(event.id.as_str());
        // Retries are answered without touching the bounds.
        if let Some(record) = self.by_id.get_hashed(hash, event.id.as_str()) {
            return Ok(Self::existing(record, &event));
        }
        self.insert_absent(hash, event, received_at, trace_id)
    }

    async fn insert_batch(
        &self,
        events: Vec<Event>,
        received_at: SystemTime,
        trace_id: TraceId,
    ) -> Vec<Result<Insert, StoreError>> {
        let hashes: Vec<u64> = events
            .iter()
            .map(|e| self.by_id.hash(e.id.as_str()))
            .collect();
        // A batch takes room for all its events up front, as if all were
        // new (the usual case), and each retry among them gives it back.
        let bytes = events.iter().map(event_footprint).sum();
        if events.len() >= self.by_id.shard_count() && self.reserve(events.len(), bytes).is_ok() {
            return self.insert_reserved(events, hashes, received_at, trace_id);
        }
        // A small batch, or one that does not fit whole: look up first, so
        // that retries take no room; each new event then reserves its own,
        // and those that still fit get in.
        let keys: Vec<(u64, &str)> = hashes
            .iter()
            .zip(&events)
            .map(|(&hash, e)| (hash, e.id.as_str()))
            .collect();
        let held = self.by_id.get_all(&keys);
        drop(keys);
        events
            .into_iter()
            .zip(hashes)
            .zip(held)
            .map(|((event, hash), held)| match held {
                Some(record) => Ok(Self::existing(record, &event)),
                None => self.insert_absent(hash, event, received_at, trace_id),
            })
            .collect()
    }

    async fn get(&self, id: &EventId) -> Result<Option<Arc<Record>>, StoreError> {
        Ok(self.by_id.get(id.as_str()))
    }

    async fn get_by_sequence(&self, sequence: u64) -> Option<Arc<Record>> {
        self.by_sequence.lock().get(sequence)
    }

    async fn get_many_by_sequence(&self, sequences: &[u64]) -> Vec<Option<Arc<Record>>> {
        let order = self.by_sequence.lock();
        sequences
            .iter()
            .map(|&sequence| order.get(sequence))
            .collect()
    }

    async fn remove(&self, record: &Record) {
        if self.by_id.remove(record) {
            self.by_sequence.lock().remove(record);
            self.release(1, record.footprint());
            self.retries.lock().remove(&record.sequence);
        }
    }

    async fn retry(&self, record: &Record) -> Result<Option<Arc<Record>>, StoreError> {
        if record.status() != Status::Failed {
            return Ok(None);
        }
        let fresh = Arc::new(Record::with_outcome(
            record.event.clone(),
            record.sequence,
            record.received_at,
            record.trace_id,
            None,
        ));
        // The id index decides (under its shard lock) which of two racing
        // retries replaces the failed record; the loser finds it gone.
        if !self.by_id.replace(record, Arc::clone(&fresh)) {
            return Ok(None);
        }
        if !self.by_sequence.lock().replace(record, Arc::clone(&fresh)) {
            // Evicted from the order index meanwhile: take it out whole.
            self.by_id.remove(&fresh);
            return Ok(None);
        }
        // The error text leaves with the failed record.
        self.bytes
            .fetch_sub(record.footprint() - fresh.footprint(), Ordering::Relaxed);
        *self.retries.lock().entry(record.sequence).or_default() += 1;
        Ok(Some(fresh))
    }

    fn attempts(&self, record: &Record) -> u32 {
        1 + self
            .retries
            .lock()
            .get(&record.sequence)
            .copied()
            .unwrap_or(0)
    }

    async fn complete(&self, record: &Record, with: CompleteWith) -> bool {
        match with {
            CompleteWith::Processed(processing) => record
                .outcome
                .set(Outcome::Processed {
                    worker: processing.worker,
                    processed_at: processing.processed_at,
                })
                .is_ok(),
            CompleteWith::Failed(error) => {
                // Account for the error text before it becomes visible to
                // eviction, which subtracts the full footprint of finished records.
                let extra = error.len();
                self.bytes.fetch_add(extra, Ordering::Relaxed);
                let error = error.into_boxed_str();
                let set = record.outcome.set(Outcome::Failed { error }).is_ok();
                if !set {
                    self.bytes.fetch_sub(extra, Ordering::Relaxed);
                }
                set
            }
        }
    }

    async fn page(&self, query: PageQuery) -> Result<Page, StoreError> {
        let mut records = Vec::with_capacity(query.limit.min(1024));
        let mut next = None;
        let matches = |record: &Record| query.status.is_none_or(|status| record.status() == status);
        let mut after = query.after;
        loop {
            let scan = self
                .by_sequence
                .lock()
                .scan(after, SCAN_SLOTS_PER_LOCK, |record| {
                    if !matches(record) {
                        return true;
                    }
                    if records.len() == query.limit {
                        next = records.last().map(|r: &Arc<Record>| r.sequence);
                        return false;
                    }
                    records.push(Arc::clone(record));
                    true
                });
            match scan {
                Scan::Paused(last) => after = last,
                Scan::Stopped | Scan::End => break,
            }
        }
        Ok(Page {
            records,
            next,
            incomplete: false,
        })
    }

    fn len(&self) -> usize {
        self.by_sequence.lock().len()
    }

    fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
