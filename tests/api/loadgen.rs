//! The load generator against a real server: its counts and its --verify.

use std::process::Command;

use serde_json::Value;

use crate::helpers::spawn_app;

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
        app.url(""),
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
    assert_eq!(app.wait_for_stdout_lines(300).await.len(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_ndjson_batches_are_counted_per_event() {
    let app = spawn_app().await;
    let (code, s) = loadgen(
        app.url(""),
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
    // A tiny pipeline: most of the burst is refused (503), and only the
    // accepted events are expected to be published.
    let app = crate::helpers::spawn_app_with(|s| s.pipeline.queue_capacity = 30, Vec::new()).await;
    let (code, s) = loadgen(
        app.url(""),
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
    if let Some(refused) = s["status"]["503"].as_u64() {
        assert_eq!(accepted, (requests - refused) * 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_requests_are_verified_but_not_measured() {
    let app = spawn_app().await;
    let (code, s) = loadgen(
        app.url(""),
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
        app.wait_for_stdout_lines(verified as usize).await.len(),
        verified as usize
    );
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
    // A sink that refuses everything: the events are still processed (and
    // reach stdout and the stream), but not every sink published them.
    let failing = crate::helpers::Gate::closed();
    failing.0.close();
    let app = crate::helpers::spawn_app_with(|_| {}, vec![std::sync::Arc::new(failing)]).await;
    let (code, s) = loadgen(app.url(""), &["-n", "20", "-c", "2", "--verify"]).await;
    assert_eq!(code, 3, "{s}");
    // The failure is the sink's, not a lost or doubled event.
    assert_eq!(s["verify"]["lost"], 0);
    assert_eq!(s["verify"]["duplicated"], 0);
    assert!(s["verify"]["publish_errors"].as_u64().unwrap() > 0, "{s}");
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
    assert_eq!(counted_code, 0, "{counted}");
    assert!(counted_took.as_secs() < 10, "{counted_took:?}");
    assert!(counted["unsent"].as_u64().unwrap() > 100, "{counted}");
    assert_eq!(code, 0, "{s}");
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
