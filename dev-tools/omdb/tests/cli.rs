//! omdb's command line without a rack. (Having an integration test here also
//! makes `cargo test --workspace` build the binary, which the end-to-end tests
//! in `tests/` run.)

use std::process::Command;

const OMDB: &str = env!("CARGO_BIN_EXE_omdb");

#[test]
fn without_a_database_or_a_rack_it_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(OMDB)
        .args(["db", "sleds"])
        .env("RACK_DEV_CURRENT", dir.path().join("none.json"))
        .env_remove("OMDB_DB_URL")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("--db-url") && text.contains("OMDB_DB_URL") && text.contains("rack-dev run-all"),
        "{text}"
    );
}

/// Expected errors read as a message and its causes, never a backtrace,
/// even with RUST_BACKTRACE=1 (anyhow captures one then).
#[test]
fn errors_never_print_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(OMDB)
        .args(["db", "sleds"])
        .env("RACK_DEV_CURRENT", dir.path().join("none.json"))
        .env_remove("OMDB_DB_URL")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.starts_with("error: no database to read"), "{text}");
    assert!(!text.contains("backtrace") && !text.contains("\n   0:"), "{text}");
}
