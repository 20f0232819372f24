//! Admission control: room for each queued event, plus its bytes.
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

/// Room in the pipeline for some events and their bytes; released on drop.
///
/// A batch takes one permit for all its events and splits it as the
/// events move on: the share of an event that turns out to be a retry is
/// given back at once, and each queued chunk carries its own share, so a
/// chunk costs one release rather than one per event.
#[derive(Debug)]
pub struct Permit {
    slots: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
}

impl Permit {
    /// Events this permit holds room for.
    pub fn events(&self) -> usize {
        self.slots.num_permits()
    }

    /// Bytes this permit holds.
    pub fn bytes(&self) -> usize {
        self.bytes.num_permits()
    }

    /// Moves the room of `events` events totalling `bytes` bytes into a new
    /// permit, or `None` (and nothing moves) when this one holds less.
    pub fn split(&mut self, events: usize, bytes: usize) -> Option<Permit> {
        if events > self.events() || bytes > self.bytes() {
            return None;
        }
        Some(Permit {
            slots: self.slots.split(events)?,
            bytes: self.bytes.split(bytes)?,
        })
    }
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

    /// Takes room for `events` events totalling `bytes` bytes, waiting
    /// until there is some (deliveries a replica pulls wait; requests
    /// never do).
    pub async fn acquire(&self, events: usize, bytes: usize) -> Permit {
        // Asking for more than the budget would wait forever.
        let events = u32::try_from(events.min(self.capacity)).unwrap_or(u32::MAX);
        let bytes = u32::try_from(bytes.min(self.max_bytes)).unwrap_or(u32::MAX);
        // The semaphores are never closed, so these cannot fail.
        let slots = Arc::clone(&self.slots).acquire_many_owned(events).await;
        let bytes = Arc::clone(&self.bytes).acquire_many_owned(bytes).await;
        match (slots, bytes) {
            (Ok(slots), Ok(bytes)) => Permit { slots, bytes },
            _ => unreachable!("the backpressure semaphores are never closed"),
        }
    }

    /// Takes room for one event of `bytes` bytes, or fails at once.
    pub fn try_acquire(&self, bytes: usize) -> Result<Permit, Overloaded> {
        self.try_acquire_many(1, bytes)
    }

    /// Takes room for `events` events totalling `bytes` bytes, all or
    /// nothing, or fails at once.
    pub fn try_acquire_many(&self, events: usize, bytes: usize) -> Result<Permit, Overloaded> {
        let events = u32::try_from(events).map_err(|_| Overloaded)?;
        let bytes = u32::try_from(bytes).map_err(|_| Overloaded)?;
        let slots = Arc::clone(&self.slots)
            .try_acquire_many_owned(events)
            .map_err(|_| Overloaded)?;
        // On failure here the slot permits drop and return, so a batch
        // that does not fit leaves no trace.
        let bytes = Arc::clone(&self.bytes)
            .try_acquire_many_owned(bytes)
            .map_err(|_| Overloaded)?;
        Ok(Permit { slots, bytes })
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

    /// The byte budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
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
        assert_eq!(bp.try_acquire_many(5, 5).unwrap_err(), Overloaded);
        assert_eq!(bp.in_use(), 1, "a failed batch holds nothing");
        assert_eq!(bp.try_acquire_many(2, 1000).unwrap_err(), Overloaded);
        assert_eq!(bp.in_use(), 1);
        assert_eq!(bp.bytes_in_use(), 1);
        let mut batch = bp.try_acquire_many(4, 80).unwrap();
        assert_eq!((batch.events(), batch.bytes()), (4, 80));
        assert_eq!(bp.in_use(), 5);
        assert_eq!(bp.bytes_in_use(), 81);
        // Shares split off are released independently, as they are published.
        let first = batch.split(1, 10).unwrap();
        assert!(
            batch.split(4, 0).is_none(),
            "cannot split more events than held"
        );
        assert!(
            batch.split(0, 71).is_none(),
            "cannot split more bytes than held"
        );
        assert_eq!((batch.events(), batch.bytes()), (3, 70));
        drop(first);
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
        assert_eq!(bp.try_acquire_many(1, usize::MAX).unwrap_err(), Overloaded);
        assert_eq!(bp.try_acquire_many(usize::MAX, 1).unwrap_err(), Overloaded);
        assert_eq!(bp.in_use(), 0);
        assert_eq!(bp.try_acquire_many(0, 0).unwrap().events(), 0);
    }
}
