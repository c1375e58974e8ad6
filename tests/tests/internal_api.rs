//! Nexus's internal API over real HTTP, against a real database.

use common::api::nexus_internal::{
    BackgroundTaskSwitchRequest, BackgroundTasksActivateRequest, SledAgentInfo,
};
use common::bgtask::details::{TufRepoPrunerOutcome, TufRepoPrunerStatus};
use common::bgtask::{ActivationReason, BackgroundTask, DriverDetails, LastResult, TaskMode};
use common::clients::nexus_internal::{Client, Error as ClientError};
use integration_tests::TestNexus;
use std::time::{Duration, Instant};
use uuid::Uuid;

const PRUNER: &str = "tuf_repo_pruner";

async fn view(client: &Client, name: &str) -> BackgroundTask {
    client.bgtask_view(name).await.unwrap().into_inner()
}

fn completed_iteration(task: &BackgroundTask) -> u64 {
    match task.last {
        LastResult::Completed { iteration, .. } => iteration,
        LastResult::NeverCompleted => 0,
    }
}

/// Polls until the task completed an iteration after `after`.
async fn wait_past(client: &Client, name: &str, after: u64) -> BackgroundTask {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let task = view(client, name).await;
        if completed_iteration(&task) > after {
            return task;
        }
        assert!(Instant::now() < deadline, "{name} did not complete an iteration after {after}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_code<E>(error: &ClientError<E>) -> u16 {
    error.status().map(|status| status.as_u16()).unwrap_or(0)
}

fn message(error: ClientError<common::clients::nexus_internal::types::Error>) -> String {
    match error {
        ClientError::ErrorResponse(response) => response.into_inner().message,
        other => panic!("expected an error response, got {other:?}"),
    }
}

#[tokio::test]
async fn background_tasks_are_listed_viewed_and_activated() {
    let nexus = TestNexus::start().await;
    let client = nexus.internal_client();
    let tasks = client.bgtask_list().await.unwrap().into_inner();
    assert_eq!(
        tasks.keys().collect::<Vec<_>>(),
        ["inventory_collection", "tuf_artifact_replication", PRUNER]
    );
    assert_eq!(tasks[PRUNER].period, Duration::from_secs(3600));

    let first = wait_past(&client, PRUNER, 0).await;
    let LastResult::Completed { reason, .. } = first.last else { unreachable!() };
    assert_eq!(reason, ActivationReason::Periodic, "the start-up activation");
    let [recorded] = first.activations.as_slice() else { panic!("{:?}", first.activations) };
    assert_eq!(
        (recorded.nexus_id, recorded.iteration, recorded.reason),
        (nexus.server.nexus().id, 1, ActivationReason::Periodic),
        "this Nexus's activation, from the database"
    );

    let request = BackgroundTasksActivateRequest { bgtask_names: [PRUNER.to_string()].into() };
    client.bgtask_activate(&request).await.unwrap();
    let second = wait_past(&client, PRUNER, 1).await;
    let LastResult::Completed { iteration, reason, details, .. } = second.last else { unreachable!() };
    assert_eq!((iteration, reason), (2, ActivationReason::Explicit));
    let status: TufRepoPrunerStatus = serde_json::from_value(details).unwrap();
    assert_eq!(
        status,
        TufRepoPrunerStatus { nkeep: 3, outcome: TufRepoPrunerOutcome::NothingToPrune { unpruned: 0 } }
    );
}

#[tokio::test]
async fn unknown_task_names_are_404_and_activate_nothing() {
    let nexus = TestNexus::start().await;
    let client = nexus.internal_client();
    wait_past(&client, PRUNER, 0).await;

    let error = client.bgtask_view("no_such_task").await.unwrap_err();
    assert_eq!(status_code(&error), 404);
    assert_eq!(
        message(error),
        "no background task named [\"no_such_task\"]; known tasks: inventory_collection, tuf_artifact_replication, tuf_repo_pruner"
    );

    let request = BackgroundTasksActivateRequest {
        bgtask_names: [PRUNER.to_string(), "no_such_task".to_string()].into(),
    };
    let error = client.bgtask_activate(&request).await.unwrap_err();
    assert_eq!(status_code(&error), 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(completed_iteration(&view(&client, PRUNER).await), 1, "the known task was not activated");
}

#[tokio::test]
async fn a_disabled_task_reports_who_disabled_it_and_why() {
    let nexus = TestNexus::start().await;
    let client = nexus.internal_client();
    wait_past(&client, PRUNER, 0).await;
    let switch = |mode, reason: &str| BackgroundTaskSwitchRequest {
        mode,
        changed_by: "test operator".into(),
        reason: reason.into(),
    };
    let task = client.bgtask_switch(PRUNER, &switch(TaskMode::Disabled, "a pruning bug")).await.unwrap();
    let set = task.into_inner().switch;
    assert_eq!(
        (set.mode, set.changed_by.as_str(), set.reason.as_str()),
        (TaskMode::Disabled, "test operator", "a pruning bug")
    );
    assert_eq!(view(&client, PRUNER).await.switch, set, "read back from the database");

    client
        .bgtask_activate(&BackgroundTasksActivateRequest { bgtask_names: [PRUNER.to_string()].into() })
        .await
        .unwrap();
    let LastResult::Completed { details, .. } = wait_past(&client, PRUNER, 1).await.last else {
        unreachable!()
    };
    let details: DriverDetails = serde_json::from_value(details).unwrap();
    assert_eq!(
        details,
        DriverDetails::Skipped {
            mode: TaskMode::Disabled,
            changed_by: "test operator".into(),
            reason: "a pruning bug".into(),
            time_changed: set.time_changed,
        }
    );

    let error = client.bgtask_switch(PRUNER, &switch(TaskMode::Enabled, "")).await.unwrap_err();
    assert_eq!(status_code(&error), 400);
    assert_eq!(message(error), "the switch of background task tuf_repo_pruner needs a non-empty reason");
    let enable = switch(TaskMode::Enabled, "fixed");
    assert_eq!(
        client.bgtask_switch(PRUNER, &enable).await.unwrap().into_inner().switch.mode,
        TaskMode::Enabled
    );
    let error = client.bgtask_switch("no_such_task", &enable).await.unwrap_err();
    assert_eq!(status_code(&error), 404);
}

#[tokio::test]
async fn sled_agents_register_and_reregister() {
    let nexus = TestNexus::start().await;
    let client = nexus.internal_client();
    let id = Uuid::new_v4();
    let mut info = SledAgentInfo {
        serial: "sim-0".into(),
        ip: "127.0.0.1".parse().unwrap(),
        port: 12345,
        repo_depot_port: 12346,
    };
    client.sled_agent_put(&id, &info).await.unwrap();
    info.port = 23456;
    client.sled_agent_put(&id, &info).await.unwrap();
    let sleds = nexus.server.nexus().datastore.sled_list().await.unwrap();
    assert_eq!(sleds.len(), 1);
    assert_eq!((sleds[0].id, sleds[0].port), (id, 23456));

    let error = client.sled_agent_put(&Uuid::new_v4(), &info).await.unwrap_err();
    assert_eq!(status_code(&error), 409);
    assert!(message(error).contains("sim-0"));
    assert_eq!(nexus.server.nexus().datastore.sled_list().await.unwrap().len(), 1);
}

/// Nexus serves what it has staged as a repo depot does (a copy's last
/// resort, issue #20): whole, from a Range, 416 past the end, 404 for what
/// it has not staged; and a sled's copy can read from it.
#[tokio::test]
async fn staged_artifacts_are_served_like_a_depot() {
    let (rack, factory) = integration_tests::rack::TestRack::with_trust_root(0, |_| {}).await;
    rack.upload_ok(&factory, "1.0.0", &[("staged", 300_000)], 3).await;
    let config = rack.config().await;
    let hash = *config.artifacts.iter().next().unwrap();
    let staged = std::fs::read(rack.nexus.staging_dir().join("artifacts").join(hash.to_string())).unwrap();
    assert_eq!(staged.len(), 300_000);
    let url = format!("{}/artifact/sha256/{hash}", rack.nexus.internal_url());
    let http = reqwest::Client::new();

    let whole = http.get(&url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.content_length(), Some(300_000));
    assert!(whole.bytes().await.unwrap() == staged);

    let rest = http.get(&url).header("range", "bytes=1000-").send().await.unwrap();
    assert_eq!(rest.status(), 206);
    assert_eq!(rest.headers()["content-range"], "bytes 1000-299999/300000");
    assert!(rest.bytes().await.unwrap() == staged[1000..]);

    let past = http.get(&url).header("range", "bytes=300000-").send().await.unwrap();
    assert_eq!(past.status(), 416);
    assert_eq!(past.headers()["content-range"], "bytes */300000");

    let unknown = common::ArtifactHash([7; 32]);
    let missing =
        http.get(format!("{}/artifact/sha256/{unknown}", rack.nexus.internal_url())).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body = missing.text().await.unwrap();
    assert!(body.contains("NOT_STAGED") && body.contains(&unknown.to_string()), "{body}");

    // A sled copies it from Nexus as from any depot.
    let sled = integration_tests::TestSled::start(integration_tests::synthetic::NO_NEXUS).await;
    let client = sled.client();
    client.artifact_config_put(&config).await.unwrap();
    let body = common::api::sled_agent::ArtifactCopyFromDepotBody {
        depot_base_url: rack.nexus.internal_url(),
        alternates: Vec::new(),
        fallback: None,
    };
    client.artifact_copy_from_depot(&hash, config.generation.get(), &body).await.unwrap();
    integration_tests::rack::wait_until("the copy from Nexus lands", Duration::from_secs(20), async || {
        client.artifact_list().await.unwrap().into_inner().list.get(&hash) == Some(&2)
    })
    .await;
}
