//! Operation decoding: arbitrary header and body bytes must never panic, and whatever decodes
//! must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhio_core::operation::SignedOperation;

fuzz_target!(|data: &[u8]| {
    // The first two bytes say where the header ends and the body begins.
    let Some((length, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = (u16::from_be_bytes(*length) as usize).min(rest.len());
    let (header, body) = rest.split_at(split);
    if let Ok(op) = SignedOperation::decode(header, body.to_vec()) {
        assert_eq!(op.header.to_bytes(), header);
        assert_eq!(op.body, body);
    }
    let _ = SignedOperation::decode_header(data);
});
