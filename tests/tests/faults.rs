//! Faults: processes killed mid-operation, the database going away, sleds
//! that run out of room, depots that lie. Each test is bounded in time and
//! talks only to loopback.

use common::bgtask::details::{ReplicationOutcome, RequestOperation};
use integration_tests::fake_depot::{Behavior, FakeDepot};
use integration_tests::rack::{TestRack, holds_exactly, wait_until};
use integration_tests::repos::{RepoFactory, upload};
use integration_tests::{binary, test_config, test_log};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts a binary and returns it with the first `lines` lines it printed.
fn spawn_reading(program: &str, config: &std::path::Path, lines: usize) -> (Child, Vec<String>) {
    let mut child = Command::new(binary(program))
        .arg("--config")
        .arg(config)
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut printed = Vec::new();
    for _ in 0..lines {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        printed.push(line.trim().to_string());
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    (child, printed)
}

fn kill_9(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn after<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {lines:?}"))
}

/// A sled agent killed (SIGKILL) while copies to it are in flight comes back,
/// throws away its partial files, and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_killed_mid_copy_converges_after_restart() {
    let (rack, factory) = TestRack::with_trust_root(3, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let m2 = [dir.path().join("m2-0"), dir.path().join("m2-1")];
    let config =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/sled-agent/config.toml"))
            .unwrap()
            .replace("127.0.0.1:12345", "127.0.0.1:0")
            .replace("127.0.0.1:12346", "127.0.0.1:0")
            .replace("http://127.0.0.1:12221", &rack.nexus.internal_url())
            .replace("registration_period_secs = 30", "registration_period_secs = 1")
            .replace(
                "# m2_dirs = [\"/var/tmp/sled0/m2-0\", \"/var/tmp/sled0/m2-1\"]   # temp dirs if absent",
                &format!("m2_dirs = [{:?}, {:?}]", m2[0], m2[1]),
            );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let (mut victim, printed) = spawn_reading("sled-agent", &config_path, 2);
    let victim_id: uuid::Uuid = printed[0].split_whitespace().nth(1).unwrap().parse().unwrap();
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
    kill_9(&mut victim);

    let (mut victim, printed) = spawn_reading("sled-agent", &config_path, 2);
    let api = after(&printed, "sled-agent API: ").to_string();
    let client = integration_tests::sled_agent_client::Client::new(&api);
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
    kill_9(&mut victim);
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
    let mut config = test_config(db.url(), dir.path());
    config.background_tasks.tuf_artifact_replication.disabled = true;
    let write_config = |replication_disabled: bool| {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/nexus/config.toml"))
            .unwrap()
            .replace("127.0.0.1:12221", "127.0.0.1:0")
            .replace("127.0.0.1:12220", "127.0.0.1:0")
            .replace("/var/tmp/rack/nexus", dir.path().as_str())
            .replace("postgresql://postgres@127.0.0.1:5432/rack", db.url())
            .replace(
                "[background_tasks.tuf_artifact_replication]\nperiod_secs = 60\ndisabled = false",
                &format!("[background_tasks.tuf_artifact_replication]\nperiod_secs = 60\ndisabled = {replication_disabled}"),
            );
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let config_path = write_config(true);
    let (mut nexus, printed) = spawn_reading("nexus", config_path.as_std_path(), 2);
    let external = after(&printed, "nexus external API: ").to_string();
    let token = std::fs::read_to_string(dir.path().join("operator-token")).unwrap();
    let factory = RepoFactory::new().await;
    let client = integration_tests::external_client::authenticated(&external, &token);
    client.trust_root_create(&factory.root_json()).await.unwrap();

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
    kill_9(&mut nexus);
    assert!(request.await.unwrap().is_err(), "the upload cannot have succeeded");
    let uploads = dir.path().join("staging/uploads");
    assert!(std::fs::read_dir(&uploads).unwrap().count() > 0, "the killed upload left its directory");

    let (mut nexus, printed) = spawn_reading("nexus", config_path.as_std_path(), 2);
    let external = after(&printed, "nexus external API: ").to_string();
    let internal = after(&printed, "nexus internal API: ").to_string();
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
    kill_9(&mut nexus);

    let config_path = write_config(false);
    let (mut nexus, printed) = spawn_reading("nexus", config_path.as_std_path(), 2);
    let internal = after(&printed, "nexus internal API: ").to_string();
    let internal_client = common::clients::nexus_internal::Client::new(&internal);
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
    kill_9(&mut nexus);
    drop(config);
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
    let views = rack.views().await;
    for view in views.iter().filter(|view| view.sled_id != full) {
        assert!(holds_exactly(view, &config), "{view:?}");
    }
    let repo = rack.nexus.external_client().repository_view("1.0.0").await.unwrap().into_inner();
    assert_eq!(repo.replication.unwrap().sleds_complete, 2);
}

/// A sled whose depot serves wrong bytes: copies from it store nothing, and
/// later activations heal the target from an honest sled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_from_a_lying_depot_are_healed_from_another_source() {
    let (mut rack, factory) = TestRack::with_trust_root(3, |_| {}).await;
    let artifacts: Vec<(String, u64)> = (0..6).map(|n| (format!("part{n}"), 30_000 + n)).collect();
    let names: Vec<(&str, u64)> = artifacts.iter().map(|(name, size)| (name.as_str(), *size)).collect();
    let zip = factory.build(&RepoFactory::spec("1.0.0", &names, 1)).await;
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
    rack.converge(20).await;

    // Sled 0's registration now points at a depot that lies.
    let liar = FakeDepot::start(vec![0u8; 30_000], Behavior::WrongBytes(vec![0u8; 30_000])).await;
    let datastore = rack.nexus.server.nexus().datastore.clone();
    let sled = datastore.sled_get(rack.sleds[0].server.sled_id).await.unwrap();
    let registration = nexus::db::model::SledRegistration {
        id: sled.id,
        serial: sled.serial.clone(),
        ip: sled.ip.parse().unwrap(),
        port: sled.port as u16,
        repo_depot_port: liar.address.port(),
    };
    // Its agent re-registers every second; keep the lie in place meanwhile.
    let keep_lying = {
        let datastore = datastore.clone();
        let registration = registration.clone();
        tokio::spawn(async move {
            loop {
                datastore.sled_upsert(&registration).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    rack.add_sled().await;
    rack.converge(40).await;
    keep_lying.abort();
    println!("the lying depot served {} bytes", liar.served_bytes());
}
