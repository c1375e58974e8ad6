//! Where the rack that `rack-dev run-all` is running can be found.
//!
//! run-all writes this file when the rack is up and removes it when it stops;
//! `rack-dev repo ...` and `omdb` fall back to it when no URL or token is
//! given, so that the README's tour works as written. The path is
//! `$RACK_DEV_CURRENT` if set, else `${XDG_RUNTIME_DIR:-/tmp}/rack-dev-<uid>/current.json`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RackDiscovery {
    pub run_dir: String,
    pub database_url: String,
    pub token_file: String,
    pub nexus: Vec<NexusEndpoints>,
    pub sleds: Vec<SledEndpoints>,
    /// With `run-all --netns`: the run's id (in every namespace and
    /// interface name) and each host's address ("n0", "s3", ...).
    #[serde(default)]
    pub network: Option<NetworkDiscovery>,
    /// The private PostgreSQL servers run-all started (none with
    /// `--database-url`), for `rack-dev db-promote`.
    #[serde(default)]
    pub database_servers: Vec<DatabaseServer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseServer {
    /// `pg0` (the first primary), `pg1`, ...
    pub name: String,
    /// On 127.0.0.1.
    pub port: u16,
    /// The server's directory, which holds `data/` and its log.
    pub dir: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDiscovery {
    pub run_id: u32,
    pub hosts: std::collections::BTreeMap<String, std::net::Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NexusEndpoints {
    pub external_url: String,
    pub internal_url: String,
    pub log: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SledEndpoints {
    pub serial: String,
    pub api_url: String,
    pub depot_url: String,
    pub log: String,
}

pub fn path() -> PathBuf {
    if let Some(path) = std::env::var_os("RACK_DEV_CURRENT") {
        return PathBuf::from(path);
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    base.join(format!("rack-dev-{uid}")).join("current.json")
}

impl RackDiscovery {
    /// The running rack, if there is one.
    pub fn load() -> Option<RackDiscovery> {
        serde_json::from_slice(&std::fs::read(path()).ok()?).ok()
    }

    pub fn token(&self) -> Option<String> {
        Some(std::fs::read_to_string(&self.token_file).ok()?.trim().to_string())
    }

    pub fn write(&self) -> std::io::Result<()> {
        let path = path();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, serde_json::to_vec_pretty(self).expect("serializable"))
    }

    pub fn remove() {
        let _ = std::fs::remove_file(path());
    }
}
