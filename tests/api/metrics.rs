//! `GET /metrics` after known traffic: exact counts by label.

use std::sync::Arc;

use serde_json::json;

use crate::helpers::{Gate, TestApp, event, spawn_app_with};

async fn scrape(app: &TestApp) -> String {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    response.text().await.unwrap()
}

/// The value of the series written exactly as `series` (name and labels).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("series {series} not found in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The whole service's scrape (with a subscription) declares every
/// catalogued metric (the nats backend's aside: `nats::` tests scrape
/// those), each with its kind and help, and nothing the catalogue does not
/// list.
#[tokio::test]
async fn a_scrape_declares_every_catalogued_metric_and_no_other() {
    use eventflow::telemetry::catalogue::{CATALOGUE, find};
    let app = crate::helpers::spawn_app().await;
    // The subscription series exist once there is a subscription.
    let put = app
        .client
        .put(app.url("/subscriptions/declared"))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    // The HTTP series exist once a request was answered: this first scrape.
    scrape(&app).await;
    let text = scrape(&app).await;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let metric = find(name).unwrap_or_else(|| panic!("{name} is not in the catalogue"));
            assert_eq!(kind, metric.kind.as_str(), "{name}");
        }
    }
    for metric in CATALOGUE
        .iter()
        .filter(|m| !m.name.starts_with("eventflow_nats_"))
    {
        let declared = format!("# TYPE {} {}\n", metric.name, metric.kind.as_str());
        assert!(text.contains(&declared), "{} is not declared", metric.name);
        assert!(
            text.contains(&format!("# HELP {} {}", metric.name, metric.help)),
            "{}'s help",
            metric.name
        );
    }
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly() {
    let gate = Gate::closed();
    let app = spawn_app_with(
        |s| {
            s.pipeline.queue_capacity = 3;
            s.server.max_body_bytes = 4096;
        },
        vec![Arc::new(gate.clone())],
    )
    .await;
    // 3 accepted (fill the pipeline: the gate holds them), then 2 overloaded.
    for i in 0..3 {
        assert_eq!(
            app.post_event(&event(&format!("m{i}"), "x")).await.status(),
            202
        );
    }
    for i in 3..5 {
        assert_eq!(
            app.post_event(&event(&format!("m{i}"), "x")).await.status(),
            503
        );
    }
    let text = scrape(&app).await;
    assert_eq!(value(&text, "eventflow_inflight_events"), 3.0);
    assert_eq!(value(&text, "eventflow_queue_capacity"), 3.0);
    gate.open_all();
    app.wait_for_status("m2", "processed").await;
    // 1 duplicate, 1 conflict, 2 invalid, 1 too large.
    assert_eq!(app.post_event(&event("m0", "x")).await.status(), 200);
    assert_eq!(app.post_event(&event("m0", "changed")).await.status(), 409);
    assert_eq!(app.post_event(&json!({"id": ""})).await.status(), 422);
    assert_eq!(
        app.post_raw("/events", "application/json", "{")
            .await
            .status(),
        400
    );
    assert_eq!(
        app.post_event(&event("big", &"x".repeat(5000)))
            .await
            .status(),
        413
    );
    // A batch: 2 new, 1 duplicate, 1 invalid.
    let batch = format!(
        "{}\n{}\n{}\n{{}}\n",
        event("b1", "x"),
        event("b2", "x"),
        event("m1", "x")
    );
    assert_eq!(
        app.post_raw("/events/batch", "application/x-ndjson", batch)
            .await
            .status(),
        202
    );
    app.wait_for_status("b2", "processed").await;
    app.get("/events/m0").await;
    app.get("/no/such/path").await;

    let text = scrape(&app).await;
    assert_eq!(value(&text, "eventflow_events_received_total"), 14.0);
    assert_eq!(value(&text, "eventflow_events_accepted_total"), 5.0);
    assert_eq!(value(&text, "eventflow_events_duplicate_total"), 2.0);
    for (reason, count) in [
        ("invalid", 3.0),
        ("conflict", 1.0),
        ("too_large", 1.0),
        ("overloaded", 2.0),
        ("unauthorized", 0.0),
    ] {
        let series = format!("eventflow_events_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(value(&text, &series), count, "{reason}");
    }
    assert_eq!(
        value(&text, "eventflow_events_processed_total{outcome=\"ok\"}"),
        5.0
    );
    assert_eq!(
        value(&text, "eventflow_events_processed_total{outcome=\"error\"}"),
        0.0
    );
    assert_eq!(
        value(&text, "eventflow_events_published_total{sink=\"stdout\"}"),
        5.0
    );
    assert_eq!(
        value(&text, "eventflow_events_published_total{sink=\"gate\"}"),
        5.0
    );
    assert_eq!(
        value(&text, "eventflow_publish_errors_total{sink=\"stdout\"}"),
        0.0
    );
    // Routes are templates, never raw paths.
    let requests = |method: &str, route: &str, status: u16| {
        value(
            &text,
            &format!(
                "eventflow_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(requests("POST", "/events", 202), 3.0);
    assert_eq!(requests("POST", "/events", 503), 2.0);
    assert_eq!(requests("POST", "/events", 413), 1.0);
    assert_eq!(requests("POST", "/events/batch", 202), 1.0);
    // Polling in wait_for_status adds a variable number of lookups.
    assert!(requests("GET", "/events/{id}", 200) >= 3.0);
    assert_eq!(requests("GET", "unmatched", 404), 1.0);
    assert!(
        !text.contains("route=\"/events/m0\""),
        "raw paths never become labels"
    );
    // The pipeline is empty again.
    assert_eq!(value(&text, "eventflow_queue_depth"), 0.0);
    assert_eq!(value(&text, "eventflow_inflight_events"), 0.0);
    assert_eq!(value(&text, "eventflow_store_events"), 5.0);
    assert_eq!(value(&text, "eventflow_workers"), 2.0);
    // Histograms have counts; sub-millisecond buckets exist.
    for histogram in [
        "eventflow_end_to_end_latency_seconds_count",
        "eventflow_processing_duration_seconds_count",
        "eventflow_queue_wait_seconds_count",
    ] {
        assert_eq!(value(&text, histogram), 5.0, "{histogram}");
    }
    assert!(text.contains("eventflow_end_to_end_latency_seconds_bucket{le=\"0.00005\"}"));
    assert!(text.contains(
        "eventflow_http_request_duration_seconds_count{method=\"POST\",route=\"/events\"}"
    ));
    assert_eq!(
        value(
            &text,
            &format!(
                "eventflow_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(value(&text, "process_resident_memory_bytes") > 0.0);
    assert!(value(&text, "process_open_fds") > 0.0);
    assert!(value(&text, "process_cpu_seconds_total") >= 0.0);
}

#[tokio::test]
async fn sse_subscribers_and_lag_are_counted() {
    let app = spawn_app_with(|_| {}, Vec::new()).await;
    let _stream = app.subscribe(None).await;
    let text = scrape(&app).await;
    assert_eq!(value(&text, "eventflow_sse_subscribers"), 1.0);
    assert_eq!(value(&text, "eventflow_sse_lagged_total"), 0.0);
}

#[tokio::test]
async fn methods_outside_the_standard_set_are_one_label() {
    let app = spawn_app_with(|_| {}, Vec::new()).await;
    for custom in ["PURGE", "X1", "X2", "X3"] {
        let method = reqwest::Method::from_bytes(custom.as_bytes()).unwrap();
        let response = app
            .client
            .request(method, app.url("/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{custom}");
    }
    let text = scrape(&app).await;
    assert_eq!(
        value(
            &text,
            "eventflow_http_requests_total{method=\"other\",route=\"/events\",status=\"405\"}"
        ),
        4.0
    );
    for custom in ["PURGE", "X1"] {
        assert!(
            !text.contains(&format!("method=\"{custom}\"")),
            "{custom} became a label"
        );
    }
}
