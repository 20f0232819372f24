//! `store.*`: the in-memory store's bounds.

use serde::Deserialize;

use super::{ConfigError, positive};

/// `store.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// Maximum number of records held; oldest processed are evicted first.
    pub max_events: usize,
    /// Maximum estimated bytes held by records.
    pub max_bytes: usize,
}

impl StoreSettings {
    /// Checks the section's ranges.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive(&[
            ("store.max_events", self.max_events),
            ("store.max_bytes", self.max_bytes),
        ])
    }
}
