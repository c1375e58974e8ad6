//! Starting and stopping a Nexus: the datastore, the staging area (with
//! recovery of what a previous run staged), the background tasks and the
//! HTTP servers, in that order, and the reverse on shutdown.

use crate::app::Nexus;
use crate::app::staging::{self, StagingArea};
use crate::app::update::zip_intake::ZipLimits;
use crate::app::update::{UploadSettings, Uploader};
use crate::auth::{OperatorToken, TokenError};
use crate::background::driver::{Activator, Driver};
use crate::background::{self, ReplicationWiring};
use crate::config::Config;
use crate::db::datastore::PoolConfig;
use crate::db::{DataStore, DataStoreError};
use crate::external_api::ExternalApiImpl;
use crate::internal_api::NexusInternalApiImpl;
use camino::Utf8PathBuf;
use common::api::external::external_api_mod;
use common::api::nexus_internal::nexus_internal_api_mod;
use common::api::start_server;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The body limit of every endpoint but the upload (which streams and is
/// bounded by `external_api.request_body_max_bytes`).
const JSON_BODY_MAX_BYTES: usize = 1 << 20;

/// How long in-flight background activations get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Database(#[from] DataStoreError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("opening the staging directory {path}")]
    Staging {
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    NexusId(#[from] staging::NexusIdError),
    #[error(transparent)]
    UnreadableStaging(#[from] staging::UnreadableStaging),
    #[error(transparent)]
    Http(#[from] common::api::ServerStartError),
}

pub struct Server {
    nexus: Arc<Nexus>,
    internal_api: dropshot::HttpServer<Arc<Nexus>>,
    external_api: dropshot::HttpServer<Arc<Nexus>>,
    /// Set when this start generated the operator token (print it once).
    pub generated_token: Option<String>,
}

impl Server {
    pub async fn start(config: &Config, log: slog::Logger) -> Result<Server, StartError> {
        let pool = PoolConfig {
            max_connections: config.database.max_connections,
            failover_wait: Duration::from_secs(config.database.failover_wait_secs),
        };
        let datastore = Arc::new(DataStore::connect(&config.database.url, &pool).await?);
        let (operator_token, created) = OperatorToken::load_or_create(&config.external_api.token_file)?;
        let staging_dir = &config.updates.staging_dir;
        let staging_area = StagingArea::open(staging_dir)
            .map_err(|source| StartError::Staging { path: staging_dir.clone(), source })?;
        let unpruned = datastore.tuf_repo_list_unpruned_with_artifacts().await?;
        let handoff_slots = Arc::new(tokio::sync::Semaphore::new(config.updates.handoff_capacity));
        let recovered = staging::recover(&staging_area, &unpruned, &handoff_slots, &log).await?;
        let nexus_id = staging_area.load_or_create_id()?;
        let (handoff_tx, handoff_rx) = tokio::sync::mpsc::channel(config.updates.handoff_capacity);
        let replication_activator = Activator::new();
        let progress = Default::default();
        let depot_url = Arc::new(std::sync::OnceLock::new());
        let wiring = ReplicationWiring {
            staging: staging_area.clone(),
            handoff: handoff_rx,
            recovered,
            activator: replication_activator.clone(),
            progress: Arc::clone(&progress),
            nexus_id,
            depot_url: depot_url.clone(),
        };
        let definitions = background::register_all(&config.background_tasks, &datastore, wiring);
        let updates = &config.updates;
        let uploader = Uploader {
            nexus_id,
            log: log.new(slog::o!("component" => "upload")),
            datastore: datastore.clone(),
            staging: staging_area,
            settings: UploadSettings {
                max_bytes: config.external_api.request_body_max_bytes,
                idle_timeout: Duration::from_secs(config.external_api.upload_idle_timeout_secs),
                max_concurrent: updates.max_concurrent_uploads,
                enforce_expiry: updates.enforce_expiry,
                zip: ZipLimits {
                    max_entries: updates.max_zip_entries,
                    max_total_bytes: updates.max_uncompressed_bytes,
                    max_compression_ratio: updates.max_compression_ratio,
                },
            },
            upload_slots: Arc::new(tokio::sync::Semaphore::new(updates.max_concurrent_uploads)),
            handoff: handoff_tx,
            handoff_slots,
            replication: replication_activator,
        };
        let nexus = Arc::new(Nexus {
            id: nexus_id,
            background: Driver::start(definitions, datastore.clone(), nexus_id, &log),
            datastore,
            uploader,
            operator_token: operator_token.clone(),
            replication_progress: progress,
            staged_reads: Arc::new(tokio::sync::Semaphore::new(crate::app::MAX_STAGED_READS)),
            log: log.clone(),
        });

        let internal_api = start_server(
            "internal API",
            nexus_internal_api_mod::api_description::<NexusInternalApiImpl>(),
            nexus.clone(),
            config.internal_api.listen,
            JSON_BODY_MAX_BYTES,
            &log,
        )?;
        let external_api = start_server(
            "external API",
            external_api_mod::api_description::<ExternalApiImpl>(),
            nexus.clone(),
            config.external_api.listen,
            JSON_BODY_MAX_BYTES,
            &log,
        )?;
        // Sleds can reach the internal API at its address only if it is
        // a specific one.
        let internal_address = internal_api.local_addr();
        if !internal_address.ip().is_unspecified() {
            depot_url.set(format!("http://{internal_address}")).expect("set once, here");
        }
        slog::info!(log, "nexus started"; "internal_api" => %internal_api.local_addr(), "external_api" => %external_api.local_addr());
        Ok(Server {
            nexus,
            internal_api,
            external_api,
            generated_token: created.then(|| operator_token.as_str().to_string()),
        })
    }

    pub fn internal_address(&self) -> SocketAddr {
        self.internal_api.local_addr()
    }

    pub fn external_address(&self) -> SocketAddr {
        self.external_api.local_addr()
    }

    pub fn nexus(&self) -> &Arc<Nexus> {
        &self.nexus
    }

    /// Stops accepting requests, lets in-flight ones finish, then stops the
    /// background tasks.
    pub async fn shutdown(self) {
        for (name, server) in [("external API", self.external_api), ("internal API", self.internal_api)] {
            if let Err(message) = server.close().await {
                slog::warn!(self.nexus.log, "closing a server"; "server" => name, "error" => message);
            }
        }
        self.nexus.background.shutdown(SHUTDOWN_GRACE).await;
        slog::info!(self.nexus.log, "nexus stopped");
    }
}
