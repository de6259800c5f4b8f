//! The cluster's state as Arrow tables that any language can read: `peers`, `datasets` and
//! `transfers`, built from the node's status and the dataset announcements.
//!
//! | table | columns |
//! |---|---|
//! | `peers` | `public_key` utf8, `addresses` utf8 (comma-separated), `state` utf8 (`connected`, `unreachable`), `last_seen_secs_ago` uint64?, `rtt_ms` float64?, `last_error` utf8? |
//! | `datasets` | `dataset` utf8, `author` utf8, `version` uint64, `rows` uint64, `bytes` uint64, `row_groups` uint64, `file_hash` utf8, `local` bool, `location` utf8, `created` timestamp(µs, UTC), `verified` bool |
//! | `transfers` | `dataset` utf8, `author` utf8, `version` uint64, `bytes_done` uint64, `bytes_total` uint64, `bytes_fetched` uint64, `rate_mib_s` float64, `parts_done` uint64, `parts_total` uint64, `peers` utf8 (comma-separated) |
//!
//! `?` marks nullable columns. The CLI prints them as aligned tables or writes them as JSON, CSV
//! or Parquet (`rhio-client state --format parquet --out state/`); Python gets `pyarrow.Table`s.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use serde_json::Value;

use crate::datasets::DatasetVersion;
use crate::{Client, ClientError};

/// The three tables.
#[derive(Debug, Clone)]
pub struct ClusterState {
    pub peers: RecordBatch,
    pub datasets: RecordBatch,
    pub transfers: RecordBatch,
}

impl ClusterState {
    /// The tables with their names, in a fixed order.
    pub fn tables(&self) -> [(&'static str, &RecordBatch); 3] {
        [
            ("peers", &self.peers),
            ("datasets", &self.datasets),
            ("transfers", &self.transfers),
        ]
    }
}

impl Client {
    /// The cluster's state as seen by its node (`rhio.status`) and its dataset stream.
    pub async fn cluster_state(&self, stream: &str) -> Result<ClusterState, ClientError> {
        let status = self.status_json().await?;
        let versions = self.datasets(stream).await?;
        Ok(ClusterState {
            peers: peers_table(&status),
            datasets: datasets_table(&versions),
            transfers: transfers_table(&status),
        })
    }
}

fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn uint64(name: &str) -> Field {
    Field::new(name, DataType::UInt64, false)
}

fn batch(fields: Vec<Field>, columns: Vec<ArrayRef>) -> RecordBatch {
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .expect("columns match their schema")
}

fn str_of(value: &Value) -> Option<String> {
    value.as_str().map(String::from)
}

fn joined(value: &Value) -> String {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().map_or_else(|| item.to_string(), String::from))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// `peers` from a status document.
pub fn peers_table(status: &Value) -> RecordBatch {
    let nodes = status["peers"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let column = |f: &dyn Fn(&Value) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(nodes.iter().map(f).collect::<Vec<_>>()))
    };
    batch(
        vec![
            utf8("public_key", false),
            utf8("addresses", false),
            utf8("state", false),
            Field::new("last_seen_secs_ago", DataType::UInt64, true),
            Field::new("rtt_ms", DataType::Float64, true),
            utf8("last_error", true),
        ],
        vec![
            column(&|n| Some(str_of(&n["public_key"]).unwrap_or_default())),
            column(&|n| Some(joined(&n["addresses"]))),
            column(&|n| {
                Some(
                    if n["connected"] == true {
                        "connected"
                    } else {
                        "unreachable"
                    }
                    .into(),
                )
            }),
            Arc::new(UInt64Array::from(
                nodes
                    .iter()
                    .map(|n| n["last_seen_secs_ago"].as_u64())
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                nodes
                    .iter()
                    .map(|n| n["rtt_ms"].as_f64())
                    .collect::<Vec<_>>(),
            )),
            column(&|n| str_of(&n["last_error"])),
        ],
    )
}

/// `datasets` from the announced versions (all of them are available in this cluster).
pub fn datasets_table(versions: &[DatasetVersion]) -> RecordBatch {
    let strings = |f: &dyn Fn(&DatasetVersion) -> String| -> ArrayRef {
        Arc::new(StringArray::from(
            versions.iter().map(f).collect::<Vec<_>>(),
        ))
    };
    let numbers = |f: &dyn Fn(&DatasetVersion) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from(
            versions.iter().map(f).collect::<Vec<_>>(),
        ))
    };
    batch(
        vec![
            utf8("dataset", false),
            utf8("author", false),
            uint64("version"),
            uint64("rows"),
            uint64("bytes"),
            uint64("row_groups"),
            utf8("file_hash", false),
            Field::new("local", DataType::Boolean, false),
            utf8("location", false),
            Field::new(
                "created",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("verified", DataType::Boolean, false),
        ],
        vec![
            strings(&|v| v.dataset.clone()),
            strings(&|v| v.author.clone()),
            numbers(&|v| v.version),
            numbers(&|v| v.rows),
            numbers(&|v| v.bytes),
            numbers(&|v| v.row_groups),
            strings(&|v| v.file_hash.clone()),
            Arc::new(BooleanArray::from(vec![true; versions.len()])),
            strings(&|v| v.location.clone()),
            Arc::new(
                TimestampMicrosecondArray::from(
                    versions
                        .iter()
                        .map(|v| v.created_at_micros as i64)
                        .collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(BooleanArray::from(
                versions
                    .iter()
                    .map(|v| v.problem.is_none())
                    .collect::<Vec<_>>(),
            )),
        ],
    )
}

/// `transfers` (replications in progress) from a status document.
pub fn transfers_table(status: &Value) -> RecordBatch {
    let rows = status["datasets"]["transfers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let strings = |f: &dyn Fn(&Value) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let numbers = |key: &str| -> ArrayRef {
        Arc::new(UInt64Array::from(
            rows.iter()
                .map(|r| r[key].as_u64().unwrap_or(0))
                .collect::<Vec<_>>(),
        ))
    };
    batch(
        vec![
            utf8("dataset", false),
            utf8("author", false),
            uint64("version"),
            uint64("bytes_done"),
            uint64("bytes_total"),
            uint64("bytes_fetched"),
            Field::new("rate_mib_s", DataType::Float64, false),
            uint64("parts_done"),
            uint64("parts_total"),
            utf8("peers", false),
        ],
        vec![
            strings(&|r| str_of(&r["dataset"]).unwrap_or_default()),
            strings(&|r| str_of(&r["author"]).unwrap_or_default()),
            numbers("version"),
            numbers("bytes_done"),
            numbers("bytes_total"),
            numbers("bytes_fetched"),
            Arc::new(Float64Array::from(
                rows.iter()
                    .map(|r| r["rate_mib_s"].as_f64().unwrap_or(0.0))
                    .collect::<Vec<_>>(),
            )),
            numbers("parts_done"),
            numbers("parts_total"),
            strings(&|r| joined(&r["peers"])),
        ],
    )
}

/// One cell as JSON (null for a null).
pub fn cell(array: &ArrayRef, row: usize) -> Value {
    if array.is_null(row) {
        return Value::Null;
    }
    let any = array.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        Value::from(a.value(row))
    } else if let Some(a) = any.downcast_ref::<UInt64Array>() {
        Value::from(a.value(row))
    } else if let Some(a) = any.downcast_ref::<Float64Array>() {
        Value::from(a.value(row))
    } else if let Some(a) = any.downcast_ref::<BooleanArray>() {
        Value::from(a.value(row))
    } else if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
        Value::from(rhio_core::oci::rfc3339_from_micros(
            a.value(row).max(0) as u64
        ))
    } else {
        Value::from(format!("<{}>", array.data_type()))
    }
}

/// A table's rows as JSON objects.
pub fn to_json_rows(batch: &RecordBatch) -> Vec<Value> {
    let schema = batch.schema();
    (0..batch.num_rows())
        .map(|row| {
            let mut object = serde_json::Map::new();
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                object.insert(field.name().clone(), cell(column, row));
            }
            Value::Object(object)
        })
        .collect()
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table as CSV (RFC 4180: a header line, fields with ',', '"' or newlines quoted).
pub fn to_csv(batch: &RecordBatch) -> String {
    let quote = |field: String| {
        if field.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", field.replace('"', "\"\""))
        } else {
            field
        }
    };
    let schema = batch.schema();
    let mut out = schema
        .fields()
        .iter()
        .map(|f| quote(f.name().clone()))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for row in 0..batch.num_rows() {
        let line: Vec<String> = batch
            .columns()
            .iter()
            .map(|column| quote(text(&cell(column, row))))
            .collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// A table as aligned text for people (long values shortened to `width` characters).
pub fn to_text(batch: &RecordBatch, width: usize) -> String {
    let schema = batch.schema();
    let mut rows: Vec<Vec<String>> =
        vec![schema.fields().iter().map(|f| f.name().clone()).collect()];
    for row in 0..batch.num_rows() {
        rows.push(
            batch
                .columns()
                .iter()
                .map(|column| {
                    let value = text(&cell(column, row));
                    if value.chars().count() > width {
                        let short: String = value.chars().take(width.saturating_sub(1)).collect();
                        format!("{short}…")
                    } else {
                        value
                    }
                })
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..schema.fields().len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(value, width)| format!("{value:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Writes a table as a Parquet file.
pub fn write_parquet(batch: &RecordBatch, path: &Path) -> Result<(), ClientError> {
    let io = |err: &dyn std::fmt::Display| ClientError::Io(format!("{}: {err}", path.display()));
    let file = std::fs::File::create(path).map_err(|err| io(&err))?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).map_err(|err| io(&err))?;
    writer.write(batch).map_err(|err| io(&err))?;
    writer.close().map_err(|err| io(&err))?;
    Ok(())
}

/// A table in the Arrow IPC stream format (how the Python package hands tables to pyarrow).
pub fn to_ipc(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut writer = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())
            .expect("IPC into a Vec");
        writer.write(batch).expect("IPC into a Vec");
        writer.finish().expect("IPC into a Vec");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_from_a_status_document_have_the_documented_columns() {
        let status = serde_json::json!({
            "peers": {"nodes": [
                {"public_key": "ab", "addresses": ["127.0.0.1:1", "[::1]:2"], "connected": true,
                 "rtt_ms": 0.5, "last_seen_secs_ago": 1, "last_error": null},
                {"public_key": "cd", "addresses": [], "connected": false,
                 "rtt_ms": null, "last_seen_secs_ago": null, "last_error": "timed out, \"x\""}
            ]},
            "datasets": {"transfers": [
                {"dataset": "weather", "author": "ab", "version": 3, "bytes_done": 10,
                 "bytes_total": 20, "bytes_fetched": 11, "rate_mib_s": 1.5, "parts_done": 1,
                 "parts_total": 2, "peers": ["ab", "cd"]}
            ]}
        });
        let peers = peers_table(&status);
        assert_eq!(peers.num_rows(), 2);
        let rows = to_json_rows(&peers);
        assert_eq!(rows[0]["state"], "connected");
        assert_eq!(rows[0]["addresses"], "127.0.0.1:1,[::1]:2");
        assert_eq!(rows[1]["rtt_ms"], Value::Null);
        let csv = to_csv(&peers);
        assert!(csv.starts_with("public_key,addresses,state,"), "{csv}");
        assert!(csv.contains("\"timed out, \"\"x\"\"\""), "{csv}");
        let transfers = transfers_table(&status);
        assert_eq!(to_json_rows(&transfers)[0]["peers"], "ab,cd");
        let datasets = datasets_table(&[]);
        assert_eq!(datasets.num_rows(), 0);
        assert_eq!(
            datasets
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>(),
            [
                "dataset",
                "author",
                "version",
                "rows",
                "bytes",
                "row_groups",
                "file_hash",
                "local",
                "location",
                "created",
                "verified"
            ]
        );
        assert!(
            to_text(&peers, 8)
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("ab ")
        );
        assert!(!to_ipc(&peers).is_empty());
    }
}
