//! Datasets: Parquet files as signed, versioned datasets in the cluster's S3.
//!
//! - [`import`]: `rhio.import` turns a file into row-group blobs, a multipart-uploaded object
//!   and a signed manifest, announced on the dataset subject.

pub mod import;
