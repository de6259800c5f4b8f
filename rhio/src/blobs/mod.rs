//! Row-group blobs between clusters.
//!
//! - [`BlobIndex`]: which blobs (by BLAKE3 hash) this cluster holds, and where in its S3;
//! - [`OutboardBuilder`]: a blob's bao outboard, computed on a blocking thread from the bytes as
//!   they stream past (import, and replication after a restart);
//! - [`protocol`]: `rhio/blobs/1` on the node's QUIC endpoint. A peer asks for a byte range of a
//!   blob; the server reads the range from S3 in one ranged GET and the blob's bao outboard from
//!   its sidecar, and answers with the bao encoding of the range. The client verifies every
//!   16 KiB chunk group against the blob's root hash as it arrives: the server is not trusted.

pub mod protocol;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rhio_core::manifest::DatasetManifest;

/// Chunk groups of 16 KiB (2^4 BLAKE3 chunks), as iroh-blobs uses: the outboard is 0.39% of the
/// data and a corrupt byte is caught within one group.
pub const BAO_BLOCK_SIZE: bao_tree::BlockSize = bao_tree::BlockSize::from_chunk_log(4);

/// Computing an outboard failed (its thread stopped or the bytes ran short).
#[derive(Debug, thiserror::Error)]
#[error("outboard: {0}")]
pub struct OutboardError(String);

/// Computes a blob's bao outboard on a blocking thread while its bytes stream past.
pub struct OutboardBuilder {
    bytes: tokio::sync::mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<std::io::Result<(blake3::Hash, Vec<u8>)>>,
}

impl OutboardBuilder {
    pub fn start(length: u64) -> Self {
        let (bytes, receiver) = tokio::sync::mpsc::channel::<Bytes>(8);
        let task = tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                receiver,
                current: Bytes::new(),
            };
            let mut outboard = Vec::new();
            let tree = bao_tree::BaoTree::new(length, BAO_BLOCK_SIZE);
            let hash = bao_tree::io::sync::outboard_post_order(reader, tree, &mut outboard)?;
            Ok((hash, outboard))
        });
        Self { bytes, task }
    }

    pub async fn feed(&self, data: Bytes) -> Result<(), OutboardError> {
        self.bytes
            .send(data)
            .await
            .map_err(|_| OutboardError("the computation stopped".into()))
    }

    pub async fn finish(self) -> Result<(blake3::Hash, Vec<u8>), OutboardError> {
        drop(self.bytes);
        self.task
            .await
            .map_err(|err| OutboardError(err.to_string()))?
            .map_err(|err| OutboardError(err.to_string()))
    }
}

/// `Read` over the chunks sent to an [`OutboardBuilder`].
struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(bytes) => self.current = bytes,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
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
