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

//!
//! The parts of this module: [`status`] (what status reports, the error type), `peers` (the
//! connection pool and the peers that sent corrupt data), `transfer` (one version: parts, pieces,
//! range fetches, outboards), `retry_service` (`rhio.retry`) and `index` (the blob index at
//! start); this file schedules the workers.

mod index;
mod peers;
mod retry_service;
pub mod status;
mod transfer;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhio_core::identity::PublicKey;
use rhio_core::manifest::DatasetManifest;
use rhio_core::operation::{LogId, SignedOperation};
use rhio_core::replication::LocalBlob;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::transfers::{TransferState, VersionId};
use crate::blobs::BlobIndex;
use crate::config::{DatasetsConfig, ReplicationConfig};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::network::Network;
use crate::policy::Routes;
use crate::s3::S3Store;
use crate::s3::keys;
use crate::store::Store;
pub use peers::BAD_SOURCE_TTL;
use peers::{BadSources, PeerConnections};
pub use status::{ReplicationError, TransferStatus, Transfers};
use transfer::{OutboardCollector, Transfer};

/// Subject of the request/reply service that replicates a failed version again.
pub use rhio_core::api::RETRY_SUBJECT;

/// Backoff of a dataset log whose next version failed transiently (S3 or peers unavailable).
const TRANSFER_RETRY: crate::retry::Backoff =
    crate::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
/// A worker with nothing to do for this long ends; the next operation of its log starts it again.
const WORKER_IDLE: Duration = Duration::from_secs(300);

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
            peers: PeerConnections::new(network),
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
}
