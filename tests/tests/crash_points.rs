//! Crash points: the real `nexus` and `sled-agent` binaries die (abort, as
//! in a power cut of the process: no destructor, no cleanup) at each named
//! failpoint of the upload, of replication, of the sled's artifact store and
//! of its config ledger. After a restart every DESIGN §10 invariant must
//! hold, and the rack must converge without manual steps:
//!
//! - an upload that crashed before its COMMIT left no repository, no staged
//!   file, no upload directory, and the generation did not move; one that
//!   crashed after it left every artifact staged and intact (invariant 1);
//! - no file under an artifact name on any M.2 is partial or wrong
//!   (invariant 3), and no temp file survives the restart;
//! - a sled's generation after the restart is not older than the one it
//!   acknowledged before (invariant 2).
//!
//! Each point is configured through `FAILPOINTS` as `NAME=return`, which the
//! binaries (built with the `failpoints` feature by `cargo test
//! --workspace`) turn into `std::process::abort()`.

use common::{ArtifactConfig, ArtifactHash, Generation};
use integration_tests::processes::{NexusProcess, SledProcess, write_nexus_config, write_sled_config};
use integration_tests::rack::{TestRack, holds_exactly, sled_view, wait_until};
use integration_tests::repos::{RepoFactory, try_upload, upload};
use sha2::Digest;
use std::time::Duration;

const UPLOAD_POINTS: [(&str, bool); 3] = [
    ("nexus::upload::after_receive", false),
    ("nexus::upload::after_staging", false),
    ("nexus::upload::after_insert", true),
];

/// Nexus dies at each upload crash point. Before the COMMIT nothing of the
/// upload survives; after it, the repository's bytes are staged and intact
/// and the restarted Nexus replicates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_crashing_during_an_upload_keeps_all_or_nothing() {
    let factory = RepoFactory::new().await;
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 2 << 20), ("sp", 300_000)], 1)).await;
    for (point, committed) in UPLOAD_POINTS {
        let db = test_harness::TestDatabase::new().await;
        let dir = camino_tempfile::tempdir().unwrap();
        write_nexus_config(dir.path(), db.url(), |text| {
            text.replace("allow_fewer_sleds = false", "allow_fewer_sleds = true")
                .replace("min_sled_replication = 3", "min_sled_replication = 2")
        });
        let nexus = NexusProcess::start(dir.path(), Some(&format!("{point}=return")));
        nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
        let datastore = nexus::db::DataStore::connect(db.url(), &Default::default()).await.unwrap();
        let generation_before = datastore.tuf_generation_get().await.unwrap();
        let url = nexus.external_url.clone();
        let token = nexus.token.clone();
        let zip = zip.clone();
        let answered = tokio::spawn(async move {
            let body = tokio::fs::File::open(&zip).await.unwrap();
            reqwest::Client::new()
                .put(format!("{url}/v1/system/update/repositories?file_name=repo.zip"))
                .bearer_auth(token)
                .body(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(body)))
                .send()
                .await
        });
        nexus.process.wait_for_crash(point);
        assert!(answered.await.unwrap().is_err(), "{point}: the upload was never acknowledged");

        let nexus = NexusProcess::start(dir.path(), None);
        let staging = dir.path().join("staging");
        let repos = datastore.tuf_repo_list_unpruned_with_artifacts().await.unwrap();
        assert_eq!(std::fs::read_dir(staging.join("uploads")).unwrap().count(), 0, "{point}: upload dir");
        if !committed {
            assert!(repos.is_empty(), "{point}: no repository");
            assert_eq!(datastore.tuf_generation_get().await.unwrap(), generation_before, "{point}");
            assert_eq!(std::fs::read_dir(staging.join("artifacts")).unwrap().count(), 0, "{point}: staged");
            continue;
        }
        assert_eq!(repos.len(), 1, "{point}: the committed repository is recorded");
        for artifact in &repos[0].artifacts {
            let path = staging.join("artifacts").join(artifact.sha256.0.to_string());
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{point}: staged {path}: {e}"));
            assert_eq!(
                ArtifactHash(sha2::Sha256::digest(&bytes).into()),
                artifact.sha256.0,
                "{point}: {path}"
            );
        }
        let sleds = [
            integration_tests::TestSled::start(&nexus.internal_url).await,
            integration_tests::TestSled::start(&nexus.internal_url).await,
        ];
        converge_through(&nexus, &datastore, &sleds).await;
        nexus.process.kill_9();
    }
}

/// Nexus dies in an activation: between reading the config and pushing it,
/// and right after its first PUT completed (copies from that sled possibly
/// under way). The restarted Nexus recovers the staged repository and
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_crashing_mid_replication_recovers_and_converges() {
    // Between reading the config and pushing it: nothing placed yet.
    crash_mid_replication("nexus::replication::after_config_read", false).await;
    // Between a PUT and the copies that follow it.
    crash_mid_replication("nexus::replication::after_a_put", true).await;
}

async fn crash_mid_replication(point: &str, placed_before_the_crash: bool) {
    let db = test_harness::TestDatabase::new().await;
    let dir = camino_tempfile::tempdir().unwrap();
    write_nexus_config(dir.path(), db.url(), |text| {
        text.replace("min_sled_replication = 3", "min_sled_replication = 1")
    });
    let nexus = NexusProcess::start(dir.path(), Some(&format!("{point}=return")));
    let sleds = [
        integration_tests::TestSled::start(&nexus.internal_url).await,
        integration_tests::TestSled::start(&nexus.internal_url).await,
        integration_tests::TestSled::start(&nexus.internal_url).await,
    ];
    let datastore = nexus::db::DataStore::connect(db.url(), &Default::default()).await.unwrap();
    wait_until("the sleds register", Duration::from_secs(20), async || {
        datastore.sled_list().await.unwrap().len() == sleds.len()
    })
    .await;
    let factory = RepoFactory::new().await;
    nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 1 << 20)], 2)).await;
    // The upload activates replication after its COMMIT, and the activation
    // may reach the point (and kill Nexus) before the answer is written: a
    // lost answer is allowed, a refusal is not.
    match try_upload(&nexus.external_url, Some(&nexus.token), &zip).await {
        Ok((status, body)) => assert_eq!(status, 200, "{body}"),
        Err(lost) => assert!(!placed_before_the_crash, "{point}: the answer was lost: {lost}"),
    }
    nexus.process.wait_for_crash(point);
    datastore.tuf_repo_get_by_version("1.0.0").await.expect("recorded before replication ran");
    let holders = count_holders(&sleds, &datastore).await;
    if placed_before_the_crash {
        assert!(holders >= 1, "{point}: the PUT landed before the crash");
    } else {
        assert_eq!(holders, 0, "{point}: nothing was placed before the crash");
    }

    let nexus = NexusProcess::start(dir.path(), None);
    converge_through(&nexus, &datastore, &sleds).await;
}

/// How many sleds hold every artifact of the config.
async fn count_holders(sleds: &[integration_tests::TestSled], datastore: &nexus::db::DataStore) -> usize {
    let config = datastore.tuf_artifact_config().await.unwrap();
    let mut holders = 0;
    for sled in sleds {
        let view = sled_view(sled).await;
        holders += usize::from(config.artifacts.iter().all(|hash| view.copies.contains_key(hash)));
    }
    holders
}

/// Activates replication through the internal API until every sled holds
/// exactly the config and nothing is left staged.
async fn converge_through(
    nexus: &NexusProcess,
    datastore: &nexus::db::DataStore,
    sleds: &[integration_tests::TestSled],
) {
    let wanted = datastore.tuf_artifact_config().await.unwrap();
    let client = nexus.internal_client();
    let request = common::api::nexus_internal::BackgroundTasksActivateRequest {
        bgtask_names: ["tuf_artifact_replication".to_string()].into(),
    };
    wait_until("the rack converges", Duration::from_secs(60), async || {
        let _ = client.bgtask_activate(&request).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut all = true;
        for sled in sleds {
            all &= holds_exactly(&sled_view(sled).await, &wanted);
        }
        all
    })
    .await;
}

/// Sled crash points: in the artifact store's write path (after the temp
/// write, before the rename, after the rename and before the directory
/// fsync) and in the config ledger write (before, and after one device's
/// copy is durable).
const SLED_POINTS: [&str; 5] = [
    "sled_agent::store::after_temp_write",
    "sled_agent::store::before_rename",
    "sled_agent::store::after_rename",
    "sled_agent::ledger::before_write",
    "sled_agent::ledger::after_write",
];

/// A sled agent dies at each crash point while Nexus replicates to it. After
/// a restart it holds no partial or wrong file under an artifact name and no
/// temp file, its generation is not older than the one it acknowledged, and
/// it converges with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_crashing_in_its_store_or_ledger_comes_back_consistent() {
    for point in SLED_POINTS {
        let (rack, factory) = TestRack::with_trust_root(2, |config| {
            config.background_tasks.tuf_artifact_replication.min_sled_replication = 3;
        })
        .await;
        let dir = camino_tempfile::tempdir().unwrap();
        let m2s = write_sled_config(dir.path(), &rack.nexus.internal_url());
        let victim = SledProcess::start(dir.path(), Some(&format!("{point}=return")));
        let victim_id = victim.sled_id;
        let datastore = rack.nexus.server.nexus().datastore.clone();
        wait_until("the victim registers", Duration::from_secs(20), async || {
            datastore.sled_get(victim_id).await.is_ok()
        })
        .await;
        // Three sleds, minimum three: the victim gets a PUT (and a config).
        let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 1 << 20), ("sp", 200_000)], 3)).await;
        assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
        let uploaded = rack.config().await;
        let acknowledged = uploaded.generation;
        let replicating = tokio::spawn({
            let nexus = rack.nexus.server.nexus().clone();
            async move { nexus.background.activate_and_wait("tuf_artifact_replication").await }
        });
        victim.process.wait_for_crash(point);
        replicating.await.unwrap().unwrap();

        let victim = SledProcess::start(dir.path(), None);
        assert_no_wrong_artifact_files(point, &m2s, &uploaded);
        let generation = victim.client().artifact_list().await.unwrap().into_inner().generation;
        let ledger_written_before_crash = point != "sled_agent::ledger::before_write";
        if ledger_written_before_crash {
            assert_eq!(generation, acknowledged, "{point}: the durable ledger copy survived");
        } else {
            assert!(generation < acknowledged, "{point}: the config was never written");
        }
        wait_until("the victim re-registers", Duration::from_secs(20), async || {
            datastore
                .sled_get(victim_id)
                .await
                .is_ok_and(|sled| victim.api_url.ends_with(&format!(":{}", sled.port)))
        })
        .await;
        let wanted = rack.config().await;
        wait_until("the rack converges", Duration::from_secs(60), async || {
            rack.replicate().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let view = integration_tests::rack::sled_view_at(&victim.api_url).await;
            holds_exactly(&view, &wanted) && rack.converged().await
        })
        .await;
        assert_no_wrong_artifact_files(point, &m2s, &wanted);
        let generation_now = victim.client().artifact_list().await.unwrap().into_inner().generation;
        assert!(generation_now >= Generation::max(generation, acknowledged), "{point}");
        victim.process.kill_9();
    }
}

/// Invariant 3 on disk, and no temp file left after a restart except a
/// crashed copy's partial (`<sha256>.copy`, kept so the next copy continues
/// it) of an artifact the sled was told to hold.
fn assert_no_wrong_artifact_files(point: &str, m2s: &[camino::Utf8PathBuf], wanted: &ArtifactConfig) {
    for m2 in m2s {
        for entry in std::fs::read_dir(m2.join("artifacts/tmp")).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let partial_of_wanted = name
                .strip_suffix(".copy")
                .and_then(|hash| hash.parse::<ArtifactHash>().ok())
                .is_some_and(|hash| wanted.artifacts.contains(&hash));
            assert!(partial_of_wanted, "{point}: temp file {m2}/artifacts/tmp/{name} survived the restart");
        }
        for entry in std::fs::read_dir(m2.join("artifacts")).unwrap().flatten() {
            if !entry.file_type().unwrap().is_file() {
                continue;
            }
            let name = entry.file_name().into_string().unwrap();
            let bytes = std::fs::read(entry.path()).unwrap();
            let actual = ArtifactHash(sha2::Sha256::digest(&bytes).into()).to_string();
            assert_eq!(actual, name, "{point}: {m2}/artifacts/{name} holds other bytes");
        }
    }
}
