//! The datastore: a connection pool and one method per database operation.
//!
//! Every mutation runs in a `SERIALIZABLE` transaction through
//! [`DataStore::transaction_retry`], which retries serialization failures a
//! bounded number of times with jittered back-off. That is the only isolation
//! level CockroachDB offers and the one that makes the generation
//! compare-and-swap safe under concurrent Nexus instances. Single statements
//! (reads, upserts) go through [`DataStore::statement_retry`].
//!
//! # Failover (DESIGN §14)
//!
//! The URL may name several servers with `target_session_attrs=read-write`:
//! each new connection goes to the first one that accepts writes. When the
//! primary dies and a standby is promoted:
//!
//! - **Pooled connections.** A connection is tested every time it leaves the
//!   pool: it must answer, and its server must have `transaction_read_only`
//!   off. A connection whose socket broke, whose session the server ended
//!   (57P01 admin shutdown, 57P02 crash shutdown) or whose server became
//!   read-only (a primary being demoted) fails the test; the pool drops it
//!   and connects again, which with the multi-host URL finds the new
//!   primary. So a read-only connection is never handed out, for a write or
//!   anything else.
//! - **Lost operations.** An attempt is *lost* when the connection broke (the
//!   driver could not send or read), when the server refused to write
//!   (25006, it turned read-only after the test), or when the session is
//!   dead right after the error: every FATAL error (57P01, 57P02, 57P03,
//!   the 08 class) ends the session, and diesel does not pass their SQLSTATE
//!   on, so the datastore recognises them by the ROLLBACK that follows (or a
//!   `SELECT 1` after a single statement) failing too. A lost operation runs
//!   again on a fresh connection after a back-off (50 ms doubling to 1 s),
//!   until [`PoolConfig::failover_wait`] has passed since its first loss;
//!   then it fails with [`DataStoreError::ConnectionLost`], which the API
//!   answers 503 with `Retry-After`. Waiting for a connection is bounded by
//!   the same time. An attempt that the server aborted before its COMMIT is
//!   simply gone: nothing of it was recorded.
//! - **Commits in doubt.** A loss during COMMIT (or during a single
//!   statement, which commits by itself) leaves the outcome unknown: the
//!   server may have committed, and then its synchronous standby has it too.
//!   Each operation says what to do ([`InDoubt`]): operations that end in the
//!   same state whether or not the first COMMIT landed (reads, upserts, the
//!   repository insert, which finds its own repository and reports it as
//!   already recorded) run again; the others fail with
//!   [`DataStoreError::CommitInDoubt`] (503 with `Retry-After`), since a
//!   second run could do them twice or report a conflict with themselves.
//!
//! A body may run several times, so it must have no effect outside its
//! transaction, and callers act on an outcome only once it is returned: an
//! upload hands its staged files to replication only after the insert
//! returned.

mod bgtask;
mod inventory;
mod release;
mod sled;
mod trust_root;
mod tuf;

use super::schema_version::{self, SchemaError};
use bb8::ErrorSink;
use common::Generation;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection, RunError};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolError, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::FutureExt;
use scoped_futures::{ScopedBoxFuture, ScopedFutureExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use release::{TargetReleases, health_state_from_sql, health_state_to_sql};
pub use tuf::{TufRepoInsertResult, TufRepoPage};

/// Attempts of one transaction before giving up on serialization conflicts.
const TRANSACTION_ATTEMPTS: u32 = 12;
/// The longest pause between two attempts after a conflict. Pauses double
/// from 2 ms, each a random point in its upper half, so that transactions
/// that conflicted spread out instead of meeting again: with a few
/// milliseconds of jitter, one of 16 concurrent uploads lost ten times in a
/// row under the whole test suite's load. At most about 3 s in all.
const CONFLICT_PAUSE_MAX: Duration = Duration::from_millis(1000);
const CONFLICT_PAUSE_FIRST: Duration = Duration::from_millis(2);
/// How long one request to the pool waits. bb8 backs off between failed
/// connection attempts up to half of this, so it bounds how long a promoted
/// primary goes unnoticed; [`DataStore::connection`] asks again until its
/// own wait is over.
const POOL_GET_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the TCP connect of one pooled connection may take, unless the
/// URL says (`connect_timeout`). A connect to an unreachable server would
/// otherwise hold a pool slot for as long as the kernel retries its SYN
/// (about two minutes) and record no error; with this bound it fails, is
/// recorded, and is retried.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(3);
/// Back-off after a lost connection: doubling from the first, capped.
const LOSS_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const LOSS_BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DataStoreError {
    #[error("{kind} {key} not found")]
    NotFound { kind: &'static str, key: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("the artifact generation moved from {expected} to {found}; read it again and retry")]
    GenerationMoved { expected: Generation, found: Generation },
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("connecting to the database at {url}")]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("no database connection available within {waited:?} (last connection error: {last_error})")]
    Unavailable { waited: Duration, last_error: String },
    #[error(
        "database operation {operation} lost its connection {attempts} times in {waited:?} (the database \
         primary failed, or is failing over) and did not complete"
    )]
    ConnectionLost {
        operation: &'static str,
        attempts: u32,
        waited: Duration,
        #[source]
        source: DieselError,
    },
    #[error(
        "database operation {operation} lost its connection during its COMMIT: whether it took effect is \
         unknown; look before doing it again"
    )]
    CommitInDoubt {
        operation: &'static str,
        #[source]
        source: DieselError,
    },
    #[error("database operation {operation} failed")]
    Query {
        operation: &'static str,
        #[source]
        source: DieselError,
    },
    #[error("database operation {operation} gave up after {attempts} serialization conflicts")]
    TooManyRetries { operation: &'static str, attempts: u32 },
}

/// What a transaction body returns: either a database error (retried if it is
/// a serialization failure or a lost connection) or a decision to abort with
/// a datastore error.
#[derive(Debug)]
pub(crate) enum TxnError {
    Db(DieselError),
    Abort(DataStoreError),
}

impl From<DieselError> for TxnError {
    fn from(error: DieselError) -> Self {
        TxnError::Db(error)
    }
}

impl From<DataStoreError> for TxnError {
    fn from(error: DataStoreError) -> Self {
        TxnError::Abort(error)
    }
}

/// What to do when the connection broke during an operation's COMMIT, so
/// that it may or may not have taken effect.
#[derive(Clone, Copy, Debug)]
pub(crate) enum InDoubt {
    /// It only reads: nothing it does can be in doubt; run it again.
    Read,
    /// Run it again: it reads what is recorded and ends in the same state
    /// either way.
    Rerun,
    /// Fail with [`DataStoreError::CommitInDoubt`]: a second run could do it
    /// twice, or refuse it as a conflict with itself.
    Report,
}

type DbPool = Pool<AsyncPgConnection>;

/// Settings of the connection pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_connections: u32,
    /// How long an operation waits for a usable connection, and keeps
    /// retrying after it lost one (a failover), before it gives up.
    pub failover_wait: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { max_connections: 16, failover_wait: Duration::from_secs(10) }
    }
}

pub struct DataStore {
    pool: DbPool,
    last_connection_error: LastConnectionError,
    failover_wait: Duration,
}

/// Remembers why the pool last failed to connect (or dropped a connection
/// at check-out): bb8 itself only reports that it timed out, which does not
/// tell an operator what is wrong.
#[derive(Clone, Debug, Default)]
struct LastConnectionError(Arc<Mutex<Option<String>>>);

impl ErrorSink<PoolError> for LastConnectionError {
    fn sink(&self, error: PoolError) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    fn boxed_clone(&self) -> Box<dyn ErrorSink<PoolError>> {
        Box::new(self.clone())
    }
}

impl DataStore {
    /// Connects and checks that the schema is at exactly the version this
    /// Nexus needs. This is how Nexus starts.
    pub async fn connect(url: &str, config: &PoolConfig) -> Result<DataStore, DataStoreError> {
        let datastore = Self::connect_unchecked(url, config).await?;
        let version = datastore
            .statement_retry("read_schema_version", InDoubt::Read, |conn| {
                schema_version::read_version(conn).scope_boxed()
            })
            .await?;
        schema_version::check_version(version.as_deref())?;
        Ok(datastore)
    }

    /// Connects without looking at the schema, for tools that repair it.
    pub async fn connect_unchecked(url: &str, config: &PoolConfig) -> Result<DataStore, DataStoreError> {
        // Fail fast, with the real cause, if the database is unreachable.
        // (tokio-postgres directly: diesel flattens the cause into a string.)
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|source| DataStoreError::Connect { url: url.to_string(), source })?;
        drop(client);
        let _ = connection.await;
        let last_connection_error = LastConnectionError::default();
        let mut manager_config = ManagerConfig::default();
        manager_config.custom_setup = Box::new(|url| establish(url).boxed());
        manager_config.recycling_method =
            RecyclingMethod::CustomFunction(Box::new(|conn| check_writable(conn).boxed()));
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, manager_config);
        let pool = Pool::builder()
            .max_size(config.max_connections)
            .connection_timeout(POOL_GET_TIMEOUT)
            .test_on_check_out(true)
            .min_idle(Some(0))
            .error_sink(Box::new(last_connection_error.clone()))
            .build_unchecked(manager);
        Ok(DataStore { pool, last_connection_error, failover_wait: config.failover_wait })
    }

    /// A tested connection (see the module doc), waiting at most
    /// [`PoolConfig::failover_wait`].
    pub(crate) async fn connection(&self) -> Result<PooledConnection<'_, AsyncPgConnection>, DataStoreError> {
        self.connection_within(self.failover_wait).await
    }

    async fn connection_within(
        &self,
        wait: Duration,
    ) -> Result<PooledConnection<'_, AsyncPgConnection>, DataStoreError> {
        let deadline = Instant::now() + wait;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let error = match tokio::time::timeout(remaining, self.pool.get()).await {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(RunError::User(error))) => Some(error.to_string()),
                Ok(Err(RunError::TimedOut)) | Err(_) => None,
            };
            if Instant::now() >= deadline {
                let last_error = error
                    .or_else(|| {
                        self.last_connection_error.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
                    })
                    .unwrap_or_else(|| "none recorded; every connection is in use".to_string());
                return Err(DataStoreError::Unavailable { waited: wait, last_error });
            }
        }
    }

    /// Runs `body` in a `SERIALIZABLE` transaction, retrying it on
    /// serialization failures and lost connections (see the module doc);
    /// `in_doubt` says what to do when a COMMIT's outcome is unknown. `body`
    /// may run several times, so it must not have effects outside the
    /// transaction.
    pub(crate) async fn transaction_retry<'a, T, F>(
        &self,
        operation: &'static str,
        in_doubt: InDoubt,
        body: F,
    ) -> Result<T, DataStoreError>
    where
        // A boxed future that is `Send` by its type: with plain async closures
        // the compiler cannot prove `Send` for every connection lifetime.
        F: for<'c> Fn(&'c mut AsyncPgConnection) -> ScopedBoxFuture<'a, 'c, Result<T, TxnError>>,
    {
        let mut retries = Retries::new(operation, in_doubt, self.failover_wait);
        let mut conn = self.connection().await?;
        loop {
            let failure = match transaction_attempt(&mut conn, &body).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            let lost = matches!(failure, Failure::Lost { .. });
            retries.after(failure).await?;
            if lost {
                // Back to the pool, whose check-out test drops it if it is
                // dead or read-only.
                drop(conn);
                conn = retries.reconnect(self).await?;
            }
        }
    }

    /// Runs one statement (`body`) outside an explicit transaction, retrying
    /// it on lost connections like [`DataStore::transaction_retry`]. For
    /// reads and single writes.
    pub(crate) async fn statement_retry<'a, T, F>(
        &self,
        operation: &'static str,
        in_doubt: InDoubt,
        body: F,
    ) -> Result<T, DataStoreError>
    where
        F: for<'c> Fn(&'c mut AsyncPgConnection) -> ScopedBoxFuture<'a, 'c, Result<T, DieselError>>,
    {
        let mut retries = Retries::new(operation, in_doubt, self.failover_wait);
        let mut conn = self.connection().await?;
        loop {
            let error = match body(&mut conn).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            // Only an error diesel could not name may have ended the
            // session (FATAL): look.
            let alive = match &error {
                DieselError::DatabaseError(DatabaseErrorKind::Unknown, _) => {
                    conn.batch_execute("SELECT 1").await.is_ok()
                }
                _ => true,
            };
            // The statement committed by itself: a loss may come after.
            let failure = classify(error, alive, true);
            let lost = matches!(failure, Failure::Lost { .. });
            retries.after(failure).await?;
            if lost {
                drop(conn);
                conn = retries.reconnect(self).await?;
            }
        }
    }
}

/// A new pooled connection: what diesel's `establish` does, keeping the
/// cause of a failure. diesel keeps only tokio-postgres's "error connecting
/// to server"; with several hosts the cause ("database does not allow
/// writes") is what tells an operator that no primary was found.
/// Opens a pooled session. It pins `statement_timeout = 0` whatever the
/// server, database or role sets: a COMMIT waiting for a synchronous
/// standby that a timeout cancels has already committed locally, and is
/// answered as committed (with only a warning) although no standby may
/// have it; a failover would then lose an acknowledged upload. Every wait
/// is bounded by Nexus's own timeouts instead.
async fn establish(url: &str) -> diesel::ConnectionResult<AsyncPgConnection> {
    let bad =
        |error: tokio_postgres::Error| diesel::ConnectionError::BadConnection(common::error_chain(&error));
    let mut config: tokio_postgres::Config = url.parse().map_err(bad)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(ESTABLISH_TIMEOUT);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(bad)?;
    let mut conn = AsyncPgConnection::try_from_client_and_connection(client, connection).await?;
    diesel::sql_query("SET statement_timeout = 0").execute(&mut conn).await.map_err(|error| {
        diesel::ConnectionError::BadConnection(format!("pinning statement_timeout = 0: {error}"))
    })?;
    Ok(conn)
}

/// The check-out test of a pooled connection: it answers, and its server
/// accepts writes.
async fn check_writable(conn: &mut AsyncPgConnection) -> diesel::QueryResult<()> {
    let read_only: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
        "current_setting('transaction_read_only')",
    ))
    .get_result(conn)
    .await?;
    if read_only == "off" {
        return Ok(());
    }
    Err(DieselError::DatabaseError(
        DatabaseErrorKind::ReadOnlyTransaction,
        Box::new(format!(
            "the server is read-only (transaction_read_only = {read_only}): a standby, or a primary being demoted"
        )),
    ))
}

/// How one attempt failed.
enum Failure {
    /// A serialization failure (40001): the server rolled it back.
    Conflict,
    /// The connection broke, or its server cannot write. `in_doubt`: during
    /// a COMMIT, so it may have committed.
    Lost { source: DieselError, in_doubt: bool },
    /// The operation's answer.
    Final(TxnError),
}

/// One attempt of a transaction on `conn`.
async fn transaction_attempt<'a, T, F>(conn: &mut AsyncPgConnection, body: &F) -> Result<T, Failure>
where
    F: for<'c> Fn(&'c mut AsyncPgConnection) -> ScopedBoxFuture<'a, 'c, Result<T, TxnError>>,
{
    if let Err(error) = conn.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE").await {
        return Err(roll_back_and_classify(conn, error, false).await);
    }
    match body(conn).await {
        Ok(value) => match conn.batch_execute("COMMIT").await {
            Ok(()) => Ok(value),
            Err(error) => Err(roll_back_and_classify(conn, error, true).await),
        },
        Err(TxnError::Abort(error)) => {
            // The body's decision stands whether or not the ROLLBACK gets
            // through: a dead session rolls back by itself.
            let _ = conn.batch_execute("ROLLBACK").await;
            Err(Failure::Final(TxnError::Abort(error)))
        }
        Err(TxnError::Db(error)) => Err(roll_back_and_classify(conn, error, false).await),
    }
}

/// Ends the transaction after `error` and says what the error was. After a
/// failed COMMIT, or in a transaction the server aborted, ROLLBACK only ends
/// it (or warns that there is none); if even that fails, the session is
/// gone.
async fn roll_back_and_classify(
    conn: &mut AsyncPgConnection,
    error: DieselError,
    during_commit: bool,
) -> Failure {
    let alive = conn.batch_execute("ROLLBACK").await.is_ok();
    classify(error, alive, during_commit)
}

/// `alive`: the session still answers after the error.
fn classify(error: DieselError, alive: bool, during_commit: bool) -> Failure {
    match &error {
        // Rolled back by the server, whatever the stage.
        DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) if alive => Failure::Conflict,
        DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _)
        | DieselError::DatabaseError(DatabaseErrorKind::ReadOnlyTransaction, _) => {
            Failure::Lost { source: error, in_doubt: false }
        }
        DieselError::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection,
            _,
        ) => Failure::Lost { source: error, in_doubt: during_commit },
        _ if !alive => Failure::Lost { source: error, in_doubt: during_commit },
        _ => Failure::Final(TxnError::Db(error)),
    }
}

/// The pause before attempt `failures + 1`: `first` doubled per earlier
/// failure, at most `max`, at a random point in its upper half.
fn backoff(first: Duration, max: Duration, failures: u32) -> Duration {
    let doubling = first.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubling.min(max).mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// The retry budget of one operation: serialization conflicts by count,
/// lost connections by time.
struct Retries {
    operation: &'static str,
    in_doubt: InDoubt,
    wait: Duration,
    conflicts: u32,
    losses: u32,
    first_loss: Option<Instant>,
    last_loss: Option<DieselError>,
    /// A write's COMMIT was cut off: if the operation gives up, whether it
    /// took effect is unknown.
    doubt: bool,
}

impl Retries {
    fn new(operation: &'static str, in_doubt: InDoubt, wait: Duration) -> Retries {
        Retries {
            operation,
            in_doubt,
            wait,
            conflicts: 0,
            losses: 0,
            first_loss: None,
            last_loss: None,
            doubt: false,
        }
    }

    /// The error of an operation that lost its connection and ran out of
    /// time: in doubt if a cut-off COMMIT was never settled.
    fn gave_up(&self, source: DieselError) -> DataStoreError {
        let operation = self.operation;
        if self.doubt {
            return DataStoreError::CommitInDoubt { operation, source };
        }
        let waited = self.first_loss.map_or(Duration::ZERO, |first| first.elapsed());
        DataStoreError::ConnectionLost { operation, attempts: self.losses, waited, source }
    }

    /// After a failed attempt: waits out the back-off if another attempt is
    /// due, or returns the operation's error.
    async fn after(&mut self, failure: Failure) -> Result<(), DataStoreError> {
        let operation = self.operation;
        match failure {
            Failure::Final(TxnError::Abort(error)) => Err(error),
            Failure::Final(TxnError::Db(source)) => Err(DataStoreError::Query { operation, source }),
            Failure::Conflict => {
                self.conflicts += 1;
                if self.conflicts >= TRANSACTION_ATTEMPTS {
                    return Err(DataStoreError::TooManyRetries { operation, attempts: TRANSACTION_ATTEMPTS });
                }
                tokio::time::sleep(backoff(CONFLICT_PAUSE_FIRST, CONFLICT_PAUSE_MAX, self.conflicts)).await;
                Ok(())
            }
            Failure::Lost { source, in_doubt: true } if matches!(self.in_doubt, InDoubt::Report) => {
                Err(DataStoreError::CommitInDoubt { operation, source })
            }
            Failure::Lost { source, in_doubt } => {
                self.losses += 1;
                self.doubt |= in_doubt && !matches!(self.in_doubt, InDoubt::Read);
                let waited = self.first_loss.get_or_insert_with(Instant::now).elapsed();
                if waited >= self.wait {
                    return Err(self.gave_up(source));
                }
                self.last_loss = Some(source);
                let pause = backoff(LOSS_BACKOFF_FIRST, LOSS_BACKOFF_MAX, self.losses);
                tokio::time::sleep(pause.min(self.wait - waited)).await;
                Ok(())
            }
        }
    }

    /// A connection for the next attempt after a loss, within what is left
    /// of the wait.
    async fn reconnect<'d>(
        &mut self,
        datastore: &'d DataStore,
    ) -> Result<PooledConnection<'d, AsyncPgConnection>, DataStoreError> {
        let waited = self.first_loss.map_or(Duration::ZERO, |first| first.elapsed());
        match datastore.connection_within(self.wait.saturating_sub(waited)).await {
            Ok(conn) => Ok(conn),
            Err(unavailable) => match self.last_loss.take() {
                Some(source) => Err(self.gave_up(source)),
                None => Err(unavailable),
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use test_harness::TestDatabase;

    /// The trust root every test datastore has, for repositories recorded
    /// without an upload.
    pub const TEST_TRUST_ROOT: uuid::Uuid = uuid::Uuid::from_u128(0x7e57);

    /// A datastore on a fresh database of the test's own, with
    /// [`TEST_TRUST_ROOT`] trusted. The database is returned too, to keep
    /// its URL at hand.
    pub async fn datastore() -> (TestDatabase, DataStore) {
        use diesel_async::RunQueryDsl;
        let db = TestDatabase::new().await;
        let datastore = DataStore::connect(db.url(), &PoolConfig::default()).await.unwrap();
        let root = crate::db::model::TufTrustRoot {
            id: TEST_TRUST_ROOT,
            time_created: chrono::Utc::now(),
            time_deleted: None,
            root_role: serde_json::json!({"test": "root"}),
        };
        let mut conn = datastore.connection().await.unwrap();
        diesel::insert_into(crate::db::schema::tuf_trust_root::table)
            .values(&root)
            .execute(&mut conn)
            .await
            .unwrap();
        drop(conn);
        (db, datastore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::sql_types::Integer;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use test_harness::TestDatabase;

    const INSERT: &str = "INSERT INTO bgtask_switch VALUES ('t', 'enabled', 'test', 'failover', now()) \
                          ON CONFLICT (name) DO NOTHING";

    async fn rows(datastore: &DataStore) -> i64 {
        datastore
            .statement_retry("count", InDoubt::Read, |conn| {
                diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
                    "(SELECT count(*) FROM bgtask_switch)",
                ))
                .get_result(conn)
                .scope_boxed()
            })
            .await
            .unwrap()
    }

    async fn datastore_with(db: &TestDatabase, max_connections: u32) -> DataStore {
        let config = PoolConfig { max_connections, failover_wait: Duration::from_secs(2) };
        DataStore::connect(db.url(), &config).await.unwrap()
    }

    /// Ends another session from outside, as a server shutting down does
    /// (57P01), and waits until it is gone.
    async fn terminate(url: &str, pid: i32) {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.query_one("SELECT pg_terminate_backend($1, 5000)", &[&pid]).await.unwrap();
    }

    /// Runs a transaction whose first attempt runs `sabotage` before its
    /// write, and checks that it ran exactly twice and wrote once.
    async fn runs_again_after(sabotage: &'static str) {
        let db = TestDatabase::new().await;
        let datastore = datastore_with(&db, 4).await;
        let attempts = AtomicUsize::new(0);
        datastore
            .transaction_retry("test", InDoubt::Report, |conn| {
                let attempts = &attempts;
                async move {
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        diesel::sql_query(sabotage).execute(conn).await?;
                    }
                    diesel::sql_query(INSERT).execute(conn).await?;
                    Ok(())
                }
                .scope_boxed()
            })
            .await
            .unwrap();
        assert_eq!(attempts.into_inner(), 2, "{sabotage}");
        assert_eq!(rows(&datastore).await, 1, "{sabotage}");
    }

    /// A COMMIT that a statement timeout cancels while it waits for the
    /// synchronous standby is answered as committed without the standby
    /// having it: sessions pin the timeout off, whatever the database says.
    #[tokio::test]
    async fn sessions_pin_statement_timeout_off_whatever_the_database_sets() {
        let db = TestDatabase::new().await;
        let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let name = db.name();
        client
            .batch_execute(&format!("ALTER DATABASE \"{name}\" SET statement_timeout = '1ms'"))
            .await
            .unwrap();
        let datastore = datastore_with(&db, 2).await;
        let setting: String = datastore
            .statement_retry("show", InDoubt::Read, |conn| {
                diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
                    "current_setting('statement_timeout')",
                ))
                .get_result(conn)
                .scope_boxed()
            })
            .await
            .unwrap();
        assert_eq!(setting, "0");
    }

    #[tokio::test]
    async fn a_transaction_whose_session_the_server_ends_runs_again_on_a_new_connection() {
        runs_again_after("SELECT pg_terminate_backend(pg_backend_pid())").await;
    }

    #[tokio::test]
    async fn a_commit_cut_off_is_run_again_only_if_the_operation_says_so() {
        let db = TestDatabase::new().await;
        let datastore = datastore_with(&db, 4).await;
        for (in_doubt, expected_attempts) in [(InDoubt::Report, 1), (InDoubt::Rerun, 2)] {
            let attempts = AtomicUsize::new(0);
            let outcome = datastore
                .transaction_retry("test", in_doubt, |conn| {
                    let (attempts, url) = (&attempts, db.url());
                    async move {
                        diesel::sql_query(INSERT).execute(conn).await?;
                        if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                            // The session dies after the body, before COMMIT
                            // is answered: the client cannot tell whether it
                            // committed.
                            let pid: i32 = diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
                                .get_result(conn)
                                .await?;
                            terminate(url, pid).await;
                        }
                        Ok(())
                    }
                    .scope_boxed()
                })
                .await;
            assert_eq!(attempts.into_inner(), expected_attempts, "{in_doubt:?}");
            if let InDoubt::Report = in_doubt {
                let error = outcome.unwrap_err();
                assert!(
                    matches!(error, DataStoreError::CommitInDoubt { operation: "test", .. }),
                    "{error:?}"
                );
                let http = dropshot::HttpError::from(error);
                assert_eq!(http.status_code.as_u16(), 503);
                assert_eq!(rows(&datastore).await, 0, "the session died before its COMMIT");
            } else {
                outcome.unwrap();
                assert_eq!(rows(&datastore).await, 1);
            }
        }
    }

    #[tokio::test]
    async fn a_write_refused_as_read_only_runs_again_on_another_connection() {
        // As on a server that turned read-only after the connection's
        // check-out test: 25006.
        runs_again_after("SET TRANSACTION READ ONLY").await;
    }

    #[tokio::test]
    async fn a_read_only_connection_is_never_handed_out() {
        let db = TestDatabase::new().await;
        // One connection, so that the next operation would get it back.
        let datastore = datastore_with(&db, 1).await;
        let mut conn = datastore.connection().await.unwrap();
        conn.batch_execute("SET default_transaction_read_only = on").await.unwrap();
        drop(conn);
        datastore
            .statement_retry("test", InDoubt::Rerun, |conn| {
                diesel::sql_query(INSERT).execute(conn).scope_boxed()
            })
            .await
            .unwrap();
        assert_eq!(rows(&datastore).await, 1);
        let recorded = datastore.last_connection_error.0.lock().unwrap().clone().unwrap_or_default();
        assert!(recorded.contains("the server is read-only"), "{recorded}");
    }

    #[tokio::test]
    async fn an_operation_gives_up_within_the_wait_with_a_503_and_the_pool_recovers_after() {
        let mut server = test_harness::PgServer::start().await.unwrap();
        let url = server.create_database("rack").await.unwrap();
        let config = PoolConfig { max_connections: 2, failover_wait: Duration::from_secs(1) };
        let datastore = DataStore::connect_unchecked(&url, &config).await.unwrap();
        async fn select(datastore: &DataStore) -> Result<usize, DataStoreError> {
            datastore
                .statement_retry("select_one", InDoubt::Read, |conn| {
                    diesel::sql_query("SELECT 1").execute(conn).scope_boxed()
                })
                .await
        }
        select(&datastore).await.unwrap();

        server.pause();
        let started = Instant::now();
        let error = select(&datastore).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!(
            matches!(error, DataStoreError::Unavailable { .. } | DataStoreError::ConnectionLost { .. }),
            "{error:?}"
        );
        let http = dropshot::HttpError::from(error);
        assert_eq!(http.status_code.as_u16(), 503);
        let retry_after = http.headers.as_ref().and_then(|headers| headers.get(http::header::RETRY_AFTER));
        assert_eq!(retry_after.unwrap(), "5");

        server.resume().await.unwrap();
        select(&datastore).await.unwrap();
    }
}
