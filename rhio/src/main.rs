//! `rhio -c config.toml`: runs one rhio node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rhio::config::{Config, ConfigSources};
use rhio::keys::KeySource;
use tokio::signal::unix::{SignalKind, signal};

/// A rhio node: moves Parquet datasets and signed messages between clusters.
///
/// Configuration: defaults < config file < RHIO_* environment (RHIO_NATS__ENDPOINT sets
/// nats.endpoint) < command line. The private key comes from RHIO_PRIVATE_KEY or from
/// node.private_key_path (created with mode 0600 when missing).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file.
    #[arg(short, long, env = "RHIO_CONFIG")]
    config: Option<PathBuf>,
    /// Override any key: --set nats.endpoint=nats://10.0.0.1:4222 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Shorthand for --set node.data_dir=PATH.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Shorthand for --set http.bind=ADDR.
    #[arg(long)]
    http_bind: Option<String>,
    /// Shorthand for --set nats.endpoint=URL.
    #[arg(long)]
    nats_endpoint: Option<String>,
    /// Shorthand for --set s3.endpoint=URL.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Shorthand for --set network.bind_port=PORT.
    #[arg(long)]
    bind_port: Option<u16>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

impl Args {
    fn overrides(&self) -> Vec<String> {
        let mut overrides = Vec::new();
        let mut shorthand = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                overrides.push(format!("{key}={value}"));
            }
        };
        shorthand(
            "node.data_dir",
            self.data_dir.as_ref().map(|p| p.display().to_string()),
        );
        shorthand("http.bind", self.http_bind.clone());
        shorthand("nats.endpoint", self.nats_endpoint.clone());
        shorthand("s3.endpoint", self.s3_endpoint.clone());
        shorthand("network.bind_port", self.bind_port.map(|p| p.to_string()));
        // Explicit --set comes last so it wins over the shorthands.
        overrides.extend(self.set.iter().cloned());
        overrides
    }
}

/// glibc gives each thread that allocates its own arena (up to eight per core) and seldom hands
/// their free pages back; with rhio's threads (tokio workers, the blocking pool, one SQLite thread
/// per pooled connection) that raised the peak RSS of a 1 GiB import plus serving its replication
/// from 129 to 142 MiB (measured). Two arenas cost no measurable speed. `MALLOC_ARENA_MAX` in the
/// environment still decides when set.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // Allocations of 4 MiB and more (parts, large S3 answers) are mapped from the OS and
        // returned to it when freed. glibc's default starts at 128 KiB but rises with every
        // large free, after which freed parts stay in the arenas: node a's peak RSS over an
        // import of 1 GiB was 119-133 MiB with the default and 79-89 MiB with a fixed threshold.
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        }
    }
}

fn main() -> ExitCode {
    tune_malloc();
    let args = Args::parse();
    let sources = ConfigSources {
        file: args.config.clone(),
        env: std::env::vars().collect(),
        overrides: args.overrides(),
    };
    let config = match Config::load(&sources) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("rhio: {err}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        // Secrets are shown as "<redacted>": the output ends up in tickets and chat.
        match toml::to_string_pretty(&config.redacted()) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(err) => {
                eprintln!("rhio: cannot render configuration: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    init_logging(&config.node.log_level);
    for name in rhio::config::ignored_env(&sources.env) {
        tracing::debug!(
            variable = %name,
            "environment variable is not a config key (no `__` section separator); ignored"
        );
    }
    // iroh, NATS and S3 all use rustls with ring; install it before any TLS is set up.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("rhio: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let env_key = std::env::var("RHIO_PRIVATE_KEY").ok();
    let loaded = match rhio::keys::load_or_create(&config.private_key_path(), env_key.as_deref()) {
        Ok(loaded) => loaded,
        Err(err) => {
            tracing::error!("{err}");
            return ExitCode::from(2);
        }
    };
    let public_key = loaded.key.public_key();
    match &loaded.source {
        KeySource::Environment => tracing::info!("private key from RHIO_PRIVATE_KEY"),
        KeySource::File(path) => tracing::info!(path = %path.display(), "private key loaded"),
        KeySource::Created(path) => {
            tracing::info!(path = %path.display(), "new private key created")
        }
    }
    // On stdout too, so scripts can pick up the node's identity.
    println!("rhio public key: {public_key}");
    tracing::info!(%public_key, version = env!("CARGO_PKG_VERSION"), "starting rhio node");

    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let shutdown_timeout = Duration::from_secs(config.node.shutdown_timeout_secs);

    let node = tokio::select! {
        started = rhio::node::Node::start(config, loaded.key) => match started {
            Ok(node) => node,
            Err(err) => {
                tracing::error!("cannot start: {err}");
                return ExitCode::FAILURE;
            }
        },
        _ = terminate.recv() => return ExitCode::SUCCESS,
        _ = interrupt.recv() => return ExitCode::SUCCESS,
    };
    tracing::info!("rhio node running");

    let signal_name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(signal = signal_name, timeout = ?shutdown_timeout, "shutting down");
    tokio::select! {
        _ = node.shutdown() => {
            tracing::info!("rhio node stopped");
            ExitCode::SUCCESS
        }
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!("shutdown took longer than node.shutdown_timeout_secs; exiting");
            ExitCode::FAILURE
        }
        _ = terminate.recv() => ExitCode::from(143),
        _ = interrupt.recv() => ExitCode::from(130),
    }
}

fn init_logging(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
