//! The worker pool: N tasks that take events off the queue, run the
//! transform chain and publish the result.
//!
//! A worker works in passes: it takes whatever is waiting (up to
//! [`MAX_PASS_EVENTS`] events or [`MAX_PASS_BYTES`]), transforms each event, hands all of them to each
//! sink in one call, then records their outcomes. Per-pass costs (clock
//! reads, sink locks, wake-ups) are thus shared by every event of a batch
//! request, and by the single events of many requests under load.
//!
//! A worker stops only when the queue is closed and empty (that is the
//! drain at shutdown). A failing transform marks its event failed; a
//! panicking one is caught so that the worker lives on.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field};

use super::Pipeline;
use super::queue::QueuedEvents;
use crate::event::{JsonWriter, line_size_hint};
use crate::sink::{Publication, Publications, StreamLine, StreamMessage};
use crate::store::{CompleteWith, Processing, Record};
use crate::telemetry;
use crate::time::UnixNanos;

/// Handle on the running workers.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    tracker: TaskTracker,
    workers: usize,
}

impl WorkerPool {
    pub(super) fn start(pipeline: Pipeline, workers: usize) -> Self {
        let tracker = TaskTracker::new();
        for id in 0..workers {
            let pipeline = pipeline.clone();
            let worker = u32::try_from(id).unwrap_or(u32::MAX);
            tracker.spawn(run_worker(pipeline, worker));
        }
        tracker.close();
        Self { tracker, workers }
    }

    /// Waits until every worker has drained the closed queue and stopped.
    pub async fn stopped(&self) {
        self.tracker.wait().await;
    }

    /// Number of workers started.
    pub fn len(&self) -> usize {
        self.workers
    }

    /// Whether the pool has no workers.
    pub fn is_empty(&self) -> bool {
        self.workers == 0
    }
}

/// Most events a worker takes off the queue for one pass.
const MAX_PASS_EVENTS: usize = 1024;

/// Bytes of events (their pipeline footprint) past which a worker takes no
/// more for one pass: a pass renders all its lines into one buffer, and a
/// line can be several times its payload (JSON escapes), so a pass of large
/// events is bounded by bytes as well as by count. It takes items whole,
/// so a pass holds at most this plus one item ([`super::CHUNK_BYTES`] plus
/// one event).
const MAX_PASS_BYTES: usize = 1 << 20;

/// Counts a worker as live for as long as its task runs, however it ends.
struct Live<'a>(&'a AtomicUsize);

impl<'a> Live<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_worker(pipeline: Pipeline, worker: u32) {
    let _live = Live::new(&pipeline.inner.live_workers);
    tracing::debug!(worker, "worker started");
    let queue = &pipeline.inner.queue;
    let metrics = &pipeline.inner.metrics;
    while let Some(first) = queue.pop().await {
        if queue.is_empty() {
            // A trickle (single events, one per request): let the tasks that
            // are ready, requests mostly, run first, so that one pass takes
            // what they queue meanwhile, with this code and its data warm in
            // the cache, instead of one wake-up per request. With work
            // waiting, yielding would only let requests fill the queue faster
            // than passes empty it.
            tokio::task::yield_now().await;
        }
        let mut events = first.records.len();
        let mut bytes = first.permit.bytes();
        let mut taken = vec![first];
        while events < MAX_PASS_EVENTS && bytes < MAX_PASS_BYTES {
            let Some(next) = queue.try_pop() else { break };
            events += next.records.len();
            bytes += next.permit.bytes();
            taken.push(next);
        }
        let started = Instant::now();
        let mut untraced = Vec::with_capacity(events);
        let mut permits = Vec::with_capacity(taken.len());
        for queued in taken {
            let QueuedEvents {
                records,
                permit,
                enqueued_at,
                span,
            } = queued;
            metrics.queue_waited(
                started.saturating_duration_since(enqueued_at),
                records.len(),
            );
            if span.is_disabled() {
                untraced.extend(records);
            } else {
                // A traced request gets a `process_event` span per event.
                for record in &records {
                    let one = std::slice::from_ref(record);
                    process_guarded(&pipeline, worker, one, &span, Instant::now()).await;
                }
            }
            permits.push(permit);
        }
        if !untraced.is_empty() {
            let none = tracing::Span::none();
            process_guarded(&pipeline, worker, &untraced, &none, started).await;
        }
        // Only now do the events give their place in the pipeline back.
        drop(permits);
    }
    tracing::debug!(worker, "worker stopped: queue closed and drained");
}

/// Processes `records`; a panic outside the transforms (in a sink, say)
/// fails whichever of them had no outcome yet, and the worker lives on.
async fn process_guarded(
    pipeline: &Pipeline,
    worker: u32,
    records: &[Arc<Record>],
    ingest_span: &tracing::Span,
    started: Instant,
) {
    let processed = AssertUnwindSafe(process(pipeline, worker, records, ingest_span, started))
        .catch_unwind()
        .await;
    if processed.is_err() {
        for record in records.iter().filter(|r| r.outcome().is_none()) {
            tracing::error!(worker, event.id = %record.event.id, "processing panicked; event marked failed");
            fail(pipeline, record, PANICKED.into(), Duration::ZERO).await;
        }
    }
}

const PANICKED: &str = "processing panicked";

/// Transforms `records` (in arrival order), publishes those that passed to
/// every sink in one call each, then records their outcome.
async fn process(
    pipeline: &Pipeline,
    worker: u32,
    records: &[Arc<Record>],
    ingest_span: &tracing::Span,
    started: Instant,
) {
    let Some(first) = records.first() else {
        return;
    };
    // A child of the ingest span: an untraced request's events have none.
    // (A traced request's events come here one at a time.)
    let span = telemetry::child_span(ingest_span, || {
        tracing::debug_span!(
            "process_event",
            event.id = %first.event.id,
            event.sequence = first.sequence,
            worker,
            outcome = field::Empty,
        )
    });
    async {
        let inner = &pipeline.inner;
        let metrics = &inner.metrics;
        // One clock read each for the whole pass: its events are published
        // together.
        let processing = Processing {
            worker,
            processed_at: UnixNanos::now(),
        };
        let mut rendered = Vec::with_capacity(records.len());
        // The pass's JSON lines, one after another; `rendered` keeps where
        // each one is.
        let mut lines = String::with_capacity(
            records
                .iter()
                .map(|r| line_size_hint(&r.event.payload, r.event.id.as_str()) + 1)
                .sum(),
        );
        let mut writer = JsonWriter::default();
        for record in records {
            let transformed = telemetry::child_span(&span, || tracing::debug_span!("transform"))
                .in_scope(|| {
                    std::panic::catch_unwind(AssertUnwindSafe(|| {
                        pipeline.render(record, &processing)
                    }))
                });
            let error = match transformed {
                Ok(Ok(event)) => {
                    let start = lines.len();
                    writer.append(&event, &mut lines);
                    rendered.push((record, event, start..lines.len()));
                    lines.push('\n');
                    continue;
                }
                Ok(Err(error)) => {
                    tracing::warn!(event.id = %record.event.id, %error, "event failed processing");
                    error.to_string()
                }
                Err(_) => {
                    tracing::error!(worker, event.id = %record.event.id, "processing panicked; event marked failed");
                    PANICKED.into()
                }
            };
            span.record("outcome", "error");
            fail(pipeline, record, error, started.elapsed()).await;
        }
        if rendered.is_empty() {
            return;
        }
        // Moved, not copied: sinks may keep the lines after the pass.
        let lines = Arc::new(lines);
        let publications: Vec<Publication<'_>> = rendered
            .iter()
            .map(|(record, event, line)| Publication {
                event,
                sequence: record.sequence,
                json: &lines[line.clone()],
            })
            .collect();
        for sink in &inner.sinks {
            let published = sink
                .publish(Publications::new(&publications, &lines))
                .instrument(telemetry::child_span(&span, || {
                    tracing::debug_span!("publish", sink = sink.name())
                }))
                .await;
            metrics.sink_result(sink.name(), published.is_ok(), publications.len());
            if let Err(error) = published {
                tracing::error!(sink = sink.name(), %error, "publishing failed");
            }
            let lost = sink.take_lost();
            if lost > 0 {
                metrics.sink_result(sink.name(), false, lost);
            }
        }
        drop(publications);
        // Every event of the chunk became visible to the sinks just now.
        let processing_time = started.elapsed();
        metrics.events_processed(true, processing_time, rendered.len());
        let completed: Vec<&Record> = rendered.iter().map(|(record, _, _)| &***record).collect();
        let publish_seqs = inner.store.complete_processed(&completed, processing).await;
        drop(completed);
        // The events of one request were received together: one latency.
        // (Received → processing start is known without another clock read.)
        for received_together in rendered.chunk_by(|a, b| a.0.received_at == b.0.received_at) {
            let received_at = received_together[0].0.received_at;
            metrics.end_to_end(
                processing.processed_at.since(received_at) + processing_time,
                received_together.len(),
            );
        }
        let mut streamed = 0;
        let waited_for = inner.waiters.any();
        for ((record, event, line), publish_seq) in rendered.into_iter().zip(publish_seqs) {
            if let Some(publish_seq) = publish_seq
                && inner.broadcast.has_subscribers()
            {
                inner.broadcast.send(StreamMessage {
                    sequence: record.sequence,
                    publish_seq,
                    line: StreamLine::of(&lines[line], &record.event.id),
                });
                streamed += 1;
            }
            if waited_for {
                inner
                    .waiters
                    .notify(record.sequence, || Ok(Arc::new(event)));
            }
        }
        if streamed > 0 {
            metrics.sink_result("sse", true, streamed);
        }
        span.record("outcome", "ok");
    }
    .instrument(span.clone())
    .await;
}

/// Marks `record` failed and tells whoever waits for it.
async fn fail(pipeline: &Pipeline, record: &Record, error: String, processing: Duration) {
    let inner = &pipeline.inner;
    inner.metrics.events_processed(false, processing, 1);
    inner
        .store
        .complete(record, CompleteWith::Failed(error.clone()))
        .await;
    if inner.waiters.any() {
        inner.waiters.notify(record.sequence, || Err(error));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{PipelineSettings, StoreSettings, TransformKind};
    use crate::event::{Event, EventId, PublishedEvent};
    use crate::pipeline::transform::{Transform, TransformChain, TransformContext, TransformError};

    use crate::pipeline::{Ingested, MemoryQueue, PipelineParts};
    use crate::sink::{Sink, SinkError};
    use crate::store::{MemoryStore, Status};
    use crate::telemetry::metrics::Metrics;
    use crate::trace_id::TraceId;

    #[derive(Debug)]
    struct RejectEmpty;

    impl Transform for RejectEmpty {
        fn name(&self) -> &'static str {
            "reject_empty"
        }
        fn apply(
            &self,
            event: &mut PublishedEvent,
            _: &TransformContext,
        ) -> Result<(), TransformError> {
            if event.payload.is_empty() {
                return Err(TransformError {
                    transform: "reject_empty",
                    reason: "empty payload".into(),
                });
            }
            Ok(())
        }
    }

    #[derive(Debug)]
    struct PanicOnBoom;

    impl Transform for PanicOnBoom {
        fn name(&self) -> &'static str {
            "panic_on_boom"
        }
        fn apply(
            &self,
            event: &mut PublishedEvent,
            _: &TransformContext,
        ) -> Result<(), TransformError> {
            assert!(event.payload != "boom", "boom");
            Ok(())
        }
    }

    /// A sink that remembers what it was given, in order, and in how many calls.
    #[derive(Debug, Default)]
    struct Recorder(
        std::sync::Mutex<Vec<(u64, String)>>,
        std::sync::atomic::AtomicUsize,
    );

    #[async_trait::async_trait]
    impl Sink for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        async fn publish(&self, publications: Publications<'_>) -> Result<(), SinkError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut seen = self.0.lock().unwrap();
            seen.extend(
                publications
                    .events()
                    .iter()
                    .map(|p| (p.sequence, p.event.payload.clone())),
            );
            Ok(())
        }
        async fn flush(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    fn pipeline(chain: TransformChain, capacity: usize) -> Pipeline {
        pipeline_with_sinks(chain, capacity, Vec::new())
    }

    fn pipeline_with_sinks(
        chain: TransformChain,
        capacity: usize,
        sinks: Vec<Arc<dyn Sink>>,
    ) -> Pipeline {
        pipeline_with_metrics(chain, capacity, sinks, Metrics::disabled())
    }

    fn pipeline_with_metrics(
        chain: TransformChain,
        capacity: usize,
        sinks: Vec<Arc<dyn Sink>>,
        metrics: Metrics,
    ) -> Pipeline {
        let settings = PipelineSettings {
            workers: 1,
            queue_capacity: capacity,
            max_payload_bytes: 1024,
            max_batch: 100,
            transforms: vec![TransformKind::Uppercase],
            queue_max_bytes: 1 << 20,
        };
        let store = Arc::new(MemoryStore::new(&StoreSettings {
            max_events: 1000,
            max_bytes: 1 << 24,
        }));
        Pipeline::new(
            settings,
            PipelineParts {
                store,
                queue: MemoryQueue::new(capacity),
                sinks,
                chain: Some(chain),
                metrics,
            },
        )
    }

    fn event(id: &str, payload: &str) -> Event {
        Event {
            id: EventId::parse(id).unwrap(),
            timestamp: 1,
            payload: payload.into(),
        }
    }

    async fn wait_for(pipeline: &Pipeline, id: &str, status: Status) {
        let id = EventId::parse(id).unwrap();
        for _ in 0..500 {
            if pipeline.store().get(&id).await.map(|r| r.status()) == Some(status) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("{id} never reached {status:?}");
    }

    #[tokio::test]
    async fn a_failing_transform_marks_the_event_failed_and_the_worker_lives_on() {
        let chain = TransformChain::new(vec![Arc::new(RejectEmpty), Arc::new(PanicOnBoom)]);
        let pipeline = pipeline(chain, 10);
        let workers = pipeline.start_workers();
        for (id, payload) in [("empty", ""), ("boom", "boom"), ("fine", "fine")] {
            pipeline
                .ingest(event(id, payload), TraceId::random(), false)
                .await
                .unwrap();
        }
        wait_for(&pipeline, "empty", Status::Failed).await;
        wait_for(&pipeline, "boom", Status::Failed).await;
        wait_for(&pipeline, "fine", Status::Processed).await;
        assert_eq!(
            pipeline.backpressure().in_use(),
            0,
            "failed events release their permits"
        );
        pipeline.close_queue();
        workers.stopped().await;
    }

    #[tokio::test]
    async fn permits_are_released_only_after_publication() {
        let pipeline = pipeline(TransformChain::default(), 2);
        for id in ["a", "b"] {
            pipeline
                .ingest(event(id, "x"), TraceId::random(), false)
                .await
                .unwrap();
        }
        assert_eq!(pipeline.backpressure().in_use(), 2);
        assert!(matches!(
            pipeline
                .ingest(event("c", "x"), TraceId::random(), false)
                .await,
            Err(crate::pipeline::IngestError::Overloaded)
        ));
        assert!(
            pipeline
                .store()
                .get(&EventId::parse("c").unwrap())
                .await
                .is_none(),
            "nothing stored on 503"
        );
        let workers = pipeline.start_workers();
        wait_for(&pipeline, "b", Status::Processed).await;
        assert_eq!(pipeline.backpressure().in_use(), 0);
        let accepted = pipeline
            .ingest(event("c", "x"), TraceId::random(), true)
            .await
            .unwrap();
        let Ingested::Accepted {
            waiter: Some(waiter),
            ..
        } = accepted
        else {
            panic!("expected an accepted event with a waiter");
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let published = waiter.until(deadline).await.unwrap().unwrap();
        assert_eq!(published.id.as_str(), "c");
        assert_eq!(pipeline.live_workers(), workers.len());
        pipeline.close_queue();
        workers.stopped().await;
        assert_eq!(pipeline.live_workers(), 0, "stopped workers are not live");
    }

    #[tokio::test]
    async fn a_batch_is_published_in_order_in_chunks_and_gives_all_its_room_back() {
        let recorder = Arc::new(Recorder::default());
        let chain = TransformChain::new(vec![Arc::new(RejectEmpty), Arc::new(PanicOnBoom)]);
        let pipeline = pipeline_with_sinks(chain, 400, vec![recorder.clone()]);
        pipeline
            .ingest(event("dup", "d"), TraceId::random(), false)
            .await
            .unwrap();
        let payload = |i: usize| match i {
            10 => String::new(),
            100 => "boom".into(),
            _ => format!("p{i}"),
        };
        let mut batch: Vec<(usize, Event)> = (0..150)
            .map(|i| (i, event(&format!("e{i:03}"), &payload(i))))
            .collect();
        batch.push((150, event("dup", "d")));
        let outcome = pipeline
            .ingest_batch(batch, TraceId::random())
            .await
            .unwrap();
        assert_eq!((outcome.accepted, outcome.duplicates), (150, 1));
        assert!(outcome.rejected.is_empty());
        assert_eq!(
            pipeline.queue_depth(),
            151,
            "the queue counts events, not chunks"
        );
        assert_eq!(
            pipeline.backpressure().in_use(),
            151,
            "the duplicate's share was given back"
        );
        let workers = pipeline.start_workers();
        for _ in 0..500 {
            if pipeline.backpressure().in_use() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(pipeline.backpressure().in_use(), 0, "every share released");
        assert_eq!(pipeline.backpressure().bytes_in_use(), 0);
        assert_eq!(pipeline.queue_depth(), 0);
        wait_for(&pipeline, "e010", Status::Failed).await;
        wait_for(&pipeline, "e100", Status::Failed).await;
        wait_for(&pipeline, "e149", Status::Processed).await;
        let seen = recorder.0.lock().unwrap().clone();
        let expected: Vec<(u64, String)> = std::iter::once((1, "d".to_string()))
            .chain(
                (0..150)
                    .filter(|&i| i != 10 && i != 100)
                    .map(|i| (i as u64 + 2, payload(i))),
            )
            .collect();
        assert_eq!(seen, expected, "published once each, in arrival order");
        pipeline.close_queue();
        workers.stopped().await;
    }

    #[tokio::test]
    async fn events_waiting_for_a_worker_are_published_in_one_pass() {
        let recorder = Arc::new(Recorder::default());
        let pipeline = pipeline_with_sinks(TransformChain::default(), 100, vec![recorder.clone()]);
        for i in 0..10 {
            pipeline
                .ingest(event(&format!("s{i}"), "x"), TraceId::random(), false)
                .await
                .unwrap();
        }
        let workers = pipeline.start_workers();
        wait_for(&pipeline, "s9", Status::Processed).await;
        let seen: Vec<u64> = recorder.0.lock().unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(seen, (1..=10).collect::<Vec<u64>>());
        assert_eq!(
            recorder.1.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "ten queued requests, one sink write"
        );
        assert_eq!(pipeline.backpressure().in_use(), 0);
        pipeline.close_queue();
        workers.stopped().await;
    }

    /// Takes every event, then loses it (as a buffered write that fails later).
    #[derive(Debug, Default)]
    struct Leaky(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl Sink for Leaky {
        fn name(&self) -> &'static str {
            "leaky"
        }
        async fn publish(&self, publications: Publications<'_>) -> Result<(), SinkError> {
            self.0
                .fetch_add(publications.events().len(), Ordering::Relaxed);
            Ok(())
        }
        async fn flush(&self) -> Result<(), SinkError> {
            Ok(())
        }
        fn take_lost(&self) -> usize {
            self.0.swap(0, Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn events_a_sink_loses_after_taking_them_count_as_publish_errors() {
        let metrics = Metrics::new(&["leaky"]);
        let pipeline = pipeline_with_metrics(
            TransformChain::new(Vec::new()),
            10,
            vec![Arc::new(Leaky::default())],
            metrics.clone(),
        );
        let workers = pipeline.start_workers();
        for id in ["a", "b", "c"] {
            pipeline
                .ingest(event(id, "x"), TraceId::random(), false)
                .await
                .unwrap();
        }
        pipeline.close_queue();
        workers.stopped().await;
        // The last pass's losses are found by the final flush at the latest.
        pipeline.flush_sinks().await;
        let text = metrics.render(crate::telemetry::metrics::PipelineSnapshot::default());
        for series in [
            "eventflow_events_published_total{sink=\"leaky\"} 3",
            "eventflow_publish_errors_total{sink=\"leaky\"} 3",
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "{series} not in:\n{text}"
            );
        }
    }
}
