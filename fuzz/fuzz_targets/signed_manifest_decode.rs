//! A signed manifest file (the registry mirror's second layer) is read by anyone who pulls an
//! artifact: decoding arbitrary bytes never panics, and whatever decodes re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhio_core::manifest::SignedManifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = SignedManifest::decode(data) {
        let again = SignedManifest::decode(&signed.encode()).expect("a decoded file re-decodes");
        assert_eq!(again, signed);
    }
});
