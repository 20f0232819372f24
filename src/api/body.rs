//! Reading request bodies within limits: content type, size (checked while
//! streaming, so an oversized body is never fully buffered) and optional
//! gzip, whose limit applies to the decompressed bytes.

use std::io::Read;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ApiError;

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
    let essence = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let found = match essence.as_str() {
        "application/json" => Some(MediaType::Json),
        s if s.starts_with("application/") && s.ends_with("+json") => Some(MediaType::Json),
        "application/x-ndjson" | "application/jsonl" | "application/ndjson" => {
            Some(MediaType::Ndjson)
        }
        _ => None,
    };
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
            let got = if raw.is_empty() { "none" } else { raw };
            Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type must be {}; got {got}",
                names.join(" or ")
            )))
        }
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!("request body exceeds the limit of {limit} bytes"))
}

/// Reads the body, gunzipping it when `Content-Encoding: gzip`; fails with
/// 413 as soon as more than `limit` (decompressed) bytes arrive.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let gzip = match encoding.as_deref() {
        None | Some("identity") | Some("") => false,
        Some("gzip") | Some("x-gzip") => true,
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding `{other}` is not supported; use gzip or none"
            )));
        }
    };
    // Gzip grows incompressible input by well under 1/64 plus a header, so
    // this bounds the raw read without refusing any body that fits.
    let raw_limit = if gzip {
        limit.saturating_add(limit / 64).saturating_add(1024)
    } else {
        limit
    };
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > raw_limit as u64) {
        return Err(too_large(limit));
    }
    let raw = match Limited::new(body, raw_limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => return Err(too_large(limit)),
        Err(err) => {
            return Err(ApiError::BadRequest(format!(
                "could not read the request body: {err}"
            )));
        }
    };
    if !gzip {
        return Ok(raw);
    }
    // Inflating up to 16 MiB is CPU work: keep it off the async workers.
    tokio::task::spawn_blocking(move || gunzip(&raw, limit))
        .await
        .map_err(|_| ApiError::BadRequest("could not decompress the request body".into()))?
}

fn gunzip(raw: &[u8], limit: usize) -> Result<Bytes, ApiError> {
    let mut out = Vec::new();
    let decoder = flate2::read::MultiGzDecoder::new(raw);
    // Reading one byte past the limit tells "exactly at" from "over".
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|err| ApiError::BadRequest(format!("invalid gzip body: {err}")))?;
    if out.len() > limit {
        return Err(too_large(limit));
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn media_types() {
        let json = headers(&[(header::CONTENT_TYPE, "application/json; charset=utf-8")]);
        assert_eq!(
            media_type(&json, &[MediaType::Json]).unwrap(),
            MediaType::Json
        );
        let nd = headers(&[(header::CONTENT_TYPE, "application/x-ndjson")]);
        assert!(media_type(&nd, &[MediaType::Json]).is_err());
        assert_eq!(
            media_type(&nd, &[MediaType::Json, MediaType::Ndjson]).unwrap(),
            MediaType::Ndjson
        );
        assert!(media_type(&HeaderMap::new(), &[MediaType::Json]).is_err());
        let text = headers(&[(header::CONTENT_TYPE, "text/plain")]);
        assert!(matches!(
            media_type(&text, &[MediaType::Json]),
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }

    #[tokio::test]
    async fn limits_apply_after_decompression() {
        let data = vec![b'a'; 10_000];
        let gz = headers(&[(header::CONTENT_ENCODING, "gzip")]);
        let ok = read_body(&gz, Body::from(gzip(&data)), 10_000)
            .await
            .unwrap();
        assert_eq!(ok.len(), 10_000);
        // Compresses to a few dozen bytes, inflates past the limit.
        let err = read_body(&gz, Body::from(gzip(&data)), 9_999)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::PayloadTooLarge(_)));
        let err = read_body(&gz, Body::from("not gzip"), 100)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::BadRequest(_)));
    }

    #[tokio::test]
    async fn plain_bodies_are_limited() {
        let none = HeaderMap::new();
        assert_eq!(read_body(&none, Body::from("abc"), 3).await.unwrap(), "abc");
        assert!(matches!(
            read_body(&none, Body::from("abcd"), 3).await,
            Err(ApiError::PayloadTooLarge(_))
        ));
        let br = headers(&[(header::CONTENT_ENCODING, "br")]);
        assert!(matches!(
            read_body(&br, Body::from("x"), 3).await,
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }
}
