//! Whether NATS can be used now: set up yet, connected, and answering.
//!
//! A connection can look connected while the server does not answer (it
//! is frozen, or its host lost the network): the client's state alone
//! would keep `/readyz` at 200 for as long as TCP takes to notice. So a
//! task pings the server every [`PING_EVERY`] with a request nobody
//! answers, which a live server refuses at once ("no responders"); no
//! answer within [`PING_TIMEOUT`] marks NATS unavailable, and readiness
//! turns 503 within two seconds of the server going quiet.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use parking_lot::Mutex;

/// How often the server is pinged.
const PING_EVERY: Duration = Duration::from_millis(500);
/// How long a ping may go unanswered.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// A subject nobody subscribes to.
const PING_SUBJECT: &str = "_EVENTFLOW.ping";

/// NATS's state as this replica sees it.
#[derive(Debug)]
pub(super) struct Health {
    /// The streams and consumer are set up.
    set_up: AtomicBool,
    /// The last ping was answered (and the connection is up).
    answering: AtomicBool,
    /// Why it is not usable, when it is not.
    why: Mutex<String>,
}

impl Health {
    /// Starts pinging through `client`.
    pub(super) fn start(client: async_nats::Client) -> Arc<Self> {
        let health = Arc::new(Self {
            set_up: AtomicBool::new(false),
            answering: AtomicBool::new(false),
            why: Mutex::new("connecting to NATS".to_owned()),
        });
        tokio::spawn(ping(client, Arc::downgrade(&health)));
        health
    }

    /// Why NATS cannot be used now, if it cannot.
    pub(super) fn unavailable(&self) -> Option<String> {
        let usable = self.set_up.load(Ordering::Acquire) && self.answering.load(Ordering::Acquire);
        (!usable).then(|| self.why.lock().clone())
    }

    /// Not set up yet, for this reason.
    pub(super) fn starting(&self, why: String) {
        *self.why.lock() = format!("setting up NATS JetStream: {why}");
    }

    /// The streams and consumer are set up (NATS just answered).
    pub(super) fn set_up(&self) {
        self.answering.store(true, Ordering::Release);
        self.set_up.store(true, Ordering::Release);
    }

    fn answered(&self) {
        self.answering.store(true, Ordering::Release);
    }

    fn silent(&self, why: String) {
        *self.why.lock() = why;
        self.answering.store(false, Ordering::Release);
    }
}

async fn ping(client: async_nats::Client, health: std::sync::Weak<Health>) {
    let mut every = tokio::time::interval(PING_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(health) = health.upgrade() else {
            return;
        };
        if let Some(why) = crate::nats::unreachable(&client) {
            health.silent(why);
            continue;
        }
        let asked = client.request(PING_SUBJECT, Bytes::new());
        match tokio::time::timeout(PING_TIMEOUT, asked).await {
            Ok(Err(error)) if error.kind() == RequestErrorKind::NoResponders => {
                health.answered();
            }
            Ok(Ok(_)) => health.answered(),
            Ok(Err(error)) => health.silent(format!("NATS did not answer a ping: {error}")),
            Err(_) => health.silent(format!(
                "NATS did not answer a ping within {PING_TIMEOUT:?}"
            )),
        }
    }
}
