//! Types shared by every crate of the rack control plane: Nexus, the sled
//! agent, omdb and the dev tools. Anything that crosses a process boundary
//! (HTTP bodies, database rows shown by omdb) is defined here once, with the
//! dropshot API traits of each HTTP server and the clients generated from
//! their OpenAPI documents.

pub mod api;
pub mod artifact;
pub mod bgtask;
pub mod cli;
pub mod clients;
pub mod config;
pub mod depot;
pub mod discovery;
pub mod durable;
pub mod error;
pub mod failpoints;
pub mod generation;

pub use artifact::{ArtifactConfig, ArtifactHash, ArtifactHashParseError, ArtifactId};
pub use error::error_chain;
pub use generation::Generation;
