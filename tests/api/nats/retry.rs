//! Retrying failed events in nats mode: the failure stays on the failed
//! stream, a retry marks it pending again (atomically: of two replicas
//! retrying it at once, one wins), and the count of attempts travels with
//! the event to whichever replica publishes it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::{nats_mode, server};
use crate::helpers::{TestApp, event, spawn_app_with};
use crate::retry::{Flaky, retry, retry_many};

/// A replica whose extra sink fails while `flaky` says so; a chunk fails
/// for good at its first failed delivery.
async fn flaky_replica(url: &str, flaky: &Flaky) -> TestApp {
    spawn_app_with(
        |settings| {
            nats_mode(settings, url);
            settings.backend.nats.max_deliver = 1;
        },
        vec![Arc::new(flaky.clone())],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_event_is_retried_through_any_replica_once_and_counted() {
    let Some(nats) = server::single().await else {
        return;
    };
    let url = nats.url();
    let flaky = Flaky::default();
    flaky.0.store(true, Ordering::SeqCst);
    let a = flaky_replica(&url, &flaky).await;
    let b = flaky_replica(&url, &flaky).await;
    for id in ["r1", "r2", "m0", "m1", "m2"] {
        assert_eq!(a.post_event(&event(id, "again")).await.status(), 202);
    }
    let failed = b.wait_for_status("r1", "failed").await;
    assert_eq!(failed["attempts"], 1);
    for id in ["r2", "m0", "m1", "m2"] {
        b.wait_for_status(id, "failed").await;
    }
    flaky.0.store(false, Ordering::SeqCst);

    // Through B; then A sees it pending, and it cannot be retried again.
    let response = retry(&b, "r1").await;
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"id": "r1", "status": "pending", "attempts": 2})
    );
    let processed = a.wait_for_status("r1", "processed").await;
    assert_eq!(processed["attempts"], 2);
    assert_eq!(processed["result"]["payload"], "AGAIN");
    assert_eq!(processed["sequence"], failed["sequence"]);
    assert_eq!(retry(&a, "r1").await.status(), 409);
    assert_eq!(retry(&a, "never-sent").await.status(), 404);

    // Two replicas retrying one event at once: one wins.
    let (first, second) = tokio::join!(retry(&a, "r2"), retry(&b, "r2"));
    let mut statuses = [first.status().as_u16(), second.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409]);
    assert_eq!(b.wait_for_status("r2", "processed").await["attempts"], 2);

    // The rest, many at a time, in arrival order.
    let first: Value = retry_many(&a, json!({"status": "failed", "limit": 2}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["requeued"], 2, "{first}");
    let next = first["next"].as_str().unwrap().to_owned();
    let rest: Value = retry_many(&b, json!({"after": next, "limit": 10}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["requeued"], 1, "{rest}");
    for id in ["m0", "m1", "m2"] {
        assert_eq!(a.wait_for_status(id, "processed").await["attempts"], 2);
    }
    let none: Value = retry_many(&b, json!({})).await.json().await.unwrap();
    assert_eq!(none["requeued"], 0, "{none}");
}
