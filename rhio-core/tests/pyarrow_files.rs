//! The row-group partition on files written by pyarrow (the tool most producers use), made by
//! `dev/make_parquet.py` with the Python of `dev/localenv.py install`.

use std::path::PathBuf;
use std::process::Command;

use rhio_core::parquet::{Partition, partition_bytes};

fn python() -> PathBuf {
    let cache = std::env::var_os("RHIODEV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/rhio"));
    let python = cache.join("venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `python3 dev/localenv.py install` (./dev/test does)",
        python.display()
    );
    python
}

fn make_parquet(args: &[&str]) {
    // Cargo sets CARGO_MANIFEST_DIR when it runs tests; it names this checkout.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let script = manifest_dir.join("../dev/make_parquet.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "make_parquet.py {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn check_covers(file: &[u8], partition: &Partition) {
    let mut rebuilt = Vec::with_capacity(file.len());
    let mut next = 0;
    for range in partition.ranges() {
        assert_eq!(range.offset, next);
        rebuilt.extend_from_slice(&file[range.offset as usize..range.end() as usize]);
        next = range.end();
    }
    assert_eq!(rebuilt, file);
}

#[test]
fn pyarrow_files_of_many_shapes_partition_exactly() {
    let dir = tempfile::tempdir().unwrap();
    make_parquet(&["variants", dir.path().to_str().unwrap()]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    let variants = index.as_array().unwrap();
    assert!(variants.len() >= 7);
    for variant in variants {
        let name = variant["file"].as_str().unwrap();
        let file = std::fs::read(dir.path().join(name)).unwrap();
        let partition = partition_bytes(&file).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(partition.rows, variant["rows"].as_u64().unwrap(), "{name}");
        assert_eq!(
            partition.row_groups.len() as u64,
            variant["row_groups"].as_u64().unwrap(),
            "{name}"
        );
        check_covers(&file, &partition);
    }
}

#[test]
fn a_larger_pyarrow_file_partitions_into_its_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.parquet");
    make_parquet(&["sized", path.to_str().unwrap(), "24", "1536"]);
    let file = std::fs::read(&path).unwrap();
    let partition = partition_bytes(&file).unwrap();
    assert_eq!(partition.rows, 24 * 1024);
    assert_eq!(partition.row_groups.len(), 16);
    // Row groups of random bytes are about 1.5 MiB each; the footer is small.
    assert!(
        partition
            .row_groups
            .iter()
            .all(|rg| rg.range.length > 1 << 20)
    );
    assert!(partition.footer.length < 64 * 1024);
    check_covers(&file, &partition);
}
