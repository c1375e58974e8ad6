//! `rack-dev bench replicate --netns ...`: replication on a rack with a real
//! network (DESIGN §13), judged against the physical limit. Every sled must
//! receive the repository over its own link, so the lower bound is the
//! repository's bytes over one link's rate. For each sled count it measures,
//! on the same machine in the same run, the time from the upload's response
//! until every sled holds everything, for the pipelined fan-out and the two
//! baselines (star: Nexus PUTs to every sled; two-stage: PUT to
//! `min_sled_replication` sleds, the rest copy from them), with Nexus's
//! egress; it prints a table, a `BENCH` JSON line, and draws the times
//! against the sled count (PNG) in the output directory.

use crate::bench::{Forged, all_hold, forge, mib, replication_status, report, upload_zip};
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
    pub artifacts: u64,
    pub fanouts: Vec<String>,
    pub out: camino::Utf8PathBuf,
}

struct Measured {
    sleds: usize,
    fanout: String,
    seconds: f64,
    nexus_egress: u64,
}

pub async fn replicate_on_a_network(options: FanoutOptions) -> anyhow::Result<()> {
    crate::netns::check_permission()?;
    if options.artifacts == 0 || options.sled_counts.is_empty() {
        bail!("--artifacts and --sleds must be at least 1");
    }
    let each = (options.repo_mib << 20) / options.artifacts;
    let forged = forge(options.artifacts, each).await?;
    let repo_bytes = each * options.artifacts;
    let bound = repo_bytes as f64 * 8.0 / (f64::from(options.link_mbit) * 1e6);
    let mut results = Vec::new();
    for &sleds in &options.sled_counts {
        for fanout in &options.fanouts {
            let (seconds, nexus_egress) = one_run(sleds, fanout, &options, &forged, each).await?;
            println!(
                "{sleds} sleds, {fanout}: {seconds:.2} s ({:.2}x the bound), Nexus sent {:.1} MiB",
                seconds / bound,
                mib(nexus_egress)
            );
            results.push(Measured { sleds, fanout: fanout.clone(), seconds, nexus_egress });
        }
    }
    std::fs::create_dir_all(&options.out)?;
    let plot = options.out.join("replicate-netns.png");
    draw(&plot, &results, &options, bound).with_context(|| format!("drawing {plot}"))?;
    let mut rows: Vec<(String, String)> = vec![
        ("link".into(), format!("{} Mbit/s per host", options.link_mbit)),
        ("repository".into(), format!("{} MiB in {} artifacts", options.repo_mib, options.artifacts)),
        ("lower bound (repository / link rate)".into(), format!("{bound:.2} s")),
    ];
    for result in &results {
        rows.push((
            format!("{} sleds, {}", result.sleds, result.fanout),
            format!(
                "{:.2} s = {:.2}x bound, Nexus egress {:.1} MiB = {:.1}x the repository",
                result.seconds,
                result.seconds / bound,
                mib(result.nexus_egress),
                result.nexus_egress as f64 / repo_bytes as f64
            ),
        ));
    }
    for &sleds in &options.sled_counts {
        let time =
            |fanout: &str| results.iter().find(|r| r.sleds == sleds && r.fanout == fanout).map(|r| r.seconds);
        if let (Some(pipelined), Some(star)) = (time("pipelined"), time("star")) {
            rows.push((format!("{sleds} sleds: star / pipelined"), format!("{:.1}x", star / pipelined)));
        }
    }
    rows.push(("plot".into(), plot.to_string()));
    report(
        "replicate-netns",
        rows.iter().map(|(measure, value)| (measure.as_str(), value.clone())).collect(),
        serde_json::json!({
            "link_mbit": options.link_mbit, "repo_bytes": repo_bytes, "lower_bound_secs": bound,
            "runs": results.iter().map(|r| serde_json::json!({
                "sleds": r.sleds, "fanout": r.fanout, "convergence_secs": r.seconds,
                "ratio_to_bound": r.seconds / bound, "nexus_egress_bytes": r.nexus_egress,
            })).collect::<Vec<_>>(),
        }),
    );
    Ok(())
}

/// One rack, one upload: seconds from the upload's response to every sled
/// holding every artifact on every healthy M.2, and Nexus's PUT bytes.
async fn one_run(
    sleds: usize,
    fanout: &str,
    options: &FanoutOptions,
    forged: &Forged,
    each: u64,
) -> anyhow::Result<(f64, u64)> {
    let settings = vec![
        (
            vec!["external_api", "request_body_max_bytes"],
            toml::Value::Integer(((options.repo_mib + 64) << 21) as i64),
        ),
        (vec!["background_tasks", "tuf_artifact_replication", "fanout"], fanout.into()),
        (vec!["background_tasks", "tuf_artifact_replication", "followup_delay_millis"], 200.into()),
    ];
    let rack = Rack::start(&RackOptions {
        sleds,
        nexus: 1,
        database_url: None,
        log_level: "warn".into(),
        dir: None,
        nexus_settings: settings,
        netns: Some(LinkLimits { mbit: Some(options.link_mbit), delay_ms: None, loss_pct: None }),
    })
    .await?;
    let clients: Vec<_> = rack.discovery.sleds.iter().map(|s| sled_agent::Client::new(&s.api_url)).collect();
    let outcome = async {
        upload_zip(&rack, forged).await?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(900);
        while !all_hold(&clients, options.artifacts as usize).await {
            if Instant::now() > deadline {
                bail!("{sleds} sleds with {fanout}: no convergence within 15 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, status) = replication_status(&rack).await?;
        Ok((seconds, status.lifetime.put_ok * each))
    }
    .await;
    rack.stop();
    outcome
}

/// Convergence time against sled count, one line per fan-out, and the bound.
fn draw(path: &Utf8Path, results: &[Measured], options: &FanoutOptions, bound: f64) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .context("the plot's labels use DejaVu Sans (Debian's fonts-dejavu-core)")?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("loading DejaVu Sans"))?;
    let root = BitMapBackend::new(path.as_std_path(), (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_sleds = *options.sled_counts.iter().max().unwrap_or(&1) as f64;
    let max_time = results.iter().map(|r| r.seconds).fold(bound, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} MiB to every sled, {} Mbit/s links", options.repo_mib, options.link_mbit),
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_sleds * 1.05, 0.0..max_time)?;
    chart.configure_mesh().x_desc("sleds").y_desc("seconds to convergence").draw()?;
    let palette = [RED, BLUE, GREEN, MAGENTA];
    for (index, fanout) in options.fanouts.iter().enumerate() {
        let color = palette[index % palette.len()];
        let points: Vec<(f64, f64)> =
            results.iter().filter(|r| &r.fanout == fanout).map(|r| (r.sleds as f64, r.seconds)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(fanout.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(points.iter().map(|&point| Circle::new(point, 4, color.filled())))?;
    }
    chart
        .draw_series(LineSeries::new([(0.0, bound), (max_sleds * 1.05, bound)], BLACK.stroke_width(1)))?
        .label("lower bound")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
