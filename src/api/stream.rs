//! `GET /events/stream`: Server-Sent Events of published events.
//!
//! Each message's `id:` is the event's arrival sequence. A client that
//! reconnects with `Last-Event-ID: N` first gets the published events with
//! a sequence above N still held in the store (replay), then the live feed.
//! Replay and live feed are stitched by publish sequence: the subscription
//! is taken *before* the watermark is read, so every publication is either
//! at or below the watermark (replayed) or above it (live), never both and
//! never neither.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::AppState;
use crate::event::EventId;
use crate::pipeline::Pipeline;
use crate::sink::StreamLine;
use crate::store::{PageQuery, Status};

/// Records read from the store per replay step.
const REPLAY_PAGE: usize = 256;
/// Interval of SSE comment keep-alives.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Live stream of published events.
#[utoipa::path(
    get,
    path = "/events/stream",
    tag = "events",
    params(("Last-Event-ID" = Option<String>, Header, description = "Resume after this sequence")),
    responses(
        (status = 200, description = "An endless `text/event-stream`: one message per published event (`id:` = sequence, `data:` = the published event as JSON); `event: lagged` with `{\"skipped\": n}` when this subscriber fell behind", content_type = "text/event-stream", body = String),
    )
)]
pub(crate) async fn stream_events(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let broadcast = state.pipeline.broadcast();
    // Order matters: subscribe first, then read the watermark.
    let live = BroadcastStream::new(broadcast.subscribe());
    let pipeline = state.pipeline.clone();
    let store = pipeline.store().clone();
    let watermark = store.publish_watermark();
    let resume_after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    tracing::debug!(
        ?resume_after,
        watermark,
        subscribers = broadcast.subscribers(),
        "SSE subscriber connected"
    );

    let replay = stream::unfold(resume_after, move |cursor| {
        let store = store.clone();
        let pipeline = pipeline.clone();
        async move {
            let after = cursor?;
            let page = store
                .page(PageQuery {
                    after,
                    limit: REPLAY_PAGE,
                    status: Some(Status::Processed),
                    published_up_to: Some(watermark),
                })
                .await;
            let events: Vec<Event> = page
                .records
                .iter()
                .filter_map(|record| {
                    let published = pipeline.published(record)?.ok()?;
                    let json = published.to_json();
                    Some(Event::default().id(record.sequence.to_string()).data(json))
                })
                .collect();
            Some((stream::iter(events), page.next))
        }
    })
    .flatten();

    let replaying = resume_after.is_some();
    let metrics = state.pipeline.metrics().clone();
    let pipeline = state.pipeline.clone();
    let live = live.filter_map(move |message| {
        let pipeline = pipeline.clone();
        let metrics = metrics.clone();
        async move {
            match message {
                Ok(message) if replaying && message.publish_seq <= watermark => None,
                Ok(message) => match &message.line {
                    StreamLine::Inline(json) => Some(
                        Event::default()
                            .id(message.sequence.to_string())
                            .data(&**json),
                    ),
                    StreamLine::Stored(id) => {
                        Some(stored_line(&pipeline, id, message.sequence).await)
                    }
                },
                Err(BroadcastStreamRecvError::Lagged(skipped)) => {
                    tracing::warn!(skipped, "SSE subscriber lagged");
                    metrics.sse_lagged();
                    Some(lagged(skipped))
                }
            }
        }
    });

    let stop = state.stream_stop.clone().cancelled_owned();
    let events = replay.chain(live).map(Ok).take_until(stop);
    Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn lagged(skipped: u64) -> Event {
    Event::default()
        .event("lagged")
        .data(format!("{{\"skipped\":{skipped}}}"))
}

/// The message for a long line the feed did not carry: rendered from the
/// store, or, if the event was evicted meanwhile, a `lagged` notice.
async fn stored_line(pipeline: &Pipeline, id: &EventId, sequence: u64) -> Event {
    let rendered = pipeline
        .store()
        .get(id)
        .await
        .filter(|record| record.sequence == sequence)
        .and_then(|record| pipeline.published(&record)?.ok());
    match rendered {
        Some(published) => Event::default()
            .id(sequence.to_string())
            .data(published.to_json()),
        None => {
            pipeline.metrics().sse_lagged();
            lagged(1)
        }
    }
}
