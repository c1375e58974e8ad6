//! omdb run as a subprocess against a live Nexus. Golden files in
//! `tests/output/` fix the human format; regenerate them with
//! `EXPECTORATE=overwrite cargo test -p integration-tests --test omdb`.

use common::bgtask::{LastResult, TaskMode};
use integration_tests::{TestNexus, binary};
use regex::Regex;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

struct Omdb {
    url: String,
}

impl Omdb {
    /// Runs omdb without blocking the runtime that serves the test's Nexus.
    async fn run(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(binary("omdb"))
            .args(args)
            .env("OMDB_NEXUS_URL", &self.url)
            .env("USER", "tester")
            .env_remove("RUST_BACKTRACE")
            .output()
            .await
            .unwrap()
    }

    async fn success(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(output.status.success(), "omdb {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    async fn failure(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(!output.status.success(), "omdb {args:?} should have failed");
        String::from_utf8(output.stderr).unwrap()
    }
}

/// Starts a Nexus and waits for its start-up activations, so that what omdb
/// sees does not depend on timing.
async fn settled_nexus() -> (TestNexus, Omdb) {
    let nexus = TestNexus::start().await;
    let client = nexus.internal_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = client.bgtask_list().await.unwrap().into_inner();
        if tasks.values().all(|task| matches!(task.last, LastResult::Completed { .. })) {
            break;
        }
        assert!(Instant::now() < deadline, "start-up activations did not complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let omdb = Omdb { url: nexus.internal_url() };
    (nexus, omdb)
}

/// Replaces what changes from run to run: times, elapsed durations, the host
/// name, and the padding that depends on their widths.
fn redact(text: &str) -> String {
    let time = Regex::new(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z").unwrap();
    let duration = r"(\d+ms|\d+s|\d+m \d+s|\d+h \d+m)";
    let elapsed_column = Regex::new(&format!(r"(<TIME>\s+){duration}")).unwrap();
    let took = Regex::new(&format!(r"took {duration}")).unwrap();
    let host = Regex::new(r"omdb \(tester@[^)]*\)").unwrap();
    let uuid = Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap();
    let text = time.replace_all(text, "<TIME>");
    let text = elapsed_column.replace_all(&text, "$1<ELAPSED>");
    let text = took.replace_all(&text, "took <ELAPSED>");
    let text = host.replace_all(&text, "omdb (tester@<HOST>)");
    let text = uuid.replace_all(&text, "<UUID>");
    // Collapse column padding, not indentation.
    let spaces = Regex::new(r"(\S) {2,}").unwrap();
    text.lines().map(|line| spaces.replace_all(line.trim_end(), "$1  ").into_owned() + "\n").collect()
}

fn golden(name: &str, output: &str) {
    expectorate::assert_contents(format!("output/{name}.txt"), &redact(output));
}

#[tokio::test]
async fn background_tasks_list_and_show() {
    let (_nexus, omdb) = settled_nexus().await;
    golden("bgtasks-list", &omdb.success(&["nexus", "background-tasks", "list"]).await);
    golden("bgtasks-show", &omdb.success(&["nexus", "background-tasks", "show"]).await);
    let json: serde_json::Value = serde_json::from_str(
        &omdb.success(&["--json", "nexus", "background-tasks", "show", "tuf_repo_pruner"]).await,
    )
    .unwrap();
    assert_eq!(json["tuf_repo_pruner"]["last"]["details"]["nkeep"], 3);
}

#[tokio::test]
async fn activate_wait_prints_the_new_iteration() {
    let (_nexus, omdb) = settled_nexus().await;
    let output = omdb.success(&["nexus", "background-tasks", "activate", "tuf_repo_pruner", "--wait"]).await;
    assert!(output.contains("last completed iteration 2 (explicitly activated)"), "{output}");
    golden("bgtasks-activate-wait", &output);
}

#[tokio::test]
async fn the_switch_records_who_and_why() {
    let (_nexus, omdb) = settled_nexus().await;
    let stderr = omdb.failure(&["nexus", "background-tasks", "disable", "tuf_repo_pruner"]).await;
    assert!(stderr.contains("--reason"), "a reason is required: {stderr}");
    omdb.success(&["nexus", "background-tasks", "disable", "tuf_repo_pruner", "--reason", "a pruning bug"])
        .await;
    let output = omdb.success(&["nexus", "background-tasks", "activate", "tuf_repo_pruner", "--wait"]).await;
    golden("bgtasks-disabled", &output);
    let output = omdb
        .success(&["nexus", "background-tasks", "manual", "tuf_repo_pruner", "--reason", "pruning by hand"])
        .await;
    golden("bgtasks-manual", &output);
    golden("bgtasks-list-manual", &omdb.success(&["nexus", "background-tasks", "list"]).await);
    let output = omdb.success(&["nexus", "background-tasks", "activate", "tuf_repo_pruner", "--wait"]).await;
    assert!(output.contains("nothing to prune"), "an explicit activation runs in manual mode: {output}");
    let output =
        omdb.success(&["nexus", "background-tasks", "enable", "tuf_repo_pruner", "--reason", "fixed"]).await;
    assert!(output.contains("mode: enabled, set by omdb (tester@"), "{output}");
    assert!(output.contains(": fixed\n"), "{output}");
}

#[tokio::test]
async fn unknown_tasks_and_missing_urls_are_explained() {
    let (_nexus, omdb) = settled_nexus().await;
    let stderr = omdb.failure(&["nexus", "background-tasks", "show", "tuf_repo_prunr"]).await;
    assert!(
        stderr.contains("no background task named [\"tuf_repo_prunr\"]; known tasks: inventory_collection, tuf_artifact_replication, tuf_repo_pruner"),
        "{stderr}"
    );
    let stderr = omdb.failure(&["nexus", "background-tasks", "activate", "tuf_repo_prunr", "--wait"]).await;
    assert!(
        stderr.contains("known tasks: inventory_collection, tuf_artifact_replication, tuf_repo_pruner"),
        "{stderr}"
    );

    let output = Command::new(binary("omdb"))
        .args(["nexus", "background-tasks", "list"])
        .env_remove("OMDB_NEXUS_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--nexus-internal-url") && stderr.contains("OMDB_NEXUS_URL"), "{stderr}");
}

/// A rack of two in-process sleds, replicated one repository of
/// `artifacts`; the M.2 directories of the second (always the last in
/// `rack.sleds`) outlive it: a test stops it, changes its disks and starts
/// it again on them.
struct OneSledRack {
    rack: integration_tests::rack::TestRack,
    m2s: Vec<camino::Utf8PathBuf>,
    _m2_dir: camino_tempfile::Utf8TempDir,
}

impl OneSledRack {
    async fn replicated(artifacts: &[(&str, u64)], seed: u64) -> OneSledRack {
        let (rack, factory) = integration_tests::rack::TestRack::with_trust_root(1, |config| {
            config.background_tasks.tuf_artifact_replication.allow_fewer_sleds = true;
        })
        .await;
        let m2_dir = camino_tempfile::tempdir().unwrap();
        let m2s = vec![m2_dir.path().join("m2-0"), m2_dir.path().join("m2-1")];
        let mut one = OneSledRack { rack, m2s, _m2_dir: m2_dir };
        one.start_sled().await;
        one.rack.upload_ok(&factory, "1.0.0", artifacts, seed).await;
        one.rack.converge(20).await;
        one
    }

    async fn stop_sled(&mut self) {
        self.rack.sleds.pop().expect("the sled is running").server.shutdown().await;
    }

    async fn start_sled(&mut self) -> &integration_tests::TestSled {
        let m2s = self.m2s.clone();
        self.rack.add_sled_with(|config| config.storage.m2_dirs = m2s).await
    }
}

/// A sled whose newest config ledger copy is damaged (DESIGN §11) says so
/// in its inventory and listing, and omdb shows it in `sled-agent
/// artifacts`, `db inventory` and `db validate`. It keeps the generation and
/// every artifact; the next replication activation pushes the current config,
/// which repairs the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_ledger_is_shown_everywhere_and_repaired_by_the_next_push() {
    use integration_tests::rack::{holds_exactly, sled_view};
    let mut one = OneSledRack::replicated(&[("os", 50_000)], 1).await;
    let (rack, m2s) = (&one.rack, one.m2s.clone());
    let config = rack.config().await;

    // No replication (a follow-up would repair the damage) until the test
    // has looked at it.
    let nexus = rack.nexus.server.nexus().clone();
    let background = &nexus.background;
    let disabled = TaskMode::Disabled;
    background
        .set_switch(integration_tests::rack::REPLICATION, disabled, "test", "look first")
        .await
        .unwrap();
    // Stop the sled, make its newest ledger copy unreadable on both M.2s
    // (torn on one, a directory in its place on the other), start it again.
    one.stop_sled().await;
    let name = format!("artifact-config.g{:020}.json", config.generation.get());
    std::fs::write(m2s[0].join(&name), b"{\"generation\":").unwrap();
    std::fs::remove_file(m2s[1].join(&name)).unwrap();
    std::fs::create_dir(m2s[1].join(&name)).unwrap();
    let sled = one.start_sled().await;
    let (api_url, client) = (sled.api_url(), sled.client());
    let rack = &one.rack;
    let listed = client.artifact_list().await.unwrap().into_inner();
    assert_eq!(listed.generation, config.generation, "the generation survives the damage");
    assert_eq!(listed.ledger_damage.len(), 2, "{listed:?}");
    let inventory = client.inventory().await.unwrap().into_inner();
    assert_eq!(inventory.ledger_damage.len(), 2);
    for m2 in &inventory.m2 {
        assert_eq!(m2.artifacts, 1, "nothing was deleted on the basis of an older config");
    }

    let omdb = Omdb { url: rack.nexus.internal_url() };
    let shown = omdb.success(&["sled-agent", "artifacts", "--sled-url", &api_url]).await;
    assert!(shown.contains(&format!("ledger DAMAGED at generation {}", config.generation)), "{shown}");
    assert!(shown.contains("cannot be parsed") && shown.contains("cannot be read"), "{shown}");
    rack.activate("inventory_collection").await;
    let db = rack.nexus.db.url().to_string();
    let inventory = omdb.success(&["db", "--db-url", &db, "inventory"]).await;
    assert!(inventory.contains("DAMAGED: ledger"), "{inventory}");
    let validated = omdb.run(&["db", "--db-url", &db, "validate", "artifact-replication"]).await;
    let validated = String::from_utf8(validated.stdout).unwrap();
    assert!(validated.contains("DAMAGED"), "{validated}");

    let enabled = TaskMode::Enabled;
    background.set_switch(integration_tests::rack::REPLICATION, enabled, "test", "looked").await.unwrap();
    rack.replicate().await;
    // The damaged sled, started last (the rack's first sled is another).
    let damaged = rack.sleds.last().expect("the sled was started again");
    let view = sled_view(damaged).await;
    assert!(holds_exactly(&view, &config), "repaired by the push: {view:?}");
    let listed = damaged.client().artifact_list().await.unwrap().into_inner();
    assert!(listed.ledger_damage.is_empty(), "{listed:?}");
    let shown = omdb.success(&["sled-agent", "artifacts", "--sled-url", &api_url]).await;
    assert!(shown.contains(&format!("artifact config generation {}", config.generation)), "{shown}");
}

/// A copy the sled cannot read (an I/O error, injected with a failpoint on
/// this test's artifact only) is not corruption (DESIGN §11): the scrub keeps
/// it on both M.2s, the sled reports it (inventory, listing without it, omdb)
/// and, once it reads again, the next check counts it as held again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_copy_is_kept_shown_and_counted_again_once_it_reads() {
    let mut one = OneSledRack::replicated(&[("os", 61_234)], 11).await;
    let hash = *one.rack.config().await.artifacts.iter().next().unwrap();
    let nexus = one.rack.nexus.server.nexus().clone();
    let (replication, disabled) = (integration_tests::rack::REPLICATION, TaskMode::Disabled);
    nexus.background.set_switch(replication, disabled, "test", "look first").await.unwrap();

    // A restart runs a scrub pass at once; it cannot read either copy.
    one.stop_sled().await;
    fail::cfg("sled_agent::store::read_error", &format!("return({hash})")).unwrap();
    let sled = one.start_sled().await;
    let client = sled.client();
    let api_url = sled.api_url();
    integration_tests::rack::wait_until("the first scrub pass", Duration::from_secs(20), async || {
        client.inventory().await.unwrap().into_inner().scrub.passes_finished >= 1
    })
    .await;
    let inventory = client.inventory().await.unwrap().into_inner();
    fail::remove("sled_agent::store::read_error");
    let pass = inventory.scrub.last.clone().unwrap();
    assert_eq!((pass.unreadable, pass.corrupt_removed), (2, 0), "{pass:?}");
    assert_eq!(inventory.unreadable.len(), 2, "{:?}", inventory.unreadable);
    assert!(inventory.m2.iter().all(|m2| m2.artifacts == 1), "nothing deleted: {:?}", inventory.m2);
    assert_eq!(client.artifact_list().await.unwrap().into_inner().list.get(&hash), None);
    let omdb = Omdb { url: one.rack.nexus.internal_url() };
    let shown = omdb.success(&["sled-agent", "artifacts", "--sled-url", &api_url]).await;
    assert!(shown.contains("unreadable copies") && shown.contains(&hash.to_string()), "{shown}");
    assert!(shown.contains(one.m2s[1].join("artifacts").as_str()), "the problem names the file: {shown}");

    // Readable again: the next restart re-hashes it (the failed read
    // dropped its verification stamp) and holds both copies.
    one.stop_sled().await;
    let sled = one.start_sled().await;
    let listed = sled.client().artifact_list().await.unwrap().into_inner();
    assert_eq!(listed.list.get(&hash), Some(&2), "{listed:?}");
    assert!(sled.client().inventory().await.unwrap().into_inner().unreadable.is_empty());
}

/// The replication matrix, repository health and target release as omdb
/// shows them: complete sleds summarised, the expunged one as a row of `-`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_matrix_health_and_target_release() {
    use integration_tests::rack::TestRack;
    use integration_tests::repos::{RepoFactory, upload};
    // No follow-up activations: health changes only when the test says.
    let (rack, factory) = TestRack::with_trust_root(3, |config| {
        config.background_tasks.tuf_artifact_replication.followup_delay_millis = 600_000;
    })
    .await;
    for (version, seed) in [("1.0.0", 1), ("2.0.0", 2)] {
        let mut spec = RepoFactory::spec(version, &[("os", 30_000), ("sp", 2_000)], seed);
        for artifact in &mut spec.artifacts {
            artifact.version = version.to_string();
        }
        let zip = factory.build(&spec).await;
        assert_eq!(upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await.0, 200);
    }
    rack.converge(20).await;
    rack.nexus.external_client().sled_expunge(&rack.sleds[0].server.sled_id).await.unwrap();
    rack.replicate().await;
    let request = common::api::external::TargetReleaseRequest { system_version: "2.0.0".into() };
    rack.nexus.external_client().target_release_set(&request).await.unwrap();
    let omdb = Omdb { url: rack.nexus.internal_url() };
    let db = rack.nexus.db.url().to_string();
    let serials = Regex::new(r"sim-[0-9a-f]{8}").unwrap();
    let redact_serials = |text: String| serials.replace_all(&text, "sim-<SERIAL>").into_owned();
    golden("db-replication", &redact_serials(omdb.success(&["db", "--db-url", &db, "replication"]).await));
    let zip_names = Regex::new(r"-\d+\.zip").unwrap();
    let repos = omdb.success(&["db", "--db-url", &db, "tuf-repos"]).await;
    golden("db-tuf-repos", &zip_names.replace_all(&repos, "-<N>.zip"));
    golden("db-target-release", &omdb.success(&["db", "--db-url", &db, "target-release"]).await);
    let json: serde_json::Value =
        serde_json::from_str(&omdb.success(&["--json", "db", "--db-url", &db, "replication"]).await).unwrap();
    assert_eq!(json["sleds"].as_array().unwrap().len(), 3);
    assert_eq!(json["repos"].as_array().unwrap().len(), 2);

    // The operator's CLI shows the same rack through the external API.
    let rack_dev = async |args: &[&str]| {
        let output = tokio::process::Command::new(binary("rack-dev"))
            .args(args)
            .env("RACK_NEXUS_URL", rack.nexus.external_url())
            .env("RACK_TOKEN", &rack.nexus.token)
            .env("RACK_DEV_CURRENT", "/nonexistent/current.json")
            .env_remove("RUST_BACKTRACE")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(output.status.success(), "rack-dev {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        let ports = Regex::new(r"127\.0\.0\.1:\d+").unwrap();
        let zip_hash = Regex::new(r"sha256 [0-9a-f]{64}").unwrap();
        let text = zip_names.replace_all(&redact_serials(stdout), "-<N>.zip").into_owned();
        let text = ports.replace_all(&text, "127.0.0.1:<PORT>").into_owned();
        // A zip's hash covers its signed metadata, whose expiry moves with
        // the clock.
        zip_hash.replace_all(&text, "sha256 <SHA256>").into_owned()
    };
    // Sleds are listed by id, which is random: sort the redacted rows.
    let sleds = redact(&rack_dev(&["sled", "list"]).await);
    let (header, rows) = sleds.split_once('\n').unwrap();
    let mut rows: Vec<&str> = rows.lines().collect();
    rows.sort();
    golden("rack-dev-sled-list", &format!("{header}\n{}\n", rows.join("\n")));
    golden("rack-dev-repo-list", &rack_dev(&["repo", "list"]).await);
    golden("rack-dev-repo-show", &rack_dev(&["repo", "show", "2.0.0"]).await);
    golden("rack-dev-target-release", &rack_dev(&["target-release", "show"]).await);

    // One sled loses 2.0.0's sp behind the system's back: the next
    // activation judges 2.0.0 degraded (one holder of two needed, nothing
    // staged) before it copies sp back, and both views name the artifact.
    let repo = rack.nexus.external_client().repository_view("2.0.0").await.unwrap().into_inner();
    let sp = repo.artifacts.iter().find(|artifact| artifact.name == "sp").unwrap().sha256.to_string();
    for m2 in rack.sleds[1].client().inventory().await.unwrap().into_inner().m2 {
        std::fs::remove_file(std::path::Path::new(&m2.path).join("artifacts").join(&sp)).unwrap();
    }
    rack.replicate().await;
    let repos = omdb.success(&["db", "--db-url", &db, "tuf-repos"]).await;
    golden("db-tuf-repos-degraded", &redact_serials(zip_names.replace_all(&repos, "-<N>.zip").into_owned()));
    golden("rack-dev-repo-show-degraded", &rack_dev(&["repo", "show", "2.0.0"]).await);
}
