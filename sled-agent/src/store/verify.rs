//! Start-up verification: every stored artifact is re-hashed, `workers` at
//! a time, before the sled serves anything; a file whose contents do not
//! match its name (or whose name is not a hash) is deleted, so that
//! replication heals it.

use crate::storage::M2;
use common::ArtifactHash;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::sync::Arc;

pub(super) async fn verify_all(log: &slog::Logger, m2s: &[Arc<M2>], workers: usize) {
    let mut files = Vec::new();
    for m2 in m2s {
        match m2.artifact_files() {
            Ok(names) => files.extend(names.into_iter().map(|name| m2.dataset().join(name))),
            Err(error) => {
                slog::warn!(log, "listing artifacts for verification failed"; "slot" => m2.slot, "error" => %error)
            }
        }
    }
    let count = files.len();
    let results = futures::stream::iter(files)
        .map(|path| async move {
            let checked = path.clone();
            let verdict = tokio::task::spawn_blocking(move || verify_file(&checked))
                .await
                .unwrap_or_else(|panic| Err(format!("verification panicked: {panic}")));
            (path, verdict)
        })
        .buffer_unordered(workers)
        .collect::<Vec<_>>()
        .await;
    let mut removed = 0;
    for (path, verdict) in results {
        if let Err(problem) = verdict {
            slog::error!(log, "removing corrupt artifact"; "path" => %path, "problem" => &problem);
            if let Err(error) = std::fs::remove_file(&path) {
                slog::error!(log, "removing corrupt artifact failed"; "path" => %path, "error" => %error);
            }
            removed += 1;
        }
    }
    slog::info!(log, "verified stored artifacts"; "checked" => count, "removed" => removed);
}

fn verify_file(path: &camino::Utf8Path) -> Result<(), String> {
    let expected: ArtifactHash = path
        .file_name()
        .unwrap_or_default()
        .parse()
        .map_err(|error| format!("not an artifact file: {error}"))?;
    let mut file = std::fs::File::open(path).map_err(|error| format!("opening: {error}"))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(|error| format!("reading: {error}"))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    let actual = ArtifactHash(hasher.finalize().into());
    if actual == expected { Ok(()) } else { Err(format!("contents have sha256 {actual}")) }
}
