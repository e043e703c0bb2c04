//! The store itself: [`PostgresStore`], its connections, and the [`Store`] calls
//! (decide, refund, reset, ping) as statements.
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
//! # Connections
//! A deadpool pool of `pool_size` connections, created on first use, recycled after a
//! check that the connection is still open (no extra round trip). What a session is set
//! up with is in [`crate::config`]; which failures are tried again, in [`crate::error`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use sluice_engine::{
    Algorithm, DecisionRequest, Limit, Outcomes, Rate, Store, StoreError, StoreFuture, StoreStats,
    WindowOutcome, WindowOutcomes,
};
use tokio_postgres::NoTls;

use crate::config::address_of;
use crate::error::{Failure, pool_failure, query_failure};
use crate::schema::Statements;
use crate::{MAINTENANCE_TIMEOUT_MS, PostgresStoreConfig, PostgresStoreError};

/// A [`Store`] on one PostgreSQL database. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    pub(crate) pool: Pool,
    pub(crate) statements: Statements,
    pub(crate) schema: String,
    prefix: String,
    pub(crate) address: String,
    pub(crate) migrate: bool,
    pub(crate) unlogged: bool,
    /// The schema is known to be installed at a usable version.
    pub(crate) ready: AtomicBool,
    /// One task at a time checks or installs the schema.
    pub(crate) preparing: tokio::sync::Mutex<()>,
}

impl PostgresStore {
    /// A store that connects on first use (and reconnects whenever needed): for a
    /// server that should start even while PostgreSQL is down. Fails only on settings
    /// that can never work. Must be called inside a Tokio runtime.
    pub fn new(config: PostgresStoreConfig) -> Result<Self, PostgresStoreError> {
        let pg = config.session()?;
        let address = address_of(&pg);
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

    /// Runs one maintenance statement (a sweep batch, a limit's reset) in its own
    /// transaction, allowed the maintenance timeout rather than a decision's. Tried
    /// once: a failure goes to the caller.
    pub(crate) async fn maintenance_query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, StoreError> {
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
            .query_one(sql, params)
            .await
            .map_err(|e| self.query_failure(&e).error)?;
        transaction
            .commit()
            .await
            .map_err(|e| self.query_failure(&e).error)?;
        Ok(row)
    }

    fn pool_failure(&self, error: PoolError) -> Failure {
        pool_failure(&self.address, error)
    }

    /// Classifies a failed statement, and notes a dropped schema so that the next call
    /// prepares it again.
    fn query_failure(&self, error: &tokio_postgres::Error) -> Failure {
        let failure = query_failure(&self.address, error);
        if failure.schema_gone {
            self.ready.store(false, Ordering::Release);
        }
        failure
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
            let period = function_period(window.rate());
            let algorithm = algorithm_code(window.algorithm());
            let interval = window.rate().period_micros() / window.rate().quota() as i64;
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
            let period = function_period(window.rate());
            args.extend_from_slice(&[
                slot,
                algorithm_code(window.algorithm()),
                capacity as i64,
                period,
                window.rate().period_micros() / window.rate().quota() as i64,
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
            let row = self
                .maintenance_query(&self.statements.reset_range, &[&from, &to])
                .await?;
            removed += row.get::<_, i64>(0).max(0) as u64;
        }
        Ok(removed)
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

/// The period sent for a calendar-month window (`N/month`): the functions find the
/// month's bounds on the database's clock (`sluice_month_start`, schema version 3).
const CALENDAR_MONTH: i64 = -1;

/// The period `sluice_decide` and `sluice_refund` take: microseconds, or [`CALENDAR_MONTH`].
fn function_period(rate: Rate) -> i64 {
    if rate.is_calendar_month() {
        CALENDAR_MONTH
    } else {
        rate.period_micros()
    }
}

/// The algorithm as `sluice_decide` and `sluice_refund` number it.
fn algorithm_code(algorithm: Algorithm) -> i64 {
    match algorithm {
        Algorithm::Gcra => 0,
        Algorithm::FixedWindow => 1,
        Algorithm::SlidingWindow => 2,
        Algorithm::Concurrency => 3,
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
    fn a_short_reply_is_a_protocol_error() {
        assert!(matches!(
            parse_reply(&[1, 2, 3], 1),
            Err(StoreError::Protocol(_))
        ));
        let ok = parse_reply(&[1, 4, 10, 0, 0, 0, 5, -1], 2).expect("two windows");
        assert_eq!(ok.windows[1].retry_after, None);
        assert!(ok.windows[0].allowed && !ok.windows[1].allowed);
    }
}
