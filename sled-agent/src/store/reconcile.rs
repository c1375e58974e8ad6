//! The delete reconciler: removes every file of a device's artifact dataset
//! that the enforced config does not list, and every held partial copy of an
//! artifact it does not list. It runs when a config is accepted, when a
//! device comes back, and once at start-up, always under the config lock,
//! and never while the ledger is damaged (the store then does not know the
//! config, and an older one must not decide deletions). A partial that a
//! copy is writing is not held: that copy fails at its commit, since the
//! config no longer lists its artifact, and removes its own temp files.

use super::ArtifactStore;
use crate::storage::M2;
use common::{ArtifactConfig, ArtifactHash};

impl ArtifactStore {
    pub(super) fn delete_unreferenced(&self, m2: &M2, config: &ArtifactConfig) {
        let files = match m2.artifact_files() {
            Ok(files) => files,
            Err(error) => {
                slog::warn!(self.log, "listing artifacts failed"; "slot" => m2.slot, "error" => %error);
                return;
            }
        };
        let mut deleted = 0;
        for name in files {
            let wanted = name.parse::<ArtifactHash>().is_ok_and(|hash| config.artifacts.contains(&hash));
            if wanted {
                continue;
            }
            let path = m2.dataset().join(&name);
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    m2.forget_stored(size);
                    if let Ok(hash) = name.parse::<ArtifactHash>() {
                        self.stamps(m2).forget(&hash);
                    }
                    deleted += 1;
                    slog::info!(self.log, "deleted artifact outside the config"; "path" => %path);
                }
                Err(error) => {
                    slog::warn!(self.log, "deleting artifact failed"; "path" => %path, "error" => %error)
                }
            }
        }
        if deleted > 0
            && let Err(error) = common::durable::sync_dir(&m2.dataset())
        {
            slog::warn!(self.log, "syncing the artifact dataset failed"; "slot" => m2.slot, "error" => %error);
        }
        for hash in m2.held_partials().into_iter().filter(|hash| !config.artifacts.contains(hash)) {
            match m2.discard_partial(&hash) {
                Ok(_) => {
                    slog::info!(self.log, "deleted a partial copy outside the config"; "slot" => m2.slot,
                    "hash" => %hash)
                }
                Err(error) => slog::warn!(self.log, "deleting a partial copy failed"; "slot" => m2.slot,
                    "hash" => %hash, "error" => %error),
            }
        }
    }
}
