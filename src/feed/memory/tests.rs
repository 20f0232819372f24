//! The memory feed: exact replay after any sequence, lines or lookups,
//! lagged ranges, and wake-ups.

use std::time::{Duration, SystemTime};

use super::*;
use crate::event::{Event, EventId};
use crate::store::{Insert, MemoryStore, Processing, Record};
use crate::testkit;
use crate::time::UnixNanos;
use crate::trace_id::TraceId;

/// A store holding `n` events `e1..=en` (arrival sequences 1..=n).
async fn store_with(n: u64) -> (Arc<MemoryStore>, Vec<Arc<Record>>) {
    let store = Arc::new(MemoryStore::new(&testkit::store_settings()));
    let mut records = Vec::new();
    for i in 1..=n {
        let event = Event {
            id: EventId::parse(&format!("e{i}")).unwrap(),
            timestamp: 1,
            payload: "p".into(),
        };
        match store
            .insert(event, SystemTime::now(), TraceId::random())
            .await
            .unwrap()
        {
            Insert::Inserted(record) => records.push(record),
            other => panic!("{other:?}"),
        }
    }
    (store, records)
}

/// Publishes the events with these arrival sequences, in this order.
async fn publish(feed: &MemoryFeed, arrivals: &[u64]) {
    let lines: Vec<String> = arrivals.iter().map(|a| format!("line-{a}")).collect();
    let ids: Vec<EventId> = arrivals
        .iter()
        .map(|a| EventId::parse(&format!("e{a}")).unwrap())
        .collect();
    let processing = Processing {
        worker: 0,
        processed_at: UnixNanos::now(),
    };
    let published: Vec<Published<'_>> = arrivals
        .iter()
        .zip(&lines)
        .zip(&ids)
        .map(|((&sequence, line), id)| Published {
            sequence,
            id,
            processing,
            line,
            span: None,
        })
        .collect();
    feed.append(&published).await.unwrap();
}

/// What a subscriber reads: `(publication sequence, line or stored event id)`,
/// or `(0, "lagged from-to")`.
async fn read_all(subscription: &mut Box<dyn Subscription>) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    while let Ok(Some(items)) =
        tokio::time::timeout(Duration::from_millis(50), subscription.next()).await
    {
        for item in items {
            seen.push(match item {
                FeedItem::Event {
                    publish_seq,
                    line: FeedLine::Json(line),
                } => (publish_seq, line.to_string()),
                FeedItem::Event {
                    publish_seq,
                    line: FeedLine::Stored(record),
                } => (publish_seq, format!("stored {}", record.event.id)),
                FeedItem::Lagged { from, to } => (0, format!("lagged {from}-{to}")),
            });
        }
    }
    seen
}

#[tokio::test]
async fn a_resume_after_any_sequence_replays_exactly_what_followed_then_goes_live() {
    let (store, _) = store_with(6).await;
    let feed = MemoryFeed::new(store, 100);
    let mut early = feed.subscribe(None, usize::MAX);
    // Published out of arrival order, as parallel workers do.
    publish(&feed, &[2, 1, 4]).await;
    assert_eq!(feed.head(), 3);
    let mut resumed = feed.subscribe(Some(1), usize::MAX);
    publish(&feed, &[3, 6, 5]).await;
    assert_eq!(
        read_all(&mut resumed).await,
        [
            (2, "line-1".to_owned()),
            (3, "line-4".to_owned()),
            (4, "line-3".to_owned()),
            (5, "line-6".to_owned()),
            (6, "line-5".to_owned()),
        ],
        "no gap, no repeat, publication order"
    );
    let first_six: Vec<u64> = read_all(&mut early).await.iter().map(|r| r.0).collect();
    assert_eq!(first_six, [1, 2, 3, 4, 5, 6]);
    let mut live = feed.subscribe(None, usize::MAX);
    publish(&feed, &[]).await;
    assert!(
        read_all(&mut live).await.is_empty(),
        "live starts after the head"
    );
}

#[tokio::test]
async fn lines_published_without_subscribers_are_rendered_from_the_store() {
    let (store, _) = store_with(3).await;
    let feed = MemoryFeed::new(store, 100);
    publish(&feed, &[3, 1]).await;
    let mut replay = feed.subscribe(Some(0), usize::MAX);
    publish(&feed, &[2]).await;
    assert_eq!(
        read_all(&mut replay).await,
        [
            (1, "stored e3".to_owned()),
            (2, "stored e1".to_owned()),
            (3, "line-2".to_owned()),
        ]
    );
}

#[tokio::test]
async fn what_is_no_longer_held_is_one_lagged_range() {
    let (store, records) = store_with(8).await;
    // The index holds the last four publications.
    let feed = MemoryFeed::new(store.clone(), 4);
    publish(&feed, &[1, 2, 3, 4, 5, 6]).await;
    // Evicted from the store meanwhile: publication 4 (arrival 4).
    store.remove(&records[3]).await;
    let mut from_start = feed.subscribe(Some(0), usize::MAX);
    assert_eq!(
        read_all(&mut from_start).await,
        [
            (0, "lagged 1-2".to_owned()),
            (3, "stored e3".to_owned()),
            (0, "lagged 4-4".to_owned()),
            (5, "stored e5".to_owned()),
            (6, "stored e6".to_owned()),
        ]
    );
    // Publications 1-4 are all gone for this reader: one notice.
    store.remove(&records[2]).await;
    let mut again = feed.subscribe(Some(0), usize::MAX);
    let read = read_all(&mut again).await;
    assert_eq!(read[0], (0, "lagged 1-4".to_owned()), "{read:?}");
}

#[tokio::test]
async fn an_id_past_the_head_replays_everything_held() {
    let (store, _) = store_with(2).await;
    let feed = MemoryFeed::new(store, 100);
    publish(&feed, &[1, 2]).await;
    // A Last-Event-ID from before a restart.
    let mut stale = feed.subscribe(Some(5000), usize::MAX);
    let read: Vec<u64> = read_all(&mut stale).await.iter().map(|r| r.0).collect();
    assert_eq!(read, [1, 2]);
}

#[tokio::test]
async fn a_waiting_reader_and_a_waiter_wake_on_append_and_outcome_changes() {
    let (store, _) = store_with(1).await;
    let feed = MemoryFeed::new(store, 100);
    let mut subscription = feed.subscribe(None, usize::MAX);
    let mut changes = feed.changes();
    changes.borrow_and_update();
    let reader = tokio::spawn(async move { subscription.next().await });
    tokio::task::yield_now().await;
    publish(&feed, &[1]).await;
    let items = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        items[..],
        [FeedItem::Event { publish_seq: 1, .. }]
    ));
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    feed.outcomes_changed();
    assert!(changes.has_changed().unwrap(), "failures wake waiters too");
}

#[tokio::test]
async fn subscribers_are_counted_while_open() {
    let (store, _) = store_with(0).await;
    let feed = MemoryFeed::new(store, 100);
    let a = feed.subscribe(None, usize::MAX);
    let b = feed.subscribe(Some(0), usize::MAX);
    assert_eq!(feed.subscribers(), 2);
    drop(a);
    drop(b);
    assert_eq!(feed.subscribers(), 0);
}

#[tokio::test]
async fn a_read_holds_at_most_its_bytes_and_the_next_goes_on_without_a_gap() {
    let (store, _) = store_with(6).await;
    let feed = MemoryFeed::new(store, 100);
    let mut subscription = feed.subscribe(Some(0), 13);
    publish(&feed, &[1, 2, 3, 4, 5]).await;
    let mut batches = Vec::new();
    while batches.iter().map(Vec::len).sum::<usize>() < 5 {
        // Lines of 6 bytes: two fit in 13.
        let items = subscription.next().await.unwrap();
        assert!(items.iter().map(FeedItem::held_bytes).sum::<usize>() <= 13);
        batches.push(
            items
                .iter()
                .map(|item| match item {
                    FeedItem::Event { publish_seq, .. } => *publish_seq,
                    other => panic!("{other:?}"),
                })
                .collect::<Vec<u64>>(),
        );
    }
    assert_eq!(batches, [vec![1, 2], vec![3, 4], vec![5]]);
    // A line larger than the bound still comes, alone.
    let mut small = feed.subscribe(Some(3), 1);
    let items = small.next().await.unwrap();
    assert_eq!(items.len(), 1);
    let items = small.next().await.unwrap();
    assert_eq!(items.len(), 1);
}
