//! `rhio/sync/1`: catch-up and live push of operations between nodes (frames and reordering are
//! in [`rhio_core::sync`]).
//!
//! Every node keeps one session open to each known node (the client side) asking for the authors
//! and subjects it subscribes to, and answers such sessions from known nodes (the server side).
//! Because a server sends everything it has stored, whoever authored it, a node forwards the
//! operations of third authors: in a line A-B-C, C receives A's messages through B.
//!
//! The client verifies every operation (signature, hash, log chain) and checks that its author
//! and subject are allowed before storing it; anything else is rejected with a reason in the log
//! and in `rhio_operations_rejected_total{reason}`, and the session goes on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::{Connection, ReadExactError, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use p2panda_net::Endpoint;
use p2panda_net::utils::to_verifying_key;
use rhio_core::identity::PublicKey;
use rhio_core::message::RoutedMessage;
use rhio_core::operation::{LogId, SignedOperation};
use rhio_core::sync::{Frame, LogHeight, SyncRequest};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, ReasonLabels, RejectReason};
use crate::routing::Routes;
use crate::store::{InsertOutcome, Store};

/// Protocol id of the sync protocol (bound to the network id by p2panda-net).
pub const SYNC_ALPN: &[u8] = b"rhio/sync/1";

/// Operations read from the store per query while catching a peer up.
const CATCH_UP_CHUNK: u64 = 512;
/// Frames buffered between the stream reader and the verifier.
const FRAME_QUEUE: usize = 1024;
/// Operations verified and stored together.
const VERIFY_BATCH: usize = 512;
const MIN_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type LogKey = (PublicKey, LogId);

/// Reads one frame; `None` when the peer finished the stream cleanly.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Option<Frame>, String> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(err) => return Err(format!("read: {err}")),
    }
    let length = Frame::decode_length(prefix).map_err(|err| err.to_string())?;
    let mut frame = vec![0u8; length];
    recv.read_exact(&mut frame)
        .await
        .map_err(|err| format!("read: {err}"))?;
    Frame::decode(&frame)
        .map(Some)
        .map_err(|err| err.to_string())
}

pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), String> {
    send.write_all(&frame.encode())
        .await
        .map_err(|err| format!("write: {err}"))
}

// ------------------------------------------------------------------------------- server side

/// Answers sync sessions of known nodes.
#[derive(Clone)]
pub struct SyncServer {
    store: Store,
    known: Arc<HashSet<PublicKey>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncServer").finish_non_exhaustive()
    }
}

impl SyncServer {
    pub fn new(store: Store, known: HashSet<PublicKey>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            known: Arc::new(known),
            metrics,
        }
    }
}

impl ProtocolHandler for SyncServer {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let remote = PublicKey::from(to_verifying_key(connection.remote_id()));
        if !self.known.contains(&remote) {
            tracing::warn!(peer = %remote, "sync session from a node that is not a known node; refused");
            connection.close(1u32.into(), b"not a known node");
            return Ok(());
        }
        let (mut send, mut recv) = connection.accept_bi().await?;
        let request = match read_frame(&mut recv).await {
            Ok(Some(Frame::Request(request))) => request,
            other => {
                tracing::warn!(peer = %remote, ?other, "sync session did not start with a request");
                connection.close(2u32.into(), b"expected a request");
                return Ok(());
            }
        };
        self.metrics
            .sync_sessions
            .get_or_create(&ReasonLabels { reason: "serving" })
            .inc();
        let result = tokio::select! {
            result = serve(&self.store, &request, &mut send) => result,
            _ = connection.closed() => Ok(()),
        };
        self.metrics
            .sync_sessions
            .get_or_create(&ReasonLabels { reason: "serving" })
            .dec();
        if let Err(err) = result {
            tracing::debug!(peer = %remote, %err, "sync session ended");
        }
        Ok(())
    }
}

/// Sends everything `request` lacks, then every new matching operation, until an error.
async fn serve(store: &Store, request: &SyncRequest, send: &mut SendStream) -> Result<(), String> {
    // Subscribe first: what is committed while catching up arrives as an event too.
    let mut events = store.subscribe();
    let mut sent: HashMap<LogKey, u64> = HashMap::new();
    catch_up(store, request, &mut sent, send).await?;
    write_frame(send, &Frame::CaughtUp).await?;
    loop {
        let op = match events.recv().await {
            Ok(op) => op,
            Err(RecvError::Lagged(_)) => {
                catch_up(store, request, &mut sent, send).await?;
                continue;
            }
            Err(RecvError::Closed) => return Err("store closed".into()),
        };
        let author = op.author();
        if !request.wants(&author, op.log()) {
            continue;
        }
        let key = (author, op.log().clone());
        let next = *sent
            .entry(key.clone())
            .or_insert_with(|| request.start_of(&author, op.log()));
        if op.seq() == next {
            write_frame(send, &Frame::operation(&op)).await?;
            sent.insert(key, next + 1);
        } else if op.seq() > next {
            let next = send_log(store, &key, next, op.seq() + 1, send).await?;
            sent.insert(key, next);
        }
    }
}

/// Sends every stored operation of the logs `request` wants, from where the peer stands.
async fn catch_up(
    store: &Store,
    request: &SyncRequest,
    sent: &mut HashMap<LogKey, u64>,
    send: &mut SendStream,
) -> Result<(), String> {
    let logs = store.logs().await.map_err(|err| err.to_string())?;
    for log in logs {
        if !request.wants(&log.author, &log.log) {
            continue;
        }
        let key = (log.author, log.log.clone());
        let from = sent
            .get(&key)
            .copied()
            .unwrap_or_else(|| request.start_of(&log.author, &log.log));
        let next = send_log(store, &key, from, log.next_seq, send).await?;
        sent.insert(key, next);
    }
    Ok(())
}

/// Sends the stored operations of one log from `from` up to (excluding) `until`; returns the
/// next sequence number to send.
async fn send_log(
    store: &Store,
    key: &LogKey,
    mut from: u64,
    until: u64,
    send: &mut SendStream,
) -> Result<u64, String> {
    while from < until {
        let ops = store
            .operations(&key.0, &key.1, from, CATCH_UP_CHUNK.min(until - from))
            .await
            .map_err(|err| err.to_string())?;
        let Some(last) = ops.last() else { break };
        from = last.seq() + 1;
        for op in &ops {
            write_frame(send, &Frame::operation(op)).await?;
        }
    }
    Ok(from)
}

// ------------------------------------------------------------------------------- client side

/// Keeps a sync session open to one known node, reconnecting with backoff.
pub struct SyncClient {
    pub endpoint: Endpoint,
    pub peer: PublicKey,
    pub store: Store,
    pub routes: Routes,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

impl SyncClient {
    pub async fn run(self) {
        let mut retry = MIN_RETRY;
        loop {
            let started = std::time::Instant::now();
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = self.session() => result,
            };
            if let Err(err) = result {
                tracing::debug!(peer = %self.peer, %err, "sync session ended");
            }
            // A session that lasted a while was healthy: start the backoff over.
            if started.elapsed() > MAX_RETRY {
                retry = MIN_RETRY;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(MAX_RETRY);
        }
    }

    async fn session(&self) -> Result<(), String> {
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.endpoint.connect(self.peer.verifying_key(), SYNC_ALPN),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|err| format!("connect: {err}"))?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|err| format!("open stream: {err}"))?;
        let have = self
            .store
            .logs()
            .await
            .map_err(|err| err.to_string())?
            .into_iter()
            .filter(|log| self.routes.accepts(&log.author, &log.log))
            .map(|log| LogHeight {
                author: log.author,
                log: log.log,
                next_seq: log.next_seq,
            })
            .collect();
        let request = SyncRequest {
            interests: self.routes.interests(),
            have,
            datasets_prefix: self.routes.datasets_prefix.clone(),
        };
        write_frame(&mut send, &Frame::Request(request)).await?;
        self.metrics
            .sync_sessions
            .get_or_create(&ReasonLabels {
                reason: "subscribed",
            })
            .inc();
        let result = self.receive(&mut recv).await;
        self.metrics
            .sync_sessions
            .get_or_create(&ReasonLabels {
                reason: "subscribed",
            })
            .dec();
        connection.close(0u32.into(), b"bye");
        result
    }

    async fn receive(&self, recv: &mut RecvStream) -> Result<(), String> {
        let (frames_tx, mut frames) = mpsc::channel(FRAME_QUEUE);
        // Reading and verifying overlap: the reader fills the queue while a batch is verified.
        let reader = async {
            loop {
                match read_frame(recv).await {
                    Ok(Some(frame)) => {
                        if frames_tx.send(frame).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => return Err("peer ended the session".to_string()),
                    Err(err) => return Err(err),
                }
            }
        };
        let processor = async {
            let mut batch = Vec::with_capacity(VERIFY_BATCH);
            while frames.recv_many(&mut batch, VERIFY_BATCH).await > 0 {
                self.process(std::mem::take(&mut batch)).await?;
            }
            Ok::<(), String>(())
        };
        tokio::select! {
            result = reader => result,
            result = processor => result,
        }
    }

    /// Verifies a batch of frames, rejects what is not allowed and stores the rest.
    async fn process(&self, frames: Vec<Frame>) -> Result<(), String> {
        let mut raw = Vec::with_capacity(frames.len());
        for frame in frames {
            match frame {
                Frame::Operation { header, body } => raw.push((header, body)),
                Frame::CaughtUp => tracing::debug!(peer = %self.peer, "caught up"),
                Frame::Request(_) => return Err("peer sent a request on our session".into()),
            }
        }
        if raw.is_empty() {
            return Ok(());
        }
        // Signature checks cost ~70 us each: keep them off the async workers, and spread a large
        // batch over the cores.
        let parts = if raw.len() >= 64 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            1
        };
        let chunk = raw.len().div_ceil(parts);
        let mut verifiers = Vec::with_capacity(parts);
        let mut raw = raw.into_iter();
        for _ in 0..parts {
            let part: Vec<_> = raw.by_ref().take(chunk).collect();
            let routes = self.routes.clone();
            verifiers.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|(header, body)| check(&routes, &header, body))
                    .collect::<Vec<_>>()
            }));
        }
        let mut checked = Vec::with_capacity(chunk * parts);
        for verifier in verifiers {
            checked.extend(
                verifier
                    .await
                    .map_err(|err| format!("verifier failed: {err}"))?,
            );
        }
        let mut accepted = Vec::with_capacity(checked.len());
        for result in checked {
            match result {
                Ok(op) => accepted.push(op),
                Err((reason, detail)) => self.reject(reason, &detail),
            }
        }
        if accepted.is_empty() {
            return Ok(());
        }
        let outcomes = self
            .store
            .insert_remote(accepted)
            .await
            .map_err(|err| err.to_string())?;
        let mut stored = 0;
        for outcome in outcomes {
            match outcome {
                InsertOutcome::Stored => stored += 1,
                InsertOutcome::Duplicate | InsertOutcome::Held => {}
                InsertOutcome::Dropped => {
                    self.reject(RejectReason::ReorderBufferFull, "held back too many")
                }
                InsertOutcome::Conflict => self.reject(
                    RejectReason::Conflict,
                    "a different operation at the same position",
                ),
                InsertOutcome::BrokenChain => self.reject(
                    RejectReason::BrokenChain,
                    "backlink does not match the stored log",
                ),
            }
        }
        // Held operations are counted when their predecessor arrives and stores them.
        self.metrics.operations_received.inc_by(stored);
        Ok(())
    }

    fn reject(&self, reason: RejectReason, detail: &str) {
        self.metrics.reject(reason);
        tracing::warn!(peer = %self.peer, reason = reason.as_str(), detail, "rejected operation");
    }
}

/// Verifies one received operation and checks that it is allowed here.
fn check(
    routes: &Routes,
    header: &[u8],
    body: Vec<u8>,
) -> Result<SignedOperation, (RejectReason, String)> {
    let op = SignedOperation::decode(header, body)
        .map_err(|err| (RejectReason::Invalid, err.to_string()))?;
    let author = op.author();
    if !routes.accepts_author(&author) {
        return Err((RejectReason::AuthorNotAllowed, format!("author {author}")));
    }
    if !routes.accepts(&author, op.log()) {
        return Err((
            RejectReason::SubjectNotAllowed,
            format!("author {author} log {:?}", op.log()),
        ));
    }
    if let LogId::Dataset(name) = op.log() {
        let manifest = rhio_core::manifest::DatasetManifest::decode(&op.body)
            .map_err(|err| (RejectReason::MalformedBody, err.to_string()))?;
        if &manifest.dataset != name || manifest.author != author || manifest.version != op.seq() {
            return Err((
                RejectReason::MalformedBody,
                format!(
                    "manifest of {}/v{} by {} in log {name:?} at {}",
                    manifest.dataset,
                    manifest.version,
                    manifest.author,
                    op.seq()
                ),
            ));
        }
    }
    if let LogId::Message(subject) = op.log() {
        match RoutedMessage::decode(&op.body) {
            Ok(message) if &message.subject == subject => {}
            Ok(message) => {
                return Err((
                    RejectReason::MalformedBody,
                    format!(
                        "body subject {:?} is not the log's {subject:?}",
                        message.subject
                    ),
                ));
            }
            Err(err) => return Err((RejectReason::MalformedBody, err.to_string())),
        }
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhio_core::identity::PrivateKey;
    use rhio_core::manifest::{BlobEntry, BlobKind, DatasetManifest};

    fn routes_accepting(author: PublicKey) -> Routes {
        let mut config = crate::config::Config::default();
        config.subscribe.push(crate::config::SubscribeConfig {
            public_key: author,
            subjects: vec!["datasets.>".into()],
            stream: "DATASETS".into(),
        });
        Routes::from_config(&config)
    }

    fn manifest(author: PublicKey, dataset: &str, version: u64) -> Vec<u8> {
        DatasetManifest {
            dataset: dataset.into(),
            version,
            author,
            created_at_micros: 1,
            file_size: 12,
            file_hash: blake3::hash(b"x").to_hex().to_string(),
            schema: String::new(),
            rows: 0,
            blobs: vec![BlobEntry {
                kind: BlobKind::Footer,
                offset: 0,
                length: 12,
                rows: 0,
                hash: blake3::hash(b"y").to_hex().to_string(),
            }],
        }
        .encode()
    }

    #[test]
    fn dataset_operations_must_carry_a_manifest_of_their_own_log() {
        let key = PrivateKey::generate();
        let author = key.public_key();
        let routes = routes_accepting(author);
        let op = |name: &str, body: Vec<u8>| {
            SignedOperation::sign(&key, LogId::Dataset(name.into()), 0, None, 1, body)
        };
        let verdict = |op: SignedOperation| check(&routes, &op.header_bytes, op.body.clone());

        assert!(verdict(op("weather", manifest(author, "weather", 0))).is_ok());
        for (what, op) in [
            ("not a manifest", op("weather", b"not cbor".to_vec())),
            (
                "another dataset",
                op("weather", manifest(author, "climate", 0)),
            ),
            (
                "another version",
                op("weather", manifest(author, "weather", 3)),
            ),
            (
                "another author",
                op(
                    "weather",
                    manifest(PrivateKey::generate().public_key(), "weather", 0),
                ),
            ),
        ] {
            match verdict(op) {
                Err((RejectReason::MalformedBody, _)) => {}
                other => panic!("{what}: {other:?}"),
            }
        }
        // A dataset the subscription does not cover is refused before its body is read.
        let other_routes = Routes::default();
        let weather = op("weather", manifest(author, "weather", 0));
        assert!(matches!(
            check(&other_routes, &weather.header_bytes, weather.body.clone()),
            Err((RejectReason::AuthorNotAllowed, _))
        ));
    }
}
