//! Hot-path micro-benchmarks: decode + validate, the transform chain,
//! publish serialization, and store inserts under contention.
//!
//! Run: `cargo bench --bench pipeline`. Figures and machine: docs/performance.md.

// Bench code: a failed unwrap aborts the benchmark, which is what we want.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventflow::config::{PipelineSettings, StoreSettings, TransformKind};
use eventflow::event::{Event, EventId, JsonWriter, PublishedEvent, decode_array, decode_event};
use eventflow::feed::MemoryFeed;
use eventflow::pipeline::transform::{TransformChain, TransformContext};
use eventflow::pipeline::{Pipeline, PipelineParts};
use eventflow::queue::MemoryQueue;
use eventflow::sink::StdoutSink;
use eventflow::store::{CompleteWith, Insert, MemoryStore, Processing, Store};
use eventflow::telemetry::metrics::Metrics;
use eventflow::testkit;
use eventflow::time::UnixNanos;
use eventflow::trace_id::TraceId;
use futures_util::FutureExt;

/// The service's allocator (src/main.rs), so that allocation costs match.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PAYLOAD_100: &str =
    "user signed in from web client; plan=pro; region=eu-west-1; ab=checkout-v2; ok";

fn body(id: &str, payload: &str) -> Vec<u8> {
    serde_json::json!({"id": id, "timestamp": 1_700_000_000, "payload": payload})
        .to_string()
        .into_bytes()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_validate");
    group.throughput(Throughput::Elements(1));
    let valid = body("evt-000123", PAYLOAD_100);
    group.bench_function("valid_100B", |b| {
        b.iter(|| decode_event(black_box(&valid), 65_536).unwrap())
    });
    let invalid = br#"{"id":"","timestamp":1.5,"payload":5,"extra":1}"#;
    group.bench_function("invalid_slow_path", |b| {
        b.iter(|| decode_event(black_box(invalid), 65_536).unwrap_err())
    });
    group.finish();

    // A batch body as the load generator sends it, per event.
    let mut group = c.benchmark_group("decode_validate_batch");
    group.throughput(Throughput::Elements(1000));
    let events: Vec<String> = (0..1000)
        .map(|i| String::from_utf8(body(&format!("lg-0123abcd-{i}"), PAYLOAD_100)).unwrap())
        .collect();
    let array = format!("[{}]", events.join(","));
    group.bench_function("array_1000x100B", |b| {
        b.iter(|| {
            let decoded = decode_array(black_box(array.as_bytes()), 65_536, 10_000).unwrap();
            assert_eq!(decoded.valid.len(), 1000);
            decoded
        })
    });
    group.finish();
}

fn published(payload: &str) -> PublishedEvent {
    PublishedEvent {
        id: EventId::parse("evt-000123").unwrap(),
        timestamp: 1_700_000_000,
        payload: payload.to_owned(),
        metadata: None,
    }
}

fn transform(c: &mut Criterion) {
    let mut group = c.benchmark_group("transform_chain");
    group.throughput(Throughput::Elements(1));
    let chain = TransformChain::from_kinds(&[TransformKind::Uppercase, TransformKind::Enrich]);
    let trace = TraceId::random();
    let ctx = TransformContext {
        worker: 1,
        sequence: 42,
        received_at: SystemTime::now(),
        processed_at: SystemTime::now(),
        queue_wait: Duration::from_micros(120),
        trace_id: trace,
    };
    let non_ascii = "Grüße aus der Straße, ﬁnal ✓ ".repeat(3);
    for (name, payload) in [
        ("ascii_100B", PAYLOAD_100),
        ("unicode_100B", non_ascii.as_str()),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || published(payload),
                |mut event| {
                    chain.apply(&mut event, &ctx).unwrap();
                    event
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    let mut group = c.benchmark_group("publish_serialize");
    group.throughput(Throughput::Elements(1));
    let mut event = published(PAYLOAD_100);
    chain.apply(&mut event, &ctx).unwrap();
    // One line on its own, next to serde_json's generic path for the same
    // value; and what a worker pass does for the events of one request,
    // which share their metadata but for the sequence.
    group.bench_function("enriched_100B", |b| b.iter(|| black_box(&event).to_json()));
    let mut lines = JsonWriter::default();
    let mut next = event.clone();
    group.bench_function("enriched_100B_same_request", |b| {
        b.iter(|| {
            if let Some(m) = &mut next.metadata {
                m.sequence += 1;
            }
            lines.write(black_box(&next))
        })
    });
    group.bench_function("enriched_100B_serde_json", |b| {
        b.iter(|| serde_json::to_string(black_box(&event)).unwrap())
    });
    group.finish();
}

fn event(n: u64) -> Event {
    Event {
        id: EventId::parse(&format!("evt-{n:012}")).unwrap(),
        timestamp: 1_700_000_000,
        payload: PAYLOAD_100.into(),
    }
}

fn store_insert(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_insert");
    group.throughput(Throughput::Elements(1));
    for threads in [1_u64, 2, 4] {
        // One store at the default bound for all samples: once full it
        // evicts, as a long-running service's store does.
        let store = Arc::new(MemoryStore::new(&StoreSettings {
            max_bytes: 1 << 32,
            ..testkit::store_settings()
        }));
        let next = Arc::new(AtomicU64::new(0));
        group.bench_with_input(
            BenchmarkId::new("threads", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let per_thread = iters.div_ceil(threads);
                    // Build events outside the timed region.
                    let batches: Vec<Vec<Event>> = (0..threads)
                        .map(|_| {
                            (0..per_thread)
                                .map(|_| event(next.fetch_add(1, Ordering::Relaxed)))
                                .collect()
                        })
                        .collect();
                    let start = Instant::now();
                    std::thread::scope(|scope| {
                        for batch in batches {
                            let store = Arc::clone(&store);
                            scope.spawn(move || {
                                let received = SystemTime::now();
                                for event in batch {
                                    // The in-memory store never waits.
                                    let inserted = store
                                        .insert(event, received, TraceId::random())
                                        .now_or_never()
                                        .unwrap()
                                        .unwrap();
                                    let Insert::Inserted(record) = inserted else {
                                        panic!("every event is new");
                                    };
                                    // Processed, as a worker would, so that
                                    // eviction can make room.
                                    let processing = Processing {
                                        worker: 0,
                                        processed_at: UnixNanos::now(),
                                    };
                                    store
                                        .complete(&record, CompleteWith::Processed(processing))
                                        .now_or_never()
                                        .unwrap();
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );
    }
    group.finish();
}

/// Batches of 1,000 new events into a full store, completed as a worker
/// would: what a batch request costs the store per event, eviction included.
fn store_insert_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_insert_batch");
    group.throughput(Throughput::Elements(1000));
    let store = MemoryStore::new(&StoreSettings {
        max_bytes: 1 << 32,
        ..testkit::store_settings()
    });
    let processing = Processing {
        worker: 0,
        processed_at: UnixNanos::now(),
    };
    let mut next = 0;
    let mut new_events = || {
        let events: Vec<Event> = (next..next + 1000).map(event).collect();
        next += 1000;
        events
    };
    let insert_batch = |store: &MemoryStore, events: Vec<Event>| {
        let records: Vec<Arc<eventflow::store::Record>> = store
            .insert_batch(events, SystemTime::now(), TraceId::random())
            .now_or_never()
            .unwrap()
            .into_iter()
            .map(|inserted| match inserted {
                Ok(Insert::Inserted(record)) => record,
                other => panic!("every event is new: {other:?}"),
            })
            .collect();
        let completed: Vec<&eventflow::store::Record> = records.iter().map(|r| &**r).collect();
        store
            .complete_processed(&completed, processing)
            .now_or_never()
            .unwrap();
    };
    // Full before measuring, as a long-running service's store is.
    for _ in 0..1000 {
        insert_batch(&store, new_events());
    }
    group.bench_function("1000_into_full_store", |b| {
        b.iter_batched(
            &mut new_events,
            |events| insert_batch(&store, events),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// Settings for an in-process pipeline that never rejects in the benchmark.
/// The default pipeline settings, with one worker and a 1 GiB queue.
fn pipeline_settings() -> PipelineSettings {
    PipelineSettings {
        workers: 1,
        queue_max_bytes: 1 << 30,
        ..testkit::test_settings().pipeline
    }
}

/// Ingest → queue → worker → transform → stdout sink (to a discarding
/// writer), in process, with metrics recorded or not: the cost of metrics
/// on the hot path, per event.
fn pipeline_metrics_overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("pipeline_ingest_to_publish");
    const EVENTS: u64 = 2_000;
    group.throughput(Throughput::Elements(EVENTS));
    for (name, enabled) in [("metrics_off", false), ("metrics_on", true)] {
        let metrics = if enabled {
            Metrics::new(&["stdout"])
        } else {
            Metrics::disabled()
        };
        // One pipeline for all samples, its store bounded well below what a
        // run ingests: measured in the steady state of a full store, which
        // evicts, as a long-running service is.
        let store = Arc::new(MemoryStore::new(&StoreSettings {
            max_events: 100_000,
            max_bytes: 1 << 30,
        }));
        let pipeline = Pipeline::new(
            pipeline_settings(),
            PipelineParts {
                backpressure: None,
                feed: Arc::new(MemoryFeed::new(store.clone(), 100_000)),
                store,
                queue: MemoryQueue::new(1 << 16),
                sinks: vec![Arc::new(StdoutSink::with_writer(std::io::sink()))],
                chain: None,
                write_deadline: None,
                metrics: metrics.clone(),
            },
        );
        let workers = runtime.block_on(async { pipeline.start_workers() });
        let mut n = 0_u64;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..EVENTS {
                            pipeline.ingest(event(n), TraceId::random()).await.unwrap();
                            n += 1;
                        }
                        // Wait until every event of this round is published.
                        while pipeline.backpressure().in_use() > 0 {
                            tokio::task::yield_now().await;
                        }
                        // The service folds buffered histogram samples
                        // periodically; pay that cost here too.
                        metrics.run_upkeep();
                    }
                    start.elapsed()
                })
            })
        });
        pipeline.close_queue();
        runtime.block_on(workers.stopped());
    }
    group.finish();

    let mut group = c.benchmark_group("http_request_metric");
    group.throughput(Throughput::Elements(1));
    for (name, metrics) in [
        ("metrics_off", Metrics::disabled()),
        ("metrics_on", Metrics::new(&[])),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                metrics.http_request("POST", "/events", 202, Duration::from_micros(80));
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    decode,
    transform,
    store_insert,
    store_insert_batch,
    pipeline_metrics_overhead
);
criterion_main!(benches);
