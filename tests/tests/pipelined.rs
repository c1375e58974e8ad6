//! Pipelined replication over real HTTP: a sled's depot serves an artifact
//! it is still receiving, as the bytes arrive, so the next sled can copy it
//! before the first has finished; and a copy moves on to an alternate depot
//! when its source cannot be used or breaks off.
//!
//! The invariant watched while it could break: a follower never receives a
//! byte the writer has not received, and a write that turns out wrong (its
//! hash) never hands a follower a whole response, so the follower's copy
//! stores nothing.

use common::api::sled_agent::ArtifactCopyFromDepotBody;
use futures::StreamExt;
use integration_tests::TestSled;
use integration_tests::fake_depot::{Behavior, FakeDepot};
use integration_tests::rack::wait_until;
use integration_tests::sled_agent_client::{Client, Error as ClientError};
use integration_tests::synthetic::{Artifact, NO_NEXUS, artifact, config};
use std::time::Duration;
use tokio::sync::mpsc;

/// Starts a PUT of `body` as `artifact` whose body the test feeds through
/// the returned sender. It is sent with `Content-Length`, as Nexus sends
/// its PUTs: a sled follows only writes whose length it knows.
fn fed_put(
    sled: &TestSled,
    artifact: &Artifact,
    length: usize,
) -> (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<reqwest::StatusCode>) {
    let (feed, chunks) = mpsc::channel::<Vec<u8>>(4);
    let body = futures::stream::unfold(chunks, |mut chunks| async move {
        chunks.recv().await.map(|chunk| (Ok::<_, std::io::Error>(chunk), chunks))
    });
    let request = reqwest::Client::new()
        .put(format!("{}/artifacts/{}?generation=1", sled.api_url(), artifact.hash))
        .header(reqwest::header::CONTENT_LENGTH, length)
        .body(reqwest::Body::wrap_stream(body));
    (feed, tokio::spawn(async move { request.send().await.unwrap().status() }))
}

fn copy_body(source: String, alternates: Vec<String>) -> ArtifactCopyFromDepotBody {
    ArtifactCopyFromDepotBody { depot_base_url: source, alternates, fallback: None }
}

async fn holds(client: &Client, artifact: &Artifact) -> usize {
    client.artifact_list().await.unwrap().into_inner().list.get(&artifact.hash).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_depot_serves_an_artifact_it_is_still_receiving_and_the_next_sled_copies_it() {
    let (first, second) = (TestSled::start(NO_NEXUS).await, TestSled::start(NO_NEXUS).await);
    let a = artifact(1, 4 << 20);
    for sled in [&first, &second] {
        sled.client().artifact_config_put(&config(1, &[&a])).await.unwrap();
    }
    let (feed, put) = fed_put(&first, &a, a.bytes.len());
    let (head, tail) = a.bytes.split_at(1 << 20);
    feed.send(head.to_vec()).await.unwrap();

    // A download from the first sled's depot, and a copy to the second
    // sled from it, both while the PUT is a quarter done.
    let url = format!("{}/artifact/sha256/{}", first.depot_url(), a.hash);
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(a.bytes.len() as u64));
    let hops = |response: &reqwest::Response| response.headers().get(common::depot::HOPS_HEADER).cloned();
    assert_eq!(hops(&response), Some(1.into()), "bytes of a PUT, one write from Nexus's complete copy");
    let mut download = response.bytes_stream();
    second
        .client()
        .artifact_copy_from_depot(&a.hash, 1, &copy_body(first.depot_url(), Vec::new()))
        .await
        .unwrap();

    // The write publishes with its next chunk; then the follower gets what
    // was written, and nothing beyond it.
    feed.send(tail[..64 << 10].to_vec()).await.unwrap();
    let written = head.len() + (64 << 10);
    let mut received = Vec::new();
    while received.len() < written - 1 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), download.next()).await;
        received.extend_from_slice(&chunk.expect("the bytes written so far arrive").unwrap().unwrap());
        assert!(received.len() <= written, "the depot sent {} bytes of {written} received", received.len());
    }
    assert_eq!(received, a.bytes[..received.len()], "the bytes written so far, in order");
    assert!(!put.is_finished(), "the PUT is still running");
    assert_eq!(holds(&first.client(), &a).await, 0, "the first sled has not committed the artifact");
    let copying = second.client().artifact_list().await.unwrap().into_inner();
    assert!(copying.copies_in_flight.contains(&a.hash), "the second sled copies while the first receives");
    let second_url = format!("{}/artifact/sha256/{}", second.depot_url(), a.hash);
    let from_second = reqwest::get(&second_url).await.unwrap();
    assert_eq!(hops(&from_second), Some(2.into()), "one more hop down the chain");
    drop(from_second);

    for chunk in tail[64 << 10..].chunks(256 << 10) {
        feed.send(chunk.to_vec()).await.unwrap();
    }
    drop(feed);
    assert_eq!(put.await.unwrap(), 200);
    while let Some(chunk) = download.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(received, a.bytes, "the follower got the whole artifact");
    wait_until("the second sled's copy lands", Duration::from_secs(20), async || {
        holds(&second.client(), &a).await == 2
    })
    .await;
    assert_eq!(hops(&reqwest::get(&second_url).await.unwrap()), None, "a complete copy is no hop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_following_a_put_of_the_wrong_bytes_is_cut_off_and_stores_nothing() {
    let (first, second) = (TestSled::start(NO_NEXUS).await, TestSled::start(NO_NEXUS).await);
    let a = artifact(2, 2 << 20);
    for sled in [&first, &second] {
        sled.client().artifact_config_put(&config(1, &[&a])).await.unwrap();
    }
    let mut wrong = a.bytes.clone();
    *wrong.last_mut().unwrap() ^= 1;
    let (feed, put) = fed_put(&first, &a, wrong.len());
    feed.send(wrong[..1 << 20].to_vec()).await.unwrap();
    second
        .client()
        .artifact_copy_from_depot(&a.hash, 1, &copy_body(first.depot_url(), Vec::new()))
        .await
        .unwrap();
    for chunk in wrong[1 << 20..].chunks(128 << 10) {
        feed.send(chunk.to_vec()).await.unwrap();
        // While the copy runs, the second sled never holds the artifact.
        assert_eq!(holds(&second.client(), &a).await, 0);
    }
    drop(feed);
    assert_eq!(put.await.unwrap(), 400, "the PUT's hash check fails");
    wait_until("the second sled gives the copy up", Duration::from_secs(30), async || {
        let list = second.client().artifact_list().await.unwrap().into_inner();
        list.copies_in_flight.is_empty() && list.copy_failures.contains_key(&a.hash)
    })
    .await;
    assert_eq!(holds(&second.client(), &a).await, 0, "nothing stored from a write that was wrong");
    assert_eq!(holds(&first.client(), &a).await, 0);
}

#[tokio::test]
async fn a_copy_resumes_from_an_alternate_when_its_source_breaks_off_for_good() {
    let sled = TestSled::start(NO_NEXUS).await;
    let a = artifact(3, 3 << 20);
    sled.client().artifact_config_put(&config(1, &[&a])).await.unwrap();
    let breaking = FakeDepot::start(a.bytes.clone(), Behavior::ResetThenGone(1 << 20)).await;
    let alternate = FakeDepot::start(a.bytes.clone(), Behavior::Throttled { bytes_per_sec: 1 << 30 }).await;
    let body = copy_body(breaking.base_url(), vec![alternate.base_url()]);
    sled.client().artifact_copy_from_depot(&a.hash, 1, &body).await.unwrap();
    wait_until("the copy lands", Duration::from_secs(20), async || holds(&sled.client(), &a).await == 2)
        .await;
    assert_eq!(
        breaking.ranges(),
        [None, Some(format!("bytes={}-", 1 << 20))],
        "the source broke, then was gone"
    );
    assert_eq!(
        alternate.ranges(),
        [Some(format!("bytes={}-", 1 << 20))],
        "the alternate was asked only for the bytes the source had not sent"
    );
}

#[tokio::test]
async fn a_copy_whose_source_cannot_be_reached_starts_from_an_alternate() {
    let sled = TestSled::start(NO_NEXUS).await;
    let a = artifact(4, 1 << 20);
    sled.client().artifact_config_put(&config(1, &[&a])).await.unwrap();
    let missing = FakeDepot::start(a.bytes.clone(), Behavior::NotFound).await;
    let alternate = FakeDepot::start(a.bytes.clone(), Behavior::Throttled { bytes_per_sec: 1 << 30 }).await;
    let body = copy_body(NO_NEXUS.to_string(), vec![missing.base_url(), alternate.base_url()]);
    sled.client().artifact_copy_from_depot(&a.hash, 1, &body).await.unwrap();
    wait_until("the copy lands", Duration::from_secs(20), async || holds(&sled.client(), &a).await == 2)
        .await;
    assert_eq!(missing.ranges(), [None], "the second source was tried after the first");
    assert_eq!(alternate.ranges(), [None], "the third source sent the artifact");

    // With no source that works, the copy is refused with the first one's
    // error, and nothing is left behind.
    let b = artifact(5, 1 << 20);
    sled.client().artifact_config_put(&config(2, &[&a, &b])).await.unwrap();
    let body = copy_body(NO_NEXUS.to_string(), vec![missing.base_url()]);
    let error = sled.client().artifact_copy_from_depot(&b.hash, 2, &body).await.unwrap_err();
    let ClientError::ErrorResponse(response) = error else { panic!("expected an error response: {error}") };
    assert_eq!(response.status(), 502);
    let message = response.into_inner().message;
    assert!(message.contains("127.0.0.1:1/"), "the error names the first source: {message}");
    let list = sled.client().artifact_list().await.unwrap().into_inner();
    assert!(list.copies_in_flight.is_empty() && !list.list.contains_key(&b.hash));
}
