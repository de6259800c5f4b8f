//! Durable replication state in the node's data directory (`replication.sqlite`): the multipart
//! upload of each version being replicated with the parts already uploaded (their ETag and
//! BLAKE3 chaining value), and the versions that are complete in this cluster.
//!
//! A version's announcement is a durable step too: the outbox (`announcements`) holds every
//! version that became available here (imported or replicated) until JetStream acknowledged its
//! announcement, so a crash or a NATS outage between "available" and "announced" delays the
//! announcement but never loses it.
//!
//! A part is recorded after S3 accepted it, so a restarted node resumes a transfer from the parts
//! it has and never needs the bytes of those parts again (the whole-file hash is computed from
//! the stored chaining values).

use std::path::Path;
use std::str::FromStr;

use rhio_core::identity::PublicKey;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS transfers (
    author TEXT NOT NULL, dataset TEXT NOT NULL, version INTEGER NOT NULL,
    key TEXT NOT NULL, upload_id TEXT NOT NULL,
    PRIMARY KEY (author, dataset, version)
);
CREATE TABLE IF NOT EXISTS parts (
    author TEXT NOT NULL, dataset TEXT NOT NULL, version INTEGER NOT NULL,
    number INTEGER NOT NULL, etag TEXT NOT NULL, hash BLOB NOT NULL, wire_bytes INTEGER NOT NULL,
    PRIMARY KEY (author, dataset, version, number)
);
CREATE TABLE IF NOT EXISTS available (
    author TEXT NOT NULL, dataset TEXT NOT NULL, version INTEGER NOT NULL, key TEXT NOT NULL,
    PRIMARY KEY (author, dataset, version)
);
CREATE TABLE IF NOT EXISTS announcements (
    author TEXT NOT NULL, dataset TEXT NOT NULL, version INTEGER NOT NULL,
    subject TEXT NOT NULL, location TEXT NOT NULL, acked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (author, dataset, version)
);
CREATE TABLE IF NOT EXISTS import_uploads (
    key TEXT NOT NULL, upload_id TEXT NOT NULL,
    PRIMARY KEY (key, upload_id)
);
CREATE TABLE IF NOT EXISTS failed (
    author TEXT NOT NULL, dataset TEXT NOT NULL, version INTEGER NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (author, dataset, version)
);
";

/// One replicated version: (author, dataset, version).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId {
    pub author: PublicKey,
    pub dataset: String,
    pub version: u64,
}

impl std::fmt::Display for VersionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/v{} by {}", self.dataset, self.version, self.author)
    }
}

/// A version waiting for its announcement on the local JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub id: VersionId,
    pub subject: String,
    /// Where the file is in this cluster's S3 (`s3://bucket/key`).
    pub location: String,
}

/// A version that cannot be replicated, with the reason.
pub use rhio_core::api::status::FailedVersion;

/// A part already in S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DonePart {
    pub number: u32,
    pub etag: String,
    /// Chaining value of the part (the root hash when the file is one part).
    pub hash: [u8; 32],
    pub wire_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct TransferState {
    pool: SqlitePool,
}

type Result<T> = std::result::Result<T, sqlx::Error>;

impl TransferState {
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// The database, for state kept beside it (the registry mirror's tables).
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The multipart upload of a version in progress: (key, upload id).
    pub async fn transfer(&self, id: &VersionId) -> Result<Option<(String, String)>> {
        let row = sqlx::query(
            "SELECT key, upload_id FROM transfers WHERE author = ? AND dataset = ? AND version = ?",
        )
        .bind(id.author.to_string())
        .bind(&id.dataset)
        .bind(id.version as i64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }

    pub async fn start_transfer(&self, id: &VersionId, key: &str, upload_id: &str) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO transfers VALUES (?, ?, ?, ?, ?)")
            .bind(id.author.to_string())
            .bind(&id.dataset)
            .bind(id.version as i64)
            .bind(key)
            .bind(upload_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn parts(&self, id: &VersionId) -> Result<Vec<DonePart>> {
        let rows = sqlx::query(
            "SELECT number, etag, hash, wire_bytes FROM parts
             WHERE author = ? AND dataset = ? AND version = ? ORDER BY number",
        )
        .bind(id.author.to_string())
        .bind(&id.dataset)
        .bind(id.version as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let hash: Vec<u8> = row.get(2);
                Some(DonePart {
                    number: row.get::<i64, _>(0) as u32,
                    etag: row.get(1),
                    hash: hash.try_into().ok()?,
                    wire_bytes: row.get::<i64, _>(3) as u64,
                })
            })
            .collect())
    }

    pub async fn record_part(&self, id: &VersionId, part: &DonePart) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO parts VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(id.author.to_string())
            .bind(&id.dataset)
            .bind(id.version as i64)
            .bind(part.number as i64)
            .bind(&part.etag)
            .bind(part.hash.to_vec())
            .bind(part.wire_bytes as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets a transfer (after it completed or was abandoned).
    pub async fn drop_transfer(&self, id: &VersionId) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for table in ["transfers", "parts"] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE author = ? AND dataset = ? AND version = ?"
            ))
            .bind(id.author.to_string())
            .bind(&id.dataset)
            .bind(id.version as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Marks a version complete at `key`, queues its announcement (one transaction: available
    /// means announced or about to be) and forgets its transfer.
    pub async fn finish(
        &self,
        id: &VersionId,
        key: &str,
        announcement: &Announcement,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT OR REPLACE INTO available VALUES (?, ?, ?, ?)")
            .bind(id.author.to_string())
            .bind(&id.dataset)
            .bind(id.version as i64)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        insert_announcement(&mut tx, announcement).await?;
        tx.commit().await?;
        self.drop_transfer(id).await
    }

    /// Queues the announcement of a version, unless it is queued or acknowledged already.
    pub async fn queue_announcement(&self, announcement: &Announcement) -> Result<()> {
        let mut connection = self.pool.acquire().await?;
        insert_announcement(&mut connection, announcement).await
    }

    /// Announcements not acknowledged by JetStream yet, oldest versions first.
    pub async fn pending_announcements(&self) -> Result<Vec<Announcement>> {
        let rows = sqlx::query(
            "SELECT author, dataset, version, subject, location FROM announcements
             WHERE acked = 0 ORDER BY author, dataset, version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let author: String = row.get(0);
                Some(Announcement {
                    id: VersionId {
                        author: author.parse().ok()?,
                        dataset: row.get(1),
                        version: row.get::<i64, _>(2) as u64,
                    },
                    subject: row.get(3),
                    location: row.get(4),
                })
            })
            .collect())
    }

    /// Records that JetStream acknowledged an announcement (it is never queued again).
    pub async fn announced(&self, id: &VersionId) -> Result<()> {
        sqlx::query(
            "UPDATE announcements SET acked = 1 WHERE author = ? AND dataset = ? AND version = ?",
        )
        .bind(id.author.to_string())
        .bind(&id.dataset)
        .bind(id.version as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a multipart upload an import started (imports never resume: an upload still
    /// recorded at start was abandoned by a crash and is aborted).
    pub async fn start_import_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO import_uploads VALUES (?, ?)")
            .bind(key)
            .bind(upload_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets an import's upload (completed or aborted).
    pub async fn end_import_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM import_uploads WHERE key = ? AND upload_id = ?")
            .bind(key)
            .bind(upload_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Import uploads that were neither completed nor aborted: (key, upload id).
    pub async fn import_uploads(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT key, upload_id FROM import_uploads")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    /// Versions recorded as failed.
    pub async fn failed(&self) -> Result<Vec<FailedVersion>> {
        let rows = sqlx::query(
            "SELECT author, dataset, version, reason FROM failed ORDER BY author, dataset, version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| FailedVersion {
                author: row.get(0),
                dataset: row.get(1),
                version: row.get::<i64, _>(2) as u64,
                reason: row.get(3),
            })
            .collect())
    }

    /// Forgets that a version failed, so it is replicated again; true when it had failed.
    pub async fn retry(&self, id: &VersionId) -> Result<bool> {
        let done =
            sqlx::query("DELETE FROM failed WHERE author = ? AND dataset = ? AND version = ?")
                .bind(id.author.to_string())
                .bind(&id.dataset)
                .bind(id.version as i64)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records a version that cannot be replicated (and forgets its transfer).
    pub async fn fail(&self, id: &VersionId, reason: &str) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO failed VALUES (?, ?, ?, ?)")
            .bind(id.author.to_string())
            .bind(&id.dataset)
            .bind(id.version as i64)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        self.drop_transfer(id).await
    }

    /// The next version of a dataset log to replicate: the lowest one that is neither
    /// available here nor recorded as failed (versions are done in order; a failed version
    /// that is retried is done again before those after it are looked at).
    pub async fn next_version(&self, author: &PublicKey, dataset: &str) -> Result<u64> {
        let row = sqlx::query(
            "SELECT COALESCE(MIN(v.version + 1), 0) FROM (
                 SELECT version FROM available WHERE author = ?1 AND dataset = ?2
                 UNION SELECT version FROM failed WHERE author = ?1 AND dataset = ?2) AS v
             WHERE v.version + 1 NOT IN (
                 SELECT version FROM available WHERE author = ?1 AND dataset = ?2
                 UNION SELECT version FROM failed WHERE author = ?1 AND dataset = ?2)
             AND EXISTS (SELECT 1 FROM available WHERE author = ?1 AND dataset = ?2 AND version = 0
                 UNION SELECT 1 FROM failed WHERE author = ?1 AND dataset = ?2 AND version = 0)",
        )
        .bind(author.to_string())
        .bind(dataset)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// Every version available here: (version, key).
    pub async fn available(&self) -> Result<Vec<(VersionId, String)>> {
        let rows = sqlx::query("SELECT author, dataset, version, key FROM available")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let author: String = row.get(0);
                Some((
                    VersionId {
                        author: author.parse().ok()?,
                        dataset: row.get(1),
                        version: row.get::<i64, _>(2) as u64,
                    },
                    row.get(3),
                ))
            })
            .collect())
    }
}

async fn insert_announcement(
    connection: &mut sqlx::SqliteConnection,
    announcement: &Announcement,
) -> Result<()> {
    sqlx::query("INSERT OR IGNORE INTO announcements VALUES (?, ?, ?, ?, ?, 0)")
        .bind(announcement.id.author.to_string())
        .bind(&announcement.id.dataset)
        .bind(announcement.id.version as i64)
        .bind(&announcement.subject)
        .bind(&announcement.location)
        .execute(connection)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhio_core::identity::PrivateKey;

    #[tokio::test]
    async fn versions_advance_in_order_through_available_and_failed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let state = TransferState::open(&dir.path().join("r.sqlite"))
            .await
            .unwrap();
        let author = PrivateKey::generate().public_key();
        let id = |version| VersionId {
            author,
            dataset: "d".into(),
            version,
        };
        assert_eq!(state.next_version(&author, "d").await.unwrap(), 0);
        state.start_transfer(&id(0), "k0", "u0").await.unwrap();
        let part = DonePart {
            number: 1,
            etag: "e".into(),
            hash: [7; 32],
            wire_bytes: 10,
        };
        state.record_part(&id(0), &part).await.unwrap();
        // A reopened state (a restarted node) still has the transfer and its parts.
        drop(state);
        let state = TransferState::open(&dir.path().join("r.sqlite"))
            .await
            .unwrap();
        assert_eq!(
            state.transfer(&id(0)).await.unwrap(),
            Some(("k0".into(), "u0".into()))
        );
        assert_eq!(state.parts(&id(0)).await.unwrap(), vec![part]);
        let announcement = Announcement {
            id: id(0),
            subject: "datasets.d".into(),
            location: "s3://b/k0".into(),
        };
        state.finish(&id(0), "k0", &announcement).await.unwrap();
        assert_eq!(
            state.pending_announcements().await.unwrap(),
            vec![announcement.clone()]
        );
        state.announced(&id(0)).await.unwrap();
        assert!(state.pending_announcements().await.unwrap().is_empty());
        // An acknowledged announcement is never queued again.
        state.queue_announcement(&announcement).await.unwrap();
        assert!(state.pending_announcements().await.unwrap().is_empty());
        assert_eq!(state.transfer(&id(0)).await.unwrap(), None);
        assert!(state.parts(&id(0)).await.unwrap().is_empty());
        assert_eq!(state.next_version(&author, "d").await.unwrap(), 1);
        state.fail(&id(1), "bad manifest").await.unwrap();
        assert_eq!(state.next_version(&author, "d").await.unwrap(), 2);
        assert_eq!(state.next_version(&author, "other").await.unwrap(), 0);
        assert_eq!(state.available().await.unwrap(), vec![(id(0), "k0".into())]);
        // A later version done, then the failed one retried: it is next again.
        let later = Announcement {
            id: id(2),
            subject: "datasets.d".into(),
            location: "s3://b/k2".into(),
        };
        state.finish(&id(2), "k2", &later).await.unwrap();
        assert_eq!(state.next_version(&author, "d").await.unwrap(), 3);
        assert_eq!(state.failed().await.unwrap()[0].reason, "bad manifest");
        assert!(state.retry(&id(1)).await.unwrap());
        assert!(!state.retry(&id(1)).await.unwrap());
        assert_eq!(state.next_version(&author, "d").await.unwrap(), 1);
    }
}
