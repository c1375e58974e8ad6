//! The background task driver.
//!
//! Each registered task runs on a tokio task of its own, in a loop that waits
//! for the next activation: its period, an explicit activation through its
//! [`Activator`], or a change published on one of its dependencies (watch
//! channels). Because one loop runs one task, a task never runs concurrently
//! with itself in this process. The task is told why it runs
//! ([`ActivationReason`]: periodic, explicit or dependency).
//!
//! Coalescing: an [`Activator`] is a `Notify` permit. Any number of
//! activations that arrive while the task runs leave one permit, so they
//! cause exactly one follow-up run. Just before a run starts, every signal
//! still pending (a permit, an unseen dependency change) is consumed: the
//! run has not read its inputs yet, so it serves them all. An explicit
//! activation and a dependency change during one run therefore cause one
//! follow-up, not two. The period is measured from the end of the last run.
//!
//! The switch: before each activation the loop reads the task's switch from
//! its [`SwitchStore`] (the database, shared by every Nexus). `enabled` runs
//! every activation, `manual` skips periodic ones (explicit and dependency
//! ones run), `disabled` skips all; a skipped activation completes with
//! [`DriverDetails::Skipped`], naming the switch that decided. While the
//! store has no switch for the task, the config file's applies (`disabled`
//! or not); once someone sets one, it wins over every Nexus's config file.
//! If the read fails, the loop honours the last switch it read (the config
//! file's if none) and says so in the status: a database outage must neither
//! stop a task nor start one an operator stopped. Each activation that runs
//! is recorded in the store at its start and at its end, as this Nexus's
//! last activation of the task; a failure to record is logged, not fatal.
//!
//! Failure containment: a panic inside `activate` is caught and recorded as
//! the last result; the loop goes on. A dependency whose sender was dropped is
//! dropped from the loop's wait set, so it cannot spin the loop.
//!
//! Shutdown: [`Driver::shutdown`] tells every loop to stop, lets in-flight
//! activations finish within a grace period, then cancels what is left.

use crate::db::{DataStore, DataStoreError};
use common::bgtask::{
    ActivationReason, BackgroundTask as TaskView, CurrentStatus, DriverDetails, LastResult, NexusActivation,
    TaskMode, TaskSwitch,
};
use common::error_chain;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// How long the driver waits for its store to read a switch or record an
/// activation. A healthy database answers in milliseconds; an unreachable
/// one would otherwise hold every activation (and every status request) for
/// the pool's connection timeout before the task even starts.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// One background task. It is told why it runs, but must do the right thing
/// from the state it reads whatever the reason, including when another Nexus
/// runs the same task at the same moment.
pub trait BackgroundTask: Send {
    /// Does one round of work and reports what it did, as JSON for the
    /// status API.
    fn activate<'a>(
        &'a mut self,
        log: &'a slog::Logger,
        reason: ActivationReason,
    ) -> BoxFuture<'a, serde_json::Value>;
}

/// Activates one task. Cheap to clone; activations coalesce.
#[derive(Clone, Default)]
pub struct Activator {
    notify: Arc<Notify>,
}

impl Activator {
    pub fn new() -> Activator {
        Activator::default()
    }

    pub fn activate(&self) {
        self.notify.notify_one();
    }
}

/// Something whose change activates a task: a watch receiver of any type.
pub trait Dependency: Send {
    /// Resolves when the value changed; an error means the sender is gone.
    fn changed(&mut self) -> BoxFuture<'_, Result<(), watch::error::RecvError>>;
    /// Forgets a change not yet waited for: a run about to start covers it.
    fn mark_seen(&mut self);
}

impl<T: Send + Sync> Dependency for watch::Receiver<T> {
    fn changed(&mut self) -> BoxFuture<'_, Result<(), watch::error::RecvError>> {
        Box::pin(watch::Receiver::changed(self))
    }

    fn mark_seen(&mut self) {
        self.mark_unchanged();
    }
}

/// Where the driver reads task switches and records activations: the
/// database in Nexus ([`DataStore`]), memory in unit tests and benchmarks
/// ([`MemorySwitchStore`]).
pub trait SwitchStore: Send + Sync {
    /// The task's switch, or `None` if none is stored.
    fn switch<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<TaskSwitch>, DataStoreError>>;
    fn set_switch<'a>(
        &'a self,
        name: &'a str,
        switch: &'a TaskSwitch,
    ) -> BoxFuture<'a, Result<(), DataStoreError>>;
    /// Records a Nexus's activation of the task, replacing its previous one.
    fn record_activation<'a>(
        &'a self,
        name: &'a str,
        activation: &'a NexusActivation,
    ) -> BoxFuture<'a, Result<(), DataStoreError>>;
    /// Every Nexus's last recorded activation of the task, by Nexus id.
    fn activations<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<NexusActivation>, DataStoreError>>;
}

impl SwitchStore for DataStore {
    fn switch<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<TaskSwitch>, DataStoreError>> {
        Box::pin(self.bgtask_switch_get(name))
    }

    fn set_switch<'a>(
        &'a self,
        name: &'a str,
        switch: &'a TaskSwitch,
    ) -> BoxFuture<'a, Result<(), DataStoreError>> {
        Box::pin(self.bgtask_switch_set(name, switch))
    }

    fn record_activation<'a>(
        &'a self,
        name: &'a str,
        activation: &'a NexusActivation,
    ) -> BoxFuture<'a, Result<(), DataStoreError>> {
        Box::pin(self.bgtask_activation_record(name, activation))
    }

    fn activations<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<NexusActivation>, DataStoreError>> {
        Box::pin(self.bgtask_activation_list(name))
    }
}

/// A [`SwitchStore`] in memory, for a driver without a database: one
/// process's switches are then its own.
#[derive(Default)]
pub struct MemorySwitchStore {
    switches: Mutex<BTreeMap<String, TaskSwitch>>,
    activations: Mutex<BTreeMap<(String, Uuid), NexusActivation>>,
}

impl SwitchStore for MemorySwitchStore {
    fn switch<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<TaskSwitch>, DataStoreError>> {
        let switch = self.switches.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
        Box::pin(std::future::ready(Ok(switch)))
    }

    fn set_switch<'a>(
        &'a self,
        name: &'a str,
        switch: &'a TaskSwitch,
    ) -> BoxFuture<'a, Result<(), DataStoreError>> {
        self.switches.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), switch.clone());
        Box::pin(std::future::ready(Ok(())))
    }

    fn record_activation<'a>(
        &'a self,
        name: &'a str,
        activation: &'a NexusActivation,
    ) -> BoxFuture<'a, Result<(), DataStoreError>> {
        self.activations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((name.to_string(), activation.nexus_id), activation.clone());
        Box::pin(std::future::ready(Ok(())))
    }

    fn activations<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<NexusActivation>, DataStoreError>> {
        let activations = self
            .activations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((task, _), _)| task == name)
            .map(|(_, activation)| activation.clone())
            .collect();
        Box::pin(std::future::ready(Ok(activations)))
    }
}

/// Why the driver could not use its store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Database(#[from] DataStoreError),
    #[error("the database did not answer within {0:?}")]
    TimedOut(Duration),
}

/// A store operation, bounded by [`STORE_TIMEOUT`].
async fn bounded<T>(operation: BoxFuture<'_, Result<T, DataStoreError>>) -> Result<T, StoreError> {
    match tokio::time::timeout(STORE_TIMEOUT, operation).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::TimedOut(STORE_TIMEOUT)),
    }
}

/// What a caller provides to register a task.
pub struct TaskDefinition {
    pub name: String,
    pub description: String,
    pub period: Duration,
    pub task: Box<dyn BackgroundTask>,
    pub activator: Activator,
    pub dependencies: Vec<Box<dyn Dependency>>,
    /// The config file's switch: `enabled`, or `disabled` if false. It
    /// applies only while the store has no switch for the task.
    pub enabled: bool,
}

/// The mutable status of one task, shared between its loop and readers.
struct TaskState {
    /// The config file's switch, honoured while the store has none.
    config_switch: TaskSwitch,
    /// The switch the last activation read (the config file's before the
    /// first): what the loop honours when it cannot read the store.
    switch: TaskSwitch,
    /// Set when the last activation could not read the switch.
    switch_error: Option<String>,
    current: CurrentStatus,
    last: LastResult,
    iterations_started: u64,
}

struct RegisteredTask {
    description: String,
    period: Duration,
    activator: Activator,
    state: Arc<Mutex<TaskState>>,
    /// The iteration number of the last completed activation.
    completed: watch::Receiver<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("no background task named {unknown:?}; known tasks: {}", known.join(", "))]
    UnknownTask { unknown: Vec<String>, known: Vec<String> },
    #[error("the switch of background task {name} needs a non-empty {field}")]
    EmptySwitchField { name: String, field: &'static str },
    #[error("setting the switch of background task {name}")]
    SetSwitch {
        name: String,
        #[source]
        source: StoreError,
    },
}

pub struct Driver {
    tasks: BTreeMap<String, RegisteredTask>,
    store: Arc<dyn SwitchStore>,
    shutdown: watch::Sender<bool>,
    /// Taken by [`Driver::shutdown`].
    loops: Mutex<Vec<JoinHandle<()>>>,
}

impl Driver {
    /// Starts every task's loop. Each task is activated once right away (a
    /// periodic activation). `store` holds the switches and records the
    /// activations, in the name of `nexus_id`.
    pub fn start(
        definitions: Vec<TaskDefinition>,
        store: Arc<dyn SwitchStore>,
        nexus_id: Uuid,
        log: &slog::Logger,
    ) -> Driver {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let started = chrono::Utc::now();
        let mut tasks = BTreeMap::new();
        let mut loops = Vec::new();
        for definition in definitions {
            let (mode, state_word) = if definition.enabled {
                (TaskMode::Enabled, "enabled")
            } else {
                (TaskMode::Disabled, "disabled")
            };
            let config_switch = TaskSwitch {
                mode,
                changed_by: "config file".to_string(),
                reason: format!(
                    "no switch is set in the database; the config file starts the task {state_word}"
                ),
                time_changed: started,
            };
            let state = Arc::new(Mutex::new(TaskState {
                switch: config_switch.clone(),
                config_switch,
                switch_error: None,
                current: CurrentStatus::Idle,
                last: LastResult::NeverCompleted,
                iterations_started: 0,
            }));
            let (completed_tx, completed) = watch::channel(0);
            let task_loop = TaskLoop {
                log: log.new(slog::o!("background_task" => definition.name.clone())),
                name: definition.name.clone(),
                nexus_id,
                store: store.clone(),
                task: definition.task,
                period: definition.period,
                notify: definition.activator.notify.clone(),
                dependencies: definition.dependencies,
                state: state.clone(),
                completed: completed_tx,
                shutdown: shutdown_rx.clone(),
            };
            let registered = RegisteredTask {
                description: definition.description,
                period: definition.period,
                activator: definition.activator,
                state,
                completed,
            };
            loops.push(tokio::spawn(task_loop.run()));
            tasks.insert(definition.name, registered);
        }
        Driver { tasks, store, shutdown, loops: Mutex::new(loops) }
    }

    pub fn names(&self) -> Vec<String> {
        self.tasks.keys().cloned().collect()
    }

    /// The task as this Nexus runs it, with its switch and every Nexus's
    /// last activation read from the store now. What cannot be read is
    /// listed in `database_errors`, and the switch is then the last one read.
    pub async fn view(&self, name: &str) -> Result<TaskView, DriverError> {
        let task = self.task(name)?;
        let (switch, activations) =
            futures::join!(bounded(self.store.switch(name)), bounded(self.store.activations(name)));
        let state = task.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut database_errors = Vec::new();
        let switch = match switch {
            Ok(Some(switch)) => switch,
            Ok(None) => state.config_switch.clone(),
            Err(error) => {
                database_errors.push(format!(
                    "reading the switch (this shows the last one read): {}",
                    error_chain(&error)
                ));
                state.switch.clone()
            }
        };
        database_errors.extend(state.switch_error.clone());
        let activations = activations.unwrap_or_else(|error| {
            database_errors.push(format!("reading every Nexus's last activation: {}", error_chain(&error)));
            Vec::new()
        });
        Ok(TaskView {
            name: name.to_string(),
            description: task.description.clone(),
            period: task.period,
            switch,
            database_errors,
            current: state.current.clone(),
            last: state.last.clone(),
            activations,
        })
    }

    pub async fn views(&self) -> BTreeMap<String, TaskView> {
        let views = futures::future::join_all(self.tasks.keys().map(|name| self.view(name))).await;
        self.tasks
            .keys()
            .cloned()
            .zip(views.into_iter().map(|view| view.expect("name is registered")))
            .collect()
    }

    /// Activates every named task, or none if any name is unknown.
    pub fn activate<S: AsRef<str>>(&self, names: &[S]) -> Result<(), DriverError> {
        let unknown: Vec<String> = names
            .iter()
            .map(AsRef::as_ref)
            .filter(|n| !self.tasks.contains_key(*n))
            .map(String::from)
            .collect();
        if !unknown.is_empty() {
            return Err(DriverError::UnknownTask { unknown, known: self.names() });
        }
        for name in names {
            self.tasks[name.as_ref()].activator.activate();
        }
        Ok(())
    }

    /// Sets the task's switch in the store, for every Nexus that shares it.
    /// Each loop reads it before its next activation.
    pub async fn set_switch(
        &self,
        name: &str,
        mode: TaskMode,
        changed_by: &str,
        reason: &str,
    ) -> Result<TaskView, DriverError> {
        self.task(name)?;
        for (field, value) in [("changed_by", changed_by), ("reason", reason)] {
            if value.trim().is_empty() {
                return Err(DriverError::EmptySwitchField { name: name.to_string(), field });
            }
        }
        let switch = TaskSwitch {
            mode,
            changed_by: changed_by.to_string(),
            reason: reason.to_string(),
            time_changed: chrono::Utc::now(),
        };
        bounded(self.store.set_switch(name, &switch))
            .await
            .map_err(|source| DriverError::SetSwitch { name: name.to_string(), source })?;
        self.view(name).await
    }

    /// The number of the last completed iteration, and a receiver that sees
    /// every later one: for waiting on an activation without polling.
    pub fn completions(&self, name: &str) -> Result<watch::Receiver<u64>, DriverError> {
        Ok(self.task(name)?.completed.clone())
    }

    /// Activates a task and waits until an iteration that started after the
    /// activation has completed. Returns that iteration's view.
    pub async fn activate_and_wait(&self, name: &str) -> Result<TaskView, DriverError> {
        let mut completed = self.completions(name)?;
        let before = {
            let state = self.task(name)?.state.lock().unwrap_or_else(|e| e.into_inner());
            // A run already in progress may have read its inputs before the
            // caller's change: wait for the one after it.
            state.iterations_started
        };
        self.activate(&[name])?;
        // The loop owns the sender and lives as long as the driver, so
        // wait_for only fails after shutdown; then the view is what it is.
        let _ = completed.wait_for(|&iteration| iteration > before).await;
        self.view(name).await
    }

    /// Stops every loop: in-flight activations get `grace` to finish, then are
    /// cancelled.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        let loops = std::mem::take(&mut *self.loops.lock().unwrap_or_else(|e| e.into_inner()));
        for mut join in loops {
            if tokio::time::timeout_at(deadline, &mut join).await.is_err() {
                join.abort();
                let _ = join.await;
            }
        }
    }

    fn task(&self, name: &str) -> Result<&RegisteredTask, DriverError> {
        self.tasks
            .get(name)
            .ok_or_else(|| DriverError::UnknownTask { unknown: vec![name.to_string()], known: self.names() })
    }
}

struct TaskLoop {
    log: slog::Logger,
    name: String,
    nexus_id: Uuid,
    store: Arc<dyn SwitchStore>,
    task: Box<dyn BackgroundTask>,
    period: Duration,
    notify: Arc<Notify>,
    dependencies: Vec<Box<dyn Dependency>>,
    state: Arc<Mutex<TaskState>>,
    completed: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
}

impl TaskLoop {
    async fn run(mut self) {
        // The first activation happens at start-up.
        let mut reason = ActivationReason::Periodic;
        loop {
            self.run_once(reason).await;
            let next = tokio::select! {
                biased;
                _ = self.shutdown.changed() => None,
                () = self.notify.notified() => Some(ActivationReason::Explicit),
                () = next_dependency_change(&mut self.dependencies) => Some(ActivationReason::Dependency),
                () = tokio::time::sleep(self.period) => Some(ActivationReason::Periodic),
            };
            match next {
                Some(next) => reason = next,
                None => break,
            }
        }
        slog::debug!(self.log, "background task stopped");
    }

    async fn run_once(&mut self, reason: ActivationReason) {
        // Whatever else asked for a run before this point is served by it.
        let _ = self.notify.notified().now_or_never();
        for dependency in &mut self.dependencies {
            dependency.mark_seen();
        }
        let start_time = chrono::Utc::now();
        let started = Instant::now();
        let iteration = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.iterations_started += 1;
            let iteration = state.iterations_started;
            state.current = CurrentStatus::Running { iteration, start_time, reason };
            iteration
        };
        let log = self.log.new(slog::o!("iteration" => iteration, "reason" => reason.as_str()));
        let (switch, store_answered) = self.read_switch(&log, iteration).await;
        let details = if switch.mode.runs(reason) {
            let mut activation = NexusActivation {
                nexus_id: self.nexus_id,
                iteration,
                reason,
                time_started: start_time,
                time_done: None,
            };
            // The store just failed to answer: recording would wait for it
            // twice more before and after the task.
            if store_answered {
                self.record(&log, &activation).await;
            }
            let details = match AssertUnwindSafe(self.task.activate(&log, reason)).catch_unwind().await {
                Ok(details) => details,
                Err(payload) => {
                    let message = panic_message(payload.as_ref());
                    slog::error!(log, "background task panicked"; "message" => &message);
                    serde_json::to_value(DriverDetails::Panicked { message }).expect("serializable")
                }
            };
            if store_answered {
                activation.time_done = Some(chrono::Utc::now());
                self.record(&log, &activation).await;
            }
            details
        } else {
            slog::debug!(log, "activation skipped"; "mode" => switch.mode.as_str());
            serde_json::to_value(DriverDetails::Skipped {
                mode: switch.mode,
                changed_by: switch.changed_by,
                reason: switch.reason,
                time_changed: switch.time_changed,
            })
            .expect("serializable")
        };
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.current = CurrentStatus::Idle;
            state.last =
                LastResult::Completed { iteration, start_time, reason, elapsed: started.elapsed(), details };
        }
        self.completed.send_replace(iteration);
    }

    /// The switch to honour, and whether the store answered. If it did not,
    /// the last switch read, with the failure kept for the status. (`&mut`
    /// because the loop is `Send` but not `Sync`.)
    async fn read_switch(&mut self, log: &slog::Logger, iteration: u64) -> (TaskSwitch, bool) {
        let read = bounded(self.store.switch(&self.name)).await;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match read {
            Ok(switch) => {
                let switch = match switch {
                    Some(switch) => switch,
                    None => state.config_switch.clone(),
                };
                state.switch = switch;
                state.switch_error = None;
                (state.switch.clone(), true)
            }
            Err(error) => {
                let message = error_chain(&error);
                slog::warn!(log, "could not read the task switch; honouring the last one read";
                    "mode" => state.switch.mode.as_str(), "error" => &message);
                state.switch_error = Some(format!(
                    "iteration {iteration} could not read the switch and honoured the last one read ({}): \
                     {message}",
                    state.switch.mode
                ));
                (state.switch.clone(), false)
            }
        }
    }

    async fn record(&mut self, log: &slog::Logger, activation: &NexusActivation) {
        if let Err(error) = bounded(self.store.record_activation(&self.name, activation)).await {
            slog::warn!(log, "could not record the activation"; "error" => error_chain(&error));
        }
    }
}

/// Resolves when any dependency changes. Dependencies whose sender is gone are
/// removed; with none left this never resolves.
async fn next_dependency_change(dependencies: &mut Vec<Box<dyn Dependency>>) {
    loop {
        if dependencies.is_empty() {
            return std::future::pending().await;
        }
        let (result, index, _) =
            futures::future::select_all(dependencies.iter_mut().map(|dependency| dependency.changed())).await;
        match result {
            Ok(()) => return,
            Err(_) => {
                dependencies.remove(index);
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        message.to_string()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "(a panic payload that is not a string)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::sync::Semaphore;

    const NEXUS_ID: Uuid = Uuid::from_u128(0x4e3);

    /// A task that counts its activations, remembers why each ran, can be
    /// held inside an activation until the test releases it, and can be told
    /// to panic.
    struct ScriptedTask {
        activations: Arc<AtomicU64>,
        reasons: Arc<Mutex<Vec<ActivationReason>>>,
        gate: Option<Arc<Semaphore>>,
        panic_on: Option<u64>,
        cancelled: Arc<AtomicBool>,
    }

    /// Sets its flag if dropped before completion: the activation was
    /// cancelled.
    struct CancelGuard(Arc<AtomicBool>, bool);

    impl Drop for CancelGuard {
        fn drop(&mut self) {
            if !self.1 {
                self.0.store(true, Ordering::SeqCst);
            }
        }
    }

    impl BackgroundTask for ScriptedTask {
        fn activate<'a>(
            &'a mut self,
            _log: &'a slog::Logger,
            reason: ActivationReason,
        ) -> BoxFuture<'a, serde_json::Value> {
            Box::pin(async move {
                let n = self.activations.fetch_add(1, Ordering::SeqCst) + 1;
                self.reasons.lock().unwrap().push(reason);
                let mut guard = CancelGuard(self.cancelled.clone(), false);
                if let Some(gate) = &self.gate {
                    gate.acquire().await.unwrap().forget();
                }
                guard.1 = true;
                if self.panic_on == Some(n) {
                    panic!("scripted panic in activation {n}");
                }
                serde_json::json!({ "activation": n })
            })
        }
    }

    /// A store in memory that can be made to fail, as a database that went
    /// away.
    #[derive(Default)]
    struct TestStore {
        memory: MemorySwitchStore,
        failing: AtomicBool,
    }

    impl TestStore {
        fn check(&self) -> Result<(), DataStoreError> {
            if self.failing.load(Ordering::SeqCst) {
                Err(DataStoreError::Unavailable {
                    waited: Duration::from_secs(10),
                    last_error: "connection refused".into(),
                })
            } else {
                Ok(())
            }
        }
    }

    impl SwitchStore for TestStore {
        fn switch<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<TaskSwitch>, DataStoreError>> {
            match self.check() {
                Ok(()) => self.memory.switch(name),
                Err(error) => Box::pin(std::future::ready(Err(error))),
            }
        }

        fn set_switch<'a>(
            &'a self,
            name: &'a str,
            switch: &'a TaskSwitch,
        ) -> BoxFuture<'a, Result<(), DataStoreError>> {
            match self.check() {
                Ok(()) => self.memory.set_switch(name, switch),
                Err(error) => Box::pin(std::future::ready(Err(error))),
            }
        }

        fn record_activation<'a>(
            &'a self,
            name: &'a str,
            activation: &'a NexusActivation,
        ) -> BoxFuture<'a, Result<(), DataStoreError>> {
            match self.check() {
                Ok(()) => self.memory.record_activation(name, activation),
                Err(error) => Box::pin(std::future::ready(Err(error))),
            }
        }

        fn activations<'a>(
            &'a self,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Vec<NexusActivation>, DataStoreError>> {
            match self.check() {
                Ok(()) => self.memory.activations(name),
                Err(error) => Box::pin(std::future::ready(Err(error))),
            }
        }
    }

    struct Harness {
        driver: Driver,
        store: Arc<TestStore>,
        activations: Arc<AtomicU64>,
        reasons: Arc<Mutex<Vec<ActivationReason>>>,
        gate: Arc<Semaphore>,
        cancelled: Arc<AtomicBool>,
    }

    fn start(
        period: Duration,
        gated: bool,
        panic_on: Option<u64>,
        dependencies: Vec<Box<dyn Dependency>>,
    ) -> Harness {
        start_on(Arc::new(TestStore::default()), true, period, gated, panic_on, dependencies)
    }

    /// Starts the scripted task on `store`, with the config file's switch
    /// `enabled`.
    fn start_on(
        store: Arc<TestStore>,
        enabled: bool,
        period: Duration,
        gated: bool,
        panic_on: Option<u64>,
        dependencies: Vec<Box<dyn Dependency>>,
    ) -> Harness {
        let activations = Arc::new(AtomicU64::new(0));
        let reasons = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Semaphore::new(0));
        let cancelled = Arc::new(AtomicBool::new(false));
        let task = ScriptedTask {
            activations: activations.clone(),
            reasons: reasons.clone(),
            gate: gated.then(|| gate.clone()),
            panic_on,
            cancelled: cancelled.clone(),
        };
        let definition = TaskDefinition {
            name: "scripted".into(),
            description: "a test task".into(),
            period,
            task: Box::new(task),
            activator: Activator::new(),
            dependencies,
            enabled,
        };
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let driver = Driver::start(vec![definition], store.clone(), NEXUS_ID, &log);
        Harness { driver, store, activations, reasons, gate, cancelled }
    }

    impl Harness {
        async fn wait_completed(&self, iteration: u64) -> TaskView {
            let mut completed = self.driver.completions("scripted").unwrap();
            completed.wait_for(|&done| done >= iteration).await.unwrap();
            self.driver.view("scripted").await.unwrap()
        }

        async fn last(&self) -> (u64, ActivationReason, serde_json::Value) {
            match self.driver.view("scripted").await.unwrap().last {
                LastResult::Completed { iteration, reason, details, .. } => (iteration, reason, details),
                LastResult::NeverCompleted => panic!("no activation completed yet"),
            }
        }

        /// The last activation's details, which must be the driver's.
        async fn last_driver_details(&self) -> DriverDetails {
            serde_json::from_value(self.last().await.2).expect("details recorded by the driver")
        }

        fn reasons(&self) -> Vec<ActivationReason> {
            self.reasons.lock().unwrap().clone()
        }

        async fn set(&self, mode: TaskMode, reason: &str) -> TaskView {
            self.driver.set_switch("scripted", mode, "alice@console", reason).await.unwrap()
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn activates_at_start_and_then_every_period() {
        let harness = start(Duration::from_secs(10), false, None, vec![]);
        harness.wait_completed(1).await;
        assert_eq!(harness.last().await.1, ActivationReason::Periodic);
        let started = tokio::time::Instant::now();
        harness.wait_completed(3).await;
        assert!(started.elapsed() >= Duration::from_secs(20), "two periods passed");
        assert_eq!(harness.last().await.1, ActivationReason::Periodic);
        assert_eq!(harness.driver.view("scripted").await.unwrap().period, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn explicit_activation_runs_with_reason_explicit() {
        let harness = start(HOUR, false, None, vec![]);
        harness.wait_completed(1).await;
        let view = harness.driver.activate_and_wait("scripted").await.unwrap();
        assert!(matches!(
            view.last,
            LastResult::Completed { iteration: 2, reason: ActivationReason::Explicit, .. }
        ));
        assert_eq!(harness.last().await.2, serde_json::json!({ "activation": 2 }));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_names_activate_nothing() {
        let harness = start(HOUR, false, None, vec![]);
        harness.wait_completed(1).await;
        let error = harness.driver.activate(&["scripted", "nope"]).unwrap_err();
        assert_eq!(error.to_string(), "no background task named [\"nope\"]; known tasks: scripted");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(harness.activations.load(Ordering::SeqCst), 1, "the known task was not activated either");
        let error = harness.driver.set_switch("nope", TaskMode::Manual, "alice", "why").await.unwrap_err();
        assert!(matches!(error, DriverError::UnknownTask { .. }), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn dependency_change_activates_and_a_dropped_sender_does_not_spin() {
        let (sender, receiver) = watch::channel(0u32);
        let harness = start(HOUR, false, None, vec![Box::new(receiver)]);
        harness.wait_completed(1).await;
        sender.send(1).unwrap();
        harness.wait_completed(2).await;
        assert_eq!(harness.last().await.1, ActivationReason::Dependency);

        drop(sender);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(harness.activations.load(Ordering::SeqCst), 2, "no activation from the closed channel");
        harness.driver.activate_and_wait("scripted").await.unwrap();
        assert_eq!(harness.last().await.1, ActivationReason::Explicit);
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_is_told_why_it_runs() {
        let (sender, receiver) = watch::channel(0u32);
        let harness = start(Duration::from_secs(10), false, None, vec![Box::new(receiver)]);
        harness.wait_completed(1).await;
        harness.driver.activate_and_wait("scripted").await.unwrap();
        sender.send(1).unwrap();
        harness.wait_completed(3).await;
        harness.wait_completed(4).await;
        assert_eq!(
            harness.reasons(),
            [
                ActivationReason::Periodic,
                ActivationReason::Explicit,
                ActivationReason::Dependency,
                ActivationReason::Periodic
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn activations_during_a_run_coalesce_into_one_more() {
        let harness = start(HOUR, true, None, vec![]);
        // The start-up activation is now held inside the task.
        while harness.activations.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let running = harness.driver.view("scripted").await.unwrap();
        match running.current {
            CurrentStatus::Running { iteration, reason, start_time } => {
                assert_eq!((iteration, reason), (1, ActivationReason::Periodic));
                assert!(start_time <= chrono::Utc::now());
            }
            CurrentStatus::Idle => panic!("the held activation shows as running"),
        }
        assert_eq!(running.last, LastResult::NeverCompleted);
        for _ in 0..3 {
            harness.driver.activate(&["scripted"]).unwrap();
        }
        harness.gate.add_permits(10);
        harness.wait_completed(2).await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(harness.activations.load(Ordering::SeqCst), 2, "three activations, one follow-up run");
        assert_eq!(harness.last().await.1, ActivationReason::Explicit);
        assert_eq!(harness.driver.view("scripted").await.unwrap().current, CurrentStatus::Idle);
    }

    /// An explicit activation and a dependency change, both during one run,
    /// are served by one follow-up run.
    #[tokio::test(start_paused = true)]
    async fn an_activation_and_a_dependency_change_during_a_run_give_one_follow_up() {
        let (sender, receiver) = watch::channel(0u64);
        let harness = start(HOUR, true, None, vec![Box::new(receiver)]);
        while harness.activations.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        harness.driver.activate(&["scripted"]).unwrap();
        sender.send_replace(1);
        harness.gate.add_permits(10);
        harness.wait_completed(2).await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(harness.activations.load(Ordering::SeqCst), 2, "one follow-up for both signals");
        // A change after the follow-up started still activates once more.
        sender.send_replace(2);
        harness.wait_completed(3).await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(harness.activations.load(Ordering::SeqCst), 3);
        assert_eq!(harness.last().await.1, ActivationReason::Dependency);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_recorded_and_the_task_keeps_running() {
        let harness = start(HOUR, false, Some(1), vec![]);
        harness.wait_completed(1).await;
        assert_eq!(
            harness.last_driver_details().await,
            DriverDetails::Panicked { message: "scripted panic in activation 1".into() }
        );
        harness.driver.activate_and_wait("scripted").await.unwrap();
        assert_eq!(harness.last().await.2, serde_json::json!({ "activation": 2 }));
    }

    #[tokio::test(start_paused = true)]
    async fn manual_mode_skips_periodic_activations_and_runs_explicit_and_dependency_ones() {
        let (sender, receiver) = watch::channel(0u32);
        let harness = start(Duration::from_secs(10), false, None, vec![Box::new(receiver)]);
        harness.wait_completed(1).await;
        let view = harness.set(TaskMode::Manual, "watching replication by hand").await;
        assert_eq!(view.switch.mode, TaskMode::Manual);
        assert_eq!(view.switch.reason, "watching replication by hand");

        let skipped = harness.wait_completed(2).await;
        assert!(matches!(skipped.last, LastResult::Completed { reason: ActivationReason::Periodic, .. }));
        let DriverDetails::Skipped { mode, changed_by, reason, .. } = harness.last_driver_details().await
        else {
            panic!("the periodic activation was skipped")
        };
        assert_eq!(
            (mode, changed_by.as_str(), reason.as_str()),
            (TaskMode::Manual, "alice@console", "watching replication by hand")
        );
        assert_eq!(harness.activations.load(Ordering::SeqCst), 1, "the task itself did not run");

        harness.driver.activate_and_wait("scripted").await.unwrap();
        sender.send(1).unwrap();
        harness.wait_completed(4).await;
        assert_eq!(
            harness.reasons(),
            [ActivationReason::Periodic, ActivationReason::Explicit, ActivationReason::Dependency],
            "explicit and dependency activations ran"
        );
        assert_eq!(harness.last().await.2, serde_json::json!({ "activation": 3 }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_task_skips_every_activation_and_says_who_disabled_it_and_why() {
        let (sender, receiver) = watch::channel(0u32);
        let harness = start(Duration::from_secs(10), false, None, vec![Box::new(receiver)]);
        harness.wait_completed(1).await;
        harness.set(TaskMode::Disabled, "a pruning bug").await;
        harness.driver.activate_and_wait("scripted").await.unwrap();
        sender.send(1).unwrap();
        harness.wait_completed(3).await;
        harness.wait_completed(4).await;
        assert_eq!(harness.activations.load(Ordering::SeqCst), 1, "the task itself did not run");
        let view = harness.driver.view("scripted").await.unwrap();
        let LastResult::Completed { iteration: 4, .. } = view.last else { panic!("{view:?}") };
        let DriverDetails::Skipped { mode, changed_by, reason, time_changed } =
            harness.last_driver_details().await
        else {
            panic!("skipped")
        };
        assert_eq!(
            (mode, changed_by.as_str(), reason.as_str()),
            (TaskMode::Disabled, "alice@console", "a pruning bug")
        );
        assert_eq!(time_changed, view.switch.time_changed);

        harness.set(TaskMode::Enabled, "fixed").await;
        harness.driver.activate_and_wait("scripted").await.unwrap();
        assert_eq!(harness.activations.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_switch_needs_who_and_why() {
        let harness = start(HOUR, false, None, vec![]);
        let error = harness.driver.set_switch("scripted", TaskMode::Manual, "alice", " ").await.unwrap_err();
        assert_eq!(error.to_string(), "the switch of background task scripted needs a non-empty reason");
        let error = harness.driver.set_switch("scripted", TaskMode::Manual, "", "why").await.unwrap_err();
        assert_eq!(error.to_string(), "the switch of background task scripted needs a non-empty changed_by");
        assert_eq!(harness.driver.view("scripted").await.unwrap().switch.changed_by, "config file");
    }

    /// The config file's switch applies only while the store has none.
    #[tokio::test(start_paused = true)]
    async fn the_stored_switch_wins_over_the_config_file() {
        let harness = start_on(Arc::new(TestStore::default()), false, HOUR, false, None, vec![]);
        let view = harness.wait_completed(1).await;
        assert_eq!((view.switch.mode, view.switch.changed_by.as_str()), (TaskMode::Disabled, "config file"));
        assert!(matches!(harness.last_driver_details().await, DriverDetails::Skipped { .. }));

        let store = Arc::new(TestStore::default());
        let switch = TaskSwitch {
            mode: TaskMode::Enabled,
            changed_by: "alice@console".into(),
            reason: "needed after all".into(),
            time_changed: chrono::Utc::now(),
        };
        store.memory.set_switch("scripted", &switch).await.unwrap();
        let harness = start_on(store, false, HOUR, false, None, vec![]);
        let view = harness.wait_completed(1).await;
        assert_eq!(view.switch, switch);
        assert_eq!(harness.last().await.2, serde_json::json!({ "activation": 1 }), "the task ran");
    }

    #[tokio::test(start_paused = true)]
    async fn activations_that_run_are_recorded_and_skipped_ones_are_not() {
        let harness = start(Duration::from_secs(10), false, None, vec![]);
        harness.wait_completed(1).await;
        harness.driver.activate_and_wait("scripted").await.unwrap();
        harness.set(TaskMode::Manual, "by hand").await;
        let view = harness.wait_completed(3).await;
        assert!(matches!(view.last, LastResult::Completed { reason: ActivationReason::Periodic, .. }));
        let [recorded] = view.activations.as_slice() else { panic!("one Nexus: {:?}", view.activations) };
        assert_eq!(
            (recorded.nexus_id, recorded.iteration, recorded.reason),
            (NEXUS_ID, 2, ActivationReason::Explicit),
            "the skipped periodic activation 3 is not recorded"
        );
        assert!(recorded.time_done.is_some_and(|done| done >= recorded.time_started));
    }

    /// A store that fails makes the loop honour the last switch it read, and
    /// says so; the task goes on.
    #[tokio::test(start_paused = true)]
    async fn an_unreadable_switch_falls_back_to_the_last_one_read() {
        let harness = start(Duration::from_secs(10), false, None, vec![]);
        harness.wait_completed(1).await;
        harness.set(TaskMode::Manual, "by hand").await;
        harness.wait_completed(2).await;
        harness.store.failing.store(true, Ordering::SeqCst);

        let view = harness.wait_completed(3).await;
        assert!(matches!(
            harness.last_driver_details().await,
            DriverDetails::Skipped { mode: TaskMode::Manual, .. }
        ));
        assert_eq!(view.switch.mode, TaskMode::Manual, "the last switch read");
        assert_eq!(view.database_errors.len(), 3, "{:?}", view.database_errors);
        assert!(
            view.database_errors.iter().any(|error| error.starts_with(
                "iteration 3 could not read the switch and honoured the last one read (manual)"
            )),
            "{:?}",
            view.database_errors
        );
        let view = harness.driver.activate_and_wait("scripted").await.unwrap();
        assert_eq!(harness.activations.load(Ordering::SeqCst), 2, "an explicit activation still runs");
        assert!(matches!(view.last, LastResult::Completed { reason: ActivationReason::Explicit, .. }));
        let error =
            harness.driver.set_switch("scripted", TaskMode::Enabled, "alice", "why").await.unwrap_err();
        assert_eq!(
            common::error_chain(&error),
            "setting the switch of background task scripted: no database connection available within 10s \
             (last connection error: connection refused)"
        );

        harness.store.failing.store(false, Ordering::SeqCst);
        let view = harness.wait_completed(5).await;
        assert!(view.database_errors.is_empty(), "{:?}", view.database_errors);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_cancels_a_stuck_activation_after_the_grace_period() {
        let harness = start(HOUR, true, None, vec![]);
        while harness.activations.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        harness.driver.shutdown(Duration::from_secs(5)).await;
        assert!(started.elapsed() >= Duration::from_secs(5), "the activation had its grace period");
        assert!(harness.cancelled.load(Ordering::SeqCst), "the stuck activation was cancelled");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_an_idle_driver_stop_at_once() {
        let harness = start(HOUR, false, None, vec![]);
        harness.wait_completed(1).await;
        let started = tokio::time::Instant::now();
        harness.driver.shutdown(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(!harness.cancelled.load(Ordering::SeqCst));
    }
}
