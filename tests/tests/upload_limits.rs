//! Upload hardening over HTTP: trust roots that behave, limits on uploads
//! (concurrency, stalled bodies, names), server-side storage failures, and
//! the memory and disk an upload may use, measured on the real `nexus`
//! process. Every refusal asserts its status, a phrase naming the problem,
//! and that nothing was left behind.

use camino::Utf8Path;
use futures::StreamExt;
use integration_tests::TestNexus;
use integration_tests::processes::{NexusProcess, write_nexus_config};
use integration_tests::rack::wait_until;
use integration_tests::repos::{RepoFactory, in_days, upload};
use std::time::Duration;

fn message(body: &serde_json::Value) -> String {
    body["message"].as_str().unwrap_or_default().to_string()
}

/// Rows and files an upload could leave behind.
async fn leftovers(db_url: &str, staging: &Utf8Path) -> (i64, i64, usize) {
    let (client, connection) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT (SELECT count(*) FROM tuf_repo), (SELECT generation FROM tuf_generation)", &[])
        .await
        .unwrap();
    let files = ["artifacts", "uploads"]
        .iter()
        .map(|sub| std::fs::read_dir(staging.join(sub)).unwrap().count())
        .sum();
    (row.get(0), row.get(1), files)
}

async fn trust(nexus: &TestNexus, factory: &RepoFactory) {
    nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
}

/// An upload whose body sends `first` bytes, then waits for `release`.
fn held_upload(
    url: String,
    token: String,
    first: Vec<u8>,
    release: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<Result<reqwest::Response, reqwest::Error>> {
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
        futures::stream::once(async move {
            let _ = release.await;
            Err(std::io::Error::other("the test ends this body"))
        }),
    );
    tokio::spawn(
        reqwest::Client::new()
            .put(format!("{url}/v1/system/update/repositories?file_name=held.zip"))
            .bearer_auth(token)
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    )
}

/// Trust roots: an expired root never blocks one that verifies; adding an
/// expired or a duplicate root is refused; a root deleted during an upload
/// is re-checked when the repository is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_roots_that_expired_duplicate_or_vanish() {
    let nexus = TestNexus::start().await;
    let client = nexus.external_client();
    // A root that was trusted and has since expired (the API would refuse
    // to add it now), listed first.
    let old = RepoFactory::new().await;
    let expired_root = tuf_forge::make_root(&old.key, in_days(-1)).await.unwrap();
    let expired_json: serde_json::Value = serde_json::from_slice(&expired_root).unwrap();
    nexus.server.nexus().datastore.trust_root_add(expired_json.clone()).await.unwrap();
    let current = RepoFactory::new().await;
    trust(&nexus, &current).await;
    let zip = current.build(&RepoFactory::spec("1.0.0", &[("os", 5000)], 1)).await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &zip).await;
    assert_eq!(status, 200, "the expired first root did not block the current one: {body}");

    let refused = client.trust_root_create(&expired_json).await.unwrap_err();
    assert_eq!(refused.status().unwrap().as_u16(), 400);
    let text = format!("{refused:?}");
    assert!(text.contains("the trust root expired at"), "{text}");
    let duplicate = client.trust_root_create(&current.root_json()).await.unwrap_err();
    assert_eq!(duplicate.status().unwrap().as_u16(), 409);
    assert!(format!("{duplicate:?}").contains("already trusted"), "{duplicate:?}");

    // The root is deleted while the upload is between verification and
    // recording (a delay point holds it there, for this Nexus only).
    let id = nexus.server.nexus().id;
    fail::cfg("nexus::upload::before_insert", &format!("return({id}:1500)")).unwrap();
    let before = leftovers(nexus.db.url(), &nexus.staging_dir()).await;
    let second = current.build(&RepoFactory::spec("2.0.0", &[("os2", 5000)], 2)).await;
    let (url, token) = (nexus.external_url(), nexus.token.clone());
    let uploading = tokio::spawn(async move { upload(&url, Some(&token), &second).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let root_id = client
        .trust_root_list()
        .await
        .unwrap()
        .into_inner()
        .into_iter()
        .find(|root| root.root_role == current.root_json())
        .unwrap()
        .id;
    client.trust_root_delete(&root_id).await.unwrap();
    let (status, body) = uploading.await.unwrap();
    fail::remove("nexus::upload::before_insert");
    assert_eq!(status, 409, "{body}");
    assert!(message(&body).contains("was deleted during the upload"), "{body}");
    let after = leftovers(nexus.db.url(), &nexus.staging_dir()).await;
    assert_eq!(after, before, "no row, no generation bump, no staged or upload file");
}

/// Uploads beyond `max_concurrent_uploads` get 503 with Retry-After at
/// once; a stalled body is cut off with 408 after the idle timeout; a
/// `file_name` with control characters is refused. None leaves anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stalled_and_badly_named_uploads() {
    let nexus = TestNexus::start_with(|config| {
        config.updates.max_concurrent_uploads = 1;
        config.external_api.upload_idle_timeout_secs = 1;
    })
    .await;
    let factory = RepoFactory::new().await;
    trust(&nexus, &factory).await;
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 5000)], 1)).await;
    let bytes = std::fs::read(&zip).unwrap();
    let before = leftovers(nexus.db.url(), &nexus.staging_dir()).await;

    // This one holds the only slot, then stalls: cut off after 1 s.
    let (release, released) = tokio::sync::oneshot::channel();
    let stalled = held_upload(nexus.external_url(), nexus.token.clone(), bytes[..1000].to_vec(), released);
    wait_until("the held upload is being received", Duration::from_secs(10), async || {
        std::fs::read_dir(nexus.staging_dir().join("uploads")).unwrap().count() > 0
    })
    .await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &zip).await;
    assert_eq!(status, 503, "{body}");
    assert!(message(&body).contains("1 uploads are already running"), "{body}");
    let response = stalled.await.unwrap().unwrap();
    assert_eq!(response.status().as_u16(), 408);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        message(&body).contains("the upload stalled: nothing arrived for 1 s after 1000 bytes"),
        "{body}"
    );
    drop(release);

    let response = reqwest::Client::new()
        .put(format!("{}/v1/system/update/repositories", nexus.external_url()))
        .query(&[("file_name", "repo\u{7}.zip")])
        .bearer_auth(&nexus.token)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(message(&body).contains("without '/' or control characters"), "{body}");
    assert_eq!(leftovers(nexus.db.url(), &nexus.staging_dir()).await, before);
    // The slot came back: the same upload now succeeds.
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &zip).await;
    assert_eq!(status, 200, "{body}");
}

/// A 503 for "too many uploads" carries Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_uploads_says_when_to_retry() {
    let nexus = TestNexus::start_with(|config| config.updates.max_concurrent_uploads = 1).await;
    let (release, released) = tokio::sync::oneshot::channel();
    let held = held_upload(nexus.external_url(), nexus.token.clone(), vec![0; 100], released);
    wait_until("the held upload is being received", Duration::from_secs(10), async || {
        std::fs::read_dir(nexus.staging_dir().join("uploads")).unwrap().count() > 0
    })
    .await;
    let response = reqwest::Client::new()
        .put(format!("{}/v1/system/update/repositories?file_name=x.zip", nexus.external_url()))
        .bearer_auth(&nexus.token)
        .body(vec![0u8; 100])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    drop(release);
    let _ = held.await;
}

/// The staging disk fills up during an upload: 507, a message without any
/// server path, and nothing left (on a 4 MiB tmpfs, so it really is full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_staging_disk_is_507_and_names_no_server_path() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs for the staging area needs root");
        return;
    }
    let mount = camino_tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", mount.path().as_str()])
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs at {} failed", mount.path());
    struct Unmount(camino::Utf8PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0.as_str()).status();
        }
    }
    let _unmount = Unmount(mount.path().to_owned());
    let staging = mount.path().join("staging");
    let nexus = TestNexus::start_with(|config| config.updates.staging_dir = staging.clone()).await;
    let factory = RepoFactory::new().await;
    trust(&nexus, &factory).await;
    // Random bytes do not compress: an 8 MiB zip cannot fit.
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("os", 8 << 20)], 1)).await;
    let before = leftovers(nexus.db.url(), &staging).await;
    let (status, body) = upload(&nexus.external_url(), Some(&nexus.token), &zip).await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error_code"], "OUT_OF_SPACE", "{body}");
    assert!(message(&body).contains("storing the upload failed on the server"), "{body}");
    assert!(!message(&body).contains(mount.path().as_str()), "a server path in {body}");
    assert_eq!(leftovers(nexus.db.url(), &staging).await, before);
}

/// Peak resident memory of a process since the last reset.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// Bytes of the files under `dir`, as allocated on disk.
fn disk_use(dir: &Utf8Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else { continue };
            if metadata.is_dir() {
                stack.push(camino::Utf8PathBuf::try_from(entry.path()).unwrap());
            } else {
                total += metadata.blocks() * 512;
            }
        }
    }
    total
}

/// Samples `dir`'s disk use every few milliseconds until stopped; returns
/// the peak.
fn watch_disk(
    dir: camino::Utf8PathBuf,
) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(disk_use(&dir));
            std::thread::sleep(Duration::from_millis(2));
        }
        peak
    });
    (stop, sampler)
}

/// Memory and disk are bounded by what the upload is, not by what its zip
/// claims: on the real `nexus` process,
/// - a zip whose end record claims a central directory as large as the
///   file (64 MiB) is refused without reading it into memory (peak RSS
///   grows by far less than 64 MiB), and one claiming 2^64 - 1 entries is
///   refused on the count alone;
/// - a signed repository carrying 400 entries of 1 MiB of zeros that no
///   metadata names (a 400 KiB zip that would have inflated to 400 MiB on
///   disk) uploads, and the staging disk never holds more than the zip
///   plus the signed targets (and tough's cached metadata).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_disk_are_bounded_by_the_signed_contents() {
    const MIB: u64 = 1 << 20;
    let db = test_harness::TestDatabase::new().await;
    let dir = camino_tempfile::tempdir().unwrap();
    write_nexus_config(dir.path(), db.url(), |text| text);
    let nexus = NexusProcess::start(dir.path(), None);
    let pid = nexus.process.id();
    let factory = RepoFactory::new().await;
    nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();

    // The lying central directory.
    let mut lying = vec![0u8; 64 << 20];
    let eocd = lying.len() - 22;
    lying[eocd..eocd + 4].copy_from_slice(&0x0605_4b50u32.to_le_bytes());
    lying[eocd + 8..eocd + 10].copy_from_slice(&1u16.to_le_bytes());
    lying[eocd + 10..eocd + 12].copy_from_slice(&1u16.to_le_bytes());
    lying[eocd + 12..eocd + 16].copy_from_slice(&(eocd as u32).to_le_bytes());
    let lying_path = factory.dir.path().join("lying.zip");
    std::fs::write(&lying_path, &lying).unwrap();
    let baseline = peak_rss_bytes(pid);
    reset_peak_rss(pid);
    let (status, body) = upload(&nexus.external_url, Some(&nexus.token), &lying_path).await;
    assert_eq!(status, 400, "{body}");
    assert!(message(&body).contains("central directory is malformed"), "{body}");
    let growth = peak_rss_bytes(pid).saturating_sub(baseline);
    println!("lying central directory: peak RSS {} MiB over a {} MiB baseline", growth / MIB, baseline / MIB);
    assert!(growth < 32 * MIB, "the 64 MiB directory claim grew RSS by {} MiB", growth / MIB);

    // A ZIP64 end record claiming 2^64 - 1 entries: refused on the count,
    // before anything sized by it is allocated.
    let claiming = tuf_forge::raw_zip::claim_zip64_entries(
        &tuf_forge::raw_zip::build(&[tuf_forge::raw_zip::RawEntry::new("repo/targets/a", b"x")], true),
        u64::MAX,
    );
    let claiming_path = factory.dir.path().join("claiming.zip");
    std::fs::write(&claiming_path, &claiming).unwrap();
    let baseline = peak_rss_bytes(pid);
    reset_peak_rss(pid);
    let (status, body) = upload(&nexus.external_url, Some(&nexus.token), &claiming_path).await;
    assert_eq!(status, 400, "{body}");
    assert!(message(&body).contains("more than the limit of"), "{body}");
    let growth = peak_rss_bytes(pid).saturating_sub(baseline);
    println!(
        "2^64 - 1 entries claimed: peak RSS {} MiB over a {} MiB baseline",
        growth / MIB,
        baseline / MIB
    );
    assert!(growth < 32 * MIB, "the entry count claim grew RSS by {} MiB", growth / MIB);

    // Unreferenced entries of zeros.
    let spec = RepoFactory::spec("1.0.0", &[("os", 2 * MIB)], 1);
    let padded = factory
        .build_then_tamper(&spec, |repo| {
            let zeros = vec![0u8; MIB as usize];
            for n in 0..400 {
                std::fs::write(repo.join("targets").join(format!("zeros-{n}")), &zeros).unwrap();
            }
        })
        .await;
    let zip_bytes = std::fs::metadata(&padded).unwrap().len();
    let nexus_dir = dir.path().join("staging");
    let (stop, sampler) = watch_disk(nexus_dir);
    let (status, body) = upload(&nexus.external_url, Some(&nexus.token), &padded).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let signed_targets = 2 * MIB + 4096;
    println!("padded upload: zip {} KiB, peak staging disk {} KiB", zip_bytes / 1024, peak / 1024);
    assert!(
        peak <= zip_bytes + signed_targets + MIB,
        "staging peaked at {peak} bytes for a {zip_bytes}-byte zip with {signed_targets} bytes of targets"
    );
}
