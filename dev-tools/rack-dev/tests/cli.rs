//! rack-dev's command line without a rack.

use std::process::Command;

/// Expected errors read as a message and its causes, never a backtrace,
/// even with RUST_BACKTRACE=1 (anyhow captures one then).
#[test]
fn errors_never_print_a_backtrace() {
    let dir = camino_tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_rack-dev"))
        .args(["repo", "list"])
        .env("RACK_DEV_CURRENT", dir.path().join("none.json"))
        .env_remove("RACK_NEXUS_URL")
        .env_remove("RACK_TOKEN")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.starts_with("error: no Nexus to talk to"), "{text}");
    assert!(!text.contains("backtrace") && !text.contains("\n   0:"), "{text}");
}
