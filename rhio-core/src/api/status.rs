//! The node's status document: what `GET /health` and `rhio.status` answer, one type shared by
//! the node (which fills it) and the clients (which read it).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;

/// Everything a status request reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub status: Health,
    pub public_key: PublicKey,
    pub version: String,
    pub uptime_secs: u64,
    pub nats: NatsStatus,
    pub s3: S3Status,
    pub network: NetworkStatus,
    pub peers: PeersStatus,
    pub routing: RoutingStatus,
    /// JetStream streams rhio publishes from or into, and whether routing through them runs.
    pub streams: Vec<StreamStatus>,
    pub datasets: DatasetsStatus,
    /// The registry mirror, when configured (its problems do not make the node `degraded`:
    /// nothing else waits for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorStatus>,
}

/// Datasets in this cluster and replications in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetsStatus {
    /// Row-group and footer blobs this node holds and serves.
    pub blobs: usize,
    pub versions_replicated: u64,
    pub bytes_fetched: u64,
    pub bytes_served: u64,
    pub corrupt_ranges: u64,
    pub transfers: Vec<TransferStatus>,
    /// Versions available here whose announcement JetStream has not acknowledged yet.
    pub announcements_pending: usize,
    /// Versions of other authors that cannot be replicated, with the reason (`rhio.retry`
    /// replicates one again).
    pub failed: Vec<FailedVersion>,
}

/// Counters of message routing since the node started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutingStatus {
    pub signed: u64,
    pub received: u64,
    pub delivered: u64,
    pub rejected: u64,
    /// Received messages moved aside because the local JetStream can never take them.
    pub dead_lettered: u64,
    /// Local messages not signed because no cluster could take them.
    pub refused: u64,
    /// Sync sessions open to known nodes.
    pub sessions_subscribed: i64,
    /// Sync sessions known nodes have open to us.
    pub sessions_serving: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersStatus {
    pub known: usize,
    pub connected: usize,
    pub nodes: Vec<PeerStatus>,
}

/// What status reports about the NATS connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatsStatus {
    pub endpoint: String,
    pub connected: bool,
    pub state: NatsState,
}

/// Last known state of the bucket, as reported in status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct S3Status {
    pub endpoint: String,
    pub bucket: String,
    pub reachable: bool,
    /// Unix time (seconds) of the last check.
    pub last_check_unix: Option<u64>,
    pub error: Option<String>,
}

/// What status reports about the QUIC endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub network_id: String,
    /// UDP sockets the QUIC endpoint is bound to.
    pub bound_addresses: Vec<String>,
    /// Other members of the network (allowed to hold sessions and fetch blobs).
    #[serde(default)]
    pub members: usize,
    /// Current overlay neighbours that are members (filled by status from the peer list).
    #[serde(default)]
    pub neighbours: usize,
}

/// What the node knows about one peer: a known node, an overlay neighbour that is a member, or a
/// sampled member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub addresses: Vec<SocketAddr>,
    pub state: Liveness,
    /// Alive: a hello or sync frame was exchanged (in either direction) recently.
    pub connected: bool,
    /// Configured in `network.known_nodes`.
    pub known: bool,
    /// A neighbour in the gossip overlay's active view right now.
    pub neighbour: bool,
    /// Picked at random from the members list because fewer than three members were known
    /// nodes or neighbours (the overlay may hold nodes that are no members).
    pub sampled: bool,
    /// In the members list (sessions are held with members only).
    pub member: bool,
    /// Round trip of the last successful outbound probe, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last successful exchange.
    pub last_seen_secs_ago: Option<u64>,
    /// Probes and sync sessions that failed since the last success.
    pub failures: u64,
    /// Why the last probe or session failed, if it did.
    pub last_error: Option<String>,
}

/// What the failure detector thinks of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// Answered within `network.suspect_after_secs`.
    Alive,
    /// Silent for longer, or a probe or session just failed.
    Suspect,
    /// Silent for three times as long, or three failures in a row.
    Failed,
}

/// What status reports about one configured stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamStatus {
    pub name: String,
    pub role: StreamRole,
    pub subjects: Vec<String>,
    /// Routing through this stream runs.
    pub active: bool,
    /// Why it does not, when it does not.
    pub error: Option<String>,
}

/// A transfer in progress, as status reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransferStatus {
    pub dataset: String,
    pub version: u64,
    pub author: PublicKey,
    pub bytes_total: u64,
    /// Bytes of the file in S3 parts already.
    pub bytes_done: u64,
    /// Bytes that must come from peers (blobs this cluster lacks).
    pub bytes_remote: u64,
    /// Blobs of the version fetched from peers, and blobs found in this cluster.
    pub blobs_remote: usize,
    pub blobs_local: usize,
    /// Bytes received from peers in this run (bao encoding included).
    pub bytes_fetched: u64,
    pub parts_total: usize,
    pub parts_done: usize,
    /// Peers that served ranges in this run.
    pub peers: Vec<PublicKey>,
    pub elapsed_secs: f64,
    pub rate_mib_s: f64,
}

/// A version that cannot be replicated, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedVersion {
    pub author: String,
    pub dataset: String,
    pub version: u64,
    pub reason: String,
}

/// What `/health` and `rhio.status` show under `mirror`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub registry: String,
    pub project: String,
    /// `anonymous access` or the user name (never the password).
    pub user: String,
    pub state: MirrorState,
    /// Versions waiting for a push (failed ones included).
    pub pending: usize,
    /// Versions pushed, all time.
    pub pushed: u64,
    pub bytes_pushed: u64,
    pub last_error: Option<String>,
    /// Pending and failed versions, then the most recent pushes.
    pub versions: Vec<MirrorVersionStatus>,
}

/// One version in the status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorVersionStatus {
    pub dataset: String,
    pub version: u64,
    pub author: String,
    pub repository: String,
    pub state: MirrorVersionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub attempts: u32,
}

impl NodeStatus {
    /// True when NATS is connected, the bucket reachable and routing runs through every stream.
    pub fn is_ok(&self) -> bool {
        self.status == Health::Ok
    }
}

/// The states status reports. On the wire they are the lower-case strings of their names; a
/// state a newer node adds reads as `Unknown` here.
macro_rules! states {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
            #[serde(other)]
            Unknown,
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Unknown => "unknown",
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

states!(
    /// `ok` when NATS is connected, the S3 bucket is reachable and routing runs through every
    /// configured stream; `degraded` otherwise.
    Health {
        Ok => "ok",
        Degraded => "degraded",
    }
);

states!(
    /// The NATS connection.
    NatsState {
        Connected => "connected",
        Disconnected => "disconnected",
        /// Never connected yet.
        Pending => "pending",
    }
);

states!(
    /// What rhio does with a stream.
    StreamRole {
        /// rhio signs what the stream captures.
        Publish => "publish",
        /// rhio publishes received messages into it.
        Subscribe => "subscribe",
    }
);

states!(
    /// The registry mirror as a whole.
    MirrorState {
        Idle => "idle",
        Pushing => "pushing",
        Retrying => "retrying",
        /// The registry refuses the credentials: pushes wait.
        Unauthorized => "unauthorized",
    }
);

states!(
    /// One version in the mirror's queue.
    MirrorVersionState {
        Pending => "pending",
        Pushing => "pushing",
        Pushed => "pushed",
        /// Failed and retried.
        Failed => "failed",
        /// Its dataset name is no OCI repository name: never pushed.
        Invalid => "invalid",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_their_lower_case_names_and_unknown_ones_are_kept_apart() {
        assert_eq!(
            serde_json::to_string(&Health::Degraded).unwrap(),
            "\"degraded\""
        );
        assert_eq!(
            serde_json::from_str::<MirrorVersionState>("\"invalid\"").unwrap(),
            MirrorVersionState::Invalid
        );
        assert_eq!(
            serde_json::from_str::<NatsState>("\"draining\"").unwrap(),
            NatsState::Unknown
        );
        assert_eq!(StreamRole::Subscribe.to_string(), "subscribe");
    }
}
