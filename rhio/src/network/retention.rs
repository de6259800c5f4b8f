//! Relay retention: bounds what a node keeps of the logs it only relays.
//!
//! Every member stores every member author's operations; a log this node neither authors nor
//! subscribes to is kept only for passing on. Once a minute, the operations of such logs beyond
//! `network.relay_max_bytes_per_log` or older than `network.relay_max_age_secs` are deleted
//! (the newest of each log stays, and the log's head, so new operations continue the chain).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::NetworkConfig;
use crate::metrics::Metrics;
use crate::policy::Routes;
use crate::store::Store;

const INTERVAL: Duration = Duration::from_secs(60);

pub async fn run(
    store: Store,
    routes: Routes,
    config: NetworkConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let max_bytes = (config.relay_max_bytes_per_log > 0).then_some(config.relay_max_bytes_per_log);
    let max_age = (config.relay_max_age_secs > 0)
        .then_some(config.relay_max_age_secs.saturating_mul(1_000_000));
    if max_bytes.is_none() && max_age.is_none() {
        return;
    }
    let own = store.public_key();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        let logs = match store.logs().await {
            Ok(logs) => logs,
            Err(err) => {
                tracing::warn!(%err, "relay retention: cannot list logs");
                continue;
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut deleted = 0;
        for log in logs {
            if log.author == own || routes.accepts(&log.author, &log.log) {
                continue;
            }
            match store
                .prune(&log.author, &log.log, max_bytes, max_age, now)
                .await
            {
                Ok(count) => deleted += count,
                Err(err) => {
                    tracing::warn!(%err, author = %log.author, log = %log.log.name(), "relay retention failed for a log");
                }
            }
        }
        if deleted > 0 {
            metrics.relay_operations_pruned.inc_by(deleted);
            tracing::info!(deleted, "relay retention deleted old relayed operations");
        }
    }
}
