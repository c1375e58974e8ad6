//! Rack lifecycle and repository health over the external and internal
//! APIs (DESIGN §12): expunging a sled mid-replication, detecting an
//! artifact with no copy left and healing it by re-uploading, the target
//! release and what it protects from the pruner.

use common::api::external::{RepoHealth, SledState, TargetReleaseRequest};
use common::bgtask::details::TufRepoPrunerOutcome;
use integration_tests::rack::{PRUNER, TestRack, holds_exactly, wait_until};
use integration_tests::repos::{RepoFactory, upload};
use std::time::Duration;

async fn health(rack: &TestRack, version: &str) -> Option<common::api::external::RepoHealthView> {
    rack.nexus.external_client().repository_view(version).await.unwrap().into_inner().health
}

fn api_message<T: std::fmt::Debug>(error: T) -> String {
    format!("{error:?}")
}

/// A sled expunged while replication is under way gets no request from
/// then on (its generation stays where it was while the rack moves on, and
/// no copy is sourced from it), its copies stop counting, the others restore
/// `min_sled_replication` and converge, and its registration is refused.
///
/// Three sleds hold 1.0.0 (min 3) when a fourth, empty one joins and one of
/// the three is expunged in the same breath, with the 2.0.0 upload's
/// replication following: only two sleds in service hold 1.0.0 then, so
/// 1.0.0 is replicated again only if the newcomer is filled from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expunging_a_sled_mid_replication() {
    // No follow-up activations: every activation after the expunge starts
    // after it (one already running when it lands may still reach the sled
    // it listed; see ARCHITECTURE, "Expunge").
    let (mut rack, factory) = TestRack::with_trust_root(3, |config| {
        config.background_tasks.tuf_artifact_replication.min_sled_replication = 3;
        config.background_tasks.tuf_artifact_replication.followup_delay_millis = 600_000;
    })
    .await;
    rack.upload_ok(&factory, "1.0.0", &[("os", 300_000), ("sp", 50_000)], 1).await;
    rack.converge(20).await;
    rack.add_sled().await;
    let newcomer = rack.sleds[3].server.sled_id;
    let victim = rack.sleds[0].server.sled_id;
    let client = rack.nexus.external_client();
    let expunged = client.sled_expunge(&victim).await.unwrap().into_inner();
    assert_eq!(expunged.state, SledState::Expunged);
    let again = client.sled_expunge(&victim).await.unwrap().into_inner();
    assert_eq!(again.time_expunged, expunged.time_expunged, "expunging twice changes nothing");
    let listed = client.sled_list().await.unwrap().into_inner();
    assert_eq!(listed.iter().filter(|sled| sled.state == SledState::InService).count(), 3);

    let victim_generation = rack.sleds[0].client().artifact_list().await.unwrap().into_inner().generation;
    rack.upload_ok(&factory, "2.0.0", &[("newer", 80_000)], 2).await;
    let config = rack.config().await;
    wait_until("the three sleds in service converge", Duration::from_secs(60), async || {
        let status = rack.replicate().await;
        for record in status.ring.iter().filter(|r| r.time > expunged.time_expunged.unwrap()) {
            assert_ne!(record.sled_id, victim, "a request went to the expunged sled: {record:?}");
            assert_ne!(record.source_sled_id, Some(victim), "a copy was sourced from it: {record:?}");
        }
        let mut all = true;
        for sled in &rack.sleds[1..] {
            all &= holds_exactly(&integration_tests::rack::sled_view(sled).await, &config);
        }
        all
    })
    .await;
    // Health is judged at an activation's start; copies finish after it.
    rack.replicate().await;
    let held = rack.sleds[0].client().artifact_list().await.unwrap().into_inner();
    assert_eq!(held.generation, victim_generation, "no config reached the expunged sled");
    for version in ["1.0.0", "2.0.0"] {
        let health = health(&rack, version).await.unwrap();
        assert_eq!(
            (health.state, health.sleds_in_service),
            (RepoHealth::Replicated, 3),
            "{version}: {health:?}"
        );
        for artifact in &health.artifacts {
            assert!(!artifact.sleds.contains_key(&victim), "the expunged sled's copies do not count");
            assert!(artifact.sleds.len() >= 3, "min_sled_replication restored: {artifact:?}");
            assert!(artifact.sleds.contains_key(&newcomer), "restored by filling the newcomer: {artifact:?}");
        }
    }
    let info = common::api::nexus_internal::SledAgentInfo {
        serial: rack.sleds[0].server.serial.clone(),
        ip: "127.0.0.1".parse().unwrap(),
        port: rack.sleds[0].server.api_address().port(),
        repo_depot_port: rack.sleds[0].server.depot_address().port(),
    };
    let refused = rack.nexus.internal_client().sled_agent_put(&victim, &info).await.unwrap_err();
    assert_eq!(refused.status().unwrap().as_u16(), 409);
    assert!(api_message(&refused).contains("expunged is final"), "{refused:?}");
    // Its serial may come back under a new id (repaired hardware); the
    // serial of a sled in service may not (two agents, one machine).
    rack.nexus.internal_client().sled_agent_put(&uuid::Uuid::new_v4(), &info).await.unwrap();
    let taken =
        common::api::nexus_internal::SledAgentInfo { serial: rack.sleds[1].server.serial.clone(), ..info };
    let twin = rack.nexus.internal_client().sled_agent_put(&uuid::Uuid::new_v4(), &taken).await.unwrap_err();
    assert_eq!(twin.status().unwrap().as_u16(), 409);
    assert!(api_message(&twin).contains("is already registered by sled"), "{twin:?}");
}

/// Every copy of an artifact vanishes behind the system's back (files
/// deleted on every sled, staging already released): the repository turns
/// `lost`, with the artifact named. Uploading it again re-stages what is
/// missing and replication heals it back to `replicated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_artifact_is_detected_and_a_reupload_heals_it() {
    let (rack, factory) = TestRack::with_trust_root(3, |_| {}).await;
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 100_000), ("sp", 20_000)], 1)).await;
    let (status, body) = upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await;
    assert_eq!(status, 200, "{body}");
    rack.converge(20).await;
    rack.replicate().await;
    assert_eq!(health(&rack, "1.0.0").await.unwrap().state, RepoHealth::Replicated);

    let sp =
        body["repo"]["artifacts"].as_array().unwrap().iter().find(|a| a["name"] == "sp").unwrap()["sha256"]
            .as_str()
            .unwrap()
            .to_string();
    for sled in &rack.sleds {
        for m2 in sled.client().inventory().await.unwrap().into_inner().m2 {
            std::fs::remove_file(std::path::Path::new(&m2.path).join("artifacts").join(&sp)).unwrap();
        }
    }
    rack.replicate().await;
    let lost = health(&rack, "1.0.0").await.unwrap();
    assert_eq!(lost.state, RepoHealth::Lost, "{lost:?}");
    let artifact = lost.artifacts.iter().find(|a| a.sha256.to_string() == sp).unwrap();
    assert_eq!((artifact.state, artifact.sleds.len(), artifact.staged_by.len()), (RepoHealth::Lost, 0, 0));
    let os = lost.artifacts.iter().find(|a| a.name == "os").unwrap();
    assert_eq!(os.state, RepoHealth::Replicated, "the other artifact is fine");

    let (status, body) = upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("already_exists")), "{body}");
    wait_until("the re-uploaded repository heals", Duration::from_secs(60), async || {
        rack.replicate().await;
        health(&rack, "1.0.0").await.is_some_and(|h| h.state == RepoHealth::Replicated)
    })
    .await;

    // Each change of state is logged: worse at warn, better at info.
    let log = std::fs::read_to_string(rack.nexus.log.path()).unwrap();
    let logged = |level: &str, message: &str, to: &str| {
        log.lines().any(|line| {
            line.contains(level)
                && line.contains(message)
                && line.contains("system_version: 1.0.0")
                && line.contains(&format!("to: {to}"))
        })
    };
    assert!(logged("WARN", "repository health got worse", "lost"), "{log}");
    assert!(logged("INFO", "repository health changed", "replicated"), "{log}");
}

/// The target release can only be a `replicated` repository (the 409 says
/// what is missing), and the pruner never prunes the current or previous
/// target release or the newest upload: after four uploads and a prune with
/// `nkeep = 3`, those three remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_release_must_be_replicated_and_is_never_pruned() {
    let (mut rack, factory) = TestRack::with_trust_root(2, |config| {
        config.background_tasks.tuf_repo_pruner.nkeep = 3;
        config.background_tasks.tuf_artifact_replication.allow_fewer_sleds = true;
    })
    .await;
    let client = rack.nexus.external_client();
    let set = |version: &str| TargetReleaseRequest { system_version: version.to_string() };
    let status = client.target_release_view().await.unwrap().into_inner();
    assert!(status.current.is_none() && status.previous.is_none());

    // A third sled that does not answer: 1.0.0 cannot be replicated yet.
    rack.add_sled().await;
    let silent = rack.sleds.pop().unwrap();
    let silent_id = silent.server.sled_id;
    silent.server.shutdown().await;
    rack.upload_ok(&factory, "1.0.0", &[("os", 50_000)], 1).await;
    rack.replicate().await;
    let refused = client.target_release_set(&set("1.0.0")).await.unwrap_err();
    assert_eq!(refused.status().unwrap().as_u16(), 409);
    let message = api_message(&refused);
    assert!(message.contains("repository 1.0.0 is replicating, not replicated"), "{message}");
    assert!(message.contains("os 1.0.0 (zone) is on"), "{message}");
    let missing = client.target_release_set(&set("9.9.9")).await.unwrap_err();
    assert_eq!(missing.status().unwrap().as_u16(), 404);

    client.sled_expunge(&silent_id).await.unwrap();
    wait_until("1.0.0 is replicated", Duration::from_secs(30), async || {
        rack.replicate().await;
        health(&rack, "1.0.0").await.is_some_and(|h| h.state == RepoHealth::Replicated)
    })
    .await;
    let first = client.target_release_set(&set("1.0.0")).await.unwrap().into_inner();
    assert_eq!((first.system_version.as_str(), first.generation), ("1.0.0", 1));

    rack.upload_ok(&factory, "2.0.0", &[("os2", 50_000)], 2).await;
    rack.converge(20).await;
    rack.replicate().await;
    client.target_release_set(&set("2.0.0")).await.unwrap();
    let status = client.target_release_view().await.unwrap().into_inner();
    assert_eq!(status.current.unwrap().system_version, "2.0.0");
    assert_eq!(status.previous.unwrap().system_version, "1.0.0");

    rack.upload_ok(&factory, "3.0.0", &[("os3", 50_000)], 3).await;
    rack.upload_ok(&factory, "4.0.0", &[("os4", 50_000)], 4).await;
    let outcome = |task: common::bgtask::BackgroundTask| match task.last {
        common::bgtask::LastResult::Completed { details, .. } => {
            serde_json::from_value::<common::bgtask::details::TufRepoPrunerStatus>(details).unwrap().outcome
        }
        other => panic!("{other:?}"),
    };
    let pruned = outcome(rack.activate(PRUNER).await);
    assert!(
        matches!(&pruned, TufRepoPrunerOutcome::Pruned { system_version, .. } if system_version == "3.0.0"),
        "the oldest repository that is neither a target release nor the newest upload: {pruned:?}"
    );
    assert!(matches!(
        outcome(rack.activate(PRUNER).await),
        TufRepoPrunerOutcome::NothingToPrune { unpruned: 3 }
    ));
    let live: Vec<String> = rack
        .nexus
        .server
        .nexus()
        .datastore
        .tuf_repo_list_unpruned()
        .await
        .unwrap()
        .into_iter()
        .map(|repo| repo.system_version)
        .collect();
    assert_eq!(live, ["4.0.0", "2.0.0", "1.0.0"]);
}
