//! Interoperability with `tuftool` (crates.io) and `openssl`, as independent
//! producers and verifiers of TUF repositories: tuf-forge's output must load
//! with tuftool and have tuftool's layout, and a repository that tuftool
//! builds with an openssl key must upload.

use camino::{Utf8Path, Utf8PathBuf};
use integration_tests::repos::upload;
use integration_tests::{TestNexus, binary};
use std::collections::BTreeSet;
use std::process::Command;

/// tuftool, from PATH or cargo's bin directory (`dev-tools/install-prerequisites`
/// installs it).
fn tuftool() -> Utf8PathBuf {
    let cargo_home =
        std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap()));
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("tuftool"))
        .chain([std::path::PathBuf::from(format!("{cargo_home}/bin/tuftool"))])
        .find(|path| path.is_file())
        .map(|path| Utf8PathBuf::try_from(path).unwrap())
        .expect("tuftool is not installed: run dev-tools/install-prerequisites")
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn file_names(dir: &Utf8Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

const EXPIRES: &str = "2099-01-01T00:00:00Z";

#[test]
fn tuf_forge_output_loads_with_tuftool_and_has_its_layout() {
    let dir = camino_tempfile::tempdir().unwrap();
    let d = dir.path();
    let forge = binary("tuf-forge");
    run(Command::new(&forge).args(["keygen", "--out"]).arg(d.join("key.der")));
    run(Command::new(&forge)
        .arg("root")
        .arg("--key")
        .arg(d.join("key.der"))
        .arg("--out")
        .arg(d.join("root.json")));
    run(Command::new(&forge)
        .arg("repo")
        .arg("--key")
        .arg(d.join("key.der"))
        .arg("--root")
        .arg(d.join("root.json"))
        .args([
            "--system-version",
            "1.0.0",
            "--artifact",
            "os:1.0:host:64KiB",
            "--artifact",
            "sp:2.0:sp:1KiB",
        ])
        .args(["--expires", EXPIRES, "--out"])
        .arg(d.join("repo.zip")));
    let unzipped = d.join("unzipped");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(d.join("repo.zip")).unwrap()).unwrap();
    archive.extract(&unzipped).unwrap();
    let repo = unzipped.join("repo");

    // tuftool's verifier accepts it and yields the artifacts.
    let downloaded = d.join("downloaded");
    run(Command::new(tuftool())
        .arg("download")
        .arg("--root")
        .arg(d.join("root.json"))
        .arg("--metadata-url")
        .arg(format!("file://{}/metadata", repo))
        .arg("--targets-url")
        .arg(format!("file://{}/targets", repo))
        .arg(&downloaded));
    assert_eq!(
        file_names(&downloaded),
        ["artifacts.json", "os-1.0.host", "sp-2.0.sp"].map(String::from).into()
    );

    // tuftool create, given the same targets, key, root and expiry, writes
    // the same files.
    let created = d.join("tuftool-repo");
    run(Command::new(tuftool())
        .arg("create")
        .arg("--root")
        .arg(d.join("root.json"))
        .arg("-k")
        .arg(d.join("key.der"))
        .arg("--add-targets")
        .arg(&downloaded)
        .arg("--outdir")
        .arg(&created)
        .args(["--targets-version", "1", "--targets-expires", EXPIRES])
        .args(["--snapshot-version", "1", "--snapshot-expires", EXPIRES])
        .args(["--timestamp-version", "1", "--timestamp-expires", EXPIRES]));
    for sub in ["metadata", "targets"] {
        assert_eq!(
            file_names(&repo.join(sub)),
            file_names(&created.join(sub)),
            "{sub}/ differs from tuftool's"
        );
    }
}

#[tokio::test]
async fn a_repository_built_by_tuftool_with_an_openssl_key_uploads() {
    let dir = camino_tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("key.pem");
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&key));
    let root = d.join("root.json");
    run(Command::new(tuftool()).args(["root", "init"]).arg(&root));
    run(Command::new(tuftool()).args(["root", "expire"]).arg(&root).arg(EXPIRES));
    for role in ["root", "snapshot", "targets", "timestamp"] {
        run(Command::new(tuftool()).args(["root", "set-threshold"]).arg(&root).args([role, "1"]));
    }
    run(Command::new(tuftool()).args(["root", "add-key"]).arg(&root).arg("-k").arg(&key).args([
        "--role",
        "root",
        "--role",
        "snapshot",
        "--role",
        "targets",
        "--role",
        "timestamp",
    ]));
    run(Command::new(tuftool()).args(["root", "sign"]).arg(&root).arg("-k").arg(&key));

    let targets = d.join("targets");
    std::fs::create_dir(&targets).unwrap();
    std::fs::write(targets.join("host.img"), vec![7u8; 100_000]).unwrap();
    std::fs::write(
        targets.join("artifacts.json"),
        br#"{"system_version": "3.0.0", "artifacts": [{"name": "host", "version": "3.0.0", "kind": "os", "target": "host.img"}]}"#,
    )
    .unwrap();
    let out = d.join("out");
    run(Command::new(tuftool())
        .arg("create")
        .arg("--root")
        .arg(&root)
        .arg("-k")
        .arg(&key)
        .arg("--add-targets")
        .arg(&targets)
        .arg("--outdir")
        .arg(&out)
        .args(["--targets-version", "1", "--targets-expires", EXPIRES])
        .args(["--snapshot-version", "1", "--snapshot-expires", EXPIRES])
        .args(["--timestamp-version", "1", "--timestamp-expires", EXPIRES]));
    let zip = d.join("tuftool-repo.zip");
    tuf_forge::zip_repo(&out, &zip).unwrap();

    let nexus = TestNexus::start().await;
    let root_json: serde_json::Value = serde_json::from_slice(&std::fs::read(&root).unwrap()).unwrap();
    nexus.external_client().trust_root_create(&root_json).await.unwrap();
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &zip).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "inserted");
    assert_eq!(body["repo"]["artifacts"][0]["size"], 100_000);
}
