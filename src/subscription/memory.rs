//! Subscriptions kept in this process, over the [`MemoryFeed`]: each one a
//! cursor (`frontier`: the last publication sequence it took in), the
//! events past its committed cursor that are not acknowledged yet (leased,
//! or ready to be leased again), and its dead letters. An event is found
//! through the feed's index and read from the store, so a subscription
//! holds sequences and lease marks, never event bodies.
//!
//! Bounds: a subscription takes in new events only while fewer than
//! [`WINDOW`] of its events are unacknowledged (as a JetStream consumer's
//! `max_ack_pending`: one stuck event cannot make it track the whole
//! history), and keeps at most [`DEAD_LETTERS_MAX`] dead letters (the
//! oldest go first). An event the store evicted before it was leased is
//! counted `skipped`; a dead letter whose event was evicted is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    AckId, Acked, DeadLetter, DeadLetters, Lease, Put, Spec, Start, State, SubscriptionError,
    SubscriptionName, Subscriptions,
};
use crate::feed::{Feed, FeedLine, MemoryFeed};
use crate::store::Store;
use crate::telemetry::metrics::SubscriptionSample;

/// Most unacknowledged events one subscription tracks; it takes in no new
/// ones past this until some are acknowledged or dead-lettered.
pub const WINDOW: usize = 10_000;

/// Most dead letters one subscription keeps (the oldest are dropped).
pub const DEAD_LETTERS_MAX: usize = 100_000;

/// The subscriptions of one process.
#[derive(Debug)]
pub struct MemorySubscriptions {
    feed: MemoryFeed,
    store: Arc<dyn Store>,
    max_count: usize,
    subscriptions: Mutex<BTreeMap<SubscriptionName, Arc<Subscription>>>,
    /// The last lease number handed out (unique in the process, so that an
    /// ack id never matches a later lease of the same event).
    leases: AtomicU64,
}

#[derive(Debug)]
struct Subscription {
    name: SubscriptionName,
    spec: Spec,
    cursor: Mutex<Cursor>,
    /// Woken when events can be leased again (a nack, a redelivery, acks
    /// that free room in the window) or it is deleted.
    wake: Notify,
    deleted: AtomicBool,
    /// Its counters since it was made (`/metrics` writes them at scrape
    /// time, so that they leave with it).
    delivered: AtomicU64,
    acked: AtomicU64,
    dead_lettered: AtomicU64,
}

#[derive(Debug, Default)]
struct Cursor {
    /// The last publication sequence taken in (leased, or skipped).
    frontier: u64,
    /// Taken in, not acknowledged or dead-lettered, by publication sequence.
    entries: BTreeMap<u64, Entry>,
    /// The entries with no lease: leased first, in publication order.
    ready: BTreeSet<u64>,
    dead: BTreeMap<u64, Dead>,
    skipped: u64,
    /// No lease ends before this (`None`: none is live).
    next_expiry: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    arrival: u64,
    delivery: u32,
    lease: Option<LeaseMark>,
}

#[derive(Debug, Clone, Copy)]
struct LeaseMark {
    id: u64,
    until: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Dead {
    arrival: u64,
    delivery: u32,
    at: SystemTime,
}

/// A lease made under the lock, its record not read yet.
struct Taken {
    sequence: u64,
    arrival: u64,
    delivery: u32,
    lease: u64,
}

impl Cursor {
    /// Ends the leases past their time: each event is ready again, or
    /// dead-lettered when it had its last delivery.
    fn expire(&mut self, now: Instant, subscription: &Subscription) {
        if self.next_expiry.is_none_or(|next| next > now) {
            return;
        }
        let mut next = None::<Instant>;
        let mut spent = Vec::new();
        for (&sequence, entry) in &mut self.entries {
            let Some(lease) = entry.lease else { continue };
            if lease.until > now {
                next = Some(next.map_or(lease.until, |next| next.min(lease.until)));
            } else {
                entry.lease = None;
                if entry.delivery >= subscription.spec.max_deliver {
                    spent.push(sequence);
                } else {
                    self.ready.insert(sequence);
                }
            }
        }
        self.next_expiry = next;
        for sequence in spent {
            self.dead_letter(sequence, subscription);
        }
    }

    fn dead_letter(&mut self, sequence: u64, subscription: &Subscription) {
        let Some(entry) = self.entries.remove(&sequence) else {
            return;
        };
        self.ready.remove(&sequence);
        self.dead.insert(
            sequence,
            Dead {
                arrival: entry.arrival,
                delivery: entry.delivery,
                at: SystemTime::now(),
            },
        );
        if self.dead.len() > DEAD_LETTERS_MAX {
            self.dead.pop_first();
        }
        subscription.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            subscription = %subscription.name,
            sequence,
            deliveries = entry.delivery,
            "event dead-lettered"
        );
    }

    /// Leases up to `max` events: handed-back ones first, then new ones
    /// from the feed.
    fn take(
        &mut self,
        max: usize,
        now: Instant,
        spec: &Spec,
        feed: &MemoryFeed,
        leases: &AtomicU64,
    ) -> Vec<Taken> {
        let until = now + spec.ack_timeout;
        let mut taken = Vec::new();
        let lease = |taken: &mut Vec<Taken>, entry: &mut Entry, sequence: u64| {
            entry.delivery += 1;
            let id = leases.fetch_add(1, Ordering::Relaxed) + 1;
            entry.lease = Some(LeaseMark { id, until });
            taken.push(Taken {
                sequence,
                arrival: entry.arrival,
                delivery: entry.delivery,
                lease: id,
            });
        };
        while taken.len() < max {
            let Some(sequence) = self.ready.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.get_mut(&sequence) {
                lease(&mut taken, entry, sequence);
            }
        }
        let room = (max - taken.len()).min(WINDOW.saturating_sub(self.entries.len()));
        if room > 0 {
            let fresh = feed.arrivals_after(self.frontier, room);
            // Published after the cursor, dropped before it got to them.
            self.skipped += fresh.first - 1 - self.frontier;
            self.frontier = fresh.first - 1;
            for arrival in fresh.arrivals {
                let sequence = self.frontier + 1;
                let entry = self.entries.entry(sequence).or_insert(Entry {
                    arrival,
                    delivery: 0,
                    lease: None,
                });
                lease(&mut taken, entry, sequence);
                self.frontier = sequence;
            }
        }
        if !taken.is_empty() {
            self.next_expiry = Some(self.next_expiry.map_or(until, |next| next.min(until)));
        }
        taken
    }

    /// The live lease `lease` of event `sequence`, if it is one.
    fn live(&mut self, sequence: u64, lease: u64, now: Instant) -> Option<&mut Entry> {
        self.entries
            .get_mut(&sequence)
            .filter(|entry| entry.lease.is_some_and(|l| l.id == lease && l.until > now))
    }

    fn committed(&self) -> u64 {
        self.entries
            .first_key_value()
            .map_or(self.frontier, |(&first, _)| first - 1)
    }
}

impl MemorySubscriptions {
    /// No subscriptions yet, over `feed` and the `store` its index points
    /// into; at most `max_count` of them.
    pub fn new(feed: MemoryFeed, store: Arc<dyn Store>, max_count: usize) -> Self {
        Self {
            feed,
            store,
            max_count,
            subscriptions: Mutex::new(BTreeMap::new()),
            leases: AtomicU64::new(0),
        }
    }

    fn find(&self, name: &SubscriptionName) -> Result<Arc<Subscription>, SubscriptionError> {
        self.subscriptions
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| SubscriptionError::NotFound(name.clone()))
    }

    /// Where a new subscription's cursor starts.
    fn frontier(&self, start: &Start) -> Result<u64, SubscriptionError> {
        let (first, head) = self.feed.bounds();
        Ok(match start {
            Start::Earliest => first - 1,
            Start::Latest => head,
            Start::After(after) if *after > head => {
                return Err(SubscriptionError::InvalidStart(format!(
                    "start.after = {after} is past the last publication sequence, {head}"
                )));
            }
            Start::After(after) => *after,
            Start::Since { at, .. } => self.feed.last_before(*at).max(first - 1),
        })
    }

    fn snapshot(&self, subscription: &Subscription) -> State {
        let (first, head) = self.feed.bounds();
        let mut cursor = subscription.cursor.lock();
        cursor.expire(Instant::now(), subscription);
        // Dead letters the history dropped are gone with their events.
        if cursor
            .dead
            .first_key_value()
            .is_some_and(|(&oldest, _)| oldest < first)
        {
            cursor.dead = cursor.dead.split_off(&first);
        }
        State {
            name: subscription.name.clone(),
            spec: subscription.spec.clone(),
            committed: cursor.committed(),
            pending: cursor.ready.len() as u64 + head.saturating_sub(cursor.frontier),
            in_flight: (cursor.entries.len() - cursor.ready.len()) as u64,
            dead_lettered: cursor.dead.len() as u64,
            skipped: cursor.skipped,
        }
    }

    /// The records of leases just made; a lease whose record the store no
    /// longer holds is dropped and its event counted skipped.
    async fn read(&self, subscription: &Subscription, taken: Vec<Taken>) -> Vec<Lease> {
        let mut leases = Vec::with_capacity(taken.len());
        let mut gone = Vec::new();
        let arrivals: Vec<u64> = taken.iter().map(|t| t.arrival).collect();
        let records = self.store.get_many_by_sequence(&arrivals).await;
        let sequences: Vec<u64> = taken.iter().map(|t| t.sequence).collect();
        let mut spans = self.feed.spans(&sequences).map(Vec::into_iter);
        for (taken, record) in taken.into_iter().zip(records) {
            let span = spans.as_mut().and_then(Iterator::next).flatten();
            match record {
                Some(record) => leases.push(Lease {
                    ack_id: AckId::Memory {
                        sequence: taken.sequence,
                        lease: taken.lease,
                    },
                    sequence: taken.sequence,
                    delivery: taken.delivery,
                    line: FeedLine::Stored(record),
                    span,
                }),
                None => gone.push((taken.sequence, taken.delivery)),
            }
        }
        if !gone.is_empty() {
            let mut cursor = subscription.cursor.lock();
            for (sequence, delivery) in gone {
                if cursor.entries.remove(&sequence).is_some() {
                    cursor.ready.remove(&sequence);
                    // `skipped` counts what was dropped before its first
                    // lease; an event dropped after one is gone unacknowledged.
                    if delivery == 1 {
                        cursor.skipped += 1;
                    } else {
                        tracing::warn!(
                            subscription = %subscription.name,
                            sequence,
                            "an event leased before was evicted before it was acknowledged"
                        );
                    }
                }
            }
        }
        leases
    }
}

#[async_trait]
impl Subscriptions for MemorySubscriptions {
    async fn put(
        &self,
        name: &SubscriptionName,
        spec: Spec,
    ) -> Result<(Put, State), SubscriptionError> {
        let frontier = self.frontier(&spec.start)?;
        let subscription = {
            let mut subscriptions = self.subscriptions.lock();
            if let Some(existing) = subscriptions.get(name) {
                if existing.spec != spec {
                    return Err(SubscriptionError::Different(name.clone()));
                }
                let existing = Arc::clone(existing);
                drop(subscriptions);
                return Ok((Put::Existing, self.snapshot(&existing)));
            }
            if subscriptions.len() >= self.max_count {
                return Err(SubscriptionError::TooMany(subscriptions.len()));
            }
            let subscription = Arc::new(Subscription {
                name: name.clone(),
                spec,
                cursor: Mutex::new(Cursor {
                    frontier,
                    ..Cursor::default()
                }),
                wake: Notify::new(),
                deleted: AtomicBool::new(false),
                delivered: AtomicU64::new(0),
                acked: AtomicU64::new(0),
                dead_lettered: AtomicU64::new(0),
            });
            subscriptions.insert(name.clone(), Arc::clone(&subscription));
            subscription
        };
        tracing::info!(subscription = %name, committed = frontier, "subscription created");
        Ok((Put::Created, self.snapshot(&subscription)))
    }

    async fn state(&self, name: &SubscriptionName) -> Result<State, SubscriptionError> {
        Ok(self.snapshot(&*self.find(name)?))
    }

    async fn list(&self) -> Result<Vec<State>, SubscriptionError> {
        let all: Vec<Arc<Subscription>> = self.subscriptions.lock().values().cloned().collect();
        Ok(all.iter().map(|s| self.snapshot(s)).collect())
    }

    async fn delete(&self, name: &SubscriptionName) -> Result<(), SubscriptionError> {
        let removed = self.subscriptions.lock().remove(name);
        let subscription = removed.ok_or_else(|| SubscriptionError::NotFound(name.clone()))?;
        subscription.deleted.store(true, Ordering::Release);
        subscription.wake.notify_waiters();
        tracing::info!(subscription = %name, "subscription deleted");
        Ok(())
    }

    async fn poll(
        &self,
        name: &SubscriptionName,
        max: usize,
        deadline: Instant,
    ) -> Result<Vec<Lease>, SubscriptionError> {
        let subscription = self.find(name)?;
        let mut changes = self.feed.changes();
        loop {
            // Armed before looking: what happens after the look wakes the wait.
            changes.borrow_and_update();
            let handed_back = subscription.wake.notified();
            tokio::pin!(handed_back);
            handed_back.as_mut().enable();
            if subscription.deleted.load(Ordering::Acquire) {
                return Err(SubscriptionError::NotFound(name.clone()));
            }
            let now = Instant::now();
            let (taken, next_expiry) = {
                let mut cursor = subscription.cursor.lock();
                cursor.expire(now, &subscription);
                let taken = cursor.take(max, now, &subscription.spec, &self.feed, &self.leases);
                (taken, cursor.next_expiry)
            };
            let leases = self.read(&subscription, taken).await;
            if !leases.is_empty() || now >= deadline {
                subscription
                    .delivered
                    .fetch_add(leases.len() as u64, Ordering::Relaxed);
                return Ok(leases);
            }
            // A lease another poll makes while this one waits ends no sooner
            // than an ack_timeout from now: look again by then at the latest.
            let wake_at = next_expiry
                .unwrap_or(now + subscription.spec.ack_timeout)
                .min(now + subscription.spec.ack_timeout)
                .min(deadline);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
                    return Ok(Vec::new());
                },
                () = &mut handed_back => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn ack(
        &self,
        name: &SubscriptionName,
        acks: &[AckId],
        nacks: &[AckId],
    ) -> Result<Acked, SubscriptionError> {
        let subscription = self.find(name)?;
        let now = Instant::now();
        let mut answer = Acked::default();
        let window_was_full;
        {
            let mut cursor = subscription.cursor.lock();
            window_was_full = cursor.entries.len() >= WINDOW;
            for id in acks {
                let live = memory_lease(id)
                    .filter(|&(sequence, lease)| cursor.live(sequence, lease, now).is_some());
                if let Some((sequence, _)) = live {
                    cursor.entries.remove(&sequence);
                    answer.acked += 1;
                } else {
                    answer.expired += 1;
                }
            }
            for id in nacks {
                let live = memory_lease(id).and_then(|(sequence, lease)| {
                    cursor.live(sequence, lease, now)?;
                    Some(sequence)
                });
                let Some(sequence) = live else {
                    answer.expired += 1;
                    continue;
                };
                let entry = cursor.entries.get_mut(&sequence).map(|entry| {
                    entry.lease = None;
                    entry.delivery
                });
                if entry.is_some_and(|delivery| delivery >= subscription.spec.max_deliver) {
                    cursor.dead_letter(sequence, &subscription);
                } else {
                    cursor.ready.insert(sequence);
                }
                answer.nacked += 1;
            }
        }
        subscription
            .acked
            .fetch_add(answer.acked, Ordering::Relaxed);
        // Acks free room in the window; nacks hand events back.
        if answer.nacked > 0 || (answer.acked > 0 && window_was_full) {
            subscription.wake.notify_waiters();
        }
        Ok(answer)
    }

    async fn release(&self, name: &SubscriptionName, leases: &[AckId]) {
        let Ok(subscription) = self.find(name) else {
            return;
        };
        let now = Instant::now();
        {
            let mut cursor = subscription.cursor.lock();
            for (sequence, lease) in leases.iter().filter_map(memory_lease) {
                if let Some(entry) = cursor.live(sequence, lease, now) {
                    entry.lease = None;
                    entry.delivery -= 1;
                    cursor.ready.insert(sequence);
                }
            }
        }
        subscription.wake.notify_waiters();
    }

    async fn dead_letters(
        &self,
        name: &SubscriptionName,
        after: u64,
        limit: usize,
    ) -> Result<DeadLetters, SubscriptionError> {
        let subscription = self.find(name)?;
        let page: Vec<(u64, Dead)> = {
            let cursor = subscription.cursor.lock();
            cursor
                .dead
                .range(after.saturating_add(1)..)
                .take(limit.saturating_add(1))
                .map(|(&sequence, &dead)| (sequence, dead))
                .collect()
        };
        let more = page.len() > limit;
        let mut letters = Vec::with_capacity(page.len().min(limit));
        let mut gone = Vec::new();
        for &(sequence, dead) in page.iter().take(limit) {
            match self.store.get_by_sequence(dead.arrival).await {
                Some(record) => letters.push(DeadLetter {
                    sequence,
                    delivery: dead.delivery,
                    dead_lettered_at: dead.at,
                    line: FeedLine::Stored(record),
                }),
                None => gone.push(sequence),
            }
        }
        if !gone.is_empty() {
            let mut cursor = subscription.cursor.lock();
            for sequence in gone {
                cursor.dead.remove(&sequence);
            }
        }
        let next = more.then(|| page[limit - 1].0);
        Ok(DeadLetters { letters, next })
    }

    async fn redeliver(
        &self,
        name: &SubscriptionName,
        sequences: Option<&[u64]>,
    ) -> Result<u64, SubscriptionError> {
        let subscription = self.find(name)?;
        let mut redelivered = 0;
        {
            let mut cursor = subscription.cursor.lock();
            let chosen: Vec<u64> = match sequences {
                Some(sequences) => sequences.to_vec(),
                None => cursor.dead.keys().copied().collect(),
            };
            for sequence in chosen {
                let Some(dead) = cursor.dead.remove(&sequence) else {
                    continue;
                };
                cursor.entries.insert(
                    sequence,
                    Entry {
                        arrival: dead.arrival,
                        delivery: 0,
                        lease: None,
                    },
                );
                cursor.ready.insert(sequence);
                redelivered += 1;
            }
        }
        if redelivered > 0 {
            subscription.wake.notify_waiters();
        }
        Ok(redelivered)
    }

    fn samples(&self) -> Vec<SubscriptionSample> {
        let all: Vec<Arc<Subscription>> = self.subscriptions.lock().values().cloned().collect();
        all.iter()
            .map(|s| {
                let state = self.snapshot(s);
                SubscriptionSample {
                    name: state.name.to_string(),
                    pending: state.pending,
                    in_flight: state.in_flight,
                    delivered: s.delivered.load(Ordering::Relaxed),
                    acked: s.acked.load(Ordering::Relaxed),
                    dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// The event and lease an ack id of this backend names (`None`: another
/// backend's, which matches no lease here).
fn memory_lease(id: &AckId) -> Option<(u64, u64)> {
    match *id {
        AckId::Memory { sequence, lease } => Some((sequence, lease)),
        AckId::Nats(_) => None,
    }
}

#[cfg(test)]
mod tests;
