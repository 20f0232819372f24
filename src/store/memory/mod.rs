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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{
    CompleteWith, Insert, Outcome, Page, PageQuery, Processing, Record, Status, Store, StoreError,
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
    evictions: AtomicU64,
    /// Assigning a publish sequence and making the outcome visible happen
    /// together under this lock, so that every publish sequence at or below
    /// the watermark belongs to a visible outcome (SSE replay relies on it).
    publish_counter: Mutex<u64>,
    publish_watermark: AtomicU64,
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
            publish_counter: Mutex::new(0),
            publish_watermark: AtomicU64::new(0),
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

    async fn get(&self, id: &EventId) -> Option<Arc<Record>> {
        self.by_id.get(id.as_str())
    }

    async fn remove(&self, record: &Record) {
        if self.by_id.remove(record) {
            self.by_sequence.lock().remove(record);
            self.release(1, record.footprint());
        }
    }

    async fn complete(&self, record: &Record, with: CompleteWith) -> Option<u64> {
        match with {
            CompleteWith::Processed(processing) => self
                .complete_processed(&[record], processing)
                .await
                .pop()
                .flatten(),
            CompleteWith::Failed(error) => {
                // Account for the error text before it becomes visible to
                // eviction, which subtracts the full footprint of finished records.
                let extra = error.len();
                self.bytes.fetch_add(extra, Ordering::Relaxed);
                let error = error.into_boxed_str();
                if record.outcome.set(Outcome::Failed { error }).is_err() {
                    self.bytes.fetch_sub(extra, Ordering::Relaxed);
                }
                None
            }
        }
    }

    async fn complete_processed(
        &self,
        records: &[&Record],
        processing: Processing,
    ) -> Vec<Option<u64>> {
        let mut counter = self.publish_counter.lock();
        let results = records
            .iter()
            .map(|record| {
                let publish_seq = *counter + 1;
                let outcome = Outcome::Processed {
                    worker: processing.worker,
                    processed_at: processing.processed_at,
                    publish_seq,
                };
                record.outcome.set(outcome).ok()?;
                *counter = publish_seq;
                Some(publish_seq)
            })
            .collect();
        self.publish_watermark.store(*counter, Ordering::Release);
        results
    }

    async fn page(&self, query: PageQuery) -> Page {
        let mut records = Vec::with_capacity(query.limit.min(1024));
        let mut next = None;
        let matches = |record: &Record| {
            if query.status.is_some_and(|s| record.status() != s) {
                return false;
            }
            match query.published_up_to {
                None => true,
                Some(limit) => matches!(
                    record.outcome(),
                    Some(Outcome::Processed { publish_seq, .. }) if *publish_seq <= limit
                ),
            }
        };
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
        Page { records, next }
    }

    fn publish_watermark(&self) -> u64 {
        self.publish_watermark.load(Ordering::Acquire)
    }

    fn len(&self) -> usize {
        self.by_sequence.lock().len()
    }

    fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use futures_util::FutureExt;

    use super::*;
    use crate::event::EventId;
    use crate::store::Processing;

    fn settings(max_events: usize, max_bytes: usize) -> StoreSettings {
        StoreSettings {
            max_events,
            max_bytes,
        }
    }

    fn event(id: &str, payload: &str) -> Event {
        Event {
            id: EventId::parse(id).unwrap(),
            timestamp: 1,
            payload: payload.into(),
        }
    }

    async fn insert(store: &MemoryStore, id: &str, payload: &str) -> Result<Insert, StoreError> {
        store
            .insert(event(id, payload), SystemTime::now(), TraceId::random())
            .await
    }

    async fn inserted(store: &MemoryStore, id: &str) -> Arc<Record> {
        match insert(store, id, "p").await.unwrap() {
            Insert::Inserted(r) => r,
            other => panic!("expected insert, got {other:?}"),
        }
    }

    async fn process(store: &MemoryStore, record: &Record) -> Option<u64> {
        let processing = Processing {
            worker: 0,
            processed_at: crate::time::UnixNanos::now(),
        };
        store
            .complete(record, CompleteWith::Processed(processing))
            .await
    }

    #[tokio::test]
    async fn duplicates_and_conflicts() {
        let store = MemoryStore::new(&settings(10, 1 << 20));
        let first = inserted(&store, "a").await;
        assert_eq!(first.sequence, 1);
        assert!(
            matches!(insert(&store, "a", "p").await, Ok(Insert::Duplicate(r)) if r.sequence == 1)
        );
        assert!(matches!(
            insert(&store, "a", "other").await,
            Ok(Insert::Conflict(_))
        ));
        assert_eq!(store.len(), 1);
        assert_eq!(inserted(&store, "b").await.sequence, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_inserts_get_unique_dense_sequences() {
        let store = Arc::new(MemoryStore::new(&settings(100_000, 1 << 30)));
        let mut tasks = Vec::new();
        for t in 0..16 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..500 {
                    match insert(&store, &format!("{t}-{i}"), "x").await.unwrap() {
                        Insert::Inserted(r) => seqs.push(r.sequence),
                        other => panic!("{other:?}"),
                    }
                }
                seqs
            }));
        }
        let mut all = HashSet::new();
        for task in tasks {
            for seq in task.await.unwrap() {
                assert!(all.insert(seq), "sequence {seq} given twice");
            }
        }
        assert_eq!(all.len(), 8000);
        assert_eq!(all.iter().max(), Some(&8000));
        assert_eq!(store.len(), 8000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn duplicate_race_has_exactly_one_winner() {
        for round in 0..20 {
            let store = Arc::new(MemoryStore::new(&settings(1000, 1 << 20)));
            let barrier = Arc::new(tokio::sync::Barrier::new(32));
            let mut tasks = Vec::new();
            for _ in 0..32 {
                let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    insert(&store, &format!("same-{round}"), "p").await.unwrap()
                }));
            }
            let mut winners = 0;
            for task in tasks {
                match task.await.unwrap() {
                    Insert::Inserted(_) => winners += 1,
                    Insert::Duplicate(_) => {}
                    Insert::Conflict(r) => panic!("conflict for identical content: {r:?}"),
                }
            }
            assert_eq!(winners, 1);
            assert_eq!(store.len(), 1);
        }
    }

    #[tokio::test]
    async fn evicts_oldest_processed_first_and_never_pending() {
        let store = MemoryStore::new(&settings(4, 1 << 20));
        let a = inserted(&store, "a").await;
        let b = inserted(&store, "b").await;
        let c = inserted(&store, "c").await;
        let _d = inserted(&store, "d").await;
        // a stays pending; b and c are processed; b is older than c.
        process(&store, &c).await;
        process(&store, &b).await;
        let _e = inserted(&store, "e").await;
        assert!(
            store.get(&a.event.id).await.is_some(),
            "pending is never evicted"
        );
        assert!(
            store.get(&b.event.id).await.is_none(),
            "oldest processed goes first"
        );
        assert!(store.get(&c.event.id).await.is_some());
        assert_eq!(store.len(), 4);
        assert_eq!(store.evictions(), 1);
        // Evicted ids may be accepted again: the idempotency window is the store.
        assert!(matches!(
            insert(&store, "b", "p").await,
            Ok(Insert::Inserted(_))
        ));
    }

    #[tokio::test]
    async fn a_large_eviction_pass_removes_exactly_the_oldest_from_every_shard() {
        const MAX: usize = 70_000;
        let store = MemoryStore::new(&settings(MAX, 1 << 30));
        for i in 0..MAX {
            let record = inserted(&store, &format!("id-{i}")).await;
            process(&store, &record).await;
        }
        inserted(&store, "one-more").await;
        // One pass frees 1/64 of the bound beyond the insert's own need.
        let evicted = MAX / EVICTION_SLACK_DIVISOR + 1;
        assert_eq!(store.evictions(), evicted as u64);
        assert_eq!(store.len(), MAX - evicted + 1);
        for i in [0, evicted / 2, evicted - 1] {
            let id = EventId::parse(&format!("id-{i}")).unwrap();
            assert!(store.get(&id).await.is_none(), "id-{i} was evicted");
        }
        for i in [evicted, MAX / 2, MAX - 1] {
            let id = EventId::parse(&format!("id-{i}")).unwrap();
            assert!(store.get(&id).await.is_some(), "id-{i} is kept");
        }
        // The ids can be taken again, so the index let go of every one.
        for i in 0..evicted {
            assert!(matches!(
                insert(&store, &format!("id-{i}"), "again").await,
                Ok(Insert::Inserted(_))
            ));
        }
    }

    #[tokio::test]
    async fn a_batch_insert_answers_like_inserts_one_by_one() {
        let store = MemoryStore::new(&settings(100, 1 << 20));
        inserted(&store, "held").await;
        let events = vec![
            event("new-1", "p"),
            event("held", "p"),
            event("held", "changed"),
            event("new-2", "p"),
            event("new-1", "p"),
            event("new-2", "other"),
        ];
        let results = store
            .insert_batch(events, SystemTime::now(), TraceId::random())
            .await;
        assert_eq!(
            summary(&results),
            [
                ("inserted", 2),
                ("duplicate", 1),
                ("conflict", 1),
                ("inserted", 3),
                ("duplicate", 2),
                ("conflict", 3),
            ]
        );
        assert_eq!(store.len(), 3);
    }

    /// What each insert answered: its kind and the record's sequence.
    fn summary(results: &[Result<Insert, StoreError>]) -> Vec<(&'static str, u64)> {
        results
            .iter()
            .map(|r| match r {
                Ok(Insert::Inserted(r)) => ("inserted", r.sequence),
                Ok(Insert::Duplicate(r)) => ("duplicate", r.sequence),
                Ok(Insert::Conflict(r)) => ("conflict", r.sequence),
                Err(_) => ("error", 0),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_large_batch_inserted_under_one_hold_of_each_lock_answers_like_inserts_one_by_one() {
        // Enough new events for the one-hold path, with held ids, repeats
        // and conflicts among them.
        let events: Vec<Event> = (0..200)
            .map(|i| match i % 10 {
                3 => event("held", "p"),
                6 => event("held", "changed"),
                8 => event(&format!("e{}", i - 5), "p"),
                9 => event(&format!("e{}", i - 5), "other"),
                _ => event(&format!("e{i}"), "p"),
            })
            .collect();
        let batched = MemoryStore::new(&settings(1000, 1 << 20));
        let one_by_one = MemoryStore::new(&settings(1000, 1 << 20));
        for store in [&batched, &one_by_one] {
            inserted(store, "held").await;
        }
        let results = batched
            .insert_batch(events.clone(), SystemTime::now(), TraceId::random())
            .await;
        let mut expected = Vec::new();
        for event in events {
            expected.push(
                one_by_one
                    .insert(event, SystemTime::now(), TraceId::random())
                    .await,
            );
        }
        assert_eq!(summary(&results), summary(&expected));
        assert_eq!(batched.len(), 141);
        assert_eq!(batched.len(), one_by_one.len());
        assert_eq!(batched.bytes(), one_by_one.bytes());
        let e0 = EventId::parse("e0").unwrap();
        assert_eq!(batched.get(&e0).await.map(|r| r.sequence), Some(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_batches_with_the_same_ids_insert_each_id_once() {
        let store = Arc::new(MemoryStore::new(&settings(100_000, 1 << 30)));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let mut inserted = Vec::new();
                for round in 0..20 {
                    let events = (0..100)
                        .map(|i| event(&format!("{round}-{i}"), "x"))
                        .collect();
                    for result in store
                        .insert_batch(events, SystemTime::now(), TraceId::random())
                        .await
                    {
                        match result.unwrap() {
                            Insert::Inserted(r) => inserted.push(r.sequence),
                            Insert::Duplicate(_) => {}
                            Insert::Conflict(r) => panic!("conflict on {}", r.event.id),
                        }
                    }
                }
                inserted
            }));
        }
        let mut sequences = Vec::new();
        for task in tasks {
            sequences.extend(task.await.unwrap());
        }
        sequences.sort_unstable();
        // Each id inserted once, with dense sequences and nothing left over.
        assert_eq!(sequences, (1..=2000).collect::<Vec<u64>>());
        assert_eq!(store.len(), 2000);
        let mut held_bytes = 0;
        for round in 0..20 {
            for i in 0..100 {
                let id = EventId::parse(&format!("{round}-{i}")).unwrap();
                held_bytes += store.get(&id).await.unwrap().footprint();
            }
        }
        assert_eq!(store.bytes(), held_bytes);
    }

    #[tokio::test]
    async fn a_batch_that_does_not_fit_whole_takes_what_fits() {
        let store = MemoryStore::new(&settings(4, 1 << 20));
        inserted(&store, "a").await;
        inserted(&store, "b").await;
        // Both pending, so nothing can be evicted: room for two of three.
        let results = store
            .insert_batch(
                vec![event("c", "p"), event("d", "p"), event("e", "p")],
                SystemTime::now(),
                TraceId::random(),
            )
            .await;
        assert!(matches!(results[0], Ok(Insert::Inserted(_))));
        assert!(matches!(results[1], Ok(Insert::Inserted(_))));
        assert!(matches!(results[2], Err(StoreError::Full)));
        assert_eq!(store.len(), 4);
    }

    #[tokio::test]
    async fn full_of_pending_refuses_instead_of_growing() {
        let store = MemoryStore::new(&settings(2, 1 << 20));
        inserted(&store, "a").await;
        inserted(&store, "b").await;
        assert_eq!(
            insert(&store, "c", "p").await.unwrap_err(),
            StoreError::Full
        );
        assert_eq!(store.len(), 2);
        // A refused insert reserves nothing.
        let bytes = store.bytes();
        assert_eq!(
            insert(&store, "c", "p").await.unwrap_err(),
            StoreError::Full
        );
        assert_eq!(store.bytes(), bytes);
    }

    #[tokio::test]
    async fn byte_bound_evicts_large_processed_records() {
        let payload = "x".repeat(60 * 1024);
        let store = MemoryStore::new(&settings(1000, 300 * 1024));
        let mut held = Vec::new();
        for i in 0..20 {
            let record = match insert(&store, &i.to_string(), &payload).await.unwrap() {
                Insert::Inserted(r) => r,
                other => panic!("{other:?}"),
            };
            process(&store, &record).await;
            held.push(record);
            assert!(
                store.bytes() <= 300 * 1024,
                "bytes {} over bound",
                store.bytes()
            );
        }
        assert!(store.len() < 5);
        assert!(store.get(&held[19].event.id).await.is_some());
    }

    #[tokio::test]
    async fn pagination_cursor_and_status_filter() {
        let store = MemoryStore::new(&settings(100, 1 << 20));
        let mut records = Vec::new();
        for i in 0..10 {
            records.push(inserted(&store, &format!("e{i}")).await);
        }
        for r in records.iter().step_by(2) {
            process(&store, r).await;
        }
        let page = store
            .page(PageQuery {
                after: 0,
                limit: 4,
                ..Default::default()
            })
            .await;
        let seqs: Vec<u64> = page.records.iter().map(|r| r.sequence).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(page.next, Some(4));
        let page = store
            .page(PageQuery {
                after: 4,
                limit: 4,
                ..Default::default()
            })
            .await;
        assert_eq!(
            page.records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            [5, 6, 7, 8]
        );
        let last = store
            .page(PageQuery {
                after: 8,
                limit: 4,
                ..Default::default()
            })
            .await;
        assert_eq!(last.records.len(), 2);
        assert_eq!(last.next, None, "no cursor past the end");
        let exact = store
            .page(PageQuery {
                after: 6,
                limit: 4,
                ..Default::default()
            })
            .await;
        assert_eq!(exact.records.len(), 4);
        assert_eq!(exact.next, None, "an exactly full last page has no cursor");
        let pending = store
            .page(PageQuery {
                after: 0,
                limit: 100,
                status: Some(Status::Pending),
                ..Default::default()
            })
            .await;
        assert_eq!(
            pending
                .records
                .iter()
                .map(|r| r.sequence)
                .collect::<Vec<_>>(),
            [2, 4, 6, 8, 10]
        );
    }

    #[tokio::test]
    async fn publish_sequence_and_watermark() {
        let store = MemoryStore::new(&settings(100, 1 << 20));
        let a = inserted(&store, "a").await;
        let b = inserted(&store, "b").await;
        assert_eq!(store.publish_watermark(), 0);
        assert_eq!(process(&store, &b).await, Some(1));
        assert_eq!(process(&store, &a).await, Some(2));
        assert_eq!(process(&store, &a).await, None, "an outcome is set once");
        assert_eq!(store.publish_watermark(), 2);
        let up_to_1 = store
            .page(PageQuery {
                after: 0,
                limit: 10,
                published_up_to: Some(1),
                ..Default::default()
            })
            .await;
        assert_eq!(up_to_1.records.len(), 1);
        assert_eq!(up_to_1.records[0].event.id.as_str(), "b");
    }

    #[tokio::test]
    async fn a_chunk_completes_with_consecutive_publish_sequences() {
        let store = MemoryStore::new(&settings(100, 1 << 20));
        let a = inserted(&store, "a").await;
        let b = inserted(&store, "b").await;
        let c = inserted(&store, "c").await;
        assert_eq!(process(&store, &b).await, Some(1));
        let processing = Processing {
            worker: 3,
            processed_at: crate::time::UnixNanos::now(),
        };
        let seqs = store.complete_processed(&[&*a, &*b, &*c], processing).await;
        assert_eq!(
            seqs,
            [Some(2), None, Some(3)],
            "a record with an outcome keeps it and takes no number"
        );
        assert_eq!(store.publish_watermark(), 3);
        assert_eq!(c.status(), Status::Processed);
    }

    #[test]
    fn concurrent_inserts_into_a_full_store_evict_and_never_fail() {
        const THREADS: usize = 4;
        let store = Arc::new(MemoryStore::new(&settings(10_000, 1 << 30)));
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let store = Arc::clone(&store);
                scope.spawn(move || {
                    for i in 0..200_000 / THREADS {
                        let inserted = insert(&store, &format!("{t}-{i}"), "p")
                            .now_or_never()
                            .unwrap();
                        let Ok(Insert::Inserted(record)) = inserted else {
                            panic!("insert {t}-{i}: {inserted:?}");
                        };
                        process(&store, &record).now_or_never().unwrap();
                    }
                });
            }
        });
        assert!(store.len() <= 10_000);
        assert!(store.evictions() >= 190_000);
    }

    #[tokio::test]
    async fn huge_bounds_are_not_allocated_up_front() {
        let store = MemoryStore::new(&settings(usize::MAX / 2, usize::MAX / 2));
        assert!(matches!(
            insert(&store, "a", "p").await,
            Ok(Insert::Inserted(_))
        ));
    }

    #[tokio::test]
    async fn remove_rolls_back_an_insert() {
        let store = MemoryStore::new(&settings(100, 1 << 20));
        let a = inserted(&store, "a").await;
        store.remove(&a).await;
        assert!(store.get(&a.event.id).await.is_none());
        assert_eq!(store.len(), 0);
        assert_eq!(store.bytes(), 0);
    }
}
