//! Publishing to JetStream with the acks of a whole set awaited at once.
//!
//! `async-nats` answers each JetStream publish on a reply subject of its
//! own, a one-shot channel and a timer: about a fifth of the service's CPU
//! per event in nats mode, where every event costs two acked publishes
//! (measured: `docs/performance.md`, "nats mode: where the service's time
//! goes"). Here a connection has one wildcard subscription for its acks,
//! a set of publishes is one entry in a table, its acks fill the entry's
//! slots in place, and the set is woken once, when the last one came (or
//! its one deadline passed).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::Notify;

/// The JetStream error code of a failed `Nats-Expected-Last-Subject-Sequence`.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// How JetStream answered one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ack {
    /// Stored at this stream sequence.
    Stored(u64),
    /// Refused: its subject already holds a message (the expectation failed).
    Taken,
    /// Refused for another reason (a full `discard: new` stream, say).
    Refused(String),
}

/// Why a set of publishes has no answers.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum PublishError {
    /// NATS did not answer every publish in time.
    #[error("NATS did not acknowledge within {0:?}")]
    TimedOut(Duration),
    /// A publish could not be sent.
    #[error("{0}")]
    Send(String),
}

/// One message to publish.
pub(super) struct Outgoing {
    pub(super) subject: Subject,
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
}

/// A set of publishes waiting for its acks.
struct Set {
    acks: Mutex<Vec<Option<Ack>>>,
    missing: AtomicUsize,
    done: Notify,
}

/// Publishes through one connection, its acks on one subscription.
#[derive(Debug)]
pub(super) struct Publisher {
    client: Client,
    /// `_INBOX.<unique>.`: a set's reply subjects are `<prefix><set>.<index>`.
    prefix: String,
    next_set: AtomicU64,
    sets: Arc<Mutex<HashMap<u64, Arc<Set>>>>,
    /// Started on first use (it needs a runtime and a subscription).
    started: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for Set {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Set")
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ApiAck {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl Publisher {
    pub(super) fn new(client: Client) -> Self {
        let prefix = format!("{}.", client.new_inbox());
        Self {
            client,
            prefix,
            next_set: AtomicU64::new(0),
            sets: Arc::new(Mutex::new(HashMap::new())),
            started: tokio::sync::OnceCell::new(),
        }
    }

    /// Subscribes to the acks (once), and reads them from then on.
    async fn start(&self) -> Result<(), PublishError> {
        self.started
            .get_or_try_init(|| async {
                let mut acks = self
                    .client
                    .subscribe(format!("{}*.*", self.prefix))
                    .await
                    .map_err(|e| PublishError::Send(e.to_string()))?;
                let sets = Arc::downgrade(&self.sets);
                let skip = self.prefix.len();
                tokio::spawn(async move {
                    while let Some(message) = acks.next().await {
                        let Some(sets) = sets.upgrade() else { return };
                        deliver(&sets, skip, &message);
                    }
                });
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Publishes `messages` and waits, at most `deadline` for all of them,
    /// for their acks, in order.
    pub(super) async fn publish(
        &self,
        messages: Vec<Outgoing>,
        deadline: Duration,
    ) -> Result<Vec<Ack>, PublishError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        self.start().await?;
        let id = self.next_set.fetch_add(1, Ordering::Relaxed);
        let set = Arc::new(Set {
            acks: Mutex::new(vec![None; messages.len()]),
            missing: AtomicUsize::new(messages.len()),
            done: Notify::new(),
        });
        self.sets.lock().insert(id, Arc::clone(&set));
        // Taken out of the table however this ends (an answer, the
        // deadline, or the caller giving up).
        let _registered = Registered {
            sets: &self.sets,
            id,
        };
        let mut reply = String::with_capacity(self.prefix.len() + 24);
        let done = set.done.notified();
        tokio::pin!(done);
        for (index, message) in messages.into_iter().enumerate() {
            reply.clear();
            reply.push_str(&self.prefix);
            reply.push_str(itoa::Buffer::new().format(id));
            reply.push('.');
            reply.push_str(itoa::Buffer::new().format(index));
            self.client
                .publish_with_reply_and_headers(
                    message.subject,
                    Subject::from(reply.as_str()),
                    message.headers,
                    message.payload,
                )
                .await
                .map_err(|e| PublishError::Send(e.to_string()))?;
        }
        let answered = async {
            while set.missing.load(Ordering::Acquire) > 0 {
                done.as_mut().await;
                done.set(set.done.notified());
            }
        };
        tokio::time::timeout(deadline, answered)
            .await
            .map_err(|_| PublishError::TimedOut(deadline))?;
        let acks = std::mem::take(&mut *set.acks.lock());
        Ok(acks
            .into_iter()
            .map(|ack| ack.unwrap_or_else(|| Ack::Refused("no answer".to_owned())))
            .collect())
    }
}

/// Takes a set out of the table when its publisher is done with it.
struct Registered<'a> {
    sets: &'a Mutex<HashMap<u64, Arc<Set>>>,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.sets.lock().remove(&self.id);
    }
}

/// Puts one ack in its set's slot; wakes the set when it is the last.
fn deliver(sets: &Mutex<HashMap<u64, Arc<Set>>>, skip: usize, message: &async_nats::Message) {
    let Some((set, index)) = message
        .subject
        .get(skip..)
        .and_then(|tail| tail.split_once('.'))
        .and_then(|(set, index)| Some((set.parse::<u64>().ok()?, index.parse::<usize>().ok()?)))
    else {
        return;
    };
    let Some(set) = sets.lock().get(&set).cloned() else {
        // Its publisher gave up waiting (the deadline): nothing to do.
        return;
    };
    let ack = read_ack(message);
    let filled = {
        let mut acks = set.acks.lock();
        match acks.get_mut(index) {
            Some(slot @ None) => {
                *slot = Some(ack);
                true
            }
            _ => false,
        }
    };
    if filled && set.missing.fetch_sub(1, Ordering::AcqRel) == 1 {
        set.done.notify_one();
    }
}

/// How JetStream answered, from its reply.
fn read_ack(message: &async_nats::Message) -> Ack {
    if let Some(status) = message.status
        && status != async_nats::StatusCode::OK
    {
        // No stream listens on the subject (503), or another status.
        return Ack::Refused(format!(
            "no stream took the message ({status}{})",
            message
                .description
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        ));
    }
    match serde_json::from_slice::<ApiAck>(&message.payload) {
        Ok(ApiAck {
            seq: Some(sequence),
            error: None,
        }) => Ack::Stored(sequence),
        Ok(ApiAck {
            error: Some(error), ..
        }) if error.err_code == WRONG_LAST_SEQUENCE => Ack::Taken,
        Ok(ApiAck {
            error: Some(error), ..
        }) => Ack::Refused(error.description),
        _ => Ack::Refused(format!(
            "an answer that is not an ack: {}",
            crate::event::clip(&String::from_utf8_lossy(&message.payload))
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(payload: &str) -> async_nats::Message {
        async_nats::Message {
            subject: Subject::from("_INBOX.x.1.0"),
            reply: None,
            payload: Bytes::from(payload.to_owned()),
            headers: None,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn acks_read_as_stored_taken_or_refused() {
        assert_eq!(
            read_ack(&reply(r#"{"stream":"S","seq":42}"#)),
            Ack::Stored(42)
        );
        assert_eq!(
            read_ack(&reply(
                r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#
            )),
            Ack::Taken
        );
        assert_eq!(
            read_ack(&reply(
                r#"{"error":{"code":503,"err_code":10077,"description":"maximum bytes exceeded"}}"#
            )),
            Ack::Refused("maximum bytes exceeded".to_owned())
        );
        assert!(matches!(read_ack(&reply("garbage")), Ack::Refused(_)));
        let mut no_stream = reply("");
        no_stream.status = Some(async_nats::StatusCode::NO_RESPONDERS);
        assert!(matches!(read_ack(&no_stream), Ack::Refused(_)));
    }
}
