//! Dataset manifests (the body of dataset operations from other clusters): decoding never
//! panics, and what decodes is consistent and round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhio_core::manifest::DatasetManifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = DatasetManifest::decode(data) {
        let covered: u64 = manifest.blobs.iter().map(|blob| blob.length).sum();
        assert_eq!(covered, manifest.file_size);
        assert_eq!(DatasetManifest::decode(&manifest.encode()).ok(), Some(manifest));
    }
});
