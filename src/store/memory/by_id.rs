//! Lookup by id: a sharded hash table of records, keyed by the id the record
//! itself holds.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use parking_lot::RwLock;

use crate::event::Event;
use crate::store::Record;

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

    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    fn shard(&self, hash: u64) -> &RwLock<HashTable<Arc<Record>>> {
        // The table picks buckets with the low bits; shard on higher ones.
        let index = usize::try_from(hash >> 32).unwrap_or_default() & (self.shards.len() - 1);
        &self.shards[index]
    }

    /// The record with this id.
    pub(super) fn get(&self, id: &str) -> Option<Arc<Record>> {
        let hash = self.hash(id);
        self.shard(hash)
            .read()
            .find(hash, |r| r.event.id.as_str() == id)
            .cloned()
    }

    /// Stores the record `make` builds from `event`, unless one with the
    /// same id is held: then that one comes back with the event. `make` runs
    /// under the shard's lock, so racing inserts of one id build one record.
    pub(super) fn insert_new(
        &self,
        event: Event,
        make: impl FnOnce(Event) -> Arc<Record>,
    ) -> Result<Arc<Record>, (Arc<Record>, Event)> {
        let hash = self.hash(event.id.as_str());
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
}
