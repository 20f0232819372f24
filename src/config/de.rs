//! Deserializers the sections share: durations with a unit, address
//! lists, and an empty string read as unset.

use serde::Deserialize;

/// Addresses (`10.0.0.7`) or networks (`10.0.0.0/8`), as a list.
pub(super) fn networks<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            let text = text.trim();
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{text}` is not an address or network like 10.0.0.0/8"
                    ))
                })
        })
        .collect()
}

/// An empty (or blank) string is no value.
pub(super) fn empty_as_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(d)?;
    Ok(value.filter(|v| !v.trim().is_empty()))
}

/// Durations are strings with a unit (`"30s"`, `"250ms"`, `"1m 30s"`), read
/// by `humantime`; a bare number is refused with a message saying so, since
/// its unit would be a guess.
pub(super) mod duration {
    use std::time::Duration;

    use serde::Deserialize;

    /// A value as TOML or the environment gives it.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Integer(i64),
        Float(f64),
    }

    pub(in crate::config) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        let text = match Raw::deserialize(d)? {
            Raw::Text(text) => text,
            Raw::Integer(n) => n.to_string(),
            Raw::Float(x) => x.to_string(),
        };
        let text = text.trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(serde::de::Error::custom(format!(
                "`{text}` has no unit: durations are strings like \"{text}s\" or \"250ms\""
            )));
        }
        humantime::parse_duration(text).map_err(|error| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({error}): durations are strings like \"30s\" or \"250ms\""
            ))
        })
    }
}
