//! The node's status as one JSON document, shared by `GET /health` and `rhio.status`.
//!
//! Status is the aggregator on top: the document's types are defined once in
//! `rhio_core::api::status` (the clients read the same types), each subsystem fills its part
//! (`NatsStatus` in `nats`, `NetworkStatus` and `PeerStatus` in `network`, `S3Status` in `s3`,
//! transfers in `datasets`) and keeps its counters in `metrics`; this module only collects them,
//! answers `rhio.status`, and hands `/metrics` the state gauges. Nothing below imports it.

use std::sync::Arc;
use std::time::Instant;

use rhio_core::identity::PublicKey;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, ReasonLabels, StateGauges};
pub use crate::nats::NatsStatus;
use crate::nats::{NatsConnection, STATUS_SUBJECT};
use crate::network::Network;
pub use crate::network::NetworkStatus;
use crate::routing::delivery::DeadLetterReason;
use crate::routing::outbound::RefuseReason;
pub use rhio_core::api::status::{DatasetsStatus, NodeStatus, PeersStatus, RoutingStatus};

/// The state gauges `/metrics` mirrors from a status document.
pub fn gauges(status: &NodeStatus) -> StateGauges {
    let peers_in = |liveness| {
        status
            .peers
            .nodes
            .iter()
            .filter(|peer| peer.state == liveness)
            .count()
    };
    StateGauges {
        nats_connected: status.nats.connected,
        s3_reachable: status.s3.reachable,
        peers_known: status.peers.known,
        peers_connected: status.peers.connected,
        peers_suspect: peers_in(crate::network::Liveness::Suspect),
        peers_failed: peers_in(crate::network::Liveness::Failed),
        uptime_secs: status.uptime_secs,
    }
}

/// Cheap, cloneable access to the subsystems a status report reads.
#[derive(Clone)]
pub struct StatusSource {
    inner: Arc<StatusInner>,
}

struct StatusInner {
    public_key: PublicKey,
    started: Instant,
    nats: NatsConnection,
    s3: crate::s3::S3Store,
    network: Network,
    metrics: Arc<Metrics>,
    streams: crate::routing::StreamStates,
    datasets: DatasetSources,
}

/// What dataset status is read from.
#[derive(Clone)]
pub struct DatasetSources {
    pub index: crate::blobs::BlobIndex,
    pub transfers: crate::datasets::replicate::Transfers,
    pub outbox: crate::datasets::outbox::Outbox,
    /// The registry mirror, when `mirror.enabled`.
    pub mirror: Option<crate::mirror::Mirror>,
}

impl StatusSource {
    pub fn new(
        public_key: PublicKey,
        nats: NatsConnection,
        s3: crate::s3::S3Store,
        network: Network,
        metrics: Arc<Metrics>,
        streams: crate::routing::StreamStates,
        datasets: DatasetSources,
    ) -> Self {
        Self {
            inner: Arc::new(StatusInner {
                public_key,
                started: Instant::now(),
                nats,
                s3,
                network,
                metrics,
                streams,
                datasets,
            }),
        }
    }

    pub fn snapshot(&self) -> NodeStatus {
        let inner = &self.inner;
        let nats = inner.nats.status();
        let s3 = inner.s3.status();
        let nodes = inner.network.peers();
        let connected = nodes.iter().filter(|peer| peer.connected).count();
        let streams = inner.streams.snapshot();
        let ok = nats.connected && s3.reachable && streams.iter().all(|s| s.active);
        NodeStatus {
            status: if ok {
                rhio_core::api::status::Health::Ok
            } else {
                rhio_core::api::status::Health::Degraded
            },
            public_key: inner.public_key,
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: inner.started.elapsed().as_secs(),
            nats,
            s3,
            network: NetworkStatus {
                neighbours: nodes.iter().filter(|peer| peer.neighbour).count(),
                ..inner.network.status()
            },
            peers: PeersStatus {
                known: nodes.len(),
                connected,
                nodes,
            },
            routing: self.routing(),
            streams,
            datasets: DatasetsStatus {
                blobs: inner.datasets.index.len(),
                versions_replicated: inner
                    .metrics
                    .replication_versions
                    .get_or_create(&crate::metrics::OutcomeLabels { outcome: "done" })
                    .get(),
                bytes_fetched: inner.metrics.replication_bytes_fetched.get(),
                bytes_served: inner.metrics.blob_bytes_served.get(),
                corrupt_ranges: inner.metrics.replication_corrupt_ranges.get(),
                transfers: inner.datasets.transfers.snapshot(),
                announcements_pending: inner.datasets.outbox.pending(),
                failed: inner.datasets.transfers.failed(),
            },
            mirror: inner
                .datasets
                .mirror
                .as_ref()
                .map(crate::mirror::Mirror::status),
        }
    }

    fn routing(&self) -> RoutingStatus {
        let metrics = &self.inner.metrics;
        let sessions = |reason| {
            metrics
                .sync_sessions
                .get_or_create(&ReasonLabels { reason })
                .get()
        };
        RoutingStatus {
            signed: metrics.operations_signed.get(),
            received: metrics.operations_received.get(),
            delivered: metrics.operations_delivered.get(),
            rejected: metrics.rejected_total(),
            dead_lettered: Metrics::sum(
                &metrics.messages_dead_lettered,
                DeadLetterReason::ALL.map(DeadLetterReason::as_str),
            ),
            refused: Metrics::sum(
                &metrics.messages_refused,
                RefuseReason::ALL.map(RefuseReason::as_str),
            ),
            sessions_subscribed: sessions("subscribed"),
            sessions_serving: sessions("serving"),
        }
    }
}

/// Answers `rhio.status` requests with the node status as JSON until `shutdown` fires.
pub async fn serve_status(
    nats: NatsConnection,
    status: StatusSource,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    crate::nats::serve_requests(nats.client().clone(), STATUS_SUBJECT, 4, shutdown, |_| {
        metrics.status_requests.inc();
        let body = serde_json::to_vec(&status.snapshot()).expect("status serializes");
        std::future::ready(body)
    })
    .await;
}
