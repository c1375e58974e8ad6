//! The `nexus` binary's command line. (Having an integration test here also
//! makes `cargo test --workspace` build the binary, which the end-to-end tests
//! in `tests/` run.)

use std::process::Command;

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

#[test]
fn help_names_the_options() {
    let output = Command::new(NEXUS).arg("--help").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("--config") && text.contains("--database-url"), "{text}");
}

#[test]
fn a_missing_config_file_is_named() {
    let output = Command::new(NEXUS)
        .args(["--config", "/nonexistent/nexus.toml"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("reading config file /nonexistent/nexus.toml"), "{text}");
}
