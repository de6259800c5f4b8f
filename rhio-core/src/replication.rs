//! Replication planning: which bytes of a dataset version a cluster must fetch, which it already
//! has, and how the whole-file hash is checked from parts uploaded in any order.
//!
//! A replicated version is written as an S3 multipart upload of fixed-size parts (a power of
//! two, so that each part is a complete subtree of the file's BLAKE3 tree). Each part is made of
//! pieces: byte ranges of the manifest's blobs. A piece of a blob the cluster already holds (in
//! any dataset or version, found by blob hash) is read inside the cluster; every other piece is
//! fetched from peers as a bao-verified range. Each part's BLAKE3 chaining value is kept with its
//! upload, so [`file_hash_from_parts`] checks the whole file against the signed manifest without
//! reading it again, even when the transfer resumed after a crash.
//!
//! ```
//! use rhio_core::replication::{file_hash_from_parts, part_chaining_value};
//! let data = vec![7u8; 40_000];
//! let part = 16 * 1024;
//! let cvs: Vec<_> = data
//!     .chunks(part)
//!     .enumerate()
//!     .map(|(i, bytes)| part_chaining_value((i * part) as u64, bytes))
//!     .collect();
//! assert_eq!(file_hash_from_parts(&cvs, part as u64, data.len() as u64, None), blake3::hash(&data));
//! ```

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::manifest::DatasetManifest;

/// Where a blob the cluster already holds lies in its S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBlob {
    pub key: String,
    /// Offset of the blob inside the object.
    pub offset: u64,
}

/// Where the bytes of one piece come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceSource {
    /// Read from this cluster's S3.
    Local(LocalBlob),
    /// Fetched from peers, verified against the blob's bao root.
    Remote,
}

/// A byte range of one blob that lies inside one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Index of the blob in the manifest.
    pub blob: usize,
    /// Byte range inside the blob.
    pub start: u64,
    pub end: u64,
    pub source: PieceSource,
}

impl Piece {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// One part of the multipart upload: `[offset, offset + length)` of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartPlan {
    /// S3 part number (from 1).
    pub number: u32,
    pub offset: u64,
    pub length: u64,
    pub pieces: Vec<Piece>,
}

impl PartPlan {
    /// Bytes of this part that come from peers.
    pub fn remote_bytes(&self) -> u64 {
        self.pieces
            .iter()
            .filter(|p| p.source == PieceSource::Remote)
            .map(Piece::len)
            .sum()
    }
}

/// What replicating one version takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationPlan {
    pub part_size: u64,
    pub parts: Vec<PartPlan>,
    /// Blobs (by manifest index) that must come from peers.
    pub remote_blobs: Vec<usize>,
    /// Bytes of those blobs.
    pub remote_bytes: u64,
    /// Bytes found in this cluster already.
    pub local_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("part size {0} must be a power of two of at least 5 MiB (S3's smallest part)")]
    BadPartSize(u64),
    #[error("file of {0} bytes needs more than 10,000 parts of {1} bytes")]
    TooManyParts(u64, u64),
}

/// Smallest part S3 accepts (except for the last one).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Most parts one multipart upload may have.
pub const MAX_PARTS: u64 = 10_000;

/// The part size for a file of `file_len` bytes: `configured`, doubled until the file fits in
/// [`MAX_PARTS`] parts, so every object size S3 accepts (5 TiB) can be uploaded (with parts of
/// at most 1 GiB from an 8 MiB start). A power of two stays a power of two. Deterministic, so a
/// resumed transfer uses the same parts.
pub fn part_size_for(file_len: u64, configured: u64) -> u64 {
    let mut part = configured.max(1);
    while file_len.div_ceil(part) > MAX_PARTS {
        part *= 2;
    }
    part
}

/// Plans a version: `local` answers where a blob (by BLAKE3 hex) already is in this cluster.
/// The manifest must be validated (its blobs cover the file exactly).
pub fn plan(
    manifest: &DatasetManifest,
    part_size: u64,
    local: impl Fn(&str) -> Option<LocalBlob>,
) -> Result<ReplicationPlan, PlanError> {
    if !part_size.is_power_of_two() || part_size < MIN_PART_SIZE {
        return Err(PlanError::BadPartSize(part_size));
    }
    let file_len = manifest.file_size;
    let count = file_len.div_ceil(part_size).max(1);
    if count > MAX_PARTS {
        return Err(PlanError::TooManyParts(file_len, part_size));
    }
    let sources: Vec<PieceSource> = manifest
        .blobs
        .iter()
        .map(|blob| local(&blob.hash).map_or(PieceSource::Remote, PieceSource::Local))
        .collect();
    let mut parts = Vec::with_capacity(count as usize);
    let mut blob = 0;
    for index in 0..count {
        let offset = index * part_size;
        let end = (offset + part_size).min(file_len);
        let mut pieces = Vec::new();
        // Blobs are sorted and contiguous; walk them alongside the parts.
        while blob < manifest.blobs.len() {
            let entry = &manifest.blobs[blob];
            let blob_end = entry.offset + entry.length;
            let start = offset.max(entry.offset);
            let stop = end.min(blob_end);
            if start < stop {
                pieces.push(Piece {
                    blob,
                    start: start - entry.offset,
                    end: stop - entry.offset,
                    source: sources[blob].clone(),
                });
            }
            if blob_end <= end {
                blob += 1;
            } else {
                break;
            }
        }
        parts.push(PartPlan {
            number: index as u32 + 1,
            offset,
            length: end - offset,
            pieces,
        });
    }
    let mut remote_blobs = Vec::new();
    let (mut remote_bytes, mut local_bytes) = (0, 0);
    for (index, source) in sources.iter().enumerate() {
        let length = manifest.blobs[index].length;
        if *source == PieceSource::Remote {
            remote_blobs.push(index);
            remote_bytes += length;
        } else {
            local_bytes += length;
        }
    }
    Ok(ReplicationPlan {
        part_size,
        parts,
        remote_blobs,
        remote_bytes,
        local_bytes,
    })
}

/// The BLAKE3 chaining value of the part starting at `offset` (a multiple of the part size).
pub fn part_chaining_value(offset: u64, bytes: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    hasher.update(bytes);
    hasher.finalize_non_root()
}

/// The whole file's BLAKE3 from the chaining values of its parts (in order, each of
/// `part_size` bytes but the last). A file of one part has no parent node: its hash must be
/// computed directly and given as `single`.
pub fn file_hash_from_parts(
    cvs: &[ChainingValue],
    part_size: u64,
    file_len: u64,
    single: Option<blake3::Hash>,
) -> blake3::Hash {
    if cvs.len() <= 1 {
        return single.unwrap_or_else(|| blake3::hash(&[]));
    }
    let (left, right) = split(cvs, part_size, file_len);
    merge_subtrees_root(&left, &right, Mode::Hash)
}

/// Chaining values of the left and right subtrees of `[0, len)` covered by `cvs`.
fn split(cvs: &[ChainingValue], part_size: u64, len: u64) -> (ChainingValue, ChainingValue) {
    let left_len = left_subtree_len(len);
    let left_parts = (left_len / part_size) as usize;
    (
        subtree(&cvs[..left_parts], part_size, left_len),
        subtree(&cvs[left_parts..], part_size, len - left_len),
    )
}

fn subtree(cvs: &[ChainingValue], part_size: u64, len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (left, right) = split(cvs, part_size, len);
    merge_subtrees_non_root(&left, &right, Mode::Hash)
}

#[cfg(test)]
mod tests {

    #[test]
    fn part_size_grows_until_any_s3_object_fits() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size_for(0, 8 * MIB), 8 * MIB);
        assert_eq!(part_size_for(80 * 1024 * MIB, 8 * MIB), 16 * MIB);
        assert_eq!(part_size_for(10_000 * 8 * MIB, 8 * MIB), 8 * MIB);
        assert_eq!(part_size_for(10_000 * 8 * MIB + 1, 8 * MIB), 16 * MIB);
        let five_tib = 5 * 1024 * 1024 * MIB;
        let part = part_size_for(five_tib, 8 * MIB);
        assert!(part.is_power_of_two() && part <= 1024 * MIB);
        assert!(five_tib.div_ceil(part) <= MAX_PARTS);
        assert_eq!(part_size_for(five_tib, 5 * MIB) % (5 * MIB), 0);
    }

    use super::*;
    use crate::identity::PrivateKey;
    use crate::manifest::{BlobEntry, BlobKind};
    use proptest::prelude::*;

    const MIB: u64 = 1024 * 1024;

    fn hashes(data: &[u8], part: u64) -> blake3::Hash {
        let cvs: Vec<_> = data
            .chunks(part as usize)
            .enumerate()
            .map(|(i, bytes)| part_chaining_value(i as u64 * part, bytes))
            .collect();
        let single = (cvs.len() <= 1).then(|| blake3::hash(data));
        file_hash_from_parts(&cvs, part, data.len() as u64, single)
    }

    #[test]
    fn file_hash_from_parts_matches_blake3() {
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 12345u32)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for part in [1024u64, 4096, 65536, 1 << 20] {
            for len in [
                0usize,
                1,
                1024,
                1025,
                part as usize,
                part as usize + 1,
                3 * part as usize,
                3 * part as usize - 7,
                data.len(),
            ] {
                let len = len.min(data.len());
                assert_eq!(
                    hashes(&data[..len], part),
                    blake3::hash(&data[..len]),
                    "part {part} len {len}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn any_length_and_part_size(len in 0usize..200_000, log in 10u32..16) {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            prop_assert_eq!(hashes(&data, 1 << log), blake3::hash(&data));
        }
    }

    fn manifest(lengths: &[u64]) -> DatasetManifest {
        let mut offset = 0;
        let blobs: Vec<BlobEntry> = lengths
            .iter()
            .enumerate()
            .map(|(i, &length)| {
                let entry = BlobEntry {
                    kind: if i + 1 == lengths.len() {
                        BlobKind::Footer
                    } else {
                        BlobKind::RowGroup
                    },
                    offset,
                    length,
                    rows: 0,
                    hash: blake3::hash(&(i as u64).to_le_bytes()).to_hex().to_string(),
                };
                offset += length;
                entry
            })
            .collect();
        DatasetManifest {
            dataset: "d".into(),
            version: 0,
            author: PrivateKey::generate().public_key(),
            created_at_micros: 0,
            file_size: offset,
            file_hash: blake3::hash(b"").to_hex().to_string(),
            schema: String::new(),
            rows: 0,
            blobs,
        }
    }

    #[test]
    fn parts_cover_the_file_and_pieces_cover_each_part() {
        let m = manifest(&[3 * MIB, 9 * MIB, 1, 20 * MIB + 5, 4000]);
        let plan = plan(&m, 8 * MIB, |_| None).unwrap();
        assert_eq!(plan.parts.len() as u64, m.file_size.div_ceil(8 * MIB));
        let mut covered = 0;
        for part in &plan.parts {
            assert_eq!(part.offset, covered);
            let mut at = part.offset;
            for piece in &part.pieces {
                let blob = &m.blobs[piece.blob];
                assert_eq!(blob.offset + piece.start, at);
                assert!(piece.end <= blob.length && !piece.is_empty());
                at += piece.len();
            }
            assert_eq!(at, part.offset + part.length);
            covered += part.length;
        }
        assert_eq!(covered, m.file_size);
        assert_eq!(plan.remote_bytes, m.file_size);
        assert_eq!(plan.remote_blobs, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn blobs_present_locally_are_not_fetched() {
        let m = manifest(&[6 * MIB, 6 * MIB, 6 * MIB, 100]);
        let have = m.blobs[1].hash.clone();
        let plan = plan(&m, 8 * MIB, |hash| {
            (hash == have).then(|| LocalBlob {
                key: "datasets/d/v0.parquet".into(),
                offset: 6 * MIB,
            })
        })
        .unwrap();
        assert_eq!(plan.remote_blobs, vec![0, 2, 3]);
        assert_eq!(plan.local_bytes, 6 * MIB);
        assert_eq!(plan.remote_bytes, 12 * MIB + 100);
        let fetched: u64 = plan.parts.iter().map(PartPlan::remote_bytes).sum();
        assert_eq!(fetched, plan.remote_bytes);
    }

    #[test]
    fn part_size_must_suit_s3_and_the_hash_tree() {
        let m = manifest(&[100, 100]);
        assert!(matches!(
            plan(&m, 6 * MIB, |_| None),
            Err(PlanError::BadPartSize(_))
        ));
        assert!(matches!(
            plan(&m, MIB, |_| None),
            Err(PlanError::BadPartSize(_))
        ));
        assert_eq!(plan(&m, 8 * MIB, |_| None).unwrap().parts.len(), 1);
    }
}
