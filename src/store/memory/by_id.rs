//! Lookup by id: a sharded hash table of records, keyed by the id the record
//! itself holds.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use parking_lot::{RwLock, RwLockWriteGuard};

use crate::event::Event;
use crate::store::Record;

/// Most lookups a batch operation makes under one hold of a shard's lock.
const RUN: usize = 1024;

/// What an insert of a new record gives: the record, or the one already
/// held with that id along with the event.
pub(super) type InsertNew = Result<Arc<Record>, (Arc<Record>, Event)>;

/// What [`AllShards::find_all`] found for one event of a batch.
#[derive(Debug)]
pub(super) enum Found {
    /// A record with its id is held.
    Held(Arc<Record>),
    /// An earlier event of the batch (at this position) has its id and is new.
    Earlier(usize),
    /// Its id is new.
    New,
}

/// Every shard of an [`IdIndex`], write-locked.
///
/// A batch is inserted in steps that keep atomic instructions away from
/// stores to memory not in cache, because an atomic waits until every
/// store before it is done: looking up (reads only), building the records
/// and taking their references (the caller), then linking them into the
/// tables (moves only), so that the cache misses of one step overlap
/// instead of being paid one event at a time.
pub(super) struct AllShards<'a> {
    index: &'a IdIndex,
    tables: Vec<RwLockWriteGuard<'a, HashTable<Arc<Record>>>>,
}

impl std::fmt::Debug for AllShards<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllShards").finish_non_exhaustive()
    }
}

impl AllShards<'_> {
    /// For each of `events`, whose ids hash to `hashes`: whether its id is
    /// held, repeats a new one earlier in the batch, or is new.
    pub(super) fn find_all(&self, events: &[Event], hashes: &[u64]) -> Vec<Found> {
        let mut new_in_batch: HashTable<usize> = HashTable::with_capacity(events.len());
        events
            .iter()
            .zip(hashes)
            .enumerate()
            .map(|(position, (event, &hash))| {
                let table = &self.tables[self.index.shard_index(hash)];
                if let Some(held) = table.find(hash, |r| r.event.id == event.id) {
                    return Found::Held(Arc::clone(held));
                }
                match new_in_batch.entry(
                    hash,
                    |&earlier| events[earlier].id == event.id,
                    |&earlier| hashes[earlier],
                ) {
                    Entry::Occupied(earlier) => Found::Earlier(*earlier.get()),
                    Entry::Vacant(slot) => {
                        slot.insert(position);
                        Found::New
                    }
                }
            })
            .collect()
    }

    /// Links `records`, whose ids hash to the paired values and were found
    /// [`New`](Found::New), into the tables.
    pub(super) fn insert_all(&mut self, records: Vec<(u64, Arc<Record>)>) {
        let Self { index, tables } = self;
        for (hash, record) in records {
            tables[index.shard_index(hash)]
                .insert_unique(hash, record, |r| index.hash(r.event.id.as_str()));
        }
    }
}

/// Records by id. Each slot is one pointer: the key is read from the record,
/// where a map keyed by a copy of the id would spend 24 bytes a slot.
/// SipHash with a per-process key (`RandomState`), because ids are chosen by
/// clients.
#[derive(Debug)]
pub(super) struct IdIndex {
    shards: Box<[RwLock<HashTable<Arc<Record>>>]>,
    hasher: RandomState,
}

impl IdIndex {
    /// An index sized for `max_records` without ever growing.
    ///
    /// A table that holds a steady number of records while evicting and
    /// inserting fills with tombstones; hashbrown then rehashes in place only
    /// when it is at most half full, and otherwise doubles. Sizing every shard
    /// for twice its share up front makes that doubling happen never rather
    /// than at some point of a long run, so RSS stays flat. Untouched buckets
    /// cost address space, not memory.
    pub(super) fn new(max_records: usize) -> Self {
        let shard_count = std::thread::available_parallelism()
            .map_or(4, usize::from)
            .saturating_mul(4)
            .next_power_of_two();
        let per_shard = max_records.div_ceil(shard_count).saturating_mul(2);
        let shards = (0..shard_count)
            .map(|_| RwLock::new(HashTable::with_capacity(per_shard)))
            .collect();
        Self {
            shards,
            hasher: RandomState::new(),
        }
    }

    /// The hash of `id`, for the calls that take one (an insert looks up,
    /// then inserts: one hash for both).
    pub(super) fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    fn shard_index(&self, hash: u64) -> usize {
        // The table picks buckets with the low bits; shard on higher ones.
        usize::try_from(hash >> 32).unwrap_or_default() & (self.shards.len() - 1)
    }

    fn shard(&self, hash: u64) -> &RwLock<HashTable<Arc<Record>>> {
        &self.shards[self.shard_index(hash)]
    }

    /// The record with this id.
    pub(super) fn get(&self, id: &str) -> Option<Arc<Record>> {
        self.get_hashed(self.hash(id), id)
    }

    /// The record with this id, whose [`hash`](Self::hash) is `hash`.
    pub(super) fn get_hashed(&self, hash: u64, id: &str) -> Option<Arc<Record>> {
        self.shard(hash)
            .read()
            .find(hash, |r| r.event.id.as_str() == id)
            .cloned()
    }

    /// The record for each `(hash, id)`, in order; looked up a shard at a
    /// time, so that the cache misses of a batch overlap (see
    /// [`remove_all`](Self::remove_all)).
    pub(super) fn get_all(&self, keys: &[(u64, &str)]) -> Vec<Option<Arc<Record>>> {
        let mut found = vec![None; keys.len()];
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        for (position, &(hash, _)) in keys.iter().enumerate() {
            by_shard[self.shard_index(hash)].push(position);
        }
        for (shard, positions) in self.shards.iter().zip(&by_shard) {
            for run in positions.chunks(RUN) {
                let table = shard.read();
                for &position in run {
                    let (hash, id) = keys[position];
                    found[position] = table.find(hash, |r| r.event.id.as_str() == id).cloned();
                }
            }
        }
        found
    }

    /// Stores the record `make` builds from `event`, unless one with the
    /// same id is held: then that one comes back with the event. `make` runs
    /// under the shard's lock, so racing inserts of one id build one record.
    /// `hash` is the [`hash`](Self::hash) of the event's id.
    pub(super) fn insert_new(
        &self,
        hash: u64,
        event: Event,
        make: impl FnOnce(Event) -> Arc<Record>,
    ) -> InsertNew {
        let mut table = self.shard(hash).write();
        match table.entry(
            hash,
            |r| r.event.id == event.id,
            |r| self.hash(r.event.id.as_str()),
        ) {
            Entry::Occupied(held) => Err((Arc::clone(held.get()), event)),
            Entry::Vacant(slot) => {
                let record = make(event);
                slot.insert(Arc::clone(&record));
                Ok(record)
            }
        }
    }

    /// Number of shards: a batch of at least this many events is inserted
    /// with every shard locked at once ([`lock_all`](Self::lock_all)).
    pub(super) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Every shard write-locked, taken in shard order (the only order in
    /// which anyone holds more than one), for inserting a batch.
    pub(super) fn lock_all(&self) -> AllShards<'_> {
        AllShards {
            index: self,
            tables: self.shards.iter().map(|shard| shard.write()).collect(),
        }
    }

    /// Puts `fresh` where `record` itself is held (not a newer record with
    /// the same id); whether it was.
    pub(super) fn replace(&self, record: &Record, fresh: Arc<Record>) -> bool {
        let hash = self.hash(record.event.id.as_str());
        let mut table = self.shard(hash).write();
        match table.find_mut(hash, |held| std::ptr::eq(&**held, record)) {
            Some(held) => {
                *held = fresh;
                true
            }
            None => false,
        }
    }

    /// Removes `record` itself (not a newer record with the same id).
    pub(super) fn remove(&self, record: &Record) -> bool {
        let hash = self.hash(record.event.id.as_str());
        let mut table = self.shard(hash).write();
        match table.find_entry(hash, |held| std::ptr::eq(&**held, record)) {
            Ok(entry) => {
                entry.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Removes each of `records` itself, as [`remove`](Self::remove) does,
    /// a shard at a time.
    ///
    /// Eviction removes thousands of cold records at once. One lock per
    /// record would put two atomic instructions between consecutive
    /// lookups, and an atomic waits for every cache miss before it, so the
    /// misses would be paid one after another; a run of lookups under one
    /// lock lets the processor overlap them. Runs are bounded so that no
    /// shard is held for long.
    pub(super) fn remove_all(&self, records: &[Arc<Record>]) {
        let mut by_shard: Vec<Vec<(u64, &Record)>> = vec![Vec::new(); self.shards.len()];
        for record in records {
            let hash = self.hash(record.event.id.as_str());
            by_shard[self.shard_index(hash)].push((hash, record));
        }
        // Dropped after the locks are let go.
        let mut removed = Vec::with_capacity(records.len());
        for (shard, victims) in self.shards.iter().zip(&by_shard) {
            for run in victims.chunks(RUN) {
                let mut table = shard.write();
                for &(hash, record) in run {
                    if let Ok(entry) = table.find_entry(hash, |held| std::ptr::eq(&**held, record))
                    {
                        removed.push(entry.remove().0);
                    }
                }
            }
        }
    }
}
