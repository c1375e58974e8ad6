//! Writing a stream to a file on a blocking thread. The async side only
//! hands over `Bytes` (no copy), so receiving from the network or verifying
//! with tough overlaps with hashing and writing to disk, instead of every
//! chunk waiting for its own write. The channel is bounded: a slow disk
//! slows the sender, memory does not grow.

use bytes::Bytes;
use camino::Utf8Path;
use common::ArtifactHash;
use sha2::{Digest, Sha256};
use std::io::Write;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks waiting for the writer at most (each at most what the sender
/// got, typically well under 1 MiB).
const CHUNKS_AHEAD: usize = 32;
const WRITE_BUFFER_BYTES: usize = 1 << 20;

pub struct Spool {
    sender: mpsc::Sender<Bytes>,
    writer: JoinHandle<std::io::Result<Option<ArtifactHash>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Leave the data in the page cache (scratch files).
    NoSync,
    /// fsync before returning (files that must survive).
    Sync,
}

impl Spool {
    /// Creates `path` (it must not exist). With `hash`, the sha256 of what
    /// was written is returned by [`Spool::finish`].
    pub fn create(path: &Utf8Path, hash: bool, finish: Finish) -> std::io::Result<Spool> {
        let file = std::fs::File::create_new(path)?;
        let (sender, mut receiver) = mpsc::channel::<Bytes>(CHUNKS_AHEAD);
        let writer = tokio::task::spawn_blocking(move || {
            let mut hasher = hash.then(Sha256::new);
            let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
            while let Some(chunk) = receiver.blocking_recv() {
                if let Some(hasher) = &mut hasher {
                    hasher.update(&chunk);
                }
                out.write_all(&chunk)?;
            }
            let file = out.into_inner().map_err(std::io::IntoInnerError::into_error)?;
            if finish == Finish::Sync {
                file.sync_all()?;
            }
            Ok(hasher.map(|hasher| ArtifactHash(hasher.finalize().into())))
        });
        Ok(Spool { sender, writer })
    }

    /// Hands a chunk to the writer. An error means the writer failed; the
    /// spool is then finished with that error.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), ()> {
        self.sender.send(chunk).await.map_err(|_| ())
    }

    /// Waits until everything is written (and synced, if asked).
    pub async fn finish(self) -> std::io::Result<Option<ArtifactHash>> {
        drop(self.sender);
        self.writer.await.expect("the spool writer does not panic")
    }
}
