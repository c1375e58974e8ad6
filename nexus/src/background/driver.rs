//! The background task driver.
//!
//! Each registered task runs on a tokio task of its own, in a loop that waits
//! for the next activation: its period, an explicit activation through its
//! [`Activator`], or a change published on one of its dependencies (watch
//! channels). Because one loop runs one task, a task never runs concurrently
//! with itself in this process.
//!
//! Coalescing: an [`Activator`] is a `Notify` permit. Any number of
//! activations that arrive while the task runs leave one permit, so they
//! cause exactly one follow-up run. Just before a run starts, every signal
//! still pending (a permit, an unseen dependency change) is consumed: the
//! run has not read its inputs yet, so it serves them all. An explicit
//! activation and a dependency change during one run therefore cause one
//! follow-up, not two. The period is measured from the end of the last run.
//!
//! Failure containment: a panic inside `activate` is caught and recorded as
//! the last result; the loop goes on. A dependency whose sender was dropped is
//! dropped from the loop's wait set, so it cannot spin the loop.
//!
//! Shutdown: [`Driver::shutdown`] tells every loop to stop, lets in-flight
//! activations finish within a grace period, then cancels what is left.

use common::bgtask::{
    ActivationReason, BackgroundTask as TaskView, CurrentStatus, DriverDetails, LastResult, TaskSwitch,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// One background task. It is told nothing about why it runs: it must do the
/// right thing from the state it reads, including when another Nexus runs the
/// same task at the same moment.
pub trait BackgroundTask: Send {
    /// Does one round of work and reports what it did, as JSON for the
    /// status API.
    fn activate<'a>(&'a mut self, log: &'a slog::Logger) -> BoxFuture<'a, serde_json::Value>;
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

/// What a caller provides to register a task.
pub struct TaskDefinition {
    pub name: String,
    pub description: String,
    pub period: Duration,
    pub task: Box<dyn BackgroundTask>,
    pub activator: Activator,
    pub dependencies: Vec<Box<dyn Dependency>>,
    /// The switch's state at start-up (from the config file).
    pub enabled: bool,
}

/// The mutable status of one task, shared between its loop and readers.
struct TaskState {
    switch: TaskSwitch,
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriverError {
    #[error("no background task named {unknown:?}; known tasks: {}", known.join(", "))]
    UnknownTask { unknown: Vec<String>, known: Vec<String> },
}

pub struct Driver {
    tasks: BTreeMap<String, RegisteredTask>,
    shutdown: watch::Sender<bool>,
    /// Taken by [`Driver::shutdown`].
    loops: Mutex<Vec<JoinHandle<()>>>,
}

impl Driver {
    /// Starts every task's loop. Each task is activated once right away.
    pub fn start(definitions: Vec<TaskDefinition>, log: &slog::Logger) -> Driver {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = BTreeMap::new();
        let mut loops = Vec::new();
        for definition in definitions {
            let state = Arc::new(Mutex::new(TaskState {
                switch: TaskSwitch {
                    enabled: definition.enabled,
                    changed_by: "config file".to_string(),
                    time_changed: chrono::Utc::now(),
                },
                current: CurrentStatus::Idle,
                last: LastResult::NeverCompleted,
                iterations_started: 0,
            }));
            let (completed_tx, completed) = watch::channel(0);
            let task_loop = TaskLoop {
                log: log.new(slog::o!("background_task" => definition.name.clone())),
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
        Driver { tasks, shutdown, loops: Mutex::new(loops) }
    }

    pub fn names(&self) -> Vec<String> {
        self.tasks.keys().cloned().collect()
    }

    pub fn view(&self, name: &str) -> Result<TaskView, DriverError> {
        let task = self.task(name)?;
        let state = task.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(TaskView {
            name: name.to_string(),
            description: task.description.clone(),
            period: task.period,
            switch: state.switch.clone(),
            current: state.current.clone(),
            last: state.last.clone(),
        })
    }

    pub fn views(&self) -> BTreeMap<String, TaskView> {
        self.tasks.keys().map(|name| (name.clone(), self.view(name).expect("name is registered"))).collect()
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

    pub fn set_enabled(&self, name: &str, enabled: bool, changed_by: &str) -> Result<TaskView, DriverError> {
        {
            let task = self.task(name)?;
            let mut state = task.state.lock().unwrap_or_else(|e| e.into_inner());
            state.switch =
                TaskSwitch { enabled, changed_by: changed_by.to_string(), time_changed: chrono::Utc::now() };
        }
        self.view(name)
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
        self.view(name)
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
        let mut reason = ActivationReason::Timeout;
        loop {
            self.run_once(reason).await;
            let next = tokio::select! {
                biased;
                _ = self.shutdown.changed() => None,
                () = self.notify.notified() => Some(ActivationReason::Signaled),
                () = next_dependency_change(&mut self.dependencies) => Some(ActivationReason::Dependency),
                () = tokio::time::sleep(self.period) => Some(ActivationReason::Timeout),
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
        let (iteration, switch) = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.iterations_started += 1;
            let iteration = state.iterations_started;
            state.current = CurrentStatus::Running { iteration, start_time, reason };
            (iteration, state.switch.clone())
        };
        let details = if switch.enabled {
            match AssertUnwindSafe(self.task.activate(&self.log)).catch_unwind().await {
                Ok(details) => details,
                Err(payload) => {
                    let message = panic_message(payload.as_ref());
                    slog::error!(self.log, "background task panicked"; "iteration" => iteration, "message" => &message);
                    serde_json::to_value(DriverDetails::Panicked { message }).expect("serializable")
                }
            }
        } else {
            serde_json::to_value(DriverDetails::Disabled {
                changed_by: switch.changed_by,
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

    /// A task that counts its activations, can be held inside an activation
    /// until the test releases it, and can be told to panic.
    struct ScriptedTask {
        activations: Arc<AtomicU64>,
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
        fn activate<'a>(&'a mut self, _log: &'a slog::Logger) -> BoxFuture<'a, serde_json::Value> {
            Box::pin(async move {
                let n = self.activations.fetch_add(1, Ordering::SeqCst) + 1;
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

    struct Harness {
        driver: Driver,
        activations: Arc<AtomicU64>,
        gate: Arc<Semaphore>,
        cancelled: Arc<AtomicBool>,
    }

    fn start(
        period: Duration,
        gated: bool,
        panic_on: Option<u64>,
        dependencies: Vec<Box<dyn Dependency>>,
    ) -> Harness {
        let activations = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let cancelled = Arc::new(AtomicBool::new(false));
        let task = ScriptedTask {
            activations: activations.clone(),
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
            enabled: true,
        };
        let log = slog::Logger::root(slog::Discard, slog::o!());
        Harness { driver: Driver::start(vec![definition], &log), activations, gate, cancelled }
    }

    impl Harness {
        async fn wait_completed(&self, iteration: u64) -> TaskView {
            let mut completed = self.driver.completions("scripted").unwrap();
            completed.wait_for(|&done| done >= iteration).await.unwrap();
            self.driver.view("scripted").unwrap()
        }

        fn last(&self) -> (u64, ActivationReason, serde_json::Value) {
            match self.driver.view("scripted").unwrap().last {
                LastResult::Completed { iteration, reason, details, .. } => (iteration, reason, details),
                LastResult::NeverCompleted => panic!("no activation completed yet"),
            }
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn activates_at_start_and_then_every_period() {
        let harness = start(Duration::from_secs(10), false, None, vec![]);
        harness.wait_completed(1).await;
        assert_eq!(harness.last().1, ActivationReason::Timeout);
        let started = tokio::time::Instant::now();
        harness.wait_completed(3).await;
        assert!(started.elapsed() >= Duration::from_secs(20), "two periods passed");
        assert_eq!(harness.last().1, ActivationReason::Timeout);
        assert_eq!(harness.driver.view("scripted").unwrap().period, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn explicit_activation_runs_with_reason_signaled() {
        let harness = start(HOUR, false, None, vec![]);
        harness.wait_completed(1).await;
        let view = harness.driver.activate_and_wait("scripted").await.unwrap();
        assert!(matches!(
            view.last,
            LastResult::Completed { iteration: 2, reason: ActivationReason::Signaled, .. }
        ));
        assert_eq!(harness.last().2, serde_json::json!({ "activation": 2 }));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_names_activate_nothing() {
        let harness = start(HOUR, false, None, vec![]);
        harness.wait_completed(1).await;
        let error = harness.driver.activate(&["scripted", "nope"]).unwrap_err();
        assert_eq!(error.to_string(), "no background task named [\"nope\"]; known tasks: scripted");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(harness.activations.load(Ordering::SeqCst), 1, "the known task was not activated either");
    }

    #[tokio::test(start_paused = true)]
    async fn dependency_change_activates_and_a_dropped_sender_does_not_spin() {
        let (sender, receiver) = watch::channel(0u32);
        let harness = start(HOUR, false, None, vec![Box::new(receiver)]);
        harness.wait_completed(1).await;
        sender.send(1).unwrap();
        harness.wait_completed(2).await;
        assert_eq!(harness.last().1, ActivationReason::Dependency);

        drop(sender);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(harness.activations.load(Ordering::SeqCst), 2, "no activation from the closed channel");
        harness.driver.activate_and_wait("scripted").await.unwrap();
        assert_eq!(harness.last().1, ActivationReason::Signaled);
    }

    #[tokio::test(start_paused = true)]
    async fn activations_during_a_run_coalesce_into_one_more() {
        let harness = start(HOUR, true, None, vec![]);
        // The start-up activation is now held inside the task.
        while harness.activations.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let running = harness.driver.view("scripted").unwrap();
        match running.current {
            CurrentStatus::Running { iteration, reason, start_time } => {
                assert_eq!((iteration, reason), (1, ActivationReason::Timeout));
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
        assert_eq!(harness.last().1, ActivationReason::Signaled);
        assert_eq!(harness.driver.view("scripted").unwrap().current, CurrentStatus::Idle);
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
        assert_eq!(harness.last().1, ActivationReason::Dependency);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_recorded_and_the_task_keeps_running() {
        let harness = start(HOUR, false, Some(1), vec![]);
        harness.wait_completed(1).await;
        let (_, _, details) = harness.last();
        let recorded: DriverDetails = serde_json::from_value(details).unwrap();
        assert_eq!(recorded, DriverDetails::Panicked { message: "scripted panic in activation 1".into() });
        harness.driver.activate_and_wait("scripted").await.unwrap();
        assert_eq!(harness.last().2, serde_json::json!({ "activation": 2 }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_task_does_no_work_and_says_who_disabled_it() {
        let harness = start(HOUR, false, None, vec![]);
        harness.wait_completed(1).await;
        let view = harness.driver.set_enabled("scripted", false, "alice@console").unwrap();
        assert!(!view.switch.enabled);
        harness.driver.activate_and_wait("scripted").await.unwrap();
        assert_eq!(harness.activations.load(Ordering::SeqCst), 1, "the task itself did not run");
        let recorded: DriverDetails = serde_json::from_value(harness.last().2).unwrap();
        assert!(
            matches!(recorded, DriverDetails::Disabled { changed_by, .. } if changed_by == "alice@console")
        );

        harness.driver.set_enabled("scripted", true, "alice@console").unwrap();
        harness.driver.activate_and_wait("scripted").await.unwrap();
        assert_eq!(harness.activations.load(Ordering::SeqCst), 2);
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
