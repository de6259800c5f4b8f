//! The network's gossip overlay (p2panda-net's HyParView over iroh-gossip) and discovery.
//!
//! rhio publishes nothing on the overlay: it is used for peer sampling. HyParView keeps each node
//! a small active view of neighbours (5 by default) that it repairs by itself when one fails, and
//! a larger passive view (30) refreshed by shuffles; neighbours' addresses travel with the
//! overlay's messages and p2panda-net's discovery fills the address book with the signed address
//! records of every node it meets, so a member can be reached (for a sync session or a blob)
//! without being configured anywhere.

use p2panda_core::Topic;
use p2panda_net::gossip::GossipEvent;
use p2panda_net::{AddressBook, Endpoint};
use rhio_core::identity::PublicKey;
use tokio::sync::broadcast;

use super::NetworkError;

/// The overlay topic of a network: every node of one network joins the same.
pub fn topic(network_name: &str) -> Topic {
    Topic::from(p2panda_core::Hash::digest(format!(
        "rhio-overlay-v1:{network_name}"
    )))
}

pub(super) struct Overlay {
    /// Subscribed before joining, so no neighbour that comes up early is missed; taken once by
    /// the peer manager.
    events: std::sync::Mutex<Option<Events>>,
    /// Kept for the node's lifetime: dropping the gossip service shuts the overlay down, and
    /// dropping the last handle leaves the topic.
    _gossip: p2panda_net::Gossip,
    _handle: p2panda_net::gossip::GossipHandle,
    _discovery: p2panda_net::Discovery,
}

impl Overlay {
    /// Starts discovery and gossip on `endpoint` and joins the overlay of `topic`, with the
    /// nodes the address book lists for it (the bootstrap nodes) as first contacts.
    pub(super) async fn join(
        address_book: AddressBook,
        endpoint: Endpoint,
        topic: Topic,
    ) -> Result<Self, NetworkError> {
        let discovery = p2panda_net::Discovery::builder(address_book.clone(), endpoint.clone())
            .spawn()
            .await
            .map_err(super::endpoint_error("start discovery"))?;
        let gossip = p2panda_net::Gossip::builder(address_book, endpoint)
            .spawn()
            .await
            .map_err(super::endpoint_error("start gossip"))?;
        // Both register their protocols from their actors' first message; a call answered by
        // each actor means the registration is done (protocols must precede sync, see
        // Network::accept).
        discovery
            .metrics()
            .await
            .map_err(super::endpoint_error("discovery"))?;
        let events = gossip
            .events()
            .await
            .map_err(super::endpoint_error("gossip events"))?;
        let handle = gossip
            .stream(topic)
            .await
            .map_err(super::endpoint_error("join the overlay"))?;
        Ok(Self {
            events: std::sync::Mutex::new(Some(Events {
                events,
                topic,
                pending: Vec::new(),
            })),
            _gossip: gossip,
            _handle: handle,
            _discovery: discovery,
        })
    }

    /// The overlay's neighbour changes since it was joined; `None` after the first call.
    pub(super) fn take_events(&self) -> Option<Events> {
        self.events.lock().expect("overlay events lock").take()
    }
}

/// A change of the overlay's active view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Up(PublicKey),
    Down(PublicKey),
}

pub(super) struct Events {
    events: broadcast::Receiver<GossipEvent>,
    topic: Topic,
    /// Neighbours of a `Joined` event not handed out yet.
    pending: Vec<Change>,
}

impl Events {
    /// The next change of this overlay's active view; `None` for events of other topics and
    /// when events were missed (the manager keeps the view it has). Pends forever once the
    /// overlay is gone.
    pub(super) async fn next(&mut self) -> Option<Change> {
        if let Some(change) = self.pending.pop() {
            return Some(change);
        }
        match self.events.recv().await {
            Ok(GossipEvent::NeighbourUp { node, topic }) if topic == self.topic => {
                Some(Change::Up(PublicKey::from(node)))
            }
            Ok(GossipEvent::NeighbourDown { node, topic }) if topic == self.topic => {
                Some(Change::Down(PublicKey::from(node)))
            }
            Ok(GossipEvent::Joined { nodes, topic }) if topic == self.topic => {
                self.pending.extend(
                    nodes
                        .into_iter()
                        .map(|node| Change::Up(PublicKey::from(node))),
                );
                self.pending.pop()
            }
            Ok(_) => None,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "overlay events missed");
                None
            }
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}
