//! `GET /events/stream`: live SSE with publication sequences, exact resume
//! with `Last-Event-ID`, lag.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{event, spawn_app, spawn_app_with};

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
    let mut ids = Vec::new();
    while received.len() < 5 {
        let message = stream.next(WAIT).await.expect("an SSE message");
        if message.data.is_empty() {
            continue;
        }
        let published: Value = serde_json::from_str(&message.data).unwrap();
        assert_eq!(published["payload"], "LIVE");
        ids.push(message.id);
        assert!(
            received.insert(published["id"].as_str().unwrap().to_owned()),
            "no repeats"
        );
    }
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5"],
        "id: is the publication sequence"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_reconnecting_gets_every_event_exactly_once() {
    const EVENTS: usize = 20_000;
    const BATCH: usize = 100;
    let app = spawn_app_with(|s| s.pipeline.workers = 4, Vec::new()).await;
    // Ingest while the client comes and goes: several workers publish out
    // of arrival order, so a resume by arrival order would miss events.
    let producer = {
        let (client, url) = (app.client.clone(), app.url("/events/batch"));
        tokio::spawn(async move {
            for batch in 0..EVENTS / BATCH {
                let events: Vec<Value> = (0..BATCH)
                    .map(|i| event(&format!("re-{}", batch * BATCH + i), "x"))
                    .collect();
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(Value::from(events).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
            }
        })
    };
    let mut seen: HashMap<String, u64> = HashMap::new();
    // Everything from the first publication on.
    let mut last_id = 0;
    let mut reconnects = 0;
    let started = std::time::Instant::now();
    while seen.len() < EVENTS {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} of {EVENTS} events after {reconnects} reconnects",
            seen.len()
        );
        let mut stream = app.subscribe(Some(last_id)).await;
        // Read a varying number of messages, then hang up.
        let take = 50 + (reconnects * 397) % 900;
        for _ in 0..take {
            let Some(message) = stream.next(WAIT).await else {
                break;
            };
            assert_eq!(message.event, "message", "nothing lagged: {}", message.data);
            let publish_seq: u64 = message.id.parse().unwrap();
            assert_eq!(publish_seq, last_id + 1, "no gap, no repeat at the seam");
            last_id = publish_seq;
            let published: Value = serde_json::from_str(&message.data).unwrap();
            let id = published["id"].as_str().unwrap().to_owned();
            *seen.entry(id).or_default() += 1;
        }
        drop(stream);
        reconnects += 1;
    }
    producer.await.unwrap();
    assert!(
        reconnects >= 20,
        "the client reconnected {reconnects} times"
    );
    assert_eq!(seen.len(), EVENTS);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "seen more than once: {twice:?}");
    assert_eq!(last_id, EVENTS as u64);
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
    // A store of 5,000 events: what a subscriber has not read by the time
    // they are evicted is gone.
    let app = spawn_app_with(
        |s| {
            s.store.max_events = 5_000;
            s.pipeline.queue_capacity = 5_000;
        },
        Vec::new(),
    )
    .await;
    let mut stream = app.subscribe(None).await;
    // Far more than the store holds; the subscriber reads nothing meanwhile.
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
    let (from, to) = (body["from"].as_u64().unwrap(), body["to"].as_u64().unwrap());
    assert!(from <= to && to <= 20_000, "{body}");
    assert_eq!(body["skipped"].as_u64().unwrap(), to - from + 1);
    assert_eq!(lagged.id, to.to_string(), "a resume goes on after the gap");
    // Then the events still held, from right after the gap.
    let next = stream.next(WAIT).await.expect("the next held event");
    assert_eq!(next.id, (to + 1).to_string());
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
