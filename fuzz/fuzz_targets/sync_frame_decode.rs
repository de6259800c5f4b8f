//! Sync frames as a peer could send them: decoding never panics, and what decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhio_core::sync::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        let encoded = frame.encode();
        assert_eq!(Frame::decode(&encoded[4..]).ok(), Some(frame));
    }
});
