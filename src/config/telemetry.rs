//! `telemetry.*`: logs and traces.

use serde::Deserialize;

use super::de::empty_as_none;
use super::{ConfigError, invalid};

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

impl TelemetrySettings {
    /// Checks the sample ratio, the collector's URL and the log level.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                format!("must be between 0.0 and 1.0, got {}", self.sample_ratio),
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("`{endpoint}` must be an http:// or https:// URL"),
            ));
        }
        check_log_level(&self.log_level).map_err(|message| invalid("telemetry.log_level", message))
    }
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
