//! Judging each repository's replication health (DESIGN §12) from what one
//! replication activation saw: a pure function, tested on its own.
//!
//! Per artifact, over the sleds in service that have a healthy M.2 (a sled
//! with none can hold nothing and does not hold a repository back):
//! - `lost`: no such sled holds a copy, no Nexus has it staged, and every
//!   sled answered (if one did not, it might hold it: `degraded`, not lost);
//! - `degraded`: fewer than `min_sled_replication` sleds (or all of them, if
//!   there are fewer) hold a copy, and no Nexus has it staged;
//! - `replicated`: every such sled answered and holds it on each of its
//!   healthy M.2s;
//! - `replicating`: anything else (safe, on its way).
//!
//! A repository is as healthy as its worst artifact.

use crate::db::model::TufRepoWithArtifacts;
use common::ArtifactHash;
use common::api::external::{ArtifactHealth, RepoHealth};
use std::collections::BTreeMap;
use uuid::Uuid;

/// What one activation saw.
pub struct Observed<'a> {
    /// Every sled in service, answered or not.
    pub sleds_in_service: usize,
    /// Healthy M.2s of each sled that answered.
    pub listed: &'a BTreeMap<Uuid, usize>,
    /// Copies of each artifact on each sled that answered.
    pub copies: &'a BTreeMap<ArtifactHash, BTreeMap<Uuid, usize>>,
    /// The Nexus instances that hold each artifact staged.
    pub staged: &'a BTreeMap<ArtifactHash, Vec<Uuid>>,
    pub min_sled_replication: usize,
}

pub fn assess(repo: &TufRepoWithArtifacts, observed: &Observed<'_>) -> (RepoHealth, Vec<ArtifactHealth>) {
    let artifacts: Vec<ArtifactHealth> = repo
        .artifacts
        .iter()
        .map(|artifact| {
            let hash = artifact.sha256.0;
            let sleds: BTreeMap<Uuid, usize> = observed
                .copies
                .get(&hash)
                .into_iter()
                .flatten()
                .filter(|&(sled, &copies)| copies > 0 && observed.listed.get(sled).is_some_and(|&m2| m2 > 0))
                .map(|(sled, copies)| (*sled, *copies))
                .collect();
            let staged_by = observed.staged.get(&hash).cloned().unwrap_or_default();
            ArtifactHealth {
                name: artifact.name.clone(),
                version: artifact.version.clone(),
                kind: artifact.kind.clone(),
                sha256: hash,
                state: artifact_state(&sleds, !staged_by.is_empty(), observed),
                sleds,
                staged_by,
            }
        })
        .collect();
    let state = artifacts.iter().map(|artifact| artifact.state).max().unwrap_or(RepoHealth::Replicated);
    (state, artifacts)
}

fn artifact_state(holders: &BTreeMap<Uuid, usize>, staged: bool, observed: &Observed<'_>) -> RepoHealth {
    let usable: Vec<(&Uuid, &usize)> = observed.listed.iter().filter(|&(_, &m2)| m2 > 0).collect();
    let everyone_answered = observed.listed.len() == observed.sleds_in_service;
    let needed = observed.min_sled_replication.min(usable.len()).max(1);
    if holders.is_empty() && !staged {
        return if everyone_answered { RepoHealth::Lost } else { RepoHealth::Degraded };
    }
    if holders.len() < needed && !staged {
        return RepoHealth::Degraded;
    }
    let complete = everyone_answered && usable.iter().all(|&(sled, &m2)| holders.get(sled) == Some(&m2));
    if complete { RepoHealth::Replicated } else { RepoHealth::Replicating }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::model::{DbArtifactHash, TufArtifact, TufRepo};

    fn repo(hashes: &[u8]) -> TufRepoWithArtifacts {
        let now = chrono::Utc::now();
        TufRepoWithArtifacts {
            repo: TufRepo {
                id: Uuid::from_u128(1),
                time_created: now,
                sha256: DbArtifactHash(ArtifactHash([0; 32])),
                system_version: "1.0.0".into(),
                file_name: "x.zip".into(),
                time_pruned: None,
                time_last_uploaded: now,
            },
            artifacts: hashes
                .iter()
                .map(|&n| TufArtifact {
                    id: Uuid::from_u128(100 + u128::from(n)),
                    name: format!("a{n}"),
                    version: "1".into(),
                    kind: "zone".into(),
                    sha256: DbArtifactHash(ArtifactHash([n; 32])),
                    size: 10,
                    time_created: now,
                    generation_added: 2,
                })
                .collect(),
        }
    }

    fn sled(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    struct World {
        listed: BTreeMap<Uuid, usize>,
        copies: BTreeMap<ArtifactHash, BTreeMap<Uuid, usize>>,
        staged: BTreeMap<ArtifactHash, Vec<Uuid>>,
        in_service: usize,
    }

    impl World {
        fn new(sleds: u128) -> World {
            World {
                listed: (1..=sleds).map(|n| (sled(n), 2)).collect(),
                copies: BTreeMap::new(),
                staged: BTreeMap::new(),
                in_service: sleds as usize,
            }
        }

        fn holds(mut self, artifact: u8, sleds: &[u128], copies: usize) -> World {
            let entry = self.copies.entry(ArtifactHash([artifact; 32])).or_default();
            for &n in sleds {
                entry.insert(sled(n), copies);
            }
            self
        }

        fn staged(mut self, artifact: u8) -> World {
            self.staged.insert(ArtifactHash([artifact; 32]), vec![Uuid::from_u128(999)]);
            self
        }

        fn judge(&self, artifacts: &[u8]) -> RepoHealth {
            let observed = Observed {
                sleds_in_service: self.in_service,
                listed: &self.listed,
                copies: &self.copies,
                staged: &self.staged,
                min_sled_replication: 3,
            };
            assess(&repo(artifacts), &observed).0
        }
    }

    #[test]
    fn every_state_and_the_worst_artifact_wins() {
        let everywhere = World::new(4).holds(1, &[1, 2, 3, 4], 2);
        assert_eq!(everywhere.judge(&[1]), RepoHealth::Replicated);
        let on_three = World::new(4).holds(1, &[1, 2, 3], 2);
        assert_eq!(on_three.judge(&[1]), RepoHealth::Replicating, "on min sleds: safe, not done");
        let one_m2_short = World::new(4).holds(1, &[1, 2, 3], 2).holds(1, &[4], 1);
        assert_eq!(one_m2_short.judge(&[1]), RepoHealth::Replicating);
        let on_two = World::new(4).holds(1, &[1, 2], 2);
        assert_eq!(on_two.judge(&[1]), RepoHealth::Degraded);
        assert_eq!(
            World::new(4).holds(1, &[1, 2], 2).staged(1).judge(&[1]),
            RepoHealth::Replicating,
            "staged"
        );
        assert_eq!(World::new(4).judge(&[1]), RepoHealth::Lost);
        assert_eq!(World::new(4).staged(1).judge(&[1]), RepoHealth::Replicating);
        let mixed = World::new(4).holds(1, &[1, 2, 3, 4], 2);
        assert_eq!(mixed.judge(&[1, 2]), RepoHealth::Lost, "the worst artifact decides");
    }

    #[test]
    fn an_unanswered_sled_is_no_proof_of_loss_and_an_empty_sled_holds_nothing_back() {
        let mut silent = World::new(4).holds(1, &[1, 2, 3], 2);
        silent.listed.remove(&sled(4));
        assert_eq!(silent.judge(&[1]), RepoHealth::Replicating, "cannot be replicated without sled 4's word");
        let mut nobody = World::new(4);
        nobody.listed.remove(&sled(4));
        assert_eq!(nobody.judge(&[1]), RepoHealth::Degraded, "sled 4 might hold it");
        let mut broken = World::new(4).holds(1, &[1, 2, 3], 2);
        broken.listed.insert(sled(4), 0);
        assert_eq!(
            broken.judge(&[1]),
            RepoHealth::Replicated,
            "a sled with no healthy M.2 holds nothing back"
        );
        let small = World::new(2).holds(1, &[1, 2], 2);
        assert_eq!(small.judge(&[1]), RepoHealth::Replicated, "fewer sleds than the minimum: all of them");
    }
}
