//! `omdb nexus ...`: background tasks.

use crate::{render, to_json};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use common::api::nexus_internal::{BackgroundTaskSwitchRequest, BackgroundTasksActivateRequest};
use common::bgtask::{BackgroundTask, CurrentStatus, LastResult, TaskMode};
use common::clients::nexus_internal::{Client, Error as ClientError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct NexusArgs {
    /// Base URL of a Nexus internal API, e.g. http://127.0.0.1:12221.
    #[arg(long, env = "OMDB_NEXUS_URL", global = true)]
    nexus_internal_url: Option<String>,
    #[command(subcommand)]
    command: NexusCommand,
}

#[derive(Subcommand)]
enum NexusCommand {
    /// Background tasks: their state and last results.
    #[command(subcommand)]
    BackgroundTasks(BackgroundTasksCommand),
}

#[derive(Subcommand)]
enum BackgroundTasksCommand {
    /// One line per task (mode, and this Nexus's last result), then every
    /// Nexus's last activation that did work.
    List,
    /// Each task's state and a rendering of its last result.
    Show {
        /// A task name, or "all" (the default).
        #[arg(default_value = "all")]
        name: String,
    },
    /// Activate tasks now.
    Activate {
        #[arg(required = true)]
        names: Vec<String>,
        /// Wait until each task has completed an activation that started
        /// after this request, and show its result.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Let every activation of a task do its work, in every Nexus.
    Enable(SwitchArgs),
    /// Skip a task's periodic activations in every Nexus; explicit ones (and
    /// those of a dependency) still run.
    Manual(SwitchArgs),
    /// Make every activation of a task do nothing, in every Nexus.
    Disable(SwitchArgs),
}

/// The switch is stored in the database, so it holds across restarts and
/// wins over every Nexus's config file.
#[derive(Args)]
struct SwitchArgs {
    /// The task's name.
    name: String,
    /// Why, for the record that every Nexus shows.
    #[arg(long)]
    reason: String,
}

impl NexusArgs {
    pub async fn run(self, json: bool, discovered: Option<String>) -> anyhow::Result<String> {
        let url = self.nexus_internal_url.or(discovered).context(
            "no Nexus to talk to: pass --nexus-internal-url URL, set OMDB_NEXUS_URL, or start a rack with `rack-dev run-all`",
        )?;
        let client = Client::new(&url);
        let NexusCommand::BackgroundTasks(command) = self.command;
        let context = || format!("Nexus internal API at {url}");
        match command {
            BackgroundTasksCommand::List => {
                let tasks = client.bgtask_list().await.map_err(api_error).with_context(context)?.into_inner();
                Ok(if json { to_json(&tasks) } else { render::task_table(tasks.values()) })
            }
            BackgroundTasksCommand::Show { name } => {
                let tasks = if name == "all" {
                    client.bgtask_list().await.map_err(api_error).with_context(context)?.into_inner()
                } else {
                    let task = client.bgtask_view(&name).await.map_err(api_error).with_context(context)?;
                    BTreeMap::from([(name, task.into_inner())])
                };
                Ok(if json { to_json(&tasks) } else { render::task_details(tasks.values()) })
            }
            BackgroundTasksCommand::Activate { names, wait, timeout_secs } => {
                let before = if wait {
                    Some(newest_iterations(&client, &names).await.with_context(context)?)
                } else {
                    None
                };
                let request =
                    BackgroundTasksActivateRequest { bgtask_names: names.iter().cloned().collect() };
                client.bgtask_activate(&request).await.map_err(api_error).with_context(context)?;
                let Some(before) = before else {
                    return Ok(if json {
                        to_json(&names)
                    } else {
                        format!("activated: {}\n", names.join(", "))
                    });
                };
                let done = wait_for_iterations(&client, before, Duration::from_secs(timeout_secs))
                    .await
                    .with_context(context)?;
                Ok(if json { to_json(&done) } else { render::task_details(done.values()) })
            }
            BackgroundTasksCommand::Enable(args) => {
                switch(&client, args, TaskMode::Enabled, json).await.with_context(context)
            }
            BackgroundTasksCommand::Manual(args) => {
                switch(&client, args, TaskMode::Manual, json).await.with_context(context)
            }
            BackgroundTasksCommand::Disable(args) => {
                switch(&client, args, TaskMode::Disabled, json).await.with_context(context)
            }
        }
    }
}

async fn switch(client: &Client, args: SwitchArgs, mode: TaskMode, json: bool) -> anyhow::Result<String> {
    let request = BackgroundTaskSwitchRequest { mode, changed_by: who_am_i(), reason: args.reason };
    let task = client.bgtask_switch(&args.name, &request).await.map_err(api_error)?.into_inner();
    Ok(if json { to_json(&task) } else { render::task_details([&task]) })
}

/// For each named task, the newest iteration that started before now (running
/// or completed): an activation is only "ours" if it is newer.
async fn newest_iterations(client: &Client, names: &[String]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut newest = BTreeMap::new();
    for name in names {
        let task = client.bgtask_view(name).await.map_err(api_error)?.into_inner();
        newest.insert(name.clone(), iteration_started(&task).max(iteration_completed(&task)));
    }
    Ok(newest)
}

fn iteration_started(task: &BackgroundTask) -> u64 {
    match task.current {
        CurrentStatus::Running { iteration, .. } => iteration,
        CurrentStatus::Idle => 0,
    }
}

fn iteration_completed(task: &BackgroundTask) -> u64 {
    match task.last {
        LastResult::Completed { iteration, .. } => iteration,
        LastResult::NeverCompleted => 0,
    }
}

async fn wait_for_iterations(
    client: &Client,
    before: BTreeMap<String, u64>,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, BackgroundTask>> {
    let deadline = Instant::now() + timeout;
    let mut done = BTreeMap::new();
    for (name, iteration) in before {
        loop {
            let task = client.bgtask_view(&name).await.map_err(api_error)?.into_inner();
            if iteration_completed(&task) > iteration {
                done.insert(name, task);
                break;
            }
            if Instant::now() > deadline {
                bail!("background task {name} did not complete an activation within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(done)
}

/// What the switch records as having set it.
fn who_am_i() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown user".into());
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates.
    let host = if unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0 {
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "unknown host".into()
    };
    format!("omdb ({user}@{host})")
}

/// The server's own message for error responses, rather than progenitor's
/// debug dump of the whole response.
fn api_error(error: ClientError<common::clients::nexus_internal::types::Error>) -> anyhow::Error {
    match error {
        ClientError::ErrorResponse(response) => {
            anyhow::anyhow!("{} ({})", response.message, response.status())
        }
        other => anyhow::Error::new(other),
    }
}
