//! Reservations: charge an estimate now, settle the actual cost later.
//!
//! A call whose cost is known only after it ran (an LLM answer's tokens) is decided
//! with [`Store::reserve`](crate::Store::reserve): the estimate is charged like a
//! check, and when the decision is allowed the store records a [`Hold`] under an
//! unguessable id and gives every `concurrency` window one slot to it. Later, any
//! instance settles it with [`Store::settle`](crate::Store::settle) and a
//! [`Settlement`]: every window the reservation charged moves by `actual - estimate`,
//! a refund when less, a forced charge past the limit (debt) when more; the
//! reservation's slots come back. The store checks the hold is still open and that
//! the settlement names it (its `digest`), so a settlement applies at most once and a
//! forged one applies never. A hold that is never settled expires: its estimate stays
//! charged and its slots come back.
//!
//! A [`Settlement`] without a hold is a charge for work already done (Envoy's
//! `apply_on_stream_done`): it is booked unconditionally, past the limit if need be.

use crate::algorithm::Algorithm;
use crate::clock::Micros;
use crate::decision::{DecisionRequest, Slot};

/// Names one reservation: its id and the digest of what it charged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HoldId {
    /// 32 lowercase hex digits (128 random bits).
    pub id: String,
    /// A digest of the reservation's content (its checks, estimates and windows), so a
    /// settlement that does not describe the reservation it names is refused.
    pub digest: String,
}

/// What a store records for an allowed reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Which reservation.
    pub id: HoldId,
    /// How long it stays open, from the store's clock: afterwards it counts as settled at
    /// its estimate and its slots come back.
    pub ttl: Micros,
}

/// Moves the counters a reservation charged by what the call really cost.
#[derive(Debug, Clone)]
pub struct Settlement {
    /// The reservation settled; `None` books a charge for work already done, with no
    /// reservation to check (every window of `request` moves by `actual - estimate`).
    pub hold: Option<HoldId>,
    /// The reserved checks: each check's cost is its estimate.
    pub request: DecisionRequest,
    /// What each check really cost, in `request.checks` order.
    pub actual: Vec<u64>,
    /// Which windows the reservation charged (allowed), in [`DecisionRequest::windows`]
    /// order; only those move.
    pub windows: Vec<bool>,
}

/// What a store answers to a settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleStatus {
    /// Applied now.
    Settled,
    /// The reservation was settled or released before: nothing changed.
    AlreadySettled,
    /// No open reservation has this id and digest: never made, expired, or forged.
    Unknown,
}

impl Settlement {
    /// The signed change of check `index`: `actual - estimate`.
    pub fn delta(&self, index: usize) -> i128 {
        let estimate = self.request.checks.get(index).map_or(0, |c| c.cost());
        let actual = self.actual.get(index).copied().unwrap_or(estimate);
        actual as i128 - estimate as i128
    }

    /// Whether the settlement's vectors fit its request.
    pub fn is_well_formed(&self) -> bool {
        self.actual.len() == self.request.checks.len()
            && self.windows.len() == self.request.window_count()
    }
}

/// Applies `settlement` to loaded counter states: the arithmetic every in-process store
/// runs under its locks (`slot_of` and `slots` as for [`apply`](crate::apply)). Windows
/// the reservation charged move by their check's `actual - estimate`: refunded when
/// negative ([`Window::refund`](crate::Window::refund)), forced past the limit when
/// positive ([`Window::force`](crate::Window::force)). Concurrency windows are left to
/// the store, which frees the reservation's slots.
pub fn settle(settlement: &Settlement, slot_of: &[usize], slots: &mut [Slot], now: Micros) {
    let windows = settlement
        .request
        .windows()
        .zip(slot_of)
        .zip(&settlement.windows);
    let mut check_index = 0;
    let mut window_in_check = 0;
    for (((check, lw), &slot), &moved) in windows {
        let index = check_index;
        window_in_check += 1;
        if window_in_check == check.limit().windows().len() {
            check_index += 1;
            window_in_check = 0;
        }
        if !moved || lw.window.algorithm() == Algorithm::Concurrency {
            continue;
        }
        let delta = settlement.delta(index);
        let slot = &mut slots[slot];
        if delta < 0 {
            let back = (-delta).min(u64::MAX as i128) as u64;
            if let Some(state) = lw.window.refund(slot.state, now, back) {
                slot.state = Some(state);
                slot.dirty = true;
            }
        } else if delta > 0 {
            let more = delta.min(u64::MAX as i128) as u64;
            slot.state = Some(lw.window.force(slot.state, now, more));
            slot.dirty = true;
        }
    }
}
