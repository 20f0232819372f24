//! `--verify`: was every accepted event published exactly once?
//!
//! A subscriber reads `/events/stream` for the whole run (resuming with
//! `Last-Event-ID` if the service ends the stream, which replays exactly
//! what followed) and counts, per event number, how often each of this
//! run's ids was published. After the run it waits (bounded) until every
//! accepted event was seen; events the stream skipped (a subscriber that
//! falls behind the service's feed is told so with a `lagged` notice) are
//! looked up with `GET /events/{id}`. Failed = accepted, then not
//! published, and the service says so (status `failed`: a transform refused
//! it or a sink could not write it); lost = accepted but neither seen,
//! processed nor failed; duplicated = seen more than once. A lookup confirms
//! that an event was processed, not how often it was published, so
//! duplicates are counted among the events seen on the stream only. The
//! service's publish errors during the run are reported too. Any of these
//! fails the verification.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use http::{Request, header};
use http_body_util::{BodyDataStream, BodyExt, Empty};
use hyper::client::conn::http1;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;

use crate::args::Plan;
use crate::driver::Live;

/// The outcome of verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct VerifyReport {
    /// Events the service accepted.
    pub(crate) accepted: u64,
    /// Of those, seen on the stream.
    pub(crate) seen_on_stream: u64,
    /// Not seen on the stream but `processed` when looked up.
    pub(crate) confirmed_by_lookup: u64,
    /// Accepted, then not published: the service reports them `failed`.
    pub(crate) failed: u64,
    /// Accepted, never published, and not reported failed either.
    pub(crate) lost: u64,
    /// Events of this run seen on the stream more than once.
    pub(crate) duplicated: u64,
    /// `lagged` notices the subscriber received.
    pub(crate) stream_lagged: u64,
    /// Times the stream ended and was resumed with `Last-Event-ID`.
    pub(crate) stream_resumed: u64,
    /// The stream ended before verification was done (the service closed it).
    pub(crate) stream_ended_early: bool,
    /// Growth of the service's `eventflow_publish_errors_total` over the
    /// run (`None`: `/metrics` could not be read).
    pub(crate) publish_errors: Option<u64>,
    /// Up to 10 lost event numbers, for debugging.
    pub(crate) lost_examples: Vec<u64>,
}

/// Publications seen on the stream, by event number.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    counts: Vec<u8>,
    lagged: u64,
    /// Times the stream ended and was resumed.
    resumed: u64,
}

impl Seen {
    /// Counts a publication of event `n`, unless `n` is at or past
    /// `issued` (not sent by this run: another client's id that matches
    /// the pattern, which must not grow the table).
    pub(crate) fn saw(&mut self, n: u64, issued: u64) {
        if n >= issued {
            return;
        }
        let Ok(i) = usize::try_from(n) else { return };
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    fn count(&self, n: u64) -> u8 {
        usize::try_from(n)
            .ok()
            .and_then(|i| self.counts.get(i))
            .copied()
            .unwrap_or(0)
    }

    fn all_seen(&self, accepted: &[Range<u64>]) -> bool {
        accepted
            .iter()
            .all(|r| r.clone().all(|n| self.count(n) > 0))
    }
}

/// What the service says of an event the stream did not show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LookedUp {
    /// Published.
    Processed,
    /// Not published, and the service says so.
    Failed,
    /// Pending, unknown, or no answer.
    Other,
}

/// Compares what was accepted with what was seen; `look_up` says what the
/// service reports of an unseen event.
pub(crate) fn reconcile(
    accepted: &[Range<u64>],
    seen: &Seen,
    mut look_up: impl FnMut(u64) -> LookedUp,
) -> VerifyReport {
    let mut report = VerifyReport {
        stream_lagged: seen.lagged,
        stream_resumed: seen.resumed,
        ..Default::default()
    };
    for n in accepted.iter().flat_map(|r| r.clone()) {
        report.accepted += 1;
        match seen.count(n) {
            0 => match look_up(n) {
                LookedUp::Processed => report.confirmed_by_lookup += 1,
                LookedUp::Failed => report.failed += 1,
                LookedUp::Other => {
                    report.lost += 1;
                    if report.lost_examples.len() < 10 {
                        report.lost_examples.push(n);
                    }
                }
            },
            _ => report.seen_on_stream += 1,
        }
    }
    // Any event of this run published twice is a duplicate, accepted or
    // not (a request that timed out may still have been taken).
    report.duplicated = seen.counts.iter().filter(|&&count| count > 1).count() as u64;
    report
}

/// The running subscriber.
#[derive(Debug)]
pub(crate) struct Subscriber {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
    /// `eventflow_publish_errors_total` when the run started.
    publish_errors_before: Option<f64>,
}

/// The service's publish errors so far, summed over sinks.
async fn publish_errors(plan: &Plan) -> Option<f64> {
    let uri = format!("http://{}/metrics", plan.authority())
        .parse()
        .ok()?;
    let text = crate::sampler::fetch(&uri).await?;
    let samples = crate::sampler::parse(&text);
    Some(crate::sampler::series_sum(&samples, "eventflow_publish_errors_total").unwrap_or(0.0))
}

/// `GET path` with an optional `Last-Event-ID`.
async fn open(
    plan: &Plan,
    path: &str,
    last_event_id: Option<&str>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut sender = crate::http::connect(&plan.host, plan.port)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut request = Request::get(path).header(header::HOST, plan.authority());
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// Opens the stream, resuming after `last_event_id` when given.
async fn open_stream(
    plan: &Plan,
    last_event_id: Option<&str>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let response = open(plan, "/events/stream", last_event_id).await?;
    if response.status() != 200 {
        return Err(format!("GET /events/stream answered {}", response.status()));
    }
    Ok(response)
}

/// How often the subscriber resumes a stream the service ended.
const MAX_RESUMES: u32 = 5;

/// Subscribes to the stream before the run starts; `live` says how many
/// events the run has issued. A stream that ends is resumed with
/// `Last-Event-ID` (the service replays from there, so nothing is missed).
pub(crate) async fn subscribe(plan: &Plan, live: Arc<Live>) -> Result<Subscriber, String> {
    let publish_errors_before = publish_errors(plan).await;
    let mut response = open_stream(plan, None).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (plan, shared) = (plan.clone(), Arc::clone(&seen));
    let task = tokio::spawn(async move {
        let mut last_event_id: Option<String> = None;
        let mut resumes = 0;
        loop {
            let mut messages = BodyDataStream::new(response.into_body()).eventsource();
            while let Some(Ok(message)) = messages.next().await {
                if !message.id.is_empty() {
                    last_event_id = Some(message.id.clone());
                }
                let issued = live.issued_events.load(Ordering::Acquire);
                record(&message, &plan, &shared, issued);
            }
            if resumes == MAX_RESUMES {
                break;
            }
            resumes += 1;
            // Before any message: everything held, not only what comes next.
            let resume_after = last_event_id.as_deref().unwrap_or("0");
            match open_stream(&plan, Some(resume_after)).await {
                Ok(resumed) => response = resumed,
                Err(_) => break,
            }
            if let Ok(mut seen) = shared.lock() {
                seen.resumed += 1;
            }
        }
    });
    Ok(Subscriber {
        seen,
        task,
        publish_errors_before,
    })
}

/// Counts one stream message: a publication of one of this run's events,
/// or a `lagged` notice.
fn record(message: &eventsource_stream::Event, plan: &Plan, seen: &Mutex<Seen>, issued: u64) {
    let Ok(mut seen) = seen.lock() else { return };
    match message.event.as_str() {
        "lagged" => seen.lagged += 1,
        "message" | "" => {
            #[derive(serde::Deserialize)]
            struct Published {
                id: String,
            }
            if let Ok(published) = serde_json::from_str::<Published>(&message.data)
                && let Some(n) = plan.number(&published.id)
            {
                seen.saw(n, issued);
            }
        }
        _ => {}
    }
}

/// After the run: waits for the stream to catch up, looks up what it
/// missed, and reports.
pub(crate) async fn finish(
    subscriber: Subscriber,
    plan: &Plan,
    accepted: &[Range<u64>],
    wait: Duration,
) -> VerifyReport {
    let deadline = Instant::now() + wait;
    loop {
        let done = subscriber
            .seen
            .lock()
            .map(|s| s.all_seen(accepted))
            .unwrap_or(true);
        if done || Instant::now() >= deadline || subscriber.task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second publication comes close behind the first: keep listening a
    // moment after the last expected one.
    let grace = DUPLICATE_GRACE.min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::sleep(grace).await;
    let stream_ended_early = subscriber.task.is_finished();
    subscriber.task.abort();
    let seen = match subscriber.seen.lock() {
        Ok(seen) => Seen {
            counts: seen.counts.clone(),
            lagged: seen.lagged,
            resumed: seen.resumed,
        },
        Err(_) => Seen::default(),
    };
    // Look up what the stream did not show (bounded concurrency).
    let unseen: Vec<u64> = accepted
        .iter()
        .flat_map(|r| r.clone())
        .filter(|&n| seen.count(n) == 0)
        .collect();
    let found = lookup(plan, &unseen).await;
    let mut report = reconcile(accepted, &seen, |n| {
        if found.processed.binary_search(&n).is_ok() {
            LookedUp::Processed
        } else if found.failed.binary_search(&n).is_ok() {
            LookedUp::Failed
        } else {
            LookedUp::Other
        }
    });
    report.stream_ended_early = stream_ended_early;
    report.publish_errors = match (subscriber.publish_errors_before, publish_errors(plan).await) {
        (Some(before), Some(after)) => Some((after - before).max(0.0) as u64),
        _ => None,
    };
    report
}

/// How long the stream is still read after every accepted event was seen.
const DUPLICATE_GRACE: Duration = Duration::from_millis(500);

/// A keep-alive connection for lookups.
struct Lookup {
    plan: Plan,
    sender: Option<http1::SendRequest<Empty<Bytes>>>,
    /// A lookup went unanswered for the timeout: the service is not
    /// answering, and the rest are not tried.
    timed_out: bool,
}

impl Lookup {
    /// `GET path` as JSON, within the run's request timeout.
    async fn get_json(&mut self, path: &str) -> Option<(u16, serde_json::Value)> {
        let timeout = self.plan.timeout;
        let answer = tokio::time::timeout(timeout, self.get_json_unbounded(path)).await;
        if answer.is_err() {
            self.timed_out = true;
        }
        answer.ok().flatten()
    }

    async fn get_json_unbounded(&mut self, path: &str) -> Option<(u16, serde_json::Value)> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(
                crate::http::connect(&self.plan.host, self.plan.port)
                    .await
                    .ok()?,
            );
        }
        let sender = self.sender.as_mut()?;
        sender.ready().await.ok()?;
        let request = Request::get(path)
            .header(header::HOST, self.plan.authority())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, serde_json::from_slice(&body).unwrap_or_default()))
    }
}

/// Below this many unseen events they are looked up one by one; above it
/// the store is paged through instead.
const LOOKUP_ONE_BY_ONE: usize = 2_000;

/// Event numbers the service reports processed, and failed (each sorted).
#[derive(Debug, Default)]
struct Found {
    processed: Vec<u64>,
    failed: Vec<u64>,
}

impl Found {
    fn sorted(mut self) -> Self {
        for numbers in [&mut self.processed, &mut self.failed] {
            numbers.sort_unstable();
            numbers.dedup();
        }
        self
    }
}

/// What the service reports of `numbers`.
async fn lookup(plan: &Plan, numbers: &[u64]) -> Found {
    if numbers.is_empty() {
        return Found::default();
    }
    if numbers.len() > LOOKUP_ONE_BY_ONE {
        return Found {
            processed: scan(plan, "processed").await,
            failed: scan(plan, "failed").await,
        }
        .sorted();
    }
    const CONCURRENCY: usize = 8;
    let mut tasks = Vec::new();
    for chunk in numbers.chunks(numbers.len().div_ceil(CONCURRENCY)) {
        let (plan, chunk) = (plan.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut client = Lookup {
                plan,
                sender: None,
                timed_out: false,
            };
            let mut found = Found::default();
            for n in chunk {
                if client.timed_out {
                    break;
                }
                let path = format!("/events/{}", percent_encode(&client.plan.id(n)));
                if let Some((200, record)) = client.get_json(&path).await {
                    match record["status"].as_str() {
                        Some("processed") => found.processed.push(n),
                        Some("failed") => found.failed.push(n),
                        _ => {}
                    }
                }
            }
            found
        }));
    }
    let mut all = Found::default();
    for task in tasks {
        if let Ok(found) = task.await {
            all.processed.extend(found.processed);
            all.failed.extend(found.failed);
        }
    }
    all.sorted()
}

/// Every event of this run with `status` still in the store, by paging
/// through `GET /events?status=`.
async fn scan(plan: &Plan, status: &str) -> Vec<u64> {
    let mut client = Lookup {
        plan: plan.clone(),
        sender: None,
        timed_out: false,
    };
    let mut found = Vec::new();
    let mut after = String::new();
    loop {
        let path = format!("/events?status={status}&limit=1000&after={after}");
        let Some((200, page)) = client.get_json(&path).await else {
            break;
        };
        for record in page["events"].as_array().into_iter().flatten() {
            if let Some(n) = record["id"].as_str().and_then(|id| plan.number(id)) {
                found.push(n);
            }
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    found
}

/// Escaped in an id used as a path segment: all but RFC 3986's unreserved characters.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn percent_encode(id: &str) -> String {
    utf8_percent_encode(id, PATH_SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(numbers: &[u64]) -> Seen {
        let mut s = Seen::default();
        for &n in numbers {
            s.saw(n, 100);
        }
        s
    }

    #[test]
    fn everything_seen_once_is_clean() {
        let report = reconcile(&[0..3, 5..6], &seen(&[0, 1, 2, 5, 9]), |_| LookedUp::Other);
        assert_eq!(report.accepted, 4);
        assert_eq!(report.seen_on_stream, 4);
        assert_eq!((report.lost, report.duplicated), (0, 0));
    }

    #[test]
    fn unseen_are_looked_up_or_lost_and_repeats_are_duplicates() {
        // 7 was not accepted (its request timed out, say) but published twice.
        let report = reconcile(&[0..5, 5..5], &seen(&[0, 1, 1, 7, 7]), |n| match n {
            3 => LookedUp::Processed,
            4 => LookedUp::Failed,
            _ => LookedUp::Other,
        });
        assert_eq!(report.seen_on_stream, 2);
        assert_eq!(report.duplicated, 2);
        assert_eq!(report.confirmed_by_lookup, 1);
        assert_eq!(report.failed, 1, "reported failed, not lost");
        assert_eq!(report.lost, 1);
        assert_eq!(report.lost_examples, vec![2]);
    }

    #[test]
    fn numbers_this_run_did_not_issue_are_ignored() {
        let mut s = Seen::default();
        s.saw(3, 10);
        s.saw(u64::MAX - 1, 10);
        s.saw(10, 10);
        assert_eq!(s.counts.len(), 4, "no room made for foreign numbers");
        assert_eq!((s.count(3), s.count(10)), (1, 0));
    }

    #[test]
    fn ids_are_escaped_for_lookup() {
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
    }
}
