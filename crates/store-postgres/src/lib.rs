//! The PostgreSQL counter store: counters shared by every sluice instance that points
//! at one database.
//!
//! # One round trip per decision
//! A decision, whatever its number of checks and windows, is one call of the plpgsql
//! function `sluice_decide` through a statement prepared once per connection
//! (`prepare_cached`). The function runs the engine's arithmetic
//! (`crates/engine/src/algorithm.rs`) and its two-pass atomic rule
//! (`sluice_engine::apply`) on the database's clock (`clock_timestamp()`), so instances
//! with skewed clocks agree. Each counter is guarded by a transaction-scoped advisory
//! lock on a hash of its key, taken in ascending order, so concurrent decisions on
//! shared counters serialise without deadlocks; dry runs (and requests whose every cost
//! is 0) take no lock and write nothing.
//!
//! # Schema
//! `schema.sql` is a versioned, idempotent migration ([`SCHEMA_VERSION`]): a table
//! `sluice_counters (key, a, b, c, expires_at)` (one row per counter, the engine's
//! state in three integers, microseconds and units of cost), the functions
//! `sluice_decide`, `sluice_reset` and `sluice_sweep`, and a record of applied versions.
//! [`PostgresStore::prepare`] applies it (or, with `migrate: false`, only checks it is
//! there); [`migration_sql`] is the same script for a DBA. `unlogged: true` makes the
//! counter table `UNLOGGED`: no WAL, faster, and emptied by PostgreSQL after a crash.
//!
//! # Expiry
//! Every row carries the moment its state stops mattering (the engine's `expires_at`).
//! A background task ([`PostgresStore::start_sweeper`]) deletes expired rows in batches;
//! instances sharing a table take turns (at most one sweep per interval across them),
//! and a sweep skips rows a decision holds, so it never waits for one.
//!
//! # Connections
//! A deadpool pool of `pool_size` connections, created on first use, recycled after a
//! check that the connection is still open (no extra round trip). Sessions run with
//! `statement_timeout` = the store timeout, so a statement stuck behind a lock cannot
//! outlive the caller's patience, and `synchronous_commit = off`: a PostgreSQL crash may
//! lose the last fraction of a second of counting, and nothing waits for a disk flush.
//! A charging decision is never sent twice when it may have run (a dropped connection
//! or a timeout): the failure goes to the `on_error` policy. An error answered by the
//! server proves the statement rolled back, so those that a second attempt can cure
//! (the schema dropped, a replanned statement, a restart in progress) are retried once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use sluice_engine::{
    Algorithm, DecisionRequest, Limit, Outcomes, Store, StoreError, StoreFuture, StoreStats,
    WindowOutcome, WindowOutcomes,
};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

/// The schema version this build installs and expects.
pub const SCHEMA_VERSION: i32 = 2;

/// The migration script, with placeholders for the schema and the table's persistence.
const SCHEMA_SQL: &str = include_str!("schema.sql");

/// Rows one sweep statement deletes at most (each batch is its own transaction).
const SWEEP_BATCH: i32 = 10_000;

/// Batches one sweep runs at most before waiting for the next interval.
const SWEEP_MAX_BATCHES: usize = 100;

/// How long after expiring a row may still be swept. Decisions read the clock a few
/// microseconds before they read a row; the margin keeps a row that expired in between
/// from vanishing under them.
const SWEEP_GRACE: Duration = Duration::from_secs(1);

/// How long the sweep, the migration and `reset_limit` may run: longer than a decision.
const MAINTENANCE_TIMEOUT_MS: u64 = 60_000;

/// Settings of a [`PostgresStore`].
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresStoreConfig {
    /// `postgres://user:password@host:port/database[?options]`. Holds a password: never
    /// logged.
    pub url: String,
    /// The schema holding sluice's table and functions. Default `public`.
    pub schema: String,
    /// Prepended to every key, so deployments can share one table. Default `sluice:`.
    pub prefix: String,
    /// Connections kept at most. Default 16.
    pub pool_size: usize,
    /// How long one call (including waiting for or opening a connection) may take; also
    /// the sessions' `statement_timeout`. Default 200 ms.
    pub timeout: Duration,
    /// Install or upgrade the schema when needed. Default true.
    pub migrate: bool,
    /// Keep counters in an `UNLOGGED` table. Default false.
    pub unlogged: bool,
}

impl std::fmt::Debug for PostgresStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStoreConfig")
            .field("url", &"[redacted]")
            .field("schema", &self.schema)
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("migrate", &self.migrate)
            .field("unlogged", &self.unlogged)
            .finish()
    }
}

impl PostgresStoreConfig {
    /// Settings with the defaults above.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresStoreConfig {
            url: url.into(),
            schema: "public".to_string(),
            prefix: "sluice:".to_string(),
            pool_size: 16,
            timeout: Duration::from_millis(200),
            migrate: true,
            unlogged: false,
        }
    }
}

/// Why a [`PostgresStore`] could not be opened or prepared. Messages never contain the
/// URL or its password.
#[derive(Debug, thiserror::Error)]
pub enum PostgresStoreError {
    /// The URL cannot be used.
    #[error(
        "storage.url is not a usable PostgreSQL URL ({0}); write it as postgres://user:password@host:5432/database"
    )]
    BadUrl(String),
    /// The schema name is not a plain identifier.
    #[error(
        "storage.schema {0:?} is not a plain lowercase identifier: use letters a-z, digits and _, starting with a letter or _, at most 63 bytes"
    )]
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

/// What [`PostgresStore::prepare`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaStatus {
    /// The schema was already at this build's version.
    UpToDate,
    /// The migration ran, from the version given (0: nothing was installed).
    Migrated {
        /// The version before.
        from: i32,
    },
    /// A newer sluice installed a later version; it is left as it is.
    Newer {
        /// The version found.
        found: i32,
    },
}

/// The migration script for `schema` (a plain identifier), ready for `psql`: one
/// transaction, idempotent.
pub fn migration_sql(schema: &str, unlogged: bool) -> Result<String, PostgresStoreError> {
    Ok(format!(
        "-- sluice schema version {SCHEMA_VERSION}; apply with: psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -f FILE\nBEGIN;\n{}COMMIT;\n",
        render_schema(schema, unlogged)?
    ))
}

fn render_schema(schema: &str, unlogged: bool) -> Result<String, PostgresStoreError> {
    check_schema_name(schema)?;
    let (create, persistence, alter) = if unlogged {
        ("UNLOGGED", "u", "UNLOGGED")
    } else {
        ("", "p", "LOGGED")
    };
    Ok(SCHEMA_SQL
        .replace("@schema_name@", schema)
        .replace("@schema@", &format!("\"{schema}\""))
        .replace(
            "CREATE @unlogged@ TABLE",
            &format!("CREATE {create} TABLE").replace("  ", " "),
        )
        .replace("@persistence@", persistence)
        .replace("@logged@", alter))
}

/// Schema names are restricted to what needs no quoting rules: lowercase identifiers.
fn check_schema_name(schema: &str) -> Result<(), PostgresStoreError> {
    let mut bytes = schema.bytes();
    let ok = schema.len() <= 63
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PostgresStoreError::BadSchema(schema.to_string()))
    }
}

/// The statements the store runs, with the schema filled in.
struct Statements {
    decide: String,
    reset: String,
    reset_range: String,
    sweep: String,
    /// Gives back what a decision charged.
    refund: String,
    /// Whether the version table and the decision function exist.
    installed: String,
    version: String,
}

impl Statements {
    fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        Statements {
            decide: format!("SELECT {s}.sluice_decide($1::text[], $2::bigint[], $3::boolean)"),
            reset: format!("SELECT {s}.sluice_reset($1::text[])"),
            refund: format!("SELECT {s}.sluice_refund($1::text[], $2::bigint[])"),
            reset_range: format!(
                "WITH gone AS (DELETE FROM {s}.sluice_counters AS t \
                 WHERE t.key >= $1::text COLLATE \"C\" AND t.key < $2::text COLLATE \"C\" \
                 RETURNING t.expires_at) \
                 SELECT count(*) FROM gone \
                 WHERE gone.expires_at > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint"
            ),
            sweep: format!("SELECT {s}.sluice_sweep($1::integer, $2::bigint, $3::bigint)"),
            installed: format!(
                "SELECT to_regclass('{s}.sluice_migrations') IS NOT NULL \
                 AND to_regprocedure('{s}.sluice_decide(text[], bigint[], boolean)') IS NOT NULL"
            ),
            version: format!("SELECT coalesce(max(version), 0) FROM {s}.sluice_migrations"),
        }
    }
}

/// A [`Store`] on one PostgreSQL database. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    pool: Pool,
    statements: Statements,
    schema: String,
    prefix: String,
    address: String,
    migrate: bool,
    unlogged: bool,
    /// The schema is known to be installed at a usable version.
    ready: AtomicBool,
    /// One task at a time checks or installs the schema.
    preparing: tokio::sync::Mutex<()>,
}

/// Why one attempt failed, and whether repeating it could charge twice.
struct Failure {
    error: StoreError,
    /// The server answered with an error, so the statement rolled back and a second
    /// attempt is safe; and that error is one a second attempt may not meet.
    may_retry: bool,
}

impl PostgresStore {
    /// A store that connects on first use (and reconnects whenever needed): for a
    /// server that should start even while PostgreSQL is down. Fails only on settings
    /// that can never work. Must be called inside a Tokio runtime.
    pub fn new(config: PostgresStoreConfig) -> Result<Self, PostgresStoreError> {
        check_schema_name(&config.schema)?;
        if !url_scheme_ok(&config.url) {
            return Err(PostgresStoreError::BadUrl(
                "it must start with postgres:// or postgresql://".to_string(),
            ));
        }
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| PostgresStoreError::BadUrl(e.to_string()))?;
        match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer => {}
            _ => {
                return Err(PostgresStoreError::BadUrl(
                    "sslmode asks for TLS, which this build does not include; use sslmode=disable or prefer, or reach PostgreSQL through a TLS-terminating proxy on a trusted network".to_string(),
                ));
            }
        }
        let address = address_of(&pg);
        let timeout_ms = config.timeout.as_millis().max(1);
        // Ours first, so settings in the URL's own `options` win.
        let mut options = format!("-c statement_timeout={timeout_ms} -c synchronous_commit=off");
        if let Some(theirs) = pg.get_options() {
            options.push(' ');
            options.push_str(theirs);
        }
        pg.options(&options);
        if pg.get_application_name().is_none() {
            pg.application_name("sluice");
        }
        pg.connect_timeout(config.timeout);
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.timeout))
            .create_timeout(Some(config.timeout))
            .recycle_timeout(Some(config.timeout))
            .build()
            .map_err(|e| PostgresStoreError::BadUrl(e.to_string()))?;
        Ok(PostgresStore {
            pool,
            statements: Statements::new(&config.schema),
            schema: config.schema,
            prefix: config.prefix,
            address,
            migrate: config.migrate,
            unlogged: config.unlogged,
            ready: AtomicBool::new(false),
            preparing: tokio::sync::Mutex::new(()),
        })
    }

    /// Connects now and makes sure the schema is there: installs or upgrades it when
    /// `migrate` is on, else checks its version.
    pub async fn prepare(&self) -> Result<SchemaStatus, PostgresStoreError> {
        let _guard = self.preparing.lock().await;
        let status = if self.migrate {
            self.run_migration().await?
        } else {
            let found = self.installed_version().await?;
            if found < SCHEMA_VERSION {
                return Err(PostgresStoreError::SchemaMissing {
                    address: self.address.clone(),
                    schema: self.schema.clone(),
                    found,
                });
            }
            if found > SCHEMA_VERSION {
                SchemaStatus::Newer { found }
            } else {
                SchemaStatus::UpToDate
            }
        };
        self.ready.store(true, Ordering::Release);
        Ok(status)
    }

    /// Applies the migration now, whatever `migrate` says (for `sluice migrate`).
    pub async fn migrate(&self) -> Result<SchemaStatus, PostgresStoreError> {
        let _guard = self.preparing.lock().await;
        let status = self.run_migration().await?;
        self.ready.store(true, Ordering::Release);
        Ok(status)
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> PostgresStoreError {
        PostgresStoreError::Unreachable {
            address: self.address.clone(),
            reason: reason.to_string(),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, PostgresStoreError> {
        self.pool.get().await.map_err(|e| self.unreachable(e))
    }

    /// The installed schema version (0: none).
    async fn installed_version(&self) -> Result<i32, PostgresStoreError> {
        let client = self.client().await?;
        let installed: bool = client
            .query_one(&self.statements.installed, &[])
            .await
            .map_err(|e| self.unreachable(describe(&e)))?
            .get(0);
        if !installed {
            return Ok(0);
        }
        client
            .query_one(&self.statements.version, &[])
            .await
            .map(|row| row.get(0))
            .map_err(|e| self.unreachable(describe(&e)))
    }

    async fn run_migration(&self) -> Result<SchemaStatus, PostgresStoreError> {
        let found = self.installed_version().await?;
        if found > SCHEMA_VERSION {
            tracing::warn!(
                schema = %self.schema,
                found,
                ours = SCHEMA_VERSION,
                "the sluice schema was installed by a newer sluice; leaving it as it is"
            );
            return Ok(SchemaStatus::Newer { found });
        }
        let unlogged_now = if found == SCHEMA_VERSION {
            self.counters_unlogged().await?
        } else {
            None
        };
        if found == SCHEMA_VERSION && unlogged_now == Some(self.unlogged) {
            return Ok(SchemaStatus::UpToDate);
        }
        let script = render_schema(&self.schema, self.unlogged)?;
        let mut client = self.client().await?;
        let migration_error = |e: tokio_postgres::Error| PostgresStoreError::Migration {
            address: self.address.clone(),
            schema: self.schema.clone(),
            reason: describe(&e),
        };
        let transaction = client
            .transaction()
            .await
            .map_err(|e| self.unreachable(e))?;
        transaction
            .batch_execute(&format!(
                "SET LOCAL statement_timeout = {MAINTENANCE_TIMEOUT_MS}"
            ))
            .await
            .map_err(migration_error)?;
        transaction
            .batch_execute(&script)
            .await
            .map_err(migration_error)?;
        transaction.commit().await.map_err(migration_error)?;
        if found == SCHEMA_VERSION {
            tracing::info!(schema = %self.schema, unlogged = self.unlogged, "counter table persistence changed");
            Ok(SchemaStatus::UpToDate)
        } else {
            Ok(SchemaStatus::Migrated { from: found })
        }
    }

    /// Whether the counter table is unlogged (None: no table).
    async fn counters_unlogged(&self) -> Result<Option<bool>, PostgresStoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT c.relpersistence = 'u' FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = 'sluice_counters'",
                &[&self.schema],
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Prepares the schema once, before the first call that needs it (and again after
    /// a call found it gone).
    async fn ensure_ready(&self) -> Result<(), StoreError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.prepare().await {
            Ok(_) => Ok(()),
            Err(PostgresStoreError::Unreachable { address, reason }) => Err(
                StoreError::Unavailable(format!("PostgreSQL at {address}: {reason}")),
            ),
            Err(other) => Err(StoreError::Protocol(other.to_string())),
        }
    }

    /// `host:port` of the server (no credentials).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    fn key(&self, counter: &str, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + counter.len() + 1 + key.len());
        k.push_str(&self.prefix);
        k.push_str(counter);
        k.push(':');
        // PostgreSQL text cannot hold a zero byte: such a key would be refused, so it
        // is written as hex behind a \x01 mark (as is any key starting with the mark,
        // so no two keys share a row).
        if key.contains('\0') || key.starts_with('\u{1}') {
            k.push('\u{1}');
            for byte in key.bytes() {
                let _ = write!(k, "{byte:02x}");
            }
        } else {
            k.push_str(key);
        }
        k
    }

    /// One attempt: a connection from the pool, the cached statement, one query.
    async fn attempt_query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, Failure> {
        let client = self.pool.get().await.map_err(|e| self.pool_failure(e))?;
        // Preparing runs nothing: a failure there may always be retried.
        let statement = client.prepare_cached(sql).await.map_err(|e| {
            let mut failure = self.query_failure(&e);
            failure.may_retry = true;
            failure
        })?;
        client
            .query_one(&statement, params)
            .await
            .map_err(|e| self.query_failure(&e))
    }

    /// Runs a statement, once more when the first attempt failed in a way that proves it
    /// did not run and may not fail again. With `repeatable` (nothing is charged), any
    /// failure is retried once.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        repeatable: bool,
    ) -> Result<tokio_postgres::Row, StoreError> {
        self.ensure_ready().await?;
        match self.attempt_query(sql, params).await {
            Ok(row) => Ok(row),
            Err(failure) if failure.may_retry || repeatable => {
                // A missing schema was noted by `query_failure`: prepare it again first.
                self.ensure_ready().await?;
                self.attempt_query(sql, params).await.map_err(|f| f.error)
            }
            Err(failure) => Err(failure.error),
        }
    }

    fn pool_failure(&self, error: PoolError) -> Failure {
        let error = match error {
            PoolError::Timeout(_) => StoreError::Unavailable(format!(
                "PostgreSQL at {}: no connection within the timeout ({error})",
                self.address
            )),
            other => StoreError::Unavailable(format!("PostgreSQL at {}: {other}", self.address)),
        };
        // Nothing was sent, but the pool has just tried: a second try would wait again.
        Failure {
            error,
            may_retry: false,
        }
    }

    fn query_failure(&self, error: &tokio_postgres::Error) -> Failure {
        let Some(code) = error.code() else {
            // No answer (a dropped connection, an I/O error): the statement may have run.
            return Failure {
                error: StoreError::Unavailable(format!(
                    "PostgreSQL at {}: {}",
                    self.address,
                    describe(error)
                )),
                may_retry: false,
            };
        };
        if [
            SqlState::UNDEFINED_FUNCTION,
            SqlState::UNDEFINED_TABLE,
            SqlState::INVALID_SCHEMA_NAME,
        ]
        .contains(code)
        {
            // The schema was dropped under us: prepare it again before the retry.
            self.ready.store(false, Ordering::Release);
        }
        let may_retry = [
            SqlState::UNDEFINED_FUNCTION,
            SqlState::UNDEFINED_TABLE,
            SqlState::INVALID_SCHEMA_NAME,
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
        let message = format!("PostgreSQL at {}: {}", self.address, describe(error));
        Failure {
            error: if unavailable {
                StoreError::Unavailable(message)
            } else {
                StoreError::Protocol(message)
            },
            may_retry,
        }
    }

    async fn decide_inner(&self, request: &DecisionRequest) -> Result<Outcomes, StoreError> {
        let count = request.window_count();
        let mut keys: Vec<String> = Vec::with_capacity(count);
        let mut slots: HashMap<(&str, &str), i64> = HashMap::with_capacity(count);
        let mut args: Vec<i64> = Vec::with_capacity(count * 7);
        let mut charges = false;
        for (check, lw) in request.windows() {
            let slot = *slots.entry((&lw.counter, check.key())).or_insert_with(|| {
                keys.push(self.key(&lw.counter, check.key()));
                keys.len() as i64
            });
            let window = &lw.window;
            let capacity = window.capacity();
            let period = window.rate().period_micros();
            let algorithm = algorithm_code(window.algorithm());
            let interval = period / window.rate().quota() as i64;
            let limit = check.limit();
            let flags = i64::from(limit.charge_denied()) | (i64::from(limit.shadow()) << 1);
            // Capacities are at most 10^9: far inside i64.
            let cost = check.cost().min(capacity + 1) as i64;
            charges |= cost > 0;
            args.extend_from_slice(&[
                slot,
                algorithm,
                capacity as i64,
                period,
                interval,
                cost,
                flags,
            ]);
        }
        // A dry run, or a request of reads only, charges nothing: it may be repeated.
        let read_only = request.dry_run || !charges;
        let row = self
            .query(
                &self.statements.decide,
                &[&keys, &args, &read_only],
                read_only,
            )
            .await?;
        let reply: Vec<i64> = row
            .try_get(0)
            .map_err(|e| StoreError::Protocol(format!("sluice_decide answered: {e}")))?;
        parse_reply(&reply, count)
    }

    async fn refund_inner(
        &self,
        request: &DecisionRequest,
        charged: &[bool],
    ) -> Result<(), StoreError> {
        let mut keys: Vec<String> = Vec::new();
        let mut slots: HashMap<(&str, &str), i64> = HashMap::new();
        let mut args: Vec<i64> = Vec::new();
        for ((check, lw), _) in request
            .windows()
            .zip(charged)
            .filter(|(_, charged)| **charged)
        {
            let slot = *slots.entry((&lw.counter, check.key())).or_insert_with(|| {
                keys.push(self.key(&lw.counter, check.key()));
                keys.len() as i64
            });
            let window = &lw.window;
            let capacity = window.capacity();
            let period = window.rate().period_micros();
            args.extend_from_slice(&[
                slot,
                algorithm_code(window.algorithm()),
                capacity as i64,
                period,
                period / window.rate().quota() as i64,
                // More than the capacity was never charged in one decision.
                check.cost().min(capacity) as i64,
            ]);
        }
        if keys.is_empty() {
            return Ok(());
        }
        // Giving back twice would be as wrong as charging twice: retried only when the
        // first attempt provably did not run.
        self.query(&self.statements.refund, &[&keys, &args], false)
            .await
            .map(|_| ())
    }

    async fn reset_limit_inner(&self, limit: &Limit) -> Result<u64, StoreError> {
        self.ensure_ready().await?;
        let mut removed = 0u64;
        for lw in limit.windows() {
            let from = self.key(&lw.counter, "");
            // Every key of the counter starts with `from`, which ends in ':'; ';' is the
            // next byte, and the key column compares bytes (COLLATE "C").
            let mut to = from.clone();
            to.pop();
            to.push(';');
            let mut client = self
                .pool
                .get()
                .await
                .map_err(|e| self.pool_failure(e).error)?;
            let transaction = client
                .transaction()
                .await
                .map_err(|e| self.query_failure(&e).error)?;
            transaction
                .batch_execute(&format!(
                    "SET LOCAL statement_timeout = {MAINTENANCE_TIMEOUT_MS}"
                ))
                .await
                .map_err(|e| self.query_failure(&e).error)?;
            let row = transaction
                .query_one(&self.statements.reset_range, &[&from, &to])
                .await
                .map_err(|e| self.query_failure(&e).error)?;
            transaction
                .commit()
                .await
                .map_err(|e| self.query_failure(&e).error)?;
            removed += row.get::<_, i64>(0).max(0) as u64;
        }
        Ok(removed)
    }

    /// Deletes expired counters now, batch after batch; returns how many rows went, or
    /// `None` when another instance swept less than `every` ago (`every` zero: sweep
    /// regardless).
    pub async fn sweep(&self, every: Duration) -> Result<Option<u64>, StoreError> {
        self.ensure_ready().await?;
        let mut total = 0u64;
        let mut every_us = every.as_micros() as i64;
        for _ in 0..SWEEP_MAX_BATCHES {
            let mut client = self
                .pool
                .get()
                .await
                .map_err(|e| self.pool_failure(e).error)?;
            let transaction = client
                .transaction()
                .await
                .map_err(|e| self.query_failure(&e).error)?;
            transaction
                .batch_execute(&format!(
                    "SET LOCAL statement_timeout = {MAINTENANCE_TIMEOUT_MS}"
                ))
                .await
                .map_err(|e| self.query_failure(&e).error)?;
            let grace = SWEEP_GRACE.as_micros() as i64;
            let row = transaction
                .query_one(&self.statements.sweep, &[&SWEEP_BATCH, &grace, &every_us])
                .await
                .map_err(|e| self.query_failure(&e).error)?;
            transaction
                .commit()
                .await
                .map_err(|e| self.query_failure(&e).error)?;
            let deleted: i64 = row.get(0);
            if deleted < 0 {
                return Ok(None);
            }
            total += deleted as u64;
            if deleted < i64::from(SWEEP_BATCH) {
                break;
            }
            // This instance won the turn: go on without asking again.
            every_us = 0;
        }
        Ok(Some(total))
    }

    /// Sweeps expired counters every `every` in a background task, until the store is
    /// dropped. Must be called inside a Tokio runtime.
    pub fn start_sweeper(self: &Arc<Self>, every: Duration) {
        let store: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(store) = store.upgrade() else {
                    return;
                };
                match store.sweep(every).await {
                    Ok(Some(deleted)) if deleted > 0 => {
                        tracing::debug!(deleted, "expired counters swept");
                    }
                    Ok(_) => {}
                    // An outage is logged once by the failure policy; this repeats it.
                    Err(error) => tracing::debug!(%error, "sweep failed"),
                }
            }
        });
    }
}

/// The scheme the config promises: a URL, not a key=value string.
fn url_scheme_ok(url: &str) -> bool {
    ["postgres://", "postgresql://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

/// `host:port` of the first host, for messages.
fn address_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// The server's message (with its SQLSTATE) rather than tokio-postgres's "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Turns the function's flat reply into outcomes.
fn parse_reply(reply: &[i64], count: usize) -> Result<Outcomes, StoreError> {
    if reply.len() != count * 4 {
        return Err(StoreError::Protocol(format!(
            "sluice_decide answered {} values for {count} windows",
            reply.len()
        )));
    }
    let windows: WindowOutcomes = reply
        .chunks_exact(4)
        .map(|w| WindowOutcome {
            allowed: w[0] == 1,
            remaining: w[1].max(0) as u64,
            reset_after: w[2].max(0),
            retry_after: (w[3] >= 0).then_some(w[3]),
        })
        .collect();
    Ok(Outcomes {
        windows,
        degraded: false,
    })
}

/// The algorithm as `sluice_decide` and `sluice_refund` number it.
fn algorithm_code(algorithm: Algorithm) -> i64 {
    match algorithm {
        Algorithm::Gcra => 0,
        Algorithm::FixedWindow => 1,
        Algorithm::SlidingWindow => 2,
    }
}

impl Store for PostgresStore {
    fn decide<'a>(&'a self, request: &'a DecisionRequest) -> StoreFuture<'a, Outcomes> {
        Box::pin(self.decide_inner(request))
    }

    fn reset<'a>(&'a self, limit: &'a Limit, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let keys: Vec<String> = limit
                .windows()
                .iter()
                .map(|lw| self.key(&lw.counter, key))
                .collect();
            // Deleting twice is deleting once: safe to repeat.
            self.query(&self.statements.reset, &[&keys], true)
                .await
                .map(|_| ())
        })
    }

    fn reset_limit<'a>(&'a self, limit: &'a Limit) -> StoreFuture<'a, u64> {
        Box::pin(self.reset_limit_inner(limit))
    }

    fn refund<'a>(
        &'a self,
        request: &'a DecisionRequest,
        charged: &'a [bool],
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.refund_inner(request, charged))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.query("SELECT 1", &[], true).await.map(|_| ()) })
    }

    /// `keys` is 0: counting one deployment's rows is a scan of the table.
    /// `SELECT count(*) FROM sluice_counters WHERE key LIKE 'prefix%'` has it.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_lowercase_identifiers() {
        for good in ["public", "sluice", "_s1", "a_b_c"] {
            assert!(check_schema_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(64);
        for bad in ["", "Sluice", "1abc", "a-b", "a\"b", "a b", long.as_str()] {
            assert!(check_schema_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_script_names_the_schema_and_persistence() {
        let logged = migration_sql("rate", false).expect("script");
        assert!(logged.starts_with("-- sluice schema version 2"));
        assert!(logged.contains("CREATE TABLE IF NOT EXISTS \"rate\".sluice_counters"));
        assert!(logged.contains("SET LOGGED"));
        assert!(!logged.contains('@'), "every placeholder is filled");
        let unlogged = migration_sql("rate", true).expect("script");
        assert!(unlogged.contains("CREATE UNLOGGED TABLE IF NOT EXISTS \"rate\".sluice_counters"));
        assert!(migration_sql("Rate", false).is_err());
    }

    #[test]
    fn a_short_reply_is_a_protocol_error() {
        assert!(matches!(
            parse_reply(&[1, 2, 3], 1),
            Err(StoreError::Protocol(_))
        ));
        let ok = parse_reply(&[1, 4, 10, 0, 0, 0, 5, -1], 2).expect("two windows");
        assert_eq!(ok.windows[1].retry_after, None);
        assert!(ok.windows[0].allowed && !ok.windows[1].allowed);
    }

    #[tokio::test]
    async fn urls_that_cannot_work_are_refused_without_echoing_them() {
        for url in [
            "mysql://u:hunter2@h/db",
            "postgres://u:hunter2@h/db?sslmode=require",
            "host=h password=hunter2",
        ] {
            let error = PostgresStore::new(PostgresStoreConfig::new(url))
                .err()
                .unwrap_or_else(|| panic!("{url} refused"));
            let message = error.to_string();
            assert!(message.contains("storage.url"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }
}
