//! DESIGN invariant 3, watched while it could break: no partially written or
//! wrong-hash file is ever visible under an artifact's name.
//!
//! Checking the disk afterwards cannot tell a correct store from one that
//! writes under the final name and deletes the file once the hash turns out
//! wrong: both end with nothing wrong on disk. So an inotify watcher follows
//! every M.2's `artifacts/` directory while one sled takes concurrent PUTs
//! (right bytes, wrong bytes, a truncated body, a slow body), copies from a
//! lying, a resetting, a stalling and an honest depot, and a config change
//! that makes its reconciler delete an artifact in the middle of it all.
//! For every event on an artifact name (64 lowercase hex digits):
//!
//! - a file created, modified or closed after writing is a violation: a
//!   correct store only renames finished, verified temp files there (from
//!   `artifacts/tmp/`, which the watch does not cover);
//! - a file renamed in is opened at once and hashed: bytes that hash to
//!   anything but its name are a violation. One already gone when opened is
//!   recorded as vanished. Only the reconciler deletes artifacts, so the
//!   test allows that only for the artifact it dropped; a store that renames
//!   before it checks the hash and then deletes at once shows up this way,
//!   because the watcher loses the race to open the file;
//! - a queue overflow is a violation too, since the watch would have gaps.
//!
//! Verified renames must cover every (artifact, M.2) pair that lands, so a
//! watch that saw nothing cannot pass.

use camino::{Utf8Path, Utf8PathBuf};
use common::ArtifactHash;
use common::api::sled_agent::ArtifactCopyFromDepotBody;
use futures::future::{BoxFuture, join_all};
use futures::{FutureExt, StreamExt};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use integration_tests::TestSled;
use integration_tests::fake_depot::{Behavior, FakeDepot};
use integration_tests::sled_agent_client::{Client, Error as ClientError};
use integration_tests::synthetic::{Artifact, NO_NEXUS, artifact, config};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

/// Where the resetting depot breaks its first response.
const RESET_AT: usize = 300_000;

fn copy_body(url: String) -> ArtifactCopyFromDepotBody {
    ArtifactCopyFromDepotBody { depot_base_url: url, alternates: Vec::new(), fallback: None }
}

// The PUT helpers return what went wrong rather than panic, so that a broken
// store is reported by what the watch saw, not by its first failed request.

/// PUTs the right bytes under `hash`; they must land on both M.2s.
async fn put(
    client: &Client,
    hash: ArtifactHash,
    generation: u64,
    body: impl Into<reqwest::Body>,
) -> Result<(), String> {
    match client.artifact_put(&hash, generation, body).await {
        Ok(response) if response.successful_writes == 2 => Ok(()),
        Ok(response) => Err(format!("PUT of {hash} landed on {} M.2s, not 2", response.successful_writes)),
        Err(error) => Err(format!("PUT of {hash} failed: {error}")),
    }
}

/// PUTs bytes that do not match `hash`; they must be refused.
async fn put_wrong(client: &Client, hash: ArtifactHash, bytes: Vec<u8>) -> Result<(), String> {
    match client.artifact_put(&hash, 2, bytes).await {
        Err(ClientError::ErrorResponse(response))
            if response.status() == 400 && response.error_code.as_deref() == Some("HASH_MISMATCH") =>
        {
            Ok(())
        }
        other => Err(format!("PUT of wrong bytes under {hash}: expected 400 HASH_MISMATCH, got {other:?}")),
    }
}

/// The artifact's bytes sent slowly, so that the write is still going on
/// when the config changes and the other writes start.
fn trickled(artifact: &Artifact) -> reqwest::Body {
    let chunks: Vec<Vec<u8>> = artifact.bytes.chunks(256 << 10).map(<[u8]>::to_vec).collect();
    reqwest::Body::wrap_stream(futures::stream::iter(chunks).then(|chunk| async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        Ok::<_, std::io::Error>(chunk)
    }))
}

/// Whether `condition` came true within `seconds`.
async fn eventually(seconds: u64, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !condition().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Two M.2 directories under `root`, with their datasets made beforehand so
/// that the watch is in place before the sled writes anything.
fn m2_dirs(root: &Utf8Path, sled: &str) -> Vec<Utf8PathBuf> {
    let dirs: Vec<Utf8PathBuf> = (0..2).map(|slot| root.join(format!("{sled}-m2-{slot}"))).collect();
    for dir in &dirs {
        std::fs::create_dir_all(dir.join("artifacts").join("tmp")).unwrap();
    }
    dirs
}

async fn sled_on(m2_dirs: &[Utf8PathBuf]) -> TestSled {
    TestSled::start_with(NO_NEXUS, |config| {
        config.storage.m2_dirs = m2_dirs.to_vec();
        config.storage.m2_count = 2;
        // The stalled depot costs this long; the shortest keeps the test fast.
        config.copy.read_timeout_secs = 1;
    })
    .await
}

fn is_artifact_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn sha256_hex(path: &Utf8Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// What the watcher saw of one event on an artifact name.
struct Observation {
    path: Utf8PathBuf,
    event: &'static str,
    outcome: Outcome,
}

#[derive(PartialEq)]
enum Outcome {
    /// Renamed in, and its bytes hash to its name.
    Verified,
    /// Renamed in, but deleted before the watcher could open it.
    Vanished,
    /// Deleted or renamed away.
    Removed,
    Violation(String),
}

impl fmt::Display for Observation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Observation { path, event, outcome } = self;
        match outcome {
            Outcome::Verified => write!(f, "{event} on {path}: hashes to its name"),
            Outcome::Vanished => write!(f, "{event} on {path}: gone before it could be opened"),
            Outcome::Removed => write!(f, "{event} on {path}"),
            Outcome::Violation(why) => write!(f, "{event} on {path}: {why}"),
        }
    }
}

/// Events that only a store writing in place produces on an artifact name.
const WRITES_IN_PLACE: [(EventMask, &str); 3] = [
    (EventMask::CREATE, "IN_CREATE"),
    (EventMask::MODIFY, "IN_MODIFY"),
    (EventMask::CLOSE_WRITE, "IN_CLOSE_WRITE"),
];

/// An inotify watch of artifact datasets on a thread of its own, so that a
/// renamed-in file is opened while the sled's runtime is busy elsewhere.
struct NameWatcher {
    wake_dir: Utf8PathBuf,
    thread: std::thread::JoinHandle<Vec<Observation>>,
}

impl NameWatcher {
    /// Watches `datasets` from the moment this returns. `wake_dir` (created
    /// here) is how `stop` reaches the thread blocked in its read.
    fn start(datasets: &[Utf8PathBuf], wake_dir: Utf8PathBuf) -> NameWatcher {
        std::fs::create_dir(&wake_dir).unwrap();
        let inotify = Inotify::init().expect("inotify is available");
        let mask = WatchMask::CREATE
            | WatchMask::MODIFY
            | WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE;
        let datasets: HashMap<WatchDescriptor, Utf8PathBuf> = datasets
            .iter()
            .map(|dataset| {
                (inotify.watches().add(dataset, mask).expect("watching a dataset"), dataset.clone())
            })
            .collect();
        let wake = inotify.watches().add(&wake_dir, WatchMask::CREATE).expect("watching the wake dir");
        let thread = std::thread::spawn(move || watch(inotify, datasets, wake));
        NameWatcher { wake_dir, thread }
    }

    /// Ends the watch once every event before this call has been handled:
    /// the wake event is queued behind them.
    fn stop(self) -> Vec<Observation> {
        std::fs::File::create(self.wake_dir.join("stop")).unwrap();
        self.thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

fn watch(
    mut inotify: Inotify,
    datasets: HashMap<WatchDescriptor, Utf8PathBuf>,
    wake: WatchDescriptor,
) -> Vec<Observation> {
    let mut observations = Vec::new();
    let mut buffer = vec![0; 64 << 10];
    loop {
        let mut woken = false;
        for event in inotify.read_events_blocking(&mut buffer).expect("reading inotify events") {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                observations.push(Observation {
                    path: "(the watched datasets)".into(),
                    event: "IN_Q_OVERFLOW",
                    outcome: Outcome::Violation("the kernel dropped events, so the watch has gaps".into()),
                });
            } else if event.wd == wake {
                woken = true;
            } else if let Some(name) =
                event.name.and_then(|name| name.to_str()).filter(|n| is_artifact_name(n))
            {
                observations.push(observe(datasets[&event.wd].join(name), event.mask));
            }
        }
        if woken {
            return observations;
        }
    }
}

fn observe(path: Utf8PathBuf, mask: EventMask) -> Observation {
    if mask.contains(EventMask::MOVED_TO) {
        let outcome = match sha256_hex(&path) {
            Ok(actual) if path.file_name() == Some(actual.as_str()) => Outcome::Verified,
            Ok(actual) => Outcome::Violation(format!("renamed in with bytes whose sha256 is {actual}")),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Outcome::Vanished,
            Err(error) => Outcome::Violation(format!("renamed in but unreadable: {error}")),
        };
        return Observation { path, event: "IN_MOVED_TO", outcome };
    }
    if let Some((_, event)) = WRITES_IN_PLACE.iter().find(|(bit, _)| mask.contains(*bit)) {
        let why =
            "written under the artifact's name (a correct store only renames a verified temp file there)";
        return Observation { path, event, outcome: Outcome::Violation(why.into()) };
    }
    let event = if mask.contains(EventMask::MOVED_FROM) { "IN_MOVED_FROM" } else { "IN_DELETE" };
    Observation { path, event, outcome: Outcome::Removed }
}

/// The end state: `dataset` holds exactly `expected`, each hashing to its name.
fn assert_holds_exactly(dataset: &Utf8Path, expected: &[&Artifact]) {
    let held: BTreeSet<String> = std::fs::read_dir(dataset)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| is_artifact_name(name))
        .collect();
    let wanted: BTreeSet<String> = expected.iter().map(|a| a.hash.to_string()).collect();
    assert_eq!(held, wanted, "the artifacts in {dataset}");
    for name in held {
        assert_eq!(sha256_hex(&dataset.join(&name)).unwrap(), name, "{dataset}/{name} hashes to its name");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wrong_bytes_ever_appear_under_an_artifact_name() {
    let dir = camino_tempfile::tempdir().unwrap();
    let target_m2s = m2_dirs(dir.path(), "target");
    let source_m2s = m2_dirs(dir.path(), "source");
    let target_datasets: Vec<Utf8PathBuf> = target_m2s.iter().map(|m2| m2.join("artifacts")).collect();
    let source_datasets: Vec<Utf8PathBuf> = source_m2s.iter().map(|m2| m2.join("artifacts")).collect();
    let watcher = NameWatcher::start(
        &[target_datasets.clone(), source_datasets.clone()].concat(),
        dir.path().join("wake"),
    );
    let target = sled_on(&target_m2s).await;
    let source = sled_on(&source_m2s).await;
    let client = target.client();

    let dropped = artifact(1, 1 << 20);
    let a = artifact(2, 4 << 20);
    let b = artifact(3, 2 << 20);
    let c = artifact(4, 2 << 20);
    let lied = artifact(5, 1 << 20);
    let resumed = artifact(6, 2 << 20);
    let stalled = artifact(7, 1 << 20);
    let copied = artifact(8, 2 << 20);
    let kept = [&a, &b, &c, &lied, &resumed, &stalled, &copied];
    client.artifact_config_put(&config(1, &[&kept[..], &[&dropped]].concat())).await.unwrap();
    source.client().artifact_config_put(&config(1, &[&copied])).await.unwrap();
    put(&source.client(), copied.hash, 1, copied.bytes.clone()).await.unwrap();
    put(&client, dropped.hash, 1, dropped.bytes.clone()).await.unwrap();

    // A slow PUT admitted at generation 1 (its temp files exist) is still
    // writing when generation 2 arrives.
    let slow = tokio::spawn({
        let client = client.clone();
        let (hash, body) = (a.hash, trickled(&a));
        async move { put(&client, hash, 1, body).await }
    });
    let admitted = eventually(5, async || {
        target_m2s.iter().all(|m2| {
            std::fs::read_dir(m2.join("artifacts/tmp"))
                .unwrap()
                .any(|entry| entry.unwrap().file_name().to_string_lossy().starts_with(&a.hash.to_string()))
        })
    })
    .await;

    let lying = FakeDepot::start(lied.bytes.clone(), Behavior::WrongBytes(artifact(9, 1 << 20).bytes)).await;
    let resetting = FakeDepot::start(resumed.bytes.clone(), Behavior::ResetAfter(RESET_AT)).await;
    let stalling = FakeDepot::start(stalled.bytes.clone(), Behavior::StallAfter(1000)).await;
    for (artifact, depot_url) in [
        (&lied, lying.base_url()),
        (&resumed, resetting.base_url()),
        (&stalled, stalling.base_url()),
        (&copied, source.depot_url()),
    ] {
        client.artifact_copy_from_depot(&artifact.hash, 1, &copy_body(depot_url)).await.unwrap();
    }

    // The reconciler deletes `dropped` while the copies and the slow PUT run.
    client.artifact_config_put(&config(2, &kept)).await.unwrap();
    let mut wrong_a = a.bytes.clone();
    *wrong_a.last_mut().unwrap() ^= 1;
    let truncated_c = c.bytes[..c.bytes.len() / 2].to_vec();
    let wave: Vec<BoxFuture<'_, Result<(), String>>> = vec![
        put(&client, a.hash, 2, a.bytes.clone()).boxed(),
        put(&client, a.hash, 2, a.bytes.clone()).boxed(),
        put(&client, b.hash, 2, b.bytes.clone()).boxed(),
        put(&client, c.hash, 2, c.bytes.clone()).boxed(),
        put_wrong(&client, a.hash, wrong_a).boxed(),
        put_wrong(&client, b.hash, artifact(10, 2 << 20).bytes).boxed(),
        put_wrong(&client, c.hash, truncated_c).boxed(),
    ];
    let mut problems: Vec<String> = join_all(wave).await.into_iter().filter_map(Result::err).collect();
    problems.extend(slow.await.unwrap().err());

    let landed = [&a, &b, &c, &resumed, &copied];
    let settled = eventually(15, async || {
        let list = client.artifact_list().await.unwrap().into_inner();
        list.copies_in_flight.is_empty()
            && landed.iter().all(|artifact| list.list.get(&artifact.hash) == Some(&2))
            && [&lied, &stalled].iter().all(|artifact| list.copy_failures.contains_key(&artifact.hash))
    })
    .await;
    // A broken store may also make no temp files, lose artifacts or never
    // settle; what the watch saw is the cause worth reporting, so it comes
    // first.
    let observations = watcher.stop();
    // A write in place modifies its file once per chunk: one line each.
    let mut violations: BTreeMap<String, usize> = BTreeMap::new();
    for o in observations.iter().filter(|o| matches!(o.outcome, Outcome::Violation(_))) {
        *violations.entry(o.to_string()).or_default() += 1;
    }
    assert!(
        violations.is_empty(),
        "invariant 3 broken while writes ran:\n{}",
        violations
            .iter()
            .map(|(line, times)| format!("{line} ({times} times)"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let unexplained: Vec<String> = observations
        .iter()
        .filter(|o| o.outcome == Outcome::Vanished && o.path.file_name() != Some(&dropped.hash.to_string()))
        .map(|o| o.to_string())
        .collect();
    assert!(
        unexplained.is_empty(),
        "artifacts still in the config were deleted right after their rename, as by a store that renames \
         before it checks the hash:\n{}",
        unexplained.join("\n")
    );
    assert!(problems.is_empty(), "PUTs went wrong:\n{}", problems.join("\n"));
    assert!(admitted, "the slow PUT never made its temp files");
    assert!(settled, "timed out waiting until every copy has landed or been given up");
    assert!(lying.served_bytes() > 0, "the lying depot served its wrong bytes");
    assert!(
        resetting.ranges().contains(&Some(format!("bytes={RESET_AT}-"))),
        "the copy from the resetting depot resumed with a Range: {:?}",
        resetting.ranges()
    );
    assert!(
        stalling.served_bytes() > 0 && stalling.ranges().len() > 1,
        "the stalled copy timed out and tried to resume: {:?}",
        stalling.ranges()
    );

    let verified: BTreeSet<&Utf8Path> =
        observations.iter().filter(|o| o.outcome == Outcome::Verified).map(|o| o.path.as_path()).collect();
    let expected: Vec<Utf8PathBuf> = target_datasets
        .iter()
        .flat_map(|dataset| [&a, &b, &c, &resumed, &copied].map(|x| dataset.join(x.hash.to_string())))
        .chain(source_datasets.iter().map(|dataset| dataset.join(copied.hash.to_string())))
        .collect();
    let unseen: Vec<&Utf8PathBuf> =
        expected.iter().filter(|path| !verified.contains(path.as_path())).collect();
    assert!(unseen.is_empty(), "the watch saw no verified rename of {unseen:?}");
    // The reconciler may delete `dropped` before the watch reads it back:
    // then the watch saw its rename as a file that vanished, which is fine
    // for the one artifact the config dropped.
    let dropped_seen = target_datasets.iter().all(|dataset| {
        let path = dataset.join(dropped.hash.to_string());
        observations
            .iter()
            .any(|o| o.path == path && matches!(o.outcome, Outcome::Verified | Outcome::Vanished))
    });
    assert!(dropped_seen, "the watch never saw `dropped` renamed into place on every M.2");
    eprintln!(
        "{} observations, {} verified renames for {} (artifact, M.2) pairs that landed",
        observations.len(),
        observations.iter().filter(|o| o.outcome == Outcome::Verified).count(),
        expected.len()
    );

    for dataset in &target_datasets {
        assert_holds_exactly(dataset, &landed);
    }
    for dataset in &source_datasets {
        assert_holds_exactly(dataset, &[&copied]);
    }
}
