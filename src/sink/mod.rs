//! Where processed events go.
//!
//! Every configured [`Sink`] receives every published event, already
//! serialized once by the worker. The SSE stream is fed separately by
//! [`EventBroadcast`] because it is always on and must never slow the
//! pipeline.

mod broadcast;
mod log;
mod stdout;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::SinkKind;
use crate::event::PublishedEvent;

pub use broadcast::{EventBroadcast, INLINE_LINE_MAX, StreamLine, StreamMessage};
pub use log::LogSink;
pub use stdout::StdoutSink;

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

/// A destination for published events.
#[async_trait]
pub trait Sink: Send + Sync + fmt::Debug {
    /// Name used in configuration, logs and metrics labels.
    fn name(&self) -> &'static str;
    /// Hands events to the sink, in order: one call per pass a worker
    /// makes, so that a sink can write them together.
    async fn publish(&self, publications: Publications<'_>) -> Result<(), SinkError>;
    /// Makes everything published so far durable at the destination.
    async fn flush(&self) -> Result<(), SinkError>;
    /// Events this sink took in earlier calls but then failed to deliver
    /// (a buffered write that failed later), since the last call: counted
    /// as publish errors.
    fn take_lost(&self) -> usize {
        0
    }
}

/// Builds the sinks named in `publish.sinks`.
pub fn build_sinks(kinds: &[SinkKind]) -> Vec<Arc<dyn Sink>> {
    kinds
        .iter()
        .map(|kind| -> Arc<dyn Sink> {
            match kind {
                SinkKind::Stdout => Arc::new(StdoutSink::stdout()),
                SinkKind::Log => Arc::new(LogSink),
            }
        })
        .collect()
}
