//! `rhio-client`: drive and observe rhio nodes from the command line.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "Drive and observe rhio nodes")]
struct Args {
    /// NATS server of the node's cluster.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the node's status (peers, NATS, S3) as JSON.
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
    },
    /// Make a new node key; prints the public key.
    Keygen {
        /// Write the private key to this file (mode 0600; never overwrites).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rhio-client: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Status => {
            let client = rhio_client::Client::connect(&args.nats).await?;
            let status = client.status().await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        Command::Import {
            path,
            dataset,
            subject,
            timeout,
        } => {
            use futures::StreamExt;
            let client = rhio_client::Client::connect(&args.nats).await?;
            let mut progress = client.nats().subscribe("rhio.progress.>").await?;
            let printer = tokio::spawn(async move {
                while let Some(event) = progress.next().await {
                    if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&event.payload) {
                        let done = event["bytes_done"].as_u64().unwrap_or(0);
                        let total = event["bytes_total"].as_u64().unwrap_or(0).max(1);
                        eprint!(
                            "\r{}: {:>5.1}% of {} MiB",
                            event["dataset"].as_str().unwrap_or("?"),
                            done as f64 * 100.0 / total as f64,
                            total >> 20
                        );
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
            eprintln!();
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
            let client = rhio_client::Client::connect(&args.nats).await?;
            let seq = client
                .publish(&subject, &headers, message.into_bytes())
                .await?;
            println!("published {subject} (stream sequence {seq})");
        }
        Command::Subscribe { subject, count } => {
            use futures::StreamExt;
            let client = rhio_client::Client::connect(&args.nats).await?;
            let messages = client.subscribe(&subject).await?;
            let mut messages = std::pin::pin!(messages.take(count.unwrap_or(usize::MAX)));
            eprintln!("listening on {subject}");
            while let Some(message) = messages.next().await {
                let origin = match &message.provenance {
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
