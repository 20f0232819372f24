//! "Published" means written, with the real binary and a real pipe on its
//! stdout: a pipe nobody reads holds events unpublished, and a closed one
//! fails them, visibly.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::binary::{Service, start, wait_exit};
use crate::helpers::event;

/// SIGTERM, then the exit code and every log line.
async fn stop(mut service: Service) -> (i32, Vec<String>) {
    kill(Pid::from_raw(service.child.id() as i32), Signal::SIGTERM).unwrap();
    tokio::task::spawn_blocking(move || {
        let code = wait_exit(&mut service.child, Duration::from_secs(30));
        (code, service.stderr.try_iter().collect())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_fails_events_visibly_and_the_exit_says_so() {
    let mut service = start(&[]);
    // `eventflow | head -c 0`: the reader is gone.
    drop(service.child.stdout.take());
    let client = reqwest::Client::new();
    let base = format!("http://{}", service.addr);
    let waited = client
        .post(format!("{base}/events?wait=published"))
        .json(&event("lost-line", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status(), 500, "not 200: the line was not written");
    let problem: Value = waited.json().await.unwrap();
    assert_eq!(problem["title"], "Processing failed");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("sink `stdout`"),
        "{problem}"
    );
    let record: Value = client
        .get(format!("{base}/events/lost-line"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["status"], "failed", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .starts_with("not published: "),
        "{record}"
    );
    // Broken: not ready, and nothing more is taken.
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "sink_broken", "{ready}");
    let refused = client
        .post(format!("{base}/events"))
        .json(&event("after-break", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["title"], "A sink is broken", "{refused}");
    for (series, expected) in [
        ("eventflow_sink_up{sink=\"stdout\"}", 0.0),
        ("eventflow_publish_errors_total{sink=\"stdout\"}", 1.0),
        ("eventflow_events_processed_total{outcome=\"error\"}", 1.0),
        ("eventflow_events_processed_total{outcome=\"ok\"}", 0.0),
        ("eventflow_events_published_total{sink=\"stdout\"}", 0.0),
    ] {
        assert_eq!(
            service.metric(&client, series).await,
            Some(expected),
            "{series}"
        );
    }
    let (code, logs) = stop(service).await;
    assert_eq!(code, 1, "an event was not published: {logs:?}");
    assert!(
        logs.iter().any(|l| l
            .contains("1 accepted events were not published because a sink could not write them")),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_nobody_reads_holds_events_unpublished_and_the_report_counts_them() {
    let service = start(&[
        ("EVENTFLOW__SERVER__SHUTDOWN_GRACE", "2s"),
        ("EVENTFLOW__SERVER__REQUEST_TIMEOUT", "1s"),
    ]);
    let client = reqwest::Client::new();
    let base = format!("http://{}", service.addr);
    // Far more than a pipe holds (64 KiB): the writer blocks on it.
    let batch: Vec<Value> = (0..2000)
        .map(|i| event(&format!("held-{i}"), &"p".repeat(200)))
        .collect();
    let response = client
        .post(format!("{base}/events/batch"))
        .json(&json!(batch))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // Accepted, but its line cannot be written: not published.
    let waited = client
        .post(format!("{base}/events?wait=published"))
        .json(&event("behind-a-full-pipe", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status(), 504);
    let unpublished = service
        .metric(&client, "eventflow_inflight_events")
        .await
        .unwrap();
    assert!(unpublished > 1000.0, "{unpublished} held");
    let (code, logs) = stop(service).await;
    assert_eq!(code, 1, "{logs:?}");
    let report = logs
        .iter()
        .find(|l| l.contains("shutdown deadline passed"))
        .unwrap_or_else(|| panic!("no deadline report in {logs:?}"));
    let report: Value = serde_json::from_str(report).unwrap();
    // Lines taken by the writer but not written count: the report is not 0.
    assert!(
        report["in_flight"].as_u64().unwrap() > 1000,
        "the report counts the unwritten lines: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_exit_behind_a_slow_reader_leaves_only_whole_lines_on_stdout() {
    use std::io::Read;
    let mut service = start(&[("EVENTFLOW__PIPELINE__WORKERS", "1")]);
    // A reader that takes 16 KiB every 20 ms, until the end.
    let mut stdout = service.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    // 60 events of 50 KB: ~3 MB for a reader of ~0.8 MB/s.
    let client = reqwest::Client::new();
    let url = format!("http://{}/events", service.addr);
    for i in 0..60 {
        let response = client
            .post(&url)
            .json(&event(&format!("slow-{i}"), &"z".repeat(50_000)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let pid = Pid::from_raw(service.child.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(pid, Signal::SIGTERM).unwrap();
    let code =
        tokio::task::spawn_blocking(move || wait_exit(&mut service.child, Duration::from_secs(30)))
            .await
            .unwrap();
    assert_eq!(code, 130, "the second signal forces the exit");
    let written = reader.join().unwrap();
    assert!(!written.is_empty());
    assert!(
        written.len() < 60 * 50_000,
        "the exit came before all was written"
    );
    assert_eq!(
        written.last(),
        Some(&b'\n'),
        "stdout ends with a whole line"
    );
    for line in String::from_utf8(written).unwrap().lines() {
        let published: Value = serde_json::from_str(line).expect("every line is whole JSON");
        assert!(published["id"].as_str().unwrap().starts_with("slow-"));
    }
}
