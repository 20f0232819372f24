//! `subscriptions.*`: named subscriptions.

use serde::Deserialize;

use super::{ConfigError, invalid};

/// Most subscriptions `subscriptions.max_count` may allow: each is a metric
/// label and, in nats mode, a durable consumer on the published stream.
const MAX_COUNT_LIMIT: usize = 10_000;

/// `subscriptions.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSettings {
    /// Most named subscriptions at once.
    pub max_count: usize,
}

impl SubscriptionSettings {
    /// Checks the section's ranges.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_COUNT_LIMIT).contains(&self.max_count) {
            return Err(invalid(
                "subscriptions.max_count",
                format!(
                    "must be between 1 and {MAX_COUNT_LIMIT}, got {}",
                    self.max_count
                ),
            ));
        }
        Ok(())
    }
}
