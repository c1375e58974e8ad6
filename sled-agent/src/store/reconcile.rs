//! The delete reconciler: removes every file of a device's artifact dataset
//! that the enforced config does not list. It runs when a config is
//! accepted, when a device comes back, and once at start-up, always under
//! the config lock, and never while the ledger is damaged (the store then
//! does not know the config, and an older one must not decide deletions).

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
    }
}
