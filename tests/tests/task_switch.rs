//! The cluster-wide background task switch (DESIGN §12), with three Nexus
//! instances on one database: a mode set through one Nexus is honoured by
//! all three, `manual` stops periodic activations but not explicit ones,
//! and the mode survives a Nexus restart.

use common::api::nexus_internal::BackgroundTaskSwitchRequest;
use common::bgtask::details::InventoryCollectionStatus;
use common::bgtask::{ActivationReason, BackgroundTask, DriverDetails, LastResult, TaskMode, TaskSwitch};
use integration_tests::TestNexus;
use nexus::config::Config;
use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};
use uuid::Uuid;

const INVENTORY: &str = "inventory_collection";

/// Inventory collection every second: if `manual` did not stop periodic
/// activations, they would record collections during the test.
fn every_second(config: &mut Config) {
    config.background_tasks.inventory_collection.period_secs = 1;
}

fn micros_now() -> i64 {
    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
    i64::try_from(since_epoch.as_micros()).unwrap()
}

async fn view(nexus: &TestNexus) -> BackgroundTask {
    nexus.internal_client().bgtask_view(INVENTORY).await.unwrap().into_inner()
}

/// Watches one Nexus's task until it has completed `count` periodic
/// activations that started after `after` (microseconds since the epoch),
/// and checks each one it sees: skipped, by the `manual` switch.
///
/// Only the last result is visible, so an activation can be missed between
/// two looks; that is fine, as the database checks in the test catch any
/// periodic activation that did work. This loop proves that periodic
/// activations kept coming (the timer was not stopped by accident) and that
/// those seen were skipped for the right reason.
async fn skipped_periodic_activations(nexus: &TestNexus, switch: &TaskSwitch, after: i64, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = BTreeSet::new();
    while seen.len() < count {
        assert!(Instant::now() < deadline, "only {} periodic activations after the switch", seen.len());
        if let LastResult::Completed {
            iteration,
            start_time,
            reason: ActivationReason::Periodic,
            details,
            ..
        } = view(nexus).await.last
            && start_time.timestamp_micros() > after
        {
            let details: DriverDetails = serde_json::from_value(details).expect("the driver's details");
            assert_eq!(
                details,
                DriverDetails::Skipped {
                    mode: TaskMode::Manual,
                    changed_by: switch.changed_by.clone(),
                    reason: switch.reason.clone(),
                    time_changed: switch.time_changed,
                },
                "periodic iteration {iteration}"
            );
            seen.insert(iteration);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_is_honoured_by_every_nexus_and_survives_a_restart() {
    let first = TestNexus::start_with(every_second).await;
    let second = TestNexus::start_sharing(&first.db, every_second).await;
    let third = TestNexus::start_sharing(&first.db, every_second).await;
    let datastore = first.server.nexus().datastore.clone();

    let request = BackgroundTaskSwitchRequest {
        mode: TaskMode::Manual,
        changed_by: "test operator".into(),
        reason: "watching inventory by hand".into(),
    };
    let switch =
        first.internal_client().bgtask_switch(INVENTORY, &request).await.unwrap().into_inner().switch;
    // Every activation that starts from now on reads the committed switch.
    let after_set = micros_now();
    assert_eq!(
        (switch.mode, switch.changed_by.as_str(), switch.reason.as_str()),
        (TaskMode::Manual, "test operator", "watching inventory by hand")
    );
    for nexus in [&first, &second, &third] {
        assert_eq!(view(nexus).await.switch, switch, "every Nexus reads the switch from the database");
    }

    for nexus in [&first, &second, &third] {
        skipped_periodic_activations(nexus, &switch, after_set, 2).await;
    }
    // No periodic activation did work after the switch, in any Nexus:
    // activations that did work are recorded per Nexus (skipped ones are
    // not), and every inventory collection predates the switch.
    for activation in datastore.bgtask_activation_list(INVENTORY).await.unwrap() {
        assert!(
            activation.reason != ActivationReason::Periodic
                || activation.time_started.timestamp_micros() < after_set,
            "a periodic activation did work after the switch: {activation:?}"
        );
    }
    let latest = datastore.inventory_latest().await.unwrap().expect("the start-up collections");
    assert!(latest.collection.time_started.timestamp_micros() < after_set, "{:?}", latest.collection);

    // An explicit activation still runs, on each Nexus, and does real work.
    for nexus in [&first, &second, &third] {
        let task = nexus.activate(INVENTORY).await;
        let LastResult::Completed { reason: ActivationReason::Explicit, details, .. } = task.last else {
            panic!("an explicit activation completed: {task:?}")
        };
        let status: InventoryCollectionStatus =
            serde_json::from_value(details.clone()).unwrap_or_else(|_| panic!("task details: {details}"));
        let collected = status.collection_id.expect("a collection was recorded");
        let latest = datastore.inventory_latest().await.unwrap().unwrap();
        assert_eq!(latest.collection.id, collected);
    }
    let activations = view(&first).await.activations;
    let nexus_ids: BTreeSet<Uuid> = activations.iter().map(|activation| activation.nexus_id).collect();
    let expected: BTreeSet<Uuid> =
        [&first, &second, &third].iter().map(|nexus| nexus.server.nexus().id).collect();
    assert_eq!(nexus_ids, expected, "one last activation per Nexus");
    assert!(
        activations
            .iter()
            .all(|activation| activation.reason == ActivationReason::Explicit
                && activation.time_done.is_some()),
        "{activations:?}"
    );

    // A Nexus started after the switch honours it from its first (periodic,
    // start-up) activation on.
    let mut config = third.config();
    every_second(&mut config);
    let TestNexus { db, dir, server, .. } = third;
    server.shutdown().await;
    let restarted = TestNexus::start_on(db, dir, &config).await;
    assert_eq!(view(&restarted).await.switch, switch);
    let mut completed = restarted.server.nexus().background.completions(INVENTORY).unwrap();
    completed.wait_for(|&iteration| iteration >= 1).await.unwrap();
    let LastResult::Completed { iteration: 1, reason: ActivationReason::Periodic, details, .. } =
        view(&restarted).await.last
    else {
        panic!("the start-up activation completed")
    };
    let details: DriverDetails = serde_json::from_value(details).unwrap();
    assert!(matches!(details, DriverDetails::Skipped { mode: TaskMode::Manual, .. }), "{details:?}");
}
