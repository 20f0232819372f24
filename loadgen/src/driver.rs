//! Connections and pacing: closed loop (each connection sends as soon as it
//! has its answer) and open loop (requests scheduled at a fixed rate;
//! latency counts from the scheduled time, so a stalled server shows up as
//! latency instead of silently lowering the offered load).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;

use crate::args::{Mode, Pacing, Plan};
use crate::pacer;
use crate::stats::{Outcome, Recorder, Timeline};
use crate::workload::{Payload, Workload};

/// Live counters for the progress bar.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) events: AtomicU64,
    /// One past the highest event number sent so far (for --verify).
    pub(crate) issued_events: AtomicU64,
}

/// One keep-alive HTTP/1.1 connection that reconnects after failures
/// (the load's connections, and the consumers' in `consume`).
pub(crate) struct Connection {
    host: String,
    port: u16,
    authority: String,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl Connection {
    pub(crate) fn new(plan: &Plan) -> Self {
        Self {
            host: plan.host.clone(),
            port: plan.port,
            authority: plan.authority(),
            sender: None,
        }
    }

    async fn connect(&mut self) -> std::io::Result<&mut http1::SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(crate::http::connect(&self.host, self.port).await?);
        }
        self.sender
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no connection"))
    }

    /// `host:port`, for the `Host` header.
    pub(crate) fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends one `GET /healthz`, so that the first measured requests do
    /// not pay for the connection or for first use of this process's code
    /// and buffers; errors are left for the run to meet.
    async fn warm_up(&mut self) {
        if let Ok(request) = Request::get("/healthz")
            .header(header::HOST, self.authority.as_str())
            .body(Full::new(Bytes::new()))
        {
            let _ = self.exchange(request).await;
        }
    }

    /// Sends one request; returns the status and body.
    async fn send(&mut self, payload: &Payload) -> Result<(u16, Bytes), ()> {
        let mut request = Request::post(payload.path)
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, payload.content_type);
        if payload.gzip {
            request = request.header(header::CONTENT_ENCODING, "gzip");
        }
        let request = request
            .body(Full::new(payload.body.clone()))
            .map_err(|_| ())?;
        self.exchange(request).await
    }

    /// Sends `request` on this connection (connecting first if need be);
    /// returns the answer's status and body.
    pub(crate) async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), ()> {
        let sender = self.connect().await.map_err(|_| ())?;
        sender.ready().await.map_err(|_| ())?;
        let response = sender.send_request(request).await.map_err(|_| ())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| ())?
            .to_bytes();
        Ok((status, body))
    }
}

/// The event numbers of `payload` the service accepted, from its answer;
/// `None` when a batch's 202 cannot be read (which were taken is unknown).
pub(crate) fn accepted_numbers(
    payload: &Payload,
    status: u16,
    body: &[u8],
) -> Option<Vec<Range<u64>>> {
    let all = payload.first..payload.first + payload.count as u64;
    Some(match (payload.count, status) {
        // Single event: 202 accepted, 200 already accepted earlier.
        (1, 200 | 202) => vec![all],
        (1, _) => Vec::new(),
        (_, 202) => {
            #[derive(serde::Deserialize)]
            struct Rejected {
                index: u64,
            }
            #[derive(serde::Deserialize)]
            struct BatchAnswer {
                #[serde(default)]
                accepted: u64,
                rejected: Vec<Rejected>,
                /// Every rejection; the service lists only the first 100.
                #[serde(default)]
                rejected_total: Option<u64>,
            }
            let answer = serde_json::from_slice::<BatchAnswer>(body).ok()?;
            let listed = answer.rejected.len() as u64;
            if answer.rejected_total.is_some_and(|total| total > listed) {
                // Which events beyond the listed rejections were taken is
                // not in the answer: unknown, unless none was.
                return (answer.accepted == 0).then(Vec::new);
            }
            let mut holes: Vec<u64> = answer.rejected.iter().map(|r| r.index).collect();
            holes.sort_unstable();
            let mut ranges = Vec::new();
            let mut next = all.start;
            for hole in holes {
                let hole = all.start + hole;
                if hole > next {
                    ranges.push(next..hole);
                }
                next = next.max(hole + 1);
            }
            if next < all.end {
                ranges.push(next..all.end);
            }
            ranges
        }
        _ => Vec::new(),
    })
}

/// Open-loop tickets that may wait for a connection, per connection.
const TICKETS_PER_CONNECTION: usize = 1024;
/// The timer period of [`Pacing::Tick`].
const TICK: Duration = Duration::from_millis(1);

/// One connection's worker: sends requests and records what happened.
struct Worker {
    connection: Connection,
    workload: Arc<Workload>,
    plan: Plan,
    recorder: Recorder,
    live: Arc<Live>,
}

impl Worker {
    /// Records the request due at `due` as never sent: the run ended
    /// first.
    fn unsent(&mut self, due: Instant) {
        self.live.requests.fetch_add(1, Ordering::Relaxed);
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        self.recorder
            .record(due, Instant::now(), self.plan.batch_size, Outcome::Unsent);
    }

    /// Sends the request starting at event `first`, due at `due` (open
    /// loop) or once its body is built (closed loop: building it is the
    /// generator's time, not the service's).
    async fn send(&mut self, first: u64, due: Option<Instant>) {
        let payload = self.workload.request(first);
        let due = due.unwrap_or_else(Instant::now);
        self.live
            .issued_events
            .fetch_max(first + payload.count as u64, Ordering::Release);
        let answer = tokio::time::timeout(self.plan.timeout, self.connection.send(&payload)).await;
        let done = Instant::now();
        let outcome = match answer {
            Ok(Ok((status, body))) => Outcome::Answer {
                status,
                accepted: accepted_numbers(&payload, status, &body).unwrap_or_else(|| {
                    self.recorder.unreadable_answers += 1;
                    Vec::new()
                }),
            },
            Ok(Err(())) => {
                self.connection.sender = None;
                Outcome::Transport
            }
            Err(_) => {
                self.connection.sender = None;
                Outcome::Timeout
            }
        };
        let failed = !matches!(&outcome, Outcome::Answer { status, .. } if *status < 500);
        self.live.requests.fetch_add(1, Ordering::Relaxed);
        self.live
            .events
            .fetch_add(payload.count as u64, Ordering::Relaxed);
        if failed {
            self.live.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.recorder.record(due, done, payload.count, outcome);
    }
}

/// Hands out open-loop tickets, (request number, due time), each at its
/// due time (see [`pacer`] for why not on tokio's timer alone) or, with
/// [`Pacing::Tick`], on the first tick of a 1 ms timer at or after it,
/// until `deadline` or `limit`. At most `backlog` tickets wait for a
/// connection: past that the schedule waits too, and the tickets it hands
/// out late keep their due times, so the wait still shows in their latency.
fn schedule(
    start: Instant,
    interval: Duration,
    pacing: Pacing,
    deadline: Option<Instant>,
    limit: Option<u64>,
    backlog: usize,
) -> async_channel::Receiver<(u64, Instant)> {
    let (sender, receiver) = async_channel::bounded::<(u64, Instant)>(backlog);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut i: u64 = 0;
        loop {
            let due = start + interval.mul_f64(i as f64);
            if deadline.is_some_and(|d| due >= d) || limit.is_some_and(|l| i >= l) {
                break;
            }
            match pacing {
                Pacing::Precise => pacer::wait_until(due).await,
                Pacing::Tick => {
                    while Instant::now() < due {
                        ticks.tick().await;
                    }
                }
            }
            if sender.send((i, due)).await.is_err() {
                break;
            }
            i += 1;
        }
    });
    receiver
}

/// Runs the plan; returns the merged measurements and the elapsed time.
pub(crate) async fn run(
    plan: &Plan,
    track_accepted: bool,
    live: Arc<Live>,
) -> (Recorder, Duration) {
    let workload = Arc::new(Workload::new(plan));
    // Connected and warmed up before the clock starts: setting up is not
    // the server's latency. (One that fails here connects again on first use.)
    let mut connections = Vec::with_capacity(plan.connections);
    let timeline = Timeline::default();
    for _ in 0..plan.connections {
        let mut connection = Connection::new(plan);
        let _ = tokio::time::timeout(plan.timeout, connection.warm_up()).await;
        let recorder = Recorder::sharing(Instant::now(), track_accepted, Arc::clone(&timeline));
        connections.push((connection, recorder));
    }
    let start = Instant::now();
    // Requests due before this are the warm-up: sent, not measured.
    let measured_from = start + plan.warmup;
    let deadline = plan.duration.map(|d| measured_from + d);
    let next_request = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let limit = plan.requests;
    let batch = plan.batch_size as u64;

    // Open loop: a scheduler hands out (request number, due time) tickets.
    let interval = Duration::from_secs_f64(1.0 / plan.rate.unwrap_or(1.0));
    let tickets = match plan.mode {
        Mode::Closed => None,
        Mode::Open => Some(schedule(
            start,
            interval,
            plan.pacing,
            deadline,
            limit,
            plan.connections * TICKETS_PER_CONNECTION,
        )),
    };
    // Open-loop requests still unsent a timeout after the schedule's end
    // (its duration, or its last request) are not sent at all: an
    // overloaded service would otherwise stretch the run without bound.
    // (Checked: `-n` can describe a schedule longer than a clock can hold.)
    let schedule_end = deadline.or_else(|| {
        let length = Duration::try_from_secs_f64(interval.as_secs_f64() * limit? as f64).ok()?;
        start.checked_add(length)
    });
    let cutoff = schedule_end.and_then(|end| end.checked_add(plan.timeout));

    let mut workers = Vec::with_capacity(plan.connections);
    for (connection, mut recorder) in connections {
        recorder.restart_at(measured_from);
        let (plan, workload, live) = (plan.clone(), Arc::clone(&workload), Arc::clone(&live));
        let (next_request, stop, tickets) = (
            Arc::clone(&next_request),
            Arc::clone(&stop),
            tickets.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut worker = Worker {
                connection,
                recorder,
                workload,
                plan,
                live,
            };
            match tickets {
                Some(tickets) => {
                    while let Ok((i, due)) = tickets.recv().await {
                        if cutoff.is_some_and(|c| Instant::now() >= c) {
                            worker.unsent(due);
                        } else {
                            worker.send(i * batch, Some(due)).await;
                        }
                    }
                }
                None => loop {
                    if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d)
                    {
                        break;
                    }
                    let i = next_request.fetch_add(1, Ordering::Relaxed);
                    if limit.is_some_and(|l| i >= l) {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    worker.send(i * batch, None).await;
                },
            }
            worker.recorder
        }));
    }
    let mut merged = Recorder::sharing(measured_from, track_accepted, timeline);
    for worker in workers {
        if let Ok(recorder) = worker.await {
            merged.merge(recorder);
        }
    }
    (merged, measured_from.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(first: u64, count: usize) -> Payload {
        Payload {
            path: "/events/batch",
            content_type: "application/json",
            gzip: false,
            body: Bytes::new(),
            first,
            count,
        }
    }

    /// Every ticket of a schedule comes once, in order, never before its
    /// due time, whichever the pacing.
    #[tokio::test]
    async fn tickets_come_in_order_and_never_early() {
        for pacing in [Pacing::Precise, Pacing::Tick] {
            let start = Instant::now();
            let interval = Duration::from_micros(250);
            let tickets = schedule(start, interval, pacing, None, Some(40), 64);
            let mut expected = 0;
            while let Ok((i, due)) = tickets.recv().await {
                assert_eq!(i, expected, "{pacing:?}");
                assert_eq!(due, start + interval * u32::try_from(i).unwrap_or(0));
                assert!(Instant::now() >= due, "{pacing:?}: ticket {i} early");
                expected += 1;
            }
            assert_eq!(expected, 40, "{pacing:?}");
        }
    }

    #[test]
    fn accepted_numbers_follow_the_answer() {
        let numbers = |p: Payload, status, body: &[u8]| accepted_numbers(&p, status, body);
        let just = |r: Range<u64>| Some(std::iter::once(r).collect::<Vec<_>>());
        assert_eq!(numbers(payload(5, 1), 202, b""), just(5..6));
        assert_eq!(numbers(payload(5, 1), 200, b""), just(5..6));
        assert_eq!(numbers(payload(5, 1), 503, b""), Some(vec![]));
        let body =
            br#"{"accepted":7,"duplicates":0,"rejected":[{"index":0},{"index":4},{"index":5}]}"#;
        assert_eq!(
            numbers(payload(100, 10), 202, body),
            Some(vec![101..104, 106..110])
        );
        let none = br#"{"accepted":3,"duplicates":0,"rejected":[]}"#;
        assert_eq!(numbers(payload(0, 3), 202, none), just(0..3));
        assert_eq!(numbers(payload(0, 3), 503, b""), Some(vec![]));
        assert_eq!(numbers(payload(0, 3), 202, b"<html>"), None, "unreadable");
        // More rejections than the answer lists: which were taken is unknown.
        let cut = br#"{"accepted":5,"duplicates":0,"rejected":[{"index":0}],"rejected_total":195}"#;
        assert_eq!(numbers(payload(0, 200), 202, cut), None);
        let none_taken =
            br#"{"accepted":0,"duplicates":5,"rejected":[{"index":0}],"rejected_total":195}"#;
        assert_eq!(numbers(payload(0, 200), 202, none_taken), Some(vec![]));
    }
}
