//! The store itself: [`PostgresStore`], its connections, and the [`Store`] calls
//! (decide, refund, reserve, settle, reset, ping) as statements.
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
//! # Concurrent decisions share a call
//! Under load, charging decisions that arrive while a call is in flight queue and
//! go together as one `sluice_decide_batch` statement ([`crate::batch`]): one
//! transaction takes the locks of every counter of the batch in ascending order, then
//! decides each request in arrival order exactly as `sluice_decide` would alone. Still
//! one round trip per decision (its batch's), exact across instances, and fewer
//! transactions, which are what bounded PostgreSQL's rate.
//!
//! # One round trip per reservation and per settlement
//! A reservation is one call of `sluice_reserve`, the same function with a hold:
//! `sluice_decide` is `sluice_reserve` without one. When the decision is allowed it
//! records the hold (`sluice_holds`, expiring `ttl` after the database's clock) and
//! one row in `sluice_slots` per concurrency window it charged; a concurrency window's
//! state is counted from its key's live slots under the key's advisory lock, so
//! concurrent reservations of one key never hold more slots than it has. A settlement
//! is one call of `sluice_settle`: it locks the hold's row, answers `Unknown` or
//! `AlreadySettled` without changing anything, or marks it settled, deletes its slots
//! and moves every charged window by `actual - estimate` (a refund, or a forced charge
//! into debt) under the counters' advisory locks. Neither is ever sent twice when it
//! may have run.
//!
//! # Connections
//! A deadpool pool of `pool_size` connections, created on first use, recycled after a
//! check that the connection is still open (no extra round trip). What a session is set
//! up with is in [`crate::config`]; which failures are tried again, in [`crate::error`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use sluice_engine::{
    Algorithm, DecisionRequest, Hold, Limit, Micros, Outcomes, Rate, Record, Records, SettleStatus,
    Settlement, Store, StoreError, StoreFuture, StoreStats, Window, WindowOutcome, WindowOutcomes,
};
use sluice_store_batch::Batcher;
use tokio_postgres::NoTls;

use crate::batch::{Call, LIMITS, PgBatch};
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
    /// The schema is known to be installed at a usable version (shared with the
    /// batcher, whose batches run on tasks of their own).
    pub(crate) ready: Arc<AtomicBool>,
    /// Concurrent charging decisions share statements.
    batcher: Arc<Batcher<PgBatch>>,
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
        let statements = Statements::new(&config.schema);
        let ready = Arc::new(AtomicBool::new(false));
        let batcher = Arc::new(Batcher::new(
            PgBatch::new(
                pool.clone(),
                statements.decide_batch.clone(),
                address.clone(),
                Arc::clone(&ready),
            ),
            LIMITS,
        ));
        Ok(PostgresStore {
            pool,
            statements,
            schema: config.schema,
            prefix: config.prefix,
            address,
            migrate: config.migrate,
            unlogged: config.unlogged,
            ready,
            batcher,
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
        push_text(&mut k, key);
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

    /// The arguments of `sluice_decide` and `sluice_reserve` for `request`: its distinct
    /// counters, seven integers per window, and whether any window costs something.
    fn decision_args(&self, request: &DecisionRequest) -> (Vec<String>, Vec<i64>, bool) {
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
            let limit = check.limit();
            let flags = i64::from(limit.charge_denied()) | (i64::from(limit.shadow()) << 1);
            // Capacities are at most 10^9: far inside i64.
            let cost = check.cost().min(window.capacity() + 1) as i64;
            charges |= cost > 0;
            args.push(slot);
            args.extend_from_slice(&window_args(window));
            args.extend_from_slice(&[cost, flags]);
        }
        (keys, args, charges)
    }

    async fn decide_inner(&self, request: &DecisionRequest) -> Result<Outcomes, StoreError> {
        let (keys, args, charges) = self.decision_args(request);
        // A dry run, or a request of reads only, charges nothing: it may be repeated,
        // and takes no lock, so it gains nothing from a batch.
        let read_only = request.dry_run || !charges;
        if read_only {
            let row = self
                .query(&self.statements.decide, &[&keys, &args, &true], true)
                .await?;
            return outcomes_of(&row, "sluice_decide", request.window_count());
        }
        // Installed before queueing: a batch runs on a task without the store.
        self.ensure_ready().await?;
        let reply = self
            .batcher
            .submit(Call { keys, args }, |call| async move {
                self.decide_one(&call).await
            })
            .await?;
        parse_reply(&reply, request.window_count())
    }

    /// One charging decision alone, as one `sluice_decide` statement (the batcher's
    /// path when few calls are in flight).
    pub(crate) async fn decide_one(&self, call: &Call) -> Result<Vec<i64>, StoreError> {
        let row = self
            .query(
                &self.statements.decide,
                &[&call.keys, &call.args, &false],
                false,
            )
            .await?;
        row.try_get(0)
            .map_err(|e| StoreError::Protocol(format!("sluice_decide answered: {e}")))
    }

    async fn reserve_inner(
        &self,
        request: &DecisionRequest,
        hold: &Hold,
    ) -> Result<Outcomes, StoreError> {
        let Some(id) = hold_id(&hold.id.id) else {
            // Not an id any settlement could name: decided without holding anything,
            // as the memory store does.
            return self.decide_inner(request).await;
        };
        let mut digest = String::with_capacity(hold.id.digest.len());
        push_text(&mut digest, &hold.id.digest);
        let ttl: i64 = hold.ttl.clamp(1, MAX_HOLD_TTL);
        let (keys, args, _) = self.decision_args(request);
        // Even a reservation of costs 0 records its hold (it may be settled for more), so
        // only a dry run writes nothing; only a dry run may be repeated.
        let read_only = request.dry_run;
        let row = self
            .query(
                &self.statements.reserve,
                &[&keys, &args, &read_only, &id, &digest, &ttl],
                read_only,
            )
            .await?;
        outcomes_of(&row, "sluice_reserve", request.window_count())
    }

    async fn settle_inner(&self, settlement: &Settlement) -> Result<SettleStatus, StoreError> {
        if !settlement.is_well_formed() {
            return Ok(SettleStatus::Unknown);
        }
        let hold = match &settlement.hold {
            None => None,
            Some(hold) => {
                let Some(id) = hold_id(&hold.id) else {
                    return Ok(SettleStatus::Unknown);
                };
                let mut digest = String::with_capacity(hold.digest.len());
                push_text(&mut digest, &hold.digest);
                Some((id, digest))
            }
        };
        let request = &settlement.request;
        let mut keys: Vec<String> = Vec::new();
        let mut slots: HashMap<(&str, &str), i64> = HashMap::new();
        let mut args: Vec<i64> = Vec::new();
        // The concurrency windows whose slot the hold gives back: every one of the
        // request, charged or not (a slot is only ever the hold's own).
        let mut slot_keys: Vec<String> = Vec::new();
        // One flag per window, in `DecisionRequest::windows` order (checked above).
        let mut charged = settlement.windows.iter();
        let windows = request
            .checks
            .iter()
            .enumerate()
            .flat_map(|(index, check)| {
                check
                    .limit()
                    .windows()
                    .iter()
                    .map(move |lw| (index, check, lw))
            });
        for (index, check, lw) in windows {
            let moved = charged.next().copied().unwrap_or(false);
            let window = &lw.window;
            if window.algorithm() == Algorithm::Concurrency {
                let key = self.key(&lw.counter, check.key());
                if hold.is_some() && !slot_keys.contains(&key) {
                    slot_keys.push(key);
                }
                continue;
            }
            // Clamped so that the function's sums stay inside bigint; far beyond any
            // capacity (at most 10^9), so it decides the same.
            let delta = settlement.delta(index).clamp(-MAX_DELTA, MAX_DELTA) as i64;
            if !moved || delta == 0 {
                continue;
            }
            let slot = *slots.entry((&lw.counter, check.key())).or_insert_with(|| {
                keys.push(self.key(&lw.counter, check.key()));
                keys.len() as i64
            });
            args.push(slot);
            args.extend_from_slice(&window_args(window));
            args.push(delta);
        }
        if hold.is_none() && keys.is_empty() {
            // Work already done that moves nothing: booked, with nothing to write.
            return Ok(SettleStatus::Settled);
        }
        let (id, digest) = match &hold {
            Some((id, digest)) => (Some(id.as_str()), Some(digest.as_str())),
            None => (None, None),
        };
        // Never repeated when it may have run: without a hold it would book twice, and
        // with one the second answer would be "already settled" for a settlement that
        // has just been applied.
        let row = self
            .query(
                &self.statements.settle,
                &[&keys, &args, &slot_keys, &id, &digest],
                false,
            )
            .await?;
        let status: i32 = row
            .try_get(0)
            .map_err(|e| StoreError::Protocol(format!("sluice_settle answered: {e}")))?;
        settle_status(status)
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
            args.push(slot);
            args.extend_from_slice(&window_args(window));
            // More than the capacity was never charged in one decision.
            args.push(check.cost().min(window.capacity()) as i64);
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

/// The longest a hold is kept, so that `now + ttl` stays inside bigint: about 36,000
/// years, in practice for ever.
const MAX_HOLD_TTL: Micros = 1 << 60;

/// The largest change a settlement passes for one window: 2^62, far beyond any
/// capacity, and small enough that `sluice_settle` computes with it in bigint.
const MAX_DELTA: i128 = 1 << 62;

/// Appends `text` as PostgreSQL text can hold it. Text cannot hold a zero byte, so a
/// string containing one is written as hex behind a \x01 mark (as is any string that
/// starts with the mark, so no two strings are written alike).
fn push_text(out: &mut String, text: &str) {
    if text.contains('\0') || text.starts_with('\u{1}') {
        out.push('\u{1}');
        for byte in text.bytes() {
            let _ = write!(out, "{byte:02x}");
        }
    } else {
        out.push_str(text);
    }
}

/// A reservation id as the store records it: 32 hex digits, in lower case (ids that
/// differ only in case name the same reservation, as in the memory store), or `None`
/// for anything else.
fn hold_id(id: &str) -> Option<String> {
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// What `sluice_settle` answered.
fn settle_status(code: i32) -> Result<SettleStatus, StoreError> {
    match code {
        0 => Ok(SettleStatus::Settled),
        1 => Ok(SettleStatus::AlreadySettled),
        2 => Ok(SettleStatus::Unknown),
        other => Err(StoreError::Protocol(format!(
            "sluice_settle answered {other}, not a settlement status"
        ))),
    }
}

/// The outcomes `function` (`sluice_decide`, `sluice_reserve`) answered in `row`.
fn outcomes_of(
    row: &tokio_postgres::Row,
    function: &str,
    count: usize,
) -> Result<Outcomes, StoreError> {
    let reply: Vec<i64> = row
        .try_get(0)
        .map_err(|e| StoreError::Protocol(format!("{function} answered: {e}")))?;
    parse_reply(&reply, count)
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

/// The period every function taking windows (`sluice_decide`, `sluice_reserve`,
/// `sluice_refund`, `sluice_settle`) is sent: microseconds, or [`CALENDAR_MONTH`].
fn function_period(rate: Rate) -> i64 {
    if rate.is_calendar_month() {
        CALENDAR_MONTH
    } else {
        rate.period_micros()
    }
}

/// A window as every function taking windows is told of it, after its slot: algorithm,
/// capacity (at most 10^9: far inside i64), period ([`function_period`]) and gcra
/// interval (µs).
fn window_args(window: &Window) -> [i64; 4] {
    let rate = window.rate();
    [
        algorithm_code(window.algorithm()),
        window.capacity() as i64,
        function_period(rate),
        rate.period_micros() / rate.quota() as i64,
    ]
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

    fn reserve<'a>(
        &'a self,
        request: &'a DecisionRequest,
        hold: &'a Hold,
    ) -> StoreFuture<'a, Outcomes> {
        Box::pin(self.reserve_inner(request, hold))
    }

    fn settle<'a>(&'a self, settlement: &'a Settlement) -> StoreFuture<'a, SettleStatus> {
        Box::pin(self.settle_inner(settlement))
    }

    fn records(&self) -> StoreFuture<'_, Records> {
        Box::pin(async move {
            let row = self
                .query(&self.statements.records, &[&self.prefix], true)
                .await?;
            let version: i64 = column(&row, 0)?;
            let ids: Vec<String> = column(&row, 1)?;
            let bodies: Vec<String> = column(&row, 2)?;
            Ok(Records {
                version: version as u64,
                records: ids
                    .into_iter()
                    .zip(bodies)
                    .map(|(id, body)| Record { id, body })
                    .collect(),
            })
        })
    }

    fn records_version(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let row = self
                .query(&self.statements.records_version, &[&self.prefix], true)
                .await?;
            Ok(column::<i64>(&row, 0)? as u64)
        })
    }

    // Repeating a write is harmless (the same record again, the version moved again).
    fn put_record<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let id = format!("{}{}", self.prefix, record.id);
            let row = self
                .query(
                    &self.statements.put_record,
                    &[&id, &record.body, &self.prefix],
                    true,
                )
                .await?;
            Ok(column::<i64>(&row, 0)? as u64)
        })
    }

    fn remove_record<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let id = format!("{}{id}", self.prefix);
            let row = self
                .query(&self.statements.remove_record, &[&id, &self.prefix], true)
                .await?;
            Ok(column::<i64>(&row, 0)? > 0)
        })
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

/// Column `index` of `row`, or a protocol error when it is not a `T` (a schema this
/// build does not know).
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|e| StoreError::Protocol(format!("unexpected column {index}: {e}")))
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

    #[test]
    fn hold_ids_are_32_hex_digits_in_lower_case() {
        let upper = "0123456789ABCDEF0123456789abcdef";
        assert_eq!(
            hold_id(upper).as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(hold_id("0123"), None);
        assert_eq!(hold_id("0123456789abcdef0123456789abcdeg"), None);
        assert!(matches!(settle_status(3), Err(StoreError::Protocol(_))));
    }

    #[test]
    fn text_with_a_zero_byte_is_written_as_hex() {
        let mut plain = String::new();
        push_text(&mut plain, "abc");
        assert_eq!(plain, "abc");
        let mut zero = String::new();
        push_text(&mut zero, "a\0");
        assert_eq!(zero, "\u{1}6100");
        let mut marked = String::new();
        push_text(&mut marked, "\u{1}");
        assert_eq!(
            marked, "\u{1}01",
            "a string that starts with the mark is escaped too"
        );
    }
}
