//! `./dev/bench`: rhio against baselines measured in the same run, on real local servers.
//!
//! Scenarios (each rhio run interleaved with its baseline, A B A B ..., medians reported):
//! - limits: BLAKE3 on one core and on all cores, bao outboard computation, loopback QUIC between
//!   two iroh endpoints, S3 PUT and GET to the local S3 server;
//! - import: `rhio.import` of a Parquet file against an aws-sdk-s3 multipart upload of it;
//! - replication: a dataset A -> B until announced in B, against `rclone copyto` and a streaming
//!   aws-sdk-s3 copy (GET from A piped into a multipart upload to B) of the same object; the
//!   delta ratio of an appended version (bytes moved / bytes of new blobs);
//! - messages: sustained routed msg/s (1 KiB, zero loss checked) and publish-to-delivery latency
//!   at a fixed 500 msg/s, against a plain JetStream bridge A -> B without signing;
//! - mirror: the push of an imported version to the local OCI registry (from the import's answer
//!   until the mirror recorded it) against PyPI `oras` pushing the same file to the same registry;
//! - client: `fetch` of a 1 GiB dataset (verified) against a boto3 download of the same object,
//!   and Python's `read_dataset` against `pyarrow.parquet.read_table` of a local copy;
//! - memory: peak RSS of each rhio node;
//! - capped and scale: see `cluster/scale.rs`.
//!
//! `--quick` runs every scenario once with small sizes (under two minutes); `--json FILE` writes
//! the results.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "cluster/scale.rs"]
mod scale;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream;
use common::{LocalEnv, NodeSpec, Registries, RhioNode, publish_toml, subscribe_toml};
use futures::StreamExt;
use serde_json::{Value, json};

struct Settings {
    quick: bool,
    /// `--only <scenario>` (import, replication, messages, client, mirror, federation, capped,
    /// scale): run just that one (and the limits).
    only: Option<String>,
    runs: usize,
    burst: usize,
    latency_secs: u64,
    json: Option<String>,
    /// `--write-doc FILE`: replace the results table of FILE (BENCHMARKS.md) with this run's.
    doc: Option<String>,
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let doc = args
        .iter()
        .position(|a| a == "--write-doc")
        .and_then(|i| args.get(i + 1).cloned());
    Settings {
        quick,
        only,
        runs: if quick { 1 } else { 3 },
        burst: if quick { 3_000 } else { 20_000 },
        latency_secs: if quick { 3 } else { 20 },
        json,
        doc,
    }
}

impl Settings {
    fn wants(&self, scenario: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == scenario)
    }
}

/// Runs that lost, duplicated or timed out. Any entry makes the bench exit with an error after
/// the table, and the rows measured with it say FAILED: a lossy run must never pass for a
/// figure.
static FAILURES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn fail(what: String) {
    eprintln!("bench: FAILED: {what}");
    FAILURES.lock().unwrap().push(what);
}

fn failure_count() -> usize {
    FAILURES.lock().unwrap().len()
}

/// The goal of a row (from the issues that set them), by scenario and the start of its measure.
fn goal(scenario: &str, measure: &str) -> &'static str {
    match (scenario, measure) {
        ("import", _) => ">= 0.9x",
        ("replication", m) if m.contains("dataset A -> B, verified") => ">= 1.0x",
        ("replication", m) if m.contains("links capped") => ">= 1.3x",
        // Worse than linear: the time per MiB grows with the file or with the row groups.
        ("scale", m) if m.starts_with("replication time") => "<= 1.25x",
        ("scale", m) if m.starts_with("peak RSS") => "<= 128 MiB",
        ("replication", m) if m.starts_with("appended version") => "<= 1.05",
        ("messages", m) if m.starts_with("sustained") => ">= 10,000 msg/s",
        ("messages", m) if m.starts_with("latency p50 at 500 msg/s") && !m.contains("during") => {
            "<= 5 ms"
        }
        ("messages", m) if m.starts_with("latency p99 at 500 msg/s") && !m.contains("during") => {
            "<= 5 ms"
        }
        // The reference rhio's figures on this kind of machine (no signing, no durable log).
        ("messages", m) if m.starts_with("latency p50 at 20 msg/s") => "<= 1.8 ms",
        ("messages", m) if m.starts_with("latency p99 at 20 msg/s") => "<= 3.6 ms",
        ("mirror", _) => ">= 1.0x",
        ("federation", m) if m.contains("body transmissions per operation and node") => "<= 2",
        ("client", m) if m.starts_with("fetch") => ">= 0.9x",
        ("memory", _) => "<= 128 MiB",
        _ => "",
    }
}

/// Whether a row meets its goal: goals in `x` compare the ratio column, others the figure.
/// `None` when the row has no goal or a figure is not a number (a failed run).
fn goal_met(row: &(String, String, String, String, String)) -> Option<bool> {
    let goal = goal(&row.0, &row.1);
    let number = |text: &str| -> Option<f64> {
        let digits: String = text
            .trim()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
            .filter(|c| *c != ',')
            .collect();
        digits.parse().ok().filter(|v: &f64| v.is_finite())
    };
    let (at_least, threshold) = match goal.split_once(' ')? {
        (">=", rest) => (true, rest),
        ("<=", rest) => (false, rest),
        _ => return None,
    };
    let figure = if threshold.ends_with('x') {
        &row.4
    } else {
        &row.2
    };
    let (value, limit) = (number(figure)?, number(threshold)?);
    Some(if at_least {
        value >= limit
    } else {
        value <= limit
    })
}

/// The individual runs of the interleaved scenarios, as one line.
fn runs_line(results: &serde_json::Map<String, Value>) -> String {
    let mut parts = Vec::new();
    for (key, label, unit) in [
        ("import_runs", "import rhio", "MiB/s"),
        ("import_baseline_runs", "import baseline", "MiB/s"),
        ("replication_runs", "replication rhio", "MiB/s"),
        ("replication_rclone_runs", "rclone", "MiB/s"),
        ("replication_sdk_runs", "SDK copy", "MiB/s"),
        ("messages_runs", "sustained messages rhio", "msg/s"),
        ("bridge_runs", "bridge", "msg/s"),
        ("mirror_runs", "registry push rhio", "MiB/s"),
        ("mirror_oras_runs", "oras push", "MiB/s"),
        ("fetch_runs", "fetch rhio", "MiB/s"),
        ("fetch_boto3_runs", "boto3 download", "MiB/s"),
    ] {
        if let Some(runs) = results.get(key).and_then(Value::as_array) {
            let runs: Vec<String> = runs
                .iter()
                .map(|v| v.as_f64().map_or("failed".into(), |v| format!("{v:.1}")))
                .collect();
            parts.push(format!("{label} {} {unit}", runs.join(" / ")));
        }
    }
    format!("Individual runs: {}.", parts.join("; "))
}

/// The results table as Markdown, with the goal of each row.
fn markdown_table(rows: &[(String, String, String, String, String)]) -> String {
    let mut table = String::from(
        "| scenario | measure | rhio | baseline | ratio | goal |\n|---|---|---|---|---|---|\n",
    );
    for (scenario, measure, value, baseline, ratio) in rows {
        table.push_str(&format!(
            "| {scenario} | {measure} | {value} | {baseline} | {ratio} | {} |\n",
            goal(scenario, measure)
        ));
    }
    table
}

/// Replaces what stands between the bench markers of `path` with this run's table, so no
/// figure in BENCHMARKS.md is typed by hand.
fn write_doc(path: &str, header: &str, table: &str) {
    const START: &str = "<!-- bench:results:start -->";
    const END: &str = "<!-- bench:results:end -->";
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {path}: {err}"));
    let (Some(start), Some(end)) = (text.find(START), text.find(END)) else {
        panic!("{path} has no {START} ... {END} section");
    };
    let updated = format!(
        "{}{START}\n{header}\n\n{table}{}",
        &text[..start],
        &text[end..]
    );
    std::fs::write(path, updated).unwrap_or_else(|err| panic!("write {path}: {err}"));
    println!("results table written to {path}");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return f64::NAN;
    }
    values[values.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Peak resident set size of a process in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) a process used so far.
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(f64::NAN)
}

// ------------------------------------------------------------------------------------- limits

fn blake3_limits(size: usize) -> (f64, f64) {
    let data = vec![0x5au8; size];
    let gib = size as f64 / (1u64 << 30) as f64;
    let one = median(
        (0..3)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(blake3::hash(&data));
                gib / start.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = size.div_ceil(threads);
    let all = median(
        (0..3)
            .map(|_| {
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for part in data.chunks(chunk) {
                        scope.spawn(move || std::hint::black_box(blake3::hash(part)));
                    }
                });
                gib / start.elapsed().as_secs_f64()
            })
            .collect(),
    );
    (one, all)
}

/// bao outboard (16 KiB chunk groups, post order) computation speed on one core, GiB/s.
fn outboard_limit(size: usize) -> f64 {
    let data = vec![0x42u8; size];
    let gib = size as f64 / (1u64 << 30) as f64;
    median(
        (0..3)
            .map(|_| {
                let tree = bao_tree::BaoTree::new(size as u64, rhio::blobs::BAO_BLOCK_SIZE);
                let mut outboard = Vec::new();
                let start = Instant::now();
                bao_tree::io::sync::outboard_post_order(&data[..], tree, &mut outboard).unwrap();
                gib / start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

#[derive(Debug, Clone)]
struct Sink;

impl iroh::protocol::ProtocolHandler for Sink {
    async fn accept(
        &self,
        connection: iroh::endpoint::Connection,
    ) -> Result<(), iroh::protocol::AcceptError> {
        let mut recv = connection.accept_uni().await?;
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(Some(_)) = recv.read(&mut buf).await {}
        let mut send = connection.open_uni().await?;
        send.write_all(b"done")
            .await
            .map_err(iroh::protocol::AcceptError::from_err)?;
        send.finish()?;
        connection.closed().await;
        Ok(())
    }
}

async fn quic_limit(bytes: usize) -> f64 {
    use p2panda_net::iroh_endpoint::IrohConfig;
    let spawn = |key: p2panda_core::SigningKey| async move {
        let book = p2panda_net::AddressBook::builder().spawn().await.unwrap();
        let endpoint = p2panda_net::Endpoint::builder(book.clone())
            .network_id([7; 32])
            .signing_key(key)
            .config(IrohConfig {
                bind_ip_v4: std::net::Ipv4Addr::LOCALHOST,
                bind_port_v4: 0,
                bind_ip_v6: std::net::Ipv6Addr::LOCALHOST,
                bind_port_v6: 0,
            })
            .spawn()
            .await
            .unwrap();
        (endpoint, book)
    };
    let server_key = p2panda_core::SigningKey::generate();
    let (server, _) = spawn(server_key.clone()).await;
    server.accept(b"bench/sink", Sink).await.unwrap();
    let addr = server.endpoint().await.unwrap().addr();
    let (client, client_book) = spawn(p2panda_core::SigningKey::generate()).await;
    let mut info = p2panda_net::addrs::NodeInfo::new(server_key.verifying_key());
    info.transports = Some(p2panda_net::addrs::TransportInfo::Trusted(
        p2panda_net::addrs::TrustedTransportInfo::from(addr),
    ));
    client_book.insert_node_info(info).await.unwrap();
    let connection = client
        .connect(server_key.verifying_key(), b"bench/sink")
        .await
        .unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    let mut send = connection.open_uni().await.unwrap();
    let mut sent = 0;
    while sent < bytes {
        send.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    send.finish().unwrap();
    let mut done = connection.accept_uni().await.unwrap();
    let _ = done.read_to_end(16).await.unwrap();
    let mib_s = sent as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    connection.close(0u32.into(), b"");
    mib_s
}

async fn s3_limits(cluster: &common::Cluster, bytes: usize) -> (f64, f64) {
    let client = common::s3_client(cluster);
    let data = vec![0x3cu8; bytes];
    let mib = bytes as f64 / (1 << 20) as f64;
    let start = Instant::now();
    client
        .put_object()
        .bucket(&cluster.s3_bucket)
        .key("bench/object")
        .body(data.into())
        .send()
        .await
        .unwrap();
    let put = mib / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let object = client
        .get_object()
        .bucket(&cluster.s3_bucket)
        .key("bench/object")
        .send()
        .await
        .unwrap();
    let body = object.body.collect().await.unwrap().into_bytes();
    assert_eq!(body.len(), bytes);
    let get = mib / start.elapsed().as_secs_f64();
    (put, get)
}

// -------------------------------------------------------------------------------- replication

/// Waits until B announced `version` of `dataset`; returns the announcement.
async fn announced(clusters: &Clusters, dataset: &str, version: u64) -> Value {
    announced_at(&clusters.env.clusters[1].nats_url, dataset, version).await
}

/// Waits until the cluster of `nats_url` announced `version` of `dataset`; returns the
/// announcement.
async fn announced_at(nats_url: &str, dataset: &str, version: u64) -> Value {
    let js = jetstream::new(async_nats::connect(nats_url).await.unwrap());
    let subject = format!("datasets.{dataset}");
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        if let Ok(stream) = js.get_stream("DATASETS").await
            && let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await
        {
            let summary: Value = serde_json::from_slice(&message.payload).unwrap();
            if summary["version"].as_u64() >= Some(version) {
                return summary;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{subject} v{version} never announced at {nats_url}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Imports `path` into A as `dataset` and times until B announced it (its S3 holds the verified
/// copy). Returns MiB/s.
async fn replicate_rhio(clusters: &Clusters, path: &std::path::Path, dataset: &str) -> f64 {
    let answer = common::rhio_import_ok(&clusters.env.clusters[0].nats_url, path, dataset).await;
    // Replication starts when B receives the manifest, right after the import's reply.
    let start = Instant::now();
    let summary = announced(clusters, dataset, 0).await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(summary["file_hash"], answer["file_hash"]);
    answer["bytes"].as_u64().unwrap() as f64 / (1 << 20) as f64 / secs
}

/// Imports `path` into A as dataset `busy` and, once B starts replicating it, measures message
/// latency at 500 msg/s for `secs` seconds; returns the sorted latencies (ms).
async fn latency_while_replicating(
    clusters: &Clusters,
    path: &std::path::Path,
    secs: u64,
) -> Vec<f64> {
    common::rhio_import_ok(&clusters.env.clusters[0].nats_url, path, "busy").await;
    let (latencies, _) = tokio::join!(
        latency(clusters, Path::Rhio, 500, secs, 100),
        announced(clusters, "busy", 0)
    );
    let transfers = common::metric(
        &clusters.nodes[1],
        "rhio_replication_versions_total{outcome=\"done\"}",
    );
    assert!(transfers >= 1.0, "the busy dataset was replicated");
    latencies
}

/// The same latency probe while rclone copies the replicated object A -> B again: what any bulk
/// copy through these shared cores and disk does to message latency, measured the same way.
async fn latency_while_rclone(clusters: &Clusters, secs: u64, len: u64) -> Vec<f64> {
    let (env_a, env_b) = (
        clusters.env.clusters[0].clone(),
        clusters.env.clusters[1].clone(),
    );
    let copy = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        // Repeat until the probe is over, so the whole window sees a copy running.
        let mut round = 0;
        while start.elapsed() < Duration::from_secs(secs) {
            rclone(
                &env_a,
                &env_b,
                "datasets/busy/v0.parquet",
                &format!("baseline/busy-{round}.parquet"),
                len,
            );
            round += 1;
        }
    });
    let latencies = latency(clusters, Path::Rhio, 500, secs, 101).await;
    copy.await.unwrap();
    latencies
}

/// `rclone copyto` of `key` in one cluster's S3 to `target` in another's (rclone streams through
/// this host). Returns MiB/s.
fn rclone(from: &common::Cluster, to: &common::Cluster, key: &str, target: &str, len: u64) -> f64 {
    rclone_in(None, from, to, key, target, len)
}

/// [`rclone`] run inside network namespace `netns` when given.
fn rclone_in(
    netns: Option<&str>,
    from: &common::Cluster,
    to: &common::Cluster,
    key: &str,
    target: &str,
    len: u64,
) -> f64 {
    let mut command = match netns {
        Some(name) => {
            let mut command = std::process::Command::new("ip");
            command.args(["netns", "exec", name, "rclone"]);
            command
        }
        None => std::process::Command::new("rclone"),
    };
    // rclone's AWS SDK cannot use a custom CA bundle with its HTTP transport; the local S3
    // servers speak plain HTTP anyway.
    command.env_remove("AWS_CA_BUNDLE");
    for (remote, cluster) in [("A", from), ("B", to)] {
        for (name, value) in [
            ("TYPE", "s3"),
            ("PROVIDER", "Other"),
            ("ENDPOINT", cluster.s3_endpoint.as_str()),
            ("ACCESS_KEY_ID", cluster.s3_access_key.as_str()),
            ("SECRET_ACCESS_KEY", cluster.s3_secret_key.as_str()),
            ("REGION", "us-east-1"),
        ] {
            command.env(format!("RCLONE_CONFIG_{remote}_{name}"), value);
        }
    }
    let bucket = &from.s3_bucket;
    let start = Instant::now();
    let output = command
        .args([
            "copyto",
            &format!("A:{bucket}/{key}"),
            &format!("B:{bucket}/{target}"),
            "--s3-chunk-size",
            &format!("{REPLICATION_PART_MIB}M"),
            "--s3-upload-concurrency",
            &REPLICATION_CONCURRENCY.to_string(),
            "--s3-no-check-bucket",
        ])
        .output()
        .expect("rclone runs (./dev/bench installs Debian's rclone)");
    let secs = start.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "rclone: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    len as f64 / (1 << 20) as f64 / secs
}

/// A streaming copy with aws-sdk-s3: GET from A piped into a multipart upload to B, same part
/// size and parts in flight as rhio. Returns MiB/s.
async fn replicate_sdk(
    from: &common::Cluster,
    to: &common::Cluster,
    key: &str,
    target: &str,
) -> f64 {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let bucket = from.s3_bucket.clone();
    let from = common::s3_client(from);
    let to = common::s3_client(to);
    let part_size = (REPLICATION_PART_MIB << 20) as usize;
    let start = Instant::now();
    let mut body = from
        .get_object()
        .bucket(&bucket)
        .key(key)
        .send()
        .await
        .unwrap()
        .body;
    let upload = to
        .create_multipart_upload()
        .bucket(&bucket)
        .key(target)
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap().to_string();
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut parts = Vec::new();
    let mut buffer = Vec::with_capacity(part_size);
    let mut number = 1;
    let mut total = 0u64;
    loop {
        let chunk = body.try_next().await.unwrap();
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            total += chunk.len() as u64;
            buffer.extend_from_slice(&chunk);
        }
        if buffer.len() >= part_size || (done && !buffer.is_empty()) {
            let data = std::mem::replace(&mut buffer, Vec::with_capacity(part_size));
            let (to, bucket, target, upload_id) = (
                to.clone(),
                bucket.clone(),
                target.to_string(),
                upload_id.clone(),
            );
            in_flight.push_back(tokio::spawn(async move {
                let part = to
                    .upload_part()
                    .bucket(bucket)
                    .key(target)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(data.into())
                    .send()
                    .await
                    .unwrap();
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(String::from))
                    .build()
            }));
            number += 1;
            while in_flight.len() >= REPLICATION_CONCURRENCY {
                parts.push(in_flight.next().await.unwrap().unwrap());
            }
        }
        if done {
            break;
        }
    }
    while let Some(part) = in_flight.next().await {
        parts.push(part.unwrap());
    }
    to.complete_multipart_upload()
        .bucket(&bucket)
        .key(target)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
    total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// Part size and parts in flight of rhio's replication (its defaults) and of both baselines.
const REPLICATION_PART_MIB: u64 = 8;
const REPLICATION_CONCURRENCY: usize = 4;

/// Replicates an appended version and returns (bytes moved, bytes of new blobs).
async fn delta(clusters: &Clusters, mib: u64, extra_mib: u64) -> (f64, u64) {
    let (v1, v2) = (
        clusters.data.join("delta-v1.parquet"),
        clusters.data.join("delta-v2.parquet"),
    );
    common::make_parquet(&[
        "appended",
        v1.to_str().unwrap(),
        v2.to_str().unwrap(),
        &mib.to_string(),
        &extra_mib.to_string(),
        "4000",
    ]);
    let mut manifests = Vec::new();
    let mut fetched = Vec::new();
    for (version, file) in [&v1, &v2].into_iter().enumerate() {
        common::rhio_import_ok(&clusters.env.clusters[0].nats_url, file, "delta").await;
        announced(clusters, "delta", version as u64).await;
        fetched.push(common::metric(
            &clusters.nodes[1],
            "rhio_replication_bytes_fetched_total",
        ));
        let bytes = common::s3_object(
            &clusters.env.clusters[0],
            &format!(".rhio/manifests/delta/v{version}.cbor"),
        )
        .await;
        manifests.push(rhio_core::manifest::DatasetManifest::decode(&bytes).unwrap());
    }
    let new_bytes = manifests[1]
        .blobs
        .iter()
        .filter(|blob| !manifests[0].blobs.iter().any(|old| old.hash == blob.hash))
        .map(|blob| blob.length)
        .sum();
    let _ = std::fs::remove_file(&v1);
    let _ = std::fs::remove_file(&v2);
    (fetched[1] - fetched[0], new_bytes)
}

// ------------------------------------------------------------------------------------- mirror

/// One cluster with a node (whose mirror pushes to the environment's registry, project `bench`,
/// when there is one).
struct SingleNode {
    env: LocalEnv,
    _dir: tempfile::TempDir,
    node: RhioNode,
    data: std::path::PathBuf,
}

fn mirror_setup() -> SingleNode {
    single_node(true)
}

fn single_node(mirror: bool) -> SingleNode {
    let env = if mirror {
        LocalEnv::with_registry(1, Registries::Anonymous)
    } else {
        LocalEnv::up(1)
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], &dir.path().join("node"));
    spec.import_roots = vec![data.clone()];
    spec.part_size_mib = IMPORT_PART_MIB;
    if mirror {
        spec.extra = format!(
            "\n[mirror]\nenabled = true\nregistry = \"{}\"\nproject = \"bench\"\n",
            env.registry.as_deref().expect("a registry")
        );
    }
    let node = RhioNode::start(spec);
    node.wait_healthy();
    SingleNode {
        env,
        _dir: dir,
        node,
        data,
    }
}

fn mirror_pushed(node: &RhioNode) -> u64 {
    node.health()
        .and_then(|(_, health)| health["mirror"]["pushed"].as_u64())
        .unwrap_or(0)
}

/// Imports `path` as `dataset`, then times its push to the registry: from the import's answer
/// until the mirror recorded the version (polled every 10 ms). Checks that the registry has the
/// version with the file's BLAKE3; returns MiB/s, or `None` after a failure.
async fn push_rhio(bench: &SingleNode, path: &std::path::Path, dataset: &str) -> Option<f64> {
    let before = mirror_pushed(&bench.node);
    let client = rhio_client::Client::connect(&bench.env.clusters[0].nats_url)
        .await
        .unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    let answer = client
        .import(
            path.to_str().unwrap(),
            Some(dataset),
            None,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let start = Instant::now();
    while mirror_pushed(&bench.node) <= before {
        if start.elapsed() > Duration::from_secs(900) {
            fail(format!("push of {dataset} not done after 900 s"));
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let registry = rhio::mirror::registry::Registry::new(
        bench.env.registry.as_deref().unwrap(),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    let manifest = registry
        .get_manifest(&format!("bench/{dataset}"), "v0")
        .await
        .ok()
        .flatten()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    let pushed_hash = manifest
        .as_ref()
        .map(|m| m["annotations"]["io.rhio.file.blake3"].clone());
    if pushed_hash != Some(answer["file_hash"].clone()) {
        fail(format!(
            "bench/{dataset}:v0 in the registry is not the imported file: {manifest:?}"
        ));
        return None;
    }
    Some(len as f64 / (1 << 20) as f64 / secs)
}

/// The baseline: PyPI `oras` pushing the same file to the same registry, timed inside Python
/// (its digest pass and upload; interpreter start-up not counted). MiB/s, `None` on failure.
fn push_oras(bench: &SingleNode, path: &std::path::Path, repository: &str) -> Option<f64> {
    let registry = rhio::mirror::registry_host(bench.env.registry.as_deref().unwrap());
    let script = r#"
import os, sys, time, oras.client
path, target = sys.argv[1], sys.argv[2]
os.chdir(os.path.dirname(path))
client = oras.client.OrasClient(insecure=True)
start = time.monotonic()
client.push(files=[os.path.basename(path)], target=target)
print(time.monotonic() - start)
"#;
    let output = std::process::Command::new(common::venv_python())
        .args([
            "-c",
            script,
            path.to_str().unwrap(),
            &format!("{registry}/{repository}:v0"),
        ])
        .output()
        .unwrap();
    let secs: Option<f64> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok());
    match secs {
        Some(secs) if output.status.success() => {
            let len = std::fs::metadata(path).unwrap().len();
            Some(len as f64 / (1 << 20) as f64 / secs)
        }
        _ => {
            fail(format!(
                "oras push to {repository}: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
            None
        }
    }
}

// ------------------------------------------------------------------------------------- client

/// Runs a Python snippet with the venv's Python; its last stdout line parsed as numbers
/// (seconds), or `None` after a failure (recorded).
fn python_secs(what: &str, script: &str, args: &[&str]) -> Option<Vec<f64>> {
    let output = std::process::Command::new(common::venv_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let secs: Option<Vec<f64>> = line.split_whitespace().map(|v| v.parse().ok()).collect();
    match secs {
        Some(secs) if output.status.success() && !secs.is_empty() => Some(secs),
        _ => {
            fail(format!(
                "{what}: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
            None
        }
    }
}

/// `fetch` through the Rust library (verified: announcement signature, manifest, BLAKE3) of
/// `dataset` into `dest`; MiB/s, `None` after a failure.
async fn fetch_rhio(bench: &SingleNode, dataset: &str, dest: &std::path::Path) -> Option<f64> {
    let cluster = &bench.env.clusters[0];
    let client = rhio_client::Client::connect(&cluster.nats_url)
        .await
        .unwrap();
    let s3 = rhio_client::S3Options {
        endpoint: cluster.s3_endpoint.clone(),
        bucket: cluster.s3_bucket.clone(),
        region: None,
        access_key: Some(cluster.s3_access_key.clone()),
        secret_key: Some(cluster.s3_secret_key.clone()),
    };
    let start = Instant::now();
    match client
        .fetch(
            &s3,
            rhio_client::DEFAULT_DATASET_STREAM,
            dataset,
            None,
            None,
            dest,
        )
        .await
    {
        Ok(fetched) => {
            let secs = start.elapsed().as_secs_f64();
            Some(fetched.manifest.file_size as f64 / (1 << 20) as f64 / secs)
        }
        Err(err) => {
            fail(format!("fetch of {dataset}: {err}"));
            None
        }
    }
}

const BOTO3_DOWNLOAD: &str = r#"
import sys, time, boto3
endpoint, key_id, secret, bucket, key, dest = sys.argv[1:7]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id,
                  aws_secret_access_key=secret, region_name="us-east-1")
start = time.monotonic()
s3.download_file(bucket, key, dest)
print(time.monotonic() - start)
"#;

const READ_DATASET: &str = r#"
import sys, time, pyarrow.parquet as pq, rhio_client
nats, endpoint, key_id, secret, dataset, local = sys.argv[1:7]
client = rhio_client.Client(nats, s3_endpoint=endpoint, s3_access_key=key_id, s3_secret_key=secret)
start = time.monotonic()
table = client.read_dataset(dataset)
rhio = time.monotonic() - start
start = time.monotonic()
local_table = pq.read_table(local, memory_map=False)
plain = time.monotonic() - start
assert table.num_rows == local_table.num_rows
print(rhio, plain)
"#;

// ----------------------------------------------------------------------------------- messages

/// A message path from cluster A's JetStream to cluster B's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Rhio,
    Bridge,
}

struct Clusters {
    env: LocalEnv,
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<RhioNode>,
    /// Import root of node A.
    data: std::path::PathBuf,
}

/// Two clusters with a rhio node each: A publishes `bench.rhio.>` (stream RHIO_OUT), B subscribes
/// to it (stream RHIO_IN). The bridge path uses BRIDGE_OUT (`bench.bridge.>`) in A and BRIDGE_IN
/// in B.
async fn clusters() -> Clusters {
    let env = LocalEnv::up(2);
    let dirs = vec![tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let data = dirs[0].path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut a = NodeSpec::for_cluster(&env.clusters[0], &dirs[0].path().join("node"));
    let mut b = NodeSpec::for_cluster(&env.clusters[1], dirs[1].path());
    a.import_roots = vec![data.clone()];
    a.part_size_mib = IMPORT_PART_MIB;
    let key_a = a.public_key();
    a.known_nodes.push((b.public_key(), b.quic_port));
    b.known_nodes.push((key_a.clone(), a.quic_port));
    a.extra = publish_toml(&["bench.rhio.>"], "RHIO_OUT");
    // B replicates only the datasets of the replication scenario, not the import benchmark's.
    let replicated: Vec<String> = (0..3)
        .map(|round| format!("datasets.repl{round}"))
        .chain(["datasets.delta".to_string(), "datasets.busy".to_string()])
        .chain(scale::datasets())
        .collect();
    let replicated: Vec<&str> = replicated.iter().map(String::as_str).collect();
    b.extra = subscribe_toml(&key_a, &["bench.rhio.>"], "RHIO_IN")
        + &subscribe_toml(&key_a, &replicated, "DATASETS");
    let node_a = RhioNode::start(a);
    let node_b = RhioNode::start(b);
    node_a.wait_peers_connected(1);
    node_b.wait_peers_connected(1);
    for (cluster, stream, subject) in [
        (0, "BRIDGE_OUT", "bench.bridge.>"),
        (1, "BRIDGE_IN", "bench.bridge.>"),
    ] {
        let js = jetstream::new(
            async_nats::connect(&env.clusters[cluster].nats_url)
                .await
                .unwrap(),
        );
        js.create_stream(jetstream::stream::Config {
            name: stream.into(),
            subjects: vec![subject.into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    Clusters {
        env,
        _dirs: dirs,
        nodes: vec![node_a, node_b],
        data,
    }
}

// ------------------------------------------------------------------------------------- import

/// Part size and parts in flight, the same for rhio's import and the baseline upload.
const IMPORT_PART_MIB: u64 = 8;
const IMPORT_CONCURRENCY: usize = 4;

/// `rhio.import` of `path` as dataset `name`; returns MiB/s.
async fn import_rhio(clusters: &Clusters, path: &std::path::Path, name: &str) -> f64 {
    let client = rhio_client::Client::connect(&clusters.env.clusters[0].nats_url)
        .await
        .unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    let start = Instant::now();
    let answer = client
        .import(
            path.to_str().unwrap(),
            Some(name),
            None,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(answer["ok"], true, "{answer}");
    len as f64 / (1 << 20) as f64 / secs
}

/// The baseline: the same file uploaded with aws-sdk-s3 multipart, same part size and
/// concurrency, without hashing or partitioning. Returns MiB/s.
async fn import_baseline(clusters: &Clusters, path: &std::path::Path, key: &str) -> f64 {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    use tokio::io::AsyncReadExt;
    let s3 = common::s3_client(&clusters.env.clusters[0]);
    let bucket = clusters.env.clusters[0].s3_bucket.clone();
    let part_size = (IMPORT_PART_MIB << 20) as usize;
    let len = std::fs::metadata(path).unwrap().len();
    let start = Instant::now();
    let upload = s3
        .create_multipart_upload()
        .bucket(&bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap().to_string();
    let mut file = tokio::fs::File::open(path).await.unwrap();
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut parts = Vec::new();
    let mut number = 1;
    loop {
        let mut buf = vec![0u8; part_size];
        let mut filled = 0;
        while filled < part_size {
            let n = file.read(&mut buf[filled..]).await.unwrap();
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        if in_flight.len() >= IMPORT_CONCURRENCY {
            parts.push(in_flight.next().await.unwrap());
        }
        let (s3, bucket, key, upload_id) = (
            s3.clone(),
            bucket.clone(),
            key.to_string(),
            upload_id.clone(),
        );
        let part_number = number;
        number += 1;
        in_flight.push_back(async move {
            let done = s3
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(part_number)
                .body(buf.into())
                .send()
                .await
                .unwrap();
            CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(done.e_tag().map(str::to_string))
                .build()
        });
    }
    while let Some(part) = in_flight.next().await {
        parts.push(part);
    }
    s3.complete_multipart_upload()
        .bucket(&bucket)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
    len as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// The baseline: consume A's stream with a durable pull consumer and republish into B's
/// JetStream with the same batch size and ack discipline as rhio, without signing.
async fn bridge(a_url: String, b_url: String, stop: tokio_util::sync::CancellationToken) {
    let js_a = jetstream::new(async_nats::connect(&a_url).await.unwrap());
    let js_b = jetstream::new(async_nats::connect(&b_url).await.unwrap());
    let stream = js_a.get_stream("BRIDGE_OUT").await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "bridge",
            jetstream::consumer::pull::Config {
                durable_name: Some("bridge".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let messages = consumer
        .stream()
        .max_messages_per_batch(512)
        .messages()
        .await
        .unwrap();
    let mut batches = messages.ready_chunks(512);
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            batch = batches.next() => batch,
        };
        let Some(batch) = batch else { return };
        let messages: Vec<_> = batch.into_iter().filter_map(Result::ok).collect();
        let mut acks = Vec::with_capacity(messages.len());
        for message in &messages {
            let info = message.info().unwrap();
            let mut headers = message.headers.clone().unwrap_or_default();
            headers.insert(
                "Nats-Msg-Id",
                format!("bridge-{}", info.stream_sequence).as_str(),
            );
            acks.push(
                js_b.publish_with_headers(
                    message.subject.clone(),
                    headers,
                    message.payload.clone(),
                )
                .await
                .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
        for message in &messages {
            message.ack().await.unwrap();
        }
    }
}

fn subject_prefix(path: Path) -> &'static str {
    match path {
        Path::Rhio => "bench.rhio",
        Path::Bridge => "bench.bridge",
    }
}

fn in_stream(path: Path) -> &'static str {
    match path {
        Path::Rhio => "RHIO_IN",
        Path::Bridge => "BRIDGE_IN",
    }
}

async fn stream_count(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

/// Publishes `count` 1 KiB messages into A as fast as JetStream takes them and measures until all
/// are in B's stream. Returns msg/s, or NaN when a message was lost.
async fn burst(clusters: &Clusters, path: Path, count: usize, round: usize) -> f64 {
    let a = jetstream::new(
        async_nats::connect(&clusters.env.clusters[0].nats_url)
            .await
            .unwrap(),
    );
    let b = jetstream::new(
        async_nats::connect(&clusters.env.clusters[1].nats_url)
            .await
            .unwrap(),
    );
    let before = stream_count(&b, in_stream(path)).await;
    let subject = format!("{}.burst{round}", subject_prefix(path));
    let payload = bytes::Bytes::from(vec![0x61u8; 1024]);
    let start = Instant::now();
    let mut acks = Vec::new();
    for i in 0..count {
        let mut headers = HeaderMap::new();
        headers.insert("Seq", i.to_string().as_str());
        acks.push(
            a.publish_with_headers(subject.clone(), headers, payload.clone())
                .await
                .unwrap(),
        );
        if acks.len() >= 512 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let target = before + count as u64;
    loop {
        let now = stream_count(&b, in_stream(path)).await;
        if now >= target {
            let elapsed = start.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Exactly `count` more: nothing lost, nothing duplicated.
            let settled = stream_count(&b, in_stream(path)).await;
            if settled != target {
                fail(format!(
                    "burst {path:?} round {round}: {} messages arrived for {count} sent",
                    settled - before
                ));
                return f64::NAN;
            }
            return count as f64 / elapsed;
        }
        if Instant::now() > deadline {
            fail(format!(
                "burst {path:?} round {round}: {} of {count} messages arrived in 300 s",
                now - before
            ));
            return f64::NAN;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Publishes at `rate` msg/s for `secs` and measures publish-to-delivery latency in B (core
/// subscription on B's NATS, which sees what JetStream stores). Returns sorted latencies in ms.
async fn latency(clusters: &Clusters, path: Path, rate: u64, secs: u64, round: usize) -> Vec<f64> {
    let subject = format!("{}.latency{round}", subject_prefix(path));
    timed_messages(
        &clusters.env.clusters[0].nats_url,
        &clusters.env.clusters[1].nats_url,
        &subject,
        1,
        rate,
        secs,
        &format!("latency {path:?} round {round}"),
    )
    .await
}

/// Publishes `rate` messages per second for `secs` into JetStream at `from` and returns, sorted,
/// the milliseconds each took to reach a core NATS subscriber at `to` (a loss is a failure).
/// The messages go round-robin to `subjects` subjects `<subject>.<i>` (one signed log each).
async fn timed_messages(
    from: &str,
    to: &str,
    subject: &str,
    subjects: u64,
    rate: u64,
    secs: u64,
    what: &str,
) -> Vec<f64> {
    let a = jetstream::new(async_nats::connect(from).await.unwrap());
    let b = async_nats::connect(to).await.unwrap();
    let subject = subject.to_string();
    let mut subscriber = b.subscribe(format!("{subject}.>")).await.unwrap();
    b.flush().await.unwrap();
    let total = rate * secs;
    let collector = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total as usize);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs + 30);
        while (latencies.len() as u64) < total {
            let message = tokio::select! {
                message = subscriber.next() => message,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            let Some(message) = message else { break };
            let sent: u64 = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Sent-Micros"))
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            latencies.push((now_micros().saturating_sub(sent)) as f64 / 1000.0);
        }
        latencies
    });
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let payload = bytes::Bytes::from(vec![0x62u8; 1024]);
    let mut acks = Vec::new();
    for i in 0..total {
        ticker.tick().await;
        let mut headers = HeaderMap::new();
        headers.insert("Sent-Micros", now_micros().to_string().as_str());
        acks.push(
            a.publish_with_headers(
                format!("{subject}.{}", i % subjects),
                headers,
                payload.clone(),
            )
            .await
            .unwrap(),
        );
        if acks.len() >= 64 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let mut latencies = collector.await.unwrap();
    if (latencies.len() as u64) < total {
        // Percentiles over what arrived would hide the loss.
        fail(format!(
            "{what}: only {} of {total} messages arrived",
            latencies.len()
        ));
    }
    latencies.sort_by(|x, y| x.total_cmp(y));
    latencies
}

// -------------------------------------------------------------------------------------- main

fn main() {
    let settings = settings();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<(String, String, String, String, String)> = Vec::new();
    let mut results = serde_json::Map::new();

    // limits
    let (b1, ball) = blake3_limits(if settings.quick { 256 << 20 } else { 1 << 30 });
    rows.push((
        "limits".into(),
        "BLAKE3, one core".into(),
        format!("{b1:.2} GiB/s"),
        "-".into(),
        "-".into(),
    ));
    rows.push((
        "limits".into(),
        "BLAKE3, all cores".into(),
        format!("{ball:.2} GiB/s"),
        "-".into(),
        "-".into(),
    ));
    results.insert("blake3_one_core_gib_s".into(), json!(b1));
    results.insert("blake3_all_cores_gib_s".into(), json!(ball));
    let quic = runtime.block_on(quic_limit(if settings.quick {
        128 << 20
    } else {
        512 << 20
    }));
    rows.push((
        "limits".into(),
        "QUIC loopback (iroh)".into(),
        format!("{quic:.0} MiB/s"),
        "-".into(),
        "-".into(),
    ));
    results.insert("quic_loopback_mib_s".into(), json!(quic));
    let outboard = outboard_limit(if settings.quick { 256 << 20 } else { 1 << 30 });
    rows.push((
        "limits".into(),
        "bao outboard (16 KiB groups), one core".into(),
        format!("{outboard:.2} GiB/s"),
        "-".into(),
        "-".into(),
    ));
    results.insert("bao_outboard_gib_s".into(), json!(outboard));

    let clusters = runtime.block_on(clusters());
    let (put, get) = runtime.block_on(s3_limits(
        &clusters.env.clusters[0],
        if settings.quick { 64 << 20 } else { 256 << 20 },
    ));
    rows.push((
        "limits".into(),
        "S3 PUT (one request)".into(),
        format!("{put:.0} MiB/s"),
        "-".into(),
        "-".into(),
    ));
    rows.push((
        "limits".into(),
        "S3 GET (one request)".into(),
        format!("{get:.0} MiB/s"),
        "-".into(),
        "-".into(),
    ));
    results.insert("s3_put_mib_s".into(), json!(put));
    results.insert("s3_get_mib_s".into(), json!(get));

    if settings.wants("import") {
        // import: interleaved with the baseline upload of the same file.
        let import_mib = if settings.quick { 64 } else { 1024 };
        let import_file = clusters.data.join("bench.parquet");
        common::make_parquet(&[
            "sized",
            import_file.to_str().unwrap(),
            &import_mib.to_string(),
            // ~64 MiB row groups
            "65536",
        ]);
        let mut rhio_imports = Vec::new();
        let mut baseline_imports = Vec::new();
        for round in 0..settings.runs {
            rhio_imports.push(runtime.block_on(import_rhio(
                &clusters,
                &import_file,
                &format!("bench_{round}"),
            )));
            baseline_imports.push(runtime.block_on(import_baseline(
                &clusters,
                &import_file,
                &format!("bench/baseline-{round}.parquet"),
            )));
        }
        let rhio_import = median(rhio_imports.clone());
        let baseline_import = median(baseline_imports.clone());
        rows.push((
            "import".into(),
            format!("{import_mib} MiB Parquet -> S3 (8 MiB parts, 4 in flight)"),
            format!("{rhio_import:.0} MiB/s"),
            format!("{baseline_import:.0} MiB/s"),
            format!("{:.2}x", rhio_import / baseline_import),
        ));
        let rss_import = peak_rss_mib(clusters.nodes[0].pid());
        rows.push((
            "memory".into(),
            "peak RSS node a (after import)".into(),
            format!("{rss_import:.0} MiB"),
            "-".into(),
            "-".into(),
        ));
        results.insert("import_mib_s".into(), json!(rhio_import));
        results.insert("import_baseline_mib_s".into(), json!(baseline_import));
        results.insert("import_runs".into(), json!(rhio_imports));
        results.insert("import_baseline_runs".into(), json!(baseline_imports));
        results.insert("rss_node_a_after_import_mib".into(), json!(rss_import));
        let _ = std::fs::remove_file(&import_file);
    }
    let busy = settings.wants("messages").then(|| {
        // messages while a dataset replicates: one extra replication, not counted in the throughput
        // medians, with the latency probe running during its transfer.
        let busy_mib: u64 = if settings.quick { 64 } else { 1024 };
        let busy_file = clusters.data.join("busy.parquet");
        common::make_parquet(&[
            "sized",
            busy_file.to_str().unwrap(),
            &busy_mib.to_string(),
            "8192",
        ]);
        let busy_secs = if settings.quick { 2 } else { 8 };
        let busy_latency =
            runtime.block_on(latency_while_replicating(&clusters, &busy_file, busy_secs));
        let busy_len = std::fs::metadata(&busy_file).unwrap().len();
        let rclone_latency = runtime.block_on(latency_while_rclone(&clusters, busy_secs, busy_len));
        let _ = std::fs::remove_file(&busy_file);

        (busy_mib, busy_latency, rclone_latency)
    });
    if settings.wants("replication") {
        // replication: a fresh file per round (identical bytes would be found in B and not moved).
        let repl_mib: u64 = if settings.quick { 64 } else { 1024 };
        let (mut rhio_repl, mut rclone_repl, mut sdk_repl) = (Vec::new(), Vec::new(), Vec::new());
        let mut repl_cpu_b = Vec::new();
        for round in 0..settings.runs {
            let file = clusters.data.join(format!("repl{round}.parquet"));
            common::make_parquet(&[
                "sized",
                file.to_str().unwrap(),
                &repl_mib.to_string(),
                "8192",
            ]);
            let len = std::fs::metadata(&file).unwrap().len();
            let dataset = format!("repl{round}");
            let before: Vec<f64> = clusters
                .nodes
                .iter()
                .map(|n| cpu_seconds(n.pid()))
                .collect();
            rhio_repl.push(runtime.block_on(replicate_rhio(&clusters, &file, &dataset)));
            // CPU of both nodes during import + replication, minus what the import alone costs is
            // not separable here; B's share is replication only.
            repl_cpu_b.push(
                (cpu_seconds(clusters.nodes[1].pid()) - before[1])
                    / (len as f64 / (1u64 << 30) as f64),
            );
            let key = format!("datasets/{dataset}/v0.parquet");
            rclone_repl.push(rclone(
                &clusters.env.clusters[0],
                &clusters.env.clusters[1],
                &key,
                &format!("baseline/rclone-{round}.parquet"),
                len,
            ));
            sdk_repl.push(runtime.block_on(replicate_sdk(
                &clusters.env.clusters[0],
                &clusters.env.clusters[1],
                &key,
                &format!("baseline/sdk-{round}.parquet"),
            )));
            let _ = std::fs::remove_file(&file);
        }
        let (rhio_r, rclone_r, sdk_r) = (
            median(rhio_repl.clone()),
            median(rclone_repl.clone()),
            median(sdk_repl.clone()),
        );
        rows.push((
            "replication".into(),
            format!("{repl_mib} MiB dataset A -> B, verified (vs rclone copyto)"),
            format!("{rhio_r:.0} MiB/s"),
            format!("{rclone_r:.0} MiB/s"),
            format!("{:.2}x", rhio_r / rclone_r),
        ));
        rows.push((
            "replication".into(),
            format!("{repl_mib} MiB dataset A -> B, verified (vs aws-sdk-s3 streaming copy)"),
            format!("{rhio_r:.0} MiB/s"),
            format!("{sdk_r:.0} MiB/s"),
            format!("{:.2}x", rhio_r / sdk_r),
        ));
        let (moved, new_bytes) = runtime.block_on(delta(
            &clusters,
            if settings.quick { 32 } else { 256 },
            if settings.quick { 8 } else { 32 },
        ));
        let delta_ratio = moved / new_bytes as f64;
        rows.push((
            "replication".into(),
            format!(
                "appended version: bytes moved / bytes of new blobs ({:.1} MiB new)",
                new_bytes as f64 / (1 << 20) as f64
            ),
            format!("{delta_ratio:.4}"),
            "-".into(),
            "-".into(),
        ));
        let cpu_b = median(repl_cpu_b.clone());
        rows.push((
            "replication".into(),
            "CPU of node b per GiB replicated (fetch, verify, upload)".into(),
            format!("{cpu_b:.2} s"),
            "-".into(),
            "-".into(),
        ));
        results.insert("replication_cpu_node_b_s_per_gib".into(), json!(cpu_b));
        let rss_repl = peak_rss_mib(clusters.nodes[1].pid());
        rows.push((
            "memory".into(),
            "peak RSS node b (after replication)".into(),
            format!("{rss_repl:.0} MiB"),
            "-".into(),
            "-".into(),
        ));
        results.insert("replication_mib_s".into(), json!(rhio_r));
        results.insert("replication_rclone_mib_s".into(), json!(rclone_r));
        results.insert("replication_sdk_mib_s".into(), json!(sdk_r));
        results.insert("replication_runs".into(), json!(rhio_repl));
        results.insert("replication_rclone_runs".into(), json!(rclone_repl));
        results.insert("replication_sdk_runs".into(), json!(sdk_repl));
        results.insert("delta_ratio".into(), json!(delta_ratio));
        results.insert("delta_bytes_moved".into(), json!(moved));
        results.insert("delta_new_bytes".into(), json!(new_bytes));
        results.insert("rss_node_b_after_replication_mib".into(), json!(rss_repl));
    }
    if let Some((busy_mib, busy_latency, rclone_latency)) = busy {
        // messages: the bridge runs for the whole scenario, like a deployed bridge would.
        let stop = tokio_util::sync::CancellationToken::new();
        runtime.spawn(bridge(
            clusters.env.clusters[0].nats_url.clone(),
            clusters.env.clusters[1].nats_url.clone(),
            stop.clone(),
        ));
        let mut rhio_rates = Vec::new();
        let mut bridge_rates = Vec::new();
        let mut rhio_lat: Vec<Vec<f64>> = Vec::new();
        let mut bridge_lat: Vec<Vec<f64>> = Vec::new();
        let mut rhio_trickle: Vec<Vec<f64>> = Vec::new();
        let mut bridge_trickle: Vec<Vec<f64>> = Vec::new();
        let mut cpu_per_1000 = [Vec::new(), Vec::new()];
        let failures_before = failure_count();
        for round in 0..settings.runs {
            let before: Vec<f64> = clusters
                .nodes
                .iter()
                .map(|n| cpu_seconds(n.pid()))
                .collect();
            rhio_rates.push(runtime.block_on(burst(&clusters, Path::Rhio, settings.burst, round)));
            for (i, node) in clusters.nodes.iter().enumerate() {
                let used = cpu_seconds(node.pid()) - before[i];
                cpu_per_1000[i].push(used * 1000.0 / settings.burst as f64 * 1000.0);
            }
            bridge_rates.push(runtime.block_on(burst(
                &clusters,
                Path::Bridge,
                settings.burst,
                round,
            )));
            rhio_lat.push(runtime.block_on(latency(
                &clusters,
                Path::Rhio,
                500,
                settings.latency_secs,
                round,
            )));
            bridge_lat.push(runtime.block_on(latency(
                &clusters,
                Path::Bridge,
                500,
                settings.latency_secs,
                round,
            )));
            // A trickle: each message alone on the path (no batching to share costs).
            rhio_trickle.push(runtime.block_on(latency(
                &clusters,
                Path::Rhio,
                20,
                settings.latency_secs,
                round + 200,
            )));
            bridge_trickle.push(runtime.block_on(latency(
                &clusters,
                Path::Bridge,
                20,
                settings.latency_secs,
                round + 200,
            )));
        }
        stop.cancel();
        let rhio_rate = median(rhio_rates.clone());
        let bridge_rate = median(bridge_rates.clone());
        let lost = failure_count() - failures_before;
        rows.push((
            "messages".into(),
            if lost == 0 {
                format!("sustained 1 KiB, {} msgs, zero loss", settings.burst)
            } else {
                format!(
                    "sustained 1 KiB, {} msgs: FAILED, {lost} runs lost or duplicated messages",
                    settings.burst
                )
            },
            format!("{rhio_rate:.0} msg/s"),
            format!("{bridge_rate:.0} msg/s"),
            format!("{:.2}x", rhio_rate / bridge_rate),
        ));
        let p = |runs: &[Vec<f64>], q: f64| median(runs.iter().map(|r| percentile(r, q)).collect());
        for (label, q) in [("p50", 50.0), ("p99", 99.0)] {
            let r = p(&rhio_lat, q);
            for (rate, rhio_runs, bridge_runs, key) in [
                (500, &rhio_lat, &bridge_lat, "latency"),
                (20, &rhio_trickle, &bridge_trickle, "trickle_latency"),
            ] {
                let (rhio, bridge) = (p(rhio_runs, q), p(bridge_runs, q));
                rows.push((
                    "messages".into(),
                    format!("latency {label} at {rate} msg/s"),
                    format!("{rhio:.2} ms"),
                    format!("{bridge:.2} ms"),
                    format!("{:.2}x", rhio / bridge),
                ));
                results.insert(format!("{key}_{label}_ms"), json!(rhio));
                results.insert(format!("bridge_{key}_{label}_ms"), json!(bridge));
            }
            // The same probe while B replicated a dataset, against the idle figure of this run.
            let busy = percentile(&busy_latency, q);
            rows.push((
                "messages".into(),
                format!(
                    "latency {label} at 500 msg/s during a {busy_mib} MiB replication (vs idle)"
                ),
                format!("{busy:.2} ms"),
                format!("{r:.2} ms"),
                format!("{:.2}x", busy / r),
            ));
            results.insert(
                format!("latency_during_replication_{label}_ms"),
                json!(busy),
            );
            let copying = percentile(&rclone_latency, q);
            rows.push((
                "messages".into(),
                format!("latency {label} at 500 msg/s during rclone copies A -> B (vs idle)"),
                format!("{copying:.2} ms"),
                format!("{r:.2} ms"),
                format!("{:.2}x", copying / r),
            ));
            results.insert(format!("latency_during_rclone_{label}_ms"), json!(copying));
        }
        results.insert("messages_per_s".into(), json!(rhio_rate));
        results.insert("bridge_messages_per_s".into(), json!(bridge_rate));
        results.insert("messages_runs".into(), json!(rhio_rates));
        results.insert("bridge_runs".into(), json!(bridge_rates));
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let cpu = median(cpu_per_1000[i].clone());
            rows.push((
                "messages".into(),
                format!("CPU of node {name} per 1,000 routed messages"),
                format!("{cpu:.0} ms"),
                "-".into(),
                "-".into(),
            ));
            results.insert(format!("cpu_node_{name}_ms_per_1000"), json!(cpu));
        }
        for (node, name) in clusters.nodes.iter().zip(["a", "b"]) {
            let rss = peak_rss_mib(node.pid());
            rows.push((
                "memory".into(),
                format!("peak RSS node {name} (messages)"),
                format!("{rss:.0} MiB"),
                "-".into(),
                "-".into(),
            ));
            results.insert(format!("rss_node_{name}_mib"), json!(rss));
        }
    }
    if settings.wants("client") {
        // client: fetch (verified) against a boto3 download of the same object, interleaved;
        // read_dataset against pyarrow reading an already-local copy.
        let bench = single_node(false);
        let mib: u64 = if settings.quick { 64 } else { 1024 };
        let file = bench.data.join("client.parquet");
        common::make_parquet(&["sized", file.to_str().unwrap(), &mib.to_string(), "65536"]);
        let cluster = bench.env.clusters[0].clone();
        runtime.block_on(async {
            let client = rhio_client::Client::connect(&cluster.nats_url)
                .await
                .unwrap();
            let answer = client
                .import(
                    file.to_str().unwrap(),
                    Some("client"),
                    None,
                    Duration::from_secs(3600),
                )
                .await
                .unwrap();
            assert_eq!(answer["ok"], true, "{answer}");
        });
        let key = "datasets/client/v0.parquet";
        let (mut rhio_fetch, mut boto3) = (Vec::new(), Vec::new());
        let (mut read_rhio, mut read_plain) = (Vec::new(), Vec::new());
        let out = bench.data.join("fetched.parquet");
        let len_mib = std::fs::metadata(&file).unwrap().len() as f64 / (1 << 20) as f64;
        for _ in 0..settings.runs {
            rhio_fetch.extend(runtime.block_on(fetch_rhio(&bench, "client", &out)));
            let _ = std::fs::remove_file(&out);
            if let Some(secs) = python_secs(
                "boto3 download",
                BOTO3_DOWNLOAD,
                &[
                    &cluster.s3_endpoint,
                    &cluster.s3_access_key,
                    &cluster.s3_secret_key,
                    &cluster.s3_bucket,
                    key,
                    out.to_str().unwrap(),
                ],
            ) {
                boto3.push(len_mib / secs[0]);
            }
            let _ = std::fs::remove_file(&out);
            if let Some(secs) = python_secs(
                "read_dataset",
                READ_DATASET,
                &[
                    &cluster.nats_url,
                    &cluster.s3_endpoint,
                    &cluster.s3_access_key,
                    &cluster.s3_secret_key,
                    "client",
                    file.to_str().unwrap(),
                ],
            ) {
                read_rhio.push(secs[0]);
                read_plain.push(secs[1]);
            }
        }
        let _ = std::fs::remove_file(&file);
        let row = |figure: Option<(String, String, String)>| {
            figure.unwrap_or(("FAILED".into(), "FAILED".into(), "-".into()))
        };
        let fetch = (!rhio_fetch.is_empty() && !boto3.is_empty()).then(|| {
            let (r, b) = (median(rhio_fetch.clone()), median(boto3.clone()));
            results.insert("fetch_mib_s".into(), json!(r));
            results.insert("fetch_boto3_mib_s".into(), json!(b));
            (
                format!("{r:.0} MiB/s"),
                format!("{b:.0} MiB/s"),
                format!("{:.2}x", r / b),
            )
        });
        let (figure, baseline, ratio) = row(fetch);
        rows.push((
            "client".into(),
            format!("fetch {mib} MiB verified (vs boto3 download_file)"),
            figure,
            baseline,
            ratio,
        ));
        let read = (!read_rhio.is_empty()).then(|| {
            let (r, p) = (median(read_rhio.clone()), median(read_plain.clone()));
            results.insert("read_dataset_secs".into(), json!(r));
            results.insert("read_table_local_secs".into(), json!(p));
            (
                format!("{r:.2} s"),
                format!("{p:.2} s"),
                format!("{:.2}x", r / p),
            )
        });
        let (figure, baseline, ratio) = row(read);
        rows.push((
            "client".into(),
            format!("read_dataset {mib} MiB (vs pyarrow read_table of a local copy)"),
            figure,
            baseline,
            ratio,
        ));
        results.insert("fetch_runs".into(), json!(rhio_fetch));
        results.insert("fetch_boto3_runs".into(), json!(boto3));
    }
    // After the scenarios whose memory rows read the two nodes' peak RSS: this one resets it.
    if settings.wants("scale") {
        scale::scale(&settings, &runtime, &clusters, &mut rows, &mut results);
    }
    if settings.wants("mirror") {
        // mirror: a fresh file per round, pushed by rhio and by oras, in alternating order.
        drop(clusters);
        let bench = mirror_setup();
        let mib: u64 = if settings.quick { 64 } else { 1024 };
        let (mut rhio_push, mut oras_push) = (Vec::new(), Vec::new());
        for round in 0..settings.runs {
            let file = bench.data.join(format!("mirror{round}.parquet"));
            common::make_parquet(&["sized", file.to_str().unwrap(), &mib.to_string(), "65536"]);
            let dataset = format!("mirror{round}");
            let oras_repo = format!("bench/oras{round}");
            let (r, o) = if round % 2 == 0 {
                let r = runtime.block_on(push_rhio(&bench, &file, &dataset));
                (r, push_oras(&bench, &file, &oras_repo))
            } else {
                let o = push_oras(&bench, &file, &oras_repo);
                (runtime.block_on(push_rhio(&bench, &file, &dataset)), o)
            };
            rhio_push.extend(r);
            oras_push.extend(o);
            let _ = std::fs::remove_file(&file);
        }
        let (figure, baseline, ratio) = if rhio_push.is_empty() || oras_push.is_empty() {
            ("FAILED".to_string(), "FAILED".to_string(), "-".to_string())
        } else {
            let (r, o) = (median(rhio_push.clone()), median(oras_push.clone()));
            results.insert("mirror_push_mib_s".into(), json!(r));
            results.insert("mirror_oras_push_mib_s".into(), json!(o));
            (
                format!("{r:.0} MiB/s"),
                format!("{o:.0} MiB/s"),
                format!("{:.2}x", r / o),
            )
        };
        results.insert("mirror_runs".into(), json!(rhio_push));
        results.insert("mirror_oras_runs".into(), json!(oras_push));
        rows.push((
            "mirror".into(),
            format!(
                "{mib} MiB version pushed to the registry (S3 -> OCI, 16 MiB chunks) vs oras push"
            ),
            figure,
            baseline,
            ratio,
        ));
        // Where a push's time went: reading from S3 vs uploading (they overlap).
        for line in bench.node.log().lines() {
            if line.contains("Parquet layer streamed") {
                eprintln!("bench: mirror: {line}");
            }
        }
        let rss = peak_rss_mib(bench.node.pid());
        rows.push((
            "memory".into(),
            format!("peak RSS of the mirroring node (import and push of {mib} MiB)"),
            format!("{rss:.0} MiB"),
            "-".into(),
            "-".into(),
        ));
        results.insert("rss_mirror_node_mib".into(), json!(rss));
    }
    if settings.wants("federation") {
        runtime.block_on(federation_clusters(&settings, &mut rows, &mut results));
        federation_simulated(&settings, &mut rows, &mut results);
    }
    if settings.wants("capped") {
        scale::capped(&settings, &mut rows, &mut results);
    }
    println!();
    let table = markdown_table(&rows);
    print!("{table}");
    let machine = json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "quick": settings.quick,
        "runs": settings.runs,
    });
    results.insert("machine".into(), machine);
    if let Some(path) = settings.json {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&Value::Object(results.clone())).unwrap(),
        )
        .unwrap();
        println!("\nresults written to {path}");
    }
    let failures = FAILURES.lock().unwrap();
    if let Some(path) = &settings.doc {
        let commit = std::process::Command::new("git")
            .args(["log", "-1", "--format=%h %s"])
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default();
        let missed: Vec<String> = rows
            .iter()
            .filter(|row| goal_met(row) == Some(false))
            .map(|row| {
                let ratio = if row.4 == "-" {
                    String::new()
                } else {
                    format!(", {}", row.4)
                };
                format!(
                    "{} ({}{ratio}, goal {})",
                    row.1,
                    row.2,
                    goal(&row.0, &row.1)
                )
            })
            .collect();
        let goals = if missed.is_empty() {
            "Every goal in the table is met in this run.".to_string()
        } else {
            format!("Goals missed in this run: {}.", missed.join("; "))
        };
        let header = format!(
            "Written by `./dev/bench` at commit `{commit}` ({} runs per scenario{}, {} cores){}.\n\n{}\n\n{goals}",
            settings.runs,
            if settings.quick { ", --quick" } else { "" },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            if failures.is_empty() {
                String::new()
            } else {
                format!(
                    ". FAILED: {} runs lost, duplicated or timed out",
                    failures.len()
                )
            },
            runs_line(&results),
        );
        write_doc(path, &header, &table);
    }
    if !failures.is_empty() {
        eprintln!(
            "\nbench FAILED: {} runs lost, duplicated or timed out:",
            failures.len()
        );
        for failure in failures.iter() {
            eprintln!("  - {failure}");
        }
        std::process::exit(1);
    }
}

/// The federation's broadcast in the deterministic simulator (`rhio_core::simulator`): PlumTree
/// (`tree`) against flooding every neighbour (`flood`, what sync sessions do today), on random
/// graphs with 3-6 neighbours per node, 1-3 ticks per link.
fn federation_simulated(
    settings: &Settings,
    rows: &mut Vec<(String, String, String, String, String)>,
    results: &mut serde_json::Map<String, Value>,
) {
    use rhio_core::broadcast::Mode;
    use rhio_core::simulator::{Config, broadcast_run};
    let sizes: &[usize] = if settings.quick {
        &[10, 100]
    } else {
        &[10, 100, 1000]
    };
    let operations = if settings.quick { 20 } else { 60 };
    for &n in sizes {
        let started = Instant::now();
        let tree = broadcast_run(Config::new(n, Mode::Tree), operations, 3);
        let flood = broadcast_run(Config::new(n, Mode::Flood), operations, 3);
        for (mode, report) in [("tree", &tree), ("flood", &flood)] {
            if report.undelivered > 0 || !report.violations.is_empty() {
                fail(format!(
                    "simulated {n} nodes ({mode}): {} deliveries missing, violations {:?}",
                    report.undelivered, report.violations
                ));
            }
        }
        eprintln!(
            "bench: federation: {n} nodes simulated in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let nodes = n as f64;
        rows.push((
            "federation".into(),
            format!(
                "simulated {n} nodes ({} links): body transmissions per operation and node, tree (vs flood)",
                tree.links
            ),
            format!("{:.2}", tree.steady_bodies_per_op / nodes),
            format!("{:.2}", flood.steady_bodies_per_op / nodes),
            format!("{:.2}x", flood.steady_bodies_per_op / tree.steady_bodies_per_op),
        ));
        rows.push((
            "federation".into(),
            format!(
                "simulated {n} nodes: hops to full delivery, tree (vs flood; log2 N = {:.1})",
                nodes.log2()
            ),
            format!("{} (mean {:.1})", tree.max_hops, tree.mean_hops),
            format!("{} (mean {:.1})", flood.max_hops, flood.mean_hops),
            "-".into(),
        ));
        rows.push((
            "federation".into(),
            format!("simulated {n} nodes: bytes sent per operation (256 B body), tree (vs flood)"),
            format!("{:.0} KiB", tree.bytes_per_op / 1024.0),
            format!("{:.0} KiB", flood.bytes_per_op / 1024.0),
            format!("{:.2}x", flood.bytes_per_op / tree.bytes_per_op),
        ));
        results.insert(
            format!("federation_sim_{n}"),
            json!({
                "tree": {"bodies_per_op": tree.steady_bodies_per_op, "max_hops": tree.max_hops,
                         "mean_hops": tree.mean_hops, "bytes_per_op": tree.bytes_per_op,
                         "digests_per_op": tree.digests_per_op},
                "flood": {"bodies_per_op": flood.steady_bodies_per_op, "max_hops": flood.max_hops,
                          "mean_hops": flood.mean_hops, "bytes_per_op": flood.bytes_per_op},
            }),
        );
    }
}

/// Real clusters (each its own NATS, S3 and node) in a line (each node knows the next) and in a
/// full mesh (each knows all): time from publishing in the first cluster to delivery in the
/// last, and body transmissions per message over the whole network
/// (`rhio_sync_operations_sent_total` summed over the nodes).
async fn federation_clusters(
    settings: &Settings,
    rows: &mut Vec<(String, String, String, String, String)>,
    results: &mut serde_json::Map<String, Value>,
) {
    let sizes: &[usize] = if settings.quick { &[4] } else { &[4, 8] };
    let (rate, secs) = (200, if settings.quick { 3 } else { 10 });
    for &n in sizes {
        for topology in ["line", "mesh"] {
            let env = LocalEnv::up(n);
            let dir = tempfile::tempdir().unwrap();
            let (mut specs, keys) = common::cluster_specs(&env, dir.path());
            let links: Vec<(usize, usize)> = match topology {
                "line" => (0..n - 1)
                    .map(|i| (i, i + 1))
                    .chain([(n - 1, n - 2)])
                    .collect(),
                _ => (0..n)
                    .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
                    .collect(),
            };
            common::bootstrap(&mut specs, &keys, &links);
            for spec in &mut specs {
                spec.extra_network = format!("members = {keys:?}\n");
            }
            specs[0].extra = publish_toml(&["bench.fed.>"], "FED_OUT");
            specs[n - 1].extra = subscribe_toml(&keys[0], &["bench.fed.>"], "FED_IN");
            let nodes: Vec<RhioNode> = specs.into_iter().map(RhioNode::start).collect();
            for node in &nodes {
                node.wait_healthy();
            }
            let (first, last) = (&env.clusters[0].nats_url, &env.clusters[n - 1].nats_url);
            // Warm up: sessions open along the whole path.
            timed_messages(
                first,
                last,
                "bench.fed.warmup",
                1,
                10,
                1,
                "federation warm-up",
            )
            .await;
            let sent = |nodes: &[RhioNode]| -> f64 {
                nodes
                    .iter()
                    .map(|node| common::metric(node, "rhio_sync_operations_sent_total"))
                    .sum()
            };
            let before = sent(&nodes);
            let latencies = timed_messages(
                first,
                last,
                "bench.fed.timed",
                1,
                rate,
                secs,
                &format!("federation {n} clusters {topology}"),
            )
            .await;
            // Every node has passed everything on once the farthest got the last message.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let per_message = (sent(&nodes) - before) / (rate * secs) as f64;
            let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
            rows.push((
                "federation".into(),
                format!("{n} clusters, {topology}: publish in the first -> delivery in the last, p50 / p99 at {rate} msg/s"),
                format!("{p50:.1} / {p99:.1} ms"),
                "-".into(),
                "-".into(),
            ));
            rows.push((
                "federation".into(),
                format!("{n} clusters, {topology}: body transmissions per message (network-wide)"),
                format!("{per_message:.1}"),
                "-".into(),
                "-".into(),
            ));
            results.insert(
                format!("federation_{n}_{topology}"),
                json!({"p50_ms": p50, "p99_ms": p99, "transmissions_per_message": per_message}),
            );
            drop(nodes);
        }
    }
}
