//! The node's durable operation store: every operation it signed or accepted, per author and
//! log, plus the cursors that make routing exactly-once across restarts.
//!
//! SQLite (WAL, `synchronous = FULL`) in `<data_dir>/rhio.sqlite`. One writer task owns all writes
//! and the in-memory log heads; it drains whatever requests are queued into one transaction
//! (group commit), so a burst of messages costs one fsync per batch rather than per message.
//! Readers use the pool directly. Newly committed operations are broadcast to the sync servers
//! (to push to peers) and to the delivery task (to publish into the local JetStream).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use p2panda_core::Hash;
use rhio_core::identity::{PrivateKey, PublicKey};
use rhio_core::operation::{LogId, SignedOperation};
use rhio_core::sync::{Arrival, ReorderBuffer};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Write requests waiting for the writer.
const WRITE_QUEUE: usize = 1024;
/// Committed operations buffered for slow listeners before they must rescan the store. The
/// ring keeps its operations until they are overwritten, whether read or not: 4,096 of 1 KiB
/// messages are ~6 MiB held for good (16,384 were ~24 MiB), and eight full commits of slack.
const EVENT_CAPACITY: usize = 4 * 1024;
/// Operations held back while waiting for a predecessor, across all logs.
const REORDER_CAPACITY: usize = 64 * 1024;
/// Longest a delivered position waits for a transaction to ride along with.
const DELIVERED_FLUSH: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("operation store {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("operation store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("operation store: {0}")]
    Write(#[from] rusqlite::Error),
    #[error("operation store: cannot start its writer thread: {0}")]
    Start(#[source] std::io::Error),
    #[error("operation store is shutting down")]
    Closed,
    #[error("stored operation is corrupt: {0}")]
    Corrupt(String),
}

/// What happened to one received operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Stored,
    /// Already stored (same hash).
    Duplicate,
    /// Ahead of a gap; stored when its predecessor arrives.
    Held,
    /// Ahead of a gap and the reorder buffer is full.
    Dropped,
    /// Same author, log and sequence number as a stored operation, but a different one.
    Conflict,
    /// Its backlink is not the hash of the stored predecessor.
    BrokenChain,
}

/// One log of one author, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogInfo {
    pub author: PublicKey,
    pub log: LogId,
    /// Next sequence number (= number of stored operations).
    pub next_seq: u64,
    /// Next sequence number to publish into the local JetStream.
    pub delivered_seq: u64,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    next_seq: u64,
    last_hash: Option<Hash>,
}

/// Headers read at once by [`Store::prune`]'s age check.
const PRUNE_PAGE: i64 = 256;

enum WriteRequest {
    AppendLocal {
        entries: Vec<LocalEntry>,
        cursor: Option<(String, u64)>,
        /// Fsync the commit (the operations are pushed only after it). Off for messages, whose
        /// operations are deterministic: see [`Store::append_messages`].
        durable: bool,
        reply: oneshot::Sender<Result<Vec<Arc<SignedOperation>>, StoreError>>,
    },
    /// Makes every commit so far durable (one fsync of the WAL, shared by all waiting).
    Sync {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    InsertRemote {
        ops: Vec<SignedOperation>,
        reply: oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
    },
    /// Positions are written with the next transaction (or after [`DELIVERED_FLUSH`] idle): a
    /// position lost in a crash only means a repeat that JetStream drops by `Nats-Msg-Id` (and
    /// delivery checks the stream on resume). Dead letters go into the same transaction.
    MarkDelivered {
        updates: Vec<(PublicKey, LogId, u64)>,
        dead_letters: Vec<DeadLetter>,
    },
    /// Commits whatever is pending (delivered positions) now.
    Flush {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Forgets dead letters that were delivered after all (replayed).
    RemoveDeadLetters {
        keys: Vec<(PublicKey, LogId, u64)>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Deletes the operations of a log before sequence number `before` (relay retention).
    Prune {
        author: PublicKey,
        log: LogId,
        before: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

/// A stored operation that the local JetStream can never take: delivery moved past it. The
/// operation itself stays in the store (and is still served to peers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub author: PublicKey,
    pub log: LogId,
    pub seq: u64,
    pub hash: String,
    /// Stable reason (`max_payload`, `max_msg_size`, `no_stream`, `undecodable`).
    pub reason: String,
    /// What JetStream or the client said.
    pub detail: String,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    writes: mpsc::Sender<WriteRequest>,
    events: broadcast::Sender<Arc<SignedOperation>>,
    /// The author of this node's own logs.
    own: PublicKey,
    /// Committed log heights (next sequence number), readable without a query.
    committed: Arc<std::sync::RwLock<HashMap<(PublicKey, LogId), u64>>>,
    durability: Arc<Durability>,
}

/// Commits with local appends, and how many of them are known to be on disk: a caller of
/// [`Store::sync`] whose commits the writer has already fsynced returns without a round trip.
#[derive(Default)]
struct Durability {
    committed: std::sync::atomic::AtomicU64,
    durable: std::sync::atomic::AtomicU64,
}

impl Durability {
    /// The count of commits to fsync, when some are not known to be on disk.
    fn pending(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let target = self.committed.load(Ordering::Acquire);
        (self.durable.load(Ordering::Acquire) < target).then_some(target)
    }

    /// Counts a commit with local appends; `on_disk` when that commit fsynced itself.
    fn count_commit(&self, on_disk: bool) {
        let count = self
            .committed
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        if on_disk {
            self.durable_through(count);
        }
    }

    /// Records that the first `count` commits are on disk.
    fn durable_through(&self, count: u64) {
        self.durable
            .fetch_max(count, std::sync::atomic::Ordering::AcqRel);
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS operations (
    author BLOB NOT NULL,
    log TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    header BLOB NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (author, log, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    author BLOB NOT NULL,
    log TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    last_hash BLOB NOT NULL,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (author, log)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    author BLOB NOT NULL,
    log TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at_micros INTEGER NOT NULL,
    PRIMARY KEY (author, log, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbound_cursors (
    stream TEXT PRIMARY KEY,
    last_stream_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS durability (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    syncs INTEGER NOT NULL
);
";

/// One operation to sign: its log, body and timestamp (`None`: now).
type LocalEntry = (LogId, Vec<u8>, Option<u64>);

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn author_of(bytes: &[u8]) -> Result<PublicKey, StoreError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("author is not 32 bytes".into()))?;
    PublicKey::from_bytes(&bytes).map_err(|err| StoreError::Corrupt(err.to_string()))
}

fn log_of(key: &str) -> Result<LogId, StoreError> {
    LogId::from_key(key).ok_or_else(|| StoreError::Corrupt(format!("log key {key:?}")))
}

async fn load_heads(pool: &SqlitePool) -> Result<HashMap<(PublicKey, LogId), Head>, StoreError> {
    let mut heads = HashMap::new();
    for row in sqlx::query("SELECT author, log, next_seq, last_hash FROM logs")
        .fetch_all(pool)
        .await?
    {
        let author = author_of(row.get::<&[u8], _>(0))?;
        let log = log_of(row.get::<&str, _>(1))?;
        let hash: [u8; 32] = row
            .get::<&[u8], _>(3)
            .try_into()
            .map_err(|_| StoreError::Corrupt("hash is not 32 bytes".into()))?;
        heads.insert(
            (author, log),
            Head {
                next_seq: row.get::<i64, _>(2) as u64,
                last_hash: Some(Hash::from_bytes(hash)),
            },
        );
    }
    Ok(heads)
}

impl Store {
    /// Opens (or creates) the store and starts its writer task.
    pub async fn open(path: &Path, key: PrivateKey) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(open_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Acknowledged means on disk: NATS messages are acked only after this commit.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .map_err(open_error)?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;

        let heads = load_heads(&pool).await?;
        let (writes, requests) = mpsc::channel(WRITE_QUEUE);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        // The writer has connections of its own, used synchronously on its own thread: a
        // transaction costs no round trip per statement. One chooses per commit whether it is
        // fsynced; the other (always `FULL`) makes the group commits of [`Store::sync`].
        let open_writer = || -> Result<rusqlite::Connection, StoreError> {
            let connection = rusqlite::Connection::open(path)?;
            connection.busy_timeout(std::time::Duration::from_secs(10))?;
            connection.pragma_update(None, "synchronous", "FULL")?;
            Ok(connection)
        };
        let connection = open_writer()?;
        let sync_connection = open_writer()?;
        let own = key.public_key();
        let committed = Arc::new(std::sync::RwLock::new(
            heads
                .iter()
                .map(|(key, head)| (key.clone(), head.next_seq))
                .collect(),
        ));
        let durability = Arc::new(Durability::default());
        let writer = Writer {
            committed: committed.clone(),
            durability: durability.clone(),
            connection: Some(connection),
            sync_connection,
            full_sync: true,
            pool: pool.clone(),
            key,
            heads,
            dirty: HashMap::new(),
            delivered: HashMap::new(),
            dead_letters: Vec::new(),
            reorder: ReorderBuffer::new(REORDER_CAPACITY),
            events: events.clone(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::Start)?;
        std::thread::Builder::new()
            .name("rhio-store".into())
            .spawn(move || runtime.block_on(writer.run(requests)))
            .map_err(StoreError::Start)?;
        Ok(Self {
            pool,
            writes,
            events,
            own,
            committed,
            durability,
        })
    }

    /// The author of this node's own logs.
    pub fn public_key(&self) -> PublicKey {
        self.own
    }

    /// The next sequence number of a log as committed (0 for a log the store does not have).
    pub fn next_seq(&self, author: &PublicKey, log: &LogId) -> u64 {
        self.committed
            .read()
            .expect("committed heads lock")
            .get(&(*author, log.clone()))
            .copied()
            .unwrap_or(0)
    }

    /// Newly committed operations, in commit order (each log in sequence order).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<SignedOperation>> {
        self.events.subscribe()
    }

    /// Signs and stores operations of this node (timestamped now), and records how far the
    /// outbound stream was read; both in one transaction, fsynced before the operations are
    /// pushed to peers, so a crash can never make this node sign a different operation at a
    /// position a peer already has (a fork).
    pub async fn append_local(
        &self,
        entries: Vec<(LogId, Vec<u8>)>,
        cursor: Option<(String, u64)>,
    ) -> Result<Vec<Arc<SignedOperation>>, StoreError> {
        let entries = entries.into_iter().map(|(log, body)| (log, body, None));
        self.append(entries.collect(), cursor, true).await
    }

    /// Signs and stores messages read from the outbound stream up to `cursor`, each with the
    /// timestamp JetStream gave it, in one transaction that is *not* fsynced: the operations are
    /// pushed to peers at once, without waiting for the disk. Call [`Store::sync`] before acking
    /// the messages.
    ///
    /// Why this cannot fork the log: the operations are a pure function of the stream (same
    /// messages, same order, same timestamps; Ed25519 signatures are deterministic) and of the
    /// log heads, which are committed with the cursor. A crash that takes commits not yet synced
    /// takes the cursor back with them; the messages were not acked, so JetStream delivers them
    /// again and signing them again gives byte-identical operations, which peers that already
    /// have them drop as copies. (Only a stream that lost unacked messages meanwhile, or a
    /// changed `[[publish]]` or NATS `max_payload`, would make the second signing differ; peers
    /// would then refuse the differing operations as conflicts.)
    pub async fn append_messages(
        &self,
        entries: Vec<(LogId, Vec<u8>, u64)>,
        cursor: (String, u64),
    ) -> Result<Vec<Arc<SignedOperation>>, StoreError> {
        let entries = entries
            .into_iter()
            .map(|(log, body, at)| (log, body, Some(at)));
        self.append(entries.collect(), Some(cursor), false).await
    }

    async fn append(
        &self,
        entries: Vec<LocalEntry>,
        cursor: Option<(String, u64)>,
        durable: bool,
    ) -> Result<Vec<Arc<SignedOperation>>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::AppendLocal {
            entries,
            cursor,
            durable,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Returns once every local append committed before the call is on disk (group commit: one
    /// fsync for every caller waiting at the time). The writer fsyncs right after committing
    /// unsynced local appends, while their operations travel; a caller that comes after that
    /// returns at once.
    pub async fn sync(&self) -> Result<(), StoreError> {
        if self.durability.pending().is_none() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Sync { reply }).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores verified operations received from peers.
    pub async fn insert_remote(
        &self,
        ops: Vec<SignedOperation>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::InsertRemote { ops, reply }).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Records that operations up to (excluding) `next` were published into the local JetStream.
    /// Written lazily (see [`WriteRequest::MarkDelivered`]).
    pub async fn mark_delivered(
        &self,
        updates: Vec<(PublicKey, LogId, u64)>,
        dead_letters: Vec<DeadLetter>,
    ) -> Result<(), StoreError> {
        self.send(WriteRequest::MarkDelivered {
            updates,
            dead_letters,
        })
        .await
    }

    /// The dead letters recorded so far, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        sqlx::query(
            "SELECT author, log, seq, hash, reason, detail FROM dead_letters ORDER BY at_micros",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|row| {
            Ok(DeadLetter {
                author: author_of(row.get::<&[u8], _>(0))?,
                log: log_of(row.get::<&str, _>(1))?,
                seq: row.get::<i64, _>(2) as u64,
                hash: row.get(3),
                reason: row.get(4),
                detail: row.get(5),
            })
        })
        .collect()
    }

    /// Forgets the dead letters `keys` (author, log, seq) once they were delivered after all;
    /// returns how many there were.
    pub async fn remove_dead_letters(
        &self,
        keys: Vec<(PublicKey, LogId, u64)>,
    ) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::RemoveDeadLetters { keys, reply })
            .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes pending delivered positions now (used at shutdown and by tests).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Flush { reply }).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn send(&self, request: WriteRequest) -> Result<(), StoreError> {
        self.writes
            .send(request)
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Highest stream sequence of `stream` already signed.
    pub async fn outbound_cursor(&self, stream: &str) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT last_stream_seq FROM outbound_cursors WHERE stream = ?")
            .bind(stream)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map_or(0, |row| row.get::<i64, _>(0) as u64))
    }

    /// All logs the store holds.
    pub async fn logs(&self) -> Result<Vec<LogInfo>, StoreError> {
        sqlx::query("SELECT author, log, next_seq, delivered_seq FROM logs")
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|row| {
                Ok(LogInfo {
                    author: author_of(row.get::<&[u8], _>(0))?,
                    log: log_of(row.get::<&str, _>(1))?,
                    next_seq: row.get::<i64, _>(2) as u64,
                    delivered_seq: row.get::<i64, _>(3) as u64,
                })
            })
            .collect()
    }

    /// Operation `seq` of a log, if this node has it.
    pub async fn operation(
        &self,
        author: &PublicKey,
        log: &LogId,
        seq: u64,
    ) -> Result<Option<SignedOperation>, StoreError> {
        let ops = self.operations(author, log, seq, 1).await?;
        Ok(ops.into_iter().next().filter(|op| op.seq() == seq))
    }

    /// Deletes the oldest operations of a log beyond `max_bytes` (headers and bodies) or older
    /// than `max_age_micros` by their authors' timestamps; the newest operation always stays, and
    /// the log's head (next sequence number, last hash) is kept whatever is deleted, so the log
    /// goes on. Returns how many were deleted.
    ///
    /// Reads stay small whatever the log's length: the byte bound is one aggregate query in
    /// SQLite, and the age bound reads headers from the oldest on, a page at a time, until the
    /// first one young enough (authors' timestamps rise along a log). The delete goes through
    /// the writer, like every write.
    pub async fn prune(
        &self,
        author: &PublicKey,
        log: &LogId,
        max_bytes: Option<u64>,
        max_age_micros: Option<u64>,
        now_micros: u64,
    ) -> Result<u64, StoreError> {
        let author_key = author.as_bytes().as_slice();
        let Some(newest) =
            sqlx::query("SELECT MAX(seq) FROM operations WHERE author = ? AND log = ?")
                .bind(author_key)
                .bind(log.to_key())
                .fetch_one(&self.pool)
                .await?
                .get::<Option<i64>, _>(0)
        else {
            return Ok(0);
        };
        let mut keep_from = 0i64;
        if let Some(max) = max_bytes {
            // The newest operation below which the operations from the newest down exceed max.
            let over: Option<i64> = sqlx::query(
                "SELECT MAX(seq) FROM (
                   SELECT seq, SUM(length(header) + length(body)) OVER (ORDER BY seq DESC) AS total
                   FROM operations WHERE author = ? AND log = ?
                 ) WHERE total > ? AND seq < ?",
            )
            .bind(author_key)
            .bind(log.to_key())
            .bind(max.min(i64::MAX as u64) as i64)
            .bind(newest)
            .fetch_one(&self.pool)
            .await?
            .get(0);
            if let Some(seq) = over {
                keep_from = keep_from.max(seq + 1);
            }
        }
        if let Some(age) = max_age_micros {
            let mut from = 0i64;
            'pages: loop {
                let rows = sqlx::query(
                    "SELECT seq, header FROM operations WHERE author = ? AND log = ? AND seq >= ? AND seq < ? ORDER BY seq LIMIT ?",
                )
                .bind(author_key)
                .bind(log.to_key())
                .bind(from)
                .bind(newest)
                .bind(PRUNE_PAGE)
                .fetch_all(&self.pool)
                .await?;
                for row in &rows {
                    let seq = row.get::<i64, _>(0);
                    let old = SignedOperation::decode_trusted(row.get::<Vec<u8>, _>(1), Vec::new())
                        .is_ok_and(|op| op.timestamp_micros().saturating_add(age) < now_micros);
                    if !old {
                        break 'pages;
                    }
                    keep_from = keep_from.max(seq + 1);
                }
                match rows.last() {
                    Some(last) if rows.len() as i64 == PRUNE_PAGE => {
                        from = last.get::<i64, _>(0) + 1
                    }
                    _ => break,
                }
            }
        }
        if keep_from == 0 {
            return Ok(0);
        }
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Prune {
            author: *author,
            log: log.clone(),
            before: keep_from as u64,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Up to `limit` operations of a log, from sequence number `from` on (the first may be later
    /// than `from` when older ones were pruned).
    pub async fn operations(
        &self,
        author: &PublicKey,
        log: &LogId,
        from: u64,
        limit: u64,
    ) -> Result<Vec<SignedOperation>, StoreError> {
        sqlx::query(
            "SELECT header, body FROM operations WHERE author = ? AND log = ? AND seq >= ? ORDER BY seq LIMIT ?",
        )
        .bind(author.as_bytes().as_slice())
        .bind(log.to_key())
        .bind(from as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|row| {
            SignedOperation::decode_trusted(row.get(0), row.get(1))
                .map_err(|err| StoreError::Corrupt(err.to_string()))
        })
        .collect()
    }
}

/// Owns the log heads and performs every write, on a thread of its own (SQLite calls block).
struct Writer {
    /// Taken out while a transaction runs on it.
    connection: Option<rusqlite::Connection>,
    /// Always `synchronous = FULL`: group commits ([`Writer::sync_wal`]).
    sync_connection: rusqlite::Connection,
    /// Whether the connection currently fsyncs on commit.
    full_sync: bool,
    pool: SqlitePool,
    key: PrivateKey,
    heads: HashMap<(PublicKey, LogId), Head>,
    /// Shared with [`Store::next_seq`]: heads as committed.
    committed: Arc<std::sync::RwLock<HashMap<(PublicKey, LogId), u64>>>,
    /// Shared with [`Store::sync`].
    durability: Arc<Durability>,
    /// Logs whose head changed in the open transaction.
    dirty: HashMap<(PublicKey, LogId), Head>,
    /// Delivered positions not written yet.
    delivered: HashMap<(PublicKey, LogId), u64>,
    /// Dead letters not written yet (written with the positions that skip them).
    dead_letters: Vec<DeadLetter>,
    reorder: ReorderBuffer,
    events: broadcast::Sender<Arc<SignedOperation>>,
}

/// Replies to send once the transaction committed.
enum Reply {
    Local(
        oneshot::Sender<Result<Vec<Arc<SignedOperation>>, StoreError>>,
        Vec<Arc<SignedOperation>>,
    ),
    Remote(
        oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
        Vec<InsertOutcome>,
    ),
    Flushed(oneshot::Sender<Result<(), StoreError>>),
    Pruned(oneshot::Sender<Result<u64, StoreError>>, u64),
    /// Answered only once the commits are durable.
    Synced(oneshot::Sender<Result<(), StoreError>>),
}

impl Reply {
    fn fail(self, err: &rusqlite::Error) {
        let error = || StoreError::Corrupt(format!("write failed: {err}"));
        match self {
            Reply::Local(reply, _) => drop(reply.send(Err(error()))),
            Reply::Remote(reply, _) => drop(reply.send(Err(error()))),
            Reply::Flushed(reply) | Reply::Synced(reply) => drop(reply.send(Err(error()))),
            Reply::Pruned(reply, _) => drop(reply.send(Err(error()))),
        }
    }
}

impl Writer {
    async fn run(mut self, mut requests: mpsc::Receiver<WriteRequest>) {
        let mut batch = Vec::with_capacity(256);
        loop {
            let received = if self.delivered.is_empty() {
                requests.recv_many(&mut batch, 256).await
            } else {
                // Idle past the flush delay: 0, and the positions are committed alone.
                tokio::time::timeout(DELIVERED_FLUSH, requests.recv_many(&mut batch, 256))
                    .await
                    .unwrap_or_default()
            };
            if received == 0 && (requests.is_closed() || self.delivered.is_empty()) {
                if requests.is_closed() && !self.delivered.is_empty() {
                    let _ = self.apply(Vec::new(), &mut Vec::new(), &mut Vec::new());
                }
                if requests.is_closed() {
                    return;
                }
                continue;
            }
            let mut replies = Vec::with_capacity(batch.len());
            let mut committed = Vec::new();
            let appends_local = batch
                .iter()
                .any(|r| matches!(r, WriteRequest::AppendLocal { .. }));
            let result = self.apply(std::mem::take(&mut batch), &mut replies, &mut committed);
            match result {
                Ok(()) => {
                    // Counted before anyone hears of the commit, so a sync that follows it
                    // waits for it.
                    if appends_local {
                        self.durability.count_commit(self.full_sync);
                    }
                    {
                        let mut heads = self.committed.write().expect("committed heads lock");
                        for op in &committed {
                            let next = heads.entry((op.author(), op.log().clone())).or_insert(0);
                            *next = (*next).max(op.seq() + 1);
                        }
                    }
                    for op in committed {
                        // No listener is fine: they rescan the store when they start.
                        let _ = self.events.send(op);
                    }
                    let mut synced = Vec::new();
                    for reply in replies {
                        match reply {
                            Reply::Local(reply, ops) => drop(reply.send(Ok(ops))),
                            Reply::Remote(reply, outcomes) => drop(reply.send(Ok(outcomes))),
                            Reply::Flushed(reply) => drop(reply.send(Ok(()))),
                            Reply::Pruned(reply, deleted) => drop(reply.send(Ok(deleted))),
                            Reply::Synced(reply) => synced.push(reply),
                        }
                    }
                    // After the operations went out: their fsync is off the delivery path. Done
                    // at once for unsynced local appends (their publisher syncs next), and for
                    // callers of `sync` whose commits are not on disk yet.
                    if !synced.is_empty() || (appends_local && !self.full_sync) {
                        let error = match self
                            .durability
                            .pending()
                            .map(|target| (target, self.sync_wal()))
                        {
                            None => None,
                            Some((target, Ok(()))) => {
                                self.durability.durable_through(target);
                                None
                            }
                            Some((_, Err(err))) => {
                                tracing::error!(%err, "operation store fsync failed");
                                Some(err.to_string())
                            }
                        };
                        for reply in synced {
                            let _ = reply.send(match &error {
                                None => Ok(()),
                                Some(err) => {
                                    Err(StoreError::Corrupt(format!("sync failed: {err}")))
                                }
                            });
                        }
                    }
                }
                Err(err) => {
                    tracing::error!(%err, "operation store write failed");
                    // The transaction rolled back: so must the heads.
                    self.dirty.clear();
                    match load_heads(&self.pool).await {
                        Ok(heads) => self.heads = heads,
                        Err(err) => tracing::error!(%err, "cannot reload log heads"),
                    }
                    for reply in replies {
                        reply.fail(&err);
                    }
                }
            }
        }
    }

    /// Fsyncs the WAL with a one-row write committed on the sync connection (`synchronous =
    /// FULL`; a commit without a write would not touch the disk). Every earlier commit of the
    /// writer is in the same WAL before it, so it is durable too; the writer's own connection
    /// keeps its setting.
    fn sync_wal(&mut self) -> Result<(), rusqlite::Error> {
        self.sync_connection
            .prepare_cached(
                "INSERT INTO durability (id, syncs) VALUES (0, 1)
                 ON CONFLICT (id) DO UPDATE SET syncs = syncs + 1",
            )?
            .execute([])?;
        Ok(())
    }

    fn apply(
        &mut self,
        requests: Vec<WriteRequest>,
        replies: &mut Vec<Reply>,
        committed: &mut Vec<Arc<SignedOperation>>,
    ) -> Result<(), rusqlite::Error> {
        let mut connection = self.connection.take().expect("writer connection is back");
        let result = self.apply_on(&mut connection, requests, replies, committed);
        self.connection = Some(connection);
        result
    }

    fn apply_on(
        &mut self,
        connection: &mut rusqlite::Connection,
        requests: Vec<WriteRequest>,
        replies: &mut Vec<Reply>,
        committed: &mut Vec<Arc<SignedOperation>>,
    ) -> Result<(), rusqlite::Error> {
        // A commit that signs local messages is fsynced: their NATS messages are acked after it
        // and the operations are pushed to peers, so losing it would fork the log. A commit with
        // only received operations and positions is not: in WAL mode it survives a crash of the
        // process, and what a power loss takes is fetched from peers again (and JetStream drops
        // the repeats). This keeps one fsync, not two, on the path of a routed message.
        let full_sync = requests
            .iter()
            .any(|r| matches!(r, WriteRequest::AppendLocal { durable: true, .. }));
        if full_sync != self.full_sync {
            let level = if full_sync { "FULL" } else { "NORMAL" };
            connection.pragma_update(None, "synchronous", level)?;
            self.full_sync = full_sync;
        }
        let tx = connection.transaction()?;
        for request in requests {
            match request {
                WriteRequest::AppendLocal {
                    entries,
                    cursor,
                    durable: _,
                    reply,
                } => {
                    let author = self.key.public_key();
                    let mut ops = Vec::with_capacity(entries.len());
                    for (log, body, at) in entries {
                        let head = self.head(&author, &log);
                        let op = SignedOperation::sign(
                            &self.key,
                            log,
                            head.next_seq,
                            head.last_hash,
                            at.unwrap_or_else(now_micros),
                            body,
                        );
                        self.advance_head(&op);
                        let op = Arc::new(op);
                        committed.push(op.clone());
                        ops.push(op);
                    }
                    if let Some((stream, seq)) = cursor {
                        tx.prepare_cached(
                            "INSERT INTO outbound_cursors (stream, last_stream_seq) VALUES (?, ?)
                             ON CONFLICT (stream) DO UPDATE SET last_stream_seq = MAX(last_stream_seq, excluded.last_stream_seq)",
                        )?
                        .execute(rusqlite::params![stream, seq as i64])?;
                    }
                    replies.push(Reply::Local(reply, ops));
                }
                WriteRequest::InsertRemote { ops, reply } => {
                    let mut outcomes = Vec::with_capacity(ops.len());
                    for op in ops {
                        let outcome = self.insert_remote(&tx, op, committed)?;
                        outcomes.push(outcome);
                    }
                    replies.push(Reply::Remote(reply, outcomes));
                }
                WriteRequest::Flush { reply } => replies.push(Reply::Flushed(reply)),
                WriteRequest::Sync { reply } => replies.push(Reply::Synced(reply)),
                WriteRequest::RemoveDeadLetters { keys, reply } => {
                    let mut removed = 0;
                    let mut delete = tx.prepare_cached(
                        "DELETE FROM dead_letters WHERE author = ? AND log = ? AND seq = ?",
                    )?;
                    for (author, log, seq) in &keys {
                        removed += delete.execute(rusqlite::params![
                            author.as_bytes().as_slice(),
                            log.to_key(),
                            *seq as i64
                        ])? as u64;
                    }
                    // Not yet written ones are dropped too, or the end of this commit would
                    // write them back.
                    self.dead_letters.retain(|dead| {
                        !keys.iter().any(|(author, log, seq)| {
                            dead.author == *author && dead.log == *log && dead.seq == *seq
                        })
                    });
                    replies.push(Reply::Pruned(reply, removed));
                }
                WriteRequest::Prune {
                    author,
                    log,
                    before,
                    reply,
                } => {
                    let deleted = tx
                        .prepare_cached(
                            "DELETE FROM operations WHERE author = ? AND log = ? AND seq < ?",
                        )?
                        .execute(rusqlite::params![
                            author.as_bytes().as_slice(),
                            log.to_key(),
                            before as i64
                        ])?;
                    replies.push(Reply::Pruned(reply, deleted as u64));
                }
                WriteRequest::MarkDelivered {
                    updates,
                    dead_letters,
                } => {
                    for (author, log, next) in updates {
                        let position = self.delivered.entry((author, log)).or_insert(next);
                        *position = (*position).max(next);
                    }
                    self.dead_letters.extend(dead_letters);
                }
            }
        }
        insert_rows(&tx, committed)?;
        // One row update per log touched, however many operations it got.
        let mut upsert = tx.prepare_cached(
            "INSERT INTO logs (author, log, next_seq, last_hash) VALUES (?, ?, ?, ?)
             ON CONFLICT (author, log) DO UPDATE SET next_seq = excluded.next_seq, last_hash = excluded.last_hash",
        )?;
        for ((author, log), head) in self.dirty.drain() {
            upsert.execute(rusqlite::params![
                author.as_bytes().as_slice(),
                log.to_key(),
                head.next_seq as i64,
                head.last_hash
                    .map(|h| h.as_bytes().to_vec())
                    .unwrap_or_default(),
            ])?;
        }
        drop(upsert);
        // Delivered positions of logs that exist (a position never precedes its log's row).
        let mut deliver = tx.prepare_cached(
            "UPDATE logs SET delivered_seq = MAX(delivered_seq, ?) WHERE author = ? AND log = ?",
        )?;
        for ((author, log), next) in self.delivered.drain() {
            deliver.execute(rusqlite::params![
                next as i64,
                author.as_bytes().as_slice(),
                log.to_key(),
            ])?;
        }
        drop(deliver);
        let at = now_micros() as i64;
        let mut dead_letter = tx.prepare_cached(
            "INSERT OR REPLACE INTO dead_letters (author, log, seq, hash, reason, detail, at_micros) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )?;
        for dead in self.dead_letters.drain(..) {
            dead_letter.execute(rusqlite::params![
                dead.author.as_bytes().as_slice(),
                dead.log.to_key(),
                dead.seq as i64,
                dead.hash,
                dead.reason,
                dead.detail,
                at,
            ])?;
        }
        drop(dead_letter);
        tx.commit()
    }

    fn head(&self, author: &PublicKey, log: &LogId) -> Head {
        self.heads
            .get(&(*author, log.clone()))
            .copied()
            .unwrap_or(Head {
                next_seq: 0,
                last_hash: None,
            })
    }

    fn insert_remote(
        &mut self,
        tx: &rusqlite::Connection,
        op: SignedOperation,
        committed: &mut Vec<Arc<SignedOperation>>,
    ) -> Result<InsertOutcome, rusqlite::Error> {
        let author = op.author();
        let log = op.log().clone();
        let head = self.head(&author, &log);
        let (arrival, op) = self.reorder.arrive(op, head.next_seq);
        match arrival {
            Arrival::Held => return Ok(InsertOutcome::Held),
            Arrival::Dropped => return Ok(InsertOutcome::Dropped),
            Arrival::Old => {
                let op = op.expect("old operations are returned");
                // Stored earlier in this transaction (rows are written at its end)?
                if let Some(earlier) = committed
                    .iter()
                    .rev()
                    .find(|c| c.seq() == op.seq() && c.author() == author && *c.log() == log)
                {
                    return Ok(if earlier.hash == op.hash {
                        InsertOutcome::Duplicate
                    } else {
                        InsertOutcome::Conflict
                    });
                }
                let stored: Option<Vec<u8>> = rusqlite::OptionalExtension::optional(
                    tx.prepare_cached(
                        "SELECT hash FROM operations WHERE author = ? AND log = ? AND seq = ?",
                    )?
                    .query_row(
                        rusqlite::params![
                            author.as_bytes().as_slice(),
                            log.to_key(),
                            op.seq() as i64
                        ],
                        |row| row.get(0),
                    ),
                )?;
                return Ok(match stored {
                    Some(hash) if hash == op.hash.as_bytes() => InsertOutcome::Duplicate,
                    _ => InsertOutcome::Conflict,
                });
            }
            Arrival::Next => {}
        }
        let mut next = op.expect("next operations are returned");
        let mut outcome = None;
        loop {
            let head = self.head(&author, &log);
            if next.backlink() != head.last_hash {
                // The first one decides the outcome; later held ones just stay out.
                outcome.get_or_insert(InsertOutcome::BrokenChain);
                break;
            }
            self.advance_head(&next);
            committed.push(Arc::new(next));
            outcome.get_or_insert(InsertOutcome::Stored);
            match self.reorder.take_ready(&author, &log, head.next_seq + 1) {
                Some(held) => next = held,
                None => break,
            }
        }
        Ok(outcome.unwrap_or(InsertOutcome::Stored))
    }

    /// Moves the log head past `op`; its row is written with the rest of the transaction.
    fn advance_head(&mut self, op: &SignedOperation) {
        let head = Head {
            next_seq: op.seq() + 1,
            last_hash: Some(op.hash),
        };
        let key = (op.author(), op.log().clone());
        self.heads.insert(key.clone(), head);
        self.dirty.insert(key, head);
    }
}

/// Writes the operations of a transaction (one cached statement: on the writer's own thread a
/// statement costs no round trip).
fn insert_rows(
    tx: &rusqlite::Connection,
    ops: &[Arc<SignedOperation>],
) -> Result<(), rusqlite::Error> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO operations (author, log, seq, hash, header, body) VALUES (?, ?, ?, ?, ?, ?)",
    )?;
    for op in ops {
        insert.execute(rusqlite::params![
            op.author().as_bytes().as_slice(),
            op.log().to_key(),
            op.seq() as i64,
            op.hash.as_bytes().as_slice(),
            op.header_bytes.as_slice(),
            op.body.as_slice(),
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote_chain(key: &PrivateKey, subject: &str, n: u64) -> Vec<SignedOperation> {
        let mut ops: Vec<SignedOperation> = Vec::new();
        for seq in 0..n {
            let backlink = ops.last().map(|op| op.hash);
            ops.push(SignedOperation::sign(
                key,
                LogId::Message(subject.into()),
                seq,
                backlink,
                seq,
                vec![1, seq as u8],
            ));
        }
        ops
    }

    /// Messages signed again after a crash took the unsynced commits (and the cursor with them)
    /// become the same operations, however the batches fall: the log cannot fork.
    #[tokio::test]
    async fn messages_signed_again_are_the_same_operations() {
        let key = PrivateKey::generate();
        let dir = tempfile::tempdir().unwrap();
        let messages: Vec<(LogId, Vec<u8>, u64)> = (0..10u64)
            .map(|i| {
                let subject = if i % 3 == 0 { "a.x" } else { "a.y" };
                (
                    LogId::Message(subject.into()),
                    vec![i as u8; 50],
                    1_700_000_000_000_000 + i,
                )
            })
            .collect();
        let first = Store::open(&dir.path().join("one.sqlite"), key.clone())
            .await
            .unwrap();
        let once = first
            .append_messages(messages.clone(), ("OUT".into(), 10))
            .await
            .unwrap();
        first.sync().await.unwrap();
        let again = Store::open(&dir.path().join("two.sqlite"), key.clone())
            .await
            .unwrap();
        let mut twice = again
            .append_messages(messages[..4].to_vec(), ("OUT".into(), 4))
            .await
            .unwrap();
        twice.extend(
            again
                .append_messages(messages[4..].to_vec(), ("OUT".into(), 10))
                .await
                .unwrap(),
        );
        let hashes =
            |ops: &[Arc<SignedOperation>]| ops.iter().map(|op| op.hash).collect::<Vec<_>>();
        assert_eq!(hashes(&once), hashes(&twice));
        assert_eq!(again.outbound_cursor("OUT").await.unwrap(), 10);
    }

    /// Unsynced commits are readable at once and durable after `sync`; syncs while nothing is
    /// pending, and with a durable append in the same batch, succeed too.
    #[tokio::test]
    async fn sync_after_unsynced_commits() {
        let key = PrivateKey::generate();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        let store = Store::open(&path, key.clone()).await.unwrap();
        store.sync().await.unwrap();
        let log = LogId::Message("a.x".into());
        store
            .append_messages(vec![(log.clone(), b"one".to_vec(), 1)], ("OUT".into(), 1))
            .await
            .unwrap();
        assert_eq!(store.next_seq(&key.public_key(), &log), 1);
        let (synced, durable) = tokio::join!(
            store.sync(),
            store.append_local(vec![(log.clone(), b"two".to_vec())], None)
        );
        synced.unwrap();
        durable.unwrap();
        store.sync().await.unwrap();
        drop(store);
        let store = Store::open(&path, key.clone()).await.unwrap();
        assert_eq!(store.next_seq(&key.public_key(), &log), 2);
        assert_eq!(store.outbound_cursor("OUT").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn local_appends_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate();
        let path = dir.path().join("rhio.sqlite");
        let store = Store::open(&path, key.clone()).await.unwrap();
        let log = LogId::Message("a.b".into());
        let ops = store
            .append_local(
                vec![
                    (log.clone(), b"one".to_vec()),
                    (log.clone(), b"two".to_vec()),
                ],
                Some(("S".into(), 7)),
            )
            .await
            .unwrap();
        assert_eq!(ops[0].seq(), 0);
        assert_eq!(ops[1].seq(), 1);
        ops[1].follows(&ops[0]).unwrap();
        assert_eq!(store.outbound_cursor("S").await.unwrap(), 7);
        drop(store);

        let store = Store::open(&path, key.clone()).await.unwrap();
        let more = store
            .append_local(vec![(log.clone(), b"three".to_vec())], None)
            .await
            .unwrap();
        assert_eq!(more[0].seq(), 2);
        assert_eq!(more[0].backlink(), Some(ops[1].hash));
        let read = store
            .operations(&key.public_key(), &log, 1, 10)
            .await
            .unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].hash, ops[1].hash);
    }

    /// The store schema of the previous release (session 4, commit 1571f63), frozen here: a
    /// data directory it wrote must open in this release and its logs go on. Change the store's
    /// schema only with a migration that keeps this test green.
    const PREVIOUS_RELEASE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS operations (
    author BLOB NOT NULL,
    log TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    header BLOB NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (author, log, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    author BLOB NOT NULL,
    log TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    last_hash BLOB NOT NULL,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (author, log)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    author BLOB NOT NULL,
    log TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at_micros INTEGER NOT NULL,
    PRIMARY KEY (author, log, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbound_cursors (
    stream TEXT PRIMARY KEY,
    last_stream_seq INTEGER NOT NULL
);
";

    #[tokio::test]
    async fn a_store_written_by_the_previous_release_opens_and_its_logs_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rhio.sqlite");
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .unwrap()
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .unwrap();
        sqlx::raw_sql(PREVIOUS_RELEASE_SCHEMA)
            .execute(&pool)
            .await
            .unwrap();
        let author = PrivateKey::generate();
        let ops = remote_chain(&author, "old.log", 3);
        for op in &ops[..2] {
            sqlx::query(
                "INSERT INTO operations (author, log, seq, hash, header, body) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(op.author().as_bytes().to_vec())
            .bind(op.log().to_key())
            .bind(op.seq() as i64)
            .bind(op.hash.as_bytes().to_vec())
            .bind(op.header_bytes.clone())
            .bind(op.body.clone())
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO logs (author, log, next_seq, last_hash, delivered_seq) VALUES (?, ?, 2, ?, 1)",
        )
        .bind(author.public_key().as_bytes().to_vec())
        .bind(ops[0].log().to_key())
        .bind(ops[1].hash.as_bytes().to_vec())
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = Store::open(&path, PrivateKey::generate()).await.unwrap();
        let logs = store.logs().await.unwrap();
        assert_eq!(logs.len(), 1);
        assert_eq!((logs[0].next_seq, logs[0].delivered_seq), (2, 1));
        assert_eq!(store.next_seq(&author.public_key(), ops[0].log()), 2);
        let outcomes = store.insert_remote(vec![ops[2].clone()]).await.unwrap();
        assert_eq!(outcomes, vec![InsertOutcome::Stored], "the chain continues");
        let stored = store
            .operations(&author.public_key(), ops[0].log(), 0, 10)
            .await
            .unwrap();
        assert_eq!(
            stored.iter().map(|op| op.hash).collect::<Vec<_>>(),
            ops.iter().map(|op| op.hash).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_operations_and_the_log_going_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite"), PrivateKey::generate())
            .await
            .unwrap();
        let author = PrivateKey::generate();
        let ops = remote_chain(&author, "x.y", 12);
        store.insert_remote(ops[..10].to_vec()).await.unwrap();
        let (key, log) = (author.public_key(), LogId::Message("x.y".into()));
        let size = |op: &SignedOperation| (op.header_bytes.len() + op.body.len()) as u64;
        let three: u64 = ops[7..10].iter().map(size).sum();
        let deleted = store.prune(&key, &log, Some(three), None, 0).await.unwrap();
        assert_eq!(deleted, 7);
        let kept: Vec<u64> = store
            .operations(&key, &log, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(SignedOperation::seq)
            .collect();
        assert_eq!(kept, vec![7, 8, 9]);
        // The head stays: the next operation continues the chain.
        let outcomes = store.insert_remote(vec![ops[10].clone()]).await.unwrap();
        assert_eq!(outcomes, vec![InsertOutcome::Stored]);
        // By age (timestamps are the sequence numbers here): older than 3 us at "now" 12.
        let deleted = store.prune(&key, &log, None, Some(3), 12).await.unwrap();
        assert_eq!(deleted, 2, "7 and 8 are older than 12 - 3");
        // The newest always stays, however small the limit.
        store.prune(&key, &log, Some(1), None, 0).await.unwrap();
        let kept = store.operations(&key, &log, 0, 100).await.unwrap();
        assert_eq!(
            kept.iter().map(SignedOperation::seq).collect::<Vec<_>>(),
            vec![10]
        );
        assert_eq!(store.logs().await.unwrap()[0].next_seq, 11);
    }

    #[tokio::test]
    async fn remote_inserts_reorder_deduplicate_and_detect_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite"), PrivateKey::generate())
            .await
            .unwrap();
        let author = PrivateKey::generate();
        let ops = remote_chain(&author, "x.y", 4);
        let mut events = store.subscribe();

        let outcomes = store
            .insert_remote(vec![ops[2].clone(), ops[1].clone()])
            .await
            .unwrap();
        assert_eq!(outcomes, vec![InsertOutcome::Held, InsertOutcome::Held]);
        let outcomes = store
            .insert_remote(vec![ops[0].clone(), ops[0].clone(), ops[3].clone()])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            vec![
                InsertOutcome::Stored,
                InsertOutcome::Duplicate,
                InsertOutcome::Stored
            ]
        );
        for expected in 0..4 {
            assert_eq!(events.recv().await.unwrap().seq(), expected);
        }

        // Same position, different content: a fork by the author.
        let fork = SignedOperation::sign(
            &author,
            LogId::Message("x.y".into()),
            1,
            Some(ops[0].hash),
            99,
            b"fork".to_vec(),
        );
        assert_eq!(
            store.insert_remote(vec![fork]).await.unwrap(),
            vec![InsertOutcome::Conflict]
        );

        let logs = store.logs().await.unwrap();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].next_seq, 4);
        assert_eq!(logs[0].delivered_seq, 0);
        store
            .mark_delivered(
                vec![(author.public_key(), LogId::Message("x.y".into()), 3)],
                Vec::new(),
            )
            .await
            .unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.logs().await.unwrap()[0].delivered_seq, 3);
    }

    #[tokio::test]
    async fn broken_backlink_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite"), PrivateKey::generate())
            .await
            .unwrap();
        let author = PrivateKey::generate();
        let ops = remote_chain(&author, "x.y", 1);
        store.insert_remote(vec![ops[0].clone()]).await.unwrap();
        let bad = SignedOperation::sign(
            &author,
            LogId::Message("x.y".into()),
            1,
            Some(Hash::digest(b"other")),
            1,
            b"b".to_vec(),
        );
        assert_eq!(
            store.insert_remote(vec![bad]).await.unwrap(),
            vec![InsertOutcome::BrokenChain]
        );
        assert_eq!(store.logs().await.unwrap()[0].next_seq, 1);
    }
}
