//! The mirror's durable state in `replication.sqlite`, beside the announcement outbox.
//!
//! The queue needs no table of its own: every version that became available in this cluster
//! is a row of `announcements` (imported or replicated, kept after it was announced), so the
//! versions to push are those rows without a `pushed` row in `mirror_pushes`. A version queued
//! before a crash or while the registry is down is therefore still queued after a restart, and
//! enabling the mirror later pushes what is already here.
//!
//! `mirror_blobs` remembers the sha256 digest of each Parquet file pushed (keyed by its
//! BLAKE3, which the manifest carries) and the repositories holding it, so a re-push skips the
//! upload (HEAD) and another repository gets it by cross-repository mount.

use std::str::FromStr;

use rhio_core::identity::PublicKey;
use sqlx::Row;
use sqlx::sqlite::{SqlitePool, SqliteRow};

use crate::datasets::transfers::{TransferState, VersionId};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mirror_pushes (
    author TEXT NOT NULL, dataset TEXT NOT NULL, version INTEGER NOT NULL,
    repository TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, attempts INTEGER NOT NULL,
    manifest_digest TEXT,
    PRIMARY KEY (author, dataset, version)
);
CREATE TABLE IF NOT EXISTS mirror_blobs (
    blake3 TEXT NOT NULL, repository TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (blake3, repository)
);
";

/// A version to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedVersion {
    pub id: VersionId,
    /// Where the file is in this cluster's S3 (`s3://bucket/key`).
    pub location: String,
    /// Failed attempts so far, and the last reason.
    pub attempts: u32,
    pub reason: Option<String>,
}

/// Where a Parquet file already sits in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownBlob {
    pub repository: String,
    pub digest: String,
    pub size: u64,
}

#[derive(Clone, Debug)]
pub struct MirrorQueue {
    pool: SqlitePool,
}

type Result<T> = std::result::Result<T, sqlx::Error>;

impl MirrorQueue {
    /// The mirror's tables beside the announcement outbox (in the same database, so the
    /// queue is one query over both).
    pub async fn new(state: &TransferState) -> Result<Self> {
        let pool = state.pool().clone();
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Versions available here and not pushed yet, oldest first per dataset log.
    pub async fn pending(&self) -> Result<Vec<QueuedVersion>> {
        let rows = sqlx::query(
            "SELECT a.author, a.dataset, a.version, a.location, m.attempts, m.reason
             FROM announcements a LEFT JOIN mirror_pushes m
               ON a.author = m.author AND a.dataset = m.dataset AND a.version = m.version
             WHERE m.state IS NULL OR m.state NOT IN ('pushed', 'invalid')
             ORDER BY a.author, a.dataset, a.version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().filter_map(queued_version).collect())
    }

    /// Records a pushed version (never queued again).
    pub async fn pushed(&self, id: &VersionId, repository: &str, digest: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO mirror_pushes VALUES (?, ?, ?, ?, 'pushed', NULL, 0, ?)
             ON CONFLICT (author, dataset, version) DO UPDATE
             SET state = 'pushed', reason = NULL, repository = excluded.repository,
                 manifest_digest = excluded.manifest_digest",
        )
        .bind(id.author.to_string())
        .bind(&id.dataset)
        .bind(id.version as i64)
        .bind(repository)
        .bind(digest)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a failed attempt with its reason (the version stays queued).
    pub async fn failed(&self, id: &VersionId, repository: &str, reason: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO mirror_pushes VALUES (?, ?, ?, ?, 'failed', ?, 1, NULL)
             ON CONFLICT (author, dataset, version) DO UPDATE
             SET state = 'failed', reason = excluded.reason, attempts = attempts + 1",
        )
        .bind(id.author.to_string())
        .bind(&id.dataset)
        .bind(id.version as i64)
        .bind(repository)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a version that can never be pushed (its dataset name is no OCI repository name):
    /// it leaves the queue and stays listed, with the reason.
    pub async fn invalid(&self, id: &VersionId, reason: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO mirror_pushes VALUES (?, ?, ?, '', 'invalid', ?, 1, NULL)
             ON CONFLICT (author, dataset, version) DO UPDATE
             SET state = 'invalid', reason = excluded.reason",
        )
        .bind(id.author.to_string())
        .bind(&id.dataset)
        .bind(id.version as i64)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Versions recorded as [`MirrorQueue::invalid`].
    pub async fn invalid_versions(&self) -> Result<Vec<QueuedVersion>> {
        let rows = sqlx::query(
            "SELECT a.author, a.dataset, a.version, a.location, m.attempts, m.reason
             FROM announcements a JOIN mirror_pushes m
               ON a.author = m.author AND a.dataset = m.dataset AND a.version = m.version
             WHERE m.state = 'invalid' ORDER BY a.author, a.dataset, a.version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().filter_map(queued_version).collect())
    }

    /// The highest version of a dataset log pushed so far (decides where `latest` points).
    pub async fn latest_pushed(&self, author: &PublicKey, dataset: &str) -> Result<Option<u64>> {
        let row = sqlx::query(
            "SELECT MAX(version) FROM mirror_pushes
             WHERE author = ? AND dataset = ? AND state = 'pushed'",
        )
        .bind(author.to_string())
        .bind(dataset)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get::<Option<i64>, _>(0).map(|v| v as u64))
    }

    /// Versions pushed (all time).
    pub async fn pushed_count(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COUNT(*) FROM mirror_pushes WHERE state = 'pushed'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// Repositories known to hold the file with BLAKE3 `blake3`.
    pub async fn known_blobs(&self, blake3: &str) -> Result<Vec<KnownBlob>> {
        let rows =
            sqlx::query("SELECT repository, sha256, size FROM mirror_blobs WHERE blake3 = ?")
                .bind(blake3)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|row| KnownBlob {
                repository: row.get(0),
                digest: row.get(1),
                size: row.get::<i64, _>(2) as u64,
            })
            .collect())
    }

    pub async fn remember_blob(&self, blake3: &str, blob: &KnownBlob) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO mirror_blobs VALUES (?, ?, ?, ?)")
            .bind(blake3)
            .bind(&blob.repository)
            .bind(&blob.digest)
            .bind(blob.size as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// A row of (author, dataset, version, location, attempts, reason).
fn queued_version(row: &SqliteRow) -> Option<QueuedVersion> {
    let author: String = row.get(0);
    Some(QueuedVersion {
        id: VersionId {
            author: PublicKey::from_str(&author).ok()?,
            dataset: row.get(1),
            version: row.get::<i64, _>(2) as u64,
        },
        location: row.get(3),
        attempts: row.get::<Option<i64>, _>(4).unwrap_or(0) as u32,
        reason: row.get(5),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhio_core::identity::PrivateKey;

    #[tokio::test]
    async fn available_versions_stay_queued_until_pushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replication.sqlite");
        let state = crate::datasets::transfers::TransferState::open(&path)
            .await
            .unwrap();
        let queue = MirrorQueue::new(&state).await.unwrap();
        let author = PrivateKey::generate().public_key();
        let id = |version| VersionId {
            author,
            dataset: "weather".into(),
            version,
        };
        for version in [1, 0] {
            state
                .queue_announcement(&crate::datasets::transfers::Announcement {
                    id: id(version),
                    subject: "datasets.weather".into(),
                    location: format!("s3://rhio/v{version}"),
                })
                .await
                .unwrap();
        }
        let pending = queue.pending().await.unwrap();
        assert_eq!(
            pending.iter().map(|v| v.id.version).collect::<Vec<_>>(),
            [0, 1]
        );
        queue.failed(&id(0), "rhio/weather", "down").await.unwrap();
        queue
            .failed(&id(0), "rhio/weather", "still down")
            .await
            .unwrap();
        // Reopened (a restarted node): the failed version is still queued, with its reason.
        drop(queue);
        let queue = MirrorQueue::new(&state).await.unwrap();
        let pending = queue.pending().await.unwrap();
        assert_eq!(pending[0].attempts, 2);
        assert_eq!(pending[0].reason.as_deref(), Some("still down"));
        queue
            .pushed(&id(0), "rhio/weather", "sha256:aa")
            .await
            .unwrap();
        assert_eq!(
            queue.latest_pushed(&author, "weather").await.unwrap(),
            Some(0)
        );
        let pending = queue.pending().await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id.version, 1);
        assert_eq!(queue.pushed_count().await.unwrap(), 1);
        // An invalid version leaves the queue and is listed with its reason.
        queue.invalid(&id(1), "bad name").await.unwrap();
        assert!(queue.pending().await.unwrap().is_empty());
        let invalid = queue.invalid_versions().await.unwrap();
        assert_eq!(invalid.len(), 1);
        assert_eq!(invalid[0].reason.as_deref(), Some("bad name"));
        let blob = KnownBlob {
            repository: "rhio/weather".into(),
            digest: "sha256:bb".into(),
            size: 10,
        };
        queue.remember_blob("b3", &blob).await.unwrap();
        assert_eq!(queue.known_blobs("b3").await.unwrap(), vec![blob]);
        assert!(queue.known_blobs("other").await.unwrap().is_empty());
    }
}
