//! `rack-dev run-all`: a whole rack on this machine.
//!
//! Starts (or uses) PostgreSQL, brings its schema up to date, then starts
//! each Nexus and each simulated sled agent as a child process with the real
//! config files from `smf/` (ports, paths and serials filled in), waits until
//! every sled has registered, writes the discovery file that the CLIs read,
//! and prints where everything is.
//!
//! Stopping: SIGINT or SIGTERM stops the sleds, then Nexus, then PostgreSQL,
//! and removes the run directory (unless `--dir` named one). If a child
//! exits on its own, that is reported and the rest are stopped the same way.
//! Children get `PR_SET_PDEATHSIG`, so even a `kill -9` of run-all leaves
//! none behind.
//!
//! With `--netns`, each Nexus and each sled runs in a network namespace of
//! its own on a private subnet, with per-link limits (see [`crate::netns`]);
//! without it, everything shares loopback.
//!
//! With `--db-standbys N`, the private PostgreSQL is a primary and N
//! synchronous streaming-replication standbys ([`PgCluster`]), and Nexus
//! gets a multi-host URL with `target_session_attrs=read-write`: after an
//! operator kills the primary and promotes a standby (the banner says how),
//! Nexus finds the new primary by itself. With `--netns` too, each server
//! gets a relay of its own on the bridge and the URL lists the relays.

use crate::netns::{LinkLimits, Network};
use crate::operator::wait_for_http;
use anyhow::{Context, bail};
use camino::{Utf8Path, Utf8PathBuf};
use clap::Args;
use common::discovery::{NexusEndpoints, RackDiscovery, SledEndpoints};
use nexus::auth::OperatorToken;
use nexus::db::DataStore;
use nexus::db::datastore::PoolConfig;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use test_harness::PgCluster;
use tokio::signal::unix::{SignalKind, signal};

const SMF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../smf");
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct RunAllArgs {
    /// Simulated sleds to run.
    #[arg(long, default_value_t = 4)]
    sleds: usize,
    /// Nexus instances to run (all on the same database).
    #[arg(long, default_value_t = 1)]
    nexus: usize,
    /// Use this database instead of starting a private PostgreSQL. It may
    /// name several servers: `postgresql://h1:p1,h2:p2/rack?target_session_attrs=read-write`.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Give the private PostgreSQL this many synchronous streaming-replication
    /// standbys, each with its own directory and port.
    #[arg(long, default_value_t = 0, conflicts_with = "database_url")]
    db_standbys: usize,
    /// Log level of every process: trace, debug, info, warn, error.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Keep everything in this directory (kept at exit) instead of a temp
    /// directory (removed at exit).
    #[arg(long)]
    dir: Option<Utf8PathBuf>,
    /// Put each Nexus and each sled in its own network namespace, joined by
    /// a bridge (needs root). Without it, everything shares loopback.
    #[arg(long)]
    netns: bool,
    /// With --netns: each host's link rate, in Mbit/s.
    #[arg(long, requires = "netns")]
    link_mbit: Option<u32>,
    /// With --netns: each host's link delay, one way, in milliseconds.
    #[arg(long, requires = "netns")]
    link_delay_ms: Option<u32>,
    /// With --netns: each host's packet loss, in percent.
    #[arg(long, requires = "netns")]
    link_loss_pct: Option<f32>,
}

/// The well-known ports, used as-is inside namespaces (each has its own).
const NEXUS_EXTERNAL_PORT: u16 = 12220;
const NEXUS_INTERNAL_PORT: u16 = 12221;
const SLED_API_PORT: u16 = 12345;
const SLED_DEPOT_PORT: u16 = 12346;
/// The first database server's relay; the next servers' follow.
const DATABASE_RELAY_PORT: u16 = 5432;

/// A child process and where its output goes.
struct Process {
    name: String,
    child: Child,
    log: Utf8PathBuf,
    /// How it was started, to start it again ([`Rack::restart`]).
    binary: &'static str,
    config: Utf8PathBuf,
    namespace: Option<std::os::fd::OwnedFd>,
}

/// How to start a rack; run-all's flags, and what benchmarks change.
pub struct RackOptions {
    pub sleds: usize,
    pub nexus: usize,
    pub database_url: Option<String>,
    pub log_level: String,
    pub dir: Option<Utf8PathBuf>,
    /// Extra Nexus config settings: key path and value.
    pub nexus_settings: Vec<(Vec<&'static str>, toml::Value)>,
    /// Namespaces and link limits, or loopback for everything.
    pub netns: Option<LinkLimits>,
}

/// A running rack. [`Rack::stop`] stops it; dropping it without stopping
/// still kills the children (they die with their parent).
pub struct Rack {
    pub discovery: RackDiscovery,
    pub token: String,
    processes: Vec<Process>,
    postgres: Option<PgCluster>,
    /// Dropped after the processes are stopped.
    network: Option<Network>,
    /// Removed with the rack, unless it failed to start; none if the run
    /// directory was named (it is kept).
    temp_dir: Option<camino_tempfile::Utf8TempDir>,
}

impl Rack {
    pub async fn start(options: &RackOptions) -> anyhow::Result<Rack> {
        Self::start_replicated(options, 0).await
    }

    /// [`Rack::start`], with `db_standbys` synchronous standbys of the
    /// private PostgreSQL (none if `options` names a database).
    pub async fn start_replicated(options: &RackOptions, db_standbys: usize) -> anyhow::Result<Rack> {
        if options.nexus == 0 {
            bail!("--nexus must be at least 1");
        }
        let (run_dir, temp_dir) = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
                (dir.clone(), None)
            }
            None => {
                let temp = camino_tempfile::Builder::new()
                    .prefix("rack-run-")
                    .tempdir()
                    .context("creating a run directory")?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        std::fs::create_dir_all(run_dir.join("logs"))?;
        let mut postgres = None;
        let mut network = match options.netns {
            Some(_) => Some(Network::create(std::process::id())?),
            None => None,
        };
        let database_url = match &options.database_url {
            Some(url) => url.clone(),
            None => {
                let cluster = PgCluster::start(db_standbys).await.context("starting PostgreSQL")?;
                let url = cluster.create_database("rack").await.context("creating the rack database")?;
                postgres = Some(cluster);
                url
            }
        };
        crate::upgrade(&database_url).await?;
        // Namespaced Nexus instances reach the private servers (on loopback
        // here) through one relay each on the bridge. A relay to a dead
        // server closes what it accepts, so a client moves on to the next
        // host as it would from a refused connection.
        let nexus_database_url = match (&mut network, &postgres) {
            (Some(network), Some(cluster)) => {
                let mut relays = Vec::new();
                for (index, member) in cluster.members().enumerate() {
                    let port = DATABASE_RELAY_PORT + u16::try_from(index)?;
                    network.relay(port, ([127, 0, 0, 1], member.port).into()).await?;
                    relays.push(format!("{}:{port}", network.gateway));
                }
                cluster.url_through("rack", &relays)
            }
            _ => database_url.clone(),
        };
        let token_file = run_dir.join("operator-token");
        let (token, _) = OperatorToken::load_or_create(&token_file)?;
        let database_servers = postgres
            .iter()
            .flat_map(|cluster| cluster.members())
            .map(|member| common::discovery::DatabaseServer {
                name: member.name.to_string(),
                port: member.port,
                dir: member.dir.display().to_string(),
            })
            .collect();
        let mut rack = Rack {
            discovery: RackDiscovery {
                run_dir: run_dir.to_string(),
                database_url,
                token_file: token_file.to_string(),
                nexus: Vec::new(),
                sleds: Vec::new(),
                network: None,
                database_servers,
            },
            token: token.as_str().to_string(),
            processes: Vec::new(),
            postgres,
            network,
            temp_dir,
        };
        if let Err(error) = rack.start_processes(options, &nexus_database_url).await {
            // The error points at the logs: they must outlive it.
            if let Some(temp_dir) = rack.temp_dir.take() {
                let _kept = temp_dir.keep();
            }
            rack.stop();
            return Err(error);
        }
        Ok(rack)
    }

    /// The private PostgreSQL servers, to kill and promote them.
    pub fn database(&mut self) -> Option<&mut PgCluster> {
        self.postgres.as_mut()
    }

    /// The pid of a child ("nexus-0", "sled-3").
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes.iter().find(|p| p.name == name).map(|p| p.child.id())
    }

    /// Kills child `name` ("sled-3") with SIGKILL, as a crash would.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.process(name)?;
        process.child.kill().with_context(|| format!("killing {name}"))?;
        process.child.wait().with_context(|| format!("reaping {name}"))?;
        Ok(())
    }

    /// Starts killed child `name` again, on the same config, log and
    /// namespace (and so the same M.2s and addresses).
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.process(name)?;
        let namespace = process.namespace.take();
        let (binary, config, log) = (process.binary, process.config.clone(), process.log.clone());
        *process = spawn(name.to_string(), binary, &config, &log, namespace)?;
        Ok(())
    }

    fn process(&mut self, name: &str) -> anyhow::Result<&mut Process> {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process {name} in this rack"))
    }

    /// A child that exited on its own, described.
    pub fn first_exited(&mut self) -> Option<String> {
        first_exited(&mut self.processes)
    }

    /// Changes one host's link limits (`s0` is the first sled); only with
    /// `--netns`.
    pub fn limit_host(&self, name: &str, limits: LinkLimits) -> anyhow::Result<()> {
        self.host(name)?.limit(limits)
    }

    /// Bytes host `name` (`n0`, `s3`...) has sent over its link.
    pub fn host_sent_bytes(&self, name: &str) -> anyhow::Result<u64> {
        self.host(name)?.sent_bytes()
    }

    fn host(&self, name: &str) -> anyhow::Result<&crate::netns::Host> {
        let network = self.network.as_ref().context("hosts with links need --netns")?;
        let host = network.hosts().iter().find(|host| host.name == name);
        host.with_context(|| format!("no host {name} in this rack"))
    }

    /// Stops sleds, then Nexus, then PostgreSQL; removes the run directory
    /// unless it was named.
    pub fn stop(mut self) {
        stop_all(&mut self.processes);
        drop(self.network.take());
        drop(self.postgres.take());
        // The temp directory (if any) is removed as `self` drops here.
    }

    /// Where a process listens: its own namespace's address and a fixed
    /// port, or loopback and a free port.
    fn place(&mut self, host: &str, fixed: &[u16], limits: Option<LinkLimits>) -> anyhow::Result<Placement> {
        match (&mut self.network, limits) {
            (Some(network), Some(limits)) => {
                let host = network.add_host(host, limits)?;
                Ok(Placement {
                    ip: host.address.into(),
                    ports: fixed.to_vec(),
                    namespace: Some(host.namespace_fd()?),
                })
            }
            _ => Ok(Placement {
                ip: std::net::Ipv4Addr::LOCALHOST.into(),
                ports: fixed.iter().map(|_| free_port()).collect::<anyhow::Result<_>>()?,
                namespace: None,
            }),
        }
    }

    async fn start_processes(&mut self, options: &RackOptions, database_url: &str) -> anyhow::Result<()> {
        let run_dir = Utf8PathBuf::from(&self.discovery.run_dir);
        for index in 0..options.nexus {
            let placement =
                self.place(&format!("n{index}"), &[NEXUS_EXTERNAL_PORT, NEXUS_INTERNAL_PORT], options.netns)?;
            let (ip, external, internal) = (placement.ip, placement.ports[0], placement.ports[1]);
            let dir = run_dir.join(format!("nexus-{index}"));
            std::fs::create_dir_all(&dir)?;
            let log = run_dir.join(format!("logs/nexus-{index}.log"));
            let mut config = load_smf("nexus/config.toml")?;
            set(&mut config, &["database", "url"], database_url.into());
            set(&mut config, &["external_api", "listen"], format!("{ip}:{external}").into());
            set(&mut config, &["external_api", "token_file"], self.discovery.token_file.clone().into());
            set(&mut config, &["internal_api", "listen"], format!("{ip}:{internal}").into());
            if placement.namespace.is_some() {
                // The rack's own network: sleds in other namespaces register.
                set(&mut config, &["internal_api", "expose_beyond_loopback"], true.into());
            }
            set(&mut config, &["updates", "staging_dir"], dir.join("staging").as_str().into());
            set_log(&mut config, &log, &options.log_level);
            let min = config["background_tasks"]["tuf_artifact_replication"]["min_sled_replication"]
                .as_integer()
                .unwrap_or(3);
            if (options.sleds as i64) < min {
                // A small development rack: release staged artifacts once
                // every sled holds them.
                set(
                    &mut config,
                    &["background_tasks", "tuf_artifact_replication", "allow_fewer_sleds"],
                    true.into(),
                );
            }
            for (keys, value) in &options.nexus_settings {
                set(&mut config, keys, value.clone());
            }
            let config_path = write_config(&dir, &config)?;
            let process = spawn(format!("nexus-{index}"), "nexus", &config_path, &log, placement.namespace)?;
            self.processes.push(process);
            let internal_url = format!("http://{ip}:{internal}");
            wait_for_http(&format!("{internal_url}/bgtasks"), READY_TIMEOUT)
                .await
                .with_context(|| format!("nexus-{index} did not start; see {log}"))?;
            self.discovery.nexus.push(NexusEndpoints {
                external_url: format!("http://{ip}:{external}"),
                internal_url,
                log: log.to_string(),
            });
        }

        for index in 0..options.sleds {
            let placement =
                self.place(&format!("s{index}"), &[SLED_API_PORT, SLED_DEPOT_PORT], options.netns)?;
            let (ip, api, depot) = (placement.ip, placement.ports[0], placement.ports[1]);
            let dir = run_dir.join(format!("sled-{index}"));
            let log = run_dir.join(format!("logs/sled-{index}.log"));
            let mut config = load_smf("sled-agent/config.toml")?;
            let serial = format!("sim-{index}");
            set(&mut config, &["serial"], serial.clone().into());
            let nexus = &self.discovery.nexus[index % self.discovery.nexus.len()];
            set(&mut config, &["nexus_internal_url"], nexus.internal_url.clone().into());
            set(&mut config, &["registration_period_secs"], 5.into());
            set(&mut config, &["sled_agent_api", "listen"], format!("{ip}:{api}").into());
            set(&mut config, &["repo_depot", "listen"], format!("{ip}:{depot}").into());
            let m2_count = config["storage"]["m2_count"].as_integer().unwrap_or(2);
            let dirs: Vec<toml::Value> =
                (0..m2_count).map(|slot| dir.join(format!("m2-{slot}")).as_str().into()).collect();
            set(&mut config, &["storage", "m2_dirs"], toml::Value::Array(dirs));
            set_log(&mut config, &log, &options.log_level);
            std::fs::create_dir_all(&dir)?;
            let config_path = write_config(&dir, &config)?;
            let process =
                spawn(format!("sled-{index}"), "sled-agent", &config_path, &log, placement.namespace)?;
            self.processes.push(process);
            self.discovery.sleds.push(SledEndpoints {
                serial,
                api_url: format!("http://{ip}:{api}"),
                depot_url: format!("http://{ip}:{depot}"),
                log: log.to_string(),
            });
        }

        if let Some(network) = &self.network {
            self.discovery.network = Some(common::discovery::NetworkDiscovery {
                run_id: network.id,
                hosts: network.hosts().iter().map(|host| (host.name.clone(), host.address)).collect(),
            });
        }
        let datastore = DataStore::connect(
            &self.discovery.database_url,
            &PoolConfig { max_connections: 2, ..PoolConfig::default() },
        )
        .await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let registered = datastore.sled_list().await?.len();
            if registered >= options.sleds {
                return Ok(());
            }
            if let Some(exited) = first_exited(&mut self.processes) {
                bail!("{exited}");
            }
            if Instant::now() > deadline {
                bail!(
                    "only {registered} of {} sleds registered within {READY_TIMEOUT:?}; see the logs in {run_dir}/logs",
                    options.sleds
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub async fn run_all(args: RunAllArgs) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let options = RackOptions {
        sleds: args.sleds,
        nexus: args.nexus,
        database_url: args.database_url,
        log_level: args.log_level,
        dir: args.dir,
        nexus_settings: Vec::new(),
        netns: args.netns.then_some(LinkLimits {
            mbit: args.link_mbit,
            delay_ms: args.link_delay_ms,
            loss_pct: args.link_loss_pct,
        }),
    };
    let mut rack = Rack::start_replicated(&options, args.db_standbys).await?;
    rack.discovery.write().context("writing the discovery file")?;
    print_banner(&rack.discovery, &rack.token, rack.postgres.as_ref());
    let (reason, crashed) = loop {
        tokio::select! {
            _ = interrupt.recv() => break ("SIGINT".to_string(), false),
            _ = terminate.recv() => break ("SIGTERM".to_string(), false),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(exited) = rack.first_exited() {
                    eprintln!("{exited}; stopping the rest");
                    break (exited, true);
                }
            }
        }
    };
    // Whoever read the banner may have closed our stdout since (a pipe
    // read up to "Ready."): a failed write must not stop the clean-up.
    let say = |line: String| {
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    say(format!("stopping ({reason})"));
    let run_dir = rack.discovery.run_dir.clone();
    let kept = rack.temp_dir.is_none();
    rack.stop();
    RackDiscovery::remove();
    if kept {
        say(format!("stopped; kept {run_dir}"));
    } else {
        say(format!("stopped; removed {run_dir}"));
    }
    if crashed {
        bail!("the rack stopped because {reason}");
    }
    Ok(())
}

fn print_banner(discovery: &RackDiscovery, token: &str, postgres: Option<&PgCluster>) {
    println!("The rack is running.");
    println!("  run directory:   {}", discovery.run_dir);
    println!("  database:        {}", discovery.database_url);
    let servers: Vec<_> = postgres.iter().flat_map(|cluster| cluster.members()).collect();
    if let [server] = &servers[..] {
        println!("  database log:    {}", server.log.display());
    } else if servers.len() > 1 {
        for member in &servers {
            let label = format!("database {}:", member.name);
            println!("  {label:<16} {} on 127.0.0.1:{}", member.role.as_str(), member.port);
            println!("                   dir {}", member.dir.display());
            println!("                   log {}", member.log.display());
        }
        println!("  failover:        kill -9 the primary (its pid: line 1 of data/postmaster.pid), then");
        println!("                   rack-dev db-promote");
        // ANY 1: an acknowledged commit is on at least one standby, not
        // necessarily a given one.
        println!("                   which runs pg_ctl promote on the standby with the most WAL (promoting");
        println!("                   another can lose acknowledged uploads). Nexus follows by itself; the");
        println!("                   old primary is not to be restarted.");
    }
    for (index, nexus) in discovery.nexus.iter().enumerate() {
        println!("  nexus-{index}:         external {}  internal {}", nexus.external_url, nexus.internal_url);
        println!("                   log {}", nexus.log);
    }
    println!("  operator token:  {token}");
    println!("                   (in {})", discovery.token_file);
    for sled in &discovery.sleds {
        println!("  {:<16} api {}  depot {}", format!("{}:", sled.serial), sled.api_url, sled.depot_url);
    }
    println!("  logs:            {}/logs/ (bunyan JSON)", discovery.run_dir);
    println!();
    println!("In another terminal (target/debug on PATH), try:");
    println!("  tuf-forge keygen --out key.der");
    println!("  tuf-forge root --key key.der --out root.json");
    println!(
        "  tuf-forge repo --key key.der --root root.json --system-version 1.0.0 --artifact host:1.0.0:os:8MiB --out repo.zip"
    );
    println!("  rack-dev trust-root add root.json");
    println!("  rack-dev repo upload repo.zip");
    println!("  omdb nexus background-tasks show tuf_artifact_replication");
    println!("  omdb db validate artifact-replication");
    println!("(rack-dev and omdb find this rack through {}.)", common::discovery::path().display());
    println!("Ready. Press Ctrl-C to stop everything.");
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn load_smf(name: &str) -> anyhow::Result<toml::Table> {
    let path = format!("{SMF}/{name}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.parse().with_context(|| format!("parsing {path}"))
}

fn set(table: &mut toml::Table, keys: &[&str], value: toml::Value) {
    let (last, parents) = keys.split_last().expect("at least one key");
    let mut current = table;
    for key in parents {
        current = current
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("config sections are tables");
    }
    current.insert(last.to_string(), value);
}

fn set_log(config: &mut toml::Table, log: &Utf8Path, level: &str) {
    let mut table = toml::Table::new();
    table.insert("mode".into(), "file".into());
    table.insert("level".into(), level.into());
    table.insert("path".into(), log.as_str().into());
    table.insert("if_exists".into(), "append".into());
    config.insert("log".into(), toml::Value::Table(table));
}

fn write_config(dir: &Utf8Path, config: &toml::Table) -> anyhow::Result<Utf8PathBuf> {
    let path = dir.join("config.toml");
    std::fs::write(&path, toml::to_string(config)?).with_context(|| format!("writing {path}"))?;
    Ok(path)
}

/// A binary built beside this one.
pub fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("finding rack-dev's own path")?;
    let path = exe.parent().context("rack-dev's directory")?.join(name);
    if !path.exists() {
        bail!("{} is missing: build the workspace first (cargo build)", path.display());
    }
    Ok(path)
}

/// Where one process runs.
struct Placement {
    ip: std::net::IpAddr,
    ports: Vec<u16>,
    namespace: Option<std::os::fd::OwnedFd>,
}

fn spawn(
    name: String,
    binary: &'static str,
    config: &Utf8Path,
    log: &Utf8Path,
    namespace: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<Process> {
    let program = sibling_binary(binary)?;
    let output = std::fs::OpenOptions::new().create(true).append(true).open(log.with_extension("out"))?;
    let mut command = Command::new(&program);
    command.arg("--config").arg(config).stdin(Stdio::null()).stdout(output.try_clone()?).stderr(output);
    if let Some(namespace) = &namespace {
        crate::netns::enter_before_exec(&mut command, namespace);
    }
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    // The spawning thread is the main thread, which lives as long as
    // run-all, so the signal fires exactly when run-all dies.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().with_context(|| format!("starting {}", program.display()))?;
    Ok(Process { name, child, log: log.to_owned(), binary, config: config.to_owned(), namespace })
}

fn first_exited(processes: &mut [Process]) -> Option<String> {
    processes.iter_mut().find_map(|process| match process.child.try_wait() {
        Ok(Some(status)) => {
            Some(format!("{} exited unexpectedly ({status}); see {}", process.name, process.log))
        }
        _ => None,
    })
}

/// Stops sleds first, then Nexus (the reverse of start order): SIGTERM,
/// then SIGKILL after a bound.
fn stop_all(processes: &mut Vec<Process>) {
    while let Some(mut process) = processes.pop() {
        if let Ok(Some(_)) = process.child.try_wait() {
            continue;
        }
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(process.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match process.child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() > deadline => {
                    eprintln!("{} did not stop within {STOP_TIMEOUT:?}; killing it", process.name);
                    let _ = process.child.kill();
                    let _ = process.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
