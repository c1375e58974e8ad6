//! The artifact store on real directories, one test sled (`Sled`) at a time:
//! writes and their hash check, generations and the fail-closed ledger,
//! quota accounting, failing and returning M.2s, partial copies across
//! restarts, the verification cache and the scrub, and depot requests that
//! follow a write in progress. Restarts are real: the store is dropped and
//! opened again on the same directories. Cross-process behaviour (kill -9,
//! HTTP) is tested in `tests/tests/`.

use super::serve::Follower;
use super::write::Temp;
use super::*;
use crate::config::{CopyConfig, RequestLimits};
use bytes::Bytes;
use camino::Utf8Path;
use camino_tempfile::Utf8TempDir;
use common::api::sled_agent::ArtifactPutResponse;
use common::error_chain;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;

const QUOTA: u64 = 1 << 20;

struct Sled {
    dir: Utf8TempDir,
    m2_count: u32,
    store: Arc<ArtifactStore>,
}

fn log() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

async fn open_store(dir: &Utf8Path, m2_count: u32, quota: u64) -> ArtifactStore {
    let m2s =
        (0..m2_count).map(|slot| Arc::new(M2::new(slot, dir.join(format!("m2-{slot}")), quota))).collect();
    ArtifactStore::open(log(), m2s, CopyConfig::default(), RequestLimits::default(), 2).await.unwrap()
}

impl Sled {
    async fn new(m2_count: u32) -> Sled {
        Self::with_quota(m2_count, QUOTA).await
    }

    async fn with_quota(m2_count: u32, quota: u64) -> Sled {
        let dir = camino_tempfile::tempdir().unwrap();
        let store = Arc::new(open_store(dir.path(), m2_count, quota).await);
        Sled { dir, m2_count, store }
    }

    /// Simulates a restart: a new store on the same directories.
    async fn restart(self) -> Sled {
        let Sled { dir, m2_count, store } = self;
        drop(store);
        let store = Arc::new(open_store(dir.path(), m2_count, QUOTA).await);
        Sled { dir, m2_count, store }
    }

    fn m2(&self, slot: u32) -> &Arc<M2> {
        &self.store.m2s()[slot as usize]
    }

    /// Every file under every M.2 dataset, temp files included.
    fn files(&self) -> BTreeSet<String> {
        let mut files = BTreeSet::new();
        for m2 in self.store.m2s() {
            for dir in [m2.dataset(), m2.tmp_dir()] {
                for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                    if entry.file_type().unwrap().is_file() {
                        files.insert(format!("{}/{}", m2.slot, entry.file_name().to_str().unwrap()));
                    }
                }
            }
        }
        files
    }

    async fn configure(&self, generation: u64, artifacts: &[&Artifact]) {
        let config = ArtifactConfig {
            generation: Generation::new(generation),
            artifacts: artifacts.iter().map(|a| a.hash).collect(),
        };
        self.store.put_config(config).await.unwrap();
    }

    async fn put(&self, artifact: &Artifact) -> Result<ArtifactPutResponse, StoreError> {
        let generation = self.store.generation().await;
        let length = Some(artifact.bytes.len() as u64);
        self.store.put(artifact.hash, generation, length, chunks(&artifact.bytes)).await
    }
}

struct Artifact {
    bytes: Vec<u8>,
    hash: ArtifactHash,
}

fn artifact(seed: u8, size: usize) -> Artifact {
    let bytes: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let hash = ArtifactHash(Sha256::digest(&bytes).into());
    Artifact { bytes, hash }
}

/// The body in 4 KiB chunks, as a stream.
fn chunks(bytes: &[u8]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + use<> {
    let chunks: Vec<_> = bytes.chunks(4096).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    futures::stream::iter(chunks)
}

async fn read_back(store: &ArtifactStore, hash: &ArtifactHash) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let (DepotArtifact::Stored { mut file, length }, _permit) = store.open_for_depot(hash).await.unwrap()
    else {
        panic!("artifact {hash} is not stored");
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes.len() as u64, length);
    bytes
}

#[tokio::test]
async fn put_list_and_read_on_one_two_and_three_m2s() {
    for m2_count in 1..=3 {
        let sled = Sled::new(m2_count).await;
        let a = artifact(1, 10_000);
        let b = artifact(2, 0);
        sled.configure(1, &[&a, &b]).await;
        let response = sled.put(&a).await.unwrap();
        assert_eq!(
            response,
            ArtifactPutResponse { datasets: m2_count as usize, successful_writes: m2_count as usize }
        );
        sled.put(&b).await.unwrap();
        let list = sled.store.list().await;
        assert_eq!(list.generation, Generation::new(1));
        assert_eq!(list.list, [(a.hash, m2_count as usize), (b.hash, m2_count as usize)].into());
        assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes);
        assert!(read_back(&sled.store, &b.hash).await.is_empty());
        assert_eq!(sled.m2(0).used(), 10_000);
        assert_eq!(sled.files().len(), 2 * m2_count as usize, "no temp files remain");
    }
}

#[tokio::test]
async fn requests_must_match_the_generation_and_the_config() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 100);
    let stranger = artifact(9, 100);
    sled.configure(3, &[&a]).await;
    let error = sled.store.put(a.hash, Generation::new(2), None, chunks(&a.bytes)).await.unwrap_err();
    assert!(matches!(error, StoreError::GenerationMismatch { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "the sled holds artifact config generation 3; the request is for generation 2"
    );
    let error = sled.put(&stranger).await.unwrap_err();
    assert!(matches!(error, StoreError::NotInConfig { .. }), "{error}");
    assert!(sled.files().is_empty());
}

#[tokio::test]
async fn a_wrong_hash_leaves_nothing() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 50_000);
    sled.configure(1, &[&a]).await;
    let mut corrupted = a.bytes.clone();
    corrupted[25_000] ^= 1;
    let error = sled.store.put(a.hash, Generation::new(1), None, chunks(&corrupted)).await.unwrap_err();
    let StoreError::HashMismatch { expected, actual, bytes } = error else { panic!("{error:?}") };
    assert_eq!((expected, bytes), (a.hash, 50_000));
    assert_ne!(actual, a.hash);
    assert!(sled.files().is_empty(), "{:?}", sled.files());
    assert_eq!(sled.m2(0).used(), 0, "the reservation was returned");
    assert!(sled.store.list().await.list.is_empty());
}

#[tokio::test]
async fn exceeding_the_quota_is_refused_and_leaves_nothing() {
    let sled = Sled::with_quota(2, 64 * 1024).await;
    let small = artifact(1, 40 * 1024);
    let big = artifact(2, 40 * 1024);
    sled.configure(1, &[&small, &big]).await;
    sled.put(&small).await.unwrap();
    let error = sled.put(&big).await.unwrap_err();
    assert!(matches!(error, StoreError::QuotaExceeded { .. }), "{error:?}");
    assert!(error_chain(&error).contains("is full"), "{}", error_chain(&error));
    assert_eq!(sled.files().len(), 2, "only the small artifact's two copies: {:?}", sled.files());
    assert_eq!(sled.m2(1).used(), 40 * 1024);
}

#[tokio::test]
async fn a_failed_m2_is_skipped_and_healed_after_restore() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 20_000);
    sled.configure(1, &[&a]).await;
    sled.store.set_m2_state(0, M2State::Failed).await.unwrap();
    let response = sled.put(&a).await.unwrap();
    assert_eq!(response, ArtifactPutResponse { datasets: 1, successful_writes: 1 });
    assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes, "read from the healthy M.2");
    assert_eq!(sled.store.list().await.list[&a.hash], 1);

    sled.store.set_m2_state(0, M2State::Healthy).await.unwrap();
    assert_eq!(sled.store.list().await.list[&a.hash], 1, "one copy, two healthy devices: needs a re-copy");
    sled.put(&a).await.unwrap();
    assert_eq!(sled.store.list().await.list[&a.hash], 2);
    assert_eq!(sled.m2(1).used(), 20_000, "the re-copy did not count the existing copy twice");
}

#[tokio::test]
async fn an_m2_that_fails_mid_write_drops_out_and_the_other_copy_lands() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 64 * 1024);
    sled.configure(1, &[&a]).await;
    let m2 = sled.m2(1).clone();
    let body = chunks(&a.bytes).enumerate().map(move |(index, chunk)| {
        if index == 4 {
            m2.set_state(M2State::Failed);
        }
        chunk
    });
    let response = sled.store.put(a.hash, Generation::new(1), None, body).await.unwrap();
    assert_eq!(response, ArtifactPutResponse { datasets: 2, successful_writes: 1 });
    assert_eq!(sled.files(), [format!("0/{}", a.hash)].into(), "no temp file on the failed device");
    assert_eq!(sled.m2(1).used(), 0);
}

#[tokio::test]
async fn config_generations_only_move_forward_across_restarts() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 10);
    let b = artifact(2, 10);
    let config = |generation, artifacts: &[&Artifact]| ArtifactConfig {
        generation: Generation::new(generation),
        artifacts: artifacts.iter().map(|x| x.hash).collect(),
    };
    assert!(sled.store.put_config(config(2, &[&a])).await.unwrap());
    assert!(!sled.store.put_config(config(2, &[&a])).await.unwrap(), "same config: no-op");
    let error = sled.store.put_config(config(2, &[&b])).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "artifact config generation 2 refused: the sled holds generation 2 with a different set of artifacts"
    );
    let error = sled.store.put_config(config(1, &[&a, &b])).await.unwrap_err();
    assert!(matches!(error, StoreError::ConfigRefused { .. }), "{error}");
    assert!(sled.store.put_config(config(5, &[&a, &b])).await.unwrap());

    // A torn copy on one device does not hide the good one on the other.
    let ledger_0 = ledger::path_for(sled.m2(0), Generation::new(5));
    std::fs::write(&ledger_0, b"{\"generation\":").unwrap();
    let sled = sled.restart().await;
    assert_eq!(sled.store.config().await.unwrap(), config(5, &[&a, &b]));
    let error = sled.store.put_config(config(4, &[&a])).await.unwrap_err();
    assert!(matches!(error, StoreError::ConfigRefused { .. }), "{error}");
    let repaired = std::fs::read_to_string(&ledger_0).unwrap();
    assert!(repaired.contains("\"generation\":5"), "the torn ledger was rewritten: {repaired}");
}

#[tokio::test]
async fn unreferenced_files_are_deleted_on_change_and_at_start_up() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 1000);
    let b = artifact(2, 1000);
    sled.configure(1, &[&a, &b]).await;
    sled.put(&a).await.unwrap();
    sled.put(&b).await.unwrap();
    sled.configure(2, &[&a]).await;
    assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
    assert_eq!(sled.m2(0).used(), 1000);

    // Files that appear while the agent is down: an artifact outside the
    // config, a stray file, and a temp file of an unfinished write.
    std::fs::write(sled.m2(0).artifact_path(&b.hash), &b.bytes).unwrap();
    std::fs::write(sled.m2(1).dataset().join("notes.txt"), b"hello").unwrap();
    std::fs::write(sled.m2(1).tmp_dir().join("x.tmp"), b"partial").unwrap();
    let sled = sled.restart().await;
    assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
    assert_eq!(sled.m2(1).used(), 1000);
}

#[tokio::test]
async fn a_corrupt_copy_is_found_at_start_up_and_removed() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 30_000);
    sled.configure(1, &[&a]).await;
    sled.put(&a).await.unwrap();
    let path = sled.m2(1).artifact_path(&a.hash);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let sled = sled.restart().await;
    assert_eq!(sled.files(), [format!("0/{}", a.hash)].into());
    assert_eq!(sled.store.list().await.list[&a.hash], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_artifact_leave_one_correct_file() {
    // In-progress temp files count against the quota: room for all 8.
    let sled = Sled::with_quota(2, 4 << 20).await;
    let a = artifact(7, 200_000);
    sled.configure(1, &[&a]).await;
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let store = sled.store.clone();
            let bytes = a.bytes.clone();
            let hash = a.hash;
            tokio::spawn(async move { store.put(hash, Generation::new(1), None, chunks(&bytes)).await })
        })
        .collect();
    for writer in writers {
        assert_eq!(writer.await.unwrap().unwrap().successful_writes, 2);
    }
    assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
    assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes);
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (200_000, 200_000));
}

/// DESIGN §11: an unreadable newest ledger copy is damage, not absence. The
/// sled must not fall back to the older copy: no generation regression, no
/// deletion on its basis, no stale config accepted; the damage is reported;
/// a config at least as new repairs it.
#[tokio::test]
async fn a_damaged_newest_ledger_fails_closed_until_a_new_config_repairs_it() {
    let sled = Sled::new(2).await;
    let (a, b, c) = (artifact(1, 1000), artifact(2, 1000), artifact(3, 1000));
    sled.configure(4, &[&a]).await;
    sled.put(&a).await.unwrap();
    sled.configure(5, &[&a, &b]).await;
    sled.put(&b).await.unwrap();
    // Generation 4's copy survives on one device (as after a crash between
    // the two devices' writes); generation 5's becomes unreadable on both:
    // torn on one, an I/O error (a directory in its place) on the other.
    ledger::write_one(sled.m2(0), &config_of(4, &[&a])).unwrap();
    std::fs::write(ledger::path_for(sled.m2(0), Generation::new(5)), b"{\"gener").unwrap();
    let path_1 = ledger::path_for(sled.m2(1), Generation::new(5));
    std::fs::remove_file(&path_1).unwrap();
    std::fs::create_dir(&path_1).unwrap();

    let sled = sled.restart().await;
    assert_eq!(sled.store.generation().await, Generation::new(5), "no regression to generation 4");
    assert!(matches!(sled.store.config().await, Err(StoreError::LedgerDamaged { .. })));
    assert!(sled.files().contains(&format!("0/{}", b.hash)), "b (only in generation 5) was not deleted");
    let list = sled.store.list().await;
    assert_eq!((list.generation, list.list.len()), (Generation::new(5), 0));
    assert_eq!(list.ledger_damage.len(), 2, "{:?}", list.ledger_damage);
    assert_eq!(sled.store.ledger_problems().len(), 2);
    let error = sled.store.put_config(config_of(4, &[&a])).await.unwrap_err();
    assert!(error.to_string().contains("damaged"), "a stale config is refused: {error}");
    let error = sled.store.put(a.hash, Generation::new(5), None, chunks(&a.bytes)).await.unwrap_err();
    assert!(matches!(error, StoreError::LedgerDamaged { .. }), "{error}");
    assert!(sled.files().contains(&format!("1/{}", b.hash)));

    // Nexus pushes generation 6: the ledger is repaired and only now is
    // what left the config deleted.
    std::fs::remove_dir(&path_1).unwrap();
    assert!(sled.store.put_config(config_of(6, &[&a, &c])).await.unwrap());
    assert_eq!(sled.store.config().await.unwrap(), config_of(6, &[&a, &c]));
    assert!(sled.store.ledger_problems().is_empty());
    assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
    let sled = sled.restart().await;
    assert_eq!(sled.store.config().await.unwrap(), config_of(6, &[&a, &c]));
}

/// The same generation as the damaged copy repairs it too (the database
/// names one set per generation).
#[tokio::test]
async fn the_damaged_generation_itself_repairs_the_ledger() {
    let sled = Sled::new(1).await;
    let a = artifact(1, 100);
    sled.configure(3, &[&a]).await;
    std::fs::write(ledger::path_for(sled.m2(0), Generation::new(3)), b"garbage").unwrap();
    let sled = sled.restart().await;
    assert_eq!(sled.store.generation().await, Generation::new(3));
    assert!(sled.store.put_config(config_of(3, &[&a])).await.unwrap());
    assert_eq!(sled.store.config().await.unwrap(), config_of(3, &[&a]));
}

/// Issue #21: artifacts on the devices and no ledger on any of them (an
/// unmounted or wiped device held it) is damage, not a fresh sled: nothing
/// is deleted, nothing is acted on, until a push repairs the ledger.
#[tokio::test]
async fn artifacts_without_any_ledger_fail_closed_until_a_push() {
    let sled = Sled::new(2).await;
    let (a, b) = (artifact(1, 1000), artifact(2, 1000));
    sled.configure(3, &[&a, &b]).await;
    sled.put(&a).await.unwrap();
    sled.put(&b).await.unwrap();
    for slot in 0..2 {
        std::fs::remove_file(ledger::path_for(sled.m2(slot), Generation::new(3))).unwrap();
    }

    let sled = sled.restart().await;
    assert_eq!(sled.files().len(), 4, "nothing deleted: {:?}", sled.files());
    let list = sled.store.list().await;
    assert_eq!(list.ledger_damage.len(), 2, "{:?}", list.ledger_damage);
    assert!(list.ledger_damage[0].contains("holds 2 artifacts but no M.2 holds a config ledger"), "{list:?}");
    let error = sled.store.put(a.hash, Generation::new(0), None, chunks(&a.bytes)).await.unwrap_err();
    assert!(matches!(error, StoreError::LedgerDamaged { .. }), "{error}");

    // Any generation repairs it (none is known); only then does what left
    // the config go.
    assert!(sled.store.put_config(config_of(4, &[&a])).await.unwrap());
    assert!(sled.store.ledger_problems().is_empty());
    assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
}

/// A ledger under the name older sled agents used, with no current one, is
/// damage too; the repairing push removes the old file.
#[tokio::test]
async fn an_older_ledger_name_alone_fails_closed_and_a_push_replaces_it() {
    let sled = Sled::new(1).await;
    let older = sled.m2(0).root().join("artifact-config.json");
    std::fs::write(&older, br#"{"generation":7,"artifacts":[]}"#).unwrap();
    let sled = sled.restart().await;
    let list = sled.store.list().await;
    assert_eq!(list.ledger_damage.len(), 1, "{list:?}");
    assert!(list.ledger_damage[0].contains(older.as_str()), "{list:?}");
    let a = artifact(1, 100);
    assert!(sled.store.put_config(config_of(8, &[&a])).await.unwrap());
    assert!(!older.exists());
    let sled = sled.restart().await;
    assert_eq!(sled.store.config().await.unwrap(), config_of(8, &[&a]));
}

/// A push accepted with one device's ledger write failed leaves that device
/// stale, reported; the next push of the same config rewrites it, so that
/// losing the other device cannot take the sled back a generation.
#[tokio::test]
async fn a_stale_device_ledger_is_rewritten_by_the_next_push_of_the_same_config() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 1000);
    sled.configure(1, &[&a]).await;
    // A directory where slot 1's generation-2 copy goes makes its rename fail.
    let blocked = ledger::path_for(sled.m2(1), Generation::new(2));
    std::fs::create_dir(&blocked).unwrap();
    assert!(sled.store.put_config(config_of(2, &[&a])).await.unwrap());
    let problems = sled.store.ledger_problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("M.2 slot 1") && problems[0].contains(blocked.as_str()), "{problems:?}");
    assert!(ledger::path_for(sled.m2(1), Generation::new(1)).is_file(), "slot 1 still holds generation 1");

    std::fs::remove_dir(&blocked).unwrap();
    assert!(!sled.store.put_config(config_of(2, &[&a])).await.unwrap(), "the same config");
    assert!(blocked.is_file(), "slot 1's ledger was rewritten");
    assert!(!ledger::path_for(sled.m2(1), Generation::new(1)).exists());
    assert!(sled.store.ledger_problems().is_empty());
}

fn config_of(generation: u64, artifacts: &[&Artifact]) -> ArtifactConfig {
    ArtifactConfig {
        generation: Generation::new(generation),
        artifacts: artifacts.iter().map(|x| x.hash).collect(),
    }
}

/// A device restored while a write to it is in progress recounts its stored
/// bytes; the write's reservation must survive that, so that returning it
/// later cannot wrap the usage (which read as "full" until a restart).
#[tokio::test]
async fn restoring_an_m2_mid_write_keeps_its_quota_accounting_exact() {
    let sled = Arc::new(Sled::new(2).await);
    let a = artifact(1, 64 * 1024);
    sled.configure(1, &[&a]).await;
    let mut corrupted = a.bytes.clone();
    corrupted[60_000] ^= 1;
    let during = sled.clone();
    let body = chunks(&corrupted).enumerate().then(move |(index, chunk)| {
        let sled = during.clone();
        async move {
            if index == 4 {
                // Failed and back between two chunks: the write never noticed.
                sled.store.set_m2_state(1, M2State::Failed).await.unwrap();
                sled.store.set_m2_state(1, M2State::Healthy).await.unwrap();
            }
            chunk
        }
    });
    let error = sled.store.put(a.hash, Generation::new(1), None, body).await.unwrap_err();
    assert!(matches!(error, StoreError::HashMismatch { .. }), "{error}");
    for slot in 0..2 {
        assert_eq!(sled.m2(slot).used(), 0, "slot {slot}: every reservation returned, nothing wrapped");
        assert_eq!(sled.m2(slot).available(), QUOTA);
    }
    sled.put(&a).await.unwrap();
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (64 * 1024, 64 * 1024));
}

#[tokio::test]
async fn a_config_may_list_up_to_the_limit() {
    let sled = Sled::new(1).await;
    let hashes = |count: usize| -> BTreeSet<ArtifactHash> {
        (0..count as u32)
            .map(|i| {
                let mut bytes = [0u8; 32];
                bytes[..4].copy_from_slice(&i.to_be_bytes());
                ArtifactHash(bytes)
            })
            .collect()
    };
    let at_limit = ArtifactConfig { generation: Generation::new(1), artifacts: hashes(MAX_CONFIG_ARTIFACTS) };
    assert!(sled.store.put_config(at_limit).await.unwrap());
    let over = ArtifactConfig { generation: Generation::new(2), artifacts: hashes(MAX_CONFIG_ARTIFACTS + 1) };
    let error = sled.store.put_config(over).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "artifact config generation 2 lists {} artifacts; a config may list at most {MAX_CONFIG_ARTIFACTS}",
            MAX_CONFIG_ARTIFACTS + 1
        )
    );
    assert_eq!(sled.store.generation().await, Generation::new(1));
}

// Partial copies (`tmp/<sha256>.copy`) across restarts.

/// Leaves `bytes` as the partial copy of `hash` on `m2`, as a copy that was
/// killed would.
fn leave_partial(m2: &M2, hash: &ArtifactHash, bytes: &[u8]) {
    std::fs::write(m2.partial_path(hash), bytes).unwrap();
}

#[tokio::test]
async fn partial_copies_are_kept_at_start_up_only_while_their_artifact_is_wanted() {
    let sled = Sled::new(2).await;
    let (a, b, c) = (artifact(1, 200_000), artifact(2, 100_000), artifact(3, 100_000));
    sled.configure(1, &[&a, &b]).await;
    sled.put(&b).await.unwrap();
    // A partial of a (wanted, not stored), of b (already stored), of c (not
    // in the config), and the temp files of a PUT and of something else.
    leave_partial(sled.m2(0), &a.hash, &a.bytes[..150_000]);
    leave_partial(sled.m2(0), &b.hash, &b.bytes[..50_000]);
    leave_partial(sled.m2(1), &c.hash, &c.bytes[..50_000]);
    std::fs::write(sled.m2(1).tmp_dir().join(format!("{}.0123456789abcdef.tmp", a.hash)), b"put").unwrap();
    std::fs::write(sled.m2(1).tmp_dir().join("x.copy"), b"stray").unwrap();

    let sled = sled.restart().await;
    let stored = [format!("0/{}", b.hash), format!("1/{}", b.hash)];
    let mut expected: BTreeSet<String> = stored.iter().cloned().collect();
    expected.insert(format!("0/{}.copy", a.hash));
    assert_eq!(sled.files(), expected);
    assert_eq!(sled.m2(0).used(), 100_000 + 150_000, "the kept partial is reserved");
    assert_eq!(sled.m2(1).used(), 100_000);

    // A config without a deletes its partial and returns its reservation.
    sled.configure(2, &[&b]).await;
    assert_eq!(sled.files(), stored.into_iter().collect());
    assert_eq!((sled.m2(0).used(), sled.m2(0).available()), (100_000, QUOTA - 100_000));
}

/// With a damaged ledger the sled does not know which artifacts are wanted:
/// like the reconciler, it deletes no partial copy until a config repairs
/// the ledger; that config then decides.
#[tokio::test]
async fn a_damaged_ledger_keeps_partial_copies_until_a_config_decides() {
    let sled = Sled::new(1).await;
    let (a, c) = (artifact(1, 100_000), artifact(3, 100_000));
    sled.configure(3, &[&a]).await;
    leave_partial(sled.m2(0), &a.hash, &a.bytes[..10_000]);
    leave_partial(sled.m2(0), &c.hash, &c.bytes[..20_000]);
    std::fs::write(ledger::path_for(sled.m2(0), Generation::new(3)), b"garbage").unwrap();
    let sled = sled.restart().await;
    assert!(matches!(sled.store.config().await, Err(StoreError::LedgerDamaged { .. })));
    assert_eq!(sled.files().len(), 2, "{:?}", sled.files());
    assert_eq!(sled.m2(0).used(), 30_000);

    sled.configure(4, &[&a]).await;
    assert_eq!(sled.files(), [format!("0/{}.copy", a.hash)].into());
    assert_eq!(sled.m2(0).used(), 10_000);
}

/// The next copy continues from the shortest partial, after re-hashing the
/// prefix on every M.2, and the quota follows the truncation exactly.
#[tokio::test]
async fn partials_of_different_lengths_continue_from_the_shorter_one() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 200_000);
    sled.configure(1, &[&a]).await;
    leave_partial(sled.m2(0), &a.hash, &a.bytes[..150_000]);
    leave_partial(sled.m2(1), &a.hash, &a.bytes[..90_000]);
    let sled = sled.restart().await;
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (150_000, 90_000));

    let mut write = sled.store.begin_write(a.hash, Temp::Copy).unwrap();
    assert_eq!(write.bytes, 90_000, "continues from the shorter partial");
    for slot in 0..2 {
        assert_eq!(std::fs::metadata(sled.m2(slot).partial_path(&a.hash)).unwrap().len(), 90_000);
        assert_eq!(sled.m2(slot).used(), 90_000, "slot {slot}: the cut bytes are no longer reserved");
    }
    assert!(write.verify_prefix().await.unwrap(), "both prefixes are a's first bytes");
    write.write(&a.bytes[90_000..]).await.unwrap();
    let response = sled.store.commit(write).await.unwrap();
    assert_eq!(response.successful_writes, 2);
    assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
    assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes);
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (200_000, 200_000));
}

/// Prefixes that disagree cannot both be right, and the store cannot tell
/// which is: the copy starts over from byte 0.
#[tokio::test]
async fn partials_that_disagree_start_over() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 200_000);
    sled.configure(1, &[&a]).await;
    let mut flipped = a.bytes[..100_000].to_vec();
    flipped[5_000] ^= 1;
    leave_partial(sled.m2(0), &a.hash, &a.bytes[..100_000]);
    leave_partial(sled.m2(1), &a.hash, &flipped);
    let sled = sled.restart().await;

    let mut write = sled.store.begin_write(a.hash, Temp::Copy).unwrap();
    assert_eq!(write.bytes, 100_000);
    assert!(!write.verify_prefix().await.unwrap());
    assert_eq!(write.bytes, 0);
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (0, 0));
    write.write(&a.bytes).await.unwrap();
    assert_eq!(sled.store.commit(write).await.unwrap().successful_writes, 2);
    assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes);
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (200_000, 200_000));
}

/// An artifact that arrives another way (a PUT) makes its held partials
/// useless: they go with their reservation.
#[tokio::test]
async fn a_put_of_the_artifact_discards_its_held_partials() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 100_000);
    sled.configure(1, &[&a]).await;
    leave_partial(sled.m2(0), &a.hash, &a.bytes[..40_000]);
    leave_partial(sled.m2(1), &a.hash, &a.bytes[..60_000]);
    let sled = sled.restart().await;
    sled.put(&a).await.unwrap();
    assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (100_000, 100_000));
}

// The verification cache and the scrub.

/// Makes a same-size change to a stored file (a flipped byte) and gives it
/// another mtime, as damage through the file system would.
fn corrupt_in_place(path: &Utf8Path) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(path, &bytes).unwrap();
    touch(path);
}

fn touch(path: &Utf8Path) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000)).unwrap();
}

fn verified(trusted: u64, rehashed: u64, bytes_read: u64, removed: u64) -> StartupVerification {
    StartupVerification { trusted, rehashed, bytes_read, removed, unreadable: 0, elapsed_millis: 0 }
}

fn startup(sled: &Sled) -> StartupVerification {
    StartupVerification { elapsed_millis: 0, ..sled.store.startup_verification() }
}

/// Start-up trusts files whose metadata matches the cache and re-hashes the
/// others. That unchanged files are not read is shown by the bytes read at
/// start-up (the count the inventory reports), which is summed in the one
/// loop that reads artifact contents at start-up.
#[tokio::test]
async fn start_up_trusts_unchanged_files_and_re_hashes_changed_ones() {
    let sled = Sled::new(2).await;
    let (a, b, c) = (artifact(1, 100_000), artifact(2, 100_000), artifact(3, 100_000));
    sled.configure(1, &[&a, &b, &c]).await;
    for x in [&a, &b, &c] {
        sled.put(x).await.unwrap();
    }
    sled.store.flush_stamps().await;
    let sled = sled.restart().await;
    assert_eq!(startup(&sled), verified(6, 0, 0, 0), "nothing read");

    // Behind the cache: a's copy on slot 0 is damaged (same size, new
    // mtime), b's on slot 1 grows a byte, c's on slot 0 is only touched.
    corrupt_in_place(&sled.m2(0).artifact_path(&a.hash));
    let b_1 = sled.m2(1).artifact_path(&b.hash);
    std::fs::write(&b_1, [&b.bytes[..], b"!"].concat()).unwrap();
    touch(&sled.m2(0).artifact_path(&c.hash));
    let sled = sled.restart().await;
    assert_eq!(startup(&sled), verified(3, 3, 300_001, 2));
    let expected: BTreeSet<String> =
        [format!("0/{}", b.hash), format!("0/{}", c.hash), format!("1/{}", a.hash), format!("1/{}", c.hash)]
            .into();
    assert_eq!(sled.files(), expected);

    // c's copy was re-stamped: trusted from now on.
    let sled = sled.restart().await;
    assert_eq!(startup(&sled), verified(4, 0, 0, 0));

    // A damaged cache is ignored: everything is read again.
    std::fs::write(sled.m2(1).root().join("artifacts-verified.json"), b"{\"version\":1,").unwrap();
    let sled = sled.restart().await;
    assert_eq!(startup(&sled), verified(2, 2, 200_000, 0));
}

#[tokio::test]
async fn the_scrub_removes_a_corrupt_copy_and_reports_it() {
    let sled = Sled::new(2).await;
    let (a, b) = (artifact(1, 100_000), artifact(2, 50_000));
    sled.configure(1, &[&a, &b]).await;
    sled.put(&a).await.unwrap();
    sled.put(&b).await.unwrap();
    corrupt_in_place(&sled.m2(1).artifact_path(&a.hash));

    let pass = sled.store.scrub_pass(0).await;
    assert_eq!((pass.files_checked, pass.bytes_checked, pass.corrupt_removed), (4, 300_000, 1), "{pass:?}");
    assert!(pass.finished.is_some_and(|finished| finished >= pass.started));
    let status = sled.store.scrub_status();
    assert_eq!((status.passes_finished, status.current, status.last), (1, None, Some(pass)));
    assert_eq!(sled.store.list().await.list[&a.hash], 1, "one copy fewer: replication restores it");
    assert!(!sled.m2(1).artifact_path(&a.hash).exists());
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (150_000, 50_000));
}

/// A corrupt copy replaced by a verified rename while the scrub hashed the
/// old one is not deleted: the scrub deletes only the inode it hashed.
#[tokio::test]
async fn the_scrub_deletes_only_the_file_it_hashed() {
    let sled = Sled::new(1).await;
    let a = artifact(1, 10_000);
    sled.configure(1, &[&a]).await;
    sled.put(&a).await.unwrap();
    let path = sled.m2(0).artifact_path(&a.hash);
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    let outcome = sled.store.remove_corrupt(sled.m2(0), a.hash, inode + 1, 10_000, "test").await;
    assert!(matches!(outcome, scrub::Scrubbed::Gone));
    assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes);
    assert_eq!(sled.m2(0).used(), 10_000);
}

/// A read error is not corruption (DESIGN §11): the copy that could not be
/// read at start-up is kept on disk, reported, and not counted as held; the
/// scrub's next good read of it restores it. (`read_error` matches the file
/// name, so this test's unique artifact is the only one it touches.)
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_copy_unreadable_at_start_up_is_kept_reported_and_not_listed() {
    let sled = Sled::new(2).await;
    let (a, b) = (artifact(201, 40_001), artifact(202, 20_000));
    sled.configure(1, &[&a, &b]).await;
    sled.put(&a).await.unwrap();
    sled.put(&b).await.unwrap();
    sled.store.flush_stamps().await;
    // A changed mtime makes start-up re-hash (read) the file.
    touch(&sled.m2(1).artifact_path(&a.hash));
    fail::cfg("sled_agent::store::read_error", &format!("return({})", a.hash)).unwrap();
    let sled = sled.restart().await;
    fail::remove("sled_agent::store::read_error");

    assert_eq!(sled.files().len(), 4, "nothing was deleted: {:?}", sled.files());
    assert_eq!(startup(&sled).unreadable, 1);
    assert_eq!(startup(&sled).removed, 0);
    let unreadable = sled.store.unreadable();
    assert_eq!(unreadable.len(), 1, "{unreadable:?}");
    assert_eq!((unreadable[0].slot, unreadable[0].sha256), (1, a.hash));
    let path = sled.m2(1).artifact_path(&a.hash);
    assert!(unreadable[0].problem.contains(path.as_str()), "{}", unreadable[0].problem);
    assert_eq!(sled.store.list().await.list[&a.hash], 1, "the unreadable copy is not counted");

    let pass = sled.store.scrub_pass(0).await;
    assert_eq!((pass.unreadable, pass.corrupt_removed), (0, 0), "{pass:?}");
    assert_eq!(sled.store.unreadable(), vec![]);
    assert_eq!(sled.store.list().await.list[&a.hash], 2);
}

/// The scrub keeps a copy it cannot read, reports it in the pass and the
/// store, and a verified write of the artifact clears the report.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn the_scrub_keeps_a_copy_it_cannot_read_and_a_write_clears_it() {
    let sled = Sled::new(2).await;
    let a = artifact(203, 30_001);
    sled.configure(1, &[&a]).await;
    sled.put(&a).await.unwrap();
    fail::cfg("sled_agent::store::read_error", &format!("return({})", a.hash)).unwrap();
    let pass = sled.store.scrub_pass(0).await;
    fail::remove("sled_agent::store::read_error");

    assert_eq!((pass.unreadable, pass.corrupt_removed), (2, 0), "{pass:?}");
    assert!(sled.m2(0).artifact_path(&a.hash).is_file() && sled.m2(1).artifact_path(&a.hash).is_file());
    assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (30_001, 30_001));
    assert_eq!(sled.store.unreadable().len(), 2);
    assert_eq!(sled.store.list().await.list.get(&a.hash), None, "Nexus is asked for a fresh copy");

    sled.put(&a).await.unwrap();
    assert_eq!(sled.store.unreadable(), vec![]);
    assert_eq!(sled.store.list().await.list[&a.hash], 2);
    assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes);
}

/// The scrub reads at its rate: on tokio's paused clock, a pass over 8 MiB
/// at 2 MiB/s takes 4 s (the clock only moves while the scrub sleeps; reads
/// on the blocking pool hold it still).
#[tokio::test(start_paused = true)]
async fn the_scrub_keeps_to_its_rate() {
    let sled = Sled::with_quota(2, 16 << 20).await;
    let artifacts: Vec<Artifact> = (1..=4).map(|seed| artifact(seed, 1 << 20)).collect();
    sled.configure(1, &artifacts.iter().collect::<Vec<_>>()).await;
    for x in &artifacts {
        sled.put(x).await.unwrap();
    }
    let rate = 2 << 20;
    let started = tokio::time::Instant::now();
    let pass = sled.store.scrub_pass(rate).await;
    let elapsed = started.elapsed();
    assert_eq!(pass.bytes_checked, 8 << 20);
    assert!(
        (Duration::from_millis(3_900)..=Duration::from_millis(4_100)).contains(&elapsed),
        "8 MiB at 2 MiB/s took {elapsed:?}"
    );
    assert!(pass.bytes_per_sec.abs_diff(rate) <= rate / 20, "{pass:?}");
}

/// A PUT whose body the test feeds chunk by chunk.
fn fed_put(
    sled: &Sled,
    artifact: &Artifact,
    body: Vec<u8>,
) -> (tokio::sync::mpsc::Sender<Bytes>, tokio::task::JoinHandle<Result<ArtifactPutResponse, StoreError>>) {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (Ok::<_, std::io::Error>(chunk), receiver))
    });
    let store = sled.store.clone();
    let (hash, length) = (artifact.hash, body.len() as u64);
    (sender, tokio::spawn(async move { store.put(hash, Generation::new(1), Some(length), stream).await }))
}

async fn follow(store: &ArtifactStore, hash: &ArtifactHash) -> Follower {
    match store.open_for_depot(hash).await.unwrap().0 {
        DepotArtifact::Writing(follower) => follower,
        DepotArtifact::Stored { .. } => panic!("artifact {hash} is already stored"),
    }
}

/// Reads until `count` bytes have come, failing if they do not within 5 s.
async fn read_exactly(follower: &mut Follower, count: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(5), follower.next_chunk()).await;
        bytes.extend(chunk.expect("bytes that were written came").unwrap().expect("not the end yet"));
    }
    bytes
}

#[tokio::test]
async fn a_depot_request_follows_a_put_as_its_bytes_arrive_and_no_further() {
    let sled = Sled::new(2).await;
    let a = artifact(1, 256 * 1024);
    sled.configure(1, &[&a]).await;
    let (feed, put) = fed_put(&sled, &a, a.bytes.clone());
    let mut follower = follow(&sled.store, &a.hash).await;
    let (first, rest) = a.bytes.split_at(100_000);
    feed.send(Bytes::copy_from_slice(&first[..50_000])).await.unwrap();
    // Nothing published until then: the follower joined before the first
    // chunk, so the next one is the one that flushes and publishes.
    feed.send(Bytes::copy_from_slice(&first[50_000..])).await.unwrap();
    let read = read_exactly(&mut follower, 100_000).await;
    assert_eq!(read, first, "the follower got the bytes written so far");
    let further = tokio::time::timeout(Duration::from_millis(300), follower.next_chunk()).await;
    assert!(further.is_err(), "the follower read past what the write had published: {further:?}");

    for chunk in rest.chunks(40_000) {
        feed.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    drop(feed);
    let mut all = read;
    all.extend(read_exactly(&mut follower, rest.len()).await);
    assert!(follower.next_chunk().await.unwrap().is_none(), "the response ends with the artifact");
    assert_eq!(all, a.bytes);
    put.await.unwrap().unwrap();
    assert!(matches!(sled.store.open_for_depot(&a.hash).await.unwrap().0, DepotArtifact::Stored { .. }));
}

#[tokio::test]
async fn a_follower_of_a_write_with_the_wrong_bytes_never_gets_a_whole_response() {
    let sled = Sled::new(1).await;
    let a = artifact(1, 128 * 1024);
    sled.configure(1, &[&a]).await;
    let mut wrong = a.bytes.clone();
    *wrong.last_mut().unwrap() ^= 1;
    let (feed, put) = fed_put(&sled, &a, wrong.clone());
    let mut follower = follow(&sled.store, &a.hash).await;
    for chunk in wrong.chunks(16 * 1024) {
        feed.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    drop(feed);
    let read = read_exactly(&mut follower, wrong.len() - 1).await;
    assert_eq!(read, wrong[..wrong.len() - 1]);
    let error = follower.next_chunk().await.expect_err("the last byte waits for the hash check");
    assert!(error.to_string().contains(&a.hash.to_string()), "{error}");
    assert!(matches!(put.await.unwrap(), Err(StoreError::HashMismatch { .. })));
}

#[tokio::test]
async fn a_depot_request_for_an_expected_artifact_waits_for_its_write_then_gives_up() {
    let sled = Sled::new(1).await;
    let (a, stranger) = (artifact(1, 10_000), artifact(2, 10_000));
    sled.configure(1, &[&a]).await;
    let error = sled.store.open_for_depot(&stranger.hash).await.err().expect("not in the config");
    assert!(matches!(error, StoreError::NotFound { .. }), "{error}");

    let started = std::time::Instant::now();
    let error = sled.store.open_for_depot(&a.hash).await.err().expect("nothing writes it");
    assert!(matches!(error, StoreError::NotYetHere { .. }), "{error}");
    assert!(started.elapsed() >= ARRIVAL_WAIT, "answered after {:?}", started.elapsed());

    // A request made before the write begins is answered by it.
    let waiting = tokio::spawn({
        let store = sled.store.clone();
        async move { store.open_for_depot(&a.hash).await.map(|(artifact, _)| artifact.length()) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (feed, put) = fed_put(&sled, &a, a.bytes.clone());
    assert_eq!(waiting.await.unwrap().unwrap(), 10_000);
    feed.send(Bytes::from(a.bytes.clone())).await.unwrap();
    drop(feed);
    put.await.unwrap().unwrap();
}
