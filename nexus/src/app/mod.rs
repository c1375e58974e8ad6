//! The Nexus application object: what the HTTP handlers and background tasks
//! share, and the operations behind the external API.

pub mod staging;
pub mod update;

use crate::auth::OperatorToken;
use crate::background::driver::Driver;
use crate::background::tasks::tuf_artifact_replication::ProgressMap;
use crate::db::DataStore;
use camino::Utf8PathBuf;
use common::ArtifactHash;
use common::api::external::ReplicationProgress;
use std::sync::Arc;
use uuid::Uuid;

pub struct Nexus {
    /// Names this process in what it records (and in test delay points).
    pub id: Uuid,
    pub log: slog::Logger,
    pub datastore: Arc<DataStore>,
    pub background: Driver,
    pub uploader: update::Uploader,
    pub operator_token: OperatorToken,
    pub replication_progress: ProgressMap,
    /// Staged artifacts served to sleds at once ([`Nexus::open_staged`]).
    pub staged_reads: Arc<tokio::sync::Semaphore>,
}

/// Staged artifacts Nexus serves to sleds at once. Few: sleds read from it
/// only when every sled they could read from is slow or gone, and each
/// read shares Nexus's own link with its PUTs.
pub const MAX_STAGED_READS: usize = 8;

/// Why a staged artifact cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum StagedReadError {
    #[error("artifact {hash} is not staged on this Nexus")]
    NotStaged { hash: ArtifactHash },
    #[error("this Nexus already serves {limit} staged artifacts; retry later")]
    Busy { limit: usize },
    #[error("opening staged artifact {hash} at {path}")]
    Io { hash: ArtifactHash, path: Utf8PathBuf, source: std::io::Error },
}

impl Nexus {
    /// What this Nexus's replication task last saw of a repository.
    pub fn replication_progress(&self, repo_id: Uuid) -> Option<ReplicationProgress> {
        self.replication_progress.lock().unwrap_or_else(|e| e.into_inner()).get(&repo_id).cloned()
    }

    /// Opens a staged artifact for a sled's copy to read, with its length
    /// and the read's permit. A staged file is complete (uploads are
    /// renamed into `artifacts/` once hashed), and a file released while
    /// it is read stays readable through the open handle.
    pub async fn open_staged(
        &self,
        hash: &ArtifactHash,
    ) -> Result<(tokio::fs::File, u64, tokio::sync::OwnedSemaphorePermit), StagedReadError> {
        let permit = self
            .staged_reads
            .clone()
            .try_acquire_owned()
            .map_err(|_| StagedReadError::Busy { limit: MAX_STAGED_READS })?;
        let path = self.uploader.staging.artifact_path(hash);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(StagedReadError::NotStaged { hash: *hash });
            }
            Err(source) => return Err(StagedReadError::Io { hash: *hash, path, source }),
        };
        let length = file
            .metadata()
            .await
            .map_err(|source| StagedReadError::Io { hash: *hash, path: path.clone(), source })?
            .len();
        Ok((file, length, permit))
    }
}
