//! The Nexus application object: what the HTTP handlers and background tasks
//! share.

use crate::background::driver::Driver;
use crate::db::DataStore;
use std::sync::Arc;

pub struct Nexus {
    pub log: slog::Logger,
    pub datastore: Arc<DataStore>,
    pub background: Driver,
}
