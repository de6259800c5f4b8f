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
