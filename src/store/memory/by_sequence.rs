//! Arrival order: records by their dense sequence numbers.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::store::Record;

/// Records in arrival order. Slot `i` holds sequence `first + i`; sequences
/// are handed out here, so they are dense and every slot has one. A slot is
/// `None` once its record was rolled back or evicted out of order (behind a
/// pending one); such holes leave when they reach the front. One pointer a
/// record, where a skip list node costs about five.
#[derive(Debug)]
pub(super) struct SequenceIndex {
    slots: VecDeque<Option<Arc<Record>>>,
    /// Sequence of `slots[0]`.
    first: u64,
    /// Slots that hold a record.
    held: usize,
}

impl SequenceIndex {
    /// An empty index with room for `capacity` records before it grows.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            slots: VecDeque::with_capacity(capacity),
            first: 1,
            held: 0,
        }
    }

    /// Number of records held.
    pub(super) fn len(&self) -> usize {
        self.held
    }

    /// Appends the record `make` builds for the next sequence.
    pub(super) fn push_with(&mut self, make: impl FnOnce(u64) -> Arc<Record>) -> Arc<Record> {
        let sequence = self.first + self.slots.len() as u64;
        let record = make(sequence);
        self.slots.push_back(Some(Arc::clone(&record)));
        self.held += 1;
        record
    }

    /// The sequence the next appended record gets.
    pub(super) fn next_sequence(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    /// Appends records built for consecutive sequences from
    /// [`next_sequence`](Self::next_sequence) on (the caller held the lock
    /// since it asked).
    pub(super) fn push_all<'a>(&mut self, records: impl Iterator<Item = &'a Arc<Record>>) {
        for (next, record) in (self.next_sequence()..).zip(records) {
            debug_assert_eq!(record.sequence, next, "records appended out of sequence");
            self.slots.push_back(Some(Arc::clone(record)));
            self.held += 1;
        }
    }

    /// The record with `sequence`, if held.
    pub(super) fn get(&self, sequence: u64) -> Option<Arc<Record>> {
        self.slots.get(self.position(sequence)?)?.clone()
    }

    fn position(&self, sequence: u64) -> Option<usize> {
        usize::try_from(sequence.checked_sub(self.first)?).ok()
    }

    /// The slot holding `record` itself, if it is held.
    fn slot_of(&mut self, record: &Record) -> Option<&mut Option<Arc<Record>>> {
        let i = self.position(record.sequence)?;
        self.slots.get_mut(i).filter(|slot| {
            slot.as_ref()
                .is_some_and(|held| std::ptr::eq(&**held, record))
        })
    }

    /// Puts `fresh` in the slot of `record` itself (the same sequence);
    /// whether it was held there.
    pub(super) fn replace(&mut self, record: &Record, fresh: Arc<Record>) -> bool {
        match self.slot_of(record) {
            Some(slot) => {
                *slot = Some(fresh);
                true
            }
            None => false,
        }
    }

    /// Takes `record` out, if it is held.
    pub(super) fn remove(&mut self, record: &Record) -> bool {
        let Some(slot) = self.slot_of(record) else {
            return false;
        };
        *slot = None;
        self.held -= 1;
        self.trim_front();
        true
    }

    /// Walks records from the oldest, taking out those `judge` evicts,
    /// until it says stop or the records run out; returns what was taken out
    /// and whether `judge` stopped the walk.
    pub(super) fn evict_oldest(
        &mut self,
        mut judge: impl FnMut(&Record) -> Verdict,
    ) -> (Vec<Arc<Record>>, bool) {
        let mut evicted = Vec::new();
        let mut stopped = false;
        for slot in &mut self.slots {
            let Some(record) = slot else { continue };
            match judge(record) {
                Verdict::Evict => evicted.extend(slot.take()),
                Verdict::Keep => {}
                Verdict::Stop => {
                    stopped = true;
                    break;
                }
            }
        }
        self.held -= evicted.len();
        self.trim_front();
        (evicted, stopped)
    }

    fn trim_front(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.first += 1;
        }
    }

    /// Visits records with a sequence above `after`, in order, until `visit`
    /// returns `false`, the end, or `max_slots` slots were looked at; in the
    /// last case a caller can continue after [`Scan::Paused`]'s sequence
    /// without holding the lock in between.
    pub(super) fn scan(
        &self,
        after: u64,
        max_slots: usize,
        mut visit: impl FnMut(&Arc<Record>) -> bool,
    ) -> Scan {
        let start = self
            .position(after.saturating_add(1))
            .unwrap_or(0)
            .min(self.slots.len());
        for (offset, slot) in self.slots.range(start..).enumerate() {
            if offset == max_slots {
                return Scan::Paused(self.first + (start + offset) as u64 - 1);
            }
            if let Some(record) = slot
                && !visit(record)
            {
                return Scan::Stopped;
            }
        }
        Scan::End
    }
}

/// What [`SequenceIndex::evict_oldest`] does with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Take it out.
    Evict,
    /// Leave it and go on.
    Keep,
    /// Leave it and stop.
    Stop,
}

/// How a [`SequenceIndex::scan`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scan {
    /// `visit` asked to stop.
    Stopped,
    /// Every record after `after` was visited.
    End,
    /// The slot budget ran out after this sequence.
    Paused(u64),
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::event::{Event, EventId};
    use crate::trace_id::TraceId;

    fn push(index: &mut SequenceIndex, id: &str) -> Arc<Record> {
        let event = Event {
            id: EventId::parse(id).unwrap(),
            timestamp: 1,
            payload: "".into(),
        };
        index.push_with(|seq| {
            Arc::new(Record::new(
                event,
                seq,
                SystemTime::now(),
                TraceId::random(),
            ))
        })
    }

    fn visit_all(index: &SequenceIndex, after: u64, per_lock: usize) -> Vec<u64> {
        let mut seen = Vec::new();
        let mut after = after;
        while let Scan::Paused(last) = index.scan(after, per_lock, |r| {
            seen.push(r.sequence);
            true
        }) {
            after = last;
        }
        seen
    }

    #[test]
    fn sequences_are_dense_and_holes_are_skipped() {
        let mut index = SequenceIndex::with_capacity(4);
        let records: Vec<_> = (0..6).map(|i| push(&mut index, &i.to_string())).collect();
        assert_eq!(
            records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        assert!(index.remove(&records[2]));
        assert!(!index.remove(&records[2]), "removed once");
        assert_eq!(index.len(), 5);
        assert_eq!(visit_all(&index, 0, 100), [1, 2, 4, 5, 6]);
        // A paused scan resumes where it stopped, across holes.
        assert_eq!(visit_all(&index, 0, 1), [1, 2, 4, 5, 6]);
        assert_eq!(visit_all(&index, 3, 2), [4, 5, 6]);
        assert_eq!(visit_all(&index, 6, 2), Vec::<u64>::new());
        assert_eq!(index.get(4).map(|r| r.sequence), Some(4));
        assert!(index.get(3).is_none(), "removed");
        assert!(index.get(7).is_none(), "not yet given");
        assert!(index.get(0).is_none());
        // Holes at the front are dropped; sequences keep counting.
        assert!(index.remove(&records[0]));
        assert!(index.remove(&records[1]));
        assert_eq!(index.first, 4);
        assert_eq!(push(&mut index, "x").sequence, 7);
    }

    #[test]
    fn eviction_passes_over_kept_records_and_stops_when_told() {
        let mut index = SequenceIndex::with_capacity(8);
        for i in 0..8 {
            push(&mut index, &i.to_string());
        }
        // Keep sequence 1 (say, pending), evict the next three, then stop.
        let mut evicted_so_far = 0;
        let (evicted, stopped) = index.evict_oldest(|r| {
            if r.sequence == 1 {
                Verdict::Keep
            } else if evicted_so_far == 3 {
                Verdict::Stop
            } else {
                evicted_so_far += 1;
                Verdict::Evict
            }
        });
        assert_eq!(
            evicted.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert!(stopped);
        assert_eq!(index.len(), 5);
        assert_eq!(visit_all(&index, 0, 3), [1, 5, 6, 7, 8]);
        let (evicted, stopped) = index.evict_oldest(|r| {
            if r.sequence == 1 {
                Verdict::Keep
            } else {
                Verdict::Evict
            }
        });
        assert_eq!(evicted.len(), 4);
        assert!(!stopped, "ran out of records");
    }
}
