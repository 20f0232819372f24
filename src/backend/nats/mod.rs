//! The `nats` backend: the store, queue and feed on NATS JetStream, shared
//! by every replica.
//!
//! Three streams and one consumer, created at start-up when missing and
//! checked when present (`backend.nats.*`):
//!
//! - events (`<prefix>.events.<key>`, `discard: new`): one message per
//!   accepted event, written once (first writer wins), which is at once
//!   the idempotency record, the queue and the arrival order;
//! - the durable pull consumer on it that every replica's workers share;
//! - published (`<prefix>.published.<key>`): the published-events feed;
//!   its sequence is the publication sequence;
//! - failed (`<prefix>.failed.<key>`): why an event failed for good.
//!
//! Per accepted event: one publish (ack awaited before the 202), one
//! delivery and its ack, one publish to the published stream.

mod codec;
mod feed;
mod queue;
mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self};

use super::Backend;
use crate::config::{NatsSettings, NatsStorage, Settings};
use crate::pipeline::Backpressure;
use crate::telemetry::metrics::{Metrics, names};

pub use feed::NatsFeed;
pub use queue::NatsQueue;
pub use store::NatsStore;

/// How often the stream and consumer state is read for the metrics.
const UPKEEP: Duration = Duration::from_secs(2);

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] crate::nats::ConnectError),
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
}

/// Connects, creates or checks the streams and consumer, and starts
/// fetching.
pub async fn open(
    settings: &Settings,
    backpressure: &Backpressure,
    metrics: &Metrics,
) -> Result<Backend, BackendError> {
    let nats = &settings.backend.nats;
    let client = crate::nats::connect(&settings.backend.nats_url, "eventflow").await?;
    // An ack that does not come within half the request timeout is an
    // outage: the request still gets its 503 in time.
    let timeout = (settings.server.request_timeout / 2).max(Duration::from_millis(500));
    let js = jetstream::ContextBuilder::new()
        .timeout(timeout)
        .build(client.clone());
    let subjects = codec::Subjects::new(&nats.subject_prefix);
    let storage = match nats.storage {
        NatsStorage::File => StorageType::File,
        NatsStorage::Memory => StorageType::Memory,
    };
    let events = ensure_stream(
        &js,
        "backend.nats.events_stream",
        stream::Config {
            name: nats.events_stream.clone(),
            subjects: vec![subjects.events()],
            retention: RetentionPolicy::Limits,
            // A full stream refuses new events (503); a pending event is
            // never dropped to make room.
            discard: DiscardPolicy::New,
            max_bytes: nats.max_bytes,
            max_age: nats.max_age,
            storage,
            num_replicas: nats.replicas,
            allow_direct: true,
            ..Default::default()
        },
    )
    .await?;
    let published = ensure_stream(
        &js,
        "backend.nats.published_stream",
        stream::Config {
            name: nats.published_stream.clone(),
            subjects: vec![subjects.published()],
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            max_bytes: nats.published_max_bytes,
            max_age: nats.published_max_age,
            duplicate_window: nats.duplicate_window,
            storage,
            num_replicas: nats.replicas,
            allow_direct: true,
            ..Default::default()
        },
    )
    .await?;
    let failed = ensure_stream(
        &js,
        "backend.nats.failed_stream",
        stream::Config {
            name: nats.failed_stream.clone(),
            subjects: vec![subjects.failed()],
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            max_bytes: nats.published_max_bytes,
            max_age: nats.published_max_age,
            storage,
            num_replicas: nats.replicas,
            allow_direct: true,
            ..Default::default()
        },
    )
    .await?;
    let consumer = ensure_consumer(&events, nats).await?;
    let published_head = published
        .get_info()
        .await
        .map(|info| info.state.last_sequence)
        .map_err(|e| jetstream_error("backend.nats.published_stream", "reading", e))?;

    let held = Arc::new(AtomicU64::new(0));
    let store = Arc::new(NatsStore {
        client: client.clone(),
        js: js.clone(),
        events: events.clone(),
        published: published.clone(),
        failed,
        subjects: subjects.clone(),
        held: Arc::clone(&held),
        ack_latency: metrics.histogram(names::NATS_PUBLISH_ACK),
    });
    let queue = NatsQueue::start(
        consumer.clone(),
        backpressure.clone(),
        nats.max_deliver,
        nats.ack_wait,
        settings.pipeline.workers,
        metrics.counter(names::NATS_REDELIVERIES, &[]),
    );
    let feed = Arc::new(NatsFeed::start(js, published, subjects, published_head));
    tokio::spawn(upkeep(events, consumer, held, metrics.clone()));
    tracing::info!(
        urls = %settings.backend.nats_url,
        events = %nats.events_stream,
        consumer = %nats.consumer,
        "nats backend ready"
    );
    Ok(Backend { store, queue, feed })
}

fn jetstream_error(key: &'static str, what: &str, error: impl ToString) -> BackendError {
    BackendError::JetStream {
        key,
        what: what.to_owned(),
        reason: error.to_string(),
    }
}

/// The stream `wanted.name`: created as `wanted` when missing; when it
/// exists, its limits are brought to `wanted` and what cannot change is
/// checked.
async fn ensure_stream(
    js: &jetstream::Context,
    key: &'static str,
    wanted: stream::Config,
) -> Result<stream::Stream, BackendError> {
    let what = format!("stream `{}`", wanted.name);
    let existing = match js.get_stream(&wanted.name).await {
        Ok(mut stream) => Some(
            stream
                .info()
                .await
                .map_err(|e| jetstream_error(key, &format!("reading {what}"), e))?
                .config
                .clone(),
        ),
        Err(_) => None,
    };
    let Some(found) = existing else {
        return js.create_stream(wanted).await.map_err(|e| {
            // JetStream reserves a stream's whole `max_bytes` when it is
            // made; say which settings to change when the server has too little.
            let no_room = matches!(
                e.kind(),
                CreateStreamErrorKind::JetStream(error)
                    if error.error_code() == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED
            );
            let reason = e.to_string();
            let reason = if no_room {
                format!(
                    "{reason}: the server reserves each stream's max_bytes; lower \
                     backend.nats.max_bytes or backend.nats.published_max_bytes, or give \
                     its JetStream more storage (max_file_store)"
                )
            } else {
                reason
            };
            jetstream_error(key, &format!("creating {what}"), reason)
        });
    };
    let incompatible = |field, found: String, wanted: String| BackendError::Incompatible {
        key,
        what: what.clone(),
        field,
        found,
        wanted,
    };
    if found.subjects != wanted.subjects {
        return Err(incompatible(
            "subjects",
            format!("{:?}", found.subjects),
            format!("{:?}", wanted.subjects),
        ));
    }
    if found.retention != wanted.retention {
        return Err(incompatible(
            "retention",
            format!("{:?}", found.retention),
            format!("{:?}", wanted.retention),
        ));
    }
    if found.storage != wanted.storage {
        return Err(incompatible(
            "storage (backend.nats.storage)",
            format!("{:?}", found.storage),
            format!("{:?}", wanted.storage),
        ));
    }
    let same_limits = found.discard == wanted.discard
        && found.max_bytes == wanted.max_bytes
        && found.max_age == wanted.max_age
        && found.num_replicas == wanted.num_replicas
        && found.allow_direct == wanted.allow_direct
        && (wanted.duplicate_window.is_zero() || found.duplicate_window == wanted.duplicate_window);
    if !same_limits {
        tracing::info!(stream = %wanted.name, "updating the stream's limits to the configured ones");
        js.update_stream(&wanted)
            .await
            .map_err(|e| jetstream_error(key, &format!("updating {what}"), e))?;
    }
    js.get_stream(&wanted.name)
        .await
        .map_err(|e| jetstream_error(key, &format!("reading {what}"), e))
}

/// The durable pull consumer every replica's workers share.
async fn ensure_consumer(
    events: &stream::Stream,
    nats: &NatsSettings,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BackendError> {
    const KEY: &str = "backend.nats.consumer";
    let wanted = pull::Config {
        durable_name: Some(nats.consumer.clone()),
        // The stream holds nothing else: no filter to match per message.
        filter_subject: format!("{}.events.>", nats.subject_prefix),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: nats.ack_wait,
        max_deliver: nats.max_deliver,
        max_ack_pending: nats.max_ack_pending,
        ..Default::default()
    };
    let what = format!("consumer `{}`", nats.consumer);
    if let Ok(mut consumer) = events.get_consumer::<pull::Config>(&nats.consumer).await {
        let found = consumer
            .info()
            .await
            .map_err(|e| jetstream_error(KEY, &format!("reading {what}"), e))?
            .config
            .clone();
        if found.filter_subject != wanted.filter_subject {
            return Err(BackendError::Incompatible {
                key: KEY,
                what,
                field: "filter_subject",
                found: found.filter_subject,
                wanted: wanted.filter_subject,
            });
        }
        if found.ack_policy != wanted.ack_policy {
            return Err(BackendError::Incompatible {
                key: KEY,
                what,
                field: "ack_policy",
                found: format!("{:?}", found.ack_policy),
                wanted: format!("{:?}", wanted.ack_policy),
            });
        }
        if found.ack_wait == wanted.ack_wait
            && found.max_deliver == wanted.max_deliver
            && found.max_ack_pending == wanted.max_ack_pending
        {
            return Ok(consumer);
        }
        tracing::info!(consumer = %nats.consumer, "updating the consumer to the configured settings");
        return events
            .update_consumer(wanted)
            .await
            .map_err(|e| jetstream_error(KEY, &format!("updating {what}"), e));
    }
    events
        .create_consumer(wanted)
        .await
        .map_err(|e| jetstream_error(KEY, &format!("creating {what}"), e))
}

/// Reads the stream and consumer state for the metrics, now and then.
async fn upkeep(
    events: stream::Stream,
    mut consumer: jetstream::consumer::Consumer<pull::Config>,
    held: Arc<AtomicU64>,
    metrics: Metrics,
) {
    let pending = metrics.gauge(names::NATS_PENDING);
    let ack_pending = metrics.gauge(names::NATS_ACK_PENDING);
    let mut every = tokio::time::interval(UPKEEP);
    loop {
        every.tick().await;
        if let Ok(info) = events.get_info().await {
            held.store(info.state.messages, Ordering::Relaxed);
        }
        if let Ok(info) = consumer.info().await {
            pending.set(info.num_pending as f64);
            ack_pending.set(info.num_ack_pending as f64);
        }
    }
}
