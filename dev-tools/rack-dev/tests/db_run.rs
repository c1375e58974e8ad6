//! `rack-dev db-run` and `db-upgrade`, run as the binaries they are.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const RACK_DEV: &str = env!("CARGO_BIN_EXE_rack-dev");

#[tokio::test]
async fn db_run_serves_the_current_schema_and_cleans_up_on_ctrl_c() {
    let mut child = Command::new(RACK_DEV).arg("db-run").stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = None;
    let mut log = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(value) = line.trim().strip_prefix("database URL: ") {
            url = Some(value.to_string());
        }
        if let Some(value) = line.trim().strip_prefix("server log:") {
            log = Some(std::path::PathBuf::from(value.trim()));
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let url = url.expect("db-run prints the database URL");
    let data_dir = log.expect("db-run prints the log path").parent().unwrap().to_path_buf();
    assert!(data_dir.exists());

    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let version: String = client.query_one("SELECT version FROM db_metadata", &[]).await.unwrap().get(0);
    assert_eq!(version, nexus::db::schema_version::SCHEMA_VERSION);
    drop(client);

    // db-upgrade against the running server has nothing to do.
    let output = Command::new(RACK_DEV).args(["db-upgrade", "--database-url", &url]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("nothing to do"), "{output:?}");

    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "db-run exited with {status}");
    assert!(lines.any(|line| line.unwrap().contains("stopped")));
    assert!(!data_dir.exists(), "{} was left behind", data_dir.display());
}

#[test]
fn db_upgrade_names_the_database_it_cannot_reach() {
    let url = "postgresql://postgres@127.0.0.1:1/nowhere";
    let output = Command::new(RACK_DEV).args(["db-upgrade", "--database-url", url]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(url), "{stderr}");
}
