//! `rhio-core`: the formats and pure logic of rhio, without I/O.
//!
//! This crate owns what every rhio process must agree on byte for byte: the node's NATS API
//! (subjects, requests, replies and error codes, shared by node and clients), how keys are written,
//! how a network name becomes a network id, the signed operation format and routed message
//! bodies with their provenance headers, subject filters, the sync protocol's frames, the
//! row-group partition of Parquet files, the S3 layout, dataset manifests (and their signed
//! form), the OCI artifact of a version, blob range requests and the replication plan (which
//! bytes to fetch, and the whole-file hash from parts), and the broadcast state machine of the
//! federation with its deterministic simulator, and the one retry policy (backoff with jitter). Nothing here touches a socket, a file or
//! a clock it was not handed, so all of it is unit-tested without servers.
//!
//! ```
//! use rhio_core::identity::{PrivateKey, PublicKey};
//!
//! let key = PrivateKey::generate();
//! let public: PublicKey = key.public_key();
//! let parsed: PublicKey = public.to_hex().parse().unwrap();
//! assert_eq!(parsed, public);
//! ```

pub mod api;
pub mod blobs;
pub mod broadcast;
pub mod identity;
pub mod layout;
pub mod lifecycle;
pub mod manifest;
pub mod message;
pub mod network;
pub mod oci;
pub mod operation;
pub mod parquet;
pub mod replication;
pub mod retry;
pub mod simulator;
pub mod subject;
pub mod sync;
