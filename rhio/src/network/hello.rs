//! `rhio/hello/1`: a one-round-trip exchange that proves a known node is reachable and is who
//! its key says (QUIC's TLS already authenticates the key; the hello adds the version).
//!
//! Request and answer are the same CBOR map `{public_key, version}` on one bidirectional stream.

use std::time::{Duration, Instant};

use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use p2panda_net::Endpoint;
use p2panda_net::utils::to_verifying_key;
use rhio_core::identity::PublicKey;
use serde::{Deserialize, Serialize};

use super::PeerTable;

/// Protocol id of the hello exchange (bound to the network id by p2panda-net).
pub const HELLO_ALPN: &[u8] = b"rhio/hello/1";

/// A hello is tiny; anything bigger is not a hello.
const MAX_HELLO_BYTES: usize = 1024;

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    public_key: PublicKey,
    version: String,
}

impl Hello {
    fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("hello encodes");
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        ciborium::from_reader(bytes).map_err(|err| format!("malformed hello: {err}"))
    }
}

/// Sends a hello to `peer` and waits for its answer; returns the round trip.
pub(super) async fn probe(endpoint: &Endpoint, peer: PublicKey) -> Result<Duration, String> {
    let connection = endpoint
        .connect(peer.verifying_key(), HELLO_ALPN)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let started = Instant::now();
    let result = async {
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|err| format!("open stream: {err}"))?;
        let ours = Hello::new(PublicKey::from(endpoint.node_id()));
        send.write_all(&ours.encode())
            .await
            .map_err(|err| format!("send: {err}"))?;
        send.finish().map_err(|err| format!("send: {err}"))?;
        let answer = recv
            .read_to_end(MAX_HELLO_BYTES)
            .await
            .map_err(|err| format!("receive: {err}"))?;
        let theirs = Hello::decode(&answer)?;
        if theirs.public_key != peer {
            return Err(format!("answered as {} instead", theirs.public_key));
        }
        Ok(started.elapsed())
    }
    .await;
    connection.close(0u32.into(), b"bye");
    result
}

/// Answers hellos and records inbound ones from known nodes as proof of reachability.
#[derive(Debug, Clone)]
pub(super) struct HelloProtocol {
    local: PublicKey,
    peers: PeerTable,
}

impl HelloProtocol {
    pub(super) fn new(local: PublicKey, peers: PeerTable) -> Self {
        Self { local, peers }
    }
}

impl ProtocolHandler for HelloProtocol {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let remote = PublicKey::from(to_verifying_key(connection.remote_id()));
        let (mut send, mut recv) = connection.accept_bi().await?;
        let request = recv
            .read_to_end(MAX_HELLO_BYTES)
            .await
            .map_err(AcceptError::from_err)?;
        match Hello::decode(&request) {
            Ok(hello) if hello.public_key == remote => {
                send.write_all(&Hello::new(self.local).encode())
                    .await
                    .map_err(AcceptError::from_err)?;
                send.finish()?;
                if self.peers.seen(&remote, None) {
                    tracing::info!(peer = %remote, "known node reached us");
                }
                // Wait for the prober to close, so the answer is not cut off.
                let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
            }
            Ok(hello) => {
                tracing::warn!(peer = %remote, claimed = %hello.public_key, "hello with a key that is not the connection's");
                connection.close(1u32.into(), b"key mismatch");
            }
            Err(error) => {
                tracing::warn!(peer = %remote, %error, "rejected hello");
                connection.close(2u32.into(), b"malformed hello");
            }
        }
        Ok(())
    }
}
