//! `rhio.dead_letters.list` and `rhio.dead_letters.replay`: the routed messages the local
//! JetStream could never take, listed, and delivered again once the operator fixed the cause (a
//! stream that now captures the subject, a larger `max_msg_size`).
//!
//! A replay publishes each chosen dead letter in log order exactly as delivery would have
//! (same subject, headers and `Nats-Msg-Id`, so JetStream drops a repeat within its duplicate
//! window), waits for JetStream's acknowledgement and only then forgets the dead letter. Replays
//! run one at a time, so a dead letter is published by one replay only; the first one JetStream
//! still refuses stops the replay (the later ones of its log stay in order behind it).

use std::sync::Arc;

use async_nats::jetstream;
use rhio_core::api::{DeadLetter as DeadLetterRecord, DeadLetters, ErrorCode, Reply};
use rhio_core::api::{ReplayReply, ReplayRequest};
use rhio_core::identity::PublicKey;
use rhio_core::operation::LogId;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::delivery::jetstream_message;
use crate::store::{DeadLetter, Store, StoreError};

/// How long one replayed message may wait for JetStream's acknowledgement.
const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a list or replay request failed.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("no dead letter of {author} at {subject} #{seq}")]
    NotFound {
        author: String,
        subject: String,
        seq: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the operation of dead letter {subject} #{seq} is no longer stored")]
    Missing { subject: String, seq: u64 },
    #[error(
        "the local JetStream still refuses {subject} #{seq}: {reason} ({replayed} replayed before it)"
    )]
    Refused {
        subject: String,
        seq: u64,
        reason: String,
        replayed: usize,
    },
}

impl ReplayError {
    fn code(&self) -> ErrorCode {
        match self {
            ReplayError::BadRequest(_) => ErrorCode::BadRequest,
            ReplayError::NotFound { .. } => ErrorCode::NotFound,
            ReplayError::Store(_) | ReplayError::Missing { .. } => ErrorCode::Internal,
            ReplayError::Refused { .. } => ErrorCode::DeliveryFailed,
        }
    }
}

/// Serves both subjects until shutdown.
#[derive(Clone)]
pub struct DeadLetterService {
    store: Store,
    js: jetstream::Context,
    /// One replay at a time.
    replaying: Arc<Mutex<()>>,
}

impl DeadLetterService {
    pub fn new(store: Store, js: jetstream::Context) -> Self {
        Self {
            store,
            js,
            replaying: Arc::new(Mutex::new(())),
        }
    }

    pub async fn serve(self, nats: async_nats::Client, shutdown: CancellationToken) {
        let list = {
            let service = self.clone();
            crate::nats::serve_requests(
                nats.clone(),
                rhio_core::api::DEAD_LETTERS_LIST_SUBJECT,
                2,
                shutdown.clone(),
                move |_| {
                    let service = service.clone();
                    async move {
                        answer(
                            service
                                .list()
                                .await
                                .map(|dead_letters| DeadLetters { dead_letters }),
                        )
                    }
                },
            )
        };
        let replay = crate::nats::serve_requests(
            nats,
            rhio_core::api::DEAD_LETTERS_REPLAY_SUBJECT,
            2,
            shutdown,
            move |body| {
                let service = self.clone();
                async move { answer(service.replay(&body).await) }
            },
        );
        tokio::join!(list, replay);
    }

    /// Every dead letter, in log order.
    pub async fn list(&self) -> Result<Vec<DeadLetterRecord>, ReplayError> {
        Ok(self.sorted().await?.iter().map(record).collect())
    }

    async fn sorted(&self) -> Result<Vec<DeadLetter>, ReplayError> {
        // Dead letters are written with the writer's next commit: make it now.
        self.store.flush().await?;
        let mut dead = self.store.dead_letters().await?;
        dead.sort_by(|a, b| {
            (a.author, a.log.to_key(), a.seq).cmp(&(b.author, b.log.to_key(), b.seq))
        });
        Ok(dead)
    }

    /// Publishes the chosen dead letters again, in log order.
    pub async fn replay(&self, body: &[u8]) -> Result<ReplayReply, ReplayError> {
        let request: ReplayRequest = serde_json::from_slice(body).map_err(|err| {
            ReplayError::BadRequest(format!(
                "{err}; send {{\"all\": true}} or {{\"author\", \"subject\", \"seq\"}}"
            ))
        })?;
        let _one_at_a_time = self.replaying.lock().await;
        let dead = self.sorted().await?;
        let chosen: Vec<&DeadLetter> = match &request {
            ReplayRequest::All { all: true } => dead.iter().collect(),
            ReplayRequest::All { all: false } => {
                return Err(ReplayError::BadRequest("\"all\" must be true".into()));
            }
            ReplayRequest::One {
                author,
                subject,
                seq,
            } => {
                let key: PublicKey = author
                    .parse()
                    .map_err(|_| ReplayError::BadRequest(format!("{author} is no public key")))?;
                let found = dead.iter().find(|d| {
                    d.author == key && d.log == LogId::Message(subject.clone()) && d.seq == *seq
                });
                match found {
                    Some(found) => vec![found],
                    None => {
                        return Err(ReplayError::NotFound {
                            author: author.clone(),
                            subject: subject.clone(),
                            seq: *seq,
                        });
                    }
                }
            }
        };
        let mut replayed = Vec::with_capacity(chosen.len());
        for letter in &chosen {
            let result = self.publish(letter).await;
            if let Err(err) = result {
                // What went through is forgotten before the error is answered.
                self.forget(&replayed).await?;
                return Err(match err {
                    ReplayError::Refused {
                        subject,
                        seq,
                        reason,
                        ..
                    } => ReplayError::Refused {
                        subject,
                        seq,
                        reason,
                        replayed: replayed.len(),
                    },
                    other => other,
                });
            }
            tracing::info!(author = %letter.author, subject = letter.log.name(), seq = letter.seq, "dead letter delivered");
            replayed.push(*letter);
        }
        self.forget(&replayed).await?;
        Ok(ReplayReply {
            replayed: replayed.iter().map(|d| record(d)).collect(),
            remaining: (dead.len() - replayed.len()) as u64,
        })
    }

    async fn publish(&self, letter: &DeadLetter) -> Result<(), ReplayError> {
        let missing = || ReplayError::Missing {
            subject: letter.log.name().to_string(),
            seq: letter.seq,
        };
        let op = self
            .store
            .operation(&letter.author, &letter.log, letter.seq)
            .await?
            .ok_or_else(missing)?;
        let refused = |reason: String| ReplayError::Refused {
            subject: letter.log.name().to_string(),
            seq: letter.seq,
            reason,
            replayed: 0,
        };
        let (subject, headers, payload) =
            jetstream_message(&op).map_err(|err| refused(err.to_string()))?;
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|err| refused(err.to_string()))?;
        match tokio::time::timeout(ACK_TIMEOUT, ack).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(refused(err.to_string())),
            Err(_) => Err(refused(format!(
                "no acknowledgement within {ACK_TIMEOUT:?}"
            ))),
        }
    }

    async fn forget(&self, replayed: &[&DeadLetter]) -> Result<(), ReplayError> {
        if replayed.is_empty() {
            return Ok(());
        }
        let keys = replayed
            .iter()
            .map(|d| (d.author, d.log.clone(), d.seq))
            .collect();
        self.store.remove_dead_letters(keys).await?;
        Ok(())
    }
}

fn record(dead: &DeadLetter) -> DeadLetterRecord {
    DeadLetterRecord {
        author: dead.author.to_hex(),
        subject: dead.log.name().to_string(),
        seq: dead.seq,
        operation: dead.hash.clone(),
        reason: dead.reason.clone(),
        detail: dead.detail.clone(),
    }
}

fn answer<T: serde::Serialize>(result: Result<T, ReplayError>) -> Vec<u8> {
    let reply = match result {
        Ok(value) => Reply::Ok(value),
        Err(err) => {
            tracing::warn!(%err, "dead letter request failed");
            Reply::error(err.code(), err.to_string())
        }
    };
    serde_json::to_vec(&reply).expect("reply serializes")
}
