//! Named subscriptions on JetStream, shared by every replica.
//!
//! A subscription is a durable pull consumer on the published stream
//! (`sub_<name>`): its stream sequence is the publication sequence, its
//! `ack_wait` the lease, its ack floor `committed`, and its settings ride in
//! the consumer's metadata, so any replica answers for it and it outlives
//! every replica. An `ack_id` carries the numbers of the delivery's ack
//! subject, so any replica acks it by publishing there.
//!
//! JetStream has no dead letters of its own. Its consumer here delivers
//! without limit, and the poll that receives delivery `max_deliver + 1` of
//! an event writes it to the dead-letter stream
//! (`<prefix>.dead.<name>.<sequence>`) and then terminates it, which moves
//! the ack floor past it. Redelivering copies a dead letter to
//! `<prefix>.again.<name>.<sequence>`, read by a second consumer
//! (`again_<name>`) that polls drain first, its deliveries counted afresh.
//!
//! Limits, from JetStream: a late ack (an expired lease) still acknowledges
//! the event if nobody has since; an ack that JetStream took is counted
//! `acked` unless the event was at or below `committed` already; `in_flight`
//! counts leases not yet acknowledged including expired ones not handed out
//! again; `skipped` counts the events history dropped ahead of the cursor
//! now (JetStream keeps no count of those it passed over).
//!
//! A poll's trace links to each event's processing through the span its
//! publication names (`Eventflow-Span`). Subscriptions use the reader
//! connection, never the one ingest uses.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{
    AckPolicy, Consumer, DeliverPolicy, Info as ConsumerInfo, pull,
};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use tokio::time::Instant;

use super::Nats;
use crate::feed::FeedLine;
use crate::subscription::{
    AckId, Acked, DeadLetter, DeadLetters, Lease, NatsDelivery, Put, Spec, Start, State,
    SubscriptionError, SubscriptionName, Subscriptions, WINDOW,
};
use crate::telemetry::metrics::SubscriptionSample;
use crate::time::UnixNanos;

/// Prefix of a subscription's consumer on the published stream.
const MAIN_PREFIX: &str = "sub_";
/// Prefix of its consumer of redelivered dead letters.
const AGAIN_PREFIX: &str = "again_";
/// Metadata keys of a subscription's settings.
const META_START: &str = "eventflow_start";
const META_ACK_TIMEOUT: &str = "eventflow_ack_timeout_ms";
const META_MAX_DELIVER: &str = "eventflow_max_deliver";
/// Header of a dead letter: the deliveries it had.
const DELIVERIES: &str = "Eventflow-Deliveries";
/// How long a replica trusts what it read of a subscription's settings.
const HANDLES_FRESH: Duration = Duration::from_secs(2);
/// Acks sent at once.
const ACKS_AT_ONCE: usize = 256;
/// How long JetStream looks for ready messages when a poll does not wait.
const READY_WAIT: Duration = Duration::from_millis(10);
/// How often a waiting poll looks for redelivered dead letters.
const AGAIN_RECHECK: Duration = Duration::from_secs(1);
/// How often a waiting poll looks again when JetStream answered early.
const WINDOW_RECHECK: Duration = Duration::from_millis(50);
/// The shortest long-poll wait worth a pull request.
const MIN_WAIT: Duration = Duration::from_millis(10);

/// The subscriptions of a nats deployment.
#[derive(Debug)]
pub struct NatsSubscriptions {
    nats: Arc<Nats>,
    max_count: usize,
    /// The streams the ack subjects name.
    published_stream: String,
    dead_stream: String,
    handles: Mutex<HashMap<SubscriptionName, Arc<Handles>>>,
    /// This replica's counts, and the shared gauges as last read.
    figures: Mutex<BTreeMap<String, Arc<Figures>>>,
}

/// One subscription's consumers, as read at `read_at`.
#[derive(Debug)]
struct Handles {
    main: Consumer<pull::Config>,
    again: Consumer<pull::Config>,
    spec: Spec,
    read_at: Instant,
}

#[derive(Debug, Default)]
struct Figures {
    pending: AtomicU64,
    in_flight: AtomicU64,
    /// Redelivered dead letters not yet acknowledged, as last read (or
    /// handed out again here since): polls look at them only while some are.
    again_outstanding: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
    dead_lettered: AtomicU64,
}

fn main_consumer(name: &SubscriptionName) -> String {
    format!("{MAIN_PREFIX}{name}")
}

fn again_consumer(name: &SubscriptionName) -> String {
    format!("{AGAIN_PREFIX}{name}")
}

fn unavailable(error: impl std::fmt::Display) -> SubscriptionError {
    SubscriptionError::Unavailable(format!("NATS did not answer: {error}"))
}

/// A start as the consumer's metadata keeps it.
fn start_text(start: &Start) -> String {
    match start {
        Start::Earliest => "earliest".into(),
        Start::Latest => "latest".into(),
        Start::After(sequence) => format!("after:{sequence}"),
        Start::Since { at, text } => format!("since:{}:{text}", at.as_nanos()),
    }
}

fn parse_start(text: &str) -> Option<Start> {
    match text.split_once(':') {
        None if text == "earliest" => Some(Start::Earliest),
        None if text == "latest" => Some(Start::Latest),
        Some(("after", sequence)) => sequence.parse().ok().map(Start::After),
        Some(("since", rest)) => {
            let (nanos, text) = rest.split_once(':')?;
            Some(Start::Since {
                at: UnixNanos::from_nanos(nanos.parse().ok()?),
                text: text.to_owned(),
            })
        }
        _ => None,
    }
}

/// A subscription's settings from its consumer's metadata (`None`: not a
/// consumer this service made).
fn spec_of(meta: &HashMap<String, String>) -> Option<Spec> {
    Some(Spec {
        start: parse_start(meta.get(META_START)?)?,
        ack_timeout: Duration::from_millis(meta.get(META_ACK_TIMEOUT)?.parse().ok()?),
        max_deliver: meta.get(META_MAX_DELIVER)?.parse().ok()?,
    })
}

/// The consumer configuration both of a subscription's consumers share.
fn lease_config(durable: String, filter: String, spec: &Spec) -> pull::Config {
    pull::Config {
        durable_name: Some(durable),
        filter_subject: filter,
        ack_policy: AckPolicy::Explicit,
        ack_wait: spec.ack_timeout,
        // Dead-lettering is this module's (see the module's comment).
        max_deliver: -1,
        max_ack_pending: WINDOW as i64,
        ..Default::default()
    }
}

impl NatsSubscriptions {
    pub(super) fn new(nats: Arc<Nats>, settings: &crate::config::Settings) -> Self {
        Self {
            nats,
            max_count: settings.subscriptions.max_count,
            published_stream: settings.backend.nats.published_stream.clone(),
            dead_stream: settings.backend.nats.dead_letter_stream.clone(),
            handles: Mutex::new(HashMap::new()),
            figures: Mutex::new(BTreeMap::new()),
        }
    }

    fn check(&self) -> Result<(), SubscriptionError> {
        match self.nats.unavailable() {
            Some(why) => Err(SubscriptionError::Unavailable(why)),
            None => Ok(()),
        }
    }

    fn figures(&self, name: &SubscriptionName) -> Arc<Figures> {
        Arc::clone(self.figures.lock().entry(name.to_string()).or_default())
    }

    /// The subscription's main consumer's info (`None`: no such subscription).
    async fn main_info(
        &self,
        name: &SubscriptionName,
    ) -> Result<Option<ConsumerInfo>, SubscriptionError> {
        consumer_info(&self.nats.published_read, &main_consumer(name)).await
    }

    /// The subscription's consumers, read again when the copy is old.
    async fn handles(&self, name: &SubscriptionName) -> Result<Arc<Handles>, SubscriptionError> {
        self.check()?;
        if let Some(handles) = self.handles.lock().get(name)
            && handles.read_at.elapsed() < HANDLES_FRESH
        {
            return Ok(Arc::clone(handles));
        }
        let not_found = || SubscriptionError::NotFound(name.clone());
        let main: Consumer<pull::Config> = match self
            .nats
            .published_read
            .get_consumer(&main_consumer(name))
            .await
        {
            Ok(consumer) => consumer,
            Err(error) if error.to_string().contains("not found") => {
                self.forget(name);
                return Err(not_found());
            }
            Err(error) => return Err(unavailable(error)),
        };
        let spec = spec_of(&main.cached_info().config.metadata).ok_or_else(not_found)?;
        let again: Consumer<pull::Config> = self
            .nats
            .dead_read
            .get_consumer(&again_consumer(name))
            .await
            .map_err(unavailable)?;
        let handles = Arc::new(Handles {
            main,
            again,
            spec,
            read_at: Instant::now(),
        });
        self.handles
            .lock()
            .insert(name.clone(), Arc::clone(&handles));
        Ok(handles)
    }

    fn forget(&self, name: &SubscriptionName) {
        self.handles.lock().remove(name);
        self.figures.lock().remove(name.as_str());
    }

    /// The state of the subscription whose main consumer is `main`.
    async fn state_of(
        &self,
        name: &SubscriptionName,
        main: &ConsumerInfo,
    ) -> Result<State, SubscriptionError> {
        let spec = spec_of(&main.config.metadata)
            .ok_or_else(|| SubscriptionError::NotFound(name.clone()))?;
        let again = consumer_info(&self.nats.dead_read, &again_consumer(name)).await?;
        let (again_pending, again_in_flight) = again.as_ref().map_or((0, 0), |info| {
            (info.num_pending, info.num_ack_pending as u64)
        });
        let dead_lettered = self.dead_sequences(name).await?.len() as u64;
        let first = self.published().await?.first_sequence;
        let skipped = first.saturating_sub(1).saturating_sub(
            main.delivered
                .stream_sequence
                .max(main.ack_floor.stream_sequence),
        );
        let state = State {
            name: name.clone(),
            spec,
            committed: main.ack_floor.stream_sequence,
            pending: main.num_pending + again_pending,
            in_flight: main.num_ack_pending as u64 + again_in_flight,
            dead_lettered,
            skipped,
        };
        let figures = self.figures(name);
        figures.pending.store(state.pending, Ordering::Relaxed);
        figures.in_flight.store(state.in_flight, Ordering::Relaxed);
        figures
            .again_outstanding
            .store(again_pending + again_in_flight, Ordering::Relaxed);
        Ok(state)
    }

    /// The publication sequences of the subscription's dead letters, in order.
    async fn dead_sequences(&self, name: &SubscriptionName) -> Result<Vec<u64>, SubscriptionError> {
        let filter = self.nats.subjects.dead(name.as_str(), None);
        let mut subjects = self
            .nats
            .dead_read
            .info_with_subjects(&filter)
            .await
            .map_err(unavailable)?;
        let mut sequences = Vec::new();
        while let Some((subject, _)) = subjects.try_next().await.map_err(unavailable)? {
            if let Some(sequence) = last_number(&subject) {
                sequences.push(sequence);
            }
        }
        sequences.sort_unstable();
        Ok(sequences)
    }

    /// Leases from the main consumer or the redeliveries' (`wait`: up to
    /// then for the first), dead-lettering what has had its deliveries; how
    /// many messages came.
    async fn take(
        &self,
        name: &SubscriptionName,
        handles: &Handles,
        redelivery: bool,
        max: usize,
        wait: Option<Instant>,
        leases: &mut Vec<Lease>,
    ) -> Result<usize, SubscriptionError> {
        let consumer = if redelivery {
            &handles.again
        } else {
            &handles.main
        };
        let messages = match wait {
            None => fetch(consumer, max, None).await?,
            Some(deadline) => fetch(consumer, 1, Some(deadline)).await?,
        };
        let figures = self.figures(name);
        let came = messages.len();
        for message in messages {
            let Ok(info) = message.info() else { continue };
            let delivery = NatsDelivery {
                redelivery,
                delivered: u64::try_from(info.delivered).unwrap_or(0),
                stream_seq: info.stream_sequence,
                consumer_seq: info.consumer_sequence,
                timestamp: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
                pending: info.pending,
            };
            let sequence = if redelivery {
                last_number(&message.subject).unwrap_or(0)
            } else {
                info.stream_sequence
            };
            if delivery.delivered > u64::from(handles.spec.max_deliver) {
                self.dead_letter(name, &message, sequence, delivery.delivered - 1)
                    .await?;
                figures.dead_lettered.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            figures.delivered.fetch_add(1, Ordering::Relaxed);
            leases.push(Lease {
                ack_id: AckId::Nats(delivery),
                sequence,
                delivery: u32::try_from(delivery.delivered).unwrap_or(u32::MAX),
                line: FeedLine::Json(Arc::from(String::from_utf8_lossy(&message.payload))),
                span: super::codec::span_of(message.headers.as_ref()),
            });
        }
        Ok(came)
    }

    /// Up to `max` leases, waiting until `deadline` for the first.
    async fn lease(
        &self,
        name: &SubscriptionName,
        handles: &Handles,
        max: usize,
        deadline: Instant,
    ) -> Result<Vec<Lease>, SubscriptionError> {
        let mut leases = Vec::new();
        let figures = self.figures(name);
        // Dead letters handed out again come first (while there are any),
        // then new ones; with none now, wait for the first new one (looking
        // for redeliveries again every AGAIN_RECHECK), then take what is
        // ready.
        loop {
            if figures.again_outstanding.load(Ordering::Relaxed) > 0 {
                let room = max - leases.len();
                self.take(name, handles, true, room, None, &mut leases)
                    .await?;
            }
            let room = max - leases.len();
            if room == 0 {
                break;
            }
            let got = self
                .take(name, handles, false, room, None, &mut leases)
                .await?;
            if got == room {
                // Perhaps more are ready (or some were dead-lettered).
                continue;
            }
            if !leases.is_empty() {
                break;
            }
            if got > 0 {
                // All of them dead-lettered: look again.
                continue;
            }
            let now = Instant::now();
            if deadline.saturating_duration_since(now) < MIN_WAIT {
                break;
            }
            let until = deadline.min(now + AGAIN_RECHECK);
            let got = self
                .take(name, handles, false, 1, Some(until), &mut leases)
                .await?;
            let early = until.saturating_duration_since(Instant::now());
            if got == 0 && early >= MIN_WAIT {
                // Answered before the wait was over with nothing: look
                // again shortly rather than at once.
                tokio::time::sleep(WINDOW_RECHECK.min(early)).await;
            }
        }
        Ok(leases)
    }

    /// The published stream's state now.
    async fn published(&self) -> Result<async_nats::jetstream::stream::State, SubscriptionError> {
        Ok(self
            .nats
            .published_read
            .get_info()
            .await
            .map_err(unavailable)?
            .state)
    }

    /// Every subscription's main consumer's info.
    async fn main_infos(&self) -> Result<Vec<ConsumerInfo>, SubscriptionError> {
        self.nats
            .published_read
            .consumers()
            .try_filter(|info| std::future::ready(info.name.starts_with(MAIN_PREFIX)))
            .try_collect()
            .await
            .map_err(unavailable)
    }

    /// Writes a message to the dead-letter stream, within the deadline.
    async fn store(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), SubscriptionError> {
        let stored = async {
            self.nats
                .read
                .publish_with_headers(subject, headers, payload)
                .await?
                .await
        };
        tokio::time::timeout(self.nats.deadline, stored)
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        Ok(())
    }

    /// Removes the dead letters of `name` and its redeliveries.
    async fn purge_dead_letters(&self, name: &SubscriptionName) -> Result<(), SubscriptionError> {
        let subjects = &self.nats.subjects;
        for subject in [
            subjects.dead(name.as_str(), None),
            subjects.again(name.as_str(), None),
        ] {
            self.nats
                .dead_read
                .purge()
                .filter(subject)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Keeps `message` as a dead letter of `name`, then ends its deliveries.
    async fn dead_letter(
        &self,
        name: &SubscriptionName,
        message: &jetstream::Message,
        sequence: u64,
        deliveries: u64,
    ) -> Result<(), SubscriptionError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(DELIVERIES, deliveries.to_string().as_str());
        if let Some(span) = super::codec::span_of(message.headers.as_ref()) {
            super::codec::add_span(&mut headers, span);
        }
        let subject = self.nats.subjects.dead(name.as_str(), Some(sequence));
        self.store(subject, headers, message.payload.clone())
            .await?;
        message.ack_with(AckKind::Term).await.map_err(unavailable)?;
        tracing::debug!(subscription = %name, sequence, deliveries, "dead-lettered");
        Ok(())
    }

    /// Acks (or nacks) `ids` of `name`; how many JetStream took.
    async fn send_acks(
        &self,
        name: &SubscriptionName,
        ids: Vec<NatsDelivery>,
        body: &'static str,
    ) -> Result<u64, SubscriptionError> {
        let client = &self.nats.reader;
        let (stream, dead) = (&self.published_stream, &self.dead_stream);
        let (main, again) = (main_consumer(name), again_consumer(name));
        let deadline = self.nats.deadline;
        let sent = futures_util::stream::iter(ids)
            .map(|id| {
                let subject = if id.redelivery {
                    id.ack_subject(dead, &again)
                } else {
                    id.ack_subject(stream, &main)
                };
                async move {
                    // A request: JetStream answers once the ack is applied.
                    tokio::time::timeout(deadline, client.request(subject, body.into())).await
                }
            })
            .buffer_unordered(ACKS_AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        let mut taken = 0;
        for result in sent {
            match result {
                Ok(Ok(_)) => taken += 1,
                Ok(Err(error)) => return Err(unavailable(error)),
                Err(elapsed) => return Err(unavailable(elapsed)),
            }
        }
        Ok(taken)
    }
}

/// The info of `stream`'s consumer `name` (`None`: there is none).
async fn consumer_info(
    stream: &jetstream::stream::Stream<()>,
    name: &str,
) -> Result<Option<ConsumerInfo>, SubscriptionError> {
    match stream.consumer_info(name).await {
        Ok(info) => Ok(Some(info)),
        Err(error) if matches!(error.kind(), ConsumerInfoErrorKind::NotFound) => Ok(None),
        Err(error) => Err(unavailable(error)),
    }
}

/// Up to `max` messages of `consumer`: those ready now, or (`wait`) the
/// first to come before the deadline.
async fn fetch(
    consumer: &Consumer<pull::Config>,
    max: usize,
    wait: Option<Instant>,
) -> Result<Vec<jetstream::Message>, SubscriptionError> {
    let (batch, give_up) = match wait {
        // `no_wait` with a short `expires`: JetStream answers at once with
        // what is ready, and otherwise within READY_WAIT; without `expires`
        // a request that finds the window full would wait for room for
        // ever, and deliver to a client long gone.
        None => (
            consumer
                .fetch()
                .max_messages(max)
                .expires(READY_WAIT)
                .messages()
                .await,
            READY_WAIT + Duration::from_secs(2),
        ),
        Some(deadline) => {
            let expires = deadline.saturating_duration_since(Instant::now());
            if expires < MIN_WAIT {
                return Ok(Vec::new());
            }
            (
                consumer
                    .batch()
                    .max_messages(max)
                    .expires(expires)
                    .messages()
                    .await,
                expires + Duration::from_secs(2),
            )
        }
    };
    let batch = batch.map_err(unavailable)?;
    let messages = tokio::time::timeout(give_up, batch.take(max).collect::<Vec<_>>())
        .await
        .map_err(unavailable)?;
    let mut taken = Vec::with_capacity(messages.len());
    for message in messages {
        match message {
            Ok(message) => taken.push(message),
            // Nothing (more) now, or the wait ended: not a failure.
            Err(error) if taken.is_empty() && is_no_messages(&error) => break,
            Err(error) => {
                if taken.is_empty() {
                    return Err(unavailable(error));
                }
                break;
            }
        }
    }
    Ok(taken)
}

/// Whether a pull's error means only that nothing is to be had now: none
/// ready, the wait over, or the window of unacknowledged events full
/// (JetStream's `409 Exceeded MaxAckPending`).
fn is_no_messages(error: &impl std::fmt::Display) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    text.contains("no messages")
        || text.contains("timed out")
        || text.contains("timeout")
        || text.contains("maxackpending")
}

/// The number after a subject's last dot.
fn last_number(subject: &str) -> Option<u64> {
    subject.rsplit('.').next()?.parse().ok()
}

#[async_trait]
impl Subscriptions for NatsSubscriptions {
    async fn put(
        &self,
        name: &SubscriptionName,
        spec: Spec,
    ) -> Result<(Put, State), SubscriptionError> {
        self.check()?;
        if let Some(found) = self.main_info(name).await? {
            return if spec_of(&found.config.metadata).as_ref() == Some(&spec) {
                Ok((Put::Existing, self.state_of(name, &found).await?))
            } else {
                Err(SubscriptionError::Different(name.clone()))
            };
        }
        let count = self
            .nats
            .published_read
            .consumer_names()
            .try_filter(|consumer| std::future::ready(consumer.starts_with(MAIN_PREFIX)))
            .try_collect::<Vec<_>>()
            .await
            .map_err(unavailable)?
            .len();
        if count >= self.max_count {
            return Err(SubscriptionError::TooMany(self.max_count));
        }
        let head = self.published().await?.last_sequence;
        let deliver_policy = match &spec.start {
            Start::Earliest => DeliverPolicy::All,
            Start::Latest => DeliverPolicy::New,
            Start::After(after) if *after > head => {
                return Err(SubscriptionError::InvalidStart(format!(
                    "start.after = {after} is past the last publication ({head})"
                )));
            }
            Start::After(after) => DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            Start::Since { at, .. } => DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::from_nanos(i128::from(at.as_nanos()))
                    .map_err(|e| SubscriptionError::InvalidStart(e.to_string()))?,
            },
        };
        // A name used before starts without the old one's dead letters.
        self.purge_dead_letters(name).await?;
        let subjects = &self.nats.subjects;
        // The redeliveries' consumer first: a subscription is there once
        // its main consumer is.
        let again = lease_config(
            again_consumer(name),
            subjects.again(name.as_str(), None),
            &spec,
        );
        self.nats
            .dead_read
            .create_consumer(again)
            .await
            .map_err(unavailable)?;
        let mut main = lease_config(main_consumer(name), subjects.published(), &spec);
        main.deliver_policy = deliver_policy;
        main.description = Some(format!("eventflow subscription `{name}`"));
        main.metadata = HashMap::from([
            (META_START.to_owned(), start_text(&spec.start)),
            (
                META_ACK_TIMEOUT.to_owned(),
                spec.ack_timeout.as_millis().to_string(),
            ),
            (META_MAX_DELIVER.to_owned(), spec.max_deliver.to_string()),
        ]);
        match self.nats.published_read.create_consumer_strict(main).await {
            Ok(_) => {}
            // Another replica made it a moment ago: compare with that one.
            Err(error) if error.to_string().contains("already exists") => {
                return match self.main_info(name).await? {
                    Some(found) if spec_of(&found.config.metadata).as_ref() == Some(&spec) => {
                        Ok((Put::Existing, self.state_of(name, &found).await?))
                    }
                    _ => Err(SubscriptionError::Different(name.clone())),
                };
            }
            Err(error) => return Err(unavailable(error)),
        }
        self.forget(name);
        let found = self
            .main_info(name)
            .await?
            .ok_or_else(|| SubscriptionError::NotFound(name.clone()))?;
        Ok((Put::Created, self.state_of(name, &found).await?))
    }

    async fn state(&self, name: &SubscriptionName) -> Result<State, SubscriptionError> {
        self.check()?;
        let found = self
            .main_info(name)
            .await?
            .ok_or_else(|| SubscriptionError::NotFound(name.clone()))?;
        self.state_of(name, &found).await
    }

    async fn list(&self) -> Result<Vec<State>, SubscriptionError> {
        self.check()?;
        let infos = self.main_infos().await?;
        let mut states = Vec::with_capacity(infos.len());
        for info in infos {
            let Ok(name) = SubscriptionName::parse(&info.name[MAIN_PREFIX.len()..]) else {
                continue;
            };
            match self.state_of(&name, &info).await {
                Ok(state) => states.push(state),
                // Made by something else under our prefix: not ours.
                Err(SubscriptionError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        states.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(states)
    }

    async fn delete(&self, name: &SubscriptionName) -> Result<(), SubscriptionError> {
        self.check()?;
        if self.main_info(name).await?.is_none() {
            return Err(SubscriptionError::NotFound(name.clone()));
        }
        self.forget(name);
        let gone = |result: Result<_, async_nats::jetstream::stream::ConsumerError>| match result {
            Ok(_) => Ok(()),
            Err(error) if error.to_string().contains("not found") => Ok(()),
            Err(error) => Err(unavailable(error)),
        };
        gone(
            self.nats
                .published_read
                .delete_consumer(&main_consumer(name))
                .await,
        )?;
        gone(
            self.nats
                .dead_read
                .delete_consumer(&again_consumer(name))
                .await,
        )?;
        self.purge_dead_letters(name).await
    }

    async fn poll(
        &self,
        name: &SubscriptionName,
        max: usize,
        deadline: Instant,
    ) -> Result<Vec<Lease>, SubscriptionError> {
        let handles = self.handles(name).await?;
        match self.lease(name, &handles, max, deadline).await {
            Ok(leases) => Ok(leases),
            Err(error) => {
                // Deleted (on another replica) since its handles were read?
                self.forget(name);
                match self.main_info(name).await? {
                    None => Err(SubscriptionError::NotFound(name.clone())),
                    Some(_) => Err(error),
                }
            }
        }
    }

    async fn ack(
        &self,
        name: &SubscriptionName,
        acks: &[AckId],
        nacks: &[AckId],
    ) -> Result<Acked, SubscriptionError> {
        self.check()?;
        let main = self
            .main_info(name)
            .await?
            .ok_or_else(|| SubscriptionError::NotFound(name.clone()))?;
        let again_floor = if acks
            .iter()
            .chain(nacks)
            .any(|id| matches!(id, AckId::Nats(d) if d.redelivery))
        {
            consumer_info(&self.nats.dead_read, &again_consumer(name))
                .await?
                .map_or(0, |info| info.ack_floor.stream_sequence)
        } else {
            0
        };
        let mut done = Acked::default();
        // Ids of another backend, or at or below the floor (acknowledged
        // or dead-lettered already), match no lease.
        let live = |ids: &[AckId], expired: &mut u64| -> Vec<NatsDelivery> {
            ids.iter()
                .filter_map(|id| match id {
                    AckId::Nats(d)
                        if d.stream_seq
                            > if d.redelivery {
                                again_floor
                            } else {
                                main.ack_floor.stream_sequence
                            } =>
                    {
                        Some(*d)
                    }
                    _ => {
                        *expired += 1;
                        None
                    }
                })
                .collect()
        };
        let to_ack = live(acks, &mut done.expired);
        let to_nack = live(nacks, &mut done.expired);
        done.acked = self.send_acks(name, to_ack, "+ACK").await?;
        done.nacked = self.send_acks(name, to_nack, "-NAK").await?;
        self.figures(name)
            .acked
            .fetch_add(done.acked, Ordering::Relaxed);
        Ok(done)
    }

    async fn release(&self, name: &SubscriptionName, leases: &[AckId]) {
        let ids = leases
            .iter()
            .filter_map(|id| match id {
                AckId::Nats(d) => Some(*d),
                AckId::Memory { .. } => None,
            })
            .collect();
        if let Err(error) = self.send_acks(name, ids, "-NAK").await {
            // Unanswered, they come back after their ack_timeout anyway.
            tracing::debug!(%error, subscription = %name, "handing leases back failed");
        }
    }

    async fn dead_letters(
        &self,
        name: &SubscriptionName,
        after: u64,
        limit: usize,
    ) -> Result<DeadLetters, SubscriptionError> {
        self.handles(name).await?;
        let sequences = self.dead_sequences(name).await?;
        let start = sequences.partition_point(|&s| s <= after);
        let page: Vec<u64> = sequences[start..].iter().copied().take(limit).collect();
        let next = (start + page.len() < sequences.len())
            .then(|| page.last().copied())
            .flatten();
        let mut letters = Vec::with_capacity(page.len());
        for sequence in page {
            let subject = self.nats.subjects.dead(name.as_str(), Some(sequence));
            let message = match self
                .nats
                .dead_read
                .direct_get_last_for_subject(subject)
                .await
            {
                Ok(message) => message,
                // Redelivered or dropped since it was listed.
                Err(error) if error.to_string().to_ascii_lowercase().contains("not found") => {
                    continue;
                }
                Err(error) => return Err(unavailable(error)),
            };
            let delivery = message
                .headers
                .get(DELIVERIES)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            letters.push(DeadLetter {
                sequence,
                delivery,
                dead_lettered_at: SystemTime::from(message.time),
                line: FeedLine::Json(Arc::from(String::from_utf8_lossy(&message.payload))),
            });
        }
        Ok(DeadLetters { letters, next })
    }

    async fn redeliver(
        &self,
        name: &SubscriptionName,
        sequences: Option<&[u64]>,
    ) -> Result<u64, SubscriptionError> {
        self.handles(name).await?;
        let held = self.dead_sequences(name).await?;
        let chosen: Vec<u64> = match sequences {
            None => held,
            Some(wanted) => wanted
                .iter()
                .copied()
                .filter(|s| held.binary_search(s).is_ok())
                .collect(),
        };
        let subjects = &self.nats.subjects;
        let mut redelivered = 0;
        for sequence in chosen {
            let dead = subjects.dead(name.as_str(), Some(sequence));
            let message = match self.nats.dead_read.direct_get_last_for_subject(&dead).await {
                Ok(message) => message,
                Err(error) if error.to_string().to_ascii_lowercase().contains("not found") => {
                    continue;
                }
                Err(error) => return Err(unavailable(error)),
            };
            let again = subjects.again(name.as_str(), Some(sequence));
            let mut headers = async_nats::HeaderMap::new();
            if let Some(span) = super::codec::span_of(Some(&message.headers)) {
                super::codec::add_span(&mut headers, span);
            }
            self.store(again, headers, message.payload.clone()).await?;
            self.nats
                .dead_read
                .purge()
                .filter(dead)
                .await
                .map_err(unavailable)?;
            redelivered += 1;
        }
        self.figures(name)
            .again_outstanding
            .fetch_add(redelivered, Ordering::Relaxed);
        Ok(redelivered)
    }

    fn samples(&self) -> Vec<SubscriptionSample> {
        self.figures
            .lock()
            .iter()
            .map(|(name, figures)| SubscriptionSample {
                name: name.clone(),
                pending: figures.pending.load(Ordering::Relaxed),
                in_flight: figures.in_flight.load(Ordering::Relaxed),
                delivered: figures.delivered.load(Ordering::Relaxed),
                acked: figures.acked.load(Ordering::Relaxed),
                dead_lettered: figures.dead_lettered.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Reads every subscription's state now and then, so that `/metrics` shows
/// the shared gauges (and subscriptions made or deleted on other replicas).
pub(super) async fn upkeep(subscriptions: Arc<NatsSubscriptions>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        if subscriptions.check().is_ok()
            && let Err(error) = subscriptions.read_gauges().await
        {
            tracing::debug!(%error, "reading the subscriptions' gauges failed");
        }
    }
}

impl NatsSubscriptions {
    /// Every subscription's pending and in-flight counts, from the two
    /// streams' consumer lists (two requests, however many subscriptions).
    async fn read_gauges(&self) -> Result<(), SubscriptionError> {
        let mains = self.main_infos().await?;
        let agains: HashMap<String, ConsumerInfo> = self
            .nats
            .dead_read
            .consumers()
            .try_filter(|info| std::future::ready(info.name.starts_with(AGAIN_PREFIX)))
            .map_ok(|info| (info.name[AGAIN_PREFIX.len()..].to_owned(), info))
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut names = Vec::with_capacity(mains.len());
        for main in mains {
            let Ok(name) = SubscriptionName::parse(&main.name[MAIN_PREFIX.len()..]) else {
                continue;
            };
            let again = agains.get(name.as_str());
            let figures = self.figures(&name);
            figures.pending.store(
                main.num_pending + again.map_or(0, |a| a.num_pending),
                Ordering::Relaxed,
            );
            figures.in_flight.store(
                (main.num_ack_pending + again.map_or(0, |a| a.num_ack_pending)) as u64,
                Ordering::Relaxed,
            );
            figures.again_outstanding.store(
                again.map_or(0, |a| a.num_pending + a.num_ack_pending as u64),
                Ordering::Relaxed,
            );
            names.push(name.to_string());
        }
        self.figures.lock().retain(|name, _| names.contains(name));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_reads_back_from_the_metadata() {
        for start in [
            Start::Earliest,
            Start::Latest,
            Start::After(42),
            Start::Since {
                at: UnixNanos::from_nanos(1_700_000_000_000_000_000),
                text: "2023-11-14T22:13:20+00:00".into(),
            },
        ] {
            let read = parse_start(&start_text(&start));
            assert_eq!(read.as_ref(), Some(&start));
            if let (Start::Since { text, .. }, Some(Start::Since { text: back, .. })) =
                (&start, &read)
            {
                assert_eq!(text, back, "echoed as given");
            }
        }
        assert!(parse_start("after:x").is_none());
        assert!(parse_start("soon").is_none());
    }

    #[test]
    fn a_subjects_last_number_is_its_sequence() {
        assert_eq!(last_number("eventflow.again.orders.17"), Some(17));
        assert_eq!(last_number("eventflow.again.orders.x"), None);
    }
}
