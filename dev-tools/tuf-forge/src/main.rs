//! `tuf-forge`: make keys, roots and signed repository zips for tests and
//! demos. See the library for the layout it writes.

use anyhow::Context;
use camino::Utf8PathBuf;
use clap::{Args, Parser, Subcommand};
use jiff::{Timestamp, ToSpan};
use tuf_forge::{ArtifactSpec, RepoSpec};

#[derive(Parser)]
#[command(about = "Build signed TUF repositories (tuftool's layout) for the rack")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new Ed25519 signing key (PKCS#8 DER).
    Keygen {
        #[arg(long)]
        out: Utf8PathBuf,
    },
    /// Write a root.json in which KEY holds every role.
    Root {
        #[arg(long)]
        key: Utf8PathBuf,
        #[arg(long)]
        out: Utf8PathBuf,
        #[command(flatten)]
        expiry: Expiry,
    },
    /// Write a signed repository zip.
    Repo {
        #[arg(long)]
        key: Utf8PathBuf,
        #[arg(long)]
        root: Utf8PathBuf,
        #[arg(long)]
        system_version: String,
        /// name:version:kind:SIZE_OR_PATH (SIZE like 1048576 or 4MiB: random bytes).
        #[arg(long = "artifact", required = true)]
        artifacts: Vec<ArtifactSpec>,
        #[arg(long)]
        out: Utf8PathBuf,
        #[command(flatten)]
        expiry: Expiry,
        /// Seed for random contents (equal seeds give equal bytes).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args)]
struct Expiry {
    /// Expiry as an RFC 3339 time (may be in the past, for tests).
    #[arg(long, conflicts_with = "expires_in_days")]
    expires: Option<Timestamp>,
    #[arg(long, default_value_t = 7)]
    expires_in_days: i64,
}

impl Expiry {
    fn resolve(&self) -> anyhow::Result<Timestamp> {
        match self.expires {
            Some(time) => Ok(time),
            None => Timestamp::now()
                .checked_add((self.expires_in_days * 24).hours())
                .map_err(|e| anyhow::anyhow!(e)),
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::cli::exit(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            std::fs::write(&out, tuf_forge::generate_key()?).with_context(|| format!("writing {out}"))?;
        }
        Command::Root { key, out, expiry } => {
            let root = tuf_forge::make_root(&key, expiry.resolve()?).await?;
            std::fs::write(&out, root).with_context(|| format!("writing {out}"))?;
        }
        Command::Repo { key, root, system_version, artifacts, out, expiry, seed } => {
            let spec = RepoSpec { system_version, artifacts, expires: expiry.resolve()?, seed };
            tuf_forge::make_repo(&key, &root, &spec, &out).await?;
        }
    }
    Ok(())
}
