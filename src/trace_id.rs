//! W3C trace ids: taken from an incoming `traceparent` header, or made fresh.

use std::fmt;

/// A 128-bit W3C trace id; never all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(u128);

impl TraceId {
    /// The trace id of a valid `traceparent` header
    /// (`version-traceid-parentid-flags`), or `None`.
    pub fn from_traceparent(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !hex(version, 2)
            || version == "ff"
            || !hex(trace, 32)
            || !hex(parent, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        // Version 00 has exactly four fields; later versions may append more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let id = u128::from_str_radix(trace, 16).ok()?;
        let parent_ok = u64::from_str_radix(parent, 16).ok()? != 0;
        (id != 0 && parent_ok).then_some(Self(id))
    }

    /// The sampled flag of a valid `traceparent`, or `None`.
    pub fn sampled_flag(header: &str) -> Option<bool> {
        Self::from_traceparent(header)?;
        let flags = header.trim().split('-').nth(3)?;
        Some(u8::from_str_radix(flags, 16).ok()? & 1 == 1)
    }

    /// The id from its 16 big-endian bytes (as OpenTelemetry holds it).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }

    /// A new random trace id.
    pub fn random() -> Self {
        loop {
            let id: u128 = rand::random();
            if id != 0 {
                return Self(id);
            }
        }
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
        for byte in self.0.to_be_bytes() {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

impl serde::Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_traceparent() {
        let id =
            TraceId::from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .unwrap();
        assert_eq!(id.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn rejects_invalid_traceparents() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceId::from_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn serializes_as_hex() {
        let id = TraceId::from_bytes(0x0af7651916cd43dd8448eb211c80319c_u128.to_be_bytes());
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"0af7651916cd43dd8448eb211c80319c\""
        );
        assert_eq!(id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn sampled_flag() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7";
        assert_eq!(TraceId::sampled_flag(&format!("00-{id}-01")), Some(true));
        assert_eq!(TraceId::sampled_flag(&format!("00-{id}-00")), Some(false));
        assert_eq!(TraceId::sampled_flag("garbage"), None);
    }

    #[test]
    fn random_ids_are_distinct_and_well_formed() {
        let a = TraceId::random();
        let b = TraceId::random();
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 32);
    }
}
