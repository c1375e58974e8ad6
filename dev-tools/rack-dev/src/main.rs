//! `rack-dev`: run, operate and measure the rack on one machine.
//!
//! - `run-all`: PostgreSQL, Nexus and simulated sleds, until Ctrl-C.
//! - `db-run`: a private PostgreSQL server with the current schema.
//! - `db-upgrade`: bring an existing database to the schema this build needs.
//! - `repo ...`, `trust-root ...`: the operator's side of the external API.
//! - `bench ...`: performance against baselines measured in the same run.

mod bench;
mod bench_failover;
mod bench_fanout;
mod bench_startup;
mod netns;
mod operator;
mod run_all;

use anyhow::Context;
use clap::{Parser, Subcommand};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use nexus::db::schema_version::{self, SCHEMA_VERSION, UpgradeOutcome};
use std::io::Write;
use test_harness::PgServer;
use tokio::signal::unix::{SignalKind, signal};

/// The database that `db-run` creates and Nexus uses.
const DATABASE_NAME: &str = "rack";

#[derive(Parser)]
#[command(about = "Run, operate and measure the rack control plane on one machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole rack: PostgreSQL, Nexus and simulated sleds, until Ctrl-C.
    RunAll(run_all::RunAllArgs),
    /// Start a private PostgreSQL server with the current schema and keep it
    /// running until Ctrl-C (or SIGTERM); then stop it and delete its data.
    DbRun,
    /// Initialize an empty database, or apply the migrations an older one
    /// lacks, each in its own transaction.
    DbUpgrade {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// After the primary of `run-all --db-standbys N` died: promote the
    /// standby that received the most WAL (`pg_ctl promote`), so that no
    /// acknowledged commit is lost. Refused while any server accepts writes.
    DbPromote,
    /// TUF repositories: upload, list, show.
    Repo {
        #[command(flatten)]
        connection: operator::Connection,
        #[command(subcommand)]
        command: operator::RepoCommand,
    },
    /// Measure performance against baselines from the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The rack's sleds: list them, expunge one.
    Sled {
        #[command(flatten)]
        connection: operator::Connection,
        #[command(subcommand)]
        command: operator::SledCommand,
    },
    /// The rack's target release: show it, set it.
    TargetRelease {
        #[command(flatten)]
        connection: operator::Connection,
        #[command(subcommand)]
        command: operator::TargetReleaseCommand,
    },
    /// The links of a rack run with --netns: limits, down/up, partitions.
    #[command(subcommand)]
    Link(netns::LinkCommand),
    /// Trust roots that uploaded repositories must be signed under.
    TrustRoot {
        #[command(flatten)]
        connection: operator::Connection,
        #[command(subcommand)]
        command: operator::TrustRootCommand,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::cli::exit(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::RunAll(args) => run_all::run_all(args).await,
        Command::Bench(command) => bench::bench(command).await,
        Command::DbRun => db_run().await,
        Command::DbUpgrade { database_url } => db_upgrade(&database_url).await,
        Command::DbPromote => db_promote().await,
        Command::Repo { connection, command } => operator::repo(&connection, command).await,
        Command::TrustRoot { connection, command } => operator::trust_root(&connection, command).await,
        Command::Sled { connection, command } => operator::sled(&connection, command).await,
        Command::Link(command) => netns::link(command),
        Command::TargetRelease { connection, command } => {
            operator::target_release(&connection, command).await
        }
    }
}

async fn db_run() -> anyhow::Result<()> {
    // Listen before starting, so a signal during start-up is not lost.
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut server = PgServer::start().await.context("starting PostgreSQL")?;
    let url = server.create_database(DATABASE_NAME).await.context("creating the rack database")?;
    upgrade(&url).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "PostgreSQL is running with schema version {SCHEMA_VERSION}.")?;
    writeln!(out, "  database URL: {url}")?;
    writeln!(out, "  server log:   {}", server.log_path().display())?;
    writeln!(out, "Press Ctrl-C to stop it; its data directory is deleted then.")?;
    out.flush()?;
    drop(out);

    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    server.stop();
    println!("PostgreSQL stopped and its data directory removed.");
    Ok(())
}

async fn db_promote() -> anyhow::Result<()> {
    let path = common::discovery::path();
    let discovery = common::discovery::RackDiscovery::load()
        .with_context(|| format!("no running rack-dev run-all found at {}", path.display()))?;
    if discovery.database_servers.len() < 2 {
        anyhow::bail!(
            "the rack at {} has no standby to promote (start it with run-all --db-standbys N)",
            path.display()
        );
    }
    let servers: Vec<test_harness::ServerAddress> = discovery
        .database_servers
        .iter()
        .map(|server| test_harness::ServerAddress {
            name: server.name.clone(),
            port: server.port,
            dir: server.dir.clone().into(),
        })
        .collect();
    let (promoted, positions) =
        test_harness::promote_furthest_along(&servers).await.context("promoting a standby")?;
    for position in &positions {
        println!("{}: standby with WAL up to {}", position.server.name, position.lsn_text());
    }
    println!(
        "promoted {} (port {}): it has the most WAL; Nexus reconnects to it by itself",
        promoted.server.name, promoted.server.port
    );
    Ok(())
}

async fn db_upgrade(url: &str) -> anyhow::Result<()> {
    match upgrade(url).await? {
        UpgradeOutcome::Initialized => println!("initialized an empty database at version {SCHEMA_VERSION}"),
        UpgradeOutcome::Migrated { from, applied } => {
            println!("upgraded from {from} to {SCHEMA_VERSION}: applied {}", applied.join(", "))
        }
        UpgradeOutcome::AlreadyCurrent => println!("already at version {SCHEMA_VERSION}; nothing to do"),
    }
    Ok(())
}

async fn upgrade(url: &str) -> anyhow::Result<UpgradeOutcome> {
    let mut conn = AsyncPgConnection::establish(url).await.with_context(|| format!("connecting to {url}"))?;
    schema_version::upgrade(&mut conn).await.with_context(|| format!("upgrading the schema of {url}"))
}
