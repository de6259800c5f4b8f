//! Test harness: real servers from `dev/localenv.py` and real `rhio` processes.
//!
//! Every test gets its own environment directory, ports and data; servers are stopped when the
//! `LocalEnv` is dropped, and by a watchdog if the test process dies first.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A two-worker runtime for the async parts of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The checkout the tests run in: cargo sets CARGO_MANIFEST_DIR when it runs them (the
/// compile-time value can name another checkout that shares the target dir).
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// Polls `condition` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub nats_url: String,
    pub s3_endpoint: String,
    pub s3_bucket: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
}

/// Servers of N clusters, stopped on drop.
pub struct LocalEnv {
    dir: tempfile::TempDir,
    pub clusters: Vec<Cluster>,
    /// Anonymous registry (only with [`LocalEnv::with_registry`]).
    pub registry: Option<String>,
    /// Registry with Harbor's token auth (only with [`Registries::AnonymousAndToken`]).
    pub registry_auth: Option<RegistryAuth>,
    /// Registry with HTTP basic auth, same users (only with [`Registries::AnonymousAndToken`]).
    pub registry_basic: Option<String>,
}

/// The token-auth registry: its URL, token realm and users (name -> password); the basic-auth
/// registry has the same users.
#[derive(Debug, Clone)]
pub struct RegistryAuth {
    pub url: String,
    pub realm: String,
    pub users: Vec<(String, String)>,
}

/// Which registries [`LocalEnv::with_registry`] starts besides the clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registries {
    Anonymous,
    /// The anonymous one, one behind Harbor's token flow and one asking for HTTP basic auth.
    AnonymousAndToken,
}

fn localenv(args: &[&str]) -> std::process::Output {
    localenv_in(None, args)
}

/// `python3 dev/localenv.py ARGS`, inside network namespace `netns` when given.
fn localenv_in(netns: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut command = match netns {
        Some(name) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", name, "python3"]);
            command
        }
        None => Command::new("python3"),
    };
    let output = command
        .arg(repo_root().join("dev/localenv.py"))
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .expect("python3 runs dev/localenv.py");
    assert!(
        output.status.success(),
        "dev/localenv.py {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl LocalEnv {
    pub fn up(clusters: usize) -> Self {
        Self::launch(clusters, None)
    }

    /// Clusters whose servers run inside network namespace `netns` (on its own loopback).
    pub fn up_in(clusters: usize, netns: &Netns) -> Self {
        Self::launch_in(clusters, None, Some(&netns.name), false)
    }

    /// Like [`LocalEnv::up_in`], with each S3 listening on every address of the namespace, so
    /// other namespaces reach it over their links (at `http://<address>:<port>`).
    pub fn up_in_reachable(clusters: usize, netns: &Netns) -> Self {
        Self::launch_in(clusters, None, Some(&netns.name), true)
    }

    /// Clusters plus an OCI registry (Debian's docker-registry), and with
    /// [`Registries::AnonymousAndToken`] a second one behind Harbor's token flow.
    pub fn with_registry(clusters: usize, registries: Registries) -> Self {
        Self::launch(clusters, Some(registries))
    }

    fn launch(clusters: usize, registries: Option<Registries>) -> Self {
        Self::launch_in(clusters, registries, None, false)
    }

    fn launch_in(
        clusters: usize,
        registries: Option<Registries>,
        netns: Option<&str>,
        s3_reachable: bool,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_str().unwrap().to_string();
        let owner = std::process::id().to_string();
        let count = clusters.to_string();
        let mut args = vec![
            "up",
            "--dir",
            &path,
            "--clusters",
            &count,
            "--owner-pid",
            &owner,
        ];
        match registries {
            None => args.push("--no-registry"),
            Some(Registries::Anonymous) => {}
            Some(Registries::AnonymousAndToken) => args.push("--registry-auth"),
        }
        if s3_reachable {
            args.push("--s3-any-address");
        }
        let output = localenv_in(netns, &args);
        let info: Value = serde_json::from_slice(&output.stdout).expect("env JSON");
        let clusters = info["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Cluster {
                name: c["name"].as_str().unwrap().into(),
                nats_url: c["nats_url"].as_str().unwrap().into(),
                s3_endpoint: c["s3_endpoint"].as_str().unwrap().into(),
                s3_bucket: c["s3_bucket"].as_str().unwrap().into(),
                s3_access_key: c["s3_access_key"].as_str().unwrap().into(),
                s3_secret_key: c["s3_secret_key"].as_str().unwrap().into(),
            })
            .collect();
        let registry_auth = info["registry_auth"].as_object().map(|auth| RegistryAuth {
            url: auth["url"].as_str().unwrap().into(),
            realm: auth["realm"].as_str().unwrap().into(),
            users: auth["users"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(user, password)| (user.clone(), password.as_str().unwrap().into()))
                .collect(),
        });
        Self {
            dir,
            clusters,
            registry: info["registry"].as_str().map(String::from),
            registry_auth,
            registry_basic: info["registry_basic"]["url"].as_str().map(String::from),
        }
    }

    /// The log of one of the environment's servers (`registry`, `token`, `nats-a`, ...).
    pub fn service_log(&self, service: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join(format!("{service}.log")))
            .unwrap_or_default()
    }

    /// Where the S3 server of cluster `index` keeps the object `key` on disk (s3s-fs stores
    /// objects as plain files), for tests that damage stored bytes.
    pub fn s3_object_path(&self, index: usize, key: &str) -> PathBuf {
        let cluster = &self.clusters[index];
        self.dir
            .path()
            .join("data")
            .join(format!("s3-{}", cluster.name))
            .join(&cluster.s3_bucket)
            .join(key)
    }

    pub fn stop(&self, service: &str) {
        localenv(&[
            "stop",
            "--dir",
            self.dir.path().to_str().unwrap(),
            "--service",
            service,
        ]);
    }

    pub fn start(&self, service: &str) {
        localenv(&[
            "start",
            "--dir",
            self.dir.path().to_str().unwrap(),
            "--service",
            service,
        ]);
    }
}

impl Drop for LocalEnv {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .arg(repo_root().join("dev/localenv.py"))
            .args(["down", "--dir", self.dir.path().to_str().unwrap()])
            .stderr(Stdio::null())
            .status();
    }
}

/// A port no other call in this test process handed out: the kernel may give a released port
/// to the next bind(0), and two nodes on one port would fail in confusing ways.
fn unique_port(bind: impl Fn() -> u16) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = bind();
        let mut handed_out = HANDED_OUT.lock().unwrap();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

pub fn free_tcp_port() -> u16 {
    unique_port(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
}

pub fn free_udp_port() -> u16 {
    unique_port(|| {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
}

/// Minimal HTTP/1.1 GET: returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let code = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// Configuration of one test node, rendered to TOML.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub data_dir: PathBuf,
    pub http_port: u16,
    pub quic_port: u16,
    pub nats_url: String,
    pub s3_endpoint: String,
    pub s3_bucket: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
    pub create_bucket: bool,
    pub create_streams: bool,
    pub import_roots: Vec<PathBuf>,
    pub part_size_mib: u64,
    pub network_id: String,
    pub known_nodes: Vec<(String, u16)>,
    /// Known nodes with an explicit address (`ip:port`).
    pub known_addrs: Vec<(String, String)>,
    /// The QUIC endpoint's address (`127.0.0.1` unless set).
    pub bind_ip: String,
    /// The network namespace the node runs in (its HTTP is reached from inside it).
    pub netns: Option<String>,
    /// Extra lines for the `[network]` section.
    pub extra_network: String,
    pub extra: String,
    /// Extra environment variables for the process.
    pub env: Vec<(String, String)>,
}

impl NodeSpec {
    pub fn for_cluster(cluster: &Cluster, data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            http_port: free_tcp_port(),
            quic_port: free_udp_port(),
            nats_url: cluster.nats_url.clone(),
            s3_endpoint: cluster.s3_endpoint.clone(),
            s3_bucket: cluster.s3_bucket.clone(),
            s3_access_key: cluster.s3_access_key.clone(),
            s3_secret_key: cluster.s3_secret_key.clone(),
            create_bucket: false,
            create_streams: true,
            import_roots: Vec::new(),
            part_size_mib: 5,
            network_id: "rhio-test".into(),
            known_nodes: Vec::new(),
            known_addrs: Vec::new(),
            bind_ip: "127.0.0.1".into(),
            netns: None,
            extra_network: String::new(),
            extra: String::new(),
            env: Vec::new(),
        }
    }

    /// Creates the node key now, so other nodes can be configured with its public key.
    pub fn public_key(&self) -> String {
        let path = self.data_dir.join("private.key");
        rhio::keys::load_or_create(&path, None)
            .unwrap()
            .key
            .public_key()
            .to_hex()
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    /// GET from the node's HTTP server (from inside its network namespace when it has one).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self.http_addr();
        match &self.netns {
            Some(name) => Netns::named(name).run(|| http_get(addr, path)),
            None => http_get(addr, path),
        }
    }

    pub fn toml(&self) -> String {
        let mut text = format!(
            r#"[node]
data_dir = "{data_dir}"
shutdown_timeout_secs = 5
log_level = "info,rhio=debug"

[http]
bind = "127.0.0.1:{http_port}"

[nats]
endpoint = "{nats_url}"
create_streams = {create_streams}

[s3]
endpoint = "{s3_endpoint}"
bucket = "{s3_bucket}"
access_key = "{s3_access_key}"
secret_key = "{s3_secret_key}"
create_bucket = {create_bucket}

[import]
roots = {import_roots:?}
part_size_mib = {part_size_mib}

[network]
network_id = "{network_id}"
bind_ip = "{bind_ip}"
bind_port = {quic_port}
probe_interval_secs = 1
max_retry_interval_secs = 2
{extra_network}"#,
            data_dir = self.data_dir.display(),
            http_port = self.http_port,
            nats_url = self.nats_url,
            s3_endpoint = self.s3_endpoint,
            s3_bucket = self.s3_bucket,
            s3_access_key = self.s3_access_key,
            s3_secret_key = self.s3_secret_key,
            create_bucket = self.create_bucket,
            create_streams = self.create_streams,
            import_roots = self.import_roots,
            part_size_mib = self.part_size_mib,
            network_id = self.network_id,
            quic_port = self.quic_port,
            extra_network = self.extra_network,
            bind_ip = self.bind_ip,
        );
        for (key, port) in &self.known_nodes {
            text.push_str(&format!(
                "\n[[network.known_nodes]]\npublic_key = \"{key}\"\naddresses = [\"127.0.0.1:{port}\"]\n"
            ));
        }
        for (key, address) in &self.known_addrs {
            text.push_str(&format!(
                "\n[[network.known_nodes]]\npublic_key = \"{key}\"\naddresses = [\"{address}\"]\n"
            ));
        }
        text.push_str(&self.extra);
        text
    }
}

/// A running `rhio` process; killed on drop if still running.
pub struct RhioNode {
    pub spec: NodeSpec,
    child: Option<Child>,
    log: PathBuf,
}

impl RhioNode {
    pub fn start(spec: NodeSpec) -> Self {
        Self::start_with_sets(spec, std::iter::empty::<&str>())
    }

    /// Starts with extra `--set KEY=VALUE` arguments.
    pub fn start_with_sets<'a>(spec: NodeSpec, sets: impl IntoIterator<Item = &'a str>) -> Self {
        std::fs::create_dir_all(&spec.data_dir).unwrap();
        let config = spec.data_dir.join("config.toml");
        std::fs::write(&config, spec.toml()).unwrap();
        let log = spec.data_dir.join("node.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut command = match &spec.netns {
            Some(name) => {
                // `ip netns exec` execs rhio in place: the child's pid is rhio's.
                let mut command = Command::new("ip");
                command.args(["netns", "exec", name, env!("CARGO_BIN_EXE_rhio")]);
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_rhio")),
        };
        for set in sets {
            command.arg("--set").arg(set);
        }
        for (name, value) in &spec.env {
            command.env(name, value);
        }
        let child = command
            .arg("-c")
            .arg(&config)
            .env_remove("RHIO_PRIVATE_KEY")
            .env_remove("RUST_LOG")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("rhio binary starts");
        Self {
            spec,
            child: Some(child),
            log,
        }
    }

    pub fn health(&self) -> Option<(u16, Value)> {
        let (code, body) = self.spec.http_get("/health")?;
        Some((code, serde_json::from_str(&body).ok()?))
    }

    /// Waits until /health answers (whatever the status) and returns the document.
    pub fn wait_http(&self) -> Value {
        wait_for("node HTTP server", Duration::from_secs(30), || {
            self.assert_running();
            self.health().map(|(_, body)| body)
        })
    }

    pub fn wait_healthy(&self) -> Value {
        wait_for("node to report ok", Duration::from_secs(30), || {
            self.assert_running();
            self.health()
                .filter(|(code, _)| *code == 200)
                .map(|(_, body)| body)
        })
    }

    pub fn wait_peers_connected(&self, count: u64) -> Value {
        wait_for(
            &format!("{count} connected peers"),
            Duration::from_secs(30),
            || {
                self.assert_running();
                self.health()
                    .map(|(_, body)| body)
                    .filter(|body| body["peers"]["connected"].as_u64() == Some(count))
            },
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&self) {
        let child = self.child.as_ref().expect("node was started");
        // try_wait needs &mut; check liveness through /proc instead.
        let alive = Path::new(&format!("/proc/{}", child.id())).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
                .unwrap_or_default()
                .contains(") Z");
        assert!(alive, "rhio exited early; log:\n{}", self.log());
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = wait_for("rhio to exit", timeout, || child.try_wait().unwrap());
        self.child = None;
        status
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RhioNode {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what each node said last.
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- last lines of the log of the node on {} ----",
                self.spec.http_addr()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs `rhio` to completion with the given arguments and environment.
pub fn run_rhio(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rhio"));
    command
        .args(args)
        .env_remove("RHIO_PRIVATE_KEY")
        .env_remove("RHIO_CONFIG");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("rhio runs")
}

/// Publishes `count` messages into JetStream (awaiting every ack) and returns when all are stored.
pub async fn js_publish(
    nats_url: &str,
    messages: impl IntoIterator<Item = (String, async_nats::HeaderMap, Vec<u8>)>,
) {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let mut acks = Vec::new();
    for (subject, headers, payload) in messages {
        let ack = js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .expect("publish");
        acks.push(ack);
        if acks.len() >= 256 {
            for ack in acks.drain(..) {
                ack.await.expect("JetStream ack");
            }
        }
    }
    for ack in acks {
        ack.await.expect("JetStream ack");
    }
}

/// Waits until `stream` holds at least `expected` messages, then returns all of them.
pub async fn stream_messages(
    nats_url: &str,
    stream: &str,
    expected: u64,
    timeout: Duration,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = loop {
        if let Ok(mut stream) = js.get_stream(stream).await
            && let Ok(info) = stream.info().await
            && info.state.messages >= expected
        {
            break stream;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream {stream} did not reach {expected} messages within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let total = stream.get_info().await.unwrap().state.messages;
    let mut messages = Vec::with_capacity(total as usize);
    for seq in 1..=total {
        messages.push(stream.get_raw_message(seq).await.expect("stored message"));
    }
    messages
}

/// Headers of a stored message as (name, value) pairs.
pub fn header_pairs(headers: &async_nats::HeaderMap) -> Vec<(String, String)> {
    rhio::nats::header_pairs(Some(headers))
}

/// Two clusters, each with its own servers and node spec: A publishes `published` (stream
/// OUT), B subscribes to A on `subscribed` (stream IN); each knows the other.
pub struct Pair {
    pub env: LocalEnv,
    pub _dirs: [tempfile::TempDir; 2],
    pub a: NodeSpec,
    pub b: NodeSpec,
    pub key_a: String,
}

pub fn pair(published: &[&str], subscribed: &[&str]) -> Pair {
    let env = LocalEnv::up(2);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut a = NodeSpec::for_cluster(&env.clusters[0], dirs[0].path());
    let mut b = NodeSpec::for_cluster(&env.clusters[1], dirs[1].path());
    let key_a = a.public_key();
    a.known_nodes.push((b.public_key(), b.quic_port));
    b.known_nodes.push((key_a.clone(), a.quic_port));
    a.extra = publish_toml(published, "OUT");
    b.extra = subscribe_toml(&key_a, subscribed, "IN");
    Pair {
        env,
        _dirs: dirs,
        a,
        b,
        key_a,
    }
}

/// A temporary directory with an empty import root `data/` in it.
pub fn import_root() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    (tmp, root)
}

/// Node A of cluster 0, importing from `root`, and node B of cluster 1 of `env`, each knowing
/// the other (data dirs `dir/a`, `dir/b`); returns them with A's public key.
pub fn importer_and_peer(env: &LocalEnv, dir: &Path, root: &Path) -> (NodeSpec, NodeSpec, String) {
    let mut a = NodeSpec::for_cluster(&env.clusters[0], &dir.join("a"));
    let mut b = NodeSpec::for_cluster(&env.clusters[1], &dir.join("b"));
    let key_a = a.public_key();
    a.import_roots = vec![root.to_path_buf()];
    a.known_nodes.push((b.public_key(), b.quic_port));
    b.known_nodes.push((key_a.clone(), a.quic_port));
    (a, b, key_a)
}

/// A routing section for a node config.
pub fn publish_toml(subjects: &[&str], stream: &str) -> String {
    format!("\n[[publish]]\nsubjects = {subjects:?}\nstream = \"{stream}\"\n")
}

pub fn subscribe_toml(author: &str, subjects: &[&str], stream: &str) -> String {
    format!(
        "\n[[subscribe]]\npublic_key = \"{author}\"\nsubjects = {subjects:?}\nstream = \"{stream}\"\n"
    )
}

/// Reads a counter from /metrics: 0 when the series was never created (a counter that never
/// counted), but a failed scrape panics instead of passing for a zero. Compare against a value
/// above 0 to prove something happened; use [`metric_present`] where a 0 must be proven.
pub fn metric(node: &RhioNode, name: &str) -> f64 {
    metric_present(node, name).unwrap_or(0.0)
}

/// The value of a series on /metrics, `None` when the series is absent. Panics when /metrics
/// cannot be read.
pub fn metric_present(node: &RhioNode, name: &str) -> Option<f64> {
    let (code, text) = node
        .spec
        .http_get("/metrics")
        .unwrap_or_else(|| panic!("GET /metrics of {} failed", node.spec.http_addr()));
    assert_eq!(code, 200, "GET /metrics answered {code}");
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .map(|value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name} has value {value:?}"))
        })
}

/// An aws-sdk-s3 client for a cluster's S3 server.
pub fn s3_client(cluster: &Cluster) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&cluster.s3_endpoint)
        .region(Region::new("us-east-1"))
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            &cluster.s3_access_key,
            &cluster.s3_secret_key,
            None,
            None,
            "tests",
        ))
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        // Same client settings as the node's (see rhio::s3), so baselines compare like for like.
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The whole object `key` in `cluster`'s bucket.
pub async fn s3_object(cluster: &Cluster, key: &str) -> Vec<u8> {
    s3_client(cluster)
        .get_object()
        .bucket(&cluster.s3_bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|err| panic!("get {key}: {err:?}"))
        .body
        .collect()
        .await
        .expect("object body")
        .into_bytes()
        .to_vec()
}

/// Damages the object `key` in `cluster`'s bucket through the S3 API (read, `damage`, write
/// back), as bit rot or a careless tool would; works on every S3 store the tests run against.
pub fn damage_object(cluster: &Cluster, key: &str, damage: impl FnOnce(&mut Vec<u8>)) {
    runtime().block_on(async {
        let mut bytes = s3_object(cluster, key).await;
        damage(&mut bytes);
        s3_client(cluster)
            .put_object()
            .bucket(&cluster.s3_bucket)
            .key(key)
            .body(bytes.into())
            .send()
            .await
            .unwrap_or_else(|err| panic!("put {key}: {err:?}"));
    });
}

/// Asks the node of the cluster at `nats_url` to import `path` (a local path or `s3://...`) as
/// `dataset` through `rhio.import` and returns its reply, whether ok or an error.
pub async fn rhio_import(nats_url: &str, path: &str, dataset: Option<&str>) -> Value {
    let client = rhio_client::Client::connect(nats_url)
        .await
        .expect("connect to NATS");
    client
        .import(path, dataset, None, Duration::from_secs(3600))
        .await
        .expect("an answer to rhio.import")
}

/// [`rhio_import`] that must succeed.
pub async fn rhio_import_ok(nats_url: &str, path: &Path, dataset: &str) -> Value {
    let answer = rhio_import(nats_url, path.to_str().unwrap(), Some(dataset)).await;
    assert_eq!(answer["ok"], true, "{answer}");
    answer
}

/// The Python of the venv `dev/localenv.py install` makes (pyarrow, oras, boto3, ...).
pub fn venv_python() -> PathBuf {
    std::env::var_os("RHIODEV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/rhio"))
        .join("venv/bin/python")
}

/// Runs `dev/make_parquet.py` with the Python of `dev/localenv.py install`.
pub fn make_parquet(args: &[&str]) {
    let output = Command::new(venv_python())
        .arg(repo_root().join("dev/make_parquet.py"))
        .args(args)
        .output()
        .expect("the venv's python runs (python3 dev/localenv.py install)");
    assert!(
        output.status.success(),
        "make_parquet.py {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The `rhio-client` binary beside the `rhio` one (`cargo build --workspace`, which `./dev/test`
/// runs first, builds both).
pub fn client_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_rhio")).with_file_name("rhio-client");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// Runs the `rhio-client` CLI: (exit code, stdout, stderr).
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(client_bin())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Payload of numbered test message `i`, `size` bytes.
pub fn payload(i: usize, size: usize) -> Vec<u8> {
    let mut bytes = format!("message {i:06} ").into_bytes();
    bytes.resize(size, b'x');
    bytes
}

pub fn numbered(subject: &str, i: usize, size: usize) -> (String, async_nats::HeaderMap, Vec<u8>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Seq", i.to_string().as_str());
    (subject.to_string(), headers, payload(i, size))
}

/// Checks that `messages` are exactly `expected` per subject, in order, each with valid
/// provenance by `author`, and no duplicates.
pub fn assert_routed(
    messages: &[async_nats::jetstream::message::StreamMessage],
    author: &str,
    expected: &[(String, usize)],
) {
    if messages.len() != expected.len() {
        let ids: std::collections::HashSet<String> = messages
            .iter()
            .map(|m| {
                m.headers
                    .get(rhio_core::message::HEADER_MSG_ID)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            })
            .collect();
        let seqs: std::collections::HashSet<String> = messages
            .iter()
            .map(|m| {
                format!(
                    "{}/{}",
                    m.subject,
                    m.headers
                        .get("Seq")
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                )
            })
            .collect();
        panic!(
            "expected {} messages, got {} ({} distinct operations, {} distinct subject/Seq)",
            expected.len(),
            messages.len(),
            ids.len(),
            seqs.len()
        );
    }
    // Order is guaranteed per (author, subject), not across subjects: compare per subject.
    let mut ids = std::collections::HashSet::new();
    let mut received: std::collections::BTreeMap<
        String,
        Vec<&async_nats::jetstream::message::StreamMessage>,
    > = Default::default();
    for message in messages {
        received
            .entry(message.subject.to_string())
            .or_default()
            .push(message);
    }
    let mut wanted: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (subject, i) in expected {
        wanted.entry(subject.clone()).or_default().push(*i);
    }
    assert_eq!(
        received.keys().collect::<Vec<_>>(),
        wanted.keys().collect::<Vec<_>>(),
        "subjects"
    );
    for (subject, numbers) in &wanted {
        let got = &received[subject];
        assert_eq!(got.len(), numbers.len(), "messages on {subject}");
        for (seq, (message, i)) in got.iter().zip(numbers).enumerate() {
            assert_eq!(
                message.headers.get("Seq").unwrap().as_str(),
                i.to_string(),
                "order on {subject}"
            );
            assert_eq!(
                message.payload.as_ref(),
                payload(*i, message.payload.len()).as_slice()
            );
            let headers = header_pairs(&message.headers);
            let proof = rhio_core::message::verify_provenance(subject, &headers, &message.payload)
                .unwrap_or_else(|err| panic!("message {i} on {subject}: {err}"));
            assert_eq!(proof.author.to_hex(), author);
            assert_eq!(proof.seq, seq as u64, "author's log order on {subject}");
            let id = message
                .headers
                .get(rhio_core::message::HEADER_MSG_ID)
                .unwrap()
                .to_string();
            assert!(ids.insert(id), "duplicate operation");
        }
    }
}

/// A network namespace this test created (`ip netns add`), deleted on drop with everything in it.
pub struct Netns {
    pub name: String,
    owned: bool,
}

impl Netns {
    /// Two namespaces joined by a veth pair: `a` has `10.231.<n>.1/24`, `b` `10.231.<n>.2/24`
    /// (n from the process id, so concurrent tests do not collide); loopback up in both.
    /// Needs root (the test suite runs as root here).
    pub fn pair(tag: &str) -> (Netns, Netns, [String; 2]) {
        let (mut namespaces, addresses) = Self::mesh(tag, 2);
        let b = namespaces.pop().unwrap();
        let a = namespaces.pop().unwrap();
        (a, b, [addresses[0][1].clone(), addresses[1][0].clone()])
    }

    /// `count` namespaces (`rhio-<pid>-<tag>-a`, `-b`, ...), every two joined by a veth pair of
    /// their own: the k-th pair (in the order (0,1), (0,2), .., (1,2), ..) is the subnet
    /// `10.<231+k>.<n>.0/24` (n from the process id), the lower namespace `.1`, the other `.2`.
    /// `addresses[i][j]` is namespace i's address on its link to j (empty for i == j). Loopback
    /// is up in all. Needs root.
    pub fn mesh(tag: &str, count: usize) -> (Vec<Netns>, Vec<Vec<String>>) {
        let id = std::process::id();
        let namespaces: Vec<Netns> = (0..count)
            .map(|i| Netns {
                name: format!("rhio-{id}-{tag}-{}", (b'a' + i as u8) as char),
                owned: true,
            })
            .collect();
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("ip runs");
            assert!(status.success(), "ip {args:?} failed");
        };
        for ns in &namespaces {
            ip(&["netns", "add", &ns.name]);
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        }
        let mut addresses = vec![vec![String::new(); count]; count];
        let subnet = id % 250 + 1;
        let mut link = 0;
        for i in 0..count {
            for j in i + 1..count {
                let ends = [(i, j, 1), (j, i, 2)];
                let veth = |end: usize| format!("rh{}{link}{}", id % 100_000, ["a", "b"][end]);
                ip(&[
                    "link",
                    "add",
                    &veth(0),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &veth(1),
                ]);
                for (end, (me, other, host)) in ends.into_iter().enumerate() {
                    let (ns, name) = (&namespaces[me].name, veth(end));
                    let address = format!("10.{}.{subnet}.{host}", 231 + link);
                    ip(&["link", "set", &name, "netns", ns]);
                    ip(&[
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &format!("{address}/24"),
                        "dev",
                        &name,
                    ]);
                    ip(&["-n", ns, "link", "set", &name, "up"]);
                    addresses[me][other] = address;
                }
                link += 1;
            }
        }
        (namespaces, addresses)
    }

    /// Caps what leaves this namespace on each of its links (not loopback) at `mbit` Mbit/s with
    /// a token bucket (`tc tbf`); capping every namespace caps both directions of every link.
    pub fn cap(&self, mbit: u32) {
        for name in self.links() {
            let rate = format!("{mbit}mbit");
            let status = Command::new("ip")
                .args([
                    "netns", "exec", &self.name, "tc", "qdisc", "replace", "dev", &name,
                ])
                .args([
                    "root", "tbf", "rate", &rate, "burst", "256kb", "latency", "50ms",
                ])
                .status()
                .expect("tc runs");
            assert!(status.success(), "tc tbf on {name} in {}", self.name);
        }
    }

    /// The namespace's links other than loopback.
    fn links(&self) -> Vec<String> {
        let output = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show"])
            .output()
            .expect("ip runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let name = line
                    .split(':')
                    .nth(1)?
                    .trim()
                    .split('@')
                    .next()?
                    .to_string();
                (name != "lo" && !name.is_empty()).then_some(name)
            })
            .collect()
    }

    fn named(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            owned: false,
        }
    }

    /// Sets every link of the namespace but loopback down (`false`) or up (`true`).
    pub fn set_links(&self, up: bool) {
        for name in self.links() {
            let status = Command::new("ip")
                .args(["-n", &self.name, "link", "set", &name])
                .arg(if up { "up" } else { "down" })
                .status()
                .expect("ip runs");
            assert!(status.success());
        }
    }

    /// Runs `f` on a thread inside the namespace (its sockets are the namespace's); async code
    /// inside should build its own current-thread runtime.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).expect("namespace file");
                    use std::os::fd::AsRawFd;
                    // SAFETY: moves this thread (only) into the namespace we created.
                    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(result, 0, "setns into {}", self.name);
                    f()
                })
                .join()
                .expect("thread in the namespace")
        })
    }

    /// Runs a future inside the namespace on a runtime of its own.
    pub fn block_on<T: Send>(&self, future: impl std::future::Future<Output = T> + Send) -> T {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(future)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

/// A JetStream context on a cluster's NATS.
pub async fn jetstream_of(nats_url: &str) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(
        async_nats::connect(nats_url)
            .await
            .expect("connect to NATS"),
    )
}

/// Messages of `stream` that the consumer `name` has not been sent or has not had acked yet.
pub async fn consumer_pending(nats_url: &str, stream: &str, name: &str) -> u64 {
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = jetstream_of(nats_url)
        .await
        .get_stream(stream)
        .await
        .unwrap_or_else(|err| panic!("stream {stream}: {err}"))
        .get_consumer(name)
        .await
        .unwrap_or_else(|err| panic!("consumer {name}: {err}"));
    let info = consumer.info().await.expect("consumer info");
    info.num_pending + info.num_ack_pending as u64
}

/// Creates a plain JetStream stream capturing `subjects`.
pub async fn create_stream(nats_url: &str, name: &str, subjects: &[&str]) {
    jetstream_of(nats_url)
        .await
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|err| panic!("create stream {name}: {err}"));
}

/// How many messages a stream holds now (the stream must exist).
pub async fn stream_count(nats_url: &str, name: &str) -> u64 {
    let mut stream = jetstream_of(nats_url)
        .await
        .get_stream(name)
        .await
        .unwrap_or_else(|err| panic!("stream {name}: {err}"));
    stream.info().await.unwrap().state.messages
}

/// The S3 key of an announcement's `s3://bucket/key` location.
pub fn s3_key_of(location: &str) -> String {
    location
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, key)| key.to_string())
        .unwrap_or_else(|| panic!("location {location}"))
}

/// One node spec per cluster of `env`, data under `dir/n<i>`, with their public keys.
pub fn cluster_specs(env: &LocalEnv, dir: &Path) -> (Vec<NodeSpec>, Vec<String>) {
    let specs: Vec<NodeSpec> = env
        .clusters
        .iter()
        .enumerate()
        .map(|(i, cluster)| NodeSpec::for_cluster(cluster, &dir.join(format!("n{i}"))))
        .collect();
    let keys = specs.iter().map(NodeSpec::public_key).collect();
    (specs, keys)
}

/// Configures `specs[from]` with `specs[to]` as a known (bootstrap) node, for each link.
pub fn bootstrap(specs: &mut [NodeSpec], keys: &[String], links: &[(usize, usize)]) {
    for &(from, to) in links {
        let port = specs[to].quic_port;
        specs[from].known_nodes.push((keys[to].clone(), port));
    }
}
