//! `rack-dev bench startup`: how long a sled's artifact store takes to open
//! with `--gib` of artifacts on each of its two M.2s (DESIGN §13, start-up
//! without re-reading everything).
//!
//! The store is the sled agent's own (`sled_agent::store`), filled through
//! its PUT path, so the files, ledger and verification cache are exactly
//! what a sled writes. Two opens are timed in the same run, each after
//! `sync` and dropping the kernel's page cache (when this process may:
//! root), so that neither reads from memory what the other just read:
//! - **without the cache** (the baseline: what start-up did before the
//!   verification cache existed, and what it still does when the cache is
//!   missing or damaged): the cache files are deleted, so every artifact is
//!   re-hashed, `verify_workers` at a time;
//! - **with the cache**: the files are unchanged since they were stamped, so
//!   start-up compares metadata and reads no artifact bytes.

use crate::bench::{mib, report};
use anyhow::Context;
use bytes::Bytes;
use camino::Utf8Path;
use common::artifact::{ArtifactConfig, ArtifactHash};
use common::generation::Generation;
use sha2::Digest;
use sled_agent::config::{CopyConfig, RequestLimits};
use sled_agent::storage::M2;
use sled_agent::store::ArtifactStore;
use std::sync::Arc;
use std::time::Instant;

const CHUNK_BYTES: usize = 1 << 20;
/// The sled agent's default.
const VERIFY_WORKERS: usize = 4;
const M2_COUNT: u32 = 2;

pub async fn startup(gib: u64, artifact_mib: u64) -> anyhow::Result<()> {
    let artifact_bytes = artifact_mib << 20;
    let artifacts = ((gib << 30) / artifact_bytes).max(1);
    let dir = camino_tempfile::tempdir()?;
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let block: Vec<u8> = (0..CHUNK_BYTES).map(|_| rand::random::<u8>()).collect();

    let hashes: Vec<ArtifactHash> = (0..artifacts).map(|n| hash_of(&block, n, artifact_bytes)).collect();
    let config =
        ArtifactConfig { generation: Generation::FIRST, artifacts: hashes.iter().copied().collect() };
    let filling = Instant::now();
    {
        let store = open(dir.path(), &log).await?;
        store.put_config(config).await.context("configuring the store")?;
        for (n, hash) in (0..artifacts).zip(&hashes) {
            let body = futures::stream::iter(chunks(&block, n, artifact_bytes).map(Ok::<_, std::io::Error>));
            store
                .put(*hash, Generation::FIRST, Some(artifact_bytes), body)
                .await
                .context("storing an artifact")?;
        }
        store.flush_stamps().await;
    }
    let filled_secs = filling.elapsed().as_secs_f64();

    for m2 in m2s(dir.path()) {
        let cache = m2.root().join("artifacts-verified.json");
        std::fs::rename(&cache, cache.with_extension("json.kept"))
            .with_context(|| format!("setting aside the verification cache {cache}"))?;
    }
    let page_cache_dropped = drop_page_cache();
    let (without_cache, without) = timed_open(dir.path(), &log).await?;
    for m2 in m2s(dir.path()) {
        let cache = m2.root().join("artifacts-verified.json");
        std::fs::rename(cache.with_extension("json.kept"), &cache)?;
    }
    drop_page_cache();
    let (with_cache, with) = timed_open(dir.path(), &log).await?;

    let total = artifacts * artifact_bytes * u64::from(M2_COUNT);
    report(
        "startup",
        vec![
            (
                "artifacts",
                format!(
                    "{artifacts} x {artifact_mib} MiB on each of {M2_COUNT} M.2s ({:.1} GiB in all; filled in {filled_secs:.0} s)",
                    total as f64 / (1u64 << 30) as f64
                ),
            ),
            ("page cache dropped before each open", page_cache_dropped.to_string()),
            (
                "open without the verification cache",
                format!(
                    "{without_cache:.3} s, {} files re-hashed, {:.0} MiB read ({:.0} MiB/s)",
                    without.rehashed,
                    mib(without.bytes_read),
                    mib(without.bytes_read) / without_cache
                ),
            ),
            (
                "open with the verification cache",
                format!("{with_cache:.3} s, {} files trusted, {} bytes read", with.trusted, with.bytes_read),
            ),
            ("without / with", format!("{:.0}x", without_cache / with_cache)),
        ],
        serde_json::json!({
            "artifacts": artifacts,
            "artifact_bytes": artifact_bytes,
            "m2s": M2_COUNT,
            "page_cache_dropped": page_cache_dropped,
            "without_cache_secs": without_cache,
            "without_cache_bytes_read": without.bytes_read,
            "with_cache_secs": with_cache,
            "with_cache_bytes_read": with.bytes_read,
        }),
    );
    Ok(())
}

fn m2s(dir: &Utf8Path) -> Vec<Arc<M2>> {
    (0..M2_COUNT).map(|slot| Arc::new(M2::new(slot, dir.join(format!("m2-{slot}")), u64::MAX / 4))).collect()
}

async fn open(dir: &Utf8Path, log: &slog::Logger) -> anyhow::Result<ArtifactStore> {
    ArtifactStore::open(
        log.clone(),
        m2s(dir),
        CopyConfig::default(),
        RequestLimits::default(),
        VERIFY_WORKERS,
    )
    .await
    .context("opening the artifact store")
}

async fn timed_open(
    dir: &Utf8Path,
    log: &slog::Logger,
) -> anyhow::Result<(f64, common::api::sled_agent::StartupVerification)> {
    let started = Instant::now();
    let store = open(dir, log).await?;
    let secs = started.elapsed().as_secs_f64();
    let verification = store.startup_verification();
    anyhow::ensure!(
        verification.removed == 0,
        "start-up removed {} files it should have found intact",
        verification.removed
    );
    Ok((secs, verification))
}

/// Artifact `n`: `block` over and over, each chunk stamped with `n` and its
/// index so that no two chunks (or artifacts) are alike.
fn chunks(block: &[u8], n: u64, length: u64) -> impl Iterator<Item = Bytes> + use<> {
    let block = block.to_vec();
    let count = length.div_ceil(CHUNK_BYTES as u64);
    (0..count).map(move |index| {
        let size = (length - index * CHUNK_BYTES as u64).min(CHUNK_BYTES as u64) as usize;
        let mut chunk = block[..size].to_vec();
        let stamp = [n.to_le_bytes(), index.to_le_bytes()].concat();
        let stamped = stamp.len().min(size);
        chunk[..stamped].copy_from_slice(&stamp[..stamped]);
        Bytes::from(chunk)
    })
}

fn hash_of(block: &[u8], n: u64, length: u64) -> ArtifactHash {
    let mut hasher = sha2::Sha256::new();
    for chunk in chunks(block, n, length) {
        hasher.update(&chunk);
    }
    ArtifactHash(hasher.finalize().into())
}

/// Writes dirty pages out and drops the page cache, if this process may.
fn drop_page_cache() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}
