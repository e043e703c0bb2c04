//! Atomic decisions over several checks.
//!
//! A [`DecisionRequest`] is a list of [`Check`]s (limit, key, cost). Every window of
//! every check is evaluated; the decision is allowed only if every enforced (non-shadow)
//! window allows. Then, unless `dry_run`:
//! - allowed: every window that allowed is charged;
//! - denied: nothing is charged, except windows of limits with `charge_denied`,
//!   which are charged on every attempt.
//!
//! Checks are applied in order, so two checks on the same counter in one request
//! see each other: the second is decided as if the first had been charged.

use std::sync::Arc;

use compact_str::CompactString;
use smallvec::SmallVec;

use crate::algorithm::State;
use crate::clock::Micros;
use crate::limit::{Limit, LimitWindow};
use crate::store::{Store, StoreError};

/// The longest key a check may carry, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// One check: spend `cost` of `limit` on `key`.
#[derive(Debug, Clone)]
pub struct Check {
    limit: Arc<Limit>,
    key: CompactString,
    cost: u64,
    /// Whether the key was chosen by someone the operator trusts, not by the limited
    /// client: see [`Check::key_is_trusted`].
    trusted: bool,
}

/// Why a check was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The key is empty.
    #[error("key is empty: give each check a non-empty key such as \"user:42\"")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error(
        "key is {0} bytes long: keys may be at most {MAX_KEY_BYTES} bytes; hash long identifiers first"
    )]
    KeyTooLong(usize),
}

impl Check {
    /// A check; the key must be 1 to [`MAX_KEY_BYTES`] bytes. Keys up to 24 bytes are
    /// stored inline, without a heap allocation.
    pub fn new(
        limit: Arc<Limit>,
        key: impl Into<CompactString>,
        cost: u64,
    ) -> Result<Self, CheckError> {
        let key = key.into();
        if key.is_empty() {
            return Err(CheckError::EmptyKey);
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(CheckError::KeyTooLong(key.len()));
        }
        Ok(Check {
            limit,
            key,
            cost,
            // Untrusted unless a front door says otherwise: a front door that forgets
            // to say so loses allow entries (they stop applying), never lets a client
            // name an allow-listed subject.
            trusted: false,
        })
    }

    /// This check with its key marked trusted or not (see [`Check::key_is_trusted`]).
    /// Front doors set it where the key is made: the decision API and the Envoy
    /// service for every key, the HTTP routes for keys of templates that read nothing
    /// the client writes.
    pub fn with_trusted_key(mut self, trusted: bool) -> Check {
        self.trusted = trusted;
        self
    }

    /// Whether the key was chosen by someone the operator trusts (the application
    /// calling the decision API, Envoy's configured descriptors, a key template that
    /// reads only the resolved client address, a verified token or a signed session)
    /// rather than written by the limited client (a header, cookie, query parameter,
    /// the path or the method). Only such keys may match an allow entry: a client that
    /// could write an allow-listed subject into any key would skip every limit.
    pub fn key_is_trusted(&self) -> bool {
        self.trusted
    }

    /// The limit checked.
    pub fn limit(&self) -> &Arc<Limit> {
        &self.limit
    }

    /// The key the limit is counted on.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The cost to spend.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// The same check at another cost (its key was checked already): how a front door
    /// prices a check whose cost it learns after matching, such as a reservation's
    /// estimate read from the request body. Whether its key is trusted stays too.
    pub fn with_cost(&self, cost: u64) -> Check {
        Check {
            limit: Arc::clone(&self.limit),
            key: self.key.clone(),
            cost,
            trusted: self.trusted,
        }
    }

    /// Puts this check on other rates (a plan or an override of the same limit), in
    /// place: its key was checked already and stays, as does its cost.
    pub fn set_limit(&mut self, limit: Arc<Limit>) {
        self.limit = limit;
    }
}

/// Everything decided together.
#[derive(Debug, Clone, Default)]
pub struct DecisionRequest {
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// Decide without charging.
    pub dry_run: bool,
}

impl DecisionRequest {
    /// Every window of every check, in order: the order of [`WindowOutcome`]s a store returns.
    pub fn windows(&self) -> impl Iterator<Item = (&Check, &LimitWindow)> {
        self.checks.iter().flat_map(|check| {
            check
                .limit
                .windows()
                .iter()
                .map(move |window| (check, window))
        })
    }

    /// How many windows [`DecisionRequest::windows`] yields.
    pub fn window_count(&self) -> usize {
        self.checks.iter().map(|c| c.limit.windows().len()).sum()
    }
}

/// What a store reports for one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowOutcome {
    /// Whether this window admitted the request.
    pub allowed: bool,
    /// Cost left after this request (what is left now, when nothing was charged).
    pub remaining: u64,
    /// Microseconds until the window is fully restored.
    pub reset_after: Micros,
    /// Microseconds until the same request would be allowed: 0 when allowed, `None` when never.
    pub retry_after: Option<Micros>,
}

/// Per-window outcomes, inline for up to two windows (the common case: no allocation).
pub type WindowOutcomes = SmallVec<[WindowOutcome; 2]>;

/// One counter's state while a store decides: several windows may share a slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slot {
    /// The state as loaded (`None`: absent or expired), updated in place.
    pub state: Option<State>,
    /// Whether the state changed and must be written back.
    pub dirty: bool,
}

/// Decides `request` against loaded counter states: the algorithm every in-process
/// store runs under its locks. `slot_of[i]` is the index in `slots` of the i-th window
/// (in [`DecisionRequest::windows`] order); windows on the same counter share a slot.
/// Changed slots come back with `dirty` set.
pub fn apply(
    request: &DecisionRequest,
    slot_of: &[usize],
    slots: &mut [Slot],
    now: Micros,
) -> WindowOutcomes {
    if let ([check], [0], [slot]) = (request.checks.as_slice(), slot_of, &mut *slots)
        && let [lw] = check.limit.windows()
    {
        return apply_one(check, lw, slot, now, request.dry_run);
    }
    // Pass 1: decide and report each window as if the decision were allowed, so
    // repeated counters see the charges before them.
    let mut working: SmallVec<[Option<State>; 4]> = slots.iter().map(|s| s.state).collect();
    let mut outcomes = WindowOutcomes::with_capacity(slot_of.len());
    let mut decision_allowed = true;
    for ((check, lw), &slot) in request.windows().zip(slot_of) {
        // `charge_denied` counts attempts that could have fitted; a cost the window can
        // never admit (no retry time) is a caller's mistake and charges nothing.
        let (evaluation, after) = step(lw, check, &mut working[slot], now, |e| {
            e.allowed || (check.limit.charge_denied() && e.retry_after.is_some())
        });
        decision_allowed &= evaluation.allowed || check.limit.shadow();
        let (remaining, reset_after) = lw.window.report(&after, now);
        outcomes.push(WindowOutcome {
            allowed: evaluation.allowed,
            remaining,
            reset_after,
            retry_after: evaluation.retry_after,
        });
    }

    if !decision_allowed {
        // Pass 2: start again from the stored states, charge only `charge_denied`
        // windows, and report what is really left. Verdicts stay those of pass 1.
        for (working, slot) in working.iter_mut().zip(slots.iter()) {
            *working = slot.state;
        }
        for (((check, lw), &slot), outcome) in
            request.windows().zip(slot_of).zip(outcomes.iter_mut())
        {
            let could_fit = outcome.retry_after.is_some();
            let (_, after) = step(lw, check, &mut working[slot], now, |_| {
                check.limit.charge_denied() && could_fit
            });
            (outcome.remaining, outcome.reset_after) = lw.window.report(&after, now);
        }
    }

    if !request.dry_run {
        for (slot, state) in slots.iter_mut().zip(working.iter()) {
            if *state != slot.state {
                slot.state = *state;
                slot.dirty = true;
            }
        }
    }
    outcomes
}

/// [`apply`] for the most common request, one check of a one-window limit, without
/// the bookkeeping for many: with one window, the second pass of a denied decision
/// would evaluate the same state again and charge exactly what the first charged.
fn apply_one(
    check: &Check,
    lw: &LimitWindow,
    slot: &mut Slot,
    now: Micros,
    dry_run: bool,
) -> WindowOutcomes {
    let mut working = slot.state;
    let (evaluation, after) = step(lw, check, &mut working, now, |e| {
        e.allowed || (check.limit.charge_denied() && e.retry_after.is_some())
    });
    if !dry_run && working != slot.state {
        slot.state = working;
        slot.dirty = true;
    }
    let (remaining, reset_after) = lw.window.report(&after, now);
    let mut outcomes = WindowOutcomes::new();
    outcomes.push(WindowOutcome {
        allowed: evaluation.allowed,
        remaining,
        reset_after,
        retry_after: evaluation.retry_after,
    });
    outcomes
}

/// Gives back what an earlier decision charged: for every window of `request` whose
/// `charged` flag is set (in [`DecisionRequest::windows`] order; see
/// [`Decision::charged_windows`]), the check's cost is refunded to its counter (see
/// [`Window::refund`](crate::Window::refund)). `slot_of` and `slots` are as for
/// [`apply`]; changed slots come back with `dirty` set. The refund stores run under
/// the same locks as their decisions.
pub fn refund(
    request: &DecisionRequest,
    charged: &[bool],
    slot_of: &[usize],
    slots: &mut [Slot],
    now: Micros,
) {
    for (((check, lw), &slot), &was_charged) in request.windows().zip(slot_of).zip(charged) {
        if !was_charged {
            continue;
        }
        let slot = &mut slots[slot];
        if let Some(state) = lw.window.refund(slot.state, now, check.cost) {
            slot.state = Some(state);
            slot.dirty = true;
        }
    }
}

/// Evaluates one window against its counter's working state, charges it when the
/// check has a cost and `charge` agrees, and returns the evaluation and the state after.
fn step(
    lw: &LimitWindow,
    check: &Check,
    working: &mut Option<State>,
    now: Micros,
    charge: impl FnOnce(&crate::algorithm::Evaluation) -> bool,
) -> (crate::algorithm::Evaluation, State) {
    let evaluation = lw.window.evaluate(*working, now, check.cost);
    if check.cost > 0 && charge(&evaluation) {
        *working = Some(evaluation.charged);
        (evaluation, evaluation.charged)
    } else {
        (evaluation, evaluation.current)
    }
}

/// The result for one window of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowResult {
    /// Index of the check in the request.
    pub check: usize,
    /// Index of the window in the check's limit.
    pub window: usize,
    /// Whether this window admitted the request (a shadow window may say no without denying).
    pub allowed: bool,
    /// Whether the limit only reports.
    pub shadow: bool,
    /// The window's capacity (its quota, or the gcra burst).
    pub limit_value: u64,
    /// Cost left after this request.
    pub remaining: u64,
    /// Microseconds until fully restored.
    pub reset_after: Micros,
    /// Microseconds until the same request would be allowed: 0 when allowed, `None` when never.
    pub retry_after: Option<Micros>,
}

/// The answer to a [`DecisionRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go ahead.
    pub allowed: bool,
    /// The longest wait among enforced windows that denied: 0 when allowed, `None` when
    /// some denying window can never admit this cost.
    pub retry_after: Option<Micros>,
    /// Decided without the shared store (see the store-failure policy).
    pub degraded: bool,
    /// One result per window, in [`DecisionRequest::windows`] order.
    pub results: Vec<WindowResult>,
    /// Set when an operator's block or allow entry decided the request instead of its
    /// limits (then `results` is empty).
    pub listed: Option<Listed>,
}

/// A block or allow entry that decided a request (see `sluice-access`). Says nothing
/// of what matched: the entry may name the client's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Blocked, or allowed past every limit.
    pub blocked: bool,
    /// The operator's reason, when given.
    pub reason: Option<String>,
    /// When the entry expires, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
}

impl Decision {
    /// The decision of a block or allow entry: no window was consulted.
    pub fn listed(listed: Listed) -> Self {
        Decision {
            allowed: !listed.blocked,
            retry_after: if listed.blocked { None } else { Some(0) },
            degraded: false,
            results: Vec::new(),
            listed: Some(listed),
        }
    }

    /// Assembles a decision from a store's per-window outcomes.
    pub fn from_outcomes(
        request: &DecisionRequest,
        outcomes: &[WindowOutcome],
        degraded: bool,
    ) -> Self {
        let mut allowed = true;
        let mut retry_after = Some(0);
        let mut results = Vec::with_capacity(outcomes.len());
        let indices =
            request.checks.iter().enumerate().flat_map(|(c, check)| {
                (0..check.limit.windows().len()).map(move |w| (c, w, check))
            });
        for ((check_index, window_index, check), outcome) in indices.zip(outcomes) {
            let shadow = check.limit.shadow();
            if !outcome.allowed && !shadow {
                allowed = false;
                retry_after = match (retry_after, outcome.retry_after) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            results.push(WindowResult {
                check: check_index,
                window: window_index,
                allowed: outcome.allowed,
                shadow,
                limit_value: check.limit.windows()[window_index].window.capacity(),
                remaining: outcome.remaining,
                reset_after: outcome.reset_after,
                retry_after: outcome.retry_after,
            });
        }
        Decision {
            allowed,
            retry_after,
            degraded,
            results,
            listed: None,
        }
    }
}

impl Decision {
    /// Which windows of `request` this decision charged, in [`DecisionRequest::windows`]
    /// order: what a refund gives back. Nothing for a dry run; for an allowed decision,
    /// every window that allowed (with a cost), plus `charge_denied` windows of shadow
    /// limits that denied a cost that could fit; for a denied one, only `charge_denied`
    /// windows whose cost could fit.
    pub fn charged_windows(&self, request: &DecisionRequest) -> Vec<bool> {
        request
            .windows()
            .zip(&self.results)
            .map(|((check, _), result)| {
                let charge_denied =
                    check.limit.charge_denied() && !result.allowed && result.retry_after.is_some();
                !request.dry_run
                    && check.cost > 0
                    && ((self.allowed && result.allowed) || charge_denied)
            })
            .collect()
    }
}

/// Decides `request` with `store`.
pub async fn decide(store: &dyn Store, request: &DecisionRequest) -> Result<Decision, StoreError> {
    let outcomes = match store.decide_now(request) {
        Some(outcomes) => outcomes?,
        None => store.decide(request).await?,
    };
    if outcomes.windows.len() != request.window_count() {
        return Err(StoreError::Protocol(format!(
            "store answered {} windows for {} asked",
            outcomes.windows.len(),
            request.window_count()
        )));
    }
    Ok(Decision::from_outcomes(
        request,
        &outcomes.windows,
        outcomes.degraded,
    ))
}
