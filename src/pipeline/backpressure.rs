//! Admission control: one permit per queued event, plus its bytes.
//!
//! A [`Permit`] is taken before an event is stored and travels with it
//! through the queue; dropping it after publication gives the slot back. So
//! the number and size of accepted-but-unpublished events can never exceed
//! `pipeline.queue_capacity` and `pipeline.queue_max_bytes`, whatever the
//! clients do. Acquisition never waits: no permit means 503 at once.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// No room in the pipeline for the requested events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pipeline is full")]
pub struct Overloaded;

/// The event-count and byte budgets of the pipeline.
#[derive(Debug, Clone)]
pub struct Backpressure {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    capacity: usize,
    max_bytes: usize,
}

/// The right of one event to sit in the pipeline; released on drop.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Backpressure {
    /// A budget of `capacity` events and `max_bytes` bytes.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            capacity,
            max_bytes,
        }
    }

    /// Takes a permit for one event of `bytes` bytes, or fails at once.
    pub fn try_acquire(&self, bytes: usize) -> Result<Permit, Overloaded> {
        let mut permits = self.try_acquire_many(&[bytes])?;
        permits.pop().ok_or(Overloaded)
    }

    /// Takes permits for all the events (sizes given) or for none of them.
    pub fn try_acquire_many(&self, sizes: &[usize]) -> Result<Vec<Permit>, Overloaded> {
        if sizes.is_empty() {
            return Ok(Vec::new());
        }
        let count = u32::try_from(sizes.len()).map_err(|_| Overloaded)?;
        let total = sizes
            .iter()
            .try_fold(0usize, |acc, &size| acc.checked_add(size))
            .and_then(|total| u32::try_from(total).ok())
            .ok_or(Overloaded)?;
        let mut slots = Arc::clone(&self.slots)
            .try_acquire_many_owned(count)
            .map_err(|_| Overloaded)?;
        // On failure here the slot permits drop and return, so a batch
        // that does not fit leaves no trace.
        let mut bytes = Arc::clone(&self.bytes)
            .try_acquire_many_owned(total)
            .map_err(|_| Overloaded)?;
        let mut permits = Vec::with_capacity(sizes.len());
        // Split one share per event; the last event keeps the remainder.
        for &size in &sizes[..sizes.len() - 1] {
            let slot = slots.split(1).ok_or(Overloaded)?;
            let byte_share = if size == 0 {
                None
            } else {
                Some(bytes.split(size).ok_or(Overloaded)?)
            };
            permits.push(Permit {
                _slot: slot,
                _bytes: byte_share,
            });
        }
        permits.push(Permit {
            _slot: slots,
            _bytes: Some(bytes),
        });
        debug_assert_eq!(permits.len(), sizes.len());
        Ok(permits)
    }

    /// Permits currently held (events accepted and not yet published).
    pub fn in_use(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Bytes currently held.
    pub fn bytes_in_use(&self) -> usize {
        self.max_bytes - self.bytes.available_permits()
    }

    /// The event budget.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_return_on_drop() {
        let bp = Backpressure::new(2, 100);
        let a = bp.try_acquire(10).unwrap();
        let b = bp.try_acquire(10).unwrap();
        assert_eq!(bp.in_use(), 2);
        assert_eq!(bp.bytes_in_use(), 20);
        assert_eq!(bp.try_acquire(1).unwrap_err(), Overloaded);
        drop(a);
        assert_eq!(bp.in_use(), 1);
        let _c = bp.try_acquire(10).unwrap();
        drop(b);
        assert_eq!(bp.in_use(), 1);
        assert_eq!(bp.bytes_in_use(), 10);
    }

    #[test]
    fn bytes_are_a_separate_bound() {
        let bp = Backpressure::new(100, 1000);
        let _big = bp.try_acquire(900).unwrap();
        assert_eq!(bp.try_acquire(101).unwrap_err(), Overloaded);
        assert_eq!(bp.in_use(), 1, "a byte failure must return its slot");
        assert!(bp.try_acquire(100).is_ok());
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let bp = Backpressure::new(5, 1000);
        let _held = bp.try_acquire(1).unwrap();
        assert_eq!(bp.try_acquire_many(&[1; 5]).unwrap_err(), Overloaded);
        assert_eq!(bp.in_use(), 1, "a failed batch holds nothing");
        assert_eq!(bp.try_acquire_many(&[500, 500]).unwrap_err(), Overloaded);
        assert_eq!(bp.in_use(), 1);
        assert_eq!(bp.bytes_in_use(), 1);
        let batch = bp.try_acquire_many(&[10, 0, 30, 40]).unwrap();
        assert_eq!(batch.len(), 4);
        assert_eq!(bp.in_use(), 5);
        assert_eq!(bp.bytes_in_use(), 81);
        // Each event's permit is released independently, as it is published.
        let mut batch = batch;
        batch.remove(0);
        assert_eq!(bp.in_use(), 4);
        assert_eq!(bp.bytes_in_use(), 71);
        drop(batch);
        assert_eq!(bp.in_use(), 1);
        assert_eq!(bp.bytes_in_use(), 1);
    }

    #[test]
    fn oversized_requests_fail_cleanly() {
        let bp = Backpressure::new(2, 10);
        assert_eq!(bp.try_acquire(11).unwrap_err(), Overloaded);
        assert_eq!(
            bp.try_acquire_many(&[usize::MAX, 1]).unwrap_err(),
            Overloaded
        );
        assert_eq!(bp.in_use(), 0);
        assert!(bp.try_acquire_many(&[]).unwrap().is_empty());
    }
}
