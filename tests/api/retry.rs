//! Failed events back in the backlog: one by id, many by cursor, and what
//! is not failed or not there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use eventflow::sink::{Publications, PublishError, Sink, SinkError};
use serde_json::{Value, json};

use crate::helpers::{TestApp, event, spawn_app, spawn_app_with};

/// A downstream that refuses every write while `failing` is set, then
/// takes them again: a transient outage.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flaky(pub(crate) Arc<AtomicBool>);

#[async_trait]
impl Sink for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn publish(&self, _: Publications<'_>) -> Result<(), PublishError> {
        if self.0.load(Ordering::SeqCst) {
            return Err(SinkError::Closed("flaky").into());
        }
        Ok(())
    }
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

pub(crate) async fn retry(app: &TestApp, id: &str) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/events/{id}/retry")))
        .send()
        .await
        .unwrap()
}

pub(crate) async fn retry_many(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/events/retry"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_failed_event_retried_is_published_with_its_attempts_counted() {
    let flaky = Flaky::default();
    flaky.0.store(true, Ordering::SeqCst);
    let app = spawn_app_with(|_| {}, vec![Arc::new(flaky.clone())]).await;
    assert_eq!(app.post_event(&event("r1", "again")).await.status(), 202);
    let failed = app.wait_for_status("r1", "failed").await;
    assert_eq!(failed["attempts"], 1);

    // The outage is over.
    flaky.0.store(false, Ordering::SeqCst);
    let response = retry(&app, "r1").await;
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"id": "r1", "status": "pending", "attempts": 2})
    );
    let processed = app.wait_for_status("r1", "processed").await;
    assert_eq!(processed["attempts"], 2);
    assert_eq!(processed["result"]["payload"], "AGAIN");
    // Same event, same arrival sequence.
    assert_eq!(processed["sequence"], failed["sequence"]);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("eventflow_events_retried_total 1"),
        "{metrics}"
    );

    // Published now: not failed, so nothing to retry.
    let again = retry(&app, "r1").await;
    assert_eq!(again.status(), 409);
    let problem: Value = again.json().await.unwrap();
    assert_eq!(problem["type"], "urn:eventflow:problem:not-failed");
}

#[tokio::test]
async fn an_unknown_event_is_404() {
    let app = spawn_app().await;
    assert_eq!(retry(&app, "never-sent").await.status(), 404);
}

#[tokio::test]
async fn failed_events_are_retried_many_at_a_time_in_arrival_order() {
    let flaky = Flaky::default();
    flaky.0.store(true, Ordering::SeqCst);
    let app = spawn_app_with(|_| {}, vec![Arc::new(flaky.clone())]).await;
    for i in 0..5 {
        assert_eq!(
            app.post_event(&event(&format!("m{i}"), "x")).await.status(),
            202
        );
    }
    for i in 0..5 {
        app.wait_for_status(&format!("m{i}"), "failed").await;
    }
    flaky.0.store(false, Ordering::SeqCst);
    let first = retry_many(&app, json!({"status": "failed", "limit": 2})).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["requeued"], 2);
    let next = first["next"].as_str().unwrap().to_owned();
    let rest: Value = retry_many(&app, json!({"after": next, "limit": 10}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest, json!({"requeued": 3, "next": null}));
    for i in 0..5 {
        let record = app.wait_for_status(&format!("m{i}"), "processed").await;
        assert_eq!(record["attempts"], 2);
    }
    // Nothing failed is left.
    let none: Value = retry_many(&app, json!({})).await.json().await.unwrap();
    assert_eq!(none, json!({"requeued": 0, "next": null}));

    for body in [
        json!({"status": "pending"}),
        json!({"limit": 0}),
        json!({"limit": 1001}),
        json!({"after": "x"}),
        json!({"other": 1}),
    ] {
        assert_eq!(retry_many(&app, body.clone()).await.status(), 422, "{body}");
    }
}
