//! `backend.*`: where the store, queue and feed live, and the JetStream
//! objects of the `nats` backend.

use std::time::Duration;

use serde::Deserialize;

use super::de::duration;
use super::{ConfigError, invalid, is_subject, nats_subject, nats_urls};

/// `backend.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSettings {
    /// `memory` (one process) or `nats` (JetStream, shared by replicas).
    pub kind: BackendKind,
    /// NATS server(s) of the `nats` backend, comma-separated.
    pub nats_url: String,
    /// Streams, consumer and limits of the `nats` backend.
    pub nats: NatsSettings,
}

named_choice!(
    /// Where the store, queue and feed live (`backend.kind`).
    BackendKind, "backend", {
        /// In this process.
        Memory = "memory",
        /// In NATS JetStream, shared by every replica.
        Nats = "nats",
    }
);

named_choice!(
    /// Where JetStream keeps a stream (`backend.nats.storage`).
    NatsStorage, "storage", {
        /// On disk.
        File = "file",
        /// In the NATS servers' memory.
        Memory = "memory",
    }
);

named_choice!(
    /// When a file stream's writes reach its files (`backend.nats.persist_mode`).
    NatsPersistMode, "persist mode", {
        /// Before each write is acknowledged.
        Default = "default",
        /// Behind the acknowledgements, a few milliseconds later (one copy
        /// only: replicated streams already write behind their Raft log).
        Async = "async",
    }
);

/// `backend.nats.*` keys: the JetStream objects of the `nats` backend,
/// created at start-up when missing and checked when present. Three bounds
/// are kept apart: the backlog (accepted, not yet published; full → 503),
/// the history (published and failed events; oldest dropped first) and the
/// idempotency horizon (ids remembered; oldest forgotten first).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    /// First token of every subject (`<prefix>.ids.<key>`, ...).
    pub subject_prefix: String,
    /// Stream of the idempotency records: one per accepted id, for
    /// `idempotency_window`; its sequence is the arrival sequence.
    pub ids_stream: String,
    /// Work-queue stream of accepted, unpublished events (chunks of them).
    pub backlog_stream: String,
    /// Stream of published events: the feed (publication sequence).
    pub published_stream: String,
    /// Stream of events that failed for good, with their content.
    pub failed_stream: String,
    /// Stream of the subscriptions' dead letters and of those handed out
    /// again.
    pub dead_letter_stream: String,
    /// Durable pull consumer on the backlog, shared by every replica's workers.
    pub consumer: String,
    /// Copies of each stream in a cluster (1, 3 or 5).
    pub replicas: usize,
    /// `file` or `memory`.
    pub storage: NatsStorage,
    /// `default` (a write reaches the file before its ack) or `async`
    /// (behind the acks: less server CPU, and a nats-server crash, not a
    /// clean stop, can lose the last milliseconds of acknowledged writes);
    /// `async` needs `replicas = 1` and `storage = "file"` (nats-server 2.12+).
    pub persist_mode: NatsPersistMode,
    /// Bytes of accepted, unpublished events; a full backlog refuses new
    /// ones (503) and never drops one.
    pub backlog_max_bytes: i64,
    /// Bytes of published (and, apart, of failed) events kept for reads,
    /// SSE resume and retry; the oldest are dropped first.
    pub history_max_bytes: i64,
    /// Bytes of dead letters kept, for every subscription together (the
    /// oldest dropped first).
    pub dead_letter_max_bytes: i64,
    /// How long published and failed events (and dead letters) are kept.
    #[serde(deserialize_with = "duration::deserialize")]
    pub history_max_age: Duration,
    /// How long a retried id is recognised (and its record readable).
    #[serde(deserialize_with = "duration::deserialize")]
    pub idempotency_window: Duration,
    /// Bytes the idempotency records may take; the oldest are forgotten
    /// first, so at a high rate this, not the window, sets the horizon.
    pub idempotency_max_bytes: i64,
    /// A delivery neither acknowledged nor reported in progress within this
    /// is delivered again (a dead replica's deliveries come back after it).
    #[serde(deserialize_with = "duration::deserialize")]
    pub ack_wait: Duration,
    /// Deliveries (chunks of events) unacknowledged at once, across replicas.
    pub max_ack_pending: i64,
    /// Deliveries of one chunk before its unpublished events fail for good
    /// (retries wait 1 s, doubling up to 30 s: the default 10 spans about
    /// 2 minutes).
    pub max_deliver: i64,
}

/// Keys of the earlier JetStream layout, refused with what replaces them.
pub(super) const REMOVED_NATS_KEYS: [(&str, &str); 6] = [
    (
        "backend.nats.max_bytes",
        "backend.nats.backlog_max_bytes (accepted, unpublished events), \
         backend.nats.history_max_bytes (published events kept) and \
         backend.nats.idempotency_max_bytes (ids remembered)",
    ),
    (
        "backend.nats.max_age",
        "backend.nats.history_max_age (published events kept) and \
         backend.nats.idempotency_window (ids remembered); the backlog has no age",
    ),
    (
        "backend.nats.published_max_bytes",
        "backend.nats.history_max_bytes",
    ),
    (
        "backend.nats.published_max_age",
        "backend.nats.history_max_age",
    ),
    (
        "backend.nats.events_stream",
        "backend.nats.ids_stream and backend.nats.backlog_stream",
    ),
    (
        "backend.nats.duplicate_window",
        "nothing: each publication is fenced by its own subject",
    ),
];

impl BackendSettings {
    /// Checks the servers, the names and the bounds of the `nats` backend.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let nats = &self.nats;
        nats_urls("backend.nats_url", &self.nats_url)?;
        nats_subject("backend.nats.subject_prefix", &nats.subject_prefix)?;
        for (key, name) in [
            ("backend.nats.ids_stream", &nats.ids_stream),
            ("backend.nats.backlog_stream", &nats.backlog_stream),
            ("backend.nats.published_stream", &nats.published_stream),
            ("backend.nats.failed_stream", &nats.failed_stream),
            ("backend.nats.dead_letter_stream", &nats.dead_letter_stream),
            ("backend.nats.consumer", &nats.consumer),
        ] {
            if !is_subject(name) || name.contains('.') {
                return Err(invalid(
                    key,
                    format!("`{name}` is not a JetStream name (no dots, spaces, `*` or `>`)"),
                ));
            }
        }
        let streams = [
            &nats.ids_stream,
            &nats.backlog_stream,
            &nats.published_stream,
            &nats.failed_stream,
            &nats.dead_letter_stream,
        ];
        if streams
            .iter()
            .enumerate()
            .any(|(i, a)| streams[..i].contains(a))
        {
            return Err(invalid(
                "backend.nats.ids_stream",
                "the five streams (ids, backlog, published, failed, dead letters) need five \
                 different names",
            ));
        }
        if ![1, 3, 5].contains(&nats.replicas) {
            return Err(invalid("backend.nats.replicas", "must be 1, 3 or 5"));
        }
        if nats.persist_mode == NatsPersistMode::Async
            && (nats.replicas != 1 || nats.storage != NatsStorage::File)
        {
            return Err(invalid(
                "backend.nats.persist_mode",
                "`async` needs backend.nats.replicas = 1 and backend.nats.storage = \"file\" \
                 (replicated streams already write behind their Raft log)",
            ));
        }
        for (key, value) in [
            ("backend.nats.backlog_max_bytes", nats.backlog_max_bytes),
            ("backend.nats.history_max_bytes", nats.history_max_bytes),
            (
                "backend.nats.dead_letter_max_bytes",
                nats.dead_letter_max_bytes,
            ),
            (
                "backend.nats.idempotency_max_bytes",
                nats.idempotency_max_bytes,
            ),
            ("backend.nats.max_ack_pending", nats.max_ack_pending),
            ("backend.nats.max_deliver", nats.max_deliver),
        ] {
            if value <= 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        for (key, value) in [
            ("backend.nats.history_max_age", nats.history_max_age),
            ("backend.nats.idempotency_window", nats.idempotency_window),
            ("backend.nats.ack_wait", nats.ack_wait),
        ] {
            if value < Duration::from_secs(1) {
                return Err(invalid(key, "must be at least 1s"));
            }
        }
        Ok(())
    }
}
