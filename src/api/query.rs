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
