//! Uploading a TUF repository: receive, check, verify, stage, record, hand
//! off.
//!
//! 1. The body streams to `uploads/<random>/repo.zip`, hashed as it goes;
//!    the request body limit bounds its size.
//! 2. The zip is checked and extracted ([`zip_intake`]).
//! 3. tough loads the metadata against each trusted root in turn; a
//!    signature failure tries the next root. Expiry is enforced unless the
//!    config says otherwise.
//! 4. `artifacts.json` is read through tough (so its hash is verified) and
//!    checked ([`artifacts_json`]).
//! 5. Every artifact's target streams through tough, which verifies its hash
//!    and length; the verified file is then fsynced and moved into the
//!    staging area, pinned; after the last one the staging directory is
//!    fsynced.
//! 6. The repository is recorded (one transaction). Its COMMIT therefore
//!    comes after every staged byte is durable (DESIGN §11): a crash at any
//!    point leaves no repository, or a repository whose bytes are staged.
//!    Only then is the staged repository handed to
//!    `tuf_artifact_replication`; room in its queue is reserved *before*
//!    recording, so a recorded repository is never left without its staged
//!    bytes.
//!
//! Any failure before the hand-off drops the pins, sweeps unpinned staged
//! files and removes the upload directory: bad input leaves nothing behind.

pub mod artifacts_json;
pub mod zip_intake;

use crate::app::staging::{StagedArtifact, StagedRepo, StagingArea};
use crate::background::driver::Activator;
use crate::db::model::{TufArtifactDescription, TufRepoDescription};
use crate::db::{DataStore, DataStoreError, datastore::TufRepoInsertResult};
use artifacts_json::ArtifactsJsonError;
use bytes::Bytes;
use camino::{Utf8Path, Utf8PathBuf};
use common::{ArtifactHash, error_chain};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use zip_intake::{ZipError, ZipLimits};

#[derive(Clone, Debug)]
pub struct UploadSettings {
    /// The largest upload accepted.
    pub max_bytes: u64,
    pub enforce_expiry: bool,
    pub zip: ZipLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("file_name {0:?} must be 1 to 255 characters without '/'")]
    BadFileName(String),
    #[error("the upload is larger than the limit of {limit} bytes (external_api.request_body_max_bytes)")]
    TooLarge { limit: u64 },
    #[error("reading the upload failed after {bytes} bytes: {message}")]
    Body { bytes: u64, message: String },
    #[error(transparent)]
    Zip(#[from] ZipError),
    #[error("no trusted roots configured: add one with POST /v1/system/update/trust-roots before uploading")]
    NoTrustRoots,
    #[error("the repository is not signed by any of the {tried} trusted roots (last failure: {last})")]
    Untrusted { tried: usize, last: String },
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
    #[error("target {target:?} does not match targets.json: {message}")]
    TargetMismatch { target: String, message: String },
    #[error("{0}")]
    Database(#[from] DataStoreError),
    #[error(
        "the replication hand-off queue is full ({capacity} staged repositories waiting); \
         retry once tuf_artifact_replication has caught up"
    )]
    HandoffFull { capacity: usize },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the upload path needs from Nexus.
pub struct Uploader {
    pub log: slog::Logger,
    pub datastore: Arc<DataStore>,
    pub staging: Arc<StagingArea>,
    pub settings: UploadSettings,
    pub handoff: mpsc::Sender<StagedRepo>,
    /// Bounds the staged repositories held for replication (see
    /// [`StagedRepo::slot`]).
    pub handoff_slots: Arc<tokio::sync::Semaphore>,
    pub replication: Activator,
}

impl Uploader {
    pub async fn upload<S, E>(&self, file_name: &str, body: S) -> Result<TufRepoInsertResult, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::error::Error,
    {
        if file_name.is_empty() || file_name.len() > 255 || file_name.contains('/') {
            return Err(UploadError::BadFileName(file_name.to_string()));
        }
        let upload_dir = camino_tempfile::Builder::new()
            .prefix("upload-")
            .tempdir_in(self.staging.uploads_dir())
            .map_err(|source| UploadError::Io {
                what: "creating an upload directory in",
                path: self.staging.uploads_dir(),
                source,
            })?;
        let outcome = self.upload_in(upload_dir.path(), file_name, body).await;
        if let Err(error) = &outcome {
            slog::info!(self.log, "upload refused"; "file_name" => file_name, "error" => error_chain(error));
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
        body: S,
    ) -> Result<TufRepoInsertResult, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::error::Error,
    {
        let zip_path = dir.join("repo.zip");
        let zip_sha256 = receive(&zip_path, body, self.settings.max_bytes).await?;
        fail::fail_point!("nexus::upload::after_receive", |_| std::process::abort());
        let trust_roots = self.datastore.trust_root_list().await?;
        if trust_roots.is_empty() {
            return Err(UploadError::NoTrustRoots);
        }
        let extract_dir = dir.join("repo");
        let limits = self.settings.zip.clone();
        let extracted = {
            let (zip_path, extract_dir) = (zip_path.clone(), extract_dir.clone());
            tokio::task::spawn_blocking(move || zip_intake::extract(&zip_path, &extract_dir, &limits))
                .await
                .expect("zip extraction does not panic")?
        };
        let datastore_dir = dir.join("tough");
        std::fs::create_dir_all(&datastore_dir).map_err(|source| UploadError::Io {
            what: "creating",
            path: datastore_dir.clone(),
            source,
        })?;
        let roots: Vec<Vec<u8>> = trust_roots
            .iter()
            .map(|root| serde_json::to_vec(&root.root_role).expect("JSON values serialize"))
            .collect();
        let repository =
            load_repository(&extracted, &datastore_dir, &roots, self.settings.enforce_expiry).await?;
        let document = read_artifacts_json(&repository).await?;

        let full = || UploadError::HandoffFull { capacity: self.handoff.max_capacity() };
        let slot = self.handoff_slots.clone().try_acquire_owned().map_err(|_| full())?;
        let permit = self.handoff.try_reserve().map_err(|_| full())?;
        let mut staged = Vec::new();
        let mut artifacts = Vec::new();
        // Several artifacts may name one target; it is verified and moved once.
        let mut targets_done: BTreeMap<&str, (ArtifactHash, u64)> = BTreeMap::new();
        for entry in &document.artifacts {
            let (hash, size) = match targets_done.get(entry.target.as_str()) {
                Some(&(hash, size)) => {
                    staged.push(StagedArtifact { hash, size, pin: self.staging.pin(hash) });
                    (hash, size)
                }
                None => {
                    self.stage_target(&repository, &extracted, &entry.target, &entry.id(), &mut staged)
                        .await?
                }
            };
            targets_done.insert(&entry.target, (hash, size));
            artifacts.push(TufArtifactDescription { id: entry.id(), sha256: hash, size });
        }
        let staged_dir = self.staging.artifacts_dir();
        common::durable::sync_dir(&staged_dir).map_err(|source| UploadError::Io {
            what: "syncing the staging directory",
            path: staged_dir,
            source,
        })?;
        fail::fail_point!("nexus::upload::after_staging", |_| std::process::abort());
        let description = TufRepoDescription {
            system_version: document.system_version.clone(),
            sha256: zip_sha256,
            file_name: file_name.to_string(),
            artifacts,
        };
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

    /// Verifies one target by streaming it through tough (which checks its
    /// length and sha256 against the signed targets.json), then moves the
    /// extracted file itself into the staging area under that sha256. The
    /// file lives in this upload's private directory, so what was verified is
    /// what is moved.
    async fn stage_target(
        &self,
        repository: &tough::Repository,
        extracted: &zip_intake::ExtractedRepo,
        target: &str,
        artifact: &common::ArtifactId,
        staged: &mut Vec<StagedArtifact>,
    ) -> Result<(ArtifactHash, u64), UploadError> {
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
        let mismatch = |message: String| UploadError::TargetMismatch { target: target.to_string(), message };
        let mut stream = repository.read_target(&name).await.map_err(tuf_error)?.ok_or_else(missing)?;
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            size += chunk.map_err(|error| mismatch(error_chain(&error)))?.len() as u64;
        }
        // Where tough read it from: consistent snapshots prefix the hash.
        let file_name = if repository.root().signed.consistent_snapshot {
            format!("{hash}.{target}")
        } else {
            target.to_string()
        };
        let source = extracted.targets_dir.join(file_name);
        let pin = self.staging.pin(hash);
        let path = self.staging.artifact_path(&hash);
        // Data first, then the name: the directory is synced once for all
        // targets, before the database records them.
        std::fs::File::open(&source)
            .and_then(|file| file.sync_all())
            .and_then(|()| std::fs::rename(&source, &path))
            .map_err(|source_error| UploadError::Io {
                what: "staging",
                path: path.clone(),
                source: source_error,
            })?;
        staged.push(StagedArtifact { hash, size, pin });
        Ok((hash, size))
    }
}

/// Writes the upload to `path`, returning its sha256; stops as soon as it
/// passes `limit` bytes.
async fn receive<S, E>(path: &Utf8Path, body: S, limit: u64) -> Result<ArtifactHash, UploadError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::error::Error,
{
    let mut body = std::pin::pin!(body);
    let mut seen = 0u64;
    let checked = body.as_mut().map(move |chunk| {
        let chunk = chunk.map_err(|error| UploadError::Body { bytes: seen, message: error_chain(&error) })?;
        seen += chunk.len() as u64;
        if seen > limit { Err(UploadError::TooLarge { limit }) } else { Ok(chunk) }
    });
    match write_stream(path, checked).await {
        Ok((hash, _)) => Ok(hash),
        Err(error @ UploadError::TooLarge { .. }) => {
            // So that the client reads the 413 rather than a broken pipe.
            common::api::drain_body(body, DRAIN_LIMIT_BYTES).await;
            Err(error)
        }
        Err(error) => Err(error),
    }
}

/// How much of an oversized upload is read and dropped before the 413.
const DRAIN_LIMIT_BYTES: u64 = 64 << 20;

/// Streams into a new file, hashing. The stream's errors are returned as
/// they are; the file is left for the caller's cleanup.
async fn write_stream<S>(path: &Utf8Path, stream: S) -> Result<(ArtifactHash, u64), UploadError>
where
    S: Stream<Item = Result<Bytes, UploadError>>,
{
    let io = |what, source| UploadError::Io { what, path: path.to_owned(), source };
    let mut file = tokio::fs::File::create_new(path).await.map_err(|source| io("creating", source))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(|source| io("writing", source))?;
    }
    // Not fsynced: the zip is scratch, removed after the upload and at
    // start-up. What must survive is staged (and fsynced) from it.
    file.flush().await.map_err(|source| io("writing", source))?;
    Ok((ArtifactHash(hasher.finalize().into()), bytes))
}

/// Loads the repository against each trusted root in turn.
async fn load_repository(
    extracted: &zip_intake::ExtractedRepo,
    datastore_dir: &Utf8Path,
    roots: &[Vec<u8>],
    enforce_expiry: bool,
) -> Result<tough::Repository, UploadError> {
    let url = |dir: &Utf8Path| {
        url::Url::from_directory_path(dir).map_err(|()| UploadError::Io {
            what: "turning into a file URL",
            path: dir.to_owned(),
            source: std::io::Error::other("not an absolute path"),
        })
    };
    let (metadata_url, targets_url) = (url(&extracted.metadata_dir)?, url(&extracted.targets_dir)?);
    let enforcement = if enforce_expiry {
        tough::ExpirationEnforcement::Safe
    } else {
        tough::ExpirationEnforcement::Unsafe
    };
    let mut last = String::new();
    for (index, root) in roots.iter().enumerate() {
        // Each attempt gets a fresh tough datastore: what one root's attempt
        // cached must not influence the next.
        let attempt_dir = datastore_dir.join(index.to_string());
        std::fs::create_dir_all(&attempt_dir).map_err(|source| UploadError::Io {
            what: "creating",
            path: attempt_dir.clone(),
            source,
        })?;
        let loaded = tough::RepositoryLoader::new(root, metadata_url.clone(), targets_url.clone())
            .transport(tough::FilesystemTransport)
            .expiration_enforcement(enforcement)
            .datastore(attempt_dir.as_std_path())
            .load()
            .await;
        match loaded {
            Ok(repository) => return Ok(repository),
            Err(error) if is_signature_failure(&error) => last = error_chain(&error),
            Err(error) => return Err(tuf_error(error)),
        }
    }
    Err(UploadError::Untrusted { tried: roots.len(), last })
}

fn is_signature_failure(error: &tough::error::Error) -> bool {
    use tough::error::Error;
    matches!(
        error,
        Error::VerifyMetadata { .. }
            | Error::VerifyRoleMetadata { .. }
            | Error::VerifyTrustedMetadata { .. }
            | Error::ParseTrustedMetadata { .. }
    )
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
    let mut stream =
        repository.read_target(&name).await.map_err(tuf_error)?.ok_or(UploadError::MissingArtifactsJson)?;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| UploadError::TargetMismatch {
            target: artifacts_json::TARGET_NAME.into(),
            message: error_chain(&error),
        })?;
        bytes.extend_from_slice(&chunk);
    }
    Ok(artifacts_json::parse(&bytes)?)
}
