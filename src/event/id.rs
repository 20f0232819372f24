//! The event id: 1..=256 bytes of UTF-8 without control characters.

use std::fmt;

use compact_str::CompactString;
use serde::{Serialize, Serializer};

/// Longest accepted id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// An event id: 1..=256 bytes of UTF-8 without control characters.
///
/// Ids of up to 24 bytes (the usual UUIDs without dashes, ULIDs, counters)
/// live inline, without an allocation of their own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(CompactString);

impl EventId {
    /// Parses an id, explaining what is wrong when it is not valid.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        if raw.len() > MAX_ID_BYTES {
            return Err(format!(
                "must be at most {MAX_ID_BYTES} bytes, got {}",
                raw.len()
            ));
        }
        if has_control_characters(raw) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(CompactString::from(raw)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `text` holds a control character (Unicode category Cc). Ids are
/// nearly always ASCII, where that is a byte test the compiler runs over
/// many bytes at once; only other text is decoded character by character.
fn has_control_characters(text: &str) -> bool {
    if text.is_ascii() {
        text.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        text.chars().any(char::is_control)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}
