//! `auth.*`: bearer tokens.

use serde::Deserialize;

use super::de::empty_as_none;

/// `auth.*` keys: bearer tokens the API asks for (none = no auth).
///
/// The tokens are secrets: `Debug` shows `[REDACTED]` for each.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Tokens given inline (`EVENTFLOW__AUTH__TOKENS`, comma-separated).
    pub tokens: Vec<secrecy::SecretString>,
    /// A file of tokens, one a line (`#` comments), re-read on SIGHUP.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub tokens_file: Option<String>,
}

impl AuthSettings {
    /// Whether any request needs a token.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || self.tokens_file.is_some()
    }
}
