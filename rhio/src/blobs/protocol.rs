//! `rhio/blobs/1`: verified byte ranges of row-group blobs.
//!
//! One request per bidirectional stream, several streams per connection:
//!
//! - request: `blob hash (32 bytes) | blob size (u64 BE) | start (u64 BE) | end (u64 BE)`, a
//!   byte range inside the blob;
//! - answer: one status byte ([`Status`]), and for `Ok` the bao encoding (pre-order parents and
//!   16 KiB chunk groups) of the chunk groups that cover the range, then the stream ends.
//!
//! The server does not verify what it sends (its S3 could hold rotten bytes); the client checks
//! each chunk group against the blob hash from the signed manifest before using a byte of it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bao_tree::io::fsm::{ResponseDecoder, ResponseDecoderNext};
use bao_tree::io::outboard::PostOrderMemOutboard;
use bao_tree::io::{BaoContentItem, DecodeError};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges, TreeNode};
use bytes::Bytes;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use p2panda_net::utils::to_verifying_key;
use rhio_core::identity::PublicKey;
use thiserror::Error;
use tokio::sync::Semaphore;

use super::{BAO_BLOCK_SIZE, BlobIndex, BlobLocation};
use crate::metrics::{Metrics, ReasonLabels};
use crate::s3::S3Store;

/// Protocol id (bound to the network id by p2panda-net).
pub const BLOBS_ALPN: &[u8] = b"rhio/blobs/1";

const REQUEST_LEN: usize = 32 + 8 + 8 + 8;
/// Largest range one request may ask for: bounds the server's memory per request.
pub const MAX_RANGE: u64 = 32 << 20;
/// Requests served at once for one peer, and for all peers together.
const PER_PEER_REQUESTS: usize = 6;
const TOTAL_REQUESTS: usize = 12;
/// A range is read from S3 in GETs of this size, in parallel.
const S3_READ_PIECE: u64 = 2 << 20;
/// Outboards kept in memory (a 100 MiB blob has a 400 KiB outboard).
const OUTBOARD_CACHE: usize = 64;

/// First byte of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    Busy = 2,
    Forbidden = 3,
    BadRequest = 4,
    Unavailable = 5,
}

impl Status {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::Busy,
            3 => Status::Forbidden,
            4 => Status::BadRequest,
            5 => Status::Unavailable,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NotFound => "not_found",
            Status::Busy => "busy",
            Status::Forbidden => "forbidden",
            Status::BadRequest => "bad_request",
            Status::Unavailable => "unavailable",
        }
    }
}

/// A range request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeRequest {
    pub hash: blake3::Hash,
    pub size: u64,
    pub start: u64,
    pub end: u64,
}

impl RangeRequest {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..32].copy_from_slice(self.hash.as_bytes());
        out[32..40].copy_from_slice(&self.size.to_be_bytes());
        out[40..48].copy_from_slice(&self.start.to_be_bytes());
        out[48..56].copy_from_slice(&self.end.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Result<Self, String> {
        let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let request = Self {
            hash: blake3::Hash::from_bytes(bytes[..32].try_into().expect("32 bytes")),
            size: word(32),
            start: word(40),
            end: word(48),
        };
        if request.start >= request.end || request.end > request.size {
            return Err(format!(
                "range {}..{} of a {}-byte blob",
                request.start, request.end, request.size
            ));
        }
        if request.end - request.start > MAX_RANGE {
            return Err(format!("range of {} bytes", request.end - request.start));
        }
        Ok(request)
    }

    /// Whole chunk groups covering the byte range: leaves are then whole groups for the encoder
    /// and the decoder alike (a partial group would make the decoder expect chunk-level
    /// parents the encoder does not send).
    fn chunks(&self) -> ChunkRanges {
        let chunks =
            ChunkRanges::from(ChunkNum::full_chunks(self.start)..ChunkNum::chunks(self.end));
        let groups = bao_tree::io::round_up_to_chunks_groups(chunks, BAO_BLOCK_SIZE);
        let canonical = bao_tree::io::sync::truncate_ranges(&groups, self.size);
        ChunkRanges::new(canonical.boundaries().iter().copied().collect())
            .expect("boundaries of a range set are sorted")
    }

    /// Byte range of the chunk groups that cover the request: what the server reads.
    fn group_range(&self) -> (u64, u64) {
        let group = BAO_BLOCK_SIZE.bytes() as u64;
        let start = self.start / group * group;
        let end = self
            .end
            .div_ceil(group)
            .saturating_mul(group)
            .min(self.size);
        (start, end)
    }
}

// ------------------------------------------------------------------------------- server side

/// Serves blob ranges to known nodes.
#[derive(Clone)]
pub struct BlobServer {
    s3: S3Store,
    index: BlobIndex,
    known: Arc<HashSet<PublicKey>>,
    metrics: Arc<Metrics>,
    outboards: Arc<Mutex<OutboardCache>>,
    per_peer: Arc<Mutex<HashMap<PublicKey, Arc<Semaphore>>>>,
    total: Arc<Semaphore>,
    /// The node's main runtime. p2panda-net runs protocol handlers inside single-threaded actor
    /// runtimes; serving (S3 reads, encoding) runs on the multi-threaded main runtime instead.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for BlobServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobServer").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct OutboardCache {
    entries: HashMap<blake3::Hash, Arc<Vec<u8>>>,
    order: VecDeque<blake3::Hash>,
}

impl BlobServer {
    pub fn new(
        s3: S3Store,
        index: BlobIndex,
        known: HashSet<PublicKey>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            s3,
            index,
            known: Arc::new(known),
            metrics,
            outboards: Default::default(),
            per_peer: Default::default(),
            total: Arc::new(Semaphore::new(TOTAL_REQUESTS)),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    async fn outboard(&self, hash: &blake3::Hash) -> Result<Arc<Vec<u8>>, String> {
        if let Some(outboard) = self
            .outboards
            .lock()
            .expect("outboard cache lock")
            .entries
            .get(hash)
        {
            return Ok(outboard.clone());
        }
        let bytes = self
            .s3
            .get_range(&super::outboard_key(hash), None)
            .await
            .map_err(|err| format!("outboard of {hash}: {err}"))?;
        let outboard = Arc::new(bytes.to_vec());
        let mut cache = self.outboards.lock().expect("outboard cache lock");
        if cache.entries.insert(*hash, outboard.clone()).is_none() {
            cache.order.push_back(*hash);
        }
        while cache.order.len() > OUTBOARD_CACHE {
            if let Some(old) = cache.order.pop_front() {
                cache.entries.remove(&old);
            }
        }
        Ok(outboard)
    }

    /// Builds the answer to one request: the status and, when Ok, the encoded range.
    async fn answer(&self, peer: &PublicKey, request: &RangeRequest) -> (Status, Vec<u8>) {
        let Some(location) = self.index.get(&request.hash) else {
            return (Status::NotFound, Vec::new());
        };
        if location.length != request.size {
            return (Status::BadRequest, Vec::new());
        }
        let peer_limit = self
            .per_peer
            .lock()
            .expect("per-peer limits lock")
            .entry(*peer)
            .or_insert_with(|| Arc::new(Semaphore::new(PER_PEER_REQUESTS)))
            .clone();
        let (Ok(_peer_permit), Ok(_permit)) = (peer_limit.try_acquire(), self.total.try_acquire())
        else {
            return (Status::Busy, Vec::new());
        };
        match self.encode(request, &location).await {
            Ok(encoded) => (Status::Ok, encoded),
            Err(err) => {
                tracing::warn!(%peer, hash = %request.hash, %err, "cannot serve a blob range");
                (Status::Unavailable, Vec::new())
            }
        }
    }

    async fn encode(&self, request: &RangeRequest, at: &BlobLocation) -> Result<Vec<u8>, String> {
        let outboard = self.outboard(&request.hash).await?;
        let (start, end) = request.group_range();
        let data: Bytes = self
            .s3
            .get_range_parallel(&at.key, at.offset + start, end - start, S3_READ_PIECE)
            .await
            .map_err(|err| format!("{}: {err}", at.key))?
            .into();
        if data.len() as u64 != end - start {
            return Err(format!("{} returned {} bytes", at.key, data.len()));
        }
        let request = *request;
        tokio::task::spawn_blocking(move || {
            let outboard = PostOrderMemOutboard {
                root: request.hash,
                tree: BaoTree::new(request.size, BAO_BLOCK_SIZE),
                data: outboard.as_slice(),
            };
            let window = Window {
                start,
                data,
                size: request.size,
            };
            let mut encoded = Vec::with_capacity((end - start) as usize + 4096);
            bao_tree::io::sync::encode_ranges(window, outboard, &request.chunks(), &mut encoded)
                .map_err(|err| format!("encode: {err}"))?;
            Ok(encoded)
        })
        .await
        .map_err(|err| err.to_string())?
    }
}

/// The bytes of a blob that were read, at their place in the blob.
struct Window {
    start: u64,
    data: Bytes,
    size: u64,
}

impl bao_tree::io::sync::ReadAt for Window {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(at) = pos.checked_sub(self.start) else {
            return Err(std::io::Error::other("read before the fetched range"));
        };
        let at = at as usize;
        if at > self.data.len() {
            return Ok(0);
        }
        let n = buf.len().min(self.data.len() - at);
        buf[..n].copy_from_slice(&self.data[at..at + n]);
        Ok(n)
    }
}

impl bao_tree::io::sync::Size for Window {
    fn size(&self) -> std::io::Result<Option<u64>> {
        Ok(Some(self.size))
    }
}

impl ProtocolHandler for BlobServer {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let peer = PublicKey::from(to_verifying_key(connection.remote_id()));
        if !self.known.contains(&peer) {
            self.metrics
                .blob_requests_refused
                .get_or_create(&ReasonLabels {
                    reason: "unknown_node",
                })
                .inc();
            tracing::warn!(%peer, "blob request from a node that is not a known node; refused");
            connection.close(1u32.into(), b"not a known node");
            return Ok(());
        }
        let server = self.clone();
        let _ = self
            .runtime
            .spawn(async move { server.serve_connection(peer, connection).await })
            .await;
        Ok(())
    }
}

impl BlobServer {
    /// Answers the range requests of one connection, each stream in its own task.
    async fn serve_connection(&self, peer: PublicKey, connection: Connection) {
        let mut streams = tokio::task::JoinSet::new();
        loop {
            let (mut send, mut recv) = match connection.accept_bi().await {
                Ok(pair) => pair,
                Err(_) => break,
            };
            while streams.try_join_next().is_some() {}
            let server = self.clone();
            streams.spawn(async move {
                let mut bytes = [0u8; REQUEST_LEN];
                if recv.read_exact(&mut bytes).await.is_err() {
                    return;
                }
                let (status, body) = match RangeRequest::decode(&bytes) {
                    Ok(request) => server.answer(&peer, &request).await,
                    Err(err) => {
                        tracing::warn!(%peer, %err, "malformed blob request");
                        (Status::BadRequest, Vec::new())
                    }
                };
                if status != Status::Ok {
                    server
                        .metrics
                        .blob_requests_refused
                        .get_or_create(&ReasonLabels {
                            reason: status.as_str(),
                        })
                        .inc();
                }
                // Counted before sending: what a peer that dies mid-answer cost us counts too.
                server.metrics.blob_bytes_served.inc_by(body.len() as u64);
                let sent = async {
                    send.write_all(&[status as u8]).await?;
                    send.write_all(&body).await?;
                    send.finish()?;
                    send.stopped().await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                }
                .await;
                if let Err(err) = sent {
                    tracing::debug!(%peer, %err, "blob answer not delivered");
                }
            });
        }
        while streams.join_next().await.is_some() {}
    }
}

// ------------------------------------------------------------------------------- client side

#[derive(Debug, Error)]
pub enum FetchError {
    /// The peer sent bytes that do not match the blob's hash: drop it for this blob.
    #[error("peer sent corrupt data: {0}")]
    Corrupt(String),
    #[error("peer does not have the blob")]
    NotFound,
    #[error("peer answered {0}")]
    Refused(&'static str),
    #[error("transport: {0}")]
    Transport(String),
}

/// A verified byte range, and how many bytes came over the wire for it.
#[derive(Debug)]
pub struct FetchedRange {
    pub bytes: Vec<u8>,
    pub wire_bytes: u64,
    /// The verified parent hash pairs that came with the range (part of the blob's outboard).
    pub parents: Vec<(TreeNode, (blake3::Hash, blake3::Hash))>,
}

/// Fetches `request` over `connection`, verifying every chunk group as it arrives.
pub async fn fetch_range(
    connection: &Connection,
    request: RangeRequest,
    timeout: Duration,
) -> Result<FetchedRange, FetchError> {
    tokio::time::timeout(timeout, fetch_range_inner(connection, request))
        .await
        .map_err(|_| FetchError::Transport(format!("no complete answer within {timeout:?}")))?
}

async fn fetch_range_inner(
    connection: &Connection,
    request: RangeRequest,
) -> Result<FetchedRange, FetchError> {
    let transport = |err: &dyn std::fmt::Display| FetchError::Transport(err.to_string());
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| transport(&e))?;
    send.write_all(&request.encode())
        .await
        .map_err(|e| transport(&e))?;
    send.finish().map_err(|e| transport(&e))?;
    let mut status = [0u8; 1];
    recv.read_exact(&mut status)
        .await
        .map_err(|e| transport(&e))?;
    match Status::from_byte(status[0]) {
        Some(Status::Ok) => {}
        Some(Status::NotFound) => return Err(FetchError::NotFound),
        Some(other) => return Err(FetchError::Refused(other.as_str())),
        None => return Err(FetchError::Corrupt(format!("status byte {}", status[0]))),
    }
    let mut out = vec![0u8; (request.end - request.start) as usize];
    let mut filled = 0u64;
    let mut wire_bytes = 1u64;
    let mut parents = Vec::new();
    let tree = BaoTree::new(request.size, BAO_BLOCK_SIZE);
    let reader = iroh_io::TokioStreamReader::new(recv);
    let mut decoder = ResponseDecoder::new(request.hash, request.chunks(), tree, reader);
    loop {
        let item = match decoder.next().await {
            ResponseDecoderNext::More((next, item)) => {
                decoder = next;
                item
            }
            ResponseDecoderNext::Done(_) => break,
        };
        match item {
            Ok(BaoContentItem::Parent(parent)) => {
                wire_bytes += 64;
                parents.push((parent.node, parent.pair));
            }
            Ok(BaoContentItem::Leaf(leaf)) => {
                wire_bytes += leaf.data.len() as u64;
                let leaf_end = leaf.offset + leaf.data.len() as u64;
                let from = leaf.offset.max(request.start);
                let to = leaf_end.min(request.end);
                if from < to {
                    out[(from - request.start) as usize..(to - request.start) as usize]
                        .copy_from_slice(
                            &leaf.data[(from - leaf.offset) as usize..(to - leaf.offset) as usize],
                        );
                    filled += to - from;
                }
            }
            Err(err @ (DecodeError::LeafHashMismatch(_) | DecodeError::ParentHashMismatch(_))) => {
                return Err(FetchError::Corrupt(format!(
                    "blob {} range {}..{}: {err}",
                    request.hash, request.start, request.end
                )));
            }
            Err(err) => return Err(transport(&err)),
        }
    }
    if filled != request.end - request.start {
        return Err(FetchError::Transport(format!(
            "answer covered {filled} of {} bytes",
            request.end - request.start
        )));
    }
    Ok(FetchedRange {
        bytes: out,
        wire_bytes,
        parents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded_answer(data: &[u8], request: &RangeRequest) -> Vec<u8> {
        let tree = BaoTree::new(data.len() as u64, BAO_BLOCK_SIZE);
        let mut outboard = Vec::new();
        bao_tree::io::sync::outboard_post_order(data, tree, &mut outboard).unwrap();
        let outboard = PostOrderMemOutboard {
            root: blake3::hash(data),
            tree,
            data: outboard,
        };
        let (start, end) = request.group_range();
        let window = Window {
            start,
            data: Bytes::copy_from_slice(&data[start as usize..end as usize]),
            size: data.len() as u64,
        };
        let mut encoded = Vec::new();
        bao_tree::io::sync::encode_ranges(window, outboard, &request.chunks(), &mut encoded)
            .unwrap();
        encoded
    }

    async fn decode(encoded: Vec<u8>, request: &RangeRequest) -> Result<Vec<u8>, DecodeError> {
        let tree = BaoTree::new(request.size, BAO_BLOCK_SIZE);
        let mut decoder =
            ResponseDecoder::new(request.hash, request.chunks(), tree, Bytes::from(encoded));
        let mut out = Vec::new();
        while let ResponseDecoderNext::More((next, item)) = decoder.next().await {
            decoder = next;
            if let BaoContentItem::Leaf(leaf) = item? {
                out.push((leaf.offset, leaf.data));
            }
        }
        let mut bytes = Vec::new();
        for (offset, data) in out {
            let end = offset + data.len() as u64;
            let from = offset.max(request.start);
            let to = end.min(request.end);
            if from < to {
                bytes.extend_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            }
        }
        Ok(bytes)
    }

    #[tokio::test]
    async fn a_range_read_from_a_window_verifies_and_a_flipped_byte_does_not() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let hash = blake3::hash(&data);
        for (start, end) in [
            (0, 10),
            (5000, 300_000),
            (999_000, 1_000_000),
            (0, 1_000_000),
        ] {
            let request = RangeRequest {
                hash,
                size: data.len() as u64,
                start,
                end,
            };
            let bytes = RangeRequest::decode(&request.encode()).unwrap();
            assert_eq!(bytes, request);
            let encoded = encoded_answer(&data, &request);
            assert_eq!(
                decode(encoded.clone(), &request).await.unwrap(),
                &data[start as usize..end as usize]
            );
            let mut corrupt = encoded;
            let at = corrupt.len() - 100;
            corrupt[at] ^= 1;
            assert!(matches!(
                decode(corrupt, &request).await,
                Err(DecodeError::LeafHashMismatch(_) | DecodeError::ParentHashMismatch(_))
            ));
        }
    }

    #[test]
    fn requests_outside_the_blob_are_refused() {
        let hash = blake3::hash(b"x");
        let bad = |start, end, size| {
            RangeRequest::decode(
                &RangeRequest {
                    hash,
                    size,
                    start,
                    end,
                }
                .encode(),
            )
            .is_err()
        };
        assert!(bad(5, 5, 10));
        assert!(bad(0, 11, 10));
        assert!(bad(0, MAX_RANGE + 1, u64::MAX));
        assert!(!bad(0, 10, 10));
    }
}
