//! Signs the messages of one published stream.
//!
//! A durable pull consumer (`rhio-publish`) reads the stream in order, starting right after the
//! stream position stored with the last signed batch. Each batch of messages is signed into the
//! node's per-subject logs and committed together with the position it reached (pushed to peers
//! at once), then fsynced (one fsync shared by whatever is waiting); only then are the messages
//! acked. After any failure or restart the consumer is recreated at the stored
//! position, so a message is neither skipped nor signed twice.
//! Messages that already carry `X-Rhio-*` headers came from another cluster and are never signed
//! again.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use rhio_core::message::{RoutedMessage, delivered_wire_size, is_routed};
use rhio_core::operation::{LogId, MAX_BODY_BYTES};
use tokio_util::sync::CancellationToken;

use super::{RETRY, ensure_stream};
use crate::config::PublishConfig;
use crate::metrics::{Metrics, ReasonLabels};
use crate::store::Store;

/// Why a local message was not signed: the `reason` label of `rhio_messages_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The signed body would exceed the protocol's operation size limit.
    TooLarge,
    /// With the provenance headers a receiver adds, the message exceeds `max_payload` (the
    /// limit of this cluster's NATS, which other clusters are expected to share).
    ExceedsMaxPayload,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 2] = [RefuseReason::TooLarge, RefuseReason::ExceedsMaxPayload];

    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::TooLarge => "too_large",
            RefuseReason::ExceedsMaxPayload => "exceeds_max_payload",
        }
    }
}

/// Why `message` cannot be routed, if it cannot. `max_payload` is this cluster's NATS limit.
pub fn refuse_reason(
    message: &RoutedMessage,
    body_len: usize,
    max_payload: usize,
) -> Option<RefuseReason> {
    if body_len > MAX_BODY_BYTES {
        return Some(RefuseReason::TooLarge);
    }
    // Cheap test first: the provenance headers add well under 2 KiB.
    let plain: usize = message
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len() + 4)
        .sum::<usize>()
        + message.payload.len();
    if plain + 2048 > max_payload && delivered_wire_size(message) > max_payload {
        return Some(RefuseReason::ExceedsMaxPayload);
    }
    None
}

/// Name of the durable consumer rhio keeps on each published stream.
pub const CONSUMER: &str = "rhio-publish";
/// Most messages signed in one transaction.
const BATCH: usize = 512;

pub struct Publisher {
    pub js: jetstream::Context,
    pub route: PublishConfig,
    pub create_stream: bool,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub states: super::StreamStates,
    pub shutdown: CancellationToken,
}

impl Publisher {
    /// Runs until shutdown, retrying after every NATS or store failure.
    pub async fn run(self) {
        let stream = self.route.stream.clone();
        loop {
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = self.consume() => result,
            };
            if let Err(err) = result {
                self.metrics.routing_errors.inc();
                self.states
                    .report(super::StreamRole::Publish, &stream, Err(&err));
                tracing::warn!(stream, %err, "publishing paused; retrying");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    async fn consume(&self) -> Result<(), String> {
        let stream = ensure_stream(
            &self.js,
            &self.route.stream,
            &self.route.subjects,
            self.create_stream,
        )
        .await
        .map_err(|err| err.to_string())?;
        // The store's cursor is the truth about what is signed. Recreating the consumer at the
        // message after it makes a restart resume exactly there: no message is skipped because a
        // later one was signed first, none is signed twice.
        let mut cursor = self
            .store
            .outbound_cursor(&self.route.stream)
            .await
            .map_err(|err| err.to_string())?;
        if let Err(err) = stream.delete_consumer(CONSUMER).await {
            tracing::debug!(%err, "no previous consumer to replace");
        }
        let consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(CONSUMER.into()),
                filter_subjects: self.route.subjects.clone(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: cursor + 1,
                },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 20_000,
                ..Default::default()
            })
            .await
            .map_err(|err| format!("cannot create consumer {CONSUMER}: {err}"))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|err| format!("cannot read stream: {err}"))?;
        tracing::info!(stream = %self.route.stream, subjects = ?self.route.subjects, "publishing messages");
        self.states
            .report(super::StreamRole::Publish, &self.route.stream, Ok(()));
        let mut batches = messages.ready_chunks(BATCH);
        while let Some(batch) = batches.next().await {
            let mut messages = Vec::with_capacity(batch.len());
            let mut failure = None;
            for message in batch {
                match message {
                    Ok(message) => messages.push(message),
                    Err(err) => {
                        failure = Some(format!("reading stream: {err}"));
                        break;
                    }
                }
            }
            // Sign what arrived before a failure; the restart resumes right after it.
            self.sign_batch(messages, &mut cursor).await?;
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        Err("stream of messages ended".into())
    }

    /// Signs a batch and advances `cursor` (the stream position stored with the last batch, kept
    /// here so the hot path does not read it back from the store).
    async fn sign_batch(
        &self,
        messages: Vec<jetstream::Message>,
        cursor: &mut u64,
    ) -> Result<(), String> {
        let start = *cursor;
        let mut entries = Vec::with_capacity(messages.len());
        let mut last_seq = start;
        let mut skipped_routed = 0;
        let max_payload = self.js.client().max_payload();
        for message in &messages {
            let info = message
                .info()
                .map_err(|err| format!("message without JetStream metadata: {err}"))?;
            let seq = info.stream_sequence;
            // The operation's timestamp is JetStream's, not the clock's: signing the same message
            // again after a crash must give the same operation (see Store::append_messages).
            let published = (info.published.unix_timestamp_nanos() / 1_000).max(0) as u64;
            if seq <= start {
                continue; // signed before a crash, acked too late
            }
            last_seq = last_seq.max(seq);
            let headers = crate::nats::header_pairs(message.headers.as_ref());
            if is_routed(headers.iter().map(|(name, _)| name)) {
                skipped_routed += 1;
                continue;
            }
            let subject = message.subject.to_string();
            let routed = RoutedMessage::new(subject.clone(), headers, message.payload.to_vec());
            let body = routed.encode();
            if let Some(reason) = refuse_reason(&routed, body.len(), max_payload) {
                // Signing it would hand every other cluster a message it cannot publish.
                self.metrics
                    .messages_refused
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
                tracing::warn!(
                    stream = %self.route.stream,
                    stream_seq = seq,
                    %subject,
                    payload_bytes = routed.payload.len(),
                    max_payload,
                    reason = reason.as_str(),
                    "message not signed: with rhio's provenance headers it does not fit the protocol's or NATS' size limits; it stays in the local stream only"
                );
                continue;
            }
            entries.push((LogId::Message(subject), body, published));
        }
        let signed = entries.len();
        if signed > 0 || last_seq > start {
            // Committed and pushed to peers now; on disk before the acks below.
            self.store
                .append_messages(entries, (self.route.stream.clone(), last_seq))
                .await
                .map_err(|err| err.to_string())?;
            *cursor = last_seq;
            self.store.sync().await.map_err(|err| err.to_string())?;
        }
        self.metrics.operations_signed.inc_by(signed as u64);
        if skipped_routed > 0 {
            tracing::debug!(
                count = skipped_routed,
                "skipped messages that were routed here"
            );
        }
        // Durable now: ack. A lost ack only means a redelivery that the cursor filters out.
        for message in &messages {
            if let Err(err) = message.ack().await {
                return Err(format!("ack failed: {err}"));
            }
        }
        Ok(())
    }
}
