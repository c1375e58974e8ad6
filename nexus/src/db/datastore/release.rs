//! Repository health, what each Nexus holds staged, and the rack's target
//! release (DESIGN §12).
//!
//! Health is written by replication activations (any Nexus; the last one
//! wins, each from a fresh look at every sled). The target release may only
//! be set to a repository whose recorded health is `replicated`.

use super::{DataStore, DataStoreError, InDoubt};
use crate::db::model::{DbArtifactHash, NexusStagedArtifact, TargetRelease, TufRepo, TufRepoHealth};
use crate::db::schema::{nexus_staged_artifact, target_release, tuf_repo, tuf_repo_health};
use chrono::Utc;
use common::ArtifactHash;
use common::api::external::{RepoHealth, RepoHealthView};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use scoped_futures::ScopedFutureExt;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// The current target release and the one before it, with their
/// repositories.
#[derive(Clone, Debug, Default)]
pub struct TargetReleases {
    pub current: Option<(TargetRelease, TufRepo)>,
    pub previous: Option<(TargetRelease, TufRepo)>,
}

impl TargetReleases {
    /// The repositories the pruner must keep.
    pub fn repo_ids(&self) -> BTreeSet<Uuid> {
        [&self.current, &self.previous].into_iter().flatten().map(|(_, repo)| repo.id).collect()
    }
}

pub fn health_state_to_sql(state: RepoHealth) -> &'static str {
    match state {
        RepoHealth::Replicated => "replicated",
        RepoHealth::Replicating => "replicating",
        RepoHealth::Degraded => "degraded",
        RepoHealth::Lost => "lost",
    }
}

pub fn health_state_from_sql(state: &str) -> Option<RepoHealth> {
    [RepoHealth::Replicated, RepoHealth::Replicating, RepoHealth::Degraded, RepoHealth::Lost]
        .into_iter()
        .find(|candidate| health_state_to_sql(*candidate) == state)
}

impl TufRepoHealth {
    pub fn view(&self) -> Option<RepoHealthView> {
        serde_json::from_value(self.artifacts.clone()).ok()
    }
}

impl DataStore {
    /// Records each repository's health; returns the states they had.
    pub async fn repo_health_record(
        &self,
        health: &[(Uuid, RepoHealthView)],
    ) -> Result<BTreeMap<Uuid, String>, DataStoreError> {
        let rows: Vec<TufRepoHealth> = health
            .iter()
            .map(|(repo_id, view)| TufRepoHealth {
                tuf_repo_id: *repo_id,
                state: health_state_to_sql(view.state).to_string(),
                generation: i64::try_from(view.generation.get()).unwrap_or(i64::MAX),
                time_checked: view.time_checked,
                checked_by: view.checked_by.clone(),
                artifacts: serde_json::to_value(view).expect("health views serialize"),
            })
            .collect();
        self.transaction_retry("repo_health_record", InDoubt::Rerun, |conn| {
            let rows = rows.clone();
            async move {
                let ids: Vec<Uuid> = rows.iter().map(|row| row.tuf_repo_id).collect();
                let before: BTreeMap<Uuid, String> = tuf_repo_health::table
                    .filter(tuf_repo_health::tuf_repo_id.eq_any(&ids))
                    .select((tuf_repo_health::tuf_repo_id, tuf_repo_health::state))
                    .load::<(Uuid, String)>(conn)
                    .await?
                    .into_iter()
                    .collect();
                for row in rows {
                    diesel::insert_into(tuf_repo_health::table)
                        .values(&row)
                        .on_conflict(tuf_repo_health::tuf_repo_id)
                        .do_update()
                        .set((
                            tuf_repo_health::state.eq(&row.state),
                            tuf_repo_health::generation.eq(row.generation),
                            tuf_repo_health::time_checked.eq(row.time_checked),
                            tuf_repo_health::checked_by.eq(&row.checked_by),
                            tuf_repo_health::artifacts.eq(&row.artifacts),
                        ))
                        .execute(conn)
                        .await?;
                }
                Ok(before)
            }
            .scope_boxed()
        })
        .await
    }

    /// Recorded health of the given repositories.
    pub async fn repo_health_get(
        &self,
        repo_ids: &[Uuid],
    ) -> Result<BTreeMap<Uuid, TufRepoHealth>, DataStoreError> {
        let rows: Vec<TufRepoHealth> = self
            .statement_retry("repo_health_get", InDoubt::Read, |conn| {
                tuf_repo_health::table
                    .filter(tuf_repo_health::tuf_repo_id.eq_any(repo_ids))
                    .select(TufRepoHealth::as_select())
                    .load(conn)
                    .scope_boxed()
            })
            .await?;
        Ok(rows.into_iter().map(|row| (row.tuf_repo_id, row)).collect())
    }

    /// Makes the recorded set of artifacts staged by `nexus_id` exactly
    /// `hashes`.
    pub async fn staged_artifacts_replace(
        &self,
        nexus_id: Uuid,
        hashes: &BTreeSet<ArtifactHash>,
    ) -> Result<(), DataStoreError> {
        self.transaction_retry("staged_artifacts_replace", InDoubt::Rerun, |conn| {
            async move {
                let recorded: BTreeSet<ArtifactHash> = nexus_staged_artifact::table
                    .filter(nexus_staged_artifact::nexus_id.eq(nexus_id))
                    .select(nexus_staged_artifact::sha256)
                    .load::<DbArtifactHash>(conn)
                    .await?
                    .into_iter()
                    .map(|hash| hash.0)
                    .collect();
                let gone: Vec<DbArtifactHash> =
                    recorded.difference(hashes).map(|hash| DbArtifactHash(*hash)).collect();
                if !gone.is_empty() {
                    diesel::delete(
                        nexus_staged_artifact::table.filter(
                            nexus_staged_artifact::nexus_id
                                .eq(nexus_id)
                                .and(nexus_staged_artifact::sha256.eq_any(gone)),
                        ),
                    )
                    .execute(conn)
                    .await?;
                }
                let new: Vec<NexusStagedArtifact> = hashes
                    .difference(&recorded)
                    .map(|hash| NexusStagedArtifact {
                        nexus_id,
                        sha256: DbArtifactHash(*hash),
                        time_staged: Utc::now(),
                    })
                    .collect();
                if !new.is_empty() {
                    diesel::insert_into(nexus_staged_artifact::table).values(&new).execute(conn).await?;
                }
                Ok(())
            }
            .scope_boxed()
        })
        .await
    }

    /// Which Nexus instances hold each artifact staged.
    pub async fn staged_artifacts_all(&self) -> Result<BTreeMap<ArtifactHash, Vec<Uuid>>, DataStoreError> {
        let rows: Vec<(Uuid, DbArtifactHash)> = self
            .statement_retry("staged_artifacts_all", InDoubt::Read, |conn| {
                nexus_staged_artifact::table
                    .select((nexus_staged_artifact::nexus_id, nexus_staged_artifact::sha256))
                    .load(conn)
                    .scope_boxed()
            })
            .await?;
        let mut staged: BTreeMap<ArtifactHash, Vec<Uuid>> = BTreeMap::new();
        for (nexus_id, hash) in rows {
            staged.entry(hash.0).or_default().push(nexus_id);
        }
        Ok(staged)
    }

    pub async fn target_releases(&self) -> Result<TargetReleases, DataStoreError> {
        let mut latest: Vec<(TargetRelease, TufRepo)> = self
            .statement_retry("target_releases", InDoubt::Read, |conn| {
                target_release::table
                    .inner_join(tuf_repo::table)
                    .order(target_release::generation.desc())
                    .limit(2)
                    .select((TargetRelease::as_select(), TufRepo::as_select()))
                    .load(conn)
                    .scope_boxed()
            })
            .await?;
        let previous = (latest.len() == 2).then(|| latest.remove(1));
        Ok(TargetReleases { current: latest.pop(), previous })
    }

    /// Sets the target release to the repository of `system_version`, if its
    /// recorded health is `replicated`; otherwise a conflict that says what
    /// is missing.
    pub async fn target_release_set(
        &self,
        system_version: &str,
        requested_by: &str,
    ) -> Result<(TargetRelease, TufRepo), DataStoreError> {
        self.transaction_retry("target_release_set", InDoubt::Report, |conn| {
            async move {
                let repo: TufRepo = tuf_repo::table
                    .filter(tuf_repo::system_version.eq(system_version).and(tuf_repo::time_pruned.is_null()))
                    .select(TufRepo::as_select())
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or_else(|| DataStoreError::NotFound {
                        kind: "unpruned TUF repository with system version",
                        key: system_version.to_string(),
                    })?;
                let health: Option<TufRepoHealth> = tuf_repo_health::table
                    .find(repo.id)
                    .select(TufRepoHealth::as_select())
                    .first(conn)
                    .await
                    .optional()?;
                let view = health.as_ref().and_then(TufRepoHealth::view);
                match &view {
                    Some(view) if view.state == RepoHealth::Replicated => {}
                    _ => {
                        return Err(
                            DataStoreError::Conflict(not_replicated(system_version, view.as_ref())).into()
                        );
                    }
                }
                let newest: Option<i64> = target_release::table
                    .select(diesel::dsl::max(target_release::generation))
                    .first(conn)
                    .await?;
                let row = TargetRelease {
                    generation: newest.unwrap_or(0) + 1,
                    tuf_repo_id: repo.id,
                    time_requested: Utc::now(),
                    requested_by: requested_by.to_string(),
                };
                diesel::insert_into(target_release::table).values(&row).execute(conn).await?;
                Ok((row, repo))
            }
            .scope_boxed()
        })
        .await
    }
}

/// Why a repository cannot be the target release yet, artifact by artifact.
fn not_replicated(system_version: &str, view: Option<&RepoHealthView>) -> String {
    let Some(view) = view else {
        return format!(
            "repository {system_version} is not known to be replicated yet: no replication activation has \
             looked at it; activate tuf_artifact_replication and retry"
        );
    };
    let state = health_state_to_sql(view.state);
    let missing: Vec<String> = view
        .artifacts
        .iter()
        .filter(|artifact| artifact.state != RepoHealth::Replicated)
        .map(|artifact| {
            format!(
                "{} {} ({}) is on {} of {} in-service sleds{}",
                artifact.name,
                artifact.version,
                artifact.kind,
                artifact.sleds.len(),
                view.sleds_in_service,
                if artifact.staged_by.is_empty() { ", staged nowhere" } else { "" }
            )
        })
        .collect();
    format!(
        "repository {system_version} is {state}, not replicated (checked at generation {}): {}",
        view.generation,
        missing.join("; ")
    )
}
