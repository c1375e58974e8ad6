//! Simulated M.2 devices: each is a directory with an artifact dataset
//! (`artifacts/`, temp files in `artifacts/tmp/`), a byte quota, and a state
//! that the simulation API can change.
//!
//! Quota accounting: a device's usage is the bytes of its stored artifact
//! files plus the bytes reserved by writes in progress, kept as two separate
//! counts under one lock. A write reserves each chunk before writing it, so
//! concurrent writers cannot overshoot the quota together; a commit moves its
//! reservation into the stored count. Recounting the stored files (when a
//! device comes back) replaces only the stored count, so it can never cancel a
//! live reservation, and returning one can never wrap below zero.

use camino::{Utf8Path, Utf8PathBuf};
use common::ArtifactHash;
use common::api::sled_agent::{M2Inventory, M2State};
use std::sync::Mutex;

pub struct M2 {
    pub slot: u32,
    root: Utf8PathBuf,
    quota: u64,
    usage: Mutex<Usage>,
    state: Mutex<M2State>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    /// Bytes of the artifact files in the dataset.
    stored: u64,
    /// Bytes reserved by writes in progress (their temp files).
    reserved: u64,
}

impl Usage {
    fn total(self) -> u64 {
        self.stored.saturating_add(self.reserved)
    }
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
        M2 { slot, root, quota, usage: Mutex::new(Usage::default()), state: Mutex::new(M2State::Healthy) }
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
        self.usage().total()
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves room for `bytes` more of a write in progress.
    pub fn reserve(&self, bytes: u64) -> Result<(), QuotaExceeded> {
        let mut usage = self.usage();
        let used = usage.total();
        match used.checked_add(bytes) {
            Some(total) if total <= self.quota => {
                usage.reserved += bytes;
                Ok(())
            }
            _ => Err(QuotaExceeded { slot: self.slot, used, quota: self.quota, wanted: bytes }),
        }
    }

    /// Returns a reservation whose write was abandoned.
    pub fn release(&self, bytes: u64) {
        let mut usage = self.usage();
        usage.reserved = usage.reserved.saturating_sub(bytes);
    }

    /// Turns a reservation into stored bytes: its temp file was renamed into
    /// place. If it replaced an identical file, the stored count is unchanged.
    pub fn commit(&self, bytes: u64, replaced_existing: bool) {
        let mut usage = self.usage();
        usage.reserved = usage.reserved.saturating_sub(bytes);
        if !replaced_existing {
            usage.stored = usage.stored.saturating_add(bytes);
        }
    }

    /// Accounts for a stored artifact file that was deleted.
    pub fn forget_stored(&self, bytes: u64) {
        let mut usage = self.usage();
        usage.stored = usage.stored.saturating_sub(bytes);
    }

    /// Recounts the stored bytes from the files in the dataset. Reservations
    /// of writes in progress are kept as they are.
    pub fn recount_stored(&self) -> std::io::Result<()> {
        let mut total = 0u64;
        for entry in std::fs::read_dir(self.dataset())? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                total = total.saturating_add(entry.metadata()?.len());
            }
        }
        self.usage().stored = total;
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

    /// Creates the dataset directories if missing. Temp files are left
    /// alone: writes may be in progress.
    pub fn create_dirs(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.tmp_dir())
    }

    /// At start-up: creates the dataset directories and removes temp files
    /// left by a previous run (writes that never finished, in the dataset's
    /// tmp/ and ledger temp files beside the ledger). Returns how many went.
    pub fn prepare(&self) -> std::io::Result<usize> {
        self.create_dirs()?;
        let mut removed = 0;
        for entry in std::fs::read_dir(self.tmp_dir())? {
            std::fs::remove_file(entry?.path())?;
            removed += 1;
        }
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp-") {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
