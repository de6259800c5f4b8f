//! Node configuration: defaults < config file < `RHIO_*` environment < command line.
//!
//! Every key has a default (see `config.example.toml`, which documents each one). Unknown keys
//! are errors, so a typo fails at start with the key's name instead of being silently ignored.
//! Environment variables map onto keys with `__` between levels: `RHIO_NATS__ENDPOINT` sets
//! `nats.endpoint`. `RHIO_PRIVATE_KEY` (the node key in hex) and `RHIO_CONFIG` (the config file)
//! are read separately and are not config keys.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::{Figment, Provider};
use rhio_core::identity::PublicKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What `--print-config` shows instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// Environment variables with the `RHIO_` prefix that are not config keys.
pub const NON_CONFIG_ENV: &[&str] = &["private_key", "config"];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub http: HttpConfig,
    pub nats: NatsConfig,
    pub s3: S3Config,
    pub network: NetworkConfig,
    /// Local subjects whose messages this node signs and sends to other clusters.
    pub publish: Vec<PublishConfig>,
    /// Per remote author, the subjects accepted from it and where they go locally.
    pub subscribe: Vec<SubscribeConfig>,
    pub import: ImportConfig,
    pub datasets: DatasetsConfig,
    pub replication: ReplicationConfig,
    pub mirror: MirrorConfig,
}

/// The registry mirror: every available dataset version pushed to an OCI registry (Harbor or
/// any OCI distribution registry) as an artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    pub enabled: bool,
    /// Registry base URL, `http://` or `https://` (no path).
    pub registry: String,
    /// Harbor project (or path prefix on plain Distribution) the repositories go under.
    pub project: String,
    /// User name (a Harbor robot account is `robot$<project>+<name>`); none: anonymous.
    pub user: Option<String>,
    pub password: Option<String>,
    /// File holding the password (a mounted Secret); trailing newlines are dropped.
    pub password_file: Option<PathBuf>,
    /// Create the Harbor project through Harbor's API when it is missing (not for plain
    /// Distribution registries, which have no projects).
    pub create_project: bool,
    /// Dataset names to mirror; `*` matches any run of characters. Empty: none.
    pub datasets: Vec<String>,
    /// Mirror this cluster's own datasets.
    pub own: bool,
    /// Mirror datasets of other authors replicated into this cluster.
    pub replicated: bool,
    /// Versions pushed at once.
    pub concurrency: usize,
    /// Size of each upload chunk (PATCH) of the Parquet layer, in MiB.
    pub chunk_size_mib: u64,
    /// Upper bound of the retry backoff while the registry is down or refuses.
    pub max_retry_interval_secs: u64,
    /// Longest one registry request may take to answer (a chunk upload included).
    pub request_timeout_secs: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            registry: String::new(),
            project: "rhio".into(),
            user: None,
            password: None,
            password_file: None,
            create_project: false,
            datasets: vec!["*".into()],
            own: true,
            replicated: true,
            concurrency: 2,
            chunk_size_mib: 16,
            max_retry_interval_secs: 300,
            request_timeout_secs: 120,
        }
    }
}

impl MirrorConfig {
    /// True when `dataset` matches one of the `datasets` patterns.
    pub fn wants(&self, dataset: &str) -> bool {
        self.datasets
            .iter()
            .any(|pattern| glob_match(pattern, dataset))
    }

    /// The password from `password` or `password_file`.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        if let Some(password) = &self.password {
            return Ok(Some(password.clone()));
        }
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::BadValue {
            key: "mirror.password_file",
            reason: format!("cannot read {}: {err}", path.display()),
        })?;
        Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: String| Err(ConfigError::BadValue { key, reason });
        if !self.enabled {
            return Ok(());
        }
        let registry = self.registry.trim_end_matches('/');
        let rest = registry
            .strip_prefix("http://")
            .or_else(|| registry.strip_prefix("https://"));
        match rest {
            Some(host) if !host.is_empty() && !host.contains('/') => {}
            _ => {
                return bad(
                    "mirror.registry",
                    format!(
                        "{:?} is not a registry base URL (http://host[:port] or https://host[:port], no path)",
                        self.registry
                    ),
                );
            }
        }
        if let Err(err) = rhio_core::oci::validate_project(&self.project) {
            return bad("mirror.project", err.to_string());
        }
        if self.password.is_some() && self.password_file.is_some() {
            return bad(
                "mirror.password_file",
                "set mirror.password or mirror.password_file, not both".into(),
            );
        }
        let has_password = self.password.is_some() || self.password_file.is_some();
        if self.user.is_some() != has_password {
            return bad(
                "mirror.user",
                "mirror.user and a password (mirror.password or mirror.password_file) must be set together".into(),
            );
        }
        if self.concurrency == 0
            || self.max_retry_interval_secs == 0
            || self.request_timeout_secs == 0
        {
            return bad(
                "mirror.concurrency",
                "mirror.concurrency, max_retry_interval_secs and request_timeout_secs must be at least 1".into(),
            );
        }
        if !(1..=512).contains(&self.chunk_size_mib) {
            return bad("mirror.chunk_size_mib", "must be between 1 and 512".into());
        }
        Ok(())
    }
}

/// `*` matches any run of characters (none included); everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

/// How datasets of other authors are copied into this cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Part size of the multipart upload of a replicated version, in MiB: a power of two of at
    /// least 8. A crash loses at most `parts_in_flight` parts of work.
    pub part_size_mib: u64,
    /// Parts fetched and uploaded at once per version.
    pub parts_in_flight: usize,
    /// Dataset logs (author, dataset) replicated at once.
    pub max_concurrent: usize,
    /// Longest one range request to a peer may take.
    pub request_timeout_secs: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            part_size_mib: 8,
            parts_in_flight: 4,
            max_concurrent: 2,
            request_timeout_secs: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportConfig {
    /// Local directories files may be imported from (after resolving symlinks).
    pub roots: Vec<PathBuf>,
    /// Imports running at once; further requests are answered `busy`.
    pub max_concurrent: usize,
    /// Size of the S3 multipart upload parts, in MiB (5 or more); doubled for files that
    /// would need more than 10,000 parts.
    pub part_size_mib: u64,
    /// Largest file accepted; larger ones are answered `too_large`.
    pub max_file_bytes: u64,
    /// Parts uploaded at once per import.
    pub upload_concurrency: usize,
    /// Durable variant: import requests published on this subject are kept in the JetStream
    /// work-queue stream `queue_stream` until an import finished (empty: off).
    pub queue_subject: String,
    pub queue_stream: String,
    /// Where the outcome of each queued import is published (core NATS).
    pub results_subject: String,
    /// Attempts of a queued import that fails transiently (S3 unavailable, `busy`) before it
    /// leaves the queue as a dead letter; permanent failures end after one attempt.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetsConfig {
    /// Datasets are announced on `<subject_prefix>.<dataset>` unless an import names a subject.
    pub subject_prefix: String,
    /// JetStream stream capturing `<subject_prefix>.>`, which dataset announcements go into.
    pub stream: String,
}

impl Default for ImportConfig {
    fn default() -> Self {
        Self {
            roots: Vec::new(),
            max_concurrent: 2,
            part_size_mib: 8,
            max_file_bytes: 1 << 40,
            upload_concurrency: 4,
            queue_subject: "rhio.import.queue".into(),
            queue_stream: "RHIO_IMPORTS".into(),
            results_subject: "rhio.import.results".into(),
            max_attempts: 20,
        }
    }
}

impl Default for DatasetsConfig {
    fn default() -> Self {
        Self {
            subject_prefix: "datasets".into(),
            stream: "DATASETS".into(),
        }
    }
}

/// Messages on `subjects`, captured by the JetStream stream `stream`, are routed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    pub subjects: Vec<String>,
    pub stream: String,
}

/// Messages of author `public_key` on `subjects` are accepted and published into the local
/// JetStream (captured there by `stream`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeConfig {
    pub public_key: PublicKey,
    pub subjects: Vec<String>,
    pub stream: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Directory for the node's own state.
    pub data_dir: PathBuf,
    /// Private key file; relative paths are resolved against `data_dir`.
    pub private_key_path: PathBuf,
    /// Log filter (`RUST_LOG` syntax); `RUST_LOG` wins when set.
    pub log_level: String,
    /// How long a shutdown may take before the process exits anyway.
    pub shutdown_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP server with `/health` and `/metrics`.
    pub bind: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma separated.
    pub endpoint: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// NKey seed (`SU...`).
    pub nkey_seed: Option<String>,
    /// `.creds` file with a user JWT and NKey seed.
    pub credentials_file: Option<PathBuf>,
    /// Connection name shown in the NATS server's monitoring.
    pub client_name: String,
    /// Create the JetStream streams named in `publish` and `subscribe` when they are missing.
    pub create_streams: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Path-style URLs (`http://host/bucket/key`), needed by MinIO and most local servers.
    pub path_style: bool,
    /// Credentials; when unset, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` are used.
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Create the bucket at start when it does not exist.
    pub create_bucket: bool,
    /// Longest a TCP/TLS connection to S3 may take to open.
    pub connect_timeout_secs: u64,
    /// Longest S3 may take to send the first byte of an answer to one request attempt.
    pub read_timeout_secs: u64,
    /// Longest one S3 call may take in all (retries and, for reads, the whole body included).
    pub operation_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Name of the rhio network; nodes with different names cannot talk.
    pub network_id: String,
    /// IPv4 address the QUIC endpoint binds to.
    pub bind_ip: IpAddr,
    /// UDP port of the QUIC endpoint (0 picks a free one).
    pub bind_port: u16,
    /// Bootstrap nodes: other rhio nodes to connect to at start (one or two are enough; the
    /// other members and their addresses are learnt through the network).
    pub known_nodes: Vec<KnownNode>,
    /// Public keys of the nodes allowed in the network (besides this node). Empty together with
    /// `members_file`: the known nodes are the members (a hand-wired network).
    pub members: Vec<PublicKey>,
    /// A file with one member public key per line (`#` starts a comment), read again every few
    /// seconds, so members can be added and removed without a restart.
    pub members_file: Option<PathBuf>,
    /// How often a reachable known node is checked.
    pub probe_interval_secs: u64,
    /// Upper bound of the retry backoff for an unreachable known node.
    pub max_retry_interval_secs: u64,
    /// Seconds without any answer after which a peer counts as suspect; failed after three times
    /// as long.
    pub suspect_after_secs: u64,
    /// Relay retention: operations of logs this node only relays (neither its own nor
    /// subscribed) older than this are deleted (0: kept forever). The newest of each log stays.
    pub relay_max_age_secs: u64,
    /// Relay retention: bytes kept per relayed log, the oldest deleted first (0: no limit).
    pub relay_max_bytes_per_log: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownNode {
    pub public_key: PublicKey,
    /// Direct UDP addresses (`ip:port`).
    pub addresses: Vec<SocketAddr>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("rhio-data"),
            private_key_path: PathBuf::from("private.key"),
            log_level: "info".into(),
            shutdown_timeout_secs: 10,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 8080)),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            endpoint: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            credentials_file: None,
            client_name: "rhio".into(),
            create_streams: false,
        }
    }
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:9000".into(),
            region: "us-east-1".into(),
            bucket: "rhio".into(),
            path_style: true,
            access_key: None,
            secret_key: None,
            create_bucket: false,
            connect_timeout_secs: 5,
            read_timeout_secs: 30,
            operation_timeout_secs: 120,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            network_id: "rhio".into(),
            bind_ip: IpAddr::from([0, 0, 0, 0]),
            bind_port: 9102,
            known_nodes: Vec::new(),
            members: Vec::new(),
            members_file: None,
            probe_interval_secs: 5,
            max_retry_interval_secs: 30,
            suspect_after_secs: 15,
            relay_max_age_secs: 0,
            relay_max_bytes_per_log: 0,
        }
    }
}

/// How NATS authenticates this node, derived from the `nats` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    UserPassword { user: String, password: String },
    Token(String),
    NkeySeed(String),
    CredentialsFile(PathBuf),
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    MissingFile { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(
        "invalid --set {assignment:?}: expected KEY=VALUE, for example --set nats.endpoint=nats://10.0.0.1:4222"
    )]
    BadAssignment { assignment: String },
    #[error("invalid value for key `{key}`: {reason}")]
    BadValue { key: &'static str, reason: String },
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        // Figment reports one line per problem, each naming the key and where it came from.
        let lines: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
        ConfigError::Invalid(lines.join("; "))
    }
}

/// Where the configuration comes from, lowest precedence first.
#[derive(Debug, Default, Clone)]
pub struct ConfigSources {
    /// A TOML file; `None` uses defaults and the environment only.
    pub file: Option<PathBuf>,
    /// Environment variables (name, value); normally `std::env::vars()`.
    pub env: Vec<(String, String)>,
    /// `KEY=VALUE` assignments from the command line, applied last.
    pub overrides: Vec<String>,
}

impl Config {
    /// Loads and validates the configuration from its sources.
    pub fn load(sources: &ConfigSources) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &sources.file {
            if !path.exists() {
                return Err(ConfigError::MissingFile { path: path.clone() });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // The environment is handed in explicitly (instead of figment reading the process
        // environment) so that loading is deterministic and testable.
        for (key, raw) in env_assignments(&sources.env) {
            figment = figment.merge(Serialized::default(&key, parse_value(&raw)));
        }
        for assignment in &sources.overrides {
            let (key, raw) = assignment
                .split_once('=')
                .filter(|(key, _)| !key.trim().is_empty() && !key.split('.').any(str::is_empty))
                .ok_or_else(|| ConfigError::BadAssignment {
                    assignment: assignment.clone(),
                })?;
            figment = figment.merge(Serialized::default(key.trim(), parse_value(raw)));
        }
        // Lossy: "9102" from the environment fills a number, "true" a flag.
        let config: Config = figment.extract_lossy()?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.nats_auth()?;
        if self.nats.endpoint.trim().is_empty() {
            return Err(ConfigError::BadValue {
                key: "nats.endpoint",
                reason: "must not be empty".into(),
            });
        }
        if !(self.s3.endpoint.starts_with("http://") || self.s3.endpoint.starts_with("https://")) {
            return Err(ConfigError::BadValue {
                key: "s3.endpoint",
                reason: format!("{:?} is not an http:// or https:// URL", self.s3.endpoint),
            });
        }
        validate_bucket_name(&self.s3.bucket)?;
        if self.s3.access_key.is_some() != self.s3.secret_key.is_some() {
            return Err(ConfigError::BadValue {
                key: "s3.secret_key",
                reason: "s3.access_key and s3.secret_key must be set together".into(),
            });
        }
        if self.s3.connect_timeout_secs == 0
            || self.s3.read_timeout_secs == 0
            || self.s3.operation_timeout_secs == 0
        {
            return Err(ConfigError::BadValue {
                key: "s3.operation_timeout_secs",
                reason: "s3.connect_timeout_secs, read_timeout_secs and operation_timeout_secs must be at least 1 (a hung S3 must not hold the node forever)".into(),
            });
        }
        if self.network.suspect_after_secs == 0 {
            return Err(ConfigError::BadValue {
                key: "network.suspect_after_secs",
                reason: "must be at least 1".into(),
            });
        }
        if self.network.probe_interval_secs == 0 {
            return Err(ConfigError::BadValue {
                key: "network.probe_interval_secs",
                reason: "must be at least 1".into(),
            });
        }
        self.validate_routes()?;
        self.mirror.validate()?;
        if self.import.part_size_mib < 5 || self.import.part_size_mib > 512 {
            return Err(ConfigError::BadValue {
                key: "import.part_size_mib",
                reason: "must be between 5 and 512 (S3 multipart limits)".into(),
            });
        }
        let part = self.replication.part_size_mib;
        if !part.is_power_of_two() || !(8..=512).contains(&part) {
            return Err(ConfigError::BadValue {
                key: "replication.part_size_mib",
                reason: "must be a power of two between 8 and 512".into(),
            });
        }
        if self.replication.parts_in_flight == 0
            || self.replication.max_concurrent == 0
            || self.replication.request_timeout_secs == 0
        {
            return Err(ConfigError::BadValue {
                key: "replication.parts_in_flight",
                reason: "replication.parts_in_flight, max_concurrent and request_timeout_secs must be at least 1".into(),
            });
        }
        if self.import.max_concurrent == 0 || self.import.upload_concurrency == 0 {
            return Err(ConfigError::BadValue {
                key: "import.max_concurrent",
                reason: "import.max_concurrent and import.upload_concurrency must be at least 1"
                    .into(),
            });
        }
        if self.import.max_attempts == 0 {
            return Err(ConfigError::BadValue {
                key: "import.max_attempts",
                reason: "must be at least 1".into(),
            });
        }
        rhio_core::subject::validate_subject(&self.datasets.subject_prefix).map_err(|e| {
            ConfigError::BadValue {
                key: "datasets.subject_prefix",
                reason: e.to_string(),
            }
        })?;
        validate_stream_name(&self.datasets.stream).map_err(|reason| ConfigError::BadValue {
            key: "datasets.stream",
            reason,
        })?;
        for node in &self.network.known_nodes {
            if node.addresses.is_empty() {
                return Err(ConfigError::BadValue {
                    key: "network.known_nodes",
                    reason: format!("node {} has no addresses", node.public_key),
                });
            }
        }
        Ok(())
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        use rhio_core::subject::{overlap, validate_filter};
        let bad = |key: &'static str, reason: String| ConfigError::BadValue { key, reason };
        for (i, publish) in self.publish.iter().enumerate() {
            validate_stream_name(&publish.stream)
                .map_err(|r| bad("publish.stream", format!("publish[{i}]: {r}")))?;
            if publish.subjects.is_empty() {
                return Err(bad(
                    "publish.subjects",
                    format!("publish[{i}] lists no subjects"),
                ));
            }
            for filter in &publish.subjects {
                validate_filter(filter)
                    .map_err(|e| bad("publish.subjects", format!("publish[{i}]: {e}")))?;
            }
        }
        // Entries on one stream are read by one consumer with all their subjects as filters
        // (see `Routes::from_config`); JetStream refuses overlapping filters, and a message
        // matched twice would be signed twice.
        let published: Vec<(usize, &PublishConfig, &String)> = self
            .publish
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.subjects.iter().map(move |subject| (i, p, subject)))
            .collect();
        for (k, (i, first, a)) in published.iter().enumerate() {
            for (j, second, b) in &published[k + 1..] {
                if first.stream == second.stream && overlap(a, b) {
                    return Err(bad(
                        "publish.subjects",
                        format!(
                            "publish[{i}] subject {a:?} and publish[{j}] subject {b:?} overlap on stream {:?}; list each subject once per stream",
                            first.stream
                        ),
                    ));
                }
            }
        }
        for (i, subscribe) in self.subscribe.iter().enumerate() {
            validate_stream_name(&subscribe.stream)
                .map_err(|r| bad("subscribe.stream", format!("subscribe[{i}]: {r}")))?;
            if subscribe.subjects.is_empty() {
                return Err(bad(
                    "subscribe.subjects",
                    format!("subscribe[{i}] lists no subjects"),
                ));
            }
            for filter in &subscribe.subjects {
                validate_filter(filter)
                    .map_err(|e| bad("subscribe.subjects", format!("subscribe[{i}]: {e}")))?;
                // A subject both sent out and accepted would echo between clusters.
                for publish in &self.publish {
                    if let Some(published) = publish.subjects.iter().find(|p| overlap(p, filter)) {
                        return Err(bad(
                            "subscribe.subjects",
                            format!(
                                "subscribe[{i}] subject {filter:?} overlaps published subject {published:?}; a subject cannot be both published and subscribed by one node"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The NATS authentication method; at most one may be configured.
    pub fn nats_auth(&self) -> Result<NatsAuth, ConfigError> {
        let nats = &self.nats;
        let mut methods = Vec::new();
        if nats.user.is_some() || nats.password.is_some() {
            match (&nats.user, &nats.password) {
                (Some(user), Some(password)) => methods.push(NatsAuth::UserPassword {
                    user: user.clone(),
                    password: password.clone(),
                }),
                _ => {
                    return Err(ConfigError::BadValue {
                        key: "nats.password",
                        reason: "nats.user and nats.password must be set together".into(),
                    });
                }
            }
        }
        if let Some(token) = &nats.token {
            methods.push(NatsAuth::Token(token.clone()));
        }
        if let Some(seed) = &nats.nkey_seed {
            methods.push(NatsAuth::NkeySeed(seed.clone()));
        }
        if let Some(path) = &nats.credentials_file {
            methods.push(NatsAuth::CredentialsFile(path.clone()));
        }
        match methods.len() {
            0 => Ok(NatsAuth::None),
            1 => Ok(methods.remove(0)),
            _ => Err(ConfigError::BadValue {
                key: "nats",
                reason: "configure only one of user/password, token, nkey_seed, credentials_file"
                    .into(),
            }),
        }
    }

    /// A copy with every secret replaced by `"<redacted>"` (for `--print-config` and logs).
    pub fn redacted(&self) -> Self {
        let hide = |secret: &mut Option<String>| {
            if secret.is_some() {
                *secret = Some(REDACTED.into());
            }
        };
        let mut copy = self.clone();
        hide(&mut copy.nats.password);
        hide(&mut copy.nats.token);
        hide(&mut copy.nats.nkey_seed);
        hide(&mut copy.s3.secret_key);
        hide(&mut copy.mirror.password);
        copy
    }

    /// The private key file, resolved against the data directory.
    pub fn private_key_path(&self) -> PathBuf {
        resolve(&self.node.data_dir, &self.node.private_key_path)
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn validate_stream_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid JetStream stream name (no spaces, '.', '*', '>', '/')"
        ))
    }
}

fn validate_bucket_name(bucket: &str) -> Result<(), ConfigError> {
    let valid_chars = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if (3..=63).contains(&bucket.len()) && valid_chars {
        Ok(())
    } else {
        Err(ConfigError::BadValue {
            key: "s3.bucket",
            reason: format!(
                "{bucket:?} is not a valid bucket name (3-63 characters: a-z, 0-9, '-', '.')"
            ),
        })
    }
}

/// How one `RHIO_*` environment variable is read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EnvVar {
    /// A config key (`a.b`) and its raw value.
    Key(String, String),
    /// Not a config key: the name, for a debug line.
    Ignored(String),
}

/// Top-level keys of the configuration (`node`, `nats`, `publish`, ...), derived from the
/// defaults so a new section is recognised without a second list.
fn top_level_keys() -> Vec<String> {
    Figment::from(Serialized::defaults(Config::default()))
        .data()
        .ok()
        .and_then(|mut profiles| profiles.remove(&figment::Profile::Default))
        .map(|dict| dict.into_keys().collect())
        .unwrap_or_default()
}

/// Classifies the `RHIO_*` variables. A variable is config when it names a section and a key
/// with `__` between them (`RHIO_NATS__ENDPOINT`) or is a top-level key on its own
/// (`RHIO_PUBLISH`); a typo in such a name is an error at start. Anything else is not ours:
/// Kubernetes injects `RHIO_HTTP_SERVICE_PORT`, `RHIO_QUIC_PORT_9102_UDP`, ... for Services
/// named `rhio-*`, and those must not stop the node.
fn classify_env(vars: &[(String, String)]) -> Vec<EnvVar> {
    let top_level = top_level_keys();
    vars.iter()
        .filter_map(|(name, value)| {
            let key = name.strip_prefix("RHIO_")?.to_ascii_lowercase();
            if key.is_empty() || NON_CONFIG_ENV.contains(&key.as_str()) {
                return None;
            }
            if key.contains("__") || top_level.contains(&key) {
                Some(EnvVar::Key(key.replace("__", "."), value.clone()))
            } else {
                Some(EnvVar::Ignored(name.clone()))
            }
        })
        .collect()
}

/// Turns `RHIO_A__B=value` variables into `(a.b, value)` assignments.
fn env_assignments(vars: &[(String, String)]) -> Vec<(String, String)> {
    classify_env(vars)
        .into_iter()
        .filter_map(|var| match var {
            EnvVar::Key(key, value) => Some((key, value)),
            EnvVar::Ignored(_) => None,
        })
        .collect()
}

/// `RHIO_*` variables that were not read as configuration (for a debug line at start).
pub fn ignored_env(vars: &[(String, String)]) -> Vec<String> {
    classify_env(vars)
        .into_iter()
        .filter_map(|var| match var {
            EnvVar::Ignored(name) => Some(name),
            EnvVar::Key(..) => None,
        })
        .collect()
}

/// A value from the environment or the command line: TOML arrays and inline tables (for list
/// keys such as `network.known_nodes`) are parsed, everything else stays a string that the
/// lossy extraction converts to the key's type.
fn parse_value(raw: &str) -> figment::value::Value {
    let trimmed = raw.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let parsed = Toml::string(&format!("v = {raw}"))
            .data()
            .ok()
            .and_then(|mut profiles| profiles.remove(&figment::Profile::Default))
            .and_then(|mut dict| dict.remove("v"));
        if let Some(value) = parsed {
            return value;
        }
    }
    figment::value::Value::from(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_without_any_source() {
        let config = Config::load(&ConfigSources::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.nats_auth().unwrap(), NatsAuth::None);
    }

    #[test]
    fn file_then_environment_then_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "[nats]\nendpoint = \"nats://file:4222\"\n[network]\nbind_port = 1111\nnetwork_id = \"from-file\"\n[s3]\nbucket = \"file-bucket\"\n",
        );
        let sources = ConfigSources {
            file: Some(file.clone()),
            env: env(&[
                ("RHIO_NETWORK__BIND_PORT", "2222"),
                ("RHIO_NATS__ENDPOINT", "nats://env:4222"),
                ("RHIO_PRIVATE_KEY", "ignored-here"),
                ("HOME", "/root"),
            ]),
            overrides: vec!["network.bind_port=3333".into()],
        };
        let config = Config::load(&sources).unwrap();
        assert_eq!(config.network.bind_port, 3333, "command line wins");
        assert_eq!(
            config.nats.endpoint, "nats://env:4222",
            "environment beats file"
        );
        assert_eq!(config.network.network_id, "from-file", "file beats default");
        assert_eq!(config.s3.bucket, "file-bucket");
        assert_eq!(
            config.http,
            HttpConfig::default(),
            "untouched keys keep defaults"
        );
    }

    #[test]
    fn replication_settings_that_s3_or_the_hash_tree_cannot_use_are_named() {
        for (set, key) in [
            ("replication.part_size_mib=12", "replication.part_size_mib"),
            ("replication.part_size_mib=4", "replication.part_size_mib"),
            (
                "replication.parts_in_flight=0",
                "replication.parts_in_flight",
            ),
        ] {
            let sources = ConfigSources {
                overrides: vec![set.into()],
                ..Default::default()
            };
            match Config::load(&sources) {
                Err(ConfigError::BadValue { key: named, .. }) => assert_eq!(named, key, "{set}"),
                other => panic!("{set}: {other:?}"),
            }
        }
        let sources = ConfigSources {
            overrides: vec!["replication.part_size_mib=16".into()],
            ..Default::default()
        };
        assert_eq!(
            Config::load(&sources).unwrap().replication.part_size_mib,
            16
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "[nats]\nendpiont = \"nats://x:4222\"\n");
        let err = Config::load(&ConfigSources {
            file: Some(file),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("endpiont"), "{err}");
        assert!(err.contains("nats"), "{err}");

        let err = Config::load(&ConfigSources {
            env: env(&[("RHIO_NATS__ENDPIONT", "x")]),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("endpiont"), "{err}");
    }

    #[test]
    fn kubernetes_service_variables_are_not_config_but_typos_in_keys_are() {
        // What Kubernetes injects for the Services rhio-quic and rhio-http.
        let injected = env(&[
            ("RHIO_QUIC_SERVICE_HOST", "10.0.0.7"),
            ("RHIO_QUIC_SERVICE_PORT", "9102"),
            ("RHIO_QUIC_PORT", "udp://10.0.0.7:9102"),
            ("RHIO_QUIC_PORT_9102_UDP", "udp://10.0.0.7:9102"),
            ("RHIO_QUIC_PORT_9102_UDP_PROTO", "udp"),
            ("RHIO_HTTP_SERVICE_HOST", "10.0.0.8"),
            ("RHIO_HTTP_SERVICE_PORT", "8080"),
            ("RHIO_HTTP_PORT_8080_TCP_ADDR", "10.0.0.8"),
            ("RHIO_NATS__ENDPOINT", "nats://nats:4222"),
        ]);
        let config = Config::load(&ConfigSources {
            env: injected.clone(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.nats.endpoint, "nats://nats:4222");
        assert_eq!(config.http, HttpConfig::default());
        let ignored = ignored_env(&injected);
        assert_eq!(ignored.len(), 8, "{ignored:?}");
        assert!(ignored.contains(&"RHIO_HTTP_SERVICE_PORT".to_string()));

        for typo in ["RHIO_NATS__ENDPIONT", "RHIO_NAST__ENDPOINT"] {
            let err = Config::load(&ConfigSources {
                env: env(&[(typo, "x")]),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            let key = typo.strip_prefix("RHIO_").unwrap().to_ascii_lowercase();
            let named = key.split("__").any(|part| err.contains(part));
            assert!(named, "{typo}: {err}");
        }
        // A top-level list key on its own is still config.
        let key = rhio_core::identity::PrivateKey::generate().public_key();
        let config = Config::load(&ConfigSources {
            env: env(&[(
                "RHIO_SUBSCRIBE",
                &format!("[{{ public_key = \"{key}\", subjects = [\"a.>\"], stream = \"A\" }}]"),
            )]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.subscribe.len(), 1);
    }

    #[test]
    fn mirror_keys_survive_files_and_environment_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("password");
        std::fs::write(&secret, "s3cr$t\n").unwrap();
        let file = write(
            dir.path(),
            &format!(
                "[mirror]\nenabled = true\nregistry = \"https://harbor.example:8443\"\nuser = \"robot$rhio+mirror\"\npassword_file = \"{}\"\ndatasets = [\"weather*\", \"tides\"]\n",
                secret.display()
            ),
        );
        let config = Config::load(&ConfigSources {
            file: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.mirror.user.as_deref(), Some("robot$rhio+mirror"));
        assert_eq!(config.mirror.password().unwrap().as_deref(), Some("s3cr$t"));
        assert!(config.mirror.wants("weather") && config.mirror.wants("weather_eu"));
        assert!(config.mirror.wants("tides") && !config.mirror.wants("tides2"));
        // The '$' of a robot name survives the environment too.
        let config = Config::load(&ConfigSources {
            file: Some(file),
            env: vec![("RHIO_MIRROR__USER".into(), "robot$other+x".into())],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.mirror.user.as_deref(), Some("robot$other+x"));
        for (set, key) in [
            ("mirror.registry=harbor.example", "mirror.registry"),
            ("mirror.registry=http://h/v2", "mirror.registry"),
            ("mirror.project=Rhio", "mirror.project"),
            ("mirror.user=alice", "mirror.user"),
            ("mirror.chunk_size_mib=0", "mirror.chunk_size_mib"),
        ] {
            let err = Config::load(&ConfigSources {
                overrides: vec![
                    "mirror.enabled=true".into(),
                    "mirror.registry=http://127.0.0.1:5000".into(),
                    set.into(),
                ],
                ..Default::default()
            })
            .unwrap_err();
            assert!(
                matches!(&err, ConfigError::BadValue { key: k, .. } if *k == key),
                "{set}: {err}"
            );
        }
        assert!(glob_match("*", "") && glob_match("a*b*c", "aXbYc") && !glob_match("a*b", "ab_"));
    }

    #[test]
    fn redacted_copy_hides_every_secret() {
        let config = Config::load(&ConfigSources {
            overrides: vec![
                "nats.user=alice".into(),
                "nats.password=hunter2".into(),
                "s3.access_key=AKIA".into(),
                "s3.secret_key=s3cret".into(),
                "mirror.enabled=true".into(),
                "mirror.registry=http://127.0.0.1:5000".into(),
                "mirror.user=robot$rhio+ci".into(),
                "mirror.password=r0b0t".into(),
            ],
            ..Default::default()
        })
        .unwrap();
        let text = toml::to_string_pretty(&config.redacted()).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret") && !text.contains("r0b0t"),
            "{text}"
        );
        assert!(text.contains("alice") && text.contains(REDACTED), "{text}");
        let mut token = Config::default();
        token.nats.token = Some("tok".into());
        token.nats.nkey_seed = Some("SUAAA".into());
        let text = toml::to_string_pretty(&token.redacted()).unwrap();
        assert!(!text.contains("tok\"") && !text.contains("SUAAA"), "{text}");
    }

    #[test]
    fn wrong_type_is_named_with_its_key() {
        let err = Config::load(&ConfigSources {
            overrides: vec!["network.bind_port=not-a-port".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("bind_port"), "{err}");
    }

    #[test]
    fn missing_file_and_bad_assignment_are_clear() {
        let err = Config::load(&ConfigSources {
            file: Some("/nonexistent/rhio.toml".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/rhio.toml"), "{err}");
        let err = Config::load(&ConfigSources {
            overrides: vec!["novalue".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("KEY=VALUE"), "{err}");
    }

    #[test]
    fn semantic_checks_name_the_key() {
        let cases = [
            ("s3.bucket=Bad_Bucket", "s3.bucket"),
            ("s3.endpoint=localhost:9000", "s3.endpoint"),
            ("s3.access_key=only-key", "s3.secret_key"),
            ("nats.user=alice", "nats.password"),
            (
                "network.probe_interval_secs=0",
                "network.probe_interval_secs",
            ),
        ];
        for (assignment, key) in cases {
            let err = Config::load(&ConfigSources {
                overrides: vec![assignment.into()],
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(key), "{assignment}: {err}");
        }
        let err = Config::load(&ConfigSources {
            overrides: vec!["nats.token=t".into(), "nats.nkey_seed=SU".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("only one"), "{err}");
    }

    #[test]
    fn known_nodes_from_file_and_environment() {
        let key = rhio_core::identity::PrivateKey::generate().public_key();
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            &format!(
                "[[network.known_nodes]]\npublic_key = \"{key}\"\naddresses = [\"127.0.0.1:9102\"]\n"
            ),
        );
        let config = Config::load(&ConfigSources {
            file: Some(file),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.network.known_nodes[0].public_key, key);
        assert_eq!(config.network.known_nodes[0].addresses[0].port(), 9102);

        let config = Config::load(&ConfigSources {
            env: env(&[(
                "RHIO_NETWORK__KNOWN_NODES",
                &format!("[{{ public_key = \"{key}\", addresses = [\"10.0.0.2:9102\"] }}]"),
            )]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.network.known_nodes.len(), 1);

        let err = Config::load(&ConfigSources {
            overrides: vec![
                "network.known_nodes=[{ public_key = \"abc\", addresses = [\"10.0.0.2:9102\"] }]"
                    .into(),
            ],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("public_key") || err.contains("known_nodes"),
            "{err}"
        );
    }

    #[test]
    fn routes_load_and_conflicts_are_rejected() {
        let key = rhio_core::identity::PrivateKey::generate().public_key();
        let dir = tempfile::tempdir().unwrap();
        let routes = format!(
            "[[publish]]\nsubjects = [\"sensors.>\"]\nstream = \"SENSORS\"\n\n[[subscribe]]\npublic_key = \"{key}\"\nsubjects = [\"remote.*\"]\nstream = \"REMOTE\"\n"
        );
        let file = write(dir.path(), &routes);
        let config = Config::load(&ConfigSources {
            file: Some(file),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.publish[0].stream, "SENSORS");
        assert_eq!(config.subscribe[0].public_key, key);

        let conflicting = routes.replace("remote.*", "sensors.t1");
        let file = write(dir.path(), &conflicting);
        let err = Config::load(&ConfigSources {
            file: Some(file),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("sensors.t1") && err.contains("both published and subscribed"),
            "{err}"
        );

        for (from, to, key_name) in [
            ("\"SENSORS\"", "\"SEN.SORS\"", "publish.stream"),
            ("remote.*", "remote.>.x", "subscribe.subjects"),
            ("[\"sensors.>\"]", "[]", "publish.subjects"),
        ] {
            let file = write(dir.path(), &routes.replace(from, to));
            let err = Config::load(&ConfigSources {
                file: Some(file),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(key_name), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn publish_entries_on_one_stream_must_not_overlap() {
        let two = |a: &str, b: &str| {
            format!(
                "[[publish]]\nsubjects = [{a:?}]\nstream = \"S\"\n[[publish]]\nsubjects = [{b:?}]\nstream = \"S\"\n"
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let load = |text: String| {
            Config::load(&ConfigSources {
                file: Some(write(dir.path(), &text)),
                ..Default::default()
            })
        };
        assert_eq!(load(two("a.>", "b.>")).unwrap().publish.len(), 2);
        let err = load(two("a.>", "a.x")).unwrap_err().to_string();
        assert!(
            err.contains("publish.subjects") && err.contains("overlap"),
            "{err}"
        );
        let err = load("[[publish]]\nsubjects = [\"a.*\", \"a.b\"]\nstream = \"S\"\n".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("publish.subjects"), "{err}");
    }

    #[test]
    fn nats_auth_methods() {
        let load = |sets: &[&str]| {
            Config::load(&ConfigSources {
                overrides: sets.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .unwrap()
            .nats_auth()
            .unwrap()
        };
        assert_eq!(
            load(&["nats.user=u", "nats.password=p"]),
            NatsAuth::UserPassword {
                user: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(load(&["nats.token=12345"]), NatsAuth::Token("12345".into()));
        assert_eq!(
            load(&["nats.credentials_file=/etc/rhio/nats.creds"]),
            NatsAuth::CredentialsFile("/etc/rhio/nats.creds".into())
        );
    }

    #[test]
    fn example_config_matches_defaults() {
        // config.example.toml documents every key with its default value.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml");
        let config = Config::load(&ConfigSources {
            file: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config, Config::default());
    }
}
