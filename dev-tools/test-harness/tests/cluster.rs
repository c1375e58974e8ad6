//! A primary with synchronous standbys: commits wait for a standby, a
//! promoted standby has every acknowledged commit, and the cluster's
//! multi-host URL finds whichever server is the primary.

use std::time::Duration;
use test_harness::{PgCluster, PgError, Role};

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn count(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn an_acknowledged_commit_survives_the_primary_and_the_url_follows_the_promotion() {
    let mut cluster = PgCluster::start(1).await.unwrap();
    let roles: Vec<Role> = cluster.members().map(|member| member.role).collect();
    assert_eq!(roles, [Role::Primary, Role::Standby]);
    let url = cluster.create_database("rack").await.unwrap();
    assert!(url.contains(",127.0.0.1:") && url.ends_with("/rack?target_session_attrs=read-write"), "{url}");

    let writer = client(&url).await;
    writer.batch_execute("CREATE TABLE t (n INT8); INSERT INTO t VALUES (1), (2)").await.unwrap();
    // (Not "rack": the standby has flushed the WAL that creates it, but
    // need not have replayed it yet.)
    let standby = client(&cluster.server(1).url("postgres")).await;
    let read_only: String = standby.query_one("SHOW transaction_read_only", &[]).await.unwrap().get(0);
    assert_eq!(read_only, "on", "the multi-host URL's read-write attribute must skip this one");

    // Acknowledged only once the standby has the WAL: with no standby
    // streaming, a commit waits.
    cluster.kill(1);
    let waiting =
        tokio::time::timeout(Duration::from_millis(500), writer.batch_execute("INSERT INTO t VALUES (3)"));
    assert!(waiting.await.is_err(), "a commit returned with no synchronous standby");
    drop((writer, cluster));

    let mut cluster = PgCluster::start(1).await.unwrap();
    let url = cluster.create_database("rack").await.unwrap();
    let writer = client(&url).await;
    writer.batch_execute("CREATE TABLE t (n INT8); INSERT INTO t VALUES (1), (2)").await.unwrap();
    assert!(matches!(cluster.promote(1).await, Err(PgError::PrimaryRunning { .. })));
    cluster.kill(0);
    assert!(writer.batch_execute("INSERT INTO t VALUES (3)").await.is_err(), "the primary is dead");
    assert!(matches!(cluster.promote(0).await, Err(PgError::NotAStandby { .. })));
    cluster.promote(1).await.unwrap();
    assert_eq!(cluster.primary(), Some(1));

    // The same URL now reaches the promoted standby, which has both rows
    // and takes writes.
    let writer = client(&url).await;
    assert_eq!(count(&writer).await, 2);
    writer.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    assert_eq!(count(&writer).await, 3);
}

#[tokio::test]
async fn without_standbys_a_cluster_is_one_plain_server() {
    let cluster = PgCluster::start(0).await.unwrap();
    assert_eq!(cluster.members().count(), 1);
    let url = cluster.url("postgres");
    assert!(!url.contains("target_session_attrs") && !url.contains(','), "{url}");
    let client = client(&url).await;
    let commit: String = client.query_one("SHOW synchronous_commit", &[]).await.unwrap().get(0);
    assert_eq!(commit, "off", "a lone test server waits for nobody");
}
