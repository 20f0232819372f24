//! The worker pool: passes, outcomes, permits, and what sinks did not write.

use std::time::Duration;

use super::*;
use crate::config::{PipelineSettings, TransformKind};
use crate::event::{Event, EventId, PublishedEvent};
use crate::pipeline::transform::{Transform, TransformChain, TransformContext, TransformError};
use crate::testkit;

use crate::feed::MemoryFeed;
use crate::pipeline::{Ingested, PipelineParts};
use crate::queue::MemoryQueue;
use crate::sink::{Publications, PublishError, Sink, SinkError};
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
    async fn publish(&self, publications: Publications<'_>) -> Result<(), PublishError> {
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
        transforms: vec![TransformKind::Uppercase],
        ..testkit::test_settings().pipeline
    };
    let store = Arc::new(MemoryStore::new(&testkit::store_settings()));
    Pipeline::new(
        settings,
        PipelineParts {
            backpressure: None,
            feed: Arc::new(MemoryFeed::new(store.clone(), 1000)),
            store,
            queue: MemoryQueue::new(capacity),
            sinks,
            chain: Some(chain),
            write_deadline: None,
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
        if pipeline.store().get(&id).await.unwrap().map(|r| r.status()) == Some(status) {
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
            .ingest(event(id, payload), TraceId::random())
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
            .ingest(event(id, "x"), TraceId::random())
            .await
            .unwrap();
    }
    assert_eq!(pipeline.backpressure().in_use(), 2);
    assert!(matches!(
        pipeline.ingest(event("c", "x"), TraceId::random()).await,
        Err(crate::pipeline::IngestError::Overloaded)
    ));
    assert!(
        pipeline
            .store()
            .get(&EventId::parse("c").unwrap())
            .await
            .unwrap()
            .is_none(),
        "nothing stored on 503"
    );
    let workers = pipeline.start_workers();
    wait_for(&pipeline, "b", Status::Processed).await;
    assert_eq!(pipeline.backpressure().in_use(), 0);
    let accepted = pipeline
        .ingest(event("c", "x"), TraceId::random())
        .await
        .unwrap();
    let Ingested::Accepted(record) = accepted else {
        panic!("expected an accepted event");
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let published = pipeline
        .wait_published(&record, deadline)
        .await
        .unwrap()
        .unwrap();
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
        .ingest(event("dup", "d"), TraceId::random())
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
            .ingest(event(&format!("s{i}"), "x"), TraceId::random())
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

/// Writes the first this many events of every pass, then fails.
#[derive(Debug)]
struct Partial(usize);

#[async_trait::async_trait]
impl Sink for Partial {
    fn name(&self) -> &'static str {
        "partial"
    }
    async fn publish(&self, publications: Publications<'_>) -> Result<(), PublishError> {
        if publications.len() <= self.0 {
            return Ok(());
        }
        Err(PublishError {
            written: self.0,
            error: SinkError::Closed("partial"),
        })
    }
    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test]
async fn events_a_sink_did_not_write_fail_and_the_rest_are_published() {
    let metrics = Metrics::new(&["partial"]);
    let pipeline = pipeline_with_metrics(
        TransformChain::new(Vec::new()),
        10,
        vec![Arc::new(Partial(2))],
        metrics.clone(),
    );
    // Queued before the workers start: one pass of five.
    let mut records = Vec::new();
    for id in ["a", "b", "c", "d", "e"] {
        match pipeline.ingest(event(id, "x"), TraceId::random()).await {
            Ok(Ingested::Accepted(record)) => records.push(record),
            other => panic!("{other:?}"),
        }
    }
    let mut subscription = pipeline.feed().subscribe(Some(0), usize::MAX);
    let workers = pipeline.start_workers();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut outcomes = Vec::new();
    for record in &records {
        let outcome = pipeline.wait_published(record, deadline).await.unwrap();
        outcomes.push(outcome.is_ok());
    }
    assert_eq!(outcomes, [true, true, false, false, false]);
    let failed = pipeline
        .store()
        .get(&records[4].event.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.status(), Status::Failed);
    assert!(
        matches!(failed.outcome(), Some(crate::store::Outcome::Failed { error }) if error.contains("sink `partial` is closed")),
        "{failed:?}"
    );
    assert_eq!(pipeline.sink_failures(), 3);
    // Only the written ones are on the feed, numbered 1 and 2.
    let items = subscription.next().await.unwrap();
    let published: Vec<u64> = items
        .iter()
        .map(|item| match item {
            crate::feed::FeedItem::Event { publish_seq, .. } => *publish_seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(published, [1, 2]);
    assert_eq!(pipeline.backpressure().in_use(), 0, "every permit back");
    pipeline.close_queue();
    workers.stopped().await;
    let text = metrics.render(crate::telemetry::metrics::PipelineSnapshot::default());
    for series in [
        "eventflow_events_published_total{sink=\"partial\"} 2",
        "eventflow_publish_errors_total{sink=\"partial\"} 3",
        "eventflow_events_processed_total{outcome=\"ok\"} 2",
        "eventflow_events_processed_total{outcome=\"error\"} 3",
        "eventflow_events_published_total{sink=\"sse\"} 2",
        "eventflow_events_accepted_total 5",
    ] {
        assert!(
            text.lines().any(|l| l == series),
            "{series} not in:\n{text}"
        );
    }
}

#[tokio::test]
async fn a_later_sink_is_offered_only_what_the_earlier_ones_wrote() {
    let recorder = Arc::new(Recorder::default());
    let metrics = Metrics::new(&["partial", "recorder"]);
    let pipeline = pipeline_with_metrics(
        TransformChain::new(Vec::new()),
        10,
        vec![Arc::new(Partial(2)), recorder.clone()],
        metrics.clone(),
    );
    for id in ["a", "b", "c", "d"] {
        pipeline
            .ingest(event(id, "x"), TraceId::random())
            .await
            .unwrap();
    }
    let workers = pipeline.start_workers();
    pipeline.close_queue();
    workers.stopped().await;
    let seen: Vec<u64> = recorder.0.lock().unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seen,
        [1, 2],
        "the events the first sink did not write are not offered"
    );
    let text = metrics.render(crate::telemetry::metrics::PipelineSnapshot::default());
    for series in [
        "eventflow_events_published_total{sink=\"recorder\"} 2",
        "eventflow_publish_errors_total{sink=\"recorder\"} 2",
        "eventflow_events_processed_total{outcome=\"error\"} 2",
    ] {
        assert!(
            text.lines().any(|l| l == series),
            "{series} not in:\n{text}"
        );
    }
}
