//! Routed message bodies: decoding never panics, and what decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhio_core::message::RoutedMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = RoutedMessage::decode(data) {
        assert_eq!(RoutedMessage::decode(&message.encode()).ok(), Some(message));
    }
});
