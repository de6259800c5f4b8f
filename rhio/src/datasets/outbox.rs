//! The announcement outbox: every dataset version that became available in this cluster is
//! announced on its JetStream subject until JetStream acknowledged it.
//!
//! Import and replication queue an [`Announcement`] in `replication.sqlite` in the same step that
//! makes the version available; this task publishes what is queued (with the provenance headers
//! of the version's signed manifest and `Nats-Msg-Id` = operation hash, so a repeat after a
//! crash between the PubAck and the record is dropped by JetStream) and records each one as
//! acknowledged after its PubAck, so a version is announced once, however often an import of
//! it is retried. While NATS is down or no stream captures the subject, entries stay queued and are
//! retried with backoff; a restart picks them up from the table.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rhio_core::manifest::DatasetManifest;
use rhio_core::operation::{LogId, SignedOperation};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::transfers::{Announcement, TransferState};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::store::Store;

/// Pauses between attempts while announcements fail.
const RETRY: crate::retry::Backoff =
    crate::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// Longest wait for JetStream's acknowledgement of one announcement.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a version could not be announced (it stays queued and is tried again).
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("reading its manifest: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the manifest of {0} is not in the store")]
    NoManifest(super::transfers::VersionId),
    #[error("its manifest does not decode: {0}")]
    Manifest(#[from] rhio_core::manifest::ManifestError),
    #[error("publishing: {0}")]
    Publish(#[from] async_nats::jetstream::context::PublishError),
    #[error("no PubAck within {ACK_TIMEOUT:?}")]
    NoAck,
}

/// Handle to queue announcements; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    state: TransferState,
    wake: Arc<Notify>,
    /// Queued announcements as of the publisher's last pass (for status).
    pending: Arc<AtomicUsize>,
    /// Woken with the publisher: a version became available (the registry mirror waits on it).
    available: Arc<Notify>,
}

impl Outbox {
    pub fn new(state: TransferState) -> Self {
        Self {
            state,
            wake: Arc::new(Notify::new()),
            pending: Arc::new(AtomicUsize::new(0)),
            available: Arc::new(Notify::new()),
        }
    }

    /// Notified whenever a version is queued (one waiter: the registry mirror).
    pub fn available(&self) -> Arc<Notify> {
        self.available.clone()
    }

    /// Queues `announcement` durably and wakes the publisher.
    pub async fn queue(&self, announcement: &Announcement) -> Result<(), sqlx::Error> {
        self.state.queue_announcement(announcement).await?;
        self.wake();
        Ok(())
    }

    /// The durable state the outbox lives in (shared with imports and replication).
    pub fn state(&self) -> &TransferState {
        &self.state
    }

    /// Wakes the publisher (after [`TransferState::finish`] queued an announcement itself).
    pub fn wake(&self) {
        self.wake.notify_one();
        self.available.notify_one();
    }

    /// Announcements not acknowledged yet, as of the publisher's last pass.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Publishes queued announcements until shutdown.
    pub async fn run(
        self,
        js: async_nats::jetstream::Context,
        store: Store,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut attempts = RETRY.attempts();
        loop {
            let pending = match self.state.pending_announcements().await {
                Ok(pending) => pending,
                Err(err) => {
                    tracing::warn!(%err, "cannot read the announcement outbox");
                    Vec::new()
                }
            };
            let mut failed = false;
            let mut left = pending.len();
            self.pending.store(left, Ordering::Relaxed);
            for announcement in &pending {
                match publish(&js, &store, announcement).await {
                    Ok(()) => {
                        metrics
                            .announcements
                            .get_or_create(&OutcomeLabels { outcome: "ok" })
                            .inc();
                        if let Err(err) = self.state.announced(&announcement.id).await {
                            tracing::warn!(%err, "cannot record an announcement; it may repeat");
                        }
                        left -= 1;
                        self.pending.store(left, Ordering::Relaxed);
                    }
                    Err(err) => {
                        metrics
                            .announcements
                            .get_or_create(&OutcomeLabels { outcome: "retry" })
                            .inc();
                        tracing::warn!(
                            dataset = %announcement.id.dataset,
                            version = announcement.id.version,
                            author = %announcement.id.author,
                            subject = %announcement.subject,
                            %err,
                            failures = attempts.failures() + 1,
                            "dataset version available but not announced yet (is NATS up and a stream capturing the subject?); retrying"
                        );
                        failed = true;
                        break;
                    }
                }
            }
            let pause = if failed {
                Some(attempts.next_delay(crate::retry::jitter()))
            } else {
                attempts.reset();
                None
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified(), if pause.is_none() => {}
                _ = tokio::time::sleep(pause.unwrap_or(RETRY.max)) => {}
            }
        }
    }
}

async fn publish(
    js: &async_nats::jetstream::Context,
    store: &Store,
    announcement: &Announcement,
) -> Result<(), AnnounceError> {
    let id = &announcement.id;
    let op = store
        .operation(&id.author, &LogId::Dataset(id.dataset.clone()), id.version)
        .await?
        .ok_or_else(|| AnnounceError::NoManifest(id.clone()))?;
    let manifest = DatasetManifest::decode(&op.body)?;
    tokio::time::timeout(
        ACK_TIMEOUT,
        announce(
            js,
            &announcement.subject,
            &manifest,
            &op,
            &announcement.location,
        ),
    )
    .await
    .map_err(|_| AnnounceError::NoAck)?
}

/// Publishes a version's summary on the local JetStream `subject` with the provenance headers of
/// its manifest operation; `location` is where the file is in *this* cluster's S3.
async fn announce(
    js: &async_nats::jetstream::Context,
    subject: &str,
    manifest: &DatasetManifest,
    op: &SignedOperation,
    location: &str,
) -> Result<(), AnnounceError> {
    let summary = rhio_core::api::DatasetEvent::of(manifest, &op.hash.to_hex(), location);
    let summary = serde_json::to_vec(&summary).expect("event serializes");
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in rhio_core::message::provenance_headers(op) {
        headers.insert(name, value.as_str());
    }
    js.publish_with_headers(subject.to_string(), headers, summary.into())
        .await?
        .await?;
    Ok(())
}
