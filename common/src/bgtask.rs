//! The status of Nexus background tasks, as Nexus reports it and omdb shows
//! it.
//!
//! A task's `details` are the JSON its activation returned. Where the driver
//! itself decided the outcome (the task panicked, or its switch skipped the
//! activation) the details are a [`DriverDetails`] instead. Tasks of ours
//! publish typed details, defined in [`details`], so omdb can render them
//! field by field.
//!
//! The switch ([`TaskSwitch`]) is cluster-wide: it lives in the database and
//! every Nexus honours it. While the database has no switch for a task, each
//! Nexus uses its config file's (`disabled = true` means [`TaskMode::Disabled`],
//! otherwise [`TaskMode::Enabled`]); once someone sets the switch, the
//! database's wins over every config file.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

/// Why an activation ran. The task is told (its `activate` receives it), and
/// the switch's mode decides by it whether the activation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActivationReason {
    /// The task's period elapsed (this includes the first activation, at
    /// start-up).
    Periodic,
    /// Someone asked: the internal API, omdb, or another part of Nexus (an
    /// upload, or the task itself scheduling a follow-up).
    Explicit,
    /// A task this one depends on published new data.
    Dependency,
}

impl ActivationReason {
    /// The name stored in the database and shown by omdb.
    pub fn as_str(self) -> &'static str {
        match self {
            ActivationReason::Periodic => "periodic",
            ActivationReason::Explicit => "explicit",
            ActivationReason::Dependency => "dependency",
        }
    }
}

impl std::str::FromStr for ActivationReason {
    type Err = UnknownName;

    fn from_str(name: &str) -> Result<Self, UnknownName> {
        [ActivationReason::Periodic, ActivationReason::Explicit, ActivationReason::Dependency]
            .into_iter()
            .find(|reason| reason.as_str() == name)
            .ok_or_else(|| UnknownName { kind: "activation reason", name: name.to_string() })
    }
}

/// What a task's switch lets run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskMode {
    /// Every activation runs.
    Enabled,
    /// Periodic activations are skipped (the timer is stopped); explicit
    /// ones run, and so do dependency ones: a dependency publishes only
    /// because work was done upstream (often after an explicit activation
    /// there), and that work's consequences should follow it.
    Manual,
    /// No activation runs.
    Disabled,
}

impl TaskMode {
    /// Whether an activation for `reason` does the task's work.
    pub fn runs(self, reason: ActivationReason) -> bool {
        match self {
            TaskMode::Enabled => true,
            TaskMode::Manual => reason != ActivationReason::Periodic,
            TaskMode::Disabled => false,
        }
    }

    /// The name stored in the database and shown by omdb.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskMode::Enabled => "enabled",
            TaskMode::Manual => "manual",
            TaskMode::Disabled => "disabled",
        }
    }
}

impl std::str::FromStr for TaskMode {
    type Err = UnknownName;

    fn from_str(name: &str) -> Result<Self, UnknownName> {
        [TaskMode::Enabled, TaskMode::Manual, TaskMode::Disabled]
            .into_iter()
            .find(|mode| mode.as_str() == name)
            .ok_or_else(|| UnknownName { kind: "task mode", name: name.to_string() })
    }
}

impl std::fmt::Display for TaskMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored name that is not one of an enum's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown {kind} {name:?}")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CurrentStatus {
    Idle,
    Running { iteration: u64, start_time: DateTime<Utc>, reason: ActivationReason },
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

/// Which activations of a task do its work, and who decided, when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskSwitch {
    pub mode: TaskMode,
    /// Who set the switch: what the caller of the internal API said (omdb
    /// says user and host), or "config file" while the database has none.
    pub changed_by: String,
    pub reason: String,
    pub time_changed: DateTime<Utc>,
}

/// Outcomes the driver records in place of the task's own details.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriverDetails {
    /// The activation panicked; the task stays registered and is activated
    /// again as usual.
    Panicked { message: String },
    /// The switch's mode does not let this activation run (`disabled` skips
    /// every one, `manual` the periodic ones); the task did no work. The
    /// rest is the switch that decided.
    Skipped { mode: TaskMode, changed_by: String, reason: String, time_changed: DateTime<Utc> },
}

/// One Nexus's last activation of a task that did the task's work (skipped
/// ones are not recorded), as the database has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NexusActivation {
    pub nexus_id: Uuid,
    pub iteration: u64,
    pub reason: ActivationReason,
    pub time_started: DateTime<Utc>,
    /// `None` while it runs, or if that Nexus stopped before it finished.
    pub time_done: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackgroundTask {
    pub name: String,
    pub description: String,
    pub period: Duration,
    /// The switch this Nexus honours, as read from the database for this
    /// view (the config file's while the database has none).
    pub switch: TaskSwitch,
    /// What could not be read from the database, for this view or for the
    /// last activation. The driver then goes on with the last switch it
    /// read, which is what `switch` shows if this view could not read it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub database_errors: Vec<String>,
    /// This Nexus's activation in progress, if any.
    pub current: CurrentStatus,
    /// This Nexus's last completed activation, skipped or not.
    pub last: LastResult,
    /// Every Nexus's last activation that did work, by Nexus id.
    pub activations: Vec<NexusActivation>,
}

/// Typed details of the tasks Nexus runs.
pub mod details {
    use super::*;
    use crate::{ArtifactHash, Generation};
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

    /// `inventory_collection`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct InventoryCollectionStatus {
        /// The collection recorded by this activation, if one was.
        pub collection_id: Option<Uuid>,
        pub sleds_ok: usize,
        /// Sleds that could not be asked, and database errors.
        pub errors: Vec<String>,
    }

    /// `tuf_artifact_replication`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct TufArtifactReplicationStatus {
        /// The artifact config generation this activation worked at.
        pub generation: Generation,
        pub outcome: ReplicationOutcome,
        pub sleds_in_service: usize,
        pub last_run: ReplicationCounters,
        pub lifetime: ReplicationCounters,
        /// Repositories whose artifacts this Nexus still holds in staging.
        pub local_repos: Vec<LocalRepoStatus>,
        pub plan: PlanSummary,
        /// Per unpruned repository: sleds holding all of it on every healthy
        /// M.2.
        pub repos: Vec<RepoReplication>,
        /// The last requests, oldest first.
        pub ring: Vec<RequestRecord>,
        /// (sled, artifact) pairs this Nexus does not ask for now because
        /// their last attempts failed: exponential back-off, capped.
        #[serde(default)]
        pub backoff: Vec<BackoffStatus>,
        /// Copies running on sleds after this activation (started by it or
        /// still running from an earlier one).
        #[serde(default)]
        pub copies_in_flight: usize,
        /// Sleds whose copies run far slower than the median sled's: last in
        /// every chain, and PUT targets only when no other sled can be.
        #[serde(default)]
        pub slow_sleds: Vec<Uuid>,
        /// Sleds this activation sent no config, listing or inventory
        /// request: a follow-up that knew their state from an earlier
        /// activation (listed at this generation with no copies running,
        /// and sent no PUT or copy since).
        #[serde(default)]
        pub sleds_known: usize,
        /// Whether another activation was scheduled because work remains:
        /// copies in flight, or staged repositories that made progress.
        pub followup_scheduled: bool,
    }

    /// A (sled, artifact) pair in back-off.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct BackoffStatus {
        pub sled_id: Uuid,
        pub hash: ArtifactHash,
        /// Consecutive failures seen (failed requests, and copies the sled
        /// reported failed after accepting them).
        pub failures: u32,
        /// Not asked again before this.
        pub retry_after: DateTime<Utc>,
        pub last_error: String,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    pub enum ReplicationOutcome {
        Completed,
        /// A sled holds a newer generation: another Nexus is ahead, and this
        /// activation stopped rather than act on a stale config.
        Superseded {
            sled_id: Uuid,
            sled_generation: Generation,
        },
        Error {
            message: String,
        },
    }

    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct ReplicationCounters {
        pub put_config_ok: u64,
        pub put_config_err: u64,
        pub list_ok: u64,
        pub list_err: u64,
        pub put_ok: u64,
        pub put_err: u64,
        pub copy_ok: u64,
        pub copy_err: u64,
        /// Copies that a sled accepted (202) and later reported failed.
        #[serde(default)]
        pub copy_failed_on_sled: u64,
        /// Requests not sent because their (sled, artifact) is backing off.
        #[serde(default)]
        pub skipped_backoff: u64,
        /// PUTs and copies a sled still refused as busy (503/429 with
        /// `Retry-After`) after this activation's retries: back-pressure, not
        /// failure. Counted in `put_err`/`copy_err` too, never backed off.
        #[serde(default)]
        pub busy: u64,
        /// Copies held back for a later activation because their target had
        /// no free copy slot (see `PlanSummary::deferred`).
        #[serde(default)]
        pub deferred: u64,
    }

    impl ReplicationCounters {
        pub fn add(&mut self, other: &ReplicationCounters) {
            self.put_config_ok += other.put_config_ok;
            self.put_config_err += other.put_config_err;
            self.list_ok += other.list_ok;
            self.list_err += other.list_err;
            self.put_ok += other.put_ok;
            self.put_err += other.put_err;
            self.copy_ok += other.copy_ok;
            self.copy_err += other.copy_err;
            self.copy_failed_on_sled += other.copy_failed_on_sled;
            self.skipped_backoff += other.skipped_backoff;
            self.busy += other.busy;
            self.deferred += other.deferred;
        }
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct LocalRepoStatus {
        pub repo_id: Uuid,
        pub system_version: String,
        pub artifacts: usize,
        pub bytes: u64,
    }

    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct PlanSummary {
        pub puts: usize,
        pub copies: usize,
        /// Copies to sleds that hold the artifact on fewer M.2s than they
        /// have healthy.
        pub recopies: usize,
        /// Artifacts of the config that no sled and no staging area here
        /// holds: this Nexus cannot place them.
        pub unplaceable: Vec<ArtifactHash>,
        /// Copies (and the PUTs that would feed only them) held back because
        /// every sled that wants them has all its copy slots in use: the
        /// sled would refuse them as busy. A later activation sends them.
        #[serde(default)]
        pub deferred: usize,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct RepoReplication {
        pub repo_id: Uuid,
        pub system_version: String,
        pub sleds_complete: usize,
        pub sleds_in_service: usize,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum RequestOperation {
        PutConfig,
        List,
        Put,
        Copy,
        /// Not a request: a sled reported that a copy it had accepted failed.
        CopyFailedOnSled,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct RequestRecord {
        pub time: DateTime<Utc>,
        pub sled_id: Uuid,
        pub operation: RequestOperation,
        pub hash: Option<ArtifactHash>,
        /// For copies: the sled copied from.
        pub source_sled_id: Option<Uuid>,
        /// The error with its whole cause chain; `None` on success.
        pub error: Option<String>,
    }
}
