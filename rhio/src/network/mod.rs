//! The node's QUIC endpoint (p2panda-net on iroh) and its view of the other clusters' nodes.
//!
//! The endpoint is offline by design: no relay, no DNS or pkarr discovery, no mDNS. Peers come
//! from `network.known_nodes` (public key + UDP addresses), entered into p2panda-net's address
//! book as bootstrap nodes. Every protocol on the endpoint is bound to the network id derived from
//! `network.network_id`, so nodes of different networks cannot complete a handshake.
//!
//! Reachability of known nodes is measured with a tiny hello protocol ([`HELLO_ALPN`]): each node
//! probes every known node, quickly while it answers and with capped exponential backoff while it
//! does not, so a node that comes back is noticed without operator action.

mod hello;
pub mod sync;

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2panda_net::addrs::{NodeInfo, TransportAddress, TransportInfo, TrustedTransportInfo};
use p2panda_net::iroh_endpoint::IrohConfig;
use p2panda_net::utils::from_verifying_key;
use p2panda_net::{AddressBook, Endpoint};
use rhio_core::identity::{PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{KnownNode, NetworkConfig};
use crate::metrics::{Metrics, OutcomeLabels};
/// What status reports about the QUIC endpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetworkStatus {
    pub network_id: String,
    /// UDP sockets the QUIC endpoint is bound to.
    pub bound_addresses: Vec<String>,
}

pub use hello::HELLO_ALPN;

/// Longest a single probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed probe.
const MIN_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, Error)]
pub enum NetworkError {
    #[error("address book: {0}")]
    AddressBook(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(String),
    #[error(
        "UDP port {port} on {ip} is not available ({reason}); is another rhio node running? Change network.bind_port"
    )]
    PortInUse {
        ip: std::net::IpAddr,
        port: u16,
        reason: String,
    },
}

/// What the node knows about one known node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub addresses: Vec<SocketAddr>,
    /// A hello was exchanged (in either direction) recently.
    pub connected: bool,
    /// Round trip of the last successful outbound probe, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last successful exchange.
    pub last_seen_secs_ago: Option<u64>,
    /// Why the last outbound probe failed, if it did.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct PeerState {
    addresses: Vec<SocketAddr>,
    last_seen: Option<Instant>,
    rtt: Option<Duration>,
    last_error: Option<String>,
}

/// Known nodes and their reachability, shared by the probes, the hello handler and status.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerTable {
    peers: Arc<Mutex<BTreeMap<PublicKey, PeerState>>>,
    /// A peer counts as connected while its last exchange is younger than this.
    fresh_for: Duration,
}

impl PeerTable {
    fn new(known: &[KnownNode], fresh_for: Duration) -> Self {
        let peers = known
            .iter()
            .map(|node| {
                let state = PeerState {
                    addresses: node.addresses.clone(),
                    ..Default::default()
                };
                (node.public_key, state)
            })
            .collect();
        Self {
            peers: Arc::new(Mutex::new(peers)),
            fresh_for,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<PublicKey, PeerState>) -> R) -> R {
        f(&mut self.peers.lock().expect("peer table lock"))
    }

    /// Records a successful exchange; returns true when the peer was not connected before.
    pub(crate) fn seen(&self, peer: &PublicKey, rtt: Option<Duration>) -> bool {
        let fresh_for = self.fresh_for;
        self.with(|peers| {
            let Some(state) = peers.get_mut(peer) else {
                return false;
            };
            let was_connected = state.last_seen.is_some_and(|t| t.elapsed() < fresh_for);
            state.last_seen = Some(Instant::now());
            state.last_error = None;
            if rtt.is_some() {
                state.rtt = rtt;
            }
            !was_connected
        })
    }

    /// Records a failed probe; returns true when the peer counted as connected until now.
    fn failed(&self, peer: &PublicKey, error: String) -> bool {
        let fresh_for = self.fresh_for;
        self.with(|peers| {
            let Some(state) = peers.get_mut(peer) else {
                return false;
            };
            let was_connected = state.last_seen.is_some_and(|t| t.elapsed() < fresh_for);
            // A failed outbound probe means the path is down now, whatever was seen before.
            state.last_seen = None;
            state.last_error = Some(error);
            was_connected
        })
    }

    fn snapshot(&self) -> Vec<PeerStatus> {
        let fresh_for = self.fresh_for;
        self.with(|peers| {
            peers
                .iter()
                .map(|(key, state)| PeerStatus {
                    public_key: *key,
                    addresses: state.addresses.clone(),
                    connected: state.last_seen.is_some_and(|t| t.elapsed() < fresh_for),
                    rtt_ms: state.rtt.map(|rtt| rtt.as_secs_f64() * 1000.0),
                    last_seen_secs_ago: state.last_seen.map(|t| t.elapsed().as_secs()),
                    last_error: state.last_error.clone(),
                })
                .collect()
        })
    }
}

/// The running network layer. Cloning is cheap; all clones share one endpoint.
#[derive(Clone)]
pub struct Network {
    endpoint: Endpoint,
    peers: PeerTable,
    network_name: String,
    bound: Vec<SocketAddr>,
    tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    /// Set by [`Network::start_sync`]; no protocol may be added after it (see [`Network::accept`]).
    sync_started: Arc<std::sync::atomic::AtomicBool>,
}

impl Network {
    /// Binds the endpoint, registers the known nodes and starts probing them.
    pub async fn spawn(
        config: &NetworkConfig,
        key: &PrivateKey,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, NetworkError> {
        let address_book = AddressBook::builder()
            .spawn()
            .await
            .map_err(|err| NetworkError::AddressBook(err.to_string()))?;
        for node in &config.known_nodes {
            address_book
                .insert_node_info(node_info(node))
                .await
                .map_err(|err| NetworkError::AddressBook(err.to_string()))?;
        }

        // p2panda-net binds in the background and only reports a closed channel when the port is
        // taken; trying the socket first gives the operator an error that says what is wrong.
        if config.bind_port != 0 {
            std::net::UdpSocket::bind((config.bind_ip, config.bind_port)).map_err(|err| {
                NetworkError::PortInUse {
                    ip: config.bind_ip,
                    port: config.bind_port,
                    reason: err.to_string(),
                }
            })?;
        }
        let iroh_config = IrohConfig {
            bind_ip_v4: match config.bind_ip {
                std::net::IpAddr::V4(ip) => ip,
                std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
            },
            bind_port_v4: config.bind_port,
            bind_ip_v6: match config.bind_ip {
                std::net::IpAddr::V6(ip) => ip,
                std::net::IpAddr::V4(ip) if ip.is_loopback() => Ipv6Addr::LOCALHOST,
                std::net::IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
            },
            bind_port_v6: 0,
        };
        let endpoint = Endpoint::builder(address_book)
            .network_id(rhio_core::network::network_id(&config.network_id))
            .signing_key(key.signing_key().clone())
            .config(iroh_config)
            .spawn()
            .await
            .map_err(|err| NetworkError::Endpoint(err.to_string()))?;
        let bound = endpoint
            .endpoint()
            .await
            .map_err(|err| NetworkError::Endpoint(err.to_string()))?
            .bound_sockets();
        // A node that other clusters cannot find at its configured port must not start quietly.
        if config.bind_port != 0 && !bound.iter().any(|addr| addr.port() == config.bind_port) {
            return Err(NetworkError::PortInUse {
                ip: config.bind_ip,
                port: config.bind_port,
                reason: format!("the endpoint bound {bound:?} instead"),
            });
        }

        let fresh_for = Duration::from_secs(config.probe_interval_secs * 3);
        let peers = PeerTable::new(&config.known_nodes, fresh_for);
        endpoint
            .accept(
                HELLO_ALPN,
                hello::HelloProtocol::new(key.public_key(), peers.clone()),
            )
            .await
            .map_err(|err| NetworkError::Endpoint(err.to_string()))?;

        let mut tasks = JoinSet::new();
        for node in &config.known_nodes {
            let prober = Prober {
                endpoint: endpoint.clone(),
                peer: node.public_key,
                peers: peers.clone(),
                metrics: metrics.clone(),
                interval: Duration::from_secs(config.probe_interval_secs),
                max_retry: Duration::from_secs(config.max_retry_interval_secs.max(1)),
                shutdown: shutdown.clone(),
            };
            tasks.spawn(prober.run());
        }
        tracing::info!(
            network_id = %config.network_id,
            addresses = ?bound,
            known_nodes = config.known_nodes.len(),
            "QUIC endpoint bound"
        );
        Ok(Self {
            endpoint,
            peers,
            network_name: config.network_id.clone(),
            bound,
            tasks: Arc::new(tokio::sync::Mutex::new(tasks)),
            sync_started: Default::default(),
        })
    }

    /// Serves another protocol on the endpoint. Must come before [`Network::start_sync`]:
    /// p2panda-net holds a read lock on its protocol map for the whole life of a handler (a sync
    /// session lives long), so registering a protocol later waits for that lock forever and the
    /// endpoint stops accepting connections meanwhile.
    pub async fn accept(
        &self,
        alpn: &[u8],
        handler: impl iroh::protocol::ProtocolHandler,
    ) -> Result<(), NetworkError> {
        if self.sync_started.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(NetworkError::Endpoint(format!(
                "protocol {} registered after sync started",
                String::from_utf8_lossy(alpn)
            )));
        }
        self.endpoint
            .accept(alpn, handler)
            .await
            .map_err(|err| NetworkError::Endpoint(err.to_string()))
    }

    /// Serves sync sessions to known nodes and keeps one open to each of them when this node
    /// subscribes to anything.
    pub async fn start_sync(
        &self,
        known: &[KnownNode],
        store: crate::store::Store,
        routes: crate::routing::Routes,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<(), NetworkError> {
        let known_keys = known.iter().map(|node| node.public_key).collect();
        self.sync_started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.endpoint
            .accept(
                sync::SYNC_ALPN,
                sync::SyncServer::new(store.clone(), known_keys, metrics.clone()),
            )
            .await
            .map_err(|err| NetworkError::Endpoint(err.to_string()))?;
        if routes.interests().is_empty() {
            return Ok(());
        }
        let mut tasks = self.tasks.lock().await;
        for node in known {
            let client = sync::SyncClient {
                endpoint: self.endpoint.clone(),
                peer: node.public_key,
                store: store.clone(),
                routes: routes.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.spawn(client.run());
        }
        Ok(())
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers.snapshot()
    }

    pub fn status(&self) -> NetworkStatus {
        NetworkStatus {
            network_id: self.network_name.clone(),
            bound_addresses: self.bound.iter().map(ToString::to_string).collect(),
        }
    }

    /// Waits for the probes to stop (the shutdown token must be cancelled) and closes the
    /// endpoint, telling connected peers that we leave.
    pub async fn close(&self) {
        let mut tasks = self.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
        if let Ok(endpoint) = self.endpoint.endpoint().await {
            endpoint.close().await;
        }
    }
}

fn node_info(node: &KnownNode) -> NodeInfo {
    let endpoint_addr =
        iroh::EndpointAddr::new(from_verifying_key(node.public_key.verifying_key()))
            .with_addrs(node.addresses.iter().copied().map(iroh::TransportAddr::Ip));
    let transports = TrustedTransportInfo::from_addrs([TransportAddress::from(endpoint_addr)]);
    let mut info = NodeInfo::new(node.public_key.verifying_key()).bootstrap();
    info.transports = Some(TransportInfo::Trusted(transports));
    info
}

/// Probes one known node until shutdown.
struct Prober {
    endpoint: Endpoint,
    peer: PublicKey,
    peers: PeerTable,
    metrics: Arc<Metrics>,
    interval: Duration,
    max_retry: Duration,
    shutdown: CancellationToken,
}

impl Prober {
    async fn run(self) {
        let mut retry = MIN_RETRY;
        loop {
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = tokio::time::timeout(PROBE_TIMEOUT, hello::probe(&self.endpoint, self.peer)) => result,
            };
            let result =
                result.unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}")));
            let pause = match result {
                Ok(rtt) => {
                    self.metrics
                        .peer_probes
                        .get_or_create(&OutcomeLabels { outcome: "ok" })
                        .inc();
                    if self.peers.seen(&self.peer, Some(rtt)) {
                        tracing::info!(peer = %self.peer, rtt_ms = rtt.as_secs_f64() * 1000.0, "known node reachable");
                    }
                    retry = MIN_RETRY;
                    self.interval
                }
                Err(error) => {
                    self.metrics
                        .peer_probes
                        .get_or_create(&OutcomeLabels { outcome: "error" })
                        .inc();
                    if self.peers.failed(&self.peer, error.clone()) {
                        tracing::warn!(peer = %self.peer, %error, "known node unreachable; retrying with backoff");
                    } else {
                        tracing::debug!(peer = %self.peer, %error, ?retry, "known node still unreachable");
                    }
                    let pause = retry;
                    retry = (retry * 2).min(self.max_retry);
                    pause
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}
