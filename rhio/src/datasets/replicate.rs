//! Replication: datasets of other authors, copied into this cluster's S3 byte for byte.
//!
//! For every accepted dataset log (author, dataset) one worker replicates the versions in order.
//! A version is planned with [`rhio_core::replication::plan`]: the file is cut into parts of
//! `replication.part_size_mib`; the bytes of each part come from blobs this cluster already has
//! (read from its own S3, never fetched) or from peers as bao-verified ranges over
//! `rhio/blobs/1`, any peer that has the blob (the author or any cluster that replicated it).
//! Parts go into one S3 multipart upload at
//! `datasets/<name>/<author>/v<version>.parquet`, each recorded with its BLAKE3 chaining value
//! in [`TransferState`] once S3 accepted it. When all parts are in, the whole-file hash computed
//! from the chaining values must equal the signed manifest's before the upload is completed: the
//! object becomes visible only verified. Then the outboards of the new blobs and the manifest are
//! stored beside it, the blobs join the [`BlobIndex`] (so this node serves them too) and the
//! version is announced on the local dataset subject.
//!
//! A peer that sends bytes that do not verify is not asked for that blob again in this
//! transfer; a range that fails is asked of the next peer. A crash loses at most the parts in
//! flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bao_tree::io::outboard::PostOrderMemOutboard;
use bao_tree::io::sync::OutboardMut;
use bao_tree::{BaoTree, TreeNode};
use futures::StreamExt;
use iroh::endpoint::Connection;
use rhio_core::identity::PublicKey;
use rhio_core::manifest::DatasetManifest;
use rhio_core::operation::{LogId, SignedOperation};
use rhio_core::replication::{
    LocalBlob, PartPlan, PieceSource, ReplicationPlan, file_hash_from_parts, part_chaining_value,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::transfers::{DonePart, TransferState, VersionId};
use crate::blobs::protocol::{BLOBS_ALPN, FetchError, RangeRequest, fetch_range};
use crate::blobs::{BAO_BLOCK_SIZE, BlobIndex};
use crate::config::{DatasetsConfig, ReplicationConfig};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::network::Network;
use crate::routing::Routes;
use crate::s3::S3Store;
use crate::s3::keys;
use crate::store::Store;

/// Pieces of one part gathered at once (and outboards written at once). With the default 4
/// parts in flight a peer gets at most 8 requests from one transfer: the server's per-peer limit.
const PIECES_IN_FLIGHT: usize = 2;
/// Rounds over all peers before a range is given up (the version is retried later).
const FETCH_ROUNDS: usize = 20;
/// A peer that could not be reached is skipped for this long.
const PEER_COOLDOWN: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between rounds over the peers for one range.
const FETCH_RETRY: crate::retry::Backoff =
    crate::retry::Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
/// Backoff of a dataset log whose next version failed transiently (S3 or peers unavailable).
const TRANSFER_RETRY: crate::retry::Backoff =
    crate::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
/// A worker with nothing to do for this long ends; the next operation of its log starts it again.
const WORKER_IDLE: Duration = Duration::from_secs(300);

#[derive(Debug, Error)]
pub enum ReplicationError {
    #[error("manifest: {0}")]
    Manifest(String),
    #[error(transparent)]
    Storage(#[from] crate::s3::ObjectError),
    #[error("state: {0}")]
    State(#[from] sqlx::Error),
    #[error("no peer could serve blob {hash} range {start}..{end}: {last}")]
    NoSource {
        hash: String,
        start: u64,
        end: u64,
        last: String,
    },
    #[error("assembled file hash {actual} is not the manifest's {expected}")]
    FileHash { expected: String, actual: String },
    #[error("{0}")]
    Internal(String),
}

/// A transfer in progress, as status reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransferStatus {
    pub dataset: String,
    pub version: u64,
    pub author: PublicKey,
    pub bytes_total: u64,
    /// Bytes of the file in S3 parts already.
    pub bytes_done: u64,
    /// Bytes that must come from peers (blobs this cluster lacks).
    pub bytes_remote: u64,
    /// Blobs of the version fetched from peers, and blobs found in this cluster.
    pub blobs_remote: usize,
    pub blobs_local: usize,
    /// Bytes received from peers in this run (bao encoding included).
    pub bytes_fetched: u64,
    pub parts_total: usize,
    pub parts_done: usize,
    /// Peers that served ranges in this run.
    pub peers: Vec<PublicKey>,
    pub elapsed_secs: f64,
    pub rate_mib_s: f64,
}

/// Transfers in progress and versions that failed, shared with status.
#[derive(Debug, Clone, Default)]
pub struct Transfers {
    inner: Arc<Mutex<BTreeMap<VersionId, (Instant, TransferStatus)>>>,
    failed: Arc<Mutex<Vec<super::transfers::FailedVersion>>>,
}

impl Transfers {
    /// Versions recorded as failed (as of the last change).
    pub fn failed(&self) -> Vec<super::transfers::FailedVersion> {
        self.failed.lock().expect("failed lock").clone()
    }

    pub fn snapshot(&self) -> Vec<TransferStatus> {
        self.inner
            .lock()
            .expect("transfers lock")
            .values()
            .map(|(started, status)| {
                let elapsed = started.elapsed().as_secs_f64();
                TransferStatus {
                    elapsed_secs: elapsed,
                    rate_mib_s: if elapsed > 0.0 {
                        status.bytes_fetched as f64 / elapsed / (1024.0 * 1024.0)
                    } else {
                        0.0
                    },
                    ..status.clone()
                }
            })
            .collect()
    }

    fn update(&self, id: &VersionId, change: impl FnOnce(&mut TransferStatus)) {
        if let Some((_, status)) = self.inner.lock().expect("transfers lock").get_mut(id) {
            change(status);
        }
    }
}

/// Connections by peer, each in its own slot: a slot's lock is held while connecting to that
/// peer only, so a dead peer (a connect waits up to [`CONNECT_TIMEOUT`]) never holds up fetches
/// from the others. Generic over the connection so the locking is tested without sockets.
struct PeerSlots<C> {
    slots: Mutex<HashMap<PublicKey, Arc<tokio::sync::Mutex<Option<C>>>>>,
}

impl<C: Clone> Default for PeerSlots<C> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<C: Clone> PeerSlots<C> {
    fn slot(&self, peer: PublicKey) -> Arc<tokio::sync::Mutex<Option<C>>> {
        self.slots
            .lock()
            .expect("peer slots lock")
            .entry(peer)
            .or_default()
            .clone()
    }

    /// The open connection to `peer` (`usable` says whether a stored one still is), or a new
    /// one from `connect`.
    async fn get<F>(
        &self,
        peer: PublicKey,
        usable: impl Fn(&C) -> bool,
        connect: F,
    ) -> Result<C, String>
    where
        F: std::future::Future<Output = Result<C, String>>,
    {
        let slot = self.slot(peer);
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref()
            && usable(connection)
        {
            return Ok(connection.clone());
        }
        let connection = connect.await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn forget(&self, peer: PublicKey) {
        *self.slot(peer).lock().await = None;
    }
}

/// QUIC connections to peers for blob requests, and which peers are cooling down.
#[derive(Clone)]
struct PeerConnections {
    network: Network,
    connections: Arc<PeerSlots<Connection>>,
    cooldown: Arc<Mutex<HashMap<PublicKey, Instant>>>,
}

impl PeerConnections {
    fn cooling(&self, peer: &PublicKey) -> bool {
        self.cooldown
            .lock()
            .expect("cooldown lock")
            .get(peer)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn cool(&self, peer: PublicKey) {
        self.cooldown
            .lock()
            .expect("cooldown lock")
            .insert(peer, Instant::now() + PEER_COOLDOWN);
    }

    async fn connection(&self, peer: PublicKey) -> Result<Connection, String> {
        let connect = async {
            tokio::time::timeout(
                CONNECT_TIMEOUT,
                self.network
                    .endpoint()
                    .connect(peer.verifying_key(), BLOBS_ALPN),
            )
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|err| format!("connect: {err}"))
        };
        self.connections
            .get(peer, |c| c.close_reason().is_none(), connect)
            .await
    }

    async fn forget(&self, peer: &PublicKey) {
        self.connections.forget(*peer).await;
    }
}

/// Verified parent hash pairs of the blobs fetched in one transfer, kept to write their
/// outboards (every range answer carries the parents above it, so ranges covering a blob carry
/// its whole outboard).
#[derive(Default)]
struct OutboardCollector {
    blobs: HashMap<usize, (PostOrderMemOutboard, HashSet<TreeNode>)>,
}

impl OutboardCollector {
    fn add(
        &mut self,
        blob: usize,
        hash: blake3::Hash,
        size: u64,
        parents: &[(TreeNode, (blake3::Hash, blake3::Hash))],
    ) {
        let (outboard, seen) = self.blobs.entry(blob).or_insert_with(|| {
            let tree = BaoTree::new(size, BAO_BLOCK_SIZE);
            (
                PostOrderMemOutboard {
                    root: hash,
                    tree,
                    data: vec![0u8; tree.outboard_size() as usize],
                },
                HashSet::new(),
            )
        });
        for (node, pair) in parents {
            if outboard.save(*node, pair).is_ok() {
                seen.insert(*node);
            }
        }
    }

    /// The complete outboard of a blob, when every parent was seen.
    fn take(&mut self, blob: usize) -> Option<Vec<u8>> {
        let (outboard, seen) = self.blobs.remove(&blob)?;
        (seen.len() as u64 * 64 == outboard.tree.outboard_size()).then_some(outboard.data)
    }
}

/// Replicates accepted datasets of other authors. Cheap to clone.
#[derive(Clone)]
pub struct Replicator {
    pub s3: S3Store,
    pub store: Store,
    pub index: BlobIndex,
    pub state: TransferState,
    pub routes: Routes,
    pub own_key: PublicKey,
    pub datasets: DatasetsConfig,
    pub config: ReplicationConfig,
    pub metrics: Arc<Metrics>,
    pub transfers: Transfers,
    pub outbox: super::outbox::Outbox,
    /// Makes the run loop wake every worker (after `rhio.retry`).
    rescan: Arc<Notify>,
    /// (peer, blob) pairs whose bytes did not verify: that peer is not asked for that blob
    /// again for [`BAD_SOURCE_TTL`] (this transfer, its retries, other versions sharing the blob).
    bad_sources: BadSources,
    peers: PeerConnections,
    running: Arc<tokio::sync::Semaphore>,
}

impl Replicator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        s3: S3Store,
        store: Store,
        index: BlobIndex,
        state: TransferState,
        routes: Routes,
        own_key: PublicKey,
        datasets: DatasetsConfig,
        config: ReplicationConfig,
        metrics: Arc<Metrics>,
        network: Network,
        outbox: super::outbox::Outbox,
    ) -> Self {
        Self {
            outbox,
            rescan: Arc::new(Notify::new()),
            bad_sources: Default::default(),
            running: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent)),
            s3,
            store,
            index,
            state,
            routes,
            own_key,
            datasets,
            config,
            metrics,
            transfers: Transfers::default(),
            peers: PeerConnections {
                network,
                connections: Default::default(),
                cooldown: Default::default(),
            },
        }
    }

    fn replicates(&self, author: &PublicKey, log: &LogId) -> bool {
        *author != self.own_key
            && matches!(log, LogId::Dataset(_))
            && self.routes.accepts(author, log)
    }

    /// Starts a worker per accepted dataset log, now and whenever a new one appears.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut events = self.store.subscribe();
        let mut workers: HashMap<(PublicKey, String), Arc<Notify>> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        match self.store.logs().await {
            Ok(logs) => {
                for log in logs {
                    if let LogId::Dataset(name) = &log.log
                        && self.replicates(&log.author, &log.log)
                    {
                        self.wake(
                            &mut workers,
                            &mut tasks,
                            log.author,
                            name.clone(),
                            &shutdown,
                        );
                    }
                }
            }
            Err(err) => {
                tracing::error!(%err, "cannot list dataset logs; replication waits for new ones")
            }
        }
        loop {
            let op = tokio::select! {
                _ = shutdown.cancelled() => break,
                // A worker that was idle for WORKER_IDLE ended: forget it, and start it again
                // if its log was woken in the meantime.
                Some(Ok((author, dataset))) = tasks.join_next(), if !tasks.is_empty() => {
                    let key = (author, dataset);
                    if let Some(notify) = workers.remove(&key)
                        && futures::FutureExt::now_or_never(notify.notified()).is_some()
                    {
                        self.wake(&mut workers, &mut tasks, key.0, key.1, &shutdown);
                    }
                    continue;
                }
                _ = self.rescan.notified() => {
                    for notify in workers.values() {
                        notify.notify_one();
                    }
                    continue;
                }
                op = events.recv() => op,
            };
            match op {
                Ok(op) => {
                    if let LogId::Dataset(name) = op.log()
                        && self.replicates(&op.author(), op.log())
                    {
                        self.wake(
                            &mut workers,
                            &mut tasks,
                            op.author(),
                            name.clone(),
                            &shutdown,
                        );
                    }
                }
                // Missed events: every worker looks at its log again.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for notify in workers.values() {
                        notify.notify_one();
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Wakes the worker of a dataset log, starting it first if there is none.
    fn wake(
        &self,
        workers: &mut HashMap<(PublicKey, String), Arc<Notify>>,
        tasks: &mut tokio::task::JoinSet<(PublicKey, String)>,
        author: PublicKey,
        dataset: String,
        shutdown: &CancellationToken,
    ) {
        let notify = workers.entry((author, dataset.clone())).or_insert_with(|| {
            let notify = Arc::new(Notify::new());
            tasks.spawn(
                self.clone()
                    .worker(author, dataset, notify.clone(), shutdown.clone()),
            );
            notify
        });
        notify.notify_one();
    }

    /// Replicates the versions of one dataset log in order; ends (returning its log) at shutdown
    /// or after [`WORKER_IDLE`] with nothing to do, so idle logs hold no task.
    async fn worker(
        self,
        author: PublicKey,
        dataset: String,
        notify: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> (PublicKey, String) {
        let log = LogId::Dataset(dataset.clone());
        let mut attempts = TRANSFER_RETRY.attempts();
        // Set after a whole-file hash mismatch: the next attempt fetches every blob from peers.
        let mut remote_only: Option<u64> = None;
        loop {
            let next = match self.next_operation(&author, &dataset, &log).await {
                Ok(next) => next,
                Err(err) => {
                    tracing::warn!(%author, dataset, %err, "cannot read replication state");
                    None
                }
            };
            let Some(op) = next else {
                tokio::select! {
                    _ = shutdown.cancelled() => return (author, dataset),
                    _ = notify.notified() => continue,
                    _ = tokio::time::sleep(WORKER_IDLE) => return (author, dataset),
                }
            };
            let result = {
                let Ok(_permit) = self.running.acquire().await else {
                    return (author, dataset);
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return (author, dataset),
                    result = self.replicate(&op, remote_only == Some(op.seq())) => result,
                }
            };
            match result {
                Ok(()) => attempts.reset(),
                Err(err @ ReplicationError::FileHash { .. }) if remote_only != Some(op.seq()) => {
                    // Every fetched range verified, so a blob read from this cluster's S3 is
                    // damaged (or the manifest is wrong): try once more with peers only.
                    tracing::warn!(%author, dataset, version = op.seq(), %err, "whole-file hash mismatch; fetching every blob from peers");
                    remote_only = Some(op.seq());
                }
                Err(err @ ReplicationError::FileHash { .. }) => {
                    // Verified bytes from peers do not make the signed file: the manifest is
                    // wrong. Skip the version so later ones are not held back forever.
                    self.metrics
                        .replication_versions
                        .get_or_create(&OutcomeLabels { outcome: "failed" })
                        .inc();
                    tracing::error!(%author, dataset, version = op.seq(), %err, "version cannot be replicated: its blobs do not make the file its manifest signs; skipped");
                    let id = VersionId {
                        author,
                        dataset: dataset.clone(),
                        version: op.seq(),
                    };
                    if let Err(err) = self.state.fail(&id, &err.to_string()).await {
                        tracing::warn!(%err, "cannot record the failed version");
                    }
                    self.refresh_failed().await;
                }
                Err(err) => {
                    self.metrics
                        .replication_versions
                        .get_or_create(&OutcomeLabels { outcome: "retry" })
                        .inc();
                    let retry = attempts.next_delay(crate::retry::jitter());
                    tracing::warn!(%author, dataset, version = op.seq(), %err, retry_in = ?retry, "replication paused");
                    if !crate::retry::sleep(retry, &shutdown).await {
                        return (author, dataset);
                    }
                }
            }
        }
    }

    async fn next_operation(
        &self,
        author: &PublicKey,
        dataset: &str,
        log: &LogId,
    ) -> Result<Option<SignedOperation>, String> {
        let next = self
            .state
            .next_version(author, dataset)
            .await
            .map_err(|err| err.to_string())?;
        self.store
            .operation(author, log, next)
            .await
            .map_err(|err| err.to_string())
    }

    /// Replicates one version (resuming its transfer when one was started). With `remote_only`
    /// no blob is read from this cluster's S3.
    async fn replicate(
        &self,
        op: &SignedOperation,
        remote_only: bool,
    ) -> Result<(), ReplicationError> {
        let manifest = DatasetManifest::decode(&op.body)
            .map_err(|err| ReplicationError::Manifest(err.to_string()))?;
        let id = VersionId {
            author: op.author(),
            dataset: manifest.dataset.clone(),
            version: op.seq(),
        };
        let key = keys::replica_version(&id.dataset, &id.author, id.version);
        // Large files get larger parts: S3 allows at most 10,000 per upload.
        let part_size = rhio_core::replication::part_size_for(
            manifest.file_size,
            self.config.part_size_mib << 20,
        );
        let index = self.index.clone();
        let plan = rhio_core::replication::plan(&manifest, part_size, |hash| {
            if remote_only {
                return None;
            }
            let location = index.get(&blake3::Hash::from_hex(hash).ok()?)?;
            Some(LocalBlob {
                key: location.key,
                offset: location.offset,
            })
        })
        .map_err(|err| ReplicationError::Manifest(err.to_string()))?;
        let upload_id = match self.state.transfer(&id).await? {
            Some((stored_key, upload_id)) if stored_key == key => upload_id,
            _ => {
                let upload_id = self
                    .s3
                    .create_upload(&key)
                    .await
                    .map_err(ReplicationError::Storage)?;
                self.state.start_transfer(&id, &key, &upload_id).await?;
                upload_id
            }
        };
        let done = self.state.parts(&id).await?;
        let done_numbers: HashSet<u32> = done.iter().map(|p| p.number).collect();
        let started = Instant::now();
        self.transfers.inner.lock().expect("transfers lock").insert(
            id.clone(),
            (
                started,
                TransferStatus {
                    dataset: id.dataset.clone(),
                    version: id.version,
                    author: id.author,
                    bytes_total: manifest.file_size,
                    bytes_done: plan
                        .parts
                        .iter()
                        .filter(|p| done_numbers.contains(&p.number))
                        .map(|p| p.length)
                        .sum(),
                    bytes_remote: plan.remote_bytes,
                    blobs_remote: plan.remote_blobs.len(),
                    blobs_local: manifest.blobs.len() - plan.remote_blobs.len(),
                    bytes_fetched: 0,
                    parts_total: plan.parts.len(),
                    parts_done: done.len(),
                    peers: Vec::new(),
                    elapsed_secs: 0.0,
                    rate_mib_s: 0.0,
                },
            ),
        );
        self.metrics.transfers_in_progress.inc();
        tracing::info!(
            dataset = %id.dataset,
            version = id.version,
            author = %id.author,
            bytes = manifest.file_size,
            remote_bytes = plan.remote_bytes,
            local_bytes = plan.local_bytes,
            parts_done = done.len(),
            parts = plan.parts.len(),
            "replicating dataset version"
        );
        let transfer = Transfer {
            replicator: self,
            id: &id,
            manifest: &manifest,
            key: &key,
            upload_id: &upload_id,
            outboards: Mutex::new(OutboardCollector::default()),
        };
        let result = transfer.run(&plan, done).await;
        self.metrics.transfers_in_progress.dec();
        self.transfers
            .inner
            .lock()
            .expect("transfers lock")
            .remove(&id);
        match &result {
            Ok(()) => {
                self.metrics
                    .replication_versions
                    .get_or_create(&OutcomeLabels { outcome: "done" })
                    .inc();
                let location = format!("s3://{}/{key}", self.s3.bucket());
                tracing::info!(
                    dataset = %id.dataset,
                    version = id.version,
                    author = %id.author,
                    bytes = manifest.file_size,
                    secs = started.elapsed().as_secs_f64(),
                    %location,
                    "dataset version replicated"
                );
            }
            Err(ReplicationError::FileHash { .. }) => {
                // The parts verified but the whole does not: start over from scratch.
                if let Err(err) = self.s3.abort_upload(&key, &upload_id).await {
                    tracing::warn!(%key, %err, "cannot abort the upload of a mismatched version");
                }
                self.state.drop_transfer(&id).await?;
            }
            Err(_) => {}
        }
        result
    }

    /// Copies the failed versions into the status.
    async fn refresh_failed(&self) {
        match self.state.failed().await {
            Ok(failed) => *self.transfers.failed.lock().expect("failed lock") = failed,
            Err(err) => tracing::warn!(%err, "cannot read failed versions"),
        }
    }

    /// Answers `rhio.retry` until shutdown: `{"author": "<hex>", "dataset": "...", "version": N}`
    /// forgets that the version failed, so its worker replicates it again.
    pub async fn serve_retry(self, nats: async_nats::Client, shutdown: CancellationToken) {
        crate::nats::serve_requests(nats, RETRY_SUBJECT, 4, shutdown, |payload| {
            let replicator = self.clone();
            async move {
                let answer = match replicator.retry(&payload).await {
                    Ok(()) => serde_json::json!({"ok": true}),
                    Err((code, message)) => {
                        serde_json::json!({"ok": false, "error": {"code": code, "message": message}})
                    }
                };
                answer.to_string().into_bytes()
            }
        })
        .await;
    }

    async fn retry(&self, body: &[u8]) -> Result<(), (&'static str, String)> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RetryRequest {
            author: PublicKey,
            dataset: String,
            version: u64,
        }
        let request: RetryRequest = serde_json::from_slice(body).map_err(|err| {
            (
                "bad_request",
                format!("expected {{\"author\", \"dataset\", \"version\"}}: {err}"),
            )
        })?;
        let id = VersionId {
            author: request.author,
            dataset: request.dataset,
            version: request.version,
        };
        let retried = self
            .state
            .retry(&id)
            .await
            .map_err(|err| ("internal", err.to_string()))?;
        if !retried {
            return Err(("not_failed", format!("{id} is not recorded as failed")));
        }
        tracing::info!(%id, "replicating a failed version again on request");
        self.refresh_failed().await;
        self.rescan.notify_one();
        Ok(())
    }

    /// Fills the blob index from the versions available here: this node's own imports and
    /// completed replications.
    pub async fn load_index(&self) -> Result<(), String> {
        self.refresh_failed().await;
        let logs = self.store.logs().await.map_err(|err| err.to_string())?;
        for log in logs {
            if log.author != self.own_key {
                continue;
            }
            let LogId::Dataset(name) = &log.log else {
                continue;
            };
            let ops = self
                .store
                .operations(&log.author, &log.log, 0, log.next_seq)
                .await
                .map_err(|err| err.to_string())?;
            for op in ops {
                if let Ok(manifest) = DatasetManifest::decode(&op.body) {
                    self.index
                        .insert_manifest(&manifest, &keys::own_version(name, op.seq()));
                }
            }
        }
        for (id, key) in self
            .state
            .available()
            .await
            .map_err(|err| err.to_string())?
        {
            let ops = self
                .store
                .operations(
                    &id.author,
                    &LogId::Dataset(id.dataset.clone()),
                    id.version,
                    1,
                )
                .await
                .map_err(|err| err.to_string())?;
            if let Some(manifest) = ops
                .first()
                .and_then(|op| DatasetManifest::decode(&op.body).ok())
            {
                self.index.insert_manifest(&manifest, &key);
            }
        }
        Ok(())
    }
}

/// Subject of the request/reply service that replicates a failed version again.
pub use rhio_core::api::RETRY_SUBJECT;

/// How long a peer that sent bytes of a blob that did not verify is not asked for that blob
/// again. Long enough to finish the transfer (and its retries) from others; short enough that a
/// peer whose object was damaged once and repaired, or a transient fault, is not banned for good.
pub const BAD_SOURCE_TTL: Duration = Duration::from_secs(15 * 60);

/// (peer, blob) pairs that sent corrupt data, each until it expires. Bounded: expired entries
/// are dropped whenever one is added.
#[derive(Clone, Default)]
struct BadSources {
    entries: Arc<Mutex<HashMap<(PublicKey, blake3::Hash), std::time::Instant>>>,
}

impl BadSources {
    fn insert(&self, peer: PublicKey, hash: blake3::Hash) {
        let now = std::time::Instant::now();
        let mut entries = self.entries.lock().expect("bad sources lock");
        entries.retain(|_, until| *until > now);
        entries.insert((peer, hash), now + BAD_SOURCE_TTL);
    }

    fn contains(&self, peer: PublicKey, hash: blake3::Hash) -> bool {
        let now = std::time::Instant::now();
        self.entries
            .lock()
            .expect("bad sources lock")
            .get(&(peer, hash))
            .is_some_and(|until| *until > now)
    }

    /// True when every one of `peers` is a bad source of `hash`.
    fn all(&self, peers: &[PublicKey], hash: blake3::Hash) -> bool {
        peers.iter().all(|peer| self.contains(*peer, hash))
    }
}

/// One version being replicated.
struct Transfer<'a> {
    replicator: &'a Replicator,
    id: &'a VersionId,
    manifest: &'a DatasetManifest,
    key: &'a str,
    upload_id: &'a str,
    outboards: Mutex<OutboardCollector>,
}

impl Transfer<'_> {
    async fn run(
        &self,
        plan: &ReplicationPlan,
        done: Vec<DonePart>,
    ) -> Result<(), ReplicationError> {
        let done_numbers: HashSet<u32> = done.iter().map(|p| p.number).collect();
        let single = plan.parts.len() == 1;
        let todo: Vec<PartPlan> = plan
            .parts
            .iter()
            .filter(|p| !done_numbers.contains(&p.number))
            .cloned()
            .collect();
        let mut parts = done;
        let mut uploads = futures::stream::iter(todo)
            .map(|part| async move { self.part(&part, single).await })
            .buffer_unordered(self.replicator.config.parts_in_flight);
        while let Some(result) = uploads.next().await {
            parts.push(result?);
        }
        drop(uploads);
        parts.sort_by_key(|p| p.number);
        let hash = if single {
            blake3::Hash::from_bytes(parts[0].hash)
        } else {
            let cvs: Vec<[u8; 32]> = parts.iter().map(|p| p.hash).collect();
            file_hash_from_parts(&cvs, plan.part_size, self.manifest.file_size, None)
        };
        if hash.to_hex().as_str() != self.manifest.file_hash {
            return Err(ReplicationError::FileHash {
                expected: self.manifest.file_hash.clone(),
                actual: hash.to_hex().to_string(),
            });
        }
        let s3 = &self.replicator.s3;
        let numbered: Vec<(u32, String)> =
            parts.iter().map(|p| (p.number, p.etag.clone())).collect();
        if let Err(err) = s3
            .complete_upload(self.key, self.upload_id, &numbered)
            .await
        {
            // Completed before a crash, but not yet recorded: the object is there, verified.
            if !s3.exists(self.key).await.unwrap_or(false) {
                return Err(ReplicationError::Storage(err));
            }
        }
        self.store_outboards(plan).await?;
        s3.put(
            &keys::manifest(&self.id.dataset, Some(&self.id.author), self.id.version),
            self.manifest.encode(),
        )
        .await
        .map_err(ReplicationError::Storage)?;
        // Available and queued for announcement in one step: the outbox announces it until
        // JetStream acknowledges, also across a crash or a NATS outage.
        let announcement = super::transfers::Announcement {
            id: self.id.clone(),
            subject: rhio_core::sync::dataset_subject(
                &self.replicator.datasets.subject_prefix,
                &self.id.dataset,
            ),
            location: format!("s3://{}/{}", s3.bucket(), self.key),
        };
        self.replicator
            .state
            .finish(self.id, self.key, &announcement)
            .await?;
        self.replicator.outbox.wake();
        self.replicator
            .index
            .insert_manifest(self.manifest, self.key);
        Ok(())
    }

    /// Writes the outboards of the blobs that came from peers, so this node can serve them
    /// ([`PIECES_IN_FLIGHT`] PUTs at a time: a version of many row groups has many).
    async fn store_outboards(&self, plan: &ReplicationPlan) -> Result<(), ReplicationError> {
        let puts: Vec<_> = plan
            .remote_blobs
            .iter()
            .map(|&blob| self.store_outboard(blob))
            .collect();
        let mut puts = futures::stream::iter(puts).buffer_unordered(PIECES_IN_FLIGHT);
        while let Some(put) = puts.next().await {
            put?;
        }
        Ok(())
    }

    async fn store_outboard(&self, blob: usize) -> Result<(), ReplicationError> {
        let entry = &self.manifest.blobs[blob];
        let hash = blake3::Hash::from_hex(&entry.hash)
            .map_err(|err| ReplicationError::Manifest(err.to_string()))?;
        let collected = self.outboards.lock().expect("outboards lock").take(blob);
        let outboard = match collected {
            Some(outboard) => outboard,
            None => self.outboard_from_object(blob, hash).await?,
        };
        self.replicator
            .s3
            .put(&keys::outboard(&hash), outboard)
            .await
            .map_err(ReplicationError::Storage)
    }

    /// The outboard of a blob whose ranges were fetched before a restart (their parents are
    /// gone with the old process): computed from the completed object in this cluster's S3.
    async fn outboard_from_object(
        &self,
        blob: usize,
        hash: blake3::Hash,
    ) -> Result<Vec<u8>, ReplicationError> {
        let entry = &self.manifest.blobs[blob];
        let builder = crate::blobs::OutboardBuilder::start(entry.length);
        let step = 8 << 20;
        let mut start = 0;
        while start < entry.length {
            let end = (start + step).min(entry.length);
            let data = self
                .replicator
                .s3
                .get_range(self.key, Some((entry.offset + start, end - start)))
                .await
                .map_err(ReplicationError::Storage)?;
            builder
                .feed(data)
                .await
                .map_err(|err| ReplicationError::Internal(err.to_string()))?;
            start = end;
        }
        let (root, outboard) = builder
            .finish()
            .await
            .map_err(|err| ReplicationError::Internal(err.to_string()))?;
        if root != hash {
            return Err(ReplicationError::Internal(format!(
                "blob {hash} in the completed object hashes to {root}"
            )));
        }
        Ok(outboard)
    }

    /// Gathers one part's bytes, uploads it and records it. The pieces of a part (one per blob
    /// it touches) are gathered [`PIECES_IN_FLIGHT`] at a time: a part of many small row groups
    /// would otherwise pay a round trip per blob in turn.
    async fn part(&self, part: &PartPlan, single: bool) -> Result<DonePart, ReplicationError> {
        let mut bytes = vec![0u8; part.length as usize];
        let mut slots = Vec::with_capacity(part.pieces.len());
        let mut rest = bytes.as_mut_slice();
        for piece in &part.pieces {
            let (slot, tail) = std::mem::take(&mut rest).split_at_mut(piece.len() as usize);
            slots.push(slot);
            rest = tail;
        }
        // The futures are made first and then run (a closure inside the stream would make the
        // worker's future not provably Send).
        let pieces: Vec<_> = (part.pieces.iter().zip(slots).enumerate())
            .map(|(i, (piece, slot))| self.piece(piece, part.number + i as u32, slot))
            .collect();
        let mut gathering = futures::stream::iter(pieces).buffer_unordered(PIECES_IN_FLIGHT);
        let mut wire_bytes = 0;
        while let Some(wire) = gathering.next().await {
            wire_bytes += wire?;
        }
        drop(gathering);
        let offset = part.offset;
        let (bytes, hash) = tokio::task::spawn_blocking(move || {
            let hash = if single {
                *blake3::hash(&bytes).as_bytes()
            } else {
                part_chaining_value(offset, &bytes)
            };
            (bytes, hash)
        })
        .await
        .map_err(|err| ReplicationError::Internal(err.to_string()))?;
        let etag = self
            .replicator
            .s3
            .upload_part(self.key, self.upload_id, part.number, bytes)
            .await
            .map_err(ReplicationError::Storage)?;
        let done = DonePart {
            number: part.number,
            etag,
            hash,
            wire_bytes,
        };
        self.replicator.state.record_part(self.id, &done).await?;
        self.replicator.transfers.update(self.id, |status| {
            status.parts_done += 1;
            status.bytes_done += part.length;
        });
        Ok(done)
    }

    /// One piece of a part into `slot`: read from this cluster's S3 when the blob is here,
    /// fetched verified from a peer otherwise. Returns the bytes that came over the wire.
    async fn piece(
        &self,
        piece: &rhio_core::replication::Piece,
        rotation: u32,
        slot: &mut [u8],
    ) -> Result<u64, ReplicationError> {
        match &piece.source {
            PieceSource::Local(local) => {
                let data = self
                    .replicator
                    .s3
                    .get_exact(&local.key, local.offset + piece.start, piece.len())
                    .await
                    .map_err(ReplicationError::Storage)?;
                self.replicator
                    .metrics
                    .replication_bytes_local
                    .inc_by(piece.len());
                slot.copy_from_slice(&data);
                Ok(0)
            }
            PieceSource::Remote => {
                self.fetch(piece.blob, piece.start, piece.end, rotation, slot)
                    .await
            }
        }
    }

    /// Fetches a verified range of a blob into `out` from whichever peer can serve it; peers are
    /// tried in an order rotated by `rotation`, so parts spread over peers. Returns the bytes
    /// that came over the wire.
    async fn fetch(
        &self,
        blob: usize,
        start: u64,
        end: u64,
        rotation: u32,
        out: &mut [u8],
    ) -> Result<u64, ReplicationError> {
        let entry = &self.manifest.blobs[blob];
        let hash = blake3::Hash::from_hex(&entry.hash)
            .map_err(|err| ReplicationError::Manifest(err.to_string()))?;
        let request = RangeRequest {
            hash,
            size: entry.length,
            start,
            end,
        };
        let peers = &self.replicator.peers;
        let timeout = Duration::from_secs(self.replicator.config.request_timeout_secs);
        let mut last = "no other member".to_string();
        for round in 0..FETCH_ROUNDS {
            // Any member may hold the blob; the list follows membership changes.
            let candidates = peers.network.members().others();
            let count = candidates.len();
            let mut tried = 0;
            for i in 0..count {
                let peer = candidates[(i + rotation as usize) % count];
                if self.replicator.bad_sources.contains(peer, hash) || peers.cooling(&peer) {
                    continue;
                }
                tried += 1;
                let connection = match peers.connection(peer).await {
                    Ok(connection) => connection,
                    Err(err) => {
                        peers.cool(peer);
                        last = format!("{peer}: {err}");
                        continue;
                    }
                };
                match fetch_range(&connection, request, timeout, out).await {
                    Ok(fetched) => {
                        let metrics = &self.replicator.metrics;
                        metrics.replication_bytes_fetched.inc_by(fetched.wire_bytes);
                        self.outboards.lock().expect("outboards lock").add(
                            blob,
                            hash,
                            entry.length,
                            &fetched.parents,
                        );
                        self.replicator.transfers.update(self.id, |status| {
                            status.bytes_fetched += fetched.wire_bytes;
                            if !status.peers.contains(&peer) {
                                status.peers.push(peer);
                            }
                        });
                        return Ok(fetched.wire_bytes);
                    }
                    Err(FetchError::Corrupt(detail)) => {
                        self.replicator.metrics.replication_corrupt_ranges.inc();
                        tracing::warn!(%peer, dataset = %self.id.dataset, blob = %hash, detail, "peer sent data that does not verify; not asking it for this blob again");
                        self.replicator.bad_sources.insert(peer, hash);
                        last = format!("{peer}: corrupt data");
                    }
                    Err(FetchError::NotFound) => last = format!("{peer}: does not have it"),
                    Err(FetchError::Refused(why)) => last = format!("{peer}: {why}"),
                    Err(FetchError::Transport(err)) => {
                        peers.forget(&peer).await;
                        peers.cool(peer);
                        last = format!("{peer}: {err}");
                    }
                }
            }
            if tried == 0 && round > 0 && self.all_bad(hash) {
                break;
            }
            tokio::time::sleep(crate::retry::delay(FETCH_RETRY, round as u32)).await;
        }
        Err(ReplicationError::NoSource {
            hash: entry.hash.clone(),
            start,
            end,
            last,
        })
    }

    fn all_bad(&self, hash: blake3::Hash) -> bool {
        let members = self.replicator.peers.network.members().others();
        self.replicator.bad_sources.all(&members, hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhio_core::identity::PrivateKey;

    #[tokio::test]
    async fn a_peer_whose_connect_never_ends_does_not_hold_up_the_others() {
        let slots = Arc::new(PeerSlots::<u32>::default());
        let dead = PrivateKey::generate().public_key();
        let alive = PrivateKey::generate().public_key();
        let stuck = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .get(
                        dead,
                        |_| true,
                        std::future::pending::<Result<u32, String>>(),
                    )
                    .await
            })
        };
        // The connect to the dead peer is under way and holds its slot.
        while slots.slot(dead).try_lock().is_ok() {
            tokio::task::yield_now().await;
        }
        // A deadlock guard, not a speed limit: with one lock for all peers this never returns.
        let other = tokio::time::timeout(
            Duration::from_secs(10),
            slots.get(alive, |_| true, async { Ok(7) }),
        )
        .await
        .expect("a connect to another peer is not held up");
        assert_eq!(other, Ok(7));
        // A stored connection is reused, one that is no longer usable replaced.
        assert_eq!(slots.get(alive, |_| true, async { Ok(8) }).await, Ok(7));
        assert_eq!(slots.get(alive, |_| false, async { Ok(9) }).await, Ok(9));
        slots.forget(alive).await;
        assert_eq!(slots.get(alive, |_| true, async { Ok(10) }).await, Ok(10));
        assert!(!stuck.is_finished());
        stuck.abort();
    }
}
