//! The cluster's S3 store, in one place: client construction with timeouts, every object key rhio
//! writes ([`keys`]), the calls import and replication make (ranged reads, sidecar writes, one
//! multipart upload API), the start-up bucket check and a background probe that keeps `/health`
//! honest.
//!
//! A bucket that does not exist (and may not be created) is a configuration error and stops the
//! node at start. An S3 server that is merely unreachable is not: the node starts degraded, keeps
//! probing, and creates the bucket once the server answers when `s3.create_bucket` is set.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::S3Config;
use crate::metrics::{Metrics, OutcomeLabels};

/// Every object key rhio writes, in one place (shared with clients through `rhio-core`).
pub use rhio_core::layout as keys;

/// Longest a single bucket check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum S3Error {
    #[error(
        "no S3 credentials: set s3.access_key and s3.secret_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )]
    NoCredentials,
    #[error(
        "bucket {bucket:?} does not exist at {endpoint}; create it or set s3.create_bucket = true"
    )]
    MissingBucket { bucket: String, endpoint: String },
    #[error("S3 at {endpoint} refused access to bucket {bucket:?}: {message}")]
    AccessDenied {
        bucket: String,
        endpoint: String,
        message: String,
    },
    #[error("S3 at {endpoint} is unavailable: {message}")]
    Unavailable { endpoint: String, message: String },
}

/// What kind of failure an S3 call met. It decides what the caller does next: a permanent kind
/// fails the same way when tried again (answer the request with its code and stop), a transient
/// one may pass later (retry with backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum S3ErrorKind {
    /// 404, `NoSuchKey`, `NoSuchBucket`: the object or bucket is not there.
    NotFound,
    /// 401 or 403: the credentials may not do this (bucket policy, ACL, signature).
    Denied,
    /// Another 4xx: the request itself is wrong (bad range, bad key, entity too large).
    InvalidRequest,
    /// No connection, 5xx, 429/503 `SlowDown`, a broken answer.
    Unavailable,
    /// No (complete) answer within the configured timeouts.
    Timeout,
}

impl S3ErrorKind {
    /// True when trying the same call again cannot succeed without someone changing something.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            S3ErrorKind::NotFound | S3ErrorKind::Denied | S3ErrorKind::InvalidRequest
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            S3ErrorKind::NotFound => "not_found",
            S3ErrorKind::Denied => "denied",
            S3ErrorKind::InvalidRequest => "invalid_request",
            S3ErrorKind::Unavailable => "unavailable",
            S3ErrorKind::Timeout => "timeout",
        }
    }

    /// The kind of a failed SDK call, from the HTTP status and the S3 error code.
    fn of<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Self {
        match err {
            SdkError::TimeoutError(_) => S3ErrorKind::Timeout,
            SdkError::DispatchFailure(failure) if failure.is_timeout() => S3ErrorKind::Timeout,
            SdkError::DispatchFailure(failure) if failure.is_user() => S3ErrorKind::InvalidRequest,
            SdkError::ConstructionFailure(_) => S3ErrorKind::InvalidRequest,
            SdkError::ServiceError(service) => {
                Self::of_answer(service.raw().status().as_u16(), err.code())
            }
            _ => S3ErrorKind::Unavailable,
        }
    }

    /// The kind of an error answer: HTTP status and S3 error code (`NoSuchKey`, ...).
    pub fn of_answer(status: u16, code: Option<&str>) -> Self {
        match (status, code) {
            // The upload was aborted (by the sweep after a crash, say): the whole import or
            // transfer can be started again, so for its caller this passes.
            (_, Some("NoSuchUpload")) => S3ErrorKind::Unavailable,
            (_, Some("NoSuchKey" | "NoSuchBucket" | "NotFound")) | (404, _) => {
                S3ErrorKind::NotFound
            }
            (_, Some("AccessDenied" | "SignatureDoesNotMatch" | "InvalidAccessKeyId"))
            | (401 | 403, _) => S3ErrorKind::Denied,
            (_, Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")) => {
                S3ErrorKind::Unavailable
            }
            (408 | 429, _) => S3ErrorKind::Unavailable,
            (400..=499, _) => S3ErrorKind::InvalidRequest,
            _ => S3ErrorKind::Unavailable,
        }
    }
}

/// A failed call on an object: which call, which key, what kind of failure and what S3 said.
#[derive(Debug, Clone, Error)]
#[error("S3 {call} of {key:?} failed ({}): {message}", kind.as_str())]
pub struct ObjectError {
    pub call: &'static str,
    pub key: String,
    pub kind: S3ErrorKind,
    pub message: String,
}

impl ObjectError {
    fn new(call: &'static str, key: &str, kind: S3ErrorKind, message: impl Into<String>) -> Self {
        Self {
            call,
            key: key.to_string(),
            kind,
            message: message.into(),
        }
    }

    fn sdk<E: ProvideErrorMetadata + std::error::Error + 'static>(
        call: &'static str,
        key: &str,
        err: &SdkError<E, HttpResponse>,
    ) -> Self {
        let kind = S3ErrorKind::of(err);
        let message = match (err.code(), err.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_string(),
            _ => describe(err),
        };
        Self::new(call, key, kind, message)
    }

    pub fn is_permanent(&self) -> bool {
        self.kind.is_permanent()
    }
}

/// Last known state of the bucket, as reported in status.
pub use rhio_core::api::status::S3Status;

/// The S3 client of the node, bound to its bucket.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    config: S3Config,
    state: Arc<Mutex<S3Status>>,
}

/// Credentials from the config, else from the standard AWS environment variables.
fn credentials(
    config: &S3Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, S3Error> {
    let (key, secret, token) = match (&config.access_key, &config.secret_key) {
        (Some(key), Some(secret)) => (key.clone(), secret.clone(), None),
        _ => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(key), Some(secret)) => (key, secret, env("AWS_SESSION_TOKEN")),
            _ => return Err(S3Error::NoCredentials),
        },
    };
    Ok(Credentials::new(key, secret, token, None, "rhio"))
}

impl S3Store {
    /// Builds the client. Does no I/O; call [`S3Store::check_bucket`] next.
    pub fn new(config: &S3Config) -> Result<Self, S3Error> {
        let credentials = credentials(config, &|name| std::env::var(name).ok())?;
        // One TLS stack in the binary: ring, as iroh and NATS use.
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let sdk_config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&config.endpoint)
            .region(Region::new(config.region.clone()))
            .force_path_style(config.path_style)
            .credentials_provider(credentials)
            .http_client(http_client)
            // Data integrity is rhio's own (BLAKE3 per file, bao per 16 KiB group); the SDK's
            // default CRC on every request and response body is a second pass over each byte.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // A server that accepts connections and never answers must not hold permits, locks
            // and transfers forever.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
                    .read_timeout(Duration::from_secs(config.read_timeout_secs))
                    .operation_timeout(Duration::from_secs(config.operation_timeout_secs))
                    .build(),
            )
            .build();
        let state = S3Status {
            endpoint: config.endpoint.clone(),
            bucket: config.bucket.clone(),
            reachable: false,
            last_check_unix: None,
            error: Some("not checked yet".into()),
        };
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(sdk_config),
            config: config.clone(),
            state: Arc::new(Mutex::new(state)),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }

    /// Reads an object, or `(offset, length)` of it, in one GET.
    pub async fn get_range(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<bytes::Bytes, ObjectError> {
        let mut get = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key);
        if let Some((offset, length)) = range {
            if length == 0 {
                return Ok(bytes::Bytes::new());
            }
            get = get.range(format!("bytes={}-{}", offset, offset + length - 1));
        }
        // The SDK's operation timeout ends when the answer's headers arrive; the body can
        // still stall, so the whole read is bounded by the same limit.
        let limit = self.operation_timeout();
        let read = async {
            let object = get
                .send()
                .await
                .map_err(|err| ObjectError::sdk("GET", key, &err))?;
            object
                .body
                .collect()
                .await
                .map(|data| data.into_bytes())
                .map_err(|err| {
                    ObjectError::new("GET", key, S3ErrorKind::Unavailable, describe(&err))
                })
        };
        tokio::time::timeout(limit, read).await.map_err(|_| {
            ObjectError::new(
                "GET",
                key,
                S3ErrorKind::Timeout,
                format!("no complete answer within {limit:?}"),
            )
        })?
    }

    /// Longest one S3 call may take (`s3.operation_timeout_secs`).
    pub fn operation_timeout(&self) -> Duration {
        Duration::from_secs(self.config.operation_timeout_secs)
    }

    /// Reads exactly `length` bytes at `offset` of an object in one GET: an answer of another
    /// length is an error naming the key.
    pub async fn get_exact(
        &self,
        key: &str,
        offset: u64,
        length: u64,
    ) -> Result<bytes::Bytes, ObjectError> {
        let data = self.get_range(key, Some((offset, length))).await?;
        if data.len() as u64 != length {
            // The object is shorter than it should be (replaced, truncated): asking again
            // gets the same answer.
            return Err(ObjectError::new(
                "GET",
                key,
                S3ErrorKind::InvalidRequest,
                format!(
                    "S3 sent {} bytes for {length} at offset {offset}",
                    data.len()
                ),
            ));
        }
        Ok(data)
    }

    /// Reads `(offset, length)` of an object with several ranged GETs of at most `piece` bytes
    /// in parallel (one GET stream is slower than the disk behind many S3 servers); returns the
    /// pieces in order.
    pub async fn get_range_pieces(
        &self,
        key: &str,
        offset: u64,
        length: u64,
        piece: u64,
    ) -> Result<Vec<bytes::Bytes>, ObjectError> {
        let reads = piece_ranges(offset, length, piece);
        futures::future::try_join_all(reads.into_iter().map(|r| self.get_range(key, Some(r)))).await
    }

    /// Writes a whole object (sidecars: manifests, outboards).
    pub async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), ObjectError> {
        self.client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|err| ObjectError::sdk("PUT", key, &err))
    }

    /// Starts a multipart upload of a Parquet object; returns its upload id. The object
    /// appears only when [`S3Store::complete_upload`] succeeds. Import and replication both
    /// write through these four calls.
    pub async fn create_upload(&self, key: &str) -> Result<String, ObjectError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .content_type("application/vnd.apache.parquet")
            .send()
            .await
            .map_err(|err| ObjectError::sdk("CreateMultipartUpload", key, &err))?;
        created
            .upload_id()
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .ok_or_else(|| {
                ObjectError::new(
                    "CreateMultipartUpload",
                    key,
                    S3ErrorKind::Unavailable,
                    "S3 answered without an upload id",
                )
            })
    }

    /// Uploads part `number` (from 1); returns its ETag.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Vec<u8>,
    ) -> Result<String, ObjectError> {
        let uploaded = self
            .client
            .upload_part()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|err| ObjectError::sdk("UploadPart", key, &err))?;
        // Completing the upload needs every part's ETag: a part without one cannot be used.
        match uploaded.e_tag() {
            Some(etag) if !etag.is_empty() => Ok(etag.to_string()),
            _ => Err(ObjectError::new(
                "UploadPart",
                key,
                S3ErrorKind::Unavailable,
                format!("S3 answered part {number} without an ETag"),
            )),
        }
    }

    /// Completes an upload from its parts, (number, ETag) in order.
    pub async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<(), ObjectError> {
        let parts = parts
            .iter()
            .map(|(number, etag)| {
                CompletedPart::builder()
                    .part_number(*number as i32)
                    .e_tag(etag)
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|err| ObjectError::sdk("CompleteMultipartUpload", key, &err))
    }

    /// Aborts an upload (its parts are dropped by S3).
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), ObjectError> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|err| ObjectError::sdk("AbortMultipartUpload", key, &err))
    }

    /// True when `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, ObjectError> {
        Ok(self.object_size(key).await?.is_some())
    }

    /// The size of object `key`, `None` when it does not exist.
    pub async fn object_size(&self, key: &str) -> Result<Option<u64>, ObjectError> {
        match self
            .client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(head.content_length().unwrap_or(0).max(0) as u64)),
            Err(SdkError::ServiceError(err)) if err.err().is_not_found() => Ok(None),
            Err(err) => Err(ObjectError::sdk("HEAD", key, &err)),
        }
    }

    pub fn status(&self) -> S3Status {
        self.state.lock().expect("s3 status lock").clone()
    }

    /// Checks that the bucket exists (creating it when configured to) and records the outcome.
    pub async fn check_bucket(&self) -> Result<(), S3Error> {
        let result = match tokio::time::timeout(CHECK_TIMEOUT, self.head_or_create()).await {
            Ok(result) => result,
            Err(_) => Err(S3Error::Unavailable {
                endpoint: self.config.endpoint.clone(),
                message: format!("no answer within {CHECK_TIMEOUT:?}"),
            }),
        };
        let mut state = self.state.lock().expect("s3 status lock");
        state.reachable = result.is_ok();
        state.error = result.as_ref().err().map(ToString::to_string);
        state.last_check_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        result
    }

    async fn head_or_create(&self) -> Result<(), S3Error> {
        let bucket = &self.config.bucket;
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(err) => match self.classify(&err) {
                S3Error::MissingBucket { .. } if self.config.create_bucket => {
                    match self.client.create_bucket().bucket(bucket).send().await {
                        Ok(_) => {
                            tracing::info!(bucket, "created S3 bucket");
                            Ok(())
                        }
                        // Another node may have created it a moment ago.
                        Err(SdkError::ServiceError(err))
                            if err.err().is_bucket_already_owned_by_you() =>
                        {
                            Ok(())
                        }
                        Err(err) => Err(self.classify(&err)),
                    }
                }
                other => Err(other),
            },
        }
    }

    fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        err: &SdkError<E, HttpResponse>,
    ) -> S3Error {
        let endpoint = self.config.endpoint.clone();
        let bucket = self.config.bucket.clone();
        match S3ErrorKind::of(err) {
            S3ErrorKind::NotFound => S3Error::MissingBucket { bucket, endpoint },
            S3ErrorKind::Denied => S3Error::AccessDenied {
                bucket,
                endpoint,
                message: err.code().unwrap_or("access denied").to_string(),
            },
            _ => S3Error::Unavailable {
                endpoint,
                message: describe(err),
            },
        }
    }
}

/// `(offset, length)` of the GETs that read `length` bytes at `offset` in pieces of at most
/// `piece` bytes, in order.
pub fn piece_ranges(offset: u64, length: u64, piece: u64) -> Vec<(u64, u64)> {
    let piece = piece.max(1);
    (0..length.div_ceil(piece))
        .map(|i| {
            let start = i * piece;
            (offset + start, piece.min(length - start))
        })
        .collect()
}

/// The innermost cause of an SDK error, which is where "connection refused" lives.
pub(crate) fn describe(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        message = inner.to_string();
        source = inner.source();
    }
    message
}

/// Re-checks the bucket every `interval` until `shutdown`, logging state changes.
pub async fn watch_bucket(
    store: S3Store,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut was_reachable = store.status().reachable;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let result = store.check_bucket().await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics
            .s3_checks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        match (&result, was_reachable) {
            (Ok(()), false) => tracing::info!(bucket = store.bucket(), "S3 bucket is reachable"),
            (Err(err), true) => tracing::warn!(%err, "S3 bucket check failed"),
            _ => {}
        }
        was_reachable = result.is_ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_sorted_into_permanent_and_transient_kinds() {
        use S3ErrorKind::*;
        let cases = [
            (404, None, NotFound),
            (404, Some("NoSuchKey"), NotFound),
            (400, Some("NoSuchBucket"), NotFound),
            (403, Some("AccessDenied"), Denied),
            (403, None, Denied),
            (400, Some("InvalidAccessKeyId"), Denied),
            (401, None, Denied),
            (400, Some("InvalidArgument"), InvalidRequest),
            (416, Some("InvalidRange"), InvalidRequest),
            (413, None, InvalidRequest),
            (404, Some("NoSuchUpload"), Unavailable),
            (400, Some("RequestTimeout"), Unavailable),
            (503, Some("SlowDown"), Unavailable),
            (429, None, Unavailable),
            (500, None, Unavailable),
            (502, None, Unavailable),
        ];
        for (status, code, kind) in cases {
            assert_eq!(
                S3ErrorKind::of_answer(status, code),
                kind,
                "{status} {code:?}"
            );
        }
        assert!(NotFound.is_permanent() && Denied.is_permanent() && InvalidRequest.is_permanent());
        assert!(!Unavailable.is_permanent() && !Timeout.is_permanent());
    }

    #[test]
    fn credentials_prefer_config_then_environment() {
        let mut config = S3Config::default();
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("env-key".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("env-secret".to_string()),
            _ => None,
        };
        assert_eq!(
            credentials(&config, &env).unwrap().access_key_id(),
            "env-key"
        );
        config.access_key = Some("cfg-key".into());
        config.secret_key = Some("cfg-secret".into());
        assert_eq!(
            credentials(&config, &env).unwrap().access_key_id(),
            "cfg-key"
        );
        assert!(matches!(
            credentials(&S3Config::default(), &|_| None),
            Err(S3Error::NoCredentials)
        ));
    }
}
