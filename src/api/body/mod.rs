//! Reading request bodies within limits: content type ([`media`]), size
//! (checked while streaming, so an oversized body is never fully
//! buffered), optional gzip ([`gzip`]), whose limit applies to the
//! decompressed bytes, and a budget for the bodies of all requests
//! together.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

mod gzip;
mod media;

#[cfg(test)]
use gzip::INFLATE_STEP;
use gzip::gunzip;
pub(crate) use media::{MediaType, media_type};

/// Bytes of request bodies held in memory at once, across all requests (`server.max_inflight_body_bytes`). The per-request limits alone do not
/// bound memory when many large requests arrive together; past this budget
/// a request is refused with 503 and `Retry-After`, like a full pipeline.
///
/// It also bounds how long a body may stall: a body whose next chunk takes
/// longer than its stall timeout fails (408) rather than holding its share.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    stall_timeout: std::time::Duration,
}

impl BodyBudget {
    /// A budget of `bytes`, with no stall timeout.
    pub fn new(bytes: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
            stall_timeout: std::time::Duration::from_secs(365 * 86_400),
        }
    }

    /// With bodies failing when their next chunk takes longer than `timeout`.
    pub fn with_stall_timeout(self, timeout: std::time::Duration) -> Self {
        Self {
            stall_timeout: timeout,
            ..self
        }
    }

    /// Takes `bytes` more for the request that holds `held`.
    fn take(&self, held: &mut Option<OwnedSemaphorePermit>, bytes: usize) -> Result<(), ApiError> {
        if bytes == 0 {
            return Ok(());
        }
        let bytes = u32::try_from(bytes).map_err(|_| ApiError::BodiesOverBudget)?;
        let permit = Arc::clone(&self.bytes)
            .try_acquire_many_owned(bytes)
            .map_err(|_| ApiError::BodiesOverBudget)?;
        match held {
            Some(held) => held.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }

    /// Bytes no request holds now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// A request body read into memory, holding its share of the
/// [`BodyBudget`] until dropped.
#[derive(Debug)]
pub(crate) struct HeldBody {
    bytes: Bytes,
    _held: Option<OwnedSemaphorePermit>,
}

impl std::ops::Deref for HeldBody {
    type Target = Bytes;

    fn deref(&self) -> &Bytes {
        &self.bytes
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!("request body exceeds the limit of {limit} bytes"))
}

/// Reads the body, gunzipping it when `Content-Encoding: gzip`; fails with
/// 413 as soon as more than `limit` (decompressed) bytes arrive, and with
/// 503 when the bodies of all requests would pass `budget`.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    budget: &BodyBudget,
) -> Result<HeldBody, ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let gzip = match encoding.as_deref() {
        None | Some("identity") | Some("") => false,
        Some("gzip") | Some("x-gzip") => true,
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding `{}` is not supported; use gzip or none",
                super::error::clip(other)
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
    let mut held = None;
    let raw = collect_within(
        Limited::new(body, raw_limit),
        budget,
        &mut held,
        limit,
        raw_limit,
        declared_length.and_then(|length| usize::try_from(length).ok()),
    )
    .await?;
    if !gzip {
        return Ok(HeldBody {
            bytes: raw,
            _held: held,
        });
    }
    // Inflating up to 16 MiB is CPU work: keep it off the async workers.
    let budget = budget.clone();
    let (bytes, held) = tokio::task::spawn_blocking(move || {
        let mut held = held;
        gunzip(&raw, limit, &budget, &mut held).map(|bytes| (bytes, held))
    })
    .await
    .map_err(|_| ApiError::BadRequest("could not decompress the request body".into()))??;
    Ok(HeldBody { bytes, _held: held })
}

fn read_error(limit: usize) -> impl Fn(axum::BoxError) -> ApiError {
    move |err| {
        if err.is::<LengthLimitError>() {
            too_large(limit)
        } else {
            ApiError::BadRequest(format!("could not read the request body: {err}"))
        }
    }
}

/// Collects a body, taking its share of `budget` as each frame arrives: a
/// declared length is only a promise, and a client that sends nothing must
/// hold nothing.
///
/// A body of one frame is kept as it is, uncopied. One of several is
/// copied into one buffer as its frames arrive, and no frame is kept: a
/// frame is a slice that pins the read buffer it was cut from, so a body
/// sent in 1-byte chunks would otherwise cost tens of times its size. The
/// buffer grows by doubling (at most to `limit`), and the budget is
/// charged what it allocates.
async fn collect_within(
    mut body: Limited<Body>,
    budget: &BodyBudget,
    held: &mut Option<OwnedSemaphorePermit>,
    limit: usize,
    raw_limit: usize,
    declared: Option<usize>,
) -> Result<Bytes, ApiError> {
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    // What `joined` holds of the budget: its allocation.
    let mut charged = 0;
    loop {
        // The stall timer is armed only when the next chunk is not there
        // yet: tower-http's body timeout arms one for every chunk, ready or
        // not, which cost a measurable share of a single-event request
        // (docs/performance.md). `frame()` is cancel-safe.
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => tokio::time::timeout(budget.stall_timeout, body.frame())
                .await
                .map_err(|_| ApiError::SlowBody)?,
        };
        let Some(frame) = frame else {
            break;
        };
        let Ok(data) = frame.map_err(read_error(limit))?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if first.is_none() && charged == 0 {
            budget.take(held, data.len())?;
            first = Some(data);
            continue;
        }
        let pending = first.as_ref().map_or(0, Bytes::len);
        let needed = joined.len() + pending + data.len();
        if needed > charged {
            // The first frame's share moves to the buffer it is copied
            // into (in the same step, with no await between).
            if let Some(held) = held.as_mut() {
                drop(held.split(pending));
            }
            // Doubling, but never past a declared length: a declared
            // length is only a promise, so it bounds the growth and never
            // reserves room for bytes that have not come.
            let grown = needed
                .max(charged.saturating_mul(2))
                .min(declared.unwrap_or(raw_limit).max(needed))
                .min(raw_limit.max(needed));
            budget.take(held, grown - charged)?;
            joined.reserve_exact(grown - joined.len());
            charged = grown;
        }
        if let Some(first) = first.take() {
            joined.extend_from_slice(&first);
        }
        joined.extend_from_slice(&data);
    }
    Ok(match first {
        Some(first) => first,
        None => Bytes::from(joined),
    })
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

    fn budget() -> BodyBudget {
        BodyBudget::new(1 << 20)
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
        for json in [
            "Application/JSON",
            "application/cloudevents+json",
            "APPLICATION/X+JSON",
        ] {
            let h = headers(&[(header::CONTENT_TYPE, json)]);
            assert_eq!(
                media_type(&h, &[MediaType::Json]).unwrap(),
                MediaType::Json,
                "{json}"
            );
        }
        for not_json in [
            "application/+json",
            "text/x+json",
            "application/jsonx",
            "é+json",
        ] {
            let h = headers(&[(header::CONTENT_TYPE, not_json)]);
            assert!(media_type(&h, &[MediaType::Json]).is_err(), "{not_json}");
        }
        let nd_upper = headers(&[(header::CONTENT_TYPE, "Application/X-NDJSON")]);
        assert_eq!(
            media_type(&nd_upper, &[MediaType::Ndjson]).unwrap(),
            MediaType::Ndjson
        );
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
        let ok = read_body(&gz, Body::from(gzip(&data)), 10_000, &budget())
            .await
            .unwrap();
        assert_eq!(ok.len(), 10_000);
        // Compresses to a few dozen bytes, inflates past the limit.
        let err = read_body(&gz, Body::from(gzip(&data)), 9_999, &budget())
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::PayloadTooLarge(_)));
        let err = read_body(&gz, Body::from("not gzip"), 100, &budget())
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::BadRequest(_)));
    }

    #[tokio::test]
    async fn plain_bodies_are_limited() {
        let none = HeaderMap::new();
        assert_eq!(
            *read_body(&none, Body::from("abc"), 3, &budget())
                .await
                .unwrap(),
            "abc"
        );
        assert!(matches!(
            read_body(&none, Body::from("abcd"), 3, &budget()).await,
            Err(ApiError::PayloadTooLarge(_))
        ));
        let br = headers(&[(header::CONTENT_ENCODING, "br")]);
        assert!(matches!(
            read_body(&br, Body::from("x"), 3, &budget()).await,
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }

    #[tokio::test]
    async fn bodies_share_one_budget_and_give_it_back() {
        let budget = BodyBudget::new(100);
        let sized = |n: usize| headers(&[(header::CONTENT_LENGTH, &n.to_string())]);
        let first = read_body(&sized(60), Body::from("a".repeat(60)), 1000, &budget)
            .await
            .unwrap();
        assert_eq!(budget.available(), 40);
        // Each fits its own limit; together they pass the budget.
        assert!(matches!(
            read_body(&sized(50), Body::from("b".repeat(50)), 1000, &budget).await,
            Err(ApiError::BodiesOverBudget)
        ));
        // Of unknown length: counted as it arrives.
        let chunks = futures_util::stream::iter(
            ["c".repeat(30), "c".repeat(30)].map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
        );
        assert!(matches!(
            read_body(&HeaderMap::new(), Body::from_stream(chunks), 1000, &budget).await,
            Err(ApiError::BodiesOverBudget)
        ));
        assert_eq!(
            budget.available(),
            40,
            "a refused body gives its share back"
        );
        drop(first);
        assert_eq!(budget.available(), 100);
        // Frames joined into one buffer hold their length once.
        let chunks = futures_util::stream::iter(
            ["d".repeat(20), "d".repeat(20)].map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
        );
        let joined = read_body(&HeaderMap::new(), Body::from_stream(chunks), 1000, &budget)
            .await
            .unwrap();
        assert_eq!(joined.len(), 40);
        assert_eq!(budget.available(), 60);
        drop(joined);
        // A declared length takes nothing before the bytes arrive.
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
        let reading = {
            let budget = budget.clone();
            tokio::spawn(async move {
                read_body(&sized(90), body, 1000, &budget)
                    .await
                    .map(|held| held.len())
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(budget.available(), 100);
        sender.send(Ok(Bytes::from("e".repeat(90)))).await.unwrap();
        drop(sender);
        assert_eq!(reading.await.unwrap().unwrap(), 90);
        assert_eq!(budget.available(), 100);
        // Inflated bytes count too, not just what came over the wire.
        let gz = headers(&[(header::CONTENT_ENCODING, "gzip")]);
        let small = BodyBudget::new(INFLATE_STEP);
        assert!(matches!(
            read_body(&gz, Body::from(gzip(&[b'z'; 200_000])), 1 << 20, &small).await,
            Err(ApiError::BodiesOverBudget)
        ));
        assert_eq!(small.available(), INFLATE_STEP);
    }
}
