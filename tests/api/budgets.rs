//! Budgets that hold against any client: what the service builds, buffers
//! and echoes is bounded whatever is sent.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::binary;
use crate::helpers::{event, gzip, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_batch_answer_lists_at_most_100_rejections_each_echo_cut_to_128_bytes() {
    let app = spawn_app().await;
    // One valid event and 2,000 with over-long ids, gzipped: a small
    // request that once answered with every id in full.
    let mut ndjson = event("echo-ok", "x").to_string();
    for i in 0..2_000 {
        ndjson.push('\n');
        ndjson.push_str(&event(&format!("{i}-{}", "x".repeat(1_000)), "x").to_string());
    }
    let response = app
        .client
        .post(app.url("/events/batch"))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(gzip(ndjson.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer = response.bytes().await.unwrap();
    assert!(answer.len() < 64 * 1024, "{} bytes answered", answer.len());
    let body: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["rejected_total"], 2_000);
    let rejected = body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 100, "the first 100");
    assert_eq!(rejected[0]["index"], 1);
    for rejection in rejected {
        let id = rejection["id"].as_str().unwrap();
        assert!(id.len() <= 128 + "…".len(), "{} bytes echoed", id.len());
    }

    // None valid: a 422 that lists the first 100 too.
    let all_bad: Vec<Value> = (0..500).map(|i| json!({ "id": i })).collect();
    let response = app.post_batch(all_bad).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["errors"].as_array().unwrap().len(), 100);
    assert!(problem["detail"].as_str().unwrap().contains("first 100"));
}

#[tokio::test]
async fn an_event_with_a_huge_unknown_key_is_answered_in_a_few_hundred_bytes() {
    let app = spawn_app().await;
    let mut body = event("key-1", "x");
    body[&"k".repeat(900_000)] = json!(1);
    let response = app
        .post_raw(
            "/events",
            "application/json",
            gzip(body.to_string().as_bytes()),
        )
        .await;
    // (Not gzip-declared: the raw bytes are not JSON.)
    assert_eq!(response.status(), 400);
    let response = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(body.to_string().as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let answer = response.bytes().await.unwrap();
    assert!(answer.len() < 2_048, "{} bytes answered", answer.len());

    // Thousands of unknown keys: a bounded list.
    let mut body = event("key-2", "x");
    for i in 0..5_000 {
        body[&format!("k{i}")] = json!(i);
    }
    let response = app.post_event(&body).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["errors"].as_array().unwrap().len() <= 20,
        "{problem}"
    );
    assert!(problem.to_string().len() < 4_096);
}

#[tokio::test]
async fn a_page_is_bounded_in_bytes_and_next_goes_on_from_where_it_stopped() {
    let app = spawn_app_with(
        |s| {
            // An answers' budget of 3 MiB: a page holds at most a quarter of it.
            s.server.max_inflight_answer_bytes = 3 << 20;
        },
        Vec::new(),
    )
    .await;
    let payload = "ß".repeat(30_000); // 60 KB, 120 KB uppercased ("SS")
    app.post_published(40, &payload).await;
    let mut seen = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let response = app.get(&format!("/events?limit=1000&after={after}")).await;
        // (`after=` empty: from the start.)
        assert_eq!(response.status(), 200);
        let answer = response.bytes().await.unwrap();
        assert!(
            answer.len() <= (3 << 20) / 4 + 200_000,
            "a page of {} bytes",
            answer.len()
        );
        let page: Value = serde_json::from_slice(&answer).unwrap();
        for record in page["events"].as_array().unwrap() {
            seen.push(record["id"].as_str().unwrap().to_owned());
        }
        pages += 1;
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
        assert!(pages < 100);
    }
    assert!(pages >= 4, "{pages} pages");
    let expected: Vec<String> = (0..40).map(|i| format!("big-{i:02}")).collect();
    assert_eq!(seen, expected, "every event once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_in_one_byte_chunks_costs_about_its_size() {
    // A million 1-byte chunks take the debug build seconds to parse (8-10 s
    // on a quiet machine): this test is about memory, so time is not what
    // it may fail on.
    let service = binary::start(&[
        ("EVENTFLOW__PUBLISH__SINKS", ""),
        ("EVENTFLOW__PIPELINE__WORKERS", "1"),
        ("EVENTFLOW__SERVER__REQUEST_TIMEOUT", "300s"),
    ]);
    let before = service.peak_rss();
    // 8 clients at once each send a 128 KB NDJSON batch in 1-byte chunks.
    let line = format!("{}\n", event("c", &"y".repeat(900)));
    let body: Vec<u8> = line.repeat(128_000 / line.len()).into_bytes();
    let mut wire = Vec::with_capacity(body.len() * 6 + 5);
    for byte in &body {
        wire.extend_from_slice(b"1\r\n");
        wire.push(*byte);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let clients = (0..8).map(|_| {
        let wire = wire.clone();
        let addr = service.addr;
        tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(
                    b"POST /events/batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-ndjson\r\n\
                      transfer-encoding: chunked\r\n\r\n",
                )
                .await
                .unwrap();
            stream.write_all(&wire).await.unwrap();
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.unwrap();
            head
        })
    });
    for client in clients.collect::<Vec<_>>() {
        assert_eq!(&client.await.unwrap(), b"HTTP/1.1 202");
    }
    let grown = service.peak_rss().saturating_sub(before);
    eprintln!(
        "8 bodies of {} bytes in 1-byte chunks: peak RSS {} -> {} MiB",
        body.len(),
        before >> 20,
        service.peak_rss() >> 20
    );
    // Each byte kept as its own frame pinned a slice of a read buffer:
    // about 64 times the bodies' 1 MB. Coalesced, they cost about their
    // size (and the peak includes the service warming up).
    assert!(grown < 24 << 20, "peak RSS grew by {} MiB", grown >> 20);
}

/// `GET /events/stream` on a connection of its own; the status line's code
/// and the stream (still open when 200).
async fn raw_subscribe(
    addr: std::net::SocketAddr,
    last_event_id: Option<u64>,
) -> (u16, tokio::net::TcpStream) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let resume = last_event_id.map_or(String::new(), |id| format!("last-event-id: {id}\r\n"));
    stream
        .write_all(format!("GET /events/stream HTTP/1.1\r\nhost: x\r\n{resume}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    let code = std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap();
    (code, stream)
}

#[tokio::test]
async fn subscribers_have_their_own_cap_and_cannot_lock_out_ingest() {
    let app = spawn_app_with(
        |s| {
            s.server.max_connections = 4;
            s.server.max_subscribers = 2;
        },
        Vec::new(),
    )
    .await;
    let (first, first_stream) = raw_subscribe(app.addr, None).await;
    let (second, _second_stream) = raw_subscribe(app.addr, None).await;
    assert_eq!((first, second), (200, 200));
    let third = app.get("/events/stream").await;
    assert_eq!(third.status(), 503);
    assert!(third.headers().contains_key("retry-after"));
    let problem: Value = third.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "urn:eventflow:problem:too-many-subscribers"
    );
    // Requests still get connections and answers.
    for i in 0..20 {
        let response = app.post_event(&event(&format!("sub-{i}"), "x")).await;
        assert_eq!(response.status(), 202);
    }
    // A subscriber that leaves gives its place back.
    drop(first_stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (code, _stream) = raw_subscribe(app.addr, None).await;
        if code == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_replays_from_zero_does_not_stall_ingest() {
    let app = spawn_app().await;
    // Published before anyone subscribed: older than the feed's window of
    // lines, so a replay renders each one again from the store.
    let batch: Vec<Value> = (0..10_000)
        .map(|i| event(&format!("old-{i}"), &"p".repeat(2_000)))
        .collect();
    for chunk in batch.chunks(2_000) {
        assert_eq!(app.post_batch(chunk.to_vec()).await.status(), 202);
    }
    app.wait_until_idle().await;
    let baseline = ingest_median(&app, "base").await;
    let mut storm = Vec::new();
    for _ in 0..40 {
        let (code, mut stream) = raw_subscribe(app.addr, Some(0)).await;
        assert_eq!(code, 200);
        // Read (and drop) whatever comes, as a client catching up would.
        storm.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_secs(30), stream.read(&mut buf))
                    .await
            {
                if n == 0 {
                    break;
                }
            }
        }));
    }
    let during = ingest_median(&app, "storm").await;
    eprintln!("ingest median: {baseline:?} before, {during:?} during 40 replays of 10,000 events");
    // Against this machine's own pace: a stall (ingest waiting behind the
    // replays) is many times the baseline; the slack absorbs a busy
    // machine's noise on a sub-millisecond median.
    assert!(
        during <= baseline * 10 + std::time::Duration::from_millis(20),
        "ingest median {during:?} during the replays, {baseline:?} before"
    );
    for task in storm {
        task.abort();
    }
}

/// The median time of 50 single-event posts, one after another.
async fn ingest_median(app: &crate::helpers::TestApp, tag: &str) -> std::time::Duration {
    let mut times = Vec::new();
    for i in 0..50 {
        let started = std::time::Instant::now();
        let response = app.post_event(&event(&format!("{tag}-{i}"), "x")).await;
        assert_eq!(response.status(), 202);
        times.push(started.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}
