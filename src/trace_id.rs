//! The W3C trace id an event carries (`metadata.trace_id`).
//!
//! A thin wrapper of OpenTelemetry's own id type, so that the event and
//! store types need nothing from [`crate::telemetry`]: parsing `traceparent`
//! is the propagator's job there, not a second parser here. This module
//! depends on nothing of ours.

use std::fmt;

/// An exported span, named by its trace and span ids: what a later span
/// links to (a subscription's poll to the processing of the events it
/// hands out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanRef {
    /// The span's trace.
    pub trace_id: TraceId,
    /// The span's id (never zero).
    pub span_id: std::num::NonZeroU64,
}

/// A 128-bit W3C trace id; never all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(opentelemetry::trace::TraceId);

impl TraceId {
    /// The id from its 16 big-endian bytes; `None` for the invalid all-zero id.
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        let id = opentelemetry::trace::TraceId::from_bytes(bytes);
        (id != opentelemetry::trace::TraceId::INVALID).then_some(Self(id))
    }

    /// A new random trace id.
    pub fn random() -> Self {
        loop {
            if let Some(id) = Self::from_bytes(rand::random()) {
                return id;
            }
        }
    }

    /// OpenTelemetry's form of the id.
    pub fn to_otel(self) -> opentelemetry::trace::TraceId {
        self.0
    }

    /// The id as 32 lowercase hex digits.
    pub fn to_hex(self) -> String {
        let mut hex = String::with_capacity(32);
        self.push_hex(&mut hex);
        hex
    }

    /// Appends the 32 lowercase hex digits to `out`, without formatting
    /// machinery (this runs once per published event).
    pub fn push_hex(self, out: &mut String) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for byte in self.0.to_bytes() {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

impl From<TraceId> for opentelemetry::trace::TraceId {
    fn from(id: TraceId) -> Self {
        id.0
    }
}

impl serde::Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // OpenTelemetry's Display is the same 32 lowercase hex digits.
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_hex() {
        let id =
            TraceId::from_bytes(0x0af7651916cd43dd8448eb211c80319c_u128.to_be_bytes()).unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"0af7651916cd43dd8448eb211c80319c\""
        );
        assert_eq!(id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(id.to_string(), id.to_hex());
    }

    #[test]
    fn the_all_zero_id_is_not_a_trace_id() {
        assert_eq!(TraceId::from_bytes([0; 16]), None);
    }

    #[test]
    fn random_ids_are_distinct_and_well_formed() {
        let a = TraceId::random();
        let b = TraceId::random();
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 32);
    }
}
