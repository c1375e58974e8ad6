//! Nexus's staging area: where verified artifact bytes wait until enough
//! sleds hold them.
//!
//! Layout: `<dir>/artifacts/<sha256>` for staged artifacts, `<dir>/uploads/`
//! for uploads in progress (removed wholesale at start-up).
//!
//! Who may delete a staged artifact: it is *pinned* while anything in this
//! process needs it (an upload in flight, or a staged repository waiting in
//! the replication task). Only unpinned files are ever deleted, by
//! [`StagingArea::sweep`] (after a failed upload and at start-up) or
//! [`StagingArea::remove_if_unpinned`] (when replication is done with a
//! repository). So a failed upload can never delete bytes that a concurrent
//! upload of another repository sharing the artifact is about to record.

use camino::{Utf8Path, Utf8PathBuf};
use common::ArtifactHash;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub struct StagingArea {
    root: Utf8PathBuf,
    pins: Mutex<BTreeMap<ArtifactHash, usize>>,
}

/// Keeps one staged artifact from being deleted while held.
pub struct Pin {
    staging: Arc<StagingArea>,
    hash: ArtifactHash,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.staging.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = pins.get_mut(&self.hash) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.hash);
            }
        }
    }
}

impl Pin {
    pub fn hash(&self) -> ArtifactHash {
        self.hash
    }
}

impl StagingArea {
    /// Creates the layout and removes uploads that a previous run left
    /// unfinished.
    pub fn open(root: &Utf8Path) -> std::io::Result<Arc<StagingArea>> {
        common::durable::create_dir_all(&root.join("artifacts"))?;
        let uploads = root.join("uploads");
        if uploads.exists() {
            std::fs::remove_dir_all(&uploads)?;
        }
        common::durable::create_dir_all(&uploads)?;
        Ok(Arc::new(StagingArea { root: root.to_owned(), pins: Mutex::new(BTreeMap::new()) }))
    }

    /// This Nexus's id, kept in `<dir>/nexus-id` so that a restart is the
    /// same Nexus: its staged rows of earlier runs stay its own, and are
    /// released or reported lost instead of orphaned. Created on first use.
    pub fn load_or_create_id(&self) -> Result<uuid::Uuid, NexusIdError> {
        let path = self.root.join("nexus-id");
        let invalid = |problem: String| NexusIdError::Invalid { path: path.clone(), problem };
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map_err(|error: uuid::Error| invalid(error.to_string())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let id = uuid::Uuid::new_v4();
                common::durable::create_file(&path, id.to_string().as_bytes(), 0o644)
                    .map_err(|source| NexusIdError::Io { path: path.clone(), source })?;
                Ok(id)
            }
            Err(source) => Err(NexusIdError::Io { path, source }),
        }
    }

    pub fn root(&self) -> &Utf8Path {
        &self.root
    }

    pub fn artifacts_dir(&self) -> Utf8PathBuf {
        self.root.join("artifacts")
    }

    pub fn artifact_path(&self, hash: &ArtifactHash) -> Utf8PathBuf {
        self.artifacts_dir().join(hash.to_string())
    }

    pub fn uploads_dir(&self) -> Utf8PathBuf {
        self.root.join("uploads")
    }

    pub fn pin(self: &Arc<Self>, hash: ArtifactHash) -> Pin {
        *self.pins.lock().unwrap_or_else(|e| e.into_inner()).entry(hash).or_default() += 1;
        Pin { staging: self.clone(), hash }
    }

    fn is_pinned(&self, hash: &ArtifactHash) -> bool {
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).contains_key(hash)
    }

    /// Staged artifacts on disk.
    pub fn list(&self) -> std::io::Result<Vec<ArtifactHash>> {
        let mut hashes = Vec::new();
        for entry in std::fs::read_dir(self.root.join("artifacts"))? {
            if let Some(hash) = entry?.file_name().to_str().and_then(|name| name.parse().ok()) {
                hashes.push(hash);
            }
        }
        Ok(hashes)
    }

    /// Deletes the staged copy unless something still pins it. Returns
    /// whether it was deleted.
    pub fn remove_if_unpinned(&self, hash: &ArtifactHash) -> std::io::Result<bool> {
        // Holding the pin lock across the unlink keeps a new pin from
        // claiming a file that is about to vanish.
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if pins.contains_key(hash) {
            return Ok(false);
        }
        match std::fs::remove_file(self.artifact_path(hash)) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Deletes a staged copy found corrupt (its contents hash to something
    /// else), pins or not: pins keep good bytes, and these are not. Only if
    /// the name still points at the file that was hashed (`inode`), so that
    /// a fresh copy staged meanwhile by a re-upload stays.
    pub fn remove_corrupt(&self, hash: &ArtifactHash, inode: u64) -> std::io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let _pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.artifact_path(hash);
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.ino() == inode => std::fs::remove_file(&path).map(|()| true),
            Ok(_) => Ok(false),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Deletes every unpinned staged artifact, and anything in the artifacts
    /// directory that is not one. Returns how many files went.
    pub fn sweep(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(self.root.join("artifacts"))? {
            let entry = entry?;
            let hash = entry.file_name().to_str().and_then(|name| name.parse::<ArtifactHash>().ok());
            match hash {
                Some(hash) if self.is_pinned(&hash) => {}
                Some(hash) => removed += usize::from(self.remove_if_unpinned(&hash)?),
                None => {
                    std::fs::remove_file(entry.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NexusIdError {
    #[error("the Nexus id file {path} is not a UUID: {problem}")]
    Invalid { path: Utf8PathBuf, problem: String },
    #[error("reading or creating the Nexus id file {path}")]
    Io {
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A recorded repository whose artifacts are staged here, on its way to the
/// replication task. Its pins keep the staged files until that task is done
/// with it.
pub struct StagedRepo {
    pub repo_id: uuid::Uuid,
    pub system_version: String,
    pub artifacts: Vec<StagedArtifact>,
    /// One of `updates.handoff_capacity` slots, held until replication lets
    /// the repository go: it bounds the staged repositories this Nexus
    /// holds, queued and in the task alike. `None` for repositories
    /// recovered at start-up beyond the capacity (at most the unpruned
    /// repositories, which the pruner bounds).
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub struct StagedArtifact {
    pub hash: ArtifactHash,
    pub size: u64,
    pub pin: Pin,
}

/// How many times recovery reads a staged file that failed to read before
/// Nexus refuses to start, and the pause between tries.
const UNREADABLE_TRIES: u32 = 3;
const UNREADABLE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// A staged file that could not be read at start-up (not a wrong hash).
/// Nexus does not start: sweeping would delete what may be the only copy
/// of an acknowledged upload.
#[derive(Debug, thiserror::Error)]
#[error(
    "staged artifact {path} could not be read ({tries} tries); refusing to start rather than \
     treat it as lost (fix the staging file system, then start Nexus again)"
)]
pub struct UnreadableStaging {
    pub path: Utf8PathBuf,
    pub tries: u32,
    #[source]
    pub source: std::io::Error,
}

/// At start-up: hands back, as staged repositories, what is still staged
/// for unpruned repositories, after checking each file's hash (a file whose
/// contents do not match its name is deleted). Everything else staged is
/// then swept. A file that cannot be read is retried a few times and then
/// fails the start, before anything is swept.
pub async fn recover(
    staging: &Arc<StagingArea>,
    repos: &[crate::db::model::TufRepoWithArtifacts],
    slots: &Arc<tokio::sync::Semaphore>,
    log: &slog::Logger,
) -> Result<Vec<StagedRepo>, UnreadableStaging> {
    let mut verified: BTreeMap<ArtifactHash, bool> = BTreeMap::new();
    let mut recovered = Vec::new();
    for recorded in repos {
        let mut artifacts = Vec::new();
        for artifact in &recorded.artifacts {
            let hash = artifact.sha256.0;
            let good = match verified.get(&hash) {
                Some(good) => *good,
                None => {
                    let good = verify_staged_retrying(staging, &hash, log).await?;
                    verified.insert(hash, good);
                    good
                }
            };
            if good {
                artifacts.push(StagedArtifact { hash, size: artifact.size as u64, pin: staging.pin(hash) });
            }
        }
        if !artifacts.is_empty() {
            slog::info!(log, "recovered staged repository"; "system_version" => &recorded.repo.system_version,
                "artifacts" => artifacts.len(), "of" => recorded.artifacts.len());
            recovered.push(StagedRepo {
                repo_id: recorded.repo.id,
                system_version: recorded.repo.system_version.clone(),
                artifacts,
                slot: slots.clone().try_acquire_owned().ok(),
            });
        }
    }
    match staging.sweep() {
        Ok(removed) if removed > 0 => {
            slog::info!(log, "removed staged files no repository needs"; "count" => removed)
        }
        Ok(_) => {}
        Err(error) => slog::warn!(log, "sweeping the staging area failed"; "error" => %error),
    }
    Ok(recovered)
}

/// What checking one staged file found.
#[derive(Debug)]
pub enum StagedCheck {
    Intact,
    Missing,
    /// Its contents do not match its name; `inode` is the file hashed.
    Corrupt {
        inode: u64,
    },
    /// Reading it failed: nothing is known about its contents, so it is kept.
    Unreadable(std::io::Error),
}

async fn verify_staged_retrying(
    staging: &StagingArea,
    hash: &ArtifactHash,
    log: &slog::Logger,
) -> Result<bool, UnreadableStaging> {
    let mut tries = 0;
    loop {
        tries += 1;
        match check_staged(staging, hash, log).await {
            StagedCheck::Intact => return Ok(true),
            StagedCheck::Corrupt { .. } => {
                if let Err(error) = staging.remove_if_unpinned(hash) {
                    slog::error!(log, "deleting a corrupt staged artifact failed"; "path" => %staging.artifact_path(hash),
                        "error" => %error);
                }
                return Ok(false);
            }
            StagedCheck::Missing => return Ok(false),
            StagedCheck::Unreadable(source) if tries >= UNREADABLE_TRIES => {
                return Err(UnreadableStaging { path: staging.artifact_path(hash), tries, source });
            }
            StagedCheck::Unreadable(error) => {
                slog::warn!(log, "reading a staged artifact failed; trying again"; "path" => %staging.artifact_path(hash),
                    "error" => %error, "try" => tries);
                tokio::time::sleep(UNREADABLE_PAUSE).await;
            }
        }
    }
}

/// Re-hashes a staged copy (the caller decides what to do with a corrupt
/// one).
pub async fn check_staged(staging: &StagingArea, hash: &ArtifactHash, log: &slog::Logger) -> StagedCheck {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let path = staging.artifact_path(hash);
    let checked = path.clone();
    let digest = tokio::task::spawn_blocking(move || -> std::io::Result<([u8; 32], u64)> {
        let mut file = std::fs::File::open(&checked)?;
        common::failpoints::read_error("nexus::staging::read_error", &checked)?;
        let inode = file.metadata()?.ino();
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok((hasher.finalize().into(), inode))
    })
    .await
    .expect("hashing does not panic");
    match digest {
        Ok((digest, _)) if ArtifactHash(digest) == *hash => StagedCheck::Intact,
        Ok((digest, inode)) => {
            let actual = ArtifactHash(digest);
            slog::error!(log, "staged artifact is corrupt"; "path" => %path, "actual_sha256" => %actual);
            StagedCheck::Corrupt { inode }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => StagedCheck::Missing,
        Err(error) => StagedCheck::Unreadable(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_artifacts_survive_sweeps_until_released() {
        let dir = camino_tempfile::tempdir().unwrap();
        let staging = StagingArea::open(dir.path()).unwrap();
        let (a, b) = (ArtifactHash([1; 32]), ArtifactHash([2; 32]));
        for hash in [a, b] {
            std::fs::write(staging.artifact_path(&hash), b"bytes").unwrap();
        }
        std::fs::write(staging.root().join("artifacts/garbage"), b"x").unwrap();
        let first = staging.pin(a);
        let second = staging.pin(a);
        assert_eq!(staging.sweep().unwrap(), 2, "b and the garbage file");
        assert_eq!(staging.list().unwrap(), [a]);
        drop(first);
        assert!(!staging.remove_if_unpinned(&a).unwrap(), "still pinned once");
        drop(second);
        assert!(staging.remove_if_unpinned(&a).unwrap());
        assert!(staging.list().unwrap().is_empty());
    }

    #[test]
    fn the_nexus_id_survives_a_reopen_and_a_bad_file_is_refused() {
        let dir = camino_tempfile::tempdir().unwrap();
        let id = StagingArea::open(dir.path()).unwrap().load_or_create_id().unwrap();
        assert_eq!(StagingArea::open(dir.path()).unwrap().load_or_create_id().unwrap(), id);
        std::fs::write(dir.path().join("nexus-id"), b"not a uuid").unwrap();
        let error = StagingArea::open(dir.path()).unwrap().load_or_create_id().unwrap_err().to_string();
        assert!(error.contains("nexus-id") && error.contains("not a UUID"), "{error}");
    }

    #[test]
    fn unfinished_uploads_are_removed_at_open() {
        let dir = camino_tempfile::tempdir().unwrap();
        let staging = StagingArea::open(dir.path()).unwrap();
        std::fs::create_dir_all(staging.uploads_dir().join("abc")).unwrap();
        std::fs::write(staging.uploads_dir().join("abc/repo.zip"), b"partial").unwrap();
        let staging = StagingArea::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(staging.uploads_dir()).unwrap().count(), 0);
    }
}
