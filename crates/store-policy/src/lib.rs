//! What happens when a shared store (Redis, PostgreSQL) fails or is slow: a wrapper
//! [`Store`] applying the deployment's `on_error` choice.
//!
//! Every call to the shared store is bounded by a timeout. When it fails or times out:
//! - `allow` (fail open): the request is allowed;
//! - `deny` (fail closed): the request is denied, with a one-second retry time;
//! - `local` (the default): the request is decided with in-process counters, so limits
//!   still hold per instance.
//!
//! Such decisions carry `degraded: true` (and are counted in metrics by the server).
//! While the store is down, at most one decision per probe interval (a second by
//! default) tries it again; the others go straight to the policy, so a store that hangs
//! does not add its timeout to every request. The first success resumes shared counting:
//! within about a second of the store coming back, with no restart. Each change of state
//! is logged once, not once per request.
//!
//! [`Store::health`] answers from this state: while decisions reach the store it costs
//! nothing, and otherwise at most one call per probe interval pings the store (the same
//! gate as the decisions' probes), so `/readyz` and `/v1/stats` cannot be used to flood
//! the store, and an outage is still noticed within about a probe interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_engine::{
    DecisionRequest, Hold, Limit, Outcomes, Record, Records, SettleStatus, Settlement, Store,
    StoreError, StoreFuture, StoreStats, WindowOutcome,
};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};

/// What to do while the shared store cannot answer: the very value of the config's
/// `storage.on_error`.
pub use sluice_store_rules::FailurePolicy;

/// Settings of a [`PolicyStore`].
#[derive(Debug, Clone, Copy)]
pub struct PolicyConfig {
    /// The policy.
    pub policy: FailurePolicy,
    /// The longest a store call may take before it counts as failed.
    pub timeout: Duration,
    /// While the store is down, how often a decision tries it again.
    pub probe_interval: Duration,
    /// Bound of the in-process counters used by `local`.
    pub local_max_keys: usize,
}

/// A shared store wrapped in the failure policy.
pub struct PolicyStore {
    primary: Arc<dyn Store>,
    config: PolicyConfig,
    local: MemoryStore,
    /// Even while the store is up, odd while it is down; bumped on every change of
    /// state. A call remembers the epoch it started in, so an answer that was already in
    /// flight when the state changed cannot flip it back: only a probe (a call started
    /// while down) marks the store up, and only a call started while up marks it down.
    epoch: AtomicU64,
    started: Instant,
    /// Microseconds since `started` when the next probe may run.
    next_probe: AtomicU64,
    /// Microseconds since `started` of the last call the store answered (within a
    /// millisecond: it is only written when it moves by more, to keep decisions from
    /// all writing one cache line); [`NEVER`] before the first.
    last_answer: AtomicU64,
}

impl PolicyStore {
    /// Wraps `primary`.
    pub fn new(primary: Arc<dyn Store>, config: PolicyConfig) -> Self {
        PolicyStore {
            primary,
            local: MemoryStore::new(MemoryStoreConfig {
                max_keys: config.local_max_keys,
                ..Default::default()
            }),
            config,
            epoch: AtomicU64::new(0),
            started: Instant::now(),
            next_probe: AtomicU64::new(0),
            last_answer: AtomicU64::new(NEVER),
        }
    }

    /// Whether the shared store is currently considered down.
    pub fn is_down(&self) -> bool {
        is_down_epoch(self.epoch.load(Ordering::Acquire))
    }

    fn elapsed_micros(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// While down: whether this call is the one that may try the store again.
    fn may_probe(&self) -> bool {
        let now = self.elapsed_micros();
        let due = self.next_probe.load(Ordering::Acquire);
        now >= due
            && self
                .next_probe
                .compare_exchange(
                    due,
                    now + self.config.probe_interval.as_micros() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// A call started in `epoch` succeeded.
    fn succeeded(&self, epoch: u64) {
        let now = self.elapsed_micros();
        if now.saturating_sub(self.last_answer.load(Ordering::Relaxed)) > 1_000 {
            self.last_answer.fetch_max(now.max(1), Ordering::Relaxed);
        }
        if is_down_epoch(epoch)
            && self
                .epoch
                .compare_exchange(epoch, epoch + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::info!(
                backend = self.primary.backend(),
                "store reachable again: shared counting resumed"
            );
        }
    }

    /// A call started in `epoch` failed.
    fn failed(&self, epoch: u64, error: &StoreError) {
        if !is_down_epoch(epoch)
            && self
                .epoch
                .compare_exchange(epoch, epoch + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.next_probe.store(
                self.elapsed_micros() + self.config.probe_interval.as_micros() as u64,
                Ordering::Release,
            );
            tracing::warn!(
                backend = self.primary.backend(),
                %error,
                policy = ?self.config.policy,
                "store unreachable: deciding by the on_error policy until it is back"
            );
        }
    }

    async fn bounded<T>(&self, call: StoreFuture<'_, T>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.config.timeout)),
        }
    }

    fn fallback(&self, request: &DecisionRequest) -> Outcomes {
        let windows = match self.config.policy {
            FailurePolicy::Local => self.local.decide_sync(request).windows,
            FailurePolicy::Allow | FailurePolicy::Deny => {
                let allow = self.config.policy == FailurePolicy::Allow;
                request
                    .windows()
                    .map(|(check, lw)| {
                        let capacity = lw.window.capacity();
                        // The rules that hold whatever the counter says still hold: a
                        // cost of 0 is a read and always allowed; a cost above the
                        // window's capacity never fits, and has no time to wait for.
                        let (allowed, retry_after) = if check.cost() == 0 {
                            (true, Some(0))
                        } else if check.cost() > capacity {
                            (false, None)
                        } else if allow {
                            (true, Some(0))
                        } else {
                            (false, Some(1_000_000))
                        };
                        WindowOutcome {
                            allowed,
                            // Nothing is known about the shared counter: report it as the
                            // policy treats it, full when open and empty when closed.
                            remaining: if allow { capacity } else { 0 },
                            reset_after: 0,
                            retry_after,
                        }
                    })
                    .collect()
            }
        };
        Outcomes {
            windows,
            degraded: true,
        }
    }
}

/// How long an admin reset of a whole limit may take.
pub const RESET_LIMIT_TIMEOUT: Duration = Duration::from_secs(60);

impl Store for PolicyStore {
    fn decide<'a>(&'a self, request: &'a DecisionRequest) -> StoreFuture<'a, Outcomes> {
        Box::pin(async move {
            let epoch = self.epoch.load(Ordering::Acquire);
            if is_down_epoch(epoch) && !self.may_probe() {
                return Ok(self.fallback(request));
            }
            match self.bounded(self.primary.decide(request)).await {
                Ok(outcomes) => {
                    self.succeeded(epoch);
                    Ok(outcomes)
                }
                Err(error @ (StoreError::Unavailable(_) | StoreError::Timeout(_))) => {
                    self.failed(epoch, &error);
                    Ok(self.fallback(request))
                }
                // The store answered: it is up, and refused this one request (a key it
                // cannot hold, say). Only that request fails; switching everyone to the
                // `on_error` policy would let one client open every limit.
                Err(error) => Err(error),
            }
        })
    }

    /// Refunds go to the shared store, bounded by the timeout and never retried (a
    /// refund that may have run must not run twice). While the store is down they are
    /// refused: the decision they would undo was made by the policy, not the store.
    fn refund<'a>(
        &'a self,
        request: &'a DecisionRequest,
        charged: &'a [bool],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let epoch = self.epoch.load(Ordering::Acquire);
            if is_down_epoch(epoch) {
                return Err(StoreError::Unavailable(format!(
                    "the {} store is down; refund not applied",
                    self.primary.backend()
                )));
            }
            let result = self.bounded(self.primary.refund(request, charged)).await;
            if let Err(error @ (StoreError::Unavailable(_) | StoreError::Timeout(_))) = &result {
                self.failed(epoch, error);
            }
            result
        })
    }

    /// As [`PolicyStore::decide`]: while the store is down the policy decides, and
    /// with `local` the in-process store also records the hold, so the reservation can
    /// still be settled (by this instance) once the store is back.
    fn reserve<'a>(
        &'a self,
        request: &'a DecisionRequest,
        hold: &'a Hold,
    ) -> StoreFuture<'a, Outcomes> {
        Box::pin(async move {
            let epoch = self.epoch.load(Ordering::Acquire);
            let fallback = || match self.config.policy {
                FailurePolicy::Local => Outcomes {
                    degraded: true,
                    ..self.local.reserve_sync(request, hold)
                },
                _ => self.fallback(request),
            };
            if is_down_epoch(epoch) && !self.may_probe() {
                return Ok(fallback());
            }
            match self.bounded(self.primary.reserve(request, hold)).await {
                Ok(outcomes) => {
                    self.succeeded(epoch);
                    Ok(outcomes)
                }
                Err(error @ (StoreError::Unavailable(_) | StoreError::Timeout(_))) => {
                    self.failed(epoch, &error);
                    Ok(fallback())
                }
                Err(error) => Err(error),
            }
        })
    }

    /// Settlements go to the shared store, bounded and never retried; a reservation the
    /// shared store does not know may have been made by the `local` policy while it was
    /// down, so the in-process store is asked next. While the store is down only those
    /// can be settled.
    fn settle<'a>(&'a self, settlement: &'a Settlement) -> StoreFuture<'a, SettleStatus> {
        Box::pin(async move {
            let local = self.config.policy == FailurePolicy::Local;
            let epoch = self.epoch.load(Ordering::Acquire);
            if is_down_epoch(epoch) {
                if local && settlement.hold.is_some() {
                    let status = self.local.settle_sync(settlement);
                    if status != SettleStatus::Unknown {
                        return Ok(status);
                    }
                }
                return Err(StoreError::Unavailable(format!(
                    "the {} store is down; settlement not applied",
                    self.primary.backend()
                )));
            }
            let result = self.bounded(self.primary.settle(settlement)).await;
            match result {
                Ok(SettleStatus::Unknown) if local && settlement.hold.is_some() => {
                    Ok(self.local.settle_sync(settlement))
                }
                Err(error @ (StoreError::Unavailable(_) | StoreError::Timeout(_))) => {
                    self.failed(epoch, &error);
                    Err(error)
                }
                other => other,
            }
        })
    }

    fn reset<'a>(&'a self, limit: &'a Limit, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.local.reset_sync(limit, key);
            self.bounded(self.primary.reset(limit, key)).await
        })
    }

    /// Bounded by [`RESET_LIMIT_TIMEOUT`], not the decision timeout: it walks every key
    /// of the limit (every master of a cluster, a whole table), and cutting it off part
    /// way would leave some keys reset and others not.
    fn reset_limit<'a>(&'a self, limit: &'a Limit) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.local.reset_limit_sync_with(limit, |_, _| {});
            let timeout = RESET_LIMIT_TIMEOUT.max(self.config.timeout);
            match tokio::time::timeout(timeout, self.primary.reset_limit(limit)).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Timeout(timeout)),
            }
        })
    }

    // Records are the shared store's alone: while it is down they cannot be read or
    // changed (the caller keeps what it last read), and no local copy could be shared.
    fn records(&self) -> StoreFuture<'_, Records> {
        Box::pin(self.bounded(self.primary.records()))
    }

    fn records_version(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.bounded(self.primary.records_version()))
    }

    fn put_record<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, u64> {
        Box::pin(self.bounded(self.primary.put_record(record)))
    }

    fn remove_record<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(self.bounded(self.primary.remove_record(id)))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let epoch = self.epoch.load(Ordering::Acquire);
            let result = self.bounded(self.primary.ping()).await;
            match &result {
                Ok(()) => self.succeeded(epoch),
                Err(error) => self.failed(epoch, error),
            }
            result
        })
    }

    /// The known state while it is fresh: the store answered within the last probe
    /// interval, or it is down and the probe is not due. Otherwise this call is the one
    /// that pings (others meanwhile get the known state).
    fn health(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let epoch = self.epoch.load(Ordering::Acquire);
            let interval = self.config.probe_interval.as_micros() as u64;
            let last_answer = self.last_answer.load(Ordering::Relaxed);
            let answered_lately = last_answer != NEVER
                && self.elapsed_micros().saturating_sub(last_answer) < interval;
            let known = if is_down_epoch(epoch) {
                Err(StoreError::Unavailable(format!(
                    "the {} store is unreachable (tried again once per {:?})",
                    self.primary.backend(),
                    self.config.probe_interval
                )))
            } else {
                Ok(())
            };
            if (known.is_ok() && answered_lately) || !self.may_probe() {
                return known;
            }
            self.ping().await
        })
    }

    fn stats(&self) -> StoreStats {
        self.primary.stats()
    }

    fn backend(&self) -> &'static str {
        self.primary.backend()
    }
}

/// `last_answer` before the store has answered anything.
const NEVER: u64 = 0;

fn is_down_epoch(epoch: u64) -> bool {
    epoch % 2 == 1
}
