//! Row-group blobs between clusters.
//!
//! - [`BlobIndex`]: which blobs (by BLAKE3 hash) this cluster holds, and where in its S3;
//! - [`protocol`]: `rhio/blobs/1` on the node's QUIC endpoint. A peer asks for a byte range of a
//!   blob; the server reads the range from S3 in one ranged GET and the blob's bao outboard from
//!   its sidecar, and answers with the bao encoding of the range. The client verifies every
//!   16 KiB chunk group against the blob's root hash as it arrives: the server is not trusted.

pub mod protocol;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rhio_core::manifest::DatasetManifest;

/// Chunk groups of 16 KiB (2^4 BLAKE3 chunks), as iroh-blobs uses: the outboard is 0.39% of the
/// data and a corrupt byte is caught within one group.
pub const BAO_BLOCK_SIZE: bao_tree::BlockSize = bao_tree::BlockSize::from_chunk_log(4);

/// Key of a blob's outboard (post order, no size prefix): `.rhio/outboards/<hash>.obao4`.
pub fn outboard_key(hash: &blake3::Hash) -> String {
    format!(
        "{}/outboards/{}.obao4",
        crate::datasets::SIDECAR_PREFIX,
        hash.to_hex()
    )
}

/// Where one blob's bytes are in this cluster's S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    pub key: String,
    pub offset: u64,
    pub length: u64,
}

/// Blobs of every dataset version available in this cluster, by hash. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct BlobIndex {
    blobs: Arc<RwLock<HashMap<blake3::Hash, BlobLocation>>>,
}

impl BlobIndex {
    /// Records the blobs of a version stored at `key`. A blob already known keeps its first
    /// location (any copy serves).
    pub fn insert_manifest(&self, manifest: &DatasetManifest, key: &str) {
        let mut blobs = self.blobs.write().expect("blob index lock");
        for blob in &manifest.blobs {
            let Ok(hash) = blake3::Hash::from_hex(&blob.hash) else {
                continue;
            };
            blobs.entry(hash).or_insert_with(|| BlobLocation {
                key: key.to_string(),
                offset: blob.offset,
                length: blob.length,
            });
        }
    }

    pub fn get(&self, hash: &blake3::Hash) -> Option<BlobLocation> {
        self.blobs
            .read()
            .expect("blob index lock")
            .get(hash)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.blobs.read().expect("blob index lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
