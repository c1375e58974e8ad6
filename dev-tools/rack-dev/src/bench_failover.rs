//! `rack-dev bench failover`: what a failover of the database primary costs
//! the rack's clients, and what a synchronous standby costs every upload
//! (DESIGN §14).
//!
//! 1. Upload latency, both measured in this run: two racks run at once, one
//!    whose PostgreSQL has no standby and one with a synchronous standby
//!    (every COMMIT waits for the standby's flush). After a few warm-up
//!    uploads each, `--uploads` small repositories go to one and the other
//!    in turn, one at a time, so that both see the same machine. Test
//!    servers run with `fsync=off` (and a lone one with
//!    `synchronous_commit=off`), so the difference is the replication round
//!    trip on loopback, not a disk flush on either side.
//! 2. Failover, on the second rack: one client uploads repositories back to
//!    back and another lists them in a loop (each request bounded at 60 s).
//!    Once uploads succeed, the primary is killed with SIGKILL and,
//!    `--promote-after-ms` later (an orchestrator's time to decide), the
//!    standby is promoted. Reported: kill to promotion, kill to the first
//!    upload answered 200 after the promotion, the longest request, and
//!    every request answered with an error between the kill and that
//!    success, by kind and status (`transport` when no HTTP answer came).
//!
//! Nexus runs with its shipped `failover_wait_secs` (10 s): a promotion
//! within that is ridden through by retrying, one after it costs 503s.

use crate::bench::{Signer, report};
use crate::run_all::{Rack, RackOptions};
use anyhow::{Context, bail};
use camino::Utf8PathBuf;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_harness::Role;

/// Repositories forged for the failover phase: more than the uploads it can
/// answer in its time.
const FAILOVER_REPOS: usize = 400;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Uploads before anything is measured: a rack's first requests fill
/// caches and pools.
const WARM_UPLOADS: usize = 5;
/// How long after the promotion the first success may take before the
/// benchmark gives up.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);

/// A signing key's repositories, one small artifact each, and the root that
/// trusts them.
struct Repos {
    signer: Signer,
    zips: Vec<Utf8PathBuf>,
}

async fn forge_repos(count: usize) -> anyhow::Result<Repos> {
    let signer = Signer::new().await?;
    let mut zips = Vec::with_capacity(count);
    for n in 0..count {
        zips.push(signer.repo(&format!("repo-{n}.zip"), &format!("1.0.{n}"), 1, 16 << 10, n as u64).await?);
    }
    Ok(Repos { signer, zips })
}

/// A rack of one Nexus and no sleds; replication off, and room for every
/// upload in the hand-off queue, so that only uploads touch the database.
async fn start_rack(db_standbys: usize, repos: &Repos) -> anyhow::Result<Rack> {
    let options = RackOptions {
        sleds: 0,
        nexus: 1,
        database_url: None,
        log_level: "warn".into(),
        dir: None,
        nexus_settings: vec![
            (vec!["background_tasks", "tuf_artifact_replication", "disabled"], true.into()),
            (vec!["updates", "handoff_capacity"], toml::Value::Integer(2 * repos.zips.len() as i64)),
        ],
        netns: None,
    };
    let rack = Rack::start_replicated(&options, db_standbys).await?;
    let client = common::clients::external::authenticated(&rack.discovery.nexus[0].external_url, &rack.token);
    client
        .trust_root_create(&repos.signer.root)
        .await
        .map_err(|e| anyhow::anyhow!("adding the trust root: {e}"))?;
    Ok(rack)
}

/// Uploads one zip; its status, or `None` if no HTTP answer came.
async fn upload(http: &reqwest::Client, rack: &RackUrls, zip: &Utf8PathBuf) -> Option<u16> {
    let body = tokio::fs::read(zip).await.ok()?;
    let response = http
        .put(format!("{}/v1/system/update/repositories", rack.external))
        .query(&[("file_name", zip.file_name().unwrap_or("repo.zip"))])
        .bearer_auth(&rack.token)
        .body(body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    response.bytes().await.ok()?;
    Some(status)
}

#[derive(Clone)]
struct RackUrls {
    external: String,
    token: String,
}

fn urls(rack: &Rack) -> RackUrls {
    RackUrls { external: rack.discovery.nexus[0].external_url.clone(), token: rack.token.clone() }
}

/// Uploads `zips` by pairs, the first of each pair to `racks[0]` and the
/// second to `racks[1]`, one at a time; every one must succeed. Returns each
/// rack's latencies, sorted, without the first [`WARM_UPLOADS`] pairs.
async fn latencies(racks: [&Rack; 2], zips: &[Utf8PathBuf]) -> anyhow::Result<[Vec<Duration>; 2]> {
    let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build()?;
    let urls = racks.map(urls);
    let mut samples = [Vec::new(), Vec::new()];
    for (index, zip) in zips.iter().enumerate() {
        let side = index % 2;
        let started = Instant::now();
        let status = upload(&http, &urls[side], zip).await;
        if status != Some(200) {
            bail!("uploading {zip} answered {status:?}, not 200");
        }
        if index >= 2 * WARM_UPLOADS {
            samples[side].push(started.elapsed());
        }
    }
    for side in &mut samples {
        side.sort();
    }
    Ok(samples)
}

/// One client request of the failover phase.
struct Outcome {
    kind: &'static str,
    started: Instant,
    ended: Instant,
    status: Option<u16>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status.is_some_and(|status| (200..300).contains(&status))
    }
}

type Outcomes = Arc<Mutex<Vec<Outcome>>>;

fn record(outcomes: &Outcomes, kind: &'static str, started: Instant, status: Option<u16>) {
    let outcome = Outcome { kind, started, ended: Instant::now(), status };
    outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(outcome);
}

pub async fn failover(uploads: usize, promote_after: Duration) -> anyhow::Result<()> {
    if uploads == 0 {
        bail!("--uploads must be at least 1");
    }
    let repos = forge_repos(2 * (WARM_UPLOADS + uploads) + FAILOVER_REPOS).await?;
    let (latency_zips, failover_zips) = repos.zips.split_at(2 * (WARM_UPLOADS + uploads));

    let plain_rack = start_rack(0, &repos).await?;
    let mut rack = match start_rack(1, &repos).await {
        Ok(rack) => rack,
        Err(error) => {
            plain_rack.stop();
            return Err(error);
        }
    };
    let measured = async {
        let latencies = latencies([&plain_rack, &rack], latency_zips).await?;
        let failover = measure_failover(&mut rack, failover_zips, promote_after).await?;
        anyhow::Ok((latencies, failover))
    }
    .await;
    plain_rack.stop();
    rack.stop();
    let ([plain, replicated], failover) = measured?;

    let mean = |samples: &[Duration]| samples.iter().sum::<Duration>() / samples.len() as u32;
    // Both sorted by `latencies`.
    let (plain_p50, synced_p50) = (plain[plain.len() / 2], replicated[replicated.len() / 2]);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let failed: Vec<String> =
        failover.failed.iter().map(|(what, count)| format!("{count} × {what}")).collect();
    report(
        "failover",
        vec![
            ("uploads per latency sample", uploads.to_string()),
            (
                "upload, no standby: p50 / mean / max",
                format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    ms(plain_p50),
                    ms(mean(&plain)),
                    ms(plain[plain.len() - 1])
                ),
            ),
            (
                "upload, synchronous standby: p50 / mean / max",
                format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    ms(synced_p50),
                    ms(mean(&replicated)),
                    ms(replicated[replicated.len() - 1])
                ),
            ),
            ("ratio p50 synchronous / none", format!("{:.2}", ms(synced_p50) / ms(plain_p50))),
            ("kill to promotion", format!("{:.0} ms", ms(failover.promoted))),
            ("kill to first upload 200 after promotion", format!("{:.0} ms", ms(failover.recovered))),
            ("longest request across the failover", format!("{:.0} ms", ms(failover.longest))),
            ("requests under way between kill and recovery", failover.requests.to_string()),
            ("of which failed", if failed.is_empty() { "none".into() } else { failed.join(", ") }),
        ],
        serde_json::json!({
            "uploads": uploads,
            "plain_p50_ms": ms(plain_p50), "plain_mean_ms": ms(mean(&plain)),
            "synchronous_p50_ms": ms(synced_p50), "synchronous_mean_ms": ms(mean(&replicated)),
            "promote_after_ms": ms(promote_after),
            "kill_to_promotion_ms": ms(failover.promoted), "kill_to_first_upload_ms": ms(failover.recovered),
            "longest_request_ms": ms(failover.longest), "requests": failover.requests,
            "failed": failover.failed.iter().map(|(what, count)| (what.clone(), *count)).collect::<BTreeMap<_, _>>(),
        }),
    );
    Ok(())
}

struct FailoverResult {
    promoted: Duration,
    recovered: Duration,
    longest: Duration,
    /// Requests under way at some time between the kill and the recovery.
    requests: usize,
    /// "kind status" → how many.
    failed: BTreeMap<String, usize>,
}

async fn measure_failover(
    rack: &mut Rack,
    zips: &[Utf8PathBuf],
    promote_after: Duration,
) -> anyhow::Result<FailoverResult> {
    let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build()?;
    let urls = urls(rack);
    let outcomes: Outcomes = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let uploader = {
        let (http, urls, outcomes, stop, zips) =
            (http.clone(), urls.clone(), outcomes.clone(), stop.clone(), zips.to_vec());
        tokio::spawn(async move {
            for zip in zips.iter().take_while(|_| !stop.load(Ordering::SeqCst)) {
                let started = Instant::now();
                let status = upload(&http, &urls, zip).await;
                record(&outcomes, "upload", started, status);
            }
        })
    };
    let lister = {
        let (outcomes, stop) = (outcomes.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let response = http
                    .get(format!("{}/v1/system/update/repositories?limit=10", urls.external))
                    .bearer_auth(&urls.token)
                    .send()
                    .await;
                let status = match response {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        response.bytes().await.ok().map(|_| status)
                    }
                    Err(_) => None,
                };
                record(&outcomes, "list", started, status);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let successes = |outcomes: &Outcomes, after: Instant| {
        outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|o| o.kind == "upload" && o.ok() && o.ended > after)
            .count()
    };
    let started = Instant::now();
    while successes(&outcomes, started) < WARM_UPLOADS {
        if uploader.is_finished() || started.elapsed() > RECOVERY_LIMIT {
            bail!("uploads do not succeed before the failover");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let cluster = rack.database().context("the rack runs its own PostgreSQL")?;
    let primary = cluster.primary().context("the cluster has a primary")?;
    let standby = cluster
        .members()
        .position(|member| member.role == Role::Standby)
        .context("the cluster has a standby")?;
    let killed = Instant::now();
    cluster.kill(primary);
    tokio::time::sleep(promote_after).await;
    cluster.promote(standby).await.context("promoting the standby")?;
    let promoted = killed.elapsed();
    let recovered = loop {
        let first = outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|o| o.kind == "upload" && o.ok() && o.ended > killed + promoted)
            .map(|o| o.ended - killed)
            .min();
        if let Some(first) = first {
            break first;
        }
        if uploader.is_finished() || killed.elapsed() > promoted + RECOVERY_LIMIT {
            bail!("no upload succeeded within {RECOVERY_LIMIT:?} of the promotion");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    stop.store(true, Ordering::SeqCst);
    uploader.await?;
    lister.await?;

    let outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
    let window: Vec<&Outcome> =
        outcomes.iter().filter(|o| o.ended >= killed && o.started <= killed + recovered).collect();
    let mut failed = BTreeMap::new();
    for outcome in window.iter().filter(|o| !o.ok()) {
        let status = outcome.status.map_or("transport".to_string(), |status| status.to_string());
        *failed.entry(format!("{} {status}", outcome.kind)).or_default() += 1;
    }
    let longest =
        outcomes.iter().filter(|o| o.ended >= killed).map(|o| o.ended - o.started).max().unwrap_or_default();
    Ok(FailoverResult { promoted, recovered, longest, requests: window.len(), failed })
}
