//! omdb: the rack's debugger. It shows what each part of the control plane
//! believes: Nexus's background tasks (over the internal API), and later the
//! database and each sled agent.
//!
//! Human output by default; `--json` prints the API's own JSON.

mod nexus;
mod render;

use clap::{Parser, Subcommand};

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let output = match cli.command {
        Command::Nexus(args) => args.run(cli.json).await?,
    };
    print!("{output}");
    Ok(())
}
