//! `rhio-client`: drive and observe rhio nodes from the command line.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "Drive and observe rhio nodes")]
struct Args {
    /// NATS server of the node's cluster [default: nats://127.0.0.1:4222].
    #[arg(long, global = true, env = "NATS_URL")]
    nats: Option<String>,
    /// A client config file (TOML: `nats = "..."`, `[s3]` endpoint, bucket, access_key,
    /// secret_key); flags and environment variables win over it.
    #[arg(long, global = true, env = "RHIO_CLIENT_CONFIG")]
    config: Option<PathBuf>,
    /// Print results as JSON (for scripts) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
    #[command(subcommand)]
    command: Command,
}

/// The cluster's S3 (the node's `[s3]`), for `fetch`.
#[derive(Debug, clap::Args)]
struct S3Args {
    /// S3 endpoint of the node's cluster.
    #[arg(long, global = true, env = "RHIO_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// The node's bucket [default: rhio].
    #[arg(long, global = true, env = "RHIO_S3_BUCKET")]
    s3_bucket: Option<String>,
    #[arg(long, global = true, env = "RHIO_S3_ACCESS_KEY")]
    s3_access_key: Option<String>,
    #[arg(
        long,
        global = true,
        env = "RHIO_S3_SECRET_KEY",
        hide_env_values = true
    )]
    s3_secret_key: Option<String>,
}

/// The client config file (`--config`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    nats: Option<String>,
    #[serde(default)]
    s3: FileS3,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileS3 {
    endpoint: Option<String>,
    bucket: Option<String>,
    access_key: Option<String>,
    secret_key: Option<String>,
}

impl ClientConfig {
    fn load(path: Option<&std::path::Path>) -> Result<Self, rhio_client::ClientError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|err| rhio_client::ClientError::Usage(format!("{}: {err}", path.display())))?;
        toml::from_str(&text)
            .map_err(|err| rhio_client::ClientError::Usage(format!("{}: {err}", path.display())))
    }
}

/// Where to reach the node, from flags, environment and the config file (in that order).
struct Resolved {
    nats: String,
    s3: rhio_client::S3Options,
}

fn resolve(args: &Args) -> Result<Resolved, rhio_client::ClientError> {
    let file = ClientConfig::load(args.config.as_deref())?;
    let s3 = &args.s3;
    Ok(Resolved {
        nats: args
            .nats
            .clone()
            .or(file.nats)
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
        s3: rhio_client::S3Options {
            endpoint: s3
                .s3_endpoint
                .clone()
                .or(file.s3.endpoint)
                .unwrap_or_default(),
            bucket: s3
                .s3_bucket
                .clone()
                .or(file.s3.bucket)
                .unwrap_or_else(|| "rhio".into()),
            region: None,
            access_key: s3.s3_access_key.clone().or(file.s3.access_key),
            secret_key: s3.s3_secret_key.clone().or(file.s3.secret_key),
        },
    })
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the node's status (NATS, S3, peers, routing, datasets, mirror); --json: all of it.
    Status,
    /// Import a Parquet file (a path under the node's import roots, or s3://bucket/key).
    Import {
        path: String,
        /// Dataset name (default: the file stem).
        #[arg(long)]
        dataset: Option<String>,
        /// Subject to announce the dataset on (default: datasets.<name>).
        #[arg(long)]
        subject: Option<String>,
        /// Seconds to wait for the import to finish.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Publish a message into the cluster's JetStream (rhio routes it when configured to).
    Publish {
        subject: String,
        /// Message body (UTF-8).
        message: String,
        /// Header as NAME:VALUE (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
    /// Print messages on SUBJECT (wildcards allowed) with author and verification result.
    Subscribe {
        subject: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Only these authors count as trusted (repeatable); others are marked untrusted.
        #[arg(long = "trust")]
        trusted: Vec<String>,
    },
    /// Send a NATS request and print the answer (a stand-in for `nats request`).
    Request {
        subject: String,
        #[arg(default_value = "")]
        body: String,
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// List the dataset versions available in the cluster (all authors); with a NAME, show
    /// that dataset's versions in detail.
    Datasets {
        name: Option<String>,
        /// JetStream stream the node announces datasets into (its datasets.stream).
        #[arg(long, default_value = rhio_client::DEFAULT_DATASET_STREAM)]
        stream: String,
    },
    /// Fetch a dataset version from the cluster's S3 into a file, verified against its signed
    /// manifest (nothing is left behind when verification fails).
    Fetch {
        dataset: String,
        /// Where to write the file.
        #[arg(long, short)]
        out: PathBuf,
        /// Version (default: the latest).
        #[arg(long)]
        version: Option<u64>,
        /// Author's public key (needed when several authors have the dataset).
        #[arg(long)]
        author: Option<String>,
        #[arg(long, default_value = rhio_client::DEFAULT_DATASET_STREAM)]
        stream: String,
    },
    /// The cluster's state as tables: peers, datasets, transfers.
    State {
        /// table (aligned text), json, csv or parquet (csv and parquet need --out).
        #[arg(long, default_value = "table")]
        format: StateFormat,
        /// Directory to write peers.<ext>, datasets.<ext> and transfers.<ext> into.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value = rhio_client::DEFAULT_DATASET_STREAM)]
        stream: String,
    },
    /// Check a file against a signed manifest file (the `.rhio-manifest` an OCI pull gives).
    Verify { file: PathBuf, manifest: PathBuf },
    /// Routed messages the local JetStream could not take: list them, or deliver them again
    /// once the cause is fixed (a stream capturing the subject, a larger max_msg_size).
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Make a new node key; prints the public key.
    Keygen {
        /// Write the private key to this file (mode 0600; never overwrites).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum DeadLettersCommand {
    /// List the dead letters in log order.
    List,
    /// Deliver dead letters again: --all, or one by --author, --subject and --seq.
    Replay {
        #[arg(long, conflicts_with_all = ["author", "subject", "seq"])]
        all: bool,
        #[arg(long, requires_all = ["subject", "seq"])]
        author: Option<String>,
        #[arg(long, requires_all = ["author", "seq"])]
        subject: Option<String>,
        #[arg(long, requires_all = ["author", "subject"])]
        seq: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StateFormat {
    Table,
    Json,
    Csv,
    Parquet,
}

/// Exit codes: 0 success, 1 the node, NATS or S3 failed (or answered an error), 2 usage (bad
/// arguments, nothing matches, ambiguous), 3 verification failed.
const EXIT_SERVER: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_VERIFICATION: u8 = 3;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let client_error = err.downcast_ref::<rhio_client::ClientError>();
            let code = client_error.map_or("error", |e| e.code());
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "error": {"code": code, "message": err.to_string()}})
                );
            }
            eprintln!("rhio-client: {err}");
            ExitCode::from(match client_error {
                Some(rhio_client::ClientError::Verification(_)) => EXIT_VERIFICATION,
                Some(
                    rhio_client::ClientError::Usage(_)
                    | rhio_client::ClientError::NotFound(_)
                    | rhio_client::ClientError::Ambiguous(_),
                ) => EXIT_USAGE,
                _ => EXIT_SERVER,
            })
        }
    }
}

/// The node's status for people (`--json` prints the whole document).
fn status_text(s: &serde_json::Value) -> String {
    let yes = |v: &serde_json::Value| if v == true { "yes" } else { "NO" };
    let mut out = format!(
        "node      {} ({}), up {} s, rhio {}\n",
        s["public_key"].as_str().unwrap_or("?"),
        s["status"].as_str().unwrap_or("?"),
        s["uptime_secs"],
        s["version"].as_str().unwrap_or("?")
    );
    out += &format!(
        "NATS      {} connected: {}\n",
        s["nats"]["endpoint"].as_str().unwrap_or("?"),
        yes(&s["nats"]["connected"])
    );
    out += &format!(
        "S3        {} bucket {} reachable: {}\n",
        s["s3"]["endpoint"].as_str().unwrap_or("?"),
        s["s3"]["bucket"].as_str().unwrap_or("?"),
        yes(&s["s3"]["reachable"])
    );
    out += &format!(
        "peers     {} of {} connected\n",
        s["peers"]["connected"], s["peers"]["known"]
    );
    let r = &s["routing"];
    out += &format!(
        "messages  signed {}, received {}, delivered {}, rejected {}, dead-lettered {}\n",
        r["signed"], r["received"], r["delivered"], r["rejected"], r["dead_lettered"]
    );
    let d = &s["datasets"];
    out += &format!(
        "datasets  {} blobs, {} versions replicated, {} transfers, {} announcements pending, {} failed\n",
        d["blobs"],
        d["versions_replicated"],
        d["transfers"].as_array().map_or(0, Vec::len),
        d["announcements_pending"],
        d["failed"].as_array().map_or(0, Vec::len)
    );
    if let Some(m) = s.get("mirror").filter(|m| !m.is_null()) {
        out += &format!(
            "mirror    {} ({}): {} pushed, {} pending{}\n",
            m["registry"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            m["pushed"],
            m["pending"],
            m["last_error"]
                .as_str()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
    out
}

/// A byte progress bar on stderr (indicatif draws nothing when stderr is not a terminal).
fn bytes_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

fn micros_to_time(micros: u64) -> String {
    rhio_core::oci::rfc3339_from_micros(micros)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let node = resolve(&args)?;
    match args.command {
        Command::Status => {
            let client = rhio_client::Client::connect(&node.nats).await?;
            let status = client.status_json().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status_text(&status));
            }
        }
        Command::Import {
            path,
            dataset,
            subject,
            timeout,
        } => {
            use futures::StreamExt;
            let client = rhio_client::Client::connect(&node.nats).await?;
            let mut progress = client.nats().subscribe("rhio.progress.>").await?;
            // A progress bar on a terminal; nothing when stderr is not one.
            let bar = bytes_bar();
            let shown = bar.clone();
            let printer = tokio::spawn(async move {
                while let Some(event) = progress.next().await {
                    if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&event.payload) {
                        shown.set_length(event["bytes_total"].as_u64().unwrap_or(0));
                        shown.set_position(event["bytes_done"].as_u64().unwrap_or(0));
                        shown.set_message(event["dataset"].as_str().unwrap_or("").to_string());
                    }
                }
            });
            let answer = client
                .import(
                    &path,
                    dataset.as_deref(),
                    subject.as_deref(),
                    std::time::Duration::from_secs(timeout),
                )
                .await?;
            printer.abort();
            bar.finish_and_clear();
            println!("{}", serde_json::to_string_pretty(&answer)?);
            if answer["ok"] != true {
                anyhow::bail!(
                    "import failed: {}",
                    answer["error"]["message"]
                        .as_str()
                        .unwrap_or("unknown error")
                );
            }
        }
        Command::Publish {
            subject,
            message,
            headers,
        } => {
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                        .ok_or_else(|| anyhow::anyhow!("header {h:?} is not NAME:VALUE"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let client = rhio_client::Client::connect(&node.nats).await?;
            let seq = client
                .publish(&subject, &headers, message.into_bytes())
                .await?;
            println!("published {subject} (stream sequence {seq})");
        }
        Command::Subscribe {
            subject,
            count,
            trusted,
        } => {
            use futures::StreamExt;
            let client = rhio_client::Client::connect(&node.nats).await?;
            let messages = client.subscribe(&subject).await?;
            let mut messages = std::pin::pin!(messages.take(count.unwrap_or(usize::MAX)));
            eprintln!("listening on {subject}");
            while let Some(message) = messages.next().await {
                let origin = match &message.provenance {
                    Ok(proof) if !trusted.is_empty() && !message.is_from(&trusted) => {
                        format!(
                            "author {} seq {} verified, untrusted",
                            proof.author, proof.seq
                        )
                    }
                    Ok(proof) => format!("author {} seq {} verified", proof.author, proof.seq),
                    Err(err) => format!("not verified: {err}"),
                };
                println!(
                    "{} [{}] {}",
                    message.subject,
                    origin,
                    String::from_utf8_lossy(&message.payload)
                );
            }
        }
        Command::Datasets { name, stream } => {
            let client = rhio_client::Client::connect(&node.nats).await?;
            let mut versions = client.datasets(&stream).await?;
            if let Some(name) = &name {
                versions.retain(|v| &v.dataset == name);
                if versions.is_empty() {
                    return Err(rhio_client::ClientError::NotFound(format!(
                        "no dataset {name:?} in this cluster"
                    ))
                    .into());
                }
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&versions)?);
            } else if name.is_some() {
                for v in &versions {
                    println!("{} v{}", v.dataset, v.version);
                    for (label, value) in [
                        ("author", v.author.clone()),
                        ("created", micros_to_time(v.created_at_micros)),
                        ("bytes", v.bytes.to_string()),
                        ("rows", v.rows.to_string()),
                        ("row groups", v.row_groups.to_string()),
                        ("BLAKE3", v.file_hash.clone()),
                        ("operation", v.operation.clone()),
                        ("subject", v.subject.clone()),
                        ("location", v.location.clone()),
                        (
                            "verified",
                            v.problem
                                .as_ref()
                                .map_or("yes".to_string(), |p| format!("NO: {p}")),
                        ),
                    ] {
                        println!("  {label:<11} {value}");
                    }
                }
            } else if versions.is_empty() {
                println!("no datasets in stream {stream}");
            } else {
                println!(
                    "{:<24} {:>7} {:<16} {:>12} {:>10} {:>6}  {:<20}  {:<8}  location",
                    "dataset",
                    "version",
                    "author",
                    "bytes",
                    "rows",
                    "groups",
                    "created",
                    "verified"
                );
                for v in &versions {
                    println!(
                        "{:<24} {:>7} {:<16} {:>12} {:>10} {:>6}  {:<20}  {:<8}  {}",
                        v.dataset,
                        v.version,
                        &v.author[..v.author.len().min(16)],
                        v.bytes,
                        v.rows,
                        v.row_groups,
                        micros_to_time(v.created_at_micros),
                        if v.problem.is_none() { "yes" } else { "NO" },
                        v.location
                    );
                }
            }
        }
        Command::Fetch {
            dataset,
            out,
            version,
            author,
            stream,
        } => {
            let client = rhio_client::Client::connect(&node.nats).await?;
            let bar = bytes_bar();
            bar.set_message(dataset.clone());
            let fetched = client
                .fetch_with_progress(
                    &node.s3,
                    &stream,
                    &dataset,
                    version,
                    author.as_deref(),
                    &out,
                    &|done, total| {
                        bar.set_length(total);
                        bar.set_position(done);
                    },
                )
                .await;
            bar.finish_and_clear();
            let fetched = fetched?;
            let summary = serde_json::json!({
                "ok": true,
                "path": fetched.path,
                "dataset": fetched.manifest.dataset,
                "version": fetched.manifest.version,
                "author": fetched.manifest.author.to_hex(),
                "bytes": fetched.manifest.file_size,
                "rows": fetched.manifest.rows,
                "file_hash": fetched.manifest.file_hash,
            });
            if args.json {
                println!("{summary}");
            } else {
                println!(
                    "fetched {} v{} by {} ({} bytes, {} rows) -> {}: BLAKE3 {} and signature verified",
                    fetched.manifest.dataset,
                    fetched.manifest.version,
                    fetched.manifest.author,
                    fetched.manifest.file_size,
                    fetched.manifest.rows,
                    fetched.path.display(),
                    fetched.manifest.file_hash
                );
            }
        }
        Command::State {
            format,
            out,
            stream,
        } => {
            use rhio_client::state;
            let client = rhio_client::Client::connect(&node.nats).await?;
            let tables = client.cluster_state(&stream).await?;
            let format = if args.json { StateFormat::Json } else { format };
            let ext = match format {
                StateFormat::Table => "txt",
                StateFormat::Json => "json",
                StateFormat::Csv => "csv",
                StateFormat::Parquet => "parquet",
            };
            let render = |batch: &arrow_array::RecordBatch| -> String {
                match format {
                    StateFormat::Table => state::to_text(batch, 24),
                    StateFormat::Csv => state::to_csv(batch),
                    _ => serde_json::to_string_pretty(&state::to_json_rows(batch))
                        .expect("rows serialize"),
                }
            };
            match (&out, format) {
                (Some(dir), _) => {
                    std::fs::create_dir_all(dir).map_err(|err| {
                        rhio_client::ClientError::Io(format!("{}: {err}", dir.display()))
                    })?;
                    for (name, batch) in tables.tables() {
                        let path = dir.join(format!("{name}.{ext}"));
                        match format {
                            StateFormat::Parquet => state::write_parquet(batch, &path)?,
                            _ => std::fs::write(&path, render(batch)).map_err(|err| {
                                rhio_client::ClientError::Io(format!("{}: {err}", path.display()))
                            })?,
                        }
                        eprintln!("{name}: {} rows -> {}", batch.num_rows(), path.display());
                    }
                }
                (None, StateFormat::Parquet | StateFormat::Csv) => {
                    return Err(rhio_client::ClientError::Usage(
                        "--format csv and parquet write files: name a directory with --out".into(),
                    )
                    .into());
                }
                (None, StateFormat::Json) => {
                    let object: serde_json::Map<String, serde_json::Value> = tables
                        .tables()
                        .into_iter()
                        .map(|(name, batch)| (name.to_string(), state::to_json_rows(batch).into()))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&object)?);
                }
                (None, StateFormat::Table) => {
                    for (name, batch) in tables.tables() {
                        println!("{name} ({} rows)", batch.num_rows());
                        print!("{}", render(batch));
                        println!();
                    }
                }
            }
        }
        Command::Verify { file, manifest } => {
            let manifest = rhio_client::verify(&file, &manifest)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true,
                        "dataset": manifest.dataset,
                        "version": manifest.version,
                        "author": manifest.author.to_hex(),
                        "file_hash": manifest.file_hash,
                    })
                );
            } else {
                println!(
                    "{}: {} v{} by {}, BLAKE3 {} and signature verified",
                    file.display(),
                    manifest.dataset,
                    manifest.version,
                    manifest.author,
                    manifest.file_hash
                );
            }
        }
        Command::Request {
            subject,
            body,
            timeout,
        } => {
            let client = rhio_client::Client::connect(&node.nats).await?;
            let answer = client
                .request(
                    &subject,
                    body.into_bytes(),
                    std::time::Duration::from_secs_f64(timeout),
                )
                .await?;
            println!("{}", String::from_utf8_lossy(&answer));
        }
        Command::DeadLetters(command) => {
            let client = rhio_client::Client::connect(&node.nats).await?;
            match command {
                DeadLettersCommand::List => {
                    let dead = client.dead_letters().await?;
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&dead)?);
                    } else if dead.is_empty() {
                        println!("no dead letters");
                    } else {
                        for d in &dead {
                            println!(
                                "{} #{} from {}: {} ({})",
                                d.subject,
                                d.seq,
                                &d.author[..d.author.len().min(16)],
                                d.reason,
                                d.detail
                            );
                        }
                    }
                }
                DeadLettersCommand::Replay {
                    all,
                    author,
                    subject,
                    seq,
                } => {
                    let request = match (all, author, subject, seq) {
                        (true, ..) => rhio_client::ReplayRequest::All { all: true },
                        (false, Some(author), Some(subject), Some(seq)) => {
                            rhio_client::ReplayRequest::One {
                                author,
                                subject,
                                seq,
                            }
                        }
                        _ => {
                            return Err(rhio_client::ClientError::Usage(
                                "replay --all, or --author, --subject and --seq".into(),
                            )
                            .into());
                        }
                    };
                    let reply = client.replay_dead_letters(&request).await?;
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&reply)?);
                    } else {
                        println!(
                            "{} delivered, {} dead letters left",
                            reply.replayed.len(),
                            reply.remaining
                        );
                    }
                }
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Args::command(),
                "rhio-client",
                &mut std::io::stdout(),
            );
        }
        Command::Keygen { out } => {
            let (private, public) = rhio_client::generate_key();
            match out {
                Some(path) => {
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|err| {
                            anyhow::anyhow!("cannot create {}: {err}", path.display())
                        })?;
                    writeln!(file, "{private}")?;
                    println!("{public}");
                }
                None => {
                    println!("private_key: {private}");
                    println!("public_key: {public}");
                }
            }
        }
    }
    Ok(())
}
