//! `tuf_repo_pruner`: keeps the `nkeep` most recently uploaded repositories
//! and marks older ones pruned, at most one per activation. "Uploaded" means
//! the latest upload (`time_last_uploaded`): re-uploading an old repository,
//! pruned or not, makes it the newest, so it is not pruned again at once.
//!
//! Never pruned, whatever `nkeep` says: the current target release, the
//! previous one, and the newest upload (DESIGN §12; omicron keeps the same
//! three). So `nkeep` is how many repositories may stay before the oldest
//! *other* one goes: with `nkeep = 3` and the target releases among the
//! oldest, the rack keeps the two target releases and the newest upload,
//! and each further upload prunes the oldest repository that is none of
//! them. An `nkeep` below 3 can leave more than `nkeep` repositories when
//! all of them are protected.
//!
//! Algorithm: read the generation, then list the unpruned repositories; if
//! there are more than `nkeep`, mark the oldest pruned *on condition that the
//! generation is still the one read first*.
//!
//! Races: an upload, an unprune or another Nexus's pruner may change the set
//! of live repositories between our two reads and our write. Every such change
//! bumps the generation, so the conditional mark fails and we report
//! `generation_moved` and try again at the next activation, with fresh data.
//! Two pruners can therefore never both prune on the same picture, and a
//! repository that was just re-uploaded (unpruned) is not pruned on a stale
//! view of its age. Pruning only marks rows: `tuf_artifact_replication`
//! removes the artifacts from the sleds once the new config reaches them.

use crate::background::driver::BackgroundTask;
use crate::db::{DataStore, DataStoreError};
use common::Generation;
use common::bgtask::details::{TufRepoPrunerOutcome, TufRepoPrunerStatus};
use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::sync::watch;

pub struct TufRepoPruner {
    datastore: Arc<DataStore>,
    nkeep: u32,
    /// Publishes the generation of each prune, so that replication (which
    /// depends on it) removes the artifacts from the sleds right away.
    pruned: watch::Sender<Generation>,
}

impl TufRepoPruner {
    pub fn new(datastore: Arc<DataStore>, nkeep: u32, pruned: watch::Sender<Generation>) -> TufRepoPruner {
        TufRepoPruner { datastore, nkeep, pruned }
    }

    async fn prune_one(&self) -> Result<TufRepoPrunerOutcome, DataStoreError> {
        let generation = self.datastore.tuf_generation_get().await?;
        let unpruned = self.datastore.tuf_repo_list_unpruned().await?;
        let mut protected = self.datastore.target_releases().await?.repo_ids();
        protected.extend(unpruned.first().map(|newest| newest.id));
        let oldest = unpruned.iter().rev().find(|repo| !protected.contains(&repo.id));
        let Some(oldest) = oldest.filter(|_| unpruned.len() > self.nkeep as usize) else {
            return Ok(TufRepoPrunerOutcome::NothingToPrune { unpruned: unpruned.len() as u32 });
        };
        match self.datastore.tuf_repo_mark_pruned(oldest.id, generation).await {
            Ok(generation) => Ok(TufRepoPrunerOutcome::Pruned {
                repo_id: oldest.id,
                system_version: oldest.system_version.clone(),
                generation,
            }),
            Err(DataStoreError::GenerationMoved { expected, found }) => {
                Ok(TufRepoPrunerOutcome::GenerationMoved { expected, found })
            }
            Err(error) => Err(error),
        }
    }
}

impl BackgroundTask for TufRepoPruner {
    fn activate<'a>(
        &'a mut self,
        log: &'a slog::Logger,
        _reason: common::bgtask::ActivationReason,
    ) -> BoxFuture<'a, serde_json::Value> {
        Box::pin(async move {
            let outcome = self.prune_one().await.unwrap_or_else(|error| {
                let message = crate::error_chain(&error);
                slog::warn!(log, "pruning failed"; "error" => &message);
                TufRepoPrunerOutcome::Error { message }
            });
            if let TufRepoPrunerOutcome::Pruned { system_version, generation, .. } = &outcome {
                slog::info!(log, "pruned repository"; "system_version" => system_version, "generation" => %generation);
                self.pruned.send_replace(*generation);
            }
            serde_json::to_value(TufRepoPrunerStatus { nkeep: self.nkeep, outcome }).expect("serializable")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::datastore::test_support::datastore;
    use crate::db::model::{TufArtifactDescription, TufRepoDescription};
    use common::bgtask::ActivationReason;
    use common::{ArtifactHash, ArtifactId};

    fn repo(version: &str) -> TufRepoDescription {
        let byte = version.bytes().fold(0u8, |acc, b| acc.wrapping_mul(31).wrapping_add(b));
        TufRepoDescription {
            system_version: version.into(),
            sha256: ArtifactHash([byte; 32]),
            file_name: format!("{version}.zip"),
            trust_root_id: crate::db::datastore::test_support::TEST_TRUST_ROOT,
            artifacts: vec![TufArtifactDescription {
                id: ArtifactId { name: format!("os-{version}"), version: version.into(), kind: "os".into() },
                sha256: ArtifactHash([byte.wrapping_add(1); 32]),
                size: 10,
            }],
        }
    }

    fn outcome(value: serde_json::Value) -> TufRepoPrunerOutcome {
        serde_json::from_value::<TufRepoPrunerStatus>(value).unwrap().outcome
    }

    #[tokio::test]
    async fn prunes_the_oldest_beyond_nkeep_one_per_activation() {
        let (_db, datastore) = datastore().await;
        let datastore = Arc::new(datastore);
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let (pruned, mut pruned_rx) = watch::channel(Generation::FIRST);
        let mut pruner = TufRepoPruner::new(datastore.clone(), 2, pruned);
        for version in ["1.0.0", "2.0.0"] {
            datastore.tuf_repo_insert(&repo(version)).await.unwrap();
        }
        assert_eq!(
            outcome(pruner.activate(&log, ActivationReason::Explicit).await),
            TufRepoPrunerOutcome::NothingToPrune { unpruned: 2 }
        );

        for version in ["3.0.0", "4.0.0"] {
            datastore.tuf_repo_insert(&repo(version)).await.unwrap();
        }
        let first = outcome(pruner.activate(&log, ActivationReason::Explicit).await);
        assert!(
            matches!(&first, TufRepoPrunerOutcome::Pruned { system_version, generation, .. }
                if system_version == "1.0.0" && *generation == Generation::new(6)),
            "{first:?}"
        );
        assert!(pruned_rx.has_changed().unwrap(), "dependents are told of the prune");
        assert_eq!(*pruned_rx.borrow_and_update(), Generation::new(6));
        let second = outcome(pruner.activate(&log, ActivationReason::Explicit).await);
        assert!(
            matches!(&second, TufRepoPrunerOutcome::Pruned { system_version, .. } if system_version == "2.0.0")
        );
        assert_eq!(
            outcome(pruner.activate(&log, ActivationReason::Explicit).await),
            TufRepoPrunerOutcome::NothingToPrune { unpruned: 2 }
        );
        let live: Vec<String> =
            datastore.tuf_repo_list_unpruned().await.unwrap().into_iter().map(|r| r.system_version).collect();
        assert_eq!(live, ["4.0.0", "3.0.0"]);
    }

    /// A pruned repository uploaded again is the newest upload: the pruner
    /// prunes the oldest *other* repository, not the one just re-uploaded.
    #[tokio::test]
    async fn a_reuploaded_repository_ranks_as_the_newest() {
        let (_db, datastore) = datastore().await;
        let datastore = Arc::new(datastore);
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let (pruned, _pruned_rx) = watch::channel(Generation::FIRST);
        let mut pruner = TufRepoPruner::new(datastore.clone(), 2, pruned);
        for version in ["1.0.0", "2.0.0", "3.0.0"] {
            datastore.tuf_repo_insert(&repo(version)).await.unwrap();
        }
        let first = outcome(pruner.activate(&log, ActivationReason::Explicit).await);
        assert!(
            matches!(&first, TufRepoPrunerOutcome::Pruned { system_version, .. } if system_version == "1.0.0")
        );
        datastore.tuf_repo_insert(&repo("1.0.0")).await.unwrap();
        let second = outcome(pruner.activate(&log, ActivationReason::Explicit).await);
        assert!(
            matches!(&second, TufRepoPrunerOutcome::Pruned { system_version, .. } if system_version == "2.0.0"),
            "{second:?}"
        );
        let live: Vec<String> =
            datastore.tuf_repo_list_unpruned().await.unwrap().into_iter().map(|r| r.system_version).collect();
        assert_eq!(live, ["1.0.0", "3.0.0"]);
    }
}
