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
