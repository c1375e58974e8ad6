//! The artifact store: content-addressed files on every healthy M.2, the
//! config that says which artifacts belong, and copies from other sleds'
//! depots.
//!
//! - [`write`]: the one write path of PUTs and copies (temp file per M.2,
//!   hashed while written, fsync, rename, directory fsync), and how a copy
//!   continues the partial a crashed one left.
//! - [`copy`]: copies from another sled's depot, resumed with Range requests,
//!   and the record of copies that failed.
//! - [`reconcile`]: deleting what the config no longer lists.
//! - [`verify`]: checking what is stored, at start-up: trusted by
//!   [`stamps`] (the verification cache) or re-hashed.
//! - [`scrub`]: re-hashing everything in the background at a bounded rate.
//! - [`serve`]: what the depot sends: stored artifacts, and artifacts still
//!   being written, followed as they arrive.
//!
//! # Start-up
//!
//! [`ArtifactStore::open`], in this order:
//! 1. the dataset directories are created and the ledger is loaded, so that
//!    the config is known before anything is deleted;
//! 2. stored artifacts are verified ([`verify`]);
//! 3. temp files are cleared ([`crate::storage::M2::prepare`]): a partial
//!    copy is kept (held, its bytes reserved against the quota) if its
//!    artifact is in the config and not already stored on that device, and
//!    also if the ledger is damaged: like the reconciler, a sled that does
//!    not know its config deletes nothing, and the config that repairs the
//!    ledger removes the partials it does not list. Every other temp file is
//!    removed;
//! 4. each device adopts the config (ledger copy, reconciler, usage).
//!
//! # The config this sled enforces
//!
//! Usually the newest config in the ledger ([`crate::ledger`]). If the newest
//! ledger copy is damaged, the sled knows only that copy's generation
//! ([`Enforced::Damaged`]): it refuses configs older than that, refuses every
//! PUT and copy, and deletes nothing, until a Nexus pushes a config at least
//! that new, which repairs the ledger. A config of the same generation is
//! accepted as the repair because the database names exactly one set of
//! artifacts by each generation (every change to the set bumps it).
//!
//! A config is accepted once its ledger copy is durable on one device; a
//! device whose write failed is *stale* (reported with the ledger problems)
//! and rewritten by the next push, even of the same config, so that losing
//! the device that took the write does not take the sled back a generation.
//!
//! # Locks
//!
//! `config` (read by requests, written by config changes and device
//! restores) is taken before `commit` (renames into place). Holding the
//! config lock across a rename means the reconciler can never delete an
//! artifact a moment before a write renames it back.

mod copy;
mod rate;
mod reconcile;
mod scrub;
mod serve;
mod stamps;
mod verify;
mod write;

#[cfg(test)]
mod tests;

use crate::config::{CopyConfig, RequestLimits};
use crate::ledger;
use crate::storage::{M2, QuotaExceeded};
use camino::Utf8PathBuf;
use common::api::sled_agent::{
    ArtifactListResponse, CopyFailure, M2State, MAX_CONFIG_ARTIFACTS, ScrubStatus, StartupVerification,
    UnreadableCopy,
};
use common::{ArtifactConfig, ArtifactHash, Generation};
use serve::InFlightWrites;
pub use serve::{ARRIVAL_WAIT, DepotArtifact};
use stamps::Stamps;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, RwLock, Semaphore};

/// How often stamps of newly verified artifacts are written out (see
/// [`stamps`]): a crash forgets at most this much, which costs re-hashing
/// those files at the next start.
const STAMP_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the sled holds artifact config generation {current}; the request is for generation {requested}")]
    GenerationMismatch { requested: Generation, current: Generation },
    #[error("artifact {hash} is not in the sled's artifact config (generation {generation})")]
    NotInConfig { hash: ArtifactHash, generation: Generation },
    #[error("artifact config generation {offered} refused: the sled holds generation {current}{detail}")]
    ConfigRefused { offered: Generation, current: Generation, detail: &'static str },
    #[error(
        "artifact config generation {generation} lists {count} artifacts; a config may list at most {max}"
    )]
    ConfigTooLarge { generation: Generation, count: usize, max: usize },
    #[error(
        "the sled's newest artifact config ledger copy (generation {generation}) is damaged: {}; \
         it acts on nothing until a config of generation {generation} or newer is pushed",
        damage.join("; ")
    )]
    LedgerDamaged { generation: Generation, damage: Vec<String> },
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
    #[error("this sled is already {activity} ({limit}, its limit); retry later")]
    Busy { activity: &'static str, limit: usize },
    #[error("depot {url} is busy; it asked to retry after {retry_after_secs} s")]
    SourceBusy { url: String, retry_after_secs: u64 },
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
    #[error(
        "artifact {hash} is in this sled's config but not here yet, nor being written \
         (waited {waited:?}); retry later"
    )]
    NotYetHere { hash: ArtifactHash, waited: Duration },
    #[error("this sled has no M.2 in slot {slot} (it has {count})")]
    NoSuchSlot { slot: u32, count: usize },
}

/// The config this sled enforces (see the module doc).
#[derive(Clone, Debug)]
enum Enforced {
    Known(ArtifactConfig),
    /// The newest ledger copy, of this generation, is damaged.
    Damaged {
        generation: Generation,
        damage: Vec<String>,
    },
}

impl Enforced {
    fn generation(&self) -> Generation {
        match self {
            Enforced::Known(config) => config.generation,
            Enforced::Damaged { generation, .. } => *generation,
        }
    }

    fn from_ledger(loaded: ledger::Loaded) -> Enforced {
        if loaded.is_damaged() {
            Enforced::Damaged { generation: loaded.newest_named, damage: loaded.damage }
        } else {
            Enforced::Known(loaded.newest_intact)
        }
    }

    /// Whether an artifact may still be wanted: listed in the config, or the
    /// config is unknown (damaged ledger).
    fn may_want(&self, hash: &ArtifactHash) -> bool {
        match self {
            Enforced::Known(config) => config.artifacts.contains(hash),
            Enforced::Damaged { .. } => true,
        }
    }

    fn known(&self) -> Result<&ArtifactConfig, StoreError> {
        match self {
            Enforced::Known(config) => Ok(config),
            Enforced::Damaged { generation, damage } => {
                Err(StoreError::LedgerDamaged { generation: *generation, damage: damage.clone() })
            }
        }
    }
}

pub struct ArtifactStore {
    log: slog::Logger,
    m2s: Vec<Arc<M2>>,
    config: RwLock<Enforced>,
    /// Ledger problems seen at start-up or on a device's return, shown in
    /// inventory until a config is written again.
    ledger_problems: std::sync::Mutex<Vec<String>>,
    /// Healthy devices whose ledger write of the enforced config failed, by
    /// slot, with the error: rewritten by the next config push.
    stale_ledgers: std::sync::Mutex<BTreeMap<u32, String>>,
    /// Serializes renames into place, so that "did the file exist" and the
    /// quota accounting that depends on it agree.
    commit: Mutex<()>,
    copy_permits: Arc<Semaphore>,
    /// Copies that may read from Nexus's depot at once because their sled
    /// sources were slow (see [`copy`]).
    fallback_permits: Arc<Semaphore>,
    /// Room in the queue of copies waiting for a `copy_permits` slot.
    copy_queue_permits: Arc<Semaphore>,
    put_permits: Arc<Semaphore>,
    depot_permits: Arc<Semaphore>,
    limits: RequestLimits,
    /// Artifacts being copied now: a second request for one of them is
    /// answered at once instead of copying the same bytes twice.
    copies_in_flight: Arc<std::sync::Mutex<BTreeSet<ArtifactHash>>>,
    /// Writes the depot can follow (see [`serve`]).
    in_flight_writes: Arc<InFlightWrites>,
    /// Each running copy's rate, for judging a slow source ([`rate`]).
    copy_rates: Arc<rate::CopyRates>,
    copy_failures: std::sync::Mutex<BTreeMap<ArtifactHash, CopyFailure>>,
    copy: CopyConfig,
    http: reqwest::Client,
    /// The verification cache of each M.2, by slot.
    stamps: BTreeMap<u32, Arc<Stamps>>,
    startup_verification: StartupVerification,
    scrub: std::sync::Mutex<ScrubStatus>,
    /// Copies whose last check failed to read them, by (slot, hash). Such a
    /// copy is kept (an I/O error says nothing about its bytes) but not
    /// listed as held, so that Nexus neither releases its staged copy on
    /// its account nor stops sending it: a verified write renames a fresh
    /// copy over it. The scrub's next read of it decides.
    unreadable: std::sync::Mutex<BTreeMap<(u32, ArtifactHash), UnreadableCopy>>,
    /// Artifacts a peer found wrong, queued or being re-verified
    /// ([`ArtifactStore::reverify`]), and the lock that runs one at a time.
    reverifying: std::sync::Mutex<BTreeSet<ArtifactHash>>,
    reverify_permit: Mutex<()>,
}

impl ArtifactStore {
    /// Opens the store (see "Start-up" in the module doc): loads the ledger,
    /// verifies every stored artifact (trusting unchanged files, re-hashing
    /// the others `verify_workers` at a time, deleting corrupt ones), clears
    /// temp files but for partial copies worth continuing, and deletes
    /// artifacts outside the config (unless the ledger is damaged: then
    /// nothing is deleted).
    pub async fn open(
        log: slog::Logger,
        m2s: Vec<Arc<M2>>,
        copy: CopyConfig,
        limits: RequestLimits,
        verify_workers: usize,
    ) -> Result<ArtifactStore, StoreError> {
        let io = |m2: &M2, source| StoreError::Io {
            what: "preparing the artifact dataset of",
            path: m2.root().to_owned(),
            source,
        };
        for m2 in &m2s {
            m2.create_dirs().map_err(|source| io(m2, source))?;
        }
        let loaded = ledger::load(&m2s);
        for problem in &loaded.damage {
            slog::error!(log, "artifact config ledger damaged"; "problem" => problem);
        }
        let problems = loaded.damage.clone();
        let enforced = Enforced::from_ledger(loaded);
        if let Enforced::Damaged { generation, .. } = &enforced {
            slog::error!(log, "the newest config ledger copy is unreadable: deleting nothing and acting on \
                nothing until Nexus pushes this generation or a newer one"; "generation" => %generation);
        }
        let stamps: BTreeMap<u32, Arc<Stamps>> =
            m2s.iter().map(|m2| (m2.slot, Arc::new(Stamps::load(&log, m2)))).collect();
        let devices: Vec<_> = m2s.iter().map(|m2| (m2.clone(), stamps[&m2.slot].clone())).collect();
        let verified = verify::verify_all(&log, &devices, verify_workers).await;
        for m2 in &m2s {
            let prepared = m2
                .prepare(|hash| enforced.may_want(hash) && !m2.artifact_path(hash).is_file())
                .map_err(|source| io(m2, source))?;
            if prepared.removed > 0 || prepared.kept > 0 {
                slog::info!(log, "cleared temp files of unfinished writes"; "slot" => m2.slot,
                    "removed" => prepared.removed, "partial_copies_kept" => prepared.kept,
                    "partial_bytes_kept" => prepared.kept_bytes);
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(copy.read_timeout_secs))
            .build()
            .expect("a plain HTTP client builds");
        let store = ArtifactStore {
            log,
            copy_permits: Arc::new(Semaphore::new(copy.max_concurrent)),
            fallback_permits: Arc::new(Semaphore::new(copy::FALLBACK_FOR_SPEED)),
            copy_queue_permits: Arc::new(Semaphore::new(copy.max_queued)),
            put_permits: Arc::new(Semaphore::new(limits.max_concurrent_puts)),
            depot_permits: Arc::new(Semaphore::new(limits.max_concurrent_depot_reads)),
            limits,
            copies_in_flight: Default::default(),
            in_flight_writes: Default::default(),
            copy_rates: Default::default(),
            copy_failures: Default::default(),
            copy,
            http,
            commit: Mutex::new(()),
            ledger_problems: std::sync::Mutex::new(problems),
            stale_ledgers: Default::default(),
            config: RwLock::new(enforced.clone()),
            m2s,
            stamps,
            startup_verification: verified.summary,
            scrub: Default::default(),
            unreadable: std::sync::Mutex::new(
                verified.unreadable.into_iter().map(|copy| ((copy.slot, copy.sha256), copy)).collect(),
            ),
            reverifying: Default::default(),
            reverify_permit: Mutex::new(()),
        };
        for m2 in store.healthy() {
            store.adopt(&m2, &enforced)?;
        }
        slog::info!(store.log, "artifact store open"; "generation" => %enforced.generation(),
            "damaged" => matches!(enforced, Enforced::Damaged { .. }));
        Ok(store)
    }

    /// Starts the store's background work: writing out the verification
    /// cache every few seconds when it changed, and the scrub (unless
    /// `scrub_bytes_per_sec` is 0). The tasks run until aborted.
    pub fn spawn_background(
        self: &Arc<Self>,
        scrub_bytes_per_sec: u64,
        scrub_interval: Duration,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.scrub_state().rate_limit_bytes_per_sec = scrub_bytes_per_sec;
        let store = self.clone();
        let mut tasks = vec![tokio::spawn(async move {
            loop {
                tokio::time::sleep(STAMP_FLUSH_INTERVAL).await;
                store.flush_stamps().await;
            }
        })];
        if scrub_bytes_per_sec > 0 {
            tasks.push(tokio::spawn(self.clone().scrub_forever(scrub_bytes_per_sec, scrub_interval)));
        }
        tasks
    }

    /// Writes out the verification cache of every healthy M.2 that changed.
    pub async fn flush_stamps(&self) {
        for m2 in self.healthy() {
            let stamps = self.stamps(&m2).clone();
            let flushed = tokio::task::spawn_blocking(move || stamps.flush()).await;
            if let Ok(Err(error)) = flushed {
                slog::warn!(self.log, "writing the verification cache failed"; "slot" => m2.slot,
                    "error" => %error);
            }
        }
    }

    fn stamps(&self, m2: &M2) -> &Arc<Stamps> {
        &self.stamps[&m2.slot]
    }

    pub fn startup_verification(&self) -> StartupVerification {
        self.startup_verification.clone()
    }

    pub fn scrub_status(&self) -> ScrubStatus {
        self.scrub_state().clone()
    }

    /// Copies that could not be read when last checked and are still there.
    pub fn unreadable(&self) -> Vec<UnreadableCopy> {
        let mut unreadable = self.unreadable_state();
        unreadable.retain(|(slot, hash), _| {
            self.m2s.iter().any(|m2| m2.slot == *slot && m2.artifact_path(hash).symlink_metadata().is_ok())
        });
        unreadable.values().cloned().collect()
    }

    fn unreadable_state(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u32, ArtifactHash), UnreadableCopy>> {
        self.unreadable.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_unreadable(&self, m2: &M2, hash: ArtifactHash, problem: String) {
        slog::error!(self.log, "an artifact copy could not be read; keeping it"; "slot" => m2.slot,
            "hash" => %hash, "problem" => &problem);
        self.unreadable_state().entry((m2.slot, hash)).or_insert_with(|| UnreadableCopy {
            slot: m2.slot,
            sha256: hash,
            problem,
            since: chrono::Utc::now(),
        });
    }

    /// The copy on `m2` was just read or written whole, or is gone.
    fn clear_unreadable(&self, m2: &M2, hash: &ArtifactHash) {
        self.unreadable_state().remove(&(m2.slot, *hash));
    }

    fn scrub_state(&self) -> std::sync::MutexGuard<'_, ScrubStatus> {
        self.scrub.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn m2s(&self) -> &[Arc<M2>] {
        &self.m2s
    }

    fn healthy(&self) -> Vec<Arc<M2>> {
        self.m2s.iter().filter(|m2| m2.is_healthy()).cloned().collect()
    }

    /// The config this sled enforces; an error if its ledger is damaged.
    pub async fn config(&self) -> Result<ArtifactConfig, StoreError> {
        self.config.read().await.known().cloned()
    }

    /// The generation this sled enforces, whether or not its ledger is
    /// damaged.
    pub async fn generation(&self) -> Generation {
        self.config.read().await.generation()
    }

    /// Damage found in the ledger, then devices whose copy is stale.
    pub fn ledger_problems(&self) -> Vec<String> {
        let mut problems = self.ledger_problems.lock().unwrap_or_else(|e| e.into_inner()).clone();
        problems.extend(self.stale_ledgers_state().values().cloned());
        problems
    }

    fn stale_ledgers_state(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, String>> {
        self.stale_ledgers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `config`'s ledger copy to each of `m2s`, recording which are
    /// stale; returns how many writes succeeded.
    fn write_ledgers(&self, m2s: &[Arc<M2>], config: &ArtifactConfig) -> usize {
        let mut written = 0;
        for m2 in m2s {
            match ledger::write_one(m2, config) {
                Ok(()) => {
                    written += 1;
                    self.stale_ledgers_state().remove(&m2.slot);
                }
                Err(error) => {
                    slog::warn!(self.log, "writing the config ledger failed"; "slot" => m2.slot, "error" => %error);
                    let problem = format!(
                        "M.2 slot {}: writing the ledger of generation {} to {} failed ({error}); the next \
                         config push rewrites it",
                        m2.slot,
                        config.generation,
                        ledger::path_for(m2, config.generation)
                    );
                    self.stale_ledgers_state().insert(m2.slot, problem);
                }
            }
        }
        written
    }

    /// Accepts a newer config (returns true), ignores the same one (false),
    /// refuses anything else. A damaged ledger accepts its own generation or
    /// a newer one, which repairs it.
    pub async fn put_config(&self, offered: ArtifactConfig) -> Result<bool, StoreError> {
        if offered.artifacts.len() > MAX_CONFIG_ARTIFACTS {
            return Err(StoreError::ConfigTooLarge {
                generation: offered.generation,
                count: offered.artifacts.len(),
                max: MAX_CONFIG_ARTIFACTS,
            });
        }
        let mut enforced = self.config.write().await;
        match &*enforced {
            Enforced::Known(config) if offered == *config => {
                let stale: Vec<Arc<M2>> = {
                    let stale = self.stale_ledgers_state();
                    self.healthy().into_iter().filter(|m2| stale.contains_key(&m2.slot)).collect()
                };
                if !stale.is_empty() {
                    let rewritten = self.write_ledgers(&stale, config);
                    slog::info!(self.log, "rewrote stale config ledgers"; "generation" => %config.generation,
                        "rewritten" => rewritten, "stale" => stale.len());
                }
                return Ok(false);
            }
            Enforced::Known(config) if offered.generation <= config.generation => {
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
            Enforced::Damaged { generation, .. } if offered.generation < *generation => {
                return Err(StoreError::ConfigRefused {
                    offered: offered.generation,
                    current: *generation,
                    detail: " (its ledger copy of that generation is damaged; \
                        only that generation or a newer one can repair it)",
                });
            }
            _ => {}
        }
        let healthy = self.healthy();
        if healthy.is_empty() {
            return Err(StoreError::NoHealthyM2 { action: "record the artifact config on" });
        }
        let written = self.write_ledgers(&healthy, &offered);
        if written == 0 {
            return Err(StoreError::NoHealthyM2 { action: "write the artifact config ledger to" });
        }
        let repaired = matches!(&*enforced, Enforced::Damaged { .. });
        *enforced = Enforced::Known(offered);
        self.ledger_problems.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let Enforced::Known(config) = &*enforced else { unreachable!("just set") };
        for m2 in &healthy {
            self.delete_unreferenced(m2, config);
        }
        self.copy_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|hash, _| config.artifacts.contains(hash));
        slog::info!(self.log, "accepted artifact config"; "generation" => %config.generation,
            "artifacts" => config.artifacts.len(), "repaired_ledger" => repaired);
        Ok(true)
    }

    pub async fn list(&self) -> ArtifactListResponse {
        let enforced = self.config.read().await;
        // A rename and its directory fsync happen under `commit`: a name
        // seen under it is durable, so the list never acknowledges a copy
        // that a power cut could still take back.
        let _commit = self.commit.lock().await;
        let copies_in_flight = self.copies_in_flight.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let copy_failures = self.copy_failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (list, ledger_damage) = match &*enforced {
            Enforced::Known(config) => {
                let healthy = self.healthy();
                let unreadable = self.unreadable_state().clone();
                let list = config
                    .artifacts
                    .iter()
                    .filter_map(|hash| {
                        let copies = healthy
                            .iter()
                            .filter(|m2| {
                                m2.artifact_path(hash).is_file()
                                    && !unreadable.contains_key(&(m2.slot, *hash))
                            })
                            .count();
                        (copies > 0).then_some((*hash, copies))
                    })
                    .collect();
                (list, Vec::new())
            }
            Enforced::Damaged { damage, .. } => (BTreeMap::new(), damage.clone()),
        };
        ArtifactListResponse {
            generation: enforced.generation(),
            list,
            copies_in_flight,
            copy_failures,
            max_concurrent_copies: Some(self.copy.max_concurrent),
            max_queued_copies: Some(self.copy.max_queued),
            copy_bytes_per_sec: self.copy_rates.best_total(),
            ledger_damage,
        }
    }

    /// Fails, removes or restores an M.2. A restored device's ledger is read
    /// again (it may hold a newer generation, or damage), then the device
    /// gets the current ledger and loses artifacts that left the config.
    pub async fn set_m2_state(&self, slot: u32, state: M2State) -> Result<(), StoreError> {
        let m2 = self
            .m2s
            .iter()
            .find(|m2| m2.slot == slot)
            .ok_or(StoreError::NoSuchSlot { slot, count: self.m2s.len() })?;
        let mut enforced = self.config.write().await;
        let before = m2.set_state(state);
        if state == M2State::Healthy && before != M2State::Healthy {
            let returning = ledger::load(std::slice::from_ref(m2));
            if returning.newest_named > enforced.generation() {
                slog::warn!(self.log, "a returning M.2 holds a newer config ledger"; "slot" => slot,
                    "generation" => %returning.newest_named, "damaged" => returning.is_damaged());
                self.ledger_problems
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(returning.damage.clone());
                *enforced = Enforced::from_ledger(returning);
                for other in self.healthy() {
                    self.adopt(&other, &enforced)?;
                }
            } else {
                self.adopt(m2, &enforced)?;
            }
        }
        slog::info!(self.log, "M.2 state changed"; "slot" => slot, "from" => ?before, "to" => ?state);
        Ok(())
    }

    /// Brings one device in line with the enforced config: its ledger, its
    /// files, its usage count. With a damaged ledger it only recounts.
    fn adopt(&self, m2: &M2, enforced: &Enforced) -> Result<(), StoreError> {
        let io = |what, source| StoreError::Io { what, path: m2.root().to_owned(), source };
        m2.create_dirs().map_err(|source| io("preparing the artifact dataset of", source))?;
        if let Enforced::Known(config) = enforced {
            if config.generation > Generation::new(0) {
                ledger::write_one(m2, config).map_err(|source| io("writing the config ledger of", source))?;
                self.stale_ledgers_state().remove(&m2.slot);
            }
            self.delete_unreferenced(m2, config);
        }
        m2.recount_stored().map_err(|source| io("measuring the artifact dataset of", source))
    }

    async fn check_request(&self, hash: &ArtifactHash, generation: Generation) -> Result<(), StoreError> {
        let enforced = self.config.read().await;
        let config = enforced.known()?;
        if config.generation != generation {
            return Err(StoreError::GenerationMismatch { requested: generation, current: config.generation });
        }
        if !config.artifacts.contains(hash) {
            return Err(StoreError::NotInConfig { hash: *hash, generation: config.generation });
        }
        Ok(())
    }
}
