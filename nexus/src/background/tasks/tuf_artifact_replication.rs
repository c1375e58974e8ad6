//! `tuf_artifact_replication`: makes every in-service sled hold every
//! artifact of every unpruned repository, on each of its healthy M.2s.
//!
//! # One activation
//!
//! 1. Take the staged repositories handed over by uploads (and by staging
//!    recovery at start-up).
//! 2. Read the artifact config `{generation G, hashes}` from the database in
//!    one transaction, and the in-service sleds.
//! 3. PUT the config to every sled (a follow-up: every sled that may have
//!    changed, see below). A sled that answers 409
//!    `CONFIG_GENERATION` holds a newer generation: another Nexus is ahead of
//!    us. Stop, and report "superseded".
//! 4. LIST every sled (and read its inventory for its healthy M.2 count). A
//!    sled that lists a generation other than G is treated the same way.
//! 5. Build the inventory (hash → sled → copies; staged here or not). Drop a
//!    staged repository once each of its artifacts is on at least
//!    `min_sled_replication` sleds (or when it left the config, pruned);
//!    its staged files go once nothing else pins them.
//! 6. Plan ([`super::replication_plan`], a pure function) and execute: PUTs
//!    first, then copies (some copies read from a sled that a PUT or another
//!    copy is filling); a copy whose
//!    source's own request failed goes to an alternate source, or becomes a
//!    PUT ([`super::replication_plan::reroute`]). PUTs and copy requests
//!    draw on separate pools of permits (`max_concurrent_puts`,
//!    `max_concurrent_copy_requests`), so that PUTs, which hold theirs for
//!    a whole transfer, never starve the copy requests (answered at once).
//!    The plan sends a sled no more copies than it has free copy slots (the
//!    rest are deferred). A 503/429 with
//!    `Retry-After` is waited out, without holding a permit, and retried a
//!    bounded number of times; still busy after that is back-pressure, not
//!    failure: no back-off, and a follow-up asks again.
//!    Every request lands in the ring buffer with its full error chain.
//! 7. If copies are running on sleds (started now or earlier), a sled was
//!    busy, or a PUT made progress on a staged repository, activate again
//!    after `followup_delay` instead of waiting a period.
//!
//! # Follow-ups ask only sleds that may have changed
//!
//! A sled that an activation listed at generation G with no copies
//! running, and then sent no PUT or copy, is *settled*: nothing this Nexus
//! does can change what it holds. The follow-up that activation schedules
//! (and only it: a periodic or operator's activation asks every sled) goes
//! on from that listing while the generation is still G, for at most
//! [`SETTLED_MAX_AGE`]: it sends the sled no config, listing or inventory
//! request, but still plans for it and reads from it. On a rack of 1,000
//! sleds where a handful are still copying, a follow-up costs a handful of
//! control requests, not 3,000, and it does not wait for the answers of
//! sleds it has nothing to ask. What this can miss is bounded: another
//! Nexus's requests (harmless: at worst a copy the sled no longer needs,
//! which it answers at once), a sled restarted empty or an M.2 failed
//! (found by the next full activation, at most [`SETTLED_MAX_AGE`] later).
//! It cannot break the generation rules below: skipping a sled sends it
//! nothing, and what is sent still carries G.
//!
//! # Stragglers, slow sleds and Nexus as a fallback (issue #20)
//!
//! An activation ends when its last request has. One PUT to a slow sled
//! (which nothing has measured yet: a rack's first upload) would hold the
//! whole activation, and with it every follow-up, for as long as that
//! sled's link needs. So once at least half of the activation's other
//! PUTs have finished (not all: two PUTs to one slow sled would wait for
//! each other), a PUT that runs below [`STRAGGLER_FRACTION`] of their
//! median rate for [`STRAGGLER_WINDOWS`] seconds is abandoned. Like a busy answer
//! it is no failure of the (sled, artifact): no back-off, and a follow-up
//! has the sled copy it, at its own pace, from a sled that holds it.
//!
//! Each sled reports the best total rate of its copies
//! (`copy_bytes_per_sec`); this task remembers the last report of each
//! and calls sleds far below the median slow
//! ([`replication_plan::slow_sleds`]): the planner puts them last in every
//! chain and PUTs to them only when no other sled can take it.
//!
//! A copy of an artifact staged here carries this Nexus's internal API as
//! its `fallback`: it serves staged artifacts as a depot does. A copy behind
//! a slow tree head has no better source (every sled above it is behind the
//! head too); it moves here instead. The sled moves a copy here for speed
//! only when no sled source looks better, and one copy at a time (see the
//! sled agent's `store::copy`): a slow sled's own copies all look slow now
//! and then, and moved here they added most of a release to this Nexus's
//! egress.
//!
//! # Back-off
//!
//! A (sled, artifact) whose request failed, or whose copy the sled accepted
//! (202) and later reported failed (`copy_failures` in its listing), is not
//! asked for that artifact again until `backoff_base × 2^(failures−1)` has
//! passed, capped at `backoff_max`. The entry goes once the sled holds the
//! artifact on every healthy M.2, or the artifact or the sled leaves. So a
//! copy that can never succeed costs one request per back-off interval, not
//! one per follow-up, and it never counts as progress: follow-ups are driven
//! only by copies actually running and PUTs that succeeded. The back-off is
//! per Nexus (each instance learns failures from the same sled listings).
//!
//! # Why concurrent Nexus instances cannot hurt each other
//!
//! Every mutation a sled accepts is tied to a generation: a config is
//! accepted only if its generation is newer (or equal with the same set), and
//! PUT/copy requests only if their generation equals the sled's. Every change
//! to the set of live repositories bumps the generation in the database in
//! the same transaction. So:
//! - *Stale deleter.* Nexus A read config N; Nexus B recorded a repository
//!   (N+1) and pushed N+1 to the sleds. A's PUT of config N gets 409 and A
//!   stops: A can never make a sled delete what B's repository needs.
//! - *Late requests.* A's PUT and copy requests, planned at N, carry N and
//!   are refused by sleds at N+1: nothing is placed on the basis of a stale
//!   plan.
//! - *Lost artifacts.* A sled deletes an artifact only on accepting a newer
//!   config that lacks it, i.e. one read after the prune that removed it. An
//!   upload's bytes stay staged (pinned, surviving restarts) until at least
//!   `min_sled_replication` sleds hold them.
//! - *Two pushers of the same generation* send the same set: a no-op.

use super::replication_plan::{self, Fanout, Feed, Inventory, Limits, Plan, Request, SledState};
use super::repo_health;
use crate::app::staging::{self, StagedRepo, StagingArea};
use crate::background::driver::BackgroundTask;
use crate::db::datastore::{health_state_from_sql, health_state_to_sql};
use crate::db::model::Sled;
use crate::db::model::TufRepoWithArtifacts;
use crate::db::{DataStore, DataStoreError};
use common::api::external::ReplicationProgress;
use common::api::external::{RepoHealth, RepoHealthView};
use common::api::sled_agent::{
    ArtifactCopyFromDepotBody, ArtifactListResponse, CONFIG_GENERATION, CopyFailure, HASH_MISMATCH, M2State,
};
use common::bgtask::ActivationReason;
use common::bgtask::details::{
    BackoffStatus, LocalRepoStatus, PlanSummary, ReplicationCounters, ReplicationOutcome, RepoReplication,
    RequestOperation, RequestRecord, TufArtifactReplicationStatus,
};
use common::clients::sled_agent::{Client as SledClient, Error as SledError};
use common::{ArtifactConfig, ArtifactHash, Generation, error_chain};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

/// How long connecting to a sled may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a PUT or copy request has been under way before pipelined
/// copies read from its sled (see [`with_head_start`]).
const PIPELINE_HEAD_START: Duration = Duration::from_millis(100);

/// How long a follow-up may go on from what an earlier activation learned
/// of a settled sled instead of asking it. Nothing this Nexus does changes
/// such a sled, but a failed M.2 or a sled restarted empty does: a
/// periodic activation, or a follow-up this much later, finds that out.
const SETTLED_MAX_AGE: Duration = Duration::from_secs(60);

/// How many times a request refused with 503/429 is retried in one
/// activation, and the longest `Retry-After` honoured.
const BUSY_RETRIES: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ReplicationSettings {
    pub min_sled_replication: usize,
    /// Development racks with fewer sleds than `min_sled_replication` may
    /// release staged artifacts once every sled holds them.
    pub allow_fewer_sleds: bool,
    pub max_concurrent_requests: usize,
    /// PUTs at once, a pool of their own.
    pub max_concurrent_puts: usize,
    /// Copy requests at once, a pool of their own.
    pub max_concurrent_copy_requests: usize,
    pub ring_buffer_size: usize,
    pub followup_delay: Duration,
    pub fanout: Fanout,
    /// Back-off after failures of one (sled, artifact): base, doubled per
    /// further failure, at most max.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Bounds one control request (config, list, copy start).
    pub request_timeout: Duration,
    /// Bounds one artifact PUT, body included.
    pub put_timeout: Duration,
}

/// Replication progress per repository, as last seen by this Nexus; the
/// external API reads it.
pub type ProgressMap = Arc<Mutex<BTreeMap<Uuid, ReplicationProgress>>>;

pub struct ArtifactReplication {
    datastore: Arc<DataStore>,
    staging: Arc<StagingArea>,
    handoff: mpsc::Receiver<StagedRepo>,
    local_repos: Vec<StagedRepo>,
    settings: ReplicationSettings,
    /// Counts the follow-up timer's expiries; the driver watches it (see
    /// [`ArtifactReplication::followups`]).
    followups: watch::Sender<u64>,
    /// The count of `followups` the last activation saw: an activation
    /// (reason `Dependency`) that sees a higher one is the follow-up, which
    /// may go on from `settled`.
    followups_seen: u64,
    http: reqwest::Client,
    put_http: reqwest::Client,
    ring: VecDeque<RequestRecord>,
    lifetime: ReplicationCounters,
    progress: ProgressMap,
    backoff: BTreeMap<(Uuid, ArtifactHash), Backoff>,
    /// Each sled's last reported copy rate, bytes/s, for finding slow ones.
    copy_rates: BTreeMap<Uuid, u64>,
    nexus_id: Uuid,
    /// This Nexus's internal API, which serves what it has staged like a
    /// depot: the fallback of a copy of a staged artifact. Set once
    /// the API listens (unset if it listens on an unspecified address).
    depot_url: Arc<std::sync::OnceLock<String>>,
    /// Sleds the last activation left settled, which a follow-up need not
    /// ask again (see "Follow-ups ask only sleds that may have changed").
    settled: BTreeMap<Uuid, Settled>,
}

/// A sled listed at `generation` with no copies running and sent no PUT or
/// copy afterwards: only another Nexus or the sled itself can have changed
/// what it holds since.
struct Settled {
    listed: ArtifactListResponse,
    healthy_m2: usize,
    listed_at: Instant,
}

/// Failures of one (sled, artifact) and when to ask again.
struct Backoff {
    failures: u32,
    /// Failed copies the sled last reported, so a report counts once.
    sled_reported: u32,
    until: Instant,
    retry_after: chrono::DateTime<chrono::Utc>,
    last_error: String,
}

/// A sled as this activation sees it.
struct SledTarget {
    id: Uuid,
    client: SledClient,
    put_client: SledClient,
    depot_url: String,
}

/// What one request did, for the ring buffer and counters.
struct Record {
    /// When the request finished.
    time: chrono::DateTime<chrono::Utc>,
    sled_id: Uuid,
    operation: RequestOperation,
    hash: Option<ArtifactHash>,
    source_sled_id: Option<Uuid>,
    error: Option<String>,
    /// The sled refused because it holds another generation: not a failure
    /// of this (sled, artifact), so no back-off.
    generation_conflict: bool,
    /// The sled was still busy after the retries: back-pressure, so no
    /// back-off; the next activation asks again.
    busy: bool,
}

/// Why an activation stopped early.
enum Stop {
    Superseded { sled_id: Uuid, sled_generation: Generation },
    Database(DataStoreError),
}

impl ArtifactReplication {
    pub fn new(
        datastore: Arc<DataStore>,
        settings: ReplicationSettings,
        wiring: crate::background::ReplicationWiring,
    ) -> ArtifactReplication {
        // A sled that cannot be reached at all is found out quickly: its
        // requests must not hold the activation for the whole timeout.
        let client = |timeout: Duration| {
            reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(CONNECT_TIMEOUT.min(timeout))
                .build()
                .expect("a plain HTTP client builds")
        };
        ArtifactReplication {
            datastore,
            staging: wiring.staging,
            handoff: wiring.handoff,
            local_repos: wiring.recovered,
            http: client(settings.request_timeout),
            put_http: client(settings.put_timeout),
            settings,
            followups: watch::Sender::new(0),
            ring: VecDeque::new(),
            lifetime: ReplicationCounters::default(),
            progress: wiring.progress,
            backoff: BTreeMap::new(),
            copy_rates: BTreeMap::new(),
            nexus_id: wiring.nexus_id,
            depot_url: wiring.depot_url,
            settled: BTreeMap::new(),
            followups_seen: 0,
        }
    }

    /// What the driver watches for follow-ups, as a dependency: they come
    /// with reason `Dependency`, which tells them from an operator's
    /// activation.
    pub fn followups(&self) -> watch::Receiver<u64> {
        self.followups.subscribe()
    }

    async fn run(&mut self, log: &slog::Logger, reason: ActivationReason) -> TufArtifactReplicationStatus {
        // The timer activates through a dependency, so an operator's
        // activation is never taken for a follow-up, even one that comes
        // with the timer's (the driver runs one activation for both, as
        // `Explicit`), nor one after a follow-up the task's switch skipped.
        // Another dependency (the pruner) that fires with the timer's moves
        // the generation, which the settled listings then no longer match.
        let followups = *self.followups.borrow();
        let followup = followups != self.followups_seen && reason == ActivationReason::Dependency;
        self.followups_seen = followups;
        while let Ok(repo) = self.handoff.try_recv() {
            self.local_repos.push(repo);
        }
        let mut counters = ReplicationCounters::default();
        let mut status = TufArtifactReplicationStatus {
            generation: Generation::new(0),
            outcome: ReplicationOutcome::Completed,
            sleds_in_service: 0,
            last_run: ReplicationCounters::default(),
            lifetime: ReplicationCounters::default(),
            local_repos: Vec::new(),
            plan: PlanSummary::default(),
            repos: Vec::new(),
            ring: Vec::new(),
            backoff: Vec::new(),
            copies_in_flight: 0,
            slow_sleds: Vec::new(),
            sleds_known: 0,
            followup_scheduled: false,
        };
        let mut records = Vec::new();
        match self.replicate(log, followup, &mut status, &mut records).await {
            Ok(()) => {}
            Err(Stop::Superseded { sled_id, sled_generation }) => {
                slog::info!(log, "superseded by a newer generation"; "sled_id" => %sled_id, "generation" => %sled_generation);
                status.outcome = ReplicationOutcome::Superseded { sled_id, sled_generation };
            }
            Err(Stop::Database(error)) => {
                let message = error_chain(&error);
                slog::warn!(log, "replication could not read the database"; "error" => &message);
                status.outcome = ReplicationOutcome::Error { message };
            }
        }
        for record in records {
            count(&mut counters, &record);
            self.ring.push_back(RequestRecord {
                time: record.time,
                sled_id: record.sled_id,
                operation: record.operation,
                hash: record.hash,
                source_sled_id: record.source_sled_id,
                error: record.error,
            });
        }
        while self.ring.len() > self.settings.ring_buffer_size {
            self.ring.pop_front();
        }
        // Set by the plan, not by a record.
        counters.skipped_backoff = status.last_run.skipped_backoff;
        counters.deferred = status.plan.deferred as u64;
        self.lifetime.add(&counters);
        status.last_run = counters;
        status.lifetime = self.lifetime.clone();
        status.ring = self.ring.iter().cloned().collect();
        status.local_repos = self
            .local_repos
            .iter()
            .map(|repo| LocalRepoStatus {
                repo_id: repo.repo_id,
                system_version: repo.system_version.clone(),
                artifacts: repo.artifacts.len(),
                bytes: repo.artifacts.iter().map(|a| a.size).sum(),
            })
            .collect();
        status.backoff = self
            .backoff
            .iter()
            .map(|((sled_id, hash), backoff)| BackoffStatus {
                sled_id: *sled_id,
                hash: *hash,
                failures: backoff.failures,
                retry_after: backoff.retry_after,
                last_error: backoff.last_error.clone(),
            })
            .collect();
        // Progress, not mere activity: copies running on sleds will finish
        // and need a look; a successful PUT lets staged repositories go.
        // A busy sled is working too: it is asked again once it had time.
        let work_remains = status.copies_in_flight > 0
            || status.last_run.busy > 0
            || (status.last_run.put_ok > 0 && !self.local_repos.is_empty());
        if work_remains && status.outcome == ReplicationOutcome::Completed {
            let followups = self.followups.clone();
            let delay = self.settings.followup_delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                followups.send_modify(|count| *count += 1);
            });
            status.followup_scheduled = true;
        }
        status
    }

    async fn replicate(
        &mut self,
        log: &slog::Logger,
        followup: bool,
        status: &mut TufArtifactReplicationStatus,
        records: &mut Vec<Record>,
    ) -> Result<(), Stop> {
        let config = self.datastore.tuf_artifact_config().await.map_err(Stop::Database)?;
        let sleds = self.datastore.sled_list().await.map_err(Stop::Database)?;
        let repos = self.datastore.tuf_repo_list_unpruned_with_artifacts().await.map_err(Stop::Database)?;
        status.generation = config.generation;
        status.sleds_in_service = sleds.len();
        let owned: Vec<SledTarget> = sleds.iter().map(|sled| self.target(sled)).collect();
        let in_service = sleds.iter().map(|sled| sled.id).collect();
        let known = known_sleds(
            std::mem::take(&mut self.settled),
            followup,
            config.generation,
            &in_service,
            Instant::now(),
        );
        status.sleds_known = known.len();
        let targets: Vec<&SledTarget> = owned.iter().filter(|sled| !known.contains_key(&sled.id)).collect();
        // A crash point only once there is something to replicate (the
        // activation at start-up has nothing).
        fail::fail_point!("nexus::replication::after_config_read", !config.artifacts.is_empty(), |_| {
            std::process::abort()
        });
        // Tests widen the window between reading the config and pushing it,
        // to make this Nexus the stale one of a race on purpose.
        crate::failpoints::delay("nexus::replication::before_config_push", self.nexus_id).await;

        // 3. Push the config.
        let pushed = self.bounded(targets.iter().map(|&sled| put_config(sled, &config)).collect()).await;
        let mut reachable = Vec::new();
        for (&sled, outcome) in targets.iter().zip(pushed) {
            match outcome {
                Ok(()) => {
                    records.push(Record::ok(sled.id, RequestOperation::PutConfig));
                    reachable.push(sled);
                }
                Err(PutConfigError::Superseded(message)) => {
                    records.push(Record::failed(sled.id, RequestOperation::PutConfig, message));
                    let sled_generation = sled_generation(sled).await.unwrap_or(config.generation.next());
                    return Err(Stop::Superseded { sled_id: sled.id, sled_generation });
                }
                Err(PutConfigError::Other(message)) => {
                    records.push(Record::failed(sled.id, RequestOperation::PutConfig, message));
                }
            }
        }

        // 4. List what each reachable sled holds.
        let listed = self.bounded(reachable.iter().map(|&sled| list(sled)).collect()).await;
        let mut inventory = Inventory::default();
        let mut listed_sleds = Vec::new();
        let mut copy_failures = Vec::new();
        let mut settled = BTreeMap::new();
        let asked = reachable.iter().zip(listed).map(|(&sled, outcome)| (sled, outcome, Instant::now()));
        let remembered = owned.iter().filter_map(|sled| {
            let known = known.get(&sled.id)?;
            Some((sled, Ok((known.listed.clone(), known.healthy_m2)), known.listed_at))
        });
        for (sled, outcome, listed_at) in asked.chain(remembered) {
            match outcome {
                Ok((listed, _)) if listed.generation != config.generation => {
                    records.push(Record::failed(
                        sled.id,
                        RequestOperation::List,
                        format!(
                            "sled lists generation {}, this activation works at {}",
                            listed.generation, config.generation
                        ),
                    ));
                    return Err(Stop::Superseded { sled_id: sled.id, sled_generation: listed.generation });
                }
                Ok((listed, healthy_m2)) => {
                    if !known.contains_key(&sled.id) {
                        records.push(Record::ok(sled.id, RequestOperation::List));
                    }
                    if listed.copies_in_flight.is_empty() {
                        let listed = listed.clone();
                        settled.insert(sled.id, Settled { listed, healthy_m2, listed_at });
                    }
                    // Queued copies take no slot of their own until they
                    // start: the sled takes running and queued ones alike.
                    let copy_slots = listed.max_concurrent_copies.map_or(usize::MAX, |limit| {
                        (limit + listed.max_queued_copies.unwrap_or(0))
                            .saturating_sub(listed.copies_in_flight.len())
                    });
                    if let Some(rate) = listed.copy_bytes_per_sec {
                        self.copy_rates.insert(sled.id, rate);
                    }
                    inventory.sleds.push(SledState { id: sled.id, healthy_m2, copy_slots, slow: false });
                    for (hash, copies) in listed.list {
                        inventory.artifacts.entry(hash).or_default().copies.insert(sled.id, copies);
                    }
                    for hash in listed.copies_in_flight {
                        inventory.artifacts.entry(hash).or_default().incoming.insert(sled.id);
                    }
                    copy_failures
                        .extend(listed.copy_failures.into_iter().map(|(hash, f)| (sled.id, hash, f)));
                    listed_sleds.push(sled);
                }
                Err(message) => records.push(Record::failed(sled.id, RequestOperation::List, message)),
            }
        }

        // 5. Inventory, back-off, and the staged repositories it lets go.
        self.copy_rates.retain(|id, _| sleds.iter().any(|sled| sled.id == *id));
        let slow = replication_plan::slow_sleds(&self.copy_rates);
        for sled in &mut inventory.sleds {
            sled.slow = slow.contains(&sled.id);
        }
        status.slow_sleds = slow.into_iter().collect();
        for hash in &config.artifacts {
            inventory.artifacts.entry(*hash).or_default();
        }
        inventory.artifacts.retain(|hash, _| config.artifacts.contains(hash));
        // A staged file deleted as corrupt (see `execute_one`) is no source.
        for repo in &self.local_repos {
            for artifact in &repo.artifacts {
                if let Some(state) = inventory.artifacts.get_mut(&artifact.hash) {
                    state.local |= self.staging.artifact_path(&artifact.hash).is_file();
                }
            }
        }
        for (sled_id, hash, failure) in copy_failures {
            if self.observe_sled_copy_failure(sled_id, hash, &failure) {
                records.push(Record {
                    time: failure.time_last_failed,
                    sled_id,
                    operation: RequestOperation::CopyFailedOnSled,
                    hash: Some(hash),
                    source_sled_id: None,
                    error: Some(format!(
                        "{} (from {}; {} consecutive failures)",
                        failure.last_error, failure.last_source, failure.failures
                    )),
                    generation_conflict: false,
                    busy: false,
                });
            }
        }
        self.forget_settled_backoff(&inventory);
        let now = Instant::now();
        for ((sled_id, hash), backoff) in &self.backoff {
            if backoff.until > now
                && let Some(state) = inventory.artifacts.get_mut(hash)
            {
                state.backing_off.insert(*sled_id);
            }
        }
        self.release_replicated(log, &config, &inventory, sleds.len());
        self.publish_progress(&config, &inventory, &repos, sleds.len(), status);
        self.record_health(log, &config, &inventory, &repos, sleds.len()).await;

        // 6. Plan and execute.
        let limits =
            Limits { min_sled_replication: self.settings.min_sled_replication, fanout: self.settings.fanout };
        let plan = replication_plan::plan(&inventory, &mut rand::rng(), limits);
        status.plan = summarize(&plan);
        let by_id: BTreeMap<Uuid, &SledTarget> = listed_sleds.iter().map(|&sled| (sled.id, sled)).collect();
        crate::failpoints::delay("nexus::replication::before_execute", self.nexus_id).await;
        let results = self.execute(log, &plan.requests, &by_id, config.generation).await;
        for record in &results {
            if matches!(record.operation, RequestOperation::Put | RequestOperation::Copy) {
                settled.remove(&record.sled_id);
            }
        }
        self.settled = settled;
        let copy_results: Vec<&Record> =
            results.iter().filter(|record| record.operation == RequestOperation::Copy).collect();
        let mut in_flight: BTreeSet<(Uuid, ArtifactHash)> = inventory
            .artifacts
            .iter()
            .flat_map(|(hash, state)| state.incoming.iter().map(move |sled| (*sled, *hash)))
            .collect();
        in_flight.extend(
            copy_results.iter().filter(|r| r.error.is_none()).filter_map(|r| Some((r.sled_id, r.hash?))),
        );
        status.copies_in_flight = in_flight.len();
        records.extend(results);
        for record in records.iter().filter(|r| r.error.is_some() && !r.generation_conflict && !r.busy) {
            if let (Some(hash), RequestOperation::Put | RequestOperation::Copy) =
                (record.hash, record.operation)
            {
                let error = record.error.clone().unwrap_or_default();
                self.note_failure(record.sled_id, hash, 1, error);
            }
        }
        status.last_run.skipped_backoff = plan.skipped_backoff as u64;
        Ok(())
    }

    /// Records what this Nexus holds staged, then judges and records every
    /// unpruned repository's health ([`super::repo_health`]), logging each
    /// change (a warning when it got worse). Database failures here are
    /// logged: health is a report, replication goes on without it.
    async fn record_health(
        &self,
        log: &slog::Logger,
        config: &ArtifactConfig,
        inventory: &Inventory,
        repos: &[TufRepoWithArtifacts],
        sleds_in_service: usize,
    ) {
        let staged_here: BTreeSet<ArtifactHash> = match self.staging.list() {
            Ok(hashes) => hashes.into_iter().collect(),
            Err(error) => {
                slog::warn!(log, "listing the staging area failed"; "error" => %error);
                return;
            }
        };
        if let Err(error) = self.datastore.staged_artifacts_replace(self.nexus_id, &staged_here).await {
            slog::warn!(log, "recording staged artifacts failed"; "error" => error_chain(&error));
        }
        let mut staged = self.datastore.staged_artifacts_all().await.unwrap_or_else(|error| {
            slog::warn!(log, "reading other Nexus instances' staged artifacts failed"; "error" => error_chain(&error));
            BTreeMap::new()
        });
        for hash in staged_here {
            let holders = staged.entry(hash).or_default();
            if !holders.contains(&self.nexus_id) {
                holders.push(self.nexus_id);
            }
        }
        let listed: BTreeMap<Uuid, usize> =
            inventory.sleds.iter().map(|sled| (sled.id, sled.healthy_m2)).collect();
        let copies: BTreeMap<ArtifactHash, BTreeMap<Uuid, usize>> =
            inventory.artifacts.iter().map(|(hash, state)| (*hash, state.copies.clone())).collect();
        let observed = repo_health::Observed {
            sleds_in_service,
            listed: &listed,
            copies: &copies,
            staged: &staged,
            min_sled_replication: self.settings.min_sled_replication,
        };
        let now = chrono::Utc::now();
        let health: Vec<(Uuid, RepoHealthView)> = repos
            .iter()
            .map(|recorded| {
                let (state, artifacts) = repo_health::assess(recorded, &observed);
                let view = RepoHealthView {
                    state,
                    generation: config.generation,
                    time_checked: now,
                    checked_by: format!("nexus {}", self.nexus_id),
                    sleds_in_service,
                    artifacts,
                };
                (recorded.repo.id, view)
            })
            .collect();
        let before = match self.datastore.repo_health_record(&health).await {
            Ok(before) => before,
            Err(error) => {
                slog::warn!(log, "recording repository health failed"; "error" => error_chain(&error));
                return;
            }
        };
        for ((repo_id, view), recorded) in health.iter().zip(repos) {
            let previous = before.get(repo_id).and_then(|state| health_state_from_sql(state));
            if previous == Some(view.state) {
                continue;
            }
            let (from, to) =
                (previous.map_or("unknown", health_state_to_sql), health_state_to_sql(view.state));
            let version = &recorded.repo.system_version;
            if previous.is_some_and(|previous| view.state > previous) || view.state >= RepoHealth::Degraded {
                slog::warn!(log, "repository health got worse"; "system_version" => version, "from" => from, "to" => to);
            } else {
                slog::info!(log, "repository health changed"; "system_version" => version, "from" => from, "to" => to);
            }
        }
    }

    /// Takes in a copy failure a sled reported. Returns whether it is new.
    fn observe_sled_copy_failure(
        &mut self,
        sled_id: Uuid,
        hash: ArtifactHash,
        failure: &CopyFailure,
    ) -> bool {
        let seen = self.backoff.get(&(sled_id, hash)).map_or(0, |backoff| backoff.sled_reported);
        // A count lower than the last one seen means the sled restarted.
        let new = if failure.failures >= seen { failure.failures - seen } else { failure.failures };
        if new > 0 {
            self.note_failure(sled_id, hash, new, failure.last_error.clone());
        }
        if let Some(backoff) = self.backoff.get_mut(&(sled_id, hash)) {
            backoff.sled_reported = failure.failures;
        }
        new > 0
    }

    fn note_failure(&mut self, sled_id: Uuid, hash: ArtifactHash, count: u32, last_error: String) {
        let backoff = self.backoff.entry((sled_id, hash)).or_insert_with(|| Backoff {
            failures: 0,
            sled_reported: 0,
            until: Instant::now(),
            retry_after: chrono::Utc::now(),
            last_error: String::new(),
        });
        backoff.failures = backoff.failures.saturating_add(count);
        let delay = backoff_delay(self.settings.backoff_base, self.settings.backoff_max, backoff.failures);
        backoff.until = Instant::now() + delay;
        backoff.retry_after = chrono::Utc::now() + delay;
        backoff.last_error = last_error;
    }

    /// Drops back-off entries whose sled now holds the artifact on every
    /// healthy M.2, or whose sled or artifact is no longer part of this
    /// activation's picture. Bounds the map by sleds × artifacts.
    fn forget_settled_backoff(&mut self, inventory: &Inventory) {
        let healthy: BTreeMap<Uuid, usize> =
            inventory.sleds.iter().map(|sled| (sled.id, sled.healthy_m2)).collect();
        self.backoff.retain(|(sled_id, hash), _| {
            let Some(&wanted) = healthy.get(sled_id) else { return false };
            let Some(state) = inventory.artifacts.get(hash) else { return false };
            state.copies.get(sled_id).copied().unwrap_or(0) < wanted
        });
    }

    fn target(&self, sled: &Sled) -> SledTarget {
        let host = match sled.ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => sled.ip.clone(),
        };
        let base = format!("http://{host}:{}", sled.port);
        SledTarget {
            id: sled.id,
            client: SledClient::new_with_client(&base, self.http.clone()),
            put_client: SledClient::new_with_client(&base, self.put_http.clone()),
            depot_url: format!("http://{host}:{}", sled.repo_depot_port),
        }
    }

    /// Runs the requests `max_concurrent_requests` at a time; results in
    /// order. (The futures are built before streaming them: a lazily mapping
    /// closure here defeats the compiler's `Send` proof.)
    async fn bounded<T, F: Future<Output = T>>(&self, requests: Vec<F>) -> Vec<T> {
        futures::stream::iter(requests).buffered(self.settings.max_concurrent_requests).collect().await
    }

    /// Runs the plan, at most `max_concurrent_puts` PUTs and
    /// `max_concurrent_copy_requests` copy requests at a time, in the
    /// order the plan's dependencies allow (see the planner's module doc): a
    /// `Pipelined` copy starts once the request filling its source has
    /// been under way for [`PIPELINE_HEAD_START`] (or has succeeded), an
    /// `AfterPut` copy once every PUT has
    /// finished; a copy whose source's request failed is rerouted
    /// ([`replication_plan::reroute`]), or not sent if it cannot be.
    /// Records come back in plan order.
    async fn execute(
        &self,
        log: &slog::Logger,
        requests: &[Request],
        sleds: &BTreeMap<Uuid, &SledTarget>,
        generation: Generation,
    ) -> Vec<Record> {
        let progress: Vec<watch::Sender<Progress>> =
            requests.iter().map(|_| watch::Sender::new(Progress::Pending)).collect();
        let fills = fill_order(requests);
        let permits = RequestPermits {
            puts: tokio::sync::Semaphore::new(self.settings.max_concurrent_puts),
            copies: tokio::sync::Semaphore::new(self.settings.max_concurrent_copy_requests),
            tracker: PutTracker::default(),
        };
        let puts: Vec<usize> = requests
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Request::Put { .. }))
            .map(|(i, _)| i)
            .collect();
        let runs = requests.iter().enumerate().map(|(index, request)| {
            let (progress, fills, permits, puts) = (&progress, &fills, &permits, &puts);
            async move {
                let waited = match request {
                    // Not the filler's answer: a slow sled's answers wait in
                    // its link's queues, and every hop's answer in a loaded
                    // one's (see `with_head_start`).
                    Request::Copy { feed: Feed::Pipelined, .. } => match fills[index] {
                        Some(filler) => wait_for(&progress[filler], Progress::Started).await,
                        None => true,
                    },
                    Request::Copy { feed: Feed::AfterPut, .. } => {
                        let mut all = true;
                        for &put in puts {
                            all &= wait_for(&progress[put], Progress::Done).await;
                        }
                        all && fills[index].is_none_or(|filler| *progress[filler].borrow() == Progress::Done)
                    }
                    _ => true,
                };
                // A copy whose source will not be filled goes to its next
                // alternate, or becomes a PUT, rather than waiting for the
                // next activation.
                let rerouted = if waited { None } else { replication_plan::reroute(requests, request) };
                let request = match (&rerouted, waited) {
                    (Some(rerouted), _) => rerouted,
                    (None, true) => request,
                    (None, false) => {
                        progress[index].send_replace(Progress::Failed);
                        return Record::skipped(request);
                    }
                };
                let record =
                    self.execute_one(log, request, sleds, generation, &progress[index], permits).await;
                progress[index].send_replace(if record.error.is_none() {
                    Progress::Done
                } else {
                    Progress::Failed
                });
                record
            }
        });
        futures::future::join_all(runs).await
    }

    async fn execute_one(
        &self,
        log: &slog::Logger,
        request: &Request,
        sleds: &BTreeMap<Uuid, &SledTarget>,
        generation: Generation,
        progress: &watch::Sender<Progress>,
        permits: &RequestPermits,
    ) -> Record {
        let (sled_id, operation, hash, source_sled_id, outcome) = match request {
            Request::Put { hash, sled } => {
                let target = sleds[sled];
                let path = self.staging.artifact_path(hash);
                let wrong_bytes = std::sync::atomic::AtomicBool::new(false);
                let (tracked, sent) = permits.tracker.register();
                let put = with_busy_retries(&permits.puts, || async {
                    permits.tracker.start(tracked);
                    let opened = async {
                        let file = tokio::fs::File::open(&path).await?;
                        let length = file.metadata().await?.len();
                        Ok::<_, std::io::Error>((file, length))
                    };
                    let (file, length) = opened
                        .await
                        .map_err(|error| Attempt::other(format!("opening staged {path}: {error}")))?;
                    let body = known_length_body(file, length, sent.clone());
                    let put = target.put_client.artifact_put(hash, generation.get(), body);
                    let outcome = with_head_start(progress, put).await;
                    if let Err(SledError::ErrorResponse(response)) = &outcome
                        && response.error_code.as_deref() == Some(HASH_MISMATCH)
                    {
                        wrong_bytes.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    outcome.map(|_| ()).map_err(Attempt::from)
                });
                let outcome = tokio::select! {
                    outcome = put => outcome,
                    message = permits.tracker.straggler(tracked) => Err(Attempt::Straggler { message }),
                };
                permits.tracker.finish(tracked);
                if wrong_bytes.into_inner() {
                    self.reverify_staged(log, hash).await;
                }
                fail::fail_point!("nexus::replication::after_a_put", outcome.is_ok(), |_| {
                    std::process::abort()
                });
                (*sled, RequestOperation::Put, *hash, None, outcome)
            }
            Request::Copy { hash, target, source, alternates, .. } => {
                // Staged here, the artifact can always be read from this
                // Nexus, as the fallback: it costs Nexus's link only when no
                // sled serves it (a slow sled that heads the tree).
                let fallback = self.depot_url.get().filter(|_| self.staging.artifact_path(hash).is_file());
                let body = ArtifactCopyFromDepotBody {
                    depot_base_url: sleds[source].depot_url.clone(),
                    alternates: alternates
                        .iter()
                        .filter_map(|sled| Some(sleds.get(sled)?.depot_url.clone()))
                        .collect(),
                    fallback: fallback.cloned(),
                };
                let client = &sleds[target].client;
                let outcome = with_busy_retries(&permits.copies, || async {
                    with_head_start(progress, client.artifact_copy_from_depot(hash, generation.get(), &body))
                        .await
                        .map(|_| ())
                        .map_err(Attempt::from)
                })
                .await;
                (*target, RequestOperation::Copy, *hash, Some(*source), outcome)
            }
        };
        let (error, generation_conflict, busy) = match outcome {
            Ok(()) => (None, false, false),
            Err(Attempt::Final { message, generation_conflict }) => {
                (Some(message), generation_conflict, false)
            }
            Err(Attempt::Busy { message, .. }) => {
                (Some(format!("{message} (still busy after {BUSY_RETRIES} retries)")), false, true)
            }
            // Like busy, no failure of the (sled, artifact): the sled is
            // slow, and a copy will do at its own pace.
            Err(Attempt::Straggler { message }) => (Some(message), false, true),
        };
        Record {
            time: chrono::Utc::now(),
            sled_id,
            operation,
            hash: Some(hash),
            source_sled_id,
            error,
            generation_conflict,
            busy,
        }
    }

    /// A sled found the bytes of our staged `hash` wrong: re-hash the staged
    /// file now. A corrupt one is deleted (pins or not: its bytes are of no
    /// use), so that the planner stops PUTting it and health tells the truth
    /// (staged nowhere: degraded or lost until someone uploads it again).
    async fn reverify_staged(&self, log: &slog::Logger, hash: &ArtifactHash) {
        let path = self.staging.artifact_path(hash);
        match staging::check_staged(&self.staging, hash, log).await {
            staging::StagedCheck::Corrupt { inode } => match self.staging.remove_corrupt(hash, inode) {
                Ok(removed) => {
                    slog::error!(log, "a sled found a staged artifact corrupt; deleted it"; "path" => %path,
                        "removed" => removed)
                }
                Err(error) => {
                    slog::error!(log, "deleting a corrupt staged artifact failed"; "path" => %path,
                        "error" => %error)
                }
            },
            staging::StagedCheck::Intact => {
                slog::warn!(log, "a sled found a staged artifact wrong, but it re-hashes right"; "path" => %path)
            }
            staging::StagedCheck::Missing => {}
            staging::StagedCheck::Unreadable(error) => {
                slog::error!(log, "re-verifying a staged artifact failed; keeping it"; "path" => %path,
                    "error" => %error)
            }
        }
    }

    /// Lets go of staged repositories that enough sleds hold, or that left
    /// the config (pruned).
    fn release_replicated(
        &mut self,
        log: &slog::Logger,
        config: &ArtifactConfig,
        inventory: &Inventory,
        sled_count: usize,
    ) {
        let needed = if self.settings.allow_fewer_sleds {
            self.settings.min_sled_replication.min(sled_count).max(1)
        } else {
            self.settings.min_sled_replication
        };
        let (done, kept): (Vec<StagedRepo>, Vec<StagedRepo>) =
            std::mem::take(&mut self.local_repos).into_iter().partition(|repo| {
                repo.artifacts.iter().all(|artifact| {
                    !config.artifacts.contains(&artifact.hash)
                        || inventory
                            .artifacts
                            .get(&artifact.hash)
                            .is_some_and(|state| state.copies.values().filter(|&&n| n > 0).count() >= needed)
                })
            });
        self.local_repos = kept;
        for repo in done {
            let hashes: Vec<ArtifactHash> = repo.artifacts.iter().map(|artifact| artifact.hash).collect();
            drop(repo.artifacts);
            let mut removed = 0;
            for hash in hashes {
                match self.staging.remove_if_unpinned(&hash) {
                    Ok(deleted) => removed += usize::from(deleted),
                    Err(error) => {
                        slog::warn!(log, "removing a staged artifact failed"; "hash" => %hash, "error" => %error)
                    }
                }
            }
            slog::info!(log, "released staged repository"; "system_version" => &repo.system_version, "files_removed" => removed);
        }
    }

    fn publish_progress(
        &self,
        config: &ArtifactConfig,
        inventory: &Inventory,
        repos: &[crate::db::model::TufRepoWithArtifacts],
        sled_count: usize,
        status: &mut TufArtifactReplicationStatus,
    ) {
        let healthy: BTreeMap<Uuid, usize> =
            inventory.sleds.iter().map(|sled| (sled.id, sled.healthy_m2)).collect();
        let complete_on = |sled: &Uuid, hash: &ArtifactHash| {
            let wanted = healthy[sled];
            wanted > 0
                && inventory
                    .artifacts
                    .get(hash)
                    .and_then(|state| state.copies.get(sled))
                    .is_some_and(|&n| n >= wanted)
        };
        let now = chrono::Utc::now();
        let mut progress = BTreeMap::new();
        for recorded in repos {
            let sleds_complete = healthy
                .keys()
                .filter(|sled| {
                    recorded.artifacts.iter().all(|artifact| complete_on(sled, &artifact.sha256.0))
                })
                .count();
            status.repos.push(RepoReplication {
                repo_id: recorded.repo.id,
                system_version: recorded.repo.system_version.clone(),
                sleds_complete,
                sleds_in_service: sled_count,
            });
            progress.insert(
                recorded.repo.id,
                ReplicationProgress {
                    sleds_complete,
                    sleds_in_service: sled_count,
                    generation: config.generation,
                    time_checked: now,
                },
            );
        }
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = progress;
    }
}

impl BackgroundTask for ArtifactReplication {
    fn activate<'a>(
        &'a mut self,
        log: &'a slog::Logger,
        reason: ActivationReason,
    ) -> BoxFuture<'a, serde_json::Value> {
        Box::pin(
            async move { serde_json::to_value(self.run(log, reason).await).expect("statuses serialize") },
        )
    }
}

/// Where one request of a plan is.
/// In order: a request only moves forward, and a waiter's goal is reached
/// by any later state (`Failed` last, so waiting for `Done` ends on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Progress {
    /// Not sent yet, or sent for less than [`PIPELINE_HEAD_START`].
    Pending,
    /// Under way far enough for pipelined followers to read from its sled.
    Started,
    Done,
    Failed,
}

/// Runs `request`, a PUT or copy request that fills a sled, and marks it
/// started for pipelined followers once it has been under way for
/// [`PIPELINE_HEAD_START`], without waiting for the sled's answer: on a
/// loaded link the answer waits out that link's queue (up to 400 ms on the
/// bench's links, each way), and a tree waiting for each hop's answer
/// before asking the next paid that once per level (0.8 s a hop, measured).
/// A follower asked early waits at its source's depot for the write to
/// begin (`ARRIVAL_WAIT` there), and moves to an alternate if it never does.
async fn with_head_start<T>(progress: &watch::Sender<Progress>, request: impl Future<Output = T>) -> T {
    let head_start = async {
        tokio::time::sleep(PIPELINE_HEAD_START).await;
        progress.send_if_modified(|state| advance(state, Progress::Started));
        std::future::pending::<()>().await
    };
    // Answered within the head start, the request is done or failed:
    // followers learn which from that.
    tokio::select! {
        outcome = request => outcome,
        () = head_start => unreachable!("pending forever"),
    }
}

/// Moves `state` on to `to` if it is not there or beyond yet; whether it
/// moved.
fn advance(state: &mut Progress, to: Progress) -> bool {
    let moves = *state < to;
    if moves {
        *state = to;
    }
    moves
}

/// Waits until `progress` reaches `goal` (or beyond); false if it failed.
async fn wait_for(progress: &watch::Sender<Progress>, goal: Progress) -> bool {
    let mut receiver = progress.subscribe();
    let reached = receiver.wait_for(|state| *state >= goal).await;
    reached.is_ok_and(|state| *state != Progress::Failed)
}

/// For each copy, the index of the earlier request that fills its source
/// with that artifact in this round, if any.
fn fill_order(requests: &[Request]) -> Vec<Option<usize>> {
    let mut filled_by: BTreeMap<(ArtifactHash, Uuid), usize> = BTreeMap::new();
    requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let (hash, target, source) = match request {
                Request::Put { hash, sled } => (*hash, *sled, None),
                Request::Copy { hash, target, source, .. } => (*hash, *target, Some(*source)),
            };
            let filler = source.and_then(|source| filled_by.get(&(hash, source)).copied());
            filled_by.insert((hash, target), index);
            filler
        })
        .collect()
}

impl Record {
    /// A copy not sent because the request filling its source failed.
    fn skipped(request: &Request) -> Record {
        let Request::Copy { hash, target, source, .. } = request else {
            unreachable!("only copies wait on another request")
        };
        Record {
            hash: Some(*hash),
            source_sled_id: Some(*source),
            ..Record::failed(
                *target,
                RequestOperation::Copy,
                format!("not sent: the request filling sled {source} failed"),
            )
        }
    }

    fn ok(sled_id: Uuid, operation: RequestOperation) -> Record {
        Record {
            time: chrono::Utc::now(),
            sled_id,
            operation,
            hash: None,
            source_sled_id: None,
            error: None,
            generation_conflict: false,
            busy: false,
        }
    }

    fn failed(sled_id: Uuid, operation: RequestOperation, error: String) -> Record {
        Record { error: Some(error), ..Record::ok(sled_id, operation) }
    }
}

fn summarize(plan: &Plan) -> PlanSummary {
    let count = |wanted: fn(&Request) -> bool| plan.requests.iter().filter(|r| wanted(r)).count();
    PlanSummary {
        puts: count(|r| matches!(r, Request::Put { .. })),
        copies: count(|r| matches!(r, Request::Copy { recopy: false, .. })),
        recopies: count(|r| matches!(r, Request::Copy { recopy: true, .. })),
        unplaceable: plan.unplaceable.clone(),
        deferred: plan.deferred,
    }
}

/// `base × 2^(failures−1)`, at most `max`.
fn backoff_delay(base: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    base.checked_mul(1 << doublings).unwrap_or(max).min(max)
}

fn count(counters: &mut ReplicationCounters, record: &Record) {
    let ok = record.error.is_none();
    counters.busy += u64::from(record.busy);
    let (good, bad) = match record.operation {
        RequestOperation::PutConfig => (&mut counters.put_config_ok, &mut counters.put_config_err),
        RequestOperation::List => (&mut counters.list_ok, &mut counters.list_err),
        RequestOperation::Put => (&mut counters.put_ok, &mut counters.put_err),
        RequestOperation::Copy => (&mut counters.copy_ok, &mut counters.copy_err),
        RequestOperation::CopyFailedOnSled => {
            counters.copy_failed_on_sled += 1;
            return;
        }
    };
    *if ok { good } else { bad } += 1;
}

enum PutConfigError {
    Superseded(String),
    Other(String),
}

async fn put_config(sled: &SledTarget, config: &ArtifactConfig) -> Result<(), PutConfigError> {
    match sled.client.artifact_config_put(config).await {
        Ok(_) => Ok(()),
        Err(SledError::ErrorResponse(response))
            if response.status().as_u16() == 409
                && response.error_code.as_deref() == Some(CONFIG_GENERATION) =>
        {
            Err(PutConfigError::Superseded(response.into_inner().message))
        }
        Err(error) => Err(PutConfigError::Other(describe(error))),
    }
}

/// The generation a sled lists, what it lists, and its healthy M.2 count.
async fn list(sled: &SledTarget) -> Result<(ArtifactListResponse, usize), String> {
    let listed = sled.client.artifact_list().await.map_err(describe)?.into_inner();
    let inventory = sled.client.inventory().await.map_err(describe)?.into_inner();
    let healthy = inventory.m2.iter().filter(|m2| m2.state == M2State::Healthy).count();
    Ok((listed, healthy))
}

/// The settled sleds a follow-up at `generation` may go on from without
/// asking them: still in service, and listed at most [`SETTLED_MAX_AGE`]
/// ago. Any other activation asks every sled.
fn known_sleds(
    settled: BTreeMap<Uuid, Settled>,
    followup: bool,
    generation: Generation,
    in_service: &BTreeSet<Uuid>,
    now: Instant,
) -> BTreeMap<Uuid, Settled> {
    if !followup {
        return BTreeMap::new();
    }
    settled
        .into_iter()
        .filter(|(id, known)| {
            known.listed.generation == generation
                && now.saturating_duration_since(known.listed_at) < SETTLED_MAX_AGE
                && in_service.contains(id)
        })
        .collect()
}

async fn sled_generation(sled: &SledTarget) -> Option<Generation> {
    Some(sled.client.artifact_config_get().await.ok()?.into_inner().generation)
}

/// One try of a request: retry after a while, or give up with a message.
enum Attempt {
    Busy {
        retry_after: Duration,
        message: String,
    },
    /// A PUT abandoned as the activation's straggler.
    Straggler {
        message: String,
    },
    Final {
        message: String,
        generation_conflict: bool,
    },
}

impl Attempt {
    fn other(message: String) -> Attempt {
        Attempt::Final { message, generation_conflict: false }
    }
}

impl From<SledError<common::clients::sled_agent::types::Error>> for Attempt {
    fn from(error: SledError<common::clients::sled_agent::types::Error>) -> Attempt {
        if let SledError::ErrorResponse(response) = &error {
            let status = response.status().as_u16();
            if status == 503 || status == 429 {
                let retry_after = response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
                    .map(Duration::from_secs);
                if let Some(retry_after) = retry_after {
                    return Attempt::Busy {
                        retry_after: retry_after.min(MAX_RETRY_AFTER),
                        message: describe(error),
                    };
                }
            }
            if status == 409 && response.error_code.as_deref() == Some(CONFIG_GENERATION) {
                return Attempt::Final { message: describe(error), generation_conflict: true };
            }
        }
        Attempt::other(describe(error))
    }
}

/// Nexus's bound on its own requests to sleds. PUTs stream an artifact and
/// hold their permit for the whole transfer; copy requests are answered at
/// once (202). Separate pools keep long PUTs from starving copy requests.
struct RequestPermits {
    puts: tokio::sync::Semaphore,
    copies: tokio::sync::Semaphore,
    /// The activation's PUTs, for finding a straggler.
    tracker: PutTracker,
}

/// A PUT running below this fraction of the activation's other PUTs' median
/// rate, once they have all finished, is a straggler.
const STRAGGLER_FRACTION: f64 = 0.3;

/// Consecutive one-second windows a straggler must be slow for.
const STRAGGLER_WINDOWS: u32 = 2;

/// The PUTs of one activation (see "Stragglers" in the module doc).
#[derive(Default)]
struct PutTracker {
    puts: Mutex<Vec<TrackedPut>>,
}

struct TrackedPut {
    /// Body bytes sent, over all attempts.
    sent: Arc<std::sync::atomic::AtomicU64>,
    /// When it got its permit: a PUT waiting for one is not slow.
    started: Option<Instant>,
    finished: Option<Instant>,
}

impl PutTracker {
    fn register(&self) -> (usize, Arc<std::sync::atomic::AtomicU64>) {
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut puts = self.puts.lock().unwrap_or_else(|e| e.into_inner());
        puts.push(TrackedPut { sent: sent.clone(), started: None, finished: None });
        (puts.len() - 1, sent)
    }

    fn start(&self, id: usize) {
        self.puts.lock().unwrap_or_else(|e| e.into_inner())[id].started.get_or_insert_with(Instant::now);
    }

    fn finish(&self, id: usize) {
        self.puts.lock().unwrap_or_else(|e| e.into_inner())[id].finished = Some(Instant::now());
    }

    /// Resolves, with why, once PUT `id` is a straggler: at least half of
    /// the activation's other PUTs have finished, and it has run below
    /// [`STRAGGLER_FRACTION`] of their median rate for
    /// [`STRAGGLER_WINDOWS`] seconds.
    async fn straggler(&self, id: usize) -> String {
        let mut slow_windows = 0;
        let mut last_sent = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let puts = self.puts.lock().unwrap_or_else(|e| e.into_inner());
            if puts[id].started.is_none() {
                continue;
            }
            let sent = puts[id].sent.load(std::sync::atomic::Ordering::Relaxed);
            let rate = sent.saturating_sub(last_sent) as f64;
            last_sent = sent;
            let others = puts.len() - 1;
            let mut finished: Vec<f64> = puts
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != id)
                .filter_map(|(_, put)| {
                    let secs = (put.finished? - put.started?).as_secs_f64();
                    Some(put.sent.load(std::sync::atomic::Ordering::Relaxed) as f64 / secs.max(0.001))
                })
                .collect();
            drop(puts);
            finished.sort_by(f64::total_cmp);
            // Half, not all: two PUTs to one slow sled would otherwise
            // wait for each other.
            let Some(&median) = finished.get(finished.len() / 2).filter(|_| 2 * finished.len() >= others)
            else {
                slow_windows = 0;
                continue;
            };
            if rate >= STRAGGLER_FRACTION * median {
                slow_windows = 0;
                continue;
            }
            slow_windows += 1;
            if slow_windows >= STRAGGLER_WINDOWS {
                return format!(
                    "abandoned after {sent} bytes: at {:.0} KiB/s it ran below {STRAGGLER_FRACTION} of the \
                     {:.0} KiB/s of this activation's finished PUTs; the sled will \
                     copy it from a sled that holds it",
                    rate / 1024.0,
                    median / 1024.0
                );
            }
        }
    }
}

/// Runs `attempt` with a permit from `permits`, and again after a busy
/// answer's `Retry-After` (without the permit meanwhile: waiting holds no
/// slot another request could use), at most [`BUSY_RETRIES`] more times.
async fn with_busy_retries<F, Fut>(permits: &tokio::sync::Semaphore, mut attempt: F) -> Result<(), Attempt>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Attempt>>,
{
    let mut tries = 0;
    loop {
        let permit = permits.acquire().await.expect("the semaphore is never closed");
        let outcome = attempt().await;
        drop(permit);
        match outcome {
            Ok(()) => return Ok(()),
            Err(Attempt::Busy { retry_after, message }) => {
                tries += 1;
                if tries > BUSY_RETRIES {
                    return Err(Attempt::Busy { retry_after, message });
                }
                tokio::time::sleep(retry_after).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// A streamed request body that tells its length, so that it is sent with
/// `Content-Length`: a sled follows a PUT from its depot only if it knows
/// how long the artifact is.
/// `file`'s bytes as a body of exactly `length`, counting what is sent in
/// `sent`.
fn known_length_body(
    file: tokio::fs::File,
    length: u64,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> reqwest::Body {
    struct KnownLength<B> {
        inner: B,
        length: u64,
    }
    impl<B: http_body::Body + Unpin> http_body::Body for KnownLength<B> {
        type Data = B::Data;
        type Error = B::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            context: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            std::pin::Pin::new(&mut self.inner).poll_frame(context)
        }
        fn size_hint(&self) -> http_body::SizeHint {
            http_body::SizeHint::with_exact(self.length)
        }
    }
    let frames = tokio_util::io::ReaderStream::new(file).map_ok(move |bytes| {
        sent.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        http_body::Frame::data(bytes)
    });
    reqwest::Body::wrap(KnownLength { inner: http_body_util::StreamBody::new(frames), length })
}

/// A sled's error response as its own message, anything else with its cause
/// chain.
fn describe(error: SledError<common::clients::sled_agent::types::Error>) -> String {
    match error {
        SledError::ErrorResponse(response) => {
            let status = response.status();
            let body = response.into_inner();
            format!("{status}: {}", body.message)
        }
        other => error_chain(&other),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        PIPELINE_HEAD_START, Progress, SETTLED_MAX_AGE, Settled, known_length_body, known_sleds, wait_for,
        with_head_start,
    };
    use common::Generation;
    use common::api::sled_agent::ArtifactListResponse;
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, Instant};
    use uuid::Uuid;

    /// A follow-up goes on from a settled sled only while the generation is
    /// the same, the sled is in service and the listing is recent; any
    /// other activation asks every sled.
    #[test]
    fn a_follow_up_knows_only_recent_settled_sleds_of_its_generation() {
        let now = Instant::now();
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        let settled = |generation: u64, age: Duration| Settled {
            listed: ArtifactListResponse {
                generation: Generation::new(generation),
                list: BTreeMap::new(),
                copies_in_flight: BTreeSet::new(),
                copy_failures: BTreeMap::new(),
                max_concurrent_copies: None,
                max_queued_copies: None,
                copy_bytes_per_sec: None,
                ledger_damage: Vec::new(),
            },
            healthy_m2: 2,
            listed_at: now - age,
        };
        let all = || -> BTreeMap<Uuid, Settled> {
            [
                (ids[0], settled(5, Duration::from_secs(1))),
                (ids[1], settled(4, Duration::from_secs(1))),
                (ids[2], settled(5, SETTLED_MAX_AGE + Duration::from_secs(1))),
                (ids[3], settled(5, Duration::from_secs(1))),
            ]
            .into()
        };
        let in_service: BTreeSet<Uuid> = ids[..3].iter().copied().collect();
        let known = known_sleds(all(), true, Generation::new(5), &in_service, now);
        assert_eq!(known.keys().copied().collect::<Vec<_>>(), [ids[0]], "older generation, stale, expunged");
        assert!(known_sleds(all(), false, Generation::new(5), &in_service, now).is_empty());
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A sled follows a PUT from its depot only if the PUT says how long it
    /// is: the staged file goes out with `Content-Length`, not chunked.
    #[tokio::test]
    async fn puts_are_sent_with_their_length() {
        let dir = camino_tempfile::tempdir().unwrap();
        let path = dir.path().join("artifact");
        std::fs::write(&path, vec![7u8; 300_000]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/artifacts/x", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = vec![0u8; 64 << 10];
            while request.len() < 300_000 {
                let read = stream.read(&mut buffer).await.unwrap();
                assert!(read > 0, "the request ended early");
                request.extend_from_slice(&buffer[..read]);
            }
            stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").await.unwrap();
            let head_end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase()
        });
        let file = tokio::fs::File::open(&path).await.unwrap();
        let response = reqwest::Client::new()
            .put(url)
            .body(known_length_body(file, 300_000, Default::default()))
            .send()
            .await;
        assert_eq!(response.unwrap().status(), 204);
        let head = server.await.unwrap();
        assert!(head.contains("content-length: 300000"), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");
    }

    /// A request that fills a sled releases its pipelined followers
    /// `PIPELINE_HEAD_START` after it was sent, while its answer is still
    /// on the way (on a loaded link the answer waits out the link's
    /// queue, once per hop of a tree); one that fails first releases none.
    #[tokio::test(start_paused = true)]
    async fn followers_go_a_head_start_after_their_filler_is_sent_not_when_it_is_answered() {
        let progress = tokio::sync::watch::Sender::new(Progress::Pending);
        let answer_after = Duration::from_secs(2);
        let started = tokio::time::Instant::now();
        let filler = with_head_start(&progress, tokio::time::sleep(answer_after));
        let follower = async {
            let released = tokio::time::timeout(answer_after, wait_for(&progress, Progress::Started)).await;
            (released, started.elapsed())
        };
        let ((), (released, after)) = tokio::join!(filler, follower);
        assert_eq!(released, Ok(true), "the follower was not released before the answer");
        assert!(after >= PIPELINE_HEAD_START, "released after {after:?}");

        let progress = tokio::sync::watch::Sender::new(Progress::Pending);
        let failed = with_head_start(&progress, async {
            tokio::time::sleep(PIPELINE_HEAD_START / 2).await;
            Err::<(), _>("refused")
        });
        assert!(failed.await.is_err());
        assert_eq!(
            *progress.borrow(),
            Progress::Pending,
            "a filler that failed first released its followers"
        );
    }
}
