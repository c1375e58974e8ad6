//! The `sled-agent` binary: runs one simulated sled until SIGINT or SIGTERM.

use anyhow::Context;
use camino::Utf8PathBuf;
use clap::Parser;
use sled_agent::config::{Config, ConfigFile};
use sled_agent::server::Server;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(about = "A simulated sled: artifact store on M.2 directories, repo depot, registration")]
struct Args {
    /// The config file (see smf/sled-agent/config.toml).
    #[arg(long)]
    config: Utf8PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Test builds only: crash points named in $FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let config = Config::from_file(&args.config)?;
    let log = config.log.to_logger("sled-agent").context("setting up logging")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let server = Server::start(&config, log.clone()).await.context("starting the sled agent")?;
    println!("sled {} ({})", server.sled_id, server.serial);
    println!("sled-agent API: http://{}", server.api_address());
    println!("repo depot: http://{}", server.depot_address());
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}
