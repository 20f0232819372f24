//! `--consumers N`: consumers of one named subscription during the run.
//!
//! Before the load starts, the subscription is created (`start: latest`,
//! the run's `--ack-timeout`); N consumers then poll it (`--poll-max`,
//! `--poll-wait`) and acknowledge every lease they get, each on its own
//! keep-alive connection. With `--kill-consumer-after`, one consumer stops
//! at that time holding its last leases unacknowledged, as a consumer that
//! dies would: those events come back to the others once their leases end.
//! After the load, the consumers go on until the subscription has nothing
//! pending or in flight (bounded), then stop, and the subscription is
//! deleted if this run made it. A subscription named with `--subscription`
//! that exists already is consumed as it is, whatever its settings.
//!
//! What each event of this run went through is counted: leases, acks, and
//! whether the dying consumer held it. With `--verify` the report says
//! whether every accepted event was acknowledged exactly once and only the
//! dead consumer's events were redelivered.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use crate::args::Plan;
use crate::driver::{Connection, Live};

/// What the consumers are to do.
#[derive(Debug, Clone)]
pub(crate) struct ConsumePlan {
    /// Consumers polling at once.
    pub(crate) consumers: usize,
    /// The subscription's name.
    pub(crate) subscription: String,
    /// Named by --subscription: an existing one is consumed whatever its
    /// settings (and never deleted).
    pub(crate) subscription_named: bool,
    /// Events one poll leases.
    pub(crate) poll_max: usize,
    /// How long a poll waits for its first event.
    pub(crate) poll_wait: Duration,
    /// The subscription's `ack_timeout`.
    pub(crate) ack_timeout: Duration,
    /// When one consumer dies holding its leases.
    pub(crate) kill_after: Option<Duration>,
}

/// What the consumers saw and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct ConsumeReport {
    pub(crate) consumers: usize,
    pub(crate) subscription: String,
    /// Leases received (redeliveries included).
    pub(crate) delivered: u64,
    /// Acks the service took.
    pub(crate) acked: u64,
    /// Acks the service counted `expired` (the lease had ended).
    pub(crate) expired: u64,
    /// Leases that were not an event's first delivery.
    pub(crate) redelivered: u64,
    /// Acked events per second, from the first lease to the last ack.
    pub(crate) acked_per_s: f64,
    /// Leases the dying consumer held when it stopped.
    pub(crate) killed_held: u64,
    /// Accepted events never acknowledged (with --verify).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) unacked: Option<u64>,
    /// Events of this run acknowledged more than once.
    pub(crate) acked_twice: u64,
    /// Events redelivered that the dying consumer did not hold.
    pub(crate) unexpected_redeliveries: u64,
    /// The subscription still had events pending or in flight when the
    /// consumers were stopped.
    pub(crate) unfinished: bool,
    /// Its committed cursor then (with nothing pending or in flight: the
    /// newest publication sequence).
    pub(crate) committed: Option<u64>,
    /// Events it had dead-lettered then.
    pub(crate) dead_lettered: Option<u64>,
}

impl ConsumeReport {
    /// Whether every accepted event was acknowledged exactly once and only
    /// the dying consumer's leases came back.
    pub(crate) fn verified(&self) -> bool {
        self.unacked == Some(0)
            && self.acked_twice == 0
            && self.expired == 0
            && self.unexpected_redeliveries == 0
            && !self.unfinished
            && self.dead_lettered == Some(0)
    }
}

/// Per event number of this run: leases, acks, and whether the dying
/// consumer held it.
#[derive(Debug, Default)]
struct Ledger {
    delivered: Vec<u8>,
    acked: Vec<u8>,
    killed: Vec<bool>,
    first_lease: Option<Instant>,
    last_ack: Option<Instant>,
}

impl Ledger {
    /// Event `n`'s entry, unless `n` is at or past `issued` (not sent by
    /// this run: another client's id that matches the pattern, which must
    /// not grow the table).
    fn slot<T: Default + Clone>(v: &mut Vec<T>, n: u64, issued: u64) -> Option<&mut T> {
        if n >= issued {
            return None;
        }
        let i = usize::try_from(n).ok()?;
        if i >= v.len() {
            v.resize(i + 1, T::default());
        }
        v.get_mut(i)
    }
}

/// The running consumers.
#[derive(Debug)]
pub(crate) struct Consumers {
    plan: ConsumePlan,
    ledger: Arc<Mutex<Ledger>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    created: bool,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    acked: AtomicU64,
    expired: AtomicU64,
    redelivered: AtomicU64,
    killed_held: AtomicU64,
    expired_on_resend: AtomicU64,
}

/// One keep-alive connection to the service (the load's own kind).
struct Client(Connection);

impl Client {
    fn new(plan: &Plan) -> Self {
        Self(Connection::new(plan))
    }

    /// `method path` with an optional JSON body: the status and the body.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.0.authority());
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let (status, bytes) = self
            .0
            .exchange(request)
            .await
            .map_err(|()| format!("{path}: no answer"))?;
        let status = StatusCode::from_u16(status).map_err(|e| e.to_string())?;
        Ok((status, bytes))
    }
}

#[derive(Deserialize)]
struct Polled {
    events: Vec<Leased>,
}

#[derive(Deserialize)]
struct Leased {
    ack_id: String,
    delivery: u32,
    event: LeasedEvent,
}

#[derive(Deserialize)]
struct LeasedEvent {
    id: String,
}

#[derive(Deserialize)]
struct AckAnswer {
    acked: u64,
    expired: u64,
}

#[derive(Deserialize)]
struct SubscriptionState {
    committed: u64,
    pending: u64,
    in_flight: u64,
    dead_lettered: u64,
}

/// Creates the subscription and starts the consumers.
pub(crate) async fn start(
    plan: &Plan,
    consume: &ConsumePlan,
    live: Arc<Live>,
) -> Result<Consumers, String> {
    let mut client = Client::new(plan);
    let body = serde_json::json!({
        "start": "latest",
        // The service takes a number and one unit.
        "ack_timeout": format!("{}ms", consume.ack_timeout.as_millis()),
    });
    let (status, answer) = client
        .call(
            Method::PUT,
            &format!("/subscriptions/{}", consume.subscription),
            Some(body.to_string().into_bytes()),
        )
        .await?;
    let created = match status {
        StatusCode::CREATED => true,
        StatusCode::OK => false,
        // One made with other settings: consumed as it is.
        StatusCode::CONFLICT if consume.subscription_named => {
            let path = format!("/subscriptions/{}", consume.subscription);
            match client.call(Method::GET, &path, None).await? {
                (StatusCode::OK, _) => false,
                (other, answer) => {
                    return Err(format!(
                        "GET {path} answered {other}: {}",
                        String::from_utf8_lossy(&answer)
                    ));
                }
            }
        }
        other => {
            return Err(format!(
                "PUT /subscriptions/{} answered {other}: {}",
                consume.subscription,
                String::from_utf8_lossy(&answer)
            ));
        }
    };
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks = (0..consume.consumers)
        .map(|i| {
            // The last consumer is the one that dies, when one does.
            let dies_at = consume
                .kill_after
                .filter(|_| i + 1 == consume.consumers)
                .map(|after| started + after);
            tokio::spawn(consumer(
                plan.clone(),
                consume.clone(),
                Arc::clone(&live),
                dies_at,
                Arc::clone(&ledger),
                Arc::clone(&counters),
                Arc::clone(&stop),
            ))
        })
        .collect();
    Ok(Consumers {
        plan: consume.clone(),
        ledger,
        counters,
        stop,
        tasks,
        created,
    })
}

/// One consumer: poll, note, ack, until told to stop (or its time to die).
async fn consumer(
    plan: Plan,
    consume: ConsumePlan,
    live: Arc<Live>,
    dies_at: Option<Instant>,
    ledger: Arc<Mutex<Ledger>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let mut client = Client::new(&plan);
    let poll = format!(
        "/subscriptions/{}/poll?max={}&wait={}ms",
        consume.subscription,
        consume.poll_max,
        consume.poll_wait.as_millis()
    );
    let ack = format!("/subscriptions/{}/ack", consume.subscription);
    while !stop.load(Ordering::Relaxed) {
        let Ok((StatusCode::OK, body)) = client.call(Method::POST, &poll, None).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(polled) = serde_json::from_slice::<Polled>(&body) else {
            continue;
        };
        if polled.events.is_empty() {
            continue;
        }
        let dying = dies_at.is_some_and(|at| Instant::now() >= at);
        let issued = live.issued_events.load(Ordering::Acquire);
        counters
            .delivered
            .fetch_add(polled.events.len() as u64, Ordering::Relaxed);
        {
            let mut ledger = ledger.lock().unwrap_or_else(PoisonError::into_inner);
            ledger.first_lease.get_or_insert_with(Instant::now);
            for leased in &polled.events {
                if leased.delivery > 1 {
                    counters.redelivered.fetch_add(1, Ordering::Relaxed);
                }
                let Some(n) = plan.number(&leased.event.id) else {
                    continue;
                };
                if let Some(delivered) = Ledger::slot(&mut ledger.delivered, n, issued) {
                    *delivered = delivered.saturating_add(1);
                }
                if dying && let Some(killed) = Ledger::slot(&mut ledger.killed, n, issued) {
                    *killed = true;
                }
            }
        }
        if dying {
            counters
                .killed_held
                .fetch_add(polled.events.len() as u64, Ordering::Relaxed);
            return;
        }
        let ids: Vec<&str> = polled.events.iter().map(|e| e.ack_id.as_str()).collect();
        let body = serde_json::json!({ "ack_ids": ids })
            .to_string()
            .into_bytes();
        // An ack lost on the way is sent again (the lease is still live);
        // one the service answered otherwise is not.
        let mut answered = client.call(Method::POST, &ack, Some(body.clone())).await;
        let resent = answered.is_err();
        if resent {
            answered = client.call(Method::POST, &ack, Some(body)).await;
        }
        let Ok((StatusCode::OK, answer)) = answered else {
            continue;
        };
        let Ok(answer) = serde_json::from_slice::<AckAnswer>(&answer) else {
            continue;
        };
        counters.acked.fetch_add(answer.acked, Ordering::Relaxed);
        // A resent ack that the lost first one had applied is `expired`:
        // not a late consumer, so counted apart.
        let expired = if resent {
            &counters.expired_on_resend
        } else {
            &counters.expired
        };
        expired.fetch_add(answer.expired, Ordering::Relaxed);
        let mut ledger = ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger.last_ack = Some(Instant::now());
        for leased in &polled.events {
            if let Some(n) = plan.number(&leased.event.id)
                && let Some(acked) = Ledger::slot(&mut ledger.acked, n, issued)
            {
                *acked = acked.saturating_add(1);
            }
        }
    }
}

/// Events the service accepted and has not published yet
/// (`eventflow_inflight_events`), if its /metrics can be read.
async fn unpublished(uri: Option<&http::Uri>) -> Option<f64> {
    let text = crate::sampler::fetch(uri?).await?;
    crate::sampler::series_sum(&crate::sampler::parse(&text), "eventflow_inflight_events")
}

/// After the load: lets the consumers drain the subscription (bounded by
/// `wait`), stops them, deletes the subscription if this run made it, and
/// reports; `accepted` (when tracked) are the event numbers the service
/// accepted.
pub(crate) async fn finish(
    consumers: Consumers,
    plan: &Plan,
    accepted: Option<&[Range<u64>]>,
    wait: Duration,
) -> ConsumeReport {
    let mut client = Client::new(plan);
    let state_path = format!("/subscriptions/{}", consumers.plan.subscription);
    // Leases a dying consumer held come back only after ack_timeout.
    let deadline = Instant::now() + wait + consumers.plan.ack_timeout;
    // Done when the subscription has nothing pending or in flight and
    // nothing accepted is still on its way to it: with --verify, every
    // accepted event acked; otherwise, the service holding nothing
    // unpublished.
    let all_acked = |ledger: &Ledger| {
        accepted.is_none_or(|accepted| {
            accepted.iter().flat_map(|r| r.clone()).all(|n| {
                usize::try_from(n).is_ok_and(|n| ledger.acked.get(n).is_some_and(|&a| a > 0))
            })
        })
    };
    let metrics_uri: Option<http::Uri> =
        format!("http://{}/metrics", plan.authority()).parse().ok();
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok((StatusCode::OK, body)) = client.call(Method::GET, &state_path, None).await
            && let Ok(state) = serde_json::from_slice::<SubscriptionState>(&body)
        {
            let drained = state.pending == 0 && state.in_flight == 0;
            last = Some(state);
            let arrived = if accepted.is_some() {
                all_acked(
                    &consumers
                        .ledger
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner),
                )
            } else {
                unpublished(metrics_uri.as_ref()).await == Some(0.0)
            };
            if drained && arrived {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unfinished = last
        .as_ref()
        .is_none_or(|state| state.pending > 0 || state.in_flight > 0);
    consumers.stop.store(true, Ordering::Relaxed);
    for task in consumers.tasks {
        let _ = task.await;
    }
    if consumers.created {
        let _ = client.call(Method::DELETE, &state_path, None).await;
    }
    let ledger = consumers
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let counters = &consumers.counters;
    let acked = counters.acked.load(Ordering::Relaxed);
    let window = match (ledger.first_lease, ledger.last_ack) {
        (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
        _ => 0.0,
    };
    let at = |v: &Vec<u8>, n: usize| v.get(n).copied().unwrap_or(0);
    let unexpected_redeliveries = (0..ledger.delivered.len())
        .filter(|&n| {
            at(&ledger.delivered, n) > 1 && !ledger.killed.get(n).copied().unwrap_or(false)
        })
        .count() as u64;
    ConsumeReport {
        consumers: consumers.plan.consumers,
        subscription: consumers.plan.subscription.clone(),
        delivered: counters.delivered.load(Ordering::Relaxed),
        acked,
        expired: counters.expired.load(Ordering::Relaxed),
        redelivered: counters.redelivered.load(Ordering::Relaxed),
        acked_per_s: if window > 0.0 {
            acked as f64 / window
        } else {
            0.0
        },
        killed_held: counters.killed_held.load(Ordering::Relaxed),
        unacked: accepted.map(|accepted| {
            accepted
                .iter()
                .flat_map(|r| r.clone())
                .filter(|&n| usize::try_from(n).map_or(true, |n| at(&ledger.acked, n) == 0))
                .count() as u64
        }),
        acked_twice: ledger.acked.iter().filter(|&&count| count > 1).count() as u64,
        unexpected_redeliveries,
        unfinished,
        committed: last.as_ref().map(|state| state.committed),
        dead_lettered: last.as_ref().map(|state| state.dead_lettered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_only_when_every_count_is_right() {
        let good = ConsumeReport {
            unacked: Some(0),
            dead_lettered: Some(0),
            ..ConsumeReport::default()
        };
        assert!(good.verified());
        for bad in [
            ConsumeReport {
                unacked: None,
                ..good.clone()
            },
            ConsumeReport {
                unacked: Some(1),
                ..good.clone()
            },
            ConsumeReport {
                acked_twice: 1,
                ..good.clone()
            },
            ConsumeReport {
                expired: 1,
                ..good.clone()
            },
            ConsumeReport {
                unexpected_redeliveries: 1,
                ..good.clone()
            },
            ConsumeReport {
                unfinished: true,
                ..good.clone()
            },
            ConsumeReport {
                dead_lettered: Some(1),
                ..good.clone()
            },
        ] {
            assert!(!bad.verified(), "{bad:?}");
        }
    }
}
