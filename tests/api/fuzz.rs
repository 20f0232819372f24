//! Property tests of the ingest decoders through the real server: random
//! bytes and near-valid JSON, as one event, a JSON array, NDJSON and gzip.
//! Every answer is a 2xx, or a 4xx with a problem document; never a 5xx, a
//! panic or a hang. (`PROPTEST_CASES` sets the number of cases: 256 in
//! `cargo test`, more in `scripts/fuzz.sh`.)

use std::sync::LazyLock;

use proptest::prelude::*;
use serde_json::Value;

use crate::helpers::{TestApp, gzip, spawn_app};

/// One runtime and one server for every case of this file's properties.
static SERVER: LazyLock<(tokio::runtime::Runtime, TestApp)> = LazyLock::new(|| {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(spawn_app());
    (runtime, app)
});

/// How a body is sent.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Single,
    Array,
    Ndjson,
    GzipNdjson,
}

/// Sends `body` framed as `framing`; the status and the answer's problem
/// document (for 4xx).
fn send(framing: Framing, body: &[u8]) -> Result<(), TestCaseError> {
    let (runtime, app) = &*SERVER;
    let (path, content_type, bytes, gzipped) = match framing {
        Framing::Single => ("/events", "application/json", body.to_vec(), false),
        Framing::Array => {
            let mut array = b"[".to_vec();
            array.extend_from_slice(body);
            array.push(b']');
            ("/events/batch", "application/json", array, false)
        }
        Framing::Ndjson => (
            "/events/batch",
            "application/x-ndjson",
            body.to_vec(),
            false,
        ),
        Framing::GzipNdjson => ("/events/batch", "application/x-ndjson", gzip(body), true),
    };
    runtime.block_on(async {
        let mut request = app
            .client
            .post(app.url(path))
            .header("content-type", content_type)
            .timeout(std::time::Duration::from_secs(10))
            .body(bytes);
        if gzipped {
            request = request.header("content-encoding", "gzip");
        }
        let response = request
            .send()
            .await
            .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response
            .text()
            .await
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert!(status < 500, "{framing:?}: {status} {text}");
        if status >= 400 {
            prop_assert_eq!(content_type.as_str(), "application/problem+json");
            let problem: Value = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
            prop_assert_eq!(problem["status"].as_u64(), Some(u64::from(status)));
        }
        Ok(())
    })
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        Just(Framing::Single),
        Just(Framing::Array),
        Just(Framing::Ndjson),
        Just(Framing::GzipNdjson),
    ]
}

/// An event, near-valid: one of its fields odd (types, ranges, Unicode,
/// extra keys), or one byte changed.
fn near_valid_event() -> impl Strategy<Value = Vec<u8>> {
    let id = prop_oneof![
        "[a-z0-9-]{1,20}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        Just(Value::from("x".repeat(300))),
        any::<i64>().prop_map(Value::from),
        Just(Value::Null),
    ];
    let timestamp = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<u64>().prop_map(Value::from),
        Just(Value::from("1700000000")),
    ];
    let payload = prop_oneof![
        any::<String>().prop_map(Value::from),
        Just(Value::from("p".repeat(70_000))),
        Just(Value::Array(vec![])),
    ];
    (
        id,
        timestamp,
        payload,
        proptest::option::of("[a-z]{1,8}"),
        any::<prop::sample::Index>(),
        proptest::option::of(any::<u8>()),
    )
        .prop_map(|(id, timestamp, payload, extra, at, byte)| {
            let mut event =
                serde_json::json!({ "id": id, "timestamp": timestamp, "payload": payload });
            if let Some(key) = extra {
                event[key] = Value::from(1);
            }
            let mut bytes = serde_json::to_vec(&event).unwrap();
            if let Some(byte) = byte {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_get_an_answer_never_a_server_error(
        framing in framing(),
        body in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        send(framing, &body)?;
    }

    #[test]
    fn near_valid_events_get_an_answer_never_a_server_error(
        framing in framing(),
        events in proptest::collection::vec(near_valid_event(), 1..4),
    ) {
        let separator: &[u8] = match framing {
            Framing::Array => b",",
            _ => b"\n",
        };
        let body = events.join(separator);
        send(framing, &body)?;
    }
}
