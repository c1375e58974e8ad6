//! `omdb db replication [--repo V]`: who holds what, as a matrix. Sleds are
//! rows, artifacts are columns grouped by repository, and each cell is the
//! sled's copy count, `…` for a copy in flight, `x` for a failed copy, `.`
//! for nothing, `-` for an expunged sled. Sleds that hold every artifact on
//! every healthy M.2 are summarised in one line, so the matrix stays
//! readable at 32 sleds × 64 artifacts. The sleds are asked live.

use crate::to_json;
use common::api::external::SledState;
use common::clients::sled_agent::Client as SledClient;
use common::{ArtifactHash, error_chain};
use nexus::db::DataStore;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

#[derive(Serialize)]
struct Matrix {
    repos: Vec<RepoColumns>,
    sleds: Vec<SledRow>,
}

#[derive(Serialize)]
struct RepoColumns {
    system_version: String,
    artifacts: Vec<Column>,
}

#[derive(Serialize)]
struct Column {
    label: String,
    name: String,
    version: String,
    kind: String,
    sha256: ArtifactHash,
}

#[derive(Serialize)]
struct SledRow {
    id: Uuid,
    serial: String,
    state: SledState,
    /// Why the sled could not be asked, if it could not.
    error: Option<String>,
    healthy_m2: usize,
    /// Per artifact: copies as a number, or "…", "x", "." or "-".
    cells: BTreeMap<ArtifactHash, String>,
}

impl SledRow {
    fn complete(&self, columns: usize) -> bool {
        self.healthy_m2 > 0
            && self.cells.len() == columns
            && self.cells.values().all(|cell| cell.parse::<usize>().ok() == Some(self.healthy_m2))
    }
}

pub async fn replication(datastore: &DataStore, repo: Option<&str>, json: bool) -> anyhow::Result<String> {
    let mut repos = datastore.tuf_repo_list_unpruned_with_artifacts().await?;
    if let Some(version) = repo {
        repos.retain(|recorded| recorded.repo.system_version == version);
        anyhow::ensure!(!repos.is_empty(), "no unpruned repository with system version {version}");
    }
    repos.reverse();
    let columns: Vec<RepoColumns> = repos
        .iter()
        .enumerate()
        .map(|(r, recorded)| RepoColumns {
            system_version: recorded.repo.system_version.clone(),
            artifacts: recorded
                .artifacts
                .iter()
                .enumerate()
                .map(|(a, artifact)| Column {
                    label: format!("{}{}", column_letter(r), a + 1),
                    name: artifact.name.clone(),
                    version: artifact.version.clone(),
                    kind: artifact.kind.clone(),
                    sha256: artifact.sha256.0,
                })
                .collect(),
        })
        .collect();
    let hashes: Vec<ArtifactHash> =
        columns.iter().flat_map(|repo| repo.artifacts.iter().map(|a| a.sha256)).collect();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let mut sleds = Vec::new();
    for sled in datastore.sled_list_all().await? {
        let expunged = sled.time_expunged.is_some();
        let mut row = SledRow {
            id: sled.id,
            serial: sled.serial.clone(),
            state: if expunged { SledState::Expunged } else { SledState::InService },
            error: None,
            healthy_m2: 0,
            cells: BTreeMap::new(),
        };
        if expunged {
            row.cells = hashes.iter().map(|hash| (*hash, "-".to_string())).collect();
            sleds.push(row);
            continue;
        }
        let client = SledClient::new_with_client(&format!("http://{}:{}", sled.ip, sled.port), http.clone());
        let asked = async {
            let listed = client.artifact_list().await?.into_inner();
            let inventory = client.inventory().await?.into_inner();
            Ok::<_, common::clients::sled_agent::Error<common::clients::sled_agent::types::Error>>((
                listed, inventory,
            ))
        }
        .await;
        match asked {
            Ok((listed, inventory)) => {
                row.healthy_m2 = inventory
                    .m2
                    .iter()
                    .filter(|m2| m2.state == common::api::sled_agent::M2State::Healthy)
                    .count();
                for hash in &hashes {
                    let cell = if let Some(copies) = listed.list.get(hash) {
                        copies.to_string()
                    } else if listed.copies_in_flight.contains(hash) {
                        "…".into()
                    } else if listed.copy_failures.contains_key(hash) {
                        "x".into()
                    } else {
                        ".".into()
                    };
                    row.cells.insert(*hash, cell);
                }
            }
            Err(error) => row.error = Some(error_chain(&error)),
        }
        sleds.push(row);
    }
    let matrix = Matrix { repos: columns, sleds };
    Ok(if json { to_json(&matrix) } else { render(&matrix, hashes.len()) })
}

/// A, B, …, Z, AA, AB, …: the repository part of a column label.
fn column_letter(index: usize) -> String {
    let mut label = String::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        label.insert(0, char::from(b'A' + (n % 26) as u8));
        n /= 26;
    }
    label
}

fn render(matrix: &Matrix, columns: usize) -> String {
    let mut out = String::new();
    out += "legend: copies on the sled's M.2s; … copy in flight; x copy failed; . none; - expunged sled\n";
    for repo in &matrix.repos {
        let labels: Vec<String> = repo
            .artifacts
            .iter()
            .map(|column| {
                format!(
                    "{}={} {} ({}, {})",
                    column.label,
                    column.name,
                    column.version,
                    column.kind,
                    &column.sha256.to_string()[..8]
                )
            })
            .collect();
        out += &format!("repository {}: {}\n", repo.system_version, labels.join(", "));
    }
    let (complete, rest): (Vec<&SledRow>, Vec<&SledRow>) = matrix.sleds.iter().partition(|sled| {
        sled.state == SledState::InService && sled.error.is_none() && sled.complete(columns)
    });
    if !complete.is_empty() {
        let serials: Vec<&str> = complete.iter().map(|sled| sled.serial.as_str()).collect();
        out += &format!(
            "{} sleds hold every artifact on every healthy M.2: {}\n",
            complete.len(),
            serials.join(", ")
        );
    }
    if rest.is_empty() {
        return out;
    }
    let width =
        matrix.repos.iter().flat_map(|repo| &repo.artifacts).map(|c| c.label.len()).max().unwrap_or(1).max(1);
    let serial_width = rest.iter().map(|sled| sled.serial.len()).max().unwrap_or(0).max(4);
    let mut header = format!("{:serial_width$} ", "SLED");
    for repo in &matrix.repos {
        header += "| ";
        for column in &repo.artifacts {
            header += &format!("{:>width$} ", column.label);
        }
    }
    out += header.trim_end();
    out += "\n";
    for sled in rest {
        let mut line = format!("{:serial_width$} ", sled.serial);
        if let Some(error) = &sled.error {
            line += &format!("| unreachable: {error}");
            out += &line;
            out += "\n";
            continue;
        }
        for repo in &matrix.repos {
            line += "| ";
            for column in &repo.artifacts {
                let cell = sled.cells.get(&column.sha256).map_or(".", String::as_str);
                line += &format!("{cell:>width$} ");
            }
        }
        out += line.trim_end();
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_letters_go_past_z() {
        let letters: Vec<String> = [0, 1, 25, 26, 27, 51, 52].into_iter().map(column_letter).collect();
        assert_eq!(letters, ["A", "B", "Z", "AA", "AB", "AZ", "BA"]);
    }
}
