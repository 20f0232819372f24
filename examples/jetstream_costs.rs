//! What JetStream mechanisms cost nats-server per event: the measurements
//! behind the nats backend's layout (docs/performance.md, "The nats
//! backend: choosing the mechanisms"). One scenario per run, against a
//! fresh nats-server whose monitoring port and pid it is given; prints the
//! JetStream messages in and out per event and nats-server's CPU per event.
//!
//! ```sh
//! scripts/bench.sh jetstream     # every scenario, each on a fresh server
//! cargo run --release --example jetstream_costs -- SCENARIO EVENTS [BATCH] \
//!     --url nats://127.0.0.1:4222 --monitor 8222 --pid PID
//! ```
//!
//! Scenarios: `earlier` (the layout before this one: an events stream with a
//! subject per id, a delivery and an ack per event, a publication with a
//! subject per id), `ids` (a record per id, `Nats-Expected-Last-Subject-
//! Sequence: 0`, acks awaited per batch), `ids-atomic` (the same as one
//! atomic batch), `published` (a subject per publication and the same
//! expectation), `published-processed` (the same and the service's
//! `Eventflow-Processed` header), `published-subject` (a subject per
//! publication, no header), `published-plain` (one subject, no header),
//! `published-msgid` (one subject, `Nats-Msg-Id`), `published-fast` (as
//! `published`, in fast-ingest batches of BATCH, four at once), `chunks` (BATCH events
//! per work-queue message, delivered and acked). `--max-bytes N` bounds the
//! streams (when full, each write also drops the oldest message);
//! `--memory` keeps them in nats-server's memory instead of files.

use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// nats-server's CPU time so far, in clock ticks (100 a second).
fn cpu_ticks(pid: u32) -> Result<u64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .ok_or("no command in /proc/PID/stat")?
        .1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// nats-server's messages in and out so far.
async fn varz(monitor: u16) -> Result<(u64, u64), Error> {
    let varz: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{monitor}/varz"))
        .await?
        .json()
        .await?;
    Ok((
        varz["in_msgs"].as_u64().unwrap_or(0),
        varz["out_msgs"].as_u64().unwrap_or(0),
    ))
}

fn key(i: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("evt-{i:012}"))
}

/// An event's JSON, with a 150-byte payload.
fn body(i: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"id\":\"evt-{i:012}\",\"timestamp\":1700000000,\"payload\":\"{}\"}}",
        "x".repeat(150)
    ))
}

async fn fresh(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream, Error> {
    let _ = js.delete_stream(&config.name).await;
    Ok(js.create_stream(config).await?)
}

/// Streams' byte bound: `--max-bytes` (a small one makes every write
/// also drop the oldest message, as a full history does), else 8 GiB.
static MAX_BYTES: std::sync::OnceLock<i64> = std::sync::OnceLock::new();

/// `--memory`: the streams keep their messages in nats-server's memory.
static MEMORY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// `--async`: the streams' files are written behind the acks
/// (`persist_mode: async`, nats-server 2.12+) instead of before each.
static ASYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn stream(name: &str, subjects: &str) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        max_bytes: *MAX_BYTES.get().unwrap_or(&(8 << 30)),
        storage: if MEMORY.get().copied().unwrap_or(false) {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        persist_mode: ASYNC
            .get()
            .copied()
            .unwrap_or(false)
            .then_some(stream::PersistenceMode::Async),
        ..Default::default()
    }
}

/// Publishes `n` messages made by `message`, `batch` at a time, each
/// batch's acks awaited together.
async fn publish_all(
    js: &jetstream::Context,
    n: u64,
    batch: u64,
    message: impl Fn(u64) -> (String, PublishMessage),
) -> Result<(), Error> {
    let mut i = 0;
    while i < n {
        let mut acks = Vec::new();
        for _ in 0..batch.min(n - i) {
            let (subject, publish) = message(i);
            acks.push(js.send_publish(subject, publish).await?);
            i += 1;
        }
        for ack in acks {
            ack.await?;
        }
    }
    Ok(())
}

/// One atomic batch of `messages` (ADR-50): the first a request, the
/// middle ones without a reply, the last committing with a pub ack.
async fn atomic(
    client: &async_nats::Client,
    js: &jetstream::Context,
    id: &str,
    messages: Vec<(String, HeaderMap, Bytes)>,
) -> Result<(), Error> {
    let n = messages.len();
    for (index, (subject, mut headers, payload)) in messages.into_iter().enumerate() {
        headers.insert("Nats-Batch-Id", id);
        headers.insert("Nats-Batch-Sequence", (index + 1).to_string().as_str());
        if index + 1 == n {
            headers.insert("Nats-Batch-Commit", "1");
            let publish = PublishMessage::build().payload(payload).headers(headers);
            js.send_publish(subject, publish).await?.await?;
        } else if index == 0 {
            let reply = client
                .request_with_headers(subject, headers, payload)
                .await?;
            if !reply.payload.is_empty() {
                return Err(String::from_utf8_lossy(&reply.payload).into());
            }
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await?;
        }
    }
    Ok(())
}

/// Fast-ingest batches (ADR-50, nats-server 2.14+, `allow_batched`) of
/// `batch` messages, `FAST_IN_FLIGHT` at once: the first message waits for
/// the server's flow ack, the rest follow without waiting, the last
/// commits; one pub ack a batch instead of one a message.
async fn fast(
    client: &async_nats::Client,
    n: u64,
    batch: u64,
    message: impl Fn(u64) -> (String, HeaderMap, Bytes) + Send + Sync + 'static,
) -> Result<(), Error> {
    const FAST_IN_FLIGHT: u64 = 4;
    let message = std::sync::Arc::new(message);
    let batches = n.div_ceil(batch);
    let mut tasks = Vec::new();
    for lane in 0..FAST_IN_FLIGHT {
        let client = client.clone();
        let message = std::sync::Arc::clone(&message);
        tasks.push(tokio::spawn(async move {
            let inbox = client.new_inbox();
            let mut replies = client.subscribe(format!("{inbox}.>")).await?;
            let mut b = lane;
            while b < batches {
                let first = b * batch;
                let last = n.min(first + batch) - 1;
                for i in first..=last {
                    let seq = i - first + 1;
                    let op = if i == last {
                        2
                    } else if seq == 1 {
                        0
                    } else {
                        1
                    };
                    let reply = format!("{inbox}.b{b}.{batch}.fail.{seq}.{op}.$FI");
                    let (subject, headers, payload) = message(i);
                    client
                        .publish_with_reply_and_headers(subject, reply, headers, payload)
                        .await?;
                    if seq == 1 && i != last {
                        let answer = replies.next().await.ok_or("no flow ack")?;
                        if !answer.payload.starts_with(br#"{"type":"ack""#) {
                            return Err(String::from_utf8_lossy(&answer.payload).into());
                        }
                    }
                }
                loop {
                    let answer = replies.next().await.ok_or("no pub ack")?;
                    let text = String::from_utf8_lossy(&answer.payload);
                    if text.contains("\"error\"") || text.contains(r#""type":"err""#) {
                        return Err(text.into());
                    }
                    if !text.contains(r#""type""#) {
                        break;
                    }
                }
                b += FAST_IN_FLIGHT;
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

fn expect_new() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    headers
}

async fn scenario(
    name: &str,
    n: u64,
    batch: u64,
    client: &async_nats::Client,
    js: &jetstream::Context,
) -> Result<(), Error> {
    match name {
        "earlier" => {
            let events = fresh(js, stream("EARLIER_EVENTS", "earlier.events.>")).await?;
            fresh(js, stream("EARLIER_PUBLISHED", "earlier.published.>")).await?;
            let consumer = events
                .create_consumer(pull::Config {
                    durable_name: Some("workers".into()),
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: 20_000,
                    ..Default::default()
                })
                .await?;
            let worker_js = js.clone();
            let worker = tokio::spawn(async move {
                let mut messages = consumer
                    .stream()
                    .max_messages_per_batch(256)
                    .messages()
                    .await?;
                let mut acks = Vec::new();
                for _ in 0..n {
                    let message = messages.next().await.ok_or("the pull ended")??;
                    let key = message
                        .subject
                        .as_str()
                        .rsplit('.')
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    let publish = PublishMessage::build()
                        .payload(message.payload.clone())
                        .message_id(&key)
                        .expected_last_subject_sequence(0);
                    acks.push(
                        worker_js
                            .send_publish(format!("earlier.published.{key}"), publish)
                            .await?,
                    );
                    message.ack().await?;
                    if acks.len() >= 256 {
                        for ack in acks.drain(..) {
                            ack.await?;
                        }
                    }
                }
                for ack in acks {
                    ack.await?;
                }
                Ok::<(), Error>(())
            });
            publish_all(js, n, batch, |i| {
                let publish = PublishMessage::build()
                    .payload(body(i))
                    .expected_last_subject_sequence(0);
                (format!("earlier.events.{}", key(i)), publish)
            })
            .await?;
            worker.await??;
        }
        "ids" => {
            fresh(js, stream("IDS", "ids.>")).await?;
            publish_all(js, n, batch, |i| {
                let publish = PublishMessage::build()
                    .payload(body(i))
                    .expected_last_subject_sequence(0);
                (format!("ids.{}", key(i)), publish)
            })
            .await?;
        }
        "ids-atomic" => {
            let mut config = stream("IDS", "ids.>");
            config.allow_atomic_publish = true;
            fresh(js, config).await?;
            let mut i = 0;
            while i < n {
                let messages = (i..n.min(i + batch))
                    .map(|i| (format!("ids.{}", key(i)), expect_new(), body(i)))
                    .collect();
                atomic(client, js, &format!("b{i}"), messages).await?;
                i += batch;
            }
        }
        "published" => {
            fresh(js, stream("PUBLISHED", "published.>")).await?;
            publish_all(js, n, batch, |i| {
                let publish = PublishMessage::build()
                    .payload(body(i))
                    .expected_last_subject_sequence(0);
                (format!("published.{i}"), publish)
            })
            .await?;
        }
        "published-processed" => {
            fresh(js, stream("PUBLISHED", "published.>")).await?;
            publish_all(js, n, batch, |i| {
                let mut headers = expect_new();
                headers.insert("Eventflow-Processed", "3 1700000000123456789");
                let publish = PublishMessage::build().payload(body(i)).headers(headers);
                (format!("published.{i}"), publish)
            })
            .await?;
        }
        "published-fast" => {
            let mut config = stream("PUBLISHED", "published.>");
            config.allow_batch_publish = true;
            fresh(js, config).await?;
            fast(client, n, batch, |i| {
                (format!("published.{i}"), expect_new(), body(i))
            })
            .await?;
        }
        "published-subject" => {
            fresh(js, stream("PUBLISHED", "published.>")).await?;
            publish_all(js, n, batch, |i| {
                let publish = PublishMessage::build().payload(body(i));
                (format!("published.{i}"), publish)
            })
            .await?;
        }
        "published-plain" => {
            fresh(js, stream("PUBLISHED", "published.>")).await?;
            publish_all(js, n, batch, |i| {
                (
                    "published.all".into(),
                    PublishMessage::build().payload(body(i)),
                )
            })
            .await?;
        }
        "published-msgid" => {
            fresh(js, stream("PUBLISHED", "published.>")).await?;
            publish_all(js, n, batch, |i| {
                let publish = PublishMessage::build()
                    .payload(body(i))
                    .message_id(i.to_string());
                ("published.all".into(), publish)
            })
            .await?;
        }
        "chunks" => {
            let mut config = stream("BACKLOG", "backlog");
            config.retention = stream::RetentionPolicy::WorkQueue;
            config.discard = stream::DiscardPolicy::New;
            let backlog = fresh(js, config).await?;
            let consumer = backlog
                .create_consumer(pull::Config {
                    durable_name: Some("workers".into()),
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                })
                .await?;
            let chunks = n / batch;
            let worker = tokio::spawn(async move {
                let mut messages = consumer
                    .stream()
                    .max_messages_per_batch(16)
                    .messages()
                    .await?;
                for _ in 0..chunks {
                    messages
                        .next()
                        .await
                        .ok_or("the pull ended")??
                        .ack()
                        .await?;
                }
                Ok::<(), Error>(())
            });
            // A chunk's JSON is about 250 bytes an event.
            let payload = Bytes::from(vec![b'x'; 250 * batch as usize]);
            publish_all(js, chunks, 64, |_| {
                (
                    "backlog".into(),
                    PublishMessage::build().payload(payload.clone()),
                )
            })
            .await?;
            worker.await??;
        }
        other => return Err(format!("unknown scenario `{other}`").into()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let positional: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || !args[i - 1].starts_with("--")))
        .map(|(_, a)| a)
        .collect();
    let name = positional
        .first()
        .ok_or("usage: SCENARIO EVENTS [BATCH] --url URL --monitor PORT --pid PID")?;
    let n: u64 = positional.get(1).map_or(Ok(100_000), |s| s.parse())?;
    let batch: u64 = positional.get(2).map_or(Ok(1000), |s| s.parse())?;
    let url = value("--url").unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let monitor: u16 = value("--monitor")
        .ok_or("--monitor PORT is required")?
        .parse()?;
    let pid: u32 = value("--pid").ok_or("--pid PID is required")?.parse()?;
    let _ = MEMORY.set(args.iter().any(|a| a == "--memory"));
    let _ = ASYNC.set(args.iter().any(|a| a == "--async"));
    if let Some(max_bytes) = value("--max-bytes") {
        let _ = MAX_BYTES.set(max_bytes.parse()?);
    }

    let client = async_nats::connect(&url).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(100_000)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let (in0, out0) = varz(monitor).await?;
    let cpu0 = cpu_ticks(pid)?;
    let started = Instant::now();
    scenario(name, n, batch, &client, &js).await?;
    let elapsed = started.elapsed();
    let cpu = cpu_ticks(pid)? - cpu0;
    let (in1, out1) = varz(monitor).await?;
    // The result is this tool's output: stdout, as a line.
    use std::io::Write as _;
    writeln!(
        std::io::stdout().lock(),
        "{name:16}{} batch {batch:5}: {n} events, {:.0}/s; nats-server {:.1} µs of CPU an event; \
         JetStream messages in {:.2} + out {:.2} an event",
        if MEMORY.get().copied().unwrap_or(false) {
            " (memory)"
        } else if ASYNC.get().copied().unwrap_or(false) {
            " (async)"
        } else {
            ""
        },
        n as f64 / elapsed.as_secs_f64(),
        cpu as f64 * 10_000.0 / n as f64,
        (in1 - in0) as f64 / n as f64,
        (out1 - out0) as f64 / n as f64,
    )?;
    Ok(())
}
