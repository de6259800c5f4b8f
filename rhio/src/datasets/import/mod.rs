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
use rhio_core::api::{ErrorCode, ImportOutcome, Reply};
use rhio_core::identity::PublicKey;
use rhio_core::manifest::validate_dataset_name;
use rhio_core::parquet::PartitionError;
use thiserror::Error;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{DatasetsConfig, ImportConfig};
use crate::s3::{ObjectError, S3ErrorKind, S3Store};
use crate::store::Store;

pub use crate::blobs::BAO_BLOCK_SIZE;
pub use pipeline::sweep_abandoned_uploads;
pub use rhio_core::api::{IMPORT_SUBJECT, ImportReply, PROGRESS_PREFIX};

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
    #[error(transparent)]
    Storage(#[from] ObjectError),
    #[error("{0} imports are running already; try again later")]
    Busy(usize),
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ImportError {
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ImportError::BadRequest(_) => ErrorCode::BadRequest,
            ImportError::NotFound(_) => ErrorCode::NotFound,
            ImportError::NotAFile(_) => ErrorCode::NotAFile,
            ImportError::ForbiddenPath(_) => ErrorCode::ForbiddenPath,
            ImportError::Parquet(err) => err.error_code(),
            ImportError::TooLarge { .. } => ErrorCode::TooLarge,
            ImportError::Storage(err) => match err.kind {
                S3ErrorKind::NotFound => ErrorCode::NotFound,
                S3ErrorKind::Denied => ErrorCode::StorageDenied,
                S3ErrorKind::InvalidRequest => ErrorCode::StorageRejected,
                S3ErrorKind::Unavailable | S3ErrorKind::Timeout => ErrorCode::StorageUnavailable,
            },
            ImportError::Busy(_) => ErrorCode::Busy,
            ImportError::Read { .. } => ErrorCode::ReadFailed,
            ImportError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The stable code of the reply (`not_found`, `storage_denied`, ...).
    pub fn code(&self) -> &'static str {
        self.error_code().as_str()
    }

    /// The reply refusing the request with this error.
    pub fn reply<T>(&self) -> Reply<T> {
        Reply::error(self.error_code(), self.to_string())
    }
}

/// Why the durable queue cannot be read (it is set up again after a backoff).
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("import queue stream {stream:?}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("import queue consumer: {0}")]
    Consumer(String),
}

/// Backoff between attempts of a queued request that failed transiently.
const QUEUE_RETRY: crate::retry::Backoff = crate::retry::Backoff::new(
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(120),
);
/// Backoff between attempts to set up the queue's stream and consumer.
const QUEUE_SETUP_RETRY: crate::retry::Backoff = crate::retry::Backoff::new(
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(30),
);

/// A parsed `rhio.import` request.
pub type ImportRequest = rhio_core::api::ImportRequest;

/// Parsing and naming of requests (the wire type lives in `rhio_core::api`).
pub trait ParseRequest: Sized {
    /// A bare path, or `{"path": ..., "dataset": ..., "subject": ...}`.
    fn parse(body: &[u8]) -> Result<Self, ImportError>;
    /// The dataset name: given, or the file stem.
    fn dataset_name(&self) -> Result<String, ImportError>;
}

impl ParseRequest for ImportRequest {
    fn parse(body: &[u8]) -> Result<Self, ImportError> {
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

    fn dataset_name(&self) -> Result<String, ImportError> {
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

    /// Answers `rhio.import` requests until shutdown; each import runs in its own task (more
    /// than `import.max_concurrent` are answered `busy` at once), and running imports are
    /// finished before this returns.
    pub async fn serve(self: Arc<Self>, shutdown: CancellationToken) {
        // Requests beyond the running imports only wait to be answered `busy`.
        let concurrency = self.import.max_concurrent + 64;
        let nats = self.nats.clone();
        crate::nats::serve_requests(nats, IMPORT_SUBJECT, concurrency, shutdown, |payload| {
            let importer = self.clone();
            async move {
                let answer = match importer.import_request(&payload).await {
                    Ok(reply) => Reply::Ok(reply),
                    Err(err) => {
                        tracing::warn!(code = err.code(), %err, "import failed");
                        err.reply()
                    }
                };
                serde_json::to_vec(&answer).expect("reply serializes")
            }
        })
        .await
    }

    /// The durable variant: works off the JetStream work queue until shutdown. A request ends
    /// (acked, removed from the queue) when its import finished or failed permanently (a missing
    /// file, S3 refusing access, ...); one that failed transiently (S3 unavailable, `busy`) is
    /// redelivered after a jittered backoff, up to `import.max_attempts` times. Every attempt's
    /// outcome is published on `import.results_subject`; the last one of a request that used up
    /// its attempts says `"dead_letter": true`.
    pub async fn serve_queue(self: Arc<Self>, create_stream: bool, shutdown: CancellationToken) {
        if self.import.queue_subject.is_empty() {
            return;
        }
        let mut attempts = QUEUE_SETUP_RETRY.attempts();
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.clone().work_queue(create_stream, &shutdown) => result,
            };
            match result {
                Ok(()) => attempts.reset(),
                Err(err) => {
                    tracing::warn!(%err, stream = %self.import.queue_stream, "durable import queue paused; retrying")
                }
            }
            if !crate::retry::after_failure(&mut attempts, &shutdown).await {
                return;
            }
        }
    }

    async fn work_queue(
        self: Arc<Self>,
        create_stream: bool,
        shutdown: &CancellationToken,
    ) -> Result<(), QueueError> {
        use async_nats::jetstream::{self, consumer::pull};
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
                .map_err(|err| QueueError::Stream {
                    stream: self.import.queue_stream.clone(),
                    reason: format!("cannot create it: {err}"),
                })?,
            Err(err) => {
                return Err(QueueError::Stream {
                    stream: self.import.queue_stream.clone(),
                    reason: format!(
                        "not available ({err}); create it (work-queue retention, subject {:?}) or set nats.create_streams = true",
                        self.import.queue_subject
                    ),
                });
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
                    // A backstop: the node ends a request itself after max_attempts; should an
                    // ack get lost, JetStream stops redelivering a little later.
                    max_deliver: self.import.max_attempts as i64 + 2,
                    ..Default::default()
                },
            )
            .await
            .map_err(|err| QueueError::Consumer(err.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|err| QueueError::Consumer(err.to_string()))?;
        tracing::info!(subject = %self.import.queue_subject, "durable import queue ready");
        let mut running = tokio::task::JoinSet::new();
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                message = messages.next() => message,
            };
            let Some(message) = message else { break };
            let message = message.map_err(|err| QueueError::Consumer(err.to_string()))?;
            while running.try_join_next().is_some() {}
            running.spawn(self.clone().queued_import(message));
        }
        while running.join_next().await.is_some() {}
        Ok(())
    }

    /// One delivery of a queued request: import, publish the outcome, then end the request or
    /// have it redelivered.
    async fn queued_import(self: Arc<Self>, message: async_nats::jetstream::Message) {
        use async_nats::jetstream::AckKind;
        let attempt = message
            .info()
            .map(|info| info.delivered)
            .unwrap_or(1)
            .max(1) as u64;
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
        let result = self.import_request(&message.payload).await;
        progress.abort();
        let transient = result
            .as_ref()
            .err()
            .is_some_and(|err| err.error_code().is_transient());
        let used_up = attempt >= self.import.max_attempts as u64;
        let will_retry = transient && !used_up;
        if let Err(err) = &result {
            tracing::warn!(code = err.code(), %err, attempt, will_retry, "queued import failed");
        }
        let outcome = ImportOutcome {
            reply: match result {
                Ok(reply) => Reply::Ok(reply),
                Err(err) => err.reply(),
            },
            request: String::from_utf8_lossy(&message.payload).to_string(),
            attempt,
            will_retry,
            dead_letter: transient && used_up,
        };
        if outcome.dead_letter {
            tracing::error!(
                attempt,
                request = %outcome.request,
                "a queued import failed transiently on every attempt; it leaves the queue (dead letter on the results subject)"
            );
        }
        let body = serde_json::to_vec(&outcome).expect("outcome serializes");
        if let Err(err) = self
            .nats
            .publish(self.import.results_subject.clone(), body.into())
            .await
        {
            tracing::warn!(%err, "cannot publish the outcome of a queued import");
        }
        let ack = if will_retry {
            let delay = crate::retry::delay(QUEUE_RETRY, attempt.saturating_sub(1) as u32);
            AckKind::Nak(Some(delay))
        } else {
            // Ended: done, permanently refused, or out of attempts. An ack removes it from the
            // work queue (a term would leave it stored in the stream for good).
            AckKind::Ack
        };
        if let Err(err) = message.ack_with(ack).await {
            tracing::warn!(%err, "cannot acknowledge a queued import");
        }
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
            // Locks no import holds are dropped, so the map holds only running datasets.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
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
