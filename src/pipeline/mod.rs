//! The ingest pipeline: admission (backpressure, counting), storage,
//! queueing, the worker pool that transforms and publishes, and the wait
//! for an event's publication.
//!
//! An event's path: [`admission`] (a [`Permit`], the store, the queue) →
//! [`worker`] (transforms, then every sink writes it) → the store records
//! the outcome → the published-events feed ([`crate::feed`]) gives it its
//! publication sequence, which SSE subscribers and `?wait=published` see.
//!
//! Invariant: an event is *accepted* only once it holds a [`Permit`], is in
//! the store, and is in the queue. The permit is released only after the
//! event was published (written by every sink) or failed, so accepted
//! always means "has a place in the pipeline" and shutdown can drain by
//! closing the queue.

pub mod admission;
mod batch;
mod handles;
mod retry;
pub mod transform;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio_util::task::TaskTracker;

use crate::config::PipelineSettings;
use crate::event::PublishedEvent;
use crate::feed::Feed;
use crate::queue::{Backpressure, Queue};
use crate::sink::Sink;
use crate::store::{Outcome, Processing, Record, Store};
use crate::telemetry::metrics::Metrics;

pub use admission::{Admission, IngestError, Ingested, RejectReason};
pub use batch::{BatchOutcome, BatchRejection};
pub use handles::{Reader, Writer};
pub use retry::{Retried, RetriedPage, RetryError};
pub use transform::{TransformChain, TransformContext, TransformError};
pub use worker::WorkerPool;

/// How often `?wait=published` asks the store again without a wake-up from
/// the feed.
const OUTCOME_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// How a wait for an event's publication ended: the published event, or
/// why it was not published.
pub type WaitOutcome = Result<PublishedEvent, String>;

/// The shared pipeline handle: cheap to clone.
#[derive(Debug, Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: PipelineSettings,
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    feed: Arc<dyn Feed>,
    backpressure: Backpressure,
    admission: Admission,
    chain: Arc<TransformChain>,
    sinks: Vec<Arc<dyn Sink>>,
    /// Closed at shutdown: new ingest requests are refused from then on.
    ingest_closed: AtomicBool,
    /// Ingest calls in progress; shutdown waits for them before closing the queue.
    ingest_calls: TaskTracker,
    /// Worker tasks running (a worker that died is not counted).
    live_workers: AtomicUsize,
    /// Accepted events that were not published because a sink failed.
    sink_failures: AtomicU64,
    /// How long an ingest call waits for the store and the queue.
    write_deadline: Option<std::time::Duration>,
    metrics: Metrics,
}

/// The components a pipeline is wired from.
#[derive(Debug)]
pub struct PipelineParts {
    /// Where accepted events are stored.
    pub store: Arc<dyn Store>,
    /// Between ingest and the workers.
    pub queue: Arc<dyn Queue>,
    /// Where published events are appended, in publication order.
    pub feed: Arc<dyn Feed>,
    /// Where processed events are published.
    pub sinks: Vec<Arc<dyn Sink>>,
    /// Room in the pipeline (`None`: sized from the settings). A backend
    /// that pulls deliveries shares it with ingest.
    pub backpressure: Option<Backpressure>,
    /// Transform chain (`None`: the one named in the settings).
    pub chain: Option<TransformChain>,
    /// How long an ingest call may wait for the store and the queue before
    /// it is answered 503 as a whole (`None`: no limit).
    pub write_deadline: Option<std::time::Duration>,
    /// Instrumentation.
    pub metrics: Metrics,
}

impl Pipeline {
    /// Wires a pipeline; workers are started separately.
    pub fn new(settings: PipelineSettings, parts: PipelineParts) -> Self {
        let backpressure = parts.backpressure.unwrap_or_else(|| {
            Backpressure::new(settings.queue_capacity, settings.queue_max_bytes)
        });
        let chain = parts
            .chain
            .unwrap_or_else(|| TransformChain::from_kinds(&settings.transforms));
        Self {
            inner: Arc::new(Inner {
                settings,
                store: parts.store,
                queue: parts.queue,
                feed: parts.feed,
                backpressure,
                admission: Admission::new(&parts.metrics),
                chain: Arc::new(chain),
                sinks: parts.sinks,
                ingest_closed: AtomicBool::new(false),
                ingest_calls: TaskTracker::new(),
                live_workers: AtomicUsize::new(0),
                sink_failures: AtomicU64::new(0),
                write_deadline: parts.write_deadline,
                metrics: parts.metrics,
            }),
        }
    }

    /// Starts `pipeline.workers` workers.
    pub fn start_workers(&self) -> WorkerPool {
        WorkerPool::start(self.clone(), self.inner.settings.workers)
    }

    /// The pipeline settings.
    pub fn settings(&self) -> &PipelineSettings {
        &self.inner.settings
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The published-events feed.
    pub fn feed(&self) -> &Arc<dyn Feed> {
        &self.inner.feed
    }

    /// Instrumentation.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The admission counters, for what a front end refuses itself.
    pub fn admission(&self) -> &Admission {
        &self.inner.admission
    }

    /// Admission state.
    pub fn backpressure(&self) -> &Backpressure {
        &self.inner.backpressure
    }

    /// The configured sinks.
    pub fn sinks(&self) -> &[Arc<dyn Sink>] {
        &self.inner.sinks
    }

    /// Why a sink cannot write, if one cannot: nothing accepted could be
    /// published, so readiness and ingest answer 503.
    pub fn broken_sink(&self) -> Option<String> {
        self.inner.sinks.iter().find_map(|sink| {
            Some(format!(
                "sink `{}` is broken: {}",
                sink.name(),
                sink.broken()?
            ))
        })
    }

    /// Accepted events that were not published because a sink failed.
    pub fn sink_failures(&self) -> u64 {
        self.inner.sink_failures.load(Ordering::Relaxed)
    }

    /// Runs the transform chain over `record` with the facts of a processing
    /// run; the workers publish what this returns, and readers of the store
    /// call it again to re-derive the published event (see [`Processing`]).
    pub fn render(
        &self,
        record: &Record,
        processing: &Processing,
    ) -> Result<PublishedEvent, TransformError> {
        render(&self.inner.chain, record, processing)
    }

    /// The narrow handle readers of stored and published events take.
    pub fn reader(&self) -> Reader {
        Reader::new(
            Arc::clone(&self.inner.store),
            Arc::clone(&self.inner.feed),
            Arc::clone(&self.inner.chain),
        )
    }

    /// The narrow handle the front end's write paths take.
    pub fn writer(&self) -> Writer {
        Writer::new(self.clone())
    }

    /// Worker tasks running now.
    pub fn live_workers(&self) -> usize {
        self.inner.live_workers.load(Ordering::Relaxed)
    }

    /// Events waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.inner.queue.len()
    }

    /// Whether ingest was closed for shutdown.
    pub fn is_draining(&self) -> bool {
        self.inner.ingest_closed.load(Ordering::Acquire)
    }

    /// Stops accepting new events; calls already in progress complete.
    pub fn close_ingest(&self) {
        self.inner.ingest_closed.store(true, Ordering::Release);
        self.inner.ingest_calls.close();
    }

    /// Waits until every ingest call in progress has returned.
    pub async fn ingest_idle(&self) {
        self.inner.ingest_calls.wait().await;
    }

    /// Closes the queue: workers drain what is left, then stop.
    pub fn close_queue(&self) {
        self.inner.queue.close();
    }

    /// Flushes every sink (at shutdown).
    pub async fn flush_sinks(&self) {
        for sink in &self.inner.sinks {
            if let Err(error) = sink.flush().await {
                tracing::error!(sink = sink.name(), %error, "flushing sink failed");
            }
        }
    }

    /// Waits until `record` is published or has failed (`?wait=published`),
    /// watching the feed and asking the store; `None` when `deadline`
    /// comes first.
    pub async fn wait_published(
        &self,
        record: &Record,
        deadline: tokio::time::Instant,
    ) -> Option<WaitOutcome> {
        let mut changes = self.inner.feed.changes();
        loop {
            // Seen before looking: an outcome set after the look wakes the wait.
            changes.borrow_and_update();
            if let Some(ended) = self.ended(record).await {
                return Some(ended);
            }
            // A failure recorded by another process wakes no local feed:
            // look again now and then as well.
            let wake = tokio::time::Instant::now() + OUTCOME_RECHECK;
            match tokio::time::timeout_at(deadline.min(wake), changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Some(Err("the pipeline stopped".into())),
                Err(_) if wake < deadline => {}
                Err(_) => return None,
            }
        }
    }

    /// How processing of `record` ended, if it has.
    async fn ended(&self, record: &Record) -> Option<WaitOutcome> {
        // The record's own outcome when it has one (in memory, the store's
        // record is this one): no call through the store on every wake-up.
        let outcome = match record.outcome() {
            Some(outcome) => outcome.clone(),
            None => self.inner.store.outcome(record).await?,
        };
        match outcome {
            Outcome::Processed {
                worker,
                processed_at,
            } => {
                let processing = Processing {
                    worker,
                    processed_at,
                };
                Some(self.render(record, &processing).map_err(|e| e.to_string()))
            }
            Outcome::Failed { error } => Some(Err(error.to_string())),
        }
    }
}

/// Runs `chain` over `record` with the facts of a processing run.
pub(super) fn render(
    chain: &TransformChain,
    record: &Record,
    processing: &Processing,
) -> Result<PublishedEvent, TransformError> {
    let ctx = TransformContext {
        worker: processing.worker,
        sequence: record.sequence,
        received_at: record.received_at.into(),
        processed_at: processing.processed_at.into(),
        queue_wait: processing.processed_at.since(record.received_at),
        trace_id: record.trace_id,
    };
    let mut event = PublishedEvent {
        id: record.event.id.clone(),
        timestamp: record.event.timestamp,
        payload: record.event.payload.to_string(),
        metadata: None,
    };
    chain.apply(&mut event, &ctx)?;
    Ok(event)
}
