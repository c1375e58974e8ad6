//! Starting and stopping a Nexus: the datastore, the background tasks and the
//! HTTP servers, in that order, and the reverse on shutdown.

use crate::app::Nexus;
use crate::background;
use crate::background::driver::Driver;
use crate::config::Config;
use crate::db::datastore::PoolConfig;
use crate::db::{DataStore, DataStoreError};
use crate::internal_api::NexusInternalApiImpl;
use common::api::nexus_internal::nexus_internal_api_mod;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long in-flight background activations get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Database(#[from] DataStoreError),
    #[error("starting the internal API server on {address}: {message}")]
    InternalApi {
        address: SocketAddr,
        message: String,
    },
}

pub struct Server {
    nexus: Arc<Nexus>,
    internal_api: dropshot::HttpServer<Arc<Nexus>>,
}

impl Server {
    pub async fn start(config: &Config, log: slog::Logger) -> Result<Server, StartError> {
        let pool = PoolConfig {
            max_connections: config.database.max_connections,
        };
        let datastore = Arc::new(DataStore::connect(&config.database.url, &pool).await?);
        let definitions = background::register_all(&config.background_tasks, &datastore);
        let nexus = Arc::new(Nexus {
            background: Driver::start(definitions, &log),
            datastore,
            log: log.clone(),
        });

        let address = config.internal_api.listen;
        let api =
            nexus_internal_api_mod::api_description::<NexusInternalApiImpl>().map_err(|error| {
                StartError::InternalApi {
                    address,
                    message: error.to_string(),
                }
            })?;
        let dropshot_config = dropshot::ConfigDropshot {
            bind_address: address,
            ..Default::default()
        };
        let internal_api = dropshot::ServerBuilder::new(
            api,
            nexus.clone(),
            log.new(slog::o!("server" => "internal_api")),
        )
        .config(dropshot_config)
        .start()
        .map_err(|error| StartError::InternalApi {
            address,
            message: common::error_chain(&error),
        })?;
        slog::info!(log, "nexus started"; "internal_api" => %internal_api.local_addr());
        Ok(Server {
            nexus,
            internal_api,
        })
    }

    pub fn internal_address(&self) -> SocketAddr {
        self.internal_api.local_addr()
    }

    pub fn nexus(&self) -> &Arc<Nexus> {
        &self.nexus
    }

    /// Stops accepting requests, lets in-flight ones finish, then stops the
    /// background tasks.
    pub async fn shutdown(self) {
        if let Err(message) = self.internal_api.close().await {
            slog::warn!(self.nexus.log, "closing the internal API server"; "error" => message);
        }
        self.nexus.background.shutdown(SHUTDOWN_GRACE).await;
        slog::info!(self.nexus.log, "nexus stopped");
    }
}
