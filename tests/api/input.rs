//! Unicode, number and framing edge cases: each gets the status the
//! document gives it, with a problem body, and never a panic.

use serde_json::Value;

use crate::binary;
use crate::helpers::{TestApp, gzip, spawn_app, spawn_app_with};

/// Posts raw bytes to `path` as `content_type`; the status and body.
async fn post(app: &TestApp, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = app.post_raw(path, content_type, body).await;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn numbers_zero_and_out_of_range() {
    let app = spawn_app().await;
    let json = "application/json";
    // `-0` is a JSON integer: 0.
    let (status, body) = post(
        &app,
        "/events",
        json,
        br#"{"id":"neg-zero","timestamp":-0,"payload":"x"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let record: Value = app.get("/events/neg-zero").await.json().await.unwrap();
    assert_eq!(record["timestamp"], 0);
    // A duplicated key is refused, `-0` or not.
    let (status, _) = post(
        &app,
        "/events",
        json,
        br#"{"id":"dup-a","timestamp":-0,"payload":"x","id":"dup-b"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 422);
    // `-0.0` is a float: refused like any.
    let (status, _) = post(
        &app,
        "/events",
        json,
        br#"{"id":"neg-zero-f","timestamp":-0.0,"payload":"x"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 422);
    // Valid JSON no number type holds: 422, not 400.
    for number in ["1e400".to_owned(), "9".repeat(5_000)] {
        let body = format!(r#"{{"id":"big","timestamp":{number},"payload":"x"}}"#);
        let (status, problem) = post(&app, "/events", json, body.into_bytes()).await;
        assert_eq!(status, 422, "{problem}");
        assert!(problem.to_string().len() < 1_024);
    }
}

#[tokio::test]
async fn charsets_other_than_utf8_are_refused_with_415() {
    let app = spawn_app().await;
    let body = br#"{"id":"cs-1","timestamp":1,"payload":"x"}"#.to_vec();
    let (status, problem) = post(
        &app,
        "/events",
        "application/json; charset=latin1",
        body.clone(),
    )
    .await;
    assert_eq!(status, 415);
    assert!(problem["detail"].as_str().unwrap().contains("latin1"));
    let (status, _) = post(&app, "/events", "application/json; charset=\"UTF-8\"", body).await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn unicode_edge_cases() {
    let app = spawn_app_with(|s| s.pipeline.max_payload_bytes = 10, Vec::new()).await;
    let json = "application/json";
    // Invalid UTF-8 inside a string: not JSON text.
    let mut body = br#"{"id":"u-1","timestamp":1,"payload":""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#""}"#);
    assert_eq!(post(&app, "/events", json, body).await.0, 400);
    // A lone surrogate escape is no character.
    let body = br#"{"id":"u-2","timestamp":1,"payload":"\ud800"}"#.to_vec();
    assert_eq!(post(&app, "/events", json, body).await.0, 400);
    // NUL is fine in a payload, not in an id (a control character).
    let body = br#"{"id":"u-3","timestamp":1,"payload":"a\u0000b"}"#.to_vec();
    assert_eq!(post(&app, "/events", json, body).await.0, 202);
    let body = br#"{"id":"u-\u0000","timestamp":1,"payload":"x"}"#.to_vec();
    let (status, problem) = post(&app, "/events", json, body).await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["field"], "id");
    // A right-to-left mark is a format character, not a control one.
    let body = "{\"id\":\"u-\u{200f}rtl\",\"timestamp\":1,\"payload\":\"x\"}";
    assert_eq!(post(&app, "/events", json, body.into()).await.0, 202);
    // A 4-byte character that ends exactly at the limit, and one past it.
    let at = "{\"id\":\"u-5\",\"timestamp\":1,\"payload\":\"aaaaaa\u{1F600}\"}".to_owned();
    assert_eq!(post(&app, "/events", json, at.into()).await.0, 202);
    let past = "{\"id\":\"u-6\",\"timestamp\":1,\"payload\":\"aaaaaaa\u{1F600}\"}".to_owned();
    let (status, problem) = post(&app, "/events", json, past.into()).await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["field"], "payload");
}

#[tokio::test]
async fn ndjson_framing_and_broken_gzip() {
    let app = spawn_app().await;
    let ndjson = "application/x-ndjson";
    // CRLF line ends, and a last line without one.
    let body = "{\"id\":\"f-1\",\"timestamp\":1,\"payload\":\"x\"}\r\n\
                {\"id\":\"f-2\",\"timestamp\":1,\"payload\":\"x\"}\r\n\
                {\"id\":\"f-3\",\"timestamp\":1,\"payload\":\"x\"}";
    let (status, answer) = post(&app, "/events/batch", ndjson, body.into()).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 3);
    // A gzip body cut short does not inflate: 400.
    let whole = gzip(b"{\"id\":\"f-4\",\"timestamp\":1,\"payload\":\"x\"}\n");
    let cut = whole[..whole.len() / 2].to_vec();
    let response = app
        .client
        .post(app.url("/events/batch"))
        .header("content-type", ndjson)
        .header("content-encoding", "gzip")
        .body(cut)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn long_client_strings_are_echoed_cut_to_128_bytes() {
    let app = spawn_app().await;
    let long = "w".repeat(5_000);
    let response = app
        .post_raw(
            &format!("/events?wait={long}"),
            "application/json",
            r#"{"id":"w-1","timestamp":1,"payload":"x"}"#,
        )
        .await;
    assert_eq!(response.status(), 422);
    assert!(response.text().await.unwrap().len() < 1_024);
    let response = app.get(&format!("/events/{long}")).await;
    assert_eq!(response.status(), 404);
    assert!(response.text().await.unwrap().len() < 1_024);
    let response = app.post_raw("/events", &format!("text/{long}"), "x").await;
    assert_eq!(response.status(), 415);
    assert!(response.text().await.unwrap().len() < 1_024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_413_and_memory_stays_flat() {
    let service = binary::start(&[("EVENTFLOW__PUBLISH__SINKS", "")]);
    let before = service.peak_rss();
    // 256 MB of zeros in ~1.2 MB, against a 16 MiB batch limit.
    let bomb = tokio::task::spawn_blocking(|| gzip(&vec![0u8; 256 << 20]))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let send = |n: usize| {
        let (client, bomb) = (client.clone(), bomb.clone());
        let url = format!("http://{}/events/batch", service.addr);
        async move {
            for _ in 0..n {
                let response = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .header("content-encoding", "gzip")
                    .body(bomb.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 413);
            }
        }
    };
    send(4).await;
    let after_4 = service.peak_rss();
    send(12).await;
    let after_16 = service.peak_rss();
    eprintln!(
        "gzip bombs of {} bytes (256 MiB inflated): peak RSS {} MiB, +{} MiB after 4, +{} MiB more after 12 more",
        bomb.len(),
        before >> 20,
        after_4.saturating_sub(before) >> 20,
        after_16.saturating_sub(after_4) >> 20,
    );
    // Each is inflated only up to the 16 MiB limit, in 64 KiB chunks, so
    // the peak is a few inflations' worth (what the allocator keeps)...
    assert!(
        after_4.saturating_sub(before) < 96 << 20,
        "peak RSS grew by {} MiB for 4 bombs",
        after_4.saturating_sub(before) >> 20
    );
    // ...and does not grow with the number of bombs (growing one buffer,
    // 4 bombs left 110 MiB behind, and each one more).
    assert!(
        after_16.saturating_sub(after_4) < 24 << 20,
        "peak RSS grew by {} MiB more for 12 more bombs",
        after_16.saturating_sub(after_4) >> 20
    );
}
