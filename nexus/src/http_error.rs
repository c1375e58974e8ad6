//! How datastore and driver errors become HTTP errors. The message the client
//! sees names the problem and the thing it concerns; 500s keep the cause chain
//! in the server log only.

use crate::background::driver::{DriverError, StoreError};
use crate::db::DataStoreError;
use common::error::unavailable;
use common::error_chain;
use dropshot::{ClientErrorStatusCode, HttpError};

/// What a client is told to wait when the database is unreachable or
/// failing over: long enough not to hammer a Nexus that is itself waiting
/// for a new primary, short against a failover's tens of seconds.
pub const DATABASE_RETRY_AFTER_SECS: u64 = 5;

impl From<DataStoreError> for HttpError {
    fn from(error: DataStoreError) -> HttpError {
        let message = error_chain(&error);
        match error {
            DataStoreError::NotFound { .. } => HttpError::for_client_error(
                Some("NOT_FOUND".into()),
                ClientErrorStatusCode::NOT_FOUND,
                message,
            ),
            DataStoreError::Conflict(_) => {
                HttpError::for_client_error(Some("CONFLICT".into()), ClientErrorStatusCode::CONFLICT, message)
            }
            DataStoreError::GenerationMoved { .. } => HttpError::for_client_error(
                Some("GENERATION_MOVED".into()),
                ClientErrorStatusCode::CONFLICT,
                message,
            ),
            DataStoreError::InvalidInput(_) => {
                HttpError::for_bad_request(Some("INVALID_INPUT".into()), message)
            }
            // Transient: a failover, a database on its way back, or
            // contention (nothing written: the same request later will do).
            DataStoreError::Unavailable { .. }
            | DataStoreError::ConnectionLost { .. }
            | DataStoreError::CommitInDoubt { .. }
            | DataStoreError::TooManyRetries { .. } => unavailable(message)
                .with_header(http::header::RETRY_AFTER, DATABASE_RETRY_AFTER_SECS.to_string())
                .expect("a valid header"),
            DataStoreError::Schema(_) | DataStoreError::Connect { .. } => unavailable(message),
            DataStoreError::Query { .. } => HttpError::for_internal_error(message),
        }
    }
}

impl From<DriverError> for HttpError {
    fn from(error: DriverError) -> HttpError {
        match error {
            DriverError::UnknownTask { .. } => HttpError::for_client_error(
                Some("UNKNOWN_BACKGROUND_TASK".into()),
                ClientErrorStatusCode::NOT_FOUND,
                error.to_string(),
            ),
            DriverError::EmptySwitchField { .. } => {
                HttpError::for_bad_request(Some("INVALID_INPUT".into()), error.to_string())
            }
            // The database's own rules, for the status: an unreachable
            // database is 503, a failed query 500.
            DriverError::SetSwitch { source: StoreError::Database(source), .. } => HttpError::from(source),
            DriverError::SetSwitch { source: StoreError::TimedOut(_), .. } => {
                unavailable(error_chain(&error))
            }
        }
    }
}
