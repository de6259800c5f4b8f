//! The registry mirror: every dataset version available in this cluster (imported here or
//! replicated here) is pushed to an OCI registry (Harbor, or any distribution registry) as an
//! artifact whose `oras pull` yields the byte-identical Parquet file and its signed manifest.
//!
//! - [`queue`]: what is left to push, durable (a version survives restarts and outages).
//! - [`registry`]: the distribution protocol client with Harbor's auth.
//!
//! The mirror runs beside routing and replication and shares nothing with them but the store
//! it reads manifests from and S3 it reads files from: a registry that is down, slow or refuses
//! delays pushes (retried with backoff up to `mirror.max_retry_interval_secs`) and never
//! anything else. The Parquet file is read from S3 once, chunk by chunk with parallel ranged
//! GETs, and sent in `mirror.chunk_size_mib` PATCH chunks while the next chunk is read, hashed with sha256 for
//! the registry and BLAKE3 for the manifest: a file whose bytes differ from what the signed
//! manifest says is never pushed.
//!
//! Layout and naming: [`rhio_core::oci`].

pub mod queue;
pub mod registry;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rhio_core::identity::PublicKey;
use rhio_core::manifest::{DatasetManifest, SignedManifest};
use rhio_core::oci::{self, Blob, DatasetArtifact, ImageManifest};
use rhio_core::operation::LogId;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::MirrorConfig;
use crate::datasets::transfers::VersionId;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::s3::S3Store;
use crate::store::Store;
use queue::{KnownBlob, MirrorQueue, QueuedVersion};
use registry::{Credentials, Mount, Registry, RegistryError, Upload};

/// First pause after a failed pass; doubled up to `mirror.max_retry_interval_secs`.
const MIN_RETRY: Duration = Duration::from_secs(1);
/// Pushed versions listed in the status.
const RECENT_PUSHES: usize = 20;

#[derive(Debug, Error)]
pub enum PushError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("reading the file from S3: {0}")]
    Storage(#[from] crate::s3::ObjectError),
    /// The object in S3 is not (yet) what the signed manifest describes.
    #[error("{key} in S3: {reason}")]
    Source { key: String, reason: String },
    #[error("reading the manifest: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Retrying cannot help (the version is skipped until the node's config changes).
    #[error("{0}")]
    Invalid(String),
    #[error("mirror state: {0}")]
    State(#[from] sqlx::Error),
}

/// What status shows of the mirror and of each version (defined with the status document).
pub use rhio_core::api::status::{
    MirrorState, MirrorStatus, MirrorVersionState, MirrorVersionStatus,
};

/// One queued version as status shows it.
fn version_status(
    version: &QueuedVersion,
    repository: String,
    state: MirrorVersionState,
) -> MirrorVersionStatus {
    MirrorVersionStatus {
        dataset: version.id.dataset.clone(),
        version: version.id.version,
        author: version.id.author.to_hex(),
        repository,
        state,
        reason: version.reason.clone(),
        attempts: version.attempts,
    }
}

/// Handle of the mirror; cheap to clone.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    config: MirrorConfig,
    registry: Registry,
    queue: MirrorQueue,
    s3: S3Store,
    store: Store,
    own_key: PublicKey,
    /// `org.opencontainers.image.source` of pushed artifacts.
    source: String,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    status: Mutex<StatusState>,
}

struct StatusState {
    state: MirrorState,
    pending: Vec<MirrorVersionStatus>,
    /// Versions that can never be pushed (see [`MirrorQueue::invalid`]).
    invalid: Vec<MirrorVersionStatus>,
    recent: VecDeque<MirrorVersionStatus>,
    pushed: u64,
    last_error: Option<String>,
}

impl Default for StatusState {
    fn default() -> Self {
        Self {
            state: MirrorState::Idle,
            pending: Vec::new(),
            invalid: Vec::new(),
            recent: VecDeque::new(),
            pushed: 0,
            last_error: None,
        }
    }
}

impl Mirror {
    /// Builds the mirror from its config (reads the password file); does no network I/O.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        config: MirrorConfig,
        queue: MirrorQueue,
        s3: S3Store,
        store: Store,
        own_key: PublicKey,
        network_id: &str,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Result<Self, crate::config::ConfigError> {
        let credentials = match (&config.user, config.password()?) {
            (Some(user), Some(password)) => Some(Credentials {
                user: user.clone(),
                password,
            }),
            _ => None,
        };
        let registry = Registry::new(
            &config.registry,
            credentials,
            Duration::from_secs(config.request_timeout_secs),
        )
        .map_err(|err| crate::config::ConfigError::BadValue {
            key: "mirror.registry",
            reason: err.to_string(),
        })?;
        let pushed = queue.pushed_count().await.unwrap_or(0);
        Ok(Self {
            inner: Arc::new(Inner {
                source: format!("rhio://{network_id}/{own_key}"),
                config,
                registry,
                queue,
                s3,
                store,
                own_key,
                metrics,
                wake,
                status: Mutex::new(StatusState {
                    state: MirrorState::Idle,
                    pushed,
                    ..Default::default()
                }),
            }),
        })
    }

    pub fn status(&self) -> MirrorStatus {
        let inner = &self.inner;
        let state = inner.status.lock().expect("status lock");
        MirrorStatus {
            registry: inner.config.registry.clone(),
            project: inner.config.project.clone(),
            user: inner.registry.user(),
            state: state.state,
            pending: state.pending.len(),
            pushed: state.pushed,
            bytes_pushed: inner.metrics.mirror_bytes_pushed.get(),
            last_error: state.last_error.clone(),
            versions: state
                .pending
                .iter()
                .chain(state.invalid.iter())
                .chain(state.recent.iter())
                .cloned()
                .collect(),
        }
    }

    fn wanted(&self, version: &QueuedVersion) -> bool {
        let config = &self.inner.config;
        let own = version.id.author == self.inner.own_key;
        (if own { config.own } else { config.replicated }) && config.wants(&version.id.dataset)
    }

    fn repository(&self, id: &VersionId) -> Result<String, PushError> {
        let author = (id.author != self.inner.own_key).then_some(&id.author);
        oci::repository(&self.inner.config.project, &id.dataset, author)
            .map_err(|err| PushError::Invalid(err.to_string()))
    }

    /// `rhio_mirror_queue` from the versions still waiting in this pass.
    fn update_queue_gauge(&self) {
        let waiting = self.inner.status.lock().expect("status lock").pending.len();
        self.inner.metrics.mirror_queue.set(waiting as i64);
    }

    fn set_state(&self, f: impl FnOnce(&mut StatusState)) {
        f(&mut self.inner.status.lock().expect("status lock"));
    }

    /// Pushes queued versions until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let inner = &self.inner;
        let max_retry = Duration::from_secs(inner.config.max_retry_interval_secs);
        let mut attempts =
            crate::retry::Backoff::new(MIN_RETRY, max_retry.max(MIN_RETRY)).attempts();
        let mut project_ready = !inner.config.create_project;
        tracing::info!(
            registry = %inner.config.registry,
            project = %inner.config.project,
            user = %inner.registry.user(),
            "registry mirror on"
        );
        loop {
            let outcome = if project_ready {
                self.pass().await
            } else {
                match inner
                    .registry
                    .ensure_harbor_project(&inner.config.project)
                    .await
                {
                    Ok(()) => {
                        project_ready = true;
                        tracing::info!(project = %inner.config.project, "Harbor project ready");
                        self.pass().await
                    }
                    Err(err) => Err(PushError::from(err)),
                }
            };
            let pause = match outcome {
                Ok(()) => {
                    attempts.reset();
                    self.set_state(|s| {
                        s.state = MirrorState::Idle;
                        s.last_error = None;
                    });
                    None
                }
                Err(err) => {
                    let auth = matches!(&err, PushError::Registry(e) if e.is_auth());
                    // Wrong credentials will not fix themselves soon: retry slowly.
                    let backoff = attempts.next_delay(crate::retry::jitter());
                    let pause = if auth { max_retry } else { backoff };
                    let message = err.to_string();
                    let repeated = self.inner.status.lock().expect("status lock").last_error
                        == Some(message.clone());
                    if auth && !repeated {
                        tracing::error!(error = %message, retry_in = ?pause, "registry mirror: the registry refuses our credentials; pushes wait");
                    } else if !repeated {
                        tracing::warn!(error = %message, retry_in = ?pause, "registry mirror: push failed; retrying");
                    } else {
                        tracing::debug!(error = %message, retry_in = ?pause, "registry mirror: push failed again");
                    }
                    self.set_state(|s| {
                        s.state = if auth {
                            MirrorState::Unauthorized
                        } else {
                            MirrorState::Retrying
                        };
                        s.last_error = Some(message);
                    });
                    Some(pause)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = inner.wake.notified(), if pause.is_none() => {}
                _ = tokio::time::sleep(pause.unwrap_or(Duration::from_secs(60))) => {}
            }
        }
    }

    /// One pass over the queue: dataset logs in parallel (`mirror.concurrency`), the versions of
    /// one log in order (so `latest` only moves forward). The first error is returned.
    async fn pass(&self) -> Result<(), PushError> {
        let pending: Vec<QueuedVersion> = self
            .inner
            .queue
            .pending()
            .await?
            .into_iter()
            .filter(|version| self.wanted(version))
            .collect();
        self.inner.metrics.mirror_queue.set(pending.len() as i64);
        let invalid: Vec<MirrorVersionStatus> = self
            .inner
            .queue
            .invalid_versions()
            .await?
            .into_iter()
            .filter(|version| self.wanted(version))
            .map(|v| version_status(&v, String::new(), MirrorVersionState::Invalid))
            .collect();
        self.set_state(|s| {
            s.pending = pending
                .iter()
                .map(|v| {
                    let state = if v.attempts > 0 {
                        MirrorVersionState::Failed
                    } else {
                        MirrorVersionState::Pending
                    };
                    version_status(v, self.repository(&v.id).unwrap_or_default(), state)
                })
                .collect();
            s.invalid = invalid;
            if !pending.is_empty() {
                s.state = MirrorState::Pushing;
            }
        });
        let mut logs: BTreeMap<(PublicKey, String), Vec<QueuedVersion>> = BTreeMap::new();
        for version in pending {
            logs.entry((version.id.author, version.id.dataset.clone()))
                .or_default()
                .push(version);
        }
        let results: Vec<Result<(), PushError>> = futures::stream::iter(logs.into_values())
            .map(|versions| async move {
                for version in versions {
                    self.push_and_record(&version).await?;
                }
                Ok(())
            })
            .buffer_unordered(self.inner.config.concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn push_and_record(&self, version: &QueuedVersion) -> Result<(), PushError> {
        let id = &version.id;
        let repository = match self.repository(id) {
            Ok(repository) => repository,
            Err(err) => {
                // Never pushable: out of the queue (it would fail every pass), listed in the
                // status with its reason.
                let reason = err.to_string();
                if let Err(state) = self.inner.queue.invalid(id, &reason).await {
                    tracing::warn!(%state, "cannot record an invalid version");
                }
                self.set_state(|s| {
                    s.pending.retain(|v| !same(v, id));
                    s.invalid.push(MirrorVersionStatus {
                        reason: Some(reason.clone()),
                        attempts: 1,
                        ..version_status(version, String::new(), MirrorVersionState::Invalid)
                    });
                });
                self.update_queue_gauge();
                tracing::warn!(%id, %reason, "registry mirror: version cannot be pushed");
                return Ok(());
            }
        };
        self.set_state(|s| mark(&mut s.pending, id, MirrorVersionState::Pushing, None));
        match self.push(version, &repository).await {
            Ok(digest) => {
                self.inner.queue.pushed(id, &repository, &digest).await?;
                self.inner
                    .metrics
                    .mirror_pushes
                    .get_or_create(&OutcomeLabels { outcome: "pushed" })
                    .inc();
                let tag = oci::version_tag(id.version);
                tracing::info!(
                    dataset = %id.dataset,
                    version = id.version,
                    author = %id.author,
                    reference = %format!("{}/{repository}:{tag}", registry_host(&self.inner.config.registry)),
                    %digest,
                    "dataset version pushed to the registry"
                );
                self.set_state(|s| {
                    s.pending.retain(|v| !same(v, id));
                    s.pushed += 1;
                    s.recent.push_front(MirrorVersionStatus {
                        reason: None,
                        ..version_status(version, repository.clone(), MirrorVersionState::Pushed)
                    });
                    s.recent.truncate(RECENT_PUSHES);
                });
                self.update_queue_gauge();
                Ok(())
            }
            Err(err) => {
                self.inner
                    .metrics
                    .mirror_pushes
                    .get_or_create(&OutcomeLabels { outcome: "failed" })
                    .inc();
                let reason = err.to_string();
                if let Err(state) = self.inner.queue.failed(id, &repository, &reason).await {
                    tracing::warn!(%state, "cannot record a failed push");
                }
                self.set_state(|s| {
                    mark(&mut s.pending, id, MirrorVersionState::Failed, Some(reason))
                });
                Err(err)
            }
        }
    }

    /// Pushes one version; returns the digest of its image manifest.
    async fn push(&self, version: &QueuedVersion, repository: &str) -> Result<String, PushError> {
        let inner = &self.inner;
        let id = &version.id;
        let operation = inner
            .store
            .operation(&id.author, &LogId::Dataset(id.dataset.clone()), id.version)
            .await
            .map_err(PushError::Store)?
            .ok_or_else(|| {
                PushError::Invalid(format!("the manifest of {id} is not in the store"))
            })?;
        let signed = SignedManifest::from_operation(operation)
            .map_err(|err| PushError::Invalid(format!("the manifest of {id}: {err}")))?;
        let artifact = DatasetArtifact::new(
            &signed.manifest,
            &signed.operation.hash.to_hex(),
            &inner.source,
        );
        let config = self
            .small_blob(repository, Bytes::from(artifact.config_json()))
            .await?;
        let signed_blob = self
            .small_blob(repository, Bytes::from(signed.encode()))
            .await?;
        let parquet = self
            .parquet_layer(repository, version, &signed.manifest)
            .await?;
        let image = Bytes::from(
            artifact
                .image_manifest(config, parquet, signed_blob)
                .to_json(),
        );
        let digest = sha256_digest(&image);
        inner
            .registry
            .put_manifest(repository, &oci::version_tag(id.version), image.clone())
            .await?;
        let newest = inner.queue.latest_pushed(&id.author, &id.dataset).await?;
        if newest.is_none_or(|newest| newest <= id.version) {
            inner
                .registry
                .put_manifest(repository, "latest", image)
                .await?;
        }
        Ok(digest)
    }

    /// Uploads a small blob unless the repository has it.
    async fn small_blob(&self, repository: &str, data: Bytes) -> Result<Blob, PushError> {
        let registry = &self.inner.registry;
        let blob = Blob {
            digest: sha256_digest(&data),
            size: data.len() as u64,
        };
        if registry.has_blob(repository, &blob.digest).await? {
            self.count_blob("present");
        } else {
            registry.put_blob(repository, &blob.digest, data).await?;
            self.count_blob("uploaded");
            self.inner.metrics.mirror_bytes_pushed.inc_by(blob.size);
        }
        Ok(blob)
    }

    fn count_blob(&self, outcome: &'static str) {
        self.inner
            .metrics
            .mirror_blobs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Where else this file may already be in the registry: repositories the mirror pushed it
    /// to, and for another author's version, that author's own repository in this project
    /// (where the author's cluster mirrors it, if it uses the same registry).
    async fn candidates(
        &self,
        repository: &str,
        version: &QueuedVersion,
        manifest: &DatasetManifest,
    ) -> Result<Vec<KnownBlob>, PushError> {
        let inner = &self.inner;
        let mut known = inner.queue.known_blobs(&manifest.file_hash).await?;
        if version.id.author != inner.own_key
            && let Ok(origin) = oci::repository(&inner.config.project, &version.id.dataset, None)
            && origin != repository
            && !known.iter().any(|blob| blob.repository == origin)
        {
            match inner
                .registry
                .get_manifest(&origin, &oci::version_tag(version.id.version))
                .await
            {
                Ok(Some(bytes)) => {
                    if let Some(blob) = parquet_layer_of(&bytes, manifest) {
                        known.push(KnownBlob {
                            repository: origin,
                            ..blob
                        });
                    }
                }
                Ok(None) => {}
                Err(err) => tracing::debug!(%err, "no mount source in the author's repository"),
            }
        }
        // This repository first: a HEAD answers a re-push without any upload.
        known.sort_by_key(|blob| blob.repository != repository);
        Ok(known)
    }

    /// The Parquet layer: present, mounted from another repository, or streamed from S3.
    async fn parquet_layer(
        &self,
        repository: &str,
        version: &QueuedVersion,
        manifest: &DatasetManifest,
    ) -> Result<Blob, PushError> {
        let inner = &self.inner;
        let registry = &inner.registry;
        let mut session = None;
        for candidate in self.candidates(repository, version, manifest).await? {
            let blob = Blob {
                digest: candidate.digest.clone(),
                size: candidate.size,
            };
            let remember = KnownBlob {
                repository: repository.to_string(),
                ..candidate.clone()
            };
            if candidate.repository == repository {
                if registry.has_blob(repository, &candidate.digest).await? {
                    self.count_blob("present");
                    return Ok(blob);
                }
                continue;
            }
            match registry
                .mount(repository, &candidate.digest, &candidate.repository)
                .await?
            {
                Mount::Mounted => {
                    self.count_blob("mounted");
                    inner
                        .queue
                        .remember_blob(&manifest.file_hash, &remember)
                        .await?;
                    return Ok(blob);
                }
                Mount::Upload(location) => {
                    session = Some(registry.resume_upload(repository, location));
                    break;
                }
            }
        }
        let upload = match session {
            Some(upload) => upload,
            None => registry.start_upload(repository).await?,
        };
        let blob = self.stream_upload(upload, version, manifest).await?;
        self.count_blob("uploaded");
        inner
            .queue
            .remember_blob(
                &manifest.file_hash,
                &KnownBlob {
                    repository: repository.to_string(),
                    digest: blob.digest.clone(),
                    size: blob.size,
                },
            )
            .await?;
        Ok(blob)
    }

    /// Streams the file from S3 into the upload session in chunks, sending one while reading
    /// the next, and completes the upload only if the bytes are the ones the manifest signs.
    async fn stream_upload(
        &self,
        mut upload: Upload,
        version: &QueuedVersion,
        manifest: &DatasetManifest,
    ) -> Result<Blob, PushError> {
        let inner = &self.inner;
        let registry = &inner.registry;
        let prefix = format!("s3://{}/", inner.s3.bucket());
        let key = version.location.strip_prefix(&prefix).ok_or_else(|| {
            PushError::Invalid(format!(
                "{} is not in this node's bucket {}",
                version.location,
                inner.s3.bucket()
            ))
        })?;
        let chunk_size = (inner.config.chunk_size_mib * 1024 * 1024) as usize;
        let result = async {
            let size = inner
                .s3
                .object_size(key)
                .await
                .map_err(PushError::Storage)?
                .ok_or_else(|| PushError::Source {
                    key: key.to_string(),
                    reason: "not there".into(),
                })?;
            if size != manifest.file_size {
                return Err(PushError::Source {
                    key: key.to_string(),
                    reason: format!(
                        "{size} bytes, the signed manifest says {}",
                        manifest.file_size
                    ),
                });
            }
            let mut reader = ChunkReader {
                s3: &inner.s3,
                key,
                size,
                offset: 0,
                chunk_size: chunk_size as u64,
                sha: Sha256::new(),
                b3: blake3::Hasher::new(),
            };
            let mut in_flight: Option<Bytes> = None;
            // Time spent reading from S3 and uploading (they overlap): which one limits a push.
            let (mut reading, mut sending) = (Duration::ZERO, Duration::ZERO);
            let started = std::time::Instant::now();
            loop {
                let read = async {
                    let start = std::time::Instant::now();
                    let chunk = reader.next_chunk().await;
                    (chunk, start.elapsed())
                };
                let send = async {
                    let start = std::time::Instant::now();
                    if let Some(chunk) = in_flight.take() {
                        let len = chunk.len() as u64;
                        registry.upload_chunk(&mut upload, chunk).await?;
                        inner.metrics.mirror_bytes_pushed.inc_by(len);
                    }
                    Ok::<_, PushError>(start.elapsed())
                };
                let ((read, read_time), sent) = tokio::join!(read, send);
                sending += sent?;
                reading += read_time;
                match read? {
                    Some(chunk) => in_flight = Some(chunk),
                    None => break,
                }
            }
            tracing::debug!(
                key,
                bytes = size,
                secs = started.elapsed().as_secs_f64(),
                read_secs = reading.as_secs_f64(),
                upload_secs = sending.as_secs_f64(),
                "Parquet layer streamed"
            );
            let blake3 = reader.b3.finalize().to_hex().to_string();
            if blake3 != manifest.file_hash {
                return Err(PushError::Source {
                    key: key.to_string(),
                    reason: format!(
                        "not the file the manifest signs (BLAKE3 {blake3}, expected {})",
                        manifest.file_hash
                    ),
                });
            }
            Ok(format!("sha256:{:x}", reader.sha.finalize()))
        }
        .await;
        match result {
            Ok(digest) => {
                registry.finish_upload(upload, &digest).await?;
                Ok(Blob {
                    digest,
                    size: manifest.file_size,
                })
            }
            Err(err) => {
                registry.cancel_upload(upload).await;
                Err(err)
            }
        }
    }
}

/// Reads an S3 object in chunks of `chunk_size` bytes (the last one shorter), each with
/// parallel ranged GETs of [`READ_PIECE`] (one GET stream is slower than the store behind it),
/// hashing every byte once for the registry (sha256) and the manifest (BLAKE3).
struct ChunkReader<'a> {
    s3: &'a S3Store,
    key: &'a str,
    size: u64,
    offset: u64,
    chunk_size: u64,
    sha: Sha256,
    b3: blake3::Hasher,
}

/// Size of one ranged GET of a chunk.
const READ_PIECE: u64 = 4 << 20;

impl ChunkReader<'_> {
    /// The next chunk; `None` at the end of the object.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, PushError> {
        if self.offset >= self.size {
            return Ok(None);
        }
        let len = (self.size - self.offset).min(self.chunk_size);
        let pieces = self
            .s3
            .get_range_pieces(self.key, self.offset, len, READ_PIECE)
            .await
            .map_err(PushError::Storage)?;
        let mut chunk = BytesMut::with_capacity(len as usize);
        for piece in pieces {
            self.sha.update(&piece);
            self.b3.update(&piece);
            chunk.extend_from_slice(&piece);
        }
        if chunk.len() as u64 != len {
            return Err(PushError::Source {
                key: self.key.to_string(),
                reason: format!(
                    "S3 sent {} bytes for {len} at offset {}",
                    chunk.len(),
                    self.offset
                ),
            });
        }
        self.offset += len;
        Ok(Some(chunk.freeze()))
    }
}

/// The Parquet layer of an image manifest pushed by rhio, if it is `manifest`'s file.
fn parquet_layer_of(bytes: &[u8], manifest: &DatasetManifest) -> Option<KnownBlob> {
    let image: ImageManifest = serde_json::from_slice(bytes).ok()?;
    let annotations = &image.annotations;
    let matches = annotations.get(oci::annotation::AUTHOR) == Some(&manifest.author.to_hex())
        && annotations.get(oci::annotation::FILE_BLAKE3) == Some(&manifest.file_hash);
    let layer = image
        .layers
        .iter()
        .find(|layer| layer.media_type == oci::PARQUET_MEDIA_TYPE)?;
    (matches && layer.size == manifest.file_size).then(|| KnownBlob {
        repository: String::new(),
        digest: layer.digest.clone(),
        size: layer.size,
    })
}

fn same(status: &MirrorVersionStatus, id: &VersionId) -> bool {
    status.dataset == id.dataset
        && status.version == id.version
        && status.author == id.author.to_hex()
}

fn mark(
    versions: &mut [MirrorVersionStatus],
    id: &VersionId,
    state: MirrorVersionState,
    reason: Option<String>,
) {
    if let Some(status) = versions.iter_mut().find(|v| same(v, id)) {
        status.state = state;
        if reason.is_some() {
            status.attempts += 1;
            status.reason = reason;
        }
    }
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// `host:port` of a registry URL (how image references name it).
pub fn registry_host(registry: &str) -> &str {
    registry
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
}
