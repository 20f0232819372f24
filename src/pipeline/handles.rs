//! The narrow handles the front end holds: a [`Reader`] for lookups, pages
//! and the SSE stream, a [`Writer`] for ingest. Neither can start, drain or
//! stop the pipeline; the app's drain holds the whole [`Pipeline`].

use std::sync::Arc;

use super::{
    Admission, BatchOutcome, IngestError, Ingested, Pipeline, Retried, RetriedPage, RetryError,
    TransformChain, TransformError, WaitOutcome,
};
use crate::config::PipelineSettings;
use crate::event::{Event, EventId, PublishedEvent};
use crate::feed::Feed;
use crate::store::{Record, Store};
use crate::telemetry::metrics::{Metrics, PipelineSnapshot};
use crate::trace_id::TraceId;

/// What readers of stored and published events need (lookups, pages, the
/// SSE stream): the store, the feed, and the published form of a
/// processed record. The API's read paths hold this, not the pipeline.
#[derive(Debug, Clone)]
pub struct Reader {
    store: Arc<dyn Store>,
    feed: Arc<dyn Feed>,
    chain: Arc<TransformChain>,
}

impl Reader {
    pub(super) fn new(
        store: Arc<dyn Store>,
        feed: Arc<dyn Feed>,
        chain: Arc<TransformChain>,
    ) -> Self {
        Self { store, feed, chain }
    }

    /// The store of accepted events.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The published-events feed.
    pub fn feed(&self) -> &Arc<dyn Feed> {
        &self.feed
    }

    /// Times `record`'s event was queued for processing.
    pub fn attempts(&self, record: &Record) -> u32 {
        self.store.attempts(record)
    }

    /// The published event of a processed record (`None` while pending or
    /// when it failed), rendered again from what the store keeps.
    pub fn published(&self, record: &Record) -> Option<Result<PublishedEvent, TransformError>> {
        let processing = record.outcome()?.processing()?;
        Some(super::render(&self.chain, record, &processing))
    }
}

/// What the write paths need (ingest, batches, `?wait=published`, readiness,
/// the state `/metrics` samples): the pipeline's front door only.
#[derive(Debug, Clone)]
pub struct Writer {
    pipeline: Pipeline,
}

impl Writer {
    pub(super) fn new(pipeline: Pipeline) -> Self {
        Self { pipeline }
    }

    /// Accepts one event (or recognises a retry), counting it.
    pub async fn ingest(&self, event: Event, trace_id: TraceId) -> Result<Ingested, IngestError> {
        self.pipeline.ingest(event, trace_id).await
    }

    /// Accepts the valid events of a batch, all of the new ones or none.
    pub async fn ingest_batch(
        &self,
        events: Vec<(usize, Event)>,
        trace_id: TraceId,
    ) -> Result<BatchOutcome, IngestError> {
        self.pipeline.ingest_batch(events, trace_id).await
    }

    /// Puts the failed event `id` back in the backlog.
    pub async fn retry(&self, id: &EventId) -> Result<Retried, RetryError> {
        self.pipeline.retry(id).await
    }

    /// Puts up to `limit` failed events after arrival sequence `after` back
    /// in the backlog.
    pub async fn retry_failed(&self, after: u64, limit: usize) -> Result<RetriedPage, IngestError> {
        self.pipeline.retry_failed(after, limit).await
    }

    /// Waits until `record` is published or has failed; `None` when
    /// `deadline` comes first.
    pub async fn wait_published(
        &self,
        record: &Record,
        deadline: tokio::time::Instant,
    ) -> Option<WaitOutcome> {
        self.pipeline.wait_published(record, deadline).await
    }

    /// The admission counters, for what the front end refuses itself.
    pub fn admission(&self) -> &Admission {
        self.pipeline.admission()
    }

    /// The pipeline settings (limits the front end checks first).
    pub fn settings(&self) -> &PipelineSettings {
        self.pipeline.settings()
    }

    /// Instrumentation.
    pub fn metrics(&self) -> &Metrics {
        self.pipeline.metrics()
    }

    /// Why nothing accepted now could be published, if so: `sink_broken`
    /// or `backend_unavailable`, and the detail (readiness answers 503).
    pub fn unavailable(&self) -> Option<(&'static str, String)> {
        match self.pipeline.broken_sink() {
            Some(detail) => Some(("sink_broken", detail)),
            None => self
                .pipeline
                .store()
                .unavailable()
                .map(|detail| ("backend_unavailable", detail)),
        }
    }

    /// The pipeline's state as `/metrics` reports it, with each sink's
    /// `eventflow_sink_up` brought up to date.
    pub fn snapshot(&self) -> PipelineSnapshot {
        let pipeline = &self.pipeline;
        for sink in pipeline.sinks() {
            pipeline
                .metrics()
                .sink_up(sink.name(), sink.broken().is_none());
        }
        PipelineSnapshot {
            queue_depth: pipeline.queue_depth(),
            queue_capacity: pipeline.backpressure().capacity(),
            inflight: pipeline.backpressure().in_use(),
            store_events: pipeline.store().len(),
            store_evictions: pipeline.store().evictions(),
            sse_subscribers: pipeline.feed().subscribers(),
            workers: pipeline.live_workers(),
            subscriptions: Vec::new(),
        }
    }
}
