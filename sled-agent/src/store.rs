//! The artifact store: content-addressed files on every healthy M.2, the
//! config that says which artifacts belong, and copies from other sleds'
//! depots.
//!
//! Writing (PUT and copy share one path): the body streams into a
//! random-named temp file in `artifacts/tmp/` on each healthy M.2, hashed as
//! it goes. Each chunk is reserved against the device's quota before it is
//! written. A device that fails, fills up or errors mid-write drops out; the
//! others carry on. At the end the hash must match the name; then each temp
//! file is fsynced and renamed into place. A partial or wrong file is
//! therefore never visible under an artifact's name, and two writers of the
//! same hash can only ever rename identical, verified bytes over each other.
//!
//! Config changes and commits exclude each other (the config lock), so the
//! delete reconciler can never race a rename of an artifact it just deleted
//! from the config.

use crate::config::CopyConfig;
use crate::ledger;
use crate::storage::{M2, QuotaExceeded};
use bytes::Bytes;
use camino::Utf8PathBuf;
use common::api::sled_agent::{ArtifactListResponse, ArtifactPutResponse, M2State};
use common::{ArtifactConfig, ArtifactHash, Generation, error_chain};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, RwLock, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the sled holds artifact config generation {current}; the request is for generation {requested}")]
    GenerationMismatch { requested: Generation, current: Generation },
    #[error("artifact {hash} is not in the sled's artifact config (generation {generation})")]
    NotInConfig { hash: ArtifactHash, generation: Generation },
    #[error("artifact config generation {offered} refused: the sled holds generation {current}{detail}")]
    ConfigRefused { offered: Generation, current: Generation, detail: &'static str },
    #[error("no healthy M.2 device to {action}")]
    NoHealthyM2 { action: &'static str },
    #[error("artifact {hash} does not fit on any M.2")]
    QuotaExceeded {
        hash: ArtifactHash,
        #[source]
        source: QuotaExceeded,
    },
    #[error("artifact {expected}: the data received has sha256 {actual} ({bytes} bytes); nothing was stored")]
    HashMismatch { expected: ArtifactHash, actual: ArtifactHash, bytes: u64 },
    #[error("artifact {hash}: every M.2 write failed: {errors}")]
    AllWritesFailed { hash: ArtifactHash, errors: String },
    #[error("artifact {hash}: the artifact config changed during the write and no longer includes it")]
    ConfigChanged { hash: ArtifactHash },
    #[error("artifact {hash}: reading the data failed after {bytes} bytes: {message}")]
    Body { hash: ArtifactHash, bytes: u64, message: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this sled already runs {limit} copies, its limit; retry later")]
    TooManyCopies { limit: usize },
    #[error("depot {url} could not be reached")]
    SourceUnreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("depot {url} answered {status}")]
    SourceStatus { url: String, status: u16 },
    #[error("depot {url} did not resume at byte {offset}: {detail}")]
    SourceResume { url: String, offset: u64, detail: String },
    #[error("artifact {hash} is not on any healthy M.2 of this sled")]
    NotFound { hash: ArtifactHash },
    #[error("this sled has no M.2 in slot {slot} (it has {count})")]
    NoSuchSlot { slot: u32, count: usize },
}

pub struct ArtifactStore {
    log: slog::Logger,
    m2s: Vec<Arc<M2>>,
    config: RwLock<ArtifactConfig>,
    /// Serializes renames into place, so that "did the file exist" and the
    /// quota accounting that depends on it agree.
    commit: Mutex<()>,
    copy_permits: Arc<Semaphore>,
    /// Artifacts being copied now: a second request for one of them is
    /// answered at once instead of copying the same bytes twice.
    copies_in_flight: Arc<std::sync::Mutex<BTreeSet<ArtifactHash>>>,
    copy: CopyConfig,
    http: reqwest::Client,
}

/// Takes an artifact out of the in-flight set when its copy ends, however
/// it ends.
struct InFlight {
    set: Arc<std::sync::Mutex<BTreeSet<ArtifactHash>>>,
    hash: ArtifactHash,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.hash);
    }
}

impl ArtifactStore {
    /// Opens the store: removes temp leftovers, loads the newest ledger,
    /// re-hashes every stored artifact (`verify_workers` at a time) deleting
    /// corrupt ones, and deletes artifacts outside the config.
    pub async fn open(
        log: slog::Logger,
        m2s: Vec<Arc<M2>>,
        copy: CopyConfig,
        verify_workers: usize,
    ) -> Result<ArtifactStore, StoreError> {
        for m2 in &m2s {
            let removed = m2.prepare().map_err(|source| StoreError::Io {
                what: "preparing the artifact dataset of",
                path: m2.root().to_owned(),
                source,
            })?;
            if removed > 0 {
                slog::info!(log, "removed temp files of unfinished writes"; "slot" => m2.slot, "count" => removed);
            }
        }
        let (config, problems) = ledger::load(&m2s);
        for problem in problems {
            slog::warn!(log, "artifact config ledger"; "problem" => problem);
        }
        verify_all(&log, &m2s, verify_workers).await;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(copy.read_timeout_secs))
            .build()
            .expect("a plain HTTP client builds");
        let store = ArtifactStore {
            log,
            copy_permits: Arc::new(Semaphore::new(copy.max_concurrent)),
            copies_in_flight: Default::default(),
            copy,
            http,
            commit: Mutex::new(()),
            config: RwLock::new(config.clone()),
            m2s,
        };
        for m2 in store.healthy() {
            store.adopt(&m2, &config)?;
        }
        slog::info!(store.log, "artifact store open"; "generation" => %config.generation, "artifacts" => config.artifacts.len());
        Ok(store)
    }

    pub fn m2s(&self) -> &[Arc<M2>] {
        &self.m2s
    }

    fn healthy(&self) -> Vec<Arc<M2>> {
        self.m2s.iter().filter(|m2| m2.is_healthy()).cloned().collect()
    }

    pub async fn config(&self) -> ArtifactConfig {
        self.config.read().await.clone()
    }

    /// Accepts a newer config (returns true), ignores the same one (false),
    /// refuses anything else.
    pub async fn put_config(&self, offered: ArtifactConfig) -> Result<bool, StoreError> {
        let mut config = self.config.write().await;
        if offered == *config {
            return Ok(false);
        }
        if offered.generation <= config.generation {
            let detail = if offered.generation == config.generation {
                " with a different set of artifacts"
            } else {
                ""
            };
            return Err(StoreError::ConfigRefused {
                offered: offered.generation,
                current: config.generation,
                detail,
            });
        }
        let healthy = self.healthy();
        if healthy.is_empty() {
            return Err(StoreError::NoHealthyM2 { action: "record the artifact config on" });
        }
        let mut written = 0;
        for m2 in &healthy {
            match ledger::write_one(m2, &offered) {
                Ok(()) => written += 1,
                Err(error) => {
                    slog::warn!(self.log, "writing the config ledger failed"; "slot" => m2.slot, "error" => %error)
                }
            }
        }
        if written == 0 {
            return Err(StoreError::NoHealthyM2 { action: "write the artifact config ledger to" });
        }
        *config = offered;
        for m2 in &healthy {
            self.delete_unreferenced(m2, &config);
        }
        slog::info!(self.log, "accepted artifact config"; "generation" => %config.generation, "artifacts" => config.artifacts.len());
        Ok(true)
    }

    pub async fn list(&self) -> ArtifactListResponse {
        let config = self.config.read().await;
        let healthy = self.healthy();
        let list = config
            .artifacts
            .iter()
            .filter_map(|hash| {
                let copies = healthy.iter().filter(|m2| m2.artifact_path(hash).is_file()).count();
                (copies > 0).then_some((*hash, copies))
            })
            .collect();
        let copies_in_flight = self.copies_in_flight.lock().unwrap_or_else(|e| e.into_inner()).clone();
        ArtifactListResponse { generation: config.generation, list, copies_in_flight }
    }

    /// Opens the artifact on the first healthy M.2 that has it.
    pub async fn open_artifact(&self, hash: &ArtifactHash) -> Result<(tokio::fs::File, u64), StoreError> {
        for m2 in self.healthy() {
            if let Ok(file) = tokio::fs::File::open(m2.artifact_path(hash)).await {
                let length = file.metadata().await.map_err(|source| StoreError::Io {
                    what: "reading the size of",
                    path: m2.artifact_path(hash),
                    source,
                })?;
                return Ok((file, length.len()));
            }
        }
        Err(StoreError::NotFound { hash: *hash })
    }

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
        let refusal = match self.check_request(&hash, generation).await {
            Ok(()) => self.begin_write(hash),
            Err(error) => Err(error),
        };
        let mut write = match refusal {
            Ok(write) => write,
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
        self.commit(write).await
    }

    /// Starts copying `hash` from another sled's depot. Returns once the
    /// source has answered; the copy finishes in the background.
    pub async fn copy_from_depot(
        self: &Arc<Self>,
        hash: ArtifactHash,
        generation: Generation,
        depot_base_url: &str,
    ) -> Result<(), StoreError> {
        self.check_request(&hash, generation).await?;
        let in_flight = {
            let mut set = self.copies_in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if !set.insert(hash) {
                slog::debug!(self.log, "copy already in flight"; "hash" => %hash);
                return Ok(());
            }
            InFlight { set: self.copies_in_flight.clone(), hash }
        };
        let permit = self
            .copy_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| StoreError::TooManyCopies { limit: self.copy.max_concurrent })?;
        let url = format!("{}/artifact/sha256/{hash}", depot_base_url.trim_end_matches('/'));
        let response = self.fetch(&url, 0).await?;
        // Refuse now, not after the download, what cannot fit anywhere.
        if let Some(length) = response.content_length() {
            let healthy = self.healthy();
            if let Some(fullest) =
                healthy.iter().filter(|m2| m2.available() < length).min_by_key(|m2| m2.slot)
                && healthy.iter().all(|m2| m2.available() < length)
            {
                let source = QuotaExceeded {
                    slot: fullest.slot,
                    used: fullest.used(),
                    quota: fullest.used() + fullest.available(),
                    wanted: length,
                };
                return Err(StoreError::QuotaExceeded { hash, source });
            }
        }
        let mut write = self.begin_write(hash)?;
        write.in_flight = Some(in_flight);
        let store = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match store.download(write, response, &url).await {
                Ok(outcome) => {
                    slog::info!(store.log, "copied artifact"; "hash" => %hash, "from" => &url,
                    "successful_writes" => outcome.successful_writes)
                }
                Err(error) => {
                    slog::warn!(store.log, "copy failed"; "hash" => %hash, "from" => &url,
                    "error" => error_chain(&error))
                }
            }
        });
        Ok(())
    }

    /// Fails, removes or restores an M.2. A restored device gets the current
    /// config ledger and loses artifacts that left the config meanwhile.
    pub async fn set_m2_state(&self, slot: u32, state: M2State) -> Result<(), StoreError> {
        let m2 = self
            .m2s
            .iter()
            .find(|m2| m2.slot == slot)
            .ok_or(StoreError::NoSuchSlot { slot, count: self.m2s.len() })?;
        let config = self.config.write().await;
        let before = m2.set_state(state);
        if state == M2State::Healthy && before != M2State::Healthy {
            self.adopt(m2, &config)?;
        }
        slog::info!(self.log, "M.2 state changed"; "slot" => slot, "from" => ?before, "to" => ?state);
        Ok(())
    }

    /// Brings one device in line with `config`: its ledger, its files, its
    /// usage count.
    fn adopt(&self, m2: &M2, config: &ArtifactConfig) -> Result<(), StoreError> {
        let io = |what, source| StoreError::Io { what, path: m2.root().to_owned(), source };
        m2.prepare().map_err(|source| io("preparing the artifact dataset of", source))?;
        if config.generation > Generation::new(0) {
            ledger::write_one(m2, config).map_err(|source| io("writing the config ledger of", source))?;
        }
        self.delete_unreferenced(m2, config);
        m2.recount_used().map_err(|source| io("measuring the artifact dataset of", source))
    }

    fn delete_unreferenced(&self, m2: &M2, config: &ArtifactConfig) {
        let files = match m2.artifact_files() {
            Ok(files) => files,
            Err(error) => {
                slog::warn!(self.log, "listing artifacts failed"; "slot" => m2.slot, "error" => %error);
                return;
            }
        };
        for name in files {
            let wanted = name.parse::<ArtifactHash>().is_ok_and(|hash| config.artifacts.contains(&hash));
            if wanted {
                continue;
            }
            let path = m2.dataset().join(&name);
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    m2.release(size);
                    slog::info!(self.log, "deleted artifact outside the config"; "path" => %path);
                }
                Err(error) => {
                    slog::warn!(self.log, "deleting artifact failed"; "path" => %path, "error" => %error)
                }
            }
        }
    }

    async fn check_request(&self, hash: &ArtifactHash, generation: Generation) -> Result<(), StoreError> {
        let config = self.config.read().await;
        if config.generation != generation {
            return Err(StoreError::GenerationMismatch { requested: generation, current: config.generation });
        }
        if !config.artifacts.contains(hash) {
            return Err(StoreError::NotInConfig { hash: *hash, generation: config.generation });
        }
        Ok(())
    }

    fn begin_write(&self, hash: ArtifactHash) -> Result<PendingWrite, StoreError> {
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

    async fn commit(&self, write: PendingWrite) -> Result<ArtifactPutResponse, StoreError> {
        let PendingWrite { in_flight, hash, datasets, mut targets, hasher, bytes, mut failures, .. } = write;
        // The bytes are all here: the copy is no longer "in flight" (and must
        // not be still when the reservations are returned).
        drop(in_flight);
        let actual = ArtifactHash(hasher.finalize().into());
        if actual != hash {
            return Err(StoreError::HashMismatch { expected: hash, actual, bytes });
        }
        for target in targets.iter_mut().filter(|t| t.file.is_some()) {
            let file = target.file.take().expect("filtered on a live file");
            if let Err(error) = sync(file).await {
                failures.push(format!("M.2 slot {}: syncing {}: {error}", target.m2.slot, target.tmp));
                target.reserved_release();
            }
        }
        let config = self.config.read().await;
        if !config.artifacts.contains(&hash) {
            return Err(StoreError::ConfigChanged { hash });
        }
        let _commit = self.commit.lock().await;
        let mut successful_writes = 0;
        for target in targets.iter_mut().filter(|t| t.reserved != u64::MAX) {
            if !target.m2.is_healthy() {
                failures.push(format!("M.2 slot {} failed before the rename", target.m2.slot));
                continue;
            }
            let destination = target.m2.artifact_path(&hash);
            let existed = destination.is_file();
            let renamed = std::fs::rename(&target.tmp, &destination)
                .and_then(|()| ledger::sync_dir(&target.m2.dataset()));
            match renamed {
                Ok(()) => {
                    target.committed = true;
                    successful_writes += 1;
                    if existed {
                        // Identical verified bytes replaced identical bytes.
                        target.m2.release(target.reserved);
                    }
                }
                Err(error) => failures
                    .push(format!("M.2 slot {}: renaming into {destination}: {error}", target.m2.slot)),
            }
        }
        if successful_writes == 0 {
            return Err(StoreError::AllWritesFailed { hash, errors: failures.join("; ") });
        }
        for failure in &failures {
            slog::warn!(self.log, "artifact write failed on one M.2"; "hash" => %hash, "error" => failure);
        }
        Ok(ArtifactPutResponse { datasets, successful_writes })
    }

    async fn fetch(&self, url: &str, offset: u64) -> Result<reqwest::Response, StoreError> {
        let mut request = self.http.get(url);
        if offset > 0 {
            request = request.header(http::header::RANGE, format!("bytes={offset}-"));
        }
        let response = request
            .send()
            .await
            .map_err(|source| StoreError::SourceUnreachable { url: url.to_string(), source })?;
        let status = response.status().as_u16();
        if offset == 0 {
            return if status == 200 {
                Ok(response)
            } else {
                Err(StoreError::SourceStatus { url: url.to_string(), status })
            };
        }
        let content_range = response
            .headers()
            .get(http::header::CONTENT_RANGE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string();
        if status != 206 || !content_range.starts_with(&format!("bytes {offset}-")) {
            return Err(StoreError::SourceResume {
                url: url.to_string(),
                offset,
                detail: format!("answered {status} with Content-Range {content_range:?}"),
            });
        }
        Ok(response)
    }

    /// Streams a depot's response into the pending write, resuming with a
    /// Range request where the stream broke, then commits.
    async fn download(
        &self,
        mut write: PendingWrite,
        mut response: reqwest::Response,
        url: &str,
    ) -> Result<ArtifactPutResponse, StoreError> {
        let mut resumes = 0;
        loop {
            let mut stream = response.bytes_stream();
            let broke = loop {
                match stream.next().await {
                    None => break None,
                    Some(Ok(chunk)) => write.write(&chunk).await?,
                    Some(Err(error)) => break Some(error),
                }
            };
            let Some(error) = broke else { break };
            if resumes == self.copy.resume_attempts {
                return Err(StoreError::Body {
                    hash: write.hash,
                    bytes: write.bytes,
                    message: format!("from {url}: {}", error_chain(&error)),
                });
            }
            resumes += 1;
            slog::info!(self.log, "copy interrupted; resuming"; "from" => url, "offset" => write.bytes,
                "attempt" => resumes, "error" => error_chain(&error));
            tokio::time::sleep(Duration::from_millis(100 * u64::from(resumes))).await;
            response = self.fetch(url, write.bytes).await?;
        }
        self.commit(write).await
    }
}

/// A write in progress to the temp files of every healthy M.2.
struct PendingWrite {
    /// For copies: dropped first (fields drop in order), so that by the time
    /// the reservations are returned the artifact is no longer in flight.
    in_flight: Option<InFlight>,
    hash: ArtifactHash,
    datasets: usize,
    targets: Vec<Target>,
    hasher: Sha256,
    bytes: u64,
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
    fn reserved_release(&mut self) {
        self.file = None;
        if self.reserved != u64::MAX {
            self.m2.release(self.reserved);
            self.reserved = u64::MAX;
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if !self.committed {
            self.reserved_release();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl PendingWrite {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
        let length = chunk.len() as u64;
        for target in self.targets.iter_mut().filter(|t| t.file.is_some()) {
            if !target.m2.is_healthy() {
                self.failures.push(format!("M.2 slot {} failed during the write", target.m2.slot));
                target.reserved_release();
                continue;
            }
            if let Err(exceeded) = target.m2.reserve(length) {
                self.failures.push(exceeded.to_string());
                self.quota.get_or_insert(exceeded);
                target.reserved_release();
                continue;
            }
            target.reserved += length;
            let file = target.file.as_mut().expect("filtered on a live file");
            if let Err(error) = file.write_all(chunk).await {
                self.failures.push(format!("M.2 slot {}: writing {}: {error}", target.m2.slot, target.tmp));
                target.reserved_release();
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

/// Bodies of refused PUTs are read and thrown away up to this size; beyond
/// it the connection is closed (the client then sees a broken pipe).
const DRAIN_LIMIT_BYTES: u64 = 1 << 30;

async fn sync(mut file: tokio::fs::File) -> std::io::Result<()> {
    file.flush().await?;
    file.sync_all().await
}

/// Re-hashes every stored artifact, `workers` at a time, and deletes files
/// whose contents do not match their name (or whose name is not a hash).
async fn verify_all(log: &slog::Logger, m2s: &[Arc<M2>], workers: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use camino::Utf8Path;
    use camino_tempfile::Utf8TempDir;
    use std::collections::BTreeSet;

    const QUOTA: u64 = 1 << 20;

    struct Sled {
        dir: Utf8TempDir,
        m2_count: u32,
        store: Arc<ArtifactStore>,
    }

    fn log() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    async fn open_store(dir: &Utf8Path, m2_count: u32, quota: u64) -> ArtifactStore {
        let m2s = (0..m2_count)
            .map(|slot| Arc::new(M2::new(slot, dir.join(format!("m2-{slot}")), quota)))
            .collect();
        ArtifactStore::open(log(), m2s, CopyConfig::default(), 2).await.unwrap()
    }

    impl Sled {
        async fn new(m2_count: u32) -> Sled {
            Self::with_quota(m2_count, QUOTA).await
        }

        async fn with_quota(m2_count: u32, quota: u64) -> Sled {
            let dir = camino_tempfile::tempdir().unwrap();
            let store = Arc::new(open_store(dir.path(), m2_count, quota).await);
            Sled { dir, m2_count, store }
        }

        /// Simulates a restart: a new store on the same directories.
        async fn restart(self) -> Sled {
            let Sled { dir, m2_count, store } = self;
            drop(store);
            let store = Arc::new(open_store(dir.path(), m2_count, QUOTA).await);
            Sled { dir, m2_count, store }
        }

        fn m2(&self, slot: u32) -> &Arc<M2> {
            &self.store.m2s()[slot as usize]
        }

        /// Every file under every M.2 dataset, temp files included.
        fn files(&self) -> BTreeSet<String> {
            let mut files = BTreeSet::new();
            for m2 in self.store.m2s() {
                for dir in [m2.dataset(), m2.tmp_dir()] {
                    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                        if entry.file_type().unwrap().is_file() {
                            files.insert(format!("{}/{}", m2.slot, entry.file_name().to_str().unwrap()));
                        }
                    }
                }
            }
            files
        }

        async fn configure(&self, generation: u64, artifacts: &[&Artifact]) {
            let config = ArtifactConfig {
                generation: Generation::new(generation),
                artifacts: artifacts.iter().map(|a| a.hash).collect(),
            };
            self.store.put_config(config).await.unwrap();
        }

        async fn put(&self, artifact: &Artifact) -> Result<ArtifactPutResponse, StoreError> {
            let generation = self.store.config().await.generation;
            self.store.put(artifact.hash, generation, chunks(&artifact.bytes)).await
        }
    }

    struct Artifact {
        bytes: Vec<u8>,
        hash: ArtifactHash,
    }

    fn artifact(seed: u8, size: usize) -> Artifact {
        let bytes: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let hash = ArtifactHash(Sha256::digest(&bytes).into());
        Artifact { bytes, hash }
    }

    /// The body in 4 KiB chunks, as a stream.
    fn chunks(bytes: &[u8]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + use<> {
        let chunks: Vec<_> = bytes.chunks(4096).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures::stream::iter(chunks)
    }

    async fn read_back(store: &ArtifactStore, hash: &ArtifactHash) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let (mut file, length) = store.open_artifact(hash).await.unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(bytes.len() as u64, length);
        bytes
    }

    #[tokio::test]
    async fn put_list_and_read_on_one_two_and_three_m2s() {
        for m2_count in 1..=3 {
            let sled = Sled::new(m2_count).await;
            let a = artifact(1, 10_000);
            let b = artifact(2, 0);
            sled.configure(1, &[&a, &b]).await;
            let response = sled.put(&a).await.unwrap();
            assert_eq!(
                response,
                ArtifactPutResponse { datasets: m2_count as usize, successful_writes: m2_count as usize }
            );
            sled.put(&b).await.unwrap();
            let list = sled.store.list().await;
            assert_eq!(list.generation, Generation::new(1));
            assert_eq!(list.list, [(a.hash, m2_count as usize), (b.hash, m2_count as usize)].into());
            assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes);
            assert!(read_back(&sled.store, &b.hash).await.is_empty());
            assert_eq!(sled.m2(0).used(), 10_000);
            assert_eq!(sled.files().len(), 2 * m2_count as usize, "no temp files remain");
        }
    }

    #[tokio::test]
    async fn requests_must_match_the_generation_and_the_config() {
        let sled = Sled::new(2).await;
        let a = artifact(1, 100);
        let stranger = artifact(9, 100);
        sled.configure(3, &[&a]).await;
        let error = sled.store.put(a.hash, Generation::new(2), chunks(&a.bytes)).await.unwrap_err();
        assert!(matches!(error, StoreError::GenerationMismatch { .. }), "{error}");
        assert_eq!(
            error.to_string(),
            "the sled holds artifact config generation 3; the request is for generation 2"
        );
        let error = sled.put(&stranger).await.unwrap_err();
        assert!(matches!(error, StoreError::NotInConfig { .. }), "{error}");
        assert!(sled.files().is_empty());
    }

    #[tokio::test]
    async fn a_wrong_hash_leaves_nothing() {
        let sled = Sled::new(2).await;
        let a = artifact(1, 50_000);
        sled.configure(1, &[&a]).await;
        let mut corrupted = a.bytes.clone();
        corrupted[25_000] ^= 1;
        let error = sled.store.put(a.hash, Generation::new(1), chunks(&corrupted)).await.unwrap_err();
        let StoreError::HashMismatch { expected, actual, bytes } = error else { panic!("{error:?}") };
        assert_eq!((expected, bytes), (a.hash, 50_000));
        assert_ne!(actual, a.hash);
        assert!(sled.files().is_empty(), "{:?}", sled.files());
        assert_eq!(sled.m2(0).used(), 0, "the reservation was returned");
        assert!(sled.store.list().await.list.is_empty());
    }

    #[tokio::test]
    async fn exceeding_the_quota_is_refused_and_leaves_nothing() {
        let sled = Sled::with_quota(2, 64 * 1024).await;
        let small = artifact(1, 40 * 1024);
        let big = artifact(2, 40 * 1024);
        sled.configure(1, &[&small, &big]).await;
        sled.put(&small).await.unwrap();
        let error = sled.put(&big).await.unwrap_err();
        assert!(matches!(error, StoreError::QuotaExceeded { .. }), "{error:?}");
        assert!(error_chain(&error).contains("is full"), "{}", error_chain(&error));
        assert_eq!(sled.files().len(), 2, "only the small artifact's two copies: {:?}", sled.files());
        assert_eq!(sled.m2(1).used(), 40 * 1024);
    }

    #[tokio::test]
    async fn a_failed_m2_is_skipped_and_healed_after_restore() {
        let sled = Sled::new(2).await;
        let a = artifact(1, 20_000);
        sled.configure(1, &[&a]).await;
        sled.store.set_m2_state(0, M2State::Failed).await.unwrap();
        let response = sled.put(&a).await.unwrap();
        assert_eq!(response, ArtifactPutResponse { datasets: 1, successful_writes: 1 });
        assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes, "read from the healthy M.2");
        assert_eq!(sled.store.list().await.list[&a.hash], 1);

        sled.store.set_m2_state(0, M2State::Healthy).await.unwrap();
        assert_eq!(
            sled.store.list().await.list[&a.hash],
            1,
            "one copy, two healthy devices: needs a re-copy"
        );
        sled.put(&a).await.unwrap();
        assert_eq!(sled.store.list().await.list[&a.hash], 2);
        assert_eq!(sled.m2(1).used(), 20_000, "the re-copy did not count the existing copy twice");
    }

    #[tokio::test]
    async fn an_m2_that_fails_mid_write_drops_out_and_the_other_copy_lands() {
        let sled = Sled::new(2).await;
        let a = artifact(1, 64 * 1024);
        sled.configure(1, &[&a]).await;
        let m2 = sled.m2(1).clone();
        let body = chunks(&a.bytes).enumerate().map(move |(index, chunk)| {
            if index == 4 {
                m2.set_state(M2State::Failed);
            }
            chunk
        });
        let response = sled.store.put(a.hash, Generation::new(1), body).await.unwrap();
        assert_eq!(response, ArtifactPutResponse { datasets: 2, successful_writes: 1 });
        assert_eq!(sled.files(), [format!("0/{}", a.hash)].into(), "no temp file on the failed device");
        assert_eq!(sled.m2(1).used(), 0);
    }

    #[tokio::test]
    async fn config_generations_only_move_forward_across_restarts() {
        let sled = Sled::new(2).await;
        let a = artifact(1, 10);
        let b = artifact(2, 10);
        let config = |generation, artifacts: &[&Artifact]| ArtifactConfig {
            generation: Generation::new(generation),
            artifacts: artifacts.iter().map(|x| x.hash).collect(),
        };
        assert!(sled.store.put_config(config(2, &[&a])).await.unwrap());
        assert!(!sled.store.put_config(config(2, &[&a])).await.unwrap(), "same config: no-op");
        let error = sled.store.put_config(config(2, &[&b])).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "artifact config generation 2 refused: the sled holds generation 2 with a different set of artifacts"
        );
        let error = sled.store.put_config(config(1, &[&a, &b])).await.unwrap_err();
        assert!(matches!(error, StoreError::ConfigRefused { .. }), "{error}");
        assert!(sled.store.put_config(config(5, &[&a, &b])).await.unwrap());

        // A torn ledger on one device does not hide the good one.
        std::fs::write(sled.m2(0).ledger_path(), b"{\"generation\":").unwrap();
        let sled = sled.restart().await;
        assert_eq!(sled.store.config().await, config(5, &[&a, &b]));
        let error = sled.store.put_config(config(4, &[&a])).await.unwrap_err();
        assert!(matches!(error, StoreError::ConfigRefused { .. }), "{error}");
        let repaired = std::fs::read_to_string(sled.m2(0).ledger_path()).unwrap();
        assert!(repaired.contains("\"generation\":5"), "the torn ledger was rewritten: {repaired}");
    }

    #[tokio::test]
    async fn unreferenced_files_are_deleted_on_change_and_at_start_up() {
        let sled = Sled::new(2).await;
        let a = artifact(1, 1000);
        let b = artifact(2, 1000);
        sled.configure(1, &[&a, &b]).await;
        sled.put(&a).await.unwrap();
        sled.put(&b).await.unwrap();
        sled.configure(2, &[&a]).await;
        assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
        assert_eq!(sled.m2(0).used(), 1000);

        // Files that appear while the agent is down: an artifact outside the
        // config, a stray file, and a temp file of an unfinished write.
        std::fs::write(sled.m2(0).artifact_path(&b.hash), &b.bytes).unwrap();
        std::fs::write(sled.m2(1).dataset().join("notes.txt"), b"hello").unwrap();
        std::fs::write(sled.m2(1).tmp_dir().join("x.tmp"), b"partial").unwrap();
        let sled = sled.restart().await;
        assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
        assert_eq!(sled.m2(1).used(), 1000);
    }

    #[tokio::test]
    async fn a_corrupt_copy_is_found_at_start_up_and_removed() {
        let sled = Sled::new(2).await;
        let a = artifact(1, 30_000);
        sled.configure(1, &[&a]).await;
        sled.put(&a).await.unwrap();
        let path = sled.m2(1).artifact_path(&a.hash);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let sled = sled.restart().await;
        assert_eq!(sled.files(), [format!("0/{}", a.hash)].into());
        assert_eq!(sled.store.list().await.list[&a.hash], 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_of_one_artifact_leave_one_correct_file() {
        // In-progress temp files count against the quota: room for all 8.
        let sled = Sled::with_quota(2, 4 << 20).await;
        let a = artifact(7, 200_000);
        sled.configure(1, &[&a]).await;
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let store = sled.store.clone();
                let bytes = a.bytes.clone();
                let hash = a.hash;
                tokio::spawn(async move { store.put(hash, Generation::new(1), chunks(&bytes)).await })
            })
            .collect();
        for writer in writers {
            assert_eq!(writer.await.unwrap().unwrap().successful_writes, 2);
        }
        assert_eq!(sled.files(), [format!("0/{}", a.hash), format!("1/{}", a.hash)].into());
        assert_eq!(read_back(&sled.store, &a.hash).await, a.bytes);
        assert_eq!((sled.m2(0).used(), sled.m2(1).used()), (200_000, 200_000));
    }
}
