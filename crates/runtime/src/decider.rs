//! The one path from a decision request to a decision, shared by every front door:
//! asks the store, times it, and counts the outcome per limit.
//!
//! Denials are logged at most once per limit per [`DENIAL_LOG_INTERVAL`]: callers choose
//! how often they are denied, so a line per denial would let them choose the log's rate.
//! The next line logged for a limit is preceded by one saying how many of its denials
//! were not logged since its last line; every denial is counted in
//! `sluice_decisions_total` either way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_engine::{
    Check, Decision, DecisionRequest, Hold, HoldId, SettleStatus, Settlement, Store, StoreError,
};

use crate::reservation::{Ticket, TicketError};

use crate::metrics::Metrics;

/// The shortest time between two denial lines of one limit.
pub const DENIAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Why a reservation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No ticket could be made.
    #[error(transparent)]
    Ticket(#[from] TicketError),
}

/// Decides requests against a store and records metrics.
#[derive(Clone)]
pub struct Decider {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// The zero of [`DenialLog`]'s clock.
    started: Instant,
}

/// One limit's denial log state: when its last denial line was written and how many
/// denials have not been logged since. Lock-free, as floods of denials pass through it.
#[derive(Debug, Default)]
pub struct DenialLog {
    /// Milliseconds (from the decider's start, plus one so that 0 means never) of the
    /// last denial line.
    last_line_ms: AtomicU64,
    /// Denials not logged since that line.
    not_logged: AtomicU64,
}

impl DenialLog {
    /// Whether the denial at `now_ms` gets a line: `Some(n)` when it does, `n` being the
    /// denials not logged before it; `None` when it only counts towards the next line.
    fn admit(&self, now_ms: u64) -> Option<u64> {
        let now = now_ms.saturating_add(1);
        let last = self.last_line_ms.load(Ordering::Acquire);
        let due = last == 0 || now >= last.saturating_add(DENIAL_LOG_INTERVAL.as_millis() as u64);
        if due
            && self
                .last_line_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(self.not_logged.swap(0, Ordering::AcqRel));
        }
        self.not_logged.fetch_add(1, Ordering::AcqRel);
        None
    }
}

impl Decider {
    /// A decider over `store` reporting to `metrics`.
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Decider {
            store,
            metrics,
            started: Instant::now(),
        }
    }

    /// The store decisions go to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Decides `request`, recording latency, errors and outcomes.
    pub async fn decide(&self, request: &DecisionRequest) -> Result<Decision, StoreError> {
        let started = Instant::now();
        let result = sluice_engine::decide(&*self.store, request).await;
        self.metrics.observe_store(started.elapsed());
        match &result {
            Ok(decision) => {
                if !request.dry_run {
                    self.record(request, decision);
                }
            }
            Err(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, backend = self.store.backend(), "store call failed");
            }
        }
        result
    }

    /// Reserves `request` for `ttl`: decides it like [`Decider::decide`], and when it is
    /// allowed (and not a dry run) the store holds the reservation; the answer then
    /// carries its ticket and token.
    pub async fn reserve(
        &self,
        request: &DecisionRequest,
        ttl: Duration,
    ) -> Result<(Decision, Option<(Ticket, String)>), ReserveError> {
        let ticket = Ticket::new(request, ttl)?;
        let (token, id) = ticket.encode();
        let hold = Hold {
            id,
            ttl: ttl.as_micros().min(i64::MAX as u128) as i64,
        };
        let started = Instant::now();
        let result = self.store.reserve(request, &hold).await;
        self.metrics.observe_store(started.elapsed());
        let outcomes = result.inspect_err(|error| self.store_failed(error))?;
        if outcomes.windows.len() != request.window_count() {
            return Err(ReserveError::Store(StoreError::Protocol(format!(
                "store answered {} windows for {} asked",
                outcomes.windows.len(),
                request.window_count()
            ))));
        }
        let decision = Decision::from_outcomes(request, &outcomes.windows, outcomes.degraded);
        if request.dry_run {
            return Ok((decision, None));
        }
        self.record(request, &decision);
        let held = decision.allowed.then_some((ticket, token));
        Ok((decision, held))
    }

    /// Settles a reservation (or, with no hold, books a charge for work already done).
    pub async fn settle(&self, settlement: &Settlement) -> Result<SettleStatus, StoreError> {
        let started = Instant::now();
        let result = self.store.settle(settlement).await;
        self.metrics.observe_store(started.elapsed());
        let status = result.inspect_err(|error| self.store_failed(error))?;
        if status == SettleStatus::Settled {
            if settlement.hold.is_some() {
                self.metrics.settlements.inc();
            }
            let over: i128 = (0..settlement.request.checks.len())
                .map(|i| settlement.delta(i).max(0))
                .sum();
            if over > 0 {
                self.metrics
                    .settled_over_estimate
                    .inc_by(over.min(u64::MAX as i128) as u64);
            }
        }
        Ok(status)
    }

    /// Settles the reservation `hold` of `ticket` at `actual` (one cost per check).
    pub async fn settle_ticket(
        &self,
        ticket: &Ticket,
        hold: HoldId,
        limits: &sluice_engine::LimitSet,
        actual: &[u64],
    ) -> Result<SettleStatus, StoreError> {
        self.settle(&ticket.settlement(hold, limits, actual)).await
    }

    fn store_failed(&self, error: &StoreError) {
        self.metrics.store_errors.inc();
        tracing::warn!(%error, backend = self.store.backend(), "store call failed");
    }

    /// Gives back what `decision` charged for `request` (the proxy's `refund_on_status`).
    /// A failure is logged and counted, not retried: a refund that may have run must not
    /// run twice.
    pub async fn refund(&self, request: &DecisionRequest, decision: &Decision) {
        let charged = decision.charged_windows(request);
        if !charged.contains(&true) {
            return;
        }
        let started = Instant::now();
        let result = self.store.refund(request, &charged).await;
        self.metrics.observe_store(started.elapsed());
        match result {
            Ok(()) => {
                self.metrics.refunds.inc();
            }
            Err(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, backend = self.store.backend(), "refund failed; the cost stays charged");
            }
        }
    }

    fn record(&self, request: &DecisionRequest, decision: &Decision) {
        if decision.degraded {
            self.metrics.degraded.inc();
        }
        let counters = self.metrics.limit_counters();
        for (index, check) in request.checks.iter().enumerate() {
            let denied = decision
                .results
                .iter()
                .any(|r| r.check == index && !r.allowed);
            let Some(counter) = counters.get(check.limit().name()) else {
                continue;
            };
            match (denied, check.limit().shadow()) {
                (false, _) => counter.allowed.inc(),
                (true, false) => counter.denied.inc(),
                (true, true) => counter.shadow_denied.inc(),
            };
            if denied {
                self.log_denial(check, decision, index, &counter.denial_log);
            }
        }
    }

    /// Logs the denial of check `index`, unless its limit had a line within the interval.
    fn log_denial(&self, check: &Check, decision: &Decision, index: usize, log: &DenialLog) {
        let Some(not_logged) = log.admit(self.started.elapsed().as_millis() as u64) else {
            return;
        };
        let limit = check.limit().name();
        let shadow = check.limit().shadow();
        if not_logged > 0 {
            tracing::info!(
                limit,
                shadow,
                not_logged,
                "denials not logged since this limit's last denial line (at most one line per limit per second; all are counted in sluice_decisions_total)"
            );
        }
        let retry_after_ms = decision
            .results
            .iter()
            .filter(|r| r.check == index && !r.allowed)
            .map(|r| r.retry_after.map(sluice_engine::millis_ceil))
            .max()
            .flatten();
        if shadow {
            tracing::info!(
                limit,
                key_hash = %key_hash(check.key()),
                retry_after_ms,
                "would deny (shadow limit: allowed)"
            );
        } else {
            tracing::info!(
                limit,
                key_hash = %key_hash(check.key()),
                retry_after_ms,
                "denied"
            );
        }
    }
}

/// The first 16 hex digits of SHA-256 of a key: enough to follow one caller through the
/// log without writing down who it is (keys may be user ids, API keys or addresses).
fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    sluice_http::hex(&Sha256::digest(key.as_bytes())[..8])
}
