//! omdb: the rack's debugger. It shows what each part of the control plane
//! believes: Nexus's background tasks (internal API), the database, and each
//! sled agent.
//!
//! Human output by default; `--json` prints machine-readable JSON. Without
//! URLs, it finds the rack that `rack-dev run-all` is running.

mod db;
mod nexus;
mod render;
mod replication;
mod sled_agent;

use clap::{Parser, Subcommand};
use common::discovery::RackDiscovery;

#[derive(Parser)]
#[command(about = "Debugger for the rack control plane")]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Talk to a Nexus's internal API.
    Nexus(nexus::NexusArgs),
    /// Read the database.
    Db(db::DbArgs),
    /// Talk to one sled agent.
    SledAgent(sled_agent::SledAgentArgs),
}

/// A command that produced output but found problems: the output is printed
/// and omdb exits non-zero.
#[derive(Debug, thiserror::Error)]
#[error("problems found")]
pub struct PartialFailure(pub String);

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let discovered = RackDiscovery::load();
    let result = match cli.command {
        Command::Nexus(args) => {
            args.run(
                cli.json,
                discovered.as_ref().and_then(|d| d.nexus.first()).map(|n| n.internal_url.clone()),
            )
            .await
        }
        Command::Db(args) => args.run(cli.json, discovered.map(|d| d.database_url)).await,
        Command::SledAgent(args) => args.run(cli.json).await,
    };
    match result {
        Ok(output) => print!("{output}"),
        Err(error) => {
            if let Some(PartialFailure(output)) = error.downcast_ref::<PartialFailure>() {
                print!("{output}");
            } else {
                eprintln!("{}", common::cli::report(&error));
            }
            std::process::exit(1);
        }
    }
}

pub fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("API values serialize") + "\n"
}

/// A sled agent's error response as its own message.
pub fn sled_error(
    error: common::clients::sled_agent::Error<common::clients::sled_agent::types::Error>,
) -> anyhow::Error {
    match error {
        common::clients::sled_agent::Error::ErrorResponse(response) => {
            anyhow::anyhow!("{} ({})", response.message, response.status())
        }
        other => anyhow::Error::new(other),
    }
}
