//! Logging setup and trace identity.
//!
//! Logs are `tracing` events written to **stderr** (stdout belongs to the
//! published events), as JSON lines by default.

mod trace_id;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetrySettings};

pub use trace_id::TraceId;

/// Installs the global subscriber; `RUST_LOG` overrides `telemetry.log_level`.
pub fn init_subscriber(settings: &TelemetrySettings) -> anyhow::Result<()> {
    init_with_writer(settings, BoxMakeWriter::new(std::io::stderr))
}

/// Installs the global subscriber writing to `writer` (tests use a sink).
pub fn init_with_writer(settings: &TelemetrySettings, writer: BoxMakeWriter) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives)?,
        _ => EnvFilter::try_new(&settings.log_level)?,
    };
    let registry = tracing_subscriber::registry();
    match settings.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer)
                    .with_filter(filter),
            )
            .try_init()?,
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .pretty()
                    .with_writer(writer)
                    .with_filter(filter),
            )
            .try_init()?,
    }
    Ok(())
}

use tracing_subscriber::Layer as _;
