//! Readers cannot deny writers: answers draw on their own budget
//! (`server.max_inflight_answer_bytes`), a subscriber holds at most its
//! buffer (`server.subscriber_buffer_bytes`), one client address holds at
//! most `server.max_connections_per_client` connections, and a token
//! guesser spends its address's rate. Each case is run the way a hostile
//! client would, with a well-behaved writer beside it whose answers are
//! counted. Other loopback addresses (127.0.0.2, …) stand for other clients.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::binary;
use crate::helpers::{TestApp, event, spawn_app_with};

/// A connection to `addr` from `from`, with a small receive buffer, so
/// that an answer it does not read stays in the service.
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(addr).await
}

/// A client on its own loopback address.
pub(crate) fn client_from(from: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(from))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A well-behaved writer: `n` single events from its own address, one after
/// another; how many were answered 2xx.
pub(crate) async fn writer_successes(
    client: &reqwest::Client,
    addr: SocketAddr,
    tag: &str,
    n: usize,
) -> usize {
    let mut ok = 0;
    for i in 0..n {
        let response = client
            .post(format!("http://{addr}/events"))
            .json(&event(&format!("{tag}-{i}"), "x"))
            .send()
            .await;
        if response.is_ok_and(|r| r.status().is_success()) {
            ok += 1;
        }
    }
    ok
}

/// Polls `GET path` until it is answered `status` (bounded).
async fn until_answered(app: &TestApp, path: &str, status: u16) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = app.get(path).await;
        if response.status() == status {
            return response;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never answered {status} (last {})",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_never_read_take_only_the_answers_budget_never_a_writers_place() {
    let app = spawn_app_with(|s| s.server.max_inflight_answer_bytes = 4 << 20, Vec::new()).await;
    // 40 events of 64 KiB of U+0001: answers of 384 KiB an event (`\u0001`).
    let payload = "\u{1}".repeat(64 * 1024);
    app.post_published(40, &payload).await;
    // Readers ask for full pages, pipeline lookups, or replay the stream,
    // and never read past the head. What the kernel's socket buffers take
    // leaves the service; the rest is held against the answers' budget,
    // until a reader is refused at once.
    let (readers, refusal) = until_refused(app.addr, 300, |n| match n % 3 {
        0 => "GET /events?limit=1000 HTTP/1.1\r\nhost: x\r\n\r\n".to_owned(),
        1 => "GET /events/big-00 HTTP/1.1\r\nhost: x\r\n\r\n".repeat(2),
        _ => "GET /events/stream HTTP/1.1\r\nhost: x\r\nlast-event-id: 0\r\n\r\n".to_owned(),
    })
    .await;
    assert!(refusal.contains("retry-after: 1"), "{refusal}");
    assert!(
        refusal.contains("server.max_inflight_answer_bytes"),
        "{refusal}"
    );
    // A writer never is.
    let writer = client_from([127, 0, 0, 2]);
    assert_eq!(writer_successes(&writer, app.addr, "writer", 50).await, 50);
    let batch: Vec<Value> = (0..100)
        .map(|i| event(&format!("batch-{i}"), "x"))
        .collect();
    let response = writer
        .post(app.url("/events/batch"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // Readers that leave give their share back.
    drop(readers);
    until_answered(&app, "/events?limit=1000", 200).await;
    until_answered(&app, "/events/big-00", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollers_that_never_read_take_only_the_answers_budget_and_hand_their_leases_back() {
    let app = spawn_app_with(
        |s| s.server.max_inflight_answer_bytes = 16 << 20,
        Vec::new(),
    )
    .await;
    let created = app
        .client
        .put(app.url("/subscriptions/hoard"))
        .json(&json!({"start": "earliest", "ack_timeout": "1h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // 400 events of 64 KiB of U+0001: 384 KiB each in a poll's answer.
    let payload = "\u{1}".repeat(64 * 1024);
    app.post_published(400, &payload).await;
    // Consumers lease ten events a poll and never read the answer: what
    // the kernel's socket buffers take leaves the service, the rest is
    // held against the answers' budget, until a poll is refused at once.
    let (pollers, refusal) = until_refused(app.addr, 40, |_| {
        "POST /subscriptions/hoard/poll?max=10&wait=5s HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
            .to_owned()
    })
    .await;
    assert!(refusal.contains("retry-after: 1"), "{refusal}");
    assert!(
        refusal.contains("server.max_inflight_answer_bytes"),
        "{refusal}"
    );
    // A writer never is refused for it.
    let writer = client_from([127, 0, 0, 2]);
    assert_eq!(writer_successes(&writer, app.addr, "writer", 50).await, 50);
    // The refused poll's leases went back: nothing it leased is in flight.
    let state: Value = app.get("/subscriptions/hoard").await.json().await.unwrap();
    assert_eq!(
        state["in_flight"].as_u64().unwrap(),
        10 * pollers.len() as u64,
        "{state}"
    );
    // Pollers that leave give their share back.
    drop(pollers);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = app
            .client
            .post(app.url("/subscriptions/hoard/poll?max=2"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "polls never answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens connections that send `request(n)` and never read past the
/// answer's head, until one is refused with 503 (at most `max`): the ones
/// answered 200, still open, and the refusal's text.
pub(crate) async fn until_refused(
    addr: SocketAddr,
    max: usize,
    request: impl Fn(usize) -> String,
) -> (Vec<TcpStream>, String) {
    let mut held = Vec::new();
    loop {
        assert!(held.len() < max, "the answers' budget never ran out");
        let mut stream = connect_from([127, 0, 0, 1], addr).await.unwrap();
        stream
            .write_all(request(held.len()).as_bytes())
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        if &head == b"HTTP/1.1 200" {
            held.push(stream);
            continue;
        }
        assert_eq!(&head, b"HTTP/1.1 503", "{}", String::from_utf8_lossy(&head));
        return (held, read_problem(&mut stream).await);
    }
}

/// The rest of an answer whose head was read, up to its problem's end.
async fn read_problem(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"}") {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the problem ended");
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// `GET /events/stream` from `Last-Event-ID: 0` on a connection that never
/// reads; the connection, once its head says 200.
async fn silent_subscriber(addr: SocketAddr) -> TcpStream {
    let mut stream = connect_from([127, 0, 0, 1], addr).await.unwrap();
    stream
        .write_all(b"GET /events/stream HTTP/1.1\r\nhost: x\r\nlast-event-id: 0\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_hold_their_buffer_however_large_the_events() {
    let service = binary::start(&[
        ("EVENTFLOW__PUBLISH__SINKS", ""),
        ("EVENTFLOW__PIPELINE__WORKERS", "2"),
    ]);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    // 300 events of 64 KiB of U+0001: 384 KiB each as JSON (`\u0001`).
    let payload = "\u{1}".repeat(64 * 1024);
    for i in 0..300 {
        let response = client
            .post(format!("http://{}/events", service.addr))
            .json(&json!({ "id": format!("wide-{i}"), "timestamp": 1, "payload": payload }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while service
        .metric(&client, "eventflow_events_published_total{sink=\"sse\"}")
        .await
        != Some(300.0)
    {
        assert!(Instant::now() < deadline, "300 events never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = service.rss();
    // Eight subscribers replay all 300 and never read a byte.
    let mut subscribers = Vec::new();
    for _ in 0..8 {
        subscribers.push(silent_subscriber(service.addr).await);
    }
    // Until the service's memory stops growing: a second without a new peak.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut peak = service.peak_rss();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = service.peak_rss();
        if now == peak || Instant::now() > deadline {
            break;
        }
        peak = now;
    }
    // A writer is served all along.
    let writer = client_from([127, 0, 0, 2]);
    assert_eq!(writer_successes(&writer, service.addr, "w", 20).await, 20);
    let grown = service.peak_rss().saturating_sub(before);
    eprintln!(
        "8 silent subscribers over 300 events of 384 KiB: RSS {} MiB, peak after {} MiB",
        before >> 20,
        service.peak_rss() >> 20
    );
    // Each: its 1 MiB buffer, hyper's 64 KiB, a message being rendered; and
    // the allocator's slack. Rendering everything it replays held ~100 MiB
    // a subscriber.
    assert!(grown < 48 << 20, "RSS grew by {} MiB", grown >> 20);
    drop(subscribers);
}

#[tokio::test]
async fn one_client_address_cannot_hold_the_connections_of_the_others() {
    let app = spawn_app_with(
        |s| {
            s.server.max_connections = 50;
            s.server.max_subscribers = 10;
            s.server.max_connections_per_client = 10;
            s.server.trusted_proxies = vec!["127.0.0.3/32".parse().unwrap()];
        },
        Vec::new(),
    )
    .await;
    // A client that opens 100 connections and keeps them.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(connect_from([127, 0, 0, 1], app.addr).await.unwrap());
    }
    // (Asked from another address: this one holds its ten.)
    let observer = client_from([127, 0, 0, 4]);
    let refused = || async {
        let text = observer
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("eventflow_connections_refused_total "))
            .and_then(|value| value.parse::<f64>().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused().await < Some(90.0) {
        assert!(
            Instant::now() < deadline,
            "its connections were not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The last one was refused with a problem, and closed.
    let mut refusal = String::new();
    let mut last = held.pop().unwrap();
    tokio::time::timeout(Duration::from_secs(30), last.read_to_string(&mut refusal))
        .await
        .unwrap()
        .unwrap();
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(refusal.contains("too-many-connections"), "{refusal}");
    // Another client is served, every time.
    let writer = client_from([127, 0, 0, 2]);
    assert_eq!(writer_successes(&writer, app.addr, "other", 20).await, 20);
    // A trusted proxy speaks for many clients: it is not capped.
    let mut proxied = Vec::new();
    for _ in 0..15 {
        let mut stream = connect_from([127, 0, 0, 3], app.addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        proxied.push(stream);
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guesser_spends_its_own_rate_and_a_token_holder_is_served() {
    let tokens: Vec<String> = (0..100_000)
        .map(|i| format!("token-{i:08}-abcdefghijklmnop"))
        .collect();
    let app = spawn_app_with(
        |s| {
            s.auth.tokens = tokens.iter().map(|t| t.clone().into()).collect();
            s.server.rate_limit_per_second = 10;
        },
        Vec::new(),
    )
    .await;
    let guesser = client_from([127, 0, 0, 1]);
    let addr = app.addr;
    let guessing = tokio::spawn(async move {
        let mut answers = std::collections::BTreeMap::<u16, usize>::new();
        for i in 0..500 {
            let response = guesser
                .post(format!("http://{addr}/events"))
                .bearer_auth(format!("guess-{i:08}-abcdefghijklmnop"))
                .json(&event(&format!("guess-{i}"), "x"))
                .send()
                .await
                .unwrap();
            *answers.entry(response.status().as_u16()).or_default() += 1;
        }
        answers
    });
    let holder = client_from([127, 0, 0, 2]);
    let mut ok = 0;
    // Within its rate: ten a second.
    for i in 0..10 {
        let response = holder
            .post(app.url("/events"))
            .bearer_auth(&tokens[99_999])
            .json(&event(&format!("held-{i}"), "x"))
            .send()
            .await
            .unwrap();
        if response.status().is_success() {
            ok += 1;
        }
    }
    let answers = guessing.await.unwrap();
    assert_eq!(ok, 10, "the token holder was refused");
    // Only 401 and 429, and most are 429: its rate was spent.
    assert_eq!(
        answers.keys().copied().collect::<Vec<_>>(),
        [401, 429],
        "{answers:?}"
    );
    assert!(answers[&429] >= 250, "{answers:?}");
}
