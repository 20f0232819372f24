//! `POST /events` and `GET /events/{id}`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Gate, TestApp, event, spawn_app, spawn_app_with};

async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:eventflow:problem:")
    );
    assert!(body["title"].is_string() && body["detail"].is_string());
    body
}

fn fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn accepted_event_is_processed_and_published_to_stdout() {
    let app = spawn_app().await;
    let response = app.post_event(&event("evt-1", "straße ﬁx")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["location"], "/events/evt-1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"id": "evt-1", "status": "accepted", "sequence": 1})
    );

    let record = app.wait_for_status("evt-1", "processed").await;
    assert_eq!(
        record["payload"], "straße ﬁx",
        "the record keeps the original"
    );
    assert_eq!(record["sequence"], 1);
    assert!(record["received_at"].as_str().unwrap().ends_with('Z'));
    let result = &record["result"];
    assert_eq!(result["payload"], "STRASSE FIX");
    assert_eq!(result["timestamp"], 1_700_000_000);
    let metadata = &result["metadata"];
    for key in [
        "received_at",
        "processed_at",
        "worker",
        "sequence",
        "queue_wait_ms",
        "trace_id",
    ] {
        assert!(
            !metadata[key].is_null(),
            "metadata.{key} missing: {metadata}"
        );
    }

    let lines = app.wait_for_stdout_lines(1).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(
        &lines[0], result,
        "stdout carries exactly the published event"
    );
}

#[tokio::test]
async fn traceparent_trace_id_reaches_the_metadata() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/events"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&event("traced", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let record = app.wait_for_status("traced", "processed").await;
    assert_eq!(
        record["result"]["metadata"]["trace_id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[tokio::test]
async fn duplicate_is_200_and_not_processed_twice_conflict_is_409() {
    let app = spawn_app().await;
    assert_eq!(app.post_event(&event("dup", "same")).await.status(), 202);
    let again = app.post_event(&event("dup", "same")).await;
    assert_eq!(again.status(), 200);
    let body: Value = again.json().await.unwrap();
    assert_eq!(
        body,
        json!({"id": "dup", "status": "duplicate", "sequence": 1})
    );

    let conflict = problem(app.post_event(&event("dup", "different")).await, 409).await;
    assert!(conflict["detail"].as_str().unwrap().contains("dup"));

    app.wait_for_status("dup", "processed").await;
    // Another event afterwards proves the pipeline moved on; still one `dup` line.
    app.post_event(&event("after", "x")).await;
    let lines = app.wait_for_stdout_lines(2).await;
    assert_eq!(lines.iter().filter(|l| l["id"] == "dup").count(), 1);
}

#[tokio::test]
async fn concurrent_posts_of_one_id_have_exactly_one_winner() {
    let app = Arc::new(spawn_app().await);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            app.post_event(&event("contended", "p"))
                .await
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        31,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn two_thousand_events_from_32_clients_are_published_exactly_once() {
    let app = Arc::new(spawn_app().await);
    let mut tasks = Vec::new();
    for client in 0..32 {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            for i in 0..63 {
                if client * 63 + i >= 2000 {
                    break;
                }
                let id = format!("c{client}-e{i}");
                let response = app.post_event(&event(&id, "load")).await;
                assert_eq!(response.status(), 202, "{id}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let lines = app.wait_for_stdout_lines(2000).await;
    app.wait_until_idle().await;
    let lines_after = app.stdout.lines();
    assert_eq!(lines_after.len(), 2000, "no event is published twice");
    let ids: HashSet<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2000);
    let sequences: HashSet<u64> = lines
        .iter()
        .map(|l| l["metadata"]["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, (1..=2000).collect());
    assert!(lines.iter().all(|l| l["payload"] == "LOAD"));
}

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;
    for body in ["{", "not json", "", "{\"id\":\"a\",}"] {
        let response = app.post_raw("/events", "application/json", body).await;
        problem(response, 400).await;
    }
}

#[tokio::test]
async fn wrong_or_missing_content_type_is_415() {
    let app = spawn_app().await;
    let body = event("a", "x").to_string();
    problem(
        app.post_raw("/events", "text/plain", body.clone()).await,
        415,
    )
    .await;
    let response = app
        .client
        .post(app.url("/events"))
        .body(body)
        .send()
        .await
        .unwrap();
    problem(response, 415).await;
}

#[tokio::test]
async fn body_over_max_body_bytes_is_413() {
    let app = spawn_app_with(|s| s.server.max_body_bytes = 1024, Vec::new()).await;
    let response = app.post_event(&event("big", &"x".repeat(2000))).await;
    problem(response, 413).await;
    // A streamed body without Content-Length is cut off just the same.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b' '; 800]), Ok(vec![b' '; 800])];
    let response = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    problem(response, 413).await;
}

#[tokio::test]
async fn invalid_fields_are_422_and_named() {
    let app = spawn_app().await;
    let cases = [
        (json!({"id": "", "timestamp": 1, "payload": ""}), vec!["id"]),
        (
            json!({"id": "x".repeat(257), "timestamp": 1, "payload": ""}),
            vec!["id"],
        ),
        (
            json!({"id": "a\u{7}b", "timestamp": 1, "payload": ""}),
            vec!["id"],
        ),
        (
            json!({"id": "a", "timestamp": 1.5, "payload": ""}),
            vec!["timestamp"],
        ),
        (
            json!({"id": "a", "timestamp": "1", "payload": ""}),
            vec!["timestamp"],
        ),
        (
            json!({"id": "a", "timestamp": 9_223_372_036_854_775_808_u64, "payload": ""}),
            vec!["timestamp"],
        ),
        (
            json!({"id": "a", "timestamp": 1, "payload": "x".repeat(65_537)}),
            vec!["payload"],
        ),
        (
            json!({"id": "a", "timestamp": 1, "payload": 5}),
            vec!["payload"],
        ),
        (
            json!({"id": "a", "timestamp": 1, "payload": "", "extra": true}),
            vec!["extra"],
        ),
        (json!({}), vec!["id", "timestamp", "payload"]),
        (json!([1]), vec!["body"]),
    ];
    for (body, expected) in cases {
        let p = problem(app.post_event(&body).await, 422).await;
        assert_eq!(fields(&p), expected, "{body}");
    }
    // The boundary values are accepted.
    let ok = json!({"id": "x".repeat(256), "timestamp": i64::MAX, "payload": "p".repeat(65_536)});
    assert_eq!(app.post_event(&ok).await.status(), 202);
}

#[tokio::test]
async fn wait_published_returns_the_published_event() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/events?wait=published"))
        .json(&event("sync", "wait for me"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], "sync");
    assert_eq!(body["payload"], "WAIT FOR ME");
    assert_eq!(body["metadata"]["sequence"], 1);
    let p = problem(
        app.client
            .post(app.url("/events?wait=soon"))
            .json(&event("w2", "x"))
            .send()
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(fields(&p), ["wait"]);
}

#[tokio::test]
async fn wait_published_times_out_with_504() {
    let gate = Gate::closed();
    let app = spawn_app_with(
        |s| s.server.request_timeout = Duration::from_millis(300),
        vec![Arc::new(gate.clone())],
    )
    .await;
    let response = app
        .client
        .post(app.url("/events?wait=published"))
        .json(&event("slow", "x"))
        .send()
        .await
        .unwrap();
    problem(response, 504).await;
    // The event was accepted all the same and is published once the sink frees up.
    gate.open_all();
    app.wait_for_status("slow", "processed").await;
}

#[tokio::test]
async fn a_retry_after_504_gets_the_published_event_and_every_try_is_counted() {
    let gate = Gate::closed();
    let app = Arc::new(
        spawn_app_with(
            |s| s.server.request_timeout = Duration::from_millis(400),
            vec![Arc::new(gate.clone())],
        )
        .await,
    );
    let waiting = |app: Arc<TestApp>| {
        app.client
            .post(app.url("/events?wait=published"))
            .json(&event("late", "x"))
    };
    problem(waiting(Arc::clone(&app)).send().await.unwrap(), 504).await;
    // A client that stops waiting: its try is counted all the same.
    let gave_up = waiting(Arc::clone(&app))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    let retry = tokio::spawn(waiting(Arc::clone(&app)).send());
    // The retry is counted once it is taken, before it waits.
    let mut taken = None;
    for _ in 0..500 {
        taken = app.metric("eventflow_events_received_total").await;
        if taken == Some(3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(taken, Some(3.0), "the retry was never taken");
    gate.open_all();
    let retry = retry.await.unwrap().unwrap();
    assert_eq!(retry.status(), 200);
    let published: Value = retry.json().await.unwrap();
    assert_eq!(published["id"], "late");
    assert_eq!(published["payload"], "X");
    // Once published, a retry gets it at once.
    let again = waiting(Arc::clone(&app)).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap(), published);
    let expected = [
        "eventflow_events_received_total 4",
        "eventflow_events_accepted_total 1",
        "eventflow_events_duplicate_total 3",
    ];
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = app.get("/metrics").await.text().await.unwrap();
        if expected.iter().all(|e| metrics.lines().any(|l| l == *e)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{expected:?} not all in:\n{metrics}");
}

#[tokio::test]
async fn overload_is_503_with_retry_after_and_stores_nothing() {
    let gate = Gate::closed();
    let app = spawn_app_with(
        |s| {
            s.pipeline.queue_capacity = 3;
            s.pipeline.workers = 1;
        },
        vec![Arc::new(gate.clone())],
    )
    .await;
    for i in 0..3 {
        assert_eq!(
            app.post_event(&event(&format!("fill-{i}"), "x"))
                .await
                .status(),
            202
        );
    }
    let response = app.post_event(&event("one-too-many", "x")).await;
    assert_eq!(response.headers()["retry-after"], "1");
    problem(response, 503).await;
    problem(app.get("/events/one-too-many").await, 404).await;
    // Retries of accepted events are still answered while full.
    assert_eq!(app.post_event(&event("fill-0", "x")).await.status(), 200);
    // Once the pipeline drains, permits are back.
    gate.open_all();
    app.wait_for_status("fill-2", "processed").await;
    assert_eq!(
        app.post_event(&event("one-too-many", "x")).await.status(),
        202
    );
}

#[tokio::test]
async fn queue_bytes_bound_large_payload_floods() {
    let gate = Gate::closed();
    let app = spawn_app_with(
        |s| {
            s.pipeline.queue_max_bytes = 200 * 1024;
            s.store.max_bytes = 400 * 1024;
        },
        vec![Arc::new(gate.clone())],
    )
    .await;
    let payload = "x".repeat(60 * 1024);
    let mut accepted = 0;
    let mut overloaded = 0;
    for i in 0..20 {
        match app
            .post_event(&event(&format!("big-{i}"), &payload))
            .await
            .status()
            .as_u16()
        {
            202 => accepted += 1,
            503 => overloaded += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(accepted, 3, "200 KiB holds three 60 KiB events");
    assert_eq!(overloaded, 17);
    assert!(app.pipeline.backpressure().bytes_in_use() <= 200 * 1024);
    gate.open_all();
}

#[tokio::test]
async fn unknown_event_and_route_are_404_problems_and_a_wrong_method_405() {
    let app = spawn_app().await;
    problem(app.get("/events/nope").await, 404).await;
    problem(app.get("/no/such/route").await, 404).await;
    for (method, path, allowed) in [
        (
            reqwest::Method::DELETE,
            "/events",
            ["GET", "POST"].as_slice(),
        ),
        (reqwest::Method::PUT, "/events/batch", &["POST"]),
        (reqwest::Method::POST, "/healthz", &["GET"]),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        let allow = response.headers()["allow"].to_str().unwrap().to_owned();
        for expected in allowed {
            assert!(allow.contains(expected), "{method} {path}: Allow: {allow}");
        }
        let body = problem(response, 405).await;
        assert_eq!(body["title"], "Method not allowed");
    }
}

#[tokio::test]
async fn a_gzip_single_event_is_taken_like_a_plain_one() {
    use std::io::Write;

    let app = spawn_app().await;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(event("zipped", "straße").to_string().as_bytes())
        .unwrap();
    let response = app
        .client
        .post(app.url("/events?wait=published"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(encoder.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let published: Value = response.json().await.unwrap();
    assert_eq!(published["payload"], "STRASSE");
    let corrupt = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body("not gzip at all")
        .send()
        .await
        .unwrap();
    problem(corrupt, 400).await;
}

#[tokio::test]
async fn a_transform_that_fails_an_event_shows_over_http() {
    // `json` refuses payloads that are not JSON documents.
    let app = spawn_app_with(
        |s| {
            s.pipeline.transforms = vec![
                eventflow::config::TransformKind::Json,
                eventflow::config::TransformKind::Enrich,
            ]
        },
        Vec::new(),
    )
    .await;
    let wait = |id: &str, payload: &str| {
        app.client
            .post(app.url("/events?wait=published"))
            .json(&event(id, payload))
            .send()
    };
    let failed = problem(wait("not-json", "{oops").await.unwrap(), 500).await;
    assert_eq!(failed["title"], "Processing failed");
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("the payload is not JSON"),
        "{failed}"
    );
    let record: Value = app.get("/events/not-json").await.json().await.unwrap();
    assert_eq!(record["status"], "failed");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("transform `json` failed"),
        "{record}"
    );
    assert!(record.get("result").is_none());
    let published = wait("is-json", r#"{"n":1}"#).await.unwrap();
    assert_eq!(published.status(), 200);
    let failed_page: Value = app.get("/events?status=failed").await.json().await.unwrap();
    assert_eq!(failed_page["events"].as_array().unwrap().len(), 1);
    app.wait_until_idle().await;
    assert_eq!(
        app.metric("eventflow_events_processed_total{outcome=\"error\"}")
            .await,
        Some(1.0)
    );
    // Not published: stdout has only the good one.
    let lines = app.wait_for_stdout_lines(1).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], "is-json");
}

#[tokio::test]
async fn an_evicted_event_is_404_and_its_id_can_be_taken_again() {
    // The idempotency window is the store: 20 events here.
    let app = spawn_app_with(
        |s| {
            s.store.max_events = 20;
            s.pipeline.queue_capacity = 20;
        },
        Vec::new(),
    )
    .await;
    for i in 0..60 {
        assert_eq!(
            app.post_event(&event(&format!("ev{i}"), "x"))
                .await
                .status(),
            202
        );
        // Processed before the next, so that eviction has finished records.
        app.wait_for_status(&format!("ev{i}"), "processed").await;
    }
    problem(app.get("/events/ev0").await, 404).await;
    assert_eq!(app.get("/events/ev59").await.status(), 200);
    assert!(app.metric("eventflow_store_evictions_total").await.unwrap() >= 40.0);
    // Outside the window a retry is a new event, accepted again.
    assert_eq!(app.post_event(&event("ev0", "x")).await.status(), 202);
}

#[tokio::test]
async fn ids_with_reserved_characters_round_trip_through_location() {
    let app = spawn_app().await;
    let response = app.post_event(&event("a/b c?d%e", "x")).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(location, "/events/a%2Fb%20c%3Fd%25e");
    let record: Value = app.get(&location).await.json().await.unwrap();
    assert_eq!(record["id"], "a/b c?d%e");
}

#[tokio::test]
async fn a_body_that_arrives_too_slowly_is_a_408_problem() {
    let app = spawn_app_with(
        |s| s.server.request_timeout = Duration::from_millis(100),
        Vec::new(),
    )
    .await;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1);
    sender.send(Ok("{\"id\":".into())).await.unwrap();
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let response = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let p = problem(response, 408).await;
    assert_eq!(p["type"], "urn:eventflow:problem:request-timeout");
    drop(sender);
}

#[tokio::test]
async fn while_draining_new_events_are_503_with_a_longer_retry_after() {
    let app = spawn_app().await;
    assert_eq!(app.post_event(&event("before", "x")).await.status(), 202);
    // What SIGTERM does first: no new events from here on.
    app.pipeline.close_ingest();
    let response = app.post_event(&event("during", "x")).await;
    assert_eq!(response.headers()["retry-after"], "5");
    let p = problem(response, 503).await;
    assert_eq!(p["type"], "urn:eventflow:problem:shutting-down");
    let batch = app.post_batch(vec![event("batch-during", "x")]).await;
    assert_eq!(batch.status(), 503);
    assert_eq!(batch.headers()["retry-after"], "5");
    assert_eq!(app.get("/events/during").await.status(), 404);
    app.wait_for_status("before", "processed").await;
}
