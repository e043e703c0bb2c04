//! What can go wrong, in two kinds: [`PostgresStoreError`], why a store could not be
//! opened or prepared; and [`Failure`], why one call failed and whether it may be tried
//! again.
//!
//! A call that charges (a decision, a refund, a reservation, a settlement) is never sent
//! twice when it may have run (a dropped connection or a timeout): the failure goes to
//! the caller (for decisions, the `on_error` policy). An error answered by the
//! server proves the statement rolled back, so those that a second attempt can cure
//! (the schema dropped, a replanned statement, a restart in progress) are retried once.

use deadpool_postgres::PoolError;
use sluice_engine::StoreError;
use sluice_store_rules::postgres::SCHEMA_NAME_RULE;
use tokio_postgres::error::SqlState;

use crate::SCHEMA_VERSION;

/// Why a [`PostgresStore`](crate::PostgresStore) could not be opened or prepared.
/// Messages never contain the URL or its password.
#[derive(Debug, thiserror::Error)]
pub enum PostgresStoreError {
    /// The URL cannot be used.
    #[error(
        "storage.url is not a usable PostgreSQL URL ({0}); write it as postgres://user:password@host:5432/database"
    )]
    BadUrl(String),
    /// The schema name is not a plain identifier.
    #[error("storage.schema {0:?} is not a plain lowercase identifier: {SCHEMA_NAME_RULE}")]
    BadSchema(String),
    /// PostgreSQL did not answer.
    #[error("cannot reach PostgreSQL at {address}: {reason}")]
    Unreachable {
        /// host:port, without credentials.
        address: String,
        /// What the client said.
        reason: String,
    },
    /// `migrate: false` and the schema is not installed (or older than this build).
    #[error(
        "the sluice schema (version {SCHEMA_VERSION}) is not installed in schema {schema:?} at {address} (found version {found}): apply `sluice migrate --print --config FILE` as a DBA, or set storage.migrate: true"
    )]
    SchemaMissing {
        /// host:port.
        address: String,
        /// The configured schema.
        schema: String,
        /// The version found (0: none).
        found: i32,
    },
    /// PostgreSQL refused the migration (typically: no CREATE privilege).
    #[error(
        "cannot install the sluice schema in {schema:?} at {address}: {reason}; grant the user CREATE on the schema (or database), or have a DBA apply `sluice migrate --print --config FILE` and set storage.migrate: false"
    )]
    Migration {
        /// host:port.
        address: String,
        /// The configured schema.
        schema: String,
        /// What the server said.
        reason: String,
    },
}

/// Why one attempt failed, and whether repeating it could charge twice.
pub(crate) struct Failure {
    pub(crate) error: StoreError,
    /// The server answered with an error, so the statement rolled back and a second
    /// attempt is safe; and that error is one a second attempt may not meet.
    pub(crate) may_retry: bool,
    /// The server said the table, a function or the schema is missing: it was dropped
    /// under us, and must be prepared again before the retry.
    pub(crate) schema_gone: bool,
}

/// No connection came from the pool (of the server at `address`).
pub(crate) fn pool_failure(address: &str, error: PoolError) -> Failure {
    let error = match error {
        PoolError::Timeout(_) => StoreError::Unavailable(format!(
            "PostgreSQL at {address}: no connection within the timeout ({error})"
        )),
        other => StoreError::Unavailable(format!("PostgreSQL at {address}: {other}")),
    };
    // Nothing was sent, but the pool has just tried: a second try would wait again.
    Failure {
        error,
        may_retry: false,
        schema_gone: false,
    }
}

/// A statement sent to the server at `address` failed.
pub(crate) fn query_failure(address: &str, error: &tokio_postgres::Error) -> Failure {
    let Some(code) = error.code() else {
        // No answer (a dropped connection, an I/O error): the statement may have run.
        return Failure {
            error: StoreError::Unavailable(format!("PostgreSQL at {address}: {}", describe(error))),
            may_retry: false,
            schema_gone: false,
        };
    };
    let schema_gone = [
        SqlState::UNDEFINED_FUNCTION,
        SqlState::UNDEFINED_TABLE,
        SqlState::INVALID_SCHEMA_NAME,
    ]
    .contains(code);
    let may_retry = schema_gone
        || [
            // "cached plan must not change result type" after a schema change.
            SqlState::FEATURE_NOT_SUPPORTED,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
        ]
        .contains(code);
    let unavailable = code.code().starts_with("08")
        || code.code().starts_with("57")
        || *code == SqlState::QUERY_CANCELED;
    let message = format!("PostgreSQL at {address}: {}", describe(error));
    Failure {
        error: if unavailable {
            StoreError::Unavailable(message)
        } else {
            StoreError::Protocol(message)
        },
        may_retry,
        schema_gone,
    }
}

/// The server's message (with its SQLSTATE) rather than tokio-postgres's "db error".
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}
