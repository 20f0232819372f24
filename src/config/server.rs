//! `server.*`: listeners, connections, budgets and timeouts.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::de::{duration, empty_as_none, networks};
use super::{ConfigError, invalid, positive};

/// `server.*` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Listen address, e.g. `0.0.0.0:8080`; port 0 picks a free port.
    pub addr: String,
    /// A second listener for health, readiness and metrics only; when set
    /// they are served there and not on `addr`.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub admin_addr: Option<String>,
    /// Largest body accepted by single-event requests.
    pub max_body_bytes: usize,
    /// Largest batch body, measured after gzip decompression.
    pub max_batch_body_bytes: usize,
    /// Connections open at once; past it new ones wait to be accepted.
    pub max_connections: usize,
    /// Connections one client address may hold (IPv6 by /64; trusted
    /// proxies exempt); past it its new ones are refused at accept. A value
    /// over `max_connections` leaves one client the whole cap.
    pub max_connections_per_client: usize,
    /// SSE subscribers at once (fewer than `max_connections`, so that
    /// subscribers can never take every slot from requests); past it 503.
    pub max_subscribers: usize,
    /// A connection whose next request head has not fully arrived after
    /// this long (idle between requests, or trickling a head), or whose
    /// client has not taken a write for this long, is closed.
    #[serde(deserialize_with = "duration::deserialize")]
    pub idle_timeout: Duration,
    /// Bytes of request bodies (as received and inflated) held in memory
    /// at once across all requests; past it requests get 503.
    pub max_inflight_body_bytes: usize,
    /// Bytes of answers (pages, lookups, SSE replays) held in memory at
    /// once, apart from the bodies' budget; past it readers get 503.
    pub max_inflight_answer_bytes: usize,
    /// Events one SSE subscriber may hold fetched and unsent, in bytes,
    /// beyond the line being sent.
    pub subscriber_buffer_bytes: usize,
    /// Upper bound for one request, including `?wait=published`.
    #[serde(deserialize_with = "duration::deserialize")]
    pub request_timeout: Duration,
    /// Time allowed to drain the pipeline after SIGINT/SIGTERM.
    #[serde(deserialize_with = "duration::deserialize")]
    pub shutdown_grace: Duration,
    /// Requests a second each client may make to the event routes
    /// (0 = no limit); a client is its bearer token, else its address.
    pub rate_limit_per_second: u32,
    /// Requests a client may make at once above its rate (0 = one
    /// second's worth).
    pub rate_limit_burst: u32,
    /// Proxies (addresses or CIDR networks) whose `X-Forwarded-For` names
    /// the client; from anyone else the header is ignored.
    #[serde(deserialize_with = "networks")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// After SIGINT/SIGTERM, how long readiness is 503 while the service
    /// still serves, so that load balancers stop sending before it stops
    /// accepting.
    #[serde(deserialize_with = "duration::deserialize")]
    pub shutdown_delay: Duration,
}

impl ServerSettings {
    /// Checks the section's ranges and relations.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.socket_addr()?;
        positive(&[
            ("server.max_body_bytes", self.max_body_bytes),
            ("server.max_batch_body_bytes", self.max_batch_body_bytes),
            ("server.max_connections", self.max_connections),
            ("server.max_subscribers", self.max_subscribers),
            (
                "server.max_connections_per_client",
                self.max_connections_per_client,
            ),
            (
                "server.max_inflight_answer_bytes",
                self.max_inflight_answer_bytes,
            ),
            (
                "server.subscriber_buffer_bytes",
                self.subscriber_buffer_bytes,
            ),
        ])?;
        // A gzip batch holds its compressed and its inflated bytes (and so
        // may a gzip single event), or a request that fits its own limit
        // could be refused for the budget forever.
        let largest_body = self.max_batch_body_bytes.max(self.max_body_bytes);
        if self.max_inflight_body_bytes / 3 < largest_body {
            return Err(invalid(
                "server.max_inflight_body_bytes",
                format!(
                    "must be at least {} (three times the larger of server.max_batch_body_bytes \
                     and server.max_body_bytes, {largest_body}), got {}",
                    largest_body.saturating_mul(3),
                    self.max_inflight_body_bytes
                ),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(invalid("server.request_timeout", "must be greater than 0"));
        }
        const DAY: Duration = Duration::from_secs(86_400);
        for (key, value) in [
            ("server.request_timeout", self.request_timeout),
            ("server.idle_timeout", self.idle_timeout),
        ] {
            if value > DAY {
                return Err(invalid(key, "must be at most a day"));
            }
        }
        if self.max_subscribers >= self.max_connections {
            return Err(invalid(
                "server.max_subscribers",
                format!(
                    "must be less than server.max_connections ({}): subscribers may not take every connection",
                    self.max_connections
                ),
            ));
        }
        if self.idle_timeout.is_zero() {
            return Err(invalid("server.idle_timeout", "must be greater than 0"));
        }
        if !self.shutdown_delay.is_zero() && self.shutdown_delay >= self.shutdown_grace {
            return Err(invalid(
                "server.shutdown_delay",
                format!(
                    "must be shorter than server.shutdown_grace ({:?}), which counts from the signal",
                    self.shutdown_grace
                ),
            ));
        }
        if let Some(admin) = self.admin_socket_addr()?
            && admin.port() != 0
            && admin == self.socket_addr()?
        {
            return Err(invalid(
                "server.admin_addr",
                "must differ from server.addr (it is a second listener)",
            ));
        }
        Ok(())
    }

    /// The listen address, parsed.
    pub fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.addr.parse().map_err(|_| ConfigError::Invalid {
            key: "server.addr",
            message: format!("`{}` is not a socket address like 0.0.0.0:8080", self.addr),
        })
    }

    /// The admin listener's address, parsed, when one is configured.
    pub fn admin_socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(admin) = &self.admin_addr else {
            return Ok(None);
        };
        admin.parse().map(Some).map_err(|_| ConfigError::Invalid {
            key: "server.admin_addr",
            message: format!("`{admin}` is not a socket address like 0.0.0.0:8081"),
        })
    }
}
