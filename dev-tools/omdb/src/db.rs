//! `omdb db ...`: the database's view of sleds and repositories, and a check
//! of every sled against it.

use crate::to_json;
use anyhow::Context;
use clap::{Args, Subcommand};
use common::ArtifactConfig;
use common::api::external::RepoHealth;
use common::api::sled_agent::{ArtifactListResponse, LEDGER_DAMAGED, M2State};
use common::clients::sled_agent::Client as SledClient;
use nexus::db::DataStore;
use nexus::db::datastore::PoolConfig;
use serde::Serialize;
use std::time::Duration;
use tabled::Tabled;

#[derive(Args)]
pub struct DbArgs {
    /// PostgreSQL URL of the rack's database.
    #[arg(long, env = "OMDB_DB_URL", global = true)]
    db_url: Option<String>,
    #[command(subcommand)]
    command: DbCommand,
}

#[derive(Subcommand)]
enum DbCommand {
    /// Every sled ever registered, with its state.
    Sleds,
    /// TUF repositories, newest first (pruned ones included), with their
    /// health and target-release status.
    TufRepos,
    /// Who holds what: sleds × artifacts, asked live (see `--json` too).
    Replication {
        /// Only this repository's artifacts.
        #[arg(long)]
        repo: Option<String>,
    },
    /// The rack's target release and the previous one.
    TargetRelease,
    /// TUF artifacts, of one repository or of all.
    TufArtifacts {
        /// A repository's system version.
        #[arg(long)]
        repo: Option<String>,
    },
    /// The newest inventory collection.
    Inventory,
    /// Checks the database against the sleds.
    #[command(subcommand)]
    Validate(ValidateCommand),
}

#[derive(Subcommand)]
enum ValidateCommand {
    /// For each sled: OK (current generation, holds every artifact on every
    /// healthy M.2), OLD (an older generation), BAD (current generation,
    /// wrong contents), DAMAGED (its newest config ledger copy is unreadable;
    /// it acts on nothing until a config at least that new is pushed), ERROR
    /// (unreachable). Exits non-zero unless all are OK.
    ArtifactReplication,
}

impl DbArgs {
    pub async fn run(self, json: bool, discovered: Option<String>) -> anyhow::Result<String> {
        let url = self.db_url.or(discovered).context(
            "no database to read: pass --db-url URL, set OMDB_DB_URL, or start a rack with `rack-dev run-all`",
        )?;
        let datastore = DataStore::connect(&url, &PoolConfig { max_connections: 4, ..PoolConfig::default() })
            .await
            .with_context(|| format!("connecting to the database at {url}"))?;
        match self.command {
            DbCommand::Sleds => sleds(&datastore, json).await,
            DbCommand::TufRepos => tuf_repos(&datastore, json).await,
            DbCommand::Replication { repo } => {
                crate::replication::replication(&datastore, repo.as_deref(), json).await
            }
            DbCommand::TargetRelease => target_release(&datastore, json).await,
            DbCommand::Inventory => inventory(&datastore, json).await,
            DbCommand::TufArtifacts { repo } => tuf_artifacts(&datastore, repo.as_deref(), json).await,
            DbCommand::Validate(ValidateCommand::ArtifactReplication) => validate(&datastore, json).await,
        }
    }
}

#[derive(Tabled, Serialize)]
struct SledRow {
    #[tabled(rename = "ID")]
    id: String,
    #[tabled(rename = "SERIAL")]
    serial: String,
    #[tabled(rename = "STATE")]
    state: String,
    #[tabled(rename = "API")]
    api: String,
    #[tabled(rename = "DEPOT PORT")]
    repo_depot_port: i32,
    #[tabled(rename = "REGISTERED")]
    time_created: String,
    #[tabled(rename = "LAST SEEN")]
    time_modified: String,
}

async fn sleds(datastore: &DataStore, json: bool) -> anyhow::Result<String> {
    let rows: Vec<SledRow> = datastore
        .sled_list_all()
        .await?
        .into_iter()
        .map(|sled| SledRow {
            id: sled.id.to_string(),
            serial: sled.serial,
            state: match sled.time_expunged {
                Some(time) => format!("expunged {}", crate::render::time(&time)),
                None => "in service".into(),
            },
            api: format!("{}:{}", sled.ip, sled.port),
            repo_depot_port: sled.repo_depot_port,
            time_created: crate::render::time(&sled.time_created),
            time_modified: crate::render::time(&sled.time_modified),
        })
        .collect();
    Ok(if json { to_json(&rows) } else { crate::render::table(rows) })
}

#[derive(Tabled, Serialize)]
struct RepoRow {
    #[tabled(rename = "SYSTEM VERSION")]
    system_version: String,
    #[tabled(rename = "ID")]
    id: String,
    #[tabled(rename = "FILE")]
    file_name: String,
    #[tabled(rename = "ARTIFACTS")]
    artifacts: usize,
    /// The latest upload (a re-upload of a pruned repository revives it).
    #[tabled(rename = "UPLOADED")]
    time_last_uploaded: String,
    #[tabled(rename = "PRUNED")]
    pruned: String,
    #[tabled(rename = "HEALTH")]
    health: String,
    #[tabled(rename = "TARGET")]
    target: String,
    /// Artifacts that are not replicated, with where their copies are.
    #[tabled(skip)]
    detail: Vec<String>,
}

async fn tuf_repos(datastore: &DataStore, json: bool) -> anyhow::Result<String> {
    let page = nexus::db::datastore::TufRepoPage { limit: u32::MAX, after: None };
    let repos = datastore.tuf_repo_list(&page).await?;
    let ids: Vec<uuid::Uuid> = repos.iter().map(|repo| repo.id).collect();
    let health = datastore.repo_health_get(&ids).await?;
    let targets = datastore.target_releases().await?;
    let target_of = |id: uuid::Uuid| {
        let is = |release: &Option<(nexus::db::model::TargetRelease, nexus::db::model::TufRepo)>| {
            release.as_ref().is_some_and(|(_, repo)| repo.id == id)
        };
        if is(&targets.current) {
            "current"
        } else if is(&targets.previous) {
            "previous"
        } else {
            "-"
        }
    };
    let mut rows = Vec::new();
    for repo in repos {
        let artifacts = datastore.tuf_repo_get_by_version(&repo.system_version).await?.artifacts.len();
        let view = health.get(&repo.id).and_then(|row| row.view());
        let detail = view
            .iter()
            .flat_map(|view| &view.artifacts)
            .filter(|artifact| artifact.state != RepoHealth::Replicated)
            .map(|artifact| {
                let sleds: Vec<String> =
                    artifact.sleds.iter().map(|(sled, n)| format!("{sled} ({n})")).collect();
                format!(
                    "{} {} {} ({}): {} on {} [{}]{}",
                    repo.system_version,
                    artifact.name,
                    artifact.version,
                    artifact.kind,
                    nexus::db::datastore::health_state_to_sql(artifact.state),
                    common::cli::count_of(artifact.sleds.len(), "sled"),
                    sleds.join(", "),
                    if artifact.staged_by.is_empty() { ", staged nowhere" } else { ", staged" }
                )
            })
            .collect();
        rows.push(RepoRow {
            target: target_of(repo.id).to_string(),
            health: match (&repo.time_pruned, &view) {
                (Some(_), _) => "-".into(),
                (None, Some(view)) => nexus::db::datastore::health_state_to_sql(view.state).to_uppercase(),
                (None, None) => "unknown".into(),
            },
            system_version: repo.system_version,
            id: repo.id.to_string(),
            file_name: repo.file_name,
            artifacts,
            time_last_uploaded: crate::render::time(&repo.time_last_uploaded),
            pruned: repo.time_pruned.map(|t| crate::render::time(&t)).unwrap_or_else(|| "-".into()),
            detail,
        });
    }
    if json {
        return Ok(to_json(&rows));
    }
    let details: Vec<String> = rows.iter().flat_map(|row| row.detail.clone()).collect();
    let mut out = crate::render::table(rows);
    if !details.is_empty() {
        out += "artifacts not replicated:\n";
        for line in details {
            out += &format!("  {line}\n");
        }
    }
    Ok(out)
}

async fn target_release(datastore: &DataStore, json: bool) -> anyhow::Result<String> {
    let releases = datastore.target_releases().await?;
    let describe = |release: &Option<(nexus::db::model::TargetRelease, nexus::db::model::TufRepo)>| {
        release.as_ref().map(|(release, repo)| {
            serde_json::json!({
                "generation": release.generation,
                "system_version": repo.system_version,
                "repo_id": repo.id,
                "time_requested": release.time_requested,
                "requested_by": release.requested_by,
            })
        })
    };
    let (current, previous) = (describe(&releases.current), describe(&releases.previous));
    if json {
        return Ok(to_json(&serde_json::json!({"current": current, "previous": previous})));
    }
    let line =
        |label: &str, release: &Option<(nexus::db::model::TargetRelease, nexus::db::model::TufRepo)>| {
            match release {
                Some((release, repo)) => format!(
                    "{label}: {} (generation {}, set {} by {})\n",
                    repo.system_version,
                    release.generation,
                    crate::render::time(&release.time_requested),
                    release.requested_by
                ),
                None => format!("{label}: none\n"),
            }
        };
    Ok(line("target release", &releases.current) + &line("previous", &releases.previous))
}

#[derive(Tabled, Serialize)]
struct ArtifactRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "VERSION")]
    version: String,
    #[tabled(rename = "KIND")]
    kind: String,
    #[tabled(rename = "SHA256")]
    sha256: String,
    #[tabled(rename = "SIZE")]
    size: i64,
    #[tabled(rename = "GEN ADDED")]
    generation_added: i64,
}

async fn tuf_artifacts(datastore: &DataStore, repo: Option<&str>, json: bool) -> anyhow::Result<String> {
    let artifacts = match repo {
        Some(version) => datastore.tuf_repo_get_by_version(version).await?.artifacts,
        None => {
            let mut all = std::collections::BTreeMap::new();
            let page = nexus::db::datastore::TufRepoPage { limit: u32::MAX, after: None };
            for repo in datastore.tuf_repo_list(&page).await? {
                for artifact in datastore.tuf_repo_get_by_version(&repo.system_version).await?.artifacts {
                    all.insert(artifact.id, artifact);
                }
            }
            let mut all: Vec<_> = all.into_values().collect();
            all.sort_by_key(|a| a.artifact_id());
            all
        }
    };
    let rows: Vec<ArtifactRow> = artifacts
        .into_iter()
        .map(|a| ArtifactRow {
            name: a.name,
            version: a.version,
            kind: a.kind,
            sha256: a.sha256.0.to_string(),
            size: a.size,
            generation_added: a.generation_added,
        })
        .collect();
    Ok(if json { to_json(&rows) } else { crate::render::table(rows) })
}

#[derive(Tabled, Serialize)]
struct ValidationRow {
    #[tabled(rename = "SLED")]
    serial: String,
    #[tabled(rename = "ID")]
    id: String,
    #[tabled(rename = "STATUS")]
    status: String,
    #[tabled(rename = "GENERATION")]
    generation: String,
    #[tabled(rename = "DETAIL")]
    detail: String,
}

/// The verdict for one sled.
fn judge(
    config: &ArtifactConfig,
    sled_config: &ArtifactConfig,
    list: &ArtifactListResponse,
    healthy_m2: usize,
) -> (&'static str, String) {
    if sled_config.generation < config.generation {
        return ("OLD", format!("database is at generation {}", config.generation));
    }
    if sled_config.generation > config.generation {
        return ("BAD", format!("ahead of the database (generation {})", config.generation));
    }
    if sled_config.artifacts != config.artifacts {
        return ("BAD", "same generation, different artifact set".to_string());
    }
    let missing = config.artifacts.iter().filter(|hash| !list.list.contains_key(hash)).count();
    let short =
        config.artifacts.iter().filter(|hash| list.list.get(hash).is_some_and(|&n| n < healthy_m2)).count();
    if missing > 0 || short > 0 {
        return (
            "BAD",
            format!("{missing} artifacts missing, {short} on fewer than {healthy_m2} healthy M.2s"),
        );
    }
    ("OK", format!("{} artifacts on {healthy_m2} healthy M.2s", config.artifacts.len()))
}

async fn validate(datastore: &DataStore, json: bool) -> anyhow::Result<String> {
    let config = datastore.tuf_artifact_config().await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let mut rows = Vec::new();
    for sled in datastore.sled_list().await? {
        let client = SledClient::new_with_client(&format!("http://{}:{}", sled.ip, sled.port), http.clone());
        let observed = async {
            let sled_config = client.artifact_config_get().await?.into_inner();
            let list = client.artifact_list().await?.into_inner();
            let inventory = client.inventory().await?.into_inner();
            let healthy = inventory.m2.iter().filter(|m2| m2.state == M2State::Healthy).count();
            Ok::<_, common::clients::sled_agent::Error<common::clients::sled_agent::types::Error>>((
                sled_config,
                list,
                healthy,
            ))
        }
        .await;
        let (status, generation, detail) = match observed {
            Ok((sled_config, list, healthy)) => {
                let (status, detail) = judge(&config, &sled_config, &list, healthy);
                (status, sled_config.generation.to_string(), detail)
            }
            Err(common::clients::sled_agent::Error::ErrorResponse(response))
                if response.error_code.as_deref() == Some(LEDGER_DAMAGED) =>
            {
                ("DAMAGED", "-".to_string(), response.into_inner().message)
            }
            Err(error) => ("ERROR", "-".to_string(), common::error_chain(&error)),
        };
        rows.push(ValidationRow {
            serial: sled.serial,
            id: sled.id.to_string(),
            status: status.to_string(),
            generation,
            detail,
        });
    }
    let all_ok = rows.iter().all(|row| row.status == "OK");
    let output = if json {
        to_json(&rows)
    } else {
        format!(
            "database artifact config: generation {}, {} artifacts\n{}",
            config.generation,
            config.artifacts.len(),
            crate::render::table(rows)
        )
    };
    if all_ok { Ok(output) } else { Err(crate::PartialFailure(output).into()) }
}

#[derive(Tabled, Serialize)]
struct InventoryRow {
    #[tabled(rename = "SLED")]
    sled_id: String,
    #[tabled(rename = "GENERATION")]
    generation: String,
    #[tabled(rename = "M.2 SLOTS (state used/quota)")]
    m2: String,
    #[tabled(rename = "LEDGER")]
    ledger: String,
    #[tabled(rename = "ERROR")]
    error: String,
}

async fn inventory(datastore: &DataStore, json: bool) -> anyhow::Result<String> {
    let Some(inventory) = datastore.inventory_latest().await? else {
        return Ok("no inventory collected yet (activate inventory_collection)\n".to_string());
    };
    let rows: Vec<InventoryRow> = inventory
        .sleds
        .iter()
        .map(|sled| InventoryRow {
            sled_id: sled.sled_id.to_string(),
            generation: sled.artifact_generation.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            m2: inventory
                .m2s
                .iter()
                .filter(|m2| m2.sled_id == sled.sled_id)
                .map(|m2| format!("{}: {} {}/{}", m2.slot, m2.state, m2.used_bytes, m2.quota_bytes))
                .collect::<Vec<_>>()
                .join(", "),
            ledger: match &sled.ledger_damage {
                None if sled.error.is_some() => "-".to_string(),
                None => "ok".to_string(),
                Some(damage) => format!("DAMAGED: {}", damage.replace('\n', "; ")),
            },
            error: sled.error.clone().unwrap_or_default(),
        })
        .collect();
    let collection = &inventory.collection;
    Ok(if json {
        to_json(&rows)
    } else {
        format!(
            "collection {} by {}, {} to {}\n{}",
            collection.id,
            collection.collector,
            crate::render::time(&collection.time_started),
            crate::render::time(&collection.time_done),
            crate::render::table(rows)
        )
    })
}
