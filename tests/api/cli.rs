//! The binary's command line and logs: `eventflow healthcheck`'s exit
//! codes, uncoloured pretty logs off a terminal, and a trace collector
//! that cannot be reached being reported.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::binary::{start, wait_exit};
use crate::helpers::{event, spawn_app, spawn_app_with};

/// `eventflow healthcheck` against `addr`: its exit code and stderr.
async fn healthcheck(addr: String) -> (i32, String) {
    healthcheck_with_admin(addr, None).await
}

/// `eventflow healthcheck` configured with `addr` and `admin_addr`.
async fn healthcheck_with_admin(addr: String, admin: Option<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_eventflow"));
        command
            .arg("healthcheck")
            .env("EVENTFLOW__SERVER__ADDR", addr)
            .env_remove("EVENTFLOW__SERVER__ADMIN_ADDR")
            .env_remove("EVENTFLOW_CONFIG");
        if let Some(admin) = admin {
            command.env("EVENTFLOW__SERVER__ADMIN_ADDR", admin);
        }
        let output = command.output().unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_is_a_liveness_probe() {
    let app = spawn_app().await;
    let (code, stderr) = healthcheck(app.addr.to_string()).await;
    assert_eq!(code, 0, "ready: {stderr}");
    // Draining is still alive: a liveness probe must not restart it.
    app.state
        .readiness
        .set(eventflow::shutdown::Phase::Draining);
    let (code, stderr) = healthcheck(app.addr.to_string()).await;
    assert_eq!(code, 0, "draining: {stderr}");
    let absent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = absent.local_addr().unwrap().to_string();
    drop(absent);
    let (code, stderr) = healthcheck(addr).await;
    assert_ne!(code, 0, "nothing listening");
    assert!(stderr.contains("cannot reach"), "{stderr}");
}

/// A loopback address nothing listens on.
fn dead_addr() -> String {
    let absent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = absent.local_addr().unwrap().to_string();
    drop(absent);
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_probes_the_admin_listener_when_there_is_one() {
    let app = spawn_app_with(
        |settings| settings.server.admin_addr = Some("127.0.0.1:0".to_owned()),
        Vec::new(),
    )
    .await;
    let admin = app.admin.expect("an admin listener").to_string();
    // The API's port is not probed: health lives on the admin port.
    let (code, stderr) = healthcheck_with_admin(dead_addr(), Some(admin)).await;
    assert_eq!(code, 0, "admin listener answers: {stderr}");
    let (code, stderr) = healthcheck_with_admin(app.addr.to_string(), Some(dead_addr())).await;
    assert_ne!(code, 0, "admin listener down");
    assert!(stderr.contains("cannot reach"), "{stderr}");
}

#[test]
fn pretty_logs_carry_no_colour_codes_off_a_terminal() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventflow"))
        .env("EVENTFLOW__SERVER__ADDR", "127.0.0.1:0")
        .env("EVENTFLOW__TELEMETRY__LOG_FORMAT", "pretty")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut logged = String::new();
    for line in stderr.lines().map_while(Result::ok) {
        logged.push_str(&line);
        logged.push('\n');
        if line.contains("eventflow listening") {
            break;
        }
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(20)), 0);
    assert!(logged.contains("eventflow listening"), "{logged}");
    assert!(!logged.contains('\u{1b}'), "colour codes in:\n{logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_trace_collector_is_reported_in_the_log() {
    // A port with nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut service = start(&[
        ("EVENTFLOW__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("EVENTFLOW__TELEMETRY__SAMPLE_RATIO", "1.0"),
    ]);
    let response = reqwest::Client::new()
        .post(format!("http://{}/events?wait=published", service.addr))
        .json(&event("traced", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The spans are exported at shutdown at the latest.
    kill(Pid::from_raw(service.child.id() as i32), Signal::SIGTERM).unwrap();
    let logs = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut logs = Vec::new();
        while let Ok(line) = service
            .stderr
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            logs.push(line);
        }
        wait_exit(&mut service.child, Duration::from_secs(5));
        logs
    })
    .await
    .unwrap();
    let reported: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("exporting traces failed"))
        .collect();
    assert_eq!(reported.len(), 1, "reported once: {logs:#?}");
    assert!(reported[0].contains(&endpoint), "{}", reported[0]);
}

#[test]
fn every_configuration_error_exits_2_a_tokens_file_that_does_not_read_included() {
    let missing = tempfile::tempdir().unwrap().path().join("no-such-tokens");
    let missing = missing.display().to_string();
    for (key, value) in [
        ("EVENTFLOW__PIPELINE__WORKERS", "0"),
        ("EVENTFLOW__AUTH__TOKENS_FILE", missing.as_str()),
        ("EVENTFLOW__AUTH__TOKENS", "short"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_eventflow"))
            .env("EVENTFLOW__SERVER__ADDR", "127.0.0.1:0")
            .env(key, value)
            .env_remove("EVENTFLOW_CONFIG")
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{key}={value}: {stderr}");
        assert!(
            stderr.contains(
                &key.to_lowercase()
                    .replace("__", ".")
                    .replace("eventflow.", "")
            ),
            "{key}: {stderr}"
        );
    }
}
