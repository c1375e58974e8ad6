//! The verification cache: for each artifact file verified on an M.2 (hashed
//! while written and renamed into place, or re-hashed at start-up or by the
//! scrub), the file's metadata at that moment, its *stamp*: size, inode,
//! mtime and ctime. At start-up a file whose stamp still matches is trusted
//! without being read, so start-up costs a `stat` per file rather than a read
//! of every byte (the idea of dr-provision's etags: bulk checks without
//! opening files).
//!
//! One cache file per M.2, `<m2>/artifacts-verified.json`, written with
//! [`common::durable::replace_file`], so a crash leaves the old or the new
//! cache, never a torn one. It is an optimisation only: a missing, unreadable
//! or unparsable cache means every file is re-hashed, as before it existed.
//! Stamps are recorded in memory as files are verified and written out by
//! [`Stamps::flush`] (at the end of start-up, after each scrub pass, every
//! few seconds when something changed, and at shutdown), so a crash loses at
//! most the last few seconds of stamps: those files are re-hashed next time.
//!
//! # What a matching stamp proves
//!
//! Any write through the file system changes the mtime and the ctime, and
//! replacing the file changes the inode; the ctime cannot be set back from
//! user space (the mtime can, with `touch -d`), which is why the stamp has
//! it although the size, inode and mtime would catch ordinary writes. The
//! sled itself never writes an artifact file in place. What a stamp cannot
//! see is damage beneath the file system (bit rot, a misdirected write) and
//! a rewrite of the same size within the file system's timestamp
//! granularity after the stamp was taken: the background scrub
//! ([`super::scrub`]) re-hashes everything for those.

use crate::storage::M2;
use camino::Utf8PathBuf;
use common::ArtifactHash;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

const FILE_NAME: &str = "artifacts-verified.json";
/// Bumped if the meaning of a stamp changes: an older cache is then ignored.
const VERSION: u32 = 1;

/// A file's metadata when its contents were last verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Stamp {
    size: u64,
    inode: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    ctime_sec: i64,
    ctime_nsec: i64,
}

impl Stamp {
    pub fn of(metadata: &std::fs::Metadata) -> Stamp {
        Stamp {
            size: metadata.size(),
            inode: metadata.ino(),
            mtime_sec: metadata.mtime(),
            mtime_nsec: metadata.mtime_nsec(),
            ctime_sec: metadata.ctime(),
            ctime_nsec: metadata.ctime_nsec(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    artifacts: BTreeMap<ArtifactHash, Stamp>,
}

/// The stamps of one M.2.
pub(super) struct Stamps {
    path: Utf8PathBuf,
    state: Mutex<State>,
    /// Serializes flushes, so that an older snapshot never replaces a newer.
    flushing: Mutex<()>,
}

struct State {
    artifacts: BTreeMap<ArtifactHash, Stamp>,
    /// Bumped by every change; `flushed` is the last one written out.
    changes: u64,
    flushed: u64,
}

impl Stamps {
    /// Reads the device's cache. A damaged one is logged and ignored.
    pub fn load(log: &slog::Logger, m2: &M2) -> Stamps {
        let path = m2.root().join(FILE_NAME);
        let artifacts = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<CacheFile>(&bytes) {
                Ok(cache) if cache.version == VERSION => cache.artifacts,
                Ok(cache) => {
                    slog::info!(log, "verification cache of another version ignored"; "path" => %path,
                        "version" => cache.version);
                    BTreeMap::new()
                }
                Err(error) => {
                    slog::warn!(log, "verification cache unreadable: re-hashing every artifact";
                        "path" => %path, "error" => %error);
                    BTreeMap::new()
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => {
                slog::warn!(log, "verification cache unreadable: re-hashing every artifact";
                    "path" => %path, "error" => %error);
                BTreeMap::new()
            }
        };
        Stamps {
            path,
            state: Mutex::new(State { artifacts, changes: 0, flushed: 0 }),
            flushing: Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `metadata` is what the file had when it was last verified.
    pub fn trusts(&self, hash: &ArtifactHash, metadata: &std::fs::Metadata) -> bool {
        self.state().artifacts.get(hash) == Some(&Stamp::of(metadata))
    }

    pub fn record(&self, hash: ArtifactHash, stamp: Stamp) {
        let mut state = self.state();
        if state.artifacts.insert(hash, stamp) != Some(stamp) {
            state.changes += 1;
        }
    }

    pub fn forget(&self, hash: &ArtifactHash) {
        let mut state = self.state();
        if state.artifacts.remove(hash).is_some() {
            state.changes += 1;
        }
    }

    /// Keeps only the stamps of these artifacts (the files that exist).
    pub fn retain(&self, present: &std::collections::BTreeSet<ArtifactHash>) {
        let mut state = self.state();
        let before = state.artifacts.len();
        state.artifacts.retain(|hash, _| present.contains(hash));
        if state.artifacts.len() != before {
            state.changes += 1;
        }
    }

    /// Writes the cache out durably if it changed since the last flush.
    /// Blocking: call it off the async threads.
    pub fn flush(&self) -> std::io::Result<()> {
        let _flushing = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, changes) = {
            let state = self.state();
            if state.changes == state.flushed {
                return Ok(());
            }
            let cache = CacheFile { version: VERSION, artifacts: state.artifacts.clone() };
            (serde_json::to_vec(&cache).expect("stamps serialize"), state.changes)
        };
        common::durable::replace_file(&self.path, &bytes, 0o644)?;
        self.state().flushed = changes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    #[test]
    fn stamps_survive_a_flush_and_a_damaged_cache_is_empty() {
        let dir = camino_tempfile::tempdir().unwrap();
        let m2 = M2::new(0, dir.path().to_owned(), 1 << 20);
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let metadata = std::fs::metadata(&file).unwrap();
        let hash = ArtifactHash([7; 32]);

        let stamps = Stamps::load(&log(), &m2);
        assert!(!stamps.trusts(&hash, &metadata));
        stamps.record(hash, Stamp::of(&metadata));
        stamps.flush().unwrap();
        assert!(Stamps::load(&log(), &m2).trusts(&hash, &metadata), "read back after a flush");

        std::fs::write(dir.path().join(FILE_NAME), b"{\"version\":1,\"artif").unwrap();
        assert!(!Stamps::load(&log(), &m2).trusts(&hash, &metadata), "a torn cache trusts nothing");
    }
}
