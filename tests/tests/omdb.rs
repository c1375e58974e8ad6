//! omdb run as a subprocess against a live Nexus. Golden files in
//! `tests/output/` fix the human format; regenerate them with
//! `EXPECTORATE=overwrite cargo test -p integration-tests --test omdb`.

use common::bgtask::LastResult;
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
async fn disable_and_enable_record_who_did_it() {
    let (_nexus, omdb) = settled_nexus().await;
    omdb.success(&["nexus", "background-tasks", "disable", "tuf_repo_pruner"]).await;
    let output = omdb.success(&["nexus", "background-tasks", "activate", "tuf_repo_pruner", "--wait"]).await;
    golden("bgtasks-disabled", &output);
    let output = omdb.success(&["nexus", "background-tasks", "enable", "tuf_repo_pruner"]).await;
    assert!(output.contains("enabled by omdb (tester@"), "{output}");
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
