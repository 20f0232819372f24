//! Graceful shutdown of the real binary: SIGTERM under load loses nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::binary::{start, stdout_reader, wait_exit};
use crate::helpers::event;

fn batch(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{}\n", event(&format!("{prefix}-{i}"), "drain me")))
        .collect()
}

/// Two accepted batches of 6,000 events (`url` is the batch route): more
/// than the stdout sink's buffer (1 MiB) and a pipe nobody reads hold.
async fn fill_unread_stdout(client: &reqwest::Client, url: &str, prefix: &str) {
    for round in 0..2 {
        let response = client
            .post(url)
            .header("content-type", "application/x-ndjson")
            .body(batch(&format!("{prefix}-{round}"), 6000))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_publishes_every_accepted_event_exactly_once() {
    let mut service = start(&[]);
    let stdout = stdout_reader(&mut service.child);
    let client = reqwest::Client::new();
    let url = format!("http://{}/events/batch", service.addr);

    // 16 senders, each posting batches of 250 back to back.
    let mut senders = Vec::new();
    for sender in 0..16 {
        let (client, url) = (client.clone(), url.clone());
        senders.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut sent = Vec::new();
            for round in 0..8 {
                let prefix = format!("s{sender}-r{round}");
                sent.push(prefix.clone());
                let response = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(batch(&prefix, 250))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == 202 => {
                        let body: Value = r.json().await.unwrap();
                        assert_eq!(body["accepted"], 250);
                        accepted.push(prefix);
                    }
                    // Refused while draining, or the listener is gone: not accepted.
                    Ok(r) => assert_eq!(r.status(), 503),
                    Err(_) => break,
                }
            }
            (accepted, sent)
        }));
    }
    // Let the load build up (some batches accepted), then SIGTERM while
    // batches are in flight.
    let mut accepted = 0.0;
    for _ in 0..500 {
        accepted = service
            .metric(&client, "eventflow_events_accepted_total")
            .await
            .unwrap_or(0.0);
        if accepted >= 1000.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        accepted >= 1000.0,
        "the load never built up: {accepted} accepted"
    );
    kill(Pid::from_raw(service.child.id() as i32), Signal::SIGTERM).unwrap();

    let mut accepted_prefixes = Vec::new();
    let mut sent_prefixes = HashSet::new();
    for sender in senders {
        let (accepted, sent) = sender.await.unwrap();
        accepted_prefixes.extend(accepted);
        sent_prefixes.extend(sent);
    }
    let (code, service) = tokio::task::spawn_blocking(move || {
        let code = wait_exit(&mut service.child, Duration::from_secs(30));
        (code, service)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "a clean drain exits 0");

    let output = stdout.join().unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in output.lines() {
        let published: Value = serde_json::from_str(line).expect("stdout holds only JSON lines");
        assert_eq!(published["payload"], "DRAIN ME");
        *counts
            .entry(published["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert!(
        !accepted_prefixes.is_empty(),
        "some batches were accepted before the signal"
    );
    let mut expected = 0;
    for prefix in &accepted_prefixes {
        for i in 0..250 {
            let id = format!("{prefix}-{i}");
            assert_eq!(
                counts.get(&id),
                Some(&1),
                "{id} accepted but published {:?} times",
                counts.get(&id)
            );
            expected += 1;
        }
    }
    assert!(
        counts.values().all(|&c| c == 1),
        "nothing is published twice"
    );
    for id in counts.keys() {
        let prefix = id.rsplit_once('-').unwrap().0;
        assert!(sent_prefixes.contains(prefix), "{id} was never sent");
    }
    assert!(expected >= 250);
    let logs: Vec<String> = service.stderr.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.contains("shutdown complete")),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_past_the_deadline_reports_and_exits_non_zero_and_a_second_signal_forces_exit() {
    // Nobody reads stdout: once the pipe is full, workers cannot publish.
    for second_signal in [false, true] {
        let grace = if second_signal { "60s" } else { "1s" };
        let mut service = start(&[("EVENTFLOW__SERVER__SHUTDOWN_GRACE", grace)]);
        let client = reqwest::Client::new();
        let url = format!("http://{}/events/batch", service.addr);
        fill_unread_stdout(&client, &url, "stuck").await;
        let pid = Pid::from_raw(service.child.id() as i32);
        kill(pid, Signal::SIGTERM).unwrap();
        let (code, logs) = tokio::task::spawn_blocking(move || {
            let mut logs = Vec::new();
            if second_signal {
                // The second signal once the first one's drain has begun.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !logs.iter().any(|l: &String| l.contains("shutting down")) {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let line = service
                        .stderr
                        .recv_timeout(left)
                        .expect("the drain begins after SIGTERM");
                    logs.push(line);
                }
                kill(pid, Signal::SIGINT).unwrap();
            }
            let code = wait_exit(&mut service.child, Duration::from_secs(20));
            logs.extend(service.stderr.try_iter());
            (code, logs)
        })
        .await
        .unwrap();
        if second_signal {
            assert_eq!(code, 130, "a second signal forces exit");
            assert!(logs.iter().any(|l| l.contains("second signal")), "{logs:?}");
        } else {
            assert_eq!(code, 1, "a missed deadline exits non-zero");
            let report = logs
                .iter()
                .find(|l| l.contains("shutdown deadline passed"))
                .unwrap_or_else(|| panic!("no deadline report in {logs:?}"));
            let report: Value = serde_json::from_str(report).unwrap();
            assert!(report["in_flight"].as_u64().unwrap() > 0, "{report}");
        }
    }
}

#[tokio::test]
async fn in_process_drain_waits_for_slow_sinks_then_publishes_everything() {
    use std::sync::Arc;

    use crate::helpers::{Gate, spawn_app_with};

    let gate = Gate::closed();
    let app = spawn_app_with(|_| {}, vec![Arc::new(gate.clone())]).await;
    for i in 0..20 {
        assert_eq!(
            app.post_event(&event(&format!("d{i}"), "x")).await.status(),
            202
        );
    }
    let stdout = app.stdout.clone();
    let pipeline = app.pipeline.clone();
    let readiness = app.state.readiness.clone();
    let drained = tokio::spawn(app.shutdown());
    for _ in 0..500 {
        if readiness.phase() == eventflow::shutdown::Phase::Draining {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(readiness.phase(), eventflow::shutdown::Phase::Draining);
    assert!(
        !drained.is_finished(),
        "the drain waits for the held events"
    );
    gate.open_all();
    drained
        .await
        .unwrap()
        .expect("drained within the grace period");
    assert_eq!(stdout.lines().len(), 20);
    assert_eq!(pipeline.backpressure().in_use(), 0);
}

#[tokio::test]
async fn a_stalled_connection_neither_fails_a_complete_drain_nor_holds_the_exit() {
    use tokio::io::AsyncWriteExt;

    let mut service = start(&[("EVENTFLOW__SERVER__SHUTDOWN_GRACE", "20s")]);
    let stdout = stdout_reader(&mut service.child);
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{}/events", service.addr))
        .json(&event("before-stop", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let open_fds = || async { service.metric(&client, "process_open_fds").await.unwrap() };
    let before = open_fds().await;
    // A client that sent half a request and went quiet.
    let mut stalled = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    stalled
        .write_all(b"POST /events HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Taken by the server (one more descriptor) before the signal.
    let mut taken = false;
    for _ in 0..500 {
        if open_fds().await > before {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(taken, "the server never accepted the stalled connection");
    let signalled = std::time::Instant::now();
    kill(Pid::from_raw(service.child.id() as i32), Signal::SIGTERM).unwrap();
    let (code, logs) = tokio::task::spawn_blocking(move || {
        let code = wait_exit(&mut service.child, Duration::from_secs(30));
        (code, service.stderr.try_iter().collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    assert_eq!(code, 0, "every accepted event was published: {logs:?}");
    // With nothing to drain and no answer under way, the half-sent head
    // is closed at once: not held for the 20 s grace.
    assert!(took < Duration::from_secs(5), "exit after {took:?}");
    assert!(stdout.join().unwrap().contains("\"id\":\"before-stop\""));
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_runs_out_of_time_exits_within_the_grace_its_line_end_included() {
    // Nobody reads stdout: the drain cannot finish, and the forced exit
    // waits for stdout's line in progress.
    let mut service = start(&[("EVENTFLOW__SERVER__SHUTDOWN_GRACE", "3s")]);
    let client = reqwest::Client::new();
    let url = format!("http://{}/events/batch", service.addr);
    fill_unread_stdout(&client, &url, "grace").await;
    let pid = Pid::from_raw(service.child.id() as i32);
    let signalled = std::time::Instant::now();
    kill(pid, Signal::SIGTERM).unwrap();
    let code =
        tokio::task::spawn_blocking(move || wait_exit(&mut service.child, Duration::from_secs(20)))
            .await
            .unwrap();
    let took = signalled.elapsed();
    eprintln!("a 3 s grace with a stuck stdout: exit {code} after {took:?}");
    assert_eq!(code, 1, "a missed deadline exits non-zero");
    // The grace, and room for a busy machine (it was 7 s: 2 s of late
    // flush and 2 s of line end after the deadline).
    assert!(took < Duration::from_millis(4500), "{took:?}");
}
