//! Where the store, the queue and the published-events feed live, chosen
//! once at start-up from `backend.kind`:
//!
//! - `memory` (default): [`MemoryStore`], [`MemoryQueue`] and
//!   [`MemoryFeed`], in this process;
//! - `nats`: [`nats`], on JetStream streams and a durable pull consumer
//!   shared by every replica.
//!
//! Handlers and workers see only the traits ([`Store`], [`Queue`],
//! [`Feed`]).

pub mod nats;

use std::sync::Arc;

use crate::config::Settings;
use crate::feed::{Feed, MemoryFeed};
use crate::queue::{Backpressure, MemoryQueue, Queue};
use crate::store::{MemoryStore, Store};
use crate::subscription::{MemorySubscriptions, Subscriptions};
use crate::telemetry::metrics::Metrics;

/// A backend's three parts, and word of its failure.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Accepted events and their outcomes.
    pub store: Arc<dyn Store>,
    /// Between ingest and the workers.
    pub queue: Arc<dyn Queue>,
    /// Published events in publication order.
    pub feed: Arc<dyn Feed>,
    /// Named subscriptions over the feed.
    pub subscriptions: Arc<dyn Subscriptions>,
    /// Says why, should the backend fail for good after start-up.
    pub failure: BackendFailure,
}

/// Why a backend failed for good after start-up (a setup it could only do
/// once its server answered was refused): the service then stops.
#[derive(Debug, Clone)]
pub struct BackendFailure(tokio::sync::watch::Receiver<Option<String>>);

impl BackendFailure {
    /// Reports what `failed` says.
    pub fn new(failed: tokio::sync::watch::Receiver<Option<String>>) -> Self {
        Self(failed)
    }

    /// A backend that cannot fail after start-up.
    pub fn never() -> Self {
        // A closed channel with no failure in it: `failed` never resolves.
        let (_, receiver) = tokio::sync::watch::channel(None);
        Self(receiver)
    }

    /// Resolves with the reason once the backend failed; never otherwise.
    pub async fn failed(mut self) -> String {
        loop {
            if let Some(why) = self.0.borrow_and_update().clone() {
                return why;
            }
            if self.0.changed().await.is_err() {
                // Its sender is gone without a failure: it never fails now.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Backend {
    /// The one-process backend.
    pub fn memory(settings: &Settings) -> Self {
        let store = Arc::new(MemoryStore::new(&settings.store));
        // The feed indexes as many publications as the store holds records.
        let feed = MemoryFeed::new(store.clone(), settings.store.max_events);
        let subscriptions = MemorySubscriptions::new(
            feed.clone(),
            store.clone(),
            settings.subscriptions.max_count,
        );
        Self {
            feed: Arc::new(feed),
            subscriptions: Arc::new(subscriptions),
            store,
            queue: MemoryQueue::new(settings.pipeline.queue_capacity),
            failure: BackendFailure::never(),
        }
    }

    /// The JetStream backend: connects, creates or checks its streams and
    /// consumer, and starts fetching deliveries (bounded by `backpressure`).
    pub async fn nats(
        settings: &Settings,
        backpressure: &Backpressure,
        metrics: &Metrics,
    ) -> Result<Self, nats::BackendError> {
        nats::open(settings, backpressure, metrics).await
    }
}
