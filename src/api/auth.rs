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
/// on) and within its client's rate (when limited). A refused token
/// spends its address's rate, and once that is spent the address's
/// requests are refused before their tokens are looked at, so guessing
/// tokens is limited and cheap to refuse.
pub(crate) async fn guard(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    // With a rate limit, an address whose rate is spent is refused before
    // its token is looked at: a token guesser costs one map lookup each.
    let address = state.rate_limit.as_ref().map(|limit| {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |peer| peer.0.ip());
        limit.client_address(peer, request.headers())
    });
    if let (Some(limit), Some(address)) = (&state.rate_limit, &address)
        && let Some(retry_after) = limit.spent(address)
    {
        return ApiError::RateLimited(retry_after).into_response();
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    // One digest and one hash-set lookup, however many tokens there are.
    let checked = state.tokens.check(authorization);
    if let (Some(limit), Some(address)) = (&state.rate_limit, address) {
        let client = match checked {
            Ok(Some(digest)) => Client::Token(digest),
            _ => address,
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
                state.writer.admission().unauthorized();
            }
            ApiError::Unauthorized(refusal).into_response()
        }
    }
}
