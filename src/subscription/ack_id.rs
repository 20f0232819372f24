//! Ack ids: what a consumer acks or nacks a lease with. Each backend has
//! its own form, parsed strictly, so that a string this service never
//! issued is told apart (422) from a lease that is no longer live
//! (`expired`).

use std::fmt;

/// Most characters an ack id of any backend has.
pub const ACK_ID_MAX: usize = 128;

/// A lease's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckId {
    /// A lease of the in-process subscriptions: `m1.{sequence}.{lease}`.
    Memory {
        /// The event's publication sequence.
        sequence: u64,
        /// The lease's number (unique in the process).
        lease: u64,
    },
}

impl AckId {
    /// The ack id `raw`, if this service could have issued it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let not_ours = || {
            format!(
                "`{}` is not an ack_id this service issued",
                crate::event::clip(raw)
            )
        };
        if raw.len() > ACK_ID_MAX {
            return Err(not_ours());
        }
        let mut parts = raw.split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("m1"), Some(sequence), Some(lease), None) => Ok(Self::Memory {
                sequence: number(sequence).ok_or_else(not_ours)?,
                lease: number(lease).ok_or_else(not_ours)?,
            }),
            _ => Err(not_ours()),
        }
    }
}

/// A decimal u64 written the one way this service writes it.
fn number(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.len() <= 18
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

impl fmt::Display for AckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory { sequence, lease } => write!(f, "m1.{sequence}.{lease}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_id_reads_back() {
        let id = AckId::Memory {
            sequence: 42,
            lease: 7,
        };
        assert_eq!(AckId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn anything_else_is_not_ours() {
        for raw in [
            "",
            "m1",
            "m1.1",
            "m1.1.2.3",
            "m2.1.2",
            "m1.01.2",
            "m1.-1.2",
            "m1.1.99999999999999999999",
            "m1. 1.2",
        ] {
            assert!(AckId::parse(raw).is_err(), "{raw:?}");
        }
    }
}
