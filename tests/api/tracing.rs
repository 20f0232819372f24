//! Traces: the binary exports OTLP to an in-process collector; one event's
//! HTTP, ingest, process_event, transform and publish spans form one trace
//! under the caller's `traceparent`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
