//! The transform chain: small, ordered steps applied to every event.
//!
//! A new transform is one file implementing [`Transform`], plus one variant
//! of [`TransformKind`] (in [`crate::config`], which names transforms the way
//! it names sinks) built in [`build`].

mod enrich;
mod json;
mod uppercase;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::TransformKind;
use crate::event::PublishedEvent;
use crate::trace_id::TraceId;

pub use enrich::Enrich;
pub use json::Json;
pub use uppercase::Uppercase;

/// What a transform knows about the event beyond its fields.
///
/// Transforms must be pure functions of the event and this context (the
/// clock reading is `processed_at`, not a call to `now()`): the store keeps
/// only the context and re-derives the published event when it is read.
#[derive(Debug, Clone)]
pub struct TransformContext {
    /// The worker running the chain.
    pub worker: u32,
    /// Arrival sequence of the event.
    pub sequence: u64,
    /// When the event was accepted.
    pub received_at: SystemTime,
    /// When the chain ran.
    pub processed_at: SystemTime,
    /// From acceptance until the chain ran (`processed_at - received_at`).
    pub queue_wait: Duration,
    /// Trace id of the ingesting request.
    pub trace_id: TraceId,
}

/// Why a transform could not process an event; the event is marked failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transform `{transform}` failed: {reason}")]
pub struct TransformError {
    /// The transform's name.
    pub transform: &'static str,
    /// What went wrong.
    pub reason: String,
}

/// One step of the chain.
///
/// A transform must be a pure function of the event and the
/// [`TransformContext`]: the store keeps the context, not the result, and
/// re-runs the chain to answer `GET /events/{id}` and SSE replays, which
/// must show what the sinks received.
pub trait Transform: Send + Sync + fmt::Debug {
    /// Short name used in configuration and logs.
    fn name(&self) -> &'static str;
    /// Changes the event in place.
    fn apply(
        &self,
        event: &mut PublishedEvent,
        ctx: &TransformContext,
    ) -> Result<(), TransformError>;
}

/// The transform `kind` names.
fn build(kind: TransformKind) -> Arc<dyn Transform> {
    match kind {
        TransformKind::Uppercase => Arc::new(Uppercase),
        TransformKind::Enrich => Arc::new(Enrich),
        TransformKind::Json => Arc::new(Json),
    }
}

/// An ordered list of transforms.
#[derive(Debug, Clone, Default)]
pub struct TransformChain {
    steps: Vec<Arc<dyn Transform>>,
}

impl TransformChain {
    /// Builds the chain named in configuration.
    pub fn from_kinds(kinds: &[TransformKind]) -> Self {
        Self {
            steps: kinds.iter().copied().map(build).collect(),
        }
    }

    /// Builds a chain from arbitrary transforms.
    pub fn new(steps: Vec<Arc<dyn Transform>>) -> Self {
        Self { steps }
    }

    /// Runs every step in order, stopping at the first error.
    pub fn apply(
        &self,
        event: &mut PublishedEvent,
        ctx: &TransformContext,
    ) -> Result<(), TransformError> {
        self.steps
            .iter()
            .try_for_each(|step| step.apply(event, ctx))
    }

    /// The steps' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.name()).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::EventId;

    pub(crate) fn event(payload: &str) -> PublishedEvent {
        PublishedEvent {
            id: EventId::parse("t-1").unwrap(),
            timestamp: 1_700_000_000,
            payload: payload.to_owned(),
            metadata: None,
        }
    }

    pub(crate) fn ctx() -> TransformContext {
        TransformContext {
            worker: 3,
            sequence: 42,
            received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            processed_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
            queue_wait: Duration::from_micros(1500),
            trace_id: TraceId::from_bytes(0x4bf92f3577b34da6a3ce929d0e0e4736_u128.to_be_bytes())
                .unwrap(),
        }
    }

    #[test]
    fn default_chain_uppercases_then_enriches() {
        let chain = TransformChain::from_kinds(&[TransformKind::Uppercase, TransformKind::Enrich]);
        assert_eq!(chain.names(), ["uppercase", "enrich"]);
        let mut e = event("straße");
        chain.apply(&mut e, &ctx()).unwrap();
        assert_eq!(e.payload, "STRASSE");
        assert_eq!(e.metadata.unwrap().sequence, 42);
    }

    #[test]
    fn empty_chain_passes_events_through() {
        let mut e = event("as is");
        TransformChain::default().apply(&mut e, &ctx()).unwrap();
        assert_eq!(e, event("as is"));
    }
}
