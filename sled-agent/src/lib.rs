//! The sled agent, on simulated hardware with real storage: each M.2 device
//! is a directory. It keeps an artifact store on every healthy M.2, enforces
//! the artifact config generation it was given, serves its artifacts to other
//! sleds from its repo depot, and registers itself with Nexus.
//!
//! Invariants (tested in `store::tests` and `tests/`):
//! - no partially written or wrong-hash file is ever visible under an
//!   artifact's name: writes go to a temp file, are hashed as they stream,
//!   and are renamed into place only when the hash matches;
//! - the config generation never goes back, across restarts too: the ledger
//!   is written durably to every healthy M.2 under a name that carries its
//!   generation, and a damaged newest copy is never replaced by an older one
//!   (the sled then refuses work until a config at least that new arrives);
//! - files outside the current config are deleted when the config changes
//!   and at start-up, never on the basis of a config older than a ledger copy
//!   the sled can see;
//! - what a PUT or copy answered "done" for, and an accepted config, are on
//!   disk (fsynced file and directory) before the answer.

pub mod config;
pub mod http_entrypoints;
mod ledger;
pub mod registration;
pub mod server;
pub mod storage;
pub mod store;
