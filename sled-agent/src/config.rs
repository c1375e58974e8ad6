//! The sled agent's configuration file (TOML). `smf/sled-agent/config.toml` is
//! the real default; `rack-dev run-all` starts from it and fills in ports,
//! serials and paths.

use camino::Utf8PathBuf;
use serde::Deserialize;
use std::net::SocketAddr;
use uuid::Uuid;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// If absent, an id is generated and kept on the M.2 devices.
    pub sled_id: Option<Uuid>,
    /// If absent, `sim-` and the first 8 hex digits of the sled id.
    pub serial: Option<String>,
    /// Nexus's internal API, where the sled registers.
    pub nexus_internal_url: String,
    #[serde(default = "default_registration_period_secs")]
    pub registration_period_secs: u64,
    pub sled_agent_api: ListenConfig,
    pub repo_depot: ListenConfig,
    pub storage: StorageConfig,
    #[serde(default)]
    pub copy: CopyConfig,
    #[serde(default)]
    pub requests: RequestLimits,
    pub log: dropshot::ConfigLogging,
}

fn default_registration_period_secs() -> u64 {
    30
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// A specific IP (it is what the sled advertises to Nexus); port 0 picks
    /// a free port.
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "default_m2_count")]
    pub m2_count: u32,
    /// One directory per M.2; temp directories (removed at exit) if absent.
    #[serde(default)]
    pub m2_dirs: Vec<Utf8PathBuf>,
    /// Quota of the artifact dataset on each M.2, in bytes.
    #[serde(default = "default_quota")]
    pub artifact_quota_bytes: u64,
    /// How many artifacts are re-hashed at once at start-up (those whose
    /// metadata changed since they were last verified).
    #[serde(default = "default_verify_workers")]
    pub verify_workers: usize,
    /// The background scrub's rate: every stored artifact is re-hashed at
    /// most this fast, over all M.2s together. 0 turns the scrub off.
    #[serde(default = "default_scrub_bytes_per_sec")]
    pub scrub_bytes_per_sec: u64,
    /// A scrub pass starts at most this often (the first right after
    /// start-up).
    #[serde(default = "default_scrub_interval_secs")]
    pub scrub_interval_secs: u64,
}

fn default_m2_count() -> u32 {
    2
}

fn default_quota() -> u64 {
    40 << 30
}

fn default_verify_workers() -> usize {
    4
}

fn default_scrub_bytes_per_sec() -> u64 {
    64 << 20
}

fn default_scrub_interval_secs() -> u64 {
    24 * 60 * 60
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyConfig {
    /// Copies from other depots running at once; more are queued.
    pub max_concurrent: usize,
    /// Copies waiting for a free slot, started in the order they came;
    /// more are refused with 503. A queued copy is a task and its source
    /// URLs: no file, no connection.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// A source that sends nothing for this long is given up on.
    pub read_timeout_secs: u64,
    /// How many times an interrupted copy resumes (with a Range request)
    /// before it is abandoned.
    pub resume_attempts: u32,
}

fn default_max_queued() -> usize {
    CopyConfig::default().max_queued
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig { max_concurrent: 16, max_queued: 256, read_timeout_secs: 30, resume_attempts: 3 }
    }
}

/// Bounds on the streaming requests a sled serves at once. Beyond them a
/// request is answered 503 with `Retry-After` rather than queued, so a burst
/// cannot pile up open files, sockets and memory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimits {
    /// Artifact PUTs (from Nexus) being received at once.
    pub max_concurrent_puts: usize,
    /// Depot downloads (by other sleds) being served at once.
    pub max_concurrent_depot_reads: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits { max_concurrent_puts: 8, max_concurrent_depot_reads: 32 }
    }
}

pub use common::config::{ConfigError, ConfigFile};

impl ConfigFile for Config {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let storage = &self.storage;
        if storage.m2_count == 0 {
            return Err(("storage.m2_count", "must be at least 1".into()));
        }
        if !storage.m2_dirs.is_empty() && storage.m2_dirs.len() != storage.m2_count as usize {
            return Err((
                "storage.m2_dirs",
                format!(
                    "lists {} directories but storage.m2_count is {}",
                    storage.m2_dirs.len(),
                    storage.m2_count
                ),
            ));
        }
        if storage.verify_workers == 0 {
            return Err(("storage.verify_workers", "must be at least 1".into()));
        }
        if storage.scrub_interval_secs == 0 {
            return Err(("storage.scrub_interval_secs", "must be at least 1".into()));
        }
        if self.copy.max_concurrent == 0 {
            return Err(("copy.max_concurrent", "must be at least 1".into()));
        }
        if self.requests.max_concurrent_puts == 0 {
            return Err(("requests.max_concurrent_puts", "must be at least 1".into()));
        }
        if self.requests.max_concurrent_depot_reads == 0 {
            return Err(("requests.max_concurrent_depot_reads", "must be at least 1".into()));
        }
        if self.copy.read_timeout_secs == 0 {
            return Err(("copy.read_timeout_secs", "must be at least 1".into()));
        }
        if self.registration_period_secs == 0 {
            return Err(("registration_period_secs", "must be at least 1".into()));
        }
        for (key, address) in [
            ("sled_agent_api.listen", self.sled_agent_api.listen),
            ("repo_depot.listen", self.repo_depot.listen),
        ] {
            if address.ip().is_unspecified() {
                return Err((
                    key,
                    format!("is {address}, but the sled must advertise a specific IP to Nexus"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use camino::Utf8Path;

    #[test]
    fn the_shipped_config_parses() {
        let path = Utf8Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/sled-agent/config.toml"));
        let config = Config::from_file(path).unwrap();
        assert_eq!(config.storage.m2_count, 2);
    }

    #[test]
    fn bad_config_names_the_key_and_the_problem() {
        let path = Utf8Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/sled-agent/config.toml"));
        let shipped = std::fs::read_to_string(path).unwrap();
        let error = |text: &str| Config::from_toml(Utf8Path::new("x.toml"), text).unwrap_err().to_string();

        let message = error(&shipped.replace("m2_count = 2", "m2_count = 2\nm2_cuont = 3"));
        assert!(message.contains("x.toml") && message.contains("m2_cuont"), "{message}");
        let message = error(&shipped.replace("m2_count = 2", "m2_count = 0"));
        assert_eq!(message, "config file x.toml: storage.m2_count must be at least 1");
        let message = error(&shipped.replace("listen = \"127.0.0.1:12346\"", "listen = \"0.0.0.0:12346\""));
        assert!(message.contains("repo_depot.listen is 0.0.0.0:12346"), "{message}");
    }
}
