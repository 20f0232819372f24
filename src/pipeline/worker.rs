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
use tracing::field;

use super::Pipeline;
use crate::queue::{Attempt, QueuedEvents, Verdict};
use crate::store::Record;
use crate::telemetry;

mod pass;

use pass::{PANICKED, Pass, fail};

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
        // Empty while every untraced event is a first and only attempt (an
        // in-process queue): no per-event bookkeeping then.
        let mut untraced_attempts: Vec<Attempt> = Vec::new();
        let mut held = Vec::with_capacity(taken.len());
        for queued in taken {
            let QueuedEvents {
                records,
                delivery,
                permit,
                enqueued_at,
                span,
            } = queued;
            metrics.queue_waited(
                started.saturating_duration_since(enqueued_at),
                records.len(),
            );
            let verdicts = if span.is_disabled() {
                let from = untraced.len();
                if !delivery.attempts.is_empty() {
                    untraced_attempts.resize(from, Attempt::default());
                    untraced_attempts.extend((0..records.len()).map(|i| delivery.attempt(i)));
                }
                untraced.extend(records);
                Verdicts::Untraced(from..untraced.len())
            } else {
                // A traced request gets a `process_event` span per event.
                let mut verdicts = Vec::with_capacity(records.len());
                for (i, record) in records.iter().enumerate() {
                    let one = std::slice::from_ref(record);
                    let attempt = [delivery.attempt(i)];
                    let verdict =
                        process_guarded(&pipeline, worker, one, &attempt, &span, Instant::now())
                            .await;
                    verdicts.extend(verdict);
                }
                Verdicts::Traced(verdicts)
            };
            held.push((delivery, permit, verdicts));
        }
        let untraced_verdicts = if untraced.is_empty() {
            Vec::new()
        } else {
            if !untraced_attempts.is_empty() {
                untraced_attempts.resize(untraced.len(), Attempt::default());
            }
            let none = tracing::Span::none();
            process_guarded(
                &pipeline,
                worker,
                &untraced,
                &untraced_attempts,
                &none,
                started,
            )
            .await
        };
        // Only now are the events acknowledged, and give their place in the
        // pipeline back.
        for (delivery, permit, verdicts) in held {
            let verdicts = match &verdicts {
                Verdicts::Untraced(range) => untraced_verdicts.get(range.clone()).unwrap_or(&[]),
                Verdicts::Traced(verdicts) => verdicts,
            };
            delivery.settle(verdicts).await;
            drop(permit);
        }
    }
    tracing::debug!(worker, "worker stopped: queue closed and drained");
}

/// Where a queue item's verdicts are.
enum Verdicts {
    /// In the pass's untraced verdicts, at these positions.
    Untraced(std::ops::Range<usize>),
    /// Its own (its events were processed one at a time).
    Traced(Vec<Verdict>),
}

/// Processes `records` (`attempts`: one per record, or empty when each is
/// a first and only attempt); a panic outside the transforms (in a sink,
/// say) fails whichever of them had no outcome yet, and the worker lives
/// on. One verdict per record.
async fn process_guarded(
    pipeline: &Pipeline,
    worker: u32,
    records: &[Arc<Record>],
    attempts: &[Attempt],
    ingest_span: &tracing::Span,
    started: Instant,
) -> Vec<Verdict> {
    let processed = AssertUnwindSafe(process(
        pipeline,
        worker,
        records,
        attempts,
        ingest_span,
        started,
    ))
    .catch_unwind()
    .await;
    match processed {
        Ok(verdicts) => verdicts,
        Err(_) => {
            for record in records.iter().filter(|r| r.outcome().is_none()) {
                tracing::error!(worker, event.id = %record.event.id, "processing panicked; event marked failed");
                fail(pipeline, record, PANICKED.into(), Duration::ZERO).await;
            }
            pipeline.inner.feed.outcomes_changed();
            vec![Verdict::Done; records.len()]
        }
    }
}

/// Processes `records` in one pass (see [`pass`]): transforms them in
/// arrival order, hands those that passed to every sink in one call each,
/// and records their outcome: published (in the store, then on the feed)
/// where every sink wrote them, failed where one did not.
async fn process(
    pipeline: &Pipeline,
    worker: u32,
    records: &[Arc<Record>],
    attempts: &[Attempt],
    ingest_span: &tracing::Span,
    started: Instant,
) -> Vec<Verdict> {
    let Some(first) = records.first() else {
        return Vec::new();
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
    Pass::new(pipeline, worker, records, attempts, span, started)
        .run()
        .await
}

#[cfg(test)]
mod tests;
