//! Simulated M.2 devices: each is a directory with an artifact dataset
//! (`artifacts/`, temp files in `artifacts/tmp/`), a byte quota, and a state
//! that the simulation API can change.
//!
//! Quota accounting: `used` counts the bytes of the dataset's files plus the
//! bytes reserved by writes in progress. A write reserves each chunk before
//! writing it, so concurrent writers cannot overshoot the quota together.

use camino::{Utf8Path, Utf8PathBuf};
use common::ArtifactHash;
use common::api::sled_agent::{M2Inventory, M2State};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct M2 {
    pub slot: u32,
    root: Utf8PathBuf,
    quota: u64,
    used: AtomicU64,
    state: Mutex<M2State>,
}

#[derive(Debug, thiserror::Error)]
#[error("M.2 slot {slot} artifact dataset is full: {used} of {quota} bytes used, {wanted} more wanted")]
pub struct QuotaExceeded {
    pub slot: u32,
    pub used: u64,
    pub quota: u64,
    pub wanted: u64,
}

impl M2 {
    pub fn new(slot: u32, root: Utf8PathBuf, quota: u64) -> M2 {
        M2 { slot, root, quota, used: AtomicU64::new(0), state: Mutex::new(M2State::Healthy) }
    }

    pub fn root(&self) -> &Utf8Path {
        &self.root
    }

    pub fn dataset(&self) -> Utf8PathBuf {
        self.root.join("artifacts")
    }

    pub fn tmp_dir(&self) -> Utf8PathBuf {
        self.dataset().join("tmp")
    }

    pub fn artifact_path(&self, hash: &ArtifactHash) -> Utf8PathBuf {
        self.dataset().join(hash.to_string())
    }

    pub fn ledger_path(&self) -> Utf8PathBuf {
        self.root.join("artifact-config.json")
    }

    pub fn state(&self) -> M2State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_state(&self, state: M2State) -> M2State {
        std::mem::replace(&mut *self.state.lock().unwrap_or_else(|e| e.into_inner()), state)
    }

    pub fn is_healthy(&self) -> bool {
        self.state() == M2State::Healthy
    }

    /// Bytes still free under the quota.
    pub fn available(&self) -> u64 {
        self.quota.saturating_sub(self.used())
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    pub fn reserve(&self, bytes: u64) -> Result<(), QuotaExceeded> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.quota)
            })
            .map(|_| ())
            .map_err(|used| QuotaExceeded { slot: self.slot, used, quota: self.quota, wanted: bytes })
    }

    pub fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// Recounts `used` from the files in the dataset (no writes may be in
    /// progress on this device).
    pub fn recount_used(&self) -> std::io::Result<()> {
        let mut total = 0;
        for entry in std::fs::read_dir(self.dataset())? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                total += entry.metadata()?.len();
            }
        }
        self.used.store(total, Ordering::SeqCst);
        Ok(())
    }

    /// Names of the artifact files in the dataset (temp files excluded).
    pub fn artifact_files(&self) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(self.dataset())? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.extend(entry.file_name().into_string().ok());
            }
        }
        Ok(names)
    }

    pub fn inventory(&self) -> M2Inventory {
        M2Inventory {
            slot: self.slot,
            state: self.state(),
            path: self.root.to_string(),
            used_bytes: self.used(),
            quota_bytes: self.quota,
            artifacts: self.artifact_files().map(|files| files.len()).unwrap_or(0),
        }
    }

    /// Creates the dataset directories and removes temp files left by a
    /// previous run (writes that never finished).
    pub fn prepare(&self) -> std::io::Result<usize> {
        std::fs::create_dir_all(self.tmp_dir())?;
        let mut removed = 0;
        for entry in std::fs::read_dir(self.tmp_dir())? {
            std::fs::remove_file(entry?.path())?;
            removed += 1;
        }
        Ok(removed)
    }
}
