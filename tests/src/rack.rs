//! A small rack in one process: a Nexus, several sled agents registered with
//! it, and the means to drive replication and check convergence.

use crate::repos::RepoFactory;
use crate::{TestNexus, TestSled};
use common::api::sled_agent::M2State;
use common::bgtask::details::TufArtifactReplicationStatus;
use common::bgtask::{BackgroundTask, LastResult};
use common::{ArtifactConfig, ArtifactHash};
use nexus::config::Config;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const REPLICATION: &str = "tuf_artifact_replication";
pub const PRUNER: &str = "tuf_repo_pruner";

/// Sleds come first so that they are dropped (stop registering) before
/// their Nexus goes away.
pub struct TestRack {
    pub sleds: Vec<TestSled>,
    pub nexus: TestNexus,
}

/// What one sled holds, as it says over HTTP.
#[derive(Clone, Debug)]
pub struct SledView {
    pub sled_id: Uuid,
    pub generation: common::Generation,
    pub copies: BTreeMap<ArtifactHash, usize>,
    pub healthy_m2: usize,
    /// Artifact files per healthy M.2 (in the config or not).
    pub files_per_m2: Vec<usize>,
}

impl TestRack {
    /// A Nexus (replication follow-ups after 100 ms, back-off from 100 ms)
    /// and `sleds` sled agents, all registered.
    pub async fn start(sleds: usize, adjust: impl FnOnce(&mut Config)) -> TestRack {
        let nexus = TestNexus::start_with(|config| {
            config.background_tasks.tuf_artifact_replication.followup_delay_millis = 100;
            config.background_tasks.tuf_artifact_replication.backoff_base_millis = 100;
            adjust(config);
        })
        .await;
        let mut rack = TestRack { nexus, sleds: Vec::new() };
        for _ in 0..sleds {
            rack.add_sled().await;
        }
        rack
    }

    /// A rack on a replicated database: the `rack` database created on
    /// `cluster`'s primary at the current schema, a Nexus given the
    /// cluster's multi-host URL (returned) that waits 1 s for a lost
    /// database, and `sleds` sled agents.
    pub async fn on_cluster(cluster: &test_harness::PgCluster, sleds: usize) -> (TestRack, String) {
        let url = cluster.create_database("rack").await.unwrap();
        let mut conn = <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&url)
            .await
            .unwrap();
        nexus::db::schema_version::upgrade(&mut conn).await.unwrap();
        drop(conn);
        let dir = camino_tempfile::tempdir().unwrap();
        let mut config = crate::test_config(&url, dir.path());
        config.database.failover_wait_secs = 1;
        config.background_tasks.tuf_artifact_replication.followup_delay_millis = 100;
        config.background_tasks.tuf_artifact_replication.backoff_base_millis = 100;
        let db = test_harness::TestDatabase::existing("rack", url.clone());
        let nexus = TestNexus::start_on(db, dir, &config).await;
        let mut rack = TestRack { nexus, sleds: Vec::new() };
        for _ in 0..sleds {
            rack.add_sled().await;
        }
        (rack, url)
    }

    /// A rack that trusts the root of a new repository factory.
    pub async fn with_trust_root(sleds: usize, adjust: impl FnOnce(&mut Config)) -> (TestRack, RepoFactory) {
        let rack = TestRack::start(sleds, adjust).await;
        let factory = RepoFactory::new().await;
        rack.nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
        (rack, factory)
    }

    pub async fn add_sled(&mut self) -> &TestSled {
        self.add_sled_with(|_| {}).await
    }

    pub async fn add_sled_with(&mut self, adjust: impl FnOnce(&mut sled_agent::config::Config)) -> &TestSled {
        let sled = TestSled::start_with(&self.nexus.internal_url(), adjust).await;
        let id = sled.server.sled_id;
        let datastore = self.nexus.server.nexus().datastore.clone();
        wait_until("the sled registers", Duration::from_secs(20), async || {
            datastore.sled_get(id).await.is_ok()
        })
        .await;
        self.sleds.push(sled);
        self.sleds.last().unwrap()
    }

    /// Activates a task and waits for an iteration that started after the
    /// activation (not a timer).
    /// Uploads a repository of `artifacts` (name, size) built by `factory`,
    /// and checks that it was answered 200.
    pub async fn upload_ok(
        &self,
        factory: &RepoFactory,
        version: &str,
        artifacts: &[(&str, u64)],
        seed: u64,
    ) {
        let zip = factory.build(&RepoFactory::spec(version, artifacts, seed)).await;
        let (status, body) =
            crate::repos::upload(&self.nexus.external_url(), Some(&self.nexus.token), &zip).await;
        assert_eq!(status, 200, "{body}");
    }

    pub async fn activate(&self, task: &str) -> BackgroundTask {
        self.nexus.activate(task).await
    }

    pub async fn replicate(&self) -> TufArtifactReplicationStatus {
        replication_status(&self.activate(REPLICATION).await)
    }

    pub async fn config(&self) -> ArtifactConfig {
        self.nexus.server.nexus().datastore.tuf_artifact_config().await.unwrap()
    }

    pub async fn views(&self) -> Vec<SledView> {
        let mut views = Vec::new();
        for sled in &self.sleds {
            views.push(sled_view(sled).await);
        }
        views
    }

    /// Whether every sled holds exactly the config, on every healthy M.2,
    /// and this Nexus holds nothing staged.
    pub async fn converged(&self) -> bool {
        let config = self.config().await;
        let staged = std::fs::read_dir(self.nexus.staging_dir().join("artifacts")).unwrap().count();
        staged == 0 && self.views().await.iter().all(|view| holds_exactly(view, &config))
    }

    /// Activates replication until the rack converges; returns how many
    /// activations it took.
    pub async fn converge(&self, max_activations: usize) -> usize {
        for activation in 1..=max_activations {
            let status = self.replicate().await;
            if self.converged().await {
                return activation;
            }
            assert!(
                !matches!(status.outcome, common::bgtask::details::ReplicationOutcome::Error { .. }),
                "replication failed: {status:#?}"
            );
            // Copies run on the sleds after they answered 202.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no convergence after {max_activations} activations: {:#?}", self.views().await);
    }

    pub async fn fail_m2(&self, sled: usize, slot: u32, state: M2State) {
        let request = common::api::sled_agent::M2StateRequest { state };
        self.sleds[sled].client().sim_m2_set_state(slot, &request).await.unwrap();
    }
}

pub fn holds_exactly(view: &SledView, config: &ArtifactConfig) -> bool {
    view.generation == config.generation
        && config.artifacts.iter().all(|hash| view.copies.get(hash) == Some(&view.healthy_m2))
        && view.files_per_m2.iter().all(|&files| files == config.artifacts.len())
}

pub async fn sled_view(sled: &TestSled) -> SledView {
    sled_view_at(&sled.api_url()).await
}

/// What the sled agent at `api_url` says it holds.
pub async fn sled_view_at(api_url: &str) -> SledView {
    let client = crate::sled_agent_client::Client::new(api_url);
    let list = client.artifact_list().await.unwrap().into_inner();
    let inventory = client.inventory().await.unwrap().into_inner();
    let healthy: Vec<_> = inventory.m2.iter().filter(|m2| m2.state == M2State::Healthy).collect();
    SledView {
        sled_id: inventory.sled_id,
        generation: list.generation,
        copies: list.list,
        healthy_m2: healthy.len(),
        files_per_m2: healthy.iter().map(|m2| m2.artifacts).collect(),
    }
}

pub fn replication_status(task: &BackgroundTask) -> TufArtifactReplicationStatus {
    match &task.last {
        LastResult::Completed { details, .. } => serde_json::from_value(details.clone())
            .unwrap_or_else(|error| panic!("replication details do not parse ({error}): {details}")),
        LastResult::NeverCompleted => panic!("replication never completed"),
    }
}

pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
