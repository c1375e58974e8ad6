//! Load: concurrent uploads, and a rack of 200 sleds.

use common::bgtask::TaskMode;
use integration_tests::TestNexus;
use integration_tests::rack::TestRack;
use integration_tests::repos::{RepoFactory, upload};

/// 8 concurrent uploads of different repositories and 8 of one repository:
/// each is inserted or already_exists, the generation moves exactly once per
/// distinct repository, and nothing deadlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_serialize_cleanly() {
    // All 16 at once: the upload limit is not what this test is about.
    let nexus = TestNexus::start_with(|config| config.updates.max_concurrent_uploads = 16).await;
    let factory = RepoFactory::new().await;
    nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
    let before = nexus.server.nexus().datastore.tuf_generation_get().await.unwrap();
    let mut zips = Vec::new();
    for n in 0..8u64 {
        // Every repository shares "common" (same seed, first artifact).
        let mut spec = RepoFactory::spec(&format!("1.{n}.0"), &[("common", 50_000), ("own", 10_000 + n)], 1);
        spec.artifacts[1].version = format!("1.{n}.0");
        zips.push(factory.build(&spec).await);
    }
    let same = factory.build(&RepoFactory::spec("2.0.0", &[("common", 50_000), ("two", 20_000)], 1)).await;
    let mut uploads = Vec::new();
    for zip in zips.iter().chain(std::iter::repeat_n(&same, 8)) {
        let (url, token, zip) = (nexus.external_url(), nexus.token.clone(), zip.clone());
        uploads.push(tokio::spawn(async move { upload(&url, Some(&token), &zip).await }));
    }
    let mut inserted = 0;
    for handle in uploads {
        let (status, body) =
            tokio::time::timeout(std::time::Duration::from_secs(120), handle).await.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
        match body["status"].as_str().unwrap() {
            "inserted" => inserted += 1,
            "already_exists" => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(inserted, 9, "8 different repositories and one of the 8 identical uploads");
    let after = nexus.server.nexus().datastore.tuf_generation_get().await.unwrap();
    assert_eq!(after.get(), before.get() + 9, "one bump per distinct repository");
}

/// 200 registered sleds (one M.2 each, in this process): one activation
/// completes and plans exactly what is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_sleds_are_planned_in_one_activation() {
    let mut rack = TestRack::start(0, |config| {
        config.background_tasks.tuf_artifact_replication.max_concurrent_requests = 32;
        config.background_tasks.tuf_artifact_replication.followup_delay_millis = 60_000;
    })
    .await;
    for _ in 0..200 {
        rack.add_sled_with(|config| config.storage.m2_count = 1).await;
    }
    let factory = RepoFactory::new().await;
    rack.nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
    let background = &rack.nexus.server.nexus().background;
    let disabled = TaskMode::Disabled;
    background.set_switch("tuf_artifact_replication", disabled, "load test", "upload first").await.unwrap();
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 20_000)], 1)).await;
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
    let enabled = TaskMode::Enabled;
    background.set_switch("tuf_artifact_replication", enabled, "load test", "uploaded").await.unwrap();

    let started = std::time::Instant::now();
    let status = rack.replicate().await;
    println!("one activation over 200 sleds took {:?}", started.elapsed());
    assert_eq!(status.sleds_in_service, 200);
    assert_eq!((status.plan.puts, status.plan.copies, status.plan.recopies), (1, 199, 0));
    assert_eq!((status.last_run.put_config_ok, status.last_run.list_ok), (200, 200));
    assert_eq!((status.last_run.put_ok, status.last_run.copy_ok), (1, 199), "{:?}", status.last_run);
}
