//! The Redis counter store: counters shared by every sluice instance that points at
//! one Redis.
//!
//! # One round trip per decision
//! A decision, whatever its number of checks and windows, is one `EVALSHA` of one Lua
//! script (`decide.lua`, loaded once per connection by [`redis::Script`], which loads it
//! again by itself when the server answers `NOSCRIPT`, e.g. after a restart). The
//! script reads the time from the Redis server (`TIME`), so instances with skewed
//! clocks agree, and runs the engine's arithmetic (`crates/engine/src/algorithm.rs`) and
//! its two-pass atomic rule (`sluice_engine::apply`): two checks on one counter see
//! each other, and a denied decision charges only `charge_denied` windows whose cost
//! could fit. Redis runs a script alone, so concurrent decisions never interleave.
//!
//! # Keys and state
//! A counter lives at `{prefix}{counter}:{key}` (`counter` is
//! [`LimitWindow::counter`](sluice_engine::LimitWindow), e.g. `sluice:chat:g60:user:42`)
//! as a short string: gcra `"tat"`, fixed window `"start:count"`, sliding window
//! `"start:count:previous"` (microseconds and units of cost). Every write sets an
//! absolute expiry (`PXAT`) at the moment the state becomes indistinguishable from no
//! state (the engine's `expires_at`, rounded up to the millisecond), so a flood of
//! one-off keys leaves nothing behind once its windows have passed.
//!
//! # Numbers
//! Lua numbers are doubles: times (about 2^50 µs today) and counts stay exact below
//! 2^53, and the two products that can exceed it (a sliding window's weighted count and
//! its retry time, quota × period) are computed exactly by long multiplication. Costs
//! are capped at a window's capacity + 1 before they are sent, which decides the same.
//!
//! # Refunds
//! `refund` runs a second small script (`refund.lua`, the engine's `Window::refund`) on
//! the charged windows: one round trip, never repeated.
//!
//! # Connection
//! One multiplexed [`ConnectionManager`] serves every decision; it reconnects by
//! itself. After a killed connection the first command fails and the next succeeds, so
//! a decision that fails on a dropped connection is retried once. `timeout` bounds
//! every command and every connection attempt.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sluice_engine::{
    Algorithm, DecisionRequest, Limit, Outcomes, Store, StoreError, StoreFuture, StoreStats,
    WindowOutcome, WindowOutcomes,
};

/// The decision script; see the module doc.
const DECIDE_LUA: &str = include_str!("decide.lua");

/// The refund script: gives back what a decision charged (`Store::refund`).
const REFUND_LUA: &str = include_str!("refund.lua");

/// How many keys one `SCAN` step asks for and one `UNLINK` removes.
const SCAN_BATCH: usize = 500;

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` where TLS is built in).
    pub url: String,
    /// Prepended to every key, so deployments can share one Redis. Default `sluice:`.
    pub prefix: String,
    /// How long one command (or one connection attempt) may take. Default 200 ms.
    pub timeout: Duration,
}

impl RedisStoreConfig {
    /// Settings with the default prefix and timeout.
    pub fn new(url: impl Into<String>) -> Self {
        RedisStoreConfig {
            url: url.into(),
            prefix: "sluice:".to_string(),
            timeout: Duration::from_millis(200),
        }
    }
}

/// Why a [`RedisStore`] could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// The URL is not a Redis URL.
    #[error("storage.url {url:?} is not a Redis URL ({source}); write it as redis://host:6379")]
    BadUrl {
        /// The URL as given (passwords included: do not log it).
        url: String,
        /// What the client said.
        source: redis::RedisError,
    },
    /// Redis did not answer.
    #[error("cannot reach Redis at {address}: {source}")]
    Unreachable {
        /// host:port, without credentials.
        address: String,
        /// What the client said.
        source: redis::RedisError,
    },
}

/// A [`Store`] on one Redis server. Cheap to share behind an `Arc`.
pub struct RedisStore {
    connection: ConnectionManager,
    script: redis::Script,
    refund_script: redis::Script,
    prefix: String,
    address: String,
}

impl RedisStore {
    /// Connects now and fails when Redis does not answer.
    pub async fn connect(config: RedisStoreConfig) -> Result<Self, RedisStoreError> {
        let store = Self::lazy(config)?;
        let mut connection = store.connection.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(|source| RedisStoreError::Unreachable {
                address: store.address.clone(),
                source,
            })?;
        Ok(store)
    }

    /// A store that connects on first use (and reconnects whenever needed): for a
    /// server that should start even while Redis is down. Must be called inside a
    /// Tokio runtime.
    pub fn lazy(config: RedisStoreConfig) -> Result<Self, RedisStoreError> {
        let client =
            redis::Client::open(config.url.as_str()).map_err(|source| RedisStoreError::BadUrl {
                url: config.url.clone(),
                source,
            })?;
        let address = client.get_connection_info().addr().to_string();
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(config.timeout))
            // Reconnect attempts stay short so a decision never waits long on a dead server.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let connection =
            ConnectionManager::new_lazy_with_config(client, manager).map_err(|source| {
                RedisStoreError::Unreachable {
                    address: address.clone(),
                    source,
                }
            })?;
        Ok(RedisStore {
            connection,
            script: redis::Script::new(DECIDE_LUA),
            refund_script: redis::Script::new(REFUND_LUA),
            prefix: config.prefix,
            address,
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

    fn key(&self, counter: &str, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + counter.len() + 1 + key.len());
        k.push_str(&self.prefix);
        k.push_str(counter);
        k.push(':');
        k.push_str(key);
        k
    }

    /// Runs `op` on the shared connection, once more if the first attempt found the
    /// connection dropped (the manager reconnects in between). Only for calls that are
    /// safe to repeat: see [`RedisStore::once`].
    async fn with_retry<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.attempt(op, true).await
    }

    /// Runs `op` once. A call that charges must not be repeated: when the connection
    /// drops or times out, the script may already have run, and a second run would
    /// charge twice. The failure goes to the `on_error` policy instead, and the next
    /// decision finds the reconnected connection.
    async fn once<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.attempt(op, false).await
    }

    async fn attempt<T, F, Fut>(&self, op: F, may_retry: bool) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match op(self.connection.clone()).await {
            Ok(value) => Ok(value),
            Err(error) if may_retry && retryable(&error) => op(self.connection.clone())
                .await
                .map_err(|e| store_error(&self.address, e)),
            Err(error) => Err(store_error(&self.address, error)),
        }
    }

    async fn decide_inner(&self, request: &DecisionRequest) -> Result<Outcomes, StoreError> {
        let count = request.window_count();
        let mut invocation = self.script.prepare_invoke();
        let mut slots: HashMap<(&str, &str), usize> = HashMap::with_capacity(count);
        invocation.arg(if request.dry_run { "1" } else { "0" });
        invocation.arg(count);
        for (check, lw) in request.windows() {
            let next = slots.len() + 1;
            let slot = *slots.entry((&lw.counter, check.key())).or_insert_with(|| {
                invocation.key(self.key(&lw.counter, check.key()));
                next
            });
            let window = &lw.window;
            let capacity = window.capacity();
            let period = window.rate().period_micros();
            let algorithm = match window.algorithm() {
                Algorithm::Gcra => "g",
                Algorithm::FixedWindow => "f",
                Algorithm::SlidingWindow => "s",
            };
            let interval = period / window.rate().quota() as i64;
            let limit = check.limit();
            let flags = u8::from(limit.charge_denied()) | (u8::from(limit.shadow()) << 1);
            invocation
                .arg(slot)
                .arg(algorithm)
                .arg(capacity)
                .arg(period)
                .arg(interval)
                .arg(check.cost().min(capacity + 1))
                .arg(flags);
        }
        let run = |mut connection: ConnectionManager| {
            let invocation = &invocation;
            async move { invocation.invoke_async(&mut connection).await }
        };
        // A dry run charges nothing, so it may be repeated; a real decision may not.
        let reply: Vec<i64> = if request.dry_run {
            self.with_retry(run).await?
        } else {
            self.once(run).await?
        };
        parse_reply(&reply, count)
    }

    async fn refund_inner(
        &self,
        request: &DecisionRequest,
        charged: &[bool],
    ) -> Result<(), StoreError> {
        let mut invocation = self.refund_script.prepare_invoke();
        let mut slots: HashMap<(&str, &str), usize> = HashMap::new();
        let windows: Vec<_> = request
            .windows()
            .zip(charged)
            .filter(|(_, charged)| **charged)
            .map(|(window, _)| window)
            .collect();
        if windows.is_empty() {
            return Ok(());
        }
        invocation.arg(windows.len());
        for (check, lw) in windows {
            let next = slots.len() + 1;
            let slot = *slots.entry((&lw.counter, check.key())).or_insert_with(|| {
                invocation.key(self.key(&lw.counter, check.key()));
                next
            });
            let window = &lw.window;
            let capacity = window.capacity();
            let period = window.rate().period_micros();
            let algorithm = match window.algorithm() {
                Algorithm::Gcra => "g",
                Algorithm::FixedWindow => "f",
                Algorithm::SlidingWindow => "s",
            };
            invocation
                .arg(slot)
                .arg(algorithm)
                .arg(capacity)
                .arg(period)
                .arg(period / window.rate().quota() as i64)
                // More than the capacity was never charged in one decision.
                .arg(check.cost().min(capacity));
        }
        // Giving back twice would be as wrong as charging twice: never repeated.
        let _: i64 = self
            .once(|mut connection| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        Ok(())
    }

    async fn unlink(&self, keys: Vec<String>) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.with_retry(|mut connection| {
            let keys = &keys;
            async move {
                redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async(&mut connection)
                    .await
            }
        })
        .await
    }

    async fn reset_limit_inner(&self, limit: &Limit) -> Result<u64, StoreError> {
        let mut removed = 0;
        for lw in limit.windows() {
            let pattern = format!(
                "{}:*",
                glob_escape(&self.key(&lw.counter, "")).trim_end_matches(':')
            );
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .with_retry(|mut connection| {
                        let pattern = &pattern;
                        async move {
                            redis::cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg(pattern)
                                .arg("COUNT")
                                .arg(SCAN_BATCH)
                                .query_async(&mut connection)
                                .await
                        }
                    })
                    .await?;
                removed += self.unlink(keys).await?;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(removed)
    }
}

/// Turns the script's flat reply into outcomes.
fn parse_reply(reply: &[i64], count: usize) -> Result<Outcomes, StoreError> {
    if reply.len() != count * 4 {
        return Err(StoreError::Protocol(format!(
            "the decision script answered {} values for {count} windows",
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

/// Escapes Redis glob characters so a prefix or counter matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A dropped connection is worth one more attempt: the manager has reconnected by then.
fn retryable(error: &redis::RedisError) -> bool {
    error.is_connection_dropped() || error.is_io_error()
}

fn store_error(address: &str, error: redis::RedisError) -> StoreError {
    if error.is_timeout() {
        StoreError::Unavailable(format!("Redis at {address} timed out: {error}"))
    } else if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal()
    {
        StoreError::Unavailable(format!("Redis at {address}: {error}"))
    } else {
        StoreError::Protocol(format!("Redis at {address}: {error}"))
    }
}

impl Store for RedisStore {
    fn decide<'a>(&'a self, request: &'a DecisionRequest) -> StoreFuture<'a, Outcomes> {
        Box::pin(self.decide_inner(request))
    }

    fn reset<'a>(&'a self, limit: &'a Limit, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let keys = limit
                .windows()
                .iter()
                .map(|lw| self.key(&lw.counter, key))
                .collect();
            self.unlink(keys).await.map(|_| ())
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
        Box::pin(async move {
            self.with_retry(|mut connection| async move {
                redis::cmd("PING").query_async::<()>(&mut connection).await
            })
            .await
        })
    }

    /// `keys` is 0: Redis cannot cheaply count only this deployment's keys (`DBSIZE`
    /// counts every key of the database). Redis's `INFO keyspace` has the totals.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
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
}
