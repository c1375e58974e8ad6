//! `rack-dev bench ...`: performance, measured. Each benchmark prints a table
//! and one JSON line (`BENCH {...}`), and compares itself with a baseline
//! measured in the same run on the same machine: speed is reported as a
//! ratio to what the machine can do at best, never asserted.

use crate::run_all::{Rack, RackOptions};
use anyhow::{Context, bail};
use clap::Subcommand;
use common::api::sled_agent::M2State;
use common::bgtask::LastResult;
use common::bgtask::details::TufArtifactReplicationStatus;
use common::clients::{external, nexus_internal, sled_agent};
use std::io::Write;
use std::time::{Duration, Instant};
use tabled::Tabled;
use tabled::settings::Style;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Upload throughput and Nexus's peak memory, against sha256sum + cp.
    Upload {
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
    },
    /// Time from upload to every sled holding everything. On loopback,
    /// against plain copies of the same bytes to every M.2; with --netns,
    /// against repository / link rate, for each fan-out (a PNG plot goes to
    /// --out).
    Replicate {
        /// Sled counts, e.g. 8,16,32 (--netns runs each).
        #[arg(long, value_delimiter = ',', default_value = "4")]
        sleds: Vec<usize>,
        #[arg(long, default_value_t = 64)]
        repo_mib: u64,
        /// Artifact counts the repository is split into, e.g. 4,16,64
        /// (--netns runs each; without it, one count).
        #[arg(long, value_delimiter = ',', default_value = "4")]
        artifacts: Vec<u64>,
        /// Each sled and Nexus in a network namespace with a limited link.
        #[arg(long)]
        netns: bool,
        #[arg(long, default_value_t = 100, requires = "netns")]
        link_mbit: u32,
        /// With --netns: the first sled's link runs at this rate instead.
        #[arg(long, requires = "netns")]
        slow_sled_mbit: Option<u32>,
        /// With --netns: the first sled's link loses this percentage of
        /// packets.
        #[arg(long, requires = "netns")]
        lossy_sled_pct: Option<f32>,
        /// With --netns: kill the second sled this many seconds after the
        /// upload, and restart it as long again later.
        #[arg(long, requires = "netns")]
        kill_sled_at: Option<f64>,
        /// With --netns: the fan-outs to compare.
        #[arg(long, value_delimiter = ',', default_value = "pipelined,two_stage,star")]
        fanouts: Vec<String>,
        /// Where the plot goes.
        #[arg(long, default_value = "target/bench")]
        out: camino::Utf8PathBuf,
        /// With --netns: run each rack in a directory under this one and
        /// keep it, with info-level logs (per-copy sources, moves off slow
        /// sources), for reading afterwards.
        #[arg(long, requires = "netns")]
        keep_logs: Option<camino::Utf8PathBuf>,
        /// With --netns: runs of each case, each reported, with the median
        /// of the case's runs (one run can be off by a quarter of the
        /// bound on a loaded machine).
        #[arg(long, default_value_t = 1, requires = "netns")]
        repeat: usize,
        /// With --netns: also run each case with no link limit, the
        /// machine's own floor for it (its CPU and disk set the pace), and
        /// report each run against the larger of that and the link bound.
        #[arg(long, requires = "netns")]
        machine_floor: bool,
    },
    /// Background task activation latency and status query latency.
    Bgtask {
        #[arg(long, default_value_t = 1000)]
        activations: usize,
    },
    /// Upload latency with and without a synchronous database standby, and
    /// what a failover of the database primary costs clients.
    Failover {
        /// Uploads per latency sample (each rack).
        #[arg(long, default_value_t = 30)]
        uploads: usize,
        /// Time from the kill of the primary to the promotion of the standby.
        #[arg(long, default_value_t = 1000)]
        promote_after_ms: u64,
    },
    /// A sled's start-up with and without the verification cache, with
    /// `--gib` of artifacts on each M.2 (in the temp directory: twice that
    /// on disk).
    Startup {
        #[arg(long, default_value_t = 8)]
        gib: u64,
        #[arg(long, default_value_t = 256)]
        artifact_mib: u64,
    },
    /// The replication planner's time on a large inventory.
    Plan {
        #[arg(long, default_value_t = 32)]
        sleds: usize,
        #[arg(long, default_value_t = 64)]
        artifacts: usize,
        #[arg(long, default_value_t = 4)]
        repos: usize,
    },
}

#[derive(Tabled)]
struct Row {
    #[tabled(rename = "MEASURE")]
    measure: String,
    #[tabled(rename = "VALUE")]
    value: String,
}

pub(crate) fn report(name: &str, rows: Vec<(&str, String)>, json: serde_json::Value) {
    let table =
        tabled::Table::new(rows.into_iter().map(|(measure, value)| Row { measure: measure.into(), value }))
            .with(Style::blank())
            .to_string();
    println!("bench {name}\n{table}");
    println!("BENCH {}", serde_json::json!({"bench": name, "results": json}));
}

pub async fn bench(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Upload { size_mib } => upload(size_mib).await,
        BenchCommand::Replicate {
            sleds,
            repo_mib,
            artifacts,
            netns: true,
            link_mbit,
            slow_sled_mbit,
            lossy_sled_pct,
            kill_sled_at,
            fanouts,
            out,
            keep_logs,
            repeat,
            machine_floor,
        } => {
            crate::bench_fanout::replicate_on_a_network(crate::bench_fanout::FanoutOptions {
                sled_counts: sleds,
                link_mbit,
                repo_mib,
                artifact_counts: artifacts,
                odd_sled: crate::netns::LinkLimits {
                    mbit: slow_sled_mbit,
                    delay_ms: None,
                    loss_pct: lossy_sled_pct,
                },
                kill_sled_at,
                fanouts,
                out,
                keep_logs,
                repeat,
                machine_floor,
            })
            .await
        }
        BenchCommand::Replicate { sleds, repo_mib, artifacts, netns: false, .. } => {
            let ([sleds], [artifacts]) = (&sleds[..], &artifacts[..]) else {
                bail!("without --netns, --sleds and --artifacts take one count each")
            };
            replicate(*sleds, repo_mib, *artifacts).await
        }
        BenchCommand::Bgtask { activations } => bgtask(activations).await,
        BenchCommand::Plan { sleds, artifacts, repos } => plan(sleds, artifacts, repos),
        BenchCommand::Startup { gib, artifact_mib } => crate::bench_startup::startup(gib, artifact_mib).await,
        BenchCommand::Failover { uploads, promote_after_ms } => {
            crate::bench_failover::failover(uploads, Duration::from_millis(promote_after_ms)).await
        }
    }
}

fn rack_options(sleds: usize, settings: Vec<(Vec<&'static str>, toml::Value)>) -> RackOptions {
    RackOptions {
        sleds,
        nexus: 1,
        database_url: None,
        log_level: "warn".into(),
        dir: None,
        nexus_settings: settings,
        netns: None,
    }
}

/// A signing key and the root that trusts it, in a temporary directory
/// where the repositories it signs are written.
pub(crate) struct Signer {
    pub(crate) dir: camino_tempfile::Utf8TempDir,
    key: camino::Utf8PathBuf,
    root_path: camino::Utf8PathBuf,
    expires: jiff::Timestamp,
    pub(crate) root: serde_json::Value,
}

impl Signer {
    pub(crate) async fn new() -> anyhow::Result<Signer> {
        let dir = camino_tempfile::tempdir()?;
        let key = dir.path().join("key.der");
        std::fs::write(&key, tuf_forge::generate_key()?)?;
        let root_path = dir.path().join("root.json");
        let expires = jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_hours(24 * 7))?;
        std::fs::write(&root_path, tuf_forge::make_root(&key, expires).await?)?;
        let root = serde_json::from_slice(&std::fs::read(&root_path)?)?;
        Ok(Signer { dir, key, root_path, expires, root })
    }

    /// Writes `file_name` in the directory: a repository of
    /// `system_version` with `artifacts` random artifacts of `bytes_each`.
    pub(crate) async fn repo(
        &self,
        file_name: &str,
        system_version: &str,
        artifacts: u64,
        bytes_each: u64,
        seed: u64,
    ) -> anyhow::Result<camino::Utf8PathBuf> {
        let spec = tuf_forge::RepoSpec {
            system_version: system_version.into(),
            artifacts: (0..artifacts)
                .map(|n| tuf_forge::ArtifactSpec {
                    name: format!("artifact-{seed}-{n}"),
                    version: "1.0.0".into(),
                    kind: "bench".into(),
                    contents: tuf_forge::Contents::Random(bytes_each),
                })
                .collect(),
            expires: self.expires,
            seed,
        };
        let zip = self.dir.path().join(file_name);
        tuf_forge::make_repo(&self.key, &self.root_path, &spec, &zip).await?;
        Ok(zip)
    }
}

/// A key, a root and a repository zip of `artifacts` random artifacts.
pub(crate) struct Forged {
    dir: camino_tempfile::Utf8TempDir,
    root: serde_json::Value,
    zip: camino::Utf8PathBuf,
}

pub(crate) async fn forge(artifacts: u64, bytes_each: u64) -> anyhow::Result<Forged> {
    let signer = Signer::new().await?;
    let zip = signer.repo("repo.zip", "1.0.0", artifacts, bytes_each, 1).await?;
    Ok(Forged { dir: signer.dir, root: signer.root, zip })
}

pub(crate) async fn upload_zip(rack: &Rack, forged: &Forged) -> anyhow::Result<()> {
    let url = &rack.discovery.nexus[0].external_url;
    let client = external::authenticated(url, &rack.token);
    client
        .trust_root_create(&forged.root)
        .await
        .map_err(|e| anyhow::anyhow!("adding the trust root: {e}"))?;
    let file = tokio::fs::File::open(&forged.zip).await?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    client.repository_upload("repo.zip", body).await.map_err(|e| anyhow::anyhow!("uploading: {e}"))?;
    Ok(())
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM in /proc status")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmHWM value")?.parse()?;
    Ok(kib * 1024)
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

async fn upload(size_mib: u64) -> anyhow::Result<()> {
    let forged = forge(1, size_mib << 20).await?;
    let zip_bytes = std::fs::metadata(&forged.zip)?.len();

    // Baseline: hash the file and copy it once, with the machine's tools.
    let started = Instant::now();
    let status = std::process::Command::new("sha256sum")
        .arg(&forged.zip)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("sha256sum failed");
    }
    let copy = forged.dir.path().join("copy.zip");
    std::fs::copy(&forged.zip, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    let baseline = started.elapsed();
    std::fs::remove_file(&copy)?;

    let settings = vec![
        (vec!["external_api", "request_body_max_bytes"], toml::Value::Integer((zip_bytes * 2) as i64)),
        (vec!["background_tasks", "tuf_artifact_replication", "disabled"], true.into()),
    ];
    let rack = Rack::start(&rack_options(0, settings)).await?;
    let pid = rack.pid("nexus-0").context("nexus-0 runs")?;
    let rss_idle = peak_rss_bytes(pid)?;
    let started = Instant::now();
    let outcome = upload_zip(&rack, &forged).await;
    let elapsed = started.elapsed();
    let rss_peak = peak_rss_bytes(pid)?;
    rack.stop();
    outcome?;

    let throughput = mib(zip_bytes) / elapsed.as_secs_f64();
    let ratio = elapsed.as_secs_f64() / baseline.as_secs_f64();
    report(
        "upload",
        vec![
            ("zip size", format!("{:.1} MiB", mib(zip_bytes))),
            ("upload time", format!("{:.3} s", elapsed.as_secs_f64())),
            ("upload throughput", format!("{throughput:.1} MiB/s")),
            ("baseline: sha256sum + cp", format!("{:.3} s", baseline.as_secs_f64())),
            ("ratio upload / baseline", format!("{ratio:.2}")),
            ("nexus peak RSS before upload", format!("{:.1} MiB", mib(rss_idle))),
            ("nexus peak RSS after upload", format!("{:.1} MiB", mib(rss_peak))),
        ],
        serde_json::json!({
            "zip_bytes": zip_bytes, "upload_secs": elapsed.as_secs_f64(), "mib_per_sec": throughput,
            "baseline_secs": baseline.as_secs_f64(), "ratio": ratio,
            "nexus_peak_rss_idle": rss_idle, "nexus_peak_rss": rss_peak,
        }),
    );
    Ok(())
}

pub(crate) async fn replication_status(rack: &Rack) -> anyhow::Result<(u64, TufArtifactReplicationStatus)> {
    let client = nexus_internal::Client::new(&rack.discovery.nexus[0].internal_url);
    let task = client.bgtask_view("tuf_artifact_replication").await?.into_inner();
    match task.last {
        LastResult::Completed { iteration, details, .. } => Ok((iteration, serde_json::from_value(details)?)),
        LastResult::NeverCompleted => bail!("replication has not run yet"),
    }
}

/// Whether every sled holds `expected` artifacts of the current config on
/// every healthy M.2.
pub(crate) async fn all_hold(sleds: &[sled_agent::Client], expected: usize) -> bool {
    for client in sleds {
        if !holds_all(client, expected).await {
            return false;
        }
    }
    true
}

/// Whether one sled holds `expected` artifacts on every healthy M.2.
pub(crate) async fn holds_all(client: &sled_agent::Client, expected: usize) -> bool {
    let (Ok(list), Ok(inventory)) = (client.artifact_list().await, client.inventory().await) else {
        return false;
    };
    let healthy = inventory.m2.iter().filter(|m2| m2.state == M2State::Healthy).count();
    list.list.len() == expected && list.list.values().all(|&copies| copies >= healthy)
}

async fn replicate(sleds: usize, repo_mib: u64, artifacts: u64) -> anyhow::Result<()> {
    if sleds == 0 || artifacts == 0 {
        bail!("--sleds and --artifacts must be at least 1");
    }
    let each = (repo_mib << 20) / artifacts;
    let forged = forge(artifacts, each).await?;
    let settings = vec![(
        vec!["external_api", "request_body_max_bytes"],
        toml::Value::Integer(((repo_mib + 64) << 21) as i64),
    )];
    let rack = Rack::start(&rack_options(sleds, settings)).await?;
    let sled_clients: Vec<_> =
        rack.discovery.sleds.iter().map(|s| sled_agent::Client::new(&s.api_url)).collect();
    let (iteration_before, _) = replication_status(&rack).await?;

    upload_zip(&rack, &forged).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    while !all_hold(&sled_clients, artifacts as usize).await {
        if Instant::now() > deadline {
            rack.stop();
            bail!("no convergence within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let converged = started.elapsed();
    // The counters of the activations that did the work.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (iteration_after, status) = replication_status(&rack).await?;
    rack.stop();

    // Lower bound: the same bytes written with plain copies to every M.2.
    let m2_count = 2;
    let target = camino_tempfile::tempdir()?;
    let bytes_source = forge_sources(&forged, artifacts, each)?;
    let started = Instant::now();
    for copy in 0..sleds * m2_count {
        for (index, source) in bytes_source.iter().enumerate() {
            let destination = target.path().join(format!("{copy}-{index}"));
            std::fs::copy(source, &destination)?;
            std::fs::File::open(&destination)?.sync_all()?;
        }
    }
    let lower_bound = started.elapsed();

    let lifetime = &status.lifetime;
    let egress = lifetime.put_ok * each;
    let peer = lifetime.copy_ok * each;
    let ratio = converged.as_secs_f64() / lower_bound.as_secs_f64();
    report(
        "replicate",
        vec![
            ("sleds x M.2", format!("{sleds} x {m2_count}")),
            ("repository", format!("{repo_mib} MiB in {artifacts} artifacts")),
            ("upload response to convergence", format!("{:.3} s", converged.as_secs_f64())),
            ("bytes sent by Nexus (PUT)", format!("{:.1} MiB", mib(egress))),
            ("bytes copied between sleds", format!("{:.1} MiB", mib(peer))),
            ("activations", format!("{}", iteration_after - iteration_before)),
            ("lower bound: plain copies to every M.2", format!("{:.3} s", lower_bound.as_secs_f64())),
            ("ratio convergence / lower bound", format!("{ratio:.2}")),
        ],
        serde_json::json!({
            "sleds": sleds, "repo_mib": repo_mib, "artifacts": artifacts,
            "convergence_secs": converged.as_secs_f64(), "nexus_egress_bytes": egress, "peer_bytes": peer,
            "activations": iteration_after - iteration_before, "lower_bound_secs": lower_bound.as_secs_f64(),
            "ratio": ratio,
        }),
    );
    Ok(())
}

/// Files holding the artifacts' bytes, for the lower-bound copies.
fn forge_sources(forged: &Forged, artifacts: u64, each: u64) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut archive = zip_entries(&forged.zip)?;
    let dir = forged.dir.path().join("sources");
    std::fs::create_dir_all(&dir)?;
    let mut paths = Vec::new();
    for (name, bytes) in archive.drain(..) {
        if bytes.len() as u64 == each && name.contains("artifact-") {
            let path = dir.join(format!("{}", paths.len())).into_std_path_buf();
            std::fs::write(&path, bytes)?;
            paths.push(path);
        }
    }
    if paths.len() as u64 != artifacts {
        bail!("found {} artifacts in the zip, expected {artifacts}", paths.len());
    }
    Ok(paths)
}

fn zip_entries(path: &camino::Utf8Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path)?)?;
    let mut entries = Vec::new();
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index)?;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        entries.push((entry.name()?.to_string(), bytes));
    }
    Ok(entries)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A task that does nothing: what activation costs by itself.
struct Empty;

impl nexus::background::driver::BackgroundTask for Empty {
    fn activate<'a>(
        &'a mut self,
        _: &'a slog::Logger,
        _: common::bgtask::ActivationReason,
    ) -> futures::future::BoxFuture<'a, serde_json::Value> {
        Box::pin(async { serde_json::Value::Null })
    }
}

async fn bgtask(activations: usize) -> anyhow::Result<()> {
    use nexus::background::driver::{Activator, Driver, MemorySwitchStore, TaskDefinition};
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let driver = Driver::start(
        vec![TaskDefinition {
            name: "empty".into(),
            description: "does nothing".into(),
            period: Duration::from_secs(3600),
            task: Box::new(Empty),
            activator: Activator::new(),
            dependencies: Vec::new(),
            enabled: true,
        }],
        std::sync::Arc::new(MemorySwitchStore::default()),
        uuid::Uuid::new_v4(),
        &log,
    );
    driver.activate_and_wait("empty").await?;
    let mut activation = Vec::with_capacity(activations);
    for _ in 0..activations {
        let started = Instant::now();
        driver.activate_and_wait("empty").await?;
        activation.push(started.elapsed());
    }
    driver.shutdown(Duration::from_secs(1)).await;

    // Baseline: a bare wake-up round trip between two tokio tasks.
    let ping = std::sync::Arc::new(tokio::sync::Notify::new());
    let pong = std::sync::Arc::new(tokio::sync::Notify::new());
    let responder = {
        let (ping, pong) = (ping.clone(), pong.clone());
        tokio::spawn(async move {
            loop {
                ping.notified().await;
                pong.notify_one();
            }
        })
    };
    let mut round_trip = Vec::with_capacity(activations);
    for _ in 0..activations {
        let started = Instant::now();
        ping.notify_one();
        pong.notified().await;
        round_trip.push(started.elapsed());
    }
    responder.abort();

    // Status queries over HTTP against a real Nexus, and the same server's
    // floor: a request that the router turns away.
    let rack = Rack::start(&rack_options(0, Vec::new())).await?;
    let internal = rack.discovery.nexus[0].internal_url.clone();
    let http = reqwest::Client::new();
    let mut status = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..activations {
        let started = Instant::now();
        http.get(format!("{internal}/bgtasks")).send().await?.bytes().await?;
        status.push(started.elapsed());
        let started = Instant::now();
        http.get(format!("{internal}/no-such-path")).send().await?.bytes().await?;
        floor.push(started.elapsed());
    }
    rack.stop();

    for samples in [&mut activation, &mut round_trip, &mut status, &mut floor] {
        samples.sort();
    }
    let (a50, a99) = (percentile(&activation, 0.5), percentile(&activation, 0.99));
    let (b50, b99) = (percentile(&round_trip, 0.5), percentile(&round_trip, 0.99));
    let (s50, s99) = (percentile(&status, 0.5), percentile(&status, 0.99));
    let (f50, f99) = (percentile(&floor, 0.5), percentile(&floor, 0.99));
    report(
        "bgtask",
        vec![
            ("activations", activations.to_string()),
            ("activation to completion p50 / p99", format!("{:.1} / {:.1} us", micros(a50), micros(a99))),
            ("baseline: notify round trip p50 / p99", format!("{:.1} / {:.1} us", micros(b50), micros(b99))),
            ("ratio p50", format!("{:.1}", micros(a50) / micros(b50))),
            ("GET /bgtasks p50 / p99", format!("{:.1} / {:.1} us", micros(s50), micros(s99))),
            ("baseline: GET 404 p50 / p99", format!("{:.1} / {:.1} us", micros(f50), micros(f99))),
            ("ratio p50", format!("{:.2}", micros(s50) / micros(f50))),
        ],
        serde_json::json!({
            "activation_p50_us": micros(a50), "activation_p99_us": micros(a99),
            "notify_p50_us": micros(b50), "notify_p99_us": micros(b99),
            "status_p50_us": micros(s50), "status_p99_us": micros(s99),
            "floor_p50_us": micros(f50), "floor_p99_us": micros(f99),
        }),
    );
    Ok(())
}

fn plan(sleds: usize, artifacts: usize, repos: usize) -> anyhow::Result<()> {
    use nexus::background::tasks::replication_plan::{self, ArtifactState, Inventory, Limits, SledState};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let sled_states: Vec<SledState> = (0..sleds)
        .map(|i| SledState {
            id: uuid::Uuid::from_u128(i as u128 + 1),
            healthy_m2: 2,
            copy_slots: usize::MAX,
            slow: false,
        })
        .collect();
    // Each repository's artifacts at a different stage: the newest only
    // staged here, older ones partly replicated.
    let mut inventory = Inventory { sleds: sled_states.clone(), artifacts: Default::default() };
    for n in 0..artifacts {
        let stage = n % repos.max(1);
        let mut state = ArtifactState { local: stage == 0, ..Default::default() };
        if stage > 0 {
            for sled in &sled_states {
                if rng.random_bool(stage as f64 / repos as f64) {
                    state.copies.insert(sled.id, rng.random_range(1..=2));
                }
            }
        }
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&(n as u64).to_le_bytes());
        inventory.artifacts.insert(common::ArtifactHash(hash), state);
    }
    let rounds = 200;
    let mut planned = Vec::with_capacity(rounds);
    let mut cloned = Vec::with_capacity(rounds);
    let mut requests = 0;
    for round in 0..rounds {
        let started = Instant::now();
        let copy = inventory.clone();
        cloned.push(started.elapsed());
        std::hint::black_box(copy);
        let started = Instant::now();
        let plan = replication_plan::plan(
            &inventory,
            &mut rand::rngs::StdRng::seed_from_u64(round as u64),
            Limits { min_sled_replication: 3, fanout: Default::default() },
        );
        planned.push(started.elapsed());
        requests = plan.requests.len();
    }
    planned.sort();
    cloned.sort();
    let (p50, p99) = (percentile(&planned, 0.5), percentile(&planned, 0.99));
    let c50 = percentile(&cloned, 0.5);
    report(
        "plan",
        vec![
            ("inventory", format!("{sleds} sleds, {artifacts} artifacts in {repos} repositories")),
            ("requests planned", requests.to_string()),
            ("plan p50 / p99", format!("{:.1} / {:.1} us", micros(p50), micros(p99))),
            ("baseline: clone the inventory p50", format!("{:.1} us", micros(c50))),
            ("ratio p50", format!("{:.1}", micros(p50) / micros(c50))),
        ],
        serde_json::json!({
            "sleds": sleds, "artifacts": artifacts, "repos": repos, "requests": requests,
            "plan_p50_us": micros(p50), "plan_p99_us": micros(p99), "clone_p50_us": micros(c50),
        }),
    );
    std::io::stdout().flush()?;
    Ok(())
}
