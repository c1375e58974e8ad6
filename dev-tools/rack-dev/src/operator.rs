//! `rack-dev repo ...`, `rack-dev trust-root ...`, `rack-dev sled ...` and
//! `rack-dev target-release ...`: what an operator does
//! with the external API. Without `--nexus-url`/`--token` (or
//! `RACK_NEXUS_URL`/`RACK_TOKEN`) they use the rack `rack-dev run-all` runs.

use anyhow::{Context, bail};
use camino::Utf8PathBuf;
use clap::{Args, Subcommand};
use common::api::external::{
    RepoHealth, SledState, SledView, TargetReleaseRequest, TargetReleaseView, TrustRootView, TufRepoView,
};
use common::clients::external::{self, Client, Error as ApiError};
use common::discovery::RackDiscovery;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;
use tabled::Tabled;
use tabled::settings::Style;

#[derive(Args)]
pub struct Connection {
    /// The Nexus external API, e.g. http://127.0.0.1:12220.
    #[arg(long, env = "RACK_NEXUS_URL", global = true)]
    nexus_url: Option<String>,
    /// The operator's bearer token.
    #[arg(long, env = "RACK_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
}

impl Connection {
    fn resolve(&self) -> anyhow::Result<(String, String)> {
        let discovered = RackDiscovery::load();
        let url = self
            .nexus_url
            .clone()
            .or_else(|| discovered.as_ref()?.nexus.first().map(|n| n.external_url.clone()))
            .context(
                "no Nexus to talk to: pass --nexus-url URL, set RACK_NEXUS_URL, or start `rack-dev run-all`",
            )?;
        let token = self
            .token
            .clone()
            .or_else(|| discovered.as_ref()?.token())
            .context("no operator token: pass --token, set RACK_TOKEN, or start `rack-dev run-all`")?;
        Ok((url, token))
    }

    fn client(&self) -> anyhow::Result<(String, String, Client)> {
        let (url, token) = self.resolve()?;
        let client = external::authenticated(&url, &token);
        Ok((url, token, client))
    }
}

#[derive(Subcommand)]
pub enum RepoCommand {
    /// Upload a repository zip, with a progress bar.
    Upload { file: Utf8PathBuf },
    /// Repositories, newest first.
    List,
    /// One repository, its artifacts and its replication progress.
    Show { system_version: String },
}

#[derive(Subcommand)]
pub enum SledCommand {
    /// Every sled ever registered, with its state.
    List,
    /// Expunge a sled: final. It gets no more requests, its copies stop
    /// counting, its registration is refused.
    Expunge { sled_id: uuid::Uuid },
}

#[derive(Subcommand)]
pub enum TargetReleaseCommand {
    /// The target release and the previous one.
    Show,
    /// Set the target release; refused unless the repository is replicated.
    Set { system_version: String },
}

#[derive(Subcommand)]
pub enum TrustRootCommand {
    /// Trust repositories signed under this root.json.
    Add {
        file: Utf8PathBuf,
    },
    List,
    Delete {
        id: uuid::Uuid,
    },
}

pub async fn repo(connection: &Connection, command: RepoCommand) -> anyhow::Result<()> {
    let (url, token, client) = connection.client()?;
    match command {
        RepoCommand::Upload { file } => upload(&url, &token, &file).await,
        RepoCommand::List => {
            let mut repos = Vec::new();
            let mut page_token = None;
            loop {
                let page = client
                    .repository_list(None, page_token.as_deref())
                    .await
                    .map_err(api_error)?
                    .into_inner();
                repos.extend(page.items);
                match page.next_page {
                    Some(next) => page_token = Some(next),
                    None => break,
                }
            }
            print!("{}", repo_table(&repos));
            Ok(())
        }
        RepoCommand::Show { system_version } => {
            let repo = client.repository_view(&system_version).await.map_err(api_error)?.into_inner();
            print!("{}", repo_details(&repo));
            Ok(())
        }
    }
}

pub async fn trust_root(connection: &Connection, command: TrustRootCommand) -> anyhow::Result<()> {
    let (_, _, client) = connection.client()?;
    match command {
        TrustRootCommand::Add { file } => {
            let text = std::fs::read(&file).with_context(|| format!("reading {file}"))?;
            let root: serde_json::Value =
                serde_json::from_slice(&text).with_context(|| format!("{file} is not JSON"))?;
            let created = client.trust_root_create(&root).await.map_err(api_error)?.into_inner();
            println!("added trust root {}", created.id);
        }
        TrustRootCommand::List => {
            print!("{}", trust_root_table(&client.trust_root_list().await.map_err(api_error)?.into_inner()))
        }
        TrustRootCommand::Delete { id } => {
            client.trust_root_delete(&id).await.map_err(api_error)?;
            println!("deleted trust root {id}");
        }
    }
    Ok(())
}

pub async fn sled(connection: &Connection, command: SledCommand) -> anyhow::Result<()> {
    let (_, _, client) = connection.client()?;
    match command {
        SledCommand::List => {
            print!("{}", sled_table(&client.sled_list().await.map_err(api_error)?.into_inner()))
        }
        SledCommand::Expunge { sled_id } => {
            let sled = client.sled_expunge(&sled_id).await.map_err(api_error)?.into_inner();
            println!("sled {} ({}) is expunged", sled.id, sled.serial);
        }
    }
    Ok(())
}

pub async fn target_release(connection: &Connection, command: TargetReleaseCommand) -> anyhow::Result<()> {
    let (_, _, client) = connection.client()?;
    match command {
        TargetReleaseCommand::Show => {
            let status = client.target_release_view().await.map_err(api_error)?.into_inner();
            let line = |label: &str, release: &Option<TargetReleaseView>| match release {
                Some(release) => format!(
                    "{label}: {} (generation {}, set {} by {})\n",
                    release.system_version,
                    release.generation,
                    release.time_requested.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    release.requested_by
                ),
                None => format!("{label}: none\n"),
            };
            print!("{}{}", line("target release", &status.current), line("previous", &status.previous));
        }
        TargetReleaseCommand::Set { system_version } => {
            let request = TargetReleaseRequest { system_version };
            let set = client.target_release_set(&request).await.map_err(api_error)?.into_inner();
            println!("target release is now {} (generation {})", set.system_version, set.generation);
        }
    }
    Ok(())
}

#[derive(Tabled)]
struct SledRow {
    #[tabled(rename = "ID")]
    id: String,
    #[tabled(rename = "SERIAL")]
    serial: String,
    #[tabled(rename = "STATE")]
    state: String,
    #[tabled(rename = "ADDRESS")]
    address: String,
}

fn sled_table(sleds: &[SledView]) -> String {
    let rows = sleds.iter().map(|sled| SledRow {
        id: sled.id.to_string(),
        serial: sled.serial.clone(),
        state: match (sled.state, sled.time_expunged) {
            (SledState::InService, _) => "in service".into(),
            (SledState::Expunged, Some(time)) => {
                format!("expunged {}", time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            }
            (SledState::Expunged, None) => "expunged".into(),
        },
        address: format!("{}:{}", sled.ip, sled.port),
    });
    format!("{}\n", tabled::Table::new(rows).with(Style::blank()))
}

/// Streams the file with a progress bar (bytes, rate, ETA), then prints what
/// was recorded.
async fn upload(url: &str, token: &str, file: &Utf8PathBuf) -> anyhow::Result<()> {
    let length = std::fs::metadata(file).with_context(|| format!("reading {file}"))?.len();
    let name = file.file_name().with_context(|| format!("{file} has no file name"))?.to_string();
    let handle = tokio::fs::File::open(file).await.with_context(|| format!("opening {file}"))?;
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("uploading {name}"));
    let counting_bar = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(handle).inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            counting_bar.inc(chunk.len() as u64);
        }
    });
    let client = external::authenticated(url, token);
    let result = client.repository_upload(&name, reqwest::Body::wrap_stream(stream)).await;
    bar.finish_and_clear();
    let response = result.map_err(api_error)?.into_inner();
    let status = match response.status {
        common::api::external::TufRepoUploadStatus::Inserted => "inserted",
        common::api::external::TufRepoUploadStatus::AlreadyExists => "already existed",
    };
    println!("repository {} {status} ({length} bytes uploaded)", response.repo.system_version);
    print!("{}", repo_details(&response.repo));
    Ok(())
}

#[derive(Tabled)]
struct RepoRow {
    #[tabled(rename = "SYSTEM VERSION")]
    version: String,
    #[tabled(rename = "ARTIFACTS")]
    artifacts: usize,
    #[tabled(rename = "UPLOADED")]
    uploaded: String,
    #[tabled(rename = "PRUNED")]
    pruned: String,
    #[tabled(rename = "HEALTH")]
    health: String,
    #[tabled(rename = "REPLICATED")]
    replicated: String,
    #[tabled(rename = "FILE")]
    file: String,
}

pub fn health_word(state: RepoHealth) -> &'static str {
    match state {
        RepoHealth::Replicated => "replicated",
        RepoHealth::Replicating => "replicating",
        RepoHealth::Degraded => "DEGRADED",
        RepoHealth::Lost => "LOST",
    }
}

fn health(repo: &TufRepoView) -> String {
    match (&repo.time_pruned, &repo.health) {
        (Some(_), _) => "-".into(),
        (None, Some(health)) => health_word(health.state).into(),
        (None, None) => "unknown".into(),
    }
}

fn progress(repo: &TufRepoView) -> String {
    match &repo.replication {
        Some(p) => format!("{}/{} sleds", p.sleds_complete, p.sleds_in_service),
        None => "unknown".into(),
    }
}

fn repo_table(repos: &[TufRepoView]) -> String {
    let rows = repos.iter().map(|repo| RepoRow {
        version: repo.system_version.clone(),
        artifacts: repo.artifacts.len(),
        uploaded: repo.time_created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        pruned: repo
            .time_pruned
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| "-".into()),
        health: health(repo),
        replicated: progress(repo),
        file: repo.file_name.clone(),
    });
    format!("{}\n", tabled::Table::new(rows).with(Style::blank()))
}

#[derive(Tabled)]
struct ArtifactRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "VERSION")]
    version: String,
    #[tabled(rename = "KIND")]
    kind: String,
    #[tabled(rename = "SIZE")]
    size: u64,
    #[tabled(rename = "SHA256")]
    sha256: String,
}

fn repo_details(repo: &TufRepoView) -> String {
    let rows = repo.artifacts.iter().map(|a| ArtifactRow {
        name: a.name.clone(),
        version: a.version.clone(),
        kind: a.kind.clone(),
        size: a.size,
        sha256: a.sha256.to_string(),
    });
    let pruned = match repo.time_pruned {
        Some(time) => format!(", PRUNED at {}", time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        None => String::new(),
    };
    let mut out = format!(
        "system version {} ({}), file {}, sha256 {}{pruned}\nreplication: {}\nhealth: {}\n{}\n",
        repo.system_version,
        repo.id,
        repo.file_name,
        repo.sha256,
        progress(repo),
        health(repo),
        tabled::Table::new(rows).with(Style::blank())
    );
    if let Some(health) = &repo.health {
        out += &format!(
            "copies (checked at generation {} by {}, {} sleds in service):\n",
            health.generation, health.checked_by, health.sleds_in_service
        );
        for artifact in &health.artifacts {
            let sleds: Vec<String> =
                artifact.sleds.iter().map(|(sled, copies)| format!("{sled} ({copies})")).collect();
            out += &format!(
                "  {} {} ({}): {} on {}{}{}\n",
                artifact.name,
                artifact.version,
                artifact.kind,
                health_word(artifact.state),
                common::cli::count_of(artifact.sleds.len(), "sled"),
                if sleds.is_empty() { String::new() } else { format!(": {}", sleds.join(", ")) },
                if artifact.staged_by.is_empty() { String::new() } else { "; staged".into() },
            );
        }
    }
    out
}

#[derive(Tabled)]
struct TrustRootRow {
    #[tabled(rename = "ID")]
    id: String,
    #[tabled(rename = "ADDED")]
    added: String,
    #[tabled(rename = "ROOT VERSION")]
    version: String,
}

fn trust_root_table(roots: &[TrustRootView]) -> String {
    let rows = roots.iter().map(|root| TrustRootRow {
        id: root.id.to_string(),
        added: root.time_created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        version: root.root_role["signed"]["version"].to_string(),
    });
    format!("{}\n", tabled::Table::new(rows).with(Style::blank()))
}

/// The server's message, not progenitor's dump of the response.
fn api_error(error: ApiError<external::types::Error>) -> anyhow::Error {
    match error {
        ApiError::ErrorResponse(response) => anyhow::anyhow!("{} ({})", response.message, response.status()),
        other => anyhow::Error::new(other),
    }
}

/// Waits until the external API answers (used by run-all).
pub async fn wait_for_http(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if reqwest::get(url).await.is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{url} did not answer within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
