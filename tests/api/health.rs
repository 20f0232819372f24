//! Health, readiness, the OpenAPI document, and the connection cap.

use std::time::Duration;

use eventflow::shutdown::Phase;
use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn liveness_answers_on_both_paths() {
    let app = spawn_app().await;
    for path in ["/healthz", "/health"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "ok");
    }
}

#[tokio::test]
async fn readiness_follows_the_phase() {
    let app = spawn_app().await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.state.readiness.set(Phase::Draining);
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "draining");
    app.state.readiness.set(Phase::Starting);
    assert_eq!(app.get("/readyz").await.status(), 503);
}

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let app = spawn_app().await;
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/events", "post"),
        ("/events", "get"),
        ("/events/batch", "post"),
        ("/events/{id}", "get"),
        ("/events/stream", "get"),
        ("/healthz", "get"),
        ("/health", "get"),
        ("/readyz", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let post = &paths["/events"]["post"]["responses"];
    for status in [
        "200", "202", "400", "409", "413", "415", "422", "503", "504",
    ] {
        assert!(post.get(status).is_some(), "POST /events lacks {status}");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "Problem",
        "EventInput",
        "RecordView",
        "PublishedEvent",
        "BatchResponse",
    ] {
        assert!(schemas.contains_key(schema), "schema {schema} missing");
    }
    // The query constraints the handlers enforce.
    let parameter = |path: &str, method: &str, name: &str| {
        paths[path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["schema"]
            .clone()
    };
    let limit = parameter("/events", "get", "limit");
    assert_eq!(
        (limit["minimum"].as_f64(), limit["maximum"].as_f64()),
        (Some(1.0), Some(1000.0))
    );
    assert_eq!(
        parameter("/events", "get", "after")["pattern"],
        "^[0-9]{0,19}$"
    );
    assert_eq!(
        parameter("/events", "get", "status")["enum"],
        serde_json::json!(["pending", "processed", "failed"])
    );
    assert_eq!(
        parameter("/events", "post", "wait")["enum"],
        serde_json::json!(["published"])
    );
}

#[tokio::test]
async fn openapi_document_states_the_configured_limits() {
    let app = spawn_app_with(
        |s| {
            s.pipeline.max_payload_bytes = 1000;
            s.pipeline.max_batch = 50;
        },
        Vec::new(),
    )
    .await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let event = &doc["components"]["schemas"]["EventInput"];
    assert_eq!(event["properties"]["payload"]["maxLength"], 1000);
    assert_eq!(event["properties"]["id"]["maxLength"], 256);
    assert_eq!(event["additionalProperties"], false);
    let batch = &doc["paths"]["/events/batch"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"];
    assert_eq!(batch["maxItems"], 50, "{batch}");
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_others_close() {
    let app = spawn_app_with(
        |s| {
            s.server.max_connections = 2;
            s.server.max_subscribers = 1;
        },
        Vec::new(),
    )
    .await;
    // Two clients hold connections open, idle.
    let first = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A third is not served while they are open...
    let client = reqwest::Client::new();
    let waiting = client
        .get(app.url("/healthz"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(waiting.is_err(), "{waiting:?}");
    // ...and is once they close.
    drop((first, second));
    let served = client
        .get(app.url("/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
}
