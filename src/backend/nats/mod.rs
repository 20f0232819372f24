//! The `nats` backend: the store, queue and feed on NATS JetStream, shared
//! by every replica.
//!
//! Three bounds, in four streams ([`layout`]), never confused (a fifth
//! holds the subscriptions' dead letters: [`subscriptions`]):
//!
//! - **idempotency horizon**: the ids stream (`<prefix>.ids.<key>`), one
//!   record per accepted id, written once (first writer wins, atomically,
//!   whichever replica it reached); its sequence is the arrival sequence.
//!   Bounded by `idempotency_window` and `idempotency_max_bytes`, oldest
//!   forgotten first: it never refuses ingest;
//! - **backlog**: a work-queue stream of chunks (one message for up to 256
//!   events: a batch request's, or single events joined under load) that
//!   leave once processed; `discard: new` at
//!   `backlog_max_bytes` is the one thing that refuses ingest (503);
//! - **history**: the published stream (one message per event, its
//!   sequence the gap-free publication sequence) and the failed stream,
//!   by `history_max_bytes` and `history_max_age`, oldest dropped first.
//!
//! Per accepted event: one id record and its ack, one publication and its
//! ack, and a share of one chunk's four messages. Ingest, the workers and
//! the readers (lookups, pages, SSE subscribers, the follower of the
//! published stream) each have a connection of their own, so that no kind
//! of traffic queues behind another's, and a reader can never make the
//! server drop the connection ingest needs.
//!
//! A replica that starts before its NATS keeps trying (`/readyz` 503
//! meanwhile); NATS that stops answering turns `/readyz` 503 within two
//! seconds ([`health`]), and every ingest request gets its answer within
//! `server.request_timeout / 2`.

mod attempts;
mod codec;
mod feed;
mod health;
mod layout;
mod publisher;
mod queue;
mod store;
mod subscriptions;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{Consumer, pull};
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{self};
use tokio::sync::watch;

use super::{Backend, BackendFailure};
use crate::config::Settings;
use crate::queue::Backpressure;
use crate::telemetry::metrics::{Metrics, names};

pub use feed::NatsFeed;
pub use queue::NatsQueue;
pub use store::NatsStore;
pub use subscriptions::NatsSubscriptions;

use codec::Subjects;
use health::Health;

/// How often the streams' and the consumer's state is read for the metrics.
const UPKEEP: Duration = Duration::from_secs(2);
/// How long start-up waits for NATS before it serves anyway (`/readyz`
/// 503) and keeps trying in the background.
const FIRST_SETUP: Duration = Duration::from_secs(3);
/// Pause between attempts to set up while NATS does not answer.
const SETUP_RETRY: Duration = Duration::from_secs(1);
/// Messages the reader connection buffers per subscription: an SSE
/// subscriber that does not read holds at most this (its pulls are
/// smaller still), and the server never has to drop the connection.
const READER_CAPACITY: usize = 4096;
/// Acks the ingest connection may await at once (a batch's publishes go
/// out together; more wait for room rather than fail).
const ACKS_IN_FLIGHT: usize = 65_536;

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] crate::nats::ConnectError),
    /// NATS did not answer (worth trying again).
    #[error("{0}")]
    Unreachable(String),
    /// A stream or the consumer could not be created or read.
    #[error("{key}: {what}: {reason}")]
    JetStream {
        /// The setting naming the object.
        key: &'static str,
        /// What was being done.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A stream or the consumer exists with settings eventflow cannot use.
    #[error("{key}: {what} exists with {field} = {found}, but eventflow needs {wanted}")]
    Incompatible {
        /// The setting naming the object.
        key: &'static str,
        /// Which object.
        what: String,
        /// The setting that differs.
        field: &'static str,
        /// What it is.
        found: String,
        /// What it must be.
        wanted: String,
    },
    /// A stream made by an earlier eventflow, whose layout this one does
    /// not read.
    #[error(
        "{key}: stream `{stream}` was made by an earlier eventflow (one events stream that kept \
         processed events; this version keeps the backlog, the history and the ids apart). To \
         move: let the earlier version drain its backlog (eventflow_nats_consumer_pending 0), \
         stop it, delete its streams (nats stream rm EVENTFLOW_EVENTS; nats stream rm {stream}; \
         and the failed stream), then start this version; or point this version at other \
         names (backend.nats.subject_prefix and the backend.nats.*_stream keys)"
    )]
    EarlierLayout {
        /// The setting naming the stream.
        key: &'static str,
        /// The stream.
        stream: String,
    },
    /// The server's `max_payload` is smaller than the largest message the
    /// settings allow.
    #[error(
        "pipeline.max_payload_bytes = {event_max} allows messages of up to {largest} bytes (an \
         event's record or published line with every character escaped), over the NATS \
         server's max_payload of {max_payload} bytes: lower pipeline.max_payload_bytes to at \
         most {fits}, or raise max_payload in nats-server's configuration (say \
         `max_payload: 8MB`; at most 64MB)"
    )]
    PayloadTooSmall {
        /// The server's limit.
        max_payload: usize,
        /// `pipeline.max_payload_bytes`.
        event_max: usize,
        /// The largest message it allows.
        largest: usize,
        /// The largest `pipeline.max_payload_bytes` the server takes.
        fits: usize,
    },
}

impl BackendError {
    /// Whether trying again may succeed (NATS did not answer), as opposed
    /// to a refusal that only a change of settings cures.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable(_))
    }
}

/// The connections and stream handles the store, queue and feed share.
/// Three connections, so that no one kind of traffic queues behind
/// another's in one socket: ingest (id records, backlog chunks), the
/// workers (deliveries, acks, publications), and readers.
#[derive(Debug)]
struct Nats {
    /// Ingest.
    client: async_nats::Client,
    /// On `client`, its acks bounded by the request deadline.
    js: jetstream::Context,
    /// On the workers' connection.
    work: jetstream::Context,
    /// Ingest's publishes (id records, backlog chunks), their acks awaited
    /// a set at a time.
    ingest: publisher::Publisher,
    /// The workers' publishes (publications).
    publish: publisher::Publisher,
    /// `Nats-Expected-Last-Subject-Sequence: 0`: the subject holds nothing yet.
    expect_new: async_nats::HeaderMap,
    subjects: Subjects,
    ids: Stream<()>,
    backlog: Stream<()>,
    /// The streams the workers write, on their connection.
    backlog_work: Stream<()>,
    published_work: Stream<()>,
    failed_work: Stream<()>,
    /// The same streams on the reader connection (reads, SSE subscribers
    /// and the follower have a connection of their own).
    ids_read: Stream<()>,
    published_read: Stream<()>,
    failed_read: Stream<()>,
    /// The subscriptions' dead letters and redeliveries, on the reader
    /// connection.
    dead_read: Stream<()>,
    /// The reader connection (subscriptions' acks travel there).
    reader: async_nats::Client,
    /// On `reader`.
    read: jetstream::Context,
    health: Arc<Health>,
    /// One request's wait for NATS: `server.request_timeout / 2`.
    deadline: Duration,
    /// Times retried events were queued, as last read or written here.
    attempts: attempts::Attempts,
    /// Id records held, as last read by the upkeep task.
    ids_held: AtomicU64,
    /// The longest message an event may make (`codec::largest_message`).
    largest_message: usize,
}

impl Nats {
    /// Why NATS cannot be used now, if it cannot.
    fn unavailable(&self) -> Option<String> {
        self.health.unavailable()
    }

    /// The largest message body NATS takes now (its `max_payload` less
    /// room for headers).
    fn max_body(&self) -> usize {
        self.client.max_payload().saturating_sub(codec::HEADROOM)
    }
}

/// Connects, sets up the streams and the consumer (or keeps trying in the
/// background while NATS does not answer), and starts fetching.
pub async fn open(
    settings: &Settings,
    backpressure: &Backpressure,
    metrics: &Metrics,
) -> Result<Backend, BackendError> {
    let urls = &settings.backend.nats_url;
    let configured = &settings.backend.nats;
    // The `async-nats` default for subscriptions on the ingest connection
    // (only the workers' pull subscribes there).
    let client = crate::nats::connect_in_background(urls, "eventflow", 65_536).await?;
    let worker = crate::nats::connect_in_background(urls, "eventflow-workers", 65_536).await?;
    let reader =
        crate::nats::connect_in_background(urls, "eventflow-reader", READER_CAPACITY).await?;
    // An ack that does not come within half the request timeout is an
    // outage: the request still gets its 503 in time.
    let deadline = (settings.server.request_timeout / 2).max(Duration::from_millis(500));
    let js = jetstream::ContextBuilder::new()
        .timeout(deadline)
        .max_ack_inflight(ACKS_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let work = jetstream::ContextBuilder::new()
        .timeout(deadline)
        .max_ack_inflight(ACKS_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(worker.clone());
    let read = jetstream::ContextBuilder::new()
        .timeout(deadline)
        .build(reader.clone());
    let subjects = Subjects::new(&configured.subject_prefix);
    let health = Health::start(client.clone());
    let nats = Arc::new(Nats {
        ids: named(&js, &configured.ids_stream, "backend.nats.ids_stream").await?,
        backlog: named(
            &js,
            &configured.backlog_stream,
            "backend.nats.backlog_stream",
        )
        .await?,
        backlog_work: named(
            &work,
            &configured.backlog_stream,
            "backend.nats.backlog_stream",
        )
        .await?,
        published_work: named(
            &work,
            &configured.published_stream,
            "backend.nats.published_stream",
        )
        .await?,
        failed_work: named(
            &work,
            &configured.failed_stream,
            "backend.nats.failed_stream",
        )
        .await?,
        ids_read: named(&read, &configured.ids_stream, "backend.nats.ids_stream").await?,
        published_read: named(
            &read,
            &configured.published_stream,
            "backend.nats.published_stream",
        )
        .await?,
        failed_read: named(
            &read,
            &configured.failed_stream,
            "backend.nats.failed_stream",
        )
        .await?,
        dead_read: named(
            &read,
            &configured.dead_letter_stream,
            "backend.nats.dead_letter_stream",
        )
        .await?,
        reader: reader.clone(),
        read: read.clone(),
        ingest: publisher::Publisher::new(client.clone()),
        publish: publisher::Publisher::new(worker.clone()),
        expect_new: {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            headers
        },
        client: client.clone(),
        js: js.clone(),
        work,
        subjects: subjects.clone(),
        health: Arc::clone(&health),
        deadline,
        attempts: attempts::Attempts::default(),
        ids_held: AtomicU64::new(0),
        largest_message: codec::largest_message(settings.pipeline.max_payload_bytes),
    });
    let store = Arc::new(NatsStore::new(Arc::clone(&nats), metrics));
    let queue = NatsQueue::new(
        Arc::clone(&nats),
        backpressure.clone(),
        settings.pipeline.workers,
        configured.max_deliver,
        metrics.counter(names::NATS_REDELIVERIES, &[]),
    );
    let feed = Arc::new(NatsFeed::new(Arc::clone(&nats)));
    let subscriptions = Arc::new(NatsSubscriptions::new(Arc::clone(&nats), settings));
    let (failed_tx, failed_rx) = watch::channel(None);
    let starter = Starter {
        nats: Arc::clone(&nats),
        settings: settings.clone(),
        queue: Arc::clone(&queue),
        feed: Arc::clone(&feed),
        subscriptions: Arc::clone(&subscriptions),
        metrics: metrics.clone(),
    };
    // NATS answering at start: set up now, so that a refusal stops the start.
    let first = async {
        loop {
            match starter.try_once().await {
                Err(error) if error.is_transient() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                done => return done,
            }
        }
    };
    match tokio::time::timeout(FIRST_SETUP, first).await {
        Ok(Ok(ready)) => starter.start(ready),
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            tracing::warn!(urls = %urls, "NATS is not answering yet; serving with /readyz 503 meanwhile");
            tokio::spawn(starter.keep_trying(failed_tx));
        }
    }
    Ok(Backend {
        store,
        queue,
        feed,
        subscriptions,
        failure: BackendFailure::new(failed_rx),
    })
}

/// A handle on the stream `name` (no request is made).
async fn named(
    js: &jetstream::Context,
    name: &str,
    key: &'static str,
) -> Result<Stream<()>, BackendError> {
    js.get_stream_no_info(name)
        .await
        .map_err(|e| BackendError::JetStream {
            key,
            what: format!("naming stream `{name}`"),
            reason: e.to_string(),
        })
}

/// Sets the backend up once NATS answers, then starts its tasks.
struct Starter {
    nats: Arc<Nats>,
    settings: Settings,
    queue: Arc<NatsQueue>,
    feed: Arc<NatsFeed>,
    subscriptions: Arc<NatsSubscriptions>,
    metrics: Metrics,
}

impl Starter {
    async fn try_once(&self) -> Result<layout::Ready, BackendError> {
        layout::set_up(&self.nats, &self.settings).await
    }

    /// Tries until NATS answers; a refusal then ends the service (through
    /// `failed`), since only new settings can cure it.
    async fn keep_trying(self, failed: watch::Sender<Option<String>>) {
        loop {
            match self.try_once().await {
                Ok(ready) => {
                    self.start(ready);
                    return;
                }
                Err(error) if error.is_transient() => {
                    self.nats.health.starting(error.to_string());
                    tracing::debug!(%error, "NATS is not answering yet");
                    tokio::time::sleep(SETUP_RETRY).await;
                }
                Err(error) => {
                    tracing::error!(%error, "the nats backend cannot start");
                    self.nats.health.starting(error.to_string());
                    let _ = failed.send(Some(error.to_string()));
                    return;
                }
            }
        }
    }

    fn start(&self, ready: layout::Ready) {
        let layout::Ready {
            consumer,
            published_head,
        } = ready;
        self.feed.start(published_head);
        self.queue
            .start(consumer.clone(), self.settings.backend.nats.ack_wait);
        tokio::spawn(upkeep(
            Arc::clone(&self.nats),
            consumer,
            self.settings.backend.nats.backlog_max_bytes,
            self.metrics.clone(),
        ));
        tokio::spawn(subscriptions::upkeep(
            Arc::clone(&self.subscriptions),
            UPKEEP,
        ));
        self.nats.health.set_up();
        tracing::info!(
            urls = %self.settings.backend.nats_url,
            backlog = %self.settings.backend.nats.backlog_stream,
            consumer = %self.settings.backend.nats.consumer,
            "nats backend ready"
        );
    }
}

/// Reads the streams' and the consumer's state for the metrics, now and then.
async fn upkeep(
    nats: Arc<Nats>,
    mut consumer: Consumer<pull::Config>,
    backlog_max_bytes: i64,
    metrics: Metrics,
) {
    let pending = metrics.gauge(names::NATS_PENDING);
    let ack_pending = metrics.gauge(names::NATS_ACK_PENDING);
    let backlog_bytes = metrics.gauge(names::NATS_BACKLOG_BYTES);
    metrics
        .gauge(names::NATS_BACKLOG_LIMIT)
        .set(backlog_max_bytes as f64);
    let mut every = tokio::time::interval(UPKEEP);
    loop {
        every.tick().await;
        if let Ok(info) = nats.ids.get_info().await {
            nats.ids_held.store(info.state.messages, Ordering::Relaxed);
        }
        if let Ok(info) = nats.backlog.get_info().await {
            backlog_bytes.set(info.state.bytes as f64);
        }
        if let Ok(info) = consumer.info().await {
            pending.set(info.num_pending as f64);
            ack_pending.set(info.num_ack_pending as f64);
        }
    }
}
