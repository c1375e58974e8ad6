//! Faults: processes killed mid-operation, the database going away, sleds
//! that run out of room, depots that lie. Each test is bounded in time and
//! talks only to loopback.

use common::bgtask::details::{ReplicationOutcome, RequestOperation};
use integration_tests::fake_depot::{Behavior, FakeDepot};
use integration_tests::processes::{NexusProcess, SledProcess, write_nexus_config, write_sled_config};
use integration_tests::rack::{TestRack, holds_exactly, wait_until};
use integration_tests::repos::{RepoFactory, upload};
use integration_tests::{test_config, test_log};
use std::time::Duration;

/// A sled agent killed (SIGKILL) while copies to it are in flight comes back,
/// throws away its partial files, and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_killed_mid_copy_converges_after_restart() {
    let (rack, factory) = TestRack::with_trust_root(3, |_| {}).await;
    let dir = camino_tempfile::tempdir().unwrap();
    let m2 = write_sled_config(dir.path(), &rack.nexus.internal_url());
    let victim = SledProcess::start(dir.path(), None);
    let victim_id = victim.sled_id;
    let datastore = rack.nexus.server.nexus().datastore.clone();
    wait_until("the victim registers", Duration::from_secs(20), async || {
        datastore.sled_get(victim_id).await.is_ok()
    })
    .await;

    let zip = factory
        .build(&RepoFactory::spec("1.0.0", &[("a", 8 << 20), ("b", 8 << 20), ("c", 8 << 20)], 1))
        .await;
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
    rack.replicate().await;
    victim.process.kill_9();

    let victim = SledProcess::start(dir.path(), None);
    let api = victim.api_url.clone();
    let client = victim.client();
    wait_until("the victim re-registers at its new address", Duration::from_secs(20), async || {
        datastore.sled_get(victim_id).await.is_ok_and(|sled| api.ends_with(&format!(":{}", sled.port)))
    })
    .await;
    let config = rack.config().await;
    for _ in 0..30 {
        rack.replicate().await;
        let list = client.artifact_list().await.unwrap().into_inner();
        if config.artifacts.iter().all(|hash| list.list.get(hash) == Some(&2)) && rack.converged().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let list = client.artifact_list().await.unwrap().into_inner();
    assert!(config.artifacts.iter().all(|hash| list.list.get(hash) == Some(&2)), "victim holds {list:?}");
    wait_until("copies still in flight finish", Duration::from_secs(30), async || {
        m2.iter().all(|m2| std::fs::read_dir(m2.join("artifacts/tmp")).unwrap().count() == 0)
    })
    .await;
    for m2 in &m2 {
        for entry in std::fs::read_dir(m2.join("artifacts")).unwrap().flatten().filter(|e| e.path().is_file())
        {
            use sha2::Digest;
            let bytes = std::fs::read(entry.path()).unwrap();
            assert_eq!(
                hex(&sha2::Sha256::digest(&bytes)),
                entry.file_name().to_str().unwrap(),
                "a wrong file"
            );
        }
    }
    victim.process.kill_9();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Nexus killed during an upload leaves no rows and no staged files after
/// its restart; killed after an upload but before replication, its restart
/// recovers the staged files and replication converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_killed_mid_upload_and_before_replication() {
    let db = test_harness::TestDatabase::new().await;
    let dir = camino_tempfile::tempdir().unwrap();
    let write_config = |replication_disabled: bool| {
        write_nexus_config(dir.path(), db.url(), |text| {
            text.replace(
                "[background_tasks.tuf_artifact_replication]\nperiod_secs = 3600\ndisabled = false",
                &format!("[background_tasks.tuf_artifact_replication]\nperiod_secs = 3600\ndisabled = {replication_disabled}"),
            )
        })
    };
    write_config(true);
    let nexus = NexusProcess::start(dir.path(), None);
    let (external, token) = (nexus.external_url.clone(), nexus.token.clone());
    let factory = RepoFactory::new().await;
    nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();

    // Kill Nexus with half the upload sent.
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 16 << 20)], 1)).await;
    let bytes = std::fs::read(&zip).unwrap();
    use futures::StreamExt;
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
    let first = bytes[..bytes.len() / 2].to_vec();
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
        futures::stream::once(async move {
            let _ = sent_tx.send(());
            std::future::pending::<Result<Vec<u8>, std::io::Error>>().await
        }),
    );
    let upload_url = format!("{external}/v1/system/update/repositories?file_name=repo.zip");
    let request = tokio::spawn(
        reqwest::Client::new()
            .put(upload_url)
            .bearer_auth(&token)
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    sent_rx.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    nexus.process.kill_9();
    assert!(request.await.unwrap().is_err(), "the upload cannot have succeeded");
    let uploads = dir.path().join("staging/uploads");
    assert!(std::fs::read_dir(&uploads).unwrap().count() > 0, "the killed upload left its directory");

    let nexus = NexusProcess::start(dir.path(), None);
    let (external, internal) = (nexus.external_url.clone(), nexus.internal_url.clone());
    let datastore = nexus::db::DataStore::connect(db.url(), &Default::default()).await.unwrap();
    assert!(datastore.tuf_repo_list_unpruned().await.unwrap().is_empty(), "no rows");
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0, "no upload leftovers");
    assert_eq!(
        std::fs::read_dir(dir.path().join("staging/artifacts")).unwrap().count(),
        0,
        "no staged leftovers"
    );

    // A complete upload; Nexus dies before replicating (it is disabled).
    let mut sleds = Vec::new();
    for _ in 0..3 {
        sleds.push(integration_tests::TestSled::start(&internal).await);
    }
    let (status, body) = upload(&external, Some(&token), &zip).await;
    assert_eq!(status, 200, "{body}");
    nexus.process.kill_9();

    write_config(false);
    let nexus = NexusProcess::start(dir.path(), None);
    let internal_client = nexus.internal_client();
    let wanted = datastore.tuf_artifact_config().await.unwrap();
    let request = common::api::nexus_internal::BackgroundTasksActivateRequest {
        bgtask_names: ["tuf_artifact_replication".to_string()].into(),
    };
    wait_until("the recovered repository replicates", Duration::from_secs(60), async || {
        let _ = internal_client.bgtask_activate(&request).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut all = true;
        for sled in &sleds {
            all &= holds_exactly(&integration_tests::rack::sled_view(sled).await, &wanted);
        }
        all
    })
    .await;
    nexus.process.kill_9();
}

/// PostgreSQL stops and starts again under a running Nexus: activations in
/// between report the error; the next one after works; Nexus is not
/// restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_is_survived_without_restarting_nexus() {
    let mut postgres = test_harness::PgServer::start().await.unwrap();
    let url = postgres.create_database("rack").await.unwrap();
    let mut conn =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&url).await.unwrap();
    nexus::db::schema_version::upgrade(&mut conn).await.unwrap();
    drop(conn);
    let dir = camino_tempfile::tempdir().unwrap();
    let server = nexus::server::Server::start(&test_config(&url, dir.path()), test_log()).await.unwrap();
    let driver = &server.nexus().background;
    let status = |task: &common::bgtask::BackgroundTask| integration_tests::rack::replication_status(task);
    assert_eq!(
        status(&driver.activate_and_wait("tuf_artifact_replication").await.unwrap()).outcome,
        ReplicationOutcome::Completed
    );

    postgres.pause();
    let down = status(&driver.activate_and_wait("tuf_artifact_replication").await.unwrap());
    let ReplicationOutcome::Error { message } = &down.outcome else { panic!("expected an error: {down:?}") };
    assert!(message.contains("database"), "{message}");

    postgres.resume().await.unwrap();
    let up = status(&driver.activate_and_wait("tuf_artifact_replication").await.unwrap());
    assert_eq!(up.outcome, ReplicationOutcome::Completed, "{up:?}");
    server.shutdown().await;
}

/// A sled with no room refuses with 507; replication reports it and the
/// other sleds are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sled_is_reported_and_does_not_hold_back_the_others() {
    let (mut rack, factory) = TestRack::with_trust_root(2, |_| {}).await;
    rack.add_sled_with(|config| config.storage.artifact_quota_bytes = 100 * 1024).await;
    let full = rack.sleds[2].server.sled_id;
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 400 * 1024)], 1)).await;
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
    let status = rack.replicate().await;
    assert!(status.lifetime.put_err + status.lifetime.copy_err >= 1, "{:?}", status.lifetime);
    let refusal = status
        .ring
        .iter()
        .find(|r| r.sled_id == full && matches!(r.operation, RequestOperation::Put | RequestOperation::Copy))
        .expect("the request to the full sled is recorded");
    let error = refusal.error.as_deref().unwrap();
    assert!(error.contains("507") && error.contains("is full"), "{error}");
    let config = rack.config().await;
    wait_until("the other sleds hold everything", Duration::from_secs(10), async || {
        rack.views().await.iter().filter(|view| view.sled_id != full).all(|view| holds_exactly(view, &config))
    })
    .await;
    // Health is judged by an activation; copies finish after theirs.
    rack.replicate().await;
    let repo = rack.nexus.external_client().repository_view("1.0.0").await.unwrap().into_inner();
    assert_eq!(repo.replication.unwrap().sleds_complete, 2);
}

/// Pipelined replication PUTs each artifact to one sled. When that sled
/// refuses (full), the chain behind it is not left waiting for the next
/// activation: the next sled of the chain gets the PUT instead. Ten
/// artifacts, each with a random head, on a full sled and a good one: the
/// full sled heads some chain unless every draw missed it (1 in 1,024).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_head_refuses_is_filled_by_a_put_to_the_next_sled() {
    let (mut rack, factory) = TestRack::with_trust_root(1, |config| {
        config.background_tasks.tuf_artifact_replication.followup_delay_millis = 600_000;
    })
    .await;
    rack.add_sled_with(|config| config.storage.artifact_quota_bytes = 100 * 1024).await;
    let (good, full) = (rack.sleds[0].server.sled_id, rack.sleds[1].server.sled_id);
    let names: Vec<String> = (0..10).map(|n| format!("artifact-{n}")).collect();
    let artifacts: Vec<(&str, u64)> = names.iter().map(|name| (name.as_str(), 200 * 1024)).collect();
    let zip = factory.build(&RepoFactory::spec("1.0.0", &artifacts, 1)).await;
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);

    let status = rack.replicate().await;
    let refused_puts: Vec<_> = status
        .ring
        .iter()
        .filter(|r| r.sled_id == full && r.operation == RequestOperation::Put && r.error.is_some())
        .collect();
    assert!(!refused_puts.is_empty(), "the full sled headed no chain: {:#?}", status.ring);
    for refused in refused_puts {
        assert!(
            status.ring.iter().any(|r| r.sled_id == good
                && r.operation == RequestOperation::Put
                && r.hash == refused.hash
                && r.error.is_none()),
            "{:?} was not PUT to the good sled after the full one refused it: {:#?}",
            refused.hash,
            status.ring
        );
    }
    let config = rack.config().await;
    wait_until("the good sled holds everything after one activation", Duration::from_secs(10), async || {
        rack.views().await.iter().filter(|view| view.sled_id == good).all(|view| holds_exactly(view, &config))
    })
    .await;
}

/// Every holder's depot serves wrong bytes: a new sled accepts each copy
/// (the source answered 200), then the copy fails on the sled. The sled
/// reports the failures; Nexus backs off for those (sled, artifact) pairs
/// and schedules no follow-up for work that cannot progress (before, each
/// accepted copy counted as progress and the rack was re-activated every
/// follow-up delay, forever). Once the depots are honest again, the back-off
/// expires and the new sled converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_that_keep_failing_back_off_and_heal_once_sources_are_honest() {
    let (mut rack, factory) = TestRack::with_trust_root(2, |config| {
        config.background_tasks.tuf_artifact_replication.backoff_base_millis = 3000;
        config.background_tasks.tuf_artifact_replication.allow_fewer_sleds = true;
    })
    .await;
    let artifacts: Vec<(String, u64)> = (0..4).map(|n| (format!("part{n}"), 30_000 + n)).collect();
    let names: Vec<(&str, u64)> = artifacts.iter().map(|(name, size)| (name.as_str(), *size)).collect();
    let zip = factory.build(&RepoFactory::spec("1.0.0", &names, 1)).await;
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
    rack.converge(20).await;
    let config = rack.config().await;

    // Both holders' registrations point at a depot that lies.
    let liar = FakeDepot::start(vec![0u8; 30_000], Behavior::WrongBytes(vec![0u8; 30_000])).await;
    let datastore = rack.nexus.server.nexus().datastore.clone();
    let keep_lying = redirect_depots(&rack, &[0, 1], &liar).await;
    let newcomer = rack.add_sled().await.server.sled_id;
    let client = rack.sleds[2].client();
    wait_until("the newcomer reports every copy failed", Duration::from_secs(20), async || {
        rack.replicate().await;
        let listed = client.artifact_list().await.unwrap().into_inner();
        listed.copies_in_flight.is_empty() && listed.copy_failures.len() == config.artifacts.len()
    })
    .await;
    assert!(liar.served_bytes() > 0, "the lying depot served the copies");

    let failed = rack.replicate().await;
    assert!(failed.lifetime.copy_failed_on_sled >= config.artifacts.len() as u64, "{:?}", failed.lifetime);
    assert_eq!(failed.last_run.copy_ok, 0, "no copy is asked for again while backing off");
    assert_eq!(failed.last_run.skipped_backoff, config.artifacts.len() as u64);
    assert!(!failed.followup_scheduled, "nothing can progress: no follow-up");
    assert_eq!(failed.backoff.len(), config.artifacts.len());
    for backoff in &failed.backoff {
        assert_eq!(backoff.sled_id, newcomer);
        assert!(backoff.failures >= 1 && backoff.last_error.contains("sha256"), "{backoff:?}");
    }
    assert!(
        failed
            .ring
            .iter()
            .any(|r| r.operation == RequestOperation::CopyFailedOnSled && r.sled_id == newcomer)
    );
    let again = rack.replicate().await;
    assert_eq!((again.last_run.copy_failed_on_sled, again.last_run.copy_ok), (0, 0), "a report counts once");

    keep_lying.abort();
    let honest = rack.sleds[0].depot_url();
    wait_until("the holders re-register their real depots", Duration::from_secs(10), async || {
        let row = datastore.sled_get(rack.sleds[0].server.sled_id).await.unwrap();
        honest.ends_with(&format!(":{}", row.repo_depot_port))
    })
    .await;
    wait_until("the back-off expires and the newcomer converges", Duration::from_secs(30), async || {
        rack.replicate().await;
        rack.converged().await
    })
    .await;
    assert!(rack.replicate().await.backoff.is_empty(), "a sled that holds the artifact leaves back-off");
}

/// A copy still running on a sled is work that remains: the activation that
/// sees it in flight schedules a follow-up even though it sent nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_running_on_sleds_keep_follow_ups_coming() {
    let (mut rack, factory) = TestRack::with_trust_root(1, |config| {
        config.background_tasks.tuf_artifact_replication.allow_fewer_sleds = true;
    })
    .await;
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 200_000)], 1)).await;
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
    rack.converge(20).await;
    let stalling = FakeDepot::start(vec![0u8; 200_000], Behavior::StallAfter(1000)).await;
    let keep_lying = redirect_depots(&rack, &[0], &stalling).await;
    // The newcomer's copy reads from the stalling depot for its read timeout.
    rack.add_sled_with(|config| config.copy.read_timeout_secs = 5).await;
    // The copy is sent by this activation, or by one the newcomer's
    // registration set off just before it: either way, once.
    let first = rack.replicate().await;
    assert_eq!(first.lifetime.copy_ok, 1, "{first:?}");
    let second = rack.replicate().await;
    assert_eq!((second.last_run.copy_ok, second.last_run.put_ok), (0, 0), "nothing new was sent");
    assert_eq!(second.copies_in_flight, 1, "{second:?}");
    assert!(second.followup_scheduled, "a copy in flight needs a look when it ends");
    keep_lying.abort();
}

/// Issue #20: a sled that refuses a copy because its copy slots are full is
/// busy, not failing. Between the activation's listing and its requests
/// (a failpoint delay), the test fills the newcomer's only copy slot with a
/// copy from a stalling depot; Nexus's copies to it are then refused 503
/// with Retry-After through every retry. They must not back off (before,
/// each counted as a failure and the sled was not asked again for up to
/// `backoff_max`); a follow-up is scheduled, and the rack converges once the
/// slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_busy_with_copies_is_asked_again_not_backed_off() {
    let (mut rack, factory) = TestRack::with_trust_root(2, |config| {
        config.background_tasks.tuf_artifact_replication.allow_fewer_sleds = true;
        config.background_tasks.tuf_artifact_replication.backoff_base_millis = 200;
    })
    .await;
    let names: Vec<(String, u64)> = (0..3).map(|n| (format!("busy{n}"), 40_000 + n)).collect();
    let names: Vec<(&str, u64)> = names.iter().map(|(name, size)| (name.as_str(), *size)).collect();
    rack.upload_ok(&factory, "1.0.0", &names, 5).await;
    rack.converge(20).await;
    let config = rack.config().await;
    let newcomer = rack
        .add_sled_with(|config| {
            config.copy.max_concurrent = 1;
            config.copy.max_queued = 0;
            config.copy.read_timeout_secs = 10;
        })
        .await;
    let (newcomer_id, client) = (newcomer.server.sled_id, newcomer.client());
    let stalling = FakeDepot::start(vec![0u8; 40_000], Behavior::StallAfter(1000)).await;
    // The planner sends the one copy the slot allows for the first hash.
    let occupied = *config.artifacts.iter().next_back().unwrap();

    let nexus_id = rack.nexus.server.nexus().id;
    fail::cfg("nexus::replication::before_execute", &format!("1*return({nexus_id}:4000)")).unwrap();
    let fill_the_slot = async {
        wait_until("the newcomer has the config", Duration::from_secs(10), async || {
            client.artifact_config_get().await.is_ok_and(|c| c.into_inner().generation == config.generation)
        })
        .await;
        // The listing follows the config push at once, but under the whole
        // suite's load "at once" was once more than 700 ms; filling the
        // slot before it would show the slot taken, and nothing would be
        // sent to be refused. The execute delay leaves 4 s for this.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let body = common::api::sled_agent::ArtifactCopyFromDepotBody {
            depot_base_url: stalling.base_url(),
            alternates: Vec::new(),
            fallback: None,
        };
        client.artifact_copy_from_depot(&occupied, config.generation.get(), &body).await.unwrap();
    };
    let (status, ()) = tokio::join!(rack.replicate(), fill_the_slot);
    fail::remove("nexus::replication::before_execute");

    // The failpoint delays the first activation to reach it: the test's
    // own, or a follow-up of the convergence above that fired just before
    // it, after which the test's own finds the slot taken (deferred). The
    // ring and the lifetime counters hold what either did.
    assert!(status.lifetime.busy >= 1, "{:?}", status.lifetime);
    assert!(
        status.ring.iter().any(|r| r.sled_id == newcomer_id
            && r.error.as_deref().is_some_and(|e| e.contains("still busy"))),
        "{:#?}",
        status.ring
    );
    assert!(
        status.backoff.iter().all(|backoff| backoff.sled_id != newcomer_id),
        "busy is not failure: {:#?}",
        status.backoff
    );
    assert!(status.followup_scheduled, "a busy sled is asked again");
    wait_until("the newcomer converges once its slot frees", Duration::from_secs(40), async || {
        rack.replicate().await;
        rack.views().await.iter().all(|view| holds_exactly(view, &config))
    })
    .await;
}

/// Points the registrations of the given sleds at `depot` and keeps them
/// there (their agents re-register every second) until the handle is
/// aborted.
async fn redirect_depots(rack: &TestRack, sleds: &[usize], depot: &FakeDepot) -> tokio::task::JoinHandle<()> {
    let datastore = rack.nexus.server.nexus().datastore.clone();
    let mut lies = Vec::new();
    for &index in sleds {
        let row = datastore.sled_get(rack.sleds[index].server.sled_id).await.unwrap();
        lies.push(nexus::db::model::SledRegistration {
            id: row.id,
            serial: row.serial.clone(),
            ip: row.ip.parse().unwrap(),
            port: row.port as u16,
            repo_depot_port: depot.address.port(),
        });
    }
    tokio::spawn(async move {
        loop {
            for lie in &lies {
                datastore.sled_upsert(lie).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}
