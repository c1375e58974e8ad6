//! Copies survive restarts: a copy cut short by a crash of its sled agent
//! keeps the bytes it wrote (`artifacts/tmp/<sha256>.copy` on each M.2), and
//! the next copy of that artifact re-hashes them and asks the depot only for
//! the rest (`Range: bytes=<offset>-`).
//!
//! The first test kills the real `sled-agent` binary (`kill -9`) in the
//! middle of a copy from a depot that sends slowly, as over a capped link,
//! and restarts it on the same M.2s. The others start an in-process sled on
//! M.2s that hold partials of their own making: of different lengths, the
//! whole artifact, and for a depot that ignores Range. The last has a copy
//! far slower than its peers continue (Range) from an alternate source.

use camino::{Utf8Path, Utf8PathBuf};
use common::api::sled_agent::ArtifactCopyFromDepotBody;
use common::{ArtifactHash, Generation};
use integration_tests::TestSled;
use integration_tests::fake_depot::{Behavior, FakeDepot, THROTTLE_CHUNK};
use integration_tests::processes::{SledProcess, write_sled_config};
use integration_tests::rack::wait_until;
use integration_tests::sled_agent_client::Client;
use integration_tests::synthetic::{Artifact, NO_NEXUS, artifact, config};
use sha2::Digest;
use std::time::Duration;

fn copy_body(depot: &FakeDepot) -> ArtifactCopyFromDepotBody {
    ArtifactCopyFromDepotBody { depot_base_url: depot.base_url(), alternates: Vec::new(), fallback: None }
}

fn partial(m2: &Utf8Path, artifact: &Artifact) -> Utf8PathBuf {
    m2.join("artifacts/tmp").join(format!("{}.copy", artifact.hash))
}

/// Waits until the artifact is on both M.2s and no copy is in flight.
async fn wait_for_landing(client: &Client, artifact: &Artifact) {
    wait_until("the copy lands on both M.2s", Duration::from_secs(30), async || {
        let listed = client.artifact_list().await.unwrap().into_inner();
        listed.list.get(&artifact.hash) == Some(&2) && listed.copies_in_flight.is_empty()
    })
    .await;
}

/// Each M.2 holds exactly the artifact, rightly, no temp file, and its usage
/// is exactly the artifact's size (no reservation left behind).
async fn assert_stored_exactly(client: &Client, m2s: &[Utf8PathBuf], artifact: &Artifact) {
    for m2 in m2s {
        let bytes = std::fs::read(m2.join("artifacts").join(artifact.hash.to_string())).unwrap();
        assert_eq!(ArtifactHash(sha2::Sha256::digest(&bytes).into()), artifact.hash, "{m2}");
        assert_eq!(std::fs::read_dir(m2.join("artifacts/tmp")).unwrap().count(), 0, "{m2}: temp files");
    }
    let inventory = client.inventory().await.unwrap().into_inner();
    for m2 in &inventory.m2 {
        assert_eq!(m2.used_bytes, artifact.bytes.len() as u64, "slot {}", m2.slot);
    }
    let listed = client.artifact_list().await.unwrap().into_inner();
    assert!(listed.copy_failures.is_empty(), "{:?}", listed.copy_failures);
}

/// The depot sends 4 MiB at 1 MiB/s in 64 KiB chunks (`THROTTLE_CHUNK`); the
/// sled agent dies once a third has been sent. After the restart the depot
/// must send only what the sled did not keep, asked for with a Range from
/// the kept offset: at most the bytes it had left to send when the agent
/// died plus one chunk, the one that may have been in flight then (in the
/// socket, or read but not yet written to both M.2s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_by_kill_9_continues_after_the_restart() {
    let dir = camino_tempfile::tempdir().unwrap();
    let m2s = write_sled_config(dir.path(), NO_NEXUS);
    let a = artifact(1, 4 << 20);
    let length = a.bytes.len() as u64;
    let depot = FakeDepot::start(a.bytes.clone(), Behavior::Throttled { bytes_per_sec: 1 << 20 }).await;

    let sled = SledProcess::start(dir.path(), None);
    sled.client().artifact_config_put(&config(1, &[&a])).await.unwrap();
    sled.client().artifact_copy_from_depot(&a.hash, 1, &copy_body(&depot)).await.unwrap();
    wait_until("a third of the artifact was sent", Duration::from_secs(20), async || {
        depot.served_bytes() >= length / 3
    })
    .await;
    let served_at_kill = depot.served_bytes();
    sled.process.kill_9();
    // Long enough for the depot to find the connection dead (it pauses 62 ms
    // between chunks; the first chunk after the kill still goes into the
    // socket): nothing of the first request is counted after this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served_before = depot.served_bytes();
    assert!(served_before < length, "the copy was cut short");
    let kept: Vec<u64> = m2s.iter().map(|m2| std::fs::metadata(partial(m2, &a)).unwrap().len()).collect();
    let offset = *kept.iter().min().unwrap();
    assert!(offset > 0, "the killed copy's bytes were kept: {kept:?}");

    let sled = SledProcess::start(dir.path(), None);
    let client = sled.client();
    let inventory = client.inventory().await.unwrap().into_inner();
    let used: Vec<u64> = inventory.m2.iter().map(|m2| m2.used_bytes).collect();
    assert_eq!(used, kept, "the kept bytes are reserved against the quota");
    assert_eq!(inventory.artifact_generation, Generation::new(1));

    // Nexus would ask again after the restart.
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(&depot)).await.unwrap();
    wait_for_landing(&client, &a).await;
    assert_eq!(depot.ranges(), [None, Some(format!("bytes={offset}-"))]);
    let served_after = depot.served_bytes() - served_before;
    assert_eq!(served_after, length - offset, "only what was not kept");
    assert!(
        served_after <= (length - served_at_kill) + THROTTLE_CHUNK as u64,
        "after the restart the depot sent {served_after} bytes; {} were left to send when the agent \
         died, and one chunk is {THROTTLE_CHUNK}",
        length - served_at_kill
    );
    assert_stored_exactly(&client, &m2s, &a).await;
    sled.process.kill_9();
}

/// A sled agent in this process on `dir`'s M.2s (`m2-0`, `m2-1`).
async fn sled_on(dir: &Utf8Path) -> (TestSled, Vec<Utf8PathBuf>) {
    let m2s = vec![dir.join("m2-0"), dir.join("m2-1")];
    let dirs = m2s.clone();
    let sled = TestSled::start_with(NO_NEXUS, move |config| config.storage.m2_dirs = dirs).await;
    (sled, m2s)
}

/// A stopped sled that holds the config for `artifact` and, on each M.2,
/// the partial given (the first so many bytes), as a killed copy leaves them.
async fn stopped_with_partials(dir: &Utf8Path, artifact: &Artifact, lengths: [usize; 2]) {
    let (sled, m2s) = sled_on(dir).await;
    sled.client().artifact_config_put(&config(1, &[artifact])).await.unwrap();
    sled.server.shutdown().await;
    for (m2, length) in m2s.iter().zip(lengths) {
        std::fs::write(partial(m2, artifact), &artifact.bytes[..length]).unwrap();
    }
}

async fn used_bytes(client: &Client) -> Vec<u64> {
    client.inventory().await.unwrap().into_inner().m2.iter().map(|m2| m2.used_bytes).collect()
}

/// Partials of different lengths: the copy continues from the shorter one
/// (the longer is cut to it), after re-hashing both. A request refused
/// before a byte was written (the source cannot be reached) keeps them.
#[tokio::test]
async fn partials_of_different_lengths_continue_from_the_shorter() {
    let dir = camino_tempfile::tempdir().unwrap();
    let a = artifact(2, 2 << 20);
    stopped_with_partials(dir.path(), &a, [1_500_000, 600_000]).await;
    let (sled, m2s) = sled_on(dir.path()).await;
    let client = sled.client();
    assert_eq!(used_bytes(&client).await, [1_500_000, 600_000]);

    let unreachable = ArtifactCopyFromDepotBody {
        depot_base_url: NO_NEXUS.to_string(),
        alternates: Vec::new(),
        fallback: None,
    };
    client.artifact_copy_from_depot(&a.hash, 1, &unreachable).await.unwrap_err();
    for m2 in &m2s {
        assert_eq!(std::fs::metadata(partial(m2, &a)).unwrap().len(), 600_000, "{m2}: cut, still held");
    }
    assert_eq!(used_bytes(&client).await, [600_000, 600_000]);

    let depot = FakeDepot::start(a.bytes.clone(), Behavior::Throttled { bytes_per_sec: 64 << 20 }).await;
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(&depot)).await.unwrap();
    wait_for_landing(&client, &a).await;
    assert_eq!(depot.ranges(), [Some("bytes=600000-".to_string())]);
    assert_eq!(depot.served_bytes(), a.bytes.len() as u64 - 600_000);
    assert_stored_exactly(&client, &m2s, &a).await;
}

/// A depot that answers a Range request with the whole artifact (200): the
/// copy starts over from byte 0 with that answer, and nothing is counted
/// twice against the quota.
#[tokio::test]
async fn a_depot_that_ignores_range_makes_the_copy_start_over() {
    let dir = camino_tempfile::tempdir().unwrap();
    let a = artifact(3, 1 << 20);
    stopped_with_partials(dir.path(), &a, [500_000, 500_000]).await;
    let (sled, m2s) = sled_on(dir.path()).await;
    let client = sled.client();
    let depot = FakeDepot::start(a.bytes.clone(), Behavior::IgnoreRange).await;
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(&depot)).await.unwrap();
    wait_for_landing(&client, &a).await;
    assert_eq!(depot.ranges(), [Some("bytes=500000-".to_string())], "one request, its answer used whole");
    assert_eq!(depot.served_bytes(), a.bytes.len() as u64);
    assert_stored_exactly(&client, &m2s, &a).await;
}

/// A partial that already holds every byte (the agent died between the last
/// byte and the rename): the depot answers 416 for the range past it, and
/// the copy is committed after the hash check, without a byte fetched.
#[tokio::test]
async fn a_partial_that_is_the_whole_artifact_lands_without_a_byte_fetched() {
    let dir = camino_tempfile::tempdir().unwrap();
    let a = artifact(4, 300_000);
    stopped_with_partials(dir.path(), &a, [300_000, 300_000]).await;
    let (sled, m2s) = sled_on(dir.path()).await;
    let client = sled.client();
    let depot = FakeDepot::start(a.bytes.clone(), Behavior::Throttled { bytes_per_sec: 64 << 20 }).await;
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(&depot)).await.unwrap();
    wait_for_landing(&client, &a).await;
    assert_eq!(depot.ranges(), [Some("bytes=300000-".to_string())]);
    assert_eq!(depot.served_bytes(), 0);
    assert_stored_exactly(&client, &m2s, &a).await;
}

/// A copy far slower than the sled's other copies (its source is a slow
/// sled, or behind one in a chain) moves to its alternate with a Range from
/// the bytes it has, and lands long before the slow source alone could have
/// sent it; its peers, equally fast, stay where they are. Nexus's depot,
/// the fallback, is where a slow copy goes only without a sled to go to,
/// and one copy of the sled at a time: on a sled whose own link is slow
/// every copy looks slow now and then, and Nexus's link carries every PUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_copy_moves_to_another_sled_first_and_one_at_a_time_to_the_fallback() {
    let dir = camino_tempfile::tempdir().unwrap();
    let (sled, _m2s) = sled_on(dir.path()).await;
    let slow = artifact(1, 2 << 20);
    let lone = [artifact(4, 1 << 20), artifact(5, 1 << 20)];
    let peers = [artifact(2, 3 << 20), artifact(3, 3 << 20)];
    let throttled = |bytes_per_sec| Behavior::Throttled { bytes_per_sec };
    let slow_source = FakeDepot::start(slow.bytes.clone(), throttled(64 << 10)).await;
    let alternate = FakeDepot::start(slow.bytes.clone(), throttled(4 << 20)).await;
    let unused_fallback = FakeDepot::start(slow.bytes.clone(), throttled(4 << 20)).await;
    let mut lone_sources = Vec::new();
    let mut fallbacks = Vec::new();
    for artifact in &lone {
        lone_sources.push(FakeDepot::start(artifact.bytes.clone(), throttled(64 << 10)).await);
        fallbacks.push(FakeDepot::start(artifact.bytes.clone(), throttled(4 << 20)).await);
    }
    let mut peer_depots = Vec::new();
    for peer in &peers {
        peer_depots.push(FakeDepot::start(peer.bytes.clone(), throttled(1 << 20)).await);
    }
    let client = sled.client();
    client.artifact_config_put(&config(1, &[&slow, &lone[0], &lone[1], &peers[0], &peers[1]])).await.unwrap();
    for (peer, depot) in peers.iter().zip(&peer_depots) {
        client.artifact_copy_from_depot(&peer.hash, 1, &copy_body(depot)).await.unwrap();
    }
    let body = ArtifactCopyFromDepotBody {
        depot_base_url: slow_source.base_url(),
        alternates: vec![alternate.base_url()],
        fallback: Some(unused_fallback.base_url()),
    };
    client.artifact_copy_from_depot(&slow.hash, 1, &body).await.unwrap();
    for ((artifact, source), fallback) in lone.iter().zip(&lone_sources).zip(&fallbacks) {
        let body = ArtifactCopyFromDepotBody {
            depot_base_url: source.base_url(),
            alternates: Vec::new(),
            fallback: Some(fallback.base_url()),
        };
        client.artifact_copy_from_depot(&artifact.hash, 1, &body).await.unwrap();
    }
    // From the slow sources alone the copies would take 32 s and 16 s.
    let mut asked_when_the_first_landed = None;
    wait_until("the slow copies land", Duration::from_secs(12), async || {
        let list = client.artifact_list().await.unwrap().into_inner().list;
        let landed = lone.iter().filter(|artifact| list.get(&artifact.hash) == Some(&2)).count();
        if landed == 1 && asked_when_the_first_landed.is_none() {
            asked_when_the_first_landed =
                Some(fallbacks.iter().filter(|depot| !depot.ranges().is_empty()).count());
        }
        list.get(&slow.hash) == Some(&2) && landed == 2
    })
    .await;
    assert_eq!(asked_when_the_first_landed, Some(1), "one copy at a time reads from the fallback for speed");
    for (depot, source) in [(&alternate, &slow_source)].into_iter().chain(fallbacks.iter().zip(&lone_sources))
    {
        let offset: u64 = match depot.ranges().as_slice() {
            [Some(range)] => {
                range.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).unwrap().parse().unwrap()
            }
            other => panic!("the next source should be asked once, for the rest: {other:?}"),
        };
        assert!(offset > 0 && offset <= source.served_bytes(), "resumed at {offset}");
        assert!(source.served_bytes() < slow.bytes.len() as u64 / 2);
    }
    assert!(unused_fallback.ranges().is_empty(), "a slow copy with another sled to go to leaves Nexus alone");
    for depot in &peer_depots {
        assert_eq!(depot.ranges(), [None], "a copy as fast as its peers does not move");
    }
    for peer in &peers {
        wait_for_landing(&client, peer).await;
    }
    let listed = client.artifact_list().await.unwrap().into_inner();
    assert!(listed.copy_failures.is_empty(), "{:?}", listed.copy_failures);
}
