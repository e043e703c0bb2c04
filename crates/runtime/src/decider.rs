//! The one path from a decision request to a decision, shared by every front door:
//! asks the store, times it, and counts the outcome per limit.
//!
//! Denials are logged at most once per limit per [`DENIAL_LOG_INTERVAL`]: callers choose
//! how often they are denied, so a line per denial would let them choose the log's rate.
//! The next line logged for a limit is preceded by one saying how many of its denials
//! were not logged since its last line; every denial is counted in
//! `sluice_decisions_total` either way.
//!
//! Every recorded check also feeds its limit's [`sluice_topkeys::Timeline`] (checks and
//! denials per minute) and, with `stats.top_keys`, its [`sluice_topkeys::TopKeys`]: the
//! key as the store saw it (so already hashed with `client_ip.hash`), the cost charged
//! as spend, and whether it was denied. Recording it here is what makes every front door
//! (decision API, reservations, forward-auth, proxy, Envoy) feed them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_engine::{
    Check, Decision, DecisionRequest, Hold, HoldId, SettleStatus, Settlement, Store, StoreError,
};

use crate::access::{Access, now_ms};
use crate::reservation::{Ticket, TicketError};
use sluice_access::Screen;
use std::net::IpAddr;

use crate::metrics::{LimitCountersByName, Metrics};

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
    /// The runtime entries: plans, overrides, block and allow lists.
    access: Arc<Access>,
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
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, access: Arc<Access>) -> Self {
        Decider {
            store,
            metrics,
            access,
            started: Instant::now(),
        }
    }

    /// Seconds on the clock top keys and timelines are recorded by (since the decider
    /// was made): what their queries take as "now".
    pub fn clock_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Whether any runtime entry is in force: a front door that must prepare extra
    /// subjects for the lists (the Envoy service) skips that when none is.
    pub fn has_entries(&self) -> bool {
        !self.access.current().is_empty()
    }

    /// The store decisions go to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Decides `request` (see [`Decider::decide_from`]) for a client whose address is
    /// not known here.
    pub async fn decide(&self, request: &mut DecisionRequest) -> Result<Decision, StoreError> {
        self.decide_from(request, None).await
    }

    /// Decides `request` from `client`, recording latency, errors and outcomes. The
    /// runtime entries come first: a block or allow entry decides without the limits;
    /// otherwise plan assignments and rate overrides may change the request's limits,
    /// which is why it is taken mutably (answer with the request as it is afterwards).
    pub async fn decide_from(
        &self,
        request: &mut DecisionRequest,
        client: Option<IpAddr>,
    ) -> Result<Decision, StoreError> {
        self.decide_listing(request, client, &[]).await
    }

    /// [`Decider::decide_from`], with `subjects` also screened as subject entries (see
    /// `sluice_access::Directory::screen_with`): the Envoy service's descriptor entries.
    /// They may match allow entries, as may the checks whose keys are trusted
    /// (`Check::key_is_trusted`); block entries match every key.
    pub async fn decide_listing(
        &self,
        request: &mut DecisionRequest,
        client: Option<IpAddr>,
        subjects: &[String],
    ) -> Result<Decision, StoreError> {
        if let Some(decision) = self.screen(request, client, subjects) {
            return Ok(decision);
        }
        if request.checks.is_empty() {
            // Nothing to decide: screened for the lists only (a request no route limits).
            return Ok(Decision::from_outcomes(request, &[], false));
        }
        let request = &*request;
        let started = Instant::now();
        let result = sluice_engine::decide(&*self.store, request).await;
        self.metrics.observe_store(started.elapsed());
        match &result {
            Ok(decision) if !request.dry_run => self.record(request, decision, started),
            Ok(_) => {}
            Err(error) => self.store_failed(error),
        }
        result
    }

    /// Reserves `request` for `ttl`: decides it like [`Decider::decide`], and when it is
    /// allowed (and not a dry run) the store holds the reservation; the answer then
    /// carries its ticket and token.
    pub async fn reserve(
        &self,
        request: &mut DecisionRequest,
        ttl: Duration,
    ) -> Result<(Decision, Option<(Ticket, String)>), ReserveError> {
        self.reserve_from(request, ttl, None).await
    }

    /// [`Decider::reserve`] for a client at `client`, after the runtime entries (see
    /// [`Decider::decide_from`]). An allow-listed reservation holds nothing: its ticket
    /// has no checks, and settling it moves nothing.
    pub async fn reserve_from(
        &self,
        request: &mut DecisionRequest,
        ttl: Duration,
        client: Option<IpAddr>,
    ) -> Result<(Decision, Option<(Ticket, String)>), ReserveError> {
        if let Some(decision) = self.screen(request, client, &[]) {
            if !decision.allowed || request.dry_run {
                return Ok((decision, None));
            }
            let ticket = Ticket::new(&DecisionRequest::default(), ttl)?;
            let (token, _) = ticket.encode();
            return Ok((decision, Some((ticket, token))));
        }
        let request = &*request;
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
        let mut decision = Decision::from_outcomes(request, &outcomes.windows, outcomes.degraded);
        if request.dry_run {
            return Ok((decision, None));
        }
        if decision.allowed {
            // The store counted this reservation's slot but not when it comes back: at
            // the latest when the reservation expires, sooner if another one does.
            let ttl = hold.ttl;
            for result in &mut decision.results {
                let check = &request.checks[result.check];
                if check.limit().is_concurrency() && result.allowed {
                    result.reset_after = match result.reset_after {
                        0 => ttl,
                        other => other.min(ttl),
                    };
                }
            }
        }
        self.record(request, &decision, started);
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
        if ticket.checks.is_empty() {
            // An allow-listed reservation: nothing was held, nothing moves.
            return Ok(SettleStatus::Settled);
        }
        let directory = self.access.directory();
        self.settle(&ticket.settlement(hold, limits, &directory, actual))
            .await
    }

    /// What the runtime entries make of `request`: a decision when a block or allow
    /// entry decides it; otherwise `None`, with plans and overrides applied in place.
    fn screen(
        &self,
        request: &mut DecisionRequest,
        client: Option<IpAddr>,
        subjects: &[String],
    ) -> Option<Decision> {
        let directory = self.access.current();
        if directory.is_empty() {
            return None;
        }
        let now = now_ms();
        match directory.screen_with(request, client, subjects, now) {
            Screen::Blocked(listed) => {
                if !request.dry_run {
                    self.metrics.blocked.inc();
                }
                Some(Decision::listed(listed))
            }
            Screen::Allowed(listed) => {
                let decision = Decision::listed(listed);
                if !request.dry_run {
                    self.metrics.allow_listed.inc();
                    // Counted as allowed decisions of their limits, as if decided.
                    self.record(request, &decision, Instant::now());
                }
                Some(decision)
            }
            Screen::Limits => {
                directory.assign(request, now);
                None
            }
        }
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

    /// Counts `decision` (asked for at `asked`, a clock reading the caller already had).
    fn record(&self, request: &DecisionRequest, decision: &Decision, asked: Instant) {
        if decision.degraded {
            self.metrics.degraded.inc();
        }
        let now_secs = asked.saturating_duration_since(self.started).as_secs();
        self.metrics
            .with_limit_counters(|counters| self.count(request, decision, counters, now_secs));
    }

    /// Adds `decision` to each checked limit's counters, timeline and top keys.
    fn count(
        &self,
        request: &DecisionRequest,
        decision: &Decision,
        counters: &LimitCountersByName,
        now_secs: u64,
    ) {
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
            counter.timeline.record(denied, now_secs);
            if let Some(top) = &counter.top {
                let spend = if charged(check, index, decision) {
                    check.cost()
                } else {
                    0
                };
                top.record(check.key(), spend, denied, now_secs);
            }
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

/// Whether `decision` charged check `index`'s cost: the rule of
/// [`Decision::charged_windows`] (a window that allowed in an allowed decision, or a
/// `charge_denied` window whose cost could fit), for any of the check's windows. A
/// reservation's check counts its reserved cost here; what settling adds or gives back
/// later is not counted as spend.
fn charged(check: &Check, index: usize, decision: &Decision) -> bool {
    check.cost() > 0
        && decision.results.iter().any(|r| {
            r.check == index
                && ((decision.allowed && r.allowed)
                    || (check.limit().charge_denied() && !r.allowed && r.retry_after.is_some()))
        })
}

/// The first 16 hex digits of SHA-256 of a key: enough to follow one caller through the
/// log without writing down who it is (keys may be user ids, API keys or addresses).
fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    sluice_http::hex(&Sha256::digest(key.as_bytes())[..8])
}
