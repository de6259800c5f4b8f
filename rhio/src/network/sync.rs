//! `rhio/sync/1`: catch-up and live push of operations between nodes (frames and reordering are
//! in [`rhio_core::sync`]).
//!
//! Every node keeps one session open to each of its sync peers (its known nodes and its overlay
//! neighbours that are members; the client side) and answers such sessions from members (the
//! server side). Every node relays: it asks for every log of every member author, stores what it
//! receives and serves it on, whether or not it delivers it into its own JetStream (that is what
//! `[[subscribe]]` decides). So in a line A-B-C, C receives A's messages through B even when B
//! subscribes to nothing.
//!
//! Bodies follow a tree (PlumTree over sessions): a subscriber that receives a copy of an
//! operation it stored already sends [`Frame::Prune`] on its session's return stream, and that
//! server then sends [`Frame::Announce`] (log heights) for new operations instead of their
//! bodies. An announced operation that has not arrived from another session within
//! [`GRAFT_TIMEOUT`] is asked for with [`Frame::Graft`] (the missing range, once across the
//! node's sessions), which makes the session send bodies again. A node keeps at least one
//! session that sends bodies. Catch-up at session start always sends bodies, so a lost
//! announcement costs latency, never an operation.
//!
//! The client verifies every operation (signature, hash, log chain) and checks that its author
//! is a member (or, for an author that is no member, that it subscribes to that subject) before
//! storing it; anything else is rejected with a reason in the log and in
//! `rhio_operations_rejected_total{reason}`, and the session goes on.

use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::{Connection, ReadExactError, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use p2panda_net::Endpoint;
use p2panda_net::utils::to_verifying_key;
use rhio_core::identity::PublicKey;
use rhio_core::message::RoutedMessage;
use rhio_core::operation::{LogId, SignedOperation};
use rhio_core::sync::{
    Frame, Heights, LogHeight, Push, Pusher, RecentGrafts, RequestReader, Subscriber, SyncRequest,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::PeerTable;
use crate::metrics::{Metrics, ReasonLabels, RejectReason};
use crate::policy::Members;
use crate::policy::Routes;
use crate::store::{InsertOutcome, Store};

/// Protocol id of the sync protocol (bound to the network id by p2panda-net).
pub const SYNC_ALPN: &[u8] = b"rhio/sync/1";

/// Operations read from the store per query while catching a peer up.
const CATCH_UP_CHUNK: u64 = 512;
/// Frames buffered between the stream reader and the verifier.
const FRAME_QUEUE: usize = 1024;
/// Operations verified and stored together.
const VERIFY_BATCH: usize = 512;
/// Reconnecting a sync session that ended.
const RETRY: crate::retry::Backoff =
    crate::retry::Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a subscriber may take to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Announcements sent together at most.
const ANNOUNCE_BATCH: usize = 512;
/// How long an announced operation may take to arrive from elsewhere before it is grafted
/// from the session that announced it.
const GRAFT_TIMEOUT: Duration = Duration::from_secs(1);

pub type LogKey = (PublicKey, LogId);

/// Why a frame could not be read or written: the stream failed, or the peer sent bytes that are
/// no frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    #[error("read: {0}")]
    Read(#[from] ReadExactError),
    #[error("write: {0}")]
    Write(#[from] iroh::endpoint::WriteError),
    #[error(transparent)]
    Malformed(#[from] rhio_core::sync::FrameError),
}

/// A session's reason to end, as the peer table and the log show it.
impl From<FrameIoError> for String {
    fn from(err: FrameIoError) -> Self {
        err.to_string()
    }
}

/// Reads one frame; `None` when the peer finished the stream cleanly.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Option<Frame>, FrameIoError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let length = Frame::decode_length(prefix)?;
    let mut frame = vec![0u8; length];
    recv.read_exact(&mut frame).await?;
    Ok(Some(Frame::decode(&frame)?))
}

pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), FrameIoError> {
    Ok(send.write_all(&frame.encode()).await?)
}

// ------------------------------------------------------------------------------- server side

/// Answers sync sessions of members.
#[derive(Clone)]
pub struct SyncServer {
    store: Store,
    members: Members,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncServer").finish_non_exhaustive()
    }
}

impl SyncServer {
    pub fn new(store: Store, members: Members, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            members,
            metrics,
        }
    }
}

/// Reads the subscriber's request and all its pages of heights.
async fn read_request(recv: &mut RecvStream) -> Result<(SyncRequest, Heights), String> {
    let mut reader = RequestReader::new();
    loop {
        let frame = read_frame(recv)
            .await?
            .ok_or_else(|| rhio_core::sync::SessionError::Incomplete.to_string())?;
        if let Some(done) = reader.push(frame).map_err(|err| err.to_string())? {
            return Ok(done);
        }
    }
}

/// Resolves when `peer` is no longer a member.
async fn until_removed(members: &Members, peer: &PublicKey) {
    let mut changes = members.changes();
    while members.contains(peer) {
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl ProtocolHandler for SyncServer {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let remote = PublicKey::from(to_verifying_key(connection.remote_id()));
        if !self.members.contains(&remote) {
            self.metrics
                .sync_sessions_refused
                .get_or_create(&ReasonLabels {
                    reason: "not_a_member",
                })
                .inc();
            tracing::warn!(peer = %remote, "sync session from a node that is not a member; refused");
            connection.close(1u32.into(), b"not a member");
            return Ok(());
        }
        let (mut send, mut recv) = connection.accept_bi().await?;
        let (request, heights) = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_request(&mut recv),
        )
        .await
        {
            Ok(Ok(request)) => request,
            Ok(Err(err)) => {
                tracing::warn!(peer = %remote, %err, "sync session did not start with a valid request");
                connection.close(2u32.into(), b"expected a request");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(peer = %remote, "sync request not complete within {REQUEST_TIMEOUT:?}");
                connection.close(2u32.into(), b"request timed out");
                return Ok(());
            }
        };
        self.metrics
            .sync_sessions
            .get_or_create(&ReasonLabels { reason: "serving" })
            .inc();
        let session = Session {
            metrics: &self.metrics,
        };
        let pusher = Pusher::new(remote, request, heights);
        let result = tokio::select! {
            result = session.serve(&self.store, pusher, &mut send, &mut recv) => result,
            _ = connection.closed() => Ok(()),
            _ = until_removed(&self.members, &remote) => {
                tracing::warn!(peer = %remote, "no longer a member; sync session closed");
                connection.close(1u32.into(), b"not a member");
                Ok(())
            }
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

/// The I/O of one served session; what to send is decided by [`Pusher`].
struct Session<'a> {
    metrics: &'a Metrics,
}

impl Session<'_> {
    /// Sends everything the subscriber lacks, then every new wanted operation (or, once the
    /// subscriber pruned this session, announcements of them), until an error.
    async fn serve(
        &self,
        store: &Store,
        mut pusher: Pusher,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Result<(), String> {
        // Subscribe first: what is committed while catching up arrives as an event too.
        let mut events = store.subscribe();
        self.catch_up(store, &mut pusher, send).await?;
        write_frame(send, &Frame::CaughtUp).await?;
        // The subscriber's prune and graft frames, read beside the pushes. A subscriber that
        // predates them never sends any.
        let (control_tx, mut control) = mpsc::channel(64);
        let reader = async move {
            loop {
                match read_frame(recv).await? {
                    Some(frame) => {
                        if control_tx.send(frame).await.is_err() {
                            return Ok(());
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let pusher_loop = async {
            loop {
                // Announcements leave as soon as no further event is queued, in batches under
                // load.
                if let Some(frame) = pusher.announcements(events.is_empty(), ANNOUNCE_BATCH) {
                    if let Frame::Announce(heights) = &frame {
                        self.metrics.announcements_sent.inc_by(heights.len() as u64);
                    }
                    write_frame(send, &frame).await?;
                }
                let push = tokio::select! {
                    biased;
                    frame = control.recv() => match frame {
                        Some(frame) => pusher.control(frame).map_err(|err| err.to_string())?,
                        None => std::future::pending().await,
                    },
                    event = events.recv() => match event {
                        Ok(op) => match pusher.stored(&op.author(), op.log(), op.seq()) {
                            Push::Send => {
                                self.send_operation(send, &op).await?;
                                continue;
                            }
                            other => other,
                        },
                        Err(RecvError::Lagged(_)) => {
                            self.catch_up(store, &mut pusher, send).await?;
                            continue;
                        }
                        Err(RecvError::Closed) => return Err("store closed".to_string()),
                    },
                };
                if let Push::Range {
                    author,
                    log,
                    from,
                    until,
                } = push
                {
                    let key = (author, log);
                    let next = self.send_log(store, &key, from, until, send).await?;
                    pusher.sent_to(&key.0, &key.1, next);
                }
            }
        };
        tokio::select! {
            result = reader => result,
            result = pusher_loop => result,
        }
    }

    /// Sends every stored operation of the wanted logs, from where the subscriber stands.
    async fn catch_up(
        &self,
        store: &Store,
        pusher: &mut Pusher,
        send: &mut SendStream,
    ) -> Result<(), String> {
        let logs = store.logs().await.map_err(|err| err.to_string())?;
        for log in logs {
            if !pusher.wants(&log.author, &log.log) {
                continue;
            }
            let from = pusher.start_of(&log.author, &log.log);
            let key = (log.author, log.log);
            let next = self.send_log(store, &key, from, log.next_seq, send).await?;
            pusher.sent_to(&key.0, &key.1, next);
        }
        Ok(())
    }

    /// Sends the stored operations of one log from `from` up to (excluding) `until`; returns
    /// the next sequence number to send.
    async fn send_log(
        &self,
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
                self.send_operation(send, op).await?;
            }
        }
        Ok(from)
    }

    async fn send_operation(
        &self,
        send: &mut SendStream,
        op: &SignedOperation,
    ) -> Result<(), String> {
        write_frame(send, &Frame::operation(op)).await?;
        self.metrics.operations_sent.inc();
        self.metrics
            .operation_bytes_sent
            .inc_by((op.header_bytes.len() + op.body.len()) as u64);
        Ok(())
    }
}

// ------------------------------------------------------------------------------- client side

/// Which received operations a node stores.
#[derive(Clone)]
pub struct Acceptance {
    pub routes: Routes,
    pub members: Members,
}

impl Acceptance {
    /// Members' operations are all relayed; an author that is no member is accepted only for
    /// what this node subscribes to.
    fn check(&self, author: &PublicKey, log: &LogId) -> Result<(), (RejectReason, String)> {
        if self.members.contains(author) {
            return Ok(());
        }
        if !self.routes.accepts_author(author) {
            return Err((RejectReason::AuthorNotAllowed, format!("author {author}")));
        }
        if !self.routes.accepts(author, log) {
            return Err((
                RejectReason::SubjectNotAllowed,
                format!("author {author} log {log:?}"),
            ));
        }
        Ok(())
    }
}

/// Keeps a sync session open to one peer, reconnecting with backoff.
pub struct SyncClient {
    pub endpoint: Endpoint,
    pub peer: PublicKey,
    pub store: Store,
    pub acceptance: Acceptance,
    pub peers: PeerTable,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// This node's sessions that get bodies (not pruned), shared by all of them: a session is
    /// pruned only while another one is eager, so the node never prunes its last source.
    pub eager_sessions: Arc<std::sync::atomic::AtomicUsize>,
    /// Ranges this node grafted recently, shared by its sessions: per log, up to where and
    /// when. An operation announced by several sessions is asked for once.
    pub grafts: Grafts,
}

/// Ranges the node's sessions grafted recently (see [`RecentGrafts`]).
pub type Grafts = Arc<std::sync::Mutex<RecentGrafts>>;

/// Counts a session as eager while it lives and is not pruned.
struct EagerGuard<'a> {
    count: &'a std::sync::atomic::AtomicUsize,
    eager: bool,
}

impl<'a> EagerGuard<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self { count, eager: true }
    }

    /// Leaves the eager count when another session stays eager; false otherwise.
    fn try_prune(&mut self) -> bool {
        use std::sync::atomic::Ordering;
        if !self.eager {
            return false;
        }
        let pruned = self
            .count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n >= 2).then(|| n - 1)
            })
            .is_ok();
        if pruned {
            self.eager = false;
        }
        pruned
    }

    fn graft(&mut self) {
        if !self.eager {
            self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.eager = true;
        }
    }
}

impl Drop for EagerGuard<'_> {
    fn drop(&mut self) {
        if self.eager {
            self.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl SyncClient {
    pub async fn run(self) {
        let mut attempts = RETRY.attempts();
        loop {
            let started = std::time::Instant::now();
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = self.session() => result,
            };
            if let Err(err) = result {
                tracing::debug!(peer = %self.peer, %err, "sync session ended");
                self.peers.failed(&self.peer, err);
            }
            // A session that lasted a while was healthy: start the backoff over.
            if started.elapsed() > RETRY.max {
                attempts.reset();
            }
            if !crate::retry::after_failure(&mut attempts, &self.shutdown).await {
                return;
            }
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
        self.peers.seen(&self.peer, None);
        // Our own logs are complete here: the server never sends them back.
        let own = self.store.public_key();
        let have = self
            .store
            .logs()
            .await
            .map_err(|err| err.to_string())?
            .into_iter()
            .filter(|log| log.author != own)
            .map(|log| LogHeight {
                author: log.author,
                log: log.log,
                next_seq: log.next_seq,
            })
            .collect();
        let routes = &self.acceptance.routes;
        for frame in SyncRequest::frames(
            routes.interests(),
            have,
            routes.datasets_prefix.clone(),
            true,
        ) {
            write_frame(&mut send, &frame).await?;
        }
        self.metrics
            .sync_sessions
            .get_or_create(&ReasonLabels {
                reason: "subscribed",
            })
            .inc();
        let result = tokio::select! {
            result = self.receive(&mut recv, &mut send) => result,
            _ = until_removed(&self.acceptance.members, &self.peer) => Err("no longer a member".into()),
        };
        self.metrics
            .sync_sessions
            .get_or_create(&ReasonLabels {
                reason: "subscribed",
            })
            .dec();
        connection.close(0u32.into(), b"bye");
        result
    }

    async fn receive(&self, recv: &mut RecvStream, send: &mut SendStream) -> Result<(), String> {
        let (frames_tx, mut frames) = mpsc::channel(FRAME_QUEUE);
        let (control_tx, mut control) = mpsc::channel::<Frame>(64);
        // Prune and graft frames go back to the server on the session's own stream.
        let writer = async {
            while let Some(frame) = control.recv().await {
                write_frame(send, &frame).await?;
            }
            std::future::pending::<Result<(), String>>().await
        };
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
                    Err(err) => return Err(err.into()),
                }
            }
        };
        let processor = async {
            let mut eager = EagerGuard::new(&self.eager_sessions);
            let mut subscriber = Subscriber::new(GRAFT_TIMEOUT);
            let mut batch = Vec::with_capacity(VERIFY_BATCH);
            loop {
                let deadline = subscriber
                    .next_deadline()
                    .map(tokio::time::Instant::from_std);
                tokio::select! {
                    received = frames.recv_many(&mut batch, VERIFY_BATCH) => {
                        if received == 0 {
                            return Ok::<(), String>(());
                        }
                        // Sync traffic is a sign of life (once per batch, not per frame).
                        self.peers.seen(&self.peer, None);
                        let (duplicates, announced) =
                            self.process(std::mem::take(&mut batch)).await?;
                        if subscriber.should_prune(duplicates) && eager.try_prune() {
                            // Another session delivers these: announcements are enough here.
                            self.metrics.sync_prunes.inc();
                            tracing::debug!(peer = %self.peer, "pruned: operations come from another session first");
                            let _ = control_tx.send(subscriber.prune()).await;
                        }
                        subscriber.announced(announced, std::time::Instant::now());
                    }
                    _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                        let grafts = {
                            let mut recent = self.grafts.lock().expect("grafts lock");
                            subscriber.due(
                                std::time::Instant::now(),
                                |author, log| self.store.next_seq(author, log),
                                &mut recent,
                            )
                        };
                        for graft in grafts {
                            // Announced, and not here from elsewhere in time: from here, eagerly.
                            self.metrics.sync_grafts.inc();
                            if let Frame::Graft { from, until } = &graft {
                                tracing::debug!(peer = %self.peer, author = %from.author, log = %from.log.name(), from = from.next_seq, until, "grafting announced operations");
                            }
                            eager.graft();
                            let _ = control_tx.send(graft).await;
                        }
                    }
                }
            }
        };
        tokio::select! {
            result = reader => result,
            result = processor => result,
            result = writer => result,
        }
    }

    /// Verifies a batch of frames, rejects what is not allowed and stores the rest; returns how
    /// many were copies of stored operations, and the announcements among the frames.
    async fn process(&self, frames: Vec<Frame>) -> Result<(u64, Vec<LogHeight>), String> {
        let mut raw = Vec::with_capacity(frames.len());
        let mut announced = Vec::new();
        for frame in frames {
            match frame {
                Frame::Operation { header, body } => raw.push((header, body)),
                Frame::CaughtUp => tracing::debug!(peer = %self.peer, "caught up"),
                Frame::Announce(heights) => announced.extend(heights),
                Frame::Request(_) | Frame::Have { .. } | Frame::Prune | Frame::Graft { .. } => {
                    return Err("peer sent a subscriber's frame on our session".into());
                }
            }
        }
        if raw.is_empty() {
            return Ok((0, announced));
        }
        // A few operations (a trickle of messages) are checked right here: handing them to a
        // blocking thread would cost two thread wake-ups, more than the checks themselves.
        if raw.len() <= INLINE_CHECKS {
            let checked: Vec<_> = raw
                .into_iter()
                .map(|(header, body)| check(&self.acceptance, &header, body))
                .collect();
            return self.store_checked(checked, announced).await;
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
            let acceptance = self.acceptance.clone();
            verifiers.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|(header, body)| check(&acceptance, &header, body))
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
        self.store_checked(checked, announced).await
    }

    /// Counts the rejected among checked operations and stores the rest.
    async fn store_checked(
        &self,
        checked: Vec<Result<SignedOperation, (RejectReason, String)>>,
        announced: Vec<LogHeight>,
    ) -> Result<(u64, Vec<LogHeight>), String> {
        let mut accepted = Vec::with_capacity(checked.len());
        for result in checked {
            match result {
                Ok(op) => accepted.push(op),
                Err((reason, detail)) => self.reject(reason, &detail),
            }
        }
        if accepted.is_empty() {
            return Ok((0, announced));
        }
        let outcomes = self
            .store
            .insert_remote(accepted)
            .await
            .map_err(|err| err.to_string())?;
        let mut stored = 0;
        let mut duplicates = 0;
        for outcome in outcomes {
            match outcome {
                InsertOutcome::Stored => stored += 1,
                InsertOutcome::Duplicate => {
                    self.metrics.operations_duplicate.inc();
                    duplicates += 1;
                }
                InsertOutcome::Held => {}
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
        Ok((duplicates, announced))
    }

    fn reject(&self, reason: RejectReason, detail: &str) {
        self.metrics.reject(reason);
        tracing::warn!(peer = %self.peer, reason = reason.as_str(), detail, "rejected operation");
    }
}

/// Operations in a received batch checked on the async worker itself (~70 us each).
const INLINE_CHECKS: usize = 4;

/// Verifies one received operation and checks that it is allowed here.
fn check(
    acceptance: &Acceptance,
    header: &[u8],
    body: Vec<u8>,
) -> Result<SignedOperation, (RejectReason, String)> {
    let op = SignedOperation::decode(header, body)
        .map_err(|err| (RejectReason::Invalid, err.to_string()))?;
    let author = op.author();
    acceptance.check(&author, op.log())?;
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

    /// Subscribed to `author`'s datasets; `author` is no member (so only those are accepted).
    fn routes_accepting(author: PublicKey) -> Acceptance {
        let mut config = crate::config::Config::default();
        config.subscribe.push(crate::config::SubscribeConfig {
            public_key: author,
            subjects: vec!["datasets.>".into()],
            stream: "DATASETS".into(),
        });
        nobody_a_member(Routes::from_config(&config))
    }

    fn nobody_a_member(routes: Routes) -> Acceptance {
        let own = PrivateKey::generate().public_key();
        Acceptance {
            routes,
            members: Members::from_config(&Default::default(), own).unwrap(),
        }
    }

    #[test]
    fn members_are_relayed_whatever_the_subscriptions() {
        let member = PrivateKey::generate();
        let stranger = PrivateKey::generate();
        let own = PrivateKey::generate().public_key();
        let config = crate::config::NetworkConfig {
            members: vec![member.public_key()],
            ..Default::default()
        };
        let acceptance = Acceptance {
            routes: Routes::default(),
            members: Members::from_config(&config, own).unwrap(),
        };
        let message = |key: &PrivateKey| {
            let body = RoutedMessage::new("any.subject", Vec::new(), b"x".to_vec()).encode();
            SignedOperation::sign(key, LogId::Message("any.subject".into()), 0, None, 1, body)
        };
        let op = message(&member);
        assert!(check(&acceptance, &op.header_bytes, op.body.clone()).is_ok());
        let op = message(&stranger);
        assert!(matches!(
            check(&acceptance, &op.header_bytes, op.body.clone()),
            Err((RejectReason::AuthorNotAllowed, _))
        ));
        // A subscribed author that is no member: only its subscribed subjects.
        let acceptance = routes_accepting(stranger.public_key());
        assert!(matches!(
            check(&acceptance, &op.header_bytes, op.body.clone()),
            Err((RejectReason::SubjectNotAllowed, _))
        ));
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
        let other_routes = nobody_a_member(Routes::default());
        let weather = op("weather", manifest(author, "weather", 0));
        assert!(matches!(
            check(&other_routes, &weather.header_bytes, weather.body.clone()),
            Err((RejectReason::AuthorNotAllowed, _))
        ));
    }
}
