//! Background tasks: the driver that runs them and one file per task.
//!
//! [`register_all`] is the single place that says which tasks Nexus runs,
//! with their periods and knobs from the config file.

pub mod driver;
pub mod tasks;

use crate::config::BackgroundTasksConfig;
use crate::db::DataStore;
use driver::{Activator, TaskDefinition};
use std::sync::Arc;
use std::time::Duration;

pub fn register_all(
    config: &BackgroundTasksConfig,
    datastore: &Arc<DataStore>,
) -> Vec<TaskDefinition> {
    let pruner = &config.tuf_repo_pruner;
    vec![TaskDefinition {
        name: "tuf_repo_pruner".into(),
        description: format!(
            "marks TUF repositories beyond the {} newest pruned, one per activation",
            pruner.nkeep
        ),
        period: Duration::from_secs(pruner.period_secs),
        task: Box::new(tasks::tuf_repo_pruner::TufRepoPruner::new(
            datastore.clone(),
            pruner.nkeep,
        )),
        activator: Activator::new(),
        dependencies: Vec::new(),
        enabled: !pruner.disabled,
    }]
}
