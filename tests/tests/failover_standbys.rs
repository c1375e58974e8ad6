//! A failover with two synchronous standbys (`ANY 1`), where the one a
//! fixed rule would promote ("pg1") lacks an acknowledged upload.
//!
//! pg1 is cut off from the primary ([`PgCluster::detach_standby`]); the
//! next upload is acknowledged because pg2 flushed it; the primary is
//! killed. The test first shows that its set-up is the dangerous one (pg1
//! lacks the upload, pg2 has it, read on each hot standby), then promotes
//! with [`PgCluster::promote_furthest_along`], the code `rack-dev
//! db-promote` runs. Afterwards the same Nexus still has the upload, the
//! next upload gets a newer generation than any sled acknowledged (a
//! reused one would be refused by every sled with 409), and the rack
//! converges to it.

use integration_tests::rack::{TestRack, wait_until};
use integration_tests::repos::{RepoFactory, try_upload};
use std::time::Duration;
use test_harness::PgCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_the_standby_with_the_most_wal_keeps_an_upload_only_it_has() {
    let mut cluster = PgCluster::start(2).await.unwrap();
    let (rack, _url) = TestRack::on_cluster(&cluster, 3).await;
    let factory = RepoFactory::new().await;
    rack.nexus.external_client().trust_root_create(&factory.root_json()).await.unwrap();
    rack.upload_ok(&factory, "1.0.0", &[("os-1", 64 << 10)], 1).await;
    rack.converge(20).await;

    cluster.detach_standby(1).await.unwrap();
    rack.upload_ok(&factory, "2.0.0", &[("os-2", 64 << 10)], 2).await;
    rack.converge(20).await;
    let acknowledged = rack.config().await.generation;
    cluster.kill(0);

    let repos_on = |index: usize| {
        let url = cluster.server(index).url("rack");
        async move { count_repos(&url, "2.0.0").await }
    };
    wait_until("pg2 replays the upload it acknowledged", Duration::from_secs(20), async || {
        repos_on(2).await == 1
    })
    .await;
    assert_eq!(repos_on(1).await, 0, "pg1, the fixed choice, lacks the acknowledged upload");

    let promoted = cluster.promote_furthest_along().await.unwrap();
    assert_eq!(promoted, "pg2");

    let datastore = rack.nexus.server.nexus().datastore.clone();
    wait_until("Nexus reads through the promoted standby", Duration::from_secs(30), async || {
        datastore.tuf_repo_get_by_version("2.0.0").await.is_ok()
    })
    .await;
    let zip = factory.build(&RepoFactory::spec("3.0.0", &[("os-3", 64 << 10)], 3)).await;
    wait_until("an upload is answered 200 on the new primary", Duration::from_secs(30), async || {
        // 503s while Nexus finds the new primary; anything else is a bug.
        match try_upload(&rack.nexus.external_url(), Some(&rack.nexus.token), &zip).await {
            Ok((200, _)) => true,
            Ok((503, _)) | Err(_) => false,
            Ok((status, body)) => panic!("upload after the promotion: {status} {body}"),
        }
    })
    .await;
    let generation = rack.config().await.generation;
    assert!(generation > acknowledged, "{generation} after the failover, {acknowledged} acknowledged before");
    rack.converge(30).await;
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        datastore.tuf_repo_get_by_version(version).await.unwrap_or_else(|e| panic!("{version}: {e}"));
    }
    // The refusal while a primary runs, through the same code path.
    let error = cluster.promote_furthest_along().await.unwrap_err();
    assert!(error.to_string().contains("pg2 still runs as the primary"), "{error}");
}

/// How many repositories of `version` the server at `url` shows (a hot
/// standby shows what it replayed).
async fn count_repos(url: &str, version: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    let row = client.query_one("SELECT count(*) FROM tuf_repo WHERE system_version = $1", &[&version]).await;
    drop(client);
    let _ = connection.await;
    row.unwrap().get(0)
}
