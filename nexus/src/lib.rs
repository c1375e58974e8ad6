//! Nexus: the rack's control-plane service. See ARCHITECTURE.md for the map.

pub mod app;
pub mod auth;
pub mod background;
pub mod config;
pub mod db;
pub mod external_api;
pub mod failpoints;
mod http_error;
pub mod internal_api;
pub mod server;

pub use common::error_chain;
