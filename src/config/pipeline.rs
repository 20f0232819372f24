//! `pipeline.*`: workers, the queue's bounds, event limits, transforms.

use serde::Deserialize;

use super::{ConfigError, invalid, positive};

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

impl PipelineSettings {
    /// Checks the section's ranges.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive(&[
            ("pipeline.workers", self.workers),
            ("pipeline.queue_capacity", self.queue_capacity),
            ("pipeline.max_payload_bytes", self.max_payload_bytes),
            ("pipeline.max_batch", self.max_batch),
            ("pipeline.queue_max_bytes", self.queue_max_bytes),
        ])?;
        if self.workers > 1024 {
            return Err(invalid("pipeline.workers", "must be at most 1024"));
        }
        // Semaphore permits are limited to usize::MAX >> 3 by tokio.
        if self.queue_capacity > 1 << 30 {
            return Err(invalid("pipeline.queue_capacity", "must be at most 2^30"));
        }
        if self.queue_max_bytes > 1 << 40 {
            return Err(invalid("pipeline.queue_max_bytes", "must be at most 2^40"));
        }
        Ok(())
    }
}

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
