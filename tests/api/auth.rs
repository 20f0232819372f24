//! Bearer tokens, the admin listener and the per-client rate limit, as a
//! client sees them.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::binary;
use crate::helpers::{TestApp, event, spawn_app_with};

const TOKEN: &str = "test-token-0123456789abcdef";
const OTHER: &str = "other-token-0123456789abcdef";

async fn app_with_token() -> TestApp {
    spawn_app_with(
        |s| s.auth.tokens = vec![TOKEN.into(), OTHER.into()],
        Vec::new(),
    )
    .await
}

/// The series `series` (name and labels, exactly) on `/metrics` at `url`.
async fn series(client: &reqwest::Client, url: &str, series: &str) -> Option<f64> {
    let text = client.get(url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn the_event_routes_need_a_known_bearer_token() {
    let app = app_with_token().await;
    let metrics = app.url("/metrics");
    let post = |token: Option<&str>, id: &str| {
        let mut request = app.client.post(app.url("/events")).json(&event(id, "x"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let missing = post(None, "a-1").await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.headers()["www-authenticate"],
        "Bearer realm=\"eventflow\""
    );
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = missing.json().await.unwrap();
    assert_eq!(problem["type"], "urn:eventflow:problem:unauthorized");
    assert_eq!(problem["status"], 401);

    let wrong = post(Some("wrong-token-0123456789abcdef"), "a-1")
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        wrong.headers()["www-authenticate"],
        "Bearer realm=\"eventflow\", error=\"invalid_token\""
    );
    let problem = wrong.text().await.unwrap();
    assert!(
        !problem.contains("wrong-token"),
        "the token is not echoed: {problem}"
    );

    assert_eq!(post(Some(TOKEN), "a-1").await.unwrap().status(), 202);
    assert_eq!(post(Some(OTHER), "a-2").await.unwrap().status(), 202);

    // Every event route; the bodies of refused ones are never read.
    for path in ["/events", "/events/a-1", "/events/stream"] {
        let refused = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(refused.status(), 401, "{path}");
    }
    let batch = app
        .client
        .post(app.url("/events/batch"))
        .json(&vec![event("a-3", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 401);
    let record = app
        .client
        .get(app.url("/events/a-1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(record.status(), 200);

    // Health, readiness, metrics and the document stay open.
    for path in [
        "/healthz",
        "/health",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert_eq!(app.get(path).await.status(), 200, "{path}");
    }

    // 6 refusals (2 posts, 3 gets, 1 batch); 3 of them were ingest.
    let client = &app.client;
    assert_eq!(
        series(client, &metrics, "eventflow_auth_failures_total").await,
        Some(6.0)
    );
    assert_eq!(
        series(
            client,
            &metrics,
            "eventflow_events_rejected_total{reason=\"unauthorized\"}"
        )
        .await,
        Some(3.0)
    );
    assert_eq!(
        series(client, &metrics, "eventflow_events_received_total").await,
        Some(2.0),
        "refused requests' events were never received"
    );
}

#[tokio::test]
async fn the_document_names_the_bearer_scheme_when_auth_is_on() {
    let app = app_with_token().await;
    let document: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let post = &document["paths"]["/events"]["post"];
    assert_eq!(post["security"][0]["bearer"], serde_json::json!([]));
    assert!(post["responses"]["401"].is_object());
    assert!(document["paths"]["/healthz"]["get"]["security"].is_null());

    let open = spawn_app_with(|_| {}, Vec::new()).await;
    let document: Value = open.get("/openapi.json").await.json().await.unwrap();
    assert!(document["components"]["securitySchemes"].is_null());
    assert!(document["paths"]["/events"]["post"]["responses"]["401"].is_null());
}

#[tokio::test]
async fn the_document_names_405_408_and_with_a_rate_limit_429() {
    let open = spawn_app_with(|_| {}, Vec::new()).await;
    let document: Value = open.get("/openapi.json").await.json().await.unwrap();
    for (path, method) in [
        ("/events", "post"),
        ("/events/{id}", "get"),
        ("/healthz", "get"),
    ] {
        let responses = &document["paths"][path][method]["responses"];
        assert!(responses["405"]["headers"]["Allow"].is_object(), "{path}");
        assert!(responses["408"].is_object(), "{path}");
        assert!(responses["429"].is_null(), "{path}: no rate limit, no 429");
    }
    let limited = spawn_app_with(|s| s.server.rate_limit_per_second = 10, Vec::new()).await;
    let document: Value = limited.get("/openapi.json").await.json().await.unwrap();
    let post = &document["paths"]["/events/batch"]["post"]["responses"];
    assert!(post["429"]["headers"]["Retry-After"].is_object(), "{post}");
    assert!(
        document["paths"]["/healthz"]["get"]["responses"]["429"].is_null(),
        "health is never rate limited"
    );
}

#[tokio::test]
async fn health_and_metrics_move_to_the_admin_listener_when_it_is_set() {
    let app = spawn_app_with(
        |s| {
            s.server.admin_addr = Some("127.0.0.1:0".into());
            s.auth.tokens = vec![TOKEN.into()];
        },
        Vec::new(),
    )
    .await;
    let admin = app.admin.expect("the admin listener is bound");
    for path in ["/healthz", "/health", "/readyz", "/metrics"] {
        let on_admin = app
            .client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(on_admin.status(), 200, "{path} on the admin listener");
        assert_eq!(app.get(path).await.status(), 404, "{path} on the API's");
    }
    let on_admin = app
        .client
        .post(format!("http://{admin}/events"))
        .bearer_auth(TOKEN)
        .json(&event("admin-1", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(on_admin.status(), 404, "no events on the admin listener");
    let document: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(
        document["paths"]["/healthz"].is_null(),
        "the API's document"
    );
    assert!(document["paths"]["/events"].is_object());
}

#[tokio::test]
async fn a_client_past_its_rate_gets_429_and_others_are_not_slowed() {
    let app = spawn_app_with(
        |s| {
            s.auth.tokens = vec![TOKEN.into(), OTHER.into()];
            s.server.rate_limit_per_second = 1;
            s.server.rate_limit_burst = 5;
            s.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        },
        Vec::new(),
    )
    .await;
    let get = |token: Option<&str>, forwarded: Option<&str>| {
        let mut request = app.client.get(app.url("/events"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(forwarded) = forwarded {
            request = request.header("x-forwarded-for", forwarded);
        }
        request.send()
    };
    for _ in 0..5 {
        assert_eq!(get(Some(TOKEN), None).await.unwrap().status(), 200);
    }
    let limited = get(Some(TOKEN), None).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(
        limited.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 1
    );
    let problem: Value = limited.json().await.unwrap();
    assert_eq!(problem["type"], "urn:eventflow:problem:rate-limited");
    // Another token is another client.
    assert_eq!(get(Some(OTHER), None).await.unwrap().status(), 200);

    // Without a token, a client is its address: behind a trusted proxy,
    // the one X-Forwarded-For names. Guessing tokens spends it too.
    for _ in 0..5 {
        assert_eq!(get(None, Some("198.51.100.1")).await.unwrap().status(), 401);
    }
    assert_eq!(get(None, Some("198.51.100.1")).await.unwrap().status(), 429);
    assert_eq!(get(None, Some("198.51.100.2")).await.unwrap().status(), 401);

    assert_eq!(app.metric("eventflow_rate_limited_total").await, Some(2.0));
    // Health is never limited.
    for _ in 0..10 {
        assert_eq!(app.get("/healthz").await.status(), 200);
    }
}

#[tokio::test]
async fn during_the_shutdown_delay_readiness_is_503_and_events_are_still_taken() {
    let mut app = spawn_app_with(
        |s| {
            s.server.shutdown_delay = Duration::from_millis(1500);
            s.server.shutdown_grace = Duration::from_secs(20);
        },
        Vec::new(),
    )
    .await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.begin_shutdown();
    let started = Instant::now();
    // Phase 1: not ready, still serving and accepting.
    let mut accepted = 0;
    while started.elapsed() < Duration::from_millis(1000) {
        let ready = app.get("/readyz").await;
        assert_eq!(ready.status(), 503);
        let body: Value = ready.json().await.unwrap();
        assert_eq!(body["status"], "draining");
        let response = app
            .post_event(&event(&format!("delay-{accepted}"), "x"))
            .await;
        assert_eq!(response.status(), 202);
        accepted += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted > 5);
    // Phase 2: after the delay the listener is closed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = app
        .client
        .get(app.url("/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "no new connection after the delay: {refused:?}"
    );
    // Everything taken during the delay was published.
    let lines = app.wait_for_stdout_lines(accepted).await;
    assert_eq!(lines.len(), accepted);
}

#[test]
fn tokens_file_is_reread_on_sighup_and_no_token_reaches_the_logs() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("# first\n{TOKEN}\n")).unwrap();
    let file_name = file.display().to_string();
    let mut service = binary::start(&[
        ("EVENTFLOW__AUTH__TOKENS_FILE", file_name.as_str()),
        ("EVENTFLOW__TELEMETRY__LOG_LEVEL", "debug"),
    ]);
    let client = reqwest::Client::new();
    let url = format!("http://{}/events", service.addr);
    let status = |token: &'static str| {
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // A stream opened with the token that is about to be revoked.
    let mut stream = runtime.block_on(async {
        assert_eq!(status(TOKEN).await, 200);
        assert_eq!(status(OTHER).await, 401);
        let response = client
            .get(format!("http://{}/events/stream", service.addr))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes_stream()
    });
    std::fs::write(&file, format!("{OTHER}\n")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(service.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while status(OTHER).await != 200 {
            assert!(
                Instant::now() < deadline,
                "the new token works after SIGHUP"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status(TOKEN).await, 401, "the old one was revoked");
        // Its open stream ends too.
        use futures_util::StreamExt;
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
        assert!(ended.is_ok(), "a revoked token's stream ends");
    });
    // A broken file keeps the tokens in force.
    std::fs::write(&file, "not a token\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(service.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    // Once the service says it kept the old set, the token still works.
    let mut logs = service.wait_for_log("not re-read", Duration::from_secs(10));
    runtime.block_on(async { assert_eq!(status(OTHER).await, 200) });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(service.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(
        binary::wait_exit(&mut service.child, Duration::from_secs(20)),
        0
    );
    logs.extend(service.stderr.try_iter());
    assert!(
        logs.iter().any(|line| line.contains("auth tokens re-read")),
        "{logs:#?}"
    );
    assert!(
        logs.iter().any(|line| line.contains("not re-read")),
        "{logs:#?}"
    );
    for line in &logs {
        assert!(
            !line.contains("token-0123456789"),
            "a token reached the log: {line}"
        );
    }
}
