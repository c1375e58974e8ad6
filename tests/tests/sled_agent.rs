//! Sled agents over real HTTP: the sled-agent API, the repo depot, copies
//! between two sleds and from depots that misbehave, and registration.

use common::api::sled_agent::{ArtifactCopyFromDepotBody, CONFIG_GENERATION, M2State, M2StateRequest};
use common::{ArtifactConfig, ArtifactHash, Generation};
use futures::StreamExt;
use integration_tests::fake_depot::{Behavior, FakeDepot};
use integration_tests::sled_agent_client::{Client, Error as ClientError, types};
use integration_tests::synthetic::{Artifact, NO_NEXUS, artifact, config};
use integration_tests::{TestNexus, TestSled};
use std::time::{Duration, Instant};

fn error_body(error: ClientError<types::Error>) -> (u16, types::Error) {
    match error {
        ClientError::ErrorResponse(response) => (response.status().as_u16(), response.into_inner()),
        other => panic!("expected an error response, got {other:?}"),
    }
}

async fn put(
    client: &Client,
    artifact: &Artifact,
    generation: u64,
) -> Result<common::api::sled_agent::ArtifactPutResponse, ClientError<types::Error>> {
    client.artifact_put(&artifact.hash, generation, artifact.bytes.clone()).await.map(|r| r.into_inner())
}

async fn copies(client: &Client, artifact: &Artifact) -> usize {
    client.artifact_list().await.unwrap().into_inner().list.get(&artifact.hash).copied().unwrap_or(0)
}

async fn wait_for(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn used_bytes(client: &Client) -> u64 {
    client.inventory().await.unwrap().into_inner().m2.iter().map(|m2| m2.used_bytes).sum()
}

fn copy_body(url: String) -> ArtifactCopyFromDepotBody {
    ArtifactCopyFromDepotBody { depot_base_url: url, alternates: Vec::new(), fallback: None }
}

#[tokio::test]
async fn one_sled_copies_from_anothers_depot() {
    let source = TestSled::start(NO_NEXUS).await;
    let target = TestSled::start(NO_NEXUS).await;
    let a = artifact(1, 3 << 20);
    for sled in [&source, &target] {
        sled.client().artifact_config_put(&config(1, &[&a])).await.unwrap();
    }
    let response = put(&source.client(), &a, 1).await.unwrap();
    assert_eq!((response.datasets, response.successful_writes), (2, 2));

    target.client().artifact_copy_from_depot(&a.hash, 1, &copy_body(source.depot_url())).await.unwrap();
    let client = target.client();
    wait_for("the copy lands on both M.2s", async || copies(&client, &a).await == 2).await;

    // The depot streams the file, and honours a Range.
    let url = format!("{}/artifact/sha256/{}", target.depot_url(), a.hash);
    let whole = reqwest::get(&url).await.unwrap();
    assert_eq!(whole.content_length(), Some(a.bytes.len() as u64));
    assert_eq!(whole.bytes().await.unwrap().as_ref(), &a.bytes[..]);
    let partial = reqwest::Client::new().get(&url).header("Range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(partial.status().as_u16(), 206);
    assert_eq!(partial.headers()["content-range"], format!("bytes 1000-1999/{}", a.bytes.len()).as_str());
    assert_eq!(partial.bytes().await.unwrap().as_ref(), &a.bytes[1000..2000]);
    let beyond = reqwest::Client::new().get(&url).header("Range", "bytes=99999999-").send().await.unwrap();
    assert_eq!(beyond.status().as_u16(), 416);
    let missing = reqwest::get(format!("{}/artifact/sha256/{}", target.depot_url(), artifact(9, 1).hash))
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
}

#[tokio::test]
async fn requests_are_checked_against_the_config() {
    let sled = TestSled::start(NO_NEXUS).await;
    let client = sled.client();
    let a = artifact(1, 1000);
    let stranger = artifact(2, 1000);
    client.artifact_config_put(&config(2, &[&a])).await.unwrap();
    client.artifact_config_put(&config(2, &[&a])).await.unwrap();

    let (status, body) = error_body(client.artifact_config_put(&config(1, &[&a])).await.unwrap_err());
    assert_eq!((status, body.error_code.as_deref()), (409, Some(CONFIG_GENERATION)));
    assert!(
        body.message.contains("generation 1 refused") && body.message.contains("holds generation 2"),
        "{}",
        body.message
    );
    let (status, body) = error_body(client.artifact_config_put(&config(2, &[&stranger])).await.unwrap_err());
    assert_eq!((status, body.error_code.as_deref()), (409, Some(CONFIG_GENERATION)));

    let (status, body) = error_body(put(&client, &a, 1).await.unwrap_err());
    assert_eq!((status, body.error_code.as_deref()), (409, Some(CONFIG_GENERATION)));
    let (status, body) = error_body(put(&client, &stranger, 2).await.unwrap_err());
    assert_eq!(status, 400);
    assert!(body.message.contains(&stranger.hash.to_string()), "{}", body.message);

    let mut wrong = a.bytes.clone();
    wrong[0] ^= 1;
    let (status, body) = error_body(client.artifact_put(&a.hash, 2, wrong).await.unwrap_err());
    assert_eq!(status, 400);
    assert!(
        body.message.contains(&format!("artifact {}: the data received has sha256", a.hash)),
        "{}",
        body.message
    );

    let http = reqwest::Client::new();
    let malformed = http
        .put(format!("{}/artifacts/NOT-A-HASH?generation=2", sled.api_url()))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status().as_u16(), 400);
    assert!(malformed.text().await.unwrap().contains("NOT-A-HASH"));
    assert_eq!(used_bytes(&client).await, 0, "nothing was stored by any refused request");
    assert!(client.artifact_list().await.unwrap().into_inner().list.is_empty());
}

#[tokio::test]
async fn quota_and_failed_m2s_are_reported() {
    let sled = TestSled::start_with(NO_NEXUS, |config| config.storage.artifact_quota_bytes = 1 << 20).await;
    let client = sled.client();
    let small = artifact(1, 600 << 10);
    let big = artifact(2, 600 << 10);
    client.artifact_config_put(&config(1, &[&small, &big])).await.unwrap();
    put(&client, &small, 1).await.unwrap();
    let (status, body) = error_body(put(&client, &big, 1).await.unwrap_err());
    assert_eq!((status, body.error_code.as_deref()), (507, Some("QUOTA_EXCEEDED")));
    assert!(
        body.message.contains(&big.hash.to_string()) && body.message.contains("is full"),
        "{}",
        body.message
    );
    assert_eq!(used_bytes(&client).await, 2 * (600 << 10), "only the small artifact's copies");

    client.sim_m2_set_state(0, &M2StateRequest { state: M2State::Failed }).await.unwrap();
    let inventory = client.inventory().await.unwrap().into_inner();
    assert_eq!(inventory.m2[0].state, M2State::Failed);
    assert_eq!(inventory.artifact_generation, Generation::new(1));
    assert_eq!(copies(&client, &small).await, 1);
    let (status, _) = error_body(
        client.sim_m2_set_state(7, &M2StateRequest { state: M2State::Healthy }).await.unwrap_err(),
    );
    assert_eq!(status, 404);
}

#[tokio::test]
async fn copies_from_bad_sources_store_nothing() {
    let sled = TestSled::start(NO_NEXUS).await;
    let client = sled.client();
    let a = artifact(3, 256 << 10);
    client.artifact_config_put(&config(1, &[&a])).await.unwrap();

    let missing = FakeDepot::start(a.bytes.clone(), Behavior::NotFound).await;
    let error =
        client.artifact_copy_from_depot(&a.hash, 1, &copy_body(missing.base_url())).await.unwrap_err();
    let (status, body) = error_body(error);
    assert_eq!(status, 502);
    assert!(body.message.contains(&missing.base_url()) && body.message.contains("404"), "{}", body.message);

    let wrong = FakeDepot::start(a.bytes.clone(), Behavior::WrongBytes(artifact(4, 256 << 10).bytes)).await;
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(wrong.base_url())).await.unwrap();
    wait_for("the wrong bytes are served", async || wrong.served_bytes() == 256 << 10).await;
    wait_for("the failed copy cleans up", async || used_bytes(&client).await == 0).await;

    let stalled = FakeDepot::start(a.bytes.clone(), Behavior::StallAfter(1000)).await;
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(stalled.base_url())).await.unwrap();
    // The read timeout (2 s in tests) gives up on it; the resume is refused
    // (this depot ignores Range), and the copy is abandoned.
    wait_for("the stalled copy is abandoned", async || {
        stalled.ranges().len() == 2 && used_bytes(&client).await == 0
    })
    .await;
    assert_eq!(copies(&client, &a).await, 0);
}

#[tokio::test]
async fn an_interrupted_copy_resumes_where_it_stopped() {
    let sled = TestSled::start(NO_NEXUS).await;
    let client = sled.client();
    let a = artifact(5, 1 << 20);
    client.artifact_config_put(&config(1, &[&a])).await.unwrap();
    let depot = FakeDepot::start(a.bytes.clone(), Behavior::ResetAfter(300_000)).await;
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(depot.base_url())).await.unwrap();
    wait_for("the resumed copy lands", async || copies(&client, &a).await == 2).await;
    assert_eq!(depot.ranges(), [None, Some("bytes=300000-".to_string())]);
    assert_eq!(depot.served_bytes(), a.bytes.len() as u64, "no byte was fetched twice");
}

#[tokio::test]
async fn copies_beyond_the_limit_are_queued_in_order_and_beyond_the_queue_refused_with_retry_after() {
    let sled = TestSled::start_with(NO_NEXUS, |config| {
        config.copy.max_concurrent = 1;
        config.copy.max_queued = 1;
        config.copy.read_timeout_secs = 1;
        config.copy.resume_attempts = 0;
    })
    .await;
    let client = sled.client();
    let a = artifact(6, 64 << 10);
    let b = artifact(7, 64 << 10);
    let c = artifact(9, 64 << 10);
    client.artifact_config_put(&config(1, &[&a, &b, &c])).await.unwrap();
    let stalled = FakeDepot::start(a.bytes.clone(), Behavior::StallAfter(10)).await;
    let serving_b = FakeDepot::start(b.bytes.clone(), Behavior::IgnoreRange).await;
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(stalled.base_url())).await.unwrap();
    // No slot: queued, accepted at once, and listed as in flight.
    client.artifact_copy_from_depot(&b.hash, 1, &copy_body(serving_b.base_url())).await.unwrap();
    let listed = client.artifact_list().await.unwrap().into_inner();
    assert!(listed.copies_in_flight.contains(&b.hash), "{listed:?}");
    assert_eq!(listed.max_queued_copies, Some(1));
    match client.artifact_copy_from_depot(&c.hash, 1, &copy_body(stalled.base_url())).await.unwrap_err() {
        ClientError::ErrorResponse(response) => {
            assert_eq!(response.status().as_u16(), 503);
            assert_eq!(response.headers()["retry-after"], "1");
            let body = response.into_inner();
            assert_eq!(body.error_code.as_deref(), Some("BUSY"));
            assert!(body.message.contains("running and queued copies (2, its limit)"), "{}", body.message);
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // The queued copy waits for the slot: the stalled one holds it until
    // the read timeout gives up on it (1 s); then the queued one runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(serving_b.served_bytes(), 0, "the queued copy started without a slot");
    assert_eq!(copies(&client, &b).await, 0);
    wait_for("the queued copy lands once the slot frees", async || copies(&client, &b).await == 2).await;
    assert_eq!(copies(&client, &a).await, 0, "the stalled copy failed");
}

#[tokio::test]
async fn sled_agents_register_with_nexus() {
    let nexus = TestNexus::start().await;
    let sled = TestSled::start(&nexus.internal_url()).await;
    let datastore = nexus.server.nexus().datastore.clone();
    let expected = sled.server.sled_id;
    wait_for("the sled registers", async || {
        datastore.sled_list().await.unwrap().iter().any(|s| s.id == expected)
    })
    .await;
    let registered = datastore.sled_get(expected).await.unwrap();
    assert_eq!(registered.serial, sled.server.serial);
    assert_eq!(registered.port as u16, sled.server.api_address().port());
    assert_eq!(registered.repo_depot_port as u16, sled.server.depot_address().port());
}

#[tokio::test]
async fn a_copy_already_in_flight_is_not_started_twice_and_one_that_cannot_fit_is_refused() {
    let sled = TestSled::start_with(NO_NEXUS, |config| config.storage.artifact_quota_bytes = 1 << 20).await;
    let client = sled.client();
    let a = artifact(8, 512 << 10);
    let big = artifact(9, 2 << 20);
    client.artifact_config_put(&config(1, &[&a, &big])).await.unwrap();

    let slow = FakeDepot::start(a.bytes.clone(), Behavior::StallAfter(1000)).await;
    for _ in 0..3 {
        client.artifact_copy_from_depot(&a.hash, 1, &copy_body(slow.base_url())).await.unwrap();
    }
    assert_eq!(slow.ranges().len(), 1, "one download for three requests");

    let before = used_bytes(&client).await;
    let source = FakeDepot::start(big.bytes.clone(), Behavior::ResetAfter(usize::MAX)).await;
    let (status, body) = error_body(
        client.artifact_copy_from_depot(&big.hash, 1, &copy_body(source.base_url())).await.unwrap_err(),
    );
    assert_eq!((status, body.error_code.as_deref()), (507, Some("QUOTA_EXCEEDED")), "{}", body.message);
    assert_eq!(used_bytes(&client).await, before, "refused before storing anything");
}

/// A chunked body cut after its last byte: the copy asks for the rest, is
/// told there is none (416), and lands the bytes it has after checking the
/// hash (before, the whole copy was thrown away).
#[tokio::test]
async fn a_stream_that_breaks_after_its_last_byte_still_lands() {
    let sled = TestSled::start(NO_NEXUS).await;
    let client = sled.client();
    let a = artifact(10, 200_000);
    client.artifact_config_put(&config(1, &[&a])).await.unwrap();
    let source = FakeDepot::start(a.bytes.clone(), Behavior::CutAfterLastByte).await;
    client.artifact_copy_from_depot(&a.hash, 1, &copy_body(source.base_url())).await.unwrap();
    wait_for("the copy lands", async || copies(&client, &a).await == 2).await;
    assert_eq!(source.ranges(), [None, Some("bytes=200000-".to_string())]);
    assert!(client.artifact_list().await.unwrap().into_inner().copy_failures.is_empty());
}

/// Artifact PUTs and depot downloads beyond their limits are refused at
/// once with 503 and Retry-After, not queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_and_depot_downloads_beyond_their_limits_are_refused_with_retry_after() {
    let sled = TestSled::start_with(NO_NEXUS, |config| {
        config.requests.max_concurrent_puts = 1;
        config.requests.max_concurrent_depot_reads = 1;
    })
    .await;
    let client = sled.client();
    let (a, b) = (artifact(11, 100_000), artifact(12, 8 << 20));
    client.artifact_config_put(&config(1, &[&a, &b])).await.unwrap();

    // A PUT whose body is still coming holds the one PUT slot.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let first_half = a.bytes[..50_000].to_vec();
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first_half) }).chain(
        futures::stream::once(async move {
            let _ = released.await;
            Err(std::io::Error::other("the test ends this body"))
        }),
    );
    let url = format!("{}/artifacts/{}?generation=1", sled.api_url(), a.hash);
    let slow_put =
        tokio::spawn(reqwest::Client::new().put(url).body(reqwest::Body::wrap_stream(body)).send());
    wait_for("the slow PUT is being received", async || used_bytes(&client).await > 0).await;
    let (status, body) = error_body(put(&client, &a, 1).await.unwrap_err());
    assert_eq!((status, body.error_code.as_deref()), (503, Some("BUSY")), "{}", body.message);
    assert!(body.message.contains("receiving artifact PUTs (1, its limit)"), "{}", body.message);
    drop(release);
    let _ = slow_put.await;
    // The server notices the broken body a moment after the client does.
    wait_for("the PUT slot comes back", async || put(&client, &a, 1).await.is_ok()).await;

    // A download whose body is not being read holds the one depot slot.
    put(&client, &b, 1).await.unwrap();
    let depot_url = format!("{}/artifact/sha256/{}", sled.depot_url(), b.hash);
    let held = reqwest::get(&depot_url).await.unwrap();
    assert_eq!(held.status().as_u16(), 200);
    let refused = reqwest::get(&depot_url).await.unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let message = refused.text().await.unwrap();
    assert!(message.contains("serving depot downloads (1, its limit)"), "{message}");
    let body = held.bytes().await.unwrap();
    assert_eq!(body.len(), b.bytes.len());
    assert_eq!(reqwest::get(&depot_url).await.unwrap().status().as_u16(), 200, "the slot came back");
}

/// The config body limit follows from MAX_CONFIG_ARTIFACTS: a config at the
/// limit is accepted over HTTP, one past it refused with a message that
/// says so, and the sled keeps its config.
#[tokio::test]
async fn a_config_at_the_artifact_limit_is_accepted_and_one_past_it_refused() {
    use common::api::sled_agent::MAX_CONFIG_ARTIFACTS;
    let sled = TestSled::start(NO_NEXUS).await;
    let client = sled.client();
    let hashes = |count: usize| -> std::collections::BTreeSet<ArtifactHash> {
        (0..count as u32)
            .map(|i| {
                let mut bytes = [0xabu8; 32];
                bytes[..4].copy_from_slice(&i.to_be_bytes());
                ArtifactHash(bytes)
            })
            .collect()
    };
    let at_limit = ArtifactConfig { generation: Generation::new(1), artifacts: hashes(MAX_CONFIG_ARTIFACTS) };
    client.artifact_config_put(&at_limit).await.unwrap();
    let over = ArtifactConfig { generation: Generation::new(2), artifacts: hashes(MAX_CONFIG_ARTIFACTS + 1) };
    let (status, body) = error_body(client.artifact_config_put(&over).await.unwrap_err());
    assert_eq!((status, body.error_code.as_deref()), (400, Some("CONFIG_TOO_LARGE")), "{}", body.message);
    assert!(body.message.contains(&format!("at most {MAX_CONFIG_ARTIFACTS}")), "{}", body.message);
    let kept = client.artifact_config_get().await.unwrap().into_inner();
    assert_eq!(kept.generation, Generation::new(1));
}

/// Flips a byte in the middle of a stored copy (its metadata changes, as
/// with any write: the verification stamp no longer vouches for it).
async fn corrupt_copy(sled: &TestSled, slot: u32, artifact: &Artifact) {
    let inventory = sled.client().inventory().await.unwrap().into_inner();
    let m2 = inventory.m2.iter().find(|m2| m2.slot == slot).unwrap();
    let path = camino::Utf8Path::new(&m2.path).join("artifacts").join(artifact.hash.to_string());
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
}

/// Issue #21: a depot serves the copy whose verification still holds, so a
/// damaged copy on one M.2 (changed behind the store's back) is not what
/// peers get while the other copy is good.
#[tokio::test]
async fn the_depot_serves_the_copy_whose_verification_still_holds() {
    let source = TestSled::start(NO_NEXUS).await;
    let target = TestSled::start(NO_NEXUS).await;
    let a = artifact(31, 1 << 20);
    for sled in [&source, &target] {
        sled.client().artifact_config_put(&config(1, &[&a])).await.unwrap();
    }
    put(&source.client(), &a, 1).await.unwrap();
    corrupt_copy(&source, 0, &a).await;
    target.client().artifact_copy_from_depot(&a.hash, 1, &copy_body(source.depot_url())).await.unwrap();
    let client = target.client();
    wait_for("the copy lands", async || copies(&client, &a).await == 2).await;
}

/// Issue #21: a peer whose copy came out wrong tells the source, which
/// re-verifies its copies at once (not at the next daily scrub pass) and
/// deletes the corrupt ones, so that replication replaces them.
#[tokio::test]
async fn wrong_bytes_from_a_depot_make_it_re_verify_its_copies_at_once() {
    let source = TestSled::start(NO_NEXUS).await;
    let target = TestSled::start(NO_NEXUS).await;
    let a = artifact(32, 1 << 20);
    for sled in [&source, &target] {
        sled.client().artifact_config_put(&config(1, &[&a])).await.unwrap();
    }
    put(&source.client(), &a, 1).await.unwrap();
    for slot in [0, 1] {
        corrupt_copy(&source, slot, &a).await;
    }
    assert_eq!(copies(&source.client(), &a).await, 2, "nothing has read them yet");

    target.client().artifact_copy_from_depot(&a.hash, 1, &copy_body(source.depot_url())).await.unwrap();
    let (client, source_client) = (target.client(), source.client());
    wait_for("the copy fails its hash check", async || {
        client.artifact_list().await.unwrap().into_inner().copy_failures.contains_key(&a.hash)
    })
    .await;
    wait_for("the source drops both corrupt copies", async || copies(&source_client, &a).await == 0).await;
    assert_eq!(copies(&client, &a).await, 0);
    let inventory = source_client.inventory().await.unwrap().into_inner();
    assert!(inventory.m2.iter().all(|m2| m2.artifacts == 0), "{:?}", inventory.m2);
    let start_up_pass = inventory.scrub.last.as_ref().map(|pass| pass.files_checked);
    assert_eq!(
        (inventory.scrub.passes_finished, start_up_pass),
        (1, Some(0)),
        "only the empty start-up pass ran"
    );

    // A re-verify request for an artifact the depot does not hold is a 404.
    let url = format!("{}/artifact/sha256/{}/reverify", source.depot_url(), a.hash);
    assert_eq!(reqwest::Client::new().post(&url).send().await.unwrap().status().as_u16(), 404);
}
