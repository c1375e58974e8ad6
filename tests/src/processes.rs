//! The real `nexus` and `sled-agent` binaries as child processes, for tests
//! about processes: kills, crash points (failpoints) and restarts. Configs
//! are the shipped ones from `smf/` with ports, paths and URLs filled in. A
//! child is killed when its handle is dropped, so a failing test leaves no
//! process behind.

use crate::binary;
use camino::{Utf8Path, Utf8PathBuf};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running child process, killed (SIGKILL) when dropped.
pub struct Process {
    child: std::process::Child,
    /// What it printed at start-up, one entry per line.
    pub printed: Vec<String>,
}

impl Process {
    /// Starts `program --config config`, with `FAILPOINTS` set if given, and
    /// reads the first `lines` lines it prints.
    pub fn start(program: &str, config: &Utf8Path, lines: usize, failpoints: Option<&str>) -> Process {
        let mut command = Command::new(binary(program));
        command.arg("--config").arg(config).env_remove("RUST_BACKTRACE").stdout(Stdio::piped());
        command.stderr(Stdio::null());
        match failpoints {
            Some(failpoints) => command.env("FAILPOINTS", failpoints),
            None => command.env_remove("FAILPOINTS"),
        };
        let mut child = command.spawn().unwrap_or_else(|error| panic!("starting {program}: {error}"));
        let mut reader = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut printed = Vec::new();
        for _ in 0..lines {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            printed.push(line.trim().to_string());
        }
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Process { child, printed }
    }

    /// The rest of the start-up line that begins with `prefix`.
    pub fn after(&self, prefix: &str) -> &str {
        self.printed
            .iter()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {:?}", self.printed))
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to end on its own.
    pub fn wait(mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the process did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to die at a crash point (SIGABRT). A binary
    /// built without the `failpoints` feature never does: `cargo test
    /// --workspace` builds them with it.
    pub fn wait_for_crash(self, point: &str) {
        let status = self.wait(Duration::from_secs(30));
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "expected a crash at failpoint {point}, got {status:?} (was the binary built with the \
             failpoints feature? `cargo test --workspace` builds it so)"
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `nexus` binary and what it printed.
pub struct NexusProcess {
    pub process: Process,
    pub internal_url: String,
    pub external_url: String,
    pub token: String,
}

impl NexusProcess {
    /// Starts Nexus with the config at `dir/config.toml` (see
    /// [`write_nexus_config`]).
    pub fn start(dir: &Utf8Path, failpoints: Option<&str>) -> NexusProcess {
        NexusProcess::start_at(dir, dir, failpoints)
    }

    /// Starts Nexus with the config at `config_dir/config.toml` and its
    /// token and staging under `state_dir` (see [`write_nexus_config_at`]).
    pub fn start_at(config_dir: &Utf8Path, state_dir: &Utf8Path, failpoints: Option<&str>) -> NexusProcess {
        let process = Process::start("nexus", &config_dir.join("config.toml"), 2, failpoints);
        let internal_url = process.after("nexus internal API: ").to_string();
        let external_url = process.after("nexus external API: ").to_string();
        let token = std::fs::read_to_string(state_dir.join("operator-token")).unwrap();
        NexusProcess { process, internal_url, external_url, token }
    }

    pub fn external_client(&self) -> crate::external_client::Client {
        crate::external_client::authenticated(&self.external_url, &self.token)
    }

    pub fn internal_client(&self) -> common::clients::nexus_internal::Client {
        common::clients::nexus_internal::Client::new(&self.internal_url)
    }
}

/// Writes `dir/config.toml` from the shipped Nexus config: free loopback
/// ports, token and staging under `dir`, the given database, every task
/// period an hour (tests activate explicitly). `edit` may change the text
/// further.
pub fn write_nexus_config(dir: &Utf8Path, database_url: &str, edit: impl FnOnce(String) -> String) {
    write_nexus_config_at(dir, dir, database_url, edit);
}

/// [`write_nexus_config`] with the config in `config_dir` and the token and
/// staging under `state_dir`.
pub fn write_nexus_config_at(
    config_dir: &Utf8Path,
    state_dir: &Utf8Path,
    database_url: &str,
    edit: impl FnOnce(String) -> String,
) {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/nexus/config.toml")).unwrap();
    let text = shipped
        .replace("127.0.0.1:12221", "127.0.0.1:0")
        .replace("127.0.0.1:12220", "127.0.0.1:0")
        .replace("/var/lib/rack/nexus", state_dir.as_str())
        .replace("postgresql://postgres@127.0.0.1:5432/rack", database_url)
        .replace("period_secs = 60", "period_secs = 3600")
        .replace("period_secs = 300", "period_secs = 3600");
    std::fs::write(config_dir.join("config.toml"), edit(text)).unwrap();
}

/// A running `sled-agent` binary with M.2 directories that outlive it.
pub struct SledProcess {
    pub process: Process,
    pub sled_id: uuid::Uuid,
    pub api_url: String,
}

impl SledProcess {
    /// Starts a sled agent whose config is at `dir/config.toml` (see
    /// [`write_sled_config`]).
    pub fn start(dir: &Utf8Path, failpoints: Option<&str>) -> SledProcess {
        let process = Process::start("sled-agent", &dir.join("config.toml"), 2, failpoints);
        let sled_id = process.printed[0]
            .split_whitespace()
            .nth(1)
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no sled id in {:?}", process.printed));
        let api_url = process.after("sled-agent API: ").to_string();
        SledProcess { process, sled_id, api_url }
    }

    pub fn client(&self) -> crate::sled_agent_client::Client {
        crate::sled_agent_client::Client::new(&self.api_url)
    }
}

/// Writes `dir/config.toml` from the shipped sled-agent config: free
/// loopback ports, registration every second with the given Nexus, M.2s at
/// `dir/m2-0` and `dir/m2-1` (returned), a short copy read timeout.
pub fn write_sled_config(dir: &Utf8Path, nexus_internal_url: &str) -> [Utf8PathBuf; 2] {
    write_sled_config_at(dir, dir, nexus_internal_url)
}

/// [`write_sled_config`] with the config in `config_dir` and the M.2s at
/// `m2_parent/m2-0` and `m2_parent/m2-1`.
pub fn write_sled_config_at(
    config_dir: &Utf8Path,
    m2_parent: &Utf8Path,
    nexus_internal_url: &str,
) -> [Utf8PathBuf; 2] {
    let m2 = [m2_parent.join("m2-0"), m2_parent.join("m2-1")];
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../smf/sled-agent/config.toml"))
            .unwrap();
    let text = shipped
        .replace("127.0.0.1:12345", "127.0.0.1:0")
        .replace("127.0.0.1:12346", "127.0.0.1:0")
        .replace("http://127.0.0.1:12221", nexus_internal_url)
        .replace("registration_period_secs = 30", "registration_period_secs = 1")
        .replace("read_timeout_secs = 30", "read_timeout_secs = 2")
        .replace(
            "m2_dirs = [\"/var/lib/rack/sled-agent/m2-0\", \"/var/lib/rack/sled-agent/m2-1\"]",
            &format!("m2_dirs = [{:?}, {:?}]", m2[0], m2[1]),
        );
    std::fs::write(config_dir.join("config.toml"), text).unwrap();
    m2
}

/// `rack-dev run-all` as a child, with its discovery file in a directory of
/// the test's own. Dropping it stops the rack (SIGINT, then SIGKILL).
pub struct RunAll {
    child: std::process::Child,
    pub discovery: common::discovery::RackDiscovery,
    discovery_path: std::path::PathBuf,
    _scratch: camino_tempfile::Utf8TempDir,
}

impl RunAll {
    /// Starts `rack-dev run-all ARGS` and waits until it says Ready.
    pub fn start(args: &[&str]) -> RunAll {
        let scratch = camino_tempfile::tempdir().unwrap();
        let discovery_path = scratch.path().join("current.json").into_std_path_buf();
        let mut child = Command::new(binary("rack-dev"))
            .arg("run-all")
            .args(args)
            .env("RACK_DEV_CURRENT", &discovery_path)
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.by_ref().map_while(Result::ok).any(|line| line.starts_with("Ready."));
        if !ready {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            panic!("rack-dev run-all {args:?} did not get ready: {stderr}");
        }
        std::thread::spawn(move || lines.for_each(drop));
        let text = std::fs::read_to_string(&discovery_path).unwrap();
        let discovery = serde_json::from_str(&text).unwrap();
        RunAll { child, discovery, discovery_path, _scratch: scratch }
    }

    /// Runs `rack-dev ARGS` against this rack (e.g. `link down s1`).
    pub fn rack_dev(&self, args: &[&str]) -> String {
        let output = Command::new(binary("rack-dev"))
            .args(args)
            .env("RACK_DEV_CURRENT", &self.discovery_path)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert!(output.status.success(), "rack-dev {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(&self.discovery.token_file).unwrap().trim().to_string()
    }

    pub fn external_client(&self) -> crate::external_client::Client {
        crate::external_client::authenticated(&self.discovery.nexus[0].external_url, &self.token())
    }

    pub fn internal_client(&self) -> common::clients::nexus_internal::Client {
        common::clients::nexus_internal::Client::new(&self.discovery.nexus[0].internal_url)
    }
}

impl RunAll {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills run-all with SIGKILL (it cannot clean up) and reaps it.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes whose command line contains `needle`, as "pid: cmdline".
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

impl Drop for RunAll {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
