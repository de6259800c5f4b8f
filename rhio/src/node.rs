//! Starting and stopping a node: the order in which subsystems come up and go down.

use std::sync::Arc;
use std::time::Duration;

use rhio_core::identity::PrivateKey;
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::nats::{NatsConnection, NatsError};
use crate::network::{Network, NetworkError};
use crate::s3::{S3Error, S3Store};
use crate::status::StatusSource;

/// How often the S3 bucket is re-checked in the background.
const S3_CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("cannot bind the HTTP server to {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A running node.
pub struct Node {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    nats: NatsConnection,
    network: Network,
    status: StatusSource,
    http_addr: std::net::SocketAddr,
}

impl Node {
    pub async fn start(config: Config, key: PrivateKey) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.node.data_dir).map_err(|source| StartError::DataDir {
            path: config.node.data_dir.clone(),
            source,
        })?;
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let mut tasks = JoinSet::new();

        let nats = NatsConnection::connect(&config.nats, config.nats_auth()?).await?;

        let s3 = S3Store::new(&config.s3)?;
        match s3.check_bucket().await {
            Ok(()) => {
                tracing::info!(endpoint = %config.s3.endpoint, bucket = %config.s3.bucket, "S3 bucket ready")
            }
            // Unreachable is a state (the probe keeps trying); a missing bucket or refused
            // access is a configuration problem the operator must fix.
            Err(err @ S3Error::Unavailable { .. }) => {
                tracing::warn!(%err, "S3 is not reachable yet; starting degraded and retrying")
            }
            Err(err) => return Err(err.into()),
        }
        tasks.spawn(crate::s3::watch_bucket(
            s3.clone(),
            metrics.clone(),
            S3_CHECK_INTERVAL,
            shutdown.clone(),
        ));

        let network =
            Network::spawn(&config.network, &key, metrics.clone(), shutdown.clone()).await?;

        let status = StatusSource::new(key.public_key(), nats.clone(), s3, network.clone());
        tasks.spawn(crate::nats::serve_status(
            nats.clone(),
            status.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let (http_addr, http) =
            crate::http::bind(config.http.bind, status.clone(), metrics, shutdown.clone())
                .await
                .map_err(|source| StartError::Http {
                    addr: config.http.bind,
                    source,
                })?;
        tasks.spawn(http);
        tracing::info!(%http_addr, "HTTP server listening (/health, /metrics)");

        Ok(Self {
            shutdown,
            tasks,
            nats,
            network,
            status,
            http_addr,
        })
    }

    pub fn status(&self) -> &StatusSource {
        &self.status
    }

    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http_addr
    }

    /// Stops accepting work, lets tasks finish, flushes NATS and closes the QUIC endpoint.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.nats.flush().await;
        self.network.close().await;
    }
}
