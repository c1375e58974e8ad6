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
