//! A batch body as a JSON array: decoded or refused, never a panic; every
//! element is either a valid event or a listed rejection.
#![no_main]

use libfuzzer_sys::fuzz_target;

const MAX_PAYLOAD: usize = 65_536;
const MAX_BATCH: usize = 1_000;

fuzz_target!(|data: &[u8]| {
    if let Some(array) = eventflow::event::decode_array(data, MAX_PAYLOAD, MAX_BATCH) {
        assert!(array.len() <= MAX_BATCH + 1);
        for (_, event) in &array.valid {
            assert!(event.payload.len() <= MAX_PAYLOAD);
        }
    }
});
