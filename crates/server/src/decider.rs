//! The one path from a decision request to a decision, shared by every front door:
//! asks the store, times it, and counts the outcome per limit.

use std::sync::Arc;
use std::time::Instant;

use sluice_engine::{Decision, DecisionRequest, Store, StoreError};

use crate::metrics::Metrics;

/// Decides requests against a store and records metrics.
#[derive(Clone)]
pub struct Decider {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Decider {
    /// A decider over `store` reporting to `metrics`.
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Decider { store, metrics }
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
                let retry_after_ms = decision
                    .results
                    .iter()
                    .filter(|r| r.check == index && !r.allowed)
                    .map(|r| r.retry_after.map(|us| (us.max(0) as u64).div_ceil(1000)))
                    .max()
                    .flatten();
                if check.limit().shadow() {
                    tracing::info!(
                        limit = check.limit().name(),
                        key_hash = %key_hash(check.key()),
                        retry_after_ms,
                        "would deny (shadow limit: allowed)"
                    );
                } else {
                    tracing::info!(
                        limit = check.limit().name(),
                        key_hash = %key_hash(check.key()),
                        retry_after_ms,
                        "denied"
                    );
                }
            }
        }
    }
}

/// The first 16 hex digits of SHA-256 of a key: enough to follow one caller through the
/// log without writing down who it is (keys may be user ids, API keys or addresses).
fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    sluice_http::hex(&Sha256::digest(key.as_bytes())[..8])
}
