//! Start-up verification: before the sled serves anything, every stored
//! artifact is either trusted by its stamp ([`super::stamps`]: the file's
//! size, inode, mtime and ctime are those it had when last verified) or
//! re-hashed, `workers` files at a time. A file whose contents do not match
//! its name (or whose name is not a hash) is deleted, so that replication
//! heals it. A file that cannot be read (EIO, EMFILE, ENOMEM...) says
//! nothing about its contents: it is kept and reported as unreadable (see
//! [`super::ArtifactStore::unreadable`]), never deleted. Files that verify get a fresh stamp; the cache is written out
//! before the store opens, so a crash right after start-up does not throw
//! the work away.
//!
//! With an intact cache this is a `stat` per file (O(metadata)); a missing or
//! damaged cache costs what every start-up cost before it existed: reading
//! every byte. What the stamp cannot prove, the scrub re-checks later.

use super::stamps::{Stamp, Stamps};
use crate::storage::M2;
use camino::Utf8PathBuf;
use common::ArtifactHash;
use common::api::sled_agent::{StartupVerification, UnreadableCopy};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

enum Verdict {
    Trusted,
    Intact { bytes_read: u64 },
    Corrupt { problem: String, bytes_read: u64 },
    Unreadable { problem: String },
}

/// What the start-up check found.
pub(super) struct Verified {
    pub summary: StartupVerification,
    pub unreadable: Vec<UnreadableCopy>,
}

pub(super) async fn verify_all(
    log: &slog::Logger,
    m2s: &[(Arc<M2>, Arc<Stamps>)],
    workers: usize,
) -> Verified {
    let started = Instant::now();
    let mut files = Vec::new();
    for (m2, stamps) in m2s {
        match m2.artifact_files() {
            Ok(names) => {
                // Stamps of files that are gone are dropped with them.
                stamps.retain(&names.iter().filter_map(|name| name.parse().ok()).collect::<BTreeSet<_>>());
                files
                    .extend(names.into_iter().map(|name| (m2.slot, stamps.clone(), m2.dataset().join(name))));
            }
            Err(error) => {
                slog::warn!(log, "listing artifacts for verification failed"; "slot" => m2.slot, "error" => %error)
            }
        }
    }
    let results = futures::stream::iter(files)
        .map(|(slot, stamps, path)| async move {
            let checked = path.clone();
            let verdict =
                tokio::task::spawn_blocking(move || verify_file(&stamps, &checked)).await.unwrap_or_else(
                    |panic| Verdict::Unreadable { problem: format!("verifying {path} panicked: {panic}") },
                );
            (slot, path, verdict)
        })
        .buffer_unordered(workers)
        .collect::<Vec<_>>()
        .await;
    let mut verified = StartupVerification::default();
    let mut unreadable = Vec::new();
    for (slot, path, verdict) in results {
        match verdict {
            Verdict::Trusted => verified.trusted += 1,
            Verdict::Intact { bytes_read } => {
                verified.rehashed += 1;
                verified.bytes_read += bytes_read;
            }
            Verdict::Corrupt { problem, bytes_read } => {
                verified.rehashed += 1;
                verified.bytes_read += bytes_read;
                verified.removed += 1;
                slog::error!(log, "removing corrupt artifact"; "path" => %path, "problem" => &problem);
                if let Err(error) = std::fs::remove_file(&path) {
                    slog::error!(log, "removing corrupt artifact failed"; "path" => %path, "error" => %error);
                }
            }
            Verdict::Unreadable { problem } => {
                verified.unreadable += 1;
                slog::error!(log, "an artifact could not be read; keeping it"; "path" => %path, "problem" => &problem);
                if let Some(sha256) = path.file_name().and_then(|name| name.parse().ok()) {
                    unreadable.push(UnreadableCopy { slot, sha256, problem, since: chrono::Utc::now() });
                }
            }
        }
    }
    for (m2, stamps) in m2s {
        if let Err(error) = stamps.flush() {
            slog::warn!(log, "writing the verification cache failed"; "slot" => m2.slot, "error" => %error);
        }
    }
    verified.elapsed_millis = started.elapsed().as_millis().try_into().unwrap_or(u64::MAX);
    slog::info!(log, "verified stored artifacts"; "trusted" => verified.trusted, "rehashed" => verified.rehashed,
        "bytes_read" => verified.bytes_read, "removed" => verified.removed,
        "unreadable" => verified.unreadable, "elapsed_ms" => verified.elapsed_millis);
    Verified { summary: verified, unreadable }
}

/// Trusts the file by its stamp, or re-hashes it (recording a new stamp if
/// it is intact, forgetting the old one if not).
fn verify_file(stamps: &Stamps, path: &Utf8PathBuf) -> Verdict {
    let expected: ArtifactHash = match path.file_name().unwrap_or_default().parse() {
        Ok(hash) => hash,
        Err(error) => {
            return Verdict::Corrupt { problem: format!("not an artifact file: {error}"), bytes_read: 0 };
        }
    };
    match std::fs::metadata(path) {
        Ok(metadata) if stamps.trusts(&expected, &metadata) => return Verdict::Trusted,
        _ => {}
    }
    match hash_file(path) {
        Ok(hashed) if hashed.actual == expected => {
            if let Some(stamp) = hashed.stamp {
                stamps.record(expected, stamp);
            }
            Verdict::Intact { bytes_read: hashed.bytes_read }
        }
        Ok(hashed) => {
            stamps.forget(&expected);
            Verdict::Corrupt {
                problem: format!("contents have sha256 {}", hashed.actual),
                bytes_read: hashed.bytes_read,
            }
        }
        Err(problem) => {
            stamps.forget(&expected);
            Verdict::Unreadable { problem }
        }
    }
}

pub(super) struct Hashed {
    pub actual: ArtifactHash,
    pub bytes_read: u64,
    /// The file's stamp, if its metadata did not change while it was read
    /// (otherwise what was hashed may not be what the stamp describes).
    pub stamp: Option<Stamp>,
}

/// Hashes a whole file in one go (start-up has nothing else to do). An
/// error is an I/O error, naming the file: never a verdict on its contents.
fn hash_file(path: &camino::Utf8Path) -> Result<Hashed, String> {
    let mut hashing = FileHash::open(path)?;
    while hashing.step()? > 0 {}
    hashing.finish()
}

/// Hashing one file a chunk at a time, so that the scrub can pace itself
/// between chunks ([`super::scrub`]).
pub(super) struct FileHash {
    path: camino::Utf8PathBuf,
    file: std::fs::File,
    before: std::fs::Metadata,
    hasher: Sha256,
    buffer: Vec<u8>,
    bytes_read: u64,
}

impl FileHash {
    pub const CHUNK: usize = 1 << 20;

    pub fn open(path: &camino::Utf8Path) -> Result<FileHash, String> {
        let file = std::fs::File::open(path).map_err(|error| format!("opening {path}: {error}"))?;
        let before = file.metadata().map_err(|error| format!("reading the metadata of {path}: {error}"))?;
        Ok(FileHash {
            path: path.to_owned(),
            file,
            before,
            hasher: Sha256::new(),
            buffer: vec![0u8; Self::CHUNK],
            bytes_read: 0,
        })
    }

    /// The inode of the file being hashed.
    pub fn inode(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&self.before)
    }

    /// Reads and hashes up to [`Self::CHUNK`] more bytes; 0 at the end.
    pub fn step(&mut self) -> Result<usize, String> {
        let path = &self.path;
        let read = common::failpoints::read_error("sled_agent::store::read_error", path)
            .and_then(|()| self.file.read(&mut self.buffer))
            .map_err(|error| format!("reading {path} at byte {}: {error}", self.bytes_read))?;
        self.hasher.update(&self.buffer[..read]);
        self.bytes_read += read as u64;
        Ok(read)
    }

    pub fn finish(self) -> Result<Hashed, String> {
        let after = self
            .file
            .metadata()
            .map_err(|error| format!("reading the metadata of {}: {error}", self.path))?;
        let stamp = (Stamp::of(&self.before) == Stamp::of(&after)).then(|| Stamp::of(&after));
        Ok(Hashed { actual: ArtifactHash(self.hasher.finalize().into()), bytes_read: self.bytes_read, stamp })
    }
}
