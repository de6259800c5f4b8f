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

/// Last known state of the bucket, as reported in status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct S3Status {
    pub endpoint: String,
    pub bucket: String,
    pub reachable: bool,
    /// Unix time (seconds) of the last check.
    pub last_check_unix: Option<u64>,
    pub error: Option<String>,
}

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
    ) -> Result<bytes::Bytes, String> {
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
            let object = get.send().await.map_err(|err| describe(&err))?;
            object
                .body
                .collect()
                .await
                .map(|data| data.into_bytes())
                .map_err(|err| err.to_string())
        };
        tokio::time::timeout(limit, read)
            .await
            .map_err(|_| format!("{key}: no complete answer from S3 within {limit:?}"))?
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
    ) -> Result<bytes::Bytes, String> {
        let data = self.get_range(key, Some((offset, length))).await?;
        if data.len() as u64 != length {
            return Err(format!(
                "{key}: S3 sent {} bytes for {length} at offset {offset}",
                data.len()
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
    ) -> Result<Vec<bytes::Bytes>, String> {
        let reads = piece_ranges(offset, length, piece);
        futures::future::try_join_all(reads.into_iter().map(|r| self.get_range(key, Some(r)))).await
    }

    /// Writes a whole object (sidecars: manifests, outboards).
    pub async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), String> {
        self.client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|err| describe(&err))
    }

    /// Starts a multipart upload of a Parquet object; returns its upload id. The object
    /// appears only when [`S3Store::complete_upload`] succeeds. Import and replication both
    /// write through these four calls.
    pub async fn create_upload(&self, key: &str) -> Result<String, String> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .content_type("application/vnd.apache.parquet")
            .send()
            .await
            .map_err(|err| describe(&err))?;
        created
            .upload_id()
            .map(str::to_string)
            .ok_or_else(|| "S3 answered without an upload id".to_string())
    }

    /// Uploads part `number` (from 1); returns its ETag.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Vec<u8>,
    ) -> Result<String, String> {
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
            .map_err(|err| describe(&err))?;
        Ok(uploaded.e_tag().unwrap_or_default().to_string())
    }

    /// Completes an upload from its parts, (number, ETag) in order.
    pub async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<(), String> {
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
            .map_err(|err| describe(&err))
    }

    /// Aborts an upload (its parts are dropped by S3).
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), String> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|err| describe(&err))
    }

    /// True when `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, String> {
        Ok(self.object_size(key).await?.is_some())
    }

    /// The size of object `key`, `None` when it does not exist.
    pub async fn object_size(&self, key: &str) -> Result<Option<u64>, String> {
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
            Err(err) => Err(describe(&err)),
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
                        Err(err) => match self.classify(&err) {
                            // Another node may have created it a moment ago.
                            S3Error::Unavailable { ref message, .. }
                                if message.contains("BucketAlreadyOwnedByYou") =>
                            {
                                Ok(())
                            }
                            other => Err(other),
                        },
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
        let status = match err {
            SdkError::ServiceError(service) => Some(service.raw().status().as_u16()),
            _ => None,
        };
        let code = err.code().map(str::to_string);
        match (status, code.as_deref()) {
            (Some(404), _) | (_, Some("NoSuchBucket")) | (_, Some("NotFound")) => {
                S3Error::MissingBucket { bucket, endpoint }
            }
            (Some(401 | 403), _) => S3Error::AccessDenied {
                bucket,
                endpoint,
                message: code.unwrap_or_else(|| "access denied".into()),
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
