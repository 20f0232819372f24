//! The nats backend's three bounds (backlog, history, idempotency horizon)
//! kept apart, the crash between an id's record and its chunk healed by
//! the client's retry, filtered pages, and a replica that starts before
//! its NATS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use eventflow::sink::{Publications, PublishError, Sink, SinkError};
use serde_json::Value;

use super::{jetstream, nats_mode, replica, server};
use crate::helpers::{event, spawn_app_with};

/// The published stream's last sequence: how many publications it ever took.
async fn publications(url: &str) -> u64 {
    let js = jetstream(url).await;
    let stream = js.get_stream("EVENTFLOW_PUBLISHED").await.unwrap();
    stream.get_info().await.unwrap().state.last_sequence
}

/// Waits (bounded) until `/metrics` says `series` is at least `value`.
async fn wait_for_metric(app: &crate::helpers::TestApp, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = app.metric(series).await.unwrap_or(0.0);
        if now >= value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {now}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_times_every_bound_goes_through_without_a_refusal_each_published_once() {
    let Some(nats) = server::single().await else {
        return;
    };
    // 256 KiB in CI; EVENTFLOW_FAULT_SCALE=32 makes it 8 MiB.
    let bound = 256 * 1024 * super::scale() as i64;
    let app = replica(&nats.url(), |settings| {
        let nats = &mut settings.backend.nats;
        nats.backlog_max_bytes = bound;
        nats.history_max_bytes = bound;
        nats.idempotency_max_bytes = bound;
    })
    .await;
    // 20 x the bound of id records: about 360 bytes each.
    let payload = "p".repeat(200);
    let total = 20 * bound as usize / 360;
    let mut accepted = 0;
    for (round, first) in (0..total).step_by(100).enumerate() {
        let batch = (first..total.min(first + 100))
            .map(|i| event(&format!("bound-{i}"), &payload))
            .collect();
        let response = app.post_batch(batch).await;
        assert_eq!(response.status(), 202, "round {round}: no refusal");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["rejected_total"], 0, "{body}");
        accepted += body["accepted"].as_u64().unwrap();
    }
    assert_eq!(accepted, total as u64);
    eprintln!("bounds of {bound} bytes: {accepted} events accepted, none refused");
    // Every accepted event published, each once: the published stream took
    // exactly as many publications (its oldest are long dropped).
    wait_for_metric(
        &app,
        "eventflow_events_processed_total{outcome=\"ok\"}",
        total as f64,
    )
    .await;
    assert_eq!(publications(&nats.url()).await, total as u64);
    assert_eq!(
        app.metric("eventflow_events_rejected_total{reason=\"overloaded\"}")
            .await,
        Some(0.0)
    );
    // The oldest ids are forgotten (a read is 404); the newest are
    // remembered: the same content is a duplicate, other content a conflict.
    assert_eq!(app.get("/events/bound-0").await.status(), 404);
    let last = format!("bound-{}", total - 1);
    assert_eq!(app.post_event(&event(&last, &payload)).await.status(), 200);
    assert_eq!(app.post_event(&event(&last, "other")).await.status(), 409);
    let record: Value = app
        .get(&format!("/events/{last}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["status"], "processed", "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_id_record_and_the_backlog_heals_on_the_clients_retry() {
    let Some(nats) = server::single().await else {
        return;
    };
    let app = replica(&nats.url(), |_| {}).await;
    // What a replica that died between its two writes leaves: the id's
    // record, and no chunk in the backlog.
    let js = jetstream(&nats.url()).await;
    let id = "crashed-1";
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id);
    // A record: when it was received and its trace id, then the event.
    let body = format!(
        "1700000000000000000 0af7651916cd43dd8448eb211c80319c\n{}",
        event(id, "healed")
    );
    let ack = js
        .publish(format!("eventflow.ids.{key}"), body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let record: Value = app
        .get(&format!("/events/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["status"], "pending", "{record}");

    // The client's retry: a duplicate, and the event is queued again.
    let response = app.post_event(&event(id, "healed")).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "duplicate", "{answer}");
    let mut published = None;
    for _ in 0..600 {
        let record: Value = app
            .get(&format!("/events/{id}"))
            .await
            .json()
            .await
            .unwrap();
        if record["status"] == "processed" {
            published = Some(record);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = published.expect("the retry got the event published");
    assert_eq!(record["result"]["payload"], "HEALED");
    assert_eq!(
        record["sequence"], ack.sequence,
        "the first write's sequence"
    );
    // Retried again, and again while it was still being queued: published once.
    for _ in 0..3 {
        assert_eq!(app.post_event(&event(id, "healed")).await.status(), 200);
    }
    assert_eq!(app.post_event(&event(id, "other")).await.status(), 409);
    app.wait_until_idle().await;
    assert_eq!(publications(&nats.url()).await, 1);
    let lines = app.stdout.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
}

/// A sink that fails every event whose payload is `fail`.
#[derive(Debug)]
struct FailSome;

#[async_trait]
impl Sink for FailSome {
    fn name(&self) -> &'static str {
        "fail-some"
    }
    async fn publish(&self, publications: Publications<'_>) -> Result<(), PublishError> {
        match publications
            .events()
            .iter()
            .position(|p| &*p.event.payload == "FAIL")
        {
            None => Ok(()),
            Some(written) => Err(PublishError {
                written,
                error: SinkError::Closed("fail-some"),
            }),
        }
    }
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_failed_events_scans_past_the_rest_in_one_answer() {
    let Some(nats) = server::single().await else {
        return;
    };
    let app = spawn_app_with(
        |settings| {
            nats_mode(settings, &nats.url());
            settings.backend.nats.max_deliver = 1;
        },
        vec![Arc::new(FailSome)],
    )
    .await;
    for chunk in 0..20 {
        let batch = (0..100)
            .map(|i| event(&format!("ok-{chunk}-{i}"), "fine"))
            .collect();
        assert_eq!(app.post_batch(batch).await.status(), 202);
        // Alone in its chunk, so that only it fails.
        let status = app
            .post_event(&event(&format!("bad-{chunk}"), "fail"))
            .await
            .status();
        assert_eq!(status, 202);
    }
    for chunk in 0..20 {
        app.wait_for_status(&format!("bad-{chunk}"), "failed").await;
    }
    let page: Value = app
        .get("/events?status=failed&limit=1000")
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..20).map(|chunk| format!("bad-{chunk}")).collect();
    assert_eq!(ids, expected, "{page}");
    assert!(page["next"].is_null(), "{page}");
    assert!(page.get("incomplete").is_none(), "{page}");
    let failed = &page["events"][0];
    assert!(
        failed["error"].as_str().unwrap().contains("fail-some"),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_starts_before_its_nats_answers_503_until_nats_comes() {
    if !server::available() {
        return;
    }
    let port = server::free_port();
    let started = Instant::now();
    let app = replica(&format!("nats://127.0.0.1:{port}"), |settings| {
        settings.server.request_timeout = Duration::from_secs(2);
    })
    .await;
    eprintln!("serving {:?} after start, without NATS", started.elapsed());
    assert_eq!(app.get("/healthz").await.status(), 200);
    let readiness = app.get("/readyz").await;
    assert_eq!(readiness.status(), 503);
    let readiness: Value = readiness.json().await.unwrap();
    assert_eq!(readiness["status"], "backend_unavailable", "{readiness}");
    let asked = Instant::now();
    let response = app.post_event(&event("early-0", "x")).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );

    let nats = server::single_at(port).await.expect("nats-server starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get("/readyz").await.status() != 200 {
        assert!(Instant::now() < deadline, "ready once NATS came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.post_event(&event("early-1", "x")).await.status(), 202);
    app.wait_for_status("early-1", "processed").await;
    assert_eq!(publications(&nats.url()).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_nats_can_never_carry_is_413_and_settings_that_allow_one_never_start() {
    let Some(mut nats) = server::single().await else {
        return;
    };
    // Settings whose largest event (every character escaped) passes the
    // server's 1 MB: the start stops naming both limits.
    let mut settings = crate::helpers::test_settings();
    nats_mode(&mut settings, &nats.url());
    settings.pipeline.max_payload_bytes = 256 * 1024;
    let error = match eventflow::app::App::build(settings).await {
        Ok(_) => panic!("the service started"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("pipeline.max_payload_bytes"), "{error}");
    assert!(error.contains("max_payload"), "{error}");

    // A server restarted with a smaller max_payload: what it can never
    // carry is refused for good (413), not "retry later".
    let app = replica(&nats.url(), |_| {}).await;
    nats.kill();
    nats.set_max_payload(64 * 1024);
    nats.start();
    nats.wait_healthy().await;
    // Reconnected (and told the new limit) once a small event is taken.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.post_event(&event("after-restart", "x")).await.status() != 202 {
        assert!(Instant::now() < deadline, "ingest again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let escaped = "\u{1}".repeat(20 * 1024);
    let response = app.post_event(&event("huge-1", &escaped)).await;
    assert_eq!(response.status(), 413);
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("max_payload"),
        "{problem}"
    );
    let batch: Value = app
        .post_batch(vec![event("huge-2", &escaped), event("fits-1", "x")])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(batch["accepted"], 1, "{batch}");
    assert_eq!(batch["rejected"][0]["id"], "huge-2", "{batch}");
    assert!(
        app.metric("eventflow_events_rejected_total{reason=\"too_large\"}")
            .await
            .unwrap_or(0.0)
            >= 2.0
    );
}
