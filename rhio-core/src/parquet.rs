//! Row-group partition of a Parquet file: contiguous byte ranges that cover the file exactly,
//! one per row group plus a final footer range, so that the file can be rebuilt byte for byte by
//! concatenating them and a row group shared by two files (or versions) is recognised by its
//! hash.
//!
//! The leading `PAR1` magic goes with the first row group; anything between two row groups
//! (bloom filters some writers put there) goes with the following one; page indexes, bloom
//! filters written at the end, the footer metadata, its length and the trailing magic form the
//! footer range. Reading is split in two pure steps so the caller does the I/O:
//! [`footer_length`] from the last 8 bytes, then [`partition`] from the first 4 bytes and the
//! footer.

use parquet::file::metadata::{FooterTail, ParquetMetaDataReader};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `PAR1`
pub const MAGIC: &[u8; 4] = b"PAR1";
/// Footer length (4 bytes, little endian) and trailing magic.
pub const TAIL_LEN: usize = 8;
/// Smallest possible Parquet file: two magics and a footer length.
pub const MIN_FILE_LEN: u64 = 12;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PartitionError {
    #[error("the file is empty")]
    Empty,
    #[error("not a Parquet file: {0}")]
    NotParquet(String),
    #[error("corrupt Parquet file: {0}")]
    Corrupt(String),
    #[error("encrypted Parquet footers are not supported")]
    Encrypted,
}

impl PartitionError {
    /// The stable error code of the `rhio.import` reply.
    pub fn error_code(&self) -> crate::api::ErrorCode {
        use crate::api::ErrorCode;
        match self {
            PartitionError::Empty | PartitionError::NotParquet(_) => ErrorCode::NotParquet,
            PartitionError::Corrupt(_) | PartitionError::Encrypted => ErrorCode::CorruptParquet,
        }
    }

    /// The stable code of the import reply (`not_parquet`, `corrupt_parquet`).
    pub fn code(&self) -> &'static str {
        self.error_code().as_str()
    }
}

/// A byte range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

impl ByteRange {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// One row group's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowGroupRange {
    /// Index of the row group in the footer metadata.
    pub index: usize,
    pub range: ByteRange,
    pub rows: u64,
}

/// The partition of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub file_len: u64,
    /// Row groups in file order; together with `footer` they cover the file exactly.
    pub row_groups: Vec<RowGroupRange>,
    pub footer: ByteRange,
    pub rows: u64,
    /// The Parquet schema in its text form (`message schema { ... }`).
    pub schema: String,
}

impl Partition {
    /// All ranges in file order (row groups, then the footer).
    pub fn ranges(&self) -> impl Iterator<Item = ByteRange> + '_ {
        self.row_groups
            .iter()
            .map(|rg| rg.range)
            .chain(std::iter::once(self.footer))
    }
}

/// From the file length and its last 8 bytes: how many bytes at the end of the file hold the
/// footer (metadata, its length and the magic).
pub fn footer_length(file_len: u64, tail: &[u8; TAIL_LEN]) -> Result<u64, PartitionError> {
    if file_len == 0 {
        return Err(PartitionError::Empty);
    }
    if file_len < MIN_FILE_LEN {
        return Err(PartitionError::NotParquet(format!(
            "{file_len} bytes is shorter than any Parquet file"
        )));
    }
    if &tail[4..] != MAGIC {
        if &tail[4..] == b"PARE" {
            return Err(PartitionError::Encrypted);
        }
        return Err(PartitionError::NotParquet(
            "the file does not end with PAR1 (truncated, or not Parquet)".into(),
        ));
    }
    let footer =
        FooterTail::try_new(tail).map_err(|err| PartitionError::Corrupt(err.to_string()))?;
    let length = footer.metadata_length() as u64 + TAIL_LEN as u64;
    if length + MAGIC.len() as u64 > file_len {
        return Err(PartitionError::Corrupt(format!(
            "footer of {length} bytes does not fit in a file of {file_len} bytes"
        )));
    }
    Ok(length)
}

/// Partitions a file of `file_len` bytes, given its first 4 bytes and its last
/// [`footer_length`] bytes.
pub fn partition(file_len: u64, head: &[u8], footer: &[u8]) -> Result<Partition, PartitionError> {
    if file_len == 0 {
        return Err(PartitionError::Empty);
    }
    if head.get(..4) != Some(MAGIC.as_slice()) {
        return Err(PartitionError::NotParquet(
            "the file does not start with PAR1".into(),
        ));
    }
    let tail: &[u8; TAIL_LEN] = footer
        .get(footer.len().saturating_sub(TAIL_LEN)..)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| PartitionError::Corrupt("footer is shorter than 8 bytes".into()))?;
    let footer_len = footer_length(file_len, tail)?;
    if footer_len != footer.len() as u64 {
        return Err(PartitionError::Corrupt(format!(
            "expected a footer of {footer_len} bytes, got {}",
            footer.len()
        )));
    }
    let metadata = ParquetMetaDataReader::decode_metadata(&footer[..footer.len() - TAIL_LEN])
        .map_err(|err| PartitionError::Corrupt(format!("footer metadata: {err}")))?;
    let footer_start = file_len - footer_len;

    let mut ranges = Vec::with_capacity(metadata.num_row_groups());
    for (index, row_group) in metadata.row_groups().iter().enumerate() {
        let corrupt = |what: String| PartitionError::Corrupt(format!("row group {index}: {what}"));
        let mut start = u64::MAX;
        let mut end = 0u64;
        for column in row_group.columns() {
            let chunk_start = column
                .dictionary_page_offset()
                .unwrap_or_else(|| column.data_page_offset());
            let length = column.compressed_size();
            if chunk_start < MAGIC.len() as i64 || length < 0 {
                return Err(corrupt(format!(
                    "column chunk at {chunk_start} with {length} bytes"
                )));
            }
            let chunk_end = (chunk_start as u64)
                .checked_add(length as u64)
                .ok_or_else(|| corrupt("column chunk end overflows".into()))?;
            start = start.min(chunk_start as u64);
            end = end.max(chunk_end);
        }
        if row_group.columns().is_empty() {
            return Err(corrupt("no column chunks".into()));
        }
        if end > footer_start {
            return Err(corrupt(format!(
                "data ends at {end}, after the footer starts at {footer_start}"
            )));
        }
        let rows = u64::try_from(row_group.num_rows())
            .map_err(|_| corrupt(format!("{} rows", row_group.num_rows())))?;
        ranges.push((start, end, index, rows));
    }
    ranges.sort_unstable();

    let mut row_groups = Vec::with_capacity(ranges.len());
    let mut previous_end = 0u64;
    let mut rows = 0u64;
    for (start, end, index, group_rows) in ranges {
        if start < previous_end {
            return Err(PartitionError::Corrupt(format!(
                "row group {index} starts at {start}, inside the previous one ending at {previous_end}"
            )));
        }
        row_groups.push(RowGroupRange {
            index,
            range: ByteRange {
                offset: previous_end,
                length: end - previous_end,
            },
            rows: group_rows,
        });
        previous_end = end;
        rows = rows
            .checked_add(group_rows)
            .ok_or_else(|| PartitionError::Corrupt("row count overflows".into()))?;
    }
    let declared = u64::try_from(metadata.file_metadata().num_rows()).unwrap_or(u64::MAX);
    if declared != rows {
        return Err(PartitionError::Corrupt(format!(
            "footer declares {declared} rows, its row groups hold {rows}"
        )));
    }
    let mut schema = Vec::new();
    parquet::schema::printer::print_schema(&mut schema, metadata.file_metadata().schema());
    Ok(Partition {
        file_len,
        row_groups,
        footer: ByteRange {
            offset: previous_end,
            length: file_len - previous_end,
        },
        rows,
        schema: String::from_utf8_lossy(&schema).trim_end().to_string(),
    })
}

/// Partitions a whole file held in memory (tests, small files, the client's verification).
pub fn partition_bytes(file: &[u8]) -> Result<Partition, PartitionError> {
    let file_len = file.len() as u64;
    if file.is_empty() {
        return Err(PartitionError::Empty);
    }
    let tail: &[u8; TAIL_LEN] = file
        .get(file.len().saturating_sub(TAIL_LEN)..)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| {
            PartitionError::NotParquet(format!("{file_len} bytes is shorter than any Parquet file"))
        })?;
    let footer_len = footer_length(file_len, tail)?;
    partition(
        file_len,
        &file[..4],
        &file[(file_len - footer_len) as usize..],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::{EnabledStatistics, WriterProperties};
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use proptest::prelude::*;

    /// Writes a file with the parquet crate's low-level writer.
    fn write_file(
        row_groups: usize,
        rows_per_group: usize,
        compression: Compression,
        page_index: bool,
        bloom: bool,
        nested: bool,
    ) -> Vec<u8> {
        let schema = if nested {
            "message schema { REQUIRED INT64 id; OPTIONAL GROUP tags (LIST) { REPEATED GROUP list { OPTIONAL BYTE_ARRAY element (UTF8); } } }"
        } else {
            "message schema { REQUIRED INT64 id; REQUIRED BYTE_ARRAY name (UTF8); }"
        };
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let props = WriterProperties::builder()
            .set_compression(compression)
            .set_statistics_enabled(if page_index {
                EnabledStatistics::Page
            } else {
                EnabledStatistics::Chunk
            })
            .set_bloom_filter_enabled(bloom)
            .build();
        let mut out = Vec::new();
        let mut writer = SerializedFileWriter::new(&mut out, schema, Arc::new(props)).unwrap();
        for group in 0..row_groups {
            let mut rg = writer.next_row_group().unwrap();
            let ids: Vec<i64> = (0..rows_per_group as i64)
                .map(|i| i + (group * rows_per_group) as i64)
                .collect();
            let mut column = rg.next_column().unwrap().unwrap();
            column
                .typed::<Int64Type>()
                .write_batch(&ids, None, None)
                .unwrap();
            column.close().unwrap();
            let mut column = rg.next_column().unwrap().unwrap();
            let names: Vec<ByteArray> = ids
                .iter()
                .map(|i| ByteArray::from(format!("name-{i}").as_str()))
                .collect();
            if nested {
                // One element per list, every third list null.
                let def: Vec<i16> = ids.iter().map(|i| if i % 3 == 0 { 0 } else { 3 }).collect();
                let rep = vec![0i16; ids.len()];
                let values: Vec<ByteArray> = names
                    .iter()
                    .zip(&def)
                    .filter(|(_, d)| **d == 3)
                    .map(|(n, _)| n.clone())
                    .collect();
                column
                    .typed::<ByteArrayType>()
                    .write_batch(&values, Some(&def), Some(&rep))
                    .unwrap();
            } else {
                column
                    .typed::<ByteArrayType>()
                    .write_batch(&names, None, None)
                    .unwrap();
            }
            column.close().unwrap();
            rg.close().unwrap();
        }
        writer.close().unwrap();
        out
    }

    fn check_covers(file: &[u8], partition: &Partition) {
        let mut rebuilt = Vec::with_capacity(file.len());
        let mut next = 0;
        for range in partition.ranges() {
            assert_eq!(range.offset, next, "ranges are contiguous");
            rebuilt.extend_from_slice(&file[range.offset as usize..range.end() as usize]);
            next = range.end();
        }
        assert_eq!(rebuilt, file, "concatenated ranges give back the file");
    }

    #[test]
    fn single_row_group_and_zero_rows() {
        let file = write_file(1, 10, Compression::UNCOMPRESSED, false, false, false);
        let partition = partition_bytes(&file).unwrap();
        assert_eq!(partition.row_groups.len(), 1);
        assert_eq!(partition.rows, 10);
        assert!(partition.schema.contains("name"));
        check_covers(&file, &partition);

        let empty = write_file(0, 0, Compression::UNCOMPRESSED, false, false, false);
        let partition = partition_bytes(&empty).unwrap();
        assert!(partition.row_groups.is_empty());
        assert_eq!(partition.footer.offset, 0);
        check_covers(&empty, &partition);
    }

    #[test]
    fn bad_files_get_the_right_error() {
        assert_eq!(partition_bytes(b""), Err(PartitionError::Empty));
        assert_eq!(partition_bytes(b"PAR1").unwrap_err().code(), "not_parquet");
        assert_eq!(
            partition_bytes(b"hello, this is a csv file,1,2,3\n")
                .unwrap_err()
                .code(),
            "not_parquet"
        );
        let file = write_file(3, 100, Compression::SNAPPY, true, false, false);
        // Truncated: the end magic is gone.
        assert_eq!(
            partition_bytes(&file[..file.len() - 1]).unwrap_err().code(),
            "not_parquet"
        );
        // A footer length pointing outside the file.
        let mut broken = file.clone();
        let n = broken.len();
        broken[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            partition_bytes(&broken).unwrap_err().code(),
            "corrupt_parquet"
        );
        // Garbage in the metadata.
        let mut garbage = file.clone();
        let meta_len = u32::from_le_bytes(garbage[n - 8..n - 4].try_into().unwrap()) as usize;
        for byte in &mut garbage[n - 8 - meta_len..n - 8] {
            *byte = 0xff;
        }
        assert_eq!(
            partition_bytes(&garbage).unwrap_err().code(),
            "corrupt_parquet"
        );
        // Head magic missing.
        let mut headless = file.clone();
        headless[0] = b'X';
        assert_eq!(
            partition_bytes(&headless).unwrap_err().code(),
            "not_parquet"
        );
    }

    fn compression() -> impl Strategy<Value = Compression> {
        prop_oneof![
            Just(Compression::UNCOMPRESSED),
            Just(Compression::SNAPPY),
            Just(Compression::ZSTD(Default::default())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn partition_covers_files_of_any_shape(
            row_groups in 0usize..6,
            rows in 1usize..300,
            compression in compression(),
            page_index in any::<bool>(),
            bloom in any::<bool>(),
            nested in any::<bool>(),
        ) {
            let file = write_file(row_groups, rows, compression, page_index, bloom, nested);
            let partition = partition_bytes(&file).unwrap();
            prop_assert_eq!(partition.row_groups.len(), row_groups);
            prop_assert_eq!(partition.rows, (row_groups * rows) as u64);
            prop_assert!(partition.row_groups.iter().all(|rg| rg.rows == rows as u64));
            check_covers(&file, &partition);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = partition_bytes(&bytes);
        }

        #[test]
        fn corrupted_footers_never_panic(flip in any::<usize>(), value in any::<u8>()) {
            let mut file = write_file(2, 50, Compression::SNAPPY, true, true, false);
            let n = file.len();
            let meta_len = u32::from_le_bytes(file[n - 8..n - 4].try_into().unwrap()) as usize;
            let i = n - 8 - meta_len + flip % meta_len;
            file[i] = value;
            if let Ok(partition) = partition_bytes(&file) {
                check_covers(&file, &partition);
            }
        }
    }
}
