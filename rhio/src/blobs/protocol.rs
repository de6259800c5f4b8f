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

use std::collections::{HashMap, VecDeque};
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

use super::{BAO_BLOCK_SIZE, BlobIndex};
use crate::metrics::{Metrics, ReasonLabels};
use crate::policy::Members;
use crate::s3::{ObjectError, S3Store};

/// Protocol id (bound to the network id by p2panda-net).
pub const BLOBS_ALPN: &[u8] = b"rhio/blobs/1";

pub use rhio_core::blobs::{REQUEST_LEN, RangeRequest};
/// Requests served at once for one peer, and for all peers together. A replicating peer sends
/// up to 8 at once with the default settings (4 parts in flight, 2 pieces each); an answer
/// holds at most ~4 MiB of data (see [`S3_PIECES_AHEAD`]).
const PER_PEER_REQUESTS: usize = 8;
const TOTAL_REQUESTS: usize = 16;
/// A range is read from S3 in GETs of this size, ahead of the encoder ...
const S3_READ_PIECE: u64 = 1 << 20;
/// ... with this many GETs in flight (besides one piece waiting and the one being encoded), so
/// an answer holds at most ~4 MiB of data whatever the range's size, and the ~40 ms before a
/// ranged GET's first byte (s3s-fs, multipart objects) overlaps with encoding.
const S3_PIECES_AHEAD: usize = 2;
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

/// Whole chunk groups covering the byte range: leaves are then whole groups for the encoder
/// and the decoder alike (a partial group would make the decoder expect chunk-level parents the
/// encoder does not send).
fn chunk_ranges(request: &RangeRequest) -> ChunkRanges {
    let chunks =
        ChunkRanges::from(ChunkNum::full_chunks(request.start)..ChunkNum::chunks(request.end));
    let groups = bao_tree::io::round_up_to_chunks_groups(chunks, BAO_BLOCK_SIZE);
    let canonical = bao_tree::io::sync::truncate_ranges(&groups, request.size);
    ChunkRanges::new(canonical.boundaries().iter().copied().collect())
        .expect("boundaries of a range set are sorted")
}

/// Byte range of the chunk groups that cover the request: what the server reads.
fn group_range(request: &RangeRequest) -> (u64, u64) {
    request.covering(BAO_BLOCK_SIZE.bytes() as u64)
}

// ------------------------------------------------------------------------------- server side

/// Serves blob ranges to members.
#[derive(Clone)]
pub struct BlobServer {
    s3: S3Store,
    index: BlobIndex,
    members: Members,
    metrics: Arc<Metrics>,
    outboards: Arc<Mutex<OutboardCache>>,
    per_peer: Arc<Mutex<HashMap<PublicKey, Arc<Semaphore>>>>,
    total: Arc<Semaphore>,
    /// Where serving runs (S3 reads, encoding): the node's transfer runtime. p2panda-net runs
    /// protocol handlers inside single-threaded actor runtimes, which must not carry bulk work.
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
        members: Members,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            s3,
            index,
            members,
            metrics,
            outboards: Default::default(),
            per_peer: Default::default(),
            total: Arc::new(Semaphore::new(TOTAL_REQUESTS)),
            runtime,
        }
    }

    async fn outboard(&self, hash: &blake3::Hash) -> Result<Arc<Vec<u8>>, ObjectError> {
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
            .get_range(&crate::s3::keys::outboard(hash), None)
            .await?;
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

    /// Checks a request and reads what answering it needs: the blob's outboard and the bytes
    /// of the chunk groups that cover the range. Refusals are the status to answer.
    async fn prepare(&self, peer: &PublicKey, request: &RangeRequest) -> Result<Prepared, Status> {
        let location = self.index.get(&request.hash).ok_or(Status::NotFound)?;
        if location.length != request.size {
            return Err(Status::BadRequest);
        }
        let peer_limit = self
            .per_peer
            .lock()
            .expect("per-peer limits lock")
            .entry(*peer)
            .or_insert_with(|| Arc::new(Semaphore::new(PER_PEER_REQUESTS)))
            .clone();
        let (Ok(peer_permit), Ok(permit)) = (
            peer_limit.try_acquire_owned(),
            self.total.clone().try_acquire_owned(),
        ) else {
            return Err(Status::Busy);
        };
        let read = async {
            let outboard = self.outboard(&request.hash).await?;
            let (start, end) = group_range(request);
            let mut window = Window::read(
                self.s3.clone(),
                location.key.clone(),
                location.offset,
                (start, end),
                request.size,
                &self.runtime,
            );
            // The first piece before answering `Ok`: an object that is gone or an S3 that is
            // down is refused as before; a failure later ends the answer early (the client
            // sees a transport error and asks another peer).
            window.first().await?;
            Ok::<_, WindowError>((outboard, window))
        };
        match read.await {
            Ok((outboard, window)) => Ok(Prepared {
                request: *request,
                outboard,
                window,
                _permits: (peer_permit, permit),
            }),
            // The object or its outboard is gone (deleted, or never fully written): this node
            // does not have the blob, and the peer asks the next one at once.
            Err(WindowError::S3(err)) if err.kind == crate::s3::S3ErrorKind::NotFound => {
                tracing::warn!(%peer, hash = %request.hash, %err, "a blob in the index is missing from S3");
                Err(Status::NotFound)
            }
            Err(err) => {
                tracing::warn!(%peer, hash = %request.hash, %err, "cannot serve a blob range");
                Err(Status::Unavailable)
            }
        }
    }
}

/// Why the bytes of an answer could not be read.
#[derive(Debug, Error)]
enum WindowError {
    #[error(transparent)]
    S3(#[from] ObjectError),
    #[error("the S3 reads stopped")]
    Stopped,
}

/// A request ready to be answered: holds its concurrency permits until the answer is sent.
struct Prepared {
    request: RangeRequest,
    outboard: Arc<Vec<u8>>,
    window: Window,
    _permits: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    ),
}

/// Encoded bytes are handed from the encoder thread to the stream in chunks of this size.
const ENCODE_CHUNK: usize = 256 * 1024;

impl Prepared {
    /// Encodes the range on a blocking thread and streams it to `send` as it is produced:
    /// memory per answer is the data read plus a few chunks, whatever the range size.
    async fn send(
        self,
        send: &mut iroh::endpoint::SendStream,
        metrics: &Metrics,
    ) -> Result<(), String> {
        let (chunks, mut receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let encoder = tokio::task::spawn_blocking(move || {
            let outboard = PostOrderMemOutboard {
                root: self.request.hash,
                tree: BaoTree::new(self.request.size, BAO_BLOCK_SIZE),
                data: self.outboard.as_slice(),
            };
            let mut writer = ChunkWriter {
                chunks,
                buffer: Vec::with_capacity(ENCODE_CHUNK),
            };
            bao_tree::io::sync::encode_ranges(
                &self.window,
                outboard,
                &chunk_ranges(&self.request),
                &mut writer,
            )
            .map_err(|err| format!("encode: {err}"))?;
            std::io::Write::flush(&mut writer).map_err(|err| err.to_string())
        });
        while let Some(chunk) = receiver.recv().await {
            // Counted before sending: what a peer that dies mid-answer cost us counts too.
            metrics.blob_bytes_served.inc_by(chunk.len() as u64);
            send.write_all(&chunk)
                .await
                .map_err(|err| format!("write: {err}"))?;
        }
        encoder.await.map_err(|err| err.to_string())?
    }
}

/// `Write` that hands full chunks to the async side.
struct ChunkWriter {
    chunks: tokio::sync::mpsc::Sender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= ENCODE_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(ENCODE_CHUNK));
        self.chunks
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("the stream was closed"))
    }
}

/// The bytes of a blob range as the encoder reads them: pieces arrive from S3 in order, at most
/// [`S3_PIECES_AHEAD`] in flight and one waiting, and a piece is dropped once the encoder is past
/// it (bao encodes a range front to back).
struct Window {
    /// Blob offsets of the bytes the window covers (whole chunk groups).
    start: u64,
    end: u64,
    /// The blob's size.
    size: u64,
    state: Mutex<WindowState>,
}

struct WindowState {
    /// The piece the encoder reads now, with the blob offset of its first byte.
    current: Option<(u64, Bytes)>,
    /// Blob offset of the next piece to arrive.
    next: u64,
    pieces: tokio::sync::mpsc::Receiver<Result<Bytes, ObjectError>>,
}

impl Window {
    /// Starts reading `range` (blob offsets) of the blob stored at `offset` in object `key`.
    fn read(
        s3: S3Store,
        key: String,
        offset: u64,
        range: (u64, u64),
        size: u64,
        runtime: &tokio::runtime::Handle,
    ) -> Self {
        use futures::StreamExt;
        let (start, end) = range;
        let (sender, pieces) = tokio::sync::mpsc::channel(1);
        let reads = crate::s3::piece_ranges(offset + start, end - start, S3_READ_PIECE);
        runtime.spawn(async move {
            let mut gets = futures::stream::iter(reads)
                .map(|(at, len)| s3.get_exact(&key, at, len))
                .buffered(S3_PIECES_AHEAD);
            while let Some(piece) = gets.next().await {
                let failed = piece.is_err();
                // A closed channel: the answer was abandoned; stop reading.
                if sender.send(piece).await.is_err() || failed {
                    break;
                }
            }
        });
        Self::from_receiver(start, end, size, pieces)
    }

    fn from_receiver(
        start: u64,
        end: u64,
        size: u64,
        pieces: tokio::sync::mpsc::Receiver<Result<Bytes, ObjectError>>,
    ) -> Self {
        Self {
            start,
            end,
            size,
            state: Mutex::new(WindowState {
                current: None,
                next: start,
                pieces,
            }),
        }
    }

    /// Waits for the first piece (async: before the answer starts).
    async fn first(&mut self) -> Result<(), WindowError> {
        if self.start == self.end {
            return Ok(());
        }
        let state = self.state.get_mut().expect("window lock");
        let piece = state.pieces.recv().await;
        state.accept(piece)
    }
}

impl WindowState {
    fn accept(&mut self, piece: Option<Result<Bytes, ObjectError>>) -> Result<(), WindowError> {
        let piece = piece.ok_or(WindowError::Stopped)??;
        let at = self.next;
        self.next += piece.len() as u64;
        self.current = Some((at, piece));
        Ok(())
    }
}

impl bao_tree::io::sync::ReadAt for &Window {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if pos < self.start {
            return Err(std::io::Error::other("read before the fetched range"));
        }
        if pos >= self.end || buf.is_empty() {
            return Ok(0);
        }
        let mut state = self.state.lock().expect("window lock");
        loop {
            if let Some((at, piece)) = &state.current {
                if pos < *at {
                    return Err(std::io::Error::other(
                        "read behind the window (bao reads a range front to back)",
                    ));
                }
                let offset = (pos - at) as usize;
                if offset < piece.len() {
                    let n = buf.len().min(piece.len() - offset);
                    buf[..n].copy_from_slice(&piece[offset..offset + n]);
                    return Ok(n);
                }
            }
            // Past the current piece: the next one (on the encoder's blocking thread).
            let piece = state.pieces.blocking_recv();
            state.accept(piece).map_err(std::io::Error::other)?;
        }
    }
}

impl bao_tree::io::sync::Size for &Window {
    fn size(&self) -> std::io::Result<Option<u64>> {
        Ok(Some(self.size))
    }
}

impl ProtocolHandler for BlobServer {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let peer = PublicKey::from(to_verifying_key(connection.remote_id()));
        if !self.admits(&peer, &connection) {
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
    /// True when `peer` is a member; otherwise counts the refusal and closes the connection.
    fn admits(&self, peer: &PublicKey, connection: &Connection) -> bool {
        if self.members.contains(peer) {
            return true;
        }
        self.metrics
            .blob_requests_refused
            .get_or_create(&ReasonLabels {
                reason: "not_a_member",
            })
            .inc();
        tracing::warn!(%peer, "blob request from a node that is not a member; refused");
        connection.close(1u32.into(), b"not a member");
        false
    }

    /// Answers the range requests of one connection, each stream in its own task.
    async fn serve_connection(&self, peer: PublicKey, connection: Connection) {
        let mut streams = tokio::task::JoinSet::new();
        loop {
            let (mut send, mut recv) = match connection.accept_bi().await {
                Ok(pair) => pair,
                Err(_) => break,
            };
            // A member removed while connected loses access with its next request.
            if !self.admits(&peer, &connection) {
                break;
            }
            while streams.try_join_next().is_some() {}
            let server = self.clone();
            streams.spawn(async move {
                let mut bytes = [0u8; REQUEST_LEN];
                if recv.read_exact(&mut bytes).await.is_err() {
                    return;
                }
                let prepared = match RangeRequest::decode(&bytes) {
                    Ok(request) => server.prepare(&peer, &request).await,
                    Err(err) => {
                        tracing::warn!(%peer, %err, "malformed blob request");
                        Err(Status::BadRequest)
                    }
                };
                let result = match prepared {
                    Ok(prepared) => match send.write_all(&[Status::Ok as u8]).await {
                        Ok(()) => prepared.send(&mut send, &server.metrics).await,
                        Err(err) => Err(err.to_string()),
                    },
                    Err(status) => {
                        server
                            .metrics
                            .blob_requests_refused
                            .get_or_create(&ReasonLabels {
                                reason: status.as_str(),
                            })
                            .inc();
                        send.write_all(&[status as u8])
                            .await
                            .map_err(|err| err.to_string())
                    }
                };
                let finished = async {
                    result?;
                    send.finish().map_err(|err| err.to_string())?;
                    send.stopped().await.map_err(|err| err.to_string())?;
                    Ok::<_, String>(())
                }
                .await;
                if let Err(err) = finished {
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

/// What fetching a verified range took.
#[derive(Debug)]
pub struct FetchedRange {
    /// Bytes that came over the wire (status, parents and chunk groups).
    pub wire_bytes: u64,
    /// The verified parent hash pairs that came with the range (part of the blob's outboard).
    pub parents: Vec<(TreeNode, (blake3::Hash, blake3::Hash))>,
}

/// Fetches `request` over `connection` into `out` (exactly the range's length), verifying every
/// chunk group before copying a byte of it. On error `out` may hold some verified bytes.
pub async fn fetch_range(
    connection: &Connection,
    request: RangeRequest,
    timeout: Duration,
    out: &mut [u8],
) -> Result<FetchedRange, FetchError> {
    assert_eq!(out.len() as u64, request.end - request.start);
    tokio::time::timeout(timeout, fetch_range_inner(connection, request, out))
        .await
        .map_err(|_| FetchError::Transport(format!("no complete answer within {timeout:?}")))?
}

async fn fetch_range_inner(
    connection: &Connection,
    request: RangeRequest,
    out: &mut [u8],
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
    let mut filled = 0u64;
    let mut wire_bytes = 1u64;
    let mut parents = Vec::new();
    let tree = BaoTree::new(request.size, BAO_BLOCK_SIZE);
    let reader = iroh_io::TokioStreamReader::new(recv);
    let mut decoder = ResponseDecoder::new(request.hash, chunk_ranges(&request), tree, reader);
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
        let (start, end) = group_range(request);
        // The window arrives in pieces that do not line up with chunk groups.
        let pieces: Vec<Bytes> = data[start as usize..end as usize]
            .chunks(100_003)
            .map(Bytes::copy_from_slice)
            .collect();
        let (sender, receiver) = tokio::sync::mpsc::channel(pieces.len().max(1));
        for piece in pieces {
            sender.try_send(Ok(piece)).unwrap();
        }
        drop(sender);
        let window = Window::from_receiver(start, end, data.len() as u64, receiver);
        // Off the test's runtime, like the server's encoder (the window blocks for pieces).
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut encoded = Vec::new();
                    bao_tree::io::sync::encode_ranges(
                        &window,
                        outboard,
                        &chunk_ranges(request),
                        &mut encoded,
                    )
                    .unwrap();
                    encoded
                })
                .join()
                .unwrap()
        })
    }

    async fn decode(encoded: Vec<u8>, request: &RangeRequest) -> Result<Vec<u8>, DecodeError> {
        let tree = BaoTree::new(request.size, BAO_BLOCK_SIZE);
        let mut decoder = ResponseDecoder::new(
            request.hash,
            chunk_ranges(request),
            tree,
            Bytes::from(encoded),
        );
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
}
