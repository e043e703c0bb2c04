//! The versioned migration: rendering `schema.sql` for a schema, applying it (or only
//! checking it is there), and the statements the store runs against it.
//!
//! `schema.sql` is a versioned, idempotent migration ([`SCHEMA_VERSION`]): a table
//! `sluice_counters (key, a, b, c, expires_at)` (one row per counter, the engine's
//! state in three integers, microseconds and units of cost), the reservation tables
//! `sluice_holds (id, digest, expires_at, settled)` and `sluice_slots (key, hold,
//! expires_at)` (one row per concurrency slot an open reservation holds), the functions
//! `sluice_decide`, `sluice_refund`, `sluice_reserve`, `sluice_settle`, `sluice_move`,
//! `sluice_reset`, `sluice_sweep` and `sluice_month_start` (the bounds of calendar-month
//! windows), and a record of applied versions.
//! [`PostgresStore::prepare`] applies it (or, with `migrate: false`, only checks it is
//! there); [`migration_sql`] is the same script for a DBA. `unlogged: true` makes the
//! three tables `UNLOGGED`: no WAL, faster, and emptied by PostgreSQL after a crash.
//!
//! A new version adds to the one script, which runs whole over a database of any earlier
//! version: tables and indexes `IF NOT EXISTS`, functions `CREATE OR REPLACE` with the
//! signatures they had, so instances of the previous version keep deciding while the
//! others upgrade.

use std::sync::atomic::Ordering;

use sluice_engine::StoreError;

use crate::config::check_schema_name;
use crate::error::describe;
use crate::{MAINTENANCE_TIMEOUT_MS, PostgresStore, PostgresStoreError};

/// The schema version this build installs and expects.
pub const SCHEMA_VERSION: i32 = 5;

/// The migration script, with placeholders for the schema and the table's persistence.
const SCHEMA_SQL: &str = include_str!("schema.sql");

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

/// The statements the store runs, with the schema filled in.
pub(crate) struct Statements {
    pub(crate) decide: String,
    /// Decides several requests in one transaction (the batcher's).
    pub(crate) decide_batch: String,
    pub(crate) reset: String,
    pub(crate) reset_range: String,
    pub(crate) sweep: String,
    /// Gives back what a decision charged.
    pub(crate) refund: String,
    /// Decides and, when allowed, records a hold and its concurrency slots.
    pub(crate) reserve: String,
    /// Settles a hold, or books work already done.
    pub(crate) settle: String,
    /// The runtime records of one prefix, and their version (`$1`: the prefix).
    pub(crate) records: String,
    /// The records' version alone.
    pub(crate) records_version: String,
    /// Writes a record (`$1` prefixed id, `$2` body, `$3` prefix); answers the version.
    pub(crate) put_record: String,
    /// Removes a record (`$1` prefixed id, `$2` prefix); answers how many went.
    pub(crate) remove_record: String,
    /// Whether the version table and the decision function exist.
    installed: String,
    version: String,
}

impl Statements {
    pub(crate) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        Statements {
            decide: format!("SELECT {s}.sluice_decide($1::text[], $2::bigint[], $3::boolean)"),
            decide_batch: format!(
                "SELECT {s}.sluice_decide_batch($1::text[], $2::bigint[], $3::integer[])"
            ),
            reset: format!("SELECT {s}.sluice_reset($1::text[])"),
            refund: format!("SELECT {s}.sluice_refund($1::text[], $2::bigint[])"),
            reserve: format!(
                "SELECT {s}.sluice_reserve($1::text[], $2::bigint[], $3::boolean, $4::text, $5::text, $6::bigint)"
            ),
            settle: format!(
                "SELECT {s}.sluice_settle($1::text[], $2::bigint[], $3::text[], $4::text, $5::text)"
            ),
            // A concurrency window's slots go too (its reservations stay open, holding
            // none); one with live slots counts as one counter, as in sluice_reset.
            reset_range: format!(
                "WITH now_us AS (SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint AS t), \
                 gone AS (DELETE FROM {s}.sluice_counters AS t \
                 WHERE t.key >= $1::text COLLATE \"C\" AND t.key < $2::text COLLATE \"C\" \
                 RETURNING t.expires_at), \
                 freed AS (DELETE FROM {s}.sluice_slots AS t \
                 WHERE t.key >= $1::text COLLATE \"C\" AND t.key < $2::text COLLATE \"C\" \
                 RETURNING t.key, t.expires_at) \
                 SELECT (SELECT count(*) FROM gone, now_us WHERE gone.expires_at > now_us.t) \
                 + (SELECT count(DISTINCT freed.key) FROM freed, now_us WHERE freed.expires_at > now_us.t)"
            ),
            sweep: format!("SELECT {s}.sluice_sweep($1::integer, $2::bigint, $3::bigint)"),
            // One statement (one snapshot) reads the version and the rows together.
            records: format!(
                "SELECT coalesce((SELECT v.version FROM {s}.sluice_records_version AS v WHERE v.prefix = $1::text), 0), \
                 array(SELECT substr(r.id, length($1::text) + 1) FROM {s}.sluice_records AS r \
                 WHERE starts_with(r.id, $1::text) ORDER BY r.id), \
                 array(SELECT r.body FROM {s}.sluice_records AS r \
                 WHERE starts_with(r.id, $1::text) ORDER BY r.id)"
            ),
            records_version: format!(
                "SELECT coalesce((SELECT v.version FROM {s}.sluice_records_version AS v WHERE v.prefix = $1::text), 0)"
            ),
            put_record: format!(
                "WITH written AS (INSERT INTO {s}.sluice_records AS r (id, body) VALUES ($1::text, $2::text) \
                 ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body) \
                 INSERT INTO {s}.sluice_records_version AS v (prefix, version) VALUES ($3::text, 1) \
                 ON CONFLICT (prefix) DO UPDATE SET version = v.version + 1 RETURNING v.version"
            ),
            remove_record: format!(
                "WITH gone AS (DELETE FROM {s}.sluice_records AS r WHERE r.id = $1::text RETURNING 1), \
                 moved AS (INSERT INTO {s}.sluice_records_version AS v (prefix, version) \
                 SELECT $2::text, 1 WHERE EXISTS (SELECT 1 FROM gone) \
                 ON CONFLICT (prefix) DO UPDATE SET version = v.version + 1 RETURNING 1) \
                 SELECT (SELECT count(*) FROM gone) + 0 * (SELECT count(*) FROM moved)"
            ),
            installed: format!(
                "SELECT to_regclass('{s}.sluice_migrations') IS NOT NULL \
                 AND to_regprocedure('{s}.sluice_decide(text[], bigint[], boolean)') IS NOT NULL"
            ),
            version: format!("SELECT coalesce(max(version), 0) FROM {s}.sluice_migrations"),
        }
    }
}

impl PostgresStore {
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

    /// Prepares the schema once, before the first call that needs it (and again after
    /// a call found it gone).
    pub(crate) async fn ensure_ready(&self) -> Result<(), StoreError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_the_schema_and_persistence() {
        let logged = migration_sql("rate", false).expect("script");
        assert!(logged.starts_with(&format!("-- sluice schema version {SCHEMA_VERSION};")));
        assert!(logged.contains("CREATE TABLE IF NOT EXISTS \"rate\".sluice_slots"));
        assert!(logged.contains("CREATE OR REPLACE FUNCTION \"rate\".sluice_month_start"));
        assert!(logged.contains("CREATE TABLE IF NOT EXISTS \"rate\".sluice_counters"));
        assert!(logged.contains("SET LOGGED"));
        assert!(!logged.contains('@'), "every placeholder is filled");
        let unlogged = migration_sql("rate", true).expect("script");
        assert!(unlogged.contains("CREATE UNLOGGED TABLE IF NOT EXISTS \"rate\".sluice_counters"));
        assert!(unlogged.contains("CREATE UNLOGGED TABLE IF NOT EXISTS \"rate\".sluice_holds"));
        assert!(migration_sql("Rate", false).is_err());
    }
}
