//! `rhio.import`: a Parquet file becomes a signed dataset version in this cluster's S3.
//!
//! The request names a local file under an import root or `s3://<bucket>/<key>` in the cluster's
//! bucket. The node reads the footer first (to partition the file into row-group blobs and
//! reject what is not Parquet), then reads the file once, in order: each chunk feeds the hash of
//! its blob, the hash of the whole file and an S3 multipart upload part. The object appears at
//! `datasets/<name>/v<version>.parquet` only when the upload completes; the signed manifest is
//! stored in the node's dataset log (version = log position), written as a sidecar under
//! `.rhio/manifests/`, announced on the dataset subject, and replied to the requester. Each blob's
//! bao outboard (computed on a blocking thread from the same read) is stored under
//! `.rhio/outboards/<blob hash>.obao4`; its root is the blob's BLAKE3 hash in the manifest.
//! Importing the same bytes again for the same dataset answers with the existing version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use rhio_core::identity::PublicKey;
use rhio_core::manifest::{DatasetManifest, validate_dataset_name};
use rhio_core::operation::LogId;
use rhio_core::parquet::{Partition, PartitionError, TAIL_LEN, footer_length, partition};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{DatasetsConfig, ImportConfig};
use crate::s3::{S3Store, keys};
use crate::store::Store;

/// Subject of the import request/reply service.
pub const IMPORT_SUBJECT: &str = "rhio.import";
/// Prefix of progress events: `rhio.progress.<dataset>`.
pub const PROGRESS_PREFIX: &str = "rhio.progress";
/// Chunk read from the source at a time.
const READ_CHUNK: usize = 1 << 20;

/// Why an import failed, with the stable code of the reply.
#[derive(Debug, Error)]
pub enum ImportError {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} is not a regular file")]
    NotAFile(String),
    #[error("{0}")]
    ForbiddenPath(String),
    #[error(transparent)]
    Parquet(#[from] PartitionError),
    #[error("{path} has {bytes} bytes, more than import.max_file_bytes = {max}")]
    TooLarge { path: String, bytes: u64, max: u64 },
    #[error("S3 is unavailable: {0}")]
    StorageUnavailable(String),
    #[error("{0} imports are running already; try again later")]
    Busy(usize),
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ImportError {
    pub fn code(&self) -> &'static str {
        match self {
            ImportError::BadRequest(_) => "bad_request",
            ImportError::NotFound(_) => "not_found",
            ImportError::NotAFile(_) => "not_a_file",
            ImportError::ForbiddenPath(_) => "forbidden_path",
            ImportError::Parquet(err) => err.code(),
            ImportError::TooLarge { .. } => "too_large",
            ImportError::StorageUnavailable(_) => "storage_unavailable",
            ImportError::Busy(_) => "busy",
            ImportError::Read { .. } => "read_failed",
            ImportError::Internal(_) => "internal",
        }
    }
}

/// A parsed `rhio.import` request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    pub path: String,
    pub dataset: Option<String>,
    pub subject: Option<String>,
}

impl ImportRequest {
    /// A bare path, or `{"path": ..., "dataset": ..., "subject": ...}`.
    pub fn parse(body: &[u8]) -> Result<Self, ImportError> {
        let text = std::str::from_utf8(body)
            .map_err(|_| ImportError::BadRequest("the request is not UTF-8".into()))?
            .trim();
        if text.starts_with('{') {
            return serde_json::from_str(text)
                .map_err(|err| ImportError::BadRequest(err.to_string()));
        }
        if text.is_empty() {
            return Err(ImportError::BadRequest(
                "the request is empty; send a path or {\"path\": ...}".into(),
            ));
        }
        Ok(Self {
            path: text.to_string(),
            dataset: None,
            subject: None,
        })
    }

    /// The dataset name: given, or the file stem.
    pub fn dataset_name(&self) -> Result<String, ImportError> {
        let name = match &self.dataset {
            Some(name) => name.clone(),
            None => Path::new(self.path.rsplit('/').next().unwrap_or(&self.path))
                .file_stem()
                .map(|stem| stem.to_string_lossy().to_string())
                .unwrap_or_default(),
        };
        validate_dataset_name(&name).map_err(|err| ImportError::BadRequest(err.to_string()))?;
        Ok(name)
    }
}

/// The successful reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportReply {
    pub ok: bool,
    pub dataset: String,
    pub version: u64,
    pub subject: String,
    pub author: PublicKey,
    pub file_hash: String,
    pub operation: String,
    pub row_groups: usize,
    pub rows: u64,
    pub bytes: u64,
    pub location: String,
    /// True when these bytes were imported before and the existing version is returned.
    pub existing: bool,
}

/// Where the bytes come from.
enum Source {
    File {
        path: PathBuf,
        file: tokio::fs::File,
        len: u64,
    },
    S3 {
        key: String,
        len: u64,
    },
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::File { len, .. } | Source::S3 { len, .. } => *len,
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::File { path, .. } => path.display().to_string(),
            Source::S3 { key, .. } => format!("s3 key {key}"),
        }
    }

    async fn read_range(
        &mut self,
        s3: &S3Store,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, ImportError> {
        let describe = self.describe();
        match self {
            Source::File { file, .. } => {
                let mut buf = vec![0u8; len as usize];
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|err| ImportError::Read {
                        path: describe.clone(),
                        reason: err.to_string(),
                    })?;
                file.read_exact(&mut buf)
                    .await
                    .map_err(|err| ImportError::Read {
                        path: describe,
                        reason: err.to_string(),
                    })?;
                Ok(buf)
            }
            Source::S3 { key, .. } => s3
                .get_range(key, Some((offset, len)))
                .await
                .map(|bytes| bytes.to_vec())
                .map_err(ImportError::StorageUnavailable),
        }
    }
}

/// Runs imports; one per dataset at a time, at most `max_concurrent` overall.
pub struct Importer {
    pub s3: S3Store,
    pub store: Store,
    pub author: PublicKey,
    pub js: async_nats::jetstream::Context,
    pub nats: async_nats::Client,
    pub import: ImportConfig,
    pub datasets: DatasetsConfig,
    pub index: crate::blobs::BlobIndex,
    pub outbox: super::outbox::Outbox,
    running: Semaphore,
    per_dataset: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl Importer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        s3: S3Store,
        store: Store,
        author: PublicKey,
        nats: async_nats::Client,
        import: ImportConfig,
        datasets: DatasetsConfig,
        index: crate::blobs::BlobIndex,
        outbox: super::outbox::Outbox,
    ) -> Self {
        Self {
            index,
            outbox,
            js: async_nats::jetstream::new(nats.clone()),
            running: Semaphore::new(import.max_concurrent),
            s3,
            store,
            author,
            nats,
            import,
            datasets,
            per_dataset: Mutex::new(HashMap::new()),
        }
    }

    /// Answers `rhio.import` requests until shutdown; each import runs in its own task, and
    /// running imports are finished before this returns.
    pub async fn serve(self: Arc<Self>, shutdown: CancellationToken) {
        let mut running = tokio::task::JoinSet::new();
        let mut requests = match self.nats.subscribe(IMPORT_SUBJECT).await {
            Ok(subscriber) => subscriber,
            Err(err) => {
                tracing::error!(%err, "cannot subscribe to rhio.import; imports are off");
                return;
            }
        };
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => break,
                request = requests.next() => request,
            };
            let Some(request) = request else { break };
            let Some(reply) = request.reply.clone() else {
                continue;
            };
            let importer = self.clone();
            // Reap finished imports as we go.
            while running.try_join_next().is_some() {}
            running.spawn(async move {
                let answer = match importer.import_request(&request.payload).await {
                    Ok(reply) => serde_json::to_vec(&reply).expect("reply serializes"),
                    Err(err) => {
                        tracing::warn!(code = err.code(), %err, "import failed");
                        serde_json::to_vec(&serde_json::json!({
                            "ok": false,
                            "error": {"code": err.code(), "message": err.to_string()},
                        }))
                        .expect("error serializes")
                    }
                };
                if let Err(err) = importer.nats.publish(reply, answer.into()).await {
                    tracing::warn!(%err, "cannot answer an import request");
                }
            });
        }
        let _ = requests.unsubscribe().await;
        if !running.is_empty() {
            tracing::info!(
                imports = running.len(),
                "finishing running imports before stopping"
            );
        }
        while running.join_next().await.is_some() {}
    }

    /// The durable variant: works off the JetStream work queue until shutdown. A message is
    /// acked when its import finished (successfully or with a permanent error), and asked to be
    /// redelivered later when S3 was unavailable or too many imports ran.
    pub async fn serve_queue(self: Arc<Self>, create_stream: bool, shutdown: CancellationToken) {
        if self.import.queue_subject.is_empty() {
            return;
        }
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.clone().work_queue(create_stream, &shutdown) => result,
            };
            if let Err(err) = result {
                tracing::warn!(%err, stream = %self.import.queue_stream, "durable import queue paused; retrying");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
        }
    }

    async fn work_queue(
        self: Arc<Self>,
        create_stream: bool,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        use async_nats::jetstream::{self, AckKind, consumer::pull};
        let stream = match self.js.get_stream(&self.import.queue_stream).await {
            Ok(stream) => stream,
            Err(_) if create_stream => self
                .js
                .create_stream(jetstream::stream::Config {
                    name: self.import.queue_stream.clone(),
                    subjects: vec![self.import.queue_subject.clone()],
                    retention: jetstream::stream::RetentionPolicy::WorkQueue,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|err| format!("cannot create the import queue stream: {err}"))?,
            Err(err) => {
                return Err(format!(
                    "import queue stream {:?} is not available ({err}); create it (work-queue retention, subject {:?}) or set nats.create_streams = true",
                    self.import.queue_stream, self.import.queue_subject
                ));
            }
        };
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                "rhio-import",
                pull::Config {
                    durable_name: Some("rhio-import".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: std::time::Duration::from_secs(60),
                    max_ack_pending: self.import.max_concurrent as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(|err| format!("cannot open the import queue consumer: {err}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|err| format!("cannot read the import queue: {err}"))?;
        tracing::info!(subject = %self.import.queue_subject, "durable import queue ready");
        let mut running = tokio::task::JoinSet::new();
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                message = messages.next() => message,
            };
            let Some(message) = message else { break };
            let message = message.map_err(|err| format!("reading the import queue: {err}"))?;
            while running.try_join_next().is_some() {}
            let importer = self.clone();
            running.spawn(async move {
                // Keep the message ours while the import runs.
                let progress = {
                    let message = message.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(std::time::Duration::from_secs(20)).await;
                            if message.ack_with(AckKind::Progress).await.is_err() {
                                return;
                            }
                        }
                    })
                };
                let result = importer.import_request(&message.payload).await;
                progress.abort();
                let retry = matches!(
                    result,
                    Err(ImportError::StorageUnavailable(_) | ImportError::Busy(_))
                );
                let mut outcome = match &result {
                    Ok(reply) => serde_json::to_value(reply).expect("reply serializes"),
                    Err(err) => serde_json::json!({
                        "ok": false,
                        "error": {"code": err.code(), "message": err.to_string()},
                    }),
                };
                outcome["request"] = serde_json::Value::String(
                    String::from_utf8_lossy(&message.payload).to_string(),
                );
                outcome["will_retry"] = serde_json::Value::Bool(retry);
                let _ = importer
                    .nats
                    .publish(
                        importer.import.results_subject.clone(),
                        outcome.to_string().into(),
                    )
                    .await;
                let ack = if retry {
                    AckKind::Nak(Some(std::time::Duration::from_secs(5)))
                } else {
                    AckKind::Ack
                };
                if let Err(err) = message.ack_with(ack).await {
                    tracing::warn!(%err, "cannot acknowledge a queued import");
                }
            });
        }
        while running.join_next().await.is_some() {}
        Ok(())
    }

    pub async fn import_request(&self, body: &[u8]) -> Result<ImportReply, ImportError> {
        let request = ImportRequest::parse(body)?;
        let dataset = request.dataset_name()?;
        let subject = match &request.subject {
            Some(subject) => {
                rhio_core::subject::validate_subject(subject)
                    .map_err(|err| ImportError::BadRequest(err.to_string()))?;
                subject.clone()
            }
            None => format!("{}.{dataset}", self.datasets.subject_prefix),
        };
        let _permit = self
            .running
            .try_acquire()
            .map_err(|_| ImportError::Busy(self.import.max_concurrent))?;
        let lock = {
            let mut locks = self.per_dataset.lock().await;
            locks.entry(dataset.clone()).or_default().clone()
        };
        let _dataset_guard = lock.lock().await;
        let source = self.open(&request.path).await?;
        if source.len() > self.import.max_file_bytes {
            return Err(ImportError::TooLarge {
                path: request.path,
                bytes: source.len(),
                max: self.import.max_file_bytes,
            });
        }
        self.import(source, &dataset, &subject).await
    }

    /// Resolves and opens the source, enforcing the import roots and the cluster's bucket.
    async fn open(&self, path: &str) -> Result<Source, ImportError> {
        if let Some(rest) = path.strip_prefix("s3://") {
            let (bucket, key) = rest
                .split_once('/')
                .filter(|(_, key)| !key.is_empty())
                .ok_or_else(|| {
                    ImportError::BadRequest(format!("{path} is not s3://<bucket>/<key>"))
                })?;
            if bucket != self.s3.bucket() {
                return Err(ImportError::ForbiddenPath(format!(
                    "{path} is not in this cluster's bucket {:?}",
                    self.s3.bucket()
                )));
            }
            if key.starts_with(keys::SIDECAR_PREFIX) {
                return Err(ImportError::ForbiddenPath(format!(
                    "{path} is one of rhio's own objects"
                )));
            }
            let len = self
                .s3
                .object_size(key)
                .await
                .map_err(ImportError::StorageUnavailable)?
                .ok_or_else(|| ImportError::NotFound(path.to_string()))?;
            return Ok(Source::S3 {
                key: key.to_string(),
                len,
            });
        }
        let requested = Path::new(path);
        if !requested.is_absolute() {
            return Err(ImportError::BadRequest(format!(
                "{path} is not an absolute path"
            )));
        }
        let resolved = match tokio::fs::canonicalize(requested).await {
            Ok(resolved) => resolved,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImportError::NotFound(path.to_string()));
            }
            Err(err) => {
                return Err(ImportError::Read {
                    path: path.to_string(),
                    reason: err.to_string(),
                });
            }
        };
        let roots = self.canonical_roots().await;
        if !roots.iter().any(|root| resolved.starts_with(root)) {
            return Err(ImportError::ForbiddenPath(format!(
                "{path} is outside the import roots {:?}",
                self.import.roots
            )));
        }
        let read_error = |err: std::io::Error| ImportError::Read {
            path: path.to_string(),
            reason: err.to_string(),
        };
        // Checked before opening too: opening a FIFO would block.
        let meta = tokio::fs::metadata(&resolved).await.map_err(read_error)?;
        if !meta.is_file() {
            return Err(ImportError::NotAFile(path.to_string()));
        }
        let file = match tokio::fs::File::open(&resolved).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImportError::NotFound(path.to_string()));
            }
            Err(err) => return Err(read_error(err)),
        };
        // The path was checked before it was opened; a symlink swapped in between could point
        // anywhere. What counts is the file that is open: check where it really is.
        let opened = opened_path(&file).map_err(read_error)?;
        if !roots.iter().any(|root| opened.starts_with(root)) {
            return Err(ImportError::ForbiddenPath(format!(
                "{path} led to {} outside the import roots {:?} when it was opened",
                opened.display(),
                self.import.roots
            )));
        }
        let meta = file.metadata().await.map_err(read_error)?;
        if !meta.is_file() {
            return Err(ImportError::NotAFile(path.to_string()));
        }
        Ok(Source::File {
            path: resolved,
            file,
            len: meta.len(),
        })
    }

    /// The import roots with symlinks resolved (roots that do not exist are left out).
    async fn canonical_roots(&self) -> Vec<PathBuf> {
        let mut roots = Vec::with_capacity(self.import.roots.len());
        for root in &self.import.roots {
            if let Ok(root) = tokio::fs::canonicalize(root).await {
                roots.push(root);
            }
        }
        roots
    }

    async fn import(
        &self,
        mut source: Source,
        dataset: &str,
        subject: &str,
    ) -> Result<ImportReply, ImportError> {
        let file_len = source.len();
        if file_len == 0 {
            return Err(PartitionError::Empty.into());
        }
        if file_len < rhio_core::parquet::MIN_FILE_LEN {
            return Err(PartitionError::NotParquet(format!(
                "{file_len} bytes is shorter than any Parquet file"
            ))
            .into());
        }
        let tail: [u8; TAIL_LEN] = source
            .read_range(&self.s3, file_len - TAIL_LEN as u64, TAIL_LEN as u64)
            .await?
            .try_into()
            .map_err(|_| ImportError::Internal("short read".into()))?;
        let footer_len = footer_length(file_len, &tail)?;
        let footer = source
            .read_range(&self.s3, file_len - footer_len, footer_len)
            .await?;
        let head = source.read_range(&self.s3, 0, 4).await?;
        let partition = partition(file_len, &head, &footer)?;

        let versions = self.versions(dataset).await?;
        let next_version = versions.len() as u64;
        let key = keys::own_version(dataset, next_version);
        let (blob_hashes, file_hash, mut upload) =
            self.upload(&mut source, &partition, &key, dataset).await?;
        if let Some((version, op_hash, manifest)) = versions
            .iter()
            .find(|(_, _, m)| m.file_hash == file_hash.to_hex().as_str())
        {
            // Same bytes as an earlier version: nothing becomes visible, the old one is answered.
            upload.abort().await;
            let reply = self.reply(manifest, *version, op_hash, subject, true);
            // An earlier import may have failed after signing: finish every step.
            self.finish_signed(&reply, manifest).await?;
            return Ok(reply);
        }
        upload.complete().await?;
        let manifest = DatasetManifest::new(
            dataset,
            next_version,
            self.author,
            now_micros(),
            &partition,
            &blob_hashes,
            file_hash,
        )
        .map_err(|err| ImportError::Internal(err.to_string()))?;
        let ops = self
            .store
            .append_local(
                vec![(LogId::Dataset(dataset.to_string()), manifest.encode())],
                None,
            )
            .await
            .map_err(|err| ImportError::Internal(err.to_string()))?;
        let op = &ops[0];
        if op.seq() != next_version {
            return Err(ImportError::Internal(format!(
                "dataset log moved to {} while importing version {next_version}",
                op.seq()
            )));
        }
        let reply = self.reply(&manifest, next_version, &op.hash.to_hex(), subject, false);
        self.finish_signed(&reply, &manifest).await?;
        tracing::info!(
            dataset,
            version = next_version,
            bytes = file_len,
            rows = manifest.rows,
            "imported dataset"
        );
        Ok(reply)
    }

    async fn put_manifest_sidecar(&self, manifest: &DatasetManifest) -> Result<(), ImportError> {
        self.s3
            .put(
                &keys::manifest(&manifest.dataset, None, manifest.version),
                manifest.encode(),
            )
            .await
            .map_err(ImportError::StorageUnavailable)
    }

    /// The steps after signing a version: its manifest sidecar, its blobs in the index, its
    /// announcement queued in the outbox. Each is idempotent, so an import retried after a
    /// failure in any of them (the sidecar PUT, say) finishes the version, and the outbox
    /// announces it exactly once.
    async fn finish_signed(
        &self,
        reply: &ImportReply,
        manifest: &DatasetManifest,
    ) -> Result<(), ImportError> {
        let sidecar = keys::manifest(&manifest.dataset, None, manifest.version);
        let present = self
            .s3
            .exists(&sidecar)
            .await
            .map_err(ImportError::StorageUnavailable)?;
        if !present {
            self.put_manifest_sidecar(manifest).await?;
        }
        self.index.insert_manifest(
            manifest,
            &keys::own_version(&manifest.dataset, reply.version),
        );
        let announcement = super::transfers::Announcement {
            id: super::transfers::VersionId {
                author: self.author,
                dataset: manifest.dataset.clone(),
                version: reply.version,
            },
            subject: reply.subject.clone(),
            location: reply.location.clone(),
        };
        self.outbox
            .queue(&announcement)
            .await
            .map_err(|err| ImportError::Internal(format!("announcement outbox: {err}")))
    }

    /// Earlier versions of `dataset` by this node: (version, operation hash, manifest).
    async fn versions(
        &self,
        dataset: &str,
    ) -> Result<Vec<(u64, String, DatasetManifest)>, ImportError> {
        let log = LogId::Dataset(dataset.to_string());
        let ops = self
            .store
            .operations(&self.author, &log, 0, u64::MAX >> 1)
            .await
            .map_err(|err| ImportError::Internal(err.to_string()))?;
        ops.into_iter()
            .map(|op| {
                DatasetManifest::decode(&op.body)
                    .map(|m| (op.seq(), op.hash.to_hex(), m))
                    .map_err(|err| ImportError::Internal(err.to_string()))
            })
            .collect()
    }

    fn reply(
        &self,
        manifest: &DatasetManifest,
        version: u64,
        operation: &str,
        subject: &str,
        existing: bool,
    ) -> ImportReply {
        ImportReply {
            ok: true,
            dataset: manifest.dataset.clone(),
            version,
            subject: subject.to_string(),
            author: self.author,
            file_hash: manifest.file_hash.clone(),
            operation: operation.to_string(),
            row_groups: manifest.blobs.len() - 1,
            rows: manifest.rows,
            bytes: manifest.file_size,
            location: format!(
                "s3://{}/{}",
                self.s3.bucket(),
                keys::own_version(&manifest.dataset, version)
            ),
            existing,
        }
    }

    /// Reads the source once, hashing blobs and the file and uploading parts as it goes. The
    /// upload is returned before completion: the caller makes the object visible or aborts it.
    async fn upload<'s>(
        &'s self,
        source: &mut Source,
        partition: &Partition,
        key: &str,
        dataset: &str,
    ) -> Result<(Vec<blake3::Hash>, blake3::Hash, MultipartUpload<'s>), ImportError> {
        let file_len = partition.file_len;
        // Large files get larger parts: S3 allows at most 10,000 per upload.
        let part_size =
            rhio_core::replication::part_size_for(file_len, self.import.part_size_mib << 20)
                as usize;
        let boundaries: Vec<u64> = partition.ranges().map(|r| r.end()).collect();
        let lengths: Vec<u64> = partition.ranges().map(|r| r.length).collect();
        let mut file_hasher = blake3::Hasher::new();
        let mut blob_hashes = Vec::with_capacity(boundaries.len());
        let mut next_boundary = 0;
        let mut outboard = Some(OutboardBuilder::start(lengths[0]));
        let mut upload = MultipartUpload::start(
            &self.s3,
            self.outbox.state(),
            key,
            self.import.upload_concurrency,
        )
        .await?;
        let mut part = Vec::with_capacity(part_size.min(file_len as usize));
        let mut offset = 0u64;
        let mut reader = ChunkReader::new(source, &self.s3);
        let mut last_progress = 0u64;
        let result: Result<(), ImportError> = async {
            while offset < file_len {
                let want = READ_CHUNK.min((file_len - offset) as usize);
                let chunk = reader.next(offset, want).await?;
                if chunk.is_empty() {
                    return Err(ImportError::Read {
                        path: reader.describe(),
                        reason: format!("ended at {offset} of {file_len} bytes (file changed?)"),
                    });
                }
                file_hasher.update(&chunk);
                let chunk = Bytes::from(chunk);
                // Split the chunk at blob boundaries: each blob's bytes feed its outboard.
                let mut position = offset;
                while position < offset + chunk.len() as u64 {
                    let boundary = boundaries[next_boundary];
                    let end = boundary.min(offset + chunk.len() as u64);
                    let piece = chunk.slice((position - offset) as usize..(end - offset) as usize);
                    outboard
                        .as_ref()
                        .expect("a blob is open while bytes remain")
                        .feed(piece)
                        .await?;
                    position = end;
                    if position == boundary {
                        let (hash, tree) =
                            outboard.take().expect("a blob is open").finish().await?;
                        self.store_outboard(&hash, tree).await?;
                        blob_hashes.push(hash);
                        next_boundary += 1;
                        if let Some(&length) = lengths.get(next_boundary) {
                            outboard = Some(OutboardBuilder::start(length));
                        }
                    }
                }
                offset += chunk.len() as u64;
                part.extend_from_slice(&chunk);
                if part.len() >= part_size {
                    upload
                        .part(std::mem::replace(&mut part, Vec::with_capacity(part_size)))
                        .await?;
                }
                if offset - last_progress >= 64 << 20 || offset == file_len {
                    last_progress = offset;
                    self.progress(dataset, offset, file_len).await;
                }
            }
            if !part.is_empty() || upload.is_empty() {
                upload.part(std::mem::take(&mut part)).await?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            upload.abort().await;
            return Err(err);
        }
        Ok((blob_hashes, file_hasher.finalize(), upload))
    }

    /// Stores a blob's bao outboard beside the data; replication serves verified ranges from it.
    async fn store_outboard(
        &self,
        hash: &blake3::Hash,
        outboard: Vec<u8>,
    ) -> Result<(), ImportError> {
        self.s3
            .put(&keys::outboard(hash), outboard)
            .await
            .map_err(ImportError::StorageUnavailable)
    }

    async fn progress(&self, dataset: &str, done: u64, total: u64) {
        let event =
            serde_json::json!({"dataset": dataset, "bytes_done": done, "bytes_total": total});
        let _ = self
            .nats
            .publish(
                format!("{PROGRESS_PREFIX}.{dataset}"),
                event.to_string().into(),
            )
            .await;
    }
}

pub use crate::blobs::BAO_BLOCK_SIZE;
use crate::blobs::{OutboardBuilder, OutboardError};

impl From<OutboardError> for ImportError {
    fn from(err: OutboardError) -> Self {
        ImportError::Internal(err.to_string())
    }
}

/// Where an open file really is (Linux: the kernel's name for the descriptor).
fn opened_path(file: &tokio::fs::File) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Sequential reads of the source: a file is read in order, an S3 object in large ranged GETs.
struct ChunkReader<'a> {
    source: &'a mut Source,
    s3: &'a S3Store,
    buffered: Bytes,
    buffered_at: u64,
    started: bool,
}

/// Bytes fetched per ranged GET when the source is in S3.
const S3_READ: u64 = 16 << 20;

impl<'a> ChunkReader<'a> {
    fn new(source: &'a mut Source, s3: &'a S3Store) -> Self {
        Self {
            source,
            s3,
            buffered: Bytes::new(),
            buffered_at: 0,
            started: false,
        }
    }

    fn describe(&self) -> String {
        self.source.describe()
    }

    async fn next(&mut self, offset: u64, want: usize) -> Result<Vec<u8>, ImportError> {
        let describe = self.source.describe();
        match &mut *self.source {
            Source::File { file, .. } => {
                if !self.started {
                    file.seek(std::io::SeekFrom::Start(0))
                        .await
                        .map_err(|err| ImportError::Read {
                            path: describe.clone(),
                            reason: err.to_string(),
                        })?;
                    self.started = true;
                }
                let mut buf = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    let n =
                        file.read(&mut buf[filled..])
                            .await
                            .map_err(|err| ImportError::Read {
                                path: describe.clone(),
                                reason: err.to_string(),
                            })?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok(buf)
            }
            Source::S3 { len, .. } => {
                let len = *len;
                let end_buffered = self.buffered_at + self.buffered.len() as u64;
                if offset < self.buffered_at || offset >= end_buffered {
                    let fetch = S3_READ.min(len - offset);
                    let data = self.source.read_range(self.s3, offset, fetch).await?;
                    self.buffered = Bytes::from(data);
                    self.buffered_at = offset;
                }
                let start = (offset - self.buffered_at) as usize;
                let end = (start + want).min(self.buffered.len());
                Ok(self.buffered.slice(start..end).to_vec())
            }
        }
    }
}

/// An S3 multipart upload with a bounded number of parts in flight.
struct MultipartUpload<'a> {
    s3: &'a S3Store,
    /// Where the upload is recorded until it is completed or aborted, so one abandoned by a
    /// crash is aborted at the next start.
    state: &'a super::transfers::TransferState,
    key: String,
    upload_id: String,
    /// Parts being uploaded: (number, ETag) when done.
    in_flight: futures::stream::FuturesOrdered<
        tokio::task::JoinHandle<Result<(u32, String), ImportError>>,
    >,
    done: Vec<(u32, String)>,
    concurrency: usize,
    next_part: u32,
}

impl<'a> MultipartUpload<'a> {
    async fn start(
        s3: &'a S3Store,
        state: &'a super::transfers::TransferState,
        key: &str,
        concurrency: usize,
    ) -> Result<Self, ImportError> {
        let upload_id = s3
            .create_upload(key)
            .await
            .map_err(ImportError::StorageUnavailable)?;
        if let Err(err) = state.start_import_upload(key, &upload_id).await {
            tracing::warn!(%err, key, "cannot record an import upload; a crash would leave it behind");
        }
        Ok(Self {
            s3,
            state,
            key: key.to_string(),
            upload_id,
            in_flight: futures::stream::FuturesOrdered::new(),
            done: Vec::new(),
            concurrency,
            next_part: 1,
        })
    }

    fn is_empty(&self) -> bool {
        self.next_part == 1
    }

    async fn part(&mut self, data: Vec<u8>) -> Result<(), ImportError> {
        while self.in_flight.len() >= self.concurrency {
            self.collect_one().await?;
        }
        let s3 = self.s3.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone();
        let number = self.next_part;
        self.next_part += 1;
        self.in_flight.push_back(tokio::spawn(async move {
            let etag = s3
                .upload_part(&key, &upload_id, number, data)
                .await
                .map_err(ImportError::StorageUnavailable)?;
            Ok((number, etag))
        }));
        Ok(())
    }

    async fn collect_one(&mut self) -> Result<(), ImportError> {
        if let Some(joined) = self.in_flight.next().await {
            let part = joined.map_err(|err| ImportError::Internal(err.to_string()))??;
            self.done.push(part);
        }
        Ok(())
    }

    async fn complete(mut self) -> Result<(), ImportError> {
        while !self.in_flight.is_empty() {
            if let Err(err) = self.collect_one().await {
                self.abort().await;
                return Err(err);
            }
        }
        self.s3
            .complete_upload(&self.key, &self.upload_id, &self.done)
            .await
            .map_err(ImportError::StorageUnavailable)?;
        self.forget().await;
        Ok(())
    }

    async fn forget(&self) {
        if let Err(err) = self
            .state
            .end_import_upload(&self.key, &self.upload_id)
            .await
        {
            tracing::debug!(%err, key = %self.key, "cannot forget an import upload");
        }
    }

    async fn abort(&mut self) {
        while self.in_flight.next().await.is_some() {}
        // Forgotten only once S3 confirmed: otherwise the next start aborts it.
        if self
            .s3
            .abort_upload(&self.key, &self.upload_id)
            .await
            .is_ok()
        {
            self.forget().await;
        }
    }
}

/// Aborts the uploads of imports a crash abandoned: `uploads` is what
/// [`TransferState::import_uploads`](super::transfers::TransferState::import_uploads) listed
/// before this start served any import (recorded when started, forgotten when completed or
/// aborted). Only rhio's own uploads are touched: nothing is listed from S3.
pub async fn sweep_abandoned_uploads(
    s3: S3Store,
    state: super::transfers::TransferState,
    uploads: Vec<(String, String)>,
) {
    for (key, upload_id) in uploads {
        match s3.abort_upload(&key, &upload_id).await {
            Ok(()) => {
                tracing::info!(key, "aborted the upload of an import a crash left behind");
                let _ = state.end_import_upload(&key, &upload_id).await;
            }
            // S3 down: tried again at the next start.
            Err(err) => tracing::warn!(key, %err, "cannot abort an abandoned import upload yet"),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_opened_file_is_judged_by_where_it_really_is() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.parquet");
        std::fs::write(&secret, b"PAR1").unwrap();
        let link = root.path().join("swapped.parquet");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let opened = runtime.block_on(async {
            let file = tokio::fs::File::open(&link).await.unwrap();
            opened_path(&file).unwrap()
        });
        assert_eq!(opened, std::fs::canonicalize(&secret).unwrap());
        assert!(!opened.starts_with(std::fs::canonicalize(root.path()).unwrap()));
    }

    use super::*;

    #[test]
    fn requests_parse_as_path_or_json() {
        let bare = ImportRequest::parse(b" /data/weather.parquet\n").unwrap();
        assert_eq!(bare.path, "/data/weather.parquet");
        assert_eq!(bare.dataset_name().unwrap(), "weather");
        let json =
            ImportRequest::parse(br#"{"path": "s3://rhio/in/x.parquet", "dataset": "climate"}"#)
                .unwrap();
        assert_eq!(json.dataset_name().unwrap(), "climate");
        assert_eq!(ImportRequest::parse(b"").unwrap_err().code(), "bad_request");
        assert_eq!(
            ImportRequest::parse(br#"{"file": "x"}"#)
                .unwrap_err()
                .code(),
            "bad_request"
        );
        let bad_name = ImportRequest::parse(b"/data/we ather.parquet").unwrap();
        assert_eq!(bad_name.dataset_name().unwrap_err().code(), "bad_request");
    }
}
