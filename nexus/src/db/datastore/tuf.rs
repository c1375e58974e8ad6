//! TUF repositories and their artifacts, and the artifact generation.
//!
//! Conflict rules for an insert (DESIGN §8):
//! - same system version, same zip sha256: `AlreadyExists` (unpruning it if it
//!   was pruned);
//! - same system version, different sha256: a conflict that says what differs;
//! - an artifact (name, version, kind) already recorded with the same hash and
//!   size is linked, not duplicated; with another hash or size, a conflict.
//!
//! Generation rule: every change to the set of unpruned repositories (insert,
//! prune, unprune) bumps `tuf_generation` by one, in the same transaction,
//! with a compare-and-swap on the value read at its start. A bump whose hash
//! set happens not to change is harmless; a change without a bump could let a
//! stale Nexus delete what a newer one placed.

use super::{DataStore, DataStoreError, InDoubt, TxnError};
use crate::db::model::{
    DbArtifactHash, TufArtifact, TufRepo, TufRepoArtifact, TufRepoDescription, TufRepoInsertStatus,
    TufRepoWithArtifacts,
};
use crate::db::schema::{
    target_release, tuf_artifact, tuf_generation, tuf_repo, tuf_repo_artifact, tuf_trust_root,
};
use chrono::{DateTime, SubsecRound, Utc};
use common::{ArtifactConfig, ArtifactId, Generation};
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use scoped_futures::ScopedFutureExt;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// What [`DataStore::tuf_repo_insert`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TufRepoInsertResult {
    pub recorded: TufRepoWithArtifacts,
    pub status: TufRepoInsertStatus,
    /// The artifact generation after the insert.
    pub generation: Generation,
}

/// One page of the repository list, newest first.
#[derive(Clone, Debug)]
pub struct TufRepoPage {
    pub limit: u32,
    /// Continue after this (time_created, id): the last row of the previous
    /// page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

impl DataStore {
    pub async fn tuf_repo_insert(
        &self,
        description: &TufRepoDescription,
    ) -> Result<TufRepoInsertResult, DataStoreError> {
        validate_description(description)?;
        self.transaction_retry("tuf_repo_insert", InDoubt::Rerun, |conn| {
            insert_in_txn(conn, description).scope_boxed()
        })
        .await
    }

    pub async fn tuf_repo_get_by_version(
        &self,
        system_version: &str,
    ) -> Result<TufRepoWithArtifacts, DataStoreError> {
        self.transaction_retry("tuf_repo_get_by_version", InDoubt::Read, |conn| {
            async move {
                let repo = tuf_repo::table
                    .filter(tuf_repo::system_version.eq(system_version))
                    .select(TufRepo::as_select())
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or_else(|| DataStoreError::NotFound {
                        kind: "TUF repository with system version",
                        key: system_version.to_string(),
                    })?;
                let artifacts = repo_artifacts(conn, repo.id).await?;
                Ok(TufRepoWithArtifacts { repo, artifacts })
            }
            .scope_boxed()
        })
        .await
    }

    /// Repositories, pruned ones included, newest first.
    pub async fn tuf_repo_list(&self, page: &TufRepoPage) -> Result<Vec<TufRepo>, DataStoreError> {
        self.statement_retry("tuf_repo_list", InDoubt::Read, |conn| {
            let mut query = tuf_repo::table.select(TufRepo::as_select()).into_boxed();
            if let Some((time, id)) = page.after {
                query = query.filter(
                    tuf_repo::time_created
                        .lt(time)
                        .or(tuf_repo::time_created.eq(time).and(tuf_repo::id.lt(id))),
                );
            }
            query
                .order((tuf_repo::time_created.desc(), tuf_repo::id.desc()))
                .limit(i64::from(page.limit))
                .load(conn)
                .scope_boxed()
        })
        .await
    }

    /// Unpruned repositories, most recently uploaded first (the pruner's
    /// order: a re-upload makes an old repository new again).
    pub async fn tuf_repo_list_unpruned(&self) -> Result<Vec<TufRepo>, DataStoreError> {
        self.statement_retry("tuf_repo_list_unpruned", InDoubt::Read, |conn| {
            tuf_repo::table
                .filter(tuf_repo::time_pruned.is_null())
                .order((tuf_repo::time_last_uploaded.desc(), tuf_repo::id.desc()))
                .select(TufRepo::as_select())
                .load(conn)
                .scope_boxed()
        })
        .await
    }

    /// Unpruned repositories with their artifacts, newest first: what
    /// replication reports progress on and what staging recovery looks for.
    pub async fn tuf_repo_list_unpruned_with_artifacts(
        &self,
    ) -> Result<Vec<TufRepoWithArtifacts>, DataStoreError> {
        let rows: Vec<(TufRepo, TufArtifact)> = self
            .statement_retry("tuf_repo_list_unpruned_with_artifacts", InDoubt::Read, |conn| {
                tuf_repo::table
                    .inner_join(tuf_repo_artifact::table.inner_join(tuf_artifact::table))
                    .filter(tuf_repo::time_pruned.is_null())
                    .order((
                        tuf_repo::time_created.desc(),
                        tuf_repo::id.desc(),
                        tuf_artifact::name,
                        tuf_artifact::version,
                        tuf_artifact::kind,
                    ))
                    .select((TufRepo::as_select(), TufArtifact::as_select()))
                    .load(conn)
                    .scope_boxed()
            })
            .await?;
        let mut repos: Vec<TufRepoWithArtifacts> = Vec::new();
        for (repo, artifact) in rows {
            match repos.last_mut() {
                Some(last) if last.repo.id == repo.id => last.artifacts.push(artifact),
                _ => repos.push(TufRepoWithArtifacts { repo, artifacts: vec![artifact] }),
            }
        }
        Ok(repos)
    }

    /// Marks a repository pruned, if the generation is still `expected` (the
    /// one the caller based its decision on). Returns the new generation.
    pub async fn tuf_repo_mark_pruned(
        &self,
        repo_id: Uuid,
        expected: Generation,
    ) -> Result<Generation, DataStoreError> {
        self.transaction_retry("tuf_repo_mark_pruned", InDoubt::Report, |conn| {
            async move {
                let found = read_generation(conn).await?;
                if found != expected {
                    return Err(DataStoreError::GenerationMoved { expected, found }.into());
                }
                // Setting a target release or re-uploading does not move the
                // generation: check here, in the transaction, that the
                // repository is still none of the protected ones.
                let targets: Vec<Uuid> = target_release::table
                    .order(target_release::generation.desc())
                    .limit(2)
                    .select(target_release::tuf_repo_id)
                    .load(conn)
                    .await?;
                let newest: Option<Uuid> = tuf_repo::table
                    .filter(tuf_repo::time_pruned.is_null())
                    .order((tuf_repo::time_last_uploaded.desc(), tuf_repo::id.desc()))
                    .select(tuf_repo::id)
                    .first(conn)
                    .await
                    .optional()?;
                if targets.contains(&repo_id) || newest == Some(repo_id) {
                    return Err(DataStoreError::Conflict(format!(
                        "repository {repo_id} is a target release or the newest upload and is never pruned"
                    ))
                    .into());
                }
                let pruned = diesel::update(tuf_repo::table)
                    .filter(tuf_repo::id.eq(repo_id).and(tuf_repo::time_pruned.is_null()))
                    .set(tuf_repo::time_pruned.eq(Utc::now()))
                    .execute(conn)
                    .await?;
                if pruned == 0 {
                    return Err(DataStoreError::NotFound {
                        kind: "unpruned TUF repository",
                        key: repo_id.to_string(),
                    }
                    .into());
                }
                bump_generation(conn, found).await
            }
            .scope_boxed()
        })
        .await
    }

    pub async fn tuf_generation_get(&self) -> Result<Generation, DataStoreError> {
        self.transaction_retry("tuf_generation_get", InDoubt::Read, |conn| {
            read_generation(conn).scope_boxed()
        })
        .await
    }

    /// The artifacts every sled must hold, read in one transaction so that the
    /// set belongs to the generation.
    pub async fn tuf_artifact_config(&self) -> Result<ArtifactConfig, DataStoreError> {
        self.transaction_retry("tuf_artifact_config", InDoubt::Read, |conn| {
            async move {
                let generation = read_generation(conn).await?;
                let hashes: Vec<DbArtifactHash> = tuf_artifact::table
                    .inner_join(tuf_repo_artifact::table.inner_join(tuf_repo::table))
                    .filter(tuf_repo::time_pruned.is_null())
                    .select(tuf_artifact::sha256)
                    .distinct()
                    .load(conn)
                    .await?;
                Ok(ArtifactConfig { generation, artifacts: hashes.into_iter().map(|hash| hash.0).collect() })
            }
            .scope_boxed()
        })
        .await
    }
}

fn validate_description(description: &TufRepoDescription) -> Result<(), DataStoreError> {
    if description.artifacts.is_empty() {
        return Err(DataStoreError::InvalidInput(format!(
            "TUF repository {} has no artifacts",
            description.system_version
        )));
    }
    let mut seen = BTreeSet::new();
    for artifact in &description.artifacts {
        if !seen.insert(&artifact.id) {
            return Err(DataStoreError::InvalidInput(format!(
                "TUF repository {} lists artifact {} twice",
                description.system_version, artifact.id
            )));
        }
        if i64::try_from(artifact.size).is_err() {
            return Err(DataStoreError::InvalidInput(format!(
                "artifact {} is {} bytes, more than the database can record",
                artifact.id, artifact.size
            )));
        }
    }
    Ok(())
}

async fn insert_in_txn(
    conn: &mut AsyncPgConnection,
    description: &TufRepoDescription,
) -> Result<TufRepoInsertResult, TxnError> {
    let generation = read_generation(conn).await?;
    // The root the upload verified with must still be trusted when the
    // repository is recorded (it may have been deleted during the upload).
    let trusted = tuf_trust_root::table
        .filter(tuf_trust_root::id.eq(description.trust_root_id).and(tuf_trust_root::time_deleted.is_null()))
        .count()
        .get_result::<i64>(conn)
        .await?
        > 0;
    let deleted_root = || {
        DataStoreError::Conflict(format!(
            "trust root {} verified this repository but was deleted during the upload; nothing was recorded",
            description.trust_root_id
        ))
    };
    let existing = tuf_repo::table
        .filter(tuf_repo::system_version.eq(&description.system_version))
        .select(TufRepo::as_select())
        .first(conn)
        .await
        .optional()?;
    if let Some(mut repo) = existing {
        let artifacts = repo_artifacts(conn, repo.id).await?;
        if repo.sha256.0 != description.sha256 {
            return Err(DataStoreError::Conflict(describe_difference(&repo, &artifacts, description)).into());
        }
        // The same bytes are recorded already: perhaps by this very insert,
        // whose COMMIT was in doubt and is being run again, after the root
        // went. Only unpruning needs the root: it records something anew.
        if !trusted && repo.time_pruned.is_some() {
            return Err(deleted_root().into());
        }
        if !trusted {
            return Ok(TufRepoInsertResult {
                recorded: TufRepoWithArtifacts { repo, artifacts },
                status: TufRepoInsertStatus::AlreadyExists,
                generation,
            });
        }
        // Every upload counts as the newest for the pruner, and an upload of
        // a pruned repository unprunes it.
        let now = Utc::now().trunc_subsecs(6);
        diesel::update(tuf_repo::table.find(repo.id))
            .set((tuf_repo::time_pruned.eq(None::<DateTime<Utc>>), tuf_repo::time_last_uploaded.eq(now)))
            .execute(conn)
            .await?;
        repo.time_last_uploaded = now;
        let generation = if repo.time_pruned.take().is_some() {
            bump_generation(conn, generation).await?
        } else {
            generation
        };
        return Ok(TufRepoInsertResult {
            recorded: TufRepoWithArtifacts { repo, artifacts },
            status: TufRepoInsertStatus::AlreadyExists,
            generation,
        });
    }

    if !trusted {
        return Err(deleted_root().into());
    }
    let same_bytes = tuf_repo::table
        .filter(tuf_repo::sha256.eq(DbArtifactHash(description.sha256)))
        .select(tuf_repo::system_version)
        .first::<String>(conn)
        .await
        .optional()?;
    if let Some(other_version) = same_bytes {
        return Err(DataStoreError::Conflict(format!(
            "a repository with sha256 {} is already recorded as system version {other_version}, not {}",
            description.sha256, description.system_version
        ))
        .into());
    }

    let new_generation = generation.next();
    // The database keeps microseconds; so must the rows returned from here.
    let now = Utc::now().trunc_subsecs(6);
    let names: Vec<&str> = description.artifacts.iter().map(|a| a.id.name.as_str()).collect();
    let known: BTreeMap<ArtifactId, TufArtifact> = tuf_artifact::table
        .filter(tuf_artifact::name.eq_any(&names))
        .select(TufArtifact::as_select())
        .load(conn)
        .await?
        .into_iter()
        .map(|artifact| (artifact.artifact_id(), artifact))
        .collect();
    let mut linked = Vec::with_capacity(description.artifacts.len());
    let mut new_rows = Vec::new();
    for artifact in &description.artifacts {
        let size = i64::try_from(artifact.size).expect("validated before the transaction");
        match known.get(&artifact.id) {
            Some(row) if row.sha256.0 == artifact.sha256 && row.size == size => linked.push(row.clone()),
            Some(row) => {
                return Err(DataStoreError::Conflict(format!(
                    "artifact {} is already recorded with sha256 {} and {} bytes; repository {} has \
                     sha256 {} and {} bytes under the same name, version and kind",
                    artifact.id,
                    row.sha256.0,
                    row.size,
                    description.system_version,
                    artifact.sha256,
                    artifact.size
                ))
                .into());
            }
            None => {
                let row = TufArtifact {
                    id: Uuid::new_v4(),
                    name: artifact.id.name.clone(),
                    version: artifact.id.version.clone(),
                    kind: artifact.id.kind.clone(),
                    sha256: DbArtifactHash(artifact.sha256),
                    size,
                    time_created: now,
                    generation_added: generation_to_sql(new_generation),
                };
                new_rows.push(row.clone());
                linked.push(row);
            }
        }
    }
    let repo = TufRepo {
        id: Uuid::new_v4(),
        time_created: now,
        sha256: DbArtifactHash(description.sha256),
        system_version: description.system_version.clone(),
        file_name: description.file_name.clone(),
        time_pruned: None,
        time_last_uploaded: now,
    };
    diesel::insert_into(tuf_repo::table).values(&repo).execute(conn).await?;
    diesel::insert_into(tuf_artifact::table).values(&new_rows).execute(conn).await?;
    let links: Vec<TufRepoArtifact> = linked
        .iter()
        .map(|artifact| TufRepoArtifact { tuf_repo_id: repo.id, tuf_artifact_id: artifact.id })
        .collect();
    diesel::insert_into(tuf_repo_artifact::table).values(&links).execute(conn).await?;
    let generation = bump_generation(conn, generation).await?;
    // Tests hold the transaction open here, every row written, to kill the
    // database under it. The datastore knows no Nexus id: only `*` matches.
    crate::failpoints::delay("nexus::db::tuf_repo_insert::before_commit", Uuid::nil()).await;
    linked.sort_by_key(TufArtifact::artifact_id);
    Ok(TufRepoInsertResult {
        recorded: TufRepoWithArtifacts { repo, artifacts: linked },
        status: TufRepoInsertStatus::Inserted,
        generation,
    })
}

/// Says what differs between a recorded repository and an upload of the same
/// system version, so the operator can tell a re-signed repository from a
/// different release.
fn describe_difference(
    recorded: &TufRepo,
    recorded_artifacts: &[TufArtifact],
    upload: &TufRepoDescription,
) -> String {
    let recorded_map: BTreeMap<ArtifactId, (String, i64)> =
        recorded_artifacts.iter().map(|a| (a.artifact_id(), (a.sha256.0.to_string(), a.size))).collect();
    let upload_map: BTreeMap<ArtifactId, (String, i64)> = upload
        .artifacts
        .iter()
        .map(|a| (a.id.clone(), (a.sha256.to_string(), i64::try_from(a.size).unwrap_or(i64::MAX))))
        .collect();
    let mut message = format!(
        "system version {} is already recorded with different contents: the recorded repository \
         ({}) has sha256 {}, this upload ({}) has sha256 {}",
        upload.system_version, recorded.file_name, recorded.sha256.0, upload.file_name, upload.sha256
    );
    let only_recorded: Vec<String> =
        recorded_map.keys().filter(|id| !upload_map.contains_key(id)).map(ToString::to_string).collect();
    let only_upload: Vec<String> =
        upload_map.keys().filter(|id| !recorded_map.contains_key(id)).map(ToString::to_string).collect();
    let changed: Vec<String> = upload_map
        .iter()
        .filter_map(|(id, (hash, size))| {
            let (old_hash, old_size) = recorded_map.get(id)?;
            (old_hash != hash || old_size != size).then(|| {
                format!("{id}: {old_hash} ({old_size} bytes) recorded, {hash} ({size} bytes) uploaded")
            })
        })
        .collect();
    if only_recorded.is_empty() && only_upload.is_empty() && changed.is_empty() {
        message
            .push_str("; the artifacts are identical, so the repositories differ only in their TUF metadata");
    }
    for (label, items) in [
        ("artifacts only in the recorded repository", only_recorded),
        ("artifacts only in this upload", only_upload),
        ("artifacts with different contents", changed),
    ] {
        if !items.is_empty() {
            message.push_str(&format!("; {label}: {}", items.join(", ")));
        }
    }
    message
}

async fn repo_artifacts(
    conn: &mut AsyncPgConnection,
    repo_id: Uuid,
) -> Result<Vec<TufArtifact>, DieselError> {
    tuf_artifact::table
        .inner_join(tuf_repo_artifact::table)
        .filter(tuf_repo_artifact::tuf_repo_id.eq(repo_id))
        .order((tuf_artifact::name, tuf_artifact::version, tuf_artifact::kind))
        .select(TufArtifact::as_select())
        .load(conn)
        .await
}

async fn read_generation(conn: &mut AsyncPgConnection) -> Result<Generation, TxnError> {
    let value: i64 = tuf_generation::table
        .filter(tuf_generation::singleton.eq(true))
        .select(tuf_generation::generation)
        .first(conn)
        .await?;
    generation_from_sql(value)
}

/// Compare-and-swap: `from` must still be the stored value.
async fn bump_generation(conn: &mut AsyncPgConnection, from: Generation) -> Result<Generation, TxnError> {
    let next = from.next();
    let updated = diesel::update(tuf_generation::table)
        .filter(
            tuf_generation::singleton.eq(true).and(tuf_generation::generation.eq(generation_to_sql(from))),
        )
        .set(tuf_generation::generation.eq(generation_to_sql(next)))
        .execute(conn)
        .await?;
    if updated != 1 {
        let found = read_generation(conn).await?;
        return Err(DataStoreError::GenerationMoved { expected: from, found }.into());
    }
    Ok(next)
}

fn generation_to_sql(generation: Generation) -> i64 {
    i64::try_from(generation.get()).expect("generations stay far below i64::MAX")
}

fn generation_from_sql(value: i64) -> Result<Generation, TxnError> {
    u64::try_from(value).map(Generation::new).map_err(|_| {
        DataStoreError::InvalidInput(format!("tuf_generation holds {value}, which is not a generation"))
            .into()
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{TEST_TRUST_ROOT, datastore};
    use super::*;
    use crate::db::model::TufArtifactDescription;
    use common::ArtifactHash;

    fn hash(seed: &str) -> ArtifactHash {
        use sha2::Digest;
        ArtifactHash(sha2::Sha256::digest(seed.as_bytes()).into())
    }

    fn artifact(name: &str, version: &str) -> TufArtifactDescription {
        TufArtifactDescription {
            id: ArtifactId { name: name.into(), version: version.into(), kind: "zone".into() },
            sha256: hash(&format!("{name}-{version}")),
            size: 1000 + name.len() as u64,
        }
    }

    fn repo(version: &str, artifacts: Vec<TufArtifactDescription>) -> TufRepoDescription {
        TufRepoDescription {
            system_version: version.into(),
            sha256: hash(&format!("zip of {version} {artifacts:?}")),
            file_name: format!("repo-{version}.zip"),
            trust_root_id: TEST_TRUST_ROOT,
            artifacts,
        }
    }

    async fn config_hashes(datastore: &DataStore) -> (Generation, BTreeSet<ArtifactHash>) {
        let config = datastore.tuf_artifact_config().await.unwrap();
        (config.generation, config.artifacts)
    }

    #[tokio::test]
    async fn insert_get_and_reinsert() {
        let (_db, datastore) = datastore().await;
        assert_eq!(datastore.tuf_generation_get().await.unwrap(), Generation::FIRST);
        let description = repo("1.0.0", vec![artifact("a", "1"), artifact("b", "1")]);

        let inserted = datastore.tuf_repo_insert(&description).await.unwrap();
        assert_eq!(inserted.status, TufRepoInsertStatus::Inserted);
        assert_eq!(inserted.generation, Generation::new(2));
        assert_eq!(inserted.recorded.artifacts.len(), 2);
        assert!(inserted.recorded.artifacts.iter().all(|a| a.generation_added == 2));

        let fetched = datastore.tuf_repo_get_by_version("1.0.0").await.unwrap();
        assert_eq!(fetched, inserted.recorded);
        let (generation, hashes) = config_hashes(&datastore).await;
        assert_eq!(generation, Generation::new(2));
        assert_eq!(hashes, description.artifacts.iter().map(|a| a.sha256).collect());

        let mut again = datastore.tuf_repo_insert(&description).await.unwrap();
        assert_eq!(again.status, TufRepoInsertStatus::AlreadyExists);
        assert!(
            again.recorded.repo.time_last_uploaded > inserted.recorded.repo.time_last_uploaded,
            "a re-upload is the latest upload"
        );
        assert_eq!(datastore.tuf_repo_get_by_version("1.0.0").await.unwrap(), again.recorded);
        again.recorded.repo.time_last_uploaded = inserted.recorded.repo.time_last_uploaded;
        assert_eq!(again.recorded, inserted.recorded, "nothing else changed");
        assert_eq!(
            datastore.tuf_generation_get().await.unwrap(),
            Generation::new(2),
            "a no-op must not bump"
        );

        let error = datastore.tuf_repo_get_by_version("9.9.9").await.unwrap_err();
        assert_eq!(error.to_string(), "TUF repository with system version 9.9.9 not found");
    }

    /// The trust root an upload verified with must still be trusted when
    /// the repository is recorded.
    #[tokio::test]
    async fn a_repository_verified_by_a_root_deleted_meanwhile_is_not_recorded() {
        let (_db, datastore) = datastore().await;
        datastore.trust_root_delete(TEST_TRUST_ROOT).await.unwrap();
        let error = datastore.tuf_repo_insert(&repo("1.0.0", vec![artifact("a", "1")])).await.unwrap_err();
        assert!(matches!(error, DataStoreError::Conflict(_)), "{error:?}");
        assert!(error.to_string().contains("was deleted during the upload"), "{error}");
        assert_eq!(
            config_hashes(&datastore).await,
            (Generation::new(1), BTreeSet::new()),
            "nothing recorded"
        );
    }

    /// An insert whose COMMIT was in doubt is run again; if the root went
    /// meanwhile, the re-run must find its own row (already recorded), not
    /// report "nothing was recorded". A pruned repository is not unpruned on
    /// the word of a deleted root.
    #[tokio::test]
    async fn the_same_repository_again_after_its_root_went_is_found_not_refused() {
        let (_db, datastore) = datastore().await;
        let description = repo("1.0.0", vec![artifact("a", "1")]);
        datastore.tuf_repo_insert(&description).await.unwrap();
        datastore.trust_root_delete(TEST_TRUST_ROOT).await.unwrap();
        let again = datastore.tuf_repo_insert(&description).await.unwrap();
        assert_eq!(again.status, TufRepoInsertStatus::AlreadyExists);
        assert_eq!(again.generation, Generation::new(2), "nothing changed");
    }

    #[tokio::test]
    async fn same_version_other_contents_is_a_conflict_that_says_what_differs() {
        let (_db, datastore) = datastore().await;
        datastore
            .tuf_repo_insert(&repo("1.0.0", vec![artifact("a", "1"), artifact("b", "1")]))
            .await
            .unwrap();
        let mut changed_b = artifact("b", "1");
        changed_b.sha256 = hash("other bytes");
        let other = repo("1.0.0", vec![changed_b, artifact("c", "1")]);

        let error = datastore.tuf_repo_insert(&other).await.unwrap_err();
        let DataStoreError::Conflict(message) = &error else { panic!("expected a conflict, got {error:?}") };
        assert!(message.contains("system version 1.0.0"), "{message}");
        assert!(message.contains(&other.sha256.to_string()), "{message}");
        assert!(message.contains("only in the recorded repository: a 1 (zone)"), "{message}");
        assert!(message.contains("only in this upload: c 1 (zone)"), "{message}");
        assert!(message.contains("different contents: b 1 (zone)"), "{message}");
        assert_eq!(datastore.tuf_generation_get().await.unwrap(), Generation::new(2));
        let listed = datastore.tuf_repo_list(&TufRepoPage { limit: 10, after: None }).await.unwrap();
        assert_eq!(listed.len(), 1);
    }

    #[tokio::test]
    async fn shared_artifacts_are_linked_and_conflicting_ones_refused() {
        let (_db, datastore) = datastore().await;
        let first = datastore
            .tuf_repo_insert(&repo("1.0.0", vec![artifact("a", "1"), artifact("b", "1")]))
            .await
            .unwrap();
        let second = datastore
            .tuf_repo_insert(&repo("2.0.0", vec![artifact("a", "1"), artifact("c", "1")]))
            .await
            .unwrap();
        let shared_first = first.recorded.artifacts.iter().find(|a| a.name == "a").unwrap();
        let shared_second = second.recorded.artifacts.iter().find(|a| a.name == "a").unwrap();
        assert_eq!(shared_first.id, shared_second.id, "the shared artifact row is reused");
        assert_eq!(shared_second.generation_added, 2, "a linked artifact keeps its first generation");

        let mut clashing = artifact("c", "1");
        clashing.sha256 = hash("not c");
        let error =
            datastore.tuf_repo_insert(&repo("3.0.0", vec![artifact("d", "1"), clashing])).await.unwrap_err();
        assert!(matches!(error, DataStoreError::Conflict(_)), "{error:?}");
        assert!(error.to_string().contains("artifact c 1 (zone) is already recorded"), "{error}");
        // Nothing of the refused repository was written, not even artifact d.
        assert!(datastore.tuf_repo_get_by_version("3.0.0").await.is_err());
        let (generation, hashes) = config_hashes(&datastore).await;
        assert_eq!(generation, Generation::new(3));
        assert!(!hashes.contains(&hash("d-1")));
    }

    #[tokio::test]
    async fn prune_and_unprune_bump_the_generation() {
        let (_db, datastore) = datastore().await;
        let old = repo("1.0.0", vec![artifact("shared", "1"), artifact("old-only", "1")]);
        let old_id = datastore.tuf_repo_insert(&old).await.unwrap().recorded.repo.id;
        datastore
            .tuf_repo_insert(&repo("2.0.0", vec![artifact("shared", "1"), artifact("new", "1")]))
            .await
            .unwrap();
        let (generation, hashes) = config_hashes(&datastore).await;
        assert_eq!((generation, hashes.len()), (Generation::new(3), 3));

        let stale = datastore.tuf_repo_mark_pruned(old_id, Generation::new(2)).await.unwrap_err();
        assert!(
            matches!(stale, DataStoreError::GenerationMoved { expected, found }
                if expected == Generation::new(2) && found == Generation::new(3)),
            "{stale:?}"
        );
        assert_eq!(config_hashes(&datastore).await.1.len(), 3, "a refused prune changes nothing");

        let after_prune = datastore.tuf_repo_mark_pruned(old_id, generation).await.unwrap();
        assert_eq!(after_prune, Generation::new(4));
        let (generation, hashes) = config_hashes(&datastore).await;
        assert_eq!(generation, Generation::new(4));
        assert_eq!(hashes, BTreeSet::from([hash("shared-1"), hash("new-1")]), "only old-only leaves");
        let pruned = datastore.tuf_repo_get_by_version("1.0.0").await.unwrap();
        assert!(pruned.repo.time_pruned.is_some());
        let twice = datastore.tuf_repo_mark_pruned(old_id, generation).await.unwrap_err();
        assert!(matches!(twice, DataStoreError::NotFound { .. }), "{twice:?}");

        let unpruned = datastore.tuf_repo_insert(&old).await.unwrap();
        assert_eq!(unpruned.status, TufRepoInsertStatus::AlreadyExists);
        assert_eq!(unpruned.generation, Generation::new(5));
        assert!(unpruned.recorded.repo.time_pruned.is_none());
        let (generation, hashes) = config_hashes(&datastore).await;
        assert_eq!((generation, hashes.len()), (Generation::new(5), 3));
    }

    #[tokio::test]
    async fn list_pages_newest_first() {
        let (_db, datastore) = datastore().await;
        for minor in 0..5 {
            let version = format!("1.{minor}.0");
            datastore.tuf_repo_insert(&repo(&version, vec![artifact("a", &version)])).await.unwrap();
        }
        let mut seen = Vec::new();
        let mut page = TufRepoPage { limit: 2, after: None };
        loop {
            let rows = datastore.tuf_repo_list(&page).await.unwrap();
            let Some(last) = rows.last() else { break };
            page.after = Some((last.time_created, last.id));
            seen.extend(rows.iter().map(|r| r.system_version.clone()));
        }
        assert_eq!(seen, ["1.4.0", "1.3.0", "1.2.0", "1.1.0", "1.0.0"]);
    }

    #[tokio::test]
    async fn invalid_descriptions_are_refused_before_the_database() {
        let (_db, datastore) = datastore().await;
        let error = datastore.tuf_repo_insert(&repo("1.0.0", vec![])).await.unwrap_err();
        assert_eq!(error.to_string(), "TUF repository 1.0.0 has no artifacts");
        let error = datastore
            .tuf_repo_insert(&repo("1.0.0", vec![artifact("a", "1"), artifact("a", "1")]))
            .await
            .unwrap_err();
        assert_eq!(error.to_string(), "TUF repository 1.0.0 lists artifact a 1 (zone) twice");
        assert_eq!(datastore.tuf_generation_get().await.unwrap(), Generation::FIRST);
    }

    /// Concurrent inserts of different repositories, sharing an artifact, all
    /// land, and each bumps the generation exactly once: no lost update.
    /// Concurrent inserts of one repository insert it exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_inserts_serialize_on_the_generation() {
        let (_db, datastore) = datastore().await;
        let datastore = std::sync::Arc::new(datastore);
        let distinct: Vec<_> = (0..8)
            .map(|i| {
                repo(&format!("1.{i}.0"), vec![artifact("shared", "1"), artifact(&format!("own{i}"), "1")])
            })
            .collect();
        let same = repo("2.0.0", vec![artifact("shared", "1"), artifact("two", "1")]);
        let mut tasks = Vec::new();
        for description in distinct.iter().cloned().chain(std::iter::repeat_n(same.clone(), 8)) {
            let datastore = datastore.clone();
            tasks.push(tokio::spawn(async move { datastore.tuf_repo_insert(&description).await }));
        }
        let mut inserted = 0;
        for task in tasks {
            let result = task.await.unwrap().unwrap();
            inserted += usize::from(result.status == TufRepoInsertStatus::Inserted);
        }
        assert_eq!(inserted, 9, "8 distinct repositories and one of the 8 identical uploads");
        let (generation, hashes) = config_hashes(&datastore).await;
        assert_eq!(generation, Generation::new(1 + 9), "one bump per insert, none lost");
        assert_eq!(hashes.len(), 1 + 8 + 1);
    }
}
