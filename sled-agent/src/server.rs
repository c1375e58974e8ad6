//! Starting a sled agent: storage, the artifact store (which verifies what
//! is stored before anything is served) and its background tasks (the
//! verification cache's write-out, the scrub), the two HTTP servers, then
//! registration with Nexus.

use crate::config::Config;
use crate::http_entrypoints::{RepoDepotImpl, SledAgentImpl, SledContext};
use crate::registration;
use crate::storage::M2;
use crate::store::{ArtifactStore, StoreError};
use camino::Utf8PathBuf;
use camino_tempfile::Utf8TempDir;
use common::api::nexus_internal::SledAgentInfo;
use common::api::sled_agent::{repo_depot_api_mod, sled_agent_api_mod};
use common::api::start_server;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("setting up M.2 directory {path}")]
    Storage {
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Http(#[from] common::api::ServerStartError),
}

pub struct Server {
    pub sled_id: Uuid,
    pub serial: String,
    api: dropshot::HttpServer<Arc<SledContext>>,
    depot: dropshot::HttpServer<Arc<SledContext>>,
    /// Aborted when the server is dropped or shut down.
    registration: AbortOnDrop,
    /// The store's background tasks (cache write-out, scrub), likewise.
    store_tasks: Vec<AbortOnDrop>,
    store: Arc<ArtifactStore>,
    /// Kept alive for as long as the server runs when M.2s are temp dirs.
    _temp_m2s: Vec<Utf8TempDir>,
    log: slog::Logger,
}

impl Server {
    pub async fn start(config: &Config, log: slog::Logger) -> Result<Server, StartError> {
        let storage = &config.storage;
        let mut temp_m2s = Vec::new();
        let dirs: Vec<Utf8PathBuf> = if storage.m2_dirs.is_empty() {
            for slot in 0..storage.m2_count {
                let dir =
                    camino_tempfile::Builder::new().prefix(&format!("sled-m2-{slot}-")).tempdir().map_err(
                        |source| StartError::Storage { path: Utf8PathBuf::from("(temp dir)"), source },
                    )?;
                temp_m2s.push(dir);
            }
            temp_m2s.iter().map(|dir| dir.path().to_owned()).collect()
        } else {
            storage.m2_dirs.clone()
        };
        let m2s: Vec<Arc<M2>> = dirs
            .into_iter()
            .enumerate()
            .map(|(slot, dir)| Arc::new(M2::new(slot as u32, dir, storage.artifact_quota_bytes)))
            .collect();
        let sled_id = match config.sled_id {
            Some(id) => id,
            None => persisted_sled_id(&m2s)?,
        };
        let serial =
            config.serial.clone().unwrap_or_else(|| format!("sim-{}", &sled_id.simple().to_string()[..8]));
        let log = log.new(slog::o!("sled_id" => sled_id.to_string(), "serial" => serial.clone()));
        let store = ArtifactStore::open(
            log.clone(),
            m2s,
            config.copy.clone(),
            config.requests.clone(),
            storage.verify_workers,
        )
        .await?;
        let store = Arc::new(store);
        let store_tasks = store
            .spawn_background(storage.scrub_bytes_per_sec, Duration::from_secs(storage.scrub_interval_secs))
            .into_iter()
            .map(AbortOnDrop)
            .collect();
        let context = Arc::new(SledContext { sled_id, serial: serial.clone(), store: store.clone() });

        let api_address = config.sled_agent_api.listen;
        let api = start_server(
            "sled-agent API",
            sled_agent_api_mod::api_description::<SledAgentImpl>(),
            context.clone(),
            api_address,
            // JSON bodies only: artifact PUTs have their own limit.
            1 << 20,
            &log,
        )?;
        let depot = start_server(
            "repo depot",
            repo_depot_api_mod::api_description::<RepoDepotImpl>(),
            context,
            config.repo_depot.listen,
            4096,
            &log,
        )?;
        let info = SledAgentInfo {
            serial: serial.clone(),
            ip: api.local_addr().ip(),
            port: api.local_addr().port(),
            repo_depot_port: depot.local_addr().port(),
        };
        let registration = registration::spawn(
            log.new(slog::o!("component" => "registration")),
            &config.nexus_internal_url,
            sled_id,
            info,
            Duration::from_secs(config.registration_period_secs),
        );
        slog::info!(log, "sled agent started"; "api" => %api.local_addr(), "depot" => %depot.local_addr());
        Ok(Server {
            sled_id,
            serial,
            api,
            depot,
            registration: AbortOnDrop(registration),
            store_tasks,
            store,
            _temp_m2s: temp_m2s,
            log,
        })
    }

    pub fn api_address(&self) -> SocketAddr {
        self.api.local_addr()
    }

    pub fn depot_address(&self) -> SocketAddr {
        self.depot.local_addr()
    }

    pub async fn shutdown(self) {
        drop(self.registration);
        drop(self.store_tasks);
        for (name, server) in [("api", self.api), ("depot", self.depot)] {
            if let Err(message) = server.close().await {
                slog::warn!(self.log, "closing server"; "server" => name, "error" => message);
            }
        }
        // What was verified since the last write-out need not be re-hashed
        // at the next start.
        self.store.flush_stamps().await;
        slog::info!(self.log, "sled agent stopped");
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The sled id kept on the M.2s, or a new one written to all of them.
fn persisted_sled_id(m2s: &[Arc<M2>]) -> Result<Uuid, StartError> {
    let file = |m2: &M2| m2.root().join("sled-id");
    if let Some(id) = m2s.iter().find_map(|m2| std::fs::read_to_string(file(m2)).ok()?.trim().parse().ok()) {
        return Ok(id);
    }
    let id = Uuid::new_v4();
    for m2 in m2s {
        common::durable::create_dir_all(m2.root())
            .and_then(|()| common::durable::replace_file(&file(m2), id.to_string().as_bytes(), 0o644))
            .map_err(|source| StartError::Storage { path: m2.root().to_owned(), source })?;
    }
    Ok(id)
}
