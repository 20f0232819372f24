//! The compiled `eventflow` binary as a child process: start it on a free
//! port, read its JSON logs, stop it, and make sure a failed test never
//! leaves it running.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) struct Service {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) stderr: mpsc::Receiver<String>,
}

/// Starts the compiled binary on a free port and waits for its listening log line.
pub(crate) fn start(env: &[(&str, &str)]) -> Service {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventflow"));
    command
        .env("EVENTFLOW__SERVER__ADDR", "127.0.0.1:0")
        .env("EVENTFLOW__TELEMETRY__LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("binary starts");
    let stderr = child.stderr.take().unwrap();
    let (lines, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut service = Service {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        stderr: receiver,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut logged = Vec::new();
    loop {
        let line = match service
            .stderr
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(line) => line,
            Err(error) => panic!(
                "the service did not log that it listens ({error}); it logged:\n{}",
                logged.join("\n")
            ),
        };
        logged.push(line.clone());
        let Ok(log) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if log["message"] == "eventflow listening" {
            service.addr = log["addr"].as_str().unwrap().parse().unwrap();
            return service;
        }
    }
}

impl Drop for Service {
    /// A failed test must not leave the service running.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Service {
    /// Log lines up to and including the first that contains `needle`
    /// (bounded by `limit`), so that a caller can go on from there.
    pub(crate) fn wait_for_log(&self, needle: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let line = self
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no log line with {needle:?} in {seen:#?}"));
            let found = line.contains(needle);
            seen.push(line);
            if found {
                return seen;
            }
        }
    }

    /// The service's peak resident memory so far (`VmHWM`), in bytes.
    pub(crate) fn peak_rss(&self) -> u64 {
        self.memory("VmHWM:")
    }

    /// The service's resident memory now (`VmRSS`), in bytes.
    pub(crate) fn rss(&self) -> u64 {
        self.memory("VmRSS:")
    }

    fn memory(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    /// The value of series `series` (name and labels) on the service's `/metrics`.
    pub(crate) async fn metric(&self, client: &reqwest::Client, series: &str) -> Option<f64> {
        let text = client
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

/// `n` services started with `env`, each with its stdout read (a full pipe
/// would stop its workers): the services and their stdout readers.
pub(crate) fn start_reading(
    env: &[(&str, &str)],
    n: usize,
) -> (Vec<Service>, Vec<std::thread::JoinHandle<String>>) {
    let mut services: Vec<Service> = (0..n).map(|_| start(env)).collect();
    let readers = services
        .iter_mut()
        .map(|s| stdout_reader(&mut s.child))
        .collect();
    (services, readers)
}

pub(crate) fn stdout_reader(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        out
    })
}

pub(crate) fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "the service did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
