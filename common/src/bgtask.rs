//! The status of Nexus background tasks, as Nexus reports it and omdb shows
//! it.
//!
//! A task's `details` are the JSON its activation returned. Where the driver
//! itself decided the outcome (the task panicked, or is disabled) the details
//! are a [`DriverDetails`] instead. Tasks of ours publish typed details,
//! defined in [`details`], so omdb can render them field by field.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Why an activation ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActivationReason {
    /// The task's period elapsed (this includes the first activation, at
    /// start-up).
    Timeout,
    /// Someone asked: the internal API, omdb, or another part of Nexus.
    Signaled,
    /// A task this one depends on published new data.
    Dependency,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CurrentStatus {
    Idle,
    Running {
        iteration: u64,
        start_time: DateTime<Utc>,
        reason: ActivationReason,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LastResult {
    NeverCompleted,
    Completed {
        iteration: u64,
        start_time: DateTime<Utc>,
        reason: ActivationReason,
        elapsed: Duration,
        details: serde_json::Value,
    },
}

/// Whether a task does its work when activated, and who decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskSwitch {
    pub enabled: bool,
    /// Who or what set the switch last: "config file" at start-up, or what the
    /// caller of the internal API said (omdb says user and host).
    pub changed_by: String,
    pub time_changed: DateTime<Utc>,
}

/// Outcomes the driver records in place of the task's own details.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriverDetails {
    /// The activation panicked; the task stays registered and is activated
    /// again as usual.
    Panicked { message: String },
    /// The task is disabled and did no work.
    Disabled {
        changed_by: String,
        time_changed: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackgroundTask {
    pub name: String,
    pub description: String,
    pub period: Duration,
    pub switch: TaskSwitch,
    pub current: CurrentStatus,
    pub last: LastResult,
}

/// Typed details of the tasks Nexus runs.
pub mod details {
    use super::*;
    use crate::Generation;
    use uuid::Uuid;

    /// `tuf_repo_pruner`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct TufRepoPrunerStatus {
        /// How many of the newest repositories are kept.
        pub nkeep: u32,
        pub outcome: TufRepoPrunerOutcome,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    pub enum TufRepoPrunerOutcome {
        /// No unpruned repository beyond the newest `nkeep`.
        NothingToPrune {
            unpruned: u32,
        },
        Pruned {
            repo_id: Uuid,
            system_version: String,
            generation: Generation,
        },
        /// The generation changed between reading and pruning: another Nexus
        /// (or an upload) got there first. Nothing was pruned this time.
        GenerationMoved {
            expected: Generation,
            found: Generation,
        },
        Error {
            message: String,
        },
    }
}
