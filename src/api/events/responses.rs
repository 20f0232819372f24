//! The bodies and query strings of `/events`.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::event::PublishedEvent;
use crate::pipeline::Reader;
use crate::store::{Outcome, Record, Status};

/// How an ingest request was taken.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum IngestStatus {
    /// New and queued for processing.
    Accepted,
    /// Already stored with the same content; not processed again.
    Duplicate,
}

/// Answer to `POST /events` (borrowing the event's id).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct IngestResponse<'a> {
    pub(super) id: &'a str,
    pub(super) status: IngestStatus,
    /// Arrival sequence: the order events were accepted (not the publication sequence of the SSE `id:`; in nats mode the two differ).
    pub(super) sequence: u64,
}

/// One refused event of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchRejected {
    /// Position in the batch, from 0.
    pub(super) index: usize,
    /// The event's id, when it had a readable one.
    pub(super) id: Option<String>,
    /// Why it was refused.
    pub(super) error: String,
}

/// Answer to `POST /events/batch`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchResponse {
    /// Events newly accepted.
    pub(super) accepted: usize,
    /// Events already stored with the same content.
    pub(super) duplicates: usize,
    /// Events refused, with the reason: the first 100 (by position).
    pub(super) rejected: Vec<BatchRejected>,
    /// How many events were refused in all.
    pub(super) rejected_total: usize,
}

/// A stored event and what became of it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RecordView {
    pub(super) id: String,
    pub(super) timestamp: i64,
    /// The payload as received.
    pub(super) payload: String,
    pub(super) status: Status,
    /// Arrival sequence: the order events were accepted (not the
    /// publication sequence of the SSE `id:`).
    pub(super) sequence: u64,
    /// Processing attempts so far: 1, and one more for each retry.
    pub(super) attempts: u32,
    /// When it was accepted (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub(super) received_at: String,
    /// The published event, once processed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<PublishedEvent>)]
    pub(super) result: Option<PublishedEvent>,
    /// Why processing failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

impl RecordView {
    pub(crate) fn of(record: &Record, reader: &Reader) -> Self {
        let (result, error) = match record.outcome() {
            Some(Outcome::Processed { .. }) => match reader.published(record) {
                Some(Ok(published)) => (Some(published), None),
                // Transforms are pure, so this re-derivation cannot fail where
                // the worker's run succeeded; say so rather than hide it.
                Some(Err(e)) => (None, Some(format!("re-deriving the result failed: {e}"))),
                None => (None, None),
            },
            Some(Outcome::Failed { error }) => (None, Some(error.to_string())),
            None => (None, None),
        };
        Self {
            id: record.event.id.to_string(),
            timestamp: record.event.timestamp,
            payload: record.event.payload.to_string(),
            status: record.status(),
            sequence: record.sequence,
            attempts: reader.attempts(record),
            received_at: crate::time::rfc3339_micros(record.received_at.into())
                .as_str()
                .to_owned(),
            result,
            error,
        }
    }
}

/// A page of events in arrival order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventPage {
    pub(super) events: Vec<RecordView>,
    /// Pass as `after` to get the next page; null on the last page.
    pub(super) next: Option<String>,
    /// Present (true) when a `status` filter's scan stopped at its time or
    /// read budget before finding `limit` matches: the page may hold fewer,
    /// and more may follow `next` (nats mode, over a long history).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) incomplete: Option<bool>,
}

/// Query of `POST /events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct IngestParams {
    /// `published`: answer only once the event is published (200 with the
    /// published event, or 504 after `server.request_timeout`).
    #[param(value_type = Option<WaitFor>, inline)]
    pub(super) wait: Option<String>,
}

/// The body of a 200 from `POST /events`: a duplicate's answer, or with
/// `?wait=published` the published event (the document's type for it).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum IngestOk<'a> {
    /// Same id and content as a stored event.
    Duplicate(IngestResponse<'a>),
    /// `?wait=published`: the event as published.
    Published(crate::event::PublishedEvent),
}

/// What `?wait=` can wait for (the document's type for it; the handler
/// reads the text and refuses anything else with 422).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WaitFor {
    /// The event's publication.
    Published,
}

impl WaitFor {
    /// The value of `?wait=`, if it names something to wait for.
    pub(crate) fn from_query(text: &str) -> Option<Self> {
        (text == "published").then_some(Self::Published)
    }
}

/// Query of `POST /events/batch`: none is taken; `wait` is named only to
/// refuse it with a clear message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchParams {
    pub(super) wait: Option<String>,
}

/// Query of `GET /events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Page size, 1..=1000; default 100. (The handler reads the text:
    /// anything else is 422, as the document's type says.)
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub(super) limit: Option<String>,
    /// Cursor from a previous page's `next` (empty: from the start).
    #[param(value_type = Option<String>, pattern = r"^[0-9]{0,19}$")]
    pub(super) after: Option<String>,
    /// Only events with this status.
    #[param(value_type = Option<crate::store::Status>, inline)]
    pub(super) status: Option<String>,
}
