//! tuf-forge's command line. (Having an integration test here also makes
//! `cargo test --workspace` build the binary, which the end-to-end tests in
//! `tests/` run.)

use std::process::Command;

const FORGE: &str = env!("CARGO_BIN_EXE_tuf-forge");

#[test]
fn keygen_root_and_repo_make_a_signed_zip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let output =
            Command::new(FORGE).args(args).current_dir(d).env_remove("RUST_BACKTRACE").output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    run(&["keygen", "--out", "key.der"]);
    run(&["root", "--key", "key.der", "--out", "root.json"]);
    let root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("root.json")).unwrap()).unwrap();
    assert_eq!(root["signed"]["_type"], "root");
    assert_eq!(root["signatures"].as_array().unwrap().len(), 1);
    run(&[
        "repo",
        "--key",
        "key.der",
        "--root",
        "root.json",
        "--system-version",
        "9.9.9",
        "--artifact",
        "a:1:k:1KiB",
        "--out",
        "r.zip",
    ]);
    let zip = std::fs::read(d.join("r.zip")).unwrap();
    assert_eq!(&zip[..4], b"PK\x03\x04");
}

#[test]
fn a_malformed_artifact_is_explained() {
    let output = Command::new(FORGE)
        .args([
            "repo",
            "--key",
            "k",
            "--root",
            "r",
            "--system-version",
            "1",
            "--artifact",
            "only:three:parts",
            "--out",
            "x",
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("name:version:kind:SIZE_OR_PATH"));
}

/// Expected errors read as a message and its causes, never a backtrace,
/// even with RUST_BACKTRACE=1 (anyhow captures one then).
#[test]
fn errors_never_print_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(FORGE)
        .args(["root", "--key", "missing.der", "--out", "root.json"])
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.starts_with("error: ") && text.contains("missing.der"), "{text}");
    assert!(!text.contains("backtrace") && !text.contains("\n   0:"), "{text}");
}
