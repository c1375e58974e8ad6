//! Nexus's view of the database: the diesel schema, row models, the schema
//! version gate, and the [`DataStore`] that every other part of Nexus uses.
//!
//! Invariant: every mutation that changes the set of unpruned repositories
//! bumps `tuf_generation` in the same transaction (DESIGN §4). Tested in
//! `datastore::tuf::tests`.

pub mod datastore;
pub mod model;
mod schema;
pub mod schema_version;

pub use datastore::{DataStore, DataStoreError};
