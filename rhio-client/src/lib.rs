//! `rhio-client`: talk to a rhio node through its cluster's NATS server.
//!
//! Ask a node for its status, import Parquet files, publish messages for rhio to route, follow
//! routed messages with their provenance checked, list the dataset versions in the cluster,
//! fetch one from the cluster's S3 verified against its signed manifest ([`datasets`]), verify a
//! file against a signed manifest file (as the registry mirror ships it), read the cluster's
//! state as Arrow tables ([`state`]), and make node keys.
//!
//! ```no_run
//! # async fn run() -> Result<(), rhio_client::ClientError> {
//! let client = rhio_client::Client::connect("nats://127.0.0.1:4222").await?;
//! let status = client.status().await?;
//! println!("{} peers connected", status.peers.connected);
//! # Ok(()) }
//! ```

use std::time::Duration;

use rhio_core::api::{IMPORT_SUBJECT, PROGRESS_PREFIX};
use thiserror::Error;

pub mod datasets;
pub mod state;

pub use datasets::{DEFAULT_DATASET_STREAM, DatasetVersion, Fetched, S3Options, verify};
pub use state::ClusterState;

/// Subject of the node's status service.
pub use rhio_core::api::STATUS_SUBJECT;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("no rhio node answers on {subject} (is the node running and connected to this NATS?)")]
    NoNode { subject: String },
    #[error("request on {subject} failed: {reason}")]
    Request { subject: String, reason: String },
    #[error("answer on {subject} is not valid JSON: {reason}")]
    BadAnswer { subject: String, reason: String },
    #[error("the node refused: {message} ({code})")]
    Refused { code: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("{0}")]
    Usage(String),
    #[error("S3 {key}: {reason}")]
    S3 { key: String, reason: String },
    #[error("verification failed: {0}")]
    Verification(String),
    #[error("{0}")]
    Io(String),
}

impl ClientError {
    /// A stable, machine-readable code for the error; a refusal carries the node's own code
    /// (`forbidden_path`, `too_large`, ...).
    pub fn code(&self) -> &str {
        match self {
            ClientError::Connect { .. } => "connect",
            ClientError::NoNode { .. } => "no_node",
            ClientError::Request { .. } => "request",
            ClientError::BadAnswer { .. } => "bad_answer",
            ClientError::Refused { code, .. } => code,
            ClientError::NotFound(_) => "not_found",
            ClientError::Ambiguous(_) => "ambiguous",
            ClientError::Usage(_) => "usage",
            ClientError::S3 { .. } => "s3",
            ClientError::Verification(_) => "verification",
            ClientError::Io(_) => "io",
        }
    }
}

impl From<ErrorBody> for ClientError {
    /// A refusal keeps the node's code verbatim (also one this client does not know).
    fn from(err: ErrorBody) -> Self {
        ClientError::Refused {
            code: err.code,
            message: err.message,
        }
    }
}

/// A connection to the NATS server of a rhio node's cluster.
pub struct Client {
    nats: async_nats::Client,
    timeout: Duration,
}

impl Client {
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let nats = async_nats::ConnectOptions::new()
            .name("rhio-client")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|err| ClientError::Connect {
                url: url.to_string(),
                reason: err.to_string(),
            })?;
        Ok(Self {
            nats,
            timeout: Duration::from_secs(10),
        })
    }

    /// The node's status document (the same as `GET /health`), typed: the node serializes the
    /// same [`NodeStatus`] type.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        let status = self.status_json().await?;
        serde_json::from_value(status).map_err(|err| ClientError::BadAnswer {
            subject: STATUS_SUBJECT.into(),
            reason: format!("not a status document: {err}"),
        })
    }

    /// The node's status document as JSON (what `rhio-client status --json` prints); fields a
    /// newer node adds are kept here.
    pub async fn status_json(&self) -> Result<serde_json::Value, ClientError> {
        self.request_json(STATUS_SUBJECT, Vec::new()).await
    }

    async fn request_json(
        &self,
        subject: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        let request = self.nats.request(subject.to_string(), body.into());
        let message = match tokio::time::timeout(self.timeout, request).await {
            Err(_) => {
                return Err(ClientError::Request {
                    subject: subject.into(),
                    reason: format!("no answer within {:?}", self.timeout),
                });
            }
            Ok(Err(err)) if err.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(ClientError::NoNode {
                    subject: subject.into(),
                });
            }
            Ok(Err(err)) => {
                return Err(ClientError::Request {
                    subject: subject.into(),
                    reason: err.to_string(),
                });
            }
            Ok(Ok(message)) => message,
        };
        serde_json::from_slice(&message.payload).map_err(|err| ClientError::BadAnswer {
            subject: subject.into(),
            reason: err.to_string(),
        })
    }
}

/// A message as a subscriber sees it, with the result of checking its provenance.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    /// `Ok` with author and position when the `X-Rhio-*` headers verify; the reason otherwise
    /// (a local message that was never routed has no such headers).
    pub provenance: Result<rhio_core::message::Provenance, rhio_core::message::ProvenanceError>,
}

impl ReceivedMessage {
    /// True when the message verifies and its author is one of `keys` (hex public keys): what a
    /// consumer that trusts only some clusters checks.
    pub fn is_from(&self, keys: &[String]) -> bool {
        self.provenance
            .as_ref()
            .is_ok_and(|proof| keys.iter().any(|key| *key == proof.author.to_hex()))
    }
}

/// The node's API types, shared with the node through `rhio-core` (one definition of each
/// reply and error code on both sides).
pub use rhio_core::api::status::NodeStatus;
pub use rhio_core::api::{
    DeadLetter, DeadLetters, ErrorBody, ErrorCode, ImportOutcome, ImportProgress, ImportReply,
    ImportRequest, ReplayReply, ReplayRequest, Reply,
};

impl Client {
    /// Publishes into JetStream and waits for the stream's acknowledgement, so the message is
    /// stored (and will be routed if a `publish` entry of the node covers the subject).
    pub async fn publish(
        &self,
        subject: &str,
        headers: &[(String, String)],
        payload: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let js = async_nats::jetstream::new(self.nats.clone());
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers {
            map.append(name.as_str(), value.as_str());
        }
        let failed = |reason: String| ClientError::Request {
            subject: subject.into(),
            reason,
        };
        let ack = js
            .publish_with_headers(subject.to_string(), map, payload.into())
            .await
            .map_err(|err| failed(err.to_string()))?
            .await
            .map_err(|err| {
                failed(format!(
                    "{err} (is there a JetStream stream capturing {subject}?)"
                ))
            })?;
        Ok(ack.sequence)
    }

    /// Follows messages on `subject` (wildcards allowed) and checks each one's provenance. The
    /// subscription is registered at the NATS server when this returns, so a message published
    /// afterwards (by anyone) is received.
    pub async fn subscribe(
        &self,
        subject: &str,
    ) -> Result<impl futures::Stream<Item = ReceivedMessage> + use<>, ClientError> {
        use futures::StreamExt;
        let failed = |reason: String| ClientError::Request {
            subject: subject.into(),
            reason,
        };
        let subscriber = self
            .nats
            .subscribe(subject.to_string())
            .await
            .map_err(|err| failed(err.to_string()))?;
        // The server has the SUB once it answered the PING a flush sends.
        self.nats
            .flush()
            .await
            .map_err(|err| failed(err.to_string()))?;
        Ok(subscriber.map(|message| {
            let headers: Vec<(String, String)> = message
                .headers
                .iter()
                .flat_map(|map| map.iter())
                .flat_map(|(name, values)| {
                    values
                        .iter()
                        .map(move |value| (name.to_string(), value.as_str().to_string()))
                })
                .collect();
            let subject = message.subject.to_string();
            let provenance =
                rhio_core::message::verify_provenance(&subject, &headers, &message.payload);
            ReceivedMessage {
                subject,
                headers,
                payload: message.payload.to_vec(),
                provenance,
            }
        }))
    }
}

impl Client {
    /// Asks the node to import a Parquet file (a path under its import roots, or
    /// `s3://<bucket>/<key>` in its bucket) and waits for the answer: `{"ok": true, ...}` or
    /// `{"ok": false, "error": {"code", "message"}}`. Progress events go to `rhio.progress.>`.
    pub async fn import(
        &self,
        path: &str,
        dataset: Option<&str>,
        subject: Option<&str>,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let answer = self.import_raw(path, dataset, subject, timeout).await?;
        serde_json::from_slice(&answer).map_err(|err| ClientError::BadAnswer {
            subject: IMPORT_SUBJECT.into(),
            reason: err.to_string(),
        })
    }

    async fn import_raw(
        &self,
        path: &str,
        dataset: Option<&str>,
        subject: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let body = ImportRequest {
            path: path.to_string(),
            dataset: dataset.map(str::to_string),
            subject: subject.map(str::to_string),
        };
        let body = serde_json::to_vec(&body).expect("request serializes");
        self.request(IMPORT_SUBJECT, body, timeout).await
    }

    /// [`Client::import`] with a typed reply; a refusal is [`ClientError::Refused`] with the
    /// node's error code (`not_found`, `forbidden_path`, `not_parquet`, `too_large`, ...).
    pub async fn import_dataset(
        &self,
        path: &str,
        dataset: Option<&str>,
        subject: Option<&str>,
        timeout: Duration,
    ) -> Result<ImportReply, ClientError> {
        let answer = self.import_raw(path, dataset, subject, timeout).await?;
        reply_of(IMPORT_SUBJECT, &answer)
    }

    /// Progress events of the imports running in the cluster (subscribe before importing).
    pub async fn import_progress(
        &self,
    ) -> Result<impl futures::Stream<Item = ImportProgress> + use<>, ClientError> {
        use futures::StreamExt;
        let subscriber = self
            .nats
            .subscribe(format!("{PROGRESS_PREFIX}.>"))
            .await
            .map_err(|err| ClientError::Request {
                subject: format!("{PROGRESS_PREFIX}.>"),
                reason: err.to_string(),
            })?;
        Ok(subscriber.filter_map(|message| {
            std::future::ready(serde_json::from_slice::<ImportProgress>(&message.payload).ok())
        }))
    }

    /// Sends a core NATS request and returns the answer's payload.
    pub async fn request(
        &self,
        subject: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let request = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(timeout));
        let message = self
            .nats
            .send_request(subject.to_string(), request)
            .await
            .map_err(|err| match err.kind() {
                async_nats::RequestErrorKind::NoResponders => ClientError::NoNode {
                    subject: subject.into(),
                },
                _ => ClientError::Request {
                    subject: subject.into(),
                    reason: err.to_string(),
                },
            })?;
        Ok(message.payload.to_vec())
    }

    /// The routed messages the node's local JetStream could not take, in log order.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, ClientError> {
        let list: DeadLetters = self
            .typed_request(
                rhio_core::api::DEAD_LETTERS_LIST_SUBJECT,
                &serde_json::json!({}),
            )
            .await?;
        Ok(list.dead_letters)
    }

    /// Delivers dead letters again (all, or one by position) once the cause is fixed; a message
    /// JetStream still refuses stops the replay with [`ClientError::Refused`]
    /// (`delivery_failed`), and what went through before it stays delivered.
    pub async fn replay_dead_letters(
        &self,
        request: &ReplayRequest,
    ) -> Result<ReplayReply, ClientError> {
        self.typed_request(rhio_core::api::DEAD_LETTERS_REPLAY_SUBJECT, request)
            .await
    }

    /// A request with a JSON body whose answer is a [`Reply`] of `T`.
    async fn typed_request<T: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("request serializes");
        let answer = self.request(subject, body, self.timeout * 6).await?;
        reply_of(subject, &answer)
    }

    /// The underlying NATS client (for progress subscriptions and the like).
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }
}

/// The value of a node's [`Reply`] on `subject`; a refusal is [`ClientError::Refused`] with the
/// node's code.
fn reply_of<T: serde::de::DeserializeOwned>(
    subject: &str,
    answer: &[u8],
) -> Result<T, ClientError> {
    let reply: Reply<T> = serde_json::from_slice(answer).map_err(|err| ClientError::BadAnswer {
        subject: subject.into(),
        reason: err.to_string(),
    })?;
    reply.into_result().map_err(ClientError::from)
}

/// A new node key: `(private key hex, public key hex)`.
pub fn generate_key() -> (String, String) {
    let key = rhio_core::identity::PrivateKey::generate();
    (key.to_hex(), key.public_key().to_hex())
}
