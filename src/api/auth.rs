//! The guard in front of the event routes: the bearer-token check
//! (`auth.tokens`) and the per-client rate limit (`api::limit`).
//!
//! A refused request is answered before its body is read: its events are
//! never received, the refusal is counted once per request in
//! `eventflow_auth_failures_total` (and, for ingest, once in
//! `eventflow_events_rejected_total{reason="unauthorized"}`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::limit::Client;
use super::{ApiError, AppState};

/// The caller's token (a request extension, when auth is on): long-lived
/// answers end when it is revoked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller(pub(crate) crate::auth::TokenDigest);

/// Lets a request through only with a known bearer token (when auth is
/// on) and within its client's rate (when limited). A refused token still
/// spends its address's rate, so guessing tokens is limited too.
pub(crate) async fn guard(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    let checked = state.tokens.check(authorization);
    if let Some(limit) = &state.rate_limit {
        let client = match checked {
            Ok(Some(digest)) => Client::Token(digest),
            _ => {
                let peer = request
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |peer| peer.0.ip());
                limit.client_address(peer, request.headers())
            }
        };
        if let Err(retry_after) = limit.check(&client) {
            return ApiError::RateLimited(retry_after).into_response();
        }
    }
    match checked {
        Ok(caller) => {
            if let Some(caller) = caller {
                request.extensions_mut().insert(Caller(caller));
            }
            next.run(request).await
        }
        Err(refusal) => {
            state.auth_failures.increment(1);
            if request.method() == Method::POST {
                state.pipeline.admission().unauthorized();
            }
            ApiError::Unauthorized(refusal).into_response()
        }
    }
}
