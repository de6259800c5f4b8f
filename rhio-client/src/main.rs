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
