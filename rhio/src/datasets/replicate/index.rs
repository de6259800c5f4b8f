//! The blob index at start: every blob of the versions available here.

use rhio_core::manifest::DatasetManifest;
use rhio_core::operation::LogId;

use super::{ReplicationError, Replicator};
use crate::s3::keys;

impl Replicator {
    /// Fills the blob index from the versions available here: this node's own imports and
    /// completed replications.
    pub async fn load_index(&self) -> Result<(), ReplicationError> {
        self.refresh_failed().await;
        let logs = self.store.logs().await?;
        for log in logs {
            if log.author != self.own_key {
                continue;
            }
            let LogId::Dataset(name) = &log.log else {
                continue;
            };
            let ops = self
                .store
                .operations(&log.author, &log.log, 0, log.next_seq)
                .await?;
            for op in ops {
                if let Ok(manifest) = DatasetManifest::decode(&op.body) {
                    self.index
                        .insert_manifest(&manifest, &keys::own_version(name, op.seq()));
                }
            }
        }
        for (id, key) in self.state.available().await? {
            let ops = self
                .store
                .operations(
                    &id.author,
                    &LogId::Dataset(id.dataset.clone()),
                    id.version,
                    1,
                )
                .await?;
            if let Some(manifest) = ops
                .first()
                .and_then(|op| DatasetManifest::decode(&op.body).ok())
            {
                self.index.insert_manifest(&manifest, &key);
            }
        }
        Ok(())
    }
}
