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
use super::queue::{Attempt, QueuedEvents, Verdict};
use crate::event::{JsonWriter, line_size_hint};
use crate::feed::Published;
use crate::sink::{Publication, Publications};
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

const PANICKED: &str = "processing panicked";

/// Transforms `records` (in arrival order), hands those that passed to
/// every sink in one call each, and records their outcome: published (in
/// the store, then on the feed) where every sink wrote them, failed where
/// one did not.
async fn process(
    pipeline: &Pipeline,
    worker: u32,
    records: &[Arc<Record>],
    attempts: &[Attempt],
    ingest_span: &tracing::Span,
    started: Instant,
) -> Vec<Verdict> {
    let mut verdicts = vec![Verdict::Done; records.len()];
    let Some(first) = records.first() else {
        return verdicts;
    };
    let attempt = |index: usize| attempts.get(index).copied().unwrap_or_default();
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
        let mut failed = 0;
        for (index, record) in records.iter().enumerate() {
            // A redelivered event may have been published before its
            // acknowledgement was lost: publish it at most once.
            if attempt(index).redelivered
                && inner.store.outcome(record).await.is_some()
            {
                tracing::debug!(event.id = %record.event.id, "redelivered event already processed");
                continue;
            }
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
                    rendered.push((index, record, event, start..lines.len()));
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
            failed += 1;
        }
        if failed > 0 {
            // Their waiters need not wait for the sinks to write the rest.
            inner.feed.outcomes_changed();
        }
        if rendered.is_empty() {
            return;
        }
        let retryable = |index: usize| attempt(index).retryable;
        // Moved, not copied: sinks may keep the lines while they write them.
        let lines = Arc::new(lines);
        let publications: Vec<Publication<'_>> = rendered
            .iter()
            .map(|(_, record, event, line)| Publication {
                event,
                sequence: record.sequence,
                json: &lines[line.clone()],
            })
            .collect();
        // Published: the events every sink wrote, from the pass's first. A
        // later sink is offered only what the earlier ones wrote: an event
        // one sink could not write is failed, and no other sink should
        // report it published.
        let mut offered: &[Publication<'_>] = &publications;
        let mut offered_lines = Arc::clone(&lines);
        let mut sink_error = None;
        for sink in &inner.sinks {
            if offered.is_empty() {
                metrics.sink_result(sink.name(), false, publications.len());
                continue;
            }
            let published = sink
                .publish(Publications::new(offered, &offered_lines))
                .instrument(telemetry::child_span(&span, || {
                    tracing::debug_span!("publish", sink = sink.name())
                }))
                .await;
            let by_this_sink = match published {
                Ok(()) => offered.len(),
                Err(error) => {
                    sink_error.get_or_insert_with(|| error.error.to_string());
                    error.written.min(offered.len())
                }
            };
            metrics.sink_result(sink.name(), true, by_this_sink);
            metrics.sink_result(sink.name(), false, publications.len() - by_this_sink);
            if by_this_sink < offered.len() {
                offered = &offered[..by_this_sink];
                // The written events' lines, newlines included (rare: a copy).
                let end = by_this_sink
                    .checked_sub(1)
                    .map_or(0, |last| rendered[last].3.end + 1);
                offered_lines = Arc::new(lines[..end].to_owned());
            }
        }
        let written = offered.len();
        drop(publications);
        let processing_time = started.elapsed();
        let (published, unpublished) = rendered.split_at(written);
        if let Some(error) = sink_error.filter(|_| !unpublished.is_empty()) {
            tracing::error!(
                events = unpublished.len(),
                %error,
                "events not published: a sink could not write them"
            );
            span.record("outcome", "error");
            let error = format!("not published: {error}");
            failed += give_up_or_retry(
                pipeline,
                unpublished.iter().map(|(index, record, _, _)| (*index, &***record)),
                &retryable,
                &error,
                processing_time,
                &mut verdicts,
            )
            .await;
        }
        if !published.is_empty() {
            metrics.events_processed(true, processing_time, published.len());
            let completed: Vec<&Record> = published
                .iter()
                .map(|(_, record, _, _)| &***record)
                .collect();
            let set = inner.store.complete_processed(&completed, processing).await;
            drop(completed);
            // The events of one request were received together: one latency.
            // (Received → processing start is known without another clock read.)
            for received_together in published.chunk_by(|a, b| a.1.received_at == b.1.received_at) {
                let received_at = received_together[0].1.received_at;
                metrics.end_to_end(
                    processing.processed_at.since(received_at) + processing_time,
                    received_together.len(),
                );
            }
            // On the feed only once the store shows them processed: a
            // subscriber may render them from there.
            let to_feed: Vec<(usize, &Record, Published<'_>)> = published
                .iter()
                .zip(set)
                .filter(|(_, set)| *set)
                .map(|((index, record, _, line), _)| {
                    let published = Published {
                        sequence: record.sequence,
                        id: &record.event.id,
                        processing,
                        line: &lines[line.clone()],
                    };
                    (*index, &***record, published)
                })
                .collect();
            let feed: Vec<Published<'_>> = to_feed.iter().map(|(_, _, p)| *p).collect();
            match inner.feed.append(&feed).await {
                Ok(()) => metrics.sink_result("sse", true, feed.len()),
                Err(error) => {
                    metrics.sink_result("sse", false, feed.len());
                    tracing::error!(events = feed.len(), %error, "events not published");
                    span.record("outcome", "error");
                    failed += give_up_or_retry(
                        pipeline,
                        to_feed.iter().map(|(index, record, _)| (*index, *record)),
                        &retryable,
                        &format!("not published: {error}"),
                        processing_time,
                        &mut verdicts,
                    )
                    .await;
                }
            }
        }
        if failed > 0 {
            inner.feed.outcomes_changed();
        } else {
            span.record("outcome", "ok");
        }
    }
    .instrument(span.clone())
    .await;
    verdicts
}

/// Events that were not published: each is delivered again where its
/// attempt allows (its verdict says so), and fails for good otherwise.
/// Returns how many failed.
async fn give_up_or_retry<'r>(
    pipeline: &Pipeline,
    unpublished: impl Iterator<Item = (usize, &'r Record)>,
    retryable: &impl Fn(usize) -> bool,
    error: &str,
    processing: Duration,
    verdicts: &mut [Verdict],
) -> usize {
    let mut failed = 0;
    for (index, record) in unpublished {
        if retryable(index) {
            if let Some(verdict) = verdicts.get_mut(index) {
                *verdict = Verdict::Retry;
            }
        } else {
            fail(pipeline, record, error.to_owned(), processing).await;
            failed += 1;
        }
    }
    pipeline
        .inner
        .sink_failures
        .fetch_add(failed as u64, Ordering::Relaxed);
    failed
}

/// Marks `record` failed (whoever waits for it is woken by the caller,
/// through the feed, once the pass's outcomes are all set).
async fn fail(pipeline: &Pipeline, record: &Record, error: String, processing: Duration) {
    let inner = &pipeline.inner;
    inner.metrics.events_processed(false, processing, 1);
    inner
        .store
        .complete(record, CompleteWith::Failed(error))
        .await;
}

#[cfg(test)]
mod tests;
