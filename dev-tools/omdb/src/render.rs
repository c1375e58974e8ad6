//! Human renderings of what Nexus reports. Golden files under
//! `tests/output/` fix their format.

use chrono::{DateTime, SecondsFormat, Utc};
use common::bgtask::details::{TufRepoPrunerOutcome, TufRepoPrunerStatus};
use common::bgtask::{ActivationReason, BackgroundTask, CurrentStatus, DriverDetails, LastResult};
use std::fmt::Write;
use std::time::Duration;
use tabled::Tabled;
use tabled::settings::Style;

#[derive(Tabled)]
struct TaskRow {
    #[tabled(rename = "TASK")]
    name: String,
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
    #[tabled(rename = "ENABLED")]
    enabled: String,
}

pub fn task_table<'a>(tasks: impl IntoIterator<Item = &'a BackgroundTask>) -> String {
    let rows = tasks.into_iter().map(|task| {
        let (iteration, start, elapsed, reason) = match &task.last {
            LastResult::NeverCompleted => ("-".into(), "-".into(), "-".into(), "-".into()),
            LastResult::Completed {
                iteration,
                start_time,
                reason,
                elapsed,
                ..
            } => (
                iteration.to_string(),
                time(start_time),
                duration(*elapsed),
                reason_word(*reason).into(),
            ),
        };
        TaskRow {
            name: task.name.clone(),
            period: duration(task.period),
            iteration,
            start,
            elapsed,
            reason,
            current: match task.current {
                CurrentStatus::Idle => "idle".into(),
                CurrentStatus::Running { iteration, .. } => format!("running #{iteration}"),
            },
            enabled: if task.switch.enabled {
                "yes".into()
            } else {
                "NO".into()
            },
        }
    });
    let mut table = tabled::Table::new(rows);
    table.with(Style::blank());
    format!("{table}\n")
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
            "  {} by {} at {}",
            if switch.enabled {
                "enabled"
            } else {
                "DISABLED"
            },
            switch.changed_by,
            time(&switch.time_changed)
        )
        .unwrap();
        match &task.current {
            CurrentStatus::Idle => writeln!(out, "  currently idle").unwrap(),
            CurrentStatus::Running {
                iteration,
                start_time,
                reason,
            } => writeln!(
                out,
                "  currently running iteration {iteration} ({}), started at {}",
                reason_phrase(*reason),
                time(start_time)
            )
            .unwrap(),
        }
        match &task.last {
            LastResult::NeverCompleted => {
                writeln!(out, "  no activation has completed yet").unwrap()
            }
            LastResult::Completed {
                iteration,
                start_time,
                reason,
                elapsed,
                details,
            } => {
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
            DriverDetails::Disabled {
                changed_by,
                time_changed,
            } => {
                format!(
                    "did nothing: disabled by {changed_by} at {}",
                    time(&time_changed)
                )
            }
        }];
    }
    let typed = match task {
        "tuf_repo_pruner" => serde_json::from_value(details.clone())
            .ok()
            .map(pruner_lines),
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
        TufRepoPrunerOutcome::Pruned {
            repo_id,
            system_version,
            generation,
        } => {
            format!(
                "pruned repository {system_version} ({repo_id}); artifact generation is now {generation}"
            )
        }
        TufRepoPrunerOutcome::GenerationMoved { expected, found } => format!(
            "pruned nothing: the generation moved from {expected} to {found} while deciding (another Nexus or an upload); will retry"
        ),
        TufRepoPrunerOutcome::Error { message } => format!("ERROR: {message}"),
    };
    vec![
        format!("keeps the {} newest repositories", status.nkeep),
        outcome,
    ]
}

fn reason_word(reason: ActivationReason) -> &'static str {
    match reason {
        ActivationReason::Timeout => "timeout",
        ActivationReason::Signaled => "signaled",
        ActivationReason::Dependency => "dependency",
    }
}

fn reason_phrase(reason: ActivationReason) -> &'static str {
    match reason {
        ActivationReason::Timeout => "its period elapsed",
        ActivationReason::Signaled => "explicitly activated",
        ActivationReason::Dependency => "a dependency changed",
    }
}

fn time(time: &DateTime<Utc>) -> String {
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
