//! `omdb sled-agent ...`: one sled's own view.

use crate::to_json;
use clap::{Args, Subcommand};
use common::clients::sled_agent::Client;
use serde::Serialize;
use tabled::Tabled;

#[derive(Args)]
pub struct SledAgentArgs {
    #[command(subcommand)]
    command: SledAgentCommand,
}

#[derive(Subcommand)]
enum SledAgentCommand {
    /// The sled's artifact config generation, what it holds, copies that
    /// failed, ledger damage, and its M.2s.
    Artifacts {
        /// The sled-agent API, e.g. http://127.0.0.1:12345.
        #[arg(long, env = "OMDB_SLED_URL")]
        sled_url: String,
    },
}

#[derive(Tabled, Serialize)]
struct ArtifactRow {
    #[tabled(rename = "SHA256")]
    sha256: String,
    #[tabled(rename = "COPIES")]
    copies: usize,
}

#[derive(Tabled, Serialize)]
struct M2Row {
    #[tabled(rename = "SLOT")]
    slot: u32,
    #[tabled(rename = "STATE")]
    state: String,
    #[tabled(rename = "USED")]
    used: u64,
    #[tabled(rename = "QUOTA")]
    quota: u64,
    #[tabled(rename = "FILES")]
    files: usize,
    #[tabled(rename = "PATH")]
    path: String,
}

#[derive(Tabled, Serialize)]
struct CopyFailureRow {
    #[tabled(rename = "SHA256")]
    sha256: String,
    #[tabled(rename = "FAILURES")]
    failures: u32,
    #[tabled(rename = "LAST FAILED")]
    time: String,
    #[tabled(rename = "LAST ERROR")]
    error: String,
}

#[derive(Tabled, Serialize)]
struct UnreadableRow {
    #[tabled(rename = "SLOT")]
    slot: u32,
    #[tabled(rename = "SHA256")]
    sha256: String,
    #[tabled(rename = "SINCE")]
    since: String,
    #[tabled(rename = "PROBLEM")]
    problem: String,
}

impl SledAgentArgs {
    pub async fn run(self, json: bool) -> anyhow::Result<String> {
        let SledAgentCommand::Artifacts { sled_url } = self.command;
        let client = Client::new(&sled_url);
        let list = client.artifact_list().await.map_err(crate::sled_error)?.into_inner();
        let inventory = client.inventory().await.map_err(crate::sled_error)?.into_inner();
        // A sled with a damaged ledger no longer knows its config's artifacts.
        let config = if list.ledger_damage.is_empty() {
            Some(client.artifact_config_get().await.map_err(crate::sled_error)?.into_inner())
        } else {
            None
        };
        if json {
            return Ok(to_json(&serde_json::json!({"config": config, "list": list, "inventory": inventory})));
        }
        let m2s: Vec<M2Row> = inventory
            .m2
            .iter()
            .map(|m2| M2Row {
                slot: m2.slot,
                state: format!("{:?}", m2.state).to_lowercase(),
                used: m2.used_bytes,
                quota: m2.quota_bytes,
                files: m2.artifacts,
                path: m2.path.clone(),
            })
            .collect();
        let mut out = format!("sled {} ({}): ", inventory.serial, inventory.sled_id);
        match &config {
            Some(config) => {
                let artifacts: Vec<ArtifactRow> = config
                    .artifacts
                    .iter()
                    .map(|hash| ArtifactRow {
                        sha256: hash.to_string(),
                        copies: list.list.get(hash).copied().unwrap_or(0),
                    })
                    .collect();
                out += &format!(
                    "artifact config generation {}, {} artifacts\n{}\n",
                    config.generation,
                    config.artifacts.len(),
                    crate::render::table(artifacts)
                );
            }
            None => {
                out += &format!(
                    "artifact config ledger DAMAGED at generation {}: the sled acts on nothing until a \
                     config of that generation or newer is pushed\n",
                    list.generation
                );
                for damage in &list.ledger_damage {
                    out += &format!("  {damage}\n");
                }
            }
        }
        if !list.copies_in_flight.is_empty() {
            out += &format!("copies in flight: {}\n", list.copies_in_flight.len());
        }
        if let Some(rate) = list.copy_bytes_per_sec {
            out += &format!(
                "copy rate (best total over 5 min): {:.1} MiB/s\n",
                rate as f64 / f64::from(1 << 20)
            );
        }
        if !list.copy_failures.is_empty() {
            let failures: Vec<CopyFailureRow> = list
                .copy_failures
                .iter()
                .map(|(hash, failure)| CopyFailureRow {
                    sha256: hash.to_string(),
                    failures: failure.failures,
                    time: crate::render::time(&failure.time_last_failed),
                    error: failure.last_error.clone(),
                })
                .collect();
            out += &format!("failed copies:\n{}\n", crate::render::table(failures));
        }
        if !inventory.unreadable.is_empty() {
            let unreadable: Vec<UnreadableRow> = inventory
                .unreadable
                .iter()
                .map(|copy| UnreadableRow {
                    slot: copy.slot,
                    sha256: copy.sha256.to_string(),
                    since: crate::render::time(&copy.since),
                    problem: copy.problem.clone(),
                })
                .collect();
            out += &format!(
                "unreadable copies (kept, not counted as held; the next scrub pass reads them again):\n{}\n",
                crate::render::table(unreadable)
            );
        }
        out += &crate::render::table(m2s);
        Ok(out)
    }
}
