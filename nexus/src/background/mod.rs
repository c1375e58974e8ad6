//! Background tasks: the driver that runs them and one file per task.
//!
//! [`register_all`] is the single place that says which tasks Nexus runs,
//! with their periods and knobs from the config file.

pub mod driver;
pub mod tasks;

use crate::app::staging::{StagedRepo, StagingArea};
use crate::config::BackgroundTasksConfig;
use crate::db::DataStore;
use driver::{Activator, TaskDefinition};
use std::sync::Arc;
use std::time::Duration;
use tasks::tuf_artifact_replication::{ArtifactReplication, ProgressMap, ReplicationSettings};
use tokio::sync::mpsc;

/// What the replication task is wired to.
pub struct ReplicationWiring {
    pub staging: Arc<StagingArea>,
    pub handoff: mpsc::Receiver<StagedRepo>,
    pub recovered: Vec<StagedRepo>,
    pub activator: Activator,
    pub progress: ProgressMap,
    /// This Nexus (named in what its tasks record).
    pub nexus_id: uuid::Uuid,
    /// This Nexus's internal API URL, once it listens (see
    /// `tuf_artifact_replication`'s `depot_url`).
    pub depot_url: std::sync::Arc<std::sync::OnceLock<String>>,
}

pub fn register_all(
    config: &BackgroundTasksConfig,
    datastore: &Arc<DataStore>,
    replication: ReplicationWiring,
) -> Vec<TaskDefinition> {
    let pruner = &config.tuf_repo_pruner;
    let (pruned, pruned_rx) = tokio::sync::watch::channel(common::Generation::FIRST);
    let replication_config = &config.tuf_artifact_replication;
    let settings = ReplicationSettings {
        min_sled_replication: replication_config.min_sled_replication,
        allow_fewer_sleds: replication_config.allow_fewer_sleds,
        max_concurrent_requests: replication_config.max_concurrent_requests,
        max_concurrent_puts: replication_config.max_concurrent_puts,
        max_concurrent_copy_requests: replication_config.max_concurrent_copy_requests,
        ring_buffer_size: replication_config.ring_buffer_size,
        followup_delay: Duration::from_millis(replication_config.followup_delay_millis),
        fanout: replication_config.fanout,
        backoff_base: Duration::from_millis(replication_config.backoff_base_millis),
        backoff_max: Duration::from_secs(replication_config.backoff_max_secs),
        request_timeout: Duration::from_secs(replication_config.request_timeout_secs),
        put_timeout: Duration::from_secs(replication_config.put_timeout_secs),
    };
    let inventory = &config.inventory_collection;
    let (activator, nexus_id) = (replication.activator.clone(), replication.nexus_id);
    let replicator = ArtifactReplication::new(datastore.clone(), settings, replication);
    let followups = replicator.followups();
    vec![
        TaskDefinition {
            name: "inventory_collection".into(),
            description:
                "records what every sled agent reports: M.2 devices, their state and usage, and its \
                          artifact config generation"
                    .into(),
            period: Duration::from_secs(inventory.period_secs),
            task: Box::new(tasks::inventory_collection::InventoryCollector::new(
                datastore.clone(),
                format!("nexus {nexus_id}"),
                inventory.keep_collections,
                inventory.max_concurrent_requests,
                Duration::from_secs(inventory.request_timeout_secs),
            )),
            activator: Activator::new(),
            dependencies: Vec::new(),
            enabled: !inventory.disabled,
        },
        TaskDefinition {
            name: "tuf_artifact_replication".into(),
            description:
                "makes every sled hold every artifact of every unpruned TUF repository on each healthy M.2"
                    .into(),
            period: Duration::from_secs(replication_config.period_secs),
            activator,
            task: Box::new(replicator),
            dependencies: vec![Box::new(pruned_rx), Box::new(followups)],
            enabled: !replication_config.disabled,
        },
        TaskDefinition {
            name: "tuf_repo_pruner".into(),
            description: format!(
                "marks TUF repositories beyond the {} newest pruned, one per activation",
                pruner.nkeep
            ),
            period: Duration::from_secs(pruner.period_secs),
            task: Box::new(tasks::tuf_repo_pruner::TufRepoPruner::new(
                datastore.clone(),
                pruner.nkeep,
                pruned,
            )),
            activator: Activator::new(),
            dependencies: Vec::new(),
            enabled: !pruner.disabled,
        },
    ]
}
