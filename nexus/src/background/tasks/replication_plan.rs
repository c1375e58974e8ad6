//! The replication planner: a pure function from what the sleds hold (and
//! what this Nexus has staged) to the requests that make every sled hold
//! every artifact on every healthy M.2. `tuf_artifact_replication` executes
//! the plan; this module decides it, and is tested exhaustively on its own.
//!
//! For each artifact of the config, in hash order:
//! - if no sled holds it and this Nexus has it staged, PUT it to one random
//!   sled with [`Fanout::Pipelined`], to `min_sled_replication` random sleds
//!   with [`Fanout::TwoStage`] (all of them if there are fewer), to every
//!   sled that lacks it with [`Fanout::Star`];
//! - every other sled that lacks it copies it (see the fan-outs below);
//! - a sled that holds fewer copies than it has healthy M.2s copies it again,
//!   from another holder if there is one (else from its own depot, which
//!   rewrites every healthy M.2);
//! - an artifact that nobody holds and that is not staged here is reported
//!   as unplaceable (another Nexus may hold it);
//! - a sled that says it is copying an artifact now is left alone: asking
//!   again would only be answered "already copying";
//! - a sled backing off for an artifact (its last requests or copies of it
//!   failed) is not asked for it, and not chosen as a PUT target; it may
//!   still serve as a source if it holds the artifact.
//!
//! Sleds with no healthy M.2 are neither targets nor sources.
//!
//! # Slow sleds and spread heads (issue #20)
//!
//! Each artifact's single PUT goes to the sled that heads the fewest chains
//! of this plan so far, so the chains start at different sleds and every
//! sled's uplink carries a share. A sled measured slow ([`slow_sleds`]:
//! its copies run below a fraction of the median sled's) is a PUT target
//! only when no other sled can be, and goes last in every chain: nobody
//! reads from it, and it pulls at its own rate from a sled that keeps up.
//! Before anything is measured (a rack's first upload) a slow sled may sit
//! mid-chain; the sleds after it then move off it themselves (see the sled
//! agent's `store::rate`), to the first alternate each copy carries: its
//! chain's head.
//!
//! # Copy slots (issue #20)
//!
//! A sled runs a bounded number of copies at once and refuses one more as
//! busy. The planner sends a sled at most its free slots of new copies
//! ([`SledState::copy_slots`]), artifacts in hash order; the rest are
//! *deferred* to a later activation (copies running on sleds keep
//! follow-ups coming), not sent to be refused. An artifact that nobody
//! holds is PUT only if some sled that wants it can start a copy now, or
//! no other sled wants it: a PUT that no chain can follow would only share
//! Nexus's link with the PUTs that chains do follow. So each round moves
//! a few artifacts through every sled at link rate, rather than every
//! artifact at a fraction of it with most copies refused.
//!
//! # Fan-out
//!
//! - [`Fanout::Pipelined`] (the default): the sleds that hold the artifact or
//!   receive one of this round's PUTs are the roots of a *tree*; the sleds
//!   that lack it hang below them in breadth-first order, each feeding at
//!   most [`TREE_FANOUT`] others (the slow ones last, as leaves; those that
//!   have sent least in this plan first, as inner nodes, so every uplink
//!   carries a share). Each copies from its parent, while that one is still
//!   receiving: a depot
//!   streams an artifact it is still writing, as the bytes arrive, and every
//!   receiver verifies the whole hash before its rename. Every sled's link
//!   then carries the artifact about once in and once out, Nexus's included
//!   (one PUT), so the time is close to the repository's size over one
//!   link, whatever the sled count. A copy resumes (Range) from the other
//!   heads or from a sled earlier in its chain if its source breaks.
//! - [`Fanout::TwoStage`]: every other sled copies from a random head, once
//!   the PUTs of the round have finished (omicron's plan; a baseline).
//! - [`Fanout::Star`]: Nexus PUTs to every sled itself (a baseline).
//!
//! Concurrency: the executor starts a copy marked [`Feed::Pipelined`] once
//! the request that fills its source has started, and one marked
//! [`Feed::AfterPut`] once every PUT of the round has finished; any other
//! copy reads from a sled that held the artifact before the round.
//! Each copy carries a few alternate sources, for the sled to resume from
//! (with a Range request) if its own source breaks.

use common::ArtifactHash;
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

pub type SledId = Uuid;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SledState {
    pub id: SledId,
    pub healthy_m2: usize,
    /// New copies the sled can start now (its limit less its copies in
    /// flight); `usize::MAX` if it does not say.
    pub copy_slots: usize,
    /// Measured far slower than the other sleds: not a PUT target while
    /// another sled can be, and last in every chain, so that no sled waits
    /// on it.
    pub slow: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArtifactState {
    /// Copies per sled, for sleds that hold at least one.
    pub copies: BTreeMap<SledId, usize>,
    /// Whether this Nexus has the artifact staged.
    pub local: bool,
    /// Sleds copying it right now: not asked again, not used as sources.
    pub incoming: BTreeSet<SledId>,
    /// Sleds not to ask for it now (back-off after failures).
    pub backing_off: BTreeSet<SledId>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub sleds: Vec<SledState>,
    pub artifacts: BTreeMap<ArtifactHash, ArtifactState>,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub min_sled_replication: usize,
    pub fanout: Fanout,
}

/// How an artifact spreads from the sleds that hold or receive it first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fanout {
    #[default]
    Pipelined,
    TwoStage,
    Star,
}

/// How a copy's source comes to hold the artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// It held the artifact before this round.
    Holds,
    /// A PUT of this round fills it; the copy waits for the round's PUTs.
    AfterPut,
    /// An earlier request of this round fills it; the copy starts once that
    /// request has started, and reads the bytes as they arrive.
    Pipelined,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Put {
        hash: ArtifactHash,
        sled: SledId,
    },
    Copy {
        hash: ArtifactHash,
        target: SledId,
        source: SledId,
        feed: Feed,
        recopy: bool,
        /// Other sources to resume from if `source` breaks.
        alternates: Vec<SledId>,
    },
}

/// What to send instead of `copy` (a copy of `requests`) when the request
/// that was to fill its source failed: the same copy from its first
/// alternate, the others still alternates; without alternates, a PUT to its
/// target if this round PUTs that artifact (it is staged here), so that a
/// chain whose head refused still fills. `None` for a PUT, or when neither
/// applies.
pub fn reroute(requests: &[Request], copy: &Request) -> Option<Request> {
    let Request::Copy { hash, target, feed, recopy, alternates, .. } = copy else { return None };
    match alternates.split_first() {
        Some((&source, rest)) => Some(Request::Copy {
            hash: *hash,
            target: *target,
            source,
            feed: *feed,
            recopy: *recopy,
            alternates: rest.to_vec(),
        }),
        None => requests
            .iter()
            .any(|request| matches!(request, Request::Put { hash: put, .. } if put == hash))
            .then_some(Request::Put { hash: *hash, sled: *target }),
    }
}

/// Alternate sources offered with each copy.
const ALTERNATES: usize = 2;

/// Followers each sled of a pipelined tree feeds: the tree's depth is
/// log2(N), where a chain's was N.
const TREE_FANOUT: usize = 2;

/// Up to [`ALTERNATES`] distinct random sleds from `pools`, read as one list,
/// leaving out the one at `except` (the source). It costs O(ALTERNATES),
/// not the pools' length: with 1,000 sleds in one chain, building the
/// candidates for every copy was the planner's k × N² term.
fn pick_excluding(pools: [&[SledId]; 2], except: usize, rng: &mut impl Rng) -> Vec<SledId> {
    let length = pools[0].len() + pools[1].len();
    let available = length.saturating_sub(1);
    rand::seq::index::sample(rng, available, ALTERNATES.min(available))
        .into_iter()
        .map(|n| if n >= except { n + 1 } else { n })
        .map(|n| if n < pools[0].len() { pools[0][n] } else { pools[1][n - pools[0].len()] })
        .collect()
}

/// A sled copying slower than this fraction of the median sled is slow.
const SLOW_FRACTION: f64 = 0.3;

/// Sleds with a measured rate needed before any is called slow.
const MIN_MEASURED_FOR_SLOW: usize = 3;

/// The sleds whose copies run far slower than the median sled's, from each
/// sled's last reported copy rate (bytes/s; a sled's own median over its
/// running copies). Relative, like the sleds' own judgement of a slow
/// source: a rack whose links are all slow has no slow sled.
pub fn slow_sleds(rates: &BTreeMap<SledId, u64>) -> BTreeSet<SledId> {
    if rates.len() < MIN_MEASURED_FOR_SLOW {
        return BTreeSet::new();
    }
    let mut sorted: Vec<u64> = rates.values().copied().collect();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2] as f64;
    rates.iter().filter(|(_, rate)| (**rate as f64) < SLOW_FRACTION * median).map(|(&id, _)| id).collect()
}

/// A sled's count in a tally of this plan (0 if it has none).
fn count(counts: &BTreeMap<SledId, usize>, sled: &SledId) -> usize {
    counts.get(sled).copied().unwrap_or(0)
}

/// The PUT target among `candidates` that heads the fewest trees so far,
/// then sends the fewest copies, a sled not measured slow if there is one;
/// random among equals.
fn least_used_head(
    candidates: &[&&SledState],
    heads_so_far: &BTreeMap<SledId, usize>,
    sends: &BTreeMap<SledId, usize>,
    rng: &mut impl Rng,
) -> Option<SledId> {
    let rank = |sled: &SledState| (sled.slow, count(heads_so_far, &sled.id), count(sends, &sled.id));
    let best = candidates.iter().map(|sled| rank(sled)).min()?;
    let equals: Vec<SledId> =
        candidates.iter().filter(|sled| rank(sled) == best).map(|sled| sled.id).collect();
    equals.choose(rng).copied()
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// PUTs first, then copies.
    pub requests: Vec<Request>,
    pub unplaceable: Vec<ArtifactHash>,
    /// Requests left out because their (sled, artifact) is backing off.
    pub skipped_backoff: usize,
    /// Copies left for a later activation: their target has no free slot.
    pub deferred: usize,
}

pub fn plan(inventory: &Inventory, rng: &mut impl Rng, limits: Limits) -> Plan {
    let usable: Vec<&SledState> = inventory.sleds.iter().filter(|sled| sled.healthy_m2 > 0).collect();
    let mut puts = Vec::new();
    let mut copies = Vec::new();
    let mut unplaceable = Vec::new();
    let mut skipped_backoff = 0;
    let mut deferred = 0;
    let mut slots: BTreeMap<SledId, usize> = usable.iter().map(|sled| (sled.id, sled.copy_slots)).collect();
    let slow: BTreeSet<SledId> = usable.iter().filter(|sled| sled.slow).map(|sled| sled.id).collect();
    // PUTs per sled in this plan, so that each artifact's chain starts at a
    // different sled and every sled's uplink carries a share.
    let mut heads_so_far: BTreeMap<SledId, usize> = BTreeMap::new();
    // Copies that read from each sled in this plan: its uplink's share.
    let mut sends: BTreeMap<SledId, usize> = BTreeMap::new();
    for (hash, state) in &inventory.artifacts {
        let holders: Vec<SledId> = usable
            .iter()
            .filter(|sled| state.copies.get(&sled.id).is_some_and(|&n| n > 0))
            .map(|sled| sled.id)
            .collect();
        let wanted = |sled: &SledState| {
            !state.incoming.contains(&sled.id)
                && state.copies.get(&sled.id).copied().unwrap_or(0) < sled.healthy_m2
        };
        let mut put_targets: Vec<SledId> = Vec::new();
        if holders.is_empty() {
            if !state.local {
                unplaceable.push(*hash);
                continue;
            }
            let candidates: Vec<&&SledState> = usable
                .iter()
                .filter(|sled| !state.backing_off.contains(&sled.id) && !state.incoming.contains(&sled.id))
                .collect();
            let followable = candidates.iter().any(|sled| slots[&sled.id] > 0);
            if limits.fanout != Fanout::Star && candidates.len() > 1 && !followable {
                deferred += candidates.len();
                continue;
            }
            put_targets = match limits.fanout {
                Fanout::Star => candidates.iter().map(|sled| sled.id).collect(),
                // One PUT: the chain makes every other copy at link rate, so
                // Nexus's link carries the repository once. Durability does
                // not rest on the PUT count: the staged copy stays until
                // `min_sled_replication` sleds hold the artifact.
                Fanout::Pipelined => {
                    least_used_head(&candidates, &heads_so_far, &sends, rng).into_iter().collect()
                }
                Fanout::TwoStage => candidates
                    .choose_multiple(rng, limits.min_sled_replication.min(candidates.len()))
                    .map(|sled| sled.id)
                    .collect(),
            };
            for &sled in &put_targets {
                *heads_so_far.entry(sled).or_default() += 1;
            }
            put_targets.sort();
            puts.extend(put_targets.iter().map(|&sled| Request::Put { hash: *hash, sled }));
            if put_targets.is_empty() {
                skipped_backoff += usable.len();
                continue;
            }
        }
        // The heads sending least so far take the first followers.
        let mut heads: Vec<SledId> = holders.iter().chain(&put_targets).copied().collect();
        heads.shuffle(rng);
        heads.sort_by_key(|sled| count(&sends, sled));
        let heads_index: BTreeMap<SledId, usize> =
            heads.iter().enumerate().map(|(index, &id)| (id, index)).collect();
        let mut followers = Vec::new();
        for sled in usable.iter().filter(|sled| wanted(sled) && !put_targets.contains(&sled.id)) {
            if state.backing_off.contains(&sled.id) {
                skipped_backoff += 1;
                continue;
            }
            let free = slots.get_mut(&sled.id).expect("every usable sled has slots");
            if *free == 0 {
                deferred += 1;
                continue;
            }
            *free -= 1;
            let held = state.copies.get(&sled.id).copied().unwrap_or(0);
            if held > 0 {
                // Another holder, else its own depot (which rewrites every
                // healthy M.2). Here the heads are the holders.
                let own = heads_index[&sled.id];
                let source_index = match heads.len() {
                    1 => own,
                    count => {
                        let pick = rng.random_range(0..count - 1);
                        if pick >= own { pick + 1 } else { pick }
                    }
                };
                copies.push(Request::Copy {
                    hash: *hash,
                    target: sled.id,
                    source: heads[source_index],
                    feed: Feed::Holds,
                    recopy: true,
                    alternates: pick_excluding([&heads, &[]], source_index, rng),
                });
            } else {
                followers.push(sled.id);
            }
        }
        // Random among equals; the slow ones last (leaves: nobody reads from
        // them), and among the rest those sending least so far first (the
        // inner nodes of the tree below, which send the artifact on).
        followers.shuffle(rng);
        followers.sort_by_key(|sled| (slow.contains(sled), count(&sends, sled)));
        match limits.fanout {
            Fanout::Pipelined => {
                // A tree in breadth-first order: the heads, then the
                // followers; the follower at `position` copies from the
                // node at `(position - heads) / TREE_FANOUT`. Its depth is
                // log(N), so the last sled starts a few hops after the PUT.
                let tree: Vec<SledId> = heads.iter().copied().chain(followers).collect();
                let parent_of = |position: usize| (position - heads.len()) / TREE_FANOUT;
                for position in heads.len()..tree.len() {
                    let parent = parent_of(position);
                    let source = tree[parent];
                    let feed = match parent < heads.len() && !put_targets.contains(&source) {
                        true => Feed::Holds,
                        false => Feed::Pipelined,
                    };
                    // The followers above this one, from the head's child
                    // down to its source, each at least as far along as the
                    // source; the head is one of the heads.
                    let mut ancestors = Vec::new();
                    let mut node = parent;
                    while node >= heads.len() {
                        ancestors.push(tree[node]);
                        node = parent_of(node);
                    }
                    let head = tree[node];
                    ancestors.reverse();
                    let source_index = match ancestors.len() {
                        0 => parent,
                        above => heads.len() + above - 1,
                    };
                    let mut alternates = pick_excluding([&heads, &ancestors], source_index, rng);
                    if !ancestors.is_empty() {
                        // The head first: a copy moves off a source that is
                        // slow (a slow sled above it), and the head is fed by
                        // Nexus or already holds the artifact.
                        alternates.retain(|&sled| sled != head);
                        alternates.insert(0, head);
                        alternates.truncate(ALTERNATES);
                    }
                    *sends.entry(source).or_default() += 1;
                    copies.push(Request::Copy {
                        hash: *hash,
                        target: tree[position],
                        source,
                        feed,
                        recopy: false,
                        alternates,
                    });
                }
            }
            Fanout::TwoStage | Fanout::Star => {
                for target in followers {
                    let source_index = rng.random_range(0..heads.len());
                    let source = heads[source_index];
                    let feed = if put_targets.contains(&source) { Feed::AfterPut } else { Feed::Holds };
                    copies.push(Request::Copy {
                        hash: *hash,
                        target,
                        source,
                        feed,
                        recopy: false,
                        alternates: pick_excluding([&heads, &[]], source_index, rng),
                    });
                }
            }
        }
    }
    puts.extend(copies);
    Plan { requests: puts, unplaceable, skipped_backoff, deferred }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::BTreeSet;

    fn sleds(count: usize) -> Vec<SledState> {
        let mut sleds: Vec<SledState> = (0..count)
            .map(|i| SledState {
                id: Uuid::from_u128(i as u128 + 1),
                healthy_m2: 2,
                copy_slots: usize::MAX,
                slow: false,
            })
            .collect();
        sleds.sort_by_key(|s| s.id);
        sleds
    }

    fn hash(n: u8) -> ArtifactHash {
        ArtifactHash([n; 32])
    }

    fn limits(min: usize) -> Limits {
        Limits { min_sled_replication: min, fanout: Fanout::Pipelined }
    }

    fn with(min: usize, fanout: Fanout) -> Limits {
        Limits { min_sled_replication: min, fanout }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn count(planned: &Plan) -> (usize, usize, usize) {
        let puts = planned.requests.iter().filter(|r| matches!(r, Request::Put { .. })).count();
        let copies =
            planned.requests.iter().filter(|r| matches!(r, Request::Copy { recopy: false, .. })).count();
        let recopies =
            planned.requests.iter().filter(|r| matches!(r, Request::Copy { recopy: true, .. })).count();
        (puts, copies, recopies)
    }

    #[test]
    fn nothing_to_do_when_every_sled_holds_everything() {
        let sleds = sleds(4);
        let copies = sleds.iter().map(|s| (s.id, 2)).collect();
        let inventory = Inventory {
            artifacts: [(hash(1), ArtifactState { copies, local: true, ..Default::default() })].into(),
            sleds,
        };
        assert_eq!(plan(&inventory, &mut rng(), limits(3)), Plan::default());
        assert_eq!(plan(&Inventory::default(), &mut rng(), limits(3)), Plan::default());
    }

    #[test]
    fn local_only_artifacts_are_put_to_one_sled_and_chained_to_the_rest() {
        for (sled_count, expected_puts) in [(1, 1), (3, 1), (16, 1)] {
            let inventory = Inventory {
                sleds: sleds(sled_count),
                artifacts: [(
                    hash(1),
                    ArtifactState { copies: BTreeMap::new(), local: true, ..Default::default() },
                )]
                .into(),
            };
            let planned = plan(&inventory, &mut rng(), limits(3));
            assert_eq!(count(&planned), (expected_puts, sled_count - expected_puts, 0), "{sled_count} sleds");
            let mut filled: BTreeSet<SledId> = BTreeSet::new();
            let mut reads: BTreeMap<SledId, usize> = BTreeMap::new();
            for request in &planned.requests {
                match request {
                    Request::Put { sled, .. } => {
                        filled.insert(*sled);
                    }
                    Request::Copy { source, target, feed, .. } => {
                        assert_eq!(*feed, Feed::Pipelined, "every source is still receiving");
                        assert!(filled.contains(source), "a source is filled by an earlier request");
                        assert!(filled.insert(*target), "one request per target");
                        *reads.entry(*source).or_default() += 1;
                    }
                }
            }
            assert!(
                reads.values().all(|&n| n <= TREE_FANOUT),
                "each sled feeds at most the fan-out: {reads:?}"
            );
            let depth = trees(&planned).values().map(|tree| tree.depth()).max().unwrap_or(0);
            let bound = (sled_count as f64).log2().ceil() as usize;
            assert!(depth <= bound, "{sled_count} sleds: a tree {depth} deep, more than log2 N");
            let first_copy = planned.requests.iter().position(|r| matches!(r, Request::Copy { .. }));
            let last_put = planned.requests.iter().rposition(|r| matches!(r, Request::Put { .. }));
            assert!(first_copy.is_none() || first_copy > last_put, "PUTs come first");
        }
    }

    #[test]
    fn a_copy_whose_source_failed_moves_to_its_next_alternate_or_becomes_a_put() {
        let [a, b, c, d] = [1, 2, 3, 4].map(Uuid::from_u128);
        let copy = |hash, source, alternates: Vec<SledId>| Request::Copy {
            hash,
            target: a,
            source,
            feed: Feed::Pipelined,
            recopy: false,
            alternates,
        };
        let put = Request::Put { hash: hash(1), sled: b };
        let round = [put.clone(), copy(hash(1), b, vec![]), copy(hash(2), c, vec![])];
        assert_eq!(reroute(&round, &copy(hash(1), b, vec![c, d])), Some(copy(hash(1), c, vec![d])));
        assert_eq!(reroute(&round, &copy(hash(1), c, vec![d])), Some(copy(hash(1), d, vec![])));
        assert_eq!(
            reroute(&round, &copy(hash(1), d, vec![])),
            Some(Request::Put { hash: hash(1), sled: a }),
            "staged here: PUT to the copy's target"
        );
        assert_eq!(reroute(&round, &copy(hash(2), c, vec![])), None, "not PUT this round: not staged");
        assert_eq!(reroute(&round, &put), None);
    }

    #[test]
    fn the_baseline_fanouts_put_to_every_sled_or_copy_from_the_put_targets_after_them() {
        let inventory = Inventory {
            sleds: sleds(8),
            artifacts: [(hash(1), ArtifactState { local: true, ..Default::default() })].into(),
        };
        assert_eq!(count(&plan(&inventory, &mut rng(), with(3, Fanout::Star))), (8, 0, 0));
        let two_stage = plan(&inventory, &mut rng(), with(3, Fanout::TwoStage));
        assert_eq!(count(&two_stage), (3, 5, 0));
        assert!(
            two_stage
                .requests
                .iter()
                .all(|r| matches!(r, Request::Put { .. } | Request::Copy { feed: Feed::AfterPut, .. }))
        );
    }

    #[test]
    fn a_new_empty_sled_copies_from_the_holders() {
        let mut all = sleds(4);
        let copies: BTreeMap<SledId, usize> = all.iter().take(3).map(|s| (s.id, 2)).collect();
        let newcomer = all[3].id;
        all.rotate_left(0);
        let inventory = Inventory {
            sleds: all,
            artifacts: [(
                hash(1),
                ArtifactState { copies: copies.clone(), local: false, ..Default::default() },
            )]
            .into(),
        };
        let planned = plan(&inventory, &mut rng(), limits(3));
        assert_eq!(planned.requests.len(), 1);
        let Request::Copy { target, source, feed, recopy, ref alternates, .. } = planned.requests[0] else {
            panic!()
        };
        assert_eq!((target, feed, recopy), (newcomer, Feed::Holds, false));
        assert!(copies.contains_key(&source));
        assert_eq!(alternates.len(), 2, "the other holders");
        assert!(alternates.iter().all(|a| *a != source && copies.contains_key(a)));
    }

    #[test]
    fn a_sled_with_one_of_two_copies_copies_again() {
        let all = sleds(2);
        let copies = [(all[0].id, 1), (all[1].id, 2)].into();
        let inventory = Inventory {
            sleds: all.clone(),
            artifacts: [(hash(1), ArtifactState { copies, local: false, ..Default::default() })].into(),
        };
        let planned = plan(&inventory, &mut rng(), limits(3));
        assert_eq!(
            planned.requests,
            [Request::Copy {
                hash: hash(1),
                target: all[0].id,
                source: all[1].id,
                feed: Feed::Holds,
                recopy: true,
                alternates: vec![all[0].id],
            }]
        );

        // Alone with its one copy, a sled rewrites from its own depot.
        let alone = sleds(1);
        let copies = [(alone[0].id, 1)].into();
        let inventory = Inventory {
            sleds: alone.clone(),
            artifacts: [(hash(1), ArtifactState { copies, local: false, ..Default::default() })].into(),
        };
        let planned = plan(&inventory, &mut rng(), limits(3));
        assert_eq!(
            planned.requests,
            [Request::Copy {
                hash: hash(1),
                target: alone[0].id,
                source: alone[0].id,
                feed: Feed::Holds,
                recopy: true,
                alternates: vec![],
            }]
        );
    }

    #[test]
    fn sleds_already_copying_are_left_alone() {
        let all = sleds(3);
        let state = ArtifactState {
            copies: [(all[0].id, 2)].into(),
            local: false,
            incoming: [all[1].id].into(),
            ..Default::default()
        };
        let inventory = Inventory { sleds: all.clone(), artifacts: [(hash(1), state)].into() };
        let planned = plan(&inventory, &mut rng(), limits(3));
        assert_eq!(
            planned.requests,
            [Request::Copy {
                hash: hash(1),
                target: all[2].id,
                source: all[0].id,
                feed: Feed::Holds,
                recopy: false,
                alternates: vec![],
            }]
        );
    }

    #[test]
    fn two_stage_with_min_replication_beyond_the_sled_count_puts_to_every_sled() {
        let inventory = Inventory {
            sleds: sleds(2),
            artifacts: [(
                hash(1),
                ArtifactState { copies: BTreeMap::new(), local: true, ..Default::default() },
            )]
            .into(),
        };
        assert_eq!(count(&plan(&inventory, &mut rng(), with(5, Fanout::TwoStage))), (2, 0, 0));
    }

    #[test]
    fn artifacts_nobody_holds_are_unplaceable_and_sleds_without_healthy_m2s_are_skipped() {
        let mut all = sleds(3);
        all[2].healthy_m2 = 0;
        let broken = all[2].id;
        let inventory = Inventory {
            sleds: all,
            artifacts: [
                (hash(1), ArtifactState { copies: BTreeMap::new(), local: false, ..Default::default() }),
                (hash(2), ArtifactState { copies: BTreeMap::new(), local: true, ..Default::default() }),
            ]
            .into(),
        };
        let planned = plan(&inventory, &mut rng(), limits(1));
        assert_eq!(planned.unplaceable, [hash(1)]);
        assert_eq!(count(&planned), (1, 1, 0));
        assert!(planned.requests.iter().all(|r| !matches!(r, Request::Put { sled, .. } | Request::Copy { target: sled, .. } if *sled == broken)));
    }

    /// Over many random worlds and every fan-out, executing the plan as the
    /// executor does:
    /// - a copy reads from a sled that held the artifact before the round;
    ///   or, marked `AfterPut`, from one of the round's PUT targets (it
    ///   waits for the PUTs); or, marked `Pipelined`, from a sled an earlier
    ///   request of the round fills (it starts after that one and streams):
    ///   never from a sled that nothing of the round fills, and never from a
    ///   sled a *later* request fills;
    /// - no request goes to a sled copying that artifact already or backing
    ///   off for it, and each sled gets at most one request per artifact;
    /// - afterwards every other usable sled holds every placeable artifact
    ///   on all its healthy M.2s.
    #[test]
    fn executing_any_plan_concurrently_converges_and_reads_only_from_sources_filled_in_order() {
        for seed in 0..1500u64 {
            let mut world_rng = StdRng::seed_from_u64(seed);
            let fanout = [Fanout::Pipelined, Fanout::TwoStage, Fanout::Star][seed as usize % 3];
            let sled_count = world_rng.random_range(1..=12);
            let mut all = sleds(sled_count);
            let slot_limited = world_rng.random_bool(0.3);
            for sled in &mut all {
                sled.healthy_m2 = world_rng.random_range(0..=3);
                if slot_limited {
                    sled.copy_slots = world_rng.random_range(0..=3);
                }
            }
            let mut artifacts = BTreeMap::new();
            for n in 0..world_rng.random_range(0..6u8) {
                let mut state = ArtifactState { local: world_rng.random_bool(0.5), ..Default::default() };
                for sled in &all {
                    if sled.healthy_m2 > 0 && world_rng.random_bool(0.3) {
                        state.copies.insert(sled.id, world_rng.random_range(1..=sled.healthy_m2));
                    } else if world_rng.random_bool(0.1) {
                        state.incoming.insert(sled.id);
                    }
                    if world_rng.random_bool(0.15) {
                        state.backing_off.insert(sled.id);
                    }
                }
                artifacts.insert(hash(n), state);
            }
            let inventory = Inventory { sleds: all.clone(), artifacts };
            let min = world_rng.random_range(1..=4);
            let planned = plan(&inventory, &mut StdRng::seed_from_u64(seed ^ 0xabc), with(min, fanout));

            let healthy: BTreeMap<SledId, usize> = all.iter().map(|s| (s.id, s.healthy_m2)).collect();
            let before: BTreeMap<ArtifactHash, BTreeMap<SledId, usize>> =
                inventory.artifacts.iter().map(|(h, s)| (*h, s.copies.clone())).collect();
            let mut after = before.clone();
            let mut put_targets: BTreeSet<(ArtifactHash, SledId)> = BTreeSet::new();
            let mut filled_so_far: BTreeSet<(ArtifactHash, SledId)> = BTreeSet::new();
            let mut asked: BTreeSet<(ArtifactHash, SledId)> = BTreeSet::new();
            let mut seen_copy = false;
            for request in &planned.requests {
                let (hash, target) = match request {
                    Request::Put { hash, sled } => (hash, sled),
                    Request::Copy { hash, target, .. } => (hash, target),
                };
                let state = &inventory.artifacts[hash];
                assert!(!state.incoming.contains(target), "seed {seed}: {target} is already copying {hash}");
                assert!(!state.backing_off.contains(target), "seed {seed}: {target} is backing off {hash}");
                assert!(asked.insert((*hash, *target)), "seed {seed}: {target} asked twice for {hash}");
                match request {
                    Request::Put { hash, sled } => {
                        assert!(!seen_copy, "seed {seed}: PUTs come first");
                        assert!(state.local, "seed {seed}: PUT of an unstaged artifact");
                        put_targets.insert((*hash, *sled));
                    }
                    Request::Copy { hash, source, feed, alternates, .. } => {
                        seen_copy = true;
                        let held_before = before[hash].get(source).copied().unwrap_or(0) > 0;
                        match feed {
                            Feed::Holds => assert!(held_before, "seed {seed}: {source} lacks {hash}"),
                            Feed::AfterPut => {
                                assert!(
                                    put_targets.contains(&(*hash, *source)),
                                    "seed {seed}: AfterPut names no PUT"
                                )
                            }
                            Feed::Pipelined => assert!(
                                filled_so_far.contains(&(*hash, *source)),
                                "seed {seed}: {source} is filled by no earlier request"
                            ),
                        }
                        assert!(!alternates.contains(source), "seed {seed}: the source is no alternate");
                        for alternate in alternates {
                            let held = before[hash].get(alternate).copied().unwrap_or(0) > 0;
                            assert!(
                                held || filled_so_far.contains(&(*hash, *alternate)),
                                "seed {seed}: alternate {alternate} of {hash} is filled by no earlier request"
                            );
                        }
                    }
                }
                filled_so_far.insert((*hash, *target));
                after.get_mut(hash).unwrap().insert(*target, healthy[target]);
            }
            for sled in &all {
                let copies = planned
                    .requests
                    .iter()
                    .filter(|r| matches!(r, Request::Copy { target, .. } if *target == sled.id))
                    .count();
                assert!(
                    copies <= sled.copy_slots,
                    "seed {seed}: {copies} copies to {} beyond its slots",
                    sled.id
                );
            }
            if slot_limited {
                // What is deferred waits for a later round.
                continue;
            }
            for (hash, holders) in &after {
                let state = &inventory.artifacts[hash];
                if planned.unplaceable.contains(hash) {
                    assert!(holders.is_empty() && !state.local, "seed {seed}");
                    continue;
                }
                for sled in all.iter().filter(|s| s.healthy_m2 > 0) {
                    let left_alone =
                        state.incoming.contains(&sled.id) || state.backing_off.contains(&sled.id);
                    if !left_alone && (!holders.is_empty() || state.local) {
                        assert_eq!(
                            holders.get(&sled.id).copied().unwrap_or(0),
                            sled.healthy_m2,
                            "seed {seed} ({fanout:?}): {hash} on {}",
                            sled.id
                        );
                    }
                }
            }
        }
    }

    /// A release of 16 artifacts, staged here, on 8 sleds that run 4 copies
    /// at a time: no sled is sent more than its 4 (the rest deferred, not
    /// refused), and an artifact is PUT only if a chain can follow it now,
    /// so that Nexus's link feeds only what the sleds can take.
    #[test]
    fn copies_beyond_a_sleds_free_slots_are_deferred_with_the_puts_only_they_need() {
        let mut all = sleds(8);
        for sled in &mut all {
            sled.copy_slots = 4;
        }
        let artifacts =
            (1..=16).map(|n| (hash(n), ArtifactState { local: true, ..Default::default() })).collect();
        let inventory = Inventory { sleds: all.clone(), artifacts };
        let planned = plan(&inventory, &mut rng(), limits(3));
        let (puts, copies, _) = count(&planned);
        for sled in &all {
            let sent = planned
                .requests
                .iter()
                .filter(|r| matches!(r, Request::Copy { target, .. } if *target == sled.id))
                .count();
            assert!(sent <= 4, "{sent} copies to {}", sled.id);
        }
        // A PUT artifact has 7 followers; one held back has 8 sleds waiting.
        assert_eq!(copies + planned.deferred, puts * 7 + (16 - puts) * 8, "{planned:?}");
        assert!((4..16).contains(&puts), "{puts} PUTs: only artifacts a chain follows now");
        for request in &planned.requests {
            if let Request::Put { hash, .. } = request {
                assert!(
                    planned.requests.iter().any(|r| matches!(r, Request::Copy { hash: h, .. } if h == hash)),
                    "the PUT of {hash} has a follower"
                );
            }
        }

        // Every slot in use: nothing is sent, not even a PUT.
        for sled in &mut all {
            sled.copy_slots = 0;
        }
        let inventory = Inventory { sleds: all, ..inventory };
        let planned = plan(&inventory, &mut rng(), limits(3));
        assert!(planned.requests.is_empty(), "{planned:?}");
        assert_eq!(planned.deferred, 16 * 8);
    }

    #[test]
    fn alternates_are_distinct_random_picks_that_leave_out_the_source() {
        let ids: Vec<SledId> = (1..=5).map(Uuid::from_u128).collect();
        let (heads, chain) = ids.split_at(2);
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            for except in 0..ids.len() {
                let picked = pick_excluding([heads, chain], except, &mut rng);
                assert_eq!(picked.len(), ALTERNATES);
                assert!(!picked.contains(&ids[except]), "the source is no alternate");
                assert_ne!(picked[0], picked[1]);
                seen.extend(picked);
            }
        }
        assert_eq!(seen.len(), ids.len(), "every other sled is picked sometimes");
        assert!(pick_excluding([&ids[..1], &[]], 0, &mut rng()).is_empty(), "only the source");
        assert_eq!(pick_excluding([&ids[..2], &[]], 0, &mut rng()), vec![ids[1]]);
    }

    #[test]
    fn sleds_backing_off_are_neither_asked_nor_put_to() {
        let all = sleds(4);
        let state =
            ArtifactState { local: true, backing_off: [all[0].id, all[1].id].into(), ..Default::default() };
        let inventory = Inventory { sleds: all.clone(), artifacts: [(hash(1), state)].into() };
        let planned = plan(&inventory, &mut rng(), with(3, Fanout::TwoStage));
        assert_eq!(count(&planned), (2, 0, 0), "PUTs to the two sleds not backing off: {planned:?}");
        assert_eq!(planned.skipped_backoff, 2);
        assert!(
            planned
                .requests
                .iter()
                .all(|r| matches!(r, Request::Put { sled, .. } if *sled == all[2].id || *sled == all[3].id))
        );

        let everyone = ArtifactState {
            local: true,
            backing_off: all.iter().map(|s| s.id).collect(),
            ..Default::default()
        };
        let inventory = Inventory { sleds: all, artifacts: [(hash(1), everyone)].into() };
        let planned = plan(&inventory, &mut rng(), limits(3));
        assert!(planned.requests.is_empty());
        assert_eq!(planned.skipped_backoff, 4);
    }

    /// 16 staged artifacts, nobody holding any, on `sleds`.
    fn a_release_on(sleds: Vec<SledState>) -> Inventory {
        let staged = ArtifactState { local: true, ..Default::default() };
        Inventory { sleds, artifacts: (1..=16).map(|n| (hash(n), staged.clone())).collect() }
    }

    /// One artifact's tree: its PUT target, and each copy's source.
    #[derive(Default)]
    struct Tree {
        head: Option<SledId>,
        parent: BTreeMap<SledId, SledId>,
    }

    impl Tree {
        fn depth_of(&self, mut sled: SledId) -> usize {
            let mut depth = 0;
            while let Some(&parent) = self.parent.get(&sled) {
                sled = parent;
                depth += 1;
            }
            depth
        }

        fn depth(&self) -> usize {
            self.parent.keys().map(|&sled| self.depth_of(sled)).max().unwrap_or(0)
        }

        fn feeds(&self, sled: SledId) -> bool {
            self.parent.values().any(|&parent| parent == sled)
        }
    }

    /// Each artifact's tree, checking that every copy reads from the head
    /// or from a sled an earlier copy fills.
    fn trees(planned: &Plan) -> BTreeMap<ArtifactHash, Tree> {
        let mut trees: BTreeMap<ArtifactHash, Tree> = BTreeMap::new();
        for request in &planned.requests {
            match request {
                Request::Put { hash, sled } => trees.entry(*hash).or_default().head = Some(*sled),
                Request::Copy { hash, target, source, .. } => {
                    let tree = trees.entry(*hash).or_default();
                    assert!(
                        tree.head == Some(*source) || tree.parent.contains_key(source),
                        "{hash}: {source} is filled by no earlier request"
                    );
                    tree.parent.insert(*target, *source);
                }
            }
        }
        trees
    }

    #[test]
    fn each_sled_heads_an_equal_share_of_the_trees_and_sends_an_equal_share() {
        let planned = plan(&a_release_on(sleds(8)), &mut rng(), limits(3));
        let mut heads: BTreeMap<SledId, usize> = BTreeMap::new();
        for tree in trees(&planned).values() {
            assert_eq!(tree.parent.len(), 7);
            *heads.entry(tree.head.unwrap()).or_default() += 1;
        }
        assert_eq!(heads.len(), 8, "{heads:?}");
        assert!(heads.values().all(|&n| n == 2), "{heads:?}");
        // 16 artifacts x 7 copies over 8 uplinks: 14 each, give or take
        // two trees' fan-out (a random chain-free deal strays further).
        let mut sends: BTreeMap<SledId, usize> = BTreeMap::new();
        for request in &planned.requests {
            if let Request::Copy { source, .. } = request {
                *sends.entry(*source).or_default() += 1;
            }
        }
        let (least, most) = (sends.values().min().unwrap(), sends.values().max().unwrap());
        assert!(most - least <= 2 * TREE_FANOUT, "uplinks unevenly used: {sends:?}");
    }

    #[test]
    fn a_slow_sled_heads_no_tree_and_feeds_no_sled() {
        let mut all = sleds(8);
        all[3].slow = true;
        all[5].slow = true;
        let slow = [all[3].id, all[5].id];
        let planned = plan(&a_release_on(all.clone()), &mut rng(), limits(3));
        for (hash, tree) in trees(&planned) {
            assert!(!slow.contains(&tree.head.unwrap()), "{hash}: a slow sled is no PUT target");
            for sled in slow {
                assert!(!tree.feeds(sled), "{hash}: a slow sled feeds no other");
            }
        }
        for request in &planned.requests {
            if let Request::Copy { source, target, .. } = request
                && !slow.contains(target)
            {
                assert!(!slow.contains(source), "no sled that keeps up reads from a slow one");
            }
        }

        // Only slow sleds can take it: one of them is PUT to all the same.
        let only_slow: Vec<SledState> = all.iter().filter(|s| s.slow).cloned().collect();
        let planned = plan(&a_release_on(only_slow), &mut rng(), limits(3));
        assert_eq!(count(&planned), (16, 16, 0));
    }

    #[test]
    fn a_copy_behind_the_head_may_move_to_the_head_first() {
        let planned = plan(&a_release_on(sleds(8)), &mut rng(), limits(3));
        let trees = trees(&planned);
        for request in &planned.requests {
            if let Request::Copy { hash, source, alternates, .. } = request {
                let head = trees[hash].head.unwrap();
                assert!(!alternates.contains(source), "{alternates:?}");
                assert!(alternates.len() <= ALTERNATES);
                if *source != head {
                    assert_eq!(alternates.first(), Some(&head), "{hash}: the head is the first alternate");
                }
            }
        }
    }

    #[test]
    fn sleds_far_below_the_median_rate_are_slow() {
        let ids: Vec<SledId> = (1..=5).map(Uuid::from_u128).collect();
        let rates = |values: &[u64]| ids.iter().copied().zip(values.iter().copied()).collect();
        assert_eq!(slow_sleds(&rates(&[1000, 1000, 900, 250, 310])), [ids[3]].into());
        assert!(slow_sleds(&rates(&[10, 11, 9, 10, 12])).is_empty(), "all slow together: none is");
        assert!(slow_sleds(&rates(&[1000, 1])).is_empty(), "too few sleds measured");
    }
}
