//! A real power cut (DESIGN §11, ARCHITECTURE invariant 6): Nexus's token
//! and staging area and every sled's two M.2s live on `power-cut-fs`, a FUSE
//! file system in this test process that forgets whatever was not fsynced
//! when the power goes. The real `nexus` and `sled-agent` binaries upload
//! and replicate; then every one of them is killed, the power is cut
//! (unmount, revert, mount: no kernel cache survives either), and they
//! start again. Afterwards:
//!
//! - Nexus is the same Nexus (its id) with the same operator token;
//! - every sled is the same sled (its id survived) and is not back at an
//!   older generation than it acknowledged;
//! - every copy a sled listed before the cut is still listed, on as many
//!   M.2s;
//! - every repository answered 200 has each artifact on a sled or staged
//!   intact on Nexus, and the rack converges to hold all of them.
//!
//! The database is not on the cut file system: its durability is
//! PostgreSQL's own (its WAL fsync), not this code's.
//!
//! `a_missing_artifact_fsync_is_caught` runs the same scenario with the
//! sleds' artifact fsync switched off (a failpoint) and expects the checks
//! to fail: this test can see a missing fsync, which no process kill can.

use camino::{Utf8Path, Utf8PathBuf};
use common::ArtifactHash;
use integration_tests::processes::{NexusProcess, SledProcess, write_nexus_config_at, write_sled_config_at};
use integration_tests::rack::{SledView, holds_exactly, sled_view_at, wait_until};
use integration_tests::repos::{RepoFactory, upload};
use power_cut_fs::{CutReport, PowerCutFs};
use sha2::Digest;
use std::time::Duration;

const SLEDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_uploads_and_copies_survive_a_power_cut() {
    let outcome = upload_replicate_and_cut(None).await;
    assert_eq!(outcome.violations, Vec::<String>::new(), "after the cut ({:?})", outcome.cut);
    assert!(outcome.canary_gone, "the cut dropped an unsynced file ({:?})", outcome.cut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_artifact_fsync_is_caught() {
    let outcome = upload_replicate_and_cut(Some("sled_agent::store::skip_artifact_fsync=return")).await;
    assert!(
        outcome.violations.iter().any(|violation| violation.contains("lost its acknowledged copy")),
        "without the fsync, acknowledged copies are lost and the checks say so: {:#?}",
        outcome.violations
    );
}

struct Outcome {
    violations: Vec<String>,
    cut: CutReport,
    canary_gone: bool,
}

/// Where the processes' configs (off the cut file system: installed long
/// before) and state (on it) live.
struct Layout {
    configs: camino_tempfile::Utf8TempDir,
    disk: Utf8PathBuf,
}

impl Layout {
    fn nexus_config(&self) -> Utf8PathBuf {
        self.configs.path().join("nexus")
    }
    fn nexus_state(&self) -> Utf8PathBuf {
        self.disk.join("nexus")
    }
    fn sled_config(&self, sled: usize) -> Utf8PathBuf {
        self.configs.path().join(format!("sled-{sled}"))
    }
    fn sled_state(&self, sled: usize) -> Utf8PathBuf {
        self.disk.join(format!("sled-{sled}"))
    }

    /// Starts Nexus, then the sleds (with `sled_failpoints`) pointed at it.
    fn start(&self, sled_failpoints: Option<&str>) -> (NexusProcess, Vec<SledProcess>) {
        let nexus = NexusProcess::start_at(&self.nexus_config(), &self.nexus_state(), None);
        let sleds = (0..SLEDS)
            .map(|sled| {
                write_sled_config_at(&self.sled_config(sled), &self.sled_state(sled), &nexus.internal_url);
                SledProcess::start(&self.sled_config(sled), sled_failpoints)
            })
            .collect();
        (nexus, sleds)
    }
}

async fn upload_replicate_and_cut(sled_failpoints: Option<&str>) -> Outcome {
    let db = test_harness::TestDatabase::new().await;
    let mount = camino_tempfile::tempdir().unwrap();
    let mut disk = PowerCutFs::mount(mount.path().as_std_path(), 1 << 30)
        .expect("mounting power-cut-fs (needs /dev/fuse; dev-tools/install-prerequisites installs fuse3)");
    let layout = Layout { configs: camino_tempfile::tempdir().unwrap(), disk: mount.path().to_owned() };
    // The directories an operator made when installing: Nexus's state
    // directory and each sled's M.2 mount points.
    std::fs::create_dir(layout.nexus_state()).unwrap();
    std::fs::create_dir(layout.nexus_config()).unwrap();
    write_nexus_config_at(&layout.nexus_config(), &layout.nexus_state(), db.url(), |text| text);
    for sled in 0..SLEDS {
        std::fs::create_dir(layout.sled_config(sled)).unwrap();
        for m2 in ["m2-0", "m2-1"] {
            std::fs::create_dir_all(layout.sled_state(sled).join(m2)).unwrap();
        }
    }
    disk.sync_everything();

    let (nexus, sleds) = layout.start(sled_failpoints);
    let datastore = nexus::db::DataStore::connect(db.url(), &Default::default()).await.unwrap();
    wait_until("the sleds register", Duration::from_secs(20), async || {
        datastore.sled_list().await.unwrap().len() == SLEDS
    })
    .await;
    let factory = RepoFactory::new().await;
    nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();

    // 1.0.0 replicated everywhere (and so released from staging), then
    // 2.0.0 answered 200 with its replication possibly still under way.
    let first = factory.build(&RepoFactory::spec("1.0.0", &[("os", 1 << 20), ("sp", 200_000)], 1)).await;
    assert_eq!(upload(&nexus.external_url, Some(&nexus.token), &first).await.0, 200);
    converge(&nexus, &datastore, &sleds).await.unwrap();
    let second = factory.build(&RepoFactory::spec("2.0.0", &[("os2", 700_000), ("rot", 300_000)], 2)).await;
    assert_eq!(upload(&nexus.external_url, Some(&nexus.token), &second).await.0, 200);

    let mut before = Vec::new();
    for sled in &sleds {
        before.push(sled_view_at(&sled.api_url).await);
    }
    let nexus_id = std::fs::read_to_string(layout.nexus_state().join("staging/nexus-id")).unwrap();
    let canary = layout.disk.join("canary");
    std::fs::write(&canary, b"never fsynced").unwrap();

    let token = nexus.token.clone();
    nexus.process.kill_9();
    for sled in sleds {
        sled.process.kill_9();
    }
    let cut = tokio::task::spawn_blocking(move || {
        let report = disk.power_cut().expect("cutting the power (unmount, revert, mount)");
        (disk, report)
    });
    let (_disk, cut) = cut.await.unwrap();
    let canary_gone = !canary.exists();

    let (nexus, sleds) = layout.start(None);
    let mut violations = Vec::new();
    if nexus.token != token {
        violations.push("the operator token changed: the one operators were given is gone".to_string());
    }
    let nexus_id_after = std::fs::read_to_string(layout.nexus_state().join("staging/nexus-id")).unwrap();
    if nexus_id_after != nexus_id {
        violations.push(format!("Nexus came back as another Nexus ({nexus_id_after} was {nexus_id})"));
    }
    let mut after = Vec::new();
    for sled in &sleds {
        after.push(sled_view_at(&sled.api_url).await);
    }
    for (sled, (before, after)) in before.iter().zip(&after).enumerate() {
        check_sled(sled, before, after, &mut violations);
    }
    let repos = datastore.tuf_repo_list_unpruned_with_artifacts().await.unwrap();
    assert_eq!(repos.len(), 2, "both uploads are in the database, which the cut did not touch");
    for repo in &repos {
        for artifact in &repo.artifacts {
            let hash = artifact.sha256.0;
            let on_a_sled = after.iter().any(|view| view.copies.contains_key(&hash));
            if !on_a_sled && !staged_intact(&layout.nexus_state(), hash) {
                violations.push(format!(
                    "artifact {} of acknowledged repository {}: on no sled and not staged intact",
                    artifact.name, repo.repo.system_version
                ));
            }
        }
    }
    if violations.is_empty()
        && let Err(error) = converge(&nexus, &datastore, &sleds).await
    {
        violations.push(error);
    }
    Outcome { violations, cut, canary_gone }
}

fn check_sled(sled: usize, before: &SledView, after: &SledView, violations: &mut Vec<String>) {
    if after.sled_id != before.sled_id {
        violations
            .push(format!("sled {sled} came back as a new sled ({} was {})", after.sled_id, before.sled_id));
    }
    if after.generation < before.generation {
        violations.push(format!(
            "sled {sled} went back from generation {} to {}",
            before.generation, after.generation
        ));
    }
    for (hash, &copies) in &before.copies {
        let now = after.copies.get(hash).copied().unwrap_or(0);
        if now < copies {
            violations.push(format!(
                "sled {sled} lost its acknowledged copy of {hash}: {copies} M.2s before, {now} after"
            ));
        }
    }
}

fn staged_intact(nexus_state: &Utf8Path, hash: ArtifactHash) -> bool {
    let path = nexus_state.join("staging/artifacts").join(hash.to_string());
    std::fs::read(path).is_ok_and(|bytes| ArtifactHash(sha2::Sha256::digest(&bytes).into()) == hash)
}

/// Activates replication until every sled holds exactly the config.
async fn converge(
    nexus: &NexusProcess,
    datastore: &nexus::db::DataStore,
    sleds: &[SledProcess],
) -> Result<(), String> {
    let wanted = datastore.tuf_artifact_config().await.unwrap();
    let client = nexus.internal_client();
    let request = common::api::nexus_internal::BackgroundTasksActivateRequest {
        bgtask_names: ["tuf_artifact_replication".to_string()].into(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _ = client.bgtask_activate(&request).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut views = Vec::new();
        for sled in sleds {
            views.push(sled_view_at(&sled.api_url).await);
        }
        if views.iter().all(|view| holds_exactly(view, &wanted)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("the rack did not converge to generation {}: {views:#?}", wanted.generation));
        }
    }
}
