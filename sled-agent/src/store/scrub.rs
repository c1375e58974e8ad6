//! The scrub: a background task that re-hashes every stored artifact on
//! every healthy M.2, at most `storage.scrub_bytes_per_sec`, one pass at most
//! every `storage.scrub_interval_secs` (the first right after start-up). It
//! finds what the start-up check cannot: damage that leaves a file's
//! metadata alone ([`super::stamps`]). A corrupt copy (its contents hash to
//! something else) is deleted, so that Nexus sees one copy fewer than the
//! sled has healthy M.2s and replication restores it. A copy that cannot be
//! opened or read is not corrupt, as far as anyone knows: it is kept,
//! reported as unreadable (not listed as held, so replication writes a
//! fresh copy over it) and read again next pass. Passes and what they found
//! are in `GET /inventory`.
//!
//! # Re-verification on a peer's report
//!
//! A peer whose copy from this depot failed its hash check says so
//! (`POST /artifact/sha256/{hash}/reverify`): the scrub then checks that
//! one artifact's copies at once, at the scrub's rate, rather than up to a
//! day later. One such check runs at a time, and an artifact already
//! queued or under way is not queued again, so a peer cannot make the sled
//! read more than its stored artifacts, once each, at the scrub's rate.
//!
//! # Pacing
//!
//! Files are read a chunk ([`FileHash::CHUNK`]) at a time on the blocking
//! pool. After each chunk the scrub sleeps until the bytes read so far fit
//! the rate since the pass began. If it falls behind (a slow disk, a wait for
//! the commit lock), it forgets the debt beyond a second's worth, so that it
//! never bursts to catch up.
//!
//! # Races
//!
//! The scrub reads files other tasks may replace (a PUT or copy renames
//! identical verified bytes over them) or delete (the reconciler). It hashes
//! the file it opened; before deleting one found corrupt, it takes the commit
//! lock (which every rename into place holds) and deletes only if the name
//! still points at the inode it hashed, so a fresh verified copy renamed in
//! meanwhile is never deleted, and the quota's stored count is adjusted under
//! the same lock as a commit's. A file that is gone when opened is skipped.

use super::ArtifactStore;
use super::verify::{FileHash, Hashed};
use crate::storage::M2;
use common::ArtifactHash;
use common::api::sled_agent::ScrubPass;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The most a scrub that fell behind may read at full speed to catch up.
const MAX_CATCH_UP: Duration = Duration::from_secs(1);

pub(super) enum Scrubbed {
    Intact {
        bytes: u64,
    },
    Corrupt {
        bytes: u64,
        removed: bool,
    },
    /// Opening or reading it failed: kept, and reported.
    Unreadable,
    /// Deleted or replaced before it could be opened.
    Gone,
}

impl ArtifactStore {
    /// Checks `hash`'s stored copies soon (see the module doc). False if
    /// no copy is stored here; true if a check is queued or under way.
    pub fn reverify(self: &Arc<Self>, hash: ArtifactHash) -> bool {
        let stored: Vec<Arc<M2>> =
            self.healthy().into_iter().filter(|m2| m2.artifact_path(&hash).is_file()).collect();
        if stored.is_empty() {
            return false;
        }
        if !self.reverifying.lock().unwrap_or_else(|e| e.into_inner()).insert(hash) {
            return true;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let _one_at_a_time = store.reverify_permit.lock().await;
            let rate = store.scrub_state().rate_limit_bytes_per_sec;
            let mut pacer = Pacer { bytes_per_sec: rate, since: Instant::now(), bytes: 0 };
            for m2 in &stored {
                let outcome = match store.scrub_file(m2, hash, &mut pacer).await {
                    Scrubbed::Intact { .. } => "intact",
                    Scrubbed::Corrupt { removed: true, .. } => "corrupt, removed",
                    Scrubbed::Corrupt { removed: false, .. } => "corrupt, removal failed",
                    Scrubbed::Unreadable => "unreadable, kept",
                    Scrubbed::Gone => "gone",
                };
                slog::info!(store.log, "re-verified an artifact a peer found wrong"; "hash" => %hash,
                    "slot" => m2.slot, "outcome" => outcome);
            }
            store.reverifying.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash);
        });
        true
    }

    /// Runs scrub passes forever: one right away, then one every `interval`
    /// (from the start of the previous one), each at most `bytes_per_sec`.
    pub(super) async fn scrub_forever(self: Arc<Self>, bytes_per_sec: u64, interval: Duration) {
        loop {
            let started = Instant::now();
            self.scrub_pass(bytes_per_sec).await;
            tokio::time::sleep_until(started + interval).await;
        }
    }

    /// One pass over every artifact file of every healthy M.2, at most
    /// `bytes_per_sec` (0: as fast as the disk goes). Its progress is the
    /// status's `current` pass; at the end it becomes `last`.
    pub(super) async fn scrub_pass(&self, bytes_per_sec: u64) -> ScrubPass {
        let clock = Instant::now();
        let mut pass = ScrubPass {
            started: chrono::Utc::now(),
            finished: None,
            files_checked: 0,
            bytes_checked: 0,
            corrupt_removed: 0,
            unreadable: 0,
            bytes_per_sec: 0,
        };
        self.scrub_state().current = Some(pass.clone());
        let mut pacer = Pacer { bytes_per_sec, since: clock, bytes: 0 };
        for m2 in &self.m2s {
            if !m2.is_healthy() {
                continue;
            }
            let names = match m2.artifact_files() {
                Ok(names) => names,
                Err(error) => {
                    slog::warn!(self.log, "scrub: listing artifacts failed"; "slot" => m2.slot, "error" => %error);
                    continue;
                }
            };
            // Names that are not hashes are the start-up check's and the
            // reconciler's business.
            for hash in names.iter().filter_map(|name| name.parse::<ArtifactHash>().ok()) {
                if !m2.is_healthy() {
                    break;
                }
                let bytes = match self.scrub_file(m2, hash, &mut pacer).await {
                    Scrubbed::Gone => continue,
                    Scrubbed::Unreadable => {
                        pass.unreadable += 1;
                        0
                    }
                    Scrubbed::Intact { bytes } => bytes,
                    Scrubbed::Corrupt { bytes, removed } => {
                        pass.corrupt_removed += u64::from(removed);
                        bytes
                    }
                };
                pass.files_checked += 1;
                pass.bytes_checked += bytes;
                pass.bytes_per_sec = per_second(pass.bytes_checked, clock.elapsed());
                self.scrub_state().current = Some(pass.clone());
            }
        }
        pass.finished = Some(chrono::Utc::now());
        pass.bytes_per_sec = per_second(pass.bytes_checked, clock.elapsed());
        {
            let mut status = self.scrub_state();
            status.current = None;
            status.last = Some(pass.clone());
            status.passes_finished += 1;
        }
        slog::info!(self.log, "scrub pass finished"; "files_checked" => pass.files_checked,
            "bytes_checked" => pass.bytes_checked, "corrupt_removed" => pass.corrupt_removed,
            "unreadable" => pass.unreadable,
            "bytes_per_sec" => pass.bytes_per_sec);
        self.flush_stamps().await;
        pass
    }

    async fn scrub_file(&self, m2: &Arc<M2>, hash: ArtifactHash, pacer: &mut Pacer) -> Scrubbed {
        let path = m2.artifact_path(&hash);
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || FileHash::open(&path)).await.expect("opening does not panic")
        };
        let mut hashing = match opened {
            Ok(hashing) => hashing,
            Err(_) if !path.exists() => return Scrubbed::Gone,
            Err(problem) => {
                self.mark_unreadable(m2, hash, problem);
                return Scrubbed::Unreadable;
            }
        };
        let inode = hashing.inode();
        let hashed = loop {
            let (returned, step) = tokio::task::spawn_blocking(move || {
                let step = hashing.step();
                (hashing, step)
            })
            .await
            .expect("hashing does not panic");
            hashing = returned;
            match step {
                Ok(0) => break hashing.finish(),
                Ok(read) => pacer.consume(read as u64).await,
                Err(problem) => break Err(problem),
            }
        };
        match hashed {
            Ok(Hashed { actual, bytes_read, stamp }) if actual == hash => {
                if let Some(stamp) = stamp {
                    self.stamps(m2).record(hash, stamp);
                }
                self.clear_unreadable(m2, &hash);
                Scrubbed::Intact { bytes: bytes_read }
            }
            Ok(Hashed { actual, bytes_read, .. }) => {
                let problem = format!("contents have sha256 {actual}");
                self.remove_corrupt(m2, hash, inode, bytes_read, &problem).await
            }
            Err(problem) => {
                // What was read may differ from what the stamp vouches for.
                self.stamps(m2).forget(&hash);
                self.mark_unreadable(m2, hash, problem);
                Scrubbed::Unreadable
            }
        }
    }

    /// Deletes a copy found corrupt, if its name still points at the file
    /// that was hashed (`inode`).
    pub(super) async fn remove_corrupt(
        &self,
        m2: &M2,
        hash: ArtifactHash,
        inode: u64,
        bytes: u64,
        problem: &str,
    ) -> Scrubbed {
        let path = m2.artifact_path(&hash);
        let _commit = self.commit.lock().await;
        let current = match std::fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(_) => return Scrubbed::Gone,
        };
        if inode != current.ino() {
            // Replaced by a verified rename since it was hashed.
            return Scrubbed::Gone;
        }
        slog::error!(self.log, "scrub: removing corrupt artifact"; "path" => %path, "problem" => problem);
        let removed = std::fs::remove_file(&path).and_then(|()| common::durable::sync_dir(&m2.dataset()));
        match removed {
            Ok(()) => {
                m2.forget_stored(current.len());
                self.stamps(m2).forget(&hash);
                self.clear_unreadable(m2, &hash);
                Scrubbed::Corrupt { bytes, removed: true }
            }
            Err(error) => {
                slog::error!(self.log, "scrub: removing corrupt artifact failed"; "path" => %path,
                    "error" => %error);
                Scrubbed::Corrupt { bytes, removed: false }
            }
        }
    }
}

fn per_second(bytes: u64, elapsed: Duration) -> u64 {
    if elapsed.is_zero() { 0 } else { (bytes as f64 / elapsed.as_secs_f64()) as u64 }
}

/// Keeps reading at or below a rate (see the module doc).
struct Pacer {
    /// 0: no limit.
    bytes_per_sec: u64,
    since: Instant,
    bytes: u64,
}

impl Pacer {
    async fn consume(&mut self, bytes: u64) {
        if self.bytes_per_sec == 0 {
            return;
        }
        self.bytes = self.bytes.saturating_add(bytes);
        let due = self.since + Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due).await;
        } else if now - due > MAX_CATCH_UP {
            self.since = now;
            self.bytes = 0;
        }
    }
}
