//! Human renderings of what Nexus reports. Golden files under
//! `tests/output/` fix their format.

use chrono::{DateTime, SecondsFormat, Utc};
use common::bgtask::details::{
    InventoryCollectionStatus, ReplicationCounters, ReplicationOutcome, RequestOperation,
    TufArtifactReplicationStatus, TufRepoPrunerOutcome, TufRepoPrunerStatus,
};
use common::bgtask::{ActivationReason, BackgroundTask, CurrentStatus, DriverDetails, LastResult, TaskMode};
use std::fmt::Write;
use std::time::Duration;
use tabled::Tabled;
use tabled::settings::Style;

#[derive(Tabled)]
struct TaskRow {
    #[tabled(rename = "TASK")]
    name: String,
    #[tabled(rename = "MODE")]
    mode: String,
    #[tabled(rename = "PERIOD")]
    period: String,
    #[tabled(rename = "LAST ITER")]
    iteration: String,
    #[tabled(rename = "LAST START")]
    start: String,
    #[tabled(rename = "LAST ELAPSED")]
    elapsed: String,
    #[tabled(rename = "REASON")]
    reason: String,
    #[tabled(rename = "CURRENT")]
    current: String,
}

/// One Nexus's last activation of one task that did work.
#[derive(Tabled)]
struct ActivationRow {
    #[tabled(rename = "TASK")]
    name: String,
    #[tabled(rename = "NEXUS")]
    nexus_id: String,
    #[tabled(rename = "ITER")]
    iteration: u64,
    #[tabled(rename = "REASON")]
    reason: &'static str,
    #[tabled(rename = "STARTED")]
    started: String,
    #[tabled(rename = "DONE")]
    done: String,
}

/// A plain table of rows.
pub fn table<R: Tabled>(rows: impl IntoIterator<Item = R>) -> String {
    let mut table = tabled::Table::new(rows);
    table.with(Style::blank());
    format!("{table}\n")
}

/// One line per task as the answering Nexus runs it (the LAST columns are
/// its own), then every Nexus's last activation that did work, then what
/// could not be read from the database.
pub fn task_table<'a>(tasks: impl IntoIterator<Item = &'a BackgroundTask>) -> String {
    let tasks: Vec<&BackgroundTask> = tasks.into_iter().collect();
    let rows = tasks.iter().map(|task| {
        let (iteration, start, elapsed, reason) = match &task.last {
            LastResult::NeverCompleted => ("-".into(), "-".into(), "-".into(), "-".into()),
            LastResult::Completed { iteration, start_time, reason, elapsed, .. } => {
                (iteration.to_string(), time(start_time), duration(*elapsed), reason.as_str().into())
            }
        };
        TaskRow {
            name: task.name.clone(),
            mode: mode_word(task.switch.mode),
            period: duration(task.period),
            iteration,
            start,
            elapsed,
            reason,
            current: match task.current {
                CurrentStatus::Idle => "idle".into(),
                CurrentStatus::Running { iteration, .. } => format!("running #{iteration}"),
            },
        }
    });
    let mut out = table(rows);
    let activations: Vec<ActivationRow> = tasks
        .iter()
        .flat_map(|task| {
            task.activations.iter().map(|activation| ActivationRow {
                name: task.name.clone(),
                nexus_id: activation.nexus_id.to_string(),
                iteration: activation.iteration,
                reason: activation.reason.as_str(),
                started: time(&activation.time_started),
                done: activation.time_done.as_ref().map_or_else(|| "not done".into(), time),
            })
        })
        .collect();
    out.push_str("\nlast activation per Nexus (activations that did work):\n");
    if activations.is_empty() {
        out.push_str("  none recorded\n");
    } else {
        out.push_str(&table(activations));
    }
    for task in &tasks {
        for error in &task.database_errors {
            writeln!(out, "DATABASE ERROR ({}): {error}", task.name).unwrap();
        }
    }
    out
}

pub fn task_details<'a>(tasks: impl IntoIterator<Item = &'a BackgroundTask>) -> String {
    let mut out = String::new();
    for task in tasks {
        writeln!(out, "task: {}", task.name).unwrap();
        writeln!(out, "  {}", task.description).unwrap();
        writeln!(out, "  period: {}", duration(task.period)).unwrap();
        let switch = &task.switch;
        writeln!(
            out,
            "  mode: {}, set by {} at {}: {}",
            mode_word(switch.mode),
            switch.changed_by,
            time(&switch.time_changed),
            switch.reason
        )
        .unwrap();
        for error in &task.database_errors {
            writeln!(out, "  DATABASE ERROR: {error}").unwrap();
        }
        match &task.current {
            CurrentStatus::Idle => writeln!(out, "  currently idle").unwrap(),
            CurrentStatus::Running { iteration, start_time, reason } => writeln!(
                out,
                "  currently running iteration {iteration} ({}), started at {}",
                reason_phrase(*reason),
                time(start_time)
            )
            .unwrap(),
        }
        match &task.last {
            LastResult::NeverCompleted => writeln!(out, "  no activation has completed yet").unwrap(),
            LastResult::Completed { iteration, start_time, reason, elapsed, details } => {
                writeln!(
                    out,
                    "  last completed iteration {iteration} ({}), started at {}, took {}",
                    reason_phrase(*reason),
                    time(start_time),
                    duration(*elapsed)
                )
                .unwrap();
                for line in details_lines(&task.name, details) {
                    writeln!(out, "    {line}").unwrap();
                }
            }
        }
        writeln!(out, "  last activation per Nexus (activations that did work):").unwrap();
        if task.activations.is_empty() {
            writeln!(out, "    none recorded").unwrap();
        }
        for activation in &task.activations {
            let done = match &activation.time_done {
                Some(done) => format!("done at {}", time(done)),
                None => "not done".to_string(),
            };
            writeln!(
                out,
                "    nexus {}: iteration {} ({}), started at {}, {done}",
                activation.nexus_id,
                activation.iteration,
                reason_phrase(activation.reason),
                time(&activation.time_started)
            )
            .unwrap();
        }
        out.push('\n');
    }
    out
}

/// The last result's details, rendered per task. Tasks that are not ours
/// (none yet) fall back to their JSON.
fn details_lines(task: &str, details: &serde_json::Value) -> Vec<String> {
    if let Ok(driver) = serde_json::from_value::<DriverDetails>(details.clone()) {
        return vec![match driver {
            DriverDetails::Panicked { message } => format!("PANICKED: {message}"),
            DriverDetails::Skipped { mode, changed_by, reason, time_changed } => {
                let skips = match mode {
                    TaskMode::Manual => "manual mode skips periodic activations",
                    TaskMode::Disabled => "the task is disabled",
                    TaskMode::Enabled => "skipped",
                };
                format!("did nothing: {skips} (set by {changed_by} at {}: {reason})", time(&time_changed))
            }
        }];
    }
    let typed = match task {
        "tuf_repo_pruner" => serde_json::from_value(details.clone()).ok().map(pruner_lines),
        "tuf_artifact_replication" => serde_json::from_value(details.clone()).ok().map(replication_lines),
        "inventory_collection" => serde_json::from_value(details.clone()).ok().map(inventory_lines),
        _ => None,
    };
    typed.unwrap_or_else(|| {
        serde_json::to_string_pretty(details)
            .expect("JSON values serialize")
            .lines()
            .map(String::from)
            .collect()
    })
}

fn pruner_lines(status: TufRepoPrunerStatus) -> Vec<String> {
    let outcome = match status.outcome {
        TufRepoPrunerOutcome::NothingToPrune { unpruned } => {
            format!("nothing to prune: {unpruned} unpruned repositories")
        }
        TufRepoPrunerOutcome::Pruned { repo_id, system_version, generation } => {
            format!("pruned repository {system_version} ({repo_id}); artifact generation is now {generation}")
        }
        TufRepoPrunerOutcome::GenerationMoved { expected, found } => format!(
            "pruned nothing: the generation moved from {expected} to {found} while deciding (another Nexus or an upload); will retry"
        ),
        TufRepoPrunerOutcome::Error { message } => format!("ERROR: {message}"),
    };
    vec![format!("keeps the {} newest repositories", status.nkeep), outcome]
}

fn inventory_lines(status: InventoryCollectionStatus) -> Vec<String> {
    let mut lines = vec![match status.collection_id {
        Some(id) => format!("recorded collection {id}: {} sleds answered", status.sleds_ok),
        None => "recorded no collection".to_string(),
    }];
    lines.extend(status.errors.iter().map(|error| format!("ERROR: {error}")));
    lines
}

fn replication_lines(status: TufArtifactReplicationStatus) -> Vec<String> {
    let mut lines = Vec::new();
    let outcome = match &status.outcome {
        ReplicationOutcome::Completed => "completed".to_string(),
        ReplicationOutcome::Superseded { sled_id, sled_generation } => {
            format!("SUPERSEDED: sled {sled_id} holds generation {sled_generation}; another Nexus is ahead")
        }
        ReplicationOutcome::Error { message } => format!("ERROR: {message}"),
    };
    lines.push(format!("generation {}: {outcome}", status.generation));
    lines.push(format!("sleds in service: {}", status.sleds_in_service));
    let plan = &status.plan;
    lines.push(format!("plan: {} puts, {} copies, {} re-copies", plan.puts, plan.copies, plan.recopies));
    if !plan.unplaceable.is_empty() {
        let hashes: Vec<String> = plan.unplaceable.iter().map(ToString::to_string).collect();
        lines.push(format!("UNPLACEABLE (no sled holds them, not staged here): {}", hashes.join(", ")));
    }
    lines.push(format!("{:<12} {:>14} {:>14}", "requests", "last run ok/err", "lifetime ok/err"));
    let pairs = |c: &ReplicationCounters| {
        [
            ("put config", c.put_config_ok, c.put_config_err),
            ("list", c.list_ok, c.list_err),
            ("put", c.put_ok, c.put_err),
            ("copy", c.copy_ok, c.copy_err),
        ]
    };
    for ((name, last_ok, last_err), (_, all_ok, all_err)) in
        pairs(&status.last_run).into_iter().zip(pairs(&status.lifetime))
    {
        lines.push(format!(
            "  {name:<10} {:>14} {:>14}",
            format!("{last_ok}/{last_err}"),
            format!("{all_ok}/{all_err}")
        ));
    }
    lines.push(format!(
        "copies failed on sleds after 202: {} last run, {} lifetime; requests skipped for back-off: {} last run",
        status.last_run.copy_failed_on_sled, status.lifetime.copy_failed_on_sled, status.last_run.skipped_backoff
    ));
    lines.push(format!("copies in flight on sleds: {}", status.copies_in_flight));
    if !status.slow_sleds.is_empty() {
        let slow: Vec<String> = status.slow_sleds.iter().map(ToString::to_string).collect();
        lines.push(format!("slow sleds (last in every chain): {}", slow.join(", ")));
    }
    if status.sleds_known > 0 {
        lines.push(format!(
            "sleds not asked (a follow-up that knew their state): {} of {}",
            status.sleds_known, status.sleds_in_service
        ));
    }
    lines.push(format!("backing off (sled, artifact): {}", status.backoff.len()));
    for backoff in &status.backoff {
        lines.push(format!(
            "  sled {} artifact {}: {} failures, not before {}: {}",
            backoff.sled_id,
            backoff.hash,
            backoff.failures,
            time(&backoff.retry_after),
            backoff.last_error
        ));
    }
    lines.push(format!("local repositories (staged here): {}", status.local_repos.len()));
    for repo in &status.local_repos {
        lines.push(format!(
            "  {} ({}): {} artifacts, {} bytes",
            repo.system_version, repo.repo_id, repo.artifacts, repo.bytes
        ));
    }
    lines.push(format!("repositories: {}", status.repos.len()));
    for repo in &status.repos {
        lines.push(format!(
            "  {}: {} of {} sleds hold all of it on every healthy M.2",
            repo.system_version, repo.sleds_complete, repo.sleds_in_service
        ));
    }
    lines.push(format!("request ring buffer (oldest first): {}", status.ring.len()));
    for record in &status.ring {
        let operation = match record.operation {
            RequestOperation::PutConfig => "put config",
            RequestOperation::List => "list",
            RequestOperation::Put => "put",
            RequestOperation::Copy => "copy",
            RequestOperation::CopyFailedOnSled => "copy failed on the sled",
        };
        let mut line = format!("  {} {operation:<10} sled {}", time(&record.time), record.sled_id);
        if let Some(hash) = &record.hash {
            line.push_str(&format!(" artifact {hash}"));
        }
        if let Some(source) = &record.source_sled_id {
            line.push_str(&format!(" from sled {source}"));
        }
        match &record.error {
            None => line.push_str(": ok"),
            Some(error) => line.push_str(&format!(": ERROR {error}")),
        }
        lines.push(line);
    }
    if status.followup_scheduled {
        lines.push("work remains: a follow-up activation is scheduled".to_string());
    }
    lines
}

/// Modes other than `enabled` stand out.
fn mode_word(mode: TaskMode) -> String {
    match mode {
        TaskMode::Enabled => mode.as_str().to_string(),
        TaskMode::Manual | TaskMode::Disabled => mode.as_str().to_uppercase(),
    }
}

fn reason_phrase(reason: ActivationReason) -> &'static str {
    match reason {
        ActivationReason::Periodic => "its period elapsed",
        ActivationReason::Explicit => "explicitly activated",
        ActivationReason::Dependency => "a dependency changed",
    }
}

pub fn time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Short human durations: "250ms", "42s", "5m 0s", "2h 3m".
pub fn duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{}ms", duration.as_millis()),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, (secs % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_human_wrote_them() {
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_secs(42)), "42s");
        assert_eq!(duration(Duration::from_secs(300)), "5m 0s");
        assert_eq!(duration(Duration::from_secs(7380)), "2h 3m");
    }
}
