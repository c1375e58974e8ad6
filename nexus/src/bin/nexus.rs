//! The `nexus` binary: reads its config, checks the database schema, serves
//! the internal API and runs background tasks until SIGINT or SIGTERM.

use anyhow::Context;
use camino::Utf8PathBuf;
use clap::Parser;
use nexus::config::{Config, ConfigFile};
use nexus::server::Server;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(about = "The rack's control-plane service")]
struct Args {
    /// The config file (see smf/nexus/config.toml).
    #[arg(long)]
    config: Utf8PathBuf,
    /// Overrides `database.url` from the config file.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Test builds only: crash and delay points named in $FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let mut config = Config::from_file(&args.config)?;
    if let Some(url) = args.database_url {
        config.database.url = url;
    }
    let log = config.log.to_logger("nexus").context("setting up logging")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let server = Server::start(&config, log.clone())
        .await
        .with_context(|| format!("starting nexus with database {}", config.database.url))?;
    println!("nexus internal API: http://{}", server.internal_address());
    println!("nexus external API: http://{}", server.external_address());
    if let Some(token) = &server.generated_token {
        println!("operator token (generated now, stored in {}): {token}", config.external_api.token_file);
    }
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    slog::info!(log, "shutting down");
    server.shutdown().await;
    Ok(())
}
