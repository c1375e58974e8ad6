//! A copy stays "in flight" until its bytes are renamed into place and
//! synced, not only until the last byte arrived: in between, a second
//! request for the same artifact must not start a second download. The
//! window is held open with a failpoint delay before the rename; failpoints
//! are process-wide, so this test has a binary of its own.

use common::api::sled_agent::ArtifactCopyFromDepotBody;
use common::{ArtifactConfig, ArtifactHash, Generation};
use integration_tests::TestSled;
use integration_tests::fake_depot::{Behavior, FakeDepot};
use integration_tests::rack::wait_until;
use sha2::Digest;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_stays_in_flight_until_its_commit_is_durable() {
    let _scenario = fail::FailScenario::setup();
    let sled = TestSled::start("http://127.0.0.1:1").await;
    let client = sled.client();
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let hash = ArtifactHash(sha2::Sha256::digest(&bytes).into());
    let config = ArtifactConfig { generation: Generation::new(1), artifacts: [hash].into() };
    client.artifact_config_put(&config).await.unwrap();
    // Serves every byte on the first request (and after, if asked again).
    let source = FakeDepot::start(bytes.clone(), Behavior::ResetAfter(usize::MAX)).await;
    let body = ArtifactCopyFromDepotBody {
        depot_base_url: source.base_url(),
        alternates: Vec::new(),
        fallback: None,
    };

    fail::cfg("sled_agent::store::before_rename", "1*sleep(1500)").unwrap();
    client.artifact_copy_from_depot(&hash, 1, &body).await.unwrap();
    wait_until("every byte arrived", Duration::from_secs(10), async || {
        source.served_bytes() == bytes.len() as u64
    })
    .await;
    // Now the copy is between its last byte and its rename.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let listed = client.artifact_list().await.unwrap().into_inner();
    assert!(listed.list.is_empty(), "not renamed yet");
    assert!(listed.copies_in_flight.contains(&hash), "still in flight: {listed:?}");
    client.artifact_copy_from_depot(&hash, 1, &body).await.unwrap();
    wait_until("the copy lands", Duration::from_secs(10), async || {
        client.artifact_list().await.unwrap().into_inner().list.get(&hash) == Some(&2)
    })
    .await;
    wait_until("the copy leaves the in-flight set", Duration::from_secs(10), async || {
        client.artifact_list().await.unwrap().into_inner().copies_in_flight.is_empty()
    })
    .await;
    assert_eq!(source.ranges().len(), 1, "the second request started no second download");
}
