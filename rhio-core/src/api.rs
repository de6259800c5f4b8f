//! The node's request/reply API as it travels over NATS: subjects, request and reply bodies,
//! the durable import queue's outcome records and the stable error codes.
//!
//! The node serializes these types and the clients (the Rust library, the CLI and through it the
//! Python package) deserialize the same types, so the two cannot drift apart. Every reply is
//! `{"ok": true, ...}` or `{"ok": false, "error": {"code", "message"}}`.
//!
//! ```
//! use rhio_core::api::{ErrorCode, Reply};
//!
//! let refused: Reply<()> = Reply::error(ErrorCode::NotFound, "/data/x.parquet does not exist");
//! let json = serde_json::to_string(&refused).unwrap();
//! assert_eq!(
//!     json,
//!     r#"{"ok":false,"error":{"code":"not_found","message":"/data/x.parquet does not exist"}}"#
//! );
//! ```

pub mod status;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Import request/reply service.
pub const IMPORT_SUBJECT: &str = "rhio.import";
/// Prefix of import progress events: `rhio.progress.<dataset>`.
pub const PROGRESS_PREFIX: &str = "rhio.progress";
/// Status service (the same JSON as `GET /health`).
pub const STATUS_SUBJECT: &str = "rhio.status";
/// Replicate a failed version again.
pub const RETRY_SUBJECT: &str = "rhio.retry";
/// Lists the messages that could not be delivered into the local JetStream.
pub const DEAD_LETTERS_LIST_SUBJECT: &str = "rhio.dead_letters.list";
/// Delivers dead letters again once their cause is fixed.
pub const DEAD_LETTERS_REPLAY_SUBJECT: &str = "rhio.dead_letters.replay";

/// The stable, machine-readable code of a refused request. Clients branch on it; the message
/// beside it is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    NotAFile,
    ForbiddenPath,
    NotParquet,
    CorruptParquet,
    TooLarge,
    /// S3 refused access (401/403: credentials, bucket policy): fails again until fixed.
    StorageDenied,
    /// S3 rejected the request as invalid (another 4xx): fails again until fixed.
    StorageRejected,
    /// S3 unreachable, overloaded or too slow: may pass when tried again.
    StorageUnavailable,
    Busy,
    ReadFailed,
    Internal,
    /// The local JetStream still refuses a replayed dead letter.
    DeliveryFailed,
    /// `rhio.retry` of a version that is not recorded as failed.
    NotFailed,
    /// A code this version does not know (a newer node): kept verbatim in [`ErrorBody`].
    Unknown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadRequest,
        ErrorCode::NotFound,
        ErrorCode::NotAFile,
        ErrorCode::ForbiddenPath,
        ErrorCode::NotParquet,
        ErrorCode::CorruptParquet,
        ErrorCode::TooLarge,
        ErrorCode::StorageDenied,
        ErrorCode::StorageRejected,
        ErrorCode::StorageUnavailable,
        ErrorCode::Busy,
        ErrorCode::ReadFailed,
        ErrorCode::Internal,
        ErrorCode::DeliveryFailed,
        ErrorCode::NotFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotAFile => "not_a_file",
            ErrorCode::ForbiddenPath => "forbidden_path",
            ErrorCode::NotParquet => "not_parquet",
            ErrorCode::CorruptParquet => "corrupt_parquet",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::StorageDenied => "storage_denied",
            ErrorCode::StorageRejected => "storage_rejected",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::Busy => "busy",
            ErrorCode::ReadFailed => "read_failed",
            ErrorCode::Internal => "internal",
            ErrorCode::DeliveryFailed => "delivery_failed",
            ErrorCode::NotFailed => "not_failed",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The code of a string on the wire ([`ErrorCode::Unknown`] for one this version lacks).
    pub fn parse(code: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|known| known.as_str() == code)
            .unwrap_or(ErrorCode::Unknown)
    }

    /// True when the same request may succeed later without anyone changing anything: the
    /// durable queue retries these and ends the others at once.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::StorageUnavailable | ErrorCode::Busy)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"code", "message"}` of a refusal. The code stays a string on the wire so that a client
/// shows a newer node's code verbatim; [`ErrorBody::kind`] gives the typed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorCode {
        ErrorCode::parse(&self.code)
    }
}

/// A reply: `{"ok": true, ...T}` or `{"ok": false, "error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<T> {
    Ok(T),
    Err(ErrorBody),
}

impl<T> Reply<T> {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Reply::Err(ErrorBody::new(code, message))
    }

    pub fn into_result(self) -> Result<T, ErrorBody> {
        match self {
            Reply::Ok(value) => Ok(value),
            Reply::Err(err) => Err(err),
        }
    }
}

impl<T: Serialize> Serialize for Reply<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Success<'a, T> {
            ok: bool,
            #[serde(flatten)]
            value: &'a T,
        }
        #[derive(Serialize)]
        struct Failure<'a> {
            ok: bool,
            error: &'a ErrorBody,
        }
        match self {
            Reply::Ok(value) => Success { ok: true, value }.serialize(serializer),
            Reply::Err(error) => Failure { ok: false, error }.serialize(serializer),
        }
    }
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Reply<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(deserializer)?;
        let object = value
            .as_object_mut()
            .ok_or_else(|| D::Error::custom("a reply is a JSON object"))?;
        match object.remove("ok") {
            Some(serde_json::Value::Bool(true)) => serde_json::from_value(value)
                .map(Reply::Ok)
                .map_err(D::Error::custom),
            Some(serde_json::Value::Bool(false)) => {
                let error = object
                    .remove("error")
                    .ok_or_else(|| D::Error::custom("a refusal without \"error\""))?;
                serde_json::from_value(error)
                    .map(Reply::Err)
                    .map_err(D::Error::custom)
            }
            _ => Err(D::Error::custom("a reply without a boolean \"ok\"")),
        }
    }
}

/// The JSON form of an `rhio.import` request (a bare path is accepted too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// A file under one of the node's import roots, or `s3://<bucket>/<key>` in its bucket.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// A successful import: the version it made (or found, with `existing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReply {
    pub dataset: String,
    pub version: u64,
    pub subject: String,
    /// The author's public key (hex).
    pub author: String,
    pub file_hash: String,
    /// Hash of the signed operation holding the manifest.
    pub operation: String,
    pub row_groups: u64,
    pub rows: u64,
    pub bytes: u64,
    pub location: String,
    /// True when these bytes were imported before and the existing version is answered.
    #[serde(default)]
    pub existing: bool,
}

/// What the durable import queue publishes on `import.results_subject` for each attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportOutcome {
    #[serde(flatten)]
    pub reply: Reply<ImportReply>,
    /// The queued request, verbatim.
    pub request: String,
    /// The attempt this outcome is of (JetStream's delivery count, from 1).
    pub attempt: u64,
    /// True when the request stays queued and is tried again; false when it ended.
    pub will_retry: bool,
    /// True when a transient failure ended the request because it had used up its attempts
    /// (`import.max_attempts`): the dead-letter record of the queue.
    #[serde(default)]
    pub dead_letter: bool,
}

/// The event announcing that a dataset version is available in a cluster, published on the
/// dataset's JetStream subject with the manifest operation's `X-Rhio-*` provenance headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetEvent {
    pub dataset: String,
    pub version: u64,
    /// The author's public key (hex).
    pub author: String,
    /// BLAKE3 of the whole file (hex).
    pub file_hash: String,
    pub rows: u64,
    pub row_groups: u64,
    pub bytes: u64,
    /// The Arrow schema of the file, as the manifest carries it.
    #[serde(default)]
    pub schema: String,
    /// Where the file is in *this* cluster's S3 (`s3://bucket/key`).
    pub location: String,
    pub created_at_micros: u64,
    /// Hash of the signed manifest operation (hex).
    pub operation: String,
}

impl DatasetEvent {
    /// The event of a version whose manifest operation is `operation`, held at `location`.
    pub fn of(
        manifest: &crate::manifest::DatasetManifest,
        operation: &str,
        location: &str,
    ) -> Self {
        Self {
            dataset: manifest.dataset.clone(),
            version: manifest.version,
            author: manifest.author.to_hex(),
            file_hash: manifest.file_hash.clone(),
            rows: manifest.rows,
            row_groups: manifest.blobs.len().saturating_sub(1) as u64,
            bytes: manifest.file_size,
            schema: manifest.schema.clone(),
            location: location.to_string(),
            created_at_micros: manifest.created_at_micros,
            operation: operation.to_string(),
        }
    }
}

/// A `rhio.retry` request: replicate a version recorded as failed again. Answered with a
/// [`Reply`] of [`Empty`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// The author's public key (hex).
    pub author: String,
    pub dataset: String,
    pub version: u64,
}

/// A reply with nothing besides `"ok": true`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// A routed message the local JetStream could not take (`rhio.dead_letters.list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The author's public key (hex).
    pub author: String,
    pub subject: String,
    /// Position in the author's log of the subject.
    pub seq: u64,
    /// Hash of the signed operation (hex): the message's `Nats-Msg-Id`.
    pub operation: String,
    /// `max_payload`, `max_msg_size`, `no_stream` or `undecodable`.
    pub reason: String,
    /// What JetStream or the client said.
    pub detail: String,
}

/// The answer of `rhio.dead_letters.list`: every dead letter, in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetters {
    pub dead_letters: Vec<DeadLetter>,
}

/// A `rhio.dead_letters.replay` request: `{"all": true}` or one message by its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum ReplayRequest {
    All {
        all: bool,
    },
    One {
        author: String,
        subject: String,
        seq: u64,
    },
}

/// The answer of `rhio.dead_letters.replay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReply {
    /// Dead letters the local JetStream took this time (in log order).
    pub replayed: Vec<DeadLetter>,
    /// Dead letters left (none when all were replayed).
    pub remaining: u64,
}

/// An import's progress event (`rhio.progress.<dataset>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportProgress {
    pub dataset: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> ImportReply {
        ImportReply {
            dataset: "weather".into(),
            version: 3,
            subject: "datasets.weather".into(),
            author: "ab".repeat(32),
            file_hash: "cd".repeat(32),
            operation: "ef".repeat(32),
            row_groups: 8,
            rows: 1000,
            bytes: 123_456,
            location: "s3://rhio/datasets/weather/v3.parquet".into(),
            existing: false,
        }
    }

    #[test]
    fn replies_round_trip_with_ok_beside_the_fields() {
        let ok = Reply::Ok(reply());
        let json = serde_json::to_value(&ok).unwrap();
        assert_eq!(json["ok"], true);
        assert_eq!(json["version"], 3);
        assert_eq!(
            serde_json::from_value::<Reply<ImportReply>>(json).unwrap(),
            ok
        );
        let refused: Reply<ImportReply> = Reply::error(ErrorCode::StorageDenied, "403");
        let json = serde_json::to_value(&refused).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["error"]["code"], "storage_denied");
        assert_eq!(
            serde_json::from_value::<Reply<ImportReply>>(json).unwrap(),
            refused
        );
        assert!(serde_json::from_str::<Reply<ImportReply>>(r#"{"dataset": "x"}"#).is_err());
    }

    #[test]
    fn codes_parse_back_and_unknown_ones_are_kept() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), code);
        }
        let body: ErrorBody =
            serde_json::from_str(r#"{"code": "from_the_future", "message": "m"}"#).unwrap();
        assert_eq!(body.kind(), ErrorCode::Unknown);
        assert_eq!(body.code, "from_the_future");
        let transient: Vec<_> = ErrorCode::ALL
            .into_iter()
            .filter(|code| code.is_transient())
            .collect();
        assert_eq!(
            transient,
            [ErrorCode::StorageUnavailable, ErrorCode::Busy],
            "only these are retried by the durable queue"
        );
    }

    #[test]
    fn replay_requests_are_all_or_one() {
        assert_eq!(
            serde_json::from_str::<ReplayRequest>(r#"{"all": true}"#).unwrap(),
            ReplayRequest::All { all: true }
        );
        assert_eq!(
            serde_json::from_str::<ReplayRequest>(
                r#"{"author": "ab", "subject": "x.y", "seq": 3}"#
            )
            .unwrap(),
            ReplayRequest::One {
                author: "ab".into(),
                subject: "x.y".into(),
                seq: 3
            }
        );
        assert!(serde_json::from_str::<ReplayRequest>(r#"{"author": "ab"}"#).is_err());
        assert!(serde_json::from_str::<ReplayRequest>(r#"{}"#).is_err());
    }

    #[test]
    fn outcomes_carry_the_reply_flat() {
        let outcome = ImportOutcome {
            reply: Reply::error(ErrorCode::StorageUnavailable, "S3 unavailable"),
            request: "/data/x.parquet".into(),
            attempt: 20,
            will_retry: false,
            dead_letter: true,
        };
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["error"]["code"], "storage_unavailable");
        assert_eq!(json["attempt"], 20);
        assert_eq!(
            serde_json::from_value::<ImportOutcome>(json).unwrap(),
            outcome
        );
    }
}
