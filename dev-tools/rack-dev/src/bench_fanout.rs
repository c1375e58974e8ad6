//! `rack-dev bench replicate --netns ...`: replication on a rack with a real
//! network (DESIGN §13), judged against the physical limit. Every sled must
//! receive the repository over its own link, so the lower bound is the
//! repository's bytes over one link's rate. For each artifact count and
//! sled count it measures, on the same machine in the same run, the time
//! from the upload's response until each sled, and every sled, holds
//! everything, for the pipelined fan-out and the two baselines (star: Nexus
//! PUTs to every sled; two-stage: PUT to `min_sled_replication` sleds, the
//! rest copy from them), with Nexus's egress (what its link sent).
//! `--slow-sled-mbit` and `--lossy-sled-pct` give the first sled (`s0`) a
//! worse link, reported apart from the others (against its own link's
//! bound); `--kill-sled-at SECS` kills the second (`s1`, somewhere in the
//! middle of most chains) that long after the upload and restarts it as
//! long again later, also reported apart. It prints a
//! table, a `BENCH` JSON line (per-sled completion times, p50/p99), and
//! draws per-sled completion over time (PNG) in the output directory.
//!
//! `--machine-floor` also runs each case with no link limit at all: every
//! sled agent, Nexus and the kernel's share of every link run on this one
//! machine, and its CPU and disk, not a link, then set the pace. That time
//! is what this machine can do for the case whatever the links; a ratio to
//! the larger of it and the link bound says how far the schedule, not the
//! machine, is from the limit.

use crate::bench::{Forged, forge, holds_all, mib, report, upload_zip};
use crate::netns::LinkLimits;
use crate::run_all::{Rack, RackOptions};
use anyhow::{Context, bail};
use camino::Utf8Path;
use common::clients::sled_agent;
use std::time::{Duration, Instant};

pub struct FanoutOptions {
    pub sled_counts: Vec<usize>,
    pub link_mbit: u32,
    pub repo_mib: u64,
    pub artifact_counts: Vec<u64>,
    /// Limits of the first sled's link instead of `link_mbit`'s, if any
    /// are set: a slow or lossy sled among healthy ones.
    pub odd_sled: LinkLimits,
    /// Seconds after the upload at which the second sled (`s1`, in the
    /// middle of chains) is killed; it is restarted as long again later.
    pub kill_sled_at: Option<f64>,
    pub fanouts: Vec<String>,
    pub out: camino::Utf8PathBuf,
    /// Where each run's rack goes, its info-level logs kept for reading
    /// afterwards (a temporary directory, warnings only, if not set).
    pub keep_logs: Option<camino::Utf8PathBuf>,
    /// Runs of each case: on a loaded machine one run can be off by a
    /// quarter of the bound either way, so each case is reported per run
    /// and as the median of its runs.
    pub repeat: usize,
    /// Also run each case (each repeat) with no link limit: the machine's
    /// own floor for it.
    pub machine_floor: bool,
}

struct Measured {
    sleds: usize,
    artifacts: u64,
    fanout: String,
    /// Until every sled held everything.
    seconds: f64,
    /// When each sled (in rack order) first held everything.
    per_sled: Vec<f64>,
    nexus_egress: u64,
    /// Which run of its case (0-based).
    run: usize,
}

/// Which sleds are reported apart: an odd link (`s0`), a killed one (`s1`).
#[derive(Clone, Copy)]
struct Apart {
    odd: bool,
    killed: bool,
}

impl Apart {
    fn contains(self, index: usize) -> bool {
        (self.odd && index == 0) || (self.killed && index == 1)
    }
}

impl Measured {
    /// The sleds not reported apart, sorted.
    fn others(&self, apart: Apart) -> Vec<f64> {
        let mut others: Vec<f64> =
            self.per_sled.iter().enumerate().filter(|(i, _)| !apart.contains(*i)).map(|(_, t)| *t).collect();
        others.sort_by(f64::total_cmp);
        others
    }
}

/// The `q`-quantile (nearest rank) of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub async fn replicate_on_a_network(options: FanoutOptions) -> anyhow::Result<()> {
    crate::netns::check_permission()?;
    if options.artifact_counts.contains(&0)
        || options.artifact_counts.is_empty()
        || options.sled_counts.is_empty()
        || options.repeat == 0
    {
        bail!("--artifacts, --sleds and --repeat must be at least 1");
    }
    let odd = options.odd_sled != LinkLimits::default();
    let killed = options.kill_sled_at.is_some();
    if killed && options.sled_counts.iter().any(|&sleds| sleds < 3) {
        bail!("--kill-sled-at needs at least 3 sleds: one killed among others");
    }
    let apart = Apart { odd, killed };
    let repo_bytes_of = |artifacts: u64| ((options.repo_mib << 20) / artifacts) * artifacts;
    let bound_at = |bytes: u64, mbit: u32| bytes as f64 * 8.0 / (f64::from(mbit) * 1e6);
    let mut results = Vec::new();
    let mut floors: Vec<Measured> = Vec::new();
    for &artifacts in &options.artifact_counts {
        let each = (options.repo_mib << 20) / artifacts;
        let forged = forge(artifacts, each).await?;
        let bound = bound_at(repo_bytes_of(artifacts), options.link_mbit);
        for &sleds in &options.sled_counts {
            for (fanout, run) in options.fanouts.iter().flat_map(|f| (0..options.repeat).map(move |r| (f, r)))
            {
                // Interleaved with the limited runs, so that both see the
                // machine in the same state.
                if options.machine_floor {
                    let floor =
                        one_run(sleds, fanout, run, &options, &forged, artifacts, Links::Unlimited).await?;
                    println!(
                        "{sleds} sleds, {artifacts} artifacts, {fanout}, links unlimited (machine floor): {:.2} s \
                         ({:.2}x the link bound)",
                        floor.seconds,
                        floor.seconds / bound
                    );
                    floors.push(floor);
                }
                let measured =
                    one_run(sleds, fanout, run, &options, &forged, artifacts, Links::Limited).await?;
                let others = measured.others(apart);
                println!(
                    "{sleds} sleds, {artifacts} artifacts, {fanout}: {:.2} s ({:.2}x the bound); sleds done \
                     p50 {:.2} s, p99 {:.2} s{}; Nexus sent {:.1} MiB",
                    measured.seconds,
                    measured.seconds / bound,
                    quantile(&others, 0.5),
                    quantile(&others, 0.99),
                    apart_note(&measured, apart),
                    mib(measured.nexus_egress)
                );
                results.push(measured);
            }
        }
    }
    std::fs::create_dir_all(&options.out)?;
    let plot = options.out.join("replicate-netns.png");
    draw(&plot, &results, &options).with_context(|| format!("drawing {plot}"))?;
    let mut rows: Vec<(String, String)> = vec![
        ("link".into(), format!("{} Mbit/s per host", options.link_mbit)),
        ("repository".into(), format!("{} MiB", options.repo_mib)),
        (
            "lower bound (repository / link rate)".into(),
            format!("{:.2} s", bound_at(options.repo_mib << 20, options.link_mbit)),
        ),
    ];
    if odd {
        rows.push(("odd sled (s0)".into(), format!("{:?}", options.odd_sled)));
    }
    if let Some(at) = options.kill_sled_at {
        rows.push((
            "killed sled (s1)".into(),
            format!("killed {at} s after the upload, restarted at {} s", 2.0 * at),
        ));
    }
    // The median of a case's floor runs.
    let floor_of = |result: &Measured| {
        let mut times: Vec<f64> = floors
            .iter()
            .filter(|f| {
                f.sleds == result.sleds && f.artifacts == result.artifacts && f.fanout == result.fanout
            })
            .map(|f| f.seconds)
            .collect();
        times.sort_by(f64::total_cmp);
        (!times.is_empty()).then(|| quantile(&times, 0.5))
    };
    for floor in &floors {
        let bound = bound_at(repo_bytes_of(floor.artifacts), options.link_mbit);
        let run = if options.repeat > 1 { format!(" (run {})", floor.run + 1) } else { String::new() };
        rows.push((
            format!(
                "{} sleds, {} artifacts, {}, links unlimited (machine floor){run}",
                floor.sleds, floor.artifacts, floor.fanout
            ),
            format!("{:.2} s = {:.2}x the link bound", floor.seconds, floor.seconds / bound),
        ));
    }
    let odd_bound = |artifacts: u64| {
        options.odd_sled.mbit.map(|mbit| bound_at(repo_bytes_of(artifacts), mbit.min(options.link_mbit)))
    };
    for result in &results {
        let bound = bound_at(repo_bytes_of(result.artifacts), options.link_mbit);
        let others = result.others(apart);
        let mut value = format!(
            "{:.2} s = {:.2}x bound; sleds done p50 {:.2}x, p99 {:.2}x; Nexus egress {:.1}x the repository",
            result.seconds,
            result.seconds / bound,
            quantile(&others, 0.5) / bound,
            quantile(&others, 0.99) / bound,
            result.nexus_egress as f64 / repo_bytes_of(result.artifacts) as f64
        );
        if let Some(floor) = floor_of(result) {
            value += &format!(
                "; {:.2}x the larger of the bound and the machine floor",
                result.seconds / floor.max(bound)
            );
        }
        if killed {
            value += &format!("; killed s1 {:.2} s", result.per_sled[1]);
        }
        if odd {
            value += &format!("; s0 {:.2} s", result.per_sled[0]);
            if let Some(own) = odd_bound(result.artifacts) {
                value += &format!(" = {:.2}x its own link's bound", result.per_sled[0] / own);
            }
        }
        let run = if options.repeat > 1 { format!(" (run {})", result.run + 1) } else { String::new() };
        rows.push((
            format!("{} sleds, {} artifacts, {}{run}", result.sleds, result.artifacts, result.fanout),
            value,
        ));
    }
    if options.repeat > 1 {
        for &artifacts in &options.artifact_counts {
            let bound = bound_at(repo_bytes_of(artifacts), options.link_mbit);
            for &sleds in &options.sled_counts {
                for fanout in &options.fanouts {
                    let case =
                        |r: &&Measured| r.sleds == sleds && r.artifacts == artifacts && &r.fanout == fanout;
                    let mut ratios: Vec<f64> =
                        results.iter().filter(case).map(|r| r.seconds / bound).collect();
                    let mut p99s: Vec<f64> = results
                        .iter()
                        .filter(case)
                        .map(|r| quantile(&r.others(apart), 0.99) / bound)
                        .collect();
                    ratios.sort_by(f64::total_cmp);
                    p99s.sort_by(f64::total_cmp);
                    rows.push((
                        format!("{sleds} sleds, {artifacts} artifacts, {fanout}: median of {}", ratios.len()),
                        format!(
                            "{:.2}x bound ({:.2}-{:.2}x); sleds done p99 {:.2}x ({:.2}-{:.2}x)",
                            quantile(&ratios, 0.5),
                            ratios[0],
                            ratios[ratios.len() - 1],
                            quantile(&p99s, 0.5),
                            p99s[0],
                            p99s[p99s.len() - 1]
                        ),
                    ));
                }
            }
        }
    }
    for &artifacts in &options.artifact_counts {
        for &sleds in &options.sled_counts {
            let time = |fanout: &str| {
                results
                    .iter()
                    .find(|r| r.sleds == sleds && r.artifacts == artifacts && r.fanout == fanout)
                    .map(|r| r.seconds)
            };
            if let (Some(pipelined), Some(star)) = (time("pipelined"), time("star")) {
                rows.push((
                    format!("{sleds} sleds, {artifacts} artifacts: star / pipelined"),
                    format!("{:.1}x", star / pipelined),
                ));
            }
        }
    }
    rows.push(("plot".into(), plot.to_string()));
    report(
        "replicate-netns",
        rows.iter().map(|(measure, value)| (measure.as_str(), value.clone())).collect(),
        serde_json::json!({
            "link_mbit": options.link_mbit, "repo_mib": options.repo_mib,
            "odd_sled": {"mbit": options.odd_sled.mbit, "loss_pct": options.odd_sled.loss_pct},
            "kill_sled_at_secs": options.kill_sled_at,
            "runs": results.iter().map(|r| {
                let bound = bound_at(repo_bytes_of(r.artifacts), options.link_mbit);
                let others = r.others(apart);
                serde_json::json!({
                    "sleds": r.sleds, "artifacts": r.artifacts, "fanout": r.fanout, "run": r.run,
                    "lower_bound_secs": bound,
                    "convergence_secs": r.seconds, "ratio_to_bound": r.seconds / bound,
                    "sled_done_p50_secs": quantile(&others, 0.5),
                    "sled_done_p99_secs": quantile(&others, 0.99),
                    "odd_sled_done_secs": odd.then(|| r.per_sled[0]),
                    "killed_sled_done_secs": killed.then(|| r.per_sled[1]),
                    "odd_sled_own_bound_secs": odd_bound(r.artifacts),
                    "per_sled_done_secs": r.per_sled,
                    "nexus_egress_bytes": r.nexus_egress,
                    "machine_floor_secs": floor_of(r),
                    "ratio_to_larger_bound": floor_of(r).map(|floor| r.seconds / floor.max(bound)),
                })
            }).collect::<Vec<_>>(),
            "machine_floor_runs": floors.iter().map(|f| serde_json::json!({
                "sleds": f.sleds, "artifacts": f.artifacts, "fanout": f.fanout, "run": f.run,
                "convergence_secs": f.seconds, "per_sled_done_secs": f.per_sled,
                "nexus_egress_bytes": f.nexus_egress,
            })).collect::<Vec<_>>(),
        }),
    );
    Ok(())
}

/// Whether a run's links are limited as the options say, or not at all
/// (the machine floor: no slow, lossy or killed sled either).
#[derive(Clone, Copy, PartialEq)]
enum Links {
    Limited,
    Unlimited,
}

/// One rack, one upload: seconds from the upload's response until each
/// sled, and every sled, holds every artifact on every healthy M.2, and
/// the bytes Nexus's link sent meanwhile (PUTs, staged reads by sleds,
/// headers and its database traffic included).
async fn one_run(
    sleds: usize,
    fanout: &str,
    run: usize,
    options: &FanoutOptions,
    forged: &Forged,
    artifacts: u64,
    links: Links,
) -> anyhow::Result<Measured> {
    let settings = vec![
        (
            vec!["external_api", "request_body_max_bytes"],
            toml::Value::Integer(((options.repo_mib + 64) << 21) as i64),
        ),
        (vec!["background_tasks", "tuf_artifact_replication", "fanout"], fanout.into()),
        (vec!["background_tasks", "tuf_artifact_replication", "followup_delay_millis"], 200.into()),
    ];
    let limited = links == Links::Limited;
    let link = match links {
        Links::Limited => LinkLimits { mbit: Some(options.link_mbit), delay_ms: None, loss_pct: None },
        Links::Unlimited => LinkLimits::default(),
    };
    let mut rack = Rack::start(&RackOptions {
        sleds,
        nexus: 1,
        database_url: None,
        log_level: if options.keep_logs.is_some() { "info" } else { "warn" }.into(),
        dir: options.keep_logs.as_ref().map(|dir| {
            let floor = if limited { "" } else { "-unlimited" };
            dir.join(format!("{sleds}-sleds-{artifacts}-artifacts-{fanout}{floor}-run-{}", run + 1))
        }),
        nexus_settings: settings,
        netns: Some(link),
    })
    .await?;
    let clients: Vec<_> = rack.discovery.sleds.iter().map(|s| sled_agent::Client::new(&s.api_url)).collect();
    let outcome = async {
        if limited && options.odd_sled != LinkLimits::default() {
            let odd = LinkLimits { mbit: options.odd_sled.mbit.or(link.mbit), ..options.odd_sled };
            rack.limit_host("s0", odd)?;
        }
        let nexus_sent_before = rack.host_sent_bytes("n0")?;
        upload_zip(&rack, forged).await?;
        let started = Instant::now();
        // Each sled is watched on its own: one slow sled's answers (its
        // link's queues hold them) must not delay noticing the others.
        let watches = clients.iter().map(|client| async move {
            while !holds_all(client, artifacts as usize).await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            started.elapsed().as_secs_f64()
        });
        // Killed, then restarted.
        let kill = async {
            if let Some(at) = options.kill_sled_at.filter(|_| limited) {
                tokio::time::sleep_until((started + Duration::from_secs_f64(at)).into()).await;
                rack.kill("sled-1")?;
                tokio::time::sleep_until((started + Duration::from_secs_f64(2.0 * at)).into()).await;
                rack.restart("sled-1")?;
            }
            std::future::pending::<()>().await;
            anyhow::Ok(())
        };
        let converged = async {
            tokio::select! {
                per_sled = futures::future::join_all(watches) => Ok(per_sled),
                killed = kill => killed.map(|()| Vec::new()),
            }
        };
        let per_sled = tokio::time::timeout(Duration::from_secs(900), converged).await.map_err(|_| {
            anyhow::anyhow!("{sleds} sleds with {fanout}: no convergence within 15 minutes")
        })??;
        let nexus_egress = rack.host_sent_bytes("n0")? - nexus_sent_before;
        let seconds = per_sled.iter().copied().fold(0.0, f64::max);
        Ok(Measured { sleds, artifacts, fanout: fanout.to_string(), seconds, per_sled, nexus_egress, run })
    }
    .await;
    rack.stop();
    outcome
}

/// What the one-line summary says of the sleds reported apart.
fn apart_note(measured: &Measured, apart: Apart) -> String {
    let mut notes = Vec::new();
    if apart.odd {
        notes.push(format!("s0: {:.2} s", measured.per_sled[0]));
    }
    if apart.killed {
        notes.push(format!("killed s1: {:.2} s", measured.per_sled[1]));
    }
    match notes.is_empty() {
        true => String::new(),
        false => format!(" (not counting {})", notes.join(", ")),
    }
}

/// Per-sled completion over time: for each run, the fraction of sleds that
/// hold everything against seconds since the upload; the bound as a
/// vertical line.
fn draw(path: &Utf8Path, results: &[Measured], options: &FanoutOptions) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .context("the plot's labels use DejaVu Sans (Debian's fonts-dejavu-core)")?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("loading DejaVu Sans"))?;
    let root = BitMapBackend::new(path.as_std_path(), (1000, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let bound = (options.repo_mib << 20) as f64 * 8.0 / (f64::from(options.link_mbit) * 1e6);
    let max_time = results.iter().map(|r| r.seconds).fold(bound, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} MiB to every sled, {} Mbit/s links", options.repo_mib, options.link_mbit),
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_time, 0.0..1.05)?;
    chart.configure_mesh().x_desc("seconds since the upload").y_desc("fraction of sleds done").draw()?;
    let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (index, result) in results.iter().enumerate() {
        let color = palette[index % palette.len()];
        let mut done = result.per_sled.clone();
        done.sort_by(f64::total_cmp);
        let count = done.len() as f64;
        let mut points = vec![(0.0, 0.0)];
        for (n, &at) in done.iter().enumerate() {
            points.push((at, n as f64 / count));
            points.push((at, (n + 1) as f64 / count));
        }
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!("{}, {} sleds, {} artifacts", result.fanout, result.sleds, result.artifacts))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .draw_series(LineSeries::new([(bound, 0.0), (bound, 1.05)], BLACK.stroke_width(1)))?
        .label("lower bound")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
