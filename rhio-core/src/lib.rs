//! `rhio-core`: the formats and pure logic of rhio, without I/O.
//!
//! This crate owns what every rhio process must agree on byte for byte: how keys are written,
//! how a network name becomes a network id, and (as the node grows) the signed operation format,
//! subject matching, Parquet row-group partitioning and dataset manifests. Nothing here touches a
//! socket, a file or a clock it was not handed, so all of it is unit-tested without servers.
//!
//! ```
//! use rhio_core::identity::{PrivateKey, PublicKey};
//!
//! let key = PrivateKey::generate();
//! let public: PublicKey = key.public_key();
//! let parsed: PublicKey = public.to_hex().parse().unwrap();
//! assert_eq!(parsed, public);
//! ```

pub mod identity;
pub mod message;
pub mod network;
pub mod operation;
pub mod subject;
pub mod sync;
