//! `enrich`: adds processing metadata to the event.

use super::{Transform, TransformContext, TransformError};
use crate::event::{Metadata, PublishedEvent};

/// Adds `received_at`, `processed_at`, `worker`, `sequence`, `queue_wait_ms`, `trace_id`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Enrich;

impl Transform for Enrich {
    fn name(&self) -> &'static str {
        "enrich"
    }

    fn apply(
        &self,
        event: &mut PublishedEvent,
        ctx: &TransformContext,
    ) -> Result<(), TransformError> {
        event.metadata = Some(Metadata {
            received_at: ctx.received_at,
            processed_at: ctx.processed_at,
            worker: ctx.worker,
            sequence: ctx.sequence,
            // Whole microseconds: `0.067`, not `0.06707500000000001`.
            queue_wait_ms: ctx.queue_wait.as_micros() as f64 / 1000.0,
            trace_id: ctx.trace_id,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ctx, event};
    use super::*;

    #[test]
    fn adds_all_metadata() {
        let mut e = event("payload");
        Enrich.apply(&mut e, &ctx()).unwrap();
        let m = e.metadata.unwrap();
        assert_eq!(m.worker, 3);
        assert_eq!(m.sequence, 42);
        assert_eq!(m.received_at, ctx().received_at);
        assert_eq!(m.processed_at, ctx().processed_at);
        assert!((m.queue_wait_ms - 1.5).abs() < 1e-9);
        assert_eq!(m.trace_id.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(e.payload, "payload", "enrich leaves the payload alone");
    }

    #[test]
    fn the_queue_wait_is_printed_in_whole_microseconds() {
        let mut e = event("payload");
        let ctx = TransformContext {
            queue_wait: std::time::Duration::from_nanos(67_075_123),
            ..ctx()
        };
        Enrich.apply(&mut e, &ctx).unwrap();
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["metadata"]["queue_wait_ms"].to_string(), "67.075");
    }
}
