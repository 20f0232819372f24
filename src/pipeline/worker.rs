//! The worker pool: N tasks that take events off the queue, run the
//! transform chain and publish the result.
//!
//! A worker stops only when the queue is closed and empty (that is the
//! drain at shutdown). A failing transform marks its event failed; a
//! panicking one is caught so that the worker lives on.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field};

use super::Pipeline;
use super::queue::QueuedEvent;
use crate::sink::{Publication, StreamMessage};
use crate::store::{CompleteWith, Processing};
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

async fn run_worker(pipeline: Pipeline, worker: u32) {
    tracing::debug!(worker, "worker started");
    while let Some(item) = pipeline.inner.queue.pop().await {
        let record = Arc::clone(&item.record);
        let processed = AssertUnwindSafe(process(&pipeline, worker, item))
            .catch_unwind()
            .await;
        if processed.is_err() {
            tracing::error!(worker, event.id = %record.event.id, "processing panicked; event marked failed");
            pipeline
                .inner
                .metrics
                .event_processed(false, Default::default());
            pipeline
                .inner
                .store
                .complete(&record, CompleteWith::Failed("processing panicked".into()))
                .await;
            pipeline
                .inner
                .waiters
                .notify(record.sequence, || Err("processing panicked".into()));
        }
    }
    tracing::debug!(worker, "worker stopped: queue closed and drained");
}

async fn process(pipeline: &Pipeline, worker: u32, item: QueuedEvent) {
    let QueuedEvent {
        record,
        permit,
        enqueued_at,
        span: ingest_span,
    } = item;
    // A child of the ingest span: an untraced request's event has none.
    let span = telemetry::child_span(&ingest_span, || {
        tracing::debug_span!(
        "process_event",
        event.id = %record.event.id,
        event.sequence = record.sequence,
        worker,
        outcome = field::Empty,
        )
    });
    async {
        let inner = &pipeline.inner;
        let metrics = &inner.metrics;
        let started = Instant::now();
        let queue_wait = started.saturating_duration_since(enqueued_at);
        metrics.queue_waited(queue_wait);
        let processing = Processing {
            worker,
            processed_at: UnixNanos::now(),
        };
        let transformed = telemetry::child_span(&span, || tracing::debug_span!("transform"))
            .in_scope(|| pipeline.render(&record, &processing));
        let rendered = transformed
            .map(|event| {
                let json = event.to_json();
                (event, json)
            })
            .map_err(|e| e.to_string());
        let (event, json) = match rendered {
            Ok(rendered) => rendered,
            Err(error) => {
                span.record("outcome", "error");
                tracing::warn!(%error, "event failed processing");
                metrics.event_processed(false, started.elapsed());
                inner
                    .store
                    .complete(&record, CompleteWith::Failed(error.clone()))
                    .await;
                inner.waiters.notify(record.sequence, || Err(error));
                return;
            }
        };
        for sink in &inner.sinks {
            let publication = Publication {
                event: &event,
                sequence: record.sequence,
                json: &json,
            };
            let published = sink
                .publish(publication)
                .instrument(telemetry::child_span(&span, || {
                    tracing::debug_span!("publish", sink = sink.name())
                }))
                .await;
            metrics.sink_result(sink.name(), published.is_ok());
            if let Err(error) = published {
                tracing::error!(sink = sink.name(), %error, "publishing failed");
            }
        }
        let publish_seq = inner
            .store
            .complete(&record, CompleteWith::Processed(processing))
            .await;
        if let Some(publish_seq) = publish_seq
            && inner.broadcast.has_subscribers()
        {
            inner.broadcast.send(StreamMessage {
                sequence: record.sequence,
                publish_seq,
                json: Arc::from(json),
            });
            metrics.sink_result("sse", true);
        }
        // One clock read for both: received → processing start is known.
        let processing_time = started.elapsed();
        metrics.event_processed(true, processing_time);
        metrics.end_to_end(processing.processed_at.since(record.received_at) + processing_time);
        inner
            .waiters
            .notify(record.sequence, || Ok(Arc::new(event)));
        span.record("outcome", "ok");
    }
    .instrument(span.clone())
    .await;
    // Only now does the event give its place in the pipeline back.
    drop(permit);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{PipelineSettings, StoreSettings};
    use crate::event::{Event, EventId, PublishedEvent};
    use crate::pipeline::transform::{
        Transform, TransformChain, TransformContext, TransformError, TransformKind,
    };

    use crate::pipeline::{Ingested, MemoryQueue, PipelineParts};
    use crate::store::{MemoryStore, Status};
    use crate::telemetry::TraceId;
    use crate::telemetry::metrics::Metrics;

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

    fn pipeline(chain: TransformChain, capacity: usize) -> Pipeline {
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
                sinks: Vec::new(),
                chain: Some(chain),
                metrics: Metrics::disabled(),
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
        let published = waiter.await.unwrap().unwrap();
        assert_eq!(published.id.as_str(), "c");
        pipeline.close_queue();
        workers.stopped().await;
    }
}
