//! The media types the ingest routes accept, read from `Content-Type`.

use axum::http::{HeaderMap, header};

use super::super::error::ApiError;

/// Media types an endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaType {
    /// `application/json` (or `application/*+json`).
    Json,
    /// `application/x-ndjson` (also `application/jsonl`).
    Ndjson,
}

/// The request's media type, if it is one of `accepted`.
pub(crate) fn media_type(
    headers: &HeaderMap,
    accepted: &[MediaType],
) -> Result<MediaType, ApiError> {
    let raw = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Media types are case-insensitive; compared in place, not lowercased
    // into a new string per request.
    let essence = raw.split(';').next().unwrap_or("").trim();
    let is = |name: &str| essence.eq_ignore_ascii_case(name);
    let bytes = essence.as_bytes();
    // `application/<something>+json` (RFC 6839 structured syntax suffix).
    let structured_json = bytes.len() > "application/+json".len()
        && bytes[..12].eq_ignore_ascii_case(b"application/")
        && bytes[bytes.len() - 5..].eq_ignore_ascii_case(b"+json");
    let found = if is("application/json") || structured_json {
        Some(MediaType::Json)
    } else if is("application/x-ndjson") || is("application/jsonl") || is("application/ndjson") {
        Some(MediaType::Ndjson)
    } else {
        None
    };
    // JSON is UTF-8 (RFC 8259): a body declared in another charset would
    // be read as something it is not.
    for parameter in raw.split(';').skip(1) {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let value = value.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset")
            && !(value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("us-ascii"))
        {
            return Err(ApiError::UnsupportedMediaType(format!(
                "charset `{}` is not supported: bodies are UTF-8 (charset=utf-8, or none)",
                super::super::error::clip(value)
            )));
        }
    }
    match found {
        Some(media) if accepted.contains(&media) => Ok(media),
        _ => {
            let names: Vec<&str> = accepted
                .iter()
                .map(|m| match m {
                    MediaType::Json => "application/json",
                    MediaType::Ndjson => "application/x-ndjson",
                })
                .collect();
            let got = if raw.is_empty() {
                "none".into()
            } else {
                super::super::error::clip(raw)
            };
            Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type must be {}; got {got}",
                names.join(" or ")
            )))
        }
    }
}
