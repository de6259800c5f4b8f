//! Starting and stopping a node: the order in which subsystems come up and go down.

use std::sync::Arc;
use std::time::Duration;

use rhio_core::identity::PrivateKey;
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::blobs::BlobIndex;
use crate::blobs::protocol::{BLOBS_ALPN, BlobServer};
use crate::config::{Config, ConfigError};
use crate::datasets::import::Importer;
use crate::datasets::outbox::Outbox;
use crate::datasets::replicate::Replicator;
use crate::datasets::transfers::TransferState;
use crate::metrics::Metrics;
use crate::nats::{NatsConnection, NatsError};
use crate::network::{Network, NetworkError};
use crate::routing::delivery::Delivery;
use crate::routing::outbound::Publisher;
use crate::routing::{Routes, StreamStates};
use crate::s3::{S3Error, S3Store};
use crate::status::StatusSource;
use crate::store::Store;

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
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Routing(String),
    #[error("replication: {0}")]
    Replication(#[from] crate::datasets::replicate::ReplicationError),
    #[error("registry mirror: {0}")]
    Mirror(String),
    #[error(transparent)]
    Members(#[from] crate::policy::members::MembersError),
    #[error("cannot start the transfer runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// How long the start waits for NATS before checking streams later instead.
const STREAM_CHECK_WAIT: Duration = Duration::from_secs(3);

/// Makes sure the configured streams exist before the node reports itself running, if NATS
/// answers within [`STREAM_CHECK_WAIT`]: missing streams are created when `nats.create_streams`
/// is set and fail the start otherwise. When NATS is down the routing tasks do the same once it
/// is up, and report problems in the log and in `rhio_routing_errors_total`.
async fn check_streams(
    nats: &NatsConnection,
    js: &async_nats::jetstream::Context,
    config: &Config,
) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + STREAM_CHECK_WAIT;
    while !nats.status().connected {
        if tokio::time::Instant::now() > deadline {
            tracing::warn!("NATS is not reachable yet; JetStream streams are checked once it is");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Dataset announcements need their stream, but a node that only routes messages does not:
    // a missing one is a warning (imports still work and say so when they cannot announce).
    let datasets = vec![format!("{}.>", config.datasets.subject_prefix)];
    if let Err(err) = crate::routing::ensure_stream(
        js,
        &config.datasets.stream,
        &datasets,
        config.nats.create_streams,
    )
    .await
    {
        tracing::warn!(%err, "datasets will not be announced on JetStream");
    }
    let mut streams: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for (stream, subjects) in config
        .publish
        .iter()
        .map(|p| (&p.stream, &p.subjects))
        .chain(config.subscribe.iter().map(|s| (&s.stream, &s.subjects)))
    {
        streams
            .entry(stream)
            .or_default()
            .extend(subjects.iter().cloned());
    }
    for (stream, subjects) in streams {
        crate::routing::ensure_stream(js, stream, &subjects, config.nats.create_streams)
            .await
            .map_err(|err| StartError::Routing(err.to_string()))?;
    }
    Ok(())
}

/// The runtime of bulk transfers (blob serving and replication): one worker thread, and its
/// threads (workers and blocking pool) run at a lower CPU priority, so that on a busy machine
/// routing messages, NATS and S3 get the CPU first and a large transfer does not delay them.
struct TransferRuntime(Option<tokio::runtime::Runtime>);

/// Nice value of transfer threads (0 = normal, 19 = lowest).
const TRANSFER_NICE: i32 = 10;

impl TransferRuntime {
    fn new() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rhio-transfer")
            .on_thread_start(|| {
                // Per-thread on Linux: PRIO_PROCESS with a thread id sets that thread only.
                #[cfg(target_os = "linux")]
                // SAFETY: plain syscalls on the calling thread, no memory is shared.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, TRANSFER_NICE);
                }
            })
            .enable_all()
            .build()?;
        Ok(Self(Some(runtime)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime until drop")
            .handle()
            .clone()
    }
}

impl Drop for TransferRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context forbids; this does not.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A running node.
pub struct Node {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    nats: NatsConnection,
    network: Network,
    store: Store,
    status: StatusSource,
    http_addr: std::net::SocketAddr,
    _transfers: TransferRuntime,
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

        let routes = Routes::from_config(&config);
        let streams = StreamStates::from_config(&config);
        if config
            .subscribe
            .iter()
            .any(|entry| entry.public_key == key.public_key())
        {
            return Err(StartError::Routing(
                "subscribe lists this node's own public key; a node never subscribes to itself"
                    .into(),
            ));
        }
        let store = Store::open(&config.node.data_dir.join("rhio.sqlite"), key.clone()).await?;
        let js = async_nats::jetstream::new(nats.client().clone());
        check_streams(&nats, &js, &config).await?;

        let members = crate::policy::Members::from_config(&config.network, key.public_key())
            .map_err(StartError::Members)?;
        tasks.spawn(members.clone().watch_file(shutdown.clone()));
        let network = Network::spawn(&config.network, &key, members.clone()).await?;
        // Protocols are registered before sync starts (see Network::accept).
        let index = BlobIndex::default();
        let transfer_runtime = TransferRuntime::new().map_err(StartError::Runtime)?;
        // The index is filled before the blob server answers anyone.
        let transfer_state = TransferState::open(&config.node.data_dir.join("replication.sqlite"))
            .await
            .map_err(|err| StartError::Replication(err.into()))?;
        let outbox = Outbox::new(transfer_state.clone());
        let replicator = Replicator::new(
            s3.clone(),
            store.clone(),
            index.clone(),
            transfer_state.clone(),
            routes.clone(),
            key.public_key(),
            config.datasets.clone(),
            config.replication.clone(),
            metrics.clone(),
            network.clone(),
            outbox.clone(),
        );
        replicator.load_index().await?;
        network
            .accept(
                BLOBS_ALPN,
                BlobServer::new(
                    s3.clone(),
                    index.clone(),
                    members.clone(),
                    metrics.clone(),
                    transfer_runtime.handle(),
                ),
            )
            .await?;
        network
            .start_sync(
                store.clone(),
                routes.clone(),
                metrics.clone(),
                shutdown.clone(),
            )
            .await?;
        tasks.spawn(crate::network::retention::run(
            store.clone(),
            routes.clone(),
            config.network.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        for route in &routes.publish {
            let publisher = Publisher {
                js: js.clone(),
                route: route.clone(),
                create_stream: config.nats.create_streams,
                store: store.clone(),
                metrics: metrics.clone(),
                states: streams.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.spawn(publisher.run());
        }
        if !config.subscribe.is_empty() {
            let delivery = Delivery {
                js: js.clone(),
                routes: routes.clone(),
                own_key: key.public_key(),
                create_streams: config.nats.create_streams,
                store: store.clone(),
                metrics: metrics.clone(),
                states: streams.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.spawn(delivery.run());
        }
        tasks.spawn(
            crate::routing::dead_letters::DeadLetterService::new(store.clone(), js.clone())
                .serve(nats.client().clone(), shutdown.clone()),
        );

        tasks.spawn(
            replicator
                .clone()
                .serve_retry(nats.client().clone(), shutdown.clone()),
        );
        let transfers = replicator.transfers.clone();
        let replication = transfer_runtime
            .handle()
            .spawn(replicator.run(shutdown.clone()));
        tasks.spawn(async move {
            let _ = replication.await;
        });

        let importer = Arc::new(Importer::new(
            s3.clone(),
            store.clone(),
            key.public_key(),
            nats.client().clone(),
            config.import.clone(),
            config.datasets.clone(),
            index.clone(),
            outbox.clone(),
        ));
        // Listed before any import runs, aborted off the start path (S3 may be down or slow).
        let abandoned = transfer_state.import_uploads().await.unwrap_or_else(|err| {
            tracing::warn!(%err, "cannot read abandoned import uploads");
            Vec::new()
        });
        tasks.spawn(crate::datasets::import::sweep_abandoned_uploads(
            s3.clone(),
            transfer_state.clone(),
            abandoned,
        ));
        tasks.spawn(outbox.clone().run(
            js.clone(),
            store.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let mirror = if config.mirror.enabled {
            let queue = crate::mirror::queue::MirrorQueue::new(&transfer_state)
                .await
                .map_err(|err| StartError::Mirror(format!("state: {err}")))?;
            let mirror = crate::mirror::Mirror::new(
                config.mirror.clone(),
                queue,
                s3.clone(),
                store.clone(),
                key.public_key(),
                &config.network.network_id,
                metrics.clone(),
                outbox.available(),
            )
            .await?;
            tasks.spawn(mirror.clone().run(shutdown.clone()));
            Some(mirror)
        } else {
            None
        };
        tasks.spawn(importer.clone().serve(shutdown.clone()));
        tasks.spawn(importer.serve_queue(config.nats.create_streams, shutdown.clone()));

        let status = StatusSource::new(
            key.public_key(),
            nats.clone(),
            s3,
            network.clone(),
            metrics.clone(),
            streams,
            crate::status::DatasetSources {
                index,
                transfers,
                outbox,
                mirror,
            },
        );
        tasks.spawn(crate::nats::warn_about_captured_services(
            nats.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(crate::status::serve_status(
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
            store,
            status,
            http_addr,
            _transfers: transfer_runtime,
        })
    }

    pub fn status(&self) -> &StatusSource {
        &self.status
    }

    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http_addr
    }

    /// Stops accepting work, lets running imports finish (the process's shutdown timeout bounds
    /// this), writes pending store state, flushes NATS and closes the QUIC endpoint.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        // Delivered positions are written lazily; write them now so a restart repeats nothing.
        if let Err(err) = self.store.flush().await {
            tracing::warn!(%err, "could not write delivered positions at shutdown");
        }
        self.nats.flush().await;
        self.network.close().await;
    }
}
