//! The load generator against a real eventflow service (the service crate
//! is a dev-dependency): its counts, its exit codes and its `--verify`.

// Test code: a failed unwrap is a failed test, which is what we want.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventflow::sink::{Publications, PublishError, Sink, SinkError};
use eventflow::testkit::RunningApp;
use serde_json::Value;

/// A running service on a free loopback port (the service's test kit);
/// stops when dropped.
type Service = RunningApp;

/// Lines on the service's stdout, once there are at least `n` (bounded
/// wait).
async fn stdout_lines(app: &Service, n: usize) -> usize {
    for _ in 0..1000 {
        if app.stdout.line_count() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.stdout.line_count()
}

async fn spawn_app() -> Service {
    Service::start(|_| {}, Vec::new()).await
}

/// A sink that refuses every event.
#[derive(Debug)]
struct Refusing;

#[async_trait]
impl Sink for Refusing {
    fn name(&self) -> &'static str {
        "refusing"
    }
    async fn publish(&self, _: Publications<'_>) -> Result<(), PublishError> {
        Err(SinkError::Closed("refusing").into())
    }
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A sink that takes this long per pass: a slow downstream.
#[derive(Debug)]
struct Slow(Duration);

#[async_trait]
impl Sink for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }
    async fn publish(&self, _: Publications<'_>) -> Result<(), PublishError> {
        tokio::time::sleep(self.0).await;
        Ok(())
    }
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Runs eventflow-loadgen with `args` against `url`; returns (exit code, JSON summary).
async fn loadgen(url: String, args: &[&str]) -> (i32, Value) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_eventflow-loadgen"))
            .arg("--url")
            .arg(url)
            .args(["--json", "--no-progress"])
            .args(args)
            .output()
            .expect("loadgen runs");
        let summary = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not a JSON summary ({e}): {}\nstderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.code().unwrap_or(-1), summary)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_events_closed_loop_are_all_verified() {
    let app = spawn_app().await;
    let (code, s) = loadgen(
        app.url(),
        &["-n", "300", "-c", "8", "--verify", "--metrics-url", "auto"],
    )
    .await;
    assert_eq!(code, 0, "{s}");
    assert_eq!(s["requests"], 300);
    assert_eq!(s["status"]["202"], 300);
    assert_eq!(s["events_accepted"], 300);
    assert_eq!(s["verify"]["accepted"], 300);
    assert_eq!(s["verify"]["lost"], 0);
    assert_eq!(s["verify"]["duplicated"], 0);
    assert!(s["service"]["samples"].as_u64().unwrap() >= 1);
    assert!(s["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    // What the loadgen says it got accepted is what the service published.
    assert_eq!(stdout_lines(&app, 300).await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_ndjson_batches_are_counted_per_event() {
    let app = spawn_app().await;
    let (code, s) = loadgen(
        app.url(),
        &[
            "-n", "10", "-b", "50", "--format", "ndjson", "--gzip", "-c", "2", "--verify",
        ],
    )
    .await;
    assert_eq!(code, 0, "{s}");
    assert_eq!(s["events_sent"], 500);
    assert_eq!(s["events_accepted"], 500);
    assert_eq!(s["verify"]["accepted"], 500);
    assert_eq!(s["verify"]["lost"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_paces_requests_and_verify_catches_refusals() {
    // Room for one batch of 20 at a time, published no faster than one
    // pass per 20 ms: most of the 400 requests a second are refused (503),
    // and only the accepted events are expected to be published.
    let app = Service::start(
        |s| s.pipeline.queue_capacity = 30,
        vec![Arc::new(Slow(Duration::from_millis(20)))],
    )
    .await;
    let (code, s) = loadgen(
        app.url(),
        &[
            "--mode", "open", "--rate", "400", "-d", "1s", "-c", "16", "-b", "20", "--verify",
        ],
    )
    .await;
    assert_eq!(code, 0, "{s}");
    let requests = s["requests"].as_u64().unwrap();
    assert!(
        (350..=401).contains(&requests),
        "about 400 requests in 1 s at 400/s, got {requests}"
    );
    let accepted = s["events_accepted"].as_u64().unwrap();
    assert_eq!(s["verify"]["accepted"].as_u64().unwrap(), accepted);
    assert_eq!(s["verify"]["lost"], 0);
    let refused = s["status"]["503"].as_u64().unwrap_or(0);
    assert!(refused > requests / 2, "most requests refused: {s}");
    assert!(accepted > 0, "some accepted: {s}");
    assert_eq!(accepted, (requests - refused) * 20, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tick_pacing_keeps_the_schedule_a_millisecond_at_a_time() {
    let app = spawn_app().await;
    let (code, s) = loadgen(
        app.url(),
        &[
            "--mode", "open", "--pacing", "tick", "--rate", "2000", "-d", "1s", "-c", "8",
            "--verify",
        ],
    )
    .await;
    assert_eq!(code, 0, "{s}");
    // The requests due in the second are sent, two a tick.
    let requests = s["requests"].as_u64().unwrap();
    assert!((1990..=2000).contains(&requests), "{s}");
    assert_eq!(s["verify"]["accepted"].as_u64().unwrap(), requests, "{s}");
    assert_eq!(s["verify"]["lost"], 0);
    assert_eq!(s["verify"]["duplicated"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_requests_are_verified_but_not_measured() {
    let app = spawn_app().await;
    let (code, s) = loadgen(
        app.url(),
        &[
            "--mode", "open", "--rate", "200", "--warmup", "1s", "-d", "1s", "-c", "4", "--verify",
        ],
    )
    .await;
    assert_eq!(code, 0, "{s}");
    // The summary covers the measured second only ...
    let measured = s["events_accepted"].as_u64().unwrap();
    assert!(
        (180..=201).contains(&measured),
        "about 200 measured requests in 1 s at 200/s, got {measured}"
    );
    assert_eq!(s["requests"].as_u64().unwrap(), measured);
    // ... while --verify checks the warm-up's events too: about 400 in all,
    // every one published once.
    let verified = s["verify"]["accepted"].as_u64().unwrap();
    assert!(
        (360..=401).contains(&verified) && verified > measured,
        "warm-up and measured events verified, got {verified}"
    );
    assert_eq!(s["verify"]["lost"], 0);
    assert_eq!(s["verify"]["duplicated"], 0);
    assert_eq!(
        stdout_lines(&app, verified as usize).await,
        verified as usize
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_against_a_stopped_server_exits_non_zero() {
    // A port with nothing listening: every connection is refused.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let (code, s) = loadgen(url, &["-n", "5", "-c", "1", "--timeout", "1s"]).await;
    assert_eq!(code, 1, "{s}");
    assert_eq!(s["status"], serde_json::json!({}), "no answers: {s}");
}

#[test]
fn help_describes_the_load_generator() {
    let output = Command::new(env!("CARGO_BIN_EXE_eventflow-loadgen"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let first = help.lines().next().unwrap_or_default();
    assert!(first.starts_with("Load generator for eventflow"), "{help}");
    assert!(!help.contains("Observability-first event ingest"), "{help}");
}

#[tokio::test]
async fn bad_arguments_exit_2_with_a_message() {
    let output = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_eventflow-loadgen"))
            .args(["--mode", "open"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--rate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_when_a_sink_failed_to_publish() {
    // A sink that refuses everything: no event is published, and the
    // service marks each one failed (stdout wrote it, the other sink not).
    let app = Service::start(|_| {}, vec![Arc::new(Refusing)]).await;
    let (code, s) = loadgen(
        app.url(),
        &["-n", "20", "-c", "2", "--verify", "--verify-timeout", "2s"],
    )
    .await;
    assert_eq!(code, 3, "{s}");
    assert_eq!(s["verify"]["accepted"], 20);
    // Reported failed by the service: neither lost nor doubled.
    assert_eq!(s["verify"]["failed"], 20, "{s}");
    assert_eq!(s["verify"]["lost"], 0);
    assert_eq!(s["verify"]["duplicated"], 0);
    assert_eq!(s["verify"]["seen_on_stream"], 0, "nothing reached the feed");
    assert!(s["verify"]["publish_errors"].as_u64().unwrap() >= 20, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_run_against_a_stalled_server_ends_and_shows_the_stall() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    // Open loop at 200/s on two connections, giving up after 500 ms, for
    // a second (`-d 1s`) or for 200 requests (`-n 200`).
    let stalled_run = |limit: [&'static str; 2]| async move {
        let started = std::time::Instant::now();
        let (code, summary) = loadgen(
            format!("http://{addr}"),
            &[
                "--mode",
                "open",
                "--rate",
                "200",
                limit[0],
                limit[1],
                "-c",
                "2",
                "--timeout",
                "500ms",
            ],
        )
        .await;
        (started.elapsed(), code, summary)
    };
    let (took, code, s) = stalled_run(["-d", "1s"]).await;
    // A counted run (no duration) ends a timeout after its last request
    // was due, too.
    let (counted_took, counted_code, counted) = stalled_run(["-n", "200"]).await;
    held.abort();
    // Nothing succeeded: the run says so in its exit code.
    assert_eq!(counted_code, 1, "{counted}");
    assert!(counted_took.as_secs() < 10, "{counted_took:?}");
    assert!(counted["unsent"].as_u64().unwrap() > 100, "{counted}");
    assert_eq!(code, 1, "{s}");
    // Two warm-ups, the second of measurement and the cutoff a timeout
    // later: not the ~50 s that sending every ticket would take.
    assert!(took.as_secs() < 10, "{took:?}");
    assert!(s["timeouts"].as_u64().unwrap() >= 2, "{s}");
    assert!(s["unsent"].as_u64().unwrap() > 100, "{s}");
    assert_eq!(
        s["requests"], 200,
        "every due request is accounted for: {s}"
    );
    // Most were never sent, each after waiting past the cutoff: their
    // wait, not only the timeouts', is in the latency.
    assert!(
        s["latency_ms"]["p50"].as_f64().unwrap() >= 500.0,
        "the stall shows in the latency: {s}"
    );
}

/// Four consumers share one subscription while events are ingested; one
/// dies holding its leases. Every accepted event is acknowledged exactly
/// once and only the dead consumer's leases come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_a_subscription_ack_every_event_once_though_one_dies() {
    let app = spawn_app().await;
    let (code, summary) = loadgen(
        app.url(),
        &[
            "-n",
            "400",
            "-b",
            "10",
            "-c",
            "2",
            "--consumers",
            "4",
            "--poll-max",
            "20",
            "--ack-timeout",
            "2s",
            // The last consumer dies on its first lease.
            "--kill-consumer-after",
            "0s",
            "--verify",
        ],
    )
    .await;
    let consume = &summary["consume"];
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["events_accepted"], 4000);
    assert_eq!(consume["unacked"], 0, "{consume}");
    assert_eq!(consume["acked_twice"], 0, "{consume}");
    assert_eq!(consume["unexpected_redeliveries"], 0, "{consume}");
    assert_eq!(consume["acked"], 4000, "{consume}");
    let held = consume["killed_held"].as_u64().unwrap();
    assert!(held > 0, "the dying consumer held nothing: {consume}");
    assert_eq!(consume["redelivered"], held, "{consume}");
    // Nothing left: the cursor is at the last publication.
    assert_eq!(consume["dead_lettered"], 0, "{consume}");
    assert_eq!(consume["committed"], 4000, "{consume}");
    // The subscription the run made is gone after it.
    let client = reqwest::Client::new();
    let list: Value = client
        .get(format!("{}/subscriptions", app.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["subscriptions"], serde_json::json!([]));
}
