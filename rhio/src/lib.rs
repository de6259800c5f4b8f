//! The rhio node: moves Parquet datasets and signed messages between clusters.
//!
//! One node runs per cluster beside a NATS JetStream server and an S3 store. This crate wires the
//! pure logic of `rhio-core` to those servers and to the other clusters' nodes:
//!
//! - [`config`]: defaults < file < `RHIO_*` environment < command line;
//! - [`keys`]: the node's Ed25519 key (file created with mode 0600, or from `RHIO_PRIVATE_KEY`);
//! - [`nats`]: the NATS connection (reconnects forever) and the `rhio.status` service;
//! - [`s3`]: the S3 client and the background bucket check;
//! - [`policy`]: members and routes, the plain policy every layer above asks;
//! - [`network`]: the p2panda-net/iroh QUIC endpoint and the known-node probes;
//! - [`http`]: `GET /health` and `GET /metrics`;
//! - [`store`]: the durable operation store (SQLite) with group commit;
//! - [`routing`]: signing local JetStream messages and delivering accepted remote ones;
//! - [`blobs`]: which row-group blobs this cluster holds, and `rhio/blobs/1` (serving and
//!   fetching bao-verified byte ranges of them);
//! - [`datasets`]: `rhio.import`, and replication of other authors' datasets into this S3;
//! - [`mirror`]: every available dataset version pushed to an OCI registry (Harbor);
//! - [`status`], [`metrics`]: the status document and Prometheus metrics;
//! - [`retry`]: the one backoff-with-jitter policy every retrying loop waits through;
//! - [`node`]: starts all of the above and shuts them down in order.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use rhio::config::{Config, ConfigSources};
//! let config = Config::load(&ConfigSources { file: Some("config.toml".into()), ..Default::default() })?;
//! let key = rhio::keys::load_or_create(&config.private_key_path(), None)?.key;
//! let node = rhio::node::Node::start(config, key).await?;
//! node.shutdown().await;
//! # Ok(()) }
//! ```

pub mod blobs;
pub mod config;
pub mod datasets;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod mirror;
pub mod nats;
pub mod network;
pub mod node;
pub mod policy;
pub mod retry;
pub mod routing;
pub mod s3;
pub mod status;
pub mod store;
