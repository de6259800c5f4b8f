//! `rhio/blobs/1` range requests: decoding never panics, and what decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhio_core::blobs::RangeRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = RangeRequest::decode(data) {
        assert_eq!(RangeRequest::decode(&request.encode()), Ok(request));
        let (start, end) = request.covering(16384);
        assert!(start <= request.start && request.end <= end && end <= request.size);
    }
});
