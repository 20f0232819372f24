//! The in-memory store's tests: bounds, eviction, concurrency, pages.

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

async fn process(store: &MemoryStore, record: &Record) -> bool {
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
    assert!(matches!(insert(&store, "a", "p").await, Ok(Insert::Duplicate(r)) if r.sequence == 1));
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
                Insert::Requeue(r) => panic!("requeued in memory: {r:?}"),
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
        store.get(&a.event.id).await.unwrap().is_some(),
        "pending is never evicted"
    );
    assert!(
        store.get(&b.event.id).await.unwrap().is_none(),
        "oldest processed goes first"
    );
    assert!(store.get(&c.event.id).await.unwrap().is_some());
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
    // One pass frees 1/EVICTION_SLACK_DIVISOR of the bound beyond the insert's own need.
    let evicted = MAX / EVICTION_SLACK_DIVISOR + 1;
    assert_eq!(store.evictions(), evicted as u64);
    assert_eq!(store.len(), MAX - evicted + 1);
    for i in [0, evicted / 2, evicted - 1] {
        let id = EventId::parse(&format!("id-{i}")).unwrap();
        assert!(
            store.get(&id).await.unwrap().is_none(),
            "id-{i} was evicted"
        );
    }
    for i in [evicted, MAX / 2, MAX - 1] {
        let id = EventId::parse(&format!("id-{i}")).unwrap();
        assert!(store.get(&id).await.unwrap().is_some(), "id-{i} is kept");
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
            Ok(Insert::Requeue(r)) => ("requeue", r.sequence),
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
    assert_eq!(batched.get(&e0).await.unwrap().map(|r| r.sequence), Some(2));
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
                        Insert::Requeue(r) => panic!("requeued in memory: {}", r.event.id),
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
            held_bytes += store.get(&id).await.unwrap().unwrap().footprint();
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
    assert!(store.get(&held[19].event.id).await.unwrap().is_some());
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
        .await
        .unwrap();
    let seqs: Vec<u64> = page.records.iter().map(|r| r.sequence).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(page.next, Some(4));
    let page = store
        .page(PageQuery {
            after: 4,
            limit: 4,
            ..Default::default()
        })
        .await
        .unwrap();
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
        .await
        .unwrap();
    assert_eq!(last.records.len(), 2);
    assert_eq!(last.next, None, "no cursor past the end");
    let exact = store
        .page(PageQuery {
            after: 6,
            limit: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(exact.records.len(), 4);
    assert_eq!(exact.next, None, "an exactly full last page has no cursor");
    let pending = store
        .page(PageQuery {
            after: 0,
            limit: 100,
            status: Some(Status::Pending),
        })
        .await
        .unwrap();
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
async fn an_outcome_is_set_once_and_a_pass_completes_together() {
    let store = MemoryStore::new(&settings(100, 1 << 20));
    let a = inserted(&store, "a").await;
    let b = inserted(&store, "b").await;
    let c = inserted(&store, "c").await;
    assert!(process(&store, &b).await);
    assert!(!process(&store, &b).await, "an outcome is set once");
    let processing = Processing {
        worker: 3,
        processed_at: crate::time::UnixNanos::now(),
    };
    let set = store.complete_processed(&[&*a, &*b, &*c], processing).await;
    assert_eq!(
        set,
        [true, false, true],
        "a record with an outcome keeps it"
    );
    assert_eq!(c.status(), Status::Processed);
    let failed = inserted(&store, "d").await;
    assert!(
        store
            .complete(&failed, CompleteWith::Failed("sink `stdout` failed".into()))
            .await
    );
    assert_eq!(failed.status(), Status::Failed);
}

#[tokio::test]
async fn records_are_found_by_arrival_sequence_while_held() {
    let store = MemoryStore::new(&settings(100, 1 << 20));
    let a = inserted(&store, "a").await;
    let b = inserted(&store, "b").await;
    assert_eq!(
        store
            .get_by_sequence(b.sequence)
            .await
            .map(|r| r.event.id.clone()),
        Some(b.event.id.clone())
    );
    store.remove(&a).await;
    assert!(store.get_by_sequence(a.sequence).await.is_none());
    assert!(store.get_by_sequence(99).await.is_none());
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
    assert!(store.get(&a.event.id).await.unwrap().is_none());
    assert_eq!(store.len(), 0);
    assert_eq!(store.bytes(), 0);
}

#[tokio::test]
async fn a_failed_record_is_replaced_by_a_pending_one_once_however_many_retry() {
    let store = MemoryStore::new(&settings(10, 1 << 20));
    let failed = inserted(&store, "f").await;
    assert!(store.retry(&failed).await.unwrap().is_none(), "pending");
    let before = store.bytes();
    store
        .complete(&failed, CompleteWith::Failed("it broke".into()))
        .await;
    assert_eq!(store.bytes(), before + "it broke".len());
    assert_eq!(store.attempts(&failed), 1);

    let fresh = store.retry(&failed).await.unwrap().expect("retried");
    assert_eq!(fresh.sequence, failed.sequence);
    assert_eq!(fresh.status(), Status::Pending);
    assert_eq!(store.bytes(), before, "the error text left with it");
    assert_eq!(store.attempts(&fresh), 2);
    // The second of two racing retries finds it replaced.
    assert!(store.retry(&failed).await.unwrap().is_none());
    let held = store.get(&failed.event.id).await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&held, &fresh));
    assert!(Arc::ptr_eq(
        &store.get_by_sequence(failed.sequence).await.unwrap(),
        &fresh
    ));
    assert_eq!(store.len(), 1);
    // Its count leaves with it.
    store.remove(&fresh).await;
    assert_eq!(store.attempts(&fresh), 1);
}
