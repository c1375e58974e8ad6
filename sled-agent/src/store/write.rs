//! The write path that PUTs and copies share.
//!
//! The body streams into a temp file in `artifacts/tmp/` on each healthy
//! M.2, hashed as it goes. Each chunk is reserved against the device's quota
//! before it is written. A device that fails, fills up or errors mid-write
//! drops out; the others carry on. At the end the hash must match the name;
//! then each temp file is fsynced, renamed into place, and the dataset
//! directory fsynced, all before the caller hears "done" (DESIGN §11). A
//! partial or wrong file is therefore never visible under an artifact's
//! name, and two writers of the same hash can only ever rename identical,
//! verified bytes over each other.
//!
//! # Temp files
//!
//! A PUT writes to a random name (`<sha256>.<random>.tmp`): PUTs of one
//! artifact may run side by side, and a crashed one is worth nothing (Nexus
//! sends the whole body again), so start-up removes them.
//!
//! A copy writes to `<sha256>.copy`, a name a later copy can find: if the
//! sled agent dies mid-copy, the bytes already written survive the restart
//! (while the artifact is in the config, see [`crate::storage::M2::prepare`])
//! and the next copy of that artifact continues them. Only one copy per
//! artifact runs at a time (the in-flight set), so one name is enough. The
//! next copy ([`ArtifactStore::begin_write`] with [`Temp::Copy`]):
//!
//! 1. takes each healthy device's partial over with the bytes reserved for it
//!    (a file whose length the hold does not account for is emptied);
//! 2. truncates every device's partial to the shortest one, so that all of
//!    them continue from one offset; a device without one makes that 0;
//! 3. re-hashes that prefix on every device ([`PendingWrite::verify_prefix`],
//!    in the background, after the source answered) and starts over from
//!    byte 0 if they disagree, since it cannot tell which one is right;
//! 4. continues from the offset, and verifies the *whole* hash before any
//!    rename as always. Unsynced bytes can be lost or garbled by a power cut
//!    (a kill keeps them: they are in the page cache); such a prefix fails
//!    the final hash check and costs one more download, never a wrong file.
//!
//! A copy that fails after its 202 throws its partial away like a PUT (the
//! source it came from broke or lied); one refused before it wrote a byte
//! hands the partial back unchanged ([`PendingWrite::hold_partials`]). When
//! an artifact is committed, by a PUT or a copy, any partial of it still held
//! on another device is deleted: nothing would ever continue it.

use super::copy::InFlight;
use super::serve::{InFlightWrites, Published, Serving};
use super::stamps::Stamp;
use super::{ArtifactStore, StoreError};
use crate::storage::{M2, QuotaExceeded};
use bytes::Bytes;
use camino::{Utf8Path, Utf8PathBuf};
use common::api::sled_agent::ArtifactPutResponse;
use common::{ArtifactHash, Generation, error_chain};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek};
use std::sync::Arc;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// Bodies of refused PUTs are read and thrown away up to this size; beyond
/// it the connection is closed (the client then sees a broken pipe).
const DRAIN_LIMIT_BYTES: u64 = 1 << 30;

impl ArtifactStore {
    /// Stores the body under `hash` on every healthy M.2. With the body's
    /// `length` known, other sleds' depot requests may follow the write (see
    /// [`super::serve`]).
    pub async fn put<S, E>(
        &self,
        hash: ArtifactHash,
        generation: Generation,
        length: Option<u64>,
        body: S,
    ) -> Result<ArtifactPutResponse, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::error::Error,
    {
        let mut body = std::pin::pin!(body);
        let admitted = match self.put_permits.clone().try_acquire_owned() {
            Ok(permit) => match self.check_request(&hash, generation).await {
                Ok(()) => self.begin_write(hash, Temp::Put).map(|write| (permit, write)),
                Err(error) => Err(error),
            },
            Err(_) => Err(StoreError::Busy {
                activity: "receiving artifact PUTs",
                limit: self.limits.max_concurrent_puts,
            }),
        };
        let (_permit, mut write) = match admitted {
            Ok(admitted) => admitted,
            Err(error) => return Err(drain(body, error).await),
        };
        if let Some(length) = length {
            // Its bytes come from Nexus's complete copy.
            write.serve(&self.in_flight_writes, length, 1);
        }
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|error| StoreError::Body {
                hash,
                bytes: write.bytes,
                message: error_chain(&error),
            })?;
            if let Err(error) = write.write(&chunk).await {
                drop(write);
                return Err(drain(body, error).await);
            }
        }
        let outcome = self.commit(write).await;
        if outcome.is_ok() {
            self.forget_copy_failures(&hash);
        }
        outcome
    }

    /// Opens the temp file of a write on every healthy M.2. For a copy, the
    /// partials an earlier copy left are taken over and cut to their common
    /// length: the write continues from [`PendingWrite::bytes`], once
    /// [`PendingWrite::verify_prefix`] has re-hashed what is there.
    pub(super) fn begin_write(&self, hash: ArtifactHash, temp: Temp) -> Result<PendingWrite, StoreError> {
        let healthy = self.healthy();
        if healthy.is_empty() {
            return Err(StoreError::NoHealthyM2 { action: "store an artifact on" });
        }
        let mut opened = Vec::with_capacity(healthy.len());
        let mut failures = Vec::new();
        for m2 in healthy {
            match open_temp(&m2, &hash, temp) {
                Ok((file, tmp, reserved, kept)) => opened.push((file, kept, m2, tmp, reserved)),
                Err((tmp, error)) => failures.push(format!("M.2 slot {}: opening {tmp}: {error}", m2.slot)),
            }
        }
        let common = opened.iter().map(|(_, kept, ..)| *kept).min().unwrap_or(0);
        let mut targets = Vec::with_capacity(opened.len());
        for (file, _, m2, tmp, reserved) in opened {
            // Every device continues from the same offset: the end of the
            // shortest partial.
            let mut target = Target { file: None, m2, tmp, reserved, settled: false };
            match file.set_len(common).and_then(|()| (&file).seek(std::io::SeekFrom::Start(common))) {
                Ok(_) => {
                    target.m2.release(target.reserved - common);
                    target.reserved = common;
                    target.file = Some(tokio::fs::File::from_std(file));
                    targets.push(target);
                }
                // Dropping the target returns its reservation and file.
                Err(error) => {
                    failures.push(format!("M.2 slot {}: truncating {}: {error}", target.m2.slot, target.tmp))
                }
            }
        }
        if targets.is_empty() {
            return Err(StoreError::AllWritesFailed { hash, errors: failures.join("; ") });
        }
        Ok(PendingWrite {
            hash,
            datasets: targets.len() + failures.len(),
            targets,
            hasher: Sha256::new(),
            bytes: common,
            prefix_unverified: common > 0,
            failures,
            quota: None,
            serving: None,
            in_flight: None,
        })
    }

    /// Verifies the hash, then makes every surviving temp file durable under
    /// the artifact's name. A copy stays "in flight" until this returns, so
    /// no second download of it can start meanwhile.
    pub(super) async fn commit(&self, write: PendingWrite) -> Result<ArtifactPutResponse, StoreError> {
        let PendingWrite {
            serving, in_flight, hash, datasets, mut targets, hasher, bytes, mut failures, ..
        } = write;
        let actual = ArtifactHash(hasher.finalize().into());
        if actual != hash {
            return Err(StoreError::HashMismatch { expected: hash, actual, bytes });
        }
        for target in targets.iter_mut().filter(|t| t.file.is_some()) {
            let file = target.file.take().expect("filtered on a live file");
            if let Err(error) = sync(file).await {
                failures.push(format!("M.2 slot {}: syncing {}: {error}", target.m2.slot, target.tmp));
                target.drop_out();
            }
        }
        // Followers may read the rest: every byte is in the synced files,
        // and the hash is right. (A length that was not the artifact's ends
        // their responses instead.)
        if let Some(serving) = &serving
            && let Some(synced) = targets.iter().find(|t| !t.dropped_out())
            && serving.published().total == bytes
        {
            serving.publish(|published| {
                published.path = synced.tmp.clone();
                published.readable = bytes;
                published.complete = true;
            });
        }
        fail::fail_point!("sled_agent::store::before_rename", |_| std::process::abort());
        let config = self.config.read().await;
        if !config.known()?.artifacts.contains(&hash) {
            return Err(StoreError::ConfigChanged { hash });
        }
        let _commit = self.commit.lock().await;
        let mut successful_writes = 0;
        for target in targets.iter_mut().filter(|t| !t.dropped_out()) {
            if !target.m2.is_healthy() {
                failures.push(format!("M.2 slot {} failed before the rename", target.m2.slot));
                continue;
            }
            let destination = target.m2.artifact_path(&hash);
            let existed = destination.is_file();
            let renamed = std::fs::rename(&target.tmp, &destination).and_then(|()| {
                fail::fail_point!("sled_agent::store::after_rename", |_| std::process::abort());
                common::durable::sync_dir(&target.m2.dataset())
            });
            match renamed {
                Ok(()) => {
                    target.settled = true;
                    successful_writes += 1;
                    target.m2.commit(target.reserved, existed);
                    self.clear_unreadable(&target.m2, &hash);
                    // Just verified: the start-up check may trust it as is.
                    match std::fs::metadata(&destination) {
                        Ok(metadata) => self.stamps(&target.m2).record(hash, Stamp::of(&metadata)),
                        Err(error) => slog::warn!(self.log, "reading the metadata of a new artifact failed";
                            "path" => %destination, "error" => %error),
                    }
                }
                Err(error) => failures
                    .push(format!("M.2 slot {}: renaming into {destination}: {error}", target.m2.slot)),
            }
        }
        for m2 in self.healthy() {
            if let Err(error) = m2.discard_partial(&hash) {
                slog::warn!(self.log, "removing a partial copy failed"; "slot" => m2.slot, "hash" => %hash,
                    "error" => %error);
            }
        }
        // Temp files that did not make it are removed (by `Target::drop`)
        // before another copy of the artifact may start.
        drop(targets);
        drop(in_flight);
        drop(serving);
        self.in_flight_writes.announce_change();
        if successful_writes == 0 {
            return Err(StoreError::AllWritesFailed { hash, errors: failures.join("; ") });
        }
        for failure in &failures {
            slog::warn!(self.log, "artifact write failed on one M.2"; "hash" => %hash, "error" => failure);
        }
        Ok(ArtifactPutResponse { datasets, successful_writes })
    }
}

/// Which temp file a write goes to (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Temp {
    /// A random name, removed at start-up.
    Put,
    /// `<sha256>.copy`, continued by the next copy if this one is cut short
    /// by a crash.
    Copy,
}

/// Opens a write's temp file on one device. Returns the file, its path, the
/// bytes reserved for it and the bytes in it that a copy may continue from.
fn open_temp(
    m2: &M2,
    hash: &ArtifactHash,
    temp: Temp,
) -> Result<(std::fs::File, Utf8PathBuf, u64, u64), (Utf8PathBuf, std::io::Error)> {
    if temp == Temp::Put {
        let tmp = m2.tmp_dir().join(format!("{hash}.{:016x}.tmp", rand::random::<u64>()));
        return match std::fs::File::create_new(&tmp) {
            Ok(file) => Ok((file, tmp, 0, 0)),
            Err(error) => Err((tmp, error)),
        };
    }
    let tmp = m2.partial_path(hash);
    let reserved = m2.take_partial(hash);
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&tmp)
        .and_then(|file| Ok((file.metadata()?.len(), file)));
    match opened {
        // Bytes the hold does not account for were not left by a copy of
        // ours: they are not continued (begin_write truncates to 0).
        Ok((length, file)) => Ok((file, tmp, reserved, if length == reserved { length } else { 0 })),
        Err(error) => {
            m2.release(reserved);
            Err((tmp, error))
        }
    }
}

/// A write in progress to the temp files of every healthy M.2.
pub(super) struct PendingWrite {
    /// The registration that lets depot requests follow the write. First,
    /// so that followers see the write end before its temp files go.
    serving: Option<Serving>,
    pub hash: ArtifactHash,
    datasets: usize,
    targets: Vec<Target>,
    hasher: Sha256,
    /// Bytes written so far (for a continued copy, starting at the offset).
    pub bytes: u64,
    /// A continued copy's first `bytes` have not been re-hashed yet.
    prefix_unverified: bool,
    failures: Vec<String>,
    /// The first quota refusal, reported if every device refused.
    quota: Option<QuotaExceeded>,
    /// For copies: the in-flight mark, released when the write ends. The
    /// last field, so that it is dropped after the targets: a failed copy's
    /// temp files are gone before another copy of the artifact can start
    /// and open the same `<sha256>.copy`.
    pub in_flight: Option<InFlight>,
}

struct Target {
    m2: Arc<M2>,
    tmp: Utf8PathBuf,
    /// `None` once the target dropped out or was synced.
    file: Option<tokio::fs::File>,
    /// Bytes reserved against the quota; `u64::MAX` marks a dropped target.
    reserved: u64,
    /// The temp file and its reservation were handed on: renamed into place
    /// (the reservation became stored bytes) or back to the hold.
    settled: bool,
}

impl Target {
    /// Drops the target out of the write: its reservation is returned and its
    /// temp file removed (by `Drop`).
    fn drop_out(&mut self) {
        self.file = None;
        if !self.dropped_out() {
            self.m2.release(self.reserved);
            self.reserved = u64::MAX;
        }
    }

    fn dropped_out(&self) -> bool {
        self.reserved == u64::MAX
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if !self.settled {
            self.drop_out();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl PendingWrite {
    /// For a continued copy: re-hashes the prefix on every device. If they
    /// all agree, the write goes on from there (true); if not, it starts over
    /// from byte 0 (false), and whatever the caller fetched from the offset
    /// is of no use. Devices whose prefix cannot be read drop out.
    pub async fn verify_prefix(&mut self) -> Result<bool, StoreError> {
        if !std::mem::take(&mut self.prefix_unverified) {
            return Ok(true);
        }
        let length = self.bytes;
        let hashed =
            futures::future::join_all(self.targets.iter().filter(|t| t.file.is_some()).map(|target| {
                let path = target.tmp.clone();
                async move {
                    tokio::task::spawn_blocking(move || hash_prefix(&path, length)).await.unwrap_or_else(
                        |panic| Err(std::io::Error::other(format!("hashing panicked: {panic}"))),
                    )
                }
            }))
            .await;
        let mut agreed: Option<Sha256> = None;
        let mut disagree = false;
        let live = self.targets.iter_mut().filter(|t| t.file.is_some());
        for (target, hashed) in live.zip(hashed) {
            match hashed {
                Ok(hasher) => match &agreed {
                    None => agreed = Some(hasher),
                    Some(first) => disagree |= first.clone().finalize() != hasher.finalize(),
                },
                Err(error) => {
                    self.failures
                        .push(format!("M.2 slot {}: re-reading {}: {error}", target.m2.slot, target.tmp));
                    target.drop_out();
                }
            }
        }
        match agreed {
            Some(hasher) if !disagree => {
                self.hasher = hasher;
                Ok(true)
            }
            _ => {
                self.restart().await?;
                Ok(false)
            }
        }
    }

    /// Empties every temp file: the write starts over from byte 0.
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        for target in self.targets.iter_mut().filter(|t| t.file.is_some()) {
            let file = target.file.as_mut().expect("filtered on a live file");
            let emptied = async {
                file.set_len(0).await?;
                file.seek(std::io::SeekFrom::Start(0)).await
            };
            match emptied.await {
                Ok(_) => {
                    target.m2.release(target.reserved);
                    target.reserved = 0;
                }
                Err(error) => {
                    self.failures
                        .push(format!("M.2 slot {}: emptying {}: {error}", target.m2.slot, target.tmp));
                    target.drop_out();
                }
            }
        }
        self.hasher = Sha256::new();
        self.bytes = 0;
        self.prefix_unverified = false;
        if let Some(serving) = &self.serving {
            serving.publish(|published| {
                published.epoch += 1;
                published.readable = 0;
            });
        }
        if self.targets.iter().all(|t| t.file.is_none()) {
            return Err(StoreError::AllWritesFailed { hash: self.hash, errors: self.failures.join("; ") });
        }
        Ok(())
    }

    /// Lets depot requests follow this write of an artifact of `total`
    /// bytes, `hops` in-flight writes from a complete copy (see
    /// [`super::serve`]): not before a continued copy's prefix is verified,
    /// and not if another write of the artifact is followed.
    pub fn serve(&mut self, registry: &Arc<InFlightWrites>, total: u64, hops: u32) {
        if self.serving.is_some() || self.prefix_unverified {
            return;
        }
        let Some(target) = self.targets.iter().find(|t| t.file.is_some()) else { return };
        let first = Published {
            path: target.tmp.clone(),
            readable: self.bytes,
            total,
            complete: false,
            epoch: 0,
            hops,
        };
        self.serving = registry.register(self.hash, first);
    }

    /// Tells followers, if there are any, how far the temp file of a
    /// device still writing is readable: flushed first, since tokio's
    /// files write in the background.
    async fn publish_progress(&mut self) {
        let Some(serving) = self.serving.as_ref().filter(|serving| serving.followed()) else { return };
        let served = serving.published().path;
        let mut live: Vec<usize> =
            (0..self.targets.len()).filter(|&i| self.targets[i].file.is_some()).collect();
        live.sort_by_key(|&i| self.targets[i].tmp != served);
        for i in live {
            let target = &mut self.targets[i];
            let file = target.file.as_mut().expect("filtered on a live file");
            match file.flush().await {
                Ok(()) => {
                    let path = target.tmp.clone();
                    // The last byte waits for the hash check: a follower of a
                    // write that turns out wrong never sees a whole response.
                    let readable = self.bytes.min(serving.published().total.saturating_sub(1));
                    serving.publish(|published| {
                        published.path = path;
                        published.readable = readable;
                    });
                    return;
                }
                Err(error) => {
                    self.failures
                        .push(format!("M.2 slot {}: writing {}: {error}", target.m2.slot, target.tmp));
                    target.drop_out();
                }
            }
        }
    }

    /// Hands a copy's partials back to the hold as they are, for a later
    /// copy: for a copy refused before it wrote a byte. Empty ones go.
    pub fn hold_partials(mut self) {
        for target in self.targets.iter_mut().filter(|t| t.file.is_some() && t.reserved > 0) {
            target.file = None;
            target.m2.hold_partial(self.hash, target.reserved);
            target.settled = true;
        }
    }

    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
        let length = chunk.len() as u64;
        for target in self.targets.iter_mut().filter(|t| t.file.is_some()) {
            if !target.m2.is_healthy() {
                self.failures.push(format!("M.2 slot {} failed during the write", target.m2.slot));
                target.drop_out();
                continue;
            }
            if let Err(exceeded) = target.m2.reserve(length) {
                self.failures.push(exceeded.to_string());
                self.quota.get_or_insert(exceeded);
                target.drop_out();
                continue;
            }
            target.reserved += length;
            let file = target.file.as_mut().expect("filtered on a live file");
            if let Err(error) = file.write_all(chunk).await {
                self.failures.push(format!("M.2 slot {}: writing {}: {error}", target.m2.slot, target.tmp));
                target.drop_out();
            }
        }
        if self.targets.iter().all(|t| t.file.is_none()) {
            return Err(match self.quota.take() {
                Some(source) if self.failures.iter().all(|f| f.contains("is full")) => {
                    StoreError::QuotaExceeded { hash: self.hash, source }
                }
                _ => StoreError::AllWritesFailed { hash: self.hash, errors: self.failures.join("; ") },
            });
        }
        self.publish_progress().await;
        Ok(())
    }
}

/// Drains the rest of a refused body (see [`common::api::drain_body`]) and
/// passes the error on.
async fn drain<S, E>(body: std::pin::Pin<&mut S>, error: StoreError) -> StoreError
where
    S: Stream<Item = Result<Bytes, E>>,
{
    common::api::drain_body(body, DRAIN_LIMIT_BYTES).await;
    error
}

/// The hash state of a file's first `length` bytes.
fn hash_prefix(path: &Utf8Path, length: u64) -> std::io::Result<Sha256> {
    let mut file = std::fs::File::open(path)?.take(length);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut read_total = 0;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        read_total += read as u64;
    }
    if read_total < length {
        return Err(std::io::Error::other(format!("holds {read_total} bytes, not {length}")));
    }
    Ok(hasher)
}

async fn sync(mut file: tokio::fs::File) -> std::io::Result<()> {
    file.flush().await?;
    fail::fail_point!("sled_agent::store::after_temp_write", |_| std::process::abort());
    // The one fsync `tests/tests/power_cut.rs` removes, to show it notices.
    fail::fail_point!("sled_agent::store::skip_artifact_fsync", |_| Ok(()));
    file.sync_all().await
}
