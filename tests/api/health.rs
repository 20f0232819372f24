//! Health, readiness and the OpenAPI document.

use eventflow::shutdown::Phase;
use serde_json::Value;

use crate::helpers::spawn_app;

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
}
