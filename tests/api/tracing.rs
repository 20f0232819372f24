//! Traces: the binary exports OTLP to an in-process collector; one event's
//! HTTP, ingest, process_event, transform and publish spans form one trace
//! under the caller's `traceparent`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::Value;
use tokio_stream::wrappers::TcpListenerStream;

use crate::binary::{start, wait_exit};
use crate::helpers::event;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const REMOTE_PARENT: &str = "00f067aa0ba902b7";

/// A minimal OTLP/gRPC trace receiver that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        })
}

/// Starts a collector; returns it, its endpoint URL and its server task.
async fn collector() -> (
    Collector,
    String,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (collector, endpoint, server)
}

/// SIGTERMs the service (which flushes the exporter) and waits for exit 0.
async fn stop(mut service: crate::binary::Service) -> crate::binary::Service {
    kill(Pid::from_raw(service.child.id() as i32), Signal::SIGTERM).unwrap();
    let (code, service) = tokio::task::spawn_blocking(move || {
        let code = wait_exit(&mut service.child, Duration::from_secs(20));
        (code, service)
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_export_nothing_and_sampled_parents_are_followed() {
    let (collector, endpoint, server) = collector().await;
    let service = start(&[
        ("EVENTFLOW__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("EVENTFLOW__TELEMETRY__SAMPLE_RATIO", "0.0"),
    ]);
    let client = reqwest::Client::new();
    let url = format!("http://{}/events?wait=published", service.addr);
    for i in 0..20 {
        let response = client
            .post(&url)
            .json(&event(&format!("untraced-{i}"), "x"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // A caller that did not sample is not traced either.
    let unsampled = format!("00-{}-{REMOTE_PARENT}-00", "a".repeat(32));
    let response = client
        .post(&url)
        .header("traceparent", unsampled)
        .json(&event("declined", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // A sampled caller is followed whatever the ratio.
    let response = client
        .post(&url)
        .header("traceparent", format!("00-{TRACE_ID}-{REMOTE_PARENT}-01"))
        .json(&event("followed", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    stop(service).await;
    let spans = collector.0.lock().unwrap().clone();
    server.abort();
    assert!(!spans.is_empty(), "the sampled request was exported");
    for span in &spans {
        assert_eq!(
            hex(&span.trace_id),
            TRACE_ID,
            "span {} of an unsampled request was exported",
            span.name
        );
    }
    assert_eq!(
        spans.iter().filter(|s| s.name == "process_event").count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_is_one_trace_from_request_to_publication() {
    let (collector, endpoint, server) = collector().await;

    let service = start(&[
        ("EVENTFLOW__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("EVENTFLOW__TELEMETRY__SAMPLE_RATIO", "1.0"),
        ("EVENTFLOW__PUBLISH__SINKS", "stdout,log"),
    ]);
    let response = reqwest::Client::new()
        .post(format!("http://{}/events?wait=published", service.addr))
        .header("traceparent", format!("00-{TRACE_ID}-{REMOTE_PARENT}-01"))
        .json(&event("traced-1", "follow me"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let published: Value = response.json().await.unwrap();
    assert_eq!(
        published["metadata"]["trace_id"], TRACE_ID,
        "metadata carries the trace id"
    );

    // Shutdown flushes the exporter.
    let service = stop(service).await;

    let spans = collector.0.lock().unwrap().clone();
    server.abort();
    let by_name: HashMap<&str, &Span> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    let names: Vec<&str> = by_name.keys().copied().collect();
    for name in [
        "POST /events",
        "ingest",
        "process_event",
        "transform",
        "publish",
    ] {
        assert!(
            by_name.contains_key(name),
            "span {name} missing; got {names:?}"
        );
    }
    for span in &spans {
        assert_eq!(
            hex(&span.trace_id),
            TRACE_ID,
            "span {} is in another trace",
            span.name
        );
    }
    let http = by_name["POST /events"];
    let ingest = by_name["ingest"];
    let process = by_name["process_event"];
    assert_eq!(
        hex(&http.parent_span_id),
        REMOTE_PARENT,
        "the HTTP span continues the caller's trace"
    );
    assert_eq!(ingest.parent_span_id, http.span_id);
    assert_eq!(process.parent_span_id, ingest.span_id);
    assert_eq!(by_name["transform"].parent_span_id, process.span_id);
    let publishes: Vec<&Span> = spans.iter().filter(|s| s.name == "publish").collect();
    assert_eq!(publishes.len(), 2, "one publish span per sink");
    let mut sinks: Vec<String> = publishes
        .iter()
        .map(|s| attribute(s, "sink").unwrap())
        .collect();
    sinks.sort();
    assert_eq!(sinks, ["log", "stdout"]);
    assert!(
        publishes
            .iter()
            .all(|s| s.parent_span_id == process.span_id)
    );
    // Semantic-convention attributes on the server span.
    assert_eq!(
        attribute(http, "http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(attribute(http, "http.route").as_deref(), Some("/events"));
    assert_eq!(
        attribute(http, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attribute(ingest, "event.id").as_deref(), Some("traced-1"));

    // The log line written inside the publish span carries the ids.
    let logs: Vec<Value> = service
        .stderr
        .try_iter()
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let published_log = logs
        .iter()
        .find(|l| l["message"] == "event published")
        .unwrap_or_else(|| panic!("no log sink line in {logs:?}"));
    assert_eq!(published_log["trace_id"], TRACE_ID);
    let log_span = published_log["span_id"].as_str().unwrap();
    assert!(
        publishes.iter().any(|s| hex(&s.span_id) == log_span),
        "span_id names the publish span"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_nats_mode_one_trace_runs_from_the_request_on_one_replica_to_the_worker_on_another() {
    let Some(nats) = crate::nats::server::single().await else {
        return;
    };
    let url = nats.url();
    // Each replica exports to its own collector: where a span was made is
    // where it arrives.
    let (on_a, endpoint_a, server_a) = collector().await;
    let (on_b, endpoint_b, server_b) = collector().await;
    let replica = |endpoint: &str| {
        start(&[
            ("EVENTFLOW__TELEMETRY__OTLP_ENDPOINT", endpoint),
            ("EVENTFLOW__TELEMETRY__SAMPLE_RATIO", "1.0"),
            ("EVENTFLOW__BACKEND__KIND", "nats"),
            ("EVENTFLOW__BACKEND__NATS_URL", url.as_str()),
        ])
    };
    let mut a = replica(&endpoint_a);
    let mut b = replica(&endpoint_b);
    // Their stdout is read, or a full pipe would stop their workers.
    let _stdout_a = crate::binary::stdout_reader(&mut a.child);
    let _stdout_b = crate::binary::stdout_reader(&mut b.child);
    let client = reqwest::Client::new();
    // Events traced on A, each its own trace. Both replicas' workers pull
    // from the shared consumer, a pull request taking up to 256 in a row:
    // 600 events reach both.
    let traces: Vec<String> = (0..600).map(|i| format!("{TRACE_ID:.24}{i:08x}")).collect();
    let statuses: Vec<u16> = futures_util::stream::iter(traces.iter().enumerate())
        .map(|(i, trace)| {
            let client = &client;
            let addr = a.addr;
            async move {
                client
                    .post(format!("http://{addr}/events"))
                    .header("traceparent", format!("00-{trace}-{REMOTE_PARENT}-01"))
                    .json(&event(&format!("cross-{i}"), "x"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 202));
    // Every one processed (none pending on the shared store) before the
    // replicas stop and flush their spans.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pending: Value = client
            .get(format!("http://{}/events?status=pending&limit=1", b.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if pending["events"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still pending: {pending}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(a).await;
    stop(b).await;
    server_a.abort();
    server_b.abort();
    let spans_a = on_a.0.lock().unwrap().clone();
    let spans_b = on_b.0.lock().unwrap().clone();
    let all: Vec<&Span> = spans_a.iter().chain(&spans_b).collect();
    let processed_on_b = spans_b.iter().filter(|s| s.name == "process_event").count();
    assert!(
        processed_on_b > 0,
        "B's workers processed some of A's events"
    );
    let mut by_trace: HashMap<String, Vec<&Span>> = HashMap::new();
    for span in &all {
        by_trace.entry(hex(&span.trace_id)).or_default().push(span);
    }
    for trace in &traces {
        let in_trace = by_trace.get(trace).cloned().unwrap_or_default();
        let in_trace: Vec<&&Span> = in_trace.iter().collect();
        let named = |name: &str| {
            in_trace
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("trace {trace} has no {name} span"))
        };
        let ingest = named("ingest");
        let deliver = named("deliver");
        let process = named("process_event");
        assert_eq!(deliver.parent_span_id, ingest.span_id, "trace {trace}");
        assert_eq!(process.parent_span_id, deliver.span_id, "trace {trace}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_links_to_the_processing_of_each_event_it_hands_out() {
    poll_links_to_processing(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_nats_mode_a_poll_links_to_the_processing_of_each_event_too() {
    let Some(nats) = crate::nats::server::single().await else {
        return;
    };
    let url = nats.url();
    poll_links_to_processing(&[
        ("EVENTFLOW__BACKEND__KIND", "nats"),
        ("EVENTFLOW__BACKEND__NATS_URL", url.as_str()),
    ])
    .await;
}

/// A traced event, polled from a subscription of a service started with
/// `env`: the poll's span links to the event's `process_event` span.
async fn poll_links_to_processing(env: &[(&str, &str)]) {
    let (collector, endpoint, server) = collector().await;
    let mut settings = vec![
        ("EVENTFLOW__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("EVENTFLOW__TELEMETRY__SAMPLE_RATIO", "1.0"),
    ];
    settings.extend_from_slice(env);
    let service = start(&settings);
    let client = reqwest::Client::new();
    let base = format!("http://{}", service.addr);
    let created = client
        .put(format!("{base}/subscriptions/traced"))
        .json(&serde_json::json!({"start": "earliest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let response = client
        .post(format!("{base}/events?wait=published"))
        .header("traceparent", format!("00-{TRACE_ID}-{REMOTE_PARENT}-01"))
        .json(&event("linked-1", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let polled: Value = client
        .post(format!("{base}/subscriptions/traced/poll?wait=5s"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(polled["events"][0]["event"]["id"], "linked-1");

    stop(service).await;
    let spans = collector.0.lock().unwrap().clone();
    server.abort();
    let process = spans
        .iter()
        .find(|s| s.name == "process_event" && hex(&s.trace_id) == TRACE_ID)
        .unwrap_or_else(|| panic!("no process_event span in the event's trace"));
    let poll = spans
        .iter()
        .find(|s| s.name == "POST /subscriptions/{name}/poll")
        .unwrap_or_else(|| panic!("no poll span"));
    assert_ne!(hex(&poll.trace_id), TRACE_ID, "the poll has its own trace");
    assert!(
        poll.links
            .iter()
            .any(|l| hex(&l.trace_id) == TRACE_ID && l.span_id == process.span_id),
        "the poll links to the event's processing: {:?}",
        poll.links
    );
}
