//! How fast each running copy receives, so that a copy far slower than this
//! sled's other copies moves to another source (issue #20).
//!
//! In a pipelined chain a sled reads an artifact from the sled before it,
//! which forwards the bytes as they arrive. One slow or lossy sled in the
//! chain then holds back every sled after it, whatever their own links can
//! do. The sled after it cannot know the rack's link rates, but it can see
//! that this one copy runs far below its other copies, which share its own
//! link: the copies run at about the same rate when their sources are
//! equally good. So each copy measures its rate over fixed windows and
//! publishes it here; one that stays below [`SLOW_FRACTION`] of the median
//! of the others for [`SLOW_WINDOWS`] windows in a row resumes (Range) from
//! its next source. Copies on a sled whose own link is slow are all slow
//! together, so none of them moves: the comparison is relative on purpose.
//!
//! A copy with fewer than [`MIN_PEERS`] other measured copies beside it is
//! never judged: there is nothing to compare it with.

use common::ArtifactHash;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The span over which a copy's rate is measured.
pub(super) const WINDOW: Duration = Duration::from_secs(1);

/// A copy slower than this fraction of its peers' median rate is slow.
const SLOW_FRACTION: f64 = 0.3;

/// Consecutive slow windows before a copy moves: one window can be a
/// stall that any source has now and then.
const SLOW_WINDOWS: u32 = 2;

/// Other measured copies needed before a copy is judged.
const MIN_PEERS: usize = 2;

/// The latest window rate of every running copy that has one, bytes/s.
#[derive(Default)]
pub(super) struct CopyRates {
    rates: std::sync::Mutex<HashMap<ArtifactHash, f64>>,
}

/// Why a copy should move: its rate and its peers' median, bytes/s.
#[derive(Debug)]
pub(super) struct Slow {
    pub rate: f64,
    pub peers_median: f64,
}

/// One copy's measurement; dropping it withdraws the copy's rate.
pub(super) struct RateWatch {
    registry: Arc<CopyRates>,
    hash: ArtifactHash,
    window_start: Instant,
    window_bytes: u64,
    /// Windows ended since the copy (re)started reading from its source:
    /// the first is published but not judged, as it includes connecting and
    /// the source's own start (a low first rate among the peers only makes
    /// the others' judgement more lenient).
    windows: u32,
    slow_windows: u32,
}

impl RateWatch {
    pub fn new(registry: Arc<CopyRates>, hash: ArtifactHash) -> RateWatch {
        RateWatch { registry, hash, window_start: Instant::now(), window_bytes: 0, windows: 0, slow_windows: 0 }
    }

    pub fn window_end(&self) -> Instant {
        self.window_start + WINDOW
    }

    pub fn add(&mut self, bytes: usize) {
        self.window_bytes += bytes as u64;
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
        let mut rates = self.registry.rates.lock().unwrap_or_else(|e| e.into_inner());
        rates.insert(self.hash, rate);
        if self.windows == 1 {
            return None;
        }
        let mut peers: Vec<f64> =
            rates.iter().filter(|(hash, _)| **hash != self.hash).map(|(_, &rate)| rate).collect();
        drop(rates);
        if peers.len() < MIN_PEERS {
            self.slow_windows = 0;
            return None;
        }
        peers.sort_by(f64::total_cmp);
        let peers_median = peers[peers.len() / 2];
        if rate >= SLOW_FRACTION * peers_median {
            self.slow_windows = 0;
            return None;
        }
        self.slow_windows += 1;
        (self.slow_windows >= SLOW_WINDOWS).then_some(Slow { rate, peers_median })
    }

    /// The copy reads from a new source now: measure it afresh.
    pub fn restart(&mut self) {
        self.withdraw();
        *self = RateWatch::new(self.registry.clone(), self.hash);
    }

    fn withdraw(&self) {
        self.registry.rates.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.hash);
    }
}

impl Drop for RateWatch {
    fn drop(&mut self) {
        self.withdraw();
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
    fn a_copy_far_below_its_peers_moves_after_two_judged_windows() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..4).map(|n| watch(&registry, n)).collect();
        let rates = [100_000, 1_000_000, 1_000_000, 900_000];
        assert_eq!(run(&mut watches, &rates, 2), [false; 4], "the first window is not judged, one slow one is not enough");
        assert_eq!(run(&mut watches, &rates, 1), [true, false, false, false]);
        watches[0].restart();
        assert_eq!(run(&mut watches, &[1_000_000; 4], 3), [false; 4], "after a move it is measured afresh");
    }

    #[test]
    fn copies_that_are_all_slow_together_stay() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..4).map(|n| watch(&registry, n)).collect();
        assert_eq!(run(&mut watches, &[10_000, 11_000, 9_000, 10_000], 6), [false; 4]);
    }

    #[test]
    fn a_copy_without_enough_peers_is_never_judged() {
        let registry = Arc::new(CopyRates::default());
        let mut watches: Vec<RateWatch> = (0..2).map(|n| watch(&registry, n)).collect();
        assert_eq!(run(&mut watches, &[1, 1_000_000], 6), [false; 2]);
        drop(watches.pop());
        assert!(registry.rates.lock().unwrap().len() == 1, "a dropped watch withdraws its rate");
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
