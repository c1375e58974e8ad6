//! tuf_artifact_replication and tuf_repo_pruner against a real database, a
//! real Nexus and real sled agents over HTTP.

use common::api::sled_agent::M2State;
use common::bgtask::details::ReplicationOutcome;
use integration_tests::rack::{PRUNER, TestRack, holds_exactly};
use integration_tests::repos::{RepoFactory, upload};

async fn rack_with_root(sleds: usize, adjust: impl FnOnce(&mut nexus::config::Config)) -> (TestRack, RepoFactory) {
    let rack = TestRack::start(sleds, adjust).await;
    let factory = RepoFactory::new().await;
    rack.nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
    (rack, factory)
}

async fn upload_ok(rack: &TestRack, factory: &RepoFactory, version: &str, artifacts: &[(&str, u64)], seed: u64) {
    let zip = factory.build(&RepoFactory::spec(version, artifacts, seed)).await;
    let (status, body) = upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_converges_on_every_sled_and_leaves_staging() {
    let (rack, factory) = rack_with_root(4, |_| {}).await;
    upload_ok(&rack, &factory, "1.0.0", &[("os", 2 << 20), ("sp", 100_000), ("rot", 10_000)], 1).await;
    let activations = rack.converge(20).await;
    println!("converged after {activations} activations");
    let config = rack.config().await;
    assert_eq!(config.artifacts.len(), 3);
    for view in rack.views().await {
        assert!(holds_exactly(&view, &config), "{view:?}");
        assert_eq!(view.healthy_m2, 2);
    }
    let status = rack.replicate().await;
    assert_eq!(status.outcome, ReplicationOutcome::Completed);
    assert!(status.local_repos.is_empty());
    assert_eq!((status.plan.puts, status.plan.copies, status.plan.recopies), (0, 0, 0));
    assert!(status.lifetime.put_ok >= 3 * 3, "three artifacts PUT to three sleds: {:?}", status.lifetime);
    assert_eq!(status.repos[0].sleds_complete, 4);

    let view = rack.nexus.external_client().repository_view("1.0.0").await.unwrap().into_inner();
    let progress = view.replication.expect("progress is known after an activation");
    assert_eq!((progress.sleds_complete, progress.sleds_in_service), (4, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_removes_unique_artifacts_and_keeps_shared_ones() {
    let (rack, factory) = rack_with_root(3, |config| config.background_tasks.tuf_repo_pruner.nkeep = 1).await;
    upload_ok(&rack, &factory, "1.0.0", &[("shared", 50_000), ("old-only", 20_000)], 1).await;
    let mut spec = RepoFactory::spec("2.0.0", &[("shared", 50_000), ("new-only", 30_000)], 1);
    spec.artifacts[1].version = "2.0.0".into();
    let zip = factory.build(&spec).await;
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
    rack.converge(20).await;
    assert_eq!(rack.config().await.artifacts.len(), 3);

    rack.activate(PRUNER).await;
    let config = rack.config().await;
    assert_eq!(config.artifacts.len(), 2, "old-only left the config");
    // The prune activates replication (a dependency); converge from there.
    rack.converge(10).await;
    for view in rack.views().await {
        assert!(holds_exactly(&view, &config), "{view:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sled_receives_everything_and_a_restored_m2_is_healed() {
    let (mut rack, factory) = rack_with_root(3, |_| {}).await;
    upload_ok(&rack, &factory, "1.0.0", &[("os", 300_000), ("sp", 40_000)], 1).await;
    rack.converge(20).await;

    rack.add_sled().await;
    rack.converge(20).await;

    // A device fails, a new repository arrives meanwhile, the device returns
    // with one copy missing: re-copies heal it.
    rack.fail_m2(1, 0, M2State::Failed).await;
    upload_ok(&rack, &factory, "2.0.0", &[("hubris", 70_000)], 2).await;
    rack.converge(20).await;
    rack.fail_m2(1, 0, M2State::Healthy).await;
    assert!(!rack.converged().await, "the restored device lacks the new artifact");
    let status = rack.replicate().await;
    assert!(status.plan.recopies >= 1, "{:?}", status.plan);
    rack.converge(20).await;
}
