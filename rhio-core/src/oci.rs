//! OCI artifacts of dataset versions: what the registry mirror pushes, byte for byte, and the
//! small parts of the distribution protocol that are pure (repository names, auth challenges).
//!
//! A version becomes an OCI image-spec 1.1 image manifest (which CNCF Distribution and Harbor
//! accept) with `artifactType` [`ARTIFACT_TYPE`]:
//! - config: a JSON [`DatasetConfig`] of media type [`CONFIG_MEDIA_TYPE`]
//!   (`application/vnd.rhio.dataset.config.v1+json`: Harbor shows the artifact as DATASET);
//! - layer 1: the Parquet file ([`PARQUET_MEDIA_TYPE`]), titled `<dataset>.parquet`;
//! - layer 2: the [`SignedManifest`](crate::manifest::SignedManifest) file
//!   ([`SIGNED_MANIFEST_MEDIA_TYPE`]), titled `<dataset>.rhio-manifest`;
//! - annotations: `org.opencontainers.image.{created,version,source,title}` and rhio's own
//!   (`io.rhio.*`: author, dataset, file BLAKE3, schema BLAKE3, rows, row groups, operation).
//!
//! Descriptors carry sha256 digests (registries verify them); BLAKE3 stays in annotations.
//!
//! ```
//! use rhio_core::oci::repository;
//! assert_eq!(repository("rhio", "weather", None).unwrap(), "rhio/weather");
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::PublicKey;
use crate::manifest::DatasetManifest;

pub const IMAGE_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const ARTIFACT_TYPE: &str = "application/vnd.apache.parquet";
pub const PARQUET_MEDIA_TYPE: &str = "application/vnd.apache.parquet";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.rhio.dataset.config.v1+json";
pub const SIGNED_MANIFEST_MEDIA_TYPE: &str = "application/vnd.rhio.signed-manifest.v1+cbor";

/// Annotation keys.
pub mod annotation {
    pub const TITLE: &str = "org.opencontainers.image.title";
    pub const CREATED: &str = "org.opencontainers.image.created";
    pub const VERSION: &str = "org.opencontainers.image.version";
    pub const SOURCE: &str = "org.opencontainers.image.source";
    pub const DESCRIPTION: &str = "org.opencontainers.image.description";
    pub const AUTHOR: &str = "io.rhio.author";
    pub const DATASET: &str = "io.rhio.dataset";
    pub const FILE_BLAKE3: &str = "io.rhio.file.blake3";
    pub const SCHEMA_BLAKE3: &str = "io.rhio.schema.blake3";
    pub const ROWS: &str = "io.rhio.rows";
    pub const ROW_GROUPS: &str = "io.rhio.row-groups";
    pub const OPERATION: &str = "io.rhio.operation";
}

/// Longest repository name Distribution accepts.
pub const MAX_REPOSITORY: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OciError {
    #[error("invalid registry project {0:?}: {1}")]
    BadProject(String, &'static str),
    #[error(
        "dataset {dataset:?} gives the repository name {repository:?}, which OCI does not allow: {why}"
    )]
    BadRepository {
        dataset: String,
        repository: String,
        why: &'static str,
    },
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest (image-spec 1.1) carrying an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The config blob of a dataset version: what Harbor shows and tools read without the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetConfig {
    pub dataset: String,
    pub version: u64,
    /// Author's public key, hex.
    pub author: String,
    pub created: String,
    pub bytes: u64,
    pub rows: u64,
    pub row_groups: usize,
    /// BLAKE3 of the whole Parquet file, hex (the manifest's `file_hash`).
    pub file_blake3: String,
    /// BLAKE3 of the schema text, hex.
    pub schema_blake3: String,
    /// The Parquet schema, as in the manifest.
    pub schema: String,
    /// Hash of the signed manifest operation, hex.
    pub operation: String,
}

/// The files of one version's artifact that are not the Parquet file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetArtifact {
    pub config: DatasetConfig,
    /// Annotations of the image manifest.
    pub annotations: BTreeMap<String, String>,
}

impl DatasetArtifact {
    /// Describes version `manifest` (signed as operation `operation`), naming `source` (where
    /// it came from, e.g. the node's network id) in its annotations.
    pub fn new(manifest: &DatasetManifest, operation: &str, source: &str) -> Self {
        let created = rfc3339_from_micros(manifest.created_at_micros);
        let config = DatasetConfig {
            dataset: manifest.dataset.clone(),
            version: manifest.version,
            author: manifest.author.to_hex(),
            created: created.clone(),
            bytes: manifest.file_size,
            rows: manifest.rows,
            row_groups: manifest.blobs.len().saturating_sub(1),
            file_blake3: manifest.file_hash.clone(),
            schema_blake3: blake3::hash(manifest.schema.as_bytes())
                .to_hex()
                .to_string(),
            schema: manifest.schema.clone(),
            operation: operation.to_string(),
        };
        let annotations = BTreeMap::from([
            (annotation::CREATED.into(), created),
            (annotation::VERSION.into(), manifest.version.to_string()),
            (annotation::SOURCE.into(), source.to_string()),
            (
                annotation::DESCRIPTION.into(),
                format!(
                    "rhio dataset {} version {} ({} rows)",
                    manifest.dataset, manifest.version, manifest.rows
                ),
            ),
            (annotation::AUTHOR.into(), config.author.clone()),
            (annotation::DATASET.into(), manifest.dataset.clone()),
            (annotation::FILE_BLAKE3.into(), manifest.file_hash.clone()),
            (
                annotation::SCHEMA_BLAKE3.into(),
                config.schema_blake3.clone(),
            ),
            (annotation::ROWS.into(), manifest.rows.to_string()),
            (annotation::ROW_GROUPS.into(), config.row_groups.to_string()),
            (annotation::OPERATION.into(), operation.to_string()),
        ]);
        Self {
            config,
            annotations,
        }
    }

    pub fn config_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.config).expect("config serializes")
    }

    /// Title of the Parquet layer (what `oras pull` names the file).
    pub fn parquet_title(&self) -> String {
        format!("{}.parquet", self.config.dataset)
    }

    /// Title of the signed manifest layer.
    pub fn signed_manifest_title(&self) -> String {
        format!("{}.rhio-manifest", self.config.dataset)
    }

    /// The image manifest, given the descriptors of the uploaded config, Parquet file and
    /// signed manifest (their digests and sizes; media types and titles are set here).
    pub fn image_manifest(
        &self,
        config: Blob,
        parquet: Blob,
        signed_manifest: Blob,
    ) -> ImageManifest {
        let titled = |blob: Blob, media_type: &str, title: String| Descriptor {
            media_type: media_type.into(),
            digest: blob.digest,
            size: blob.size,
            annotations: BTreeMap::from([(annotation::TITLE.to_string(), title)]),
        };
        ImageManifest {
            schema_version: 2,
            media_type: IMAGE_MANIFEST_MEDIA_TYPE.into(),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: Descriptor {
                media_type: CONFIG_MEDIA_TYPE.into(),
                digest: config.digest,
                size: config.size,
                annotations: BTreeMap::new(),
            },
            layers: vec![
                titled(parquet, PARQUET_MEDIA_TYPE, self.parquet_title()),
                titled(
                    signed_manifest,
                    SIGNED_MANIFEST_MEDIA_TYPE,
                    self.signed_manifest_title(),
                ),
            ],
            annotations: self.annotations.clone(),
        }
    }
}

/// An uploaded blob: digest (`sha256:<hex>`) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

impl ImageManifest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }
}

/// Tag of a version.
pub fn version_tag(version: u64) -> String {
    format!("v{version}")
}

/// One path component of an OCI repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_component(part: &str) -> bool {
    let bytes = part.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-'.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let run = &part[start..i];
        let ok = run == "." || run == "_" || run == "__" || run.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Checks a registry project (Harbor project, or a path prefix on plain Distribution): one or
/// more OCI path components separated by '/'.
pub fn validate_project(project: &str) -> Result<(), OciError> {
    if project.is_empty() || project.len() > 128 {
        return Err(OciError::BadProject(
            project.into(),
            "must have 1 to 128 characters",
        ));
    }
    if !project.split('/').all(is_component) {
        return Err(OciError::BadProject(
            project.into(),
            "each '/'-separated part must be lowercase letters and digits, separated by '.', '_', '__' or '-'",
        ));
    }
    Ok(())
}

/// The repository of a dataset: `<project>/<dataset>` for this cluster's own datasets and
/// `<project>/<dataset>/<author hex>` for versions of other authors (as in the S3 layout), so
/// no author overwrites another's tags. Dataset names are lowercased (OCI names are); a name
/// that still is not a valid component (`a--_b`, a leading '-') is an error.
pub fn repository(
    project: &str,
    dataset: &str,
    author: Option<&PublicKey>,
) -> Result<String, OciError> {
    validate_project(project)?;
    let component = dataset.to_ascii_lowercase();
    let repository = match author {
        None => format!("{project}/{component}"),
        Some(author) => format!("{project}/{component}/{}", author.to_hex()),
    };
    let bad = |why| OciError::BadRepository {
        dataset: dataset.into(),
        repository: repository.clone(),
        why,
    };
    if !is_component(&component) {
        return Err(bad(
            "a component must start and end with a letter or digit and separate them only by '.', '_', '__' or '-'",
        ));
    }
    if repository.len() > MAX_REPOSITORY {
        return Err(bad("longer than 255 characters"));
    }
    Ok(repository)
}

/// `repository:<name>:<actions>`, the scope a token is asked for.
pub fn repository_scope(repository: &str, actions: &str) -> String {
    format!("repository:{repository}:{actions}")
}

/// A `WWW-Authenticate` challenge of a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header value (`Bearer realm="..",service="..",scope=".."` or
/// `Basic realm=".."`); `None` for schemes rhio does not speak.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(params);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key="value",key=value` pairs; quoted values may contain ',' (scopes do: `pull,push`).
fn parse_params(text: &str) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(key, value);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    params
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a time in microseconds since the Unix epoch.
pub fn rfc3339_from_micros(micros: u64) -> String {
    let secs = micros / 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;

    #[test]
    fn repositories_keep_authors_apart_and_follow_the_oci_grammar() {
        let author = PrivateKey::generate().public_key();
        assert_eq!(repository("rhio", "weather", None).unwrap(), "rhio/weather");
        assert_eq!(
            repository("team/rhio", "Weather_2026-11", Some(&author)).unwrap(),
            format!("team/rhio/weather_2026-11/{}", author.to_hex())
        );
        for bad in ["-weather", "weather_", "a_-b", "a___b", "x__-y"] {
            assert!(repository("rhio", bad, None).is_err(), "{bad}");
        }
        for good in ["a", "a__b", "a---b", "a.b", "2026"] {
            assert!(is_component(good), "{good}");
        }
        for bad in ["", "Rhio", "rhio/", "/rhio", "rh io", "rhio//x"] {
            assert!(validate_project(bad).is_err(), "{bad:?}");
        }
        let long = "d".repeat(200);
        assert!(matches!(
            repository(&"p".repeat(60), &long, Some(&author)),
            Err(OciError::BadRepository { .. })
        ));
    }

    #[test]
    fn challenges_parse_as_distribution_and_harbor_send_them() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://harbor.example/service/token",service="harbor-registry",scope="repository:rhio/weather:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://harbor.example/service/token".into(),
                service: Some("harbor-registry".into()),
                scope: Some("repository:rhio/weather:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="http://127.0.0.1:1/t", service="x""#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: Some("x".into()),
                scope: None,
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_from_micros(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_from_micros(1_796_036_400_123_456),
            "2026-11-30T11:00:00Z"
        );
        assert_eq!(
            rfc3339_from_micros(951_782_400_000_000),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn the_image_manifest_is_an_oci_artifact_with_titled_layers() {
        let key = PrivateKey::generate();
        let manifest = DatasetManifest {
            dataset: "weather".into(),
            version: 2,
            author: key.public_key(),
            created_at_micros: 1_796_036_400_000_000,
            file_size: 120,
            file_hash: "ab".repeat(32),
            schema: "message s { }".into(),
            rows: 10,
            blobs: vec![],
        };
        let artifact = DatasetArtifact::new(&manifest, &"cd".repeat(32), "rhio network demo");
        let blob = |c: char, size| Blob {
            digest: format!("sha256:{}", c.to_string().repeat(64)),
            size,
        };
        let image = artifact.image_manifest(blob('1', 300), blob('2', 120), blob('3', 900));
        let json: serde_json::Value = serde_json::from_slice(&image.to_json()).unwrap();
        assert_eq!(json["schemaVersion"], 2);
        assert_eq!(json["mediaType"], IMAGE_MANIFEST_MEDIA_TYPE);
        assert_eq!(json["artifactType"], "application/vnd.apache.parquet");
        assert_eq!(
            json["config"]["mediaType"],
            "application/vnd.rhio.dataset.config.v1+json"
        );
        assert_eq!(json["layers"][0]["mediaType"], PARQUET_MEDIA_TYPE);
        assert_eq!(
            json["layers"][0]["annotations"][annotation::TITLE],
            "weather.parquet"
        );
        assert_eq!(json["layers"][1]["size"], 900);
        assert_eq!(
            json["annotations"][annotation::CREATED],
            "2026-11-30T11:00:00Z"
        );
        assert_eq!(
            json["annotations"][annotation::FILE_BLAKE3],
            "ab".repeat(32)
        );
        let config: DatasetConfig = serde_json::from_slice(&artifact.config_json()).unwrap();
        assert_eq!(config.version, 2);
        assert_eq!(config.row_groups, 0);
        let parsed: ImageManifest = serde_json::from_slice(&image.to_json()).unwrap();
        assert_eq!(parsed, image);
    }
}
