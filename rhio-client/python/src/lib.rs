//! `rhio_client._rhio_client`: the native half of the Python package.
//!
//! A thin layer over the `rhio-client` crate, so signing and verification have one
//! implementation: every call releases the GIL while it runs on the client's tokio runtime, and
//! structured results cross as JSON text that the Python half (`python/rhio_client`) turns into
//! dicts, dataclasses and typed exceptions. Errors are raised as `RhioError(code, message)` with
//! the client's stable error code.

use std::sync::Mutex;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rhio_client::{ClientError, ReceivedMessage, S3Options};

create_exception!(
    _rhio_client,
    RhioError,
    PyException,
    "An error of rhio-client: args are (code, message)."
);

fn raise(err: ClientError) -> PyErr {
    RhioError::new_err((err.code().to_string(), err.to_string()))
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("results serialize")
}

/// A connection to a rhio node's cluster (its NATS, and its S3 for fetches).
#[pyclass(frozen)]
struct Client {
    inner: rhio_client::Client,
    s3: S3Options,
    stream: String,
    runtime: tokio::runtime::Runtime,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (nats_url, s3_endpoint=None, s3_bucket="rhio".to_string(), s3_access_key=None, s3_secret_key=None, dataset_stream="DATASETS".to_string()))]
    fn new(
        py: Python<'_>,
        nats_url: String,
        s3_endpoint: Option<String>,
        s3_bucket: String,
        s3_access_key: Option<String>,
        s3_secret_key: Option<String>,
        dataset_stream: String,
    ) -> PyResult<Self> {
        // Fetches read ranges in parallel and hash and write them: use the cores (up to 4).
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("rhio-client")
            .enable_all()
            .build()
            .map_err(|err| RhioError::new_err(("io", err.to_string())))?;
        let inner = py
            .detach(|| runtime.block_on(rhio_client::Client::connect(&nats_url)))
            .map_err(raise)?;
        Ok(Self {
            inner,
            s3: S3Options {
                endpoint: s3_endpoint.unwrap_or_default(),
                bucket: s3_bucket,
                region: None,
                access_key: s3_access_key,
                secret_key: s3_secret_key,
            },
            stream: dataset_stream,
            runtime,
        })
    }

    /// The node's status as JSON text.
    fn status(&self, py: Python<'_>) -> PyResult<String> {
        let status = py
            .detach(|| self.runtime.block_on(self.inner.status_json()))
            .map_err(raise)?;
        Ok(to_json(&status))
    }

    /// `rhio.import`: the node's answer as JSON text (`ok` true or false).
    #[pyo3(signature = (path, dataset=None, subject=None, timeout_secs=3600.0))]
    fn import_file(
        &self,
        py: Python<'_>,
        path: String,
        dataset: Option<String>,
        subject: Option<String>,
        timeout_secs: f64,
    ) -> PyResult<String> {
        let answer = py
            .detach(|| {
                self.runtime.block_on(self.inner.import(
                    &path,
                    dataset.as_deref(),
                    subject.as_deref(),
                    Duration::from_secs_f64(timeout_secs),
                ))
            })
            .map_err(raise)?;
        Ok(to_json(&answer))
    }

    /// Publishes into the cluster's JetStream; returns the stream sequence.
    #[pyo3(signature = (subject, payload, headers=Vec::new()))]
    fn publish(
        &self,
        py: Python<'_>,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> PyResult<u64> {
        py.detach(|| {
            self.runtime
                .block_on(self.inner.publish(&subject, &headers, payload))
        })
        .map_err(raise)
    }

    /// Dataset versions in the cluster, as JSON text (a list of objects).
    fn datasets(&self, py: Python<'_>) -> PyResult<String> {
        let versions = py
            .detach(|| self.runtime.block_on(self.inner.datasets(&self.stream)))
            .map_err(raise)?;
        Ok(to_json(&versions))
    }

    /// Fetches a version into `path`, verified; a summary as JSON text.
    #[pyo3(signature = (dataset, path, version=None, author=None))]
    fn fetch(
        &self,
        py: Python<'_>,
        dataset: String,
        path: std::path::PathBuf,
        version: Option<u64>,
        author: Option<String>,
    ) -> PyResult<String> {
        let fetched = py
            .detach(|| {
                self.runtime.block_on(self.inner.fetch(
                    &self.s3,
                    &self.stream,
                    &dataset,
                    version,
                    author.as_deref(),
                    &path,
                ))
            })
            .map_err(raise)?;
        let mut summary = serde_json::to_value(&fetched.version).expect("serializes");
        summary["path"] = serde_json::json!(fetched.path);
        Ok(summary.to_string())
    }

    /// The cluster's state: (table name, Arrow IPC stream bytes) for peers, datasets,
    /// transfers.
    fn cluster_state(&self, py: Python<'_>) -> PyResult<Vec<(String, Py<PyBytes>)>> {
        let state = py
            .detach(|| {
                self.runtime
                    .block_on(self.inner.cluster_state(&self.stream))
            })
            .map_err(raise)?;
        Ok(state
            .tables()
            .into_iter()
            .map(|(name, batch)| {
                let bytes = rhio_client::state::to_ipc(batch);
                (name.to_string(), PyBytes::new(py, &bytes).unbind())
            })
            .collect())
    }

    /// Follows messages on `subject`; each one with its verified provenance.
    fn subscribe(&self, py: Python<'_>, subject: String) -> PyResult<Subscription> {
        let (sender, receiver) = tokio::sync::mpsc::channel(SUBSCRIPTION_BUFFER);
        let messages = py
            .detach(|| self.runtime.block_on(self.inner.subscribe(&subject)))
            .map_err(raise)?;
        let task = self.runtime.spawn(async move {
            use futures::StreamExt;
            let mut messages = std::pin::pin!(messages);
            while let Some(message) = messages.next().await {
                if sender.send(message).await.is_err() {
                    return;
                }
            }
        });
        Ok(Subscription {
            receiver: Mutex::new(receiver),
            task,
            handle: self.runtime.handle().clone(),
        })
    }
}

/// Messages a subscription holds before the subscriber reads them.
const SUBSCRIPTION_BUFFER: usize = 1024;

/// Messages of one subscription.
#[pyclass(frozen)]
struct Subscription {
    receiver: Mutex<tokio::sync::mpsc::Receiver<ReceivedMessage>>,
    task: tokio::task::JoinHandle<()>,
    handle: tokio::runtime::Handle,
}

type MessageTuple = (String, Vec<(String, String)>, Py<PyBytes>, String);

#[pymethods]
impl Subscription {
    /// The next message as (subject, headers, payload, provenance JSON), or None when none
    /// came within `timeout_secs`.
    #[pyo3(signature = (timeout_secs=0.5))]
    fn next(&self, py: Python<'_>, timeout_secs: f64) -> PyResult<Option<MessageTuple>> {
        let message = py.detach(|| {
            let mut receiver = self.receiver.lock().expect("subscription lock");
            self.handle.block_on(async {
                tokio::time::timeout(Duration::from_secs_f64(timeout_secs), receiver.recv()).await
            })
        });
        let message = match message {
            Err(_) => return Ok(None),
            Ok(None) => {
                return Err(RhioError::new_err((
                    "request",
                    "the subscription ended (NATS connection closed)",
                )));
            }
            Ok(Some(message)) => message,
        };
        let provenance = match &message.provenance {
            Ok(proof) => serde_json::json!({
                "verified": true,
                "author": proof.author.to_hex(),
                "seq": proof.seq,
                "operation": proof.operation,
                "timestamp_micros": proof.timestamp_micros,
            }),
            Err(err) => serde_json::json!({"verified": false, "error": err.to_string()}),
        };
        Ok(Some((
            message.subject,
            message.headers,
            PyBytes::new(py, &message.payload).unbind(),
            provenance.to_string(),
        )))
    }

    /// Stops the subscription.
    fn close(&self) {
        self.task.abort();
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks `file` against a signed manifest file; the manifest's summary as JSON text.
#[pyfunction]
fn verify(
    py: Python<'_>,
    file: std::path::PathBuf,
    manifest: std::path::PathBuf,
) -> PyResult<String> {
    let manifest = py
        .detach(|| rhio_client::verify(&file, &manifest))
        .map_err(raise)?;
    Ok(serde_json::json!({
        "dataset": manifest.dataset,
        "version": manifest.version,
        "author": manifest.author.to_hex(),
        "file_hash": manifest.file_hash,
        "bytes": manifest.file_size,
        "rows": manifest.rows,
    })
    .to_string())
}

#[pymodule]
fn _rhio_client(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Client>()?;
    module.add_class::<Subscription>()?;
    module.add_function(wrap_pyfunction!(verify, module)?)?;
    module.add("RhioError", module.py().get_type::<RhioError>())?;
    Ok(())
}
