//! The `nexus` and `sled-agent` binaries as an operator starts them.

use integration_tests::binary;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use test_harness::TestDatabase;

/// The shipped config with free ports and its files in `dir`.
fn shipped_config(dir: &tempfile::TempDir) -> String {
    let dir = dir.path().to_str().unwrap();
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/nexus/config.toml"))
        .unwrap()
        .replace("127.0.0.1:12221", "127.0.0.1:0")
        .replace("127.0.0.1:12220", "127.0.0.1:0")
        .replace("/var/lib/rack/nexus", dir)
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs nexus to completion, expecting it to refuse to start.
fn refusal(config: &std::path::Path, database_url: &str) -> String {
    let child = Command::new(binary("nexus"))
        .arg("--config")
        .arg(config)
        .args(["--database-url", database_url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // A nexus that starts instead of refusing would serve for ever: fail
    // the test rather than hang it.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(child.wait_with_output()));
    let Ok(output) = receiver.recv_timeout(std::time::Duration::from_secs(60)) else {
        // SAFETY: kill(2) has no memory-safety preconditions; the child is
        // not reaped yet, so the pid is still its.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("nexus started when it should have refused (still running after 60 s)");
    };
    let output = output.unwrap();
    assert!(!output.status.success(), "nexus started when it should have refused: {output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn nexus_refuses_a_database_without_the_current_schema() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &shipped_config(&dir));
    let db = TestDatabase::empty().await;
    let stderr = refusal(&config, db.url());
    assert!(stderr.contains("no schema") && stderr.contains("rack-dev db-upgrade"), "{stderr}");

    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute(nexus::db::schema_version::MIGRATIONS[0].up_sql).await.unwrap();
    let stderr = refusal(&config, db.url());
    let expected = format!("version 1.0.0, older than version {}", nexus::db::schema_version::SCHEMA_VERSION);
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn nexus_names_the_bad_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = shipped_config(&dir).replace("nkeep = 3", "nkeep = 3\nkeep_forever = true");
    let config = write_config(&dir, &text);
    let stderr = refusal(&config, "postgresql://unused");
    assert!(stderr.contains("keep_forever") && stderr.contains(config.to_str().unwrap()), "{stderr}");
}

#[tokio::test]
async fn nexus_serves_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &shipped_config(&dir));
    let db = TestDatabase::new().await;
    let mut child = Command::new(binary("nexus"))
        .arg("--config")
        .arg(&config)
        .args(["--database-url", db.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("nexus prints its address").unwrap();
    let url = first.strip_prefix("nexus internal API: ").expect("the address line").to_string();
    let client = common::clients::nexus_internal::Client::new(&url);
    let tasks = client.bgtask_list().await.unwrap().into_inner();
    assert!(tasks.contains_key("tuf_repo_pruner"));

    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "nexus exited with {status} on SIGTERM");
}

#[tokio::test]
async fn nexus_refuses_a_token_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &shipped_config(&dir));
    let token_file = dir.path().join("operator-token");
    std::fs::write(&token_file, "secret").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let db = TestDatabase::new().await;
    let stderr = refusal(&config, db.url());
    assert!(
        stderr.contains(token_file.to_str().unwrap())
            && stderr.contains("0644")
            && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

/// Without a terminal, stdout is a service log: the generated token is
/// stored in its file but not printed.
#[tokio::test]
async fn nexus_does_not_print_a_generated_token_to_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &shipped_config(&dir));
    let db = TestDatabase::new().await;
    let mut child = Command::new(binary("nexus"))
        .arg("--config")
        .arg(&config)
        .args(["--database-url", db.url()])
        .stdout(Stdio::piped())
        // A file, not a pipe: nothing reads stderr until nexus has exited.
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let token_file = dir.path().join("operator-token");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("operator token");
        printed.push(line);
        if done {
            break;
        }
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    printed.extend(lines.map(Result::unwrap));
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(status.success(), "{printed:?}\n{stderr}");

    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.len(), 64, "{token:?}");
    let stdout = printed.join("\n");
    let expected = format!("operator token generated now and stored in {} (mode 0600)", token_file.display());
    assert!(stdout.contains(&expected), "{stdout}");
    assert!(!stdout.contains(&token), "the token was printed: {stdout}");
    assert!(!stderr.contains(&token), "the token was logged: {stderr}");
}

#[tokio::test]
async fn sled_agent_runs_standalone_and_registers() {
    let nexus = integration_tests::TestNexus::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/sled-agent/config.toml"))
        .unwrap()
        .replace("127.0.0.1:12345", "127.0.0.1:0")
        .replace("127.0.0.1:12346", "127.0.0.1:0")
        .replace("http://127.0.0.1:12221", &nexus.internal_url())
        .replace("registration_period_secs = 30", "registration_period_secs = 1")
        .replace("/var/lib/rack/sled-agent", dir.path().to_str().unwrap());
    let config = write_config(&dir, &text);
    let mut child = tokio::process::Command::new(binary("sled-agent"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let identity = lines.next_line().await.unwrap().expect("the sled prints its id");
    let sled_id: uuid::Uuid = identity.split_whitespace().nth(1).unwrap().parse().unwrap();
    let api = lines.next_line().await.unwrap().unwrap();
    assert!(api.starts_with("sled-agent API: http://127.0.0.1:"), "{api}");

    let datastore = nexus.server.nexus().datastore.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while datastore.sled_get(sled_id).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the sled agent never registered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = child.wait().await.unwrap();
    assert!(status.success(), "sled-agent exited with {status} on SIGTERM");
}
