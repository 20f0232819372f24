//! How many times retried events were queued, as this replica last read or
//! wrote it: the count travels in JetStream (a backlog chunk's entry, a
//! publication's or failure's `Eventflow-Attempts` header, a retry's
//! marker), and this map carries it from the message that was read to the
//! answer or the message written next. Only counts above 1 are kept, and
//! at most [`KEPT`] of them, the oldest forgotten first: a count is always
//! noted again by the read that precedes its use.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Most counts kept.
const KEPT: usize = 65_536;

/// Attempts by arrival sequence.
#[derive(Debug, Default)]
pub(super) struct Attempts {
    kept: Mutex<Kept>,
    /// Whether any count was ever noted: until then every lookup (one per
    /// event published or queued) answers 1 without taking the lock.
    any: AtomicBool,
}

#[derive(Debug, Default)]
struct Kept {
    by_sequence: HashMap<u64, u32>,
    order: VecDeque<u64>,
}

impl Attempts {
    /// Notes that the event of arrival sequence `sequence` was queued
    /// `attempts` times.
    pub(super) fn note(&self, sequence: u64, attempts: u32) {
        if attempts <= 1 {
            return;
        }
        self.any.store(true, Ordering::Release);
        let mut kept = self.kept.lock();
        if kept.by_sequence.insert(sequence, attempts).is_none() {
            kept.order.push_back(sequence);
            if kept.order.len() > KEPT
                && let Some(oldest) = kept.order.pop_front()
            {
                kept.by_sequence.remove(&oldest);
            }
        }
    }

    /// Times the event of arrival sequence `sequence` was queued: 1 unless
    /// noted otherwise.
    pub(super) fn of(&self, sequence: u64) -> u32 {
        if !self.any.load(Ordering::Acquire) {
            return 1;
        }
        self.kept
            .lock()
            .by_sequence
            .get(&sequence)
            .copied()
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_above_one_are_kept_and_the_oldest_forgotten() {
        let attempts = Attempts::default();
        assert_eq!(attempts.of(7), 1);
        attempts.note(7, 1);
        attempts.note(8, 3);
        assert_eq!(attempts.of(8), 3);
        attempts.note(8, 4);
        assert_eq!(attempts.of(8), 4);
        for sequence in 100..100 + KEPT as u64 {
            attempts.note(sequence, 2);
        }
        assert_eq!(attempts.of(8), 1, "forgotten first");
        assert_eq!(attempts.of(100 + KEPT as u64 - 1), 2);
    }
}
