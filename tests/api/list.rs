//! `GET /events`: pagination and filters.

use serde_json::Value;

use crate::helpers::{event, spawn_app};

async fn page(app: &crate::helpers::TestApp, query: &str) -> Value {
    let response = app.get(&format!("/events{query}")).await;
    assert_eq!(response.status(), 200, "{query}");
    response.json().await.unwrap()
}

fn ids(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn pages_follow_arrival_order_through_the_cursor() {
    let app = spawn_app().await;
    for i in 0..7 {
        assert_eq!(
            app.post_event(&event(&format!("p{i}"), "x")).await.status(),
            202
        );
    }
    let mut seen = Vec::new();
    let mut query = "?limit=3".to_owned();
    for _ in 0..10 {
        let p = page(&app, &query).await;
        seen.extend(ids(&p));
        match p["next"].as_str() {
            Some(next) => query = format!("?limit=3&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, (0..7).map(|i| format!("p{i}")).collect::<Vec<_>>());
    let empty = page(&app, "?after=1000").await;
    assert_eq!(empty["events"].as_array().unwrap().len(), 0);
    assert!(empty["next"].is_null());
}

#[tokio::test]
async fn status_filter_and_the_largest_page() {
    let app = spawn_app().await;
    let events: Vec<Value> = (0..1005).map(|i| event(&format!("l{i}"), "x")).collect();
    let response = app.post_batch(events).await;
    assert_eq!(response.status(), 202);
    app.wait_for_stdout_lines(1005).await;
    app.wait_until_idle().await;
    assert!(
        page(&app, "?status=pending").await["events"]
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing pending once idle"
    );
    let most = page(&app, "?limit=1000").await;
    assert_eq!(most["events"].as_array().unwrap().len(), 1000);
    assert_eq!(most["next"], "1000");
    let default = page(&app, "").await;
    assert_eq!(default["events"].as_array().unwrap().len(), 100);
    let processed = page(&app, "?status=processed&limit=10").await;
    assert_eq!(processed["events"].as_array().unwrap().len(), 10);
    assert!(
        processed["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == "processed")
    );
    let all_processed = page(&app, "?status=processed&limit=1000&after=1000").await;
    assert_eq!(
        ids(&all_processed),
        ["l1000", "l1001", "l1002", "l1003", "l1004"]
    );
}

#[tokio::test]
async fn out_of_range_values_are_422_and_malformed_query_strings_400() {
    let app = spawn_app().await;
    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=ten", "limit"),
        ("?limit=1001", "limit"),
        ("?after=12345678901234567890", "after"),
        ("?status=", "status"),
        ("?after=abc", "after"),
        ("?status=done", "status"),
    ] {
        let response = app.get(&format!("/events{query}")).await;
        assert_eq!(response.status(), 422, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["title"], "Invalid query parameter", "{query}");
        assert_eq!(body["errors"][0]["field"], field, "{query}");
    }
    for query in ["?limit=1&limit=2", "?colour=red", "?after=1&sort=asc"] {
        let response = app.get(&format!("/events{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["title"], "Bad request", "{query}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .starts_with("invalid query string"),
            "{body}"
        );
    }
    // A value echoed back is cut to 128 bytes.
    let long = "x".repeat(1000);
    let body: Value = app
        .get(&format!("/events?status={long}"))
        .await
        .json()
        .await
        .unwrap();
    assert!(body["detail"].as_str().unwrap().len() < 300, "{body}");
}
