//! How fast each running copy receives, so that a copy far slower than this
//! sled's other copies moves to another source (issue #20).
//!
//! In a pipelined chain a sled reads an artifact from the sled before it,
//! which forwards the bytes as they arrive. One slow or lossy sled in the
//! chain then holds back every sled after it, whatever their own links can
//! do. The sled after it cannot know the rack's link rates, but it can see
//! two things:
//! - this one copy runs far below its other copies (running, or finished
//!   in the last [`RECENT`]), which share its own link: copies run at about
//!   the same rate when their sources are equally good;
//! - its link has room: the copies' total rate is well below its typical
//!   total (upper quartile) of the last [`RECENT`]. While the link is full, moving a
//!   copy only reshuffles the same bytes (and on a sled whose own link is
//!   slow, the unfairness of many flows on one slow link would look like
//!   slow sources); once the fast copies are done, the slow one is what
//!   holds the sled back.
//!
//! So each copy measures its rate over fixed windows and publishes it here;
//! one that has been slow for [`SLOW_WINDOWS`] windows in a row resumes
//! (Range) from its next source in the first window its link has room (a
//! copy behind a slow sled moves as soon as its faster peers are done). A
//! copy with fewer than [`MIN_PEERS`] rates to compare with is never
//! judged.
//!
//! In a chain, every sled below a slow one is slow together: without more,
//! all of them would move at once, most onto the same few sources, where
//! only the first needed to (the others follow it once it is fast again).
//! So a copy whose source is more than one in-flight write away from a
//! complete copy (its depot says how far: `common::depot::HOPS_HEADER`)
//! waits [`HOP_GRACE_WINDOWS`] more windows with room per extra hop.
//!
//! The best total of the last [`REPORTED_SPAN`] is also what the sled
//! reports to Nexus as its copy rate: what its link has shown it can do.

use common::ArtifactHash;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The span over which a copy's rate is measured.
pub(super) const WINDOW: Duration = Duration::from_millis(500);

/// A copy slower than this fraction of its peers' upper-quartile rate is
/// slow. The upper quartile, not the median: with one slow sled in every
/// chain, half of a sled's copies or more can be behind it, and the median
/// is then one of them.
const SLOW_FRACTION: f64 = 0.3;

/// The link has room when the copies' total is below this fraction of its
/// typical recent total.
const ROOM_FRACTION: f64 = 0.7;

/// How long finished copies' rates and past totals count.
const RECENT: Duration = Duration::from_secs(30);

/// How far back the best total reported to Nexus looks: long enough that
/// a busy period's end (a last slow copy) does not stand for the link.
const REPORTED_SPAN: Duration = Duration::from_secs(300);

/// Consecutive slow windows before a copy moves: one window can be a
/// stall that any source has now and then. With the first window unjudged,
/// a copy behind a slow sled moves after about 1.5 s.
const SLOW_WINDOWS: u32 = 2;

/// Windows with room a copy waits, per hop of its source beyond the
/// first, before it moves (see [`RateWatch::set_source_hops`]): time for
/// the sled above it to move off a slow source and speed it up again.
const HOP_GRACE_WINDOWS: u32 = 2;

/// Rates (other copies', running or recent) needed before a copy is
/// judged. One will do: the link's room is checked too.
const MIN_PEERS: usize = 1;

/// What the running copies, and those of the last [`RECENT`], achieved.
#[derive(Default)]
pub(super) struct CopyRates {
    inner: std::sync::Mutex<Rates>,
}

#[derive(Default)]
struct Rates {
    /// The latest window rate of every running copy that has one, bytes/s.
    running: HashMap<ArtifactHash, f64>,
    /// The last rate of copies that finished, with when.
    finished: VecDeque<(Instant, f64)>,
    /// The running copies' total at each judgement, with when.
    totals: VecDeque<(Instant, f64)>,
    /// The best total when copies last ran, for the listing between copies.
    last_best: Option<f64>,
    /// Sources (`host:port`) a copy moved off as slow, and when: another
    /// copy moving does not pick them while they are recent.
    slow_sources: HashMap<String, Instant>,
}

/// `host:port` of a depot URL.
fn source_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

impl Rates {
    fn forget_old(&mut self, now: Instant) {
        self.slow_sources.retain(|_, time| now.duration_since(*time) <= RECENT);
        for list in [&mut self.finished, &mut self.totals] {
            while list.front().is_some_and(|(time, _)| now.duration_since(*time) > REPORTED_SPAN) {
                list.pop_front();
            }
        }
    }

    /// The best the link did recently: the copies' best total, or a
    /// finished copy's own rate if higher (copies that end within their
    /// first window never add to a total).
    fn best_total(&self, now: Instant, span: Duration) -> Option<f64> {
        self.totals
            .iter()
            .chain(&self.finished)
            .filter(|(time, _)| now.duration_since(*time) <= span)
            .map(|(_, rate)| *rate)
            .max_by(f64::total_cmp)
    }

    /// What the link typically carried in the last [`RECENT`]: the upper
    /// quartile of the copies' totals (and of finished copies' own rates).
    /// Not the maximum: on a slow link shared by many flows the total jumps
    /// about, and its peaks would make a full link look as if it had room.
    fn typical_total(&self, now: Instant) -> Option<f64> {
        let mut recent: Vec<f64> = self
            .totals
            .iter()
            .filter(|(time, _)| now.duration_since(*time) <= RECENT)
            .map(|(_, total)| *total)
            .chain(self.recently_finished(now))
            .collect();
        recent.sort_by(f64::total_cmp);
        recent.get(recent.len() * 3 / 4).copied()
    }

    /// The rates of copies that finished in the last [`RECENT`].
    fn recently_finished(&self, now: Instant) -> impl Iterator<Item = f64> + '_ {
        self.finished
            .iter()
            .filter(move |(time, _)| now.duration_since(*time) <= RECENT)
            .map(|(_, rate)| *rate)
    }
}

impl CopyRates {
    /// A copy moved off the depot at `url` as slow.
    pub fn mark_slow_source(&self, url: &str) {
        let mut rates = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        rates.slow_sources.insert(source_of(url).to_string(), Instant::now());
    }

    /// Whether a copy moved off the depot at `url` as slow in the last
    /// [`RECENT`].
    pub fn recently_slow(&self, url: &str) -> bool {
        let mut rates = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        rates.forget_old(Instant::now());
        rates.slow_sources.contains_key(source_of(url))
    }

    /// The best total rate of this sled's copies over the last
    /// [`REPORTED_SPAN`], or the last one seen; `None` until a copy has been measured. Nexus
    /// compares sleds by it (see `replication_plan`'s slow sleds).
    pub fn best_total(&self) -> Option<u64> {
        let mut rates = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        rates.forget_old(now);
        if let Some(best) = rates.best_total(now, REPORTED_SPAN) {
            rates.last_best = Some(best);
        }
        rates.last_best.map(|rate| rate as u64)
    }
}

/// Why a copy should move: its rate and its peers' upper quartile, with
/// the totals that showed the link had room.
#[derive(Debug)]
pub(super) struct Slow {
    pub rate: f64,
    pub reference: f64,
    /// The running copies' total, and the link's typical total, bytes/s.
    pub total: f64,
    pub typical_total: f64,
}

/// One copy's measurement; dropping it withdraws the copy's rate, which
/// then counts among the recent ones.
pub(super) struct RateWatch {
    registry: Arc<CopyRates>,
    hash: ArtifactHash,
    started: Instant,
    bytes: u64,
    window_start: Instant,
    window_bytes: u64,
    /// Windows ended since the copy (re)started reading from its source:
    /// the first is published but not judged, as it includes connecting and
    /// the source's own start (a low first rate among the peers only makes
    /// the others' judgement more lenient).
    windows: u32,
    slow_windows: u32,
    /// Consecutive slow windows in which the link had room.
    slow_windows_with_room: u32,
    /// Windows with room to wait beyond the first: [`HOP_GRACE_WINDOWS`]
    /// per in-flight write between the source and the sled that receives
    /// from a complete copy, which moves first if its source is slow.
    grace_windows: u32,
}

impl RateWatch {
    pub fn new(registry: Arc<CopyRates>, hash: ArtifactHash) -> RateWatch {
        let now = Instant::now();
        RateWatch {
            registry,
            hash,
            started: now,
            bytes: 0,
            window_start: now,
            window_bytes: 0,
            windows: 0,
            slow_windows: 0,
            slow_windows_with_room: 0,
            grace_windows: 0,
        }
    }

    /// The source is `hops` in-flight writes from a complete copy
    /// (`common::depot::HOPS_HEADER`).
    pub fn set_source_hops(&mut self, hops: u32) {
        self.grace_windows = HOP_GRACE_WINDOWS * hops.saturating_sub(1);
    }

    pub fn window_end(&self) -> Instant {
        self.window_start + WINDOW
    }

    pub fn add(&mut self, bytes: usize) {
        self.window_bytes += bytes as u64;
        self.bytes += bytes as u64;
    }

    /// At the end of a window (and only then), publishes the copy's rate and
    /// says whether it should move to another source.
    pub fn judge(&mut self, now: Instant) -> Option<Slow> {
        if now < self.window_end() {
            return None;
        }
        let rate = self.window_bytes as f64 / (now - self.window_start).as_secs_f64();
        self.window_start = now;
        self.window_bytes = 0;
        self.windows += 1;
        let mut rates = self.registry.inner.lock().unwrap_or_else(|e| e.into_inner());
        rates.forget_old(now);
        rates.running.insert(self.hash, rate);
        let total: f64 = rates.running.values().sum();
        rates.totals.push_back((now, total));
        if self.windows == 1 {
            return None;
        }
        let mut peers: Vec<f64> = rates
            .running
            .iter()
            .filter(|(hash, _)| **hash != self.hash)
            .map(|(_, rate)| *rate)
            .chain(rates.recently_finished(now))
            .collect();
        let typical_total = rates.typical_total(now).unwrap_or(total);
        drop(rates);
        if peers.len() < MIN_PEERS {
            self.slow_windows = 0;
            return None;
        }
        peers.sort_by(f64::total_cmp);
        let reference = peers[peers.len() * 3 / 4];
        if rate >= SLOW_FRACTION * reference {
            (self.slow_windows, self.slow_windows_with_room) = (0, 0);
            return None;
        }
        // Slow windows on a full link count too: a copy that was slow all
        // along moves in the first window the link has room, not
        // [`SLOW_WINDOWS`] later.
        self.slow_windows += 1;
        let room = total < ROOM_FRACTION * typical_total;
        self.slow_windows_with_room = if room { self.slow_windows_with_room + 1 } else { 0 };
        (self.slow_windows >= SLOW_WINDOWS && self.slow_windows_with_room > self.grace_windows)
            .then_some(Slow { rate, reference, total, typical_total })
    }

    /// The copy reads from a new source now: measure it afresh (its slow
    /// rate is no peer's reference).
    pub fn restart(&mut self) {
        self.registry.inner.lock().unwrap_or_else(|e| e.into_inner()).running.remove(&self.hash);
        let now = Instant::now();
        (self.started, self.bytes, self.window_start, self.window_bytes) = (now, 0, now, 0);
        (self.windows, self.slow_windows, self.slow_windows_with_room) = (0, 0, 0);
    }
}

impl Drop for RateWatch {
    fn drop(&mut self) {
        let now = Instant::now();
        let whole = self.bytes as f64 / (now - self.started).as_secs_f64().max(0.001);
        let mut rates = self.registry.inner.lock().unwrap_or_else(|e| e.into_inner());
        // A copy that ended within its first window has only its whole rate.
        let rate = rates.running.remove(&self.hash).unwrap_or(whole);
        if self.bytes > 0 {
            rates.finished.push_back((now, rate));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(registry: &Arc<CopyRates>, n: u8) -> RateWatch {
        RateWatch::new(registry.clone(), ArtifactHash([n; 32]))
    }

    /// Runs `windows` windows in which watch i receives `per_window[i]`
    /// bytes, and returns what each judged at the last one.
    fn run(watches: &mut [RateWatch], per_window: &[usize], windows: u32) -> Vec<bool> {
        let mut verdicts = vec![false; watches.len()];
        for _ in 0..windows {
            let end = watches.iter().map(RateWatch::window_end).max().expect("some watches");
            for (watch, (bytes, verdict)) in watches.iter_mut().zip(per_window.iter().zip(&mut verdicts)) {
                watch.add(*bytes);
                *verdict = watch.judge(end).is_some();
            }
        }
        verdicts
    }

    #[test]
    fn a_copy_far_below_its_peers_moves_once_the_link_has_room() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..4).map(|n| watch(&registry, n)).collect();
        assert_eq!(run(&mut watches, &[1_000_000, 2_000_000, 2_000_000, 2_000_000], 2), [false; 4]);
        // Its source slowed down, and the link is no longer full.
        let slowed = [100_000, 1_000_000, 1_000_000, 1_000_000];
        // The first slowed window it judges before its peers publish
        // theirs (the link still looks full), which counts as one slow
        // window, not yet enough; in the second the link has room.
        assert_eq!(run(&mut watches, &slowed, 1), [false; 4]);
        assert_eq!(run(&mut watches, &slowed, 1), [true, false, false, false]);
        watches[0].restart();
        assert_eq!(run(&mut watches, &[1_000_000; 4], 3), [false; 4], "after a move it is measured afresh");
    }

    #[test]
    fn a_slow_copy_on_a_full_link_stays() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..4).map(|n| watch(&registry, n)).collect();
        assert_eq!(run(&mut watches, &[100_000, 1_000_000, 1_000_000, 900_000], 6), [false; 4]);
    }

    #[test]
    fn copies_that_are_all_slow_together_stay() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..4).map(|n| watch(&registry, n)).collect();
        run(&mut watches, &[1_000_000; 4], 2);
        assert_eq!(run(&mut watches, &[10_000, 11_000, 9_000, 10_000], 6), [false; 4]);
    }

    #[test]
    fn a_lone_slow_copy_moves_after_its_fast_peers_finish() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..3).map(|n| watch(&registry, n)).collect();
        assert_eq!(run(&mut watches, &[10_000, 1_000_000, 1_000_000], 3), [false; 3], "the link is full");
        watches.truncate(1);
        assert_eq!(
            run(&mut watches, &[10_000], 1),
            [true],
            "judged against the finished copies' rates, in the first window with room: it was slow all along"
        );
    }

    #[test]
    fn a_copy_far_down_a_chain_gives_the_sleds_above_it_time_to_move_first() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..3).map(|n| watch(&registry, n)).collect();
        watches[0].set_source_hops(3);
        assert_eq!(run(&mut watches, &[10_000, 1_000_000, 1_000_000], 3), [false; 3], "the link is full");
        watches.truncate(1);
        assert_eq!(run(&mut watches, &[10_000], 2 * HOP_GRACE_WINDOWS), [false], "two hops above it");
        assert_eq!(run(&mut watches, &[10_000], 1), [true], "still slow: nobody above fixed it");
    }

    #[test]
    fn copies_that_end_within_a_window_still_set_the_reference() {
        let registry = Arc::new(CopyRates::default());
        for n in 1..=2 {
            let mut quick = watch(&registry, n);
            quick.add(10_000_000);
        }
        assert!(registry.best_total().is_some_and(|rate| rate > 1_000_000));
        let mut slow = vec![watch(&registry, 3)];
        assert_eq!(run(&mut slow, &[10_000], 2), [false]);
        assert_eq!(
            run(&mut slow, &[10_000], 1),
            [true],
            "slow against the quick ones, and the link has room"
        );
    }

    #[test]
    fn a_source_found_slow_is_remembered_by_host() {
        let registry = CopyRates::default();
        registry.mark_slow_source("http://10.0.0.4:12346/artifact/sha256/aa");
        assert!(registry.recently_slow("http://10.0.0.4:12346/artifact/sha256/bb"));
        assert!(!registry.recently_slow("http://10.0.0.5:12346/artifact/sha256/aa"));
    }

    #[test]
    fn a_lone_copy_is_never_judged_and_the_best_total_stands() {
        let registry = Arc::new(CopyRates::default());
        let mut alone = vec![watch(&registry, 0)];
        run(&mut alone, &[1_000_000], 2);
        assert_eq!(run(&mut alone, &[1], 6), [false], "nothing to compare it with");
        assert_eq!(registry.best_total(), Some(2_000_000), "1 MB a half-second");
        alone.clear();
        assert_eq!(registry.best_total(), Some(2_000_000), "between copies, it stands");
    }

    #[test]
    fn a_stall_of_one_window_is_not_slow() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..3).map(|n| watch(&registry, n)).collect();
        run(&mut watches, &[1_000_000; 3], 2);
        assert_eq!(run(&mut watches, &[0, 1_000_000, 1_000_000], 1), [false; 3]);
        assert_eq!(run(&mut watches, &[1_000_000; 3], 1), [false; 3]);
        assert_eq!(run(&mut watches, &[0, 1_000_000, 1_000_000], 1), [false; 3]);
    }
}
