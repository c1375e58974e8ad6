//! Serving artifacts to the depot: stored ones from their file, and ones
//! still being written (by a PUT or a copy) from the write's temp file, as
//! the bytes arrive. The second is what lets replication run as a pipeline
//! (DESIGN §13): a sled forwards an artifact to the next one while it is
//! still receiving it, instead of after its commit.
//!
//! # What a follower may read
//!
//! A write that knows the artifact's length (a PUT with `Content-Length`, a
//! copy whose source said) registers itself here and publishes, on a watch
//! channel, how many bytes of its temp file are readable: written and
//! flushed to the file (tokio's files write in the background; a write is
//! in the file only once the next one starts or a flush returns), and, for
//! a continued copy, past a prefix that has been re-hashed. A depot request
//! that finds the write follows that count and never reads past it.
//!
//! The followers get bytes before the whole hash has been checked. That
//! does not weaken invariant 3: a follower is another sled's copy, which
//! checks the whole hash before its own rename. What can go wrong is only
//! wasted work, and it is cut short: a write that fails or starts over
//! closes or bumps its channel, and every follower's response breaks off
//! before its last byte (the copier then resumes elsewhere).
//!
//! # Which file
//!
//! Every device's temp file holds the same bytes at the same offsets; the
//! write publishes the path of one device that is still writing, and
//! another if that one drops out. A follower holds its file open, so a
//! rename (the commit) or a removal (a dropped device) under it does not
//! disturb the bytes it has yet to read.
//!
//! # An artifact that is not here yet
//!
//! A depot request for an artifact this sled's config lists but that is
//! neither stored nor being written waits up to [`ARRIVAL_WAIT`] for a write
//! to register (a pipelined copy is usually asked for a few milliseconds
//! before its source's own write has begun), then answers 503 with
//! `Retry-After`, which the copier treats as a busy source.

use super::{ArtifactStore, StoreError};
use bytes::Bytes;
use camino::Utf8PathBuf;
use common::ArtifactHash;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{OwnedSemaphorePermit, watch};

/// How long a depot request waits for an expected artifact's write to begin.
pub const ARRIVAL_WAIT: Duration = Duration::from_secs(2);

/// How long a depot request waits for an artifact whose copy is queued
/// here (or opening its source): a queued copy starts when a running one
/// ends, which with copies of a few MiB at link rate is seconds. Longer
/// than that and the follower is better off with its next source.
pub const QUEUED_ARRIVAL_WAIT: Duration = Duration::from_secs(10);

/// Bytes read from a temp file per response chunk.
const FOLLOW_CHUNK_BYTES: u64 = 256 * 1024;

/// The writes that can be followed, by artifact.
#[derive(Default)]
pub(super) struct InFlightWrites {
    writes: std::sync::Mutex<HashMap<ArtifactHash, watch::Receiver<Published>>>,
    /// Bumped when a write registers or ends and when an artifact is
    /// committed, so that depot requests waiting for one look again.
    changes: watch::Sender<u64>,
}

/// What a write has made readable (see the module doc).
#[derive(Clone, Debug)]
pub(super) struct Published {
    pub path: Utf8PathBuf,
    pub readable: u64,
    /// The artifact's length, as the writer was told it.
    pub total: u64,
    /// The whole hash has been checked; `readable == total`.
    pub complete: bool,
    /// Bumped when the write starts over from byte 0: bytes read before are
    /// not part of the artifact.
    pub epoch: u32,
    /// In-flight writes between these bytes and a complete copy, this one
    /// included (see `common::depot::HOPS_HEADER`).
    pub hops: u32,
}

/// A write's registration; dropping it ends the write's publication (a
/// follower that has not seen `complete` then fails).
pub(super) struct Serving {
    registry: Arc<InFlightWrites>,
    hash: ArtifactHash,
    sender: watch::Sender<Published>,
}

impl InFlightWrites {
    /// Registers a write of `hash` unless another one is already followed.
    pub fn register(self: &Arc<Self>, hash: ArtifactHash, first: Published) -> Option<Serving> {
        let mut writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        if writes.get(&hash).is_some_and(|receiver| receiver.has_changed().is_ok()) {
            return None;
        }
        let (sender, receiver) = watch::channel(first);
        writes.insert(hash, receiver);
        drop(writes);
        self.announce_change();
        Some(Serving { registry: self.clone(), hash, sender })
    }

    pub fn announce_change(&self) {
        self.changes.send_modify(|count| *count = count.wrapping_add(1));
    }

    fn find(&self, hash: &ArtifactHash) -> Option<watch::Receiver<Published>> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).get(hash).cloned()
    }
}

impl Serving {
    /// Whether any depot request follows the write now (the registry's own
    /// receiver does not count).
    pub fn followed(&self) -> bool {
        self.sender.receiver_count() > 1
    }

    pub fn published(&self) -> Published {
        self.sender.borrow().clone()
    }

    pub fn publish(&self, update: impl FnOnce(&mut Published)) {
        self.sender.send_modify(update);
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut writes = self.registry.writes.lock().unwrap_or_else(|e| e.into_inner());
        if writes.get(&self.hash).is_some_and(|receiver| receiver.same_channel(&self.sender.subscribe())) {
            writes.remove(&self.hash);
        }
        drop(writes);
        self.registry.announce_change();
    }
}

/// An artifact for the depot to send.
pub enum DepotArtifact {
    Stored { file: tokio::fs::File, length: u64 },
    Writing(Follower),
}

impl DepotArtifact {
    /// The artifact's length (for one being written, as its writer was told).
    pub fn length(&self) -> u64 {
        match self {
            DepotArtifact::Stored { length, .. } => *length,
            DepotArtifact::Writing(follower) => follower.total,
        }
    }

    /// In-flight writes between its bytes and a complete copy: 0 if stored.
    pub fn hops(&self) -> u32 {
        match self {
            DepotArtifact::Stored { .. } => 0,
            DepotArtifact::Writing(follower) => follower.hops,
        }
    }
}

/// Reads a write's temp file as far as the write has published.
pub struct Follower {
    hash: ArtifactHash,
    receiver: watch::Receiver<Published>,
    file: tokio::fs::File,
    path: Utf8PathBuf,
    epoch: u32,
    total: u64,
    hops: u32,
    position: u64,
    end: u64,
}

impl Follower {
    /// Limits the follower to `start..end` (`end` exclusive).
    pub async fn range(mut self, start: u64, end: u64) -> std::io::Result<Follower> {
        self.file.seek(std::io::SeekFrom::Start(start)).await?;
        self.position = start;
        self.end = end.min(self.total);
        Ok(self)
    }

    /// The next chunk, once the write has made it readable; `None` at the end.
    pub async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        let broken = |what: String| std::io::Error::other(format!("artifact {}: {what}", self.hash));
        loop {
            if self.position >= self.end {
                return Ok(None);
            }
            let published = self.receiver.borrow_and_update().clone();
            if published.epoch != self.epoch {
                return Err(broken("the write this response followed started over".into()));
            }
            if published.readable > self.position {
                if published.path != self.path {
                    // The device this response read from dropped out.
                    let mut file = tokio::fs::File::open(&published.path).await?;
                    file.seek(std::io::SeekFrom::Start(self.position)).await?;
                    (self.file, self.path) = (file, published.path);
                }
                let wanted = (published.readable.min(self.end) - self.position).min(FOLLOW_CHUNK_BYTES);
                let mut buffer = vec![0u8; wanted as usize];
                let read = self.file.read(&mut buffer).await?;
                if read == 0 {
                    return Err(broken(format!("the temp file ends before byte {}", published.readable)));
                }
                buffer.truncate(read);
                self.position += read as u64;
                return Ok(Some(Bytes::from(buffer)));
            }
            if self.receiver.changed().await.is_err() {
                let last = self.receiver.borrow().clone();
                if !last.complete || last.readable <= self.position {
                    return Err(broken(format!("the write failed after {} bytes", last.readable)));
                }
            }
        }
    }
}

impl ArtifactStore {
    /// Opens an artifact for the depot: stored on a healthy M.2, or being
    /// written (see the module doc). The permit bounds the downloads served
    /// at once; it must live as long as the response body.
    pub async fn open_for_depot(
        &self,
        hash: &ArtifactHash,
    ) -> Result<(DepotArtifact, OwnedSemaphorePermit), StoreError> {
        let permit = self.depot_permits.clone().try_acquire_owned().map_err(|_| StoreError::Busy {
            activity: "serving depot downloads",
            limit: self.limits.max_concurrent_depot_reads,
        })?;
        let mut changes = self.in_flight_writes.changes.subscribe();
        let started = tokio::time::Instant::now();
        loop {
            changes.mark_unchanged();
            if let Some(stored) = self.open_stored(hash).await? {
                return Ok((stored, permit));
            }
            if let Some(follower) = self.follow(hash).await {
                return Ok((DepotArtifact::Writing(follower), permit));
            }
            if !self.config.read().await.may_want(hash) {
                return Err(StoreError::NotFound { hash: *hash });
            }
            // Not here yet: wait for a write to register, or for a commit
            // that raced with the looks above; longer for a copy queued
            // here, which starts when one of this sled's copies ends.
            let queued = self.copies_in_flight.lock().unwrap_or_else(|e| e.into_inner()).contains(hash);
            let waited = if queued { QUEUED_ARRIVAL_WAIT } else { ARRIVAL_WAIT };
            let woke = tokio::time::timeout_at(started + waited, changes.changed()).await;
            if !matches!(woke, Ok(Ok(()))) {
                return Err(StoreError::NotYetHere { hash: *hash, waited });
            }
        }
    }

    /// The stored copy to serve: one whose metadata still matches its last
    /// verification (see [`super::stamps`]) if there is one, else any that
    /// opens; never one whose last read failed.
    async fn open_stored(&self, hash: &ArtifactHash) -> Result<Option<DepotArtifact>, StoreError> {
        let unreadable = self.unreadable_state().clone();
        let mut unverified = None;
        for m2 in self.healthy().into_iter().filter(|m2| !unreadable.contains_key(&(m2.slot, *hash))) {
            let Ok(file) = tokio::fs::File::open(m2.artifact_path(hash)).await else { continue };
            let metadata = file.metadata().await.map_err(|source| StoreError::Io {
                what: "reading the size of",
                path: m2.artifact_path(hash),
                source,
            })?;
            let stored = DepotArtifact::Stored { file, length: metadata.len() };
            if self.stamps(&m2).trusts(hash, &metadata) {
                return Ok(Some(stored));
            }
            unverified.get_or_insert(stored);
        }
        Ok(unverified)
    }

    /// A follower of the write of `hash`, if one is registered and its file
    /// can still be opened (a commit may rename it away meanwhile; the
    /// caller then finds the stored file).
    async fn follow(&self, hash: &ArtifactHash) -> Option<Follower> {
        let mut receiver = self.in_flight_writes.find(hash)?;
        let published = receiver.borrow_and_update().clone();
        let file = tokio::fs::File::open(&published.path).await.ok()?;
        Some(Follower {
            hash: *hash,
            receiver,
            file,
            path: published.path,
            epoch: published.epoch,
            total: published.total,
            hops: published.hops,
            position: 0,
            end: published.total,
        })
    }
}
