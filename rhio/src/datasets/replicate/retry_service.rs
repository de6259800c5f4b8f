//! `rhio.retry`: a version recorded as failed is replicated again on request.

use rhio_core::api::{Empty, ErrorCode, Reply, RetryRequest};
use rhio_core::identity::PublicKey;
use tokio_util::sync::CancellationToken;

use super::{RETRY_SUBJECT, Replicator};
use crate::datasets::transfers::VersionId;

impl Replicator {
    /// Copies the failed versions into the status.
    pub(super) async fn refresh_failed(&self) {
        match self.state.failed().await {
            Ok(failed) => *self.transfers.failed.lock().expect("failed lock") = failed,
            Err(err) => tracing::warn!(%err, "cannot read failed versions"),
        }
    }

    /// Answers `rhio.retry` until shutdown: `{"author": "<hex>", "dataset": "...", "version": N}`
    /// forgets that the version failed, so its worker replicates it again.
    pub async fn serve_retry(self, nats: async_nats::Client, shutdown: CancellationToken) {
        crate::nats::serve_requests(nats, RETRY_SUBJECT, 4, shutdown, |payload| {
            let replicator = self.clone();
            async move {
                let answer = match replicator.retry(&payload).await {
                    Ok(()) => Reply::Ok(Empty {}),
                    Err((code, message)) => Reply::error(code, message),
                };
                serde_json::to_vec(&answer).expect("reply serializes")
            }
        })
        .await;
    }

    async fn retry(&self, body: &[u8]) -> Result<(), (ErrorCode, String)> {
        let request: RetryRequest = serde_json::from_slice(body).map_err(|err| {
            (
                ErrorCode::BadRequest,
                format!("expected {{\"author\", \"dataset\", \"version\"}}: {err}"),
            )
        })?;
        let author: PublicKey = request.author.parse().map_err(|_| {
            (
                ErrorCode::BadRequest,
                format!("{} is no public key", request.author),
            )
        })?;
        let id = VersionId {
            author,
            dataset: request.dataset,
            version: request.version,
        };
        let retried = self
            .state
            .retry(&id)
            .await
            .map_err(|err| (ErrorCode::Internal, err.to_string()))?;
        if !retried {
            return Err((
                ErrorCode::NotFailed,
                format!("{id} is not recorded as failed"),
            ));
        }
        tracing::info!(%id, "replicating a failed version again on request");
        self.refresh_failed().await;
        self.rescan.notify_one();
        Ok(())
    }
}
