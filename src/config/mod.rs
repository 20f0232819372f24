//! Typed, layered settings.
//!
//! Precedence, lowest first: built-in defaults (`defaults.toml`, the one
//! place each is written) < optional TOML file (`--config PATH` or
//! `EVENTFLOW_CONFIG`) < `EVENTFLOW__SECTION__KEY` environment variables
//! (lists comma-separated, durations like `"30s"`). Each section is a
//! module with its keys and its own checks; [`Settings::validate`] runs
//! them, then the checks between sections. Every error names the
//! offending key so a bad deployment fails at start with a message an
//! operator can act on.

use std::path::Path;

use serde::Deserialize;

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

mod auth;
mod backend;
mod de;
mod pipeline;
mod publish;
mod server;
mod store;
mod subscriptions;
mod telemetry;
#[cfg(test)]
mod tests;

pub use auth::AuthSettings;
pub use backend::{BackendKind, BackendSettings, NatsPersistMode, NatsSettings, NatsStorage};
pub use pipeline::{PipelineSettings, TransformKind};
pub use publish::{NatsSinkSettings, PublishSettings, SinkKind};
pub use server::ServerSettings;
pub use store::StoreSettings;
pub use subscriptions::SubscriptionSettings;
pub use telemetry::{LogFormat, TelemetrySettings};

/// The built-in defaults.
const DEFAULTS: &str = include_str!("defaults.toml");

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
    /// Named subscriptions.
    pub subscriptions: SubscriptionSettings,
}

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
        let mut builder = config::Config::builder()
            .set_default("pipeline.workers", default_workers())?
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(environment);
        for key in empty_lists {
            builder = builder.set_override(key, Vec::<String>::new())?;
        }
        let built = builder.build()?;
        for (key, replacement) in backend::REMOVED_NATS_KEYS {
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

    /// Checks ranges and relations that types alone cannot express: each
    /// section's own, then those between sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.pipeline.validate()?;
        self.store.validate()?;
        self.publish.validate()?;
        self.backend.validate()?;
        self.telemetry.validate()?;
        self.subscriptions.validate()?;
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
        Ok(())
    }
}

/// An error naming `key`.
fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Refuses the first of `values` that is 0.
fn positive(values: &[(&'static str, usize)]) -> Result<(), ConfigError> {
    match values.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(invalid(key, "must be greater than 0")),
        None => Ok(()),
    }
}

/// Whether `text` is a NATS subject: dot-separated tokens without spaces,
/// control characters or wildcards.
fn is_subject(text: &str) -> bool {
    !text.is_empty()
        && !text.split('.').any(|token| {
            token.is_empty()
                || token
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
        })
}

/// Refuses `subject` (the value of `key`) unless it is a NATS subject.
fn nats_subject(key: &'static str, subject: &str) -> Result<(), ConfigError> {
    if is_subject(subject) {
        return Ok(());
    }
    Err(invalid(
        key,
        format!(
            "`{subject}` is not a NATS subject (dot-separated tokens without spaces, `*` or `>`)"
        ),
    ))
}

/// Refuses `urls` (the value of `key`) with an empty item.
fn nats_urls(key: &'static str, urls: &str) -> Result<(), ConfigError> {
    if urls.split(',').any(|url| url.trim().is_empty()) {
        return Err(invalid(
            key,
            format!(
                "`{urls}` must be a comma-separated list of servers like nats://127.0.0.1:4222"
            ),
        ));
    }
    Ok(())
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
