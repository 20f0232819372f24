//! Where processed events go.
//!
//! Every configured [`Sink`] receives every event of a worker's pass,
//! already serialized once by the worker, and answers once it has written
//! them: an event is *published* when every sink wrote it. (The SSE stream
//! reads the published-events feed, [`crate::feed`], which the workers
//! append to after the sinks.)

mod log;
mod nats;
mod stdout;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{PublishSettings, SinkKind};
use crate::event::PublishedEvent;

pub use log::LogSink;
pub use nats::NatsSink;
pub use stdout::{StdoutSink, finish_line};

/// A published event together with its JSON form.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    /// The event.
    pub event: &'a PublishedEvent,
    /// Its arrival sequence.
    pub sequence: u64,
    /// Its JSON serialization, one line, no trailing newline.
    pub json: &'a str,
}

/// The events of one worker pass, in order, handed to every sink at once.
///
/// Their JSON lines sit in one shared buffer, so that a sink that writes
/// lines (stdout) can keep the pass's buffer rather than copy it.
#[derive(Debug, Clone, Copy)]
pub struct Publications<'a> {
    events: &'a [Publication<'a>],
    lines: &'a Arc<String>,
}

impl<'a> Publications<'a> {
    /// `lines` must be every event's `json`, in order, each followed by a
    /// newline (checked in debug builds).
    pub fn new(events: &'a [Publication<'a>], lines: &'a Arc<String>) -> Self {
        debug_assert_eq!(
            **lines,
            events.iter().fold(String::new(), |mut all, p| {
                all.push_str(p.json);
                all.push('\n');
                all
            }),
            "the lines must be the events' JSON, in order"
        );
        Self { events, lines }
    }

    /// The events.
    pub fn events(&self) -> &'a [Publication<'a>] {
        self.events
    }

    /// Every event's JSON, in order, each followed by a newline.
    pub fn lines(&self) -> &'a str {
        self.lines
    }

    /// The same lines, shared: a sink can keep them after the call.
    pub fn shared_lines(&self) -> Arc<String> {
        Arc::clone(self.lines)
    }

    /// How many events there are.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Why a sink could not take an event.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink has stopped (its writer is gone).
    #[error("sink `{0}` is closed")]
    Closed(&'static str),
    /// An earlier write failed and the sink takes nothing more.
    #[error("sink `{sink}` is broken: {reason}")]
    Broken {
        /// The sink's name.
        sink: &'static str,
        /// The failure that broke it.
        reason: String,
    },
    /// Writing failed.
    #[error("sink `{sink}` failed: {source}")]
    Io {
        /// The sink's name.
        sink: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A sink wrote only the first `written` events of a pass.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({written} of the pass's events written)")]
pub struct PublishError {
    /// Events of the pass, from its first, that were written whole.
    pub written: usize,
    /// Why the rest were not.
    #[source]
    pub error: SinkError,
}

impl From<SinkError> for PublishError {
    fn from(error: SinkError) -> Self {
        Self { written: 0, error }
    }
}

/// A destination for published events.
#[async_trait]
pub trait Sink: Send + Sync + fmt::Debug {
    /// Name used in configuration, logs and metrics labels.
    fn name(&self) -> &'static str;
    /// Writes events, in order (one call per pass a worker makes, so that a
    /// sink can write them together), and returns once they are written:
    /// handed to the destination, not merely buffered on the way.
    async fn publish(&self, publications: Publications<'_>) -> Result<(), PublishError>;
    /// Flushes the destination (at shutdown).
    async fn flush(&self) -> Result<(), SinkError>;
    /// Why the sink cannot write now, if it cannot (readiness and ingest
    /// answer 503 while a sink is broken).
    fn broken(&self) -> Option<String> {
        None
    }
}

/// Builds the sinks named in `publish.sinks` (connecting to NATS for the
/// `nats` sink).
pub async fn build_sinks(
    settings: &PublishSettings,
) -> Result<Vec<Arc<dyn Sink>>, crate::nats::ConnectError> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::with_capacity(settings.sinks.len());
    for kind in &settings.sinks {
        sinks.push(match kind {
            SinkKind::Stdout => Arc::new(StdoutSink::stdout()),
            SinkKind::Log => Arc::new(LogSink),
            SinkKind::Nats => {
                let client = crate::nats::connect(&settings.nats.url, "eventflow-sink").await?;
                Arc::new(NatsSink::new(client, &settings.nats.subject))
            }
        });
    }
    Ok(sinks)
}
