//! Sync requests (the first frame a peer sends): decoding never panics, what decodes
//! round-trips, and asking it which logs are wanted never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhio_core::identity::PrivateKey;
use rhio_core::operation::LogId;
use rhio_core::sync::{Frame, RequestReader};

fuzz_target!(|data: &[u8]| {
    let mut frame = vec![1u8];
    frame.extend_from_slice(data);
    if let Ok(Frame::Request(request)) = Frame::decode(&frame) {
        let encoded = Frame::Request(request.clone()).encode();
        assert_eq!(Frame::decode(&encoded[4..]), Ok(Frame::Request(request.clone())));
        let author = PrivateKey::from_bytes(&[3; 32]).public_key();
        let _ = request.wants(&author, &LogId::Message("a.b".into()));
        let _ = request.wants(&author, &LogId::Dataset("d".into()));
        if let Ok(Some((_, heights))) = RequestReader::new().push(Frame::Request(request)) {
            let _ = heights.start_of(&author, &LogId::Message("a.b".into()));
        }
    }
});
