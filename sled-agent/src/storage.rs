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
//!
//! Partial copies (`artifacts/tmp/<sha256>.copy`) that no copy is writing
//! right now are *held*: found at start-up, or handed back by a copy request
//! that failed before it changed them. Their bytes stay in the reserved
//! count, and the held map records how many belong to each, so that the copy
//! that takes one over ([`M2::take_partial`]) inherits exactly its
//! reservation and a discarded one returns exactly its own. Taking, holding
//! and discarding happen under the same lock as the counts, and a discard
//! unlinks the file under it too: a copy can never open a held file that is
//! being discarded.

use camino::{Utf8Path, Utf8PathBuf};
use common::ArtifactHash;
use common::api::sled_agent::{M2Inventory, M2State};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The suffix of a partial copy's temp file, `<sha256>.copy`.
const PARTIAL_SUFFIX: &str = ".copy";

pub struct M2 {
    pub slot: u32,
    root: Utf8PathBuf,
    quota: u64,
    usage: Mutex<Usage>,
    state: Mutex<M2State>,
}

#[derive(Debug, Default)]
struct Usage {
    /// Bytes of the artifact files in the dataset.
    stored: u64,
    /// Bytes reserved by writes in progress (their temp files) and by held
    /// partial copies.
    reserved: u64,
    /// Held partial copies: the bytes of `reserved` that each one holds.
    held: BTreeMap<ArtifactHash, u64>,
}

impl Usage {
    fn total(&self) -> u64 {
        self.stored.saturating_add(self.reserved)
    }

    fn release(&mut self, bytes: u64) {
        self.reserved = self.reserved.saturating_sub(bytes);
    }
}

/// What [`M2::prepare`] found in the temp area at start-up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Temp files removed.
    pub removed: usize,
    /// Partial copies kept (held) and their bytes.
    pub kept: usize,
    pub kept_bytes: u64,
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

    /// The temp file of a copy of `hash`: named by the hash alone, so that a
    /// copy can find the bytes an earlier one left (one copy per artifact
    /// runs at a time).
    pub fn partial_path(&self, hash: &ArtifactHash) -> Utf8PathBuf {
        self.tmp_dir().join(format!("{hash}{PARTIAL_SUFFIX}"))
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
        self.usage().release(bytes);
    }

    /// Turns a reservation into stored bytes: its temp file was renamed into
    /// place. If it replaced an identical file, the stored count is unchanged.
    pub fn commit(&self, bytes: u64, replaced_existing: bool) {
        let mut usage = self.usage();
        usage.release(bytes);
        if !replaced_existing {
            usage.stored = usage.stored.saturating_add(bytes);
        }
    }

    /// Takes over the held partial copy of `hash`, if any: returns the bytes
    /// reserved for it, which now belong to the caller's write.
    pub fn take_partial(&self, hash: &ArtifactHash) -> u64 {
        self.usage().held.remove(hash).unwrap_or(0)
    }

    /// Holds the partial copy of `hash` again, with `reserved` bytes of its
    /// writer's reservation (which stay reserved).
    pub fn hold_partial(&self, hash: ArtifactHash, reserved: u64) {
        let mut usage = self.usage();
        if let Some(before) = usage.held.insert(hash, reserved) {
            // Not reachable while one copy per artifact runs; never leak.
            usage.release(before);
        }
    }

    /// Removes the held partial copy of `hash`, if there is one, and returns
    /// its reservation. A partial a copy is writing is not held: untouched.
    pub fn discard_partial(&self, hash: &ArtifactHash) -> std::io::Result<bool> {
        let mut usage = self.usage();
        let Some(bytes) = usage.held.get(hash).copied() else {
            return Ok(false);
        };
        match std::fs::remove_file(self.partial_path(hash)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        usage.held.remove(hash);
        usage.release(bytes);
        Ok(true)
    }

    /// The artifacts of which a partial copy is held.
    pub fn held_partials(&self) -> Vec<ArtifactHash> {
        self.usage().held.keys().copied().collect()
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
        common::durable::create_dir_all(&self.tmp_dir())
    }

    /// At start-up: creates the dataset directories and clears the temp
    /// files a previous run left. A partial copy (`<sha256>.copy`) for which
    /// `keep` says yes is held, its bytes reserved; every other temp file
    /// (unfinished PUTs, other partial copies, ledger and cache temp files
    /// beside the ledger) is removed.
    pub fn prepare(&self, keep: impl Fn(&ArtifactHash) -> bool) -> std::io::Result<Prepared> {
        self.create_dirs()?;
        let mut prepared = Prepared::default();
        for entry in std::fs::read_dir(self.tmp_dir())? {
            let entry = entry?;
            let partial = entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_suffix(PARTIAL_SUFFIX)?.parse::<ArtifactHash>().ok())
                .filter(|hash| keep(hash));
            let metadata = entry.metadata()?;
            match partial {
                Some(hash) if metadata.is_file() => {
                    let mut usage = self.usage();
                    usage.reserved = usage.reserved.saturating_add(metadata.len());
                    usage.held.insert(hash, metadata.len());
                    prepared.kept += 1;
                    prepared.kept_bytes = prepared.kept_bytes.saturating_add(metadata.len());
                }
                _ => {
                    std::fs::remove_file(entry.path())?;
                    prepared.removed += 1;
                }
            }
        }
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp-") {
                std::fs::remove_file(entry.path())?;
                prepared.removed += 1;
            }
        }
        Ok(prepared)
    }
}
