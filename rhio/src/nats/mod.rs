//! The NATS side of a node: one connection that reconnects forever, and the `rhio.status`
//! request/reply service.
//!
//! The node starts even while NATS is down: the client is created with
//! `retry_on_initial_connect`, so subscriptions made before the server is reachable are sent as
//! soon as it is, and every later disconnect is retried with capped exponential backoff.

use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr};
use futures::StreamExt;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::{NatsAuth, NatsConfig};

/// What status reports about the NATS connection (defined with the status document).
pub use rhio_core::api::status::{NatsState, NatsStatus};

/// Subject of the status request/reply service.
pub use rhio_core::api::STATUS_SUBJECT;

/// Longest pause between two reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum NatsError {
    #[error("invalid nats.endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("NATS client could not be created: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// The node's NATS connection.
#[derive(Clone, Debug)]
pub struct NatsConnection {
    client: async_nats::Client,
    endpoint: String,
}

impl NatsConnection {
    /// Creates the client; returns at once even if the server is not reachable yet.
    pub async fn connect(config: &NatsConfig, auth: NatsAuth) -> Result<Self, NatsError> {
        let servers = parse_servers(&config.endpoint)?;
        let options =
            match auth {
                NatsAuth::None => ConnectOptions::new(),
                NatsAuth::UserPassword { user, password } => {
                    ConnectOptions::with_user_and_password(user, password)
                }
                NatsAuth::Token(token) => ConnectOptions::with_token(token),
                NatsAuth::NkeySeed(seed) => ConnectOptions::with_nkey(seed),
                NatsAuth::CredentialsFile(path) => ConnectOptions::with_credentials_file(&path)
                    .await
                    .map_err(|source| NatsError::Credentials { path, source })?,
            };
        let endpoint = config.endpoint.clone();
        let log_endpoint = endpoint.clone();
        let client = options
            .name(&config.client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let endpoint = log_endpoint.clone();
                async move { log_event(&endpoint, event) }
            })
            .connect(servers)
            .await?;
        Ok(Self { client, endpoint })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn status(&self) -> NatsStatus {
        use async_nats::connection::State;
        let state = self.client.connection_state();
        NatsStatus {
            endpoint: self.endpoint.clone(),
            connected: state == State::Connected,
            state: match state {
                State::Connected => NatsState::Connected,
                State::Disconnected => NatsState::Disconnected,
                State::Pending => NatsState::Pending,
            },
        }
    }

    /// Sends what is buffered; used at shutdown. Bounded by the caller's timeout.
    pub async fn flush(&self) {
        if let Err(err) = self.client.flush().await {
            tracing::debug!(%err, "NATS flush at shutdown failed");
        }
    }
}

fn parse_servers(endpoint: &str) -> Result<Vec<ServerAddr>, NatsError> {
    endpoint
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<ServerAddr>()
                .map_err(|err| NatsError::BadEndpoint {
                    endpoint: endpoint.to_string(),
                    reason: err.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|servers| {
            if servers.is_empty() {
                Err(NatsError::BadEndpoint {
                    endpoint: endpoint.to_string(),
                    reason: "no server URL".into(),
                })
            } else {
                Ok(servers)
            }
        })
}

/// The shared backoff with jitter: 100 ms, 200 ms, ... up to [`MAX_RECONNECT_DELAY`], each
/// between half and all of its step, so the nodes of many clusters do not reconnect to a
/// restarted NATS in the same instant.
fn reconnect_delay(attempts: usize) -> Duration {
    let policy = crate::retry::Backoff::new(Duration::from_millis(100), MAX_RECONNECT_DELAY);
    crate::retry::delay(policy, attempts.min(u32::MAX as usize) as u32)
}

fn log_event(endpoint: &str, event: async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::Connected => tracing::info!(endpoint, "connected to NATS"),
        Event::Disconnected => tracing::warn!(endpoint, "disconnected from NATS, reconnecting"),
        Event::ClientError(err) => tracing::warn!(endpoint, %err, "NATS client error"),
        Event::ServerError(err) => tracing::warn!(endpoint, %err, "NATS server error"),
        other => tracing::debug!(endpoint, event = %other, "NATS event"),
    }
}

/// The headers of a NATS message as (name, value) pairs, every value of a name in order.
pub fn header_pairs(headers: Option<&async_nats::HeaderMap>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .flat_map(|map| map.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.to_string(), value.as_str().to_string()))
        })
        .collect()
}

/// Answers requests on `subject` with `answer(payload)` until `shutdown` fires, at most
/// `concurrency` at once (rhio's request/reply services: `rhio.status`, `rhio.retry`,
/// `rhio.import`, `rhio.dead_letters.*`). Answers still running at shutdown are finished (and
/// sent) before this returns.
pub async fn serve_requests<F, Fut>(
    client: async_nats::Client,
    subject: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    mut answer: F,
) where
    F: FnMut(bytes::Bytes) -> Fut,
    Fut: std::future::Future<Output = Vec<u8>> + Send + 'static,
{
    let mut requests = match client.subscribe(subject).await {
        Ok(subscriber) => subscriber,
        Err(err) => {
            tracing::error!(%err, subject, "cannot subscribe; this service is off");
            return;
        }
    };
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        if running.len() >= concurrency.max(1) {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = running.join_next() => continue,
            }
        }
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = requests.next() => request,
        };
        let Some(request) = request else { break };
        let Some(reply) = request.reply else { continue };
        let body = answer(request.payload);
        let client = client.clone();
        running.spawn(async move {
            let body = body.await;
            if let Err(err) = client.publish(reply, body.into()).await {
                tracing::warn!(%err, subject, "cannot answer a request");
            }
        });
    }
    let _ = requests.unsubscribe().await;
    if !running.is_empty() {
        tracing::info!(
            subject,
            requests = running.len(),
            "finishing running requests before stopping"
        );
    }
    while running.join_next().await.is_some() {}
}

/// Subjects of rhio's request/reply services; a JetStream stream capturing one of them answers
/// requests with a PubAck before rhio can.
pub const SERVICE_SUBJECTS: &[&str] = &[
    STATUS_SUBJECT,
    rhio_core::api::IMPORT_SUBJECT,
    rhio_core::api::RETRY_SUBJECT,
    rhio_core::api::DEAD_LETTERS_LIST_SUBJECT,
    rhio_core::api::DEAD_LETTERS_REPLAY_SUBJECT,
];

/// Once NATS is reachable, warns about streams that capture rhio's service subjects.
pub async fn warn_about_captured_services(nats: NatsConnection, shutdown: CancellationToken) {
    while !nats.status().connected {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let js = async_nats::jetstream::new(nats.client.clone());
    let mut streams = js.streams();
    while let Some(info) = streams.next().await {
        let Ok(info) = info else { return };
        for captured in &info.config.subjects {
            for service in SERVICE_SUBJECTS {
                if rhio_core::subject::overlap(captured, service) {
                    tracing::warn!(
                        stream = %info.config.name,
                        subject = %captured,
                        service,
                        "this JetStream stream captures a rhio service subject: requests get a PubAck from JetStream instead of rhio's answer; remove the subject from the stream"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_grows_jittered_and_is_capped() {
        let within = |attempts, step: Duration| {
            let delay = reconnect_delay(attempts);
            assert!(
                delay >= step / 2 && delay <= step,
                "{attempts}: {delay:?} for {step:?}"
            );
        };
        within(0, Duration::from_millis(100));
        within(3, Duration::from_millis(800));
        within(1000, MAX_RECONNECT_DELAY);
    }

    #[test]
    fn parses_comma_separated_servers() {
        assert_eq!(
            parse_servers("nats://a:4222, nats://b:4223").unwrap().len(),
            2
        );
        assert!(parse_servers(" , ").is_err());
        assert!(parse_servers("nats://a:notaport").is_err());
    }
}
