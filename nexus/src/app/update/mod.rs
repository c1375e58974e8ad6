//! Uploading a TUF repository: receive, check, verify while staging,
//! record, hand off.
//!
//! 1. The body streams to `uploads/<random>/repo.zip`, hashed as it goes; the
//!    request body limit bounds its size, an idle timeout bounds a stalled
//!    client, and at most `max_concurrent_uploads` run at once.
//! 2. [`zip_intake`] checks the archive: one interpretation only, bounds
//!    before allocation. Nothing is extracted.
//! 3. tough loads the metadata through [`archive_transport`] against every
//!    trusted root until one verifies; an expired or non-matching root never
//!    blocks one that verifies. Expiry is enforced unless the config says
//!    otherwise.
//! 4. `artifacts.json` is read through tough (so its hash is verified) and
//!    checked ([`artifacts_json`]).
//! 5. Each artifact's target streams out of the zip, through tough's
//!    verification (length and sha256 against the signed targets.json), into
//!    a temp file in this upload's directory; then it is fsynced and renamed
//!    into the staging area under its sha256, pinned. After the last one the
//!    staging directory is fsynced. So only what tough read and verified is
//!    ever staged, entries no signed metadata names are never read, and an
//!    upload writes at most the zip plus its targets' signed lengths (and
//!    tough's cached metadata, bounded by tough's own limits).
//! 6. The repository is recorded (one transaction, which also checks that
//!    the trust root it verified with is still trusted). Its COMMIT comes
//!    after every staged byte is durable (DESIGN §11). Only then is the
//!    staged repository handed to `tuf_artifact_replication`; room for it is
//!    reserved *before* recording, so a recorded repository is never left
//!    without its staged bytes.
//!
//! Any failure before the hand-off drops the pins, sweeps unpinned staged
//! files and removes the upload directory: bad input leaves nothing behind.
//! Client-visible messages name the problem, never a server path; server-side
//! storage failures are 507 (out of space) or 503, never 400.

pub mod archive_transport;
pub mod artifacts_json;
mod spool;
pub mod zip_intake;

use crate::app::staging::{StagedArtifact, StagedRepo, StagingArea};
use crate::background::driver::Activator;
use crate::db::model::{TufArtifactDescription, TufRepoDescription};
use crate::db::{DataStore, DataStoreError, datastore::TufRepoInsertResult};
use archive_transport::ArchiveTransport;
use artifacts_json::ArtifactsJsonError;
use bytes::Bytes;
use camino::{Utf8Path, Utf8PathBuf};
use common::{ArtifactHash, error_chain};
use futures::{Stream, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use zip_intake::{Archive, ZipError, ZipLimits};

#[derive(Clone, Debug)]
pub struct UploadSettings {
    /// The largest upload accepted.
    pub max_bytes: u64,
    /// A client that sends nothing for this long is cut off.
    pub idle_timeout: Duration,
    /// Uploads in progress at once; more are refused with 503.
    pub max_concurrent: usize,
    pub enforce_expiry: bool,
    pub zip: ZipLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("file_name {0:?} must be 1 to 255 characters, without '/' or control characters")]
    BadFileName(String),
    #[error("{limit} uploads are already running, the limit (updates.max_concurrent_uploads); retry later")]
    TooManyUploads { limit: usize },
    #[error("the upload is larger than the limit of {limit} bytes (external_api.request_body_max_bytes)")]
    TooLarge { limit: u64 },
    #[error("reading the upload failed after {bytes} bytes: {message}")]
    Body { bytes: u64, message: String },
    #[error(
        "the upload stalled: nothing arrived for {seconds} s after {bytes} bytes \
         (external_api.upload_idle_timeout_secs)"
    )]
    BodyIdle { seconds: u64, bytes: u64 },
    #[error(transparent)]
    Zip(#[from] ZipError),
    #[error("no trusted roots configured: add one with POST /v1/system/update/trust-roots before uploading")]
    NoTrustRoots,
    #[error("the repository is not signed by any of the {tried} trusted roots ({reasons})")]
    Untrusted { tried: usize, reasons: String },
    #[error("the repository's TUF metadata has expired: {0}")]
    Expired(String),
    #[error("the repository's TUF metadata is invalid: {0}")]
    InvalidMetadata(String),
    #[error("the repository has no {} target", artifacts_json::TARGET_NAME)]
    MissingArtifactsJson,
    #[error(transparent)]
    ArtifactsJson(#[from] ArtifactsJsonError),
    #[error(
        "{} names target {target:?} for artifact {artifact}, but targets.json has no such target",
        artifacts_json::TARGET_NAME
    )]
    MissingTarget { target: String, artifact: common::ArtifactId },
    #[error("target {target:?} is listed in targets.json but missing from the archive (as {entry:?})")]
    TargetNotInArchive { target: String, entry: String },
    #[error(
        "target {target:?} cannot be fetched unambiguously: its file name changes when made into a URL \
         ('#', '?', '%' and '..' are the usual causes); rename it"
    )]
    UnfetchableTarget { target: String },
    #[error("target {target:?} does not match targets.json: {message}")]
    TargetMismatch { target: String, message: String },
    #[error("{0}")]
    Database(#[from] DataStoreError),
    #[error(
        "the replication hand-off queue is full ({capacity} staged repositories waiting); \
         retry once tuf_artifact_replication has caught up"
    )]
    HandoffFull { capacity: usize },
    /// A server-side storage failure. The path is for the log only.
    #[error("{what} failed on the server")]
    Storage {
        what: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl UploadError {
    /// Server-side detail for the log (never sent to the client).
    fn server_path(&self) -> Option<&Utf8Path> {
        match self {
            UploadError::Storage { path, .. } | UploadError::Zip(ZipError::Io { path, .. }) => Some(path),
            _ => None,
        }
    }

    /// Whether the server ran out of room (as opposed to another failure).
    pub fn is_out_of_space(&self) -> bool {
        let source = match self {
            UploadError::Storage { source, .. } | UploadError::Zip(ZipError::Io { source, .. }) => source,
            _ => return false,
        };
        matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
    }
}

/// What the upload path needs from Nexus.
pub struct Uploader {
    /// This Nexus (for test delay points).
    pub nexus_id: uuid::Uuid,
    pub log: slog::Logger,
    pub datastore: Arc<DataStore>,
    pub staging: Arc<StagingArea>,
    pub settings: UploadSettings,
    /// Bounds the uploads in progress.
    pub upload_slots: Arc<Semaphore>,
    pub handoff: mpsc::Sender<StagedRepo>,
    /// Bounds the staged repositories held for replication (see
    /// [`StagedRepo::slot`]).
    pub handoff_slots: Arc<Semaphore>,
    pub replication: Activator,
}

/// How much of a body refused before it is read is drained, so that the
/// client can read the refusal.
const REFUSAL_DRAIN_BYTES: u64 = 1 << 20;

impl Uploader {
    pub async fn upload<S, E>(&self, file_name: &str, body: S) -> Result<TufRepoInsertResult, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::error::Error,
    {
        let body = std::pin::pin!(body);
        let bad_name = file_name.is_empty()
            || file_name.len() > 255
            || file_name.contains('/')
            || file_name.chars().any(char::is_control);
        let admitted = if bad_name {
            Err(UploadError::BadFileName(file_name.to_string()))
        } else {
            self.upload_slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| UploadError::TooManyUploads { limit: self.settings.max_concurrent })
        };
        let _slot = match admitted {
            Ok(slot) => slot,
            Err(error) => {
                common::api::drain_body(body, REFUSAL_DRAIN_BYTES).await;
                return Err(error);
            }
        };
        let upload_dir = camino_tempfile::Builder::new()
            .prefix("upload-")
            .tempdir_in(self.staging.uploads_dir())
            .map_err(|source| UploadError::Storage {
                what: "creating an upload directory",
                path: self.staging.uploads_dir(),
                source,
            })?;
        let outcome = self.upload_in(upload_dir.path(), file_name, body).await;
        if let Err(error) = &outcome {
            slog::info!(self.log, "upload refused"; "file_name" => file_name, "error" => error_chain(error),
                "server_path" => error.server_path().map(|path| path.to_string()));
            // The failed upload's pins are gone; nothing else needs what it
            // staged unless it is pinned by someone else.
            if let Err(error) = self.staging.sweep() {
                slog::warn!(self.log, "sweeping the staging area failed"; "error" => %error);
            }
        }
        outcome
    }

    async fn upload_in<S, E>(
        &self,
        dir: &Utf8Path,
        file_name: &str,
        body: std::pin::Pin<&mut S>,
    ) -> Result<TufRepoInsertResult, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::error::Error,
    {
        let zip_path = dir.join("repo.zip");
        let zip_sha256 =
            receive(&zip_path, body, self.settings.max_bytes, self.settings.idle_timeout).await?;
        fail::fail_point!("nexus::upload::after_receive", |_| std::process::abort());
        let trust_roots = self.datastore.trust_root_list().await?;
        if trust_roots.is_empty() {
            return Err(UploadError::NoTrustRoots);
        }
        let limits = self.settings.zip.clone();
        let archive = {
            let zip_path = zip_path.clone();
            tokio::task::spawn_blocking(move || Archive::open(&zip_path, &limits))
                .await
                .expect("the zip intake does not panic")?
        };
        let roots: Vec<(uuid::Uuid, Vec<u8>)> = trust_roots
            .iter()
            .map(|root| (root.id, serde_json::to_vec(&root.root_role).expect("JSON values serialize")))
            .collect();
        let (repository, trust_root_id) =
            load_repository(Arc::new(archive), &dir.join("tough"), &roots, self.settings.enforce_expiry)
                .await?;
        let document = read_artifacts_json(&repository).await?;

        let full = || UploadError::HandoffFull { capacity: self.handoff.max_capacity() };
        let slot = self.handoff_slots.clone().try_acquire_owned().map_err(|_| full())?;
        let permit = self.handoff.try_reserve().map_err(|_| full())?;
        let mut staged = Vec::new();
        let mut artifacts = Vec::new();
        // Several artifacts may name one target; it is verified and staged once.
        let mut targets_done: BTreeMap<&str, (ArtifactHash, u64)> = BTreeMap::new();
        for (index, entry) in document.artifacts.iter().enumerate() {
            let (hash, size) = match targets_done.get(entry.target.as_str()) {
                Some(&(hash, size)) => {
                    staged.push(StagedArtifact { hash, size, pin: self.staging.pin(hash) });
                    (hash, size)
                }
                None => {
                    let temp = dir.join(format!("target-{index}"));
                    let (hash, size, pin) =
                        self.stage_target(&repository, &temp, &entry.target, &entry.id()).await?;
                    staged.push(StagedArtifact { hash, size, pin });
                    (hash, size)
                }
            };
            targets_done.insert(&entry.target, (hash, size));
            artifacts.push(TufArtifactDescription { id: entry.id(), sha256: hash, size });
        }
        let staged_dir = self.staging.artifacts_dir();
        common::durable::sync_dir(&staged_dir).map_err(|source| UploadError::Storage {
            what: "syncing the staging directory",
            path: staged_dir,
            source,
        })?;
        fail::fail_point!("nexus::upload::after_staging", |_| std::process::abort());
        let description = TufRepoDescription {
            system_version: document.system_version.clone(),
            sha256: zip_sha256,
            file_name: file_name.to_string(),
            trust_root_id,
            artifacts,
        };
        crate::failpoints::delay("nexus::upload::before_insert", self.nexus_id).await;
        let result = self.datastore.tuf_repo_insert(&description).await?;
        // Committed, not yet handed to replication: recovery at start-up
        // hands the staged files over instead.
        fail::fail_point!("nexus::upload::after_insert", |_| std::process::abort());
        permit.send(StagedRepo {
            repo_id: result.recorded.repo.id,
            system_version: description.system_version.clone(),
            artifacts: staged,
            slot: Some(slot),
        });
        self.replication.activate();
        slog::info!(self.log, "repository uploaded"; "system_version" => &description.system_version,
            "status" => ?result.status, "artifacts" => description.artifacts.len(), "generation" => %result.generation);
        Ok(result)
    }

    /// Streams one target out of the archive, through tough's verification
    /// (its signed length and sha256), into `temp`; then fsyncs it and
    /// renames it into the staging area under that sha256, pinned. Nothing
    /// is renamed unless tough's stream ended without error, i.e. verified.
    async fn stage_target(
        &self,
        repository: &tough::Repository,
        temp: &Utf8Path,
        target: &str,
        artifact: &common::ArtifactId,
    ) -> Result<(ArtifactHash, u64, crate::app::staging::Pin), UploadError> {
        let missing =
            || UploadError::MissingTarget { target: target.to_string(), artifact: artifact.clone() };
        let name = tough::TargetName::new(target).map_err(|_| missing())?;
        let listed = repository.targets().signed.targets.get(&name).ok_or_else(missing)?;
        let hash = ArtifactHash(listed.hashes.sha256.as_ref().try_into().map_err(|_| {
            UploadError::TargetMismatch {
                target: target.to_string(),
                message: "its sha256 in targets.json is not 32 bytes".into(),
            }
        })?);
        let file_name = fetched_file_name(repository, &name, &hash);
        if !archive_transport::fetchable(&file_name) {
            return Err(UploadError::UnfetchableTarget { target: target.to_string() });
        }
        let mismatch = |message: String| UploadError::TargetMismatch { target: target.to_string(), message };
        let mut stream = match repository.read_target(&name).await {
            Ok(Some(stream)) => stream,
            Ok(None) => return Err(missing()),
            Err(error) if is_not_found(&error) => {
                return Err(UploadError::TargetNotInArchive {
                    target: target.to_string(),
                    entry: format!("repo/targets/{file_name}"),
                });
            }
            Err(error) => return Err(tuf_error(error)),
        };
        let storage = |what, source| UploadError::Storage { what, path: temp.to_owned(), source };
        let mut spool = spool::Spool::create(temp, false, spool::Finish::Sync)
            .map_err(|source| storage("staging a target", source))?;
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|error| {
                if is_not_found(&error) {
                    UploadError::TargetNotInArchive {
                        target: target.to_string(),
                        entry: format!("repo/targets/{file_name}"),
                    }
                } else {
                    mismatch(error_chain(&error))
                }
            })?;
            size += chunk.len() as u64;
            if spool.write(chunk).await.is_err() {
                break;
            }
        }
        // The spool's own error, if it stopped early; else everything is
        // written and synced.
        spool.finish().await.map_err(|source| storage("staging a target", source))?;
        // Data first, then the name: the staging directory is synced once
        // for all targets, before the database records them.
        let pin = self.staging.pin(hash);
        let path = self.staging.artifact_path(&hash);
        std::fs::rename(temp, &path).map_err(|source| storage("staging a target", source))?;
        Ok((hash, size, pin))
    }
}

/// The file tough fetches for a target: consistent snapshots prefix the
/// hash.
fn fetched_file_name(
    repository: &tough::Repository,
    name: &tough::TargetName,
    hash: &ArtifactHash,
) -> String {
    if repository.root().signed.consistent_snapshot {
        format!("{hash}.{}", name.resolved())
    } else {
        name.resolved().to_string()
    }
}

/// Writes the upload to `path`, returning its sha256; stops as soon as it
/// passes `limit` bytes, or when nothing arrives for `idle`.
async fn receive<S, E>(
    path: &Utf8Path,
    mut body: std::pin::Pin<&mut S>,
    limit: u64,
    idle: Duration,
) -> Result<ArtifactHash, UploadError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::error::Error,
{
    let storage = |source| UploadError::Storage { what: "storing the upload", path: path.to_owned(), source };
    // Not fsynced: the zip is scratch, removed after the upload and at
    // start-up. What must survive is staged (and fsynced) from it.
    let mut spool = spool::Spool::create(path, true, spool::Finish::NoSync).map_err(storage)?;
    let mut seen = 0u64;
    loop {
        let chunk = match tokio::time::timeout(idle, body.next()).await {
            Err(_) => return Err(UploadError::BodyIdle { seconds: idle.as_secs(), bytes: seen }),
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return Err(UploadError::Body { bytes: seen, message: error_chain(&error) });
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        seen += chunk.len() as u64;
        if seen > limit {
            // So that the client reads the 413 rather than a broken pipe.
            common::api::drain_body(body, DRAIN_LIMIT_BYTES).await;
            return Err(UploadError::TooLarge { limit });
        }
        if spool.write(chunk).await.is_err() {
            // The spool keeps its error for `finish` (507 for a full disk);
            // the client reads that answer only if its body is taken.
            common::api::drain_body(body, DRAIN_LIMIT_BYTES).await;
            break;
        }
    }
    let hash = spool.finish().await.map_err(storage)?;
    Ok(hash.expect("the spool hashes"))
}

/// How much of an oversized upload is read and dropped before the 413.
const DRAIN_LIMIT_BYTES: u64 = 64 << 20;

/// Loads the repository against each trusted root until one verifies it.
/// Returns it with that root's id.
async fn load_repository(
    archive: Arc<Archive>,
    datastore_dir: &Utf8Path,
    roots: &[(uuid::Uuid, Vec<u8>)],
    enforce_expiry: bool,
) -> Result<(tough::Repository, uuid::Uuid), UploadError> {
    let transport = ArchiveTransport::new(archive);
    let enforcement = if enforce_expiry {
        tough::ExpirationEnforcement::Safe
    } else {
        tough::ExpirationEnforcement::Unsafe
    };
    let mut failures = Vec::new();
    for (index, (id, root)) in roots.iter().enumerate() {
        // Each attempt gets a fresh tough datastore: what one root's attempt
        // cached must not influence the next.
        let attempt_dir = datastore_dir.join(index.to_string());
        std::fs::create_dir_all(&attempt_dir).map_err(|source| UploadError::Storage {
            what: "creating a verification directory",
            path: attempt_dir.clone(),
            source,
        })?;
        let loaded = tough::RepositoryLoader::new(
            root,
            archive_transport::metadata_url(),
            archive_transport::targets_url(),
        )
        .transport(transport.clone())
        .expiration_enforcement(enforcement)
        .datastore(attempt_dir.as_std_path())
        .load()
        .await;
        match loaded {
            Ok(repository) => return Ok((repository, *id)),
            Err(error) => failures.push((*id, error)),
        }
    }
    Err(no_root_verified(failures))
}

/// Why no trusted root verified the repository. A root that verified the
/// signatures and then found the repository's own metadata expired speaks for
/// the repository; otherwise each root's reason is listed.
fn no_root_verified(failures: Vec<(uuid::Uuid, tough::error::Error)>) -> UploadError {
    use tough::error::Error;
    use tough::schema::RoleType;
    let tried = failures.len();
    if let Some((_, error)) = failures
        .iter()
        .find(|(_, error)| matches!(error, Error::ExpiredMetadata { role, .. } if *role != RoleType::Root))
    {
        return UploadError::Expired(error_chain(error));
    }
    let broken = failures.iter().find(|(_, error)| !is_root_mismatch(error) && !is_not_found(error));
    if let Some((_, error)) = broken
        && failures
            .iter()
            .all(|(_, other)| !is_root_mismatch(other) || matches!(other, Error::ExpiredMetadata { .. }))
    {
        return UploadError::InvalidMetadata(error_chain(error));
    }
    let reasons = failures
        .iter()
        .map(|(id, error)| format!("root {id}: {}", error_chain(error)))
        .collect::<Vec<_>>()
        .join("; ");
    UploadError::Untrusted { tried, reasons }
}

/// A failure that says "this root does not vouch for this repository":
/// signatures, or the root itself expired.
fn is_root_mismatch(error: &tough::error::Error) -> bool {
    use tough::error::Error;
    matches!(
        error,
        Error::VerifyMetadata { .. }
            | Error::VerifyRoleMetadata { .. }
            | Error::VerifyTrustedMetadata { .. }
            | Error::ParseTrustedMetadata { .. }
    ) || matches!(error, Error::ExpiredMetadata { role, .. } if *role == tough::schema::RoleType::Root)
}

/// Whether tough failed because the archive lacks a file it asked for.
fn is_not_found(error: &tough::error::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if let Some(transport) = error.downcast_ref::<tough::TransportError>() {
            return transport.kind() == tough::TransportErrorKind::FileNotFound;
        }
        source = error.source();
    }
    false
}

fn tuf_error(error: tough::error::Error) -> UploadError {
    let message = error_chain(&error);
    match error {
        tough::error::Error::ExpiredMetadata { .. } => UploadError::Expired(message),
        _ => UploadError::InvalidMetadata(message),
    }
}

async fn read_artifacts_json(
    repository: &tough::Repository,
) -> Result<artifacts_json::ArtifactsDocument, UploadError> {
    let name = tough::TargetName::new(artifacts_json::TARGET_NAME).expect("a valid target name");
    let listed = repository.targets().signed.targets.get(&name).ok_or(UploadError::MissingArtifactsJson)?;
    if listed.length > artifacts_json::MAX_BYTES {
        return Err(ArtifactsJsonError::Malformed(format!(
            "it is {} bytes, more than the {} allowed",
            listed.length,
            artifacts_json::MAX_BYTES
        ))
        .into());
    }
    let hash = ArtifactHash(listed.hashes.sha256.as_ref().try_into().unwrap_or([0; 32]));
    let not_in_archive = || UploadError::TargetNotInArchive {
        target: artifacts_json::TARGET_NAME.into(),
        entry: format!("repo/targets/{}", fetched_file_name(repository, &name, &hash)),
    };
    let mut stream = match repository.read_target(&name).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return Err(UploadError::MissingArtifactsJson),
        Err(error) if is_not_found(&error) => return Err(not_in_archive()),
        Err(error) => return Err(tuf_error(error)),
    };
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            if is_not_found(&error) {
                not_in_archive()
            } else {
                UploadError::TargetMismatch {
                    target: artifacts_json::TARGET_NAME.into(),
                    message: error_chain(&error),
                }
            }
        })?;
        bytes.extend_from_slice(&chunk);
    }
    Ok(artifacts_json::parse(&bytes)?)
}
