//! A private primary and N synchronous streaming-replication standbys, each
//! a [`PgServer`] with its own directory and port (DESIGN §14).
//!
//! Set-up:
//! 1. `pg0` is created with initdb and started: the primary.
//! 2. Each standby `pgN` is a `pg_basebackup` of it, with a physical
//!    replication slot named after it on the primary (the primary keeps
//!    every WAL segment a standby has not received, however long it is
//!    away), started with `cluster_name = pgN`: the `application_name` its
//!    WAL receiver gives the primary.
//! 3. Once every standby streams, the primary gets
//!    `synchronous_standby_names = 'ANY 1 (pg1, ..., pgN)'` by `ALTER SYSTEM`
//!    and a reload. It lives in the primary's `postgresql.auto.conf`, written
//!    after the base backups copied that file, so a standby promoted later
//!    does not wait for standbys it does not have.
//!
//! Every server runs with `synchronous_commit = on`: a COMMIT returns once
//! one standby has flushed the WAL up to its commit record. Not
//! `remote_apply` (which also waits for the standby to replay it): nothing
//! reads from a standby (clients ask for `target_session_attrs=read-write`),
//! and a promotion replays every record received before it accepts a write,
//! so `on` already means that an acknowledged commit survives the primary's
//! loss. While the standby has not acknowledged, PostgreSQL shows the
//! transaction to nobody else either (it is still "running" in the
//! primary's process array), so no reader can act on a commit that a
//! failover then loses.
//!
//! Failover is the caller's: [`PgCluster::kill`] a server (SIGKILL),
//! [`PgCluster::promote`] a standby (`pg_ctl promote`). Nothing re-points
//! the other standbys at the new primary and the old primary is never
//! restarted: that is a failover orchestrator's work (Patroni), which this
//! project does not do. With `ANY 1`, an acknowledged commit is on at least
//! one standby, not necessarily a given one: the standby to promote is the
//! one that received the most WAL ([`promote_furthest_along`], which
//! `rack-dev db-promote` and [`PgCluster::promote_furthest_along`] use).
//! Promoting another loses acknowledged commits, and Nexus would then hand
//! out a generation number a second time.
//!
//! Like every test server these run with `fsync=off`: "flushed" on a standby
//! means handed to its kernel, which survives anything but a power cut of
//! the machine. Production settings are in ARCHITECTURE.md ("A replicated
//! database").

use crate::pg::{DataSource, PgError, PgServer, execute, promote_dir};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long standbys may take to start streaming after they started.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(60);

/// What a server of the cluster is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Standby,
    /// Killed with SIGKILL; its directory is kept until the cluster drops.
    Killed,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "synchronous standby",
            Role::Killed => "killed",
        }
    }
}

struct Member {
    name: String,
    server: PgServer,
    role: Role,
}

/// One server of a cluster, for banners and tests.
pub struct MemberView<'a> {
    pub name: &'a str,
    pub role: Role,
    pub port: u16,
    pub dir: &'a Path,
    pub log: std::path::PathBuf,
}

/// A running primary with its standbys. Dropping it stops every server and
/// removes every directory.
pub struct PgCluster {
    members: Vec<Member>,
}

impl PgCluster {
    /// Starts a primary and `standbys` synchronous standbys, and waits until
    /// every standby streams synchronously. With no standbys this is one
    /// server exactly like [`PgServer::start`]'s.
    pub async fn start(standbys: usize) -> Result<PgCluster, PgError> {
        if standbys == 0 {
            let server = PgServer::start().await?;
            return Ok(PgCluster {
                members: vec![Member { name: "pg0".into(), server, role: Role::Primary }],
            });
        }
        let primary = PgServer::start_from(DataSource::Initdb, settings("pg0", standbys)).await?;
        let mut cluster =
            PgCluster { members: vec![Member { name: "pg0".into(), server: primary, role: Role::Primary }] };
        let primary_port = cluster.members[0].server.port();
        for index in 1..=standbys {
            let name = format!("pg{index}");
            let source = DataSource::BaseBackup { primary_port, slot: &name };
            let server = PgServer::start_from(source, settings(&name, standbys)).await?;
            cluster.members.push(Member { name, server, role: Role::Standby });
        }
        let names: Vec<&str> = cluster.members[1..].iter().map(|member| member.name.as_str()).collect();
        let primary_url = cluster.members[0].server.url("postgres");
        execute(
            &primary_url,
            &format!("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 ({})'", names.join(", ")),
        )
        .await?;
        execute(&primary_url, "SELECT pg_reload_conf()").await?;
        cluster.wait_streaming(standbys).await?;
        Ok(cluster)
    }

    /// The URL of database `dbname` that every client should use: every
    /// server, in order, and only a read-write one accepted (libpq's and
    /// tokio-postgres's `target_session_attrs`), so a client follows a
    /// promotion by connecting again. With no standbys, the one server's
    /// plain URL.
    pub fn url(&self, dbname: &str) -> String {
        let hosts: Vec<String> =
            self.members.iter().map(|member| format!("127.0.0.1:{}", member.server.port())).collect();
        self.url_through(dbname, &hosts)
    }

    /// [`PgCluster::url`] for clients that reach the servers at other
    /// addresses (relays), one `host:port` per server in [`PgCluster::members`]'s
    /// order.
    pub fn url_through(&self, dbname: &str, hosts: &[String]) -> String {
        let attributes = if self.members.len() > 1 { "?target_session_attrs=read-write" } else { "" };
        format!("postgresql://postgres@{}/{dbname}{attributes}", hosts.join(","))
    }

    /// Creates an empty database (on the primary; replication copies it)
    /// and returns its [`PgCluster::url`].
    pub async fn create_database(&self, name: &str) -> Result<String, PgError> {
        execute(&self.url("postgres"), &format!("CREATE DATABASE {name}")).await?;
        Ok(self.url(name))
    }

    pub fn members(&self) -> impl Iterator<Item = MemberView<'_>> {
        self.members.iter().map(|member| MemberView {
            name: &member.name,
            role: member.role,
            port: member.server.port(),
            dir: member.server.dir(),
            log: member.server.log_path(),
        })
    }

    /// The index of the running primary, if there is one.
    pub fn primary(&self) -> Option<usize> {
        self.members.iter().position(|member| member.role == Role::Primary)
    }

    /// The server at `index` (0 is the first primary, then the standbys).
    pub fn server(&self, index: usize) -> &PgServer {
        &self.members[index].server
    }

    /// Kills the server at `index` with SIGKILL. Panics on a bad index:
    /// callers pass indexes they got from this cluster.
    pub fn kill(&mut self, index: usize) {
        let member = &mut self.members[index];
        member.server.kill();
        member.role = Role::Killed;
    }

    /// Promotes the standby at `index` to primary and waits until it accepts
    /// writes. Refused while another primary runs: two primaries would both
    /// accept writes, and each would lose the other's.
    pub async fn promote(&mut self, index: usize) -> Result<(), PgError> {
        let member = &self.members[index];
        if member.role != Role::Standby {
            return Err(PgError::NotAStandby { name: member.name.clone(), role: member.role.as_str() });
        }
        if let Some(primary) = self.primary() {
            return Err(PgError::PrimaryRunning {
                name: self.members[primary].name.clone(),
                standby: member.name.clone(),
            });
        }
        member.server.promote().await?;
        self.members[index].role = Role::Primary;
        Ok(())
    }

    /// Promotes the running standby that received the most WAL (see
    /// [`promote_furthest_along`]) and returns its name.
    pub async fn promote_furthest_along(&mut self) -> Result<String, PgError> {
        let candidates: Vec<ServerAddress> = self
            .members
            .iter()
            .filter(|member| member.role != Role::Killed)
            .map(|member| ServerAddress {
                name: member.name.clone(),
                port: member.server.port(),
                dir: member.server.dir().to_owned(),
            })
            .collect();
        let (promoted, _) = promote_furthest_along(&candidates).await?;
        let member = self.members.iter_mut().find(|member| member.name == promoted.server.name);
        member.expect("the promoted server is a member").role = Role::Primary;
        Ok(promoted.server.name)
    }

    /// Cuts the standby at `index` off from the primary, as a partition
    /// would: it stops receiving WAL (its `primary_conninfo` is emptied and
    /// reloaded) but keeps serving reads at the position it reached. The
    /// primary's commits then wait for the other standbys only.
    pub async fn detach_standby(&self, index: usize) -> Result<(), PgError> {
        let url = self.members[index].server.url("postgres");
        execute(&url, "ALTER SYSTEM SET primary_conninfo = ''").await?;
        execute(&url, "SELECT pg_reload_conf()").await?;
        let deadline = Instant::now() + STREAMING_TIMEOUT;
        while query_i64(&url, "SELECT count(*) FROM pg_stat_wal_receiver").await? > 0 {
            if Instant::now() > deadline {
                return Err(PgError::StandbysNotStreaming {
                    streaming: 1,
                    expected: 0,
                    timeout: STREAMING_TIMEOUT,
                    dirs: self.members[index].server.dir().display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }

    async fn wait_streaming(&self, expected: usize) -> Result<(), PgError> {
        let url = self.members[0].server.url("postgres");
        let deadline = Instant::now() + STREAMING_TIMEOUT;
        loop {
            let streaming = query_i64(
                &url,
                "SELECT count(*) FROM pg_stat_replication \
                 WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')",
            )
            .await?;
            if streaming == expected as i64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                let dirs: Vec<String> =
                    self.members.iter().map(|m| m.server.dir().display().to_string()).collect();
                return Err(PgError::StandbysNotStreaming {
                    streaming,
                    expected,
                    timeout: STREAMING_TIMEOUT,
                    dirs: dirs.join(", "),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Standbys first: a primary's shutdown waits for its WAL senders.
        for member in self.members.iter_mut().rev() {
            member.server.stop();
        }
    }
}

/// A database server to consider for promotion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddress {
    pub name: String,
    /// On 127.0.0.1.
    pub port: u16,
    /// The server's directory (the one holding `data/`).
    pub dir: PathBuf,
}

/// How much WAL a standby has: the later of what it received and what it
/// replayed (a standby restarted since it last streamed has received
/// nothing in this run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandbyPosition {
    pub server: ServerAddress,
    pub wal_lsn: u64,
}

impl StandbyPosition {
    /// PostgreSQL's spelling of the position (`16/B374D848`).
    pub fn lsn_text(&self) -> String {
        format!("{:X}/{:X}", self.wal_lsn >> 32, self.wal_lsn & 0xffff_ffff)
    }
}

/// The WAL position of every server of `servers` that answers, after
/// checking that none of them accepts writes: promoting a standby while a
/// primary runs would make two primaries, each losing the other's writes.
/// Servers that do not answer (the dead primary) are left out.
pub async fn standby_positions(servers: &[ServerAddress]) -> Result<Vec<StandbyPosition>, PgError> {
    const POSITION: &str = "SELECT pg_is_in_recovery(), (GREATEST(\
        COALESCE(pg_last_wal_receive_lsn(), '0/0'), COALESCE(pg_last_wal_replay_lsn(), '0/0')) \
        - '0/0'::pg_lsn)::bigint";
    let mut positions = Vec::new();
    for server in servers {
        let url = format!("postgresql://postgres@127.0.0.1:{}/postgres?connect_timeout=5", server.port);
        let Ok((client, connection)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            continue;
        };
        let connection = tokio::spawn(connection);
        let row = client.query_one(POSITION, &[]).await;
        drop(client);
        let _ = connection.await;
        let row = row.map_err(|source| PgError::Sql {
            context: format!("asking {} for its WAL position", server.name),
            source,
        })?;
        if !row.get::<_, bool>(0) {
            return Err(PgError::PrimaryRunning { name: server.name.clone(), standby: "a standby".into() });
        }
        positions.push(StandbyPosition { server: server.clone(), wal_lsn: row.get::<_, i64>(1) as u64 });
    }
    Ok(positions)
}

/// Promotes the standby of `servers` with the most WAL (the first listed of
/// equals), refusing while any server accepts writes. Returns it and every
/// position it compared.
pub async fn promote_furthest_along(
    servers: &[ServerAddress],
) -> Result<(StandbyPosition, Vec<StandbyPosition>), PgError> {
    let positions = standby_positions(servers).await?;
    let furthest =
        positions.iter().rev().max_by_key(|position| position.wal_lsn).cloned().ok_or_else(|| {
            let tried: Vec<String> =
                servers.iter().map(|s| format!("{} on port {}", s.name, s.port)).collect();
            PgError::NoStandbyReachable { tried: tried.join(", ") }
        })?;
    promote_dir(&furthest.server.dir).await?;
    Ok((furthest, positions))
}

/// A cluster member's settings: its name (which a standby's WAL receiver
/// reports), commits that wait for a standby, and room for every standby's
/// WAL sender and slot plus a base backup's. Standbys must have at least
/// the primary's `max_wal_senders`, so every member gets the same.
fn settings(name: &str, standbys: usize) -> Vec<String> {
    let senders = (standbys + 2).max(10);
    vec![
        format!("cluster_name={name}"),
        "synchronous_commit=on".into(),
        format!("max_wal_senders={senders}"),
        format!("max_replication_slots={senders}"),
    ]
}

/// The first column of the first row of `sql`, an integer.
async fn query_i64(url: &str, sql: &str) -> Result<i64, PgError> {
    let sql_error = |source| PgError::Sql { context: format!("running {sql:?} on {url}"), source };
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(sql_error)?;
    let connection = tokio::spawn(connection);
    let result = client.query_one(sql, &[]).await.map(|row| row.get::<_, i64>(0)).map_err(sql_error);
    drop(client);
    let _ = connection.await;
    result
}
