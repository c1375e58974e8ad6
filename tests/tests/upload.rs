//! Repository upload through the external API: the good paths, and every
//! kind of bad input, each of which must get a 4xx that names the problem and
//! leave no rows and no staged files behind.

use camino::Utf8Path;
use integration_tests::TestNexus;
use integration_tests::repos::{RepoFactory, in_days, raw_zip, upload};

/// Everything an upload can leave behind: row counts and staged files.
#[derive(Debug, PartialEq, Eq)]
struct Traces {
    repos: i64,
    artifacts: i64,
    links: i64,
    generation: i64,
    staged: Vec<String>,
}

async fn traces(nexus: &TestNexus) -> Traces {
    let (client, connection) = tokio_postgres::connect(nexus.db.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM tuf_repo), (SELECT count(*) FROM tuf_artifact), \
             (SELECT count(*) FROM tuf_repo_artifact), (SELECT generation FROM tuf_generation)",
            &[],
        )
        .await
        .unwrap();
    let mut staged = Vec::new();
    for sub in ["artifacts", "uploads"] {
        for entry in std::fs::read_dir(nexus.staging_dir().join(sub)).unwrap() {
            staged.push(format!("{sub}/{}", entry.unwrap().file_name().to_str().unwrap()));
        }
    }
    staged.sort();
    Traces { repos: row.get(0), artifacts: row.get(1), links: row.get(2), generation: row.get(3), staged }
}

async fn add_trust_root(nexus: &TestNexus, factory: &RepoFactory) {
    nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
}

fn message(body: &serde_json::Value) -> String {
    body["message"].as_str().unwrap_or_default().to_string()
}

fn write(dir: &Utf8Path, name: &str, bytes: &[u8]) -> camino::Utf8PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test]
async fn upload_reupload_and_shared_artifacts() {
    let nexus = TestNexus::start().await;
    let factory = RepoFactory::new().await;
    add_trust_root(&nexus, &factory).await;
    let first = factory.build(&RepoFactory::spec("1.0.0", &[("os", 300_000), ("sp", 5000)], 1)).await;

    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &first).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "inserted");
    assert_eq!(body["repo"]["system_version"], "1.0.0");
    assert_eq!(body["repo"]["file_name"], first.file_name().unwrap());
    let artifacts = body["repo"]["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 2);
    let staged = traces(&nexus).await.staged;
    assert_eq!(staged.len(), 2, "both artifacts are staged for replication: {staged:?}");

    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &first).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("already_exists")), "{body}");

    // Another version that shares "os" (same seed, same bytes, same id).
    let mut spec = RepoFactory::spec("2.0.0", &[("os", 300_000), ("sp", 5000)], 1);
    spec.artifacts[1].version = "2.0.0".into();
    let second = factory.build(&spec).await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &second).await;
    assert_eq!(status, 200, "{body}");
    let after = traces(&nexus).await;
    assert_eq!((after.repos, after.artifacts, after.links), (2, 3, 4), "os is linked, not duplicated");

    let client = nexus.external_client();
    let view = client.repository_view("2.0.0").await.unwrap().into_inner();
    assert_eq!(view.artifacts.len(), 2);
    let page =
        client.repository_list(Some(std::num::NonZeroU32::new(1).unwrap()), None).await.unwrap().into_inner();
    assert_eq!(page.items[0].system_version, "2.0.0", "newest first");
    let next = client.repository_list(None, page.next_page.as_deref()).await.unwrap().into_inner();
    assert_eq!(next.items.iter().map(|r| r.system_version.as_str()).collect::<Vec<_>>(), ["1.0.0"]);
}

#[tokio::test]
async fn trust_roots_are_managed_and_checked() {
    let nexus = TestNexus::start().await;
    let client = nexus.external_client();
    let factory = RepoFactory::new().await;
    let created = client.trust_root_create(&factory.root_json()).await.unwrap().into_inner();
    assert_eq!(client.trust_root_list().await.unwrap().into_inner().len(), 1);
    assert_eq!(
        client.trust_root_view(&created.id).await.unwrap().into_inner().root_role,
        factory.root_json()
    );

    let mut broken = factory.root_json();
    let signature = broken["signatures"][0]["sig"].as_str().unwrap().to_string();
    let flipped = if signature.starts_with('0') { "1" } else { "0" };
    broken["signatures"][0]["sig"] = serde_json::Value::String(format!("{flipped}{}", &signature[1..]));
    let response = reqwest::Client::new()
        .post(format!("{}/v1/system/update/trust-roots", nexus.external_url()))
        .bearer_auth(&nexus.token)
        .json(&broken)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(message(&body).contains("signatures do not verify"), "{body}");
    assert_eq!(client.trust_root_list().await.unwrap().into_inner().len(), 1, "no row for the broken root");
    let response = reqwest::Client::new()
        .post(format!("{}/v1/system/update/trust-roots", nexus.external_url()))
        .bearer_auth(&nexus.token)
        .json(&serde_json::json!({"hello": "world"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);

    client.trust_root_delete(&created.id).await.unwrap();
    assert!(client.trust_root_list().await.unwrap().into_inner().is_empty());
    assert_eq!(client.trust_root_delete(&created.id).await.unwrap_err().status().unwrap().as_u16(), 404);
}

#[tokio::test]
async fn requests_without_the_token_are_refused() {
    let nexus = TestNexus::start().await;
    let factory = RepoFactory::new().await;
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 1000)], 1)).await;
    let before = traces(&nexus).await;
    for token in [None, Some("wrong")] {
        let (status, body) = upload(&nexus.external_url(), token, &zip).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(message(&body), "missing or invalid bearer token");
    }
    let response =
        reqwest::get(format!("{}/v1/system/update/trust-roots", nexus.external_url())).await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(traces(&nexus).await, before);
}

/// Every bad upload: its status, a phrase its message must contain, and no
/// trace left behind.
#[tokio::test]
async fn bad_input_is_refused_and_leaves_nothing_behind() {
    let nexus = TestNexus::start_with(|config| config.updates.max_compression_ratio = 50).await;
    let factory = RepoFactory::new().await;
    add_trust_root(&nexus, &factory).await;
    let good = factory.build(&RepoFactory::spec("1.0.0", &[("os", 200_000), ("sp", 3000)], 1)).await;
    let (status, _) = upload(&nexus.external_url(), Some(&nexus.token), &good).await;
    assert_eq!(status, 200);
    let good_bytes = std::fs::read(&good).unwrap();
    let dir = factory.dir.path();

    let mut cases: Vec<(&str, camino::Utf8PathBuf, u16, String)> = Vec::new();
    cases.push((
        "not a zip",
        write(dir, "not-a-zip.zip", b"this is not a zip file at all"),
        400,
        "not a readable zip archive".into(),
    ));
    cases.push((
        "truncated",
        write(dir, "truncated.zip", &good_bytes[..good_bytes.len() / 2]),
        400,
        "zip".into(),
    ));
    let mut junk = good_bytes.clone();
    junk.extend_from_slice(b"trailing junk!");
    cases.push((
        "trailing junk",
        write(dir, "junk.zip", &junk),
        400,
        "14 bytes after the zip archive's end record".into(),
    ));
    use tuf_forge::raw_zip::{
        RawEntry, append_end_record, build, claim_zip64_entries, prepend, zip64_sizes_near_the_limit,
    };
    cases.push((
        "a second end record appended",
        write(dir, "second-end.zip", &append_end_record(&good_bytes)),
        400,
        "second end-of-central-directory record".into(),
    ));
    cases.push((
        "data prepended, offsets fixed up",
        write(dir, "prepended.zip", &prepend(&good_bytes, 512)),
        400,
        "512 bytes of data before the zip archive's first entry".into(),
    ));
    let renamed = RawEntry::new("repo/targets/a", b"x").renamed_to("repo/targets/b");
    cases.push((
        "Unicode Path extra field",
        write(dir, "renamed.zip", &build(&[renamed], false)),
        400,
        "\"repo/targets/a\" carries a Unicode Path extra field".into(),
    ));
    let mut other_local = RawEntry::new("repo/targets/a", b"x");
    other_local.local_name = Some("repo/targets/b".into());
    cases.push((
        "local name differs",
        write(dir, "local-name.zip", &build(&[other_local], false)),
        400,
        "its local header disagrees with the central directory (name)".into(),
    ));
    let twice = [RawEntry::new("repo/targets/a", b"1"), RawEntry::new("repo/targets/a", b"2")];
    cases.push((
        "duplicate entries in a ZIP64 archive",
        write(dir, "duplicate64.zip", &build(&twice, true)),
        400,
        "\"repo/targets/a\" appears more than once".into(),
    ));
    cases.push((
        "a ZIP64 end record claiming 2^64 - 1 entries",
        write(
            dir,
            "many-entries.zip",
            &claim_zip64_entries(&build(&[RawEntry::new("repo/targets/a", b"x")], true), u64::MAX),
        ),
        400,
        "the zip has 18446744073709551615 entries, more than the limit of".into(),
    ));
    cases.push((
        "ZIP64 sizes near 2^64",
        write(dir, "huge-sizes.zip", &zip64_sizes_near_the_limit("repo/targets/a", b"x")),
        400,
        "\"repo/targets/a\": its local header disagrees with the central directory (size)".into(),
    ));
    let long_name = format!("repo/targets/{}", "n".repeat(1100));
    cases.push((
        "a name over 1,024 bytes",
        write(dir, "long-name.zip", &build(&[RawEntry::new(&long_name, b"x")], false)),
        400,
        "a name of 1113 bytes; at most 1024 are accepted".into(),
    ));
    cases.push((
        "path traversal",
        write(
            dir,
            "traversal.zip",
            &raw_zip(&[("repo/metadata/1.root.json", b"{}"), ("repo/../../etc/x", b"x")]),
        ),
        400,
        "\"repo/../../etc/x\" is not a safe relative path".into(),
    ));
    cases.push((
        "absolute path",
        write(dir, "absolute.zip", &raw_zip(&[("/etc/x", b"x")])),
        400,
        "\"/etc/x\" is not a safe relative path".into(),
    ));
    cases.push((
        "duplicate entries",
        write(dir, "duplicate.zip", &raw_zip(&[("repo/targets/a", b"1"), ("repo/targets/a", b"2")])),
        400,
        "\"repo/targets/a\" appears more than once".into(),
    ));
    cases.push((
        "outside repo/",
        write(dir, "outside.zip", &raw_zip(&[("README", b"hi")])),
        400,
        "\"README\" is outside repo/metadata/ and repo/targets/".into(),
    ));
    cases.push(("decompression bomb", bomb(dir), 400, "likely decompression bomb".into()));

    let other = RepoFactory::new().await;
    cases.push((
        "untrusted key",
        other.build(&RepoFactory::spec("1.0.1", &[("os", 1000)], 2)).await,
        400,
        "not signed by any of the 1 trusted roots".into(),
    ));
    let mut expired = RepoFactory::spec("1.0.2", &[("os", 1000)], 3);
    expired.expires = in_days(-1);
    cases.push(("expired metadata", factory.build(&expired).await, 400, "has expired".into()));
    let tampered = factory
        .build_then_tamper(&RepoFactory::spec("1.0.3", &[("os", 4000)], 4), |repo| {
            let target = std::fs::read_dir(repo.join("targets"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_str().unwrap().ends_with(".os-1.0.0.zone"))
                .unwrap();
            let mut bytes = std::fs::read(&target).unwrap();
            bytes[10] ^= 0xff;
            std::fs::write(&target, bytes).unwrap();
        })
        .await;
    cases.push(("target bytes differ", tampered, 400, "does not match targets.json".into()));
    let no_artifacts_json = factory
        .build_with_targets(&RepoFactory::spec("1.0.4", &[("os", 1000)], 5), |targets| {
            std::fs::remove_file(targets.join("artifacts.json")).unwrap();
        })
        .await;
    cases.push(("missing artifacts.json", no_artifacts_json, 400, "has no artifacts.json target".into()));
    let malformed = factory
        .build_with_targets(&RepoFactory::spec("1.0.5", &[("os", 1000)], 6), |targets| {
            std::fs::write(targets.join("artifacts.json"), b"{\"system_version\": 5}").unwrap();
        })
        .await;
    cases.push(("malformed artifacts.json", malformed, 400, "artifacts.json is not valid".into()));
    let dangling = factory
        .build_with_targets(&RepoFactory::spec("1.0.6", &[("os", 1000)], 7), |targets| {
            std::fs::remove_file(targets.join("os-1.0.0.zone")).unwrap();
        })
        .await;
    let absent = factory
        .build_then_tamper(&RepoFactory::spec("1.0.7", &[("os", 1000)], 8), |repo| {
            for entry in std::fs::read_dir(repo.join("targets")).unwrap() {
                let path = entry.unwrap().path();
                if path.to_str().unwrap().ends_with(".os-1.0.0.zone") {
                    std::fs::remove_file(path).unwrap();
                }
            }
        })
        .await;
    cases.push((
        "target signed but not in the archive",
        absent,
        400,
        "target \"os-1.0.0.zone\" is listed in targets.json but missing from the archive".into(),
    ));
    let unfetchable = factory
        .build_with_targets(&RepoFactory::spec("1.0.8", &[("os", 1000)], 9), |targets| {
            rename_target(targets, "os-1.0.0.zone", "os#1.zone")
        })
        .await;
    cases.push((
        "a target name that changes in a URL",
        unfetchable,
        400,
        "target \"os#1.zone\" cannot be fetched unambiguously".into(),
    ));
    cases.push((
        "target missing",
        dangling,
        400,
        "names target \"os-1.0.0.zone\" for artifact os 1.0.0 (zone), but targets.json has no such target"
            .into(),
    ));
    let same_version = factory.build(&RepoFactory::spec("1.0.0", &[("os", 200_000), ("sp", 3000)], 99)).await;
    cases.push((
        "same version, other contents",
        same_version,
        409,
        "system version 1.0.0 is already recorded with different contents".into(),
    ));

    let before = traces(&nexus).await;
    let server_dir = nexus.dir.path().to_string();
    for (name, file, expected_status, phrase) in cases {
        let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &file).await;
        assert_eq!(status, expected_status, "{name}: {body}");
        assert!(message(&body).contains(&phrase), "{name}: {:?} should contain {phrase:?}", message(&body));
        assert!(!message(&body).contains(&server_dir), "{name}: a server path in {body}");
        assert_eq!(traces(&nexus).await, before, "{name} left traces");
    }
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused() {
    let nexus = TestNexus::start_with(|config| config.external_api.request_body_max_bytes = 64 * 1024).await;
    let factory = RepoFactory::new().await;
    add_trust_root(&nexus, &factory).await;
    let before = traces(&nexus).await;
    let big = factory.build(&RepoFactory::spec("1.0.0", &[("os", 256 * 1024)], 1)).await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &big).await;
    assert_eq!(status, 413, "{body}");
    assert!(message(&body).contains("larger than the limit of 65536 bytes"), "{body}");
    assert_eq!(traces(&nexus).await, before);
}

#[tokio::test]
async fn without_trust_roots_uploads_say_how_to_add_one() {
    let nexus = TestNexus::start().await;
    let factory = RepoFactory::new().await;
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 1000)], 1)).await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &zip).await;
    assert_eq!(status, 400);
    assert!(message(&body).starts_with("no trusted roots configured"), "{body}");
}

/// 20 MiB of zeros: deflates about a thousandfold.
fn bomb(dir: &Utf8Path) -> camino::Utf8PathBuf {
    use std::io::Write;
    let path = dir.join("bomb.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("repo/targets/zeros", options).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..20 {
        zip.write_all(&zeros).unwrap();
    }
    zip.finish().unwrap();
    path
}

/// Renames a target file before signing and points artifacts.json at the
/// new name.
fn rename_target(targets: &Utf8Path, from: &str, to: &str) {
    std::fs::rename(targets.join(from), targets.join(to)).unwrap();
    let path = targets.join("artifacts.json");
    let document = std::fs::read_to_string(&path).unwrap().replace(from, to);
    std::fs::write(path, document).unwrap();
}

/// A target whose name changes when percent-encoded (a space, non-ASCII)
/// uploads, and what is staged is exactly the signed bytes (before, tough
/// verified `os%20image.zone` while the upload staged `os image.zone`, and
/// such a repository could not be uploaded at all).
#[tokio::test]
async fn targets_named_with_spaces_and_non_ascii_upload_verified() {
    let nexus = TestNexus::start().await;
    let factory = RepoFactory::new().await;
    add_trust_root(&nexus, &factory).await;
    let spec = RepoFactory::spec("1.0.0", &[("os", 20_000), ("sp", 3000)], 1);
    let mut signed = Vec::new();
    let zip = factory
        .build_with_targets(&spec, |targets| {
            rename_target(targets, "os-1.0.0.zone", "os image.zone");
            rename_target(targets, "sp-1.0.0.zone", "spé ünï.zone");
            for name in ["os image.zone", "spé ünï.zone"] {
                signed.push(std::fs::read(targets.join(name)).unwrap());
            }
        })
        .await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &zip).await;
    assert_eq!(status, 200, "{body}");
    for bytes in signed {
        use sha2::Digest;
        let hash = common::ArtifactHash(sha2::Sha256::digest(&bytes).into()).to_string();
        let staged = std::fs::read(nexus.staging_dir().join("artifacts").join(&hash)).unwrap();
        assert_eq!(staged, bytes, "the staged bytes are the signed ones");
    }
}

#[tokio::test]
async fn two_artifacts_may_name_one_target() {
    let nexus = TestNexus::start().await;
    let factory = RepoFactory::new().await;
    add_trust_root(&nexus, &factory).await;
    let spec = RepoFactory::spec("1.0.0", &[("os", 20_000)], 1);
    let zip = factory
        .build_with_targets(&spec, |targets| {
            let document = serde_json::json!({"system_version": "1.0.0", "artifacts": [
                {"name": "os", "version": "1.0.0", "kind": "zone", "target": "os-1.0.0.zone"},
                {"name": "os-alias", "version": "1.0.0", "kind": "zone", "target": "os-1.0.0.zone"},
            ]});
            std::fs::write(targets.join("artifacts.json"), document.to_string()).unwrap();
        })
        .await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &zip).await;
    assert_eq!(status, 200, "{body}");
    let artifacts = body["repo"]["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 2);
    assert_eq!(artifacts[0]["sha256"], artifacts[1]["sha256"]);
    assert_eq!(traces(&nexus).await.staged.len(), 1, "one staged file for both");
}

/// Staged repositories held for replication are bounded as a whole, queued
/// or already taken in by the replication task (before, the task's own list
/// grew without bound once it drained the queue). Beyond the bound an upload
/// gets 503 with Retry-After and leaves nothing behind.
#[tokio::test]
async fn staged_repositories_waiting_for_replication_are_bounded() {
    let nexus = TestNexus::start_with(|config| config.updates.handoff_capacity = 1).await;
    let factory = RepoFactory::new().await;
    add_trust_root(&nexus, &factory).await;
    let first = factory.build(&RepoFactory::spec("1.0.0", &[("os", 10_000)], 1)).await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &first).await;
    assert_eq!(status, 200, "{body}");
    // No sleds: replication takes the repository in and must keep it staged.
    let task = nexus.activate("tuf_artifact_replication").await;
    let status = integration_tests::rack::replication_status(&task);
    assert_eq!(status.local_repos.len(), 1);
    let before = traces(&nexus).await;

    let second = factory.build(&RepoFactory::spec("2.0.0", &[("os2", 10_000)], 2)).await;
    let response = reqwest::Client::new()
        .put(format!("{}/v1/system/update/repositories?file_name=second.zip", nexus.external_url()))
        .bearer_auth(&nexus.token)
        .body(std::fs::read(&second).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"), "{:?}", response.headers());
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(message(&body).contains("hand-off queue is full (1 staged"), "{body}");
    assert_eq!(traces(&nexus).await, before, "the refused upload left nothing");
}
