//! tuf_artifact_replication and tuf_repo_pruner against a real database, a
//! real Nexus and real sled agents over HTTP.

use common::api::sled_agent::M2State;
use common::bgtask::details::ReplicationOutcome;
use integration_tests::rack::{PRUNER, TestRack, holds_exactly};
use integration_tests::repos::{RepoFactory, upload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_converges_on_every_sled_and_leaves_staging() {
    let (rack, factory) = TestRack::with_trust_root(4, |_| {}).await;
    rack.upload_ok(&factory, "1.0.0", &[("os", 2 << 20), ("sp", 100_000), ("rot", 10_000)], 1).await;
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
    // Pipelined (the default): each artifact is PUT to one sled, and the
    // three others copy it along a chain.
    assert_eq!(
        (status.lifetime.put_ok, status.lifetime.copy_ok),
        (3, 3 * 3),
        "three artifacts PUT once each and copied to three sleds: {:?}",
        status.lifetime
    );
    assert_eq!(status.repos[0].sleds_complete, 4);

    let view = rack.nexus.external_client().repository_view("1.0.0").await.unwrap().into_inner();
    let progress = view.replication.expect("progress is known after an activation");
    assert_eq!((progress.sleds_complete, progress.sleds_in_service), (4, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_removes_unique_artifacts_and_keeps_shared_ones() {
    let (rack, factory) =
        TestRack::with_trust_root(3, |config| config.background_tasks.tuf_repo_pruner.nkeep = 1).await;
    rack.upload_ok(&factory, "1.0.0", &[("shared", 50_000), ("old-only", 20_000)], 1).await;
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
    // No follow-up activations in the background: the test decides when
    // replication runs, so that the restored device is seen unhealed.
    let (mut rack, factory) = TestRack::with_trust_root(3, |config| {
        config.background_tasks.tuf_artifact_replication.followup_delay_millis = 600_000;
    })
    .await;
    rack.upload_ok(&factory, "1.0.0", &[("os", 300_000), ("sp", 40_000)], 1).await;
    rack.converge(20).await;

    rack.add_sled().await;
    rack.converge(20).await;

    // A device fails, a new repository arrives meanwhile, the device returns
    // with one copy missing: re-copies heal it.
    rack.fail_m2(1, 0, M2State::Failed).await;
    rack.upload_ok(&factory, "2.0.0", &[("hubris", 70_000)], 2).await;
    rack.converge(20).await;
    rack.fail_m2(1, 0, M2State::Healthy).await;
    assert!(!rack.converged().await, "the restored device lacks the new artifact");
    let status = rack.replicate().await;
    assert!(status.plan.recopies >= 1, "{:?}", status.plan);
    rack.converge(20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_restarted_between_upload_and_replication_loses_nothing() {
    let (rack, factory) = TestRack::with_trust_root(3, |config| {
        config.background_tasks.tuf_artifact_replication.disabled = true
    })
    .await;
    rack.upload_ok(&factory, "1.0.0", &[("os", 200_000), ("sp", 30_000)], 1).await;
    let status = rack.activate(integration_tests::rack::REPLICATION).await;
    assert!(
        serde_json::to_string(&status.last).unwrap().contains("disabled"),
        "replication is off: {status:?}"
    );

    // No sled holds anything: the staged files are the only copies.
    assert!(rack.views().await.iter().all(|view| view.copies.is_empty()));
    assert_eq!(std::fs::read_dir(rack.nexus.staging_dir().join("artifacts")).unwrap().count(), 2);

    // Restart: the hand-off queue is gone, the staged files are not.
    let TestRack { nexus, sleds } = rack;
    let config = nexus.config();
    let integration_tests::TestNexus { db, server, dir, .. } = nexus;
    server.shutdown().await;
    let nexus = integration_tests::TestNexus::start_on(db, dir, &config).await;
    let rack = TestRack { nexus, sleds };
    // Only staging recovery can have given replication the bytes.
    rack.converge(20).await;
}

/// DESIGN §11: a staged file that cannot be read at start-up is not lost.
/// Nexus refuses to start, naming the file, and deletes nothing (a sweep
/// would have removed the only copy of an acknowledged upload); once the
/// file reads again Nexus starts, as the same Nexus (its id is kept beside
/// the staging area), and replication converges from the staged bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_staged_file_stops_the_start_and_is_kept() {
    let (rack, factory) = TestRack::with_trust_root(3, |config| {
        config.background_tasks.tuf_artifact_replication.disabled = true
    })
    .await;
    rack.upload_ok(&factory, "1.0.0", &[("os", 120_000), ("sp", 30_000)], 7).await;
    let staged_dir = rack.nexus.staging_dir().join("artifacts");
    let staged = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&staged_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let before = staged();
    assert_eq!(before.len(), 2);
    let nexus_id = rack.nexus.server.nexus().id;

    let TestRack { nexus, sleds } = rack;
    let mut config = nexus.config();
    let integration_tests::TestNexus { db, server, dir, .. } = nexus;
    server.shutdown().await;
    fail::cfg("nexus::staging::read_error", &format!("return({})", before[0])).unwrap();
    let refused = nexus::server::Server::start(&config, integration_tests::test_log()).await;
    fail::remove("nexus::staging::read_error");
    let error = common::error_chain(&refused.err().expect("Nexus refuses to start"));
    assert!(error.contains(&before[0]) && error.contains("could not be read"), "{error}");
    assert_eq!(staged(), before, "nothing was swept");

    config.background_tasks.tuf_artifact_replication.disabled = false;
    let nexus = integration_tests::TestNexus::start_on(db, dir, &config).await;
    assert_eq!(nexus.server.nexus().id, nexus_id, "the same Nexus after a restart");
    let rack = TestRack { nexus, sleds };
    rack.converge(20).await;
}

/// Issue #21: a sled that finds the bytes of Nexus's PUT wrong makes Nexus
/// re-hash its staged file. The corrupt file is deleted (before, it was
/// PUT again at every back-off expiry, forever, and health said it was
/// staged); the artifact is then unplaceable and its repository lost,
/// which is the truth, until it is uploaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_file_a_sled_finds_corrupt_is_re_verified_and_dropped() {
    let (rack, factory) = TestRack::with_trust_root(1, |config| {
        let replication = &mut config.background_tasks.tuf_artifact_replication;
        replication.disabled = true;
        replication.allow_fewer_sleds = true;
    })
    .await;
    rack.upload_ok(&factory, "1.0.0", &[("os", 70_001)], 3).await;
    let hash = *rack.config().await.artifacts.iter().next().unwrap();
    let staged = rack.nexus.staging_dir().join("artifacts").join(hash.to_string());
    let mut bytes = std::fs::read(&staged).unwrap();
    bytes[500] ^= 0xff;
    std::fs::write(&staged, bytes).unwrap();

    let background = &rack.nexus.server.nexus().background;
    let enabled = common::bgtask::TaskMode::Enabled;
    background.set_switch(integration_tests::rack::REPLICATION, enabled, "test", "corrupted").await.unwrap();
    let first = rack.replicate().await;
    assert_eq!((first.last_run.put_ok, first.last_run.put_err), (0, 1), "{:?}", first.last_run);
    assert!(
        first
            .ring
            .iter()
            .any(|r| r.error.as_deref().is_some_and(|e| e.contains("the data received has sha256"))),
        "{:#?}",
        first.ring
    );
    assert!(!staged.exists(), "the corrupt staged file is deleted at once");

    let second = rack.replicate().await;
    assert_eq!((second.last_run.put_ok, second.last_run.put_err), (0, 0), "nothing left to PUT");
    assert_eq!(second.plan.unplaceable, vec![hash]);
    let view = rack.nexus.external_client().repository_view("1.0.0").await.unwrap().into_inner();
    assert_eq!(view.health.map(|health| health.state), Some(common::api::external::RepoHealth::Lost));
}

/// The race from the design review: Nexus A reads config N; Nexus B records
/// a repository (N+1) and replicates it; A's late requests, made at N, must
/// be refused by the sleds, and nothing B placed may disappear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_nexus_cannot_undo_a_newer_ones_work() {
    let (rack, factory) = TestRack::with_trust_root(3, |_| {}).await;
    let nexus_b = integration_tests::TestNexus::start_sharing(&rack.nexus.db, |config| {
        config.background_tasks.tuf_artifact_replication.followup_delay_millis = 100;
    })
    .await;
    rack.upload_ok(&factory, "1.0.0", &[("os", 100_000)], 1).await;
    rack.converge(20).await;

    // What A read, and will act on late.
    let stale = rack.config().await;

    let zip = factory.build(&RepoFactory::spec("2.0.0", &[("newer", 80_000)], 2)).await;
    assert_eq!(upload(&nexus_b.external_url(), Some(&nexus_b.token), &zip).await.0, 200);
    for _ in 0..20 {
        nexus_b.activate(integration_tests::rack::REPLICATION).await;
        if rack.converged().await {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let current = rack.config().await;
    assert_eq!(current.generation, stale.generation.next());
    let newer: Vec<_> = current.artifacts.difference(&stale.artifacts).copied().collect();
    assert_eq!(newer.len(), 1);

    // A's late requests, exactly as its executor would send them.
    let os = *stale.artifacts.iter().next().unwrap();
    for sled in &rack.sleds {
        let client = sled.client();
        let refused = client.artifact_config_put(&stale).await.unwrap_err();
        assert_eq!(refused.status().unwrap().as_u16(), 409);
        let put = client.artifact_put(&os, stale.generation.get(), vec![0u8; 10]).await.unwrap_err();
        assert_eq!(put.status().unwrap().as_u16(), 409);
        let body = common::api::sled_agent::ArtifactCopyFromDepotBody {
            depot_base_url: rack.sleds[0].depot_url(),
            alternates: Vec::new(),
            fallback: None,
        };
        let copy = client.artifact_copy_from_depot(&os, stale.generation.get(), &body).await.unwrap_err();
        assert_eq!(copy.status().unwrap().as_u16(), 409);
    }
    // And A's own next activation sees the sleds ahead of nothing: it reads
    // the current config and finds no work; nothing B placed went away.
    for view in rack.views().await {
        assert!(holds_exactly(&view, &current), "{view:?}");
    }
    let status = rack.replicate().await;
    assert_eq!(status.generation, current.generation);
    assert_eq!(status.plan.puts + status.plan.copies, 0);

    // A sled that is ahead of the database (as it would be for a Nexus that
    // read an older config): the activation stops and says so.
    let ahead = common::ArtifactConfig {
        generation: current.generation.next(),
        artifacts: current.artifacts.clone(),
    };
    rack.sleds[0].client().artifact_config_put(&ahead).await.unwrap();
    let status = rack.replicate().await;
    assert_eq!(
        status.outcome,
        ReplicationOutcome::Superseded {
            sled_id: rack.sleds[0].server.sled_id,
            sled_generation: ahead.generation
        }
    );
    assert_eq!(status.plan.puts + status.plan.copies, 0, "a superseded activation plans nothing");
    for view in rack.views().await {
        assert!(current.artifacts.iter().all(|hash| view.copies.get(hash) == Some(&2)), "{view:?}");
    }
}

/// Three Nexus instances on one database race uploads, prunes and
/// replication activations. One of them is slow between reading the config
/// and pushing it (a failpoint delay), so a stale reader is in every run by
/// construction, not by chance; the test first makes it stale on purpose and
/// checks that it stops. At every observation (a consistent snapshot: the
/// database generation did not move while it was taken), every artifact of
/// every unpruned repository has a copy somewhere (a sled or a staging
/// area), and no sled's generation ever goes back. In the end the rack
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_nexus_instances_never_lose_an_artifact() {
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    let adjust = |config: &mut nexus::config::Config| {
        config.background_tasks.tuf_artifact_replication.followup_delay_millis = 50;
        config.background_tasks.tuf_repo_pruner.nkeep = 2;
    };
    let (rack, factory) = TestRack::with_trust_root(4, adjust).await;
    let mut nexuses = vec![];
    for _ in 0..2 {
        nexuses.push(integration_tests::TestNexus::start_sharing(&rack.nexus.db, adjust).await);
    }
    let slow = nexuses[1].server.nexus().id;
    // Only the slow instance matches; the others in this process pass by.
    fail::cfg("nexus::replication::before_config_push", &format!("return({slow}:300)")).unwrap();
    let rack = Arc::new(rack);
    let nexuses = Arc::new(nexuses);
    let all_nexus = |i: usize| if i == 0 { &rack.nexus } else { &nexuses[i - 1] };

    // Repositories that share artifacts, built ahead of time.
    let mut zips = Vec::new();
    for n in 0..6u64 {
        let mut spec =
            RepoFactory::spec(&format!("{n}.0.0"), &[("shared", 40_000), ("own", 20_000 + n * 1000)], 1);
        spec.artifacts[1].version = format!("{n}.0.0");
        // One seed: the first artifact's bytes are the same in every
        // repository; the second's differ by size.
        zips.push(factory.build(&spec).await);
    }

    // The observer runs until told to stop, checking the invariants.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = {
        let (rack, nexuses, stop) = (rack.clone(), nexuses.clone(), stop.clone());
        tokio::spawn(async move {
            let mut highest: BTreeMap<uuid::Uuid, common::Generation> = BTreeMap::new();
            let (mut observations, mut inconsistent) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let datastore = &rack.nexus.server.nexus().datastore;
                let generation = datastore.tuf_generation_get().await.unwrap();
                let repos = datastore.tuf_repo_list_unpruned_with_artifacts().await.unwrap();
                let staging_dirs: Vec<_> =
                    std::iter::once(&rack.nexus).chain(nexuses.iter()).map(|n| n.staging_dir()).collect();
                let staged = |hash: &common::ArtifactHash| {
                    staging_dirs.iter().any(|dir| dir.join("artifacts").join(hash.to_string()).exists())
                };
                let staged_now: Vec<_> = repos
                    .iter()
                    .flat_map(|r| r.artifacts.iter().map(|a| a.sha256.0))
                    .filter(|hash| staged(hash))
                    .collect();
                let views = rack.views().await;
                for view in &views {
                    let before = highest.insert(view.sled_id, view.generation);
                    assert!(
                        before.is_none_or(|g| g <= view.generation),
                        "sled {} went back from {before:?} to {}",
                        view.sled_id,
                        view.generation
                    );
                }
                // The set of live repositories changed while we looked: this
                // snapshot cannot judge invariant 1.
                if datastore.tuf_generation_get().await.unwrap() != generation {
                    inconsistent += 1;
                    continue;
                }
                for recorded in &repos {
                    for artifact in &recorded.artifacts {
                        let hash = artifact.sha256.0;
                        let on_a_sled =
                            views.iter().any(|view| view.copies.get(&hash).is_some_and(|&n| n > 0));
                        assert!(
                            on_a_sled || staged_now.contains(&hash),
                            "generation {generation}: artifact {hash} of {} has no copy anywhere",
                            recorded.repo.system_version
                        );
                    }
                }
                observations += 1;
            }
            (observations, inconsistent)
        })
    };

    // The slow instance reads the config, then an upload elsewhere moves the
    // generation before it pushes: it must stop, superseded, and undo
    // nothing (the observer watches meanwhile).
    rack.converge(20).await;
    // The stale run gets 1 s to read the config (100 ms was not always
    // enough with the other tests running) and then waits until 3 s, by
    // which the upload below has committed; the rounds after go back to
    // 300 ms.
    fail::cfg("nexus::replication::before_config_push", &format!("return({slow}:3000)")).unwrap();
    let stale_run = tokio::spawn({
        let nexus = nexuses[1].server.nexus().clone();
        async move { nexus.background.activate_and_wait(integration_tests::rack::REPLICATION).await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let (status, body) = upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zips[0]).await;
    assert_eq!(status, 200, "{body}");
    rack.replicate().await;
    let stale = integration_tests::rack::replication_status(&stale_run.await.unwrap());
    assert!(matches!(stale.outcome, ReplicationOutcome::Superseded { .. }), "{:?}", stale.outcome);
    fail::cfg("nexus::replication::before_config_push", &format!("return({slow}:300)")).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut next_zip = 1;
    // RACK_TEST_ROUNDS makes a longer run of the same test.
    let rounds: usize = std::env::var("RACK_TEST_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(24);
    for _round in 0..rounds {
        match rng.random_range(0..4) {
            0 if next_zip < zips.len() => {
                let target = all_nexus(rng.random_range(0..3));
                let (status, body) =
                    upload(&target.external_url(), Some(&target.token), &zips[next_zip]).await;
                assert_eq!(status, 200, "{body}");
                next_zip += 1;
            }
            1 => {
                let target = all_nexus(rng.random_range(0..3));
                target.activate(PRUNER).await;
            }
            _ => {
                // Two or three activations at once, on different instances.
                let mut waits = Vec::new();
                for i in 0..3 {
                    if rng.random_bool(0.7) {
                        waits.push(
                            all_nexus(i)
                                .server
                                .nexus()
                                .background
                                .activate_and_wait(integration_tests::rack::REPLICATION),
                        );
                    }
                }
                futures::future::join_all(waits).await;
            }
        }
    }
    // Finish: every instance replicates until the rack holds exactly the
    // config and no staging area holds anything.
    for _ in 0..40 {
        for i in 0..3 {
            all_nexus(i).activate(integration_tests::rack::REPLICATION).await;
        }
        let staged: usize = (0..3)
            .map(|i| std::fs::read_dir(all_nexus(i).staging_dir().join("artifacts")).unwrap().count())
            .sum();
        let config = rack.config().await;
        if staged == 0 && rack.views().await.iter().all(|view| holds_exactly(view, &config)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (observations, inconsistent) = observer.await.unwrap();
    println!("{observations} consistent observations ({inconsistent} discarded), {next_zip} uploads");
    fail::remove("nexus::replication::before_config_push");
    let config = rack.config().await;
    for view in rack.views().await {
        assert!(holds_exactly(&view, &config), "did not converge: {view:?}");
    }
    assert!(observations > 10, "the observer ran throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_records_every_sled_including_unreachable_ones() {
    let (rack, _factory) = TestRack::with_trust_root(2, |_| {}).await;
    rack.fail_m2(1, 1, M2State::Failed).await;
    // A registered sled that does not answer.
    let ghost = uuid::Uuid::new_v4();
    let registration = nexus::db::model::SledRegistration {
        id: ghost,
        serial: "ghost".into(),
        ip: "127.0.0.1".parse().unwrap(),
        port: 1,
        repo_depot_port: 2,
    };
    rack.nexus.server.nexus().datastore.sled_upsert(&registration).await.unwrap();
    rack.activate("inventory_collection").await;
    let inventory = rack.nexus.server.nexus().datastore.inventory_latest().await.unwrap().unwrap();
    assert_eq!(inventory.sleds.len(), 3);
    let ghost_row = inventory.sleds.iter().find(|s| s.sled_id == ghost).unwrap();
    assert!(ghost_row.error.as_deref().is_some_and(|e| e.contains("127.0.0.1:1")), "{ghost_row:?}");
    let failed =
        inventory.m2s.iter().find(|m2| m2.sled_id == rack.sleds[1].server.sled_id && m2.slot == 1).unwrap();
    assert_eq!(failed.state, "failed");
    assert_eq!(inventory.m2s.len(), 4, "two M.2s for each reachable sled");
}

/// A follow-up asks only the sleds that may have changed: three sleds that
/// hold everything are not sent a config, listing or inventory request by
/// the follow-ups that copy a repository, one artifact at a time, to a
/// third; an operator's activation afterwards asks every sled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_ask_only_sleds_that_may_have_changed() {
    use common::bgtask::details::{RequestOperation, TufArtifactReplicationStatus};
    use integration_tests::rack::{REPLICATION, replication_status, wait_until};
    use std::time::Duration;

    let (mut rack, factory) = TestRack::with_trust_root(3, |config| {
        config.background_tasks.tuf_artifact_replication.ring_buffer_size = 1000;
    })
    .await;
    let artifacts = [("os", 200_000), ("sp", 100_000), ("rot", 50_000), ("bootloader", 20_000)];
    rack.upload_ok(&factory, "1.0.0", &artifacts, 7).await;
    rack.converge(20).await;
    let nexus = rack.nexus.server.nexus().clone();
    let background = &nexus.background;
    let last = async || replication_status(&background.view(REPLICATION).await.unwrap());
    wait_until("the follow-ups of the upload end", Duration::from_secs(20), async || {
        !last().await.followup_scheduled
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One copy at a time: every artifact needs an activation of its own.
    let newcomer = rack
        .add_sled_with(|config| {
            config.copy.max_concurrent = 1;
            config.copy.max_queued = 0;
        })
        .await
        .server
        .sled_id;
    let holders: Vec<_> = rack.sleds[..3].iter().map(|sled| sled.server.sled_id).collect();
    let since = chrono::Utc::now();
    let mut completions = background.completions(REPLICATION).unwrap();
    let explicit = *completions.borrow_and_update();
    let first = rack.replicate().await;
    assert_eq!(first.sleds_known, 0, "an operator's activation asks every sled");
    assert!(first.followup_scheduled, "{first:#?}");

    let config = rack.config().await;
    wait_until("the follow-ups copy everything to the new sled", Duration::from_secs(30), async || {
        let status = last().await;
        !status.followup_scheduled && integration_tests::rack::holds_exactly(&rack.views().await[3], &config)
    })
    .await;
    let done: TufArtifactReplicationStatus = last().await;
    let activations = *completions.borrow_and_update() - explicit;
    assert!(activations >= 1 + artifacts.len() as u64, "one follow-up per copy at least: {activations}");
    assert_eq!(done.sleds_known, 3, "the holders were not asked: {done:#?}");
    let asked = |sled, operation| {
        done.ring.iter().filter(|r| r.time >= since && r.sled_id == sled && r.operation == operation).count()
    };
    for holder in &holders {
        assert_eq!(asked(*holder, RequestOperation::PutConfig), 1, "only by the operator's activation");
        assert_eq!(asked(*holder, RequestOperation::List), 1, "only by the operator's activation");
    }
    assert_eq!(asked(newcomer, RequestOperation::PutConfig) as u64, activations);
    assert_eq!(asked(newcomer, RequestOperation::Copy), artifacts.len());

    let since = chrono::Utc::now();
    let again = rack.replicate().await;
    assert_eq!(again.sleds_known, 0, "an operator's activation asks every sled: {again:#?}");
    let listed = again.ring.iter().filter(|r| r.time >= since && r.operation == RequestOperation::List);
    assert_eq!(listed.count(), 4);
}
