//! The service for tests (feature `test-util`): built from test settings
//! on a free loopback port, its stdout captured, stopped when dropped.
//! Shared by the integration tests, the load generator's tests and the
//! benches, so that each does not keep its own copy.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::AppState;
use crate::app::App;
use crate::config::{Settings, StoreSettings};
use crate::pipeline::Pipeline;
use crate::shutdown::Unpublished;
use crate::sink::{Sink, StdoutSink};

/// Everything a stdout sink wrote, shared with the test.
#[derive(Debug, Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn bytes_mut(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes_mut().clone()
    }

    /// The lines written so far, each parsed as JSON (a line that is not
    /// fails the test).
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.bytes();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|error| panic!("a stdout line is not JSON ({error}): {line}"))
            })
            .collect()
    }

    /// Whole lines written so far.
    pub fn line_count(&self) -> usize {
        self.bytes_mut().iter().filter(|&&b| b == b'\n').count()
    }
}

/// The default settings with a free loopback port and two workers.
pub fn test_settings() -> Settings {
    let mut settings = Settings::load_from(None, std::iter::empty())
        .unwrap_or_else(|error| panic!("the default settings load: {error}"));
    settings.server.addr = "127.0.0.1:0".into();
    settings.pipeline.workers = 2;
    settings
}

/// The default store bounds (`store.*`), for benches and tests that build
/// a store by hand.
pub fn store_settings() -> StoreSettings {
    test_settings().store
}

/// A running service.
#[derive(Debug)]
pub struct RunningApp {
    /// The API listener.
    pub addr: SocketAddr,
    /// The admin listener, when `server.admin_addr` is set.
    pub admin: Option<SocketAddr>,
    /// What its stdout sink wrote.
    pub stdout: Captured,
    /// Its shared state (budgets, handles, tokens).
    pub state: AppState,
    /// Its whole pipeline (to close ingest or look at the backpressure).
    pub pipeline: Pipeline,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), Unpublished>>>,
}

impl RunningApp {
    /// Starts the service with [`test_settings`] changed by `configure`, a
    /// captured stdout sink, and `extra_sinks` after it.
    pub async fn start(
        configure: impl FnOnce(&mut Settings),
        extra_sinks: Vec<Arc<dyn Sink>>,
    ) -> Self {
        let mut settings = test_settings();
        configure(&mut settings);
        if let Err(error) = settings.validate() {
            panic!("invalid test settings: {error}");
        }
        let stdout = Captured::default();
        let mut sinks: Vec<Arc<dyn Sink>> = vec![Arc::new(StdoutSink::with_writer(stdout.clone()))];
        sinks.extend(extra_sinks);
        let app = App::build_with_sinks(settings, sinks)
            .await
            .unwrap_or_else(|error| panic!("the app builds: {error:#}"));
        let addr = app.local_addr();
        let admin = app.admin_addr();
        let state = app.state().clone();
        let pipeline = app.pipeline().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        // Serving once its readiness left `starting` (the server task sets
        // it after spawning the listeners): a test's first request must not
        // race the start.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while state.readiness.phase() == crate::shutdown::Phase::Starting {
            assert!(
                std::time::Instant::now() < deadline,
                "the service did not start serving within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        Self {
            addr,
            admin,
            stdout,
            state,
            pipeline,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends the stop signal (as SIGTERM would); the drain runs on.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the service and waits for its drain's report.
    pub async fn shutdown(mut self) -> Result<(), Unpublished> {
        self.begin_shutdown();
        match self.server.take() {
            Some(server) => server
                .await
                .unwrap_or_else(|error| panic!("the server task: {error}")),
            None => Ok(()),
        }
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}
