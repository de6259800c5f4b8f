//! The HTTP server: `GET /health` (JSON status; 200 when NATS and S3 are up, 503 otherwise),
//! `GET /health/live` (200 while the process runs) and `GET /metrics` (Prometheus text).
//!
//! Probes must be answered even when something misbehaves on the port: at most
//! [`MAX_CONNECTIONS`] connections are served at once, a client gets [`HEADER_READ_TIMEOUT`] to
//! send a request's headers and a connection lives at most [`CONNECTION_LIFETIME`], so clients
//! that connect and stall are dropped and cannot keep the kubelet's probe out.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::status::StatusSource;

/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest a client may take to send the headers of a request.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection (kept alive or not) is closed gracefully after this long.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Routes {
    status: StatusSource,
    metrics: Arc<Metrics>,
}

/// Binds the listener now (so a taken port fails the start) and returns the serving future.
pub async fn bind(
    addr: SocketAddr,
    status: StatusSource,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let routes = Routes { status, metrics };
    Ok((local, serve(listener, routes, shutdown)))
}

async fn serve(listener: TcpListener, routes: Routes, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "HTTP accept failed");
                continue;
            }
        };
        let routes = routes.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(routes.handle(request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
            }
            connection.as_mut().graceful_shutdown();
            // A client that never reads its answer is not waited for forever either.
            let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, connection).await;
        });
    }
}

impl Routes {
    fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
        }
        match request.uri().path() {
            "/health" => {
                let status = self.status.snapshot();
                let code = if status.is_ok() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::to_vec_pretty(&status).expect("status serializes");
                response(code, "application/json", body)
            }
            "/health/live" => text(StatusCode::OK, "alive\n"),
            "/metrics" => {
                let body = self
                    .metrics
                    .render(crate::status::gauges(&self.status.snapshot()));
                response(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body.into_bytes(),
                )
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /health, /health/live or /metrics\n",
            ),
        }
    }
}

fn text(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    response(code, "text/plain; charset=utf-8", body.as_bytes().to_vec())
}

fn response(code: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
