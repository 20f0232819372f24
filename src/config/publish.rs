//! `publish.*`: the sinks and the `nats` sink's server.

use serde::Deserialize;

use super::{ConfigError, nats_subject, nats_urls};

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

impl PublishSettings {
    /// Checks the `nats` sink's servers and subject.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        nats_urls("publish.nats.url", &self.nats.url)?;
        nats_subject("publish.nats.subject", &self.nats.subject)
    }
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
