//! One event's body: decoded or refused, never a panic; what decodes keeps
//! the event rules (DESIGN.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

const MAX_PAYLOAD: usize = 65_536;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = eventflow::event::decode_event(data, MAX_PAYLOAD) {
        let id = event.id.as_str();
        assert!(!id.is_empty() && id.len() <= 256);
        assert!(!id.chars().any(char::is_control));
        assert!(event.payload.len() <= MAX_PAYLOAD);
    }
});
