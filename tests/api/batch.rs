//! `POST /events/batch`.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::helpers::{Gate, event, gzip, spawn_app, spawn_app_with};

fn ndjson(events: &[Value]) -> String {
    events.iter().map(|e| format!("{e}\n")).collect()
}

#[tokio::test]
async fn json_array_batch_is_accepted_and_published() {
    let app = spawn_app().await;
    let events: Vec<Value> = (0..50).map(|i| event(&format!("b-{i}"), "batch")).collect();
    let response = app.post_batch(events).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"accepted": 50, "duplicates": 0, "rejected": [], "rejected_total": 0})
    );
    let lines = app.wait_for_stdout_lines(50).await;
    assert!(lines.iter().all(|l| l["payload"] == "BATCH"));
}

#[tokio::test]
async fn ndjson_batch_reports_rejected_items_and_duplicates() {
    let app = spawn_app().await;
    assert_eq!(app.post_event(&event("exists", "x")).await.status(), 202);
    let body = format!(
        "{}\n{}\nnot json\n\n{}\n{}\n{}\n{}\n",
        event("n-1", "a"),
        json!({"id": "n-2", "timestamp": "soon", "payload": "a"}),
        event("exists", "x"),
        event("exists", "changed"),
        event("n-1", "a"),
        event("n-1", "other"),
    );
    let response = app
        .post_raw("/events/batch", "application/x-ndjson", body)
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(
        body["duplicates"], 2,
        "a stored event and a repeat within the batch"
    );
    let rejected = body["rejected"].as_array().unwrap();
    let summary: Vec<(u64, &str)> = rejected
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["id"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(summary, [(1, "n-2"), (2, ""), (4, "exists"), (6, "n-1")]);
    assert!(rejected[0]["error"].as_str().unwrap().contains("timestamp"));
    assert!(rejected[2]["error"].as_str().unwrap().contains("conflict"));
}

#[tokio::test]
async fn json_array_and_ndjson_batches_report_the_same_outcome() {
    // Well-formed elements, some invalid: a JSON array decodes in one pass,
    // NDJSON line by line; clients must not be able to tell.
    let events = vec![
        event("ok-1", "a"),
        json!({"id": "bad\u{1}id", "timestamp": 1, "payload": "a"}),
        json!({"id": "big", "timestamp": 1, "payload": "x".repeat(65_537)}),
        event("ok-1", "a"),
        event("ok-1", "changed"),
    ];
    let mut outcomes = Vec::new();
    for (content_type, body) in [
        ("application/json", Value::Array(events.clone()).to_string()),
        ("application/x-ndjson", ndjson(&events)),
    ] {
        let app = spawn_app().await;
        // An id written with an escape is the same id.
        let escaped = r#"[{"id":"esc\u0061ped","timestamp":1,"payload":"e"}]"#;
        let response = app
            .post_raw("/events/batch", "application/json", escaped)
            .await;
        assert_eq!(response.status(), 202);
        let response = app.post_raw("/events/batch", content_type, body).await;
        assert_eq!(response.status(), 202, "{content_type}");
        outcomes.push(response.json::<Value>().await.unwrap());
        let stored = app
            .client
            .get(format!("http://{}/events/escaped", app.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(stored.status(), 200);
    }
    assert_eq!(outcomes[0], outcomes[1]);
    let outcome = &outcomes[0];
    assert_eq!(
        (&outcome["accepted"], &outcome["duplicates"]),
        (&json!(1), &json!(1))
    );
    let rejected: Vec<(u64, &str)> = outcome["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["id"].as_str().unwrap()))
        .collect();
    assert_eq!(rejected, [(1, "bad\u{1}id"), (2, "big"), (4, "ok-1")]);
    assert!(
        outcome["rejected"][1]["error"]
            .as_str()
            .unwrap()
            .contains("at most 65536 bytes")
    );
}

#[tokio::test]
async fn gzip_batches_are_decompressed() {
    let app = spawn_app().await;
    let events: Vec<Value> = (0..100)
        .map(|i| event(&format!("gz-{i}"), "zipped"))
        .collect();
    let response = app
        .client
        .post(app.url("/events/batch"))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(gzip(ndjson(&events).as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 100);
    app.wait_for_stdout_lines(100).await;
}

#[tokio::test]
async fn batch_limits_are_413_after_decompression() {
    let app = spawn_app_with(
        |s| {
            s.pipeline.max_batch = 5;
            s.server.max_batch_body_bytes = 4096;
        },
        Vec::new(),
    )
    .await;
    let six: Vec<Value> = (0..6).map(|i| event(&format!("m-{i}"), "x")).collect();
    let response = app.post_batch(six).await;
    assert_eq!(response.status(), 413);
    // Too many elements, whatever they are, is 413 too (not 422 for each).
    for body in ["[1,1,1,1,1,1]", r#"[{},{},{},{},{},{}]"#] {
        let response = app
            .post_raw("/events/batch", "application/json", body)
            .await;
        assert_eq!(response.status(), 413, "{body}");
    }
    // 100 KB of zeros compress to ~100 bytes but inflate past the 4 KiB limit.
    let inflated = format!("{}\n", event("zero", &"0".repeat(100_000)));
    let response = app
        .client
        .post(app.url("/events/batch"))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(gzip(inflated.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn batch_with_no_valid_event_is_422() {
    let app = spawn_app().await;
    let response = app
        .post_raw(
            "/events/batch",
            "application/json",
            r#"[{"id":""},{"timestamp":1}]"#,
        )
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["[0]", "[1]"]);
    assert_eq!(
        app.post_raw("/events/batch", "application/json", "[]")
            .await
            .status(),
        422
    );
    assert_eq!(
        app.post_raw("/events/batch", "application/json", "{\"id\":1}")
            .await
            .status(),
        422
    );
}

#[tokio::test]
async fn malformed_batch_is_400_and_bad_media_is_415() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_raw("/events/batch", "application/json", "[{")
            .await
            .status(),
        400
    );
    assert_eq!(
        app.post_raw("/events/batch", "text/csv", "a,b")
            .await
            .status(),
        415
    );
    let response = app
        .client
        .post(app.url("/events/batch"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body("definitely not gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn a_batch_that_does_not_fit_is_503_and_stores_nothing() {
    let gate = Gate::closed();
    let app = spawn_app_with(
        |s| s.pipeline.queue_capacity = 10,
        vec![Arc::new(gate.clone())],
    )
    .await;
    let first: Vec<Value> = (0..6).map(|i| event(&format!("first-{i}"), "x")).collect();
    let response = app.post_batch(first).await;
    assert_eq!(response.status(), 202);
    let second: Vec<Value> = (0..5).map(|i| event(&format!("second-{i}"), "x")).collect();
    let response = app.post_batch(second.clone()).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    for i in 0..5 {
        assert_eq!(
            app.get(&format!("/events/second-{i}")).await.status(),
            404,
            "nothing of a refused batch is stored"
        );
    }
    // Four still fit: duplicates of stored events take no capacity.
    let mut fits: Vec<Value> = (0..4).map(|i| event(&format!("second-{i}"), "x")).collect();
    fits.push(event("first-0", "x"));
    let response = app.post_batch(fits).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(4), Some(1))
    );
    gate.open_all();
    app.wait_for_stdout_lines(10).await;
}

#[tokio::test]
async fn a_batch_larger_than_the_pipeline_is_413_not_503_forever() {
    let app = spawn_app_with(|s| s.pipeline.queue_capacity = 10, Vec::new()).await;
    let batch: Vec<Value> = (0..11).map(|i| event(&format!("big-{i}"), "x")).collect();
    let response = app.post_batch(batch).await;
    assert_eq!(response.status(), 413);
    assert!(!response.headers().contains_key("retry-after"));
    let problem: Value = response.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("11 new events") && detail.contains("pipeline.queue_capacity = 10"),
        "{detail}"
    );
    assert_eq!(app.get("/events/big-0").await.status(), 404);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "eventflow_events_rejected_total{reason=\"too_large\"} 11"),
        "{metrics}"
    );
    // Ten fit.
    let batch: Vec<Value> = (0..10).map(|i| event(&format!("big-{i}"), "x")).collect();
    assert_eq!(app.post_batch(batch).await.status(), 202);
}

#[tokio::test]
async fn bodies_in_flight_share_one_budget_past_which_requests_are_503() {
    let app = spawn_app_with(
        |s| {
            s.server.max_body_bytes = 10_000;
            s.server.max_batch_body_bytes = 10_000;
            s.server.max_inflight_body_bytes = 30_000;
        },
        Vec::new(),
    )
    .await;
    // Three clients send most of a body of unknown length, then stall:
    // each within its own limit, 28,500 bytes held together.
    let mut stalled = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..3 {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1);
        sender.send(Ok(" ".repeat(9_500))).await.unwrap();
        senders.push(sender);
        let body =
            reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
        stalled.push(tokio::spawn(
            app.client
                .post(app.url("/events/batch"))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send(),
        ));
    }
    let small = |i: usize| vec![event(&format!("budget-{i}"), &"x".repeat(3_000))];
    let mut refused = None;
    for i in 0..200 {
        let response = app.post_batch(small(i)).await;
        if response.status() == 503 {
            refused = Some(response);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let refused = refused.expect("a body past the budget is refused");
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = refused.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("server.max_inflight_body_bytes"),
        "{problem}"
    );
    // The stalled bodies end (as nothing valid): their share comes back.
    drop(senders);
    for request in stalled {
        assert_eq!(request.await.unwrap().unwrap().status(), 422);
    }
    let after = app.post_batch(small(1_000)).await;
    let status = after.status();
    assert_eq!(status, 202, "{}", after.text().await.unwrap());
}

#[tokio::test]
async fn wait_and_other_query_parameters_are_refused_not_ignored() {
    let app = spawn_app().await;
    let body = Value::from(vec![event("q-1", "x")]).to_string();
    for (query, detail) in [
        (
            "?wait=published",
            "`wait` is not supported on POST /events/batch",
        ),
        ("?colour=red", "invalid query string"),
    ] {
        let response = app
            .post_raw(
                &format!("/events/batch{query}"),
                "application/json",
                body.clone(),
            )
            .await;
        assert_eq!(response.status(), 400, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().starts_with(detail),
            "{query}: {problem}"
        );
    }
    // Nothing was taken.
    assert_eq!(app.get("/events/q-1").await.status(), 404);
}
