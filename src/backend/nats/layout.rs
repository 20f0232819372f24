//! The JetStream objects of the nats backend: five streams and one durable
//! consumer, created when missing and checked when present, and the checks
//! made once NATS answers (an earlier layout's streams, the server's
//! `max_payload`).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy, pull};
use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::stream::{
    self, DiscardPolicy, PersistenceMode, RetentionPolicy, StorageType,
};
use async_nats::jetstream::{self};

use super::codec::{self, Subjects};
use super::{BackendError, Nats};
use crate::config::{NatsPersistMode, NatsSettings, NatsStorage, Settings};

/// The metadata key every stream of this layout carries.
const LAYOUT_KEY: &str = "eventflow_layout";
/// This layout: ids, backlog, published, failed and dead-letter streams.
const LAYOUT: &str = "2";

/// Most a redelivery after an unanswered delivery waits (the consumer's
/// `backoff` doubles from `ack_wait` up to this).
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// What setting up found: the consumer the workers pull from and where the
/// published stream's head is.
pub(super) struct Ready {
    pub(super) consumer: Consumer<pull::Config>,
    pub(super) published_head: u64,
}

/// The `backend.nats.persist_mode` a stream's mode stands for.
fn setting_of(mode: Option<PersistenceMode>) -> NatsPersistMode {
    match mode.unwrap_or_default() {
        PersistenceMode::Default => NatsPersistMode::Default,
        PersistenceMode::Async => NatsPersistMode::Async,
    }
}

/// The five streams' configurations.
fn streams(nats: &NatsSettings, subjects: &Subjects) -> [(&'static str, stream::Config); 5] {
    let storage = match nats.storage {
        NatsStorage::File => StorageType::File,
        NatsStorage::Memory => StorageType::Memory,
    };
    let persist_mode = match nats.persist_mode {
        NatsPersistMode::Default => None,
        NatsPersistMode::Async => Some(PersistenceMode::Async),
    };
    let base = stream::Config {
        storage,
        persist_mode,
        num_replicas: nats.replicas,
        allow_direct: true,
        metadata: HashMap::from([(LAYOUT_KEY.to_owned(), LAYOUT.to_owned())]),
        ..Default::default()
    };
    [
        (
            "backend.nats.ids_stream",
            stream::Config {
                name: nats.ids_stream.clone(),
                subjects: vec![subjects.ids()],
                retention: RetentionPolicy::Limits,
                // Ingest never waits for room: the oldest ids are forgotten.
                discard: DiscardPolicy::Old,
                max_bytes: nats.idempotency_max_bytes,
                max_age: nats.idempotency_window,
                ..base.clone()
            },
        ),
        (
            "backend.nats.backlog_stream",
            stream::Config {
                name: nats.backlog_stream.clone(),
                subjects: vec![subjects.backlog()],
                // A chunk leaves once processed; a full backlog refuses new
                // chunks (503) and never drops a pending one.
                retention: RetentionPolicy::WorkQueue,
                discard: DiscardPolicy::New,
                max_bytes: nats.backlog_max_bytes,
                allow_direct: false,
                ..base.clone()
            },
        ),
        (
            "backend.nats.published_stream",
            stream::Config {
                name: nats.published_stream.clone(),
                subjects: vec![subjects.published()],
                retention: RetentionPolicy::Limits,
                discard: DiscardPolicy::Old,
                max_bytes: nats.history_max_bytes,
                max_age: nats.history_max_age,
                // A worker's pass of publications is one fast-ingest batch.
                allow_batch_publish: true,
                ..base.clone()
            },
        ),
        (
            "backend.nats.failed_stream",
            stream::Config {
                name: nats.failed_stream.clone(),
                subjects: vec![subjects.failed()],
                retention: RetentionPolicy::Limits,
                discard: DiscardPolicy::Old,
                max_bytes: nats.history_max_bytes,
                max_age: nats.history_max_age,
                ..base.clone()
            },
        ),
        (
            "backend.nats.dead_letter_stream",
            stream::Config {
                name: nats.dead_letter_stream.clone(),
                subjects: subjects.dead_letters().into(),
                retention: RetentionPolicy::Limits,
                discard: DiscardPolicy::Old,
                max_bytes: nats.dead_letter_max_bytes,
                max_age: nats.history_max_age,
                // An event is dead-lettered (or handed out again) once per
                // subscription at a time: a later copy replaces it.
                max_messages_per_subject: 1,
                ..base
            },
        ),
    ]
}

/// The consumer every replica's workers share.
fn consumer(nats: &NatsSettings) -> pull::Config {
    pull::Config {
        durable_name: Some(nats.consumer.clone()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: nats.ack_wait,
        backoff: backoff(nats.ack_wait, nats.max_deliver),
        max_deliver: nats.max_deliver,
        max_ack_pending: nats.max_ack_pending,
        ..Default::default()
    }
}

/// Waits before a delivery nobody answered (its replica died) comes again:
/// `ack_wait` first, so a dead replica's work returns within it, then
/// doubling up to [`BACKOFF_MAX`], so that a delivery that kills whoever
/// takes it does not cycle through the replicas. One fewer than the
/// deliveries, as JetStream requires.
fn backoff(ack_wait: Duration, max_deliver: i64) -> Vec<Duration> {
    let count = usize::try_from(max_deliver.saturating_sub(1).clamp(0, 32)).unwrap_or(0);
    let mut wait = ack_wait;
    (0..count)
        .map(|_| {
            let this = wait;
            wait = (wait * 2).min(BACKOFF_MAX.max(ack_wait));
            this
        })
        .collect()
}

/// A JetStream API error that only settings cure, or one worth trying
/// again: the API's own "temporarily unavailable" (503), and every error
/// that is not the API's answer (a timeout on a busy server, a request that
/// failed), are [`BackendError::Unreachable`].
fn answer_error(
    key: &'static str,
    what: String,
    api: Option<&jetstream::Error>,
    error: impl std::fmt::Display,
) -> BackendError {
    match api {
        Some(api) if api.code() != 503 => refused(key, what, error),
        _ => BackendError::Unreachable(format!("{what}: {error}")),
    }
}

fn refused(key: &'static str, what: String, reason: impl ToString) -> BackendError {
    BackendError::JetStream {
        key,
        what,
        reason: reason.to_string(),
    }
}

/// Creates or checks every stream and the consumer, and checks the
/// server's `max_payload` against the settings. An error that NATS not
/// answering explains is [`BackendError::Unreachable`] (worth retrying);
/// any other stops the start.
pub(super) async fn set_up(handles: &Nats, settings: &Settings) -> Result<Ready, BackendError> {
    let (js, client, subjects) = (&handles.js, &handles.client, &handles.subjects);
    let nats = &settings.backend.nats;
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err(BackendError::Unreachable(format!(
            "not connected to NATS at {}",
            settings.backend.nats_url
        )));
    }
    let max_payload = client.server_info().max_payload;
    // The server's INFO can reach the client a moment after its state says
    // connected (seen on a busy machine): until then its max_payload reads
    // 0, which is no server's, so wait for it rather than refuse the start.
    if max_payload == 0 {
        return Err(BackendError::Unreachable(format!(
            "waiting for the NATS server's INFO at {}",
            settings.backend.nats_url
        )));
    }
    check_max_payload(max_payload, settings)?;
    let mut published_head = 0;
    for (key, wanted) in streams(nats, subjects) {
        let name = wanted.name.clone();
        let stream = ensure_stream(js, key, wanted).await?;
        if name == nats.published_stream {
            published_head = stream.cached_info().state.last_sequence;
        }
    }
    // On the workers' connection: its deliveries and acks travel there.
    let consumer = ensure_consumer(&handles.backlog_work, nats).await?;
    Ok(Ready {
        consumer,
        published_head,
    })
}

/// Refuses settings that allow an event whose message NATS would refuse.
fn check_max_payload(max_payload: usize, settings: &Settings) -> Result<(), BackendError> {
    let event_max = settings.pipeline.max_payload_bytes;
    let largest = codec::largest_message(event_max);
    if largest <= max_payload {
        return Ok(());
    }
    // The largest pipeline.max_payload_bytes this server takes.
    let fits = (max_payload.saturating_sub(codec::HEADROOM) / 6)
        .saturating_sub(crate::event::MAX_ID_BYTES);
    Err(BackendError::PayloadTooSmall {
        max_payload,
        event_max,
        largest,
        fits,
    })
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
    let found = match js.get_stream(&wanted.name).await {
        Ok(stream) => stream.cached_info().config.clone(),
        Err(error) => {
            use async_nats::jetstream::context::GetStreamErrorKind;
            return match error.kind() {
                GetStreamErrorKind::JetStream(api)
                    if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    create_stream(js, key, &what, wanted).await
                }
                GetStreamErrorKind::JetStream(api) => Err(answer_error(
                    key,
                    format!("reading {what}"),
                    Some(&api),
                    &error,
                )),
                _ => Err(BackendError::Unreachable(format!(
                    "reading {what}: {error}"
                ))),
            };
        }
    };
    if found.metadata.get(LAYOUT_KEY).map(String::as_str) != Some(LAYOUT) {
        return Err(BackendError::EarlierLayout {
            key,
            stream: wanted.name,
        });
    }
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
    // Fixed when a stream is made: nats-server refuses to change it.
    let (found_mode, wanted_mode) = (
        setting_of(found.persist_mode),
        setting_of(wanted.persist_mode),
    );
    if found_mode != wanted_mode {
        return Err(incompatible(
            "persist_mode (backend.nats.persist_mode; a stream's is fixed when it is made)",
            format!("\"{}\"", found_mode.name()),
            format!("\"{}\"", wanted_mode.name()),
        ));
    }
    let same_limits = found.discard == wanted.discard
        && found.max_bytes == wanted.max_bytes
        && found.max_age == wanted.max_age
        && found.num_replicas == wanted.num_replicas
        && found.allow_direct == wanted.allow_direct
        && found.allow_batch_publish == wanted.allow_batch_publish;
    if !same_limits {
        tracing::info!(stream = %wanted.name, "updating the stream's limits to the configured ones");
        js.update_stream(&wanted).await.map_err(|e| {
            let api = match e.kind() {
                CreateStreamErrorKind::JetStream(api) => Some(api),
                _ => None,
            };
            answer_error(key, format!("updating {what}"), api.as_ref(), &e)
        })?;
    }
    js.get_stream(&wanted.name)
        .await
        .map_err(|e| BackendError::Unreachable(format!("reading {what}: {e}")))
}

async fn create_stream(
    js: &jetstream::Context,
    key: &'static str,
    what: &str,
    wanted: stream::Config,
) -> Result<stream::Stream, BackendError> {
    js.create_stream(wanted).await.map_err(|e| {
        let CreateStreamErrorKind::JetStream(api) = e.kind() else {
            return BackendError::Unreachable(format!("creating {what}: {e}"));
        };
        if api.code() == 503 {
            return BackendError::Unreachable(format!("creating {what}: {e}"));
        }
        let reason = e.to_string();
        // JetStream reserves a stream's whole `max_bytes` when it is made;
        // say which settings to change when the server has too little.
        let reason = if api.error_code() == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED {
            format!(
                "{reason}: the server reserves each stream's max_bytes; lower \
                 backend.nats.backlog_max_bytes, backend.nats.history_max_bytes (reserved \
                 twice: published and failed), backend.nats.idempotency_max_bytes or \
                 backend.nats.dead_letter_max_bytes, or give its JetStream more storage \
                 (max_file_store)"
            )
        } else {
            reason
        };
        refused(key, format!("creating {what}"), reason)
    })
}

/// The durable pull consumer every replica's workers share.
async fn ensure_consumer(
    backlog: &stream::Stream<()>,
    nats: &NatsSettings,
) -> Result<Consumer<pull::Config>, BackendError> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    const KEY: &str = "backend.nats.consumer";
    let wanted = consumer(nats);
    let what = format!("consumer `{}`", nats.consumer);
    let found = match backlog.consumer_info(&nats.consumer).await {
        Ok(info) => Some(info.config),
        Err(error) => match error.kind() {
            ConsumerInfoErrorKind::NotFound => None,
            ConsumerInfoErrorKind::JetStream(api) => {
                return Err(answer_error(
                    KEY,
                    format!("reading {what}"),
                    Some(&api),
                    &error,
                ));
            }
            ConsumerInfoErrorKind::InvalidName => {
                return Err(refused(KEY, format!("reading {what}"), error));
            }
            _ => {
                return Err(BackendError::Unreachable(format!(
                    "reading {what}: {error}"
                )));
            }
        },
    };
    if let Some(found) = &found {
        if found.ack_policy != wanted.ack_policy {
            return Err(BackendError::Incompatible {
                key: KEY,
                what,
                field: "ack_policy",
                found: format!("{:?}", found.ack_policy),
                wanted: format!("{:?}", wanted.ack_policy),
            });
        }
        let same = found.ack_wait == wanted.ack_wait
            && found.backoff == wanted.backoff
            && found.max_deliver == wanted.max_deliver
            && found.max_ack_pending == wanted.max_ack_pending;
        if !same {
            tracing::info!(consumer = %nats.consumer, "updating the consumer to the configured settings");
            return backlog.update_consumer(wanted).await.map_err(|e| {
                use async_nats::jetstream::stream::ConsumerUpdateErrorKind as Kind;
                match e.kind() {
                    Kind::JetStream(api) => {
                        answer_error(KEY, format!("updating {what}"), Some(&api), &e)
                    }
                    Kind::TimedOut | Kind::Request => {
                        answer_error(KEY, format!("updating {what}"), None, &e)
                    }
                    _ => refused(KEY, format!("updating {what}"), e),
                }
            });
        }
    }
    // Creating a durable that exists with the same settings returns it.
    backlog
        .create_consumer(wanted)
        .await
        .map_err(|e| consumer_error(format!("creating {what}"), &e))
}

/// Why creating or updating the workers' consumer failed.
fn consumer_error(
    what: String,
    error: &async_nats::jetstream::stream::ConsumerError,
) -> BackendError {
    use async_nats::jetstream::stream::ConsumerErrorKind;
    match error.kind() {
        ConsumerErrorKind::JetStream(api) => {
            answer_error("backend.nats.consumer", what, Some(&api), error)
        }
        ConsumerErrorKind::InvalidName | ConsumerErrorKind::InvalidConsumerType => {
            refused("backend.nats.consumer", what, error)
        }
        _ => answer_error("backend.nats.consumer", what, None, error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_replicas_delivery_comes_back_after_ack_wait_then_backs_off() {
        let waits: Vec<u64> = backoff(Duration::from_secs(5), 10)
            .iter()
            .map(Duration::as_secs)
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60, 60, 60, 60]);
        assert!(backoff(Duration::from_secs(5), 1).is_empty());
        // An ack_wait above the cap is not shortened.
        assert_eq!(
            backoff(Duration::from_secs(90), 3),
            [Duration::from_secs(90); 2]
        );
    }

    #[test]
    fn settings_that_allow_a_message_over_max_payload_are_refused_naming_both() {
        let mut settings = crate::config::Settings::load_from(None, std::iter::empty()).unwrap();
        assert!(check_max_payload(1024 * 1024, &settings).is_ok());
        settings.pipeline.max_payload_bytes = 1024 * 1024;
        let error = check_max_payload(1024 * 1024, &settings)
            .unwrap_err()
            .to_string();
        assert!(error.contains("pipeline.max_payload_bytes"), "{error}");
        assert!(error.contains("max_payload"), "{error}");
        // The size it names as fitting does fit.
        let BackendError::PayloadTooSmall { fits, .. } =
            check_max_payload(1024 * 1024, &settings).unwrap_err()
        else {
            panic!("another error");
        };
        settings.pipeline.max_payload_bytes = fits;
        assert!(check_max_payload(1024 * 1024, &settings).is_ok());
    }
}
