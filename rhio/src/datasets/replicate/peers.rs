//! The peers a transfer fetches from: one QUIC connection per peer (connected in its own slot,
//! so a dead peer holds up no other), peers cooling down after a failed connect, and the peers
//! that sent bytes of a blob that did not verify.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::endpoint::Connection;
use rhio_core::identity::PublicKey;

use crate::blobs::protocol::BLOBS_ALPN;
use crate::network::Network;

/// A peer that could not be reached is skipped for this long.
const PEER_COOLDOWN: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections by peer, each in its own slot: a slot's lock is held while connecting to that
/// peer only, so a dead peer (a connect waits up to [`CONNECT_TIMEOUT`]) never holds up fetches
/// from the others. Generic over the connection so the locking is tested without sockets.
struct PeerSlots<C> {
    slots: Mutex<HashMap<PublicKey, Arc<tokio::sync::Mutex<Option<C>>>>>,
}

impl<C: Clone> Default for PeerSlots<C> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<C: Clone> PeerSlots<C> {
    fn slot(&self, peer: PublicKey) -> Arc<tokio::sync::Mutex<Option<C>>> {
        self.slots
            .lock()
            .expect("peer slots lock")
            .entry(peer)
            .or_default()
            .clone()
    }

    /// The open connection to `peer` (`usable` says whether a stored one still is), or a new
    /// one from `connect`.
    async fn get<F>(
        &self,
        peer: PublicKey,
        usable: impl Fn(&C) -> bool,
        connect: F,
    ) -> Result<C, String>
    where
        F: std::future::Future<Output = Result<C, String>>,
    {
        let slot = self.slot(peer);
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref()
            && usable(connection)
        {
            return Ok(connection.clone());
        }
        let connection = connect.await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    pub(super) async fn forget(&self, peer: PublicKey) {
        *self.slot(peer).lock().await = None;
    }
}

/// QUIC connections to peers for blob requests, and which peers are cooling down.
#[derive(Clone)]
pub(super) struct PeerConnections {
    pub(super) network: Network,
    connections: Arc<PeerSlots<Connection>>,
    cooldown: Arc<Mutex<HashMap<PublicKey, Instant>>>,
}

impl PeerConnections {
    pub(super) fn new(network: Network) -> Self {
        Self {
            network,
            connections: Default::default(),
            cooldown: Default::default(),
        }
    }

    pub(super) fn cooling(&self, peer: &PublicKey) -> bool {
        self.cooldown
            .lock()
            .expect("cooldown lock")
            .get(peer)
            .is_some_and(|until| Instant::now() < *until)
    }

    pub(super) fn cool(&self, peer: PublicKey) {
        self.cooldown
            .lock()
            .expect("cooldown lock")
            .insert(peer, Instant::now() + PEER_COOLDOWN);
    }

    pub(super) async fn connection(&self, peer: PublicKey) -> Result<Connection, String> {
        let connect = async {
            tokio::time::timeout(
                CONNECT_TIMEOUT,
                self.network
                    .endpoint()
                    .connect(peer.verifying_key(), BLOBS_ALPN),
            )
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|err| format!("connect: {err}"))
        };
        self.connections
            .get(peer, |c| c.close_reason().is_none(), connect)
            .await
    }

    pub(super) async fn forget(&self, peer: &PublicKey) {
        self.connections.forget(*peer).await;
    }
}

/// How long a peer that sent bytes of a blob that did not verify is not asked for that blob
/// again. Long enough to finish the transfer (and its retries) from others; short enough that a
/// peer whose object was damaged once and repaired, or a transient fault, is not banned for good.
pub const BAD_SOURCE_TTL: Duration = Duration::from_secs(15 * 60);

/// (peer, blob) pairs that sent corrupt data, each until it expires. Bounded: expired entries
/// are dropped whenever one is added.
#[derive(Clone, Default)]
pub(super) struct BadSources {
    entries: Arc<Mutex<HashMap<(PublicKey, blake3::Hash), std::time::Instant>>>,
}

impl BadSources {
    pub(super) fn insert(&self, peer: PublicKey, hash: blake3::Hash) {
        let now = std::time::Instant::now();
        let mut entries = self.entries.lock().expect("bad sources lock");
        entries.retain(|_, until| *until > now);
        entries.insert((peer, hash), now + BAD_SOURCE_TTL);
    }

    pub(super) fn contains(&self, peer: PublicKey, hash: blake3::Hash) -> bool {
        let now = std::time::Instant::now();
        self.entries
            .lock()
            .expect("bad sources lock")
            .get(&(peer, hash))
            .is_some_and(|until| *until > now)
    }

    /// True when every one of `peers` is a bad source of `hash`.
    pub(super) fn all(&self, peers: &[PublicKey], hash: blake3::Hash) -> bool {
        peers.iter().all(|peer| self.contains(*peer, hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhio_core::identity::PrivateKey;

    #[tokio::test]
    async fn a_peer_whose_connect_never_ends_does_not_hold_up_the_others() {
        let slots = Arc::new(PeerSlots::<u32>::default());
        let dead = PrivateKey::generate().public_key();
        let alive = PrivateKey::generate().public_key();
        let stuck = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .get(
                        dead,
                        |_| true,
                        std::future::pending::<Result<u32, String>>(),
                    )
                    .await
            })
        };
        // The connect to the dead peer is under way and holds its slot.
        while slots.slot(dead).try_lock().is_ok() {
            tokio::task::yield_now().await;
        }
        // A deadlock guard, not a speed limit: with one lock for all peers this never returns.
        let other = tokio::time::timeout(
            Duration::from_secs(10),
            slots.get(alive, |_| true, async { Ok(7) }),
        )
        .await
        .expect("a connect to another peer is not held up");
        assert_eq!(other, Ok(7));
        // A stored connection is reused, one that is no longer usable replaced.
        assert_eq!(slots.get(alive, |_| true, async { Ok(8) }).await, Ok(7));
        assert_eq!(slots.get(alive, |_| false, async { Ok(9) }).await, Ok(9));
        slots.forget(alive).await;
        assert_eq!(slots.get(alive, |_| true, async { Ok(10) }).await, Ok(10));
        assert!(!stuck.is_finished());
        stuck.abort();
    }
}
