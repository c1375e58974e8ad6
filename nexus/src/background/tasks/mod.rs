//! One module per background task; each module's doc explains its algorithm
//! and the races it defends against.

pub mod inventory_collection;
pub mod replication_plan;
pub mod repo_health;
pub mod tuf_artifact_replication;
pub mod tuf_repo_pruner;
