//! The dataset manifest: what one version of a dataset is, byte for byte.
//!
//! A manifest names the dataset and version, the author and creation time, the whole file
//! (size, BLAKE3), its Parquet schema and row count, and for each blob (a row group's byte
//! range, then the footer) its offset, length, rows and BLAKE3/bao root hash. It is CBOR-encoded
//! and signed as the body of an operation in the author's log for the dataset
//! ([`LogId::Dataset`](crate::operation::LogId)), so the version is the log position.
//!
//! Decoding checks that the blobs cover the file exactly (no gap, no overlap) and that sizes and
//! rows add up; a manifest that does not is rejected whatever its signature says.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::PublicKey;
use crate::parquet::Partition;

/// Largest accepted manifest encoding.
pub const MAX_MANIFEST_BYTES: usize = 8 * 1024 * 1024;
/// Longest dataset name.
pub const MAX_DATASET_NAME: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobKind {
    RowGroup,
    Footer,
}

/// One blob of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    pub kind: BlobKind,
    pub offset: u64,
    pub length: u64,
    pub rows: u64,
    /// BLAKE3 hash of the blob's bytes (the root of its bao tree), hex.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub dataset: String,
    pub version: u64,
    pub author: PublicKey,
    pub created_at_micros: u64,
    pub file_size: u64,
    /// BLAKE3 hash of the whole file, hex.
    pub file_hash: String,
    pub schema: String,
    pub rows: u64,
    pub blobs: Vec<BlobEntry>,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("manifest is not valid CBOR: {0}")]
    Malformed(String),
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
    #[error("invalid dataset name {0:?}: {1}")]
    BadName(String, &'static str),
    #[error("not a signed rhio manifest: {0}")]
    NotSigned(String),
    #[error("the manifest's signature does not verify: {0}")]
    BadSignature(String),
}

/// Checks a dataset name: it becomes an S3 key segment and part of a NATS subject.
pub fn validate_dataset_name(name: &str) -> Result<(), ManifestError> {
    let bad = |why| Err(ManifestError::BadName(name.to_string(), why));
    if name.is_empty() || name.len() > MAX_DATASET_NAME {
        return bad("must have 1 to 200 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return bad("only letters, digits, '-' and '_' are allowed");
    }
    Ok(())
}

fn is_hex_hash(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl DatasetManifest {
    /// Builds the manifest of a partitioned file, given the hashes of its blobs (in
    /// [`Partition::ranges`] order) and of the whole file.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dataset: &str,
        version: u64,
        author: PublicKey,
        created_at_micros: u64,
        partition: &Partition,
        blob_hashes: &[blake3::Hash],
        file_hash: blake3::Hash,
    ) -> Result<Self, ManifestError> {
        validate_dataset_name(dataset)?;
        let count = partition.row_groups.len() + 1;
        if blob_hashes.len() != count {
            return Err(ManifestError::Inconsistent(format!(
                "{} blob hashes for {count} blobs",
                blob_hashes.len()
            )));
        }
        let mut blobs: Vec<BlobEntry> = partition
            .row_groups
            .iter()
            .zip(blob_hashes)
            .map(|(rg, hash)| BlobEntry {
                kind: BlobKind::RowGroup,
                offset: rg.range.offset,
                length: rg.range.length,
                rows: rg.rows,
                hash: hash.to_hex().to_string(),
            })
            .collect();
        blobs.push(BlobEntry {
            kind: BlobKind::Footer,
            offset: partition.footer.offset,
            length: partition.footer.length,
            rows: 0,
            hash: blob_hashes[count - 1].to_hex().to_string(),
        });
        let manifest = Self {
            dataset: dataset.to_string(),
            version,
            author,
            created_at_micros,
            file_size: partition.file_len,
            file_hash: file_hash.to_hex().to_string(),
            schema: partition.schema.clone(),
            rows: partition.rows,
            blobs,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("CBOR into a Vec");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let manifest: Self = ciborium::from_reader(bytes)
            .map_err(|err| ManifestError::Malformed(err.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks that blobs cover the file exactly and that sizes and rows add up.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_dataset_name(&self.dataset)?;
        let inconsistent = |what: String| Err(ManifestError::Inconsistent(what));
        if !is_hex_hash(&self.file_hash) {
            return inconsistent("file hash is not 64 lowercase hex characters".into());
        }
        let Some((footer, row_groups)) = self.blobs.split_last() else {
            return inconsistent("no blobs".into());
        };
        if footer.kind != BlobKind::Footer || footer.rows != 0 {
            return inconsistent("the last blob must be the footer, with no rows".into());
        }
        let mut next = 0u64;
        let mut rows = 0u64;
        for (i, blob) in self.blobs.iter().enumerate() {
            if i < row_groups.len() && blob.kind != BlobKind::RowGroup {
                return inconsistent(format!("blob {i} is not a row group"));
            }
            if blob.offset != next {
                return inconsistent(format!(
                    "blob {i} starts at {} instead of {next} (gap or overlap)",
                    blob.offset
                ));
            }
            if blob.length == 0 {
                return inconsistent(format!("blob {i} is empty"));
            }
            if !is_hex_hash(&blob.hash) {
                return inconsistent(format!("blob {i} hash is not 64 lowercase hex characters"));
            }
            next = blob
                .offset
                .checked_add(blob.length)
                .ok_or_else(|| ManifestError::Inconsistent("sizes overflow".into()))?;
            rows = rows
                .checked_add(blob.rows)
                .ok_or_else(|| ManifestError::Inconsistent("rows overflow".into()))?;
        }
        if next != self.file_size {
            return inconsistent(format!(
                "blobs cover {next} bytes, the file has {}",
                self.file_size
            ));
        }
        if rows != self.rows {
            return inconsistent(format!(
                "blobs hold {rows} rows, the manifest says {}",
                self.rows
            ));
        }
        Ok(())
    }
}

/// A version's manifest together with its signed operation header, as one self-contained file:
/// what the registry mirror ships beside the Parquet file, so anyone holding the author's public
/// key can check the file without asking a rhio node.
///
/// Encoding: the CBOR array `["rhio-signed-manifest/1", <operation header bytes>, <manifest
/// bytes>]`. Decoding verifies the header's signature and payload hash against the manifest
/// bytes and that the operation is version `manifest.version` in the author's log of
/// `manifest.dataset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    pub operation: crate::operation::SignedOperation,
    pub manifest: DatasetManifest,
}

impl SignedManifest {
    /// The first element of the encoding: names the format and its version.
    pub const FORMAT: &'static str = "rhio-signed-manifest/1";

    /// Pairs a verified manifest operation (from the node's store) with its decoded manifest.
    pub fn from_operation(
        operation: crate::operation::SignedOperation,
    ) -> Result<Self, ManifestError> {
        let manifest = DatasetManifest::decode(&operation.body)?;
        let signed = Self {
            operation,
            manifest,
        };
        signed.check_log()?;
        Ok(signed)
    }

    fn check_log(&self) -> Result<(), ManifestError> {
        let op = &self.operation;
        let expected = crate::operation::LogId::Dataset(self.manifest.dataset.clone());
        if op.log() != &expected
            || op.seq() != self.manifest.version
            || op.author() != self.manifest.author
        {
            return Err(ManifestError::BadSignature(format!(
                "the operation is seq {} of {} in log {:?}, the manifest says version {} of {:?} by {}",
                op.seq(),
                op.author(),
                op.log().name(),
                self.manifest.version,
                self.manifest.dataset,
                self.manifest.author
            )));
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        use ciborium::Value;
        let value = Value::Array(vec![
            Value::Text(Self::FORMAT.into()),
            Value::Bytes(self.operation.header_bytes.clone()),
            Value::Bytes(self.operation.body.clone()),
        ]);
        let mut out = Vec::new();
        ciborium::into_writer(&value, &mut out).expect("CBOR into a Vec");
        out
    }

    /// Decodes and verifies a signed manifest file.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        use ciborium::Value;
        if bytes.len() > MAX_MANIFEST_BYTES + crate::operation::MAX_HEADER_BYTES + 64 {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let not_signed = |why: &str| ManifestError::NotSigned(why.to_string());
        let value: Value = ciborium::from_reader(bytes)
            .map_err(|err| ManifestError::NotSigned(err.to_string()))?;
        let Value::Array(parts) = value else {
            return Err(not_signed("expected a CBOR array"));
        };
        let [
            Value::Text(format),
            Value::Bytes(header),
            Value::Bytes(body),
        ] = &parts[..]
        else {
            return Err(not_signed(
                "expected [format, header bytes, manifest bytes]",
            ));
        };
        if format != Self::FORMAT {
            return Err(ManifestError::NotSigned(format!(
                "format {format:?}, expected {:?}",
                Self::FORMAT
            )));
        }
        let operation = crate::operation::SignedOperation::decode(header, body.clone())
            .map_err(|err| ManifestError::BadSignature(err.to_string()))?;
        Self::from_operation(operation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;
    use crate::parquet::{ByteRange, RowGroupRange};
    use proptest::prelude::*;

    fn partition(lengths: &[u64], footer: u64) -> Partition {
        let mut offset = 0;
        let row_groups = lengths
            .iter()
            .enumerate()
            .map(|(index, &length)| {
                let range = ByteRange { offset, length };
                offset += length;
                RowGroupRange {
                    index,
                    range,
                    rows: length / 10,
                }
            })
            .collect::<Vec<_>>();
        let rows = row_groups.iter().map(|rg| rg.rows).sum();
        Partition {
            file_len: offset + footer,
            row_groups,
            footer: ByteRange {
                offset,
                length: footer,
            },
            rows,
            schema: "message schema { REQUIRED INT64 id; }".into(),
        }
    }

    fn manifest(lengths: &[u64]) -> DatasetManifest {
        let partition = partition(lengths, 100);
        let hashes: Vec<_> = (0..=lengths.len())
            .map(|i| blake3::hash(&[i as u8]))
            .collect();
        DatasetManifest::new(
            "weather",
            0,
            PrivateKey::generate().public_key(),
            1,
            &partition,
            &hashes,
            blake3::hash(b"file"),
        )
        .unwrap()
    }

    #[test]
    fn round_trips_and_rejects_inconsistencies() {
        let m = manifest(&[1000, 2000, 30]);
        assert_eq!(DatasetManifest::decode(&m.encode()).unwrap(), m);

        let mut gap = m.clone();
        gap.blobs[1].offset += 1;
        assert!(matches!(
            DatasetManifest::decode(&gap.encode()),
            Err(ManifestError::Inconsistent(_))
        ));
        let mut size = m.clone();
        size.file_size += 1;
        assert!(DatasetManifest::decode(&size.encode()).is_err());
        let mut rows = m.clone();
        rows.rows += 1;
        assert!(DatasetManifest::decode(&rows.encode()).is_err());
        let mut no_footer = m.clone();
        no_footer.blobs.pop();
        assert!(DatasetManifest::decode(&no_footer.encode()).is_err());
        let mut hash = m.clone();
        hash.blobs[0].hash = "xyz".into();
        assert!(DatasetManifest::decode(&hash.encode()).is_err());
        assert!(DatasetManifest::decode(b"\xff\x00").is_err());
    }

    #[test]
    fn signed_manifest_round_trips_and_detects_tampering() {
        let key = PrivateKey::generate();
        let partition = partition(&[1000, 20], 100);
        let hashes: Vec<_> = (0..3).map(|i| blake3::hash(&[i as u8])).collect();
        let m = DatasetManifest::new(
            "weather",
            3,
            key.public_key(),
            1,
            &partition,
            &hashes,
            blake3::hash(b"file"),
        )
        .unwrap();
        let sign = |log: &str, seq| {
            crate::operation::SignedOperation::sign(
                &key,
                crate::operation::LogId::Dataset(log.into()),
                seq,
                Some(p2panda_core::Hash::digest(b"version before")),
                1,
                m.encode(),
            )
        };
        let signed = SignedManifest::from_operation(sign("weather", 3)).unwrap();
        let bytes = signed.encode();
        assert_eq!(SignedManifest::decode(&bytes).unwrap(), signed);
        // Any flipped byte is caught: by CBOR, the signature, the payload hash or the manifest.
        for i in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(SignedManifest::decode(&bad).is_err(), "byte {i} flipped");
        }
        // A valid signature over the manifest in another log or at another position is refused.
        assert!(matches!(
            SignedManifest::from_operation(sign("other", 3)),
            Err(ManifestError::BadSignature(_))
        ));
        assert!(SignedManifest::from_operation(sign("weather", 4)).is_err());
        assert!(matches!(
            SignedManifest::decode(&m.encode()),
            Err(ManifestError::NotSigned(_))
        ));
    }

    #[test]
    fn dataset_names() {
        assert!(validate_dataset_name("weather_2026-11").is_ok());
        for bad in ["", "a/b", "a.b", "a b", "ü", &"x".repeat(201)] {
            assert!(validate_dataset_name(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_partition_gives_a_valid_manifest(lengths in proptest::collection::vec(1u64..1_000_000, 0..20)) {
            let m = manifest(&lengths);
            prop_assert_eq!(m.blobs.len(), lengths.len() + 1);
            prop_assert_eq!(DatasetManifest::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = DatasetManifest::decode(&bytes);
        }
    }
}
