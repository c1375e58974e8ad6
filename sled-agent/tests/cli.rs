//! The `sled-agent` binary's command line. (Having an integration test here
//! also makes `cargo test --workspace` build the binary, which the end-to-end
//! tests in `tests/` run.)

use std::process::Command;

const SLED_AGENT: &str = env!("CARGO_BIN_EXE_sled-agent");

#[test]
fn a_missing_config_file_is_named() {
    let output = Command::new(SLED_AGENT)
        .args(["--config", "/nonexistent/sled.toml"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("reading config file /nonexistent/sled.toml"), "{text}");
}

#[test]
fn a_config_with_an_unspecified_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/sled-agent/config.toml"))
            .unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, shipped.replace("127.0.0.1:12345", "0.0.0.0:12345")).unwrap();
    let output =
        Command::new(SLED_AGENT).arg("--config").arg(&path).env_remove("RUST_BACKTRACE").output().unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("sled_agent_api.listen is 0.0.0.0:12345"), "{text}");
}
