//! `rhio.import`: a Parquet file becomes a signed dataset version in this cluster's S3.
//!
//! - this module: the request/reply service and the durable work queue, requests, replies and
//!   the stable error codes;
//! - [`source`]: where the bytes come from (the import roots' path policy, S3 sources) and
//!   reading them in order;
//! - [`pipeline`]: one read that hashes, uploads and outboards the file, the signed manifest,
//!   and the steps after signing (sidecar, index, announcement outbox).
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

mod pipeline;
mod source;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use rhio_core::identity::PublicKey;
use rhio_core::manifest::validate_dataset_name;
use rhio_core::parquet::PartitionError;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{DatasetsConfig, ImportConfig};
use crate::s3::S3Store;
use crate::store::Store;

pub use crate::blobs::BAO_BLOCK_SIZE;
pub use pipeline::sweep_abandoned_uploads;

/// Subject of the import request/reply service.
pub const IMPORT_SUBJECT: &str = "rhio.import";
/// Prefix of progress events: `rhio.progress.<dataset>`.
pub const PROGRESS_PREFIX: &str = "rhio.progress";

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
#[cfg(test)]
mod tests {

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
