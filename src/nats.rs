//! Connecting to NATS: the `nats` backend and the `nats` sink both start
//! here.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};

/// How long start-up waits for a first connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why NATS could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A server address did not parse.
    #[error("`{url}` is not a NATS server address: {reason}")]
    BadUrl {
        /// The address as configured.
        url: String,
        /// Why.
        reason: String,
    },
    /// No server answered.
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Unreachable {
        /// The servers tried.
        urls: String,
        /// Why.
        reason: String,
    },
}

/// The servers of a comma-separated list (`nats://a:4222,nats://b:4222`).
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    urls.split(',')
        .map(str::trim)
        .map(|url| {
            url.parse::<ServerAddr>()
                .map_err(|error| ConnectError::BadUrl {
                    url: url.to_owned(),
                    reason: error.to_string(),
                })
        })
        .collect()
}

/// The options every client here shares: reconnect forever, log the
/// connection's comings and goings.
fn options(name: &str) -> ConnectOptions {
    ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::debug!(event = %other, "NATS client event"),
            }
        })
}

/// Connects to one of `urls` (comma-separated). After the first
/// connection the client reconnects by itself, forever, to any server of
/// the list or of the cluster it learns about.
pub async fn connect(urls: &str, name: &str) -> Result<Client, ConnectError> {
    let addrs = server_addrs(urls)?;
    let unreachable = |reason: String| ConnectError::Unreachable {
        urls: urls.to_owned(),
        reason,
    };
    tokio::time::timeout(CONNECT_TIMEOUT, options(name).connect(addrs))
        .await
        .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|error| unreachable(error.to_string()))
}

/// A client for `urls` (comma-separated) that connects in the background
/// and reconnects forever: a service that starts before its NATS waits
/// for it instead of exiting. Only an address that does not parse fails.
/// `subscription_capacity` bounds the messages buffered for each of its
/// subscriptions.
pub async fn connect_in_background(
    urls: &str,
    name: &str,
    subscription_capacity: usize,
) -> Result<Client, ConnectError> {
    let addrs = server_addrs(urls)?;
    // With `retry_on_initial_connect` this returns without waiting on the
    // network.
    options(name)
        .retry_on_initial_connect()
        .subscription_capacity(subscription_capacity)
        .connect(addrs)
        .await
        .map_err(|error| ConnectError::Unreachable {
            urls: urls.to_owned(),
            reason: error.to_string(),
        })
}

/// Why `client` cannot be used now, if it cannot.
pub fn unreachable(client: &Client) -> Option<String> {
    match client.connection_state() {
        async_nats::connection::State::Connected => None,
        state => Some(format!("NATS is unreachable ({state})")),
    }
}
