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
//!
//! A set of two or more can also go as one fast-ingest batch (ADR-50,
//! nats-server 2.14+, `allow_batched` streams): the server stores each
//! message as it comes and answers the batch once, at its commit, instead
//! of once a message. `jetstream-extra`, which implements it, is built on
//! another `async-nats` than ours, so the protocol is here: a reply subject
//! per message, `<inbox>.<flow>.fail.<seq>.<op>.$FI`, on an inbox of the
//! batch's own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::Notify;

/// The JetStream error code of a failed `Nats-Expected-Last-Subject-Sequence`.
const WRONG_LAST_SEQUENCE: u64 = 10071;
/// The JetStream error code for a stream that does not take fast-ingest
/// batches (`allow_batched` unset).
const BATCH_PUBLISH_DISABLED: u64 = 10205;
/// Most messages a fast-ingest batch asks the server to store between two
/// of its flow acks (the server may ack more often, and never less).
const FAST_FLOW: u16 = 256;

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

/// How a fast-ingest batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fast {
    /// Every message stored, in order; the last at this stream sequence.
    Stored(u64),
    /// Not every message was stored (one refused, a gap), or the server
    /// does not take fast-ingest batches: publish them one by one, whose
    /// acks say which are stored.
    Incomplete(String),
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
    /// Cleared once the server shows it does not take fast-ingest batches.
    fast: AtomicBool,
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

/// An answer to a fast-ingest batch: a flow ack, a gap or an error
/// (`type`), or the batch's pub ack (no `type`).
#[derive(Deserialize)]
struct FastAnswer<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Option<&'a str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    count: Option<usize>,
    #[serde(default)]
    batch: Option<&'a str>,
    #[serde(default)]
    error: Option<ApiError>,
}

/// What one answer to a fast-ingest batch says.
#[derive(Debug, PartialEq, Eq)]
enum FastReply {
    /// A flow ack or a gap: the batch goes on (in `fail` mode, a gap ends
    /// it with the pub ack that follows).
    Progress,
    /// A message was refused; the pub ack follows.
    Refused(String),
    /// The batch ended: this many stored, the last at this sequence.
    Committed { sequence: u64, count: usize },
    /// A plain pub ack: the server took the message as an ordinary publish.
    NotBatched,
    /// The batch ended refused.
    Failed { code: u64, why: String },
}

fn read_fast(message: &async_nats::Message) -> FastReply {
    if let Some(status) = message.status
        && status != async_nats::StatusCode::OK
    {
        return FastReply::Failed {
            code: 0,
            why: format!("no stream took the batch ({status})"),
        };
    }
    match serde_json::from_slice::<FastAnswer<'_>>(&message.payload) {
        Ok(FastAnswer {
            kind: Some("err"),
            error,
            ..
        }) => FastReply::Refused(error.map(|e| e.description).unwrap_or_default()),
        Ok(FastAnswer { kind: Some(_), .. }) => FastReply::Progress,
        Ok(FastAnswer {
            error: Some(error), ..
        }) => FastReply::Failed {
            code: error.err_code,
            why: error.description,
        },
        Ok(FastAnswer {
            seq: Some(sequence),
            count: Some(count),
            batch: Some(_),
            ..
        }) => FastReply::Committed { sequence, count },
        Ok(FastAnswer { seq: Some(_), .. }) => FastReply::NotBatched,
        _ => FastReply::Failed {
            code: 0,
            why: format!(
                "an answer that is not an ack: {}",
                crate::event::clip(&String::from_utf8_lossy(&message.payload))
            ),
        },
    }
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
            fast: AtomicBool::new(true),
        }
    }

    /// Sends `message` with `reply` for its answer.
    async fn send(&self, message: Outgoing, reply: &str) -> Result<(), PublishError> {
        self.client
            .publish_with_reply_and_headers(
                message.subject,
                Subject::from(reply),
                message.headers,
                message.payload,
            )
            .await
            .map_err(|e| PublishError::Send(e.to_string()))
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
            self.send(message, &reply).await?;
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

impl Publisher {
    /// Whether a set may go as a fast-ingest batch: false once the server
    /// showed it does not take them.
    pub(super) fn takes_fast_batches(&self) -> bool {
        self.fast.load(Ordering::Relaxed)
    }

    /// Publishes `messages` (two or more) as one fast-ingest batch that
    /// stops at the first message refused, and waits, at most `deadline`,
    /// for its end. The first message waits for the server's answer (it
    /// says whether the server takes the batch); the rest follow without
    /// waiting: a batch is one worker's pass, so what is in flight is
    /// bounded as it is for [`Self::publish`].
    pub(super) async fn publish_fast(
        &self,
        messages: Vec<Outgoing>,
        deadline: Duration,
    ) -> Result<Fast, PublishError> {
        let count = messages.len();
        if count < 2 || !self.takes_fast_batches() {
            return Ok(Fast::Incomplete("not a fast-ingest batch".to_owned()));
        }
        let send = |e: &dyn std::fmt::Display| PublishError::Send(e.to_string());
        let inbox = self.client.new_inbox();
        let batch = async {
            let mut answers = self
                .client
                .subscribe(format!("{inbox}.>"))
                .await
                .map_err(|e| send(&e))?;
            let mut reply = String::with_capacity(inbox.len() + 48);
            for (index, message) in messages.into_iter().enumerate() {
                let sequence = index + 1;
                // Start, append, commit (storing the last message).
                let operation = match sequence {
                    1 => '0',
                    s if s == count => '2',
                    _ => '1',
                };
                reply.clear();
                reply.push_str(&inbox);
                reply.push('.');
                reply.push_str(itoa::Buffer::new().format(FAST_FLOW));
                reply.push_str(".fail.");
                reply.push_str(itoa::Buffer::new().format(sequence));
                reply.push('.');
                reply.push(operation);
                reply.push_str(".$FI");
                self.send(message, &reply).await?;
                if sequence == 1 {
                    let answer = answers.next().await.ok_or_else(|| send(&"no answer"))?;
                    match read_fast(&answer) {
                        FastReply::Progress => {}
                        FastReply::NotBatched
                        | FastReply::Failed {
                            code: BATCH_PUBLISH_DISABLED,
                            ..
                        } => {
                            tracing::info!(
                                "NATS does not take fast-ingest batches here: publishing one by one"
                            );
                            self.fast.store(false, Ordering::Relaxed);
                            return Ok(Fast::Incomplete("not batched".to_owned()));
                        }
                        FastReply::Refused(why) | FastReply::Failed { why, .. } => {
                            return Ok(Fast::Incomplete(why));
                        }
                        FastReply::Committed { .. } => {
                            return Ok(Fast::Incomplete("ended at its start".to_owned()));
                        }
                    }
                }
            }
            let mut refused = None;
            loop {
                let answer = answers.next().await.ok_or_else(|| send(&"no answer"))?;
                match read_fast(&answer) {
                    FastReply::Progress => {}
                    FastReply::Refused(why) => refused = Some(why),
                    FastReply::Committed {
                        sequence,
                        count: stored,
                    } if stored == count && refused.is_none() => {
                        return Ok(Fast::Stored(sequence));
                    }
                    FastReply::Committed { count: stored, .. } => {
                        return Ok(Fast::Incomplete(
                            refused.unwrap_or_else(|| format!("{stored} of {count} stored")),
                        ));
                    }
                    FastReply::Failed { why, .. } => return Ok(Fast::Incomplete(why)),
                    FastReply::NotBatched => {
                        return Ok(Fast::Incomplete("not batched".to_owned()));
                    }
                }
            }
        };
        tokio::time::timeout(deadline, batch)
            .await
            .map_err(|_| PublishError::TimedOut(deadline))?
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

    #[test]
    fn fast_batch_answers_read_as_progress_refusal_commit_or_failure() {
        let read = |payload: &str| read_fast(&reply(payload));
        assert_eq!(
            read(r#"{"type":"ack","seq":0,"msgs":1}"#),
            FastReply::Progress
        );
        assert_eq!(
            read(r#"{"type":"gap","last_seq":10,"seq":15}"#),
            FastReply::Progress
        );
        assert_eq!(
            read(
                r#"{"type":"err","seq":3,"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 1"}}"#
            ),
            FastReply::Refused("wrong last sequence: 1".to_owned())
        );
        assert_eq!(
            read(r#"{"stream":"P","seq":42,"batch":"abc","count":7}"#),
            FastReply::Committed {
                sequence: 42,
                count: 7
            }
        );
        // A server without fast ingest stores the first message as an
        // ordinary publish.
        assert_eq!(read(r#"{"stream":"P","seq":42}"#), FastReply::NotBatched);
        assert_eq!(
            read(
                r#"{"stream":"P","error":{"code":400,"err_code":10205,"description":"batch publish not enabled"}}"#
            ),
            FastReply::Failed {
                code: BATCH_PUBLISH_DISABLED,
                why: "batch publish not enabled".to_owned()
            }
        );
        assert!(matches!(read("garbage"), FastReply::Failed { code: 0, .. }));
    }
}
