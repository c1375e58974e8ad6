//! The write path that PUTs and copies share.
//!
//! The body streams into a random-named temp file in `artifacts/tmp/` on each
//! healthy M.2, hashed as it goes. Each chunk is reserved against the
//! device's quota before it is written. A device that fails, fills up or
//! errors mid-write drops out; the others carry on. At the end the hash must
//! match the name; then each temp file is fsynced, renamed into place, and
//! the dataset directory fsynced, all before the caller hears "done" (DESIGN
//! §11). A partial or wrong file is therefore never visible under an
//! artifact's name, and two writers of the same hash can only ever rename
//! identical, verified bytes over each other.

use super::copy::InFlight;
use super::{ArtifactStore, StoreError};
use crate::storage::{M2, QuotaExceeded};
use bytes::Bytes;
use camino::Utf8PathBuf;
use common::api::sled_agent::ArtifactPutResponse;
use common::{ArtifactHash, Generation, error_chain};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Bodies of refused PUTs are read and thrown away up to this size; beyond
/// it the connection is closed (the client then sees a broken pipe).
const DRAIN_LIMIT_BYTES: u64 = 1 << 30;

impl ArtifactStore {
    /// Stores the body under `hash` on every healthy M.2.
    pub async fn put<S, E>(
        &self,
        hash: ArtifactHash,
        generation: Generation,
        body: S,
    ) -> Result<ArtifactPutResponse, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::error::Error,
    {
        let mut body = std::pin::pin!(body);
        let admitted = match self.put_permits.clone().try_acquire_owned() {
            Ok(permit) => match self.check_request(&hash, generation).await {
                Ok(()) => self.begin_write(hash).map(|write| (permit, write)),
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

    pub(super) fn begin_write(&self, hash: ArtifactHash) -> Result<PendingWrite, StoreError> {
        let healthy = self.healthy();
        if healthy.is_empty() {
            return Err(StoreError::NoHealthyM2 { action: "store an artifact on" });
        }
        let mut targets = Vec::with_capacity(healthy.len());
        let mut failures = Vec::new();
        for m2 in healthy {
            let tmp = m2.tmp_dir().join(format!("{hash}.{:016x}.tmp", rand::random::<u64>()));
            match std::fs::File::create_new(&tmp) {
                Ok(file) => targets.push(Target {
                    file: Some(tokio::fs::File::from_std(file)),
                    m2,
                    tmp,
                    reserved: 0,
                    committed: false,
                }),
                Err(error) => failures.push(format!("M.2 slot {}: creating {tmp}: {error}", m2.slot)),
            }
        }
        if targets.is_empty() {
            return Err(StoreError::AllWritesFailed { hash, errors: failures.join("; ") });
        }
        Ok(PendingWrite {
            in_flight: None,
            hash,
            datasets: targets.len() + failures.len(),
            targets,
            hasher: Sha256::new(),
            bytes: 0,
            failures,
            quota: None,
        })
    }

    /// Verifies the hash, then makes every surviving temp file durable under
    /// the artifact's name. A copy stays "in flight" until this returns, so
    /// no second download of it can start meanwhile.
    pub(super) async fn commit(&self, write: PendingWrite) -> Result<ArtifactPutResponse, StoreError> {
        let PendingWrite { in_flight, hash, datasets, mut targets, hasher, bytes, mut failures, .. } = write;
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
                    target.committed = true;
                    successful_writes += 1;
                    target.m2.commit(target.reserved, existed);
                }
                Err(error) => failures
                    .push(format!("M.2 slot {}: renaming into {destination}: {error}", target.m2.slot)),
            }
        }
        drop(in_flight);
        if successful_writes == 0 {
            return Err(StoreError::AllWritesFailed { hash, errors: failures.join("; ") });
        }
        for failure in &failures {
            slog::warn!(self.log, "artifact write failed on one M.2"; "hash" => %hash, "error" => failure);
        }
        Ok(ArtifactPutResponse { datasets, successful_writes })
    }
}

/// A write in progress to the temp files of every healthy M.2.
pub(super) struct PendingWrite {
    /// For copies: the in-flight mark, released when the write ends.
    pub in_flight: Option<InFlight>,
    pub hash: ArtifactHash,
    datasets: usize,
    targets: Vec<Target>,
    hasher: Sha256,
    pub bytes: u64,
    failures: Vec<String>,
    /// The first quota refusal, reported if every device refused.
    quota: Option<QuotaExceeded>,
}

struct Target {
    m2: Arc<M2>,
    tmp: Utf8PathBuf,
    /// `None` once the target dropped out or was synced.
    file: Option<tokio::fs::File>,
    /// Bytes reserved against the quota; `u64::MAX` marks a dropped target.
    reserved: u64,
    committed: bool,
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
        if !self.committed {
            self.drop_out();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl PendingWrite {
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

async fn sync(mut file: tokio::fs::File) -> std::io::Result<()> {
    file.flush().await?;
    fail::fail_point!("sled_agent::store::after_temp_write", |_| std::process::abort());
    file.sync_all().await
}
