//! Typed, layered settings.
//!
//! Precedence, lowest first: built-in defaults < optional TOML file
//! (`--config PATH` or `EVENTFLOW_CONFIG`) < `EVENTFLOW__SECTION__KEY`
//! environment variables (lists comma-separated, durations like `"30s"`).
//! Every error names the offending key so a bad deployment fails at start
//! with a message an operator can act on.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Everything eventflow can be configured with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// HTTP listener and request limits.
    pub server: ServerSettings,
    /// Queue, workers and event limits.
    pub pipeline: PipelineSettings,
    /// Bounds of the in-memory event store.
    pub store: StoreSettings,
    /// Where processed events go.
    pub publish: PublishSettings,
    /// Logging.
    pub telemetry: TelemetrySettings,
    /// Where the store, queue and feed live.
    pub backend: BackendSettings,
    /// Bearer tokens.
    pub auth: AuthSettings,
}

/// `auth.*` keys: bearer tokens the API asks for (none = no auth).
///
/// The tokens are secrets: `Debug` shows `[REDACTED]` for each.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Tokens given inline (`EVENTFLOW__AUTH__TOKENS`, comma-separated).
    pub tokens: Vec<secrecy::SecretString>,
    /// A file of tokens, one a line (`#` comments), re-read on SIGHUP.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub tokens_file: Option<String>,
}

impl AuthSettings {
    /// Whether any request needs a token.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || self.tokens_file.is_some()
    }
}

/// `server.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Listen address, e.g. `0.0.0.0:8080`; port 0 picks a free port.
    pub addr: String,
    /// A second listener for health, readiness and metrics only; when set
    /// they are served there and not on `addr`.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub admin_addr: Option<String>,
    /// Largest body accepted by single-event requests.
    pub max_body_bytes: usize,
    /// Largest batch body, measured after gzip decompression.
    pub max_batch_body_bytes: usize,
    /// Connections open at once; past it new ones wait to be accepted.
    pub max_connections: usize,
    /// Connections one client address may hold (IPv6 by /64; trusted
    /// proxies exempt); past it its new ones are refused at accept. A value
    /// over `max_connections` leaves one client the whole cap.
    pub max_connections_per_client: usize,
    /// SSE subscribers at once (fewer than `max_connections`, so that
    /// subscribers can never take every slot from requests); past it 503.
    pub max_subscribers: usize,
    /// A connection whose next request head has not fully arrived after
    /// this long (idle between requests, or trickling a head), or whose
    /// client has not taken a write for this long, is closed.
    #[serde(deserialize_with = "duration::deserialize")]
    pub idle_timeout: Duration,
    /// Bytes of request bodies (as received and inflated) held in memory
    /// at once across all requests; past it requests get 503.
    pub max_inflight_body_bytes: usize,
    /// Bytes of answers (pages, lookups, SSE replays) held in memory at
    /// once, apart from the bodies' budget; past it readers get 503.
    pub max_inflight_answer_bytes: usize,
    /// Events one SSE subscriber may hold fetched and unsent, in bytes,
    /// beyond the line being sent.
    pub subscriber_buffer_bytes: usize,
    /// Upper bound for one request, including `?wait=published`.
    #[serde(deserialize_with = "duration::deserialize")]
    pub request_timeout: Duration,
    /// Time allowed to drain the pipeline after SIGINT/SIGTERM.
    #[serde(deserialize_with = "duration::deserialize")]
    pub shutdown_grace: Duration,
    /// Requests a second each client may make to the event routes
    /// (0 = no limit); a client is its bearer token, else its address.
    pub rate_limit_per_second: u32,
    /// Requests a client may make at once above its rate (0 = one
    /// second's worth).
    pub rate_limit_burst: u32,
    /// Proxies (addresses or CIDR networks) whose `X-Forwarded-For` names
    /// the client; from anyone else the header is ignored.
    #[serde(deserialize_with = "networks")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// After SIGINT/SIGTERM, how long readiness is 503 while the service
    /// still serves, so that load balancers stop sending before it stops
    /// accepting.
    #[serde(deserialize_with = "duration::deserialize")]
    pub shutdown_delay: Duration,
}

/// `pipeline.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Number of worker tasks.
    pub workers: usize,
    /// Maximum number of accepted, not yet published events.
    pub queue_capacity: usize,
    /// Maximum payload size of one event, in bytes.
    pub max_payload_bytes: usize,
    /// Maximum number of events in one batch request.
    pub max_batch: usize,
    /// Transform chain, applied in order.
    pub transforms: Vec<TransformKind>,
    /// Maximum bytes of queued (accepted, unpublished) events.
    pub queue_max_bytes: usize,
}

/// `store.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// Maximum number of records held; oldest processed are evicted first.
    pub max_events: usize,
    /// Maximum estimated bytes held by records.
    pub max_bytes: usize,
}

/// `publish.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSettings {
    /// Sinks every processed event is written to (the SSE stream is always on).
    pub sinks: Vec<SinkKind>,
    /// The `nats` sink's server and subject.
    pub nats: NatsSinkSettings,
}

/// `publish.nats.*` keys: the `nats` sink (memory mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkSettings {
    /// Server(s), comma-separated.
    pub url: String,
    /// Subject every published event is sent to.
    pub subject: String,
}

/// Declares a configuration enum read from lowercase names, whose error
/// for an unknown name lists the valid ones.
macro_rules! named_choice {
    ($(#[$doc:meta])* $name:ident, $what:literal, { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
        #[serde(try_from = "String")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every valid name, in order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name used in configuration.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(name: String) -> Result<Self, String> {
                match name.trim() {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        "unknown {} `{other}`; valid values: {}",
                        $what,
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }
    };
}

named_choice!(
    /// A configurable publishing destination (`publish.sinks`).
    SinkKind, "sink", {
        /// One JSON line per event on standard output.
        Stdout = "stdout",
        /// One `tracing` event per published event.
        Log = "log",
        /// One NATS message per published event (`publish.nats.*`).
        Nats = "nats",
    }
);

named_choice!(
    /// A step of the transform chain (`pipeline.transforms`); the chain
    /// itself is built in [`crate::pipeline::transform`].
    TransformKind, "transform", {
        /// Unicode-correct uppercase of the payload.
        Uppercase = "uppercase",
        /// Adds processing metadata.
        Enrich = "enrich",
        /// Fails events whose payload is not a JSON document.
        Json = "json",
    }
);

/// `telemetry.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `json` (default) or `pretty`.
    pub log_format: LogFormat,
    /// Default level directive; `RUST_LOG` wins when set.
    pub log_level: String,
    /// OTLP/gRPC collector, e.g. `http://jaeger:4317`; unset = no trace export.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (parent-based), 0.0..=1.0.
    pub sample_ratio: f64,
}

/// Addresses (`10.0.0.7`) or networks (`10.0.0.0/8`), as a list.
fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            let text = text.trim();
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{text}` is not an address or network like 10.0.0.0/8"
                    ))
                })
        })
        .collect()
}

fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(d)?;
    Ok(value.filter(|v| !v.trim().is_empty()))
}

named_choice!(
    /// Log line format on stderr.
    LogFormat, "log format", {
        /// One JSON object per line.
        Json = "json",
        /// Human-readable, multi-line (coloured on a terminal).
        Pretty = "pretty",
    }
);

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
    /// Durable pull consumer on the backlog, shared by every replica's workers.
    pub consumer: String,
    /// Copies of each stream in a cluster (1, 3 or 5).
    pub replicas: usize,
    /// `file` or `memory`.
    pub storage: NatsStorage,
    /// Bytes of accepted, unpublished events; a full backlog refuses new
    /// ones (503) and never drops one.
    pub backlog_max_bytes: i64,
    /// Bytes of published (and, apart, of failed) events kept for reads,
    /// SSE resume and retry; the oldest are dropped first.
    pub history_max_bytes: i64,
    /// How long published and failed events are kept.
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
const REMOVED_NATS_KEYS: [(&str, &str); 6] = [
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

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The sources could not be read or did not deserialize.
    #[error("invalid configuration: {0}")]
    Source(#[from] config::ConfigError),
    /// A value parsed but is out of its allowed range.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The dotted key, e.g. `pipeline.queue_capacity`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// Comma-separated list keys when given through the environment.
const LIST_KEYS: [&str; 4] = [
    "pipeline.transforms",
    "publish.sinks",
    "auth.tokens",
    "server.trusted_proxies",
];

impl Settings {
    /// Loads settings from defaults, an optional file and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Loads settings with an explicit environment (testable without touching the process env).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("EVENTFLOW__"))
            .collect();
        // An empty list variable means an empty list (e.g. no sinks), which
        // the list parser would otherwise read as one empty item.
        let mut empty_lists: Vec<&'static str> = Vec::new();
        for key in LIST_KEYS {
            let var = format!("EVENTFLOW__{}", key.replace('.', "__").to_uppercase());
            if env.get(&var).is_some_and(|v| v.trim().is_empty()) {
                env.remove(&var);
                empty_lists.push(key);
            }
        }
        let mut environment = config::Environment::with_prefix("EVENTFLOW")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(env));
        for key in LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        let mut builder = defaults(config::Config::builder())?;
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(environment);
        for key in empty_lists {
            builder = builder.set_override(key, Vec::<String>::new())?;
        }
        let built = builder.build()?;
        for (key, replacement) in REMOVED_NATS_KEYS {
            if built.get::<config::Value>(key).is_ok() {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("was removed; set {replacement} instead"),
                });
            }
        }
        let settings: Settings = built.try_deserialize().map_err(redact_secrets)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks ranges and relations that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        self.server.socket_addr()?;
        let positive = [
            ("server.max_body_bytes", self.server.max_body_bytes),
            (
                "server.max_batch_body_bytes",
                self.server.max_batch_body_bytes,
            ),
            ("server.max_connections", self.server.max_connections),
            ("server.max_subscribers", self.server.max_subscribers),
            (
                "server.max_connections_per_client",
                self.server.max_connections_per_client,
            ),
            (
                "server.max_inflight_answer_bytes",
                self.server.max_inflight_answer_bytes,
            ),
            (
                "server.subscriber_buffer_bytes",
                self.server.subscriber_buffer_bytes,
            ),
            ("pipeline.workers", self.pipeline.workers),
            ("pipeline.queue_capacity", self.pipeline.queue_capacity),
            (
                "pipeline.max_payload_bytes",
                self.pipeline.max_payload_bytes,
            ),
            ("pipeline.max_batch", self.pipeline.max_batch),
            ("pipeline.queue_max_bytes", self.pipeline.queue_max_bytes),
            ("store.max_events", self.store.max_events),
            ("store.max_bytes", self.store.max_bytes),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        // A gzip batch holds its compressed and its inflated bytes (and so
        // may a gzip single event), or a request that fits its own limit
        // could be refused for the budget forever.
        let largest_body = self
            .server
            .max_batch_body_bytes
            .max(self.server.max_body_bytes);
        if self.server.max_inflight_body_bytes / 3 < largest_body {
            return Err(invalid(
                "server.max_inflight_body_bytes",
                format!(
                    "must be at least {} (three times the larger of server.max_batch_body_bytes \
                     and server.max_body_bytes, {largest_body}), got {}",
                    largest_body.saturating_mul(3),
                    self.server.max_inflight_body_bytes
                ),
            ));
        }
        // The largest lookup (an event and its result, every byte escaped)
        // must fit the answers' budget, or it could never be answered.
        let largest_answer = largest_record_answer(self.pipeline.max_payload_bytes);
        if self.server.max_inflight_answer_bytes < largest_answer {
            return Err(invalid(
                "server.max_inflight_answer_bytes",
                format!(
                    "must be at least {largest_answer} (the largest answer an event of \
                     pipeline.max_payload_bytes = {} can make), got {}",
                    self.pipeline.max_payload_bytes, self.server.max_inflight_answer_bytes
                ),
            ));
        }
        if self.pipeline.workers > 1024 {
            return Err(invalid("pipeline.workers", "must be at most 1024"));
        }
        // Semaphore permits are limited to usize::MAX >> 3 by tokio.
        if self.pipeline.queue_capacity > 1 << 30 {
            return Err(invalid("pipeline.queue_capacity", "must be at most 2^30"));
        }
        if self.pipeline.queue_max_bytes > 1 << 40 {
            return Err(invalid("pipeline.queue_max_bytes", "must be at most 2^40"));
        }
        // Pending events can never be evicted, so the store must be able to
        // hold a full queue or accepted events could find no place.
        if self.store.max_events < self.pipeline.queue_capacity {
            return Err(invalid(
                "store.max_events",
                format!(
                    "must be at least pipeline.queue_capacity ({})",
                    self.pipeline.queue_capacity
                ),
            ));
        }
        if self.store.max_bytes < self.pipeline.queue_max_bytes {
            return Err(invalid(
                "store.max_bytes",
                format!(
                    "must be at least pipeline.queue_max_bytes ({})",
                    self.pipeline.queue_max_bytes
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                format!(
                    "must be between 0.0 and 1.0, got {}",
                    self.telemetry.sample_ratio
                ),
            ));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("`{endpoint}` must be an http:// or https:// URL"),
            ));
        }
        if self.server.request_timeout.is_zero() {
            return Err(invalid("server.request_timeout", "must be greater than 0"));
        }
        const DAY: Duration = Duration::from_secs(86_400);
        for (key, value) in [
            ("server.request_timeout", self.server.request_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
        ] {
            if value > DAY {
                return Err(invalid(key, "must be at most a day"));
            }
        }
        if self.server.max_subscribers >= self.server.max_connections {
            return Err(invalid(
                "server.max_subscribers",
                format!(
                    "must be less than server.max_connections ({}): subscribers may not take every connection",
                    self.server.max_connections
                ),
            ));
        }
        if self.server.idle_timeout.is_zero() {
            return Err(invalid("server.idle_timeout", "must be greater than 0"));
        }
        if !self.server.shutdown_delay.is_zero()
            && self.server.shutdown_delay >= self.server.shutdown_grace
        {
            return Err(invalid(
                "server.shutdown_delay",
                format!(
                    "must be shorter than server.shutdown_grace ({:?}), which counts from the signal",
                    self.server.shutdown_grace
                ),
            ));
        }
        if let Some(admin) = self.server.admin_socket_addr()?
            && admin.port() != 0
            && admin == self.server.socket_addr()?
        {
            return Err(invalid(
                "server.admin_addr",
                "must differ from server.addr (it is a second listener)",
            ));
        }
        self.validate_backend()?;
        check_log_level(&self.telemetry.log_level)
            .map_err(|message| invalid("telemetry.log_level", message))?;
        Ok(())
    }
}

impl Settings {
    fn validate_backend(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        let nats = &self.backend.nats;
        if self.backend.kind == BackendKind::Nats && self.publish.sinks.contains(&SinkKind::Nats) {
            return Err(invalid(
                "publish.sinks",
                format!(
                    "the `nats` sink is for memory mode: with backend.kind = \"nats\" the \
                     stream `{}` (subjects `{}.published.>`) already carries every published event",
                    nats.published_stream, nats.subject_prefix
                ),
            ));
        }
        let urls = [
            ("backend.nats_url", &self.backend.nats_url),
            ("publish.nats.url", &self.publish.nats.url),
        ];
        for (key, urls) in urls {
            if urls.split(',').any(|url| url.trim().is_empty()) {
                return Err(invalid(
                    key,
                    format!(
                        "`{urls}` must be a comma-separated list of servers like nats://127.0.0.1:4222"
                    ),
                ));
            }
        }
        let subject_like = |text: &str| {
            !text.is_empty()
                && !text.split('.').any(|token| {
                    token.is_empty()
                        || token
                            .chars()
                            .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
                })
        };
        for (key, subject) in [
            ("backend.nats.subject_prefix", &nats.subject_prefix),
            ("publish.nats.subject", &self.publish.nats.subject),
        ] {
            if !subject_like(subject) {
                return Err(invalid(
                    key,
                    format!(
                        "`{subject}` is not a NATS subject (dot-separated tokens without spaces, `*` or `>`)"
                    ),
                ));
            }
        }
        for (key, name) in [
            ("backend.nats.ids_stream", &nats.ids_stream),
            ("backend.nats.backlog_stream", &nats.backlog_stream),
            ("backend.nats.published_stream", &nats.published_stream),
            ("backend.nats.failed_stream", &nats.failed_stream),
            ("backend.nats.consumer", &nats.consumer),
        ] {
            if !subject_like(name) || name.contains('.') {
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
        ];
        if streams
            .iter()
            .enumerate()
            .any(|(i, a)| streams[..i].contains(a))
        {
            return Err(invalid(
                "backend.nats.ids_stream",
                "the four streams (ids, backlog, published, failed) need four different names",
            ));
        }
        if ![1, 3, 5].contains(&nats.replicas) {
            return Err(invalid("backend.nats.replicas", "must be 1, 3 or 5"));
        }
        for (key, value) in [
            ("backend.nats.backlog_max_bytes", nats.backlog_max_bytes),
            ("backend.nats.history_max_bytes", nats.history_max_bytes),
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

/// A deserialization error about `auth.*` may quote a token (a string
/// given where a list belongs): say what is wrong without the value.
fn redact_secrets(error: config::ConfigError) -> ConfigError {
    let text = error.to_string();
    if text.contains("auth.tokens") && !text.contains("auth.tokens_file") {
        return ConfigError::Invalid {
            key: "auth.tokens",
            message: "must be a list of tokens (in the environment, comma-separated); \
                      the value given is not shown"
                .to_owned(),
        };
    }
    ConfigError::Source(error)
}

/// Level names a directive may end in.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Whether `filter` is a level (`info`) or directives that each name one
/// (`info,eventflow=debug`). A bare word that is not a level would parse as
/// a target shown at every level, and every other log line would be off:
/// `verbose` or `infoo` started the service with no logs at all.
fn check_log_level(filter: &str) -> Result<(), String> {
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}` names no level: use one of {} (say `info`), or directives \
                 like `info,eventflow=debug`",
                LEVELS.join(", ")
            ));
        }
    }
    if filter
        .parse::<tracing_subscriber::filter::EnvFilter>()
        .is_err()
    {
        return Err(format!("`{filter}` is not a valid level directive"));
    }
    Ok(())
}

/// Durations are strings with a unit (`"30s"`, `"250ms"`, `"1m 30s"`), read
/// by `humantime`; a bare number is refused with a message saying so, since
/// its unit would be a guess.
mod duration {
    use std::time::Duration;

    use serde::Deserialize;

    /// A value as TOML or the environment gives it.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Integer(i64),
        Float(f64),
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        let text = match Raw::deserialize(d)? {
            Raw::Text(text) => text,
            Raw::Integer(n) => n.to_string(),
            Raw::Float(x) => x.to_string(),
        };
        let text = text.trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(serde::de::Error::custom(format!(
                "`{text}` has no unit: durations are strings like \"{text}s\" or \"250ms\""
            )));
        }
        humantime::parse_duration(text).map_err(|error| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({error}): durations are strings like \"30s\" or \"250ms\""
            ))
        })
    }
}

impl ServerSettings {
    /// The listen address, parsed.
    pub fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.addr.parse().map_err(|_| ConfigError::Invalid {
            key: "server.addr",
            message: format!("`{}` is not a socket address like 0.0.0.0:8080", self.addr),
        })
    }

    /// The admin listener's address, parsed, when one is configured.
    pub fn admin_socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(admin) = &self.admin_addr else {
            return Ok(None);
        };
        admin.parse().map(Some).map_err(|_| ConfigError::Invalid {
            key: "server.admin_addr",
            message: format!("`{admin}` is not a socket address like 0.0.0.0:8081"),
        })
    }
}

/// The largest answer one event can make (`GET /events/{id}`: the event and
/// its published result, every byte of id and payload escaped as `\u00XX`,
/// which also covers uppercase's growth, plus their metadata).
pub fn largest_record_answer(max_payload_bytes: usize) -> usize {
    12usize
        .saturating_mul(max_payload_bytes.saturating_add(crate::event::MAX_ID_BYTES))
        .saturating_add(4096)
}

fn default_workers() -> i64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as i64)
}

fn defaults(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    builder
        .set_default("server.addr", "0.0.0.0:8080")?
        .set_default("server.max_body_bytes", 1_048_576)?
        .set_default("server.max_batch_body_bytes", 16_777_216)?
        .set_default("server.max_inflight_body_bytes", 134_217_728)?
        .set_default("server.max_connections", 10_000)?
        .set_default("server.max_subscribers", 1_000)?
        .set_default("server.max_connections_per_client", 512)?
        .set_default("server.max_inflight_answer_bytes", 67_108_864)?
        .set_default("server.subscriber_buffer_bytes", 1_048_576)?
        .set_default("server.idle_timeout", "60s")?
        .set_default("server.request_timeout", "10s")?
        .set_default("server.shutdown_grace", "30s")?
        .set_default("server.shutdown_delay", "0s")?
        .set_default("server.rate_limit_per_second", 0)?
        .set_default("server.rate_limit_burst", 0)?
        .set_default("server.trusted_proxies", Vec::<String>::new())?
        .set_default("auth.tokens", Vec::<String>::new())?
        .set_default("pipeline.workers", default_workers())?
        .set_default("pipeline.queue_capacity", 65_536)?
        .set_default("pipeline.max_payload_bytes", 65_536)?
        .set_default("pipeline.max_batch", 10_000)?
        .set_default("pipeline.transforms", vec!["uppercase", "enrich"])?
        .set_default("pipeline.queue_max_bytes", 268_435_456_i64)?
        .set_default("store.max_events", 1_000_000)?
        .set_default("store.max_bytes", 1_073_741_824_i64)?
        .set_default("publish.sinks", vec!["stdout"])?
        .set_default("publish.nats.url", "nats://127.0.0.1:4222")?
        .set_default("publish.nats.subject", "eventflow.published")?
        .set_default("backend.kind", "memory")?
        .set_default("backend.nats_url", "nats://127.0.0.1:4222")?
        .set_default("backend.nats.subject_prefix", "eventflow")?
        .set_default("backend.nats.ids_stream", "EVENTFLOW_IDS")?
        .set_default("backend.nats.backlog_stream", "EVENTFLOW_BACKLOG")?
        .set_default("backend.nats.published_stream", "EVENTFLOW_PUBLISHED")?
        .set_default("backend.nats.failed_stream", "EVENTFLOW_FAILED")?
        .set_default("backend.nats.consumer", "eventflow-workers")?
        .set_default("backend.nats.replicas", 1)?
        .set_default("backend.nats.storage", "file")?
        .set_default("backend.nats.backlog_max_bytes", 1_073_741_824_i64)?
        .set_default("backend.nats.history_max_bytes", 1_073_741_824_i64)?
        .set_default("backend.nats.history_max_age", "7d")?
        .set_default("backend.nats.idempotency_window", "24h")?
        .set_default("backend.nats.idempotency_max_bytes", 1_073_741_824_i64)?
        .set_default("backend.nats.ack_wait", "5s")?
        .set_default("backend.nats.max_ack_pending", 20_000)?
        .set_default("backend.nats.max_deliver", 10)?
        .set_default("telemetry.log_format", "json")?
        .set_default("telemetry.log_level", "info")?
        .set_default("telemetry.sample_ratio", 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_match_the_design() {
        let s = load(&[]).unwrap();
        assert_eq!(s.server.addr, "0.0.0.0:8080");
        assert_eq!(s.server.max_body_bytes, 1_048_576);
        assert_eq!(s.server.max_batch_body_bytes, 16_777_216);
        assert_eq!(s.server.max_inflight_body_bytes, 134_217_728);
        assert_eq!(s.server.max_connections, 10_000);
        assert_eq!(s.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(s.server.request_timeout, Duration::from_secs(10));
        assert_eq!(s.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(s.server.shutdown_delay, Duration::ZERO);
        assert_eq!(s.server.admin_addr, None);
        assert_eq!(s.server.rate_limit_per_second, 0);
        assert_eq!(s.server.max_subscribers, 1_000);
        assert_eq!(s.server.max_connections_per_client, 512);
        assert_eq!(s.server.max_inflight_answer_bytes, 64 << 20);
        assert_eq!(s.server.subscriber_buffer_bytes, 1 << 20);
        assert!(s.server.trusted_proxies.is_empty());
        assert!(s.auth.tokens.is_empty());
        assert_eq!(s.auth.tokens_file, None);
        assert!(!s.auth.enabled());
        assert!(s.pipeline.workers >= 1);
        assert_eq!(s.pipeline.queue_capacity, 65_536);
        assert_eq!(s.pipeline.max_payload_bytes, 65_536);
        assert_eq!(s.pipeline.max_batch, 10_000);
        assert_eq!(
            s.pipeline.transforms,
            vec![TransformKind::Uppercase, TransformKind::Enrich]
        );
        assert_eq!(s.pipeline.queue_max_bytes, 268_435_456);
        assert_eq!(s.store.max_events, 1_000_000);
        assert_eq!(s.store.max_bytes, 1_073_741_824);
        assert_eq!(s.publish.sinks, vec![SinkKind::Stdout]);
        assert_eq!(s.telemetry.log_format, LogFormat::Json);
        assert_eq!(s.telemetry.log_level, "info");
        assert_eq!(s.telemetry.otlp_endpoint, None);
        assert_eq!(s.telemetry.sample_ratio, 1.0);
    }

    #[test]
    fn environment_overrides_with_lists_and_durations() {
        let s = load(&[
            ("EVENTFLOW__PIPELINE__WORKERS", "3"),
            ("EVENTFLOW__PUBLISH__SINKS", "stdout,log"),
            ("EVENTFLOW__PIPELINE__TRANSFORMS", "enrich"),
            ("EVENTFLOW__SERVER__SHUTDOWN_GRACE", "2s"),
            ("EVENTFLOW__TELEMETRY__LOG_FORMAT", "pretty"),
        ])
        .unwrap();
        assert_eq!(s.pipeline.workers, 3);
        assert_eq!(s.publish.sinks, vec![SinkKind::Stdout, SinkKind::Log]);
        assert_eq!(s.pipeline.transforms, vec![TransformKind::Enrich]);
        assert_eq!(s.server.shutdown_grace, Duration::from_secs(2));
        assert_eq!(s.telemetry.log_format, LogFormat::Pretty);
        let s = load(&[
            (
                "EVENTFLOW__TELEMETRY__OTLP_ENDPOINT",
                "http://127.0.0.1:4317",
            ),
            ("EVENTFLOW__TELEMETRY__SAMPLE_RATIO", "0.01"),
        ])
        .unwrap();
        assert_eq!(
            s.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(s.telemetry.sample_ratio, 0.01);
        let s = load(&[("EVENTFLOW__PUBLISH__SINKS", "")]).unwrap();
        assert!(
            s.publish.sinks.is_empty(),
            "an empty list variable is an empty list"
        );
        let s = load(&[("EVENTFLOW__TELEMETRY__OTLP_ENDPOINT", "")]).unwrap();
        assert_eq!(s.telemetry.otlp_endpoint, None, "empty means unset");
    }

    #[test]
    fn file_is_layered_under_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eventflow.toml");
        std::fs::write(
            &path,
            "[pipeline]\nworkers = 7\nqueue_capacity = 10\n[server]\naddr = \"127.0.0.1:9999\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&path),
            [("EVENTFLOW__PIPELINE__WORKERS".to_string(), "2".to_string())],
        )
        .unwrap();
        assert_eq!(s.pipeline.workers, 2);
        assert_eq!(s.pipeline.queue_capacity, 10);
        assert_eq!(s.server.addr, "127.0.0.1:9999");
    }

    #[test]
    fn errors_name_the_key() {
        let cases: [(&str, &str, &str); 22] = [
            ("EVENTFLOW__PIPELINE__WORKERS", "lots", "pipeline.workers"),
            (
                "EVENTFLOW__PIPELINE__QUEUE_CAPACITY",
                "0",
                "pipeline.queue_capacity",
            ),
            ("EVENTFLOW__SERVER__ADDR", "not an address", "server.addr"),
            (
                "EVENTFLOW__SERVER__SHUTDOWN_GRACE",
                "soon",
                "server.shutdown_grace",
            ),
            ("EVENTFLOW__PUBLISH__SINKS", "stdout,kafka", "publish.sinks"),
            (
                "EVENTFLOW__PIPELINE__TRANSFORMS",
                "reverse",
                "pipeline.transforms",
            ),
            ("EVENTFLOW__STORE__MAX_EVENTS", "10", "store.max_events"),
            (
                "EVENTFLOW__TELEMETRY__LOG_FORMAT",
                "xml",
                "telemetry.log_format",
            ),
            (
                "EVENTFLOW__TELEMETRY__SAMPLE_RATIO",
                "1.5",
                "telemetry.sample_ratio",
            ),
            (
                "EVENTFLOW__TELEMETRY__OTLP_ENDPOINT",
                "jaeger:4317",
                "telemetry.otlp_endpoint",
            ),
            (
                "EVENTFLOW__SERVER__IDLE_TIMEOUT",
                "0s",
                "server.idle_timeout",
            ),
            (
                "EVENTFLOW__SERVER__SHUTDOWN_DELAY",
                "30s",
                "server.shutdown_delay",
            ),
            (
                "EVENTFLOW__SERVER__TRUSTED_PROXIES",
                "10.0.0.0/8,nginx",
                "server.trusted_proxies",
            ),
            (
                "EVENTFLOW__SERVER__ADMIN_ADDR",
                "localhost",
                "server.admin_addr",
            ),
            (
                "EVENTFLOW__SERVER__ADMIN_ADDR",
                "0.0.0.0:8080",
                "server.admin_addr",
            ),
            (
                "EVENTFLOW__SERVER__IDLE_TIMEOUT",
                "2days",
                "server.idle_timeout",
            ),
            (
                "EVENTFLOW__SERVER__REQUEST_TIMEOUT",
                "2days",
                "server.request_timeout",
            ),
            (
                "EVENTFLOW__SERVER__MAX_INFLIGHT_BODY_BYTES",
                "1000",
                "server.max_inflight_body_bytes",
            ),
            (
                "EVENTFLOW__SERVER__MAX_INFLIGHT_ANSWER_BYTES",
                "0",
                "server.max_inflight_answer_bytes",
            ),
            (
                "EVENTFLOW__SERVER__MAX_INFLIGHT_ANSWER_BYTES",
                "100000",
                "server.max_inflight_answer_bytes",
            ),
            (
                "EVENTFLOW__SERVER__SUBSCRIBER_BUFFER_BYTES",
                "0",
                "server.subscriber_buffer_bytes",
            ),
            (
                "EVENTFLOW__SERVER__MAX_CONNECTIONS_PER_CLIENT",
                "0",
                "server.max_connections_per_client",
            ),
        ];
        for (var, value, key) in cases {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{var}={value}: `{err}` does not name {key}"
            );
        }
    }

    #[test]
    fn errors_speak_the_users_language() {
        let message = |env: &[(&str, &str)]| load(env).unwrap_err().to_string();
        let err = message(&[("EVENTFLOW__PIPELINE__TRANSFORMS", "uppercase,rot13")]);
        assert!(
            err.contains("unknown transform `rot13`; valid values: uppercase, enrich, json"),
            "{err}"
        );
        let err = message(&[("EVENTFLOW__PUBLISH__SINKS", "kafka")]);
        assert!(err.contains("valid values: stdout, log"), "{err}");
        let err = message(&[("EVENTFLOW__TELEMETRY__LOG_FORMAT", "xml")]);
        assert!(err.contains("valid values: json, pretty"), "{err}");
        // The real minimum: three times the 16 MiB batch limit.
        let err = message(&[("EVENTFLOW__SERVER__MAX_INFLIGHT_BODY_BYTES", "1000")]);
        assert!(err.contains("must be at least 50331648"), "{err}");
        let err = message(&[("EVENTFLOW__SERVER__REQUEST_TIMEOUT", "5")]);
        assert!(err.contains(r#"durations are strings like "5s""#), "{err}");
        assert!(err.contains("server.request_timeout"), "{err}");
    }

    #[test]
    fn a_bare_number_for_a_duration_in_toml_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eventflow.toml");
        std::fs::write(&path, "[server]\nrequest_timeout = 5\n").unwrap();
        let err = Settings::load_from(Some(&path), std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(err.contains(r#"durations are strings like "5s""#), "{err}");
        assert!(err.contains("request_timeout"), "{err}");
        std::fs::write(&path, "[server]\nrequest_timeout = \"2s 500ms\"\n").unwrap();
        let s = Settings::load_from(Some(&path), std::iter::empty()).unwrap();
        assert_eq!(s.server.request_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = load(&[("EVENTFLOW__PIPELINE__WORKRES", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("workres"), "{err}");
    }

    #[test]
    fn the_backend_is_memory_unless_nats_is_chosen() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.backend.kind, BackendKind::Memory);
        assert_eq!(settings.backend.nats.max_deliver, 10);
        let settings = load(&[
            ("EVENTFLOW__BACKEND__KIND", "nats"),
            (
                "EVENTFLOW__BACKEND__NATS_URL",
                "nats://a:4222,nats://b:4222",
            ),
            ("EVENTFLOW__BACKEND__NATS__ACK_WAIT", "10s"),
            ("EVENTFLOW__BACKEND__NATS__REPLICAS", "3"),
        ])
        .unwrap();
        assert_eq!(settings.backend.kind, BackendKind::Nats);
        assert_eq!(settings.backend.nats.ack_wait, Duration::from_secs(10));
        assert_eq!(settings.backend.nats.replicas, 3);
        let error = load(&[("EVENTFLOW__BACKEND__KIND", "kafka")]).unwrap_err();
        assert!(
            error.to_string().contains("valid values: memory, nats"),
            "{error}"
        );
    }

    #[test]
    fn the_nats_sink_is_refused_in_nats_mode_with_the_reason() {
        assert!(load(&[("EVENTFLOW__PUBLISH__SINKS", "stdout,nats")]).is_ok());
        let error = load(&[
            ("EVENTFLOW__BACKEND__KIND", "nats"),
            ("EVENTFLOW__PUBLISH__SINKS", "stdout,nats"),
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("publish.sinks"), "{error}");
        assert!(error.contains("EVENTFLOW_PUBLISHED"), "{error}");
    }

    #[test]
    fn bad_nats_settings_name_their_key() {
        for (key, value, named) in [
            (
                "EVENTFLOW__BACKEND__NATS__REPLICAS",
                "2",
                "backend.nats.replicas",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__IDS_STREAM",
                "a.b",
                "backend.nats.ids_stream",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__BACKLOG_STREAM",
                "EVENTFLOW_PUBLISHED",
                "four different names",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__SUBJECT_PREFIX",
                "a b",
                "backend.nats.subject_prefix",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__MAX_DELIVER",
                "0",
                "backend.nats.max_deliver",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__ACK_WAIT",
                "500ms",
                "backend.nats.ack_wait",
            ),
            (
                "EVENTFLOW__BACKEND__NATS_URL",
                "nats://a:1,",
                "backend.nats_url",
            ),
            (
                "EVENTFLOW__PUBLISH__NATS__SUBJECT",
                "x.>",
                "publish.nats.subject",
            ),
        ] {
            let error = load(&[(key, value)]).unwrap_err().to_string();
            assert!(error.contains(named), "{key}={value}: {error}");
        }
    }

    #[test]
    fn keys_of_the_earlier_nats_layout_are_refused_naming_their_replacements() {
        for (variable, key, replacement) in [
            (
                "EVENTFLOW__BACKEND__NATS__MAX_BYTES",
                "backend.nats.max_bytes",
                "backend.nats.backlog_max_bytes",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__MAX_AGE",
                "backend.nats.max_age",
                "backend.nats.idempotency_window",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__PUBLISHED_MAX_BYTES",
                "backend.nats.published_max_bytes",
                "backend.nats.history_max_bytes",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__PUBLISHED_MAX_AGE",
                "backend.nats.published_max_age",
                "backend.nats.history_max_age",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__EVENTS_STREAM",
                "backend.nats.events_stream",
                "backend.nats.ids_stream",
            ),
            (
                "EVENTFLOW__BACKEND__NATS__DUPLICATE_WINDOW",
                "backend.nats.duplicate_window",
                "fenced",
            ),
        ] {
            let error = load(&[(variable, "7d")]).unwrap_err().to_string();
            assert!(error.contains(key), "{variable}: {error}");
            assert!(error.contains("was removed"), "{variable}: {error}");
            assert!(error.contains(replacement), "{variable}: {error}");
        }
        // In a file as well.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eventflow.toml");
        std::fs::write(&path, "[backend.nats]\nmax_bytes = 1024\n").unwrap();
        let error = Settings::load_from(Some(&path), std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(error.contains("backend.nats.backlog_max_bytes"), "{error}");
    }

    #[test]
    fn a_log_level_that_names_no_level_is_refused() {
        for bad in ["verbose", "infoo", "info,eventflow", "eventflow=loud"] {
            let error = load(&[("EVENTFLOW__TELEMETRY__LOG_LEVEL", bad)])
                .unwrap_err()
                .to_string();
            assert!(error.contains("telemetry.log_level"), "{bad}: {error}");
            assert!(error.contains("names no level"), "{bad}: {error}");
        }
        for good in [
            "info",
            "WARN",
            "info,eventflow=debug",
            "eventflow::api=trace,off",
        ] {
            assert!(
                load(&[("EVENTFLOW__TELEMETRY__LOG_LEVEL", good)]).is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn a_token_given_where_a_list_belongs_is_not_shown_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eventflow.toml");
        let secret = "s3cret-token-value-0123456789";
        std::fs::write(&path, format!("[auth]\ntokens = \"{secret}\"\n")).unwrap();
        let error = Settings::load_from(Some(&path), std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(error.contains("auth.tokens"), "{error}");
        assert!(!error.contains(secret), "the token leaked: {error}");
    }
}
