//! Datasets as a client sees them: the versions announced in the cluster (read from the
//! dataset stream of its JetStream), and fetching one from the cluster's S3 with verification.
//!
//! A fetch trusts nothing it reads: the version's signed operation header comes from the
//! announcement (`X-Rhio-Operation`, its Ed25519 signature checked), the manifest from S3 must be
//! the body that header signs, and the file's BLAKE3 must be the manifest's `file_hash` before
//! the file is renamed into place. A failed check leaves no file behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use rhio_core::manifest::{DatasetManifest, SignedManifest};
use rhio_core::operation::SignedOperation;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::{Client, ClientError};

/// JetStream stream the node announces dataset versions into (`datasets.stream`).
pub const DEFAULT_DATASET_STREAM: &str = "DATASETS";

/// The cluster's S3, for fetching files (the node's `[s3]` settings).
#[derive(Clone, Serialize, Deserialize, Default)]
pub struct S3Options {
    pub endpoint: String,
    pub bucket: String,
    pub region: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// One dataset version available in the cluster, as announced by its node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatasetVersion {
    pub dataset: String,
    pub version: u64,
    /// Author's public key, hex.
    pub author: String,
    /// BLAKE3 of the file, hex.
    pub file_hash: String,
    pub rows: u64,
    pub row_groups: u64,
    pub bytes: u64,
    /// Where the file is in this cluster's S3 (`s3://bucket/key`).
    pub location: String,
    pub created_at_micros: u64,
    /// Hash of the signed manifest operation, hex.
    pub operation: String,
    pub subject: String,
    /// Why the announcement's provenance does not verify; `None` when it does.
    pub problem: Option<String>,
    /// The signed operation header (from `X-Rhio-Operation`); empty when it did not verify.
    #[serde(skip)]
    pub operation_header: Vec<u8>,
}

/// A fetched, verified version.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    pub version: DatasetVersion,
    pub manifest: DatasetManifest,
}

/// The node's announcement of a version (shared with the node through `rhio-core`).
type Summary = rhio_core::api::DatasetEvent;

impl Client {
    /// Every dataset version announced in the cluster, oldest first (all authors).
    pub async fn datasets(&self, stream: &str) -> Result<Vec<DatasetVersion>, ClientError> {
        let js = async_nats::jetstream::new(self.nats.clone());
        let failed = |reason: String| ClientError::Request {
            subject: format!("stream {stream}"),
            reason,
        };
        let mut handle = js.get_stream(stream).await.map_err(|err| {
            failed(format!(
                "{err} (the node announces datasets into the stream named by datasets.stream)"
            ))
        })?;
        let state = handle
            .info()
            .await
            .map_err(|err| failed(err.to_string()))?
            .state
            .clone();
        let mut versions = Vec::new();
        if state.messages == 0 {
            return Ok(versions);
        }
        for seq in state.first_sequence..=state.last_sequence {
            // Deleted messages leave gaps.
            let Ok(message) = handle.get_raw_message(seq).await else {
                continue;
            };
            let headers: Vec<(String, String)> = message
                .headers
                .iter()
                .flat_map(|(name, values)| {
                    values
                        .iter()
                        .map(move |value| (name.to_string(), value.as_str().to_string()))
                })
                .collect();
            let Ok(summary) = serde_json::from_slice::<Summary>(&message.payload) else {
                continue;
            };
            let (operation_header, problem) = match check_announcement(&summary, &headers) {
                Ok(bytes) => (bytes, None),
                Err(problem) => (Vec::new(), Some(problem)),
            };
            versions.push(DatasetVersion {
                dataset: summary.dataset,
                version: summary.version,
                author: summary.author,
                file_hash: summary.file_hash,
                rows: summary.rows,
                row_groups: summary.row_groups,
                bytes: summary.bytes,
                location: summary.location,
                created_at_micros: summary.created_at_micros,
                operation: summary.operation,
                subject: message.subject.to_string(),
                problem,
                operation_header,
            });
        }
        Ok(versions)
    }

    /// Fetches a dataset version from the cluster's S3 into `dest`, verified (see the module
    /// docs). `version: None` is the latest; `author: None` is fine when one author has the
    /// dataset.
    pub async fn fetch(
        &self,
        s3: &S3Options,
        stream: &str,
        dataset: &str,
        version: Option<u64>,
        author: Option<&str>,
        dest: &Path,
    ) -> Result<Fetched, ClientError> {
        self.fetch_with_progress(s3, stream, dataset, version, author, dest, &|_, _| {})
            .await
    }

    /// [`Client::fetch`], calling `progress(bytes done, bytes total)` as the file arrives.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_with_progress(
        &self,
        s3: &S3Options,
        stream: &str,
        dataset: &str,
        version: Option<u64>,
        author: Option<&str>,
        dest: &Path,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Fetched, ClientError> {
        let versions = self.datasets(stream).await?;
        let chosen = choose(&versions, dataset, version, author)?;
        let learned;
        let s3 = if s3.endpoint.is_empty() {
            learned = self.learn_s3(s3).await?;
            &learned
        } else {
            s3
        };
        fetch_version(s3, chosen, dest, progress).await
    }

    /// `s3` with the endpoint and bucket the node reports in its status (credentials stay the
    /// caller's: the node never hands out secrets).
    pub async fn learn_s3(&self, s3: &S3Options) -> Result<S3Options, ClientError> {
        let status = self.status().await?;
        let (endpoint, bucket) = (status.s3.endpoint.as_str(), status.s3.bucket.as_str());
        if endpoint.is_empty() || bucket.is_empty() {
            return Err(ClientError::Usage(
                "no S3 endpoint: pass --s3-endpoint (or RHIO_S3_ENDPOINT); the node's status names none".into(),
            ));
        }
        Ok(S3Options {
            endpoint: endpoint.to_string(),
            bucket: bucket.to_string(),
            ..s3.clone()
        })
    }
}

/// Picks a version: by dataset, author (required when several authors have the dataset) and
/// version (the latest when `None`).
pub fn choose<'a>(
    versions: &'a [DatasetVersion],
    dataset: &str,
    version: Option<u64>,
    author: Option<&str>,
) -> Result<&'a DatasetVersion, ClientError> {
    let of_dataset: Vec<&DatasetVersion> = versions
        .iter()
        .filter(|v| v.dataset == dataset && author.is_none_or(|a| v.author == a))
        .collect();
    if of_dataset.is_empty() {
        return Err(ClientError::NotFound(match author {
            Some(author) => format!("no dataset {dataset:?} by {author} in this cluster"),
            None => format!("no dataset {dataset:?} in this cluster"),
        }));
    }
    let mut authors: Vec<&str> = of_dataset.iter().map(|v| v.author.as_str()).collect();
    authors.sort_unstable();
    authors.dedup();
    if authors.len() > 1 {
        return Err(ClientError::Ambiguous(format!(
            "dataset {dataset:?} has {} authors ({}); name one with --author",
            authors.len(),
            authors.join(", ")
        )));
    }
    match version {
        None => Ok(of_dataset
            .iter()
            .max_by_key(|v| v.version)
            .expect("not empty")),
        Some(wanted) => of_dataset
            .iter()
            .find(|v| v.version == wanted)
            .copied()
            .ok_or_else(|| {
                ClientError::NotFound(format!("dataset {dataset:?} has no version {wanted}"))
            }),
    }
}

/// The checked operation header of an announcement (its provenance headers agree and the
/// header is the version's: author, log and position), or why not.
fn check_announcement(summary: &Summary, headers: &[(String, String)]) -> Result<Vec<u8>, String> {
    let (bytes, header) =
        rhio_core::message::operation_header(headers).map_err(|err| err.to_string())?;
    let author = rhio_core::identity::PublicKey::from(header.verifying_key);
    let expected = rhio_core::operation::LogId::Dataset(summary.dataset.clone());
    if author.to_hex() != summary.author
        || header.extensions.log != expected
        || header.seq_num != summary.version
    {
        return Err(format!(
            "the signed header is seq {} of {} in log {:?}, the announcement says version {} of {:?} by {}",
            header.seq_num,
            author,
            header.extensions.log.name(),
            summary.version,
            summary.dataset,
            summary.author
        ));
    }
    Ok(bytes)
}

/// An S3 client for `options` (ring TLS, as the node).
pub fn s3_client(options: &S3Options) -> Result<aws_sdk_s3::Client, ClientError> {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    if options.endpoint.is_empty() {
        return Err(ClientError::Usage(
            "no S3 endpoint: pass --s3-endpoint (or RHIO_S3_ENDPOINT)".into(),
        ));
    }
    let (key, secret) = match (&options.access_key, &options.secret_key) {
        (Some(key), Some(secret)) => (key.clone(), secret.clone()),
        _ => match (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Ok(key), Ok(secret)) => (key, secret),
            _ => {
                return Err(ClientError::Usage(
                    "no S3 credentials: pass --s3-access-key and --s3-secret-key (or RHIO_S3_ACCESS_KEY / RHIO_S3_SECRET_KEY, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)".into(),
                ));
            }
        },
    };
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&options.endpoint)
        .region(Region::new(
            options.region.clone().unwrap_or_else(|| "us-east-1".into()),
        ))
        .force_path_style(true)
        .credentials_provider(Credentials::new(key, secret, None, None, "rhio-client"))
        .http_client(http)
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(Duration::from_secs(30))
                .build(),
        )
        .build();
    Ok(aws_sdk_s3::Client::from_conf(config))
}

fn s3_error(key: &str, err: impl std::fmt::Display) -> ClientError {
    ClientError::S3 {
        key: key.to_string(),
        reason: err.to_string(),
    }
}

/// Fetches one version into `dest` (see [`Client::fetch`]).
pub async fn fetch_version(
    s3: &S3Options,
    version: &DatasetVersion,
    dest: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Fetched, ClientError> {
    if let Some(problem) = &version.problem {
        return Err(ClientError::Verification(format!(
            "the announcement of {} v{} does not verify: {problem}",
            version.dataset, version.version
        )));
    }
    let prefix = format!("s3://{}/", s3.bucket);
    let key = version.location.strip_prefix(&prefix).ok_or_else(|| {
        ClientError::Usage(format!(
            "{} is not in bucket {:?} (pass the cluster's bucket with --s3-bucket)",
            version.location, s3.bucket
        ))
    })?;
    let manifest_key = rhio_core::layout::manifest_of_version(key)
        .ok_or_else(|| ClientError::NotFound(format!("{key} is not a rhio dataset version")))?;
    let client = s3_client(s3)?;
    let get = |key: String| {
        let client = client.clone();
        let bucket = s3.bucket.clone();
        async move {
            client
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .map_err(|err| s3_error(&key, aws_sdk_s3::error::DisplayErrorContext(err)))
        }
    };
    let body = get(manifest_key.clone())
        .await?
        .body
        .collect()
        .await
        .map_err(|err| s3_error(&manifest_key, err))?
        .into_bytes()
        .to_vec();
    let operation = SignedOperation::decode(&version.operation_header, body).map_err(|err| {
        ClientError::Verification(format!(
            "{manifest_key} is not the manifest the announcement signs: {err}"
        ))
    })?;
    let signed = SignedManifest::from_operation(operation)
        .map_err(|err| ClientError::Verification(err.to_string()))?;
    let manifest = signed.manifest;
    if manifest.file_hash != version.file_hash {
        return Err(ClientError::Verification(format!(
            "the signed manifest names file {}, the announcement {}",
            manifest.file_hash, version.file_hash
        )));
    }
    let partial = partial_path(dest);
    let result = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(|err| ClientError::Io(format!("{}: {err}", partial.display())))?;
        let mut hasher = blake3::Hasher::new();
        let mut written = 0u64;
        // Ranged GETs in parallel (one GET stream is slower than most S3 servers), written and
        // hashed in order as they complete.
        let size = manifest.file_size;
        let ranges: Vec<(u64, u64)> = (0..size.div_ceil(FETCH_PIECE))
            .map(|i| (i * FETCH_PIECE, FETCH_PIECE.min(size - i * FETCH_PIECE)))
            .collect();
        let mut pieces = futures::stream::iter(ranges)
            .map(|(offset, length)| {
                let client = client.clone();
                let bucket = s3.bucket.clone();
                async move {
                    client
                        .get_object()
                        .bucket(bucket)
                        .key(key)
                        .range(format!("bytes={offset}-{}", offset + length - 1))
                        .send()
                        .await
                        .map_err(|err| s3_error(key, aws_sdk_s3::error::DisplayErrorContext(err)))?
                        .body
                        .collect()
                        .await
                        .map(|data| data.into_bytes())
                        .map_err(|err| s3_error(key, err))
                }
            })
            .buffered(FETCH_PARALLEL);
        while let Some(piece) = pieces.next().await {
            let piece = piece?;
            hasher.update(&piece);
            written += piece.len() as u64;
            progress(written, manifest.file_size);
            file.write_all(&piece)
                .await
                .map_err(|err| ClientError::Io(format!("{}: {err}", partial.display())))?;
        }
        file.sync_all()
            .await
            .map_err(|err| ClientError::Io(format!("{}: {err}", partial.display())))?;
        let hash = hasher.finalize().to_hex().to_string();
        if written != manifest.file_size || hash != manifest.file_hash {
            return Err(ClientError::Verification(format!(
                "s3://{}/{key} is not the file the signed manifest names ({written} bytes, BLAKE3 {hash}; expected {} bytes, {})",
                s3.bucket, manifest.file_size, manifest.file_hash
            )));
        }
        tokio::fs::rename(&partial, dest)
            .await
            .map_err(|err| ClientError::Io(format!("{}: {err}", dest.display())))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result?;
    Ok(Fetched {
        path: dest.to_path_buf(),
        version: version.clone(),
        manifest,
    })
}

/// Bytes per ranged GET of a fetch, and GETs in flight (at most 64 MiB in memory).
const FETCH_PIECE: u64 = 8 << 20;
const FETCH_PARALLEL: usize = 8;

/// Where a fetch writes before the file is verified: beside `dest`, hidden.
fn partial_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    dest.with_file_name(format!(".{name}.rhio-partial-{}", std::process::id()))
}

/// Checks a file against a signed manifest file (as the registry mirror ships it: the
/// `.rhio-manifest` layer): the signature, then the file's size and BLAKE3.
pub fn verify(file: &Path, signed_manifest: &Path) -> Result<DatasetManifest, ClientError> {
    let bytes = std::fs::read(signed_manifest)
        .map_err(|err| ClientError::Io(format!("{}: {err}", signed_manifest.display())))?;
    let signed = SignedManifest::decode(&bytes).map_err(|err| {
        ClientError::Verification(format!("{}: {err}", signed_manifest.display()))
    })?;
    let mut hasher = blake3::Hasher::new();
    std::fs::File::open(file)
        .and_then(|mut opened| std::io::copy(&mut opened, &mut hasher))
        .map_err(|err| ClientError::Io(format!("{}: {err}", file.display())))?;
    let size = std::fs::metadata(file)
        .map_err(|err| ClientError::Io(format!("{}: {err}", file.display())))?
        .len();
    let hash = hasher.finalize().to_hex().to_string();
    let manifest = signed.manifest;
    if size != manifest.file_size || hash != manifest.file_hash {
        return Err(ClientError::Verification(format!(
            "{} is not the file {} v{} by {} signs ({size} bytes, BLAKE3 {hash}; expected {} bytes, {})",
            file.display(),
            manifest.dataset,
            manifest.version,
            manifest.author,
            manifest.file_size,
            manifest.file_hash
        )));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(dataset: &str, version: u64, author: &str) -> DatasetVersion {
        DatasetVersion {
            dataset: dataset.into(),
            version,
            author: author.into(),
            file_hash: String::new(),
            rows: 0,
            row_groups: 0,
            bytes: 0,
            location: String::new(),
            created_at_micros: 0,
            operation: String::new(),
            subject: String::new(),
            problem: None,
            operation_header: Vec::new(),
        }
    }

    #[test]
    fn versions_are_chosen_by_dataset_author_and_number() {
        let versions = [
            version("weather", 0, "a"),
            version("weather", 2, "a"),
            version("weather", 1, "a"),
            version("tides", 0, "a"),
            version("tides", 0, "b"),
        ];
        assert_eq!(choose(&versions, "weather", None, None).unwrap().version, 2);
        assert_eq!(
            choose(&versions, "weather", Some(1), None).unwrap().version,
            1
        );
        assert!(matches!(
            choose(&versions, "weather", Some(5), None),
            Err(ClientError::NotFound(_))
        ));
        assert!(matches!(
            choose(&versions, "tides", None, None),
            Err(ClientError::Ambiguous(_))
        ));
        assert_eq!(
            choose(&versions, "tides", None, Some("b")).unwrap().author,
            "b"
        );
        assert!(matches!(
            choose(&versions, "rain", None, None),
            Err(ClientError::NotFound(_))
        ));
    }
}
