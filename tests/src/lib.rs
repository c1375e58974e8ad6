//! Set-up shared by the end-to-end tests.

use camino::Utf8Path;
use common::clients::nexus_internal;
use nexus::config::{Config, ConfigFile};
use nexus::server::Server;
use std::path::PathBuf;
use test_harness::TestDatabase;

/// A Nexus running in this process against a fresh database of its own, with
/// its real HTTP servers on free loopback ports.
pub struct TestNexus {
    pub db: TestDatabase,
    pub server: Server,
    pub log: TestLog,
    /// Staging area and token file.
    pub dir: camino_tempfile::Utf8TempDir,
    pub token: String,
}

impl TestNexus {
    pub async fn start() -> TestNexus {
        Self::start_with(|_| {}).await
    }

    /// Starts with the test config after `adjust` changed it.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestNexus {
        let db = TestDatabase::new().await;
        let dir = camino_tempfile::tempdir().unwrap();
        let mut config = test_config(db.url(), dir.path());
        adjust(&mut config);
        Self::start_on(db, dir, &config).await
    }

    /// Another Nexus on the same database, with its own staging area and
    /// ports (the operator token file is its own too).
    pub async fn start_sharing(db: &TestDatabase, adjust: impl FnOnce(&mut Config)) -> TestNexus {
        let dir = camino_tempfile::tempdir().unwrap();
        let mut config = test_config(db.url(), dir.path());
        adjust(&mut config);
        Self::start_on(db.clone(), dir, &config).await
    }

    /// Starts on an existing database and directory: for restarts.
    pub async fn start_on(db: TestDatabase, dir: camino_tempfile::Utf8TempDir, config: &Config) -> TestNexus {
        let log = TestLog::new("nexus");
        let server = Server::start(config, log.logger.clone()).await.expect("test Nexus starts");
        let token = std::fs::read_to_string(&config.external_api.token_file).unwrap();
        TestNexus { db, server, log, dir, token }
    }

    /// The config this Nexus runs with (rebuilt from its database and dir).
    pub fn config(&self) -> Config {
        test_config(self.db.url(), self.dir.path())
    }

    pub fn external_url(&self) -> String {
        format!("http://{}", self.server.external_address())
    }

    pub fn external_client(&self) -> external_client::Client {
        external_client::authenticated(&self.external_url(), &self.token)
    }

    pub fn staging_dir(&self) -> camino::Utf8PathBuf {
        self.dir.path().join("staging")
    }

    /// Activates a task and waits for an iteration that started after the
    /// activation (not a timer).
    pub async fn activate(&self, task: &str) -> common::bgtask::BackgroundTask {
        self.server.nexus().background.activate_and_wait(task).await.unwrap()
    }

    pub fn internal_url(&self) -> String {
        format!("http://{}", self.server.internal_address())
    }

    pub fn internal_client(&self) -> nexus_internal::Client {
        nexus_internal::Client::new(&self.internal_url())
    }
}

/// The shipped config (`smf/nexus/config.toml`) on loopback port 0, with its
/// files under `dir`, and task
/// periods long enough that only explicit activations run during a test.
pub fn test_config(database_url: &str, dir: &Utf8Path) -> Config {
    let path = Utf8Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/nexus/config.toml"));
    let mut config = Config::from_file(path).expect("the shipped config parses");
    config.database.url = database_url.to_string();
    config.internal_api.listen = "127.0.0.1:0".parse().unwrap();
    config.external_api.listen = "127.0.0.1:0".parse().unwrap();
    config.external_api.token_file = dir.join("operator-token");
    config.updates.staging_dir = dir.join("staging");
    config.background_tasks.tuf_repo_pruner.period_secs = 3600;
    config.background_tasks.tuf_artifact_replication.period_secs = 3600;
    config.background_tasks.inventory_collection.period_secs = 3600;
    config
}

pub use common::clients::external as external_client;

/// The log of a server a test runs in this process. It goes to a file of
/// its own and is printed only if the test fails (the test thread is
/// panicking when the server's owner is dropped), so that passing tests are
/// quiet and failing ones show what the servers said.
pub struct TestLog {
    pub logger: slog::Logger,
    name: String,
    file: camino_tempfile::NamedUtf8TempFile,
}

impl TestLog {
    pub fn new(name: &str) -> TestLog {
        use slog::Drain;
        let file = camino_tempfile::Builder::new().prefix("test-log-").tempfile().unwrap();
        let writer = file.reopen().unwrap();
        let decorator = slog_term::PlainSyncDecorator::new(writer);
        let drain = slog_term::FullFormat::new(decorator).build().filter_level(slog::Level::Info).fuse();
        TestLog { logger: slog::Logger::root(drain, slog::o!()), name: name.to_string(), file }
    }

    pub fn path(&self) -> &camino::Utf8Path {
        self.file.path()
    }
}

impl Drop for TestLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(self.file.path()).unwrap_or_default();
            eprintln!(
                "---- log of {} (the test failed) ----\n{text}---- end of log of {} ----",
                self.name, self.name
            );
        }
    }
}

/// A logger for a server a test starts itself; see [`TestLog`] for one that
/// is printed when the test fails. This one keeps nothing.
pub fn test_log() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// A workspace binary, built by `cargo test --workspace` before any test runs.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("the test knows its own path");
    let path = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p {name}` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// A sled agent running in this process, with temp-directory M.2s and its
/// real HTTP servers on free loopback ports.
pub struct TestSled {
    pub server: sled_agent::server::Server,
    pub log: TestLog,
}

impl TestSled {
    pub async fn start(nexus_internal_url: &str) -> TestSled {
        Self::start_with(nexus_internal_url, |_| {}).await
    }

    pub async fn start_with(
        nexus_internal_url: &str,
        adjust: impl FnOnce(&mut sled_agent::config::Config),
    ) -> TestSled {
        let mut config = test_sled_config(nexus_internal_url);
        adjust(&mut config);
        let log = TestLog::new("sled agent");
        let server = sled_agent::server::Server::start(&config, log.logger.clone())
            .await
            .expect("test sled agent starts");
        TestSled { server, log }
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.server.api_address())
    }

    pub fn depot_url(&self) -> String {
        format!("http://{}", self.server.depot_address())
    }

    pub fn client(&self) -> sled_agent_client::Client {
        sled_agent_client::Client::new(&self.api_url())
    }
}

pub use common::clients::sled_agent as sled_agent_client;

/// The shipped sled-agent config on loopback port 0, with temp M.2s, a
/// 64 MiB quota, fast registration and a short copy read timeout.
pub fn test_sled_config(nexus_internal_url: &str) -> sled_agent::config::Config {
    let path = Utf8Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/sled-agent/config.toml"));
    let mut config =
        <sled_agent::config::Config as ConfigFile>::from_file(path).expect("the shipped config parses");
    config.nexus_internal_url = nexus_internal_url.to_string();
    config.sled_agent_api.listen = "127.0.0.1:0".parse().unwrap();
    config.repo_depot.listen = "127.0.0.1:0".parse().unwrap();
    config.storage.artifact_quota_bytes = 64 << 20;
    // Temp-directory M.2s, removed with the sled.
    config.storage.m2_dirs = Vec::new();
    config.registration_period_secs = 1;
    config.copy.read_timeout_secs = 2;
    config
}

pub mod fake_depot;

pub mod repos;

pub mod rack;

pub mod processes;

pub mod synthetic;
