//! A failover of the database primary under a running rack (DESIGN §14).
//!
//! A primary and one synchronous standby; a Nexus in this process, given the
//! cluster's multi-host URL; three sleds. Uploads, prunes and replication
//! activations run before, across and after a `kill -9` of the primary and
//! the promotion of the standby (`pg_ctl promote`; the old primary is never
//! restarted).
//!
//! The kill lands while an upload's insert transaction is open (held by a
//! failpoint after its last write, before its COMMIT) and while a
//! replication activation sits between reading the config and pushing it
//! (another failpoint). Nexus waits at most `failover_wait_secs` = 1 s for
//! the database, and the standby is promoted 5 s after the kill, so that
//! work started in the gap gives up (an upload gets 503 with Retry-After,
//! the pruner's status carries the error) while the held upload, whose
//! COMMIT comes after the promotion, is run again on the new primary and
//! answered 200.
//!
//! Checked: every upload answered 200 is recorded afterwards; the
//! database's and every sled's generation never go back, and every artifact
//! of an unpruned repository is on a sled or staged (both watched every
//! 20 ms through the failover); afterwards every sled holds exactly the
//! config (what the prunes dropped is gone) and every byte hashes to its
//! name; the same Nexus serves throughout and its
//! tasks work again on their next activation; the rack converges; omdb
//! reads the promoted database through the same URL. Failpoints are
//! process-wide: this test has a binary of its own.

use common::bgtask::details::{ReplicationOutcome, TufRepoPrunerOutcome, TufRepoPrunerStatus};
use common::bgtask::{CurrentStatus, LastResult};
use common::{ArtifactHash, Generation};
use integration_tests::rack::{PRUNER, REPLICATION, TestRack, holds_exactly, wait_until};
use integration_tests::repos::{RepoFactory, upload};
use nexus::db::{DataStore, DataStoreError};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use test_harness::PgCluster;

/// How long the held upload and activation wait at their failpoints: past
/// the kill, the gap and the promotion.
const HOLD_MILLIS: u64 = 6500;
const PROMOTE_AFTER: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_loses_no_acknowledged_upload_and_nexus_rides_through_it() {
    let _scenario = fail::FailScenario::setup();
    let mut cluster = PgCluster::start(1).await.unwrap();
    let (rack, url) = TestRack::on_cluster(&cluster, 3).await;
    let nexus_id = rack.nexus.server.nexus().id;
    let factory = RepoFactory::new().await;
    rack.nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
    let watcher = Watcher::start(&rack);
    let mut acknowledged = Vec::new();

    // Before: three uploads, replicated; a fourth makes the pruner prune.
    for version in ["1.0.0", "2.0.0", "3.0.0", "4.0.0"] {
        let zip =
            factory.build(&RepoFactory::spec(version, &[(&format!("os-{version}"), 64 << 10)], 1)).await;
        assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
        acknowledged.push(version.to_string());
        rack.converge(20).await;
    }
    assert!(matches!(pruner_outcome(&rack).await, TufRepoPrunerOutcome::Pruned { .. }));
    rack.converge(20).await;
    let generation_before = rack.config().await.generation;
    let iteration_before = iteration(&rack, REPLICATION).await;

    // Hold an activation before its config push and an upload before its
    // COMMIT, then kill the primary under both.
    fail::cfg("nexus::replication::before_config_push", &format!("1*return(*:{HOLD_MILLIS})")).unwrap();
    fail::cfg("nexus::db::tuf_repo_insert::before_commit", &format!("1*return(*:{HOLD_MILLIS})")).unwrap();
    let nexus = rack.nexus.server.nexus().clone();
    let held_activation = tokio::spawn(async move { nexus.background.activate_and_wait(REPLICATION).await });
    wait_until("the held activation runs", Duration::from_secs(10), async || {
        matches!(
            rack.nexus.server.nexus().background.view(REPLICATION).await.unwrap().current,
            CurrentStatus::Running { .. }
        )
    })
    .await;
    let held_zip = factory.build(&RepoFactory::spec("5.0.0", &[("os-5.0.0", 64 << 10)], 1)).await;
    let held_upload = {
        let (external, token) = (rack.nexus.external_url(), rack.nexus.token.clone());
        tokio::spawn(async move { upload(&external, Some(&token), &held_zip).await })
    };
    let primary_url = cluster.server(0).url("rack");
    wait_until(
        "the held upload's transaction is open, every row written",
        Duration::from_secs(20),
        async || open_insert_transactions(&primary_url).await == 1,
    )
    .await;

    let killed = Instant::now();
    cluster.kill(0);

    // In the gap: a pruner activation and a new upload give up, each of
    // their database operations within failover_wait, saying why.
    let nexus = rack.nexus.server.nexus().clone();
    let gap_pruner = tokio::spawn(async move { nexus.background.activate_and_wait(PRUNER).await });
    let gap_zip = factory.build(&RepoFactory::spec("6.0.0", &[("os-6.0.0", 64 << 10)], 1)).await;
    let (status, retry_after, body) = upload_with_headers(&rack, &gap_zip).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("5")), "{body}");
    assert!(body.contains("database"), "{body}");
    let gap_answered = killed.elapsed();
    let pruner = gap_pruner.await.unwrap().unwrap();
    let TufRepoPrunerOutcome::Error { message } = pruner_details(&pruner).outcome else {
        panic!("the pruner ran without a database: {pruner:#?}")
    };
    assert!(message.contains("database"), "{message}");
    assert!(
        killed.elapsed() < PROMOTE_AFTER,
        "the gap's work took {:?}; the test's timing is off",
        killed.elapsed()
    );

    tokio::time::sleep(PROMOTE_AFTER.saturating_sub(killed.elapsed())).await;
    cluster.promote(1).await.unwrap();
    let promoted = killed.elapsed();

    // Across: the held upload commits on the new primary; the held
    // activation finishes; the next activations work.
    let (status, body) = held_upload.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "inserted", "its first attempt never reached COMMIT: {body}");
    acknowledged.push("5.0.0".into());
    let held_answered = killed.elapsed();
    held_activation.await.unwrap().unwrap();
    let refused = rack.nexus.server.nexus().datastore.tuf_repo_get_by_version("6.0.0").await;
    assert!(
        matches!(refused, Err(DataStoreError::NotFound { .. })),
        "the 503 recorded something: {refused:?}"
    );
    assert!(matches!(pruner_outcome(&rack).await, TufRepoPrunerOutcome::Pruned { .. }));
    assert_eq!(rack.replicate().await.outcome, ReplicationOutcome::Completed);

    // After: the refused upload again, a prune, convergence.
    assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &gap_zip).await.0, 200);
    acknowledged.push("6.0.0".into());
    assert!(matches!(pruner_outcome(&rack).await, TufRepoPrunerOutcome::Pruned { .. }));
    rack.converge(30).await;

    let datastore = &rack.nexus.server.nexus().datastore;
    for version in &acknowledged {
        datastore.tuf_repo_get_by_version(version).await.unwrap_or_else(|e| panic!("{version} lost: {e}"));
    }
    assert!(rack.config().await.generation > generation_before);
    assert!(iteration(&rack, REPLICATION).await > iteration_before, "the same task loop went on");
    let activations = rack.nexus.server.nexus().background.view(REPLICATION).await.unwrap().activations;
    assert_eq!(
        activations.iter().map(|a| a.nexus_id).collect::<Vec<_>>(),
        [nexus_id],
        "one Nexus, never restarted"
    );
    // §10.4: what the prunes dropped is gone from every sled; §10.3: what
    // is left hashes to its name.
    let config = rack.config().await;
    for view in rack.views().await {
        assert!(holds_exactly(&view, &config), "{view:?}");
    }
    check_sled_bytes(&rack).await;
    let checks = watcher.stop().await;
    assert!(checks > 50, "the watcher checked only {checks} times");
    omdb_reads(&url, &acknowledged);
    eprintln!(
        "failover: killed; a new upload answered 503 after {gap_answered:?}; standby promoted after \
         {promoted:?}; the upload held across the kill answered 200 after {held_answered:?}"
    );
}

/// The pruner's outcome after an explicit activation.
async fn pruner_outcome(rack: &TestRack) -> TufRepoPrunerOutcome {
    pruner_details(&rack.activate(PRUNER).await).outcome
}

fn pruner_details(task: &common::bgtask::BackgroundTask) -> TufRepoPrunerStatus {
    match &task.last {
        LastResult::Completed { details, .. } => serde_json::from_value(details.clone()).unwrap(),
        LastResult::NeverCompleted => panic!("the pruner never completed"),
    }
}

async fn iteration(rack: &TestRack, task: &str) -> u64 {
    match rack.nexus.server.nexus().background.view(task).await.unwrap().last {
        LastResult::Completed { iteration, .. } => iteration,
        LastResult::NeverCompleted => 0,
    }
}

/// Insert transactions that have bumped the generation and not committed.
async fn open_insert_transactions(url: &str) -> i64 {
    let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
        return 0;
    };
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'idle in transaction' AND query LIKE 'UPDATE \"tuf_generation\"%'",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

/// An upload's status, its `Retry-After` and its body.
async fn upload_with_headers(rack: &TestRack, zip: &camino::Utf8Path) -> (u16, Option<String>, String) {
    let response = reqwest::Client::new()
        .put(format!("{}/v1/system/update/repositories", rack.nexus.external_url()))
        .query(&[("file_name", "gap.zip")])
        .bearer_auth(&rack.nexus.token)
        .body(std::fs::read(zip).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after =
        response.headers().get(reqwest::header::RETRY_AFTER).map(|value| value.to_str().unwrap().to_string());
    (status, retry_after, response.text().await.unwrap())
}

/// Every artifact every sled serves hashes to its name (DESIGN §10.3).
async fn check_sled_bytes(rack: &TestRack) {
    let config = rack.config().await;
    let http = reqwest::Client::new();
    for sled in &rack.sleds {
        for hash in &config.artifacts {
            let bytes = http
                .get(format!("{}/artifact/sha256/{hash}", sled.depot_url()))
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(ArtifactHash(sha2::Sha256::digest(&bytes).into()), *hash);
        }
    }
}

/// omdb's database commands take the multi-host URL, and find the promoted
/// primary through it.
fn omdb_reads(url: &str, versions: &[String]) {
    let output = std::process::Command::new(integration_tests::binary("omdb"))
        .args(["db", "tuf-repos", "--db-url", url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    for version in versions {
        assert!(stdout.contains(version.as_str()), "omdb does not list {version}:\n{stdout}");
    }
}

/// Watches, every 20 ms while the test runs, what must hold even in the
/// middle of a failover: the database's generation and every sled's never
/// go back (§10.2), and every artifact of an unpruned repository is on some
/// sled or staged (§10.1). Reads that fail (no primary) are skipped.
struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

impl Watcher {
    fn start(rack: &TestRack) -> Watcher {
        let datastore = rack.nexus.server.nexus().datastore.clone();
        let sleds: Vec<_> = rack.sleds.iter().map(|sled| sled.client()).collect();
        let staged = rack.nexus.staging_dir().join("artifacts");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Seen { database: Generation::FIRST, sleds: BTreeMap::new() };
            let mut checks = 0;
            while !stopping.load(Ordering::SeqCst) {
                if check_once(&datastore, &sleds, &staged, &mut seen).await? {
                    checks += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(checks)
        });
        Watcher { stop, task }
    }

    /// Stops watching; panics with the first violation seen. Returns how
    /// many complete checks ran.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap().unwrap_or_else(|violation| panic!("{violation}"))
    }
}

struct Seen {
    database: Generation,
    sleds: BTreeMap<usize, Generation>,
}

/// One check; `Ok(false)` if a read failed or the config moved under it.
async fn check_once(
    datastore: &DataStore,
    sleds: &[integration_tests::sled_agent_client::Client],
    staged: &camino::Utf8Path,
    seen: &mut Seen,
) -> Result<bool, String> {
    let Ok(config) = datastore.tuf_artifact_config().await else { return Ok(false) };
    if config.generation < seen.database {
        return Err(format!(
            "the database's generation went from {} back to {}",
            seen.database, config.generation
        ));
    }
    seen.database = config.generation;
    // Staging before sleds: a staged file goes only once sleds hold it.
    let staged: BTreeSet<String> = std::fs::read_dir(staged)
        .map(|dir| dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let mut held = BTreeSet::new();
    for (index, sled) in sleds.iter().enumerate() {
        let Ok(list) = sled.artifact_list().await else { return Ok(false) };
        let previous = seen.sleds.insert(index, list.generation).unwrap_or(list.generation);
        if list.generation < previous {
            return Err(format!("sled {index} went from generation {previous} back to {}", list.generation));
        }
        held.extend(list.list.iter().filter(|(_, copies)| **copies > 0).map(|(hash, _)| *hash));
    }
    if datastore.tuf_generation_get().await.ok() != Some(config.generation) {
        return Ok(false);
    }
    match config.artifacts.iter().find(|hash| !held.contains(*hash) && !staged.contains(&hash.to_string())) {
        Some(hash) => {
            Err(format!("artifact {hash} of generation {} is on no sled and not staged", config.generation))
        }
        None => Ok(true),
    }
}
