//! Parquet footers from users' files (import) and from S3: partitioning arbitrary bytes never
//! panics, and a partition that is returned covers the file exactly, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rhio_core::parquet::partition_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(partition) = partition_bytes(data) {
        let mut offset = 0;
        for range in partition.ranges() {
            assert_eq!(range.offset, offset);
            offset = range.end();
        }
        assert_eq!(offset, data.len() as u64);
    }
});
