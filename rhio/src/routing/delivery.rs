//! Publishes accepted operations of other authors into the local JetStream.
//!
//! Per (author, subject) log, operations are published strictly in sequence order, each with
//! `Nats-Msg-Id` = operation hash so JetStream drops a repeat, and the position is committed
//! after JetStream acknowledged. After a restart or a NATS outage delivery resumes from the
//! committed position; anything published but not yet committed is deduplicated by JetStream.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream;
use rhio_core::identity::PublicKey;
use rhio_core::message::{RoutedMessage, provenance_headers};
use rhio_core::operation::{LogId, SignedOperation};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{RETRY, Routes, ensure_stream};
use crate::metrics::Metrics;
use crate::store::Store;

/// Operations published before their acks are awaited.
const PIPELINE: usize = 512;

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
                self.states.report_role("subscribe", Err(&err));
                tracing::warn!(%err, "delivery into JetStream paused; retrying");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    fn delivers(&self, op: &SignedOperation) -> bool {
        op.author() != self.own_key && matches!(op.log(), LogId::Message(_))
    }

    /// Catches up from the store, then follows new operations until an error.
    async fn deliver(&self) -> Result<(), String> {
        for (stream, subjects) in &self.routes.subscribe_streams {
            ensure_stream(&self.js, stream, subjects, self.create_streams).await?;
        }
        self.states.report_role("subscribe", Ok(()));
        // Subscribe before scanning, so nothing committed in between is missed.
        let mut events = self.store.subscribe();
        let mut delivered: HashMap<LogKey, u64> = HashMap::new();
        let logs = self.store.logs().await.map_err(|e| e.to_string())?;
        for log in logs {
            if log.author == self.own_key || !matches!(log.log, LogId::Message(_)) {
                continue;
            }
            let key = (log.author, log.log.clone());
            delivered.insert(key.clone(), log.delivered_seq);
            if log.delivered_seq < log.next_seq {
                self.catch_up(&mut delivered, &key, log.next_seq).await?;
            }
        }
        loop {
            let first = match events.recv().await {
                Ok(op) => op,
                Err(RecvError::Lagged(missed)) => {
                    return Err(format!("fell {missed} operations behind; rescanning"));
                }
                Err(RecvError::Closed) => return Err("store closed".into()),
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

    /// Publishes the stored operations of one log from its delivered position up to `until`.
    async fn catch_up(
        &self,
        delivered: &mut HashMap<LogKey, u64>,
        key: &LogKey,
        until: u64,
    ) -> Result<(), String> {
        loop {
            let from = *delivered.get(key).unwrap_or(&0);
            if from >= until {
                return Ok(());
            }
            let ops = self
                .store
                .operations(&key.0, &key.1, from, (until - from).min(PIPELINE as u64))
                .await
                .map_err(|e| e.to_string())?;
            if ops.is_empty() {
                return Ok(());
            }
            self.publish(delivered, ops.into_iter().map(Arc::new).collect())
                .await?;
        }
    }

    /// Publishes `ops` (each log's in order), awaits the acks, then commits the positions.
    async fn publish(
        &self,
        delivered: &mut HashMap<LogKey, u64>,
        ops: Vec<Arc<SignedOperation>>,
    ) -> Result<(), String> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut pending = Vec::with_capacity(ops.len());
        for op in &ops {
            let message = match RoutedMessage::decode(&op.body) {
                Ok(message) => message,
                Err(err) => {
                    // Checked before storing, so this is a bug or a damaged store: skip it.
                    tracing::error!(operation = %op.hash, %err, "stored message cannot be decoded; skipping");
                    pending.push(None);
                    continue;
                }
            };
            let mut headers = HeaderMap::new();
            for (name, value) in &message.headers {
                headers.append(name.as_str(), value.as_str());
            }
            for (name, value) in provenance_headers(op) {
                headers.insert(name, value.as_str());
            }
            let ack = self
                .js
                .publish_with_headers(message.subject, headers, message.payload.into())
                .await
                .map_err(|err| format!("publish failed: {err}"))?;
            pending.push(Some(ack));
        }
        let mut done: HashMap<LogKey, u64> = HashMap::new();
        let mut result = Ok(());
        for (op, ack) in ops.iter().zip(pending) {
            if let Some(ack) = ack
                && let Err(err) = ack.await
            {
                result = Err(format!("JetStream did not acknowledge: {err}"));
                break;
            }
            done.insert((op.author(), op.log().clone()), op.seq() + 1);
        }
        let count: u64 = done
            .iter()
            .map(|(key, next)| next - delivered.get(key).copied().unwrap_or(0))
            .sum();
        self.metrics.operations_delivered.inc_by(count);
        let updates: Vec<_> = done
            .into_iter()
            .map(|((author, log), next)| (author, log, next))
            .collect();
        for (author, log, next) in &updates {
            delivered.insert((*author, log.clone()), *next);
        }
        self.store
            .mark_delivered(updates)
            .await
            .map_err(|e| e.to_string())?;
        result
    }
}
