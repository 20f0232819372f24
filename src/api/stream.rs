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

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};

use super::AppState;
use super::error::{ApiError, clip};
use crate::feed::{FeedItem, FeedLine};
use crate::pipeline::Pipeline;

/// Interval of SSE comment keep-alives.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Live stream of published events.
#[utoipa::path(
    get,
    path = "/events/stream",
    tag = "events",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this publication sequence (the `id:` of the last message received)")),
    responses(
        (status = 200, description = "An endless `text/event-stream`: one message per published event (`id:` = its publication sequence: 1, 2, 3 … in publication order, no gaps; `data:` = the published event as JSON); `event: lagged` with `{\"from\",\"to\",\"skipped\"}` for published events no longer held", content_type = "text/event-stream", body = String),
        (status = 400, description = "`Last-Event-ID` is not a publication sequence", body = super::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn stream_events(
    State(state): State<AppState>,
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
    let pipeline = state.pipeline.clone();
    let subscription = pipeline.feed().subscribe(resume_after);
    tracing::debug!(
        ?resume_after,
        head = pipeline.feed().head(),
        subscribers = pipeline.feed().subscribers(),
        "SSE subscriber connected"
    );
    let items = stream::unfold(subscription, |mut subscription| async move {
        let items = subscription.next().await?;
        Some((stream::iter(items), subscription))
    })
    .flatten();
    let stop = state.stream_stop.clone().cancelled_owned();
    let events = items
        .map(move |item| Ok(message(&pipeline, item)))
        .take_until(stop);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// The SSE message for one feed item.
fn message(pipeline: &Pipeline, item: FeedItem) -> Event {
    match item {
        FeedItem::Event {
            publish_seq,
            line: FeedLine::Json(json),
        } => Event::default().id(publish_seq.to_string()).data(&*json),
        FeedItem::Event {
            publish_seq,
            line: FeedLine::Stored(record),
        } => match pipeline.published(&record) {
            Some(Ok(published)) => Event::default()
                .id(publish_seq.to_string())
                .data(published.to_json()),
            // Transforms are pure: what the worker published renders again.
            // Should it not, say so rather than drop the event unnoticed.
            _ => lagged(pipeline, publish_seq, publish_seq),
        },
        FeedItem::Lagged { from, to } => lagged(pipeline, from, to),
    }
}

fn lagged(pipeline: &Pipeline, from: u64, to: u64) -> Event {
    pipeline.metrics().sse_lagged();
    tracing::debug!(from, to, "SSE subscriber skipped events no longer held");
    Event::default()
        .event("lagged")
        .id(to.to_string())
        .data(format!(
            "{{\"from\":{from},\"to\":{to},\"skipped\":{}}}",
            to - from + 1
        ))
}
