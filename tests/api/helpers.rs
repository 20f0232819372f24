//! `spawn_app` and friends: start the real service on a free loopback port
//! and talk HTTP to it. A server stops when its `TestApp` is dropped.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use eventflow::api::AppState;
use eventflow::config::Settings;
use eventflow::pipeline::Pipeline;
use eventflow::shutdown::Unpublished;
use eventflow::sink::{Publications, PublishError, Sink, SinkError};
use eventflow::testkit::RunningApp;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Set `TEST_LOG=1` to see the service's logs while tests run.
static TRACING: LazyLock<()> = LazyLock::new(|| {
    if std::env::var_os("TEST_LOG").is_some() {
        let settings = Settings::load_from(None, std::iter::empty()).expect("default settings");
        eventflow::telemetry::init_subscriber(&settings.telemetry).expect("subscriber");
    }
});

pub(crate) use eventflow::testkit::Captured;

/// A sink that lets events through only as the test releases permits:
/// a stand-in for a slow downstream, to hold events in the pipeline.
#[derive(Debug, Clone)]
pub(crate) struct Gate(pub(crate) Arc<Semaphore>);

#[async_trait]
impl Sink for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }
    async fn publish(&self, publications: Publications<'_>) -> Result<(), PublishError> {
        // One permit per event, taken one at a time as the test releases them.
        for (written, _) in publications.events().iter().enumerate() {
            let permit = self.0.acquire().await.map_err(|_| PublishError {
                written,
                error: SinkError::Closed("gate"),
            })?;
            permit.forget();
        }
        Ok(())
    }
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

impl Gate {
    pub(crate) fn closed() -> Self {
        Self(Arc::new(Semaphore::new(0)))
    }
    pub(crate) fn open_all(&self) {
        self.0.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// A running service (the crate's test kit) and an HTTP client for it.
pub(crate) struct TestApp {
    pub(crate) addr: SocketAddr,
    /// The admin listener, when `server.admin_addr` is set.
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) client: reqwest::Client,
    pub(crate) stdout: Captured,
    pub(crate) state: AppState,
    pub(crate) pipeline: Pipeline,
    app: RunningApp,
}

pub(crate) use eventflow::testkit::test_settings;

/// Starts the service with default test settings and a captured stdout sink.
pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}, Vec::new()).await
}

/// Starts the service with adjusted settings and extra sinks (after stdout).
pub(crate) async fn spawn_app_with(
    configure: impl FnOnce(&mut Settings),
    extra_sinks: Vec<Arc<dyn Sink>>,
) -> TestApp {
    LazyLock::force(&TRACING);
    let app = RunningApp::start(configure, extra_sinks).await;
    TestApp {
        addr: app.addr,
        admin: app.admin,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        stdout: app.stdout.clone(),
        state: app.state.clone(),
        pipeline: app.pipeline.clone(),
        app,
    }
}

impl TestApp {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub(crate) async fn post_event(&self, event: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/events"))
            .json(event)
            .send()
            .await
            .expect("request sent")
    }

    pub(crate) async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Posts `events` as a JSON array to `/events/batch`.
    pub(crate) async fn post_batch(&self, events: Vec<Value>) -> reqwest::Response {
        self.post_raw(
            "/events/batch",
            "application/json",
            Value::from(events).to_string(),
        )
        .await
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    /// Polls `GET /events/{id}` until its status is `status` (bounded).
    pub(crate) async fn wait_for_status(&self, id: &str, status: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let response = self.get(&format!("/events/{id}")).await;
            if response.status() == 200 {
                let body: Value = response.json().await.unwrap();
                if body["status"] == status {
                    return body;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("event {id} never reached status {status}");
    }

    /// Posts `n` single events `big-00`, `big-01`, … of `payload`, each
    /// answered 202, and waits until all are on stdout.
    pub(crate) async fn post_published(&self, n: usize, payload: &str) {
        for i in 0..n {
            let response = self
                .post_event(&event(&format!("big-{i:02}"), payload))
                .await;
            assert_eq!(response.status(), 202);
        }
        self.wait_for_stdout_lines(n).await;
    }

    /// Waits until stdout holds at least `n` lines (bounded).
    pub(crate) async fn wait_for_stdout_lines(&self, n: usize) -> Vec<Value> {
        for _ in 0..1000 {
            let lines = self.stdout.lines();
            if lines.len() >= n {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "stdout has {} lines, expected {n}",
            self.stdout.lines().len()
        );
    }

    /// The value of an unlabelled series on `/metrics`.
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits (bounded) until the pipeline is idle as `/metrics` tells it:
    /// nothing queued, and no accepted event still unpublished.
    pub(crate) async fn wait_until_idle(&self) {
        let mut last = (None, None);
        for _ in 0..1000 {
            last = (
                self.metric("eventflow_queue_depth").await,
                self.metric("eventflow_inflight_events").await,
            );
            if last == (Some(0.0), Some(0.0)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the pipeline never became idle: (queue depth, in flight) = {last:?}");
    }

    /// Sends the shutdown signal without waiting for the drain.
    pub(crate) fn begin_shutdown(&mut self) {
        self.app.begin_shutdown();
    }

    /// Stops the service and waits for its drain's report.
    pub(crate) async fn shutdown(self) -> Result<(), Unpublished> {
        self.app.shutdown().await
    }
}

/// `data` gzip-compressed.
pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A valid event.
pub(crate) fn event(id: &str, payload: &str) -> Value {
    json!({"id": id, "timestamp": 1_700_000_000, "payload": payload})
}

/// One parsed Server-Sent Event.
#[derive(Debug, Clone)]
pub(crate) struct SseMessage {
    pub(crate) event: String,
    pub(crate) id: String,
    pub(crate) data: String,
}

/// A subscription to `GET /events/stream`.
pub(crate) struct Subscription {
    events: std::pin::Pin<Box<dyn futures_util::Stream<Item = SseMessage> + Send>>,
}

impl TestApp {
    /// Subscribes to the SSE stream (optionally resuming). The server has
    /// subscribed to its feed once the answer's head arrived (the handler
    /// subscribes before it answers).
    pub(crate) async fn subscribe(&self, last_event_id: Option<u64>) -> Subscription {
        use eventsource_stream::Eventsource;
        let mut request = self.client.get(self.url("/events/stream"));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.expect("subscribe");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let events = response
            .bytes_stream()
            .eventsource()
            .filter_map(|e| async move {
                e.ok().map(|e| SseMessage {
                    event: e.event,
                    id: e.id,
                    data: e.data,
                })
            });
        Subscription {
            events: Box::pin(events),
        }
    }
}

impl Subscription {
    /// The next message, or `None` if none arrives within `wait`.
    pub(crate) async fn next(&mut self, wait: Duration) -> Option<SseMessage> {
        tokio::time::timeout(wait, self.events.next())
            .await
            .ok()
            .flatten()
    }
}
