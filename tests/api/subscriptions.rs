//! Named subscriptions over HTTP (memory mode): the lifecycle, leases and
//! acks, a consumer group with a consumer that dies holding leases, dead
//! letters and their redelivery, the long poll, limits and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TestApp, event, spawn_app, spawn_app_with};

impl TestApp {
    pub(crate) async fn put_subscription(&self, name: &str, body: Value) -> reqwest::Response {
        self.client
            .put(self.url(&format!("/subscriptions/{name}")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn poll_subscription(&self, name: &str, query: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/subscriptions/{name}/poll?{query}")))
            .send()
            .await
            .unwrap()
    }

    /// The events of a 200 poll.
    pub(crate) async fn poll_events(&self, name: &str, query: &str) -> Vec<Value> {
        let response = self.poll_subscription(name, query).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["events"].as_array().unwrap().clone()
    }

    pub(crate) async fn ack_subscription(&self, name: &str, body: Value) -> reqwest::Response {
        let path = format!("/subscriptions/{name}/ack");
        self.post_raw(&path, "application/json", body.to_string())
            .await
    }

    /// Asks for a subscription's dead letters to be handed out again.
    pub(crate) async fn redeliver(&self, name: &str, body: Value) -> reqwest::Response {
        let path = format!("/subscriptions/{name}/dead-letters/redeliver");
        self.post_raw(&path, "application/json", body.to_string())
            .await
    }

    /// Deletes a subscription; the answer's status.
    pub(crate) async fn delete_subscription(&self, name: &str) -> u16 {
        self.client
            .delete(self.url(&format!("/subscriptions/{name}")))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The answer of an ack request, which must be 200.
    pub(crate) async fn acked(&self, name: &str, body: Value) -> Value {
        let response = self.ack_subscription(name, body).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub(crate) async fn subscription(&self, name: &str) -> Value {
        let response = self.get(&format!("/subscriptions/{name}")).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }
}

pub(crate) fn ack_ids(events: &[Value]) -> Vec<Value> {
    events.iter().map(|e| e["ack_id"].clone()).collect()
}

#[tokio::test]
async fn a_subscription_is_created_found_compared_listed_and_deleted() {
    let app = spawn_app().await;
    let created = app
        .put_subscription("orders", json!({"start": "earliest", "max_deliver": 3}))
        .await;
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["location"], "/subscriptions/orders");
    let body: Value = created.json().await.unwrap();
    assert_eq!(
        body,
        json!({
            "name": "orders", "start": "earliest", "ack_timeout": "30s", "max_deliver": 3,
            "committed": 0, "pending": 0, "in_flight": 0, "dead_lettered": 0, "skipped": 0
        })
    );
    // The same settings, defaults written out: found, 200.
    let again = app
        .put_subscription(
            "orders",
            json!({"start": "earliest", "ack_timeout": "30s", "max_deliver": 3}),
        )
        .await;
    assert_eq!(again.status(), 200);
    let different = app
        .put_subscription("orders", json!({"start": "latest"}))
        .await;
    assert_eq!(different.status(), 409);
    let problem: Value = different.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "urn:eventflow:problem:subscription-conflict"
    );

    // An empty body takes the defaults.
    let empty = app
        .client
        .put(app.url("/subscriptions/audit"))
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 201);
    let list: Value = app.get("/subscriptions").await.json().await.unwrap();
    let names: Vec<&str> = list["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["audit", "orders"]);
    assert_eq!(list["subscriptions"][0]["start"], "latest");

    let series = "eventflow_subscription_pending{subscription=\"orders\"}";
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(series), "{series} not in /metrics");
    let deleted = app
        .client
        .delete(app.url("/subscriptions/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    // Its series leave with it: names that come and go do not pile up.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains("subscription=\"orders\""), "{metrics}");
    for path in [
        "/subscriptions/orders",
        "/subscriptions/orders/dead-letters",
    ] {
        assert_eq!(app.get(path).await.status(), 404, "{path}");
    }
    assert_eq!(app.poll_subscription("orders", "").await.status(), 404);
    assert_eq!(
        app.ack_subscription("orders", json!({})).await.status(),
        404
    );
}

#[tokio::test]
async fn bad_names_fields_and_queries_are_422_and_the_count_is_capped() {
    let app = spawn_app_with(|s| s.subscriptions.max_count = 2, Vec::new()).await;
    for name in ["a.b", &"x".repeat(65), "%C3%A9"] {
        let response = app.put_subscription(name, json!({})).await;
        assert_eq!(response.status(), 422, "{name}");
    }
    for body in [
        json!({"start": "middle"}),
        json!({"start": {"after": 5}}),
        json!({"ack_timeout": "forever"}),
        json!({"max_deliver": 0}),
        json!({"unknown": 1}),
    ] {
        let response = app.put_subscription("s", body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
    }
    let malformed = app
        .client
        .put(app.url("/subscriptions/s"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);

    assert_eq!(app.put_subscription("a", json!({})).await.status(), 201);
    assert_eq!(app.put_subscription("b", json!({})).await.status(), 201);
    let third = app.put_subscription("c", json!({})).await;
    assert_eq!(third.status(), 409);
    let problem: Value = third.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("subscriptions.max_count"),
        "{problem}"
    );

    for query in ["max=0", "max=1001", "wait=11s", "wait=soon", "other=1"] {
        let status = app.poll_subscription("a", query).await.status();
        assert!(status == 422 || status == 400, "{query}: {status}");
    }
    let forged = app
        .ack_subscription("a", json!({"ack_ids": ["m1.1.1", "not-ours"]}))
        .await;
    assert_eq!(forged.status(), 422);
    let problem: Value = forged.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "ack_ids[1]");
}

#[tokio::test]
async fn polled_events_are_leased_once_acked_and_the_cursor_commits() {
    let app = spawn_app().await;
    app.put_subscription("s", json!({"start": "earliest"}))
        .await;
    app.post_published(5, "straße").await;
    let mut leased = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while leased.len() < 5 {
        assert!(Instant::now() < deadline, "5 events never leased");
        leased.extend(app.poll_events("s", "max=3&wait=1s").await);
    }
    let sequences: Vec<u64> = leased
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5]);
    assert_eq!(leased[0]["delivery"], 1);
    assert_eq!(leased[0]["event"]["payload"], "STRASSE");
    assert!(leased[0]["event"]["metadata"]["worker"].is_u64());
    assert!(app.poll_events("s", "").await.is_empty());

    let state = app.subscription("s").await;
    assert_eq!(
        (state["in_flight"].as_u64(), state["committed"].as_u64()),
        (Some(5), Some(0))
    );
    let acked = app
        .ack_subscription("s", json!({"ack_ids": ack_ids(&leased)}))
        .await;
    assert_eq!(acked.status(), 200);
    assert_eq!(
        acked.json::<Value>().await.unwrap(),
        json!({"acked": 5, "nacked": 0, "expired": 0})
    );
    let state = app.subscription("s").await;
    assert_eq!(state["committed"], 5);
    assert_eq!(state["in_flight"], 0);
    // Acked twice: expired, never an error.
    let again = app
        .ack_subscription("s", json!({"ack_ids": ack_ids(&leased[..1])}))
        .await;
    assert_eq!(again.json::<Value>().await.unwrap()["expired"], 1);

    let metrics = app.get("/metrics").await.text().await.unwrap();
    for series in [
        "eventflow_subscription_delivered_total{subscription=\"s\"} 5",
        "eventflow_subscription_acked_total{subscription=\"s\"} 5",
        "eventflow_subscription_in_flight{subscription=\"s\"} 0",
        "eventflow_subscription_pending{subscription=\"s\"} 0",
    ] {
        assert!(metrics.contains(series), "{series} not in /metrics");
    }
}

#[tokio::test]
async fn a_long_poll_answers_when_an_event_is_published() {
    let app = Arc::new(spawn_app().await);
    app.put_subscription("live", json!({})).await;
    let poller = {
        let app = Arc::clone(&app);
        tokio::spawn(async move { app.poll_events("live", "wait=9s").await })
    };
    // The poll is waiting (the subscription has nothing yet) when the event comes.
    let response = app.post_event(&event("late", "x")).await;
    assert_eq!(response.status(), 202);
    let events = tokio::time::timeout(Duration::from_secs(30), poller)
        .await
        .expect("the poll answered")
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"]["id"], "late");
}

#[tokio::test]
async fn nacked_past_max_deliver_an_event_is_dead_lettered_then_redelivered() {
    let app = spawn_app().await;
    app.put_subscription("dl", json!({"start": "earliest", "max_deliver": 2}))
        .await;
    app.post_published(1, "poison").await;
    for delivery in 1..=2 {
        let events = app.poll_events("dl", "wait=5s").await;
        assert_eq!(events[0]["delivery"], delivery);
        let nacked = app
            .ack_subscription("dl", json!({"nack_ids": ack_ids(&events)}))
            .await;
        assert_eq!(nacked.json::<Value>().await.unwrap()["nacked"], 1);
    }
    let state = app.subscription("dl").await;
    assert_eq!(
        (state["dead_lettered"].as_u64(), state["committed"].as_u64()),
        (Some(1), Some(1))
    );
    let letters: Value = app
        .get("/subscriptions/dl/dead-letters")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(letters["next"], Value::Null);
    let letter = &letters["events"][0];
    assert_eq!(letter["sequence"], 1);
    assert_eq!(letter["delivery"], 2);
    assert_eq!(letter["event"]["payload"], "POISON");
    assert!(letter["dead_lettered_at"].as_str().unwrap().ends_with('Z'));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("eventflow_subscription_dead_lettered_total{subscription=\"dl\"} 1"));

    let redelivered = app.redeliver("dl", json!({"sequences": [1, 99]})).await;
    assert_eq!(redelivered.status(), 202);
    assert_eq!(
        redelivered.json::<Value>().await.unwrap(),
        json!({"redelivered": 1})
    );
    let events = app.poll_events("dl", "wait=5s").await;
    assert_eq!(events[0]["delivery"], 1, "its count starts over");
    assert_eq!(app.subscription("dl").await["dead_lettered"], 0);
}

/// Four consumers share one subscription while events are ingested; one
/// dies holding its leases. Every event is acked, only the dead one's
/// leases come back, and the cursor commits to the last sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_survives_a_consumer_that_dies_holding_leases() {
    const EVENTS: usize = 300;
    let app = Arc::new(spawn_app().await);
    app.put_subscription("group", json!({"start": "earliest", "ack_timeout": "3s"}))
        .await;
    let acked: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let producer = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            for i in 0..EVENTS {
                let response = app.post_event(&event(&format!("g{i}"), "x")).await;
                assert_eq!(response.status(), 202);
            }
        })
    };
    // The one that dies: takes a lease of 10 and is never heard from again.
    let lost: Vec<Value> = loop {
        let events = app.poll_events("group", "max=10&wait=5s").await;
        if !events.is_empty() {
            break events;
        }
    };
    let lost: BTreeSet<u64> = lost
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let app = Arc::clone(&app);
            let acked = Arc::clone(&acked);
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut redelivered = BTreeSet::new();
                while acked.lock().unwrap().len() < EVENTS {
                    assert!(Instant::now() < deadline, "not all events were acked");
                    let events = app.poll_events("group", "max=20&wait=1s").await;
                    for e in &events {
                        let sequence = e["sequence"].as_u64().unwrap();
                        if e["delivery"].as_u64() != Some(1) {
                            redelivered.insert(sequence);
                        }
                        *acked.lock().unwrap().entry(sequence).or_default() += 1;
                    }
                    if !events.is_empty() {
                        let answer = app
                            .ack_subscription("group", json!({"ack_ids": ack_ids(&events)}))
                            .await;
                        assert_eq!(answer.status(), 200);
                    }
                }
                redelivered
            })
        })
        .collect();
    producer.await.unwrap();
    let mut redelivered = BTreeSet::new();
    for consumer in consumers {
        redelivered.extend(consumer.await.unwrap());
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), EVENTS, "every event acknowledged");
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=EVENTS as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        redelivered, lost,
        "only the dead consumer's leases came back"
    );
    assert!(acked.values().all(|&n| n == 1), "each acked by exactly one");
    let state = app.subscription("group").await;
    assert_eq!(state["committed"], EVENTS as u64);
    assert_eq!(state["in_flight"], 0);
    assert_eq!(state["pending"], 0);
}
