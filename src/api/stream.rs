//! `GET /events/stream`: Server-Sent Events of published events, read from
//! the published-events feed ([`crate::feed`]).
//!
//! Each message's `id:` is the event's publication sequence. A client that
//! reconnects with `Last-Event-ID: N` gets every published event after N
//! still held, then the live ones: one subscription to the feed serves
//! both, so there is no seam to miss or repeat an event at. Where events
//! after N are no longer held, an `event: lagged` message names the missing
//! range first; its `id:` is the range's end, so that a client resuming
//! from it does not ask for the range again.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};

use super::AppState;
use super::answer::{AnswerBudget, Held};
use super::error::{ApiError, clip};
use crate::feed::{FeedItem, FeedLine};
use crate::pipeline::Reader;
use crate::telemetry::metrics::Metrics;

/// Interval of SSE comment keep-alives.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Live stream of published events.
#[utoipa::path(
    get,
    path = "/events/stream",
    tag = "events",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this publication sequence: the `id:` of the last message received, never a POST's arrival `sequence` (in nats mode the two differ)")),
    responses(
        (status = 200, description = "An endless `text/event-stream`: one message per published event (`id:` = its publication sequence: 1, 2, 3 … in publication order, no gaps; `data:` = the published event as JSON); `event: lagged` with `{\"from\",\"to\",\"skipped\"}` for published events no longer held", content_type = "text/event-stream", body = String),
        (status = 400, description = "`Last-Event-ID` is not a publication sequence", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`server.max_subscribers` are connected already (`Retry-After`)", body = super::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn stream_events(
    State(state): State<AppState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let resume_after = match headers.get("last-event-id") {
        None => None,
        Some(value) => {
            let text = String::from_utf8_lossy(value.as_bytes());
            let parsed = text.trim().parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "Last-Event-ID `{}` is not a publication sequence (the `id:` of a message)",
                    clip(&text)
                ))
            })?;
            Some(parsed)
        }
    };
    // Held for as long as the stream lasts: subscribers keep their
    // connections busy for good, so they get their own cap, below the
    // connection cap, and can never lock requests out.
    let slot = Arc::clone(&state.subscribers)
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManySubscribers(state.server.max_subscribers))?;
    let reader = state.reader.clone();
    let subscription = reader
        .feed()
        .subscribe(resume_after, state.server.subscriber_buffer_bytes);
    tracing::debug!(
        ?resume_after,
        head = reader.feed().head(),
        subscribers = reader.feed().subscribers(),
        "SSE subscriber connected"
    );
    let subscriber = Subscriber {
        subscription,
        pending: VecDeque::new(),
        held: Held::default(),
        answers: state.answers.clone(),
        reader,
        metrics: state.writer.metrics().clone(),
        replays: Arc::clone(&state.replays),
        _slot: slot,
    };
    let events = stream::unfold(subscriber, |mut subscriber| async move {
        let event = subscriber.next().await?;
        Some((Ok(event), subscriber))
    })
    .take_until(state.stream_stop.clone().cancelled_owned());
    // A stream lasts for good: it ends when a reload revokes its token.
    let tokens = state.tokens.clone();
    let revoked = async move {
        match caller {
            Some(axum::Extension(super::auth::Caller(digest))) => tokens.revoked(digest).await,
            None => std::future::pending().await,
        }
    };
    let events = events.take_until(revoked);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// One subscriber's place: what it fetched and has not sent yet (at most
/// `server.subscriber_buffer_bytes`, held against the answers' budget),
/// rendered one message at a time as its client takes them, so that a
/// client that stops reading holds that and hyper's write buffer, however
/// large its events.
struct Subscriber {
    subscription: Box<dyn crate::feed::Subscription>,
    pending: VecDeque<FeedItem>,
    /// The answers' budget `pending` holds.
    held: Held,
    answers: AnswerBudget,
    reader: Reader,
    metrics: Metrics,
    replays: Arc<tokio::sync::Semaphore>,
    /// The subscriber's place under `server.max_subscribers`.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Subscriber {
    /// The next message; `None` once the feed is gone.
    async fn next(&mut self) -> Option<Event> {
        if self.pending.is_empty() {
            self.held.keep(0);
            let items = self.subscription.next().await?;
            let bytes = items.iter().map(FeedItem::held_bytes).sum::<usize>();
            // Taken once fetched (an idle subscriber holds none of it); when
            // the budget is full, the subscriber waits its turn.
            self.held = self.answers.take(bytes).await;
            self.pending = items.into();
        }
        let item = self.pending.pop_front()?;
        let sent = item.held_bytes();
        // Events older than the feed's window are rendered again from the
        // store: one subscriber at a time does that, so that many resuming
        // from 0 cannot take every core from ingest.
        let message = if is_stored(&item) {
            let replaying = Arc::clone(&self.replays).acquire_owned().await.ok();
            let message = message(&self.reader, &self.metrics, item);
            drop(replaying);
            tokio::task::yield_now().await;
            message
        } else {
            message(&self.reader, &self.metrics, item)
        };
        self.held.keep(self.held.bytes().saturating_sub(sent));
        Some(message)
    }
}

/// Whether `item` must be rendered from the store.
fn is_stored(item: &FeedItem) -> bool {
    matches!(
        item,
        FeedItem::Event {
            line: FeedLine::Stored(_),
            ..
        }
    )
}

/// The SSE message for one feed item.
fn message(reader: &Reader, metrics: &Metrics, item: FeedItem) -> Event {
    match item {
        FeedItem::Event {
            publish_seq,
            line: FeedLine::Json(json),
        } => Event::default().id(publish_seq.to_string()).data(&*json),
        FeedItem::Event {
            publish_seq,
            line: FeedLine::Stored(record),
        } => match reader.published(&record) {
            Some(Ok(published)) => Event::default()
                .id(publish_seq.to_string())
                .data(published.to_json()),
            // Transforms are pure: what the worker published renders again.
            // Should it not, say so rather than drop the event unnoticed.
            _ => lagged(metrics, publish_seq, publish_seq),
        },
        FeedItem::Lagged { from, to } => lagged(metrics, from, to),
    }
}

fn lagged(metrics: &Metrics, from: u64, to: u64) -> Event {
    metrics.sse_lagged();
    tracing::debug!(from, to, "SSE subscriber skipped events no longer held");
    Event::default()
        .event("lagged")
        .id(to.to_string())
        .data(format!(
            "{{\"from\":{from},\"to\":{to},\"skipped\":{}}}",
            to - from + 1
        ))
}
