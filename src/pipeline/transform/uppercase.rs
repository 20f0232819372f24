//! `uppercase`: Unicode-correct uppercase of the payload.

use super::{Transform, TransformContext, TransformError};
use crate::event::PublishedEvent;

/// Uppercases the payload with Unicode's full case mapping (`ß` → `SS`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Uppercase;

impl Transform for Uppercase {
    fn name(&self) -> &'static str {
        "uppercase"
    }

    fn apply(
        &self,
        event: &mut PublishedEvent,
        _ctx: &TransformContext,
    ) -> Result<(), TransformError> {
        if event.payload.is_ascii() {
            // In place, no allocation: the common case for machine events.
            event.payload.make_ascii_uppercase();
        } else {
            event.payload = event.payload.to_uppercase();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ctx, event};
    use super::*;

    fn upper(s: &str) -> String {
        let mut e = event(s);
        Uppercase.apply(&mut e, &ctx()).unwrap();
        e.payload
    }

    #[test]
    fn ascii() {
        assert_eq!(upper("hello, world 123"), "HELLO, WORLD 123");
    }

    #[test]
    fn sharp_s_expands() {
        assert_eq!(upper("straße"), "STRASSE");
    }

    #[test]
    fn ligatures_expand() {
        assert_eq!(upper("ﬁx ﬂow"), "FIX FLOW");
    }

    #[test]
    fn other_scripts() {
        assert_eq!(upper("ǆ ǅ ῳ"), "Ǆ Ǆ ΩΙ");
        assert_eq!(upper("привет"), "ПРИВЕТ");
        assert_eq!(upper("ﬃ"), "FFI");
    }

    #[test]
    fn emoji_and_caseless_text_are_unchanged() {
        assert_eq!(upper("ok 👍🏽 日本"), "OK 👍🏽 日本");
    }

    #[test]
    fn empty() {
        assert_eq!(upper(""), "");
    }
}
