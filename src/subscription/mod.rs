//! Named subscriptions: server-side cursors over the published events, each
//! shared by any number of consumers (a consumer group). Each event is
//! leased to one consumer at a time and comes back after the subscription's
//! `ack_timeout` unless acknowledged; after `max_deliver` leases without an
//! ack it is dead-lettered for that subscription.
//!
//! [`Subscriptions`] is the seam for backends; [`MemorySubscriptions`] keeps
//! the cursors in this process (gone on restart).

mod ack_id;
mod memory;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::feed::FeedLine;
use crate::telemetry::metrics::SubscriptionSample;
use crate::time::UnixNanos;

pub use ack_id::{ACK_ID_MAX, AckId, NatsDelivery};
pub use memory::{DEAD_LETTERS_MAX, MemorySubscriptions, WINDOW};

/// Longest subscription name.
pub const NAME_MAX: usize = 64;
/// Fewest and most deliveries before an event is dead-lettered.
pub const MAX_DELIVER_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;
/// Shortest and longest lease.
pub const ACK_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(24 * 3600);
/// Defaults of a `PUT /subscriptions/{name}` body's fields.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// See [`DEFAULT_ACK_TIMEOUT`].
pub const DEFAULT_MAX_DELIVER: u32 = 10;

/// A subscription's name: `[A-Za-z0-9_-]{1,64}` (it is a metric label and,
/// in nats mode, part of a consumer's name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriptionName(Arc<str>);

impl SubscriptionName {
    /// The name, if `raw` is one.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid = (1..=NAME_MAX).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(Arc::from(raw)))
        } else {
            Err(format!(
                "a subscription name is 1 to {NAME_MAX} of A-Z, a-z, 0-9, `_` and `-`"
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubscriptionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a new subscription's cursor starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Before the oldest published event still held.
    Earliest,
    /// At the head when it is created: only events published after.
    Latest,
    /// After this publication sequence.
    After(u64),
    /// Before the first event published at or after this time.
    Since {
        /// The time.
        at: UnixNanos,
        /// As the client wrote it (echoed as given).
        text: String,
    },
}

impl PartialEq for Start {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Earliest, Self::Earliest) | (Self::Latest, Self::Latest) => true,
            (Self::After(a), Self::After(b)) => a == b,
            (Self::Since { at: a, .. }, Self::Since { at: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// A subscription's settings, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Where its cursor started.
    pub start: Start,
    /// How long a lease lasts without an ack.
    pub ack_timeout: Duration,
    /// Leases an event gets before it is dead-lettered.
    pub max_deliver: u32,
}

/// What `GET /subscriptions/{name}` shows.
#[derive(Debug, Clone)]
pub struct State {
    /// Its name.
    pub name: SubscriptionName,
    /// Its settings.
    pub spec: Spec,
    /// The highest publication sequence with every event at or below it
    /// acknowledged or dead-lettered.
    pub committed: u64,
    /// Published after the cursor and not leased now.
    pub pending: u64,
    /// Leased, lease live.
    pub in_flight: u64,
    /// In the dead-letter list now.
    pub dead_lettered: u64,
    /// Events history dropped before they were leased.
    pub skipped: u64,
}

/// Whether a `PUT` made the subscription or found it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Created now (201).
    Created,
    /// It was there with these settings (200).
    Existing,
}

/// One event handed to a consumer.
#[derive(Debug, Clone)]
pub struct Lease {
    /// What the consumer acks or nacks it with.
    pub ack_id: AckId,
    /// Its publication sequence.
    pub sequence: u64,
    /// Which delivery this is, from 1.
    pub delivery: u32,
    /// The published event.
    pub line: FeedLine,
    /// The exported span that processed it, if any: the poll links to it.
    pub span: Option<crate::trace_id::SpanRef>,
}

/// What an ack request did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acked {
    /// Leases acknowledged.
    pub acked: u64,
    /// Leases handed back.
    pub nacked: u64,
    /// Ids that matched no live lease (expired, already acked, dead-lettered).
    pub expired: u64,
}

/// An event dead-lettered for a subscription.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its publication sequence.
    pub sequence: u64,
    /// The deliveries it had.
    pub delivery: u32,
    /// When it was dead-lettered.
    pub dead_lettered_at: SystemTime,
    /// The published event.
    pub line: FeedLine,
}

/// A page of dead letters.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    /// In publication order.
    pub letters: Vec<DeadLetter>,
    /// The cursor of the next page, if there is one.
    pub next: Option<u64>,
}

/// Why a subscription request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubscriptionError {
    /// No subscription of that name (404).
    #[error("no subscription named `{0}`")]
    NotFound(SubscriptionName),
    /// It exists with other settings (409).
    #[error("subscription `{0}` exists with different settings; delete it first to change them")]
    Different(SubscriptionName),
    /// `subscriptions.max_count` are there already (409).
    #[error("{0} subscriptions exist, the most this service keeps (subscriptions.max_count)")]
    TooMany(usize),
    /// A start that names publications that never were (422).
    #[error("{0}")]
    InvalidStart(String),
    /// The backend cannot be reached (503).
    #[error("{0}")]
    Unavailable(String),
}

/// The named subscriptions of one deployment.
#[async_trait]
pub trait Subscriptions: Send + Sync + fmt::Debug {
    /// Creates `name` with `spec`, or finds it with the same settings.
    async fn put(
        &self,
        name: &SubscriptionName,
        spec: Spec,
    ) -> Result<(Put, State), SubscriptionError>;
    /// Its state now.
    async fn state(&self, name: &SubscriptionName) -> Result<State, SubscriptionError>;
    /// Every subscription's state, by name.
    async fn list(&self) -> Result<Vec<State>, SubscriptionError>;
    /// Removes it (its leases and dead letters with it).
    async fn delete(&self, name: &SubscriptionName) -> Result<(), SubscriptionError>;
    /// Leases up to `max` events, waiting until `deadline` for the first.
    async fn poll(
        &self,
        name: &SubscriptionName,
        max: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Lease>, SubscriptionError>;
    /// Acknowledges `acks` and hands back `nacks`.
    async fn ack(
        &self,
        name: &SubscriptionName,
        acks: &[AckId],
        nacks: &[AckId],
    ) -> Result<Acked, SubscriptionError>;
    /// Hands back leases a poll could not answer with (its answer did not
    /// fit), as if they had never been made where the backend can.
    async fn release(&self, name: &SubscriptionName, leases: &[AckId]);
    /// Dead letters after publication sequence `after`, at most `limit`.
    async fn dead_letters(
        &self,
        name: &SubscriptionName,
        after: u64,
        limit: usize,
    ) -> Result<DeadLetters, SubscriptionError>;
    /// Hands the dead letters `sequences` (all: `None`) out again, their
    /// delivery count starting over; how many there were.
    async fn redeliver(
        &self,
        name: &SubscriptionName,
        sequences: Option<&[u64]>,
    ) -> Result<u64, SubscriptionError>;
    /// Every subscription's figures, for `/metrics`.
    fn samples(&self) -> Vec<SubscriptionSample>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        assert!(SubscriptionName::parse("orders_v2-eu").is_ok());
        assert!(SubscriptionName::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a.b", "é", &"a".repeat(65), "a/b"] {
            assert!(SubscriptionName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_since_start_is_compared_by_its_time() {
        let at = UnixNanos::from_nanos(5);
        let a = Start::Since {
            at,
            text: "1970-01-01T00:00:00.000000005Z".into(),
        };
        let b = Start::Since {
            at,
            text: "1970-01-01T00:00:00.000000005+00:00".into(),
        };
        assert_eq!(a, b);
        assert_ne!(a, Start::After(5));
    }
}
