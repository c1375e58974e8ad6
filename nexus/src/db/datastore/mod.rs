//! The datastore: a connection pool and one method per database operation.
//!
//! Every mutation runs in a `SERIALIZABLE` transaction through
//! [`DataStore::transaction_retry`], which retries serialization failures a
//! bounded number of times with jittered back-off. That is the only isolation
//! level CockroachDB offers and the one that makes the generation
//! compare-and-swap safe under concurrent Nexus instances.

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
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, PoolError};
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use scoped_futures::ScopedBoxFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use release::{TargetReleases, health_state_from_sql, health_state_to_sql};
pub use tuf::{TufRepoInsertResult, TufRepoPage};

/// Attempts of one transaction before giving up on serialization conflicts.
const TRANSACTION_ATTEMPTS: u32 = 10;
const POOL_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error(
        "no database connection available within {POOL_CONNECTION_TIMEOUT:?} (last connection error: {last_error})"
    )]
    Unavailable { last_error: String },
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
/// a serialization failure) or a decision to abort with a datastore error.
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

type DbPool = Pool<AsyncPgConnection>;

/// Settings of the connection pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_connections: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { max_connections: 16 }
    }
}

pub struct DataStore {
    pool: DbPool,
    last_connection_error: LastConnectionError,
}

/// Remembers why the pool last failed to connect: bb8 itself only reports
/// that it timed out, which does not tell an operator what is wrong.
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
        let version = {
            let mut conn = datastore.connection().await?;
            schema_version::read_version(&mut conn)
                .await
                .map_err(|source| DataStoreError::Query { operation: "read_schema_version", source })?
        };
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
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
        let pool = Pool::builder()
            .max_size(config.max_connections)
            .connection_timeout(POOL_CONNECTION_TIMEOUT)
            .min_idle(Some(0))
            .error_sink(Box::new(last_connection_error.clone()))
            .build_unchecked(manager);
        Ok(DataStore { pool, last_connection_error })
    }

    pub(crate) async fn connection(&self) -> Result<PooledConnection<'_, AsyncPgConnection>, DataStoreError> {
        self.pool.get().await.map_err(|error| {
            let last_error = match error {
                RunError::User(error) => error.to_string(),
                RunError::TimedOut => self
                    .last_connection_error
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_else(|| "none recorded; every connection is in use".to_string()),
            };
            DataStoreError::Unavailable { last_error }
        })
    }

    /// Runs `body` in a `SERIALIZABLE` transaction, retrying it on
    /// serialization failures. `body` may run several times, so it must not
    /// have effects outside the transaction.
    pub(crate) async fn transaction_retry<'a, T, F>(
        &self,
        operation: &'static str,
        body: F,
    ) -> Result<T, DataStoreError>
    where
        // A boxed future that is `Send` by its type: with plain async closures
        // the compiler cannot prove `Send` for every connection lifetime.
        F: for<'c> Fn(&'c mut AsyncPgConnection) -> ScopedBoxFuture<'a, 'c, Result<T, TxnError>>,
    {
        let mut conn = self.connection().await?;
        let query_error = |source| DataStoreError::Query { operation, source };
        for attempt in 1..=TRANSACTION_ATTEMPTS {
            conn.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE").await.map_err(query_error)?;
            let outcome = match body(&mut conn).await {
                Ok(value) => conn.batch_execute("COMMIT").await.map(|()| value).map_err(TxnError::Db),
                Err(error) => {
                    conn.batch_execute("ROLLBACK").await.map_err(query_error)?;
                    Err(error)
                }
            };
            match outcome {
                Ok(value) => return Ok(value),
                Err(TxnError::Abort(error)) => return Err(error),
                Err(TxnError::Db(error)) if is_serialization_failure(&error) => {
                    // After a failed COMMIT PostgreSQL has already ended the
                    // transaction; a ROLLBACK then only warns.
                    let _ = conn.batch_execute("ROLLBACK").await;
                    let jitter = rand::random::<u64>() % (5 * u64::from(attempt));
                    tokio::time::sleep(Duration::from_millis(1 + jitter)).await;
                }
                Err(TxnError::Db(source)) => {
                    return Err(DataStoreError::Query { operation, source });
                }
            }
        }
        Err(DataStoreError::TooManyRetries { operation, attempts: TRANSACTION_ATTEMPTS })
    }
}

fn is_serialization_failure(error: &DieselError) -> bool {
    matches!(error, DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _))
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
        diesel::insert_into(crate::db::schema::tuf_trust_root::table).values(&root).execute(&mut conn).await.unwrap();
        drop(conn);
        (db, datastore)
    }
}
