//! NATS faults answered whole and fast: a frozen server turns `/readyz` 503
//! within two seconds and every request 503 within half its timeout; a
//! reader that does not read cannot make the server drop the connection
//! ingest uses.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use super::{assert_each_published_once, replica, server};
use crate::helpers::event;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nats_gets_whole_503s_in_time_and_readiness_follows_within_two_seconds() {
    let Some(nats) = server::single().await else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let app = replica(&nats.url(), |settings| {
        settings.server.request_timeout = timeout;
    })
    .await;
    let mut accepted = Vec::new();
    for i in 0..20 {
        let id = format!("frozen-before-{i}");
        assert_eq!(app.post_event(&event(&id, "x")).await.status(), 202);
        accepted.push(id);
    }

    nats.freeze();
    let frozen = Instant::now();
    while app.get("/readyz").await.status() != 503 {
        assert!(
            frozen.elapsed() < Duration::from_secs(10),
            "readiness never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unready_after = frozen.elapsed();
    // Every answer is a whole 503 within half the request timeout (and
    // some room for a busy machine): never a 408, never a partial 202.
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let asked = Instant::now();
        let single = app.post_event(&event(&format!("frozen-{i}"), "x")).await;
        assert_eq!(single.status(), 503);
        let batch = app
            .post_batch(vec![
                event(&format!("frozen-batch-{i}-a"), "x"),
                event(&format!("frozen-batch-{i}-b"), "x"),
            ])
            .await;
        assert_eq!(batch.status(), 503, "a batch is refused whole");
        slowest = slowest.max(asked.elapsed());
    }
    nats.thaw();
    eprintln!(
        "frozen NATS: /readyz 503 after {unready_after:?}; two requests answered in at most {slowest:?}"
    );
    assert!(
        unready_after < Duration::from_secs(4),
        "{unready_after:?} (2 s, and room for a busy machine)"
    );
    assert!(slowest < 2 * timeout, "{slowest:?} for two requests");
    assert!(
        app.metric("eventflow_events_rejected_total{reason=\"unavailable\"}")
            .await
            .unwrap_or(0.0)
            >= 15.0,
        "the refusals count as unavailable"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get("/readyz").await.status() != 200 {
        assert!(Instant::now() < deadline, "ready again once NATS runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..20 {
        let id = format!("frozen-after-{i}");
        assert_eq!(app.post_event(&event(&id, "x")).await.status(), 202);
        accepted.push(id);
    }
    assert_each_published_once(&nats.url(), &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_do_not_read_cannot_cut_the_replica_off_from_nats() {
    let Some(nats) = server::single().await else {
        return;
    };
    let app = replica(&nats.url(), |settings| {
        settings.pipeline.max_payload_bytes = 64 * 1024;
    })
    .await;
    // Eight subscribers that never read a byte of what they are sent.
    let mut silent = Vec::new();
    for _ in 0..8 {
        let response = app
            .client
            .get(app.url("/events/stream"))
            .header("last-event-id", "0")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        silent.push(response);
    }
    // Large events for them to fall behind on, while a well-behaved client
    // keeps sending small ones.
    let large = "x".repeat(60 * 1024);
    let mut answered = 0;
    let mut accepted = Vec::new();
    let started = Instant::now();
    for round in 0..40 {
        let batch = (0..8)
            .map(|i| event(&format!("large-{round}-{i}"), &large))
            .collect();
        assert_eq!(app.post_batch(batch).await.status(), 202);
        accepted.extend((0..8).map(|i| format!("large-{round}-{i}")));
        let id = format!("small-{round}");
        if app.post_event(&event(&id, "s")).await.status() == 202 {
            answered += 1;
            accepted.push(id);
        }
    }
    eprintln!(
        "8 silent subscribers: {answered} of 40 small requests answered 202 in {:?}",
        started.elapsed()
    );
    assert_eq!(
        answered, 40,
        "the well-behaved client was served throughout"
    );
    assert_eq!(
        nats.varz("slow_consumers").await,
        0,
        "nats-server dropped no connection as a slow consumer"
    );
    assert_each_published_once(&nats.url(), &accepted).await;
    // The silent ones are still subscribed; one that starts reading gets
    // the events from the start, in order.
    let mut reader = silent.pop().unwrap().bytes_stream();
    let mut text = String::new();
    while !text.contains("\nid: 3\n") && !text.starts_with("id: 3\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .expect("the subscriber gets its events once it reads")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.starts_with("id: 1\n") || text.contains("\nid: 1\n"),
        "{text:.200}"
    );
    let first: Value = serde_json::from_str(
        text.lines()
            .find_map(|line| line.strip_prefix("data: "))
            .unwrap(),
    )
    .unwrap();
    // Publication order is the workers', not arrival order.
    let id = first["id"].as_str().unwrap();
    assert!(accepted.iter().any(|a| a == id), "{id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_the_replica_waits_for_nats_does_not_end_it() {
    if !server::available() {
        return;
    }
    // NATS is not there: the start waits for it before serving.
    let url = format!("nats://127.0.0.1:{}", server::free_port());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_eventflow"));
    command
        .env("EVENTFLOW__SERVER__ADDR", "127.0.0.1:0")
        .env("EVENTFLOW__BACKEND__KIND", "nats")
        .env("EVENTFLOW__BACKEND__NATS_URL", &url)
        .env("EVENTFLOW__TELEMETRY__LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |message: &str| loop {
        let line = received
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("the service logs `{message}`"));
        if serde_json::from_str::<Value>(&line).is_ok_and(|log| log["message"] == message) {
            return;
        }
    };
    // From this line on it waits on the network.
    wait_for("starting the backend");
    for _ in 0..3 {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("eventflow listening");
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP did not end it");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(
        crate::binary::wait_exit(&mut child, Duration::from_secs(30)),
        0,
        "a replica that never reached NATS stops cleanly"
    );
}
