//! Query-string values the routes share: page sizes and cursors. Each is
//! read as text by the handler, so that a value out of range is a 422
//! naming it, not the extractor's 400.

use axum::extract::rejection::QueryRejection;

use super::error::{ApiError, clip};

/// A malformed query string (an unknown or repeated parameter): 400.
pub(crate) fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::BadRequest(format!(
        "invalid query string: {}",
        clip(&rejection.body_text())
    ))
}

/// A count of `field` in `1..=max` (`default` when absent).
pub(crate) fn count(
    field: &'static str,
    raw: Option<&str>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    match raw.parse::<u64>() {
        Ok(0) => Err(ApiError::invalid_query(field, "must be at least 1")),
        Ok(n) if n > max as u64 => Err(ApiError::invalid_query(
            field,
            format!("must be at most {max}, got {n}"),
        )),
        Ok(n) => Ok(n as usize),
        Err(_) => Err(ApiError::invalid_query(
            field,
            format!("must be a positive integer, got `{}`", clip(raw)),
        )),
    }
}

/// A duration in a request, if `text` is one: a whole number and one unit
/// (`500ms`, `30s`, `5m`, `1h`), as the document's pattern
/// `^(0|[1-9][0-9]{0,8})(ms|s|m|h)$` has it.
pub(crate) fn duration(text: &str) -> Option<std::time::Duration> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if digits == 0 || digits > 9 || (digits > 1 && number.starts_with('0')) {
        return None;
    }
    let n: u64 = number.parse().ok()?;
    let millis = match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(millis))
}

/// A page cursor from a previous page's `next` (absent or empty: the start).
pub(crate) fn cursor(field: &'static str, raw: Option<&str>) -> Result<u64, ApiError> {
    match raw {
        None | Some("") => Ok(0),
        // At most 19 digits (as the documents say), so every cursor they
        // allow is a u64.
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|_| raw.len() <= 19 && raw.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                ApiError::invalid_query(
                    field,
                    format!("`{}` is not a cursor from `next`", clip(raw)),
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_a_number_and_one_unit() {
        use std::time::Duration;
        assert_eq!(duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(duration("0s"), Some(Duration::ZERO));
        for bad in [
            "",
            "s",
            "30",
            "030s",
            "1.5s",
            "1m30s",
            "30sec",
            "-1s",
            "1000000000s",
            " 1s",
        ] {
            assert_eq!(duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn counts_and_cursors_in_range_only() {
        assert_eq!(count("limit", None, 100, 1000).unwrap(), 100);
        assert_eq!(count("limit", Some("1000"), 100, 1000).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "x", ""] {
            assert!(count("limit", Some(bad), 100, 1000).is_err(), "{bad}");
        }
        assert_eq!(cursor("after", Some("")).unwrap(), 0);
        assert_eq!(cursor("after", Some("42")).unwrap(), 42);
        for bad in ["+1", "1 ", "99999999999999999999"] {
            assert!(cursor("after", Some(bad)).is_err(), "{bad}");
        }
    }
}
