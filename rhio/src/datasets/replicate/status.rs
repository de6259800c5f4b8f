//! What replication reports: transfers in progress, failed versions, and why a version could
//! not be replicated this time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use thiserror::Error;

use crate::datasets::transfers::VersionId;

#[derive(Debug, Error)]
pub enum ReplicationError {
    #[error("manifest: {0}")]
    Manifest(String),
    #[error(transparent)]
    Storage(#[from] crate::s3::ObjectError),
    #[error("state: {0}")]
    State(#[from] sqlx::Error),
    #[error("operation store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("no peer could serve blob {hash} range {start}..{end}: {last}")]
    NoSource {
        hash: String,
        start: u64,
        end: u64,
        last: String,
    },
    #[error("assembled file hash {actual} is not the manifest's {expected}")]
    FileHash { expected: String, actual: String },
    #[error("{0}")]
    Internal(String),
}

/// A transfer in progress, as status reports it.
pub use rhio_core::api::status::TransferStatus;

/// Transfers in progress and versions that failed, shared with status.
#[derive(Debug, Clone, Default)]
pub struct Transfers {
    pub(super) inner: Arc<Mutex<BTreeMap<VersionId, (Instant, TransferStatus)>>>,
    pub(super) failed: Arc<Mutex<Vec<crate::datasets::transfers::FailedVersion>>>,
}

impl Transfers {
    /// Versions recorded as failed (as of the last change).
    pub fn failed(&self) -> Vec<crate::datasets::transfers::FailedVersion> {
        self.failed.lock().expect("failed lock").clone()
    }

    pub fn snapshot(&self) -> Vec<TransferStatus> {
        self.inner
            .lock()
            .expect("transfers lock")
            .values()
            .map(|(started, status)| {
                let elapsed = started.elapsed().as_secs_f64();
                TransferStatus {
                    elapsed_secs: elapsed,
                    rate_mib_s: if elapsed > 0.0 {
                        status.bytes_fetched as f64 / elapsed / (1024.0 * 1024.0)
                    } else {
                        0.0
                    },
                    ..status.clone()
                }
            })
            .collect()
    }

    pub(super) fn update(&self, id: &VersionId, change: impl FnOnce(&mut TransferStatus)) {
        if let Some((_, status)) = self.inner.lock().expect("transfers lock").get_mut(id) {
            change(status);
        }
    }
}
