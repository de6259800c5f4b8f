//! Prometheus metrics served on `GET /metrics`.
//!
//! Gauges that mirror state (NATS connected, S3 reachable, peers) are refreshed from a status
//! snapshot at scrape time; counters are incremented where the event happens.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// State that `/metrics` mirrors as gauges, refreshed at each scrape (status hands it over:
/// metrics does not depend on status).
#[derive(Debug, Clone, Copy)]
pub struct StateGauges {
    pub nats_connected: bool,
    pub s3_reachable: bool,
    pub peers_known: usize,
    pub peers_connected: usize,
    pub peers_suspect: usize,
    pub peers_failed: usize,
    pub uptime_secs: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Why a received operation was rejected; the `reason` label of
/// `rhio_operations_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    Invalid,
    AuthorNotAllowed,
    SubjectNotAllowed,
    MalformedBody,
    Conflict,
    BrokenChain,
    ReorderBufferFull,
}

impl RejectReason {
    pub const ALL: [RejectReason; 7] = [
        RejectReason::Invalid,
        RejectReason::AuthorNotAllowed,
        RejectReason::SubjectNotAllowed,
        RejectReason::MalformedBody,
        RejectReason::Conflict,
        RejectReason::BrokenChain,
        RejectReason::ReorderBufferFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Invalid => "invalid",
            RejectReason::AuthorNotAllowed => "author_not_allowed",
            RejectReason::SubjectNotAllowed => "subject_not_allowed",
            RejectReason::MalformedBody => "malformed_body",
            RejectReason::Conflict => "conflict",
            RejectReason::BrokenChain => "broken_chain",
            RejectReason::ReorderBufferFull => "reorder_buffer_full",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub nats_connected: Gauge,
    pub s3_reachable: Gauge,
    pub peers_known: Gauge,
    pub peers_connected: Gauge,
    pub peers_suspect: Gauge,
    pub peers_failed: Gauge,
    pub sync_sessions_refused: Family<ReasonLabels, Counter>,
    pub uptime_seconds: Gauge,
    pub peer_probes: Family<OutcomeLabels, Counter>,
    pub s3_checks: Family<OutcomeLabels, Counter>,
    pub status_requests: Counter,
    pub operations_signed: Counter,
    pub operations_received: Counter,
    pub operations_sent: Counter,
    pub operation_bytes_sent: Counter,
    pub operations_duplicate: Counter,
    pub relay_operations_pruned: Counter,
    pub announcements_sent: Counter,
    pub sync_prunes: Counter,
    pub sync_grafts: Counter,
    pub operations_delivered: Counter,
    pub operations_rejected: Family<ReasonLabels, Counter>,
    pub routing_errors: Counter,
    /// Operations JetStream can never take, moved aside by reason (see `routing::delivery`).
    pub messages_dead_lettered: Family<ReasonLabels, Counter>,
    /// Local messages not signed because no cluster could deliver them, by reason.
    pub messages_refused: Family<ReasonLabels, Counter>,
    /// Dataset announcements published (`ok`) or failed and kept queued (`retry`).
    pub announcements: Family<OutcomeLabels, Counter>,
    pub sync_sessions: Family<ReasonLabels, Gauge>,
    /// Blob bytes received from peers (verified or not), and those that failed verification.
    pub replication_bytes_fetched: Counter,
    pub replication_bytes_local: Counter,
    pub replication_corrupt_ranges: Counter,
    pub replication_versions: Family<OutcomeLabels, Counter>,
    pub transfers_in_progress: Gauge,
    pub blob_bytes_served: Counter,
    pub blob_requests_refused: Family<ReasonLabels, Counter>,
    /// Registry mirror: versions pushed or failed, blobs by outcome, bytes uploaded, queue.
    pub mirror_pushes: Family<OutcomeLabels, Counter>,
    pub mirror_blobs: Family<OutcomeLabels, Counter>,
    pub mirror_bytes_pushed: Counter,
    pub mirror_queue: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rhio");
        let metrics = Self {
            nats_connected: Gauge::default(),
            s3_reachable: Gauge::default(),
            peers_known: Gauge::default(),
            peers_connected: Gauge::default(),
            peers_suspect: Gauge::default(),
            peers_failed: Gauge::default(),
            sync_sessions_refused: Family::default(),
            uptime_seconds: Gauge::default(),
            peer_probes: Family::default(),
            s3_checks: Family::default(),
            status_requests: Counter::default(),
            operations_signed: Counter::default(),
            operations_received: Counter::default(),
            operations_sent: Counter::default(),
            operation_bytes_sent: Counter::default(),
            operations_duplicate: Counter::default(),
            relay_operations_pruned: Counter::default(),
            announcements_sent: Counter::default(),
            sync_prunes: Counter::default(),
            sync_grafts: Counter::default(),
            operations_delivered: Counter::default(),
            operations_rejected: Family::default(),
            routing_errors: Counter::default(),
            messages_dead_lettered: Family::default(),
            messages_refused: Family::default(),
            announcements: Family::default(),
            sync_sessions: Family::default(),
            replication_bytes_fetched: Counter::default(),
            replication_bytes_local: Counter::default(),
            replication_corrupt_ranges: Counter::default(),
            replication_versions: Family::default(),
            transfers_in_progress: Gauge::default(),
            blob_bytes_served: Counter::default(),
            blob_requests_refused: Family::default(),
            mirror_pushes: Family::default(),
            mirror_blobs: Family::default(),
            mirror_bytes_pushed: Counter::default(),
            mirror_queue: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "nats_connected",
            "1 when the NATS connection is up",
            metrics.nats_connected.clone(),
        );
        registry.register(
            "s3_reachable",
            "1 when the last S3 bucket check succeeded",
            metrics.s3_reachable.clone(),
        );
        registry.register(
            "peers_known",
            "Peers tracked: known nodes and overlay neighbours",
            metrics.peers_known.clone(),
        );
        registry.register(
            "peers_connected",
            "Peers alive (answered within network.suspect_after_secs)",
            metrics.peers_connected.clone(),
        );
        registry.register(
            "peers_suspect",
            "Peers silent for longer than network.suspect_after_secs or just failed",
            metrics.peers_suspect.clone(),
        );
        registry.register(
            "peers_failed",
            "Peers silent for three times network.suspect_after_secs or failing repeatedly",
            metrics.peers_failed.clone(),
        );
        registry.register(
            "sync_sessions_refused",
            "Sync sessions refused, by reason (not_a_member)",
            metrics.sync_sessions_refused.clone(),
        );
        registry.register(
            "uptime_seconds",
            "Seconds since the node started",
            metrics.uptime_seconds.clone(),
        );
        registry.register(
            "peer_probes",
            "Probes of known nodes by outcome",
            metrics.peer_probes.clone(),
        );
        registry.register(
            "s3_checks",
            "S3 bucket checks by outcome",
            metrics.s3_checks.clone(),
        );
        registry.register(
            "status_requests",
            "rhio.status requests answered",
            metrics.status_requests.clone(),
        );
        registry.register(
            "operations_signed",
            "Local messages signed as operations",
            metrics.operations_signed.clone(),
        );
        registry.register(
            "operations_received",
            "Operations of other authors verified and stored",
            metrics.operations_received.clone(),
        );
        registry.register(
            "sync_operations_sent",
            "Operations sent to peers in sync sessions (each copy counts: the transmissions)",
            metrics.operations_sent.clone(),
        );
        registry.register(
            "sync_operation_bytes_sent",
            "Bytes of operations (header and body) sent to peers in sync sessions",
            metrics.operation_bytes_sent.clone(),
        );
        registry.register(
            "sync_operations_duplicate",
            "Operations received that were stored already (a copy another peer delivered first)",
            metrics.operations_duplicate.clone(),
        );
        registry.register(
            "relay_operations_pruned",
            "Relayed operations deleted by relay retention",
            metrics.relay_operations_pruned.clone(),
        );
        registry.register(
            "sync_announcements_sent",
            "Operations announced instead of sent, to subscribers that pruned the session",
            metrics.announcements_sent.clone(),
        );
        registry.register(
            "sync_prunes",
            "Sessions this node pruned (another session delivered their operations first)",
            metrics.sync_prunes.clone(),
        );
        registry.register(
            "sync_grafts",
            "Announced operations this node asked for because they did not arrive elsewhere in time",
            metrics.sync_grafts.clone(),
        );
        registry.register(
            "operations_delivered",
            "Operations of other authors published into the local JetStream",
            metrics.operations_delivered.clone(),
        );
        registry.register(
            "operations_rejected",
            "Received operations rejected, by reason",
            metrics.operations_rejected.clone(),
        );
        registry.register(
            "routing_errors",
            "Failures of NATS, JetStream or the store that paused routing",
            metrics.routing_errors.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Received messages the local JetStream can never take, moved aside, by reason",
            metrics.messages_dead_lettered.clone(),
        );
        registry.register(
            "messages_refused",
            "Local messages not signed because they cannot be delivered anywhere, by reason",
            metrics.messages_refused.clone(),
        );
        registry.register(
            "announcements",
            "Dataset version announcements: acknowledged by JetStream (ok) or kept queued (retry)",
            metrics.announcements.clone(),
        );
        registry.register(
            "sync_sessions",
            "Open sync sessions (subscribed: to peers; serving: from peers)",
            metrics.sync_sessions.clone(),
        );
        registry.register(
            "replication_bytes_fetched",
            "Blob bytes received from peers for replication (bao encoding included)",
            metrics.replication_bytes_fetched.clone(),
        );
        registry.register(
            "replication_bytes_local",
            "Bytes of replicated versions copied from blobs already in this cluster's S3",
            metrics.replication_bytes_local.clone(),
        );
        registry.register(
            "replication_corrupt_ranges",
            "Blob ranges from peers that failed bao verification",
            metrics.replication_corrupt_ranges.clone(),
        );
        registry.register(
            "replication_versions",
            "Dataset versions replicated, by outcome",
            metrics.replication_versions.clone(),
        );
        registry.register(
            "transfers_in_progress",
            "Dataset versions being replicated now",
            metrics.transfers_in_progress.clone(),
        );
        registry.register(
            "blob_bytes_served",
            "Blob bytes sent to peers",
            metrics.blob_bytes_served.clone(),
        );
        registry.register(
            "blob_requests_refused",
            "Blob requests of peers refused, by reason",
            metrics.blob_requests_refused.clone(),
        );
        registry.register(
            "mirror_pushes",
            "Dataset versions pushed to the registry (pushed) or attempts that failed (failed)",
            metrics.mirror_pushes.clone(),
        );
        registry.register(
            "mirror_blobs",
            "Blobs of pushed versions: uploaded, already present, or mounted from another repository",
            metrics.mirror_blobs.clone(),
        );
        registry.register(
            "mirror_bytes_pushed",
            "Bytes uploaded to the registry",
            metrics.mirror_bytes_pushed.clone(),
        );
        registry.register(
            "mirror_queue",
            "Dataset versions waiting to be pushed to the registry",
            metrics.mirror_queue.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    pub fn reject(&self, reason: RejectReason) {
        self.operations_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The counts of `family` summed over `reasons` (each reason enum's `ALL`, as names).
    pub fn sum(
        family: &Family<ReasonLabels, Counter>,
        reasons: impl IntoIterator<Item = &'static str>,
    ) -> u64 {
        reasons
            .into_iter()
            .map(|reason| family.get_or_create(&ReasonLabels { reason }).get())
            .sum()
    }

    /// Rejected operations over all reasons.
    pub fn rejected_total(&self) -> u64 {
        Self::sum(
            &self.operations_rejected,
            RejectReason::ALL.map(RejectReason::as_str),
        )
    }

    /// Refreshes the state gauges and renders the Prometheus text format.
    pub fn render(&self, state: StateGauges) -> String {
        self.nats_connected.set(state.nats_connected as i64);
        self.s3_reachable.set(state.s3_reachable as i64);
        self.peers_known.set(state.peers_known as i64);
        self.peers_connected.set(state.peers_connected as i64);
        self.peers_suspect.set(state.peers_suspect as i64);
        self.peers_failed.set(state.peers_failed as i64);
        self.uptime_seconds.set(state.uptime_secs as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
