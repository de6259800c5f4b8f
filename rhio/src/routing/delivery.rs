//! Publishes accepted operations of other authors into the local JetStream.
//!
//! Per (author, subject) log, operations are published strictly in sequence order, each with
//! `Nats-Msg-Id` = operation hash so JetStream drops a repeat, and the position is committed
//! after JetStream acknowledged. After a restart or a NATS outage delivery resumes from the
//! committed position; anything published but not yet committed is found in the stream (the
//! last message of the log's subject names the last operation stored) or, failing that,
//! deduplicated by JetStream within its duplicate window.
//!
//! A message JetStream can never take (larger than this server's `max_payload` or the stream's
//! `max_msg_size`, or on a subject no stream captures) is a *dead letter*: it is recorded with
//! its reason beside the position that moves past it, counted in
//! `rhio_messages_dead_lettered_total{reason}` and logged with author, subject and sequence, and
//! delivery of that log and all others goes on. The operation stays in the store. Failures that
//! can pass (NATS down, an ack that timed out) pause delivery and retry it.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use rhio_core::identity::PublicKey;
use rhio_core::message::{RoutedMessage, provenance_headers};
use rhio_core::operation::{LogId, SignedOperation};
use thiserror::Error;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{RETRY, Routes, StreamError, ensure_stream};
use crate::metrics::{Metrics, ReasonLabels};
use crate::store::{DeadLetter, Store, StoreError};

/// Operations published before their acks are awaited.
const PIPELINE: usize = 512;

/// Why delivery paused (it is retried after [`RETRY`]).
#[derive(Debug, Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("publish into JetStream failed: {0}")]
    Publish(String),
    #[error("JetStream did not acknowledge: {0}")]
    Ack(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("fell {0} operations behind; rescanning the store")]
    Lagged(u64),
    #[error("the operation store closed")]
    Closed,
}

/// Why a message was moved aside: the `reason` label of `rhio_messages_dead_lettered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Payload plus headers exceed this NATS server's `max_payload`.
    MaxPayload,
    /// The stream refuses a message of this size (`max_msg_size`).
    MaxMsgSize,
    /// No JetStream stream captures the subject.
    NoStream,
    /// The stored body is not a routed message (a damaged store).
    Undecodable,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 4] = [
        DeadLetterReason::MaxPayload,
        DeadLetterReason::MaxMsgSize,
        DeadLetterReason::NoStream,
        DeadLetterReason::Undecodable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MaxPayload => "max_payload",
            DeadLetterReason::MaxMsgSize => "max_msg_size",
            DeadLetterReason::NoStream => "no_stream",
            DeadLetterReason::Undecodable => "undecodable",
        }
    }
}

/// The JetStream message of a routed operation: its original subject, the author's headers
/// plus the provenance headers (`Nats-Msg-Id` = operation hash), its payload. Delivery and the
/// replay of dead letters publish exactly this.
pub(crate) fn jetstream_message(
    op: &SignedOperation,
) -> Result<(String, HeaderMap, Vec<u8>), rhio_core::message::MessageError> {
    let message = RoutedMessage::decode(&op.body)?;
    let mut headers = HeaderMap::new();
    for (name, value) in &message.headers {
        headers.append(name.as_str(), value.as_str());
    }
    for (name, value) in provenance_headers(op) {
        headers.insert(name, value.as_str());
    }
    Ok((message.subject, headers, message.payload))
}

/// What became of one operation of a batch.
enum Outcome {
    Delivered,
    DeadLetter(DeadLetterReason, String),
    /// A failure that can pass: stop here and retry later.
    Retry(DeliveryError),
}

pub struct Delivery {
    pub js: jetstream::Context,
    pub routes: Routes,
    pub own_key: PublicKey,
    pub create_streams: bool,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub states: super::StreamStates,
    pub shutdown: CancellationToken,
}

type LogKey = (PublicKey, LogId);

impl Delivery {
    pub async fn run(self) {
        loop {
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = self.deliver() => result,
            };
            if let Err(err) = result {
                self.metrics.routing_errors.inc();
                if matches!(err, DeliveryError::Stream(_) | DeliveryError::Publish(_)) {
                    self.states
                        .report_role(super::StreamRole::Subscribe, Err(&err.to_string()));
                }
                tracing::warn!(%err, "delivery into JetStream paused; retrying");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// Messages of other authors this node subscribes to. The store also holds what the node
    /// only relays; that is never published here.
    fn delivers(&self, op: &SignedOperation) -> bool {
        self.delivers_log(&op.author(), op.log())
    }

    fn delivers_log(&self, author: &PublicKey, log: &LogId) -> bool {
        *author != self.own_key
            && matches!(log, LogId::Message(_))
            && self.routes.accepts(author, log)
    }

    /// Checks the streams (a missing one pauses delivery, one that misses a subject is reported
    /// and its messages become dead letters), catches up from the store, then follows new
    /// operations until an error.
    async fn deliver(&self) -> Result<(), DeliveryError> {
        for (stream, subjects) in &self.routes.subscribe_streams {
            match ensure_stream(&self.js, stream, subjects, self.create_streams).await {
                Ok(_) => self
                    .states
                    .report(super::StreamRole::Subscribe, stream, Ok(())),
                Err(err @ StreamError::Uncaptured { .. }) => {
                    tracing::warn!(%err, "messages on the missing subjects become dead letters");
                    self.states
                        .report(super::StreamRole::Subscribe, stream, Err(&err.to_string()));
                }
                Err(err) => return Err(err.into()),
            }
        }
        // Subscribe before scanning, so nothing committed in between is missed.
        let mut events = self.store.subscribe();
        let mut delivered: HashMap<LogKey, u64> = HashMap::new();
        // Streams by subject, looked up once per resume however many logs share a subject.
        let mut streams: HashMap<String, Option<jetstream::stream::Stream>> = HashMap::new();
        for log in self.store.logs().await? {
            if !self.delivers_log(&log.author, &log.log) {
                continue;
            }
            let key = (log.author, log.log.clone());
            let mut position = log.delivered_seq;
            if position < log.next_seq
                && let Some(found) = self.published_after(&mut streams, &key, position).await
            {
                tracing::info!(author = %key.0, log = %key.1.name(), from = position, to = found, "operations were published before the last stop; not publishing them again");
                self.store
                    .mark_delivered(vec![(key.0, key.1.clone(), found)], Vec::new())
                    .await?;
                position = found;
            }
            delivered.insert(key.clone(), position);
            if position < log.next_seq {
                self.catch_up(&mut delivered, &key, log.next_seq).await?;
            }
        }
        loop {
            let first = match events.recv().await {
                Ok(op) => op,
                Err(RecvError::Lagged(missed)) => return Err(DeliveryError::Lagged(missed)),
                Err(RecvError::Closed) => return Err(DeliveryError::Closed),
            };
            let mut batch = vec![first];
            while batch.len() < PIPELINE {
                match events.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let mut ready = Vec::with_capacity(batch.len());
            let mut expected: HashMap<LogKey, u64> = HashMap::new();
            for op in batch.into_iter().filter(|op| self.delivers(op)) {
                let key = (op.author(), op.log().clone());
                let next = *expected
                    .entry(key.clone())
                    .or_insert_with(|| delivered.get(&key).copied().unwrap_or(0));
                if op.seq() < next {
                    continue;
                }
                if op.seq() > next {
                    // Committed before this loop subscribed: fill the gap from the store.
                    self.publish(&mut delivered, std::mem::take(&mut ready))
                        .await?;
                    self.catch_up(&mut delivered, &key, op.seq()).await?;
                    expected.clear();
                }
                expected.insert(key, op.seq() + 1);
                ready.push(op);
            }
            self.publish(&mut delivered, ready).await?;
        }
    }

    /// The position after the last operation of `key` at or after `from` that the local stream
    /// already holds (published before a crash, not yet committed), judged by the last message
    /// on the log's subject. `None` when that message is not one of this log's, or on any error
    /// (then JetStream's duplicate window is what remains).
    async fn published_after(
        &self,
        streams: &mut HashMap<String, Option<jetstream::stream::Stream>>,
        key: &LogKey,
        from: u64,
    ) -> Option<u64> {
        let LogId::Message(subject) = &key.1 else {
            return None;
        };
        if !streams.contains_key(subject) {
            let stream = match self.js.stream_by_subject(subject.as_str()).await {
                Ok(name) => self.js.get_stream(&name).await.ok(),
                Err(_) => None,
            };
            streams.insert(subject.clone(), stream);
        }
        let stream = streams.get(subject)?.as_ref()?;
        let last = stream.get_last_raw_message_by_subject(subject).await.ok()?;
        let headers = crate::nats::header_pairs(Some(&last.headers));
        let (author, log, seq) = rhio_core::message::routed_position(&headers)?;
        (author == key.0 && log == key.1 && seq >= from).then_some(seq + 1)
    }

    /// Publishes the stored operations of one log from its delivered position up to `until`.
    async fn catch_up(
        &self,
        delivered: &mut HashMap<LogKey, u64>,
        key: &LogKey,
        until: u64,
    ) -> Result<(), DeliveryError> {
        loop {
            let from = *delivered.get(key).unwrap_or(&0);
            if from >= until {
                return Ok(());
            }
            let ops = self
                .store
                .operations(&key.0, &key.1, from, (until - from).min(PIPELINE as u64))
                .await?;
            if ops.is_empty() {
                return Ok(());
            }
            self.publish(delivered, ops.into_iter().map(Arc::new).collect())
                .await?;
        }
    }

    /// Publishes `ops` (each log's in order), awaits the acks, then commits the positions and
    /// the dead letters. Stops at the first failure that can pass; what was acknowledged before
    /// it is committed.
    async fn publish(
        &self,
        delivered: &mut HashMap<LogKey, u64>,
        ops: Vec<Arc<SignedOperation>>,
    ) -> Result<(), DeliveryError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut pending = Vec::with_capacity(ops.len());
        let mut stop = None;
        for op in &ops {
            let (subject, headers, payload) = match jetstream_message(op) {
                Ok(message) => message,
                Err(err) => {
                    // Checked before storing, so this is a bug or a damaged store.
                    pending.push(Err(Outcome::DeadLetter(
                        DeadLetterReason::Undecodable,
                        err.to_string(),
                    )));
                    continue;
                }
            };
            match self
                .js
                .publish_with_headers(subject, headers, payload.into())
                .await
            {
                Ok(ack) => pending.push(Ok(ack)),
                Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    pending.push(Err(Outcome::DeadLetter(
                        DeadLetterReason::MaxPayload,
                        err.to_string(),
                    )))
                }
                Err(err) => {
                    stop = Some(DeliveryError::Publish(err.to_string()));
                    break;
                }
            }
        }
        let mut done: HashMap<LogKey, u64> = HashMap::new();
        let mut dead_letters = Vec::new();
        let mut failure = None;
        for (op, ack) in ops.iter().zip(pending) {
            let outcome = match ack {
                Ok(ack) => match ack.await {
                    Ok(_) => Outcome::Delivered,
                    Err(err) => self.classify_ack_error(op, err).await,
                },
                Err(outcome) => outcome,
            };
            match outcome {
                Outcome::Delivered => {}
                Outcome::DeadLetter(reason, detail) => {
                    dead_letters.push(self.dead_letter(op, reason, detail));
                }
                Outcome::Retry(err) => {
                    failure = Some(err);
                    break;
                }
            }
            done.insert((op.author(), op.log().clone()), op.seq() + 1);
        }
        let count: u64 = done
            .iter()
            .map(|(key, next)| next - delivered.get(key).copied().unwrap_or(0))
            .sum::<u64>()
            - dead_letters.len() as u64;
        self.metrics.operations_delivered.inc_by(count);
        let updates: Vec<_> = done
            .into_iter()
            .map(|((author, log), next)| (author, log, next))
            .collect();
        for (author, log, next) in &updates {
            delivered.insert((*author, log.clone()), *next);
        }
        self.store.mark_delivered(updates, dead_letters).await?;
        match failure.or(stop) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Sorts an ack error into "never" (dead letter) and "not now" (retry).
    async fn classify_ack_error(
        &self,
        op: &SignedOperation,
        err: jetstream::context::PublishError,
    ) -> Outcome {
        let code = std::error::Error::source(&err)
            .and_then(|source| source.downcast_ref::<jetstream::Error>())
            .map(|inner| inner.error_code());
        if code == Some(jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) {
            return Outcome::DeadLetter(DeadLetterReason::MaxMsgSize, err.to_string());
        }
        if err.kind() == PublishErrorKind::StreamNotFound
            && let LogId::Message(subject) = op.log()
        {
            // "No responders" also shows while JetStream restarts: only JetStream's own answer
            // that no stream matches the subject makes it permanent.
            use jetstream::context::GetStreamByNameErrorKind;
            if let Err(lookup) = self.js.stream_by_subject(subject.as_str()).await
                && lookup.kind() == GetStreamByNameErrorKind::NotFound
            {
                return Outcome::DeadLetter(
                    DeadLetterReason::NoStream,
                    format!("no JetStream stream captures {subject:?}"),
                );
            }
        }
        Outcome::Retry(DeliveryError::Ack(err.to_string()))
    }

    fn dead_letter(
        &self,
        op: &SignedOperation,
        reason: DeadLetterReason,
        detail: String,
    ) -> DeadLetter {
        self.metrics
            .messages_dead_lettered
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
        tracing::warn!(
            author = %op.author(),
            subject = op.log().name(),
            seq = op.seq(),
            operation = %op.hash,
            reason = reason.as_str(),
            %detail,
            "the local JetStream can never take this message; recorded as a dead letter, delivery goes on"
        );
        DeadLetter {
            author: op.author(),
            log: op.log().clone(),
            seq: op.seq(),
            hash: op.hash.to_hex(),
            reason: reason.as_str().into(),
            detail,
        }
    }
}
