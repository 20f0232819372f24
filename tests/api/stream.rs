//! `GET /events/stream`: live SSE, resume with `Last-Event-ID`, lag.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{event, spawn_app};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn subscriber_receives_events_posted_after_it_connected() {
    let app = spawn_app().await;
    let mut stream = app.subscribe(None).await;
    for i in 0..5 {
        assert_eq!(
            app.post_event(&event(&format!("s{i}"), "live"))
                .await
                .status(),
            202
        );
    }
    let mut received = HashSet::new();
    while received.len() < 5 {
        let message = stream.next(WAIT).await.expect("an SSE message");
        if message.data.is_empty() {
            continue;
        }
        let published: Value = serde_json::from_str(&message.data).unwrap();
        assert_eq!(published["payload"], "LIVE");
        assert_eq!(
            message.id,
            published["metadata"]["sequence"].to_string(),
            "id: is the sequence"
        );
        assert!(
            received.insert(published["id"].as_str().unwrap().to_owned()),
            "no repeats"
        );
    }
}

#[tokio::test]
async fn reconnecting_with_last_event_id_replays_then_goes_live() {
    let app = spawn_app().await;
    for i in 1..=4 {
        app.post_event(&event(&format!("r{i}"), "x")).await;
    }
    app.wait_for_status("r4", "processed").await;
    for i in 1..=4 {
        app.wait_for_status(&format!("r{i}"), "processed").await;
    }
    let mut stream = app.subscribe(Some(2)).await;
    let mut ids = Vec::new();
    while ids.len() < 2 {
        let message = stream.next(WAIT).await.expect("replayed message");
        ids.push(message.id);
    }
    assert_eq!(
        ids,
        ["3", "4"],
        "replay starts after Last-Event-ID, in order"
    );
    app.post_event(&event("r5", "x")).await;
    let live = stream.next(WAIT).await.expect("live message");
    assert_eq!(live.id, "5");
    assert!(
        stream.next(Duration::from_millis(300)).await.is_none(),
        "nothing is sent twice"
    );
}

#[tokio::test]
async fn a_slow_subscriber_is_told_it_lagged_and_does_not_slow_the_pipeline() {
    let app = spawn_app().await;
    let mut stream = app.subscribe(None).await;
    // Far more than the feed's buffer plus what the socket can hold; the
    // subscriber reads nothing meanwhile.
    let payload = "x".repeat(2000);
    for batch in 0..20 {
        let events: Vec<Value> = (0..1000)
            .map(|i| event(&format!("lag-{batch}-{i}"), &payload))
            .collect();
        let response = app.post_batch(events).await;
        assert_eq!(response.status(), 202);
    }
    // The pipeline finished without waiting for the subscriber.
    app.wait_for_stdout_lines(20_000).await;
    let mut lagged = None;
    for _ in 0..25_000 {
        match stream.next(WAIT).await {
            Some(message) if message.event == "lagged" => {
                lagged = Some(message);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    let lagged = lagged.expect("a lagged event");
    let body: Value = serde_json::from_str(&lagged.data).unwrap();
    assert!(body["skipped"].as_u64().unwrap() > 0);
    // And operators see it.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let lags: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("eventflow_sse_lagged_total "))
        .expect("eventflow_sse_lagged_total")
        .parse()
        .unwrap();
    assert!(lags >= 1.0, "eventflow_sse_lagged_total {lags}");
}

#[tokio::test]
async fn long_lines_reach_subscribers_whole_like_short_ones() {
    let app = spawn_app().await;
    let mut stream = app.subscribe(None).await;
    // Over the feed's inline limit (8 KiB) once escaped, and under it.
    let long = "\u{1}é".repeat(3_000);
    for (id, payload) in [("long", long.as_str()), ("short", "x")] {
        assert_eq!(app.post_event(&event(id, payload)).await.status(), 202);
    }
    let stdout = app.wait_for_stdout_lines(2).await;
    let mut received = Vec::new();
    while received.len() < 2 {
        let message = stream.next(WAIT).await.expect("an SSE message");
        if message.data.is_empty() {
            continue;
        }
        assert_eq!(message.event, "message", "{}", message.data);
        let published: Value = serde_json::from_str(&message.data).unwrap();
        assert_eq!(message.id, published["metadata"]["sequence"].to_string());
        received.push(published);
    }
    // Exactly what stdout got, the long one rendered again from the store.
    for published in &received {
        assert!(stdout.contains(published), "{published}");
    }
    let long = received
        .iter()
        .find(|p| p["id"] == "long")
        .expect("the long event");
    assert_eq!(long["payload"], "\u{1}É".repeat(3_000));
}
