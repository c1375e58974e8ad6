//! The `nexus` binary: reads its config, checks the database schema, serves
//! the internal API and runs background tasks until SIGINT or SIGTERM.

use anyhow::Context;
use camino::Utf8PathBuf;
use clap::Parser;
use nexus::config::{Config, ConfigFile};
use nexus::server::Server;
use std::io::IsTerminal;
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
        let token_file = &config.external_api.token_file;
        // A service's stdout goes to its log, which outlives the moment and
        // is read by more people than the operator: the token itself is
        // shown only to a person at a terminal, and is always in the file.
        if std::io::stdout().is_terminal() {
            println!("operator token (generated now, stored in {token_file}): {token}");
        } else {
            println!("operator token generated now and stored in {token_file} (mode 0600)");
        }
    }
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    slog::info!(log, "shutting down");
    server.shutdown().await;
    Ok(())
}
