//! Message routing: local JetStream -> signed operations -> other clusters -> their JetStream.
//!
//! - [`outbound`]: a durable JetStream consumer per published stream; each message is signed into
//!   the author's log for its subject and stored before the NATS message is acked.
//! - the sync protocol ([`crate::network::sync`]) carries operations between nodes;
//! - [`delivery`]: accepted operations of other authors are published into the local JetStream
//!   on their original subject, per log in sequence order, exactly once;
//! - [`dead_letters`]: what the local JetStream could never take, listed and replayed.

pub mod dead_letters;
pub mod delivery;
pub mod outbound;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;

use crate::config::Config;
pub use crate::policy::Routes;

/// Pause before retrying after NATS or JetStream failed.
pub(crate) const RETRY: Duration = Duration::from_secs(1);

/// What status reports about one configured stream.
pub use rhio_core::api::status::{StreamRole, StreamStatus};

/// The configured streams and whether routing through each one runs; shared by the routing
/// tasks (which report) and status (which reads).
#[derive(Debug, Clone, Default)]
pub struct StreamStates {
    streams: std::sync::Arc<std::sync::Mutex<BTreeMap<(StreamRole, String), StreamStatus>>>,
}

impl StreamStates {
    pub fn from_config(config: &Config) -> Self {
        let states = Self::default();
        {
            let mut streams = states.streams.lock().expect("stream states lock");
            let entries = config
                .publish
                .iter()
                .map(|p| (StreamRole::Publish, &p.stream, &p.subjects))
                .chain(
                    config
                        .subscribe
                        .iter()
                        .map(|s| (StreamRole::Subscribe, &s.stream, &s.subjects)),
                );
            for (role, name, subjects) in entries {
                let status = streams
                    .entry((role, name.clone()))
                    .or_insert_with(|| StreamStatus {
                        name: name.clone(),
                        role,
                        subjects: Vec::new(),
                        active: false,
                        error: Some("not started yet".into()),
                    });
                status.subjects.extend(subjects.iter().cloned());
            }
        }
        states
    }

    pub(crate) fn report(&self, role: StreamRole, name: &str, result: Result<(), &str>) {
        let mut streams = self.streams.lock().expect("stream states lock");
        if let Some(status) = streams.get_mut(&(role, name.to_string())) {
            status.active = result.is_ok();
            status.error = result.err().map(str::to_string);
        }
    }

    /// Reports the same result for every stream of `role`.
    pub(crate) fn report_role(&self, role: StreamRole, result: Result<(), &str>) {
        let mut streams = self.streams.lock().expect("stream states lock");
        for ((r, _), status) in streams.iter_mut() {
            if *r == role {
                status.active = result.is_ok();
                status.error = result.err().map(str::to_string);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<StreamStatus> {
        self.streams
            .lock()
            .expect("stream states lock")
            .values()
            .cloned()
            .collect()
    }
}

/// Why a stream rhio needs is not usable.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "JetStream stream {name:?} does not exist; create it (capturing {subjects:?}) or set nats.create_streams = true"
    )]
    Missing { name: String, subjects: Vec<String> },
    #[error(
        "JetStream stream {name:?} captures {captured:?} but not {missing:?}; add them to the stream's subjects or set nats.create_streams = true"
    )]
    Uncaptured {
        name: String,
        captured: Vec<String>,
        missing: Vec<String>,
    },
    #[error("cannot {action} JetStream stream {name:?}: {reason}")]
    Request {
        action: &'static str,
        name: String,
        reason: String,
    },
}

/// Makes sure `name` exists and captures every filter of `subjects` (creating the stream, or
/// adding the missing subjects to it, when allowed). A stream that exists but misses a subject
/// is an error naming both: messages on that subject would have nowhere to go.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[String],
    create: bool,
) -> Result<jetstream::stream::Stream, StreamError> {
    let request = |action: &'static str| {
        move |err: &dyn std::fmt::Display| StreamError::Request {
            action,
            name: name.to_string(),
            reason: err.to_string(),
        }
    };
    match js.get_stream(name).await {
        Ok(stream) => {
            let mut config = stream.cached_info().config.clone();
            let missing: Vec<String> = rhio_core::subject::uncovered(&config.subjects, subjects)
                .into_iter()
                .map(str::to_string)
                .collect();
            if missing.is_empty() {
                return Ok(stream);
            }
            if !create {
                return Err(StreamError::Uncaptured {
                    name: name.to_string(),
                    captured: config.subjects,
                    missing,
                });
            }
            config.subjects.extend(missing.iter().cloned());
            js.update_stream(config)
                .await
                .map_err(|err| request("add subjects to")(&err))?;
            tracing::info!(
                stream = name,
                ?missing,
                "added subjects to JetStream stream"
            );
            js.get_stream(name)
                .await
                .map_err(|err| request("look up")(&err))
        }
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref inner)
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            if !create {
                return Err(StreamError::Missing {
                    name: name.to_string(),
                    subjects: subjects.to_vec(),
                });
            }
            js.create_stream(jetstream::stream::Config {
                name: name.to_string(),
                subjects: subjects.to_vec(),
                storage: jetstream::stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|err| request("create")(&err))
            .inspect(|_| tracing::info!(stream = name, ?subjects, "created JetStream stream"))
        }
        Err(err) => Err(request("look up")(&err)),
    }
}
