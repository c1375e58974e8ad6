//! Nexus's configuration file (TOML). `smf/nexus/config.toml` is the real
//! default; `rack-dev run-all` starts from it and fills in ports and paths.
//!
//! Unknown keys are errors, so a misspelt knob is caught at start-up instead
//! of silently taking its default.

use camino::{Utf8Path, Utf8PathBuf};
use serde::Deserialize;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub external_api: ExternalApiConfig,
    pub internal_api: InternalApiConfig,
    pub updates: UpdatesConfig,
    pub log: dropshot::ConfigLogging,
    #[serde(default)]
    pub background_tasks: BackgroundTasksConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgresql://user@host:port/dbname`; `nexus --database-url` overrides it.
    pub url: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How long a database operation waits for a connection, and keeps
    /// retrying after it lost one (a primary failing over), before it gives
    /// up (503 with Retry-After for API requests).
    #[serde(default = "default_failover_wait_secs")]
    pub failover_wait_secs: u64,
}

fn default_max_connections() -> u32 {
    16
}

fn default_failover_wait_secs() -> u64 {
    10
}

/// The API for background tasks and sled agents. It has no authentication,
/// so it must face only the rack's internal network, never operators or
/// untrusted networks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalApiConfig {
    /// Address and port to listen on; port 0 picks a free one. A loopback
    /// address unless `expose_beyond_loopback` is set.
    pub listen: SocketAddr,
    /// Allows a `listen` address that is not loopback (or is 0.0.0.0/::):
    /// set it only when that address is on the rack's internal network.
    #[serde(default)]
    pub expose_beyond_loopback: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalApiConfig {
    pub listen: SocketAddr,
    /// The operator's bearer token. If the file does not exist, a token is
    /// generated, written there (mode 0600) and printed once if stdout is a
    /// terminal. Not in a directory anyone can rename files in.
    pub token_file: Utf8PathBuf,
    /// The largest request body, i.e. the largest repository upload.
    #[serde(default = "default_request_body_max_bytes")]
    pub request_body_max_bytes: u64,
    /// An upload whose body sends nothing for this long is cut off (408), so
    /// a stalled client cannot hold an upload slot for ever.
    #[serde(default = "default_upload_idle_timeout_secs")]
    pub upload_idle_timeout_secs: u64,
}

fn default_request_body_max_bytes() -> u64 {
    4 << 30
}

fn default_upload_idle_timeout_secs() -> u64 {
    60
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatesConfig {
    /// Uploads in progress and artifacts waiting for replication. Must
    /// survive a restart (not a tmpfs) and belong to this Nexus alone.
    pub staging_dir: Utf8PathBuf,
    /// Refuse repositories whose TUF metadata has expired.
    #[serde(default = "default_true")]
    pub enforce_expiry: bool,
    #[serde(default = "default_max_zip_entries")]
    pub max_zip_entries: usize,
    /// The most an uploaded zip may inflate to, in all.
    #[serde(default = "default_max_uncompressed_bytes")]
    pub max_uncompressed_bytes: u64,
    /// Entries over 1 MiB that compress better than this are refused as
    /// likely decompression bombs.
    #[serde(default = "default_max_compression_ratio")]
    pub max_compression_ratio: u64,
    /// Uploads received and verified at once; more are refused with 503 and
    /// Retry-After. Each holds its zip on disk and a verification in flight.
    #[serde(default = "default_max_concurrent_uploads")]
    pub max_concurrent_uploads: usize,
    /// Recorded repositories waiting for the replication task; uploads beyond
    /// it are refused with 503 until it catches up.
    #[serde(default = "default_handoff_capacity")]
    pub handoff_capacity: usize,
}

fn default_true() -> bool {
    true
}

fn default_max_zip_entries() -> usize {
    10_000
}

fn default_max_uncompressed_bytes() -> u64 {
    16 << 30
}

fn default_max_compression_ratio() -> u64 {
    200
}

fn default_max_concurrent_uploads() -> usize {
    4
}

fn default_handoff_capacity() -> usize {
    16
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackgroundTasksConfig {
    #[serde(default)]
    pub tuf_repo_pruner: TufRepoPrunerConfig,
    #[serde(default)]
    pub tuf_artifact_replication: TufArtifactReplicationConfig,
    #[serde(default)]
    pub inventory_collection: InventoryCollectionConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryCollectionConfig {
    pub period_secs: u64,
    #[serde(default)]
    pub disabled: bool,
    /// Collections kept in the database; older ones are deleted.
    pub keep_collections: usize,
    pub max_concurrent_requests: usize,
    pub request_timeout_secs: u64,
}

impl Default for InventoryCollectionConfig {
    fn default() -> Self {
        InventoryCollectionConfig {
            period_secs: 60,
            disabled: false,
            keep_collections: 10,
            max_concurrent_requests: 16,
            request_timeout_secs: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TufArtifactReplicationConfig {
    pub period_secs: u64,
    #[serde(default)]
    pub disabled: bool,
    /// Staged artifacts are released once this many sleds hold them.
    pub min_sled_replication: usize,
    /// For racks with fewer sleds than `min_sled_replication` (development):
    /// release once every sled holds them.
    #[serde(default)]
    pub allow_fewer_sleds: bool,
    /// Control requests to sleds at once (config pushes, listings,
    /// inventories).
    pub max_concurrent_requests: usize,
    /// Artifact PUTs at once, each holding its permit for its whole
    /// transfer. They share this Nexus's one link: fewer, each faster,
    /// start their trees of copies sooner (16 sleds, 64 artifacts: 8 PUTs
    /// at once 1.60-1.87x the link bound, 16 at once 1.88-2.04x).
    #[serde(default = "default_max_concurrent_puts")]
    pub max_concurrent_puts: usize,
    /// Copy requests at once, on top: a sled answers one at once (it
    /// queues what it cannot start), but on a loaded link each answer waits
    /// out that link's queue, so a rack's worth of copies needs more in
    /// flight than PUTs do.
    #[serde(default = "default_max_concurrent_copy_requests")]
    pub max_concurrent_copy_requests: usize,
    pub ring_buffer_size: usize,
    /// Delay before the follow-up activation while work remains.
    pub followup_delay_millis: u64,
    /// How artifacts spread over the sleds: `pipelined` (chains through the
    /// sleds, each streaming what it receives), or the baselines
    /// `two_stage` and `star` (see the planner's module doc).
    #[serde(default)]
    pub fanout: crate::background::tasks::replication_plan::Fanout,
    /// After a failed request or a copy a sled reports failed, that (sled,
    /// artifact) is not asked again for this long, doubled with every
    /// further failure up to `backoff_max_secs`.
    pub backoff_base_millis: u64,
    pub backoff_max_secs: u64,
    pub request_timeout_secs: u64,
    /// Bounds one artifact PUT to a sled, body included.
    pub put_timeout_secs: u64,
}

fn default_max_concurrent_puts() -> usize {
    TufArtifactReplicationConfig::default().max_concurrent_puts
}

fn default_max_concurrent_copy_requests() -> usize {
    TufArtifactReplicationConfig::default().max_concurrent_copy_requests
}

impl Default for TufArtifactReplicationConfig {
    fn default() -> Self {
        TufArtifactReplicationConfig {
            period_secs: 60,
            disabled: false,
            min_sled_replication: 3,
            allow_fewer_sleds: false,
            max_concurrent_requests: 16,
            max_concurrent_puts: 8,
            max_concurrent_copy_requests: 64,
            ring_buffer_size: 64,
            followup_delay_millis: 1000,
            fanout: Default::default(),
            backoff_base_millis: 2000,
            backoff_max_secs: 300,
            request_timeout_secs: 30,
            put_timeout_secs: 600,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TufRepoPrunerConfig {
    pub period_secs: u64,
    /// Start disabled (it can be enabled at runtime through the internal API).
    #[serde(default)]
    pub disabled: bool,
    /// How many of the newest repositories to keep.
    pub nkeep: u32,
}

impl Default for TufRepoPrunerConfig {
    fn default() -> Self {
        TufRepoPrunerConfig { period_secs: 300, disabled: false, nkeep: 3 }
    }
}

pub use common::config::{ConfigError, ConfigFile};

impl ConfigFile for Config {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.database.max_connections == 0 {
            return Err(("database.max_connections", "must be at least 1".into()));
        }
        if self.database.failover_wait_secs == 0 {
            return Err(("database.failover_wait_secs", "must be at least 1".into()));
        }
        if self.external_api.request_body_max_bytes == 0 {
            return Err(("external_api.request_body_max_bytes", "must be at least 1".into()));
        }
        check_token_directories(&self.external_api.token_file)?;
        let internal = &self.internal_api;
        // to_canonical: ::ffff:127.0.0.1 is loopback too.
        if !internal.listen.ip().to_canonical().is_loopback() && !internal.expose_beyond_loopback {
            return Err((
                "internal_api.listen",
                format!(
                    "is {}, which is not a loopback address; the internal API has no authentication and \
                     must face only the rack's internal network, never operators or untrusted networks: \
                     listen on 127.0.0.1 (or ::1), or set internal_api.expose_beyond_loopback = true if \
                     this address is on the rack's internal network only",
                    internal.listen
                ),
            ));
        }
        let updates = &self.updates;
        for (key, value) in [
            ("updates.max_zip_entries", updates.max_zip_entries as u64),
            ("updates.max_uncompressed_bytes", updates.max_uncompressed_bytes),
            ("updates.max_compression_ratio", updates.max_compression_ratio),
            ("updates.handoff_capacity", updates.handoff_capacity as u64),
            ("updates.max_concurrent_uploads", updates.max_concurrent_uploads as u64),
            ("external_api.upload_idle_timeout_secs", self.external_api.upload_idle_timeout_secs),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        let replication = &self.background_tasks.tuf_artifact_replication;
        for (key, value) in [
            ("background_tasks.tuf_artifact_replication.period_secs", replication.period_secs),
            (
                "background_tasks.tuf_artifact_replication.min_sled_replication",
                replication.min_sled_replication as u64,
            ),
            (
                "background_tasks.tuf_artifact_replication.max_concurrent_requests",
                replication.max_concurrent_requests as u64,
            ),
            (
                "background_tasks.tuf_artifact_replication.max_concurrent_puts",
                replication.max_concurrent_puts as u64,
            ),
            (
                "background_tasks.tuf_artifact_replication.max_concurrent_copy_requests",
                replication.max_concurrent_copy_requests as u64,
            ),
            (
                "background_tasks.tuf_artifact_replication.ring_buffer_size",
                replication.ring_buffer_size as u64,
            ),
            (
                "background_tasks.tuf_artifact_replication.request_timeout_secs",
                replication.request_timeout_secs,
            ),
            ("background_tasks.tuf_artifact_replication.put_timeout_secs", replication.put_timeout_secs),
            (
                "background_tasks.tuf_artifact_replication.backoff_base_millis",
                replication.backoff_base_millis,
            ),
            ("background_tasks.tuf_artifact_replication.backoff_max_secs", replication.backoff_max_secs),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        let inventory = &self.background_tasks.inventory_collection;
        for (key, value) in [
            ("background_tasks.inventory_collection.period_secs", inventory.period_secs),
            ("background_tasks.inventory_collection.keep_collections", inventory.keep_collections as u64),
            (
                "background_tasks.inventory_collection.max_concurrent_requests",
                inventory.max_concurrent_requests as u64,
            ),
            ("background_tasks.inventory_collection.request_timeout_secs", inventory.request_timeout_secs),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        let pruner = &self.background_tasks.tuf_repo_pruner;
        if pruner.period_secs == 0 {
            return Err(("background_tasks.tuf_repo_pruner.period_secs", "must be at least 1".into()));
        }
        if pruner.nkeep == 0 {
            return Err((
                "background_tasks.tuf_repo_pruner.nkeep",
                "must be at least 1 (0 would prune every repository)".into(),
            ));
        }
        Ok(())
    }
}

/// Refuses a token file in a directory that anyone can write to without the
/// sticky bit: anyone could rename or replace the file there (or, for a
/// directory further up, the directories holding it). Directories that do
/// not exist yet are skipped: Nexus creates them, for its user only.
fn check_token_directories(token_file: &Utf8Path) -> Result<(), (&'static str, String)> {
    for dir in token_file.ancestors().skip(1) {
        let dir = if dir.as_str().is_empty() { Utf8Path::new(".") } else { dir };
        let Ok(metadata) = std::fs::metadata(dir) else { continue };
        let mode = metadata.permissions().mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err((
                "external_api.token_file",
                format!(
                    "{token_file} is under {dir} (mode {:04o}), which anyone can write to and which \
                     lacks the sticky bit, so anyone could replace the token file: put it in a directory \
                     only nexus's user can write (such as /var/lib/rack/nexus), or `chmod o-w {dir}`",
                    mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "test.toml";
    const MINIMAL: &str = r#"
        [database]
        url = "postgresql://postgres@127.0.0.1:5432/rack"
        [external_api]
        listen = "127.0.0.1:0"
        token_file = "/tmp/token"
        [updates]
        staging_dir = "/tmp/staging"
        [internal_api]
        listen = "127.0.0.1:0"
        [log]
        mode = "stderr-terminal"
        level = "info"
    "#;

    fn error_for(text: &str) -> String {
        Config::from_toml(Utf8Path::new(PATH), text).unwrap_err().to_string()
    }

    #[test]
    fn the_shipped_config_parses() {
        let path = Utf8Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/nexus/config.toml"));
        let config = Config::from_file(path).unwrap();
        assert_eq!(config.background_tasks.tuf_repo_pruner.nkeep, 3);
        assert!(config.internal_api.listen.ip().is_loopback());
        assert!(!config.internal_api.expose_beyond_loopback);
        for path in [&config.external_api.token_file, &config.updates.staging_dir] {
            assert!(path.starts_with("/var/lib/rack/nexus"), "{path} is not in nexus's state directory");
        }
    }

    fn with_internal_listen(address: &str) -> String {
        let from = "[internal_api]\n        listen = \"127.0.0.1:0\"";
        assert!(MINIMAL.contains(from));
        MINIMAL.replace(from, &format!("[internal_api]\n        listen = \"{address}\""))
    }

    #[test]
    fn the_internal_api_stays_on_loopback_unless_told_otherwise() {
        for address in ["0.0.0.0:12221", "[::]:12221", "192.0.2.7:12221", "[2001:db8::7]:12221"] {
            let text = with_internal_listen(address);
            let message = error_for(&text);
            assert!(
                message.contains("internal_api.listen")
                    && message.contains(address)
                    && message.contains("internal_api.expose_beyond_loopback"),
                "{message}"
            );

            let text = text.replace(
                &format!("listen = \"{address}\""),
                &format!("listen = \"{address}\"\n        expose_beyond_loopback = true"),
            );
            let config = Config::from_toml(Utf8Path::new(PATH), &text).unwrap();
            assert_eq!(config.internal_api.listen.to_string(), address);
        }
        for address in ["127.0.0.1:0", "127.0.0.2:0", "[::1]:0", "[::ffff:127.0.0.1]:0"] {
            Config::from_toml(Utf8Path::new(PATH), &with_internal_listen(address)).unwrap();
        }
    }

    #[test]
    fn a_token_file_in_a_directory_anyone_can_rename_in_is_refused() {
        let dir = camino_tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let with_token_in = |token_file: &Utf8Path| {
            MINIMAL.replace("token_file = \"/tmp/token\"", &format!("token_file = \"{token_file}\""))
        };
        for token_file in [open.join("operator-token"), open.join("not-yet/operator-token")] {
            let message = error_for(&with_token_in(&token_file));
            assert!(
                message.contains("external_api.token_file")
                    && message.contains(&format!("under {open} (mode 0777)"))
                    && message.contains("sticky"),
                "{message}"
            );
        }

        // The sticky bit (as on /tmp) lets only a file's owner rename it.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        Config::from_toml(Utf8Path::new(PATH), &with_token_in(&open.join("operator-token"))).unwrap();
        // A directory that does not exist yet is created by nexus, privately.
        Config::from_toml(Utf8Path::new(PATH), &with_token_in(Utf8Path::new("/nonexistent/operator-token")))
            .unwrap();
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = Config::from_toml(Utf8Path::new(PATH), MINIMAL).unwrap();
        assert_eq!(config.database.max_connections, 16);
        assert_eq!(config.database.failover_wait_secs, 10);
        assert_eq!(config.background_tasks.tuf_repo_pruner.period_secs, 300);
        assert_eq!(config.external_api.request_body_max_bytes, 4 << 30);
        assert!(config.updates.enforce_expiry);
    }

    #[test]
    fn bad_config_names_the_key_and_the_problem() {
        let misspelt =
            format!("{MINIMAL}\n[background_tasks.tuf_repo_pruner]\nperiod_secs = 5\nnkeep = 3\nnkep = 2\n");
        let message = error_for(&misspelt);
        assert!(message.contains(PATH) && message.contains("nkep"), "{message}");

        let zero = format!("{MINIMAL}\n[background_tasks.tuf_repo_pruner]\nperiod_secs = 5\nnkeep = 0\n");
        assert_eq!(
            error_for(&zero),
            "config file test.toml: background_tasks.tuf_repo_pruner.nkeep must be at least 1 (0 would prune every repository)"
        );

        let wrong_type = MINIMAL.replace("\"127.0.0.1:0\"", "\"not an address\"");
        let message = error_for(&wrong_type);
        assert!(message.contains("listen"), "{message}");

        let message = error_for("[database]\n");
        assert!(message.contains("url"), "{message}");
    }
}
