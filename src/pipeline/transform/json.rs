//! `json`: the payload must be a JSON document; an event whose payload is
//! not fails (status `failed`, with the parser's reason) and is not
//! published. Put it first in the chain to check what the client sent.

use super::{Transform, TransformContext, TransformError};
use crate::event::PublishedEvent;

/// Fails events whose payload does not parse as JSON; leaves others as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Transform for Json {
    fn name(&self) -> &'static str {
        "json"
    }

    fn apply(
        &self,
        event: &mut PublishedEvent,
        _ctx: &TransformContext,
    ) -> Result<(), TransformError> {
        // Parsed into nothing: checked without building a value.
        serde_json::from_str::<serde::de::IgnoredAny>(&event.payload)
            .map(|_| ())
            .map_err(|error| TransformError {
                transform: "json",
                reason: format!("the payload is not JSON: {error}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ctx, event};
    use super::*;

    #[test]
    fn json_payloads_pass_unchanged() {
        for payload in [r#"{"a":[1,2,{"b":null}]}"#, "42", r#""text""#, " [] "] {
            let mut e = event(payload);
            Json.apply(&mut e, &ctx()).unwrap();
            assert_eq!(e.payload, payload);
        }
    }

    #[test]
    fn other_payloads_fail_with_the_reason() {
        for payload in ["", "not json", r#"{"a":1"#, "[1,]", "1 2"] {
            let error = Json.apply(&mut event(payload), &ctx()).unwrap_err();
            assert_eq!(error.transform, "json");
            assert!(
                error.reason.starts_with("the payload is not JSON: "),
                "{error}"
            );
        }
    }
}
