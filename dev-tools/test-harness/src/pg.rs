//! A private PostgreSQL server in a temp directory.
//!
//! The server listens on 127.0.0.1 on a free port, trusts local connections
//! (it is private to this machine and lives only as long as its owner), and
//! runs with `fsync=off`: its data is disposable by design.
//!
//! Lifetime. Three mechanisms make sure no server outlives its owner:
//! - [`PgServer::stop`] (also run on drop) stops it and removes its directory;
//! - the server is spawned by a thread that lives until the server exits, with
//!   `PR_SET_PDEATHSIG`, so the kernel kills it if the owning process dies
//!   (even by `kill -9`);
//! - [`PgServer::start`] first removes directories left behind by owners that
//!   no longer exist (and kills their servers, should one survive).
//!
//! Binaries are found in `$PG_BIN_DIR`, then the newest
//! `/usr/lib/postgresql/*/bin`, then `PATH`. As root, the server runs as the
//! `postgres` user, since PostgreSQL refuses to run as root.
//!
//! A server is either created empty (initdb) or as a copy of a running one
//! (`pg_basebackup`, for a standby); [`crate::PgCluster`] builds on both.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Directory names are `rack-pg-<owner pid>-<random>`.
const DIR_PREFIX: &str = "rack-pg-";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// A port picked as free can be taken by someone else before the server binds
/// it; then we try another.
const START_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "no PostgreSQL server binaries (initdb, postgres) found in $PG_BIN_DIR, \
         /usr/lib/postgresql/*/bin or PATH; install them with \
         `apt-get install postgresql` or set PG_BIN_DIR"
    )]
    BinariesNotFound,
    #[error(
        "running as root, but there is no `postgres` user to run the PostgreSQL \
         server as (PostgreSQL refuses to run as root); `apt-get install \
         postgresql` creates it"
    )]
    NoPostgresUser,
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PostgreSQL server exited during start-up ({status}); its log {log} ends with:\n{tail}")]
    ExitedEarly { status: ExitStatus, log: PathBuf, tail: String },
    #[error("PostgreSQL server did not accept connections within {timeout:?}; see {log}")]
    NotReady { timeout: Duration, log: PathBuf },
    #[error("{program} for {data_dir} failed ({status}): {output}")]
    Tool { program: &'static str, data_dir: PathBuf, status: ExitStatus, output: String },
    #[error(
        "{streaming} of {expected} standbys were streaming synchronously from the primary after \
         {timeout:?}; see the logs in their directories: {dirs}"
    )]
    StandbysNotStreaming { streaming: i64, expected: usize, timeout: Duration, dirs: String },
    #[error(
        "{name} still runs as the primary: kill or stop it before promoting {standby} (two primaries \
         would both accept writes, and each would lose the other's)"
    )]
    PrimaryRunning { name: String, standby: String },
    #[error("no standby answered, so none can be promoted (tried {tried})")]
    NoStandbyReachable { tried: String },
    #[error("{name} is not a running standby ({role}); only a running standby can be promoted")]
    NotAStandby { name: String, role: &'static str },
    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// A running private PostgreSQL server. Dropping it stops the server and
/// removes its directory.
pub struct PgServer {
    port: u16,
    pid: libc::pid_t,
    exited: mpsc::Receiver<ExitStatus>,
    dir: Option<tempfile::TempDir>,
    stopped: bool,
    /// `-c name=value` settings beyond the common ones, kept for
    /// [`PgServer::resume`].
    settings: Vec<String>,
}

/// Where a new server's data comes from.
pub(crate) enum DataSource<'a> {
    /// An empty cluster (initdb).
    Initdb,
    /// A copy of the running server on `primary_port`, made with
    /// `pg_basebackup`, set up to stream from it as a standby through the
    /// physical replication slot `slot` (created on the primary).
    BaseBackup { primary_port: u16, slot: &'a str },
}

/// A standalone server's settings: nobody waits for a standby.
const STANDALONE_SETTINGS: &[&str] = &["synchronous_commit=off"];

impl PgServer {
    /// Creates a cluster in a new temp directory, starts the server and waits
    /// until it accepts connections.
    pub async fn start() -> Result<PgServer, PgError> {
        let settings: Vec<String> = STANDALONE_SETTINGS.iter().map(|s| s.to_string()).collect();
        Self::start_from(DataSource::Initdb, settings).await
    }

    /// Like [`PgServer::start`], with the data from `source` and `settings`
    /// (`name=value`) added to the common ones.
    pub(crate) async fn start_from(
        source: DataSource<'_>,
        mut settings: Vec<String>,
    ) -> Result<PgServer, PgError> {
        reap_leftovers();
        let bin_dir = find_bin_dir().ok_or(PgError::BinariesNotFound)?;
        let run_as = run_as_user()?;
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(|source| PgError::Io {
                what: "creating temp directory in",
                path: std::env::temp_dir(),
                source,
            })?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|source| PgError::Io {
                what: "giving the postgres user",
                path: dir.path().into(),
                source,
            })?;
        }
        match source {
            DataSource::Initdb => initdb(&bin_dir, dir.path(), run_as)?,
            DataSource::BaseBackup { primary_port, slot } => {
                base_backup(&bin_dir, dir.path(), run_as, primary_port, slot)?
            }
        }

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port(dir.path())?;
            let (pid, exited) = spawn_postgres(&bin_dir, dir.path(), port, run_as, &settings)?;
            let mut server = PgServer { port, pid, exited, dir: Some(dir), stopped: false, settings };
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(PgError::ExitedEarly { tail, .. })
                    if attempt < START_ATTEMPTS && tail.contains("could not bind") =>
                {
                    server.stopped = true;
                    dir = server.dir.take().expect("dir is only taken here and by stop");
                    settings = std::mem::take(&mut server.settings);
                }
                Err(error) => {
                    server.stop();
                    return Err(error);
                }
            }
        }
    }

    /// The URL of database `dbname` on this server, as the superuser.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, PgError> {
        execute(&self.url("postgres"), &format!("CREATE DATABASE {name}")).await?;
        Ok(self.url(name))
    }

    /// The server's own log file (inside its temp directory).
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("postgres.log")
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the directory lives until stop").path()
    }

    /// Stops the server but keeps its data, for tests of what clients do
    /// while the database is down. [`PgServer::resume`] starts it again.
    pub fn pause(&mut self) {
        self.halt();
    }

    /// Starts a paused server again, on the same port and data.
    pub async fn resume(&mut self) -> Result<(), PgError> {
        let bin_dir = find_bin_dir().ok_or(PgError::BinariesNotFound)?;
        let run_as = run_as_user()?;
        let (pid, exited) = spawn_postgres(&bin_dir, self.dir(), self.port, run_as, &self.settings)?;
        self.pid = pid;
        self.exited = exited;
        self.stopped = false;
        self.wait_ready().await
    }

    /// Kills the server with SIGKILL, as a crash of its machine would stop
    /// it: no shutdown checkpoint, nothing more sent to clients or standbys.
    /// Its backends exit on their own once they notice (PostgreSQL watches
    /// for the postmaster's death). The directory stays until
    /// [`PgServer::stop`] or drop.
    pub fn kill(&mut self) {
        if !self.stopped {
            self.stopped = true;
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.exited.recv_timeout(STOP_TIMEOUT);
        }
    }

    /// Turns this standby into a primary: `pg_ctl promote`, which waits
    /// until the server accepts writes (run on a blocking thread: it polls
    /// for seconds).
    pub(crate) async fn promote(&self) -> Result<(), PgError> {
        promote_dir(self.dir()).await
    }

    /// Stops the server (fast shutdown, then SIGKILL after a bound) and removes
    /// its directory. Idempotent.
    pub fn stop(&mut self) {
        self.halt();
        // Dropping the TempDir removes it.
        self.dir.take();
    }

    fn halt(&mut self) {
        if !self.stopped {
            self.stopped = true;
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.pid, libc::SIGINT) };
            if self.exited.recv_timeout(STOP_TIMEOUT).is_err() {
                // SAFETY: as above.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                let _ = self.exited.recv_timeout(STOP_TIMEOUT);
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<(), PgError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = self.url("postgres");
        loop {
            if let Ok(status) = self.exited.try_recv() {
                self.stopped = true;
                let log = self.log_path();
                return Err(PgError::ExitedEarly { status, tail: log_tail(&log), log });
            }
            if let Ok((client, connection)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                drop(client);
                let _ = connection.await;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PgError::NotReady { timeout: READY_TIMEOUT, log: self.log_path() });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the PostgreSQL server binaries are (see the module doc), for
/// instructions that name them.
pub fn bin_dir() -> Option<PathBuf> {
    find_bin_dir()
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return has_server(&dir).then_some(dir);
    }
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.pop() {
        return Some(dir);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).find(|dir| has_server(dir))
}

/// `pg_ctl promote` on the standby whose server directory (the one holding
/// `data/`) is `dir`; waits until it accepts writes (on a blocking thread:
/// pg_ctl polls for seconds).
pub(crate) async fn promote_dir(dir: &Path) -> Result<(), PgError> {
    let bin_dir = find_bin_dir().ok_or(PgError::BinariesNotFound)?;
    let run_as = run_as_user()?;
    let data_dir = dir.join("data");
    let mut command = command_as(bin_dir.join("pg_ctl"), dir, run_as);
    command.args(["promote", "--wait", "--timeout=60", "--pgdata"]).arg(&data_dir).stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("running pg_ctl does not panic")
        .map_err(|source| PgError::Io { what: "running pg_ctl in", path: bin_dir, source })?;
    check_tool("pg_ctl promote", data_dir, output)
}

/// The (uid, gid) to run the server as, if we are root.
fn run_as_user() -> Result<Option<(u32, u32)>, PgError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL in a literal");
    // SAFETY: getpwnam returns NULL or a pointer to a static passwd entry; we
    // copy the two integers out before anything else can call it.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(PgError::NoPostgresUser);
    }
    // SAFETY: entry is non-null and points to a valid passwd struct.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

fn command_as(program: PathBuf, dir: &Path, run_as: Option<(u32, u32)>) -> Command {
    let mut command = Command::new(program);
    // The server user may not be able to read our working directory, and
    // initdb refuses to run where it cannot.
    command.current_dir(dir).env_remove("PGDATA");
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    command
}

fn initdb(bin_dir: &Path, dir: &Path, run_as: Option<(u32, u32)>) -> Result<(), PgError> {
    let data_dir = dir.join("data");
    let output = command_as(bin_dir.join("initdb"), dir, run_as)
        .arg("--pgdata")
        .arg(&data_dir)
        .args(["--username=postgres", "--auth=trust", "--encoding=UTF8", "--locale=C"])
        .args(["--no-sync", "--no-instructions"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PgError::Io { what: "running initdb in", path: bin_dir.into(), source })?;
    check_tool("initdb", data_dir, output)
}

/// Copies the running server on `primary_port` into `dir/data` and sets it
/// up as its standby: `-R` writes `standby.signal` and `primary_conninfo`,
/// `-C -S` creates the replication slot that keeps the WAL it still needs
/// on the primary. `--checkpoint=fast`: a spread checkpoint would make the
/// copy wait for minutes.
fn base_backup(
    bin_dir: &Path,
    dir: &Path,
    run_as: Option<(u32, u32)>,
    primary_port: u16,
    slot: &str,
) -> Result<(), PgError> {
    let data_dir = dir.join("data");
    let output = command_as(bin_dir.join("pg_basebackup"), dir, run_as)
        .args(["--host=127.0.0.1", &format!("--port={primary_port}"), "--username=postgres"])
        .arg("--pgdata")
        .arg(&data_dir)
        .args(["--wal-method=stream", "--write-recovery-conf", "--create-slot", &format!("--slot={slot}")])
        .args(["--checkpoint=fast", "--no-sync"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PgError::Io { what: "running pg_basebackup in", path: bin_dir.into(), source })?;
    check_tool("pg_basebackup", data_dir, output)
}

fn check_tool(program: &'static str, data_dir: PathBuf, output: std::process::Output) -> Result<(), PgError> {
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(PgError::Tool { program, data_dir, status: output.status, output: text })
}

fn free_port(dir: &Path) -> Result<u16, PgError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| PgError::Io { what: "finding a free port for", path: dir.into(), source })
}

/// Spawns the server from a dedicated thread that waits for it, so that
/// `PR_SET_PDEATHSIG` (which fires when the spawning *thread* ends) fires only
/// when this process dies. Returns the pid and a channel that yields the exit
/// status.
fn spawn_postgres(
    bin_dir: &Path,
    dir: &Path,
    port: u16,
    run_as: Option<(u32, u32)>,
    settings: &[String],
) -> Result<(libc::pid_t, mpsc::Receiver<ExitStatus>), PgError> {
    let log_path = dir.join("postgres.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| PgError::Io { what: "opening server log", path: log_path.clone(), source })?;
    let log_err = log.try_clone().map_err(|source| PgError::Io {
        what: "opening server log",
        path: log_path.clone(),
        source,
    })?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(&log_path, Some(uid), Some(gid)).map_err(|source| PgError::Io {
            what: "giving the postgres user",
            path: log_path,
            source,
        })?;
    }
    let mut command = command_as(bin_dir.join("postgres"), dir, run_as);
    command
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-k")
        .arg(dir)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
        .args(["-c", "max_connections=400"])
        .args(settings.iter().flat_map(|setting| ["-c", setting.as_str()]))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let (spawned_tx, spawned_rx) = mpsc::channel();
    let (exited_tx, exited_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("postgres-{port}"))
        .spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = spawned_tx.send(Ok(child.id() as libc::pid_t));
                if let Ok(status) = child.wait() {
                    let _ = exited_tx.send(status);
                }
            }
            Err(error) => {
                let _ = spawned_tx.send(Err(error));
            }
        })
        .map_err(|source| PgError::Io { what: "starting a thread for", path: dir.into(), source })?;
    let pid = spawned_rx
        .recv()
        .expect("the spawning thread always reports")
        .map_err(|source| PgError::Io { what: "starting postgres in", path: bin_dir.into(), source })?;
    Ok((pid, exited_rx))
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    let _ = fs::File::open(path).and_then(|mut file| file.read_to_string(&mut text));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Removes server directories whose owning process is gone, killing their
/// server if it somehow still runs. A killed test run must not break the next.
fn reap_leftovers() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(owner) = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let postmaster = fs::read_to_string(entry.path().join("data/postmaster.pid")).unwrap_or_default();
        if let Some(pid) = postmaster.lines().next().and_then(|line| line.trim().parse::<i32>().ok()) {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "postgres" {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = fs::remove_dir_all(entry.path());
    }
}

/// Runs `sql` (one or more statements) on a fresh connection, closed after.
pub(crate) async fn execute(url: &str, sql: &str) -> Result<(), PgError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|source| PgError::Sql { context: format!("connecting to {url}"), source })?;
    let connection = tokio::spawn(connection);
    let result = client
        .batch_execute(sql)
        .await
        .map_err(|source| PgError::Sql { context: format!("running SQL on {url}"), source });
    drop(client);
    let _ = connection.await;
    result
}
