//! Where rhio keeps things in a cluster's S3 bucket: every object key rhio writes, in one place,
//! so the node and clients (which fetch and verify files without asking the node) agree.
//!
//! | object | key |
//! |---|---|
//! | a version imported in this cluster | `datasets/<dataset>/v<version>.parquet` |
//! | a version of another author replicated here | `datasets/<dataset>/<author>/v<version>.parquet` |
//! | its manifest (the signed operation's body) | `.rhio/manifests/<dataset>[/<author>]/v<version>.cbor` |
//! | a blob's bao outboard | `.rhio/outboards/<blake3>.obao4` |
//!
//! ```
//! use rhio_core::layout;
//! assert_eq!(layout::own_version("weather", 3), "datasets/weather/v3.parquet");
//! assert_eq!(
//!     layout::manifest_of_version("datasets/weather/v3.parquet").unwrap(),
//!     ".rhio/manifests/weather/v3.cbor"
//! );
//! ```

use crate::identity::PublicKey;

/// rhio's own objects in the bucket (outboards, manifests) live under this hidden prefix.
pub const SIDECAR_PREFIX: &str = ".rhio";

/// This cluster's own import of `dataset` version `version`.
pub fn own_version(dataset: &str, version: u64) -> String {
    format!("datasets/{dataset}/v{version}.parquet")
}

/// A version of another author replicated here: beside (never over) local imports.
pub fn replica_version(dataset: &str, author: &PublicKey, version: u64) -> String {
    format!("datasets/{dataset}/{author}/v{version}.parquet")
}

/// The manifest of a version: `author` is `None` for this cluster's own datasets.
pub fn manifest(dataset: &str, author: Option<&PublicKey>, version: u64) -> String {
    match author {
        None => format!("{SIDECAR_PREFIX}/manifests/{dataset}/v{version}.cbor"),
        Some(author) => {
            format!("{SIDECAR_PREFIX}/manifests/{dataset}/{author}/v{version}.cbor")
        }
    }
}

/// A blob's bao outboard (post order, no size prefix).
pub fn outboard(hash: &blake3::Hash) -> String {
    format!("{SIDECAR_PREFIX}/outboards/{}.obao4", hash.to_hex())
}

/// The manifest key of a version's file key (`datasets/...parquet`), or `None` when the key is
/// not one rhio writes versions to.
pub fn manifest_of_version(key: &str) -> Option<String> {
    let rest = key.strip_prefix("datasets/")?.strip_suffix(".parquet")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let version = |part: &str| part.strip_prefix('v')?.parse::<u64>().ok();
    match parts[..] {
        [dataset, file] => Some(manifest(dataset, None, version(file)?)),
        [dataset, author, file] => {
            let author: PublicKey = author.parse().ok()?;
            Some(manifest(dataset, Some(&author), version(file)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;

    #[test]
    fn version_keys_map_to_their_manifests() {
        let author = PrivateKey::generate().public_key();
        for (version, manifest_key) in [
            (own_version("weather", 7), manifest("weather", None, 7)),
            (
                replica_version("weather", &author, 0),
                manifest("weather", Some(&author), 0),
            ),
        ] {
            assert_eq!(manifest_of_version(&version), Some(manifest_key));
        }
        for bad in [
            "datasets/weather/x7.parquet",
            "datasets/weather/v7.csv",
            "other/weather/v7.parquet",
            "datasets/weather/notakey/v1.parquet",
            "datasets/a/b/c/v1.parquet",
        ] {
            assert_eq!(manifest_of_version(bad), None, "{bad}");
        }
    }
}
