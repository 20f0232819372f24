//! The in-process subscriptions: leases, acks and nacks, the committed
//! cursor, expiry, dead letters and their redelivery, starts, bounds.

use std::time::{Duration, SystemTime};

use super::*;
use crate::event::{Event, EventId};
use crate::feed::Published;
use crate::store::{Insert, MemoryStore, Processing};
use crate::testkit;
use crate::time::UnixNanos;
use crate::trace_id::TraceId;

struct Fixture {
    store: Arc<MemoryStore>,
    feed: MemoryFeed,
    subscriptions: MemorySubscriptions,
    next: u64,
}

impl Fixture {
    fn new(max_count: usize) -> Self {
        let store = Arc::new(MemoryStore::new(&testkit::store_settings()));
        let feed = MemoryFeed::new(store.clone(), 1000);
        let subscriptions = MemorySubscriptions::new(feed.clone(), store.clone(), max_count);
        Self {
            store,
            feed,
            subscriptions,
            next: 0,
        }
    }

    /// Stores and publishes `n` more events.
    async fn publish(&mut self, n: u64) {
        let mut ids = Vec::new();
        let mut arrivals = Vec::new();
        for _ in 0..n {
            self.next += 1;
            let id = EventId::parse(&format!("e{}", self.next)).unwrap();
            let event = Event {
                id: id.clone(),
                timestamp: 1,
                payload: "p".into(),
            };
            match self
                .store
                .insert(event, SystemTime::now(), TraceId::random())
                .await
                .unwrap()
            {
                Insert::Inserted(record) => arrivals.push(record.sequence),
                other => panic!("{other:?}"),
            }
            ids.push(id);
        }
        let processing = Processing {
            worker: 0,
            processed_at: UnixNanos::now(),
        };
        let published: Vec<Published<'_>> = arrivals
            .iter()
            .zip(&ids)
            .map(|(&sequence, id)| Published {
                sequence,
                id,
                processing,
                line: "{}",
                span: None,
            })
            .collect();
        self.feed.append(&published).await.unwrap();
    }

    async fn put(&self, name: &str, start: Start, max_deliver: u32) -> (Put, State) {
        self.subscriptions
            .put(&name_of(name), spec(start, max_deliver))
            .await
            .unwrap()
    }

    async fn poll(&self, name: &str, max: usize) -> Vec<Lease> {
        self.subscriptions
            .poll(&name_of(name), max, Instant::now())
            .await
            .unwrap()
    }

    async fn ack(&self, name: &str, acks: &[&Lease], nacks: &[&Lease]) -> Acked {
        let ids = |leases: &[&Lease]| leases.iter().map(|l| l.ack_id).collect::<Vec<_>>();
        self.subscriptions
            .ack(&name_of(name), &ids(acks), &ids(nacks))
            .await
            .unwrap()
    }

    async fn state(&self, name: &str) -> State {
        self.subscriptions.state(&name_of(name)).await.unwrap()
    }
}

fn name_of(name: &str) -> SubscriptionName {
    SubscriptionName::parse(name).unwrap()
}

fn spec(start: Start, max_deliver: u32) -> Spec {
    Spec {
        start,
        ack_timeout: Duration::from_secs(30),
        max_deliver,
    }
}

fn sequences(leases: &[Lease]) -> Vec<u64> {
    leases.iter().map(|l| l.sequence).collect()
}

#[tokio::test]
async fn each_event_is_leased_to_one_consumer_and_acks_move_the_cursor() {
    let mut f = Fixture::new(4);
    f.publish(5).await;
    f.put("s", Start::Earliest, 10).await;
    let first = f.poll("s", 3).await;
    let second = f.poll("s", 3).await;
    assert_eq!(sequences(&first), [1, 2, 3]);
    assert_eq!(sequences(&second), [4, 5]);
    assert!(f.poll("s", 3).await.is_empty(), "nothing is leased twice");
    let FeedLine::Stored(record) = &first[0].line else {
        panic!("memory mode hands out stored events");
    };
    assert_eq!(record.event.id.as_str(), "e1");
    assert_eq!(first[0].delivery, 1);

    // Acked out of order: the cursor stops below the first unacked event.
    let acked = f.ack("s", &[&first[0], &first[2]], &[]).await;
    assert_eq!((acked.acked, acked.expired), (2, 0));
    let state = f.state("s").await;
    assert_eq!(state.committed, 1);
    assert_eq!(state.in_flight, 3);
    assert_eq!(state.pending, 0);

    f.ack("s", &[&first[1], &second[0], &second[1]], &[]).await;
    assert_eq!(f.state("s").await.committed, 5);
    // An ack of a lease already acked is `expired`, never an error.
    let again = f.ack("s", &[&first[0]], &[]).await;
    assert_eq!((again.acked, again.expired), (0, 1));
}

#[tokio::test]
async fn a_nack_hands_the_event_back_at_once_and_counts_a_delivery() {
    let mut f = Fixture::new(4);
    f.publish(2).await;
    f.put("s", Start::Earliest, 10).await;
    let leased = f.poll("s", 1).await;
    let nacked = f.ack("s", &[], &[&leased[0]]).await;
    assert_eq!(nacked.nacked, 1);
    assert_eq!(f.state("s").await.pending, 2);
    let again = f.poll("s", 10).await;
    assert_eq!(sequences(&again), [1, 2], "handed-back events go first");
    assert_eq!(again[0].delivery, 2);
    assert_ne!(again[0].ack_id, leased[0].ack_id);
    // The old lease's id no longer matches.
    let stale = f.ack("s", &[&leased[0]], &[]).await;
    assert_eq!((stale.acked, stale.expired), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn an_unacked_lease_expires_and_after_max_deliver_the_event_is_dead_lettered() {
    let mut f = Fixture::new(4);
    f.publish(2).await;
    f.put("s", Start::Earliest, 2).await;
    let first = f.poll("s", 1).await;
    assert_eq!(f.state("s").await.in_flight, 1);
    tokio::time::advance(Duration::from_secs(31)).await;
    let state = f.state("s").await;
    assert_eq!((state.in_flight, state.pending), (0, 2));
    let late = f.ack("s", &[&first[0]], &[]).await;
    assert_eq!(late.expired, 1, "an ack after the lease ended");

    let second = f.poll("s", 1).await;
    assert_eq!((second[0].sequence, second[0].delivery), (1, 2));
    tokio::time::advance(Duration::from_secs(31)).await;
    let state = f.state("s").await;
    assert_eq!(state.dead_lettered, 1);
    // Dead-lettered counts as done: the cursor moves past it.
    assert_eq!(state.committed, 1);

    let letters = f
        .subscriptions
        .dead_letters(&name_of("s"), 0, 10)
        .await
        .unwrap();
    assert_eq!(letters.letters.len(), 1);
    assert_eq!(letters.letters[0].sequence, 1);
    assert_eq!(letters.letters[0].delivery, 2);
    assert_eq!(letters.next, None);

    // Redelivered: out again with its count from 1, the cursor back below it.
    let n = f
        .subscriptions
        .redeliver(&name_of("s"), None)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(f.state("s").await.committed, 0);
    let back = f.poll("s", 1).await;
    assert_eq!((back[0].sequence, back[0].delivery), (1, 1));
}

#[tokio::test]
async fn a_nack_of_the_last_delivery_dead_letters_at_once() {
    let mut f = Fixture::new(4);
    f.publish(1).await;
    f.put("s", Start::Earliest, 1).await;
    let leased = f.poll("s", 1).await;
    f.ack("s", &[], &[&leased[0]]).await;
    let state = f.state("s").await;
    assert_eq!((state.dead_lettered, state.committed), (1, 1));
}

#[tokio::test]
async fn starts_earliest_latest_after_and_since() {
    let mut f = Fixture::new(8);
    f.publish(3).await;
    let between = UnixNanos::now();
    tokio::time::sleep(Duration::from_millis(2)).await;
    f.publish(2).await;
    assert_eq!(f.put("early", Start::Earliest, 5).await.1.committed, 0);
    let (_, latest) = f.put("late", Start::Latest, 5).await;
    assert_eq!((latest.committed, latest.pending), (5, 0));
    assert_eq!(f.put("after", Start::After(4), 5).await.1.pending, 1);
    let since = Start::Since {
        at: between,
        text: String::new(),
    };
    assert_eq!(f.put("since", since, 5).await.1.committed, 3);
    let future = f
        .subscriptions
        .put(&name_of("future"), spec(Start::After(6), 5))
        .await;
    assert!(matches!(future, Err(SubscriptionError::InvalidStart(_))));

    f.publish(1).await;
    assert_eq!(sequences(&f.poll("late", 10).await), [6]);
    assert_eq!(sequences(&f.poll("since", 10).await), [4, 5, 6]);
}

#[tokio::test]
async fn a_put_finds_the_same_settings_refuses_others_and_the_count_is_capped() {
    let f = Fixture::new(2);
    assert_eq!(f.put("a", Start::Latest, 5).await.0, Put::Created);
    assert_eq!(f.put("a", Start::Latest, 5).await.0, Put::Existing);
    let different = f
        .subscriptions
        .put(&name_of("a"), spec(Start::Latest, 6))
        .await;
    assert!(matches!(different, Err(SubscriptionError::Different(_))));
    f.put("b", Start::Latest, 5).await;
    let third = f
        .subscriptions
        .put(&name_of("c"), spec(Start::Latest, 5))
        .await;
    assert!(matches!(third, Err(SubscriptionError::TooMany(2))));
    // At the cap, an existing one is still found.
    assert_eq!(f.put("b", Start::Latest, 5).await.0, Put::Existing);
    f.subscriptions.delete(&name_of("a")).await.unwrap();
    assert!(matches!(
        f.subscriptions.state(&name_of("a")).await,
        Err(SubscriptionError::NotFound(_))
    ));
    assert_eq!(f.put("c", Start::Latest, 5).await.0, Put::Created);
}

#[tokio::test]
async fn a_long_poll_wakes_for_a_publication_and_a_deleted_subscription_ends_it() {
    let mut f = Fixture::new(4);
    f.put("s", Start::Latest, 5).await;
    let subscriptions = Arc::new(f.subscriptions);
    f.subscriptions = MemorySubscriptions::new(f.feed.clone(), f.store.clone(), 4);
    let waiting = {
        let subscriptions = Arc::clone(&subscriptions);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            subscriptions.poll(&name_of("s"), 10, deadline).await
        })
    };
    // The poll runs until it waits (one thread: it runs now, to its wait).
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    f.publish(1).await;
    let leases = waiting.await.unwrap().unwrap();
    assert_eq!(sequences(&leases), [1]);

    let waiting = {
        let subscriptions = Arc::clone(&subscriptions);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            subscriptions.poll(&name_of("s"), 10, deadline).await
        })
    };
    // Deleted while the poll waits: it ends with 404, not at its deadline.
    tokio::task::yield_now().await;
    subscriptions.delete(&name_of("s")).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the poll ended")
        .unwrap();
    assert!(matches!(ended, Err(SubscriptionError::NotFound(_))));
}

#[tokio::test]
async fn a_released_lease_goes_out_again_as_the_same_delivery() {
    let mut f = Fixture::new(4);
    f.publish(1).await;
    f.put("s", Start::Earliest, 5).await;
    let leased = f.poll("s", 1).await;
    f.subscriptions
        .release(&name_of("s"), &[leased[0].ack_id])
        .await;
    assert_eq!(f.poll("s", 1).await[0].delivery, 1);
}

#[tokio::test]
async fn unacknowledged_events_are_bounded_by_the_window_and_a_stuck_one_costs_nothing() {
    let mut f = Fixture::new(4);
    let total = WINDOW as u64 + 5;
    f.feed = MemoryFeed::new(f.store.clone(), WINDOW + 10);
    f.subscriptions = MemorySubscriptions::new(f.feed.clone(), f.store.clone(), 4);
    f.publish(total).await;
    f.put("s", Start::Earliest, 5).await;
    // Consumers that never ack get the window's worth, then nothing new.
    let mut held = Vec::new();
    loop {
        let leases = f.poll("s", 1000).await;
        if leases.is_empty() {
            break;
        }
        held.extend(leases);
    }
    assert_eq!(held.len(), WINDOW);
    assert_eq!(f.state("s").await.pending, 5);
    // Acked but the first: the rest flows, the cursor stays below it.
    let refs: Vec<&Lease> = held[1..].iter().collect();
    f.ack("s", &refs, &[]).await;
    let rest = f.poll("s", 1000).await;
    assert_eq!(rest.len(), 5);
    let refs: Vec<&Lease> = rest.iter().collect();
    f.ack("s", &refs, &[]).await;
    assert_eq!(f.state("s").await.committed, 0);
    f.ack("s", &[&held[0]], &[]).await;
    assert_eq!(f.state("s").await.committed, total);
}

#[tokio::test]
async fn events_the_history_dropped_before_they_were_leased_are_counted_skipped() {
    let mut f = Fixture::new(4);
    f.feed = MemoryFeed::new(f.store.clone(), 3);
    f.subscriptions = MemorySubscriptions::new(f.feed.clone(), f.store.clone(), 4);
    f.put("s", Start::Earliest, 5).await;
    f.publish(5).await;
    let leases = f.poll("s", 10).await;
    assert_eq!(sequences(&leases), [3, 4, 5]);
    assert_eq!(f.state("s").await.skipped, 2);
}

#[tokio::test]
async fn an_ack_that_frees_room_in_a_full_window_wakes_a_waiting_poll() {
    let mut f = Fixture::new(4);
    f.feed = MemoryFeed::new(f.store.clone(), WINDOW + 10);
    f.subscriptions = MemorySubscriptions::new(f.feed.clone(), f.store.clone(), 4);
    f.publish(WINDOW as u64 + 1).await;
    f.put("s", Start::Earliest, 5).await;
    let mut held = Vec::new();
    while held.len() < WINDOW {
        held.extend(f.poll("s", 1000).await);
    }
    let subscriptions = Arc::new(f.subscriptions);
    let waiting = {
        let subscriptions = Arc::clone(&subscriptions);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            subscriptions.poll(&name_of("s"), 10, deadline).await
        })
    };
    // The poll runs until it waits: the window is full.
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    subscriptions
        .ack(&name_of("s"), &[held[0].ack_id], &[])
        .await
        .unwrap();
    let leases = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the ack woke the poll")
        .unwrap()
        .unwrap();
    assert_eq!(sequences(&leases), [WINDOW as u64 + 1]);
}
