//! The bodies of the `/subscriptions` routes: what they take (read as JSON
//! values first, so that each wrong field is a 422 naming it) and what they
//! answer.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::api::error::{ApiError, clip};
use crate::event::PublishedEvent;
use crate::subscription::{
    ACK_TIMEOUT_RANGE, DEFAULT_ACK_TIMEOUT, DEFAULT_MAX_DELIVER, MAX_DELIVER_RANGE, Spec, Start,
    State,
};
use crate::time::UnixNanos;

/// The body of `PUT /subscriptions/{name}`; every field optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubscriptionInput {
    /// `"earliest"`, `"latest"` (default), `{"after": N}` (a publication
    /// sequence, at most the newest) or `{"since": "2026-12-07T10:00:00Z"}`
    /// (compared with the publication time).
    #[schema(schema_with = start_schema)]
    #[serde(default, deserialize_with = "crate::api::present")]
    start: Option<Value>,
    /// How long a lease lasts without an ack: a number and a unit (`ms`,
    /// `s`, `m`, `h`), 100 ms to 24 h; default `"30s"`.
    #[schema(value_type = Option<String>, example = "30s", pattern = "^(0|[1-9][0-9]{0,8})(ms|s|m|h)$")]
    ack_timeout: Option<String>,
    /// Leases an event gets before it is dead-lettered, 1..=1000; default 10.
    #[schema(minimum = 1, maximum = 1000)]
    max_deliver: Option<u32>,
}

impl SubscriptionInput {
    /// The settings, defaults applied.
    pub(crate) fn spec(self) -> Result<Spec, ApiError> {
        let start = match self.start {
            None => Start::Latest,
            Some(start) => parse_start(&start)?,
        };
        let ack_timeout = match self.ack_timeout.as_deref() {
            None => DEFAULT_ACK_TIMEOUT,
            Some(text) => crate::api::query::duration(text)
                .filter(|d| ACK_TIMEOUT_RANGE.contains(d))
                .ok_or_else(|| {
                    ApiError::invalid_body(format!(
                        "ack_timeout must be a duration from 100ms to 24h, a number and a unit \
                         (ms, s, m, h) such as \"30s\", got `{}`",
                        clip(text)
                    ))
                })?,
        };
        let max_deliver = match self.max_deliver {
            None => DEFAULT_MAX_DELIVER,
            Some(n) if MAX_DELIVER_RANGE.contains(&n) => n,
            Some(n) => {
                return Err(ApiError::invalid_body(format!(
                    "max_deliver must be between 1 and 1000, got {n}"
                )));
            }
        };
        Ok(Spec {
            start,
            ack_timeout,
            max_deliver,
        })
    }
}

fn parse_start(start: &Value) -> Result<Start, ApiError> {
    let wrong = || {
        ApiError::invalid_body(
            "start must be \"earliest\", \"latest\", {\"after\": N} or {\"since\": RFC 3339 time}",
        )
    };
    match start {
        Value::String(s) if s == "earliest" => Ok(Start::Earliest),
        Value::String(s) if s == "latest" => Ok(Start::Latest),
        Value::Object(fields) if fields.len() == 1 => {
            if let Some(after) = fields.get("after") {
                return after.as_u64().map(Start::After).ok_or_else(|| {
                    ApiError::invalid_body("start.after must be a publication sequence (0 or more)")
                });
            }
            let text = fields
                .get("since")
                .and_then(Value::as_str)
                .ok_or_else(wrong)?;
            let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|_| {
                ApiError::invalid_body(format!(
                    "start.since must be an RFC 3339 time such as \"2026-12-07T10:00:00Z\", got `{}`",
                    clip(text)
                ))
            })?;
            // Before 1970 is before every publication.
            let nanos = at.timestamp_nanos_opt().unwrap_or(i64::MAX).max(0);
            Ok(Start::Since {
                at: UnixNanos::from_nanos(nanos.unsigned_abs()),
                text: text.to_owned(),
            })
        }
        _ => Err(wrong()),
    }
}

/// The document's schema of a start: one of its four forms.
fn start_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    let object = |field: &str, property: ObjectBuilder| {
        ObjectBuilder::new()
            .property(field, property)
            .required(field)
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
            ))
    };
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["earliest", "latest"])),
        )
        .item(object(
            "after",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Int64,
                )))
                .minimum(Some(0)),
        ))
        .item(object(
            "since",
            ObjectBuilder::new().schema_type(Type::String).format(Some(
                utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::DateTime),
            )),
        ))
        .into()
}

/// A subscription's settings and where it stands.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SubscriptionView {
    /// Its name.
    name: String,
    /// Its start, as given.
    #[schema(schema_with = start_schema)]
    start: Value,
    /// How long a lease lasts without an ack.
    #[schema(example = "30s")]
    ack_timeout: String,
    /// Leases an event gets before it is dead-lettered.
    max_deliver: u32,
    /// The highest publication sequence with every event at or below it
    /// acknowledged or dead-lettered.
    committed: u64,
    /// Published after the cursor and not leased now (never delivered,
    /// handed back or expired).
    pending: u64,
    /// Leased now, lease live.
    in_flight: u64,
    /// In the dead-letter list now.
    dead_lettered: u64,
    /// Events history dropped before they were leased.
    skipped: u64,
}

impl From<State> for SubscriptionView {
    fn from(state: State) -> Self {
        let start = match &state.spec.start {
            Start::Earliest => Value::from("earliest"),
            Start::Latest => Value::from("latest"),
            Start::After(after) => serde_json::json!({ "after": after }),
            Start::Since { text, .. } => serde_json::json!({ "since": text }),
        };
        Self {
            name: state.name.to_string(),
            start,
            ack_timeout: format_duration(state.spec.ack_timeout),
            max_deliver: state.spec.max_deliver,
            committed: state.committed,
            pending: state.pending,
            in_flight: state.in_flight,
            dead_lettered: state.dead_lettered,
            skipped: state.skipped,
        }
    }
}

/// A duration as a request would write it: the largest unit that divides it.
fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    match millis {
        0 => "0s".into(),
        m if m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m % 1000 == 0 => format!("{}s", m / 1000),
        m => format!("{m}ms"),
    }
}

/// `GET /subscriptions`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SubscriptionList {
    /// Every subscription, by name.
    pub(super) subscriptions: Vec<SubscriptionView>,
}

/// Query of `POST /subscriptions/{name}/poll`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PollParams {
    /// Most events to lease, 1..=1000; default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub(super) max: Option<String>,
    /// How long to wait for the first event: a number and a unit (`ms`,
    /// `s`, `m`, `h`) such as `5s`, at most `server.request_timeout`;
    /// default `0s`.
    #[param(value_type = Option<String>, pattern = "^(0|[1-9][0-9]{0,8})(ms|s|m|h)$")]
    pub(super) wait: Option<String>,
}

/// The wait of a poll, if `raw` is one within `limit`.
pub(crate) fn poll_wait(raw: Option<&str>, limit: Duration) -> Result<Duration, ApiError> {
    let Some(raw) = raw else {
        return Ok(Duration::ZERO);
    };
    crate::api::query::duration(raw)
        .filter(|wait| *wait <= limit)
        .ok_or_else(|| {
            ApiError::invalid_query(
                "wait",
                format!(
                    "must be a number and a unit (ms, s, m, h) such as \"5s\", at most \
                     server.request_timeout ({}), got `{}`",
                    format_duration(limit),
                    clip(raw)
                ),
            )
        })
}

/// A published event in an answer: rendered from its stored record, or
/// the line as it was published (nats mode keeps the line).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum EventBody<'a> {
    /// Rendered now.
    Rendered(PublishedEvent),
    /// As published.
    Published(&'a serde_json::value::RawValue),
}

/// One leased event of a poll.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PolledEvent<'a> {
    /// What to ack or nack it with.
    pub(super) ack_id: String,
    /// Its publication sequence (the SSE `id:`, not the POST's arrival
    /// `sequence`).
    pub(super) sequence: u64,
    /// Which delivery this is, from 1.
    pub(super) delivery: u32,
    /// The published event.
    #[schema(value_type = PublishedEvent)]
    pub(super) event: EventBody<'a>,
}

/// `POST /subscriptions/{name}/poll` (the document's type for it; the
/// handler renders it event by event).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PollAnswer<'a> {
    /// The leased events (possibly none).
    events: Vec<PolledEvent<'a>>,
}

/// The body of `POST /subscriptions/{name}/ack`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AckInput {
    /// Leases to acknowledge.
    #[serde(default)]
    #[schema(inline, value_type = Vec<AckIdText>)]
    pub(super) ack_ids: Vec<String>,
    /// Leases to hand back at once (each counts as a delivery).
    #[serde(default)]
    #[schema(inline, value_type = Vec<AckIdText>)]
    pub(super) nack_ids: Vec<String>,
}

/// An `ack_id` as a poll gave it.
#[derive(ToSchema)]
#[schema(
    pattern = "^(m1\\.(0|[1-9][0-9]{0,17})\\.(0|[1-9][0-9]{0,17})|n1\\.[pr](\\.(0|[1-9][0-9]{0,18})){5})$"
)]
#[allow(dead_code)] // only the document's type
pub(crate) struct AckIdText(String);

/// What an ack request did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AckAnswer {
    /// Leases acknowledged.
    pub(super) acked: u64,
    /// Leases handed back.
    pub(super) nacked: u64,
    /// Ids that matched no live lease (expired, already acked,
    /// dead-lettered): never an error.
    pub(super) expired: u64,
}

/// Query of `GET /subscriptions/{name}/dead-letters`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeadLetterParams {
    /// Page size, 1..=1000; default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub(super) limit: Option<String>,
    /// Cursor from a previous page's `next` (empty: from the start).
    #[param(value_type = Option<String>, pattern = r"^[0-9]{0,19}$")]
    pub(super) after: Option<String>,
}

/// One dead letter.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeadLetterView<'a> {
    /// Its publication sequence.
    pub(super) sequence: u64,
    /// The deliveries it had.
    pub(super) delivery: u32,
    /// When it was dead-lettered (RFC 3339, UTC).
    pub(super) dead_lettered_at: &'a str,
    /// The published event.
    #[schema(value_type = PublishedEvent)]
    pub(super) event: EventBody<'a>,
}

/// A page of dead letters (the document's type for it).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeadLetterPage<'a> {
    /// In publication order.
    events: Vec<DeadLetterView<'a>>,
    /// Cursor for the next page, or null.
    next: Option<String>,
}

/// The body of `POST /subscriptions/{name}/dead-letters/redeliver`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedeliverInput {
    /// Publication sequences of the dead letters to hand out again
    /// (absent: all of them).
    pub(super) sequences: Option<Vec<u64>>,
}

/// What a redelivery did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RedeliverAnswer {
    /// Dead letters handed out again.
    pub(super) redelivered: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(body: &str) -> Result<Spec, ApiError> {
        serde_json::from_str::<SubscriptionInput>(body)
            .unwrap()
            .spec()
    }

    #[test]
    fn defaults_and_each_start() {
        let defaults = spec("{}").unwrap();
        assert_eq!(defaults.start, Start::Latest);
        assert_eq!(defaults.ack_timeout, Duration::from_secs(30));
        assert_eq!(defaults.max_deliver, 10);
        assert_eq!(
            spec(r#"{"start":"earliest"}"#).unwrap().start,
            Start::Earliest
        );
        assert_eq!(
            spec(r#"{"start":{"after":7}}"#).unwrap().start,
            Start::After(7)
        );
        let since = spec(r#"{"start":{"since":"2026-12-07T10:00:00Z"}}"#).unwrap();
        assert!(matches!(since.start, Start::Since { .. }));
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        for body in [
            r#"{"start":"middle"}"#,
            r#"{"start":{"after":-1}}"#,
            r#"{"start":{"after":1,"since":"2026-12-07T10:00:00Z"}}"#,
            r#"{"start":{"since":"yesterday"}}"#,
            r#"{"ack_timeout":"30sec"}"#,
            r#"{"ack_timeout":"10ms"}"#,
            r#"{"ack_timeout":"2d"}"#,
            r#"{"max_deliver":0}"#,
            r#"{"max_deliver":1001}"#,
        ] {
            assert!(spec(body).is_err(), "{body}");
        }
    }

    #[test]
    fn durations_are_written_in_their_largest_unit() {
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn a_poll_waits_at_most_the_request_timeout() {
        let limit = Duration::from_secs(10);
        assert_eq!(poll_wait(None, limit).unwrap(), Duration::ZERO);
        assert_eq!(poll_wait(Some("10s"), limit).unwrap(), limit);
        assert!(poll_wait(Some("11s"), limit).is_err());
        assert!(poll_wait(Some("soon"), limit).is_err());
    }
}
