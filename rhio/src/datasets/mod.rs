//! Datasets: Parquet files as signed, versioned datasets in the cluster's S3.
//!
//! - [`import`]: `rhio.import` turns a file into row-group blobs, a multipart-uploaded object
//!   and a signed manifest, announced on the dataset subject.
//! - [`replicate`]: accepted datasets of other authors are copied in, verified, from peers.
//! - [`transfers`]: durable state of replications (parts uploaded, versions complete, failed)
//!   and the announcement outbox's queue.
//! - [`outbox`]: announces every version that became available, until JetStream acknowledged.

pub mod import;
pub mod outbox;
pub mod replicate;
pub mod transfers;

use rhio_core::manifest::DatasetManifest;
use rhio_core::operation::SignedOperation;

/// Publishes a version's summary on the local JetStream `subject` with the provenance headers of
/// its manifest operation; `location` is where the file is in *this* cluster's S3.
pub async fn announce(
    js: &async_nats::jetstream::Context,
    subject: &str,
    manifest: &DatasetManifest,
    op: &SignedOperation,
    location: &str,
) -> Result<(), String> {
    let summary = serde_json::json!({
        "dataset": manifest.dataset,
        "version": manifest.version,
        "author": manifest.author,
        "file_hash": manifest.file_hash,
        "rows": manifest.rows,
        "row_groups": manifest.blobs.len().saturating_sub(1),
        "bytes": manifest.file_size,
        "schema": manifest.schema,
        "location": location,
        "created_at_micros": manifest.created_at_micros,
        "operation": op.hash.to_hex().to_string(),
    });
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in rhio_core::message::provenance_headers(op) {
        headers.insert(name, value.as_str());
    }
    js.publish_with_headers(subject.to_string(), headers, summary.to_string().into())
        .await
        .map_err(|err| err.to_string())?
        .await
        .map(|_| ())
        .map_err(|err| err.to_string())
}
