//! One worker pass over the events it took, as named steps: render them,
//! publish them to every sink, record their outcomes in the store, append
//! them to the feed. Events that a sink or the feed did not take are one
//! [`NotPublished`] event, logged, counted and settled in one place.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::super::Pipeline;
use crate::event::{JsonWriter, PublishedEvent, line_size_hint};
use crate::feed::Published;
use crate::queue::{Attempt, Verdict};
use crate::sink::{Publication, Publications};
use crate::store::{CompleteWith, Processing, Record};
use crate::telemetry;

/// What a panic in processing leaves as the event's error.
pub(super) const PANICKED: &str = "processing panicked";

/// One event rendered: its place in the pass, its record, the published
/// event and where its line is in the pass's lines.
struct Rendered<'r> {
    index: usize,
    record: &'r Record,
    event: PublishedEvent,
    line: std::ops::Range<usize>,
}

/// One pass of one worker.
pub(super) struct Pass<'p> {
    pipeline: &'p Pipeline,
    worker: u32,
    records: &'p [Arc<Record>],
    /// One per record, or empty when each is a first and only attempt.
    attempts: &'p [Attempt],
    span: tracing::Span,
    started: Instant,
    /// One clock read for the whole pass: its events are published together.
    processing: Processing,
    /// One per record.
    verdicts: Vec<Verdict>,
    /// Events that failed for good in this pass.
    failed: usize,
}

/// Events a sink (or the feed, `"sse"`) did not take: each is delivered
/// again where its attempt allows and fails for good otherwise.
struct NotPublished<'a, 'r> {
    sink: &'a str,
    error: String,
    events: Vec<(usize, &'r Record)>,
}

impl<'p> Pass<'p> {
    pub(super) fn new(
        pipeline: &'p Pipeline,
        worker: u32,
        records: &'p [Arc<Record>],
        attempts: &'p [Attempt],
        span: tracing::Span,
        started: Instant,
    ) -> Self {
        Self {
            pipeline,
            worker,
            records,
            attempts,
            span,
            started,
            processing: Processing {
                worker,
                processed_at: crate::time::UnixNanos::now(),
            },
            verdicts: vec![Verdict::Done; records.len()],
            failed: 0,
        }
    }

    fn attempt(&self, index: usize) -> Attempt {
        self.attempts.get(index).copied().unwrap_or_default()
    }

    /// Runs the steps; one verdict per record.
    pub(super) async fn run(mut self) -> Vec<Verdict> {
        let span = self.span.clone();
        async {
            let (rendered, lines) = self.render().await;
            if !rendered.is_empty() {
                // Moved, not copied: sinks may keep the lines while they
                // write them.
                let lines = Arc::new(lines);
                let written = self.publish_to_sinks(&rendered, &lines).await;
                let (published, _) = rendered.split_at(written);
                let completed = self.complete(published).await;
                self.append_to_feed(published, &completed, &lines).await;
            }
            if self.failed > 0 {
                // Waiters of the failed events are woken through the feed.
                self.pipeline.inner.feed.outcomes_changed();
            } else {
                self.span.record("outcome", "ok");
            }
        }
        .instrument(span)
        .await;
        self.verdicts
    }

    /// Step 1: transforms each record and writes its JSON line into the
    /// pass's lines; an event whose transform fails (or panics) fails here.
    async fn render(&mut self) -> (Vec<Rendered<'p>>, String) {
        let records = self.records;
        let mut rendered = Vec::with_capacity(records.len());
        let mut lines = String::with_capacity(
            records
                .iter()
                .map(|r| line_size_hint(&r.event.payload, r.event.id.as_str()) + 1)
                .sum(),
        );
        let mut writer = JsonWriter::default();
        let mut failed_here = false;
        for (index, record) in records.iter().enumerate() {
            // A redelivered event may have been published before its
            // acknowledgement was lost: publish it at most once.
            if self.attempt(index).redelivered
                && self.pipeline.inner.store.outcome(record).await.is_some()
            {
                tracing::debug!(event.id = %record.event.id, "redelivered event already processed");
                continue;
            }
            let transformed =
                telemetry::child_span(&self.span, || tracing::debug_span!("transform")).in_scope(
                    || {
                        std::panic::catch_unwind(AssertUnwindSafe(|| {
                            self.pipeline.render(record, &self.processing)
                        }))
                    },
                );
            let error = match transformed {
                Ok(Ok(event)) => {
                    let start = lines.len();
                    writer.append(&event, &mut lines);
                    rendered.push(Rendered {
                        index,
                        record,
                        event,
                        line: start..lines.len(),
                    });
                    lines.push('\n');
                    continue;
                }
                Ok(Err(error)) => {
                    tracing::warn!(event.id = %record.event.id, %error, "event failed processing");
                    error.to_string()
                }
                Err(_) => {
                    tracing::error!(worker = self.worker, event.id = %record.event.id, "processing panicked; event marked failed");
                    PANICKED.into()
                }
            };
            self.span.record("outcome", "error");
            fail(self.pipeline, record, error, self.started.elapsed()).await;
            self.failed += 1;
            failed_here = true;
        }
        if failed_here {
            // Their waiters need not wait for the sinks to write the rest.
            self.pipeline.inner.feed.outcomes_changed();
        }
        (rendered, lines)
    }

    /// Step 2: hands the rendered events to each sink in one call. A later
    /// sink is offered only what the earlier ones wrote (an event one sink
    /// could not write is failed, and no other sink should report it
    /// published). Returns how many, from the first, every sink wrote.
    async fn publish_to_sinks(&mut self, rendered: &[Rendered<'p>], lines: &Arc<String>) -> usize {
        let inner = &self.pipeline.inner;
        let metrics = &inner.metrics;
        let publications: Vec<Publication<'_>> = rendered
            .iter()
            .map(|r| Publication {
                event: &r.event,
                sequence: r.record.sequence,
                json: &lines[r.line.clone()],
            })
            .collect();
        let mut offered: &[Publication<'_>] = &publications;
        let mut offered_lines = Arc::clone(lines);
        let mut failure: Option<(&str, String)> = None;
        for sink in &inner.sinks {
            if offered.is_empty() {
                metrics.sink_result(sink.name(), false, publications.len());
                continue;
            }
            let published = sink
                .publish(Publications::new(offered, &offered_lines))
                .instrument(telemetry::child_span(&self.span, || {
                    tracing::debug_span!("publish", sink = sink.name())
                }))
                .await;
            let by_this_sink = match published {
                Ok(()) => offered.len(),
                Err(error) => {
                    failure.get_or_insert_with(|| (sink.name(), error.error.to_string()));
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
                    .map_or(0, |last| rendered[last].line.end + 1);
                offered_lines = Arc::new(lines[..end].to_owned());
            }
        }
        let written = offered.len();
        if let Some((sink, error)) = failure.filter(|_| written < rendered.len()) {
            let events = rendered[written..]
                .iter()
                .map(|r| (r.index, r.record))
                .collect();
            self.not_published(NotPublished {
                sink,
                error,
                events,
            })
            .await;
        }
        written
    }

    /// Step 3: records the published events in the store, and their
    /// latencies. Returns, for each, whether this pass completed it (not a
    /// redelivery racing its first delivery).
    async fn complete(&mut self, published: &[Rendered<'p>]) -> Vec<bool> {
        if published.is_empty() {
            return Vec::new();
        }
        let inner = &self.pipeline.inner;
        let processing_time = self.started.elapsed();
        inner
            .metrics
            .events_processed(true, processing_time, published.len());
        let completed: Vec<&Record> = published.iter().map(|r| r.record).collect();
        let set = inner
            .store
            .complete_processed(&completed, self.processing)
            .await;
        // The events of one request were received together: one latency.
        // (Received → processing start is known without another clock read.)
        for received_together in
            published.chunk_by(|a, b| a.record.received_at == b.record.received_at)
        {
            let received_at = received_together[0].record.received_at;
            inner.metrics.end_to_end(
                self.processing.processed_at.since(received_at) + processing_time,
                received_together.len(),
            );
        }
        set
    }

    /// Step 4: appends the events this pass completed to the feed, only
    /// once the store shows them processed (a subscriber may render them
    /// from there).
    async fn append_to_feed(
        &mut self,
        published: &[Rendered<'p>],
        completed: &[bool],
        lines: &str,
    ) {
        let to_feed: Vec<&Rendered<'p>> = published
            .iter()
            .zip(completed)
            .filter(|(_, completed)| **completed)
            .map(|(rendered, _)| rendered)
            .collect();
        if to_feed.is_empty() {
            return;
        }
        let span = telemetry::exported_span(&self.span);
        let feed: Vec<Published<'_>> = to_feed
            .iter()
            .map(|r| Published {
                sequence: r.record.sequence,
                id: &r.record.event.id,
                processing: self.processing,
                line: &lines[r.line.clone()],
                span,
            })
            .collect();
        let appended = self.pipeline.inner.feed.append(&feed).await;
        drop(feed);
        match appended {
            Ok(()) => self
                .pipeline
                .inner
                .metrics
                .sink_result("sse", true, to_feed.len()),
            Err(error) => {
                self.pipeline
                    .inner
                    .metrics
                    .sink_result("sse", false, to_feed.len());
                let events = to_feed.iter().map(|r| (r.index, r.record)).collect();
                self.not_published(NotPublished {
                    sink: "sse",
                    error: error.to_string(),
                    events,
                })
                .await;
            }
        }
    }

    /// Events a sink or the feed did not take: logged once, the pass's
    /// outcome an error, each delivered again where its attempt allows and
    /// failed for good otherwise (counted for the shutdown report).
    async fn not_published(&mut self, failure: NotPublished<'_, 'p>) {
        tracing::error!(
            events = failure.events.len(),
            sink = failure.sink,
            error = %failure.error,
            "events not published: a sink could not write them"
        );
        self.span.record("outcome", "error");
        let error = format!("not published: {}", failure.error);
        let processing_time = self.started.elapsed();
        let mut failed = 0;
        for (index, record) in failure.events {
            if self.attempt(index).retryable {
                if let Some(verdict) = self.verdicts.get_mut(index) {
                    *verdict = Verdict::Retry;
                }
            } else {
                fail(self.pipeline, record, error.clone(), processing_time).await;
                failed += 1;
            }
        }
        self.failed += failed;
        self.pipeline
            .inner
            .sink_failures
            .fetch_add(failed as u64, Ordering::Relaxed);
    }
}

/// Marks `record` failed (whoever waits for it is woken by the caller,
/// through the feed, once the pass's outcomes are all set).
pub(super) async fn fail(
    pipeline: &Pipeline,
    record: &Record,
    error: String,
    processing: Duration,
) {
    let inner = &pipeline.inner;
    inner.metrics.events_processed(false, processing, 1);
    inner
        .store
        .complete(record, CompleteWith::Failed(error))
        .await;
}
