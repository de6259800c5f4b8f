//! The node's QUIC endpoint (p2panda-net on iroh) and its view of the other clusters' nodes.
//!
//! The endpoint has no relay and no DNS, pkarr or mDNS lookup. Bootstrap nodes come from
//! `network.known_nodes` (public key + UDP addresses), entered into p2panda-net's address book.
//! Every protocol on the endpoint is bound to the network id derived from `network.network_id`,
//! so nodes of different networks cannot complete a handshake.
//!
//! The federation: every node joins p2panda-net's gossip overlay for the network (HyParView:
//! a small active view of neighbours that the overlay keeps repaired, a larger passive view) and
//! runs p2panda-net's discovery (random walks that exchange signed address records through the
//! address book), so a node configured with one bootstrap node learns the other members and how
//! to reach them. The overlay only samples peers: operations travel in sync sessions
//! ([`sync`]) held with the known nodes and the current overlay neighbours that are members
//! ([`members`]), and dataset blobs are fetched directly from any member that holds them.
//!
//! Liveness (the failure detector of [`PeerTable`]) comes from a tiny hello protocol
//! ([`HELLO_ALPN`]) and from sync traffic: each node probes its known nodes and neighbours,
//! quickly while they answer and with capped exponential backoff while they do not.

mod hello;
mod overlay;
pub mod retention;
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
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{KnownNode, NetworkConfig};
use crate::metrics::{Metrics, OutcomeLabels};
pub use crate::policy::Members;

pub use hello::HELLO_ALPN;
/// What status reports about the endpoint and each peer (defined with the status document).
pub use rhio_core::api::status::{Liveness, NetworkStatus, PeerStatus};

/// Longest a single probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed probe.
const MIN_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, Error)]
pub enum NetworkError {
    #[error("address book: {0}")]
    AddressBook(#[source] BoxError),
    /// p2panda-net's or iroh's error, kept whole as the source.
    #[error("QUIC endpoint ({step}): {source}")]
    Endpoint {
        step: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("protocol {0} registered after sync started")]
    LateProtocol(String),
    #[error("sync started twice")]
    SyncStartedTwice,
    #[error(
        "UDP port {port} on {ip} is not available ({reason}); is another rhio node running? Change network.bind_port"
    )]
    PortInUse {
        ip: std::net::IpAddr,
        port: u16,
        reason: String,
    },
}

/// An error of the p2p stack, kept with its type and sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Wraps an endpoint error of `step`.
fn endpoint_error<E: std::error::Error + Send + Sync + 'static>(
    step: &'static str,
) -> impl FnOnce(E) -> NetworkError {
    move |err| NetworkError::Endpoint {
        step,
        source: Box::new(err),
    }
}

#[derive(Debug, Default)]
struct PeerState {
    addresses: Vec<SocketAddr>,
    last_seen: Option<Instant>,
    last_failure: Option<Instant>,
    failures: u64,
    rtt: Option<Duration>,
    last_error: Option<String>,
    known: bool,
    neighbour: bool,
    /// Picked from the members list because too few members were in view.
    sampled: bool,
}

impl PeerState {
    fn state(&self, suspect_after: Duration) -> Liveness {
        let failed_since_seen = match (self.last_seen, self.last_failure) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(seen), Some(failure)) => failure > seen,
        };
        let silent = self.last_seen.map(|seen| seen.elapsed());
        if !failed_since_seen && silent.is_some_and(|silent| silent < suspect_after) {
            Liveness::Alive
        } else if self.failures >= 3 || silent.is_some_and(|silent| silent >= suspect_after * 3) {
            Liveness::Failed
        } else {
            Liveness::Suspect
        }
    }
}

/// Peers and their liveness, shared by the probes, the sync sessions, the hello handler and
/// status: the failure detector.
#[derive(Debug, Clone)]
pub struct PeerTable {
    peers: Arc<Mutex<BTreeMap<PublicKey, PeerState>>>,
    suspect_after: Duration,
    members: Members,
}

impl PeerTable {
    fn new(known: &[KnownNode], suspect_after: Duration, members: Members) -> Self {
        let peers = known
            .iter()
            .map(|node| {
                let state = PeerState {
                    addresses: node.addresses.clone(),
                    known: true,
                    ..Default::default()
                };
                (node.public_key, state)
            })
            .collect();
        Self {
            peers: Arc::new(Mutex::new(peers)),
            suspect_after,
            members,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<PublicKey, PeerState>) -> R) -> R {
        f(&mut self.peers.lock().expect("peer table lock"))
    }

    /// Marks `peer` as an overlay neighbour (or no longer one).
    fn set_neighbour(&self, peer: &PublicKey, neighbour: bool) {
        self.set_role(peer, neighbour, |state| &mut state.neighbour);
    }

    /// Marks `peer` as sampled from the members list (or no longer).
    fn set_sampled(&self, peer: &PublicKey, sampled: bool) {
        self.set_role(peer, sampled, |state| &mut state.sampled);
    }

    /// A peer that is neither known, nor a neighbour, nor sampled leaves the table.
    fn set_role(&self, peer: &PublicKey, on: bool, role: fn(&mut PeerState) -> &mut bool) {
        self.with(|peers| {
            if on {
                *role(peers.entry(*peer).or_default()) = true;
            } else if let Some(state) = peers.get_mut(peer) {
                *role(state) = false;
                if !state.known && !state.neighbour && !state.sampled {
                    peers.remove(peer);
                }
            }
        })
    }

    /// The peer's liveness, when it is in the table.
    fn state_of(&self, peer: &PublicKey) -> Option<Liveness> {
        let suspect_after = self.suspect_after;
        self.with(|peers| peers.get(peer).map(|state| state.state(suspect_after)))
    }

    /// Records a successful exchange; returns true when the peer was not alive before.
    pub(crate) fn seen(&self, peer: &PublicKey, rtt: Option<Duration>) -> bool {
        let suspect_after = self.suspect_after;
        self.with(|peers| {
            let Some(state) = peers.get_mut(peer) else {
                return false;
            };
            let was_alive = state.state(suspect_after) == Liveness::Alive;
            state.last_seen = Some(Instant::now());
            state.failures = 0;
            state.last_error = None;
            if rtt.is_some() {
                state.rtt = rtt;
            }
            !was_alive
        })
    }

    /// Records a failed probe or session; returns true when the peer counted as alive until now.
    pub(crate) fn failed(&self, peer: &PublicKey, error: String) -> bool {
        let suspect_after = self.suspect_after;
        self.with(|peers| {
            let Some(state) = peers.get_mut(peer) else {
                return false;
            };
            let was_alive = state.state(suspect_after) == Liveness::Alive;
            state.last_failure = Some(Instant::now());
            state.failures += 1;
            state.last_error = Some(error);
            was_alive
        })
    }

    fn snapshot(&self) -> Vec<PeerStatus> {
        let suspect_after = self.suspect_after;
        let members = &self.members;
        self.with(|peers| {
            peers
                .iter()
                .map(|(key, state)| {
                    let health = state.state(suspect_after);
                    PeerStatus {
                        public_key: *key,
                        addresses: state.addresses.clone(),
                        state: health,
                        connected: health == Liveness::Alive,
                        known: state.known,
                        neighbour: state.neighbour,
                        sampled: state.sampled,
                        member: members.contains(key),
                        rtt_ms: state.rtt.map(|rtt| rtt.as_secs_f64() * 1000.0),
                        last_seen_secs_ago: state.last_seen.map(|t| t.elapsed().as_secs()),
                        failures: state.failures,
                        last_error: state.last_error.clone(),
                    }
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
    members: Members,
    overlay: Arc<overlay::Overlay>,
    known: Arc<Vec<KnownNode>>,
    network_name: String,
    bound: Vec<SocketAddr>,
    probe_interval: Duration,
    max_retry: Duration,
    tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    /// Set by [`Network::start_sync`]; no protocol may be added after it (see [`Network::accept`]).
    sync_started: Arc<std::sync::atomic::AtomicBool>,
}

impl Network {
    /// Binds the endpoint, registers the known nodes, and joins the overlay.
    pub async fn spawn(
        config: &NetworkConfig,
        key: &PrivateKey,
        members: Members,
    ) -> Result<Self, NetworkError> {
        let address_book = AddressBook::builder()
            .spawn()
            .await
            .map_err(|err| NetworkError::AddressBook(Box::new(err)))?;
        let topic = overlay::topic(&config.network_id);
        for node in &config.known_nodes {
            address_book
                .insert_node_info(node_info(node))
                .await
                .map_err(|err| NetworkError::AddressBook(Box::new(err)))?;
            address_book
                .add_topic(node.public_key.verifying_key(), topic)
                .await
                .map_err(|err| NetworkError::AddressBook(Box::new(err)))?;
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
        let endpoint = Endpoint::builder(address_book.clone())
            .network_id(rhio_core::network::network_id(&config.network_id))
            .signing_key(key.signing_key().clone())
            .config(iroh_config)
            .spawn()
            .await
            .map_err(endpoint_error("start"))?;
        let bound = endpoint
            .endpoint()
            .await
            .map_err(endpoint_error("bind"))?
            .bound_sockets();
        // A node that other clusters cannot find at its configured port must not start quietly.
        if config.bind_port != 0 && !bound.iter().any(|addr| addr.port() == config.bind_port) {
            return Err(NetworkError::PortInUse {
                ip: config.bind_ip,
                port: config.bind_port,
                reason: format!("the endpoint bound {bound:?} instead"),
            });
        }

        let suspect_after = Duration::from_secs(config.suspect_after_secs);
        let peers = PeerTable::new(&config.known_nodes, suspect_after, members.clone());
        endpoint
            .accept(
                HELLO_ALPN,
                hello::HelloProtocol::new(key.public_key(), peers.clone()),
            )
            .await
            .map_err(endpoint_error("register the hello protocol"))?;
        // Before sync starts: the overlay and discovery register protocols of their own.
        let overlay = overlay::Overlay::join(address_book, endpoint.clone(), topic).await?;
        for node in &config.known_nodes {
            if !members.contains(&node.public_key) {
                tracing::warn!(node = %node.public_key, "known node is not in the members list: used to bootstrap only, no sync sessions with it");
            }
        }
        tracing::info!(
            network_id = %config.network_id,
            addresses = ?bound,
            known_nodes = config.known_nodes.len(),
            members = members.others().len(),
            "QUIC endpoint bound, overlay joined"
        );
        Ok(Self {
            endpoint,
            peers,
            members,
            overlay: Arc::new(overlay),
            known: Arc::new(config.known_nodes.clone()),
            network_name: config.network_id.clone(),
            bound,
            probe_interval: Duration::from_secs(config.probe_interval_secs),
            max_retry: Duration::from_secs(config.max_retry_interval_secs.max(1)),
            tasks: Arc::new(tokio::sync::Mutex::new(JoinSet::new())),
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
            return Err(NetworkError::LateProtocol(
                String::from_utf8_lossy(alpn).to_string(),
            ));
        }
        self.endpoint
            .accept(alpn, handler)
            .await
            .map_err(endpoint_error("register a protocol"))
    }

    /// Serves sync sessions to members, and probes and holds a sync session with every known
    /// node and overlay neighbour that is a member, following the overlay as it changes.
    pub async fn start_sync(
        &self,
        store: crate::store::Store,
        routes: crate::policy::Routes,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<(), NetworkError> {
        self.sync_started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.endpoint
            .accept(
                sync::SYNC_ALPN,
                sync::SyncServer::new(store.clone(), self.members.clone(), metrics.clone()),
            )
            .await
            .map_err(endpoint_error("register the sync protocol"))?;
        let events = self
            .overlay
            .take_events()
            .ok_or(NetworkError::SyncStartedTwice)?;
        let manager = PeerManager {
            network: self.clone(),
            acceptance: sync::Acceptance {
                routes,
                members: self.members.clone(),
            },
            store,
            metrics,
            shutdown,
        };
        self.tasks.lock().await.spawn(manager.run(events));
        Ok(())
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn members(&self) -> &Members {
        &self.members
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers.snapshot()
    }

    pub fn status(&self) -> NetworkStatus {
        NetworkStatus {
            network_id: self.network_name.clone(),
            bound_addresses: self.bound.iter().map(ToString::to_string).collect(),
            members: self.members.others().len(),
            neighbours: 0,
        }
    }

    /// Waits for the peer tasks to stop (the shutdown token must be cancelled) and closes the
    /// endpoint, telling connected peers that we leave.
    pub async fn close(&self) {
        let mut tasks = self.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
        if let Ok(endpoint) = self.endpoint.endpoint().await {
            endpoint.close().await;
        }
    }
}

/// Members a node keeps sync sessions with at least (when the network has that many): known
/// nodes and overlay neighbours first, topped up with members sampled at random.
const MIN_SYNC_PEERS: usize = 3;
/// How often the sample is checked (failed sampled peers replaced).
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// A sampled peer that failed is not picked again for this long.
const SAMPLE_COOLDOWN: Duration = Duration::from_secs(60);

/// Keeps a prober and (for members) a sync session running for every known node, overlay
/// neighbour and sampled member, starting and stopping them as neighbours come and go and
/// members change.
///
/// The overlay's active view may hold nodes that are no members (anyone who knows the network
/// name can join the gossip topic) or members that were removed; so that such neighbours cannot
/// starve a member of data, the manager tops the members it syncs with up to
/// [`MIN_SYNC_PEERS`] with members picked at random from the list (their addresses come from
/// discovery), and replaces a sampled member that failed.
struct PeerManager {
    network: Network,
    acceptance: sync::Acceptance,
    store: crate::store::Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl PeerManager {
    async fn run(self, mut events: overlay::Events) {
        use std::collections::BTreeSet;
        let known: BTreeSet<PublicKey> = self
            .network
            .known
            .iter()
            .map(|node| node.public_key)
            .collect();
        let members = &self.network.members;
        let peers = &self.network.peers;
        let mut neighbours = BTreeSet::new();
        let mut sampled: BTreeSet<PublicKey> = BTreeSet::new();
        let mut cooling: BTreeMap<PublicKey, Instant> = BTreeMap::new();
        let mut running: BTreeMap<PublicKey, (bool, CancellationToken)> = BTreeMap::new();
        let mut changes = members.changes();
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        let own = self.store.public_key();
        let eager_sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let grafts = sync::Grafts::default();
        loop {
            // Neighbours that are no members are left alone (no probes, no sessions, not listed).
            for peer in &neighbours {
                peers.set_neighbour(peer, members.contains(peer));
            }
            let in_view: BTreeSet<PublicKey> = known
                .iter()
                .chain(neighbours.iter().filter(|peer| members.contains(peer)))
                .filter(|peer| **peer != own)
                .copied()
                .collect();
            // The sample: drop what is in view anyway, no member, or failed; top it up.
            cooling.retain(|_, since| since.elapsed() < SAMPLE_COOLDOWN);
            sampled.retain(|peer| {
                let failed = peers.state_of(peer) == Some(Liveness::Failed);
                if failed {
                    cooling.insert(*peer, Instant::now());
                }
                let keep = !failed && members.contains(peer) && !in_view.contains(peer);
                if !keep {
                    peers.set_sampled(peer, false);
                }
                keep
            });
            let syncing = in_view.iter().filter(|peer| members.contains(peer)).count();
            let mut candidates: Vec<PublicKey> = members
                .others()
                .into_iter()
                .filter(|peer| {
                    !in_view.contains(peer)
                        && !sampled.contains(peer)
                        && !cooling.contains_key(peer)
                })
                .collect();
            let order = std::collections::hash_map::RandomState::new();
            candidates.sort_by_key(|peer| std::hash::BuildHasher::hash_one(&order, peer));
            for peer in candidates
                .into_iter()
                .take(MIN_SYNC_PEERS.saturating_sub(syncing + sampled.len()))
            {
                tracing::debug!(%peer, "sampled a member to sync with");
                peers.set_sampled(&peer, true);
                sampled.insert(peer);
            }
            // Wanted: every peer in view or sampled; with a sync session when it is a member.
            let wanted: BTreeMap<PublicKey, bool> = in_view
                .iter()
                .chain(sampled.iter())
                .map(|peer| (*peer, members.contains(peer)))
                .collect();
            running.retain(|peer, (syncs, token)| {
                let keep = wanted.get(peer) == Some(syncs);
                if !keep {
                    token.cancel();
                }
                keep
            });
            let mut tasks = self.network.tasks.lock().await;
            for (peer, syncs) in &wanted {
                if running.contains_key(peer) {
                    continue;
                }
                let token = self.shutdown.child_token();
                tasks.spawn(
                    Prober {
                        endpoint: self.network.endpoint.clone(),
                        peer: *peer,
                        peers: peers.clone(),
                        metrics: self.metrics.clone(),
                        interval: self.network.probe_interval,
                        max_retry: self.network.max_retry,
                        shutdown: token.clone(),
                    }
                    .run(),
                );
                if *syncs {
                    tasks.spawn(
                        sync::SyncClient {
                            endpoint: self.network.endpoint.clone(),
                            peer: *peer,
                            store: self.store.clone(),
                            acceptance: self.acceptance.clone(),
                            peers: peers.clone(),
                            metrics: self.metrics.clone(),
                            shutdown: token.clone(),
                            eager_sessions: eager_sessions.clone(),
                            grafts: grafts.clone(),
                        }
                        .run(),
                    );
                }
                running.insert(*peer, (*syncs, token));
            }
            drop(tasks);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                event = events.next() => match event {
                    Some(overlay::Change::Up(peer)) if peer != own && neighbours.insert(peer) => {
                        tracing::info!(%peer, member = members.contains(&peer), "overlay neighbour up");
                    }
                    Some(overlay::Change::Down(peer)) if neighbours.remove(&peer) => {
                        tracing::info!(%peer, "overlay neighbour down");
                        peers.set_neighbour(&peer, false);
                    }
                    _ => {}
                }
            }
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

/// Probes one peer until its token is cancelled.
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
        let mut attempts =
            crate::retry::Backoff::new(MIN_RETRY, self.max_retry.max(MIN_RETRY)).attempts();
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
                        tracing::info!(peer = %self.peer, rtt_ms = rtt.as_secs_f64() * 1000.0, "peer reachable");
                    }
                    attempts.reset();
                    self.interval
                }
                Err(error) => {
                    self.metrics
                        .peer_probes
                        .get_or_create(&OutcomeLabels { outcome: "error" })
                        .inc();
                    if self.peers.failed(&self.peer, error.clone()) {
                        tracing::warn!(peer = %self.peer, %error, "peer unreachable; retrying with backoff");
                    } else {
                        tracing::debug!(peer = %self.peer, %error, failures = attempts.failures() + 1, "peer still unreachable");
                    }
                    attempts.next_delay(crate::retry::jitter())
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}
