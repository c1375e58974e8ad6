//! The Nexus application object: what the HTTP handlers and background tasks
//! share, and the operations behind the external API.

pub mod staging;
pub mod update;

use crate::auth::OperatorToken;
use crate::background::driver::Driver;
use crate::background::tasks::tuf_artifact_replication::ProgressMap;
use crate::db::DataStore;
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
}

impl Nexus {
    /// What this Nexus's replication task last saw of a repository.
    pub fn replication_progress(&self, repo_id: Uuid) -> Option<ReplicationProgress> {
        self.replication_progress.lock().unwrap_or_else(|e| e.into_inner()).get(&repo_id).cloned()
    }
}
