//! The storage trait. One call decides a whole [`DecisionRequest`] atomically and
//! returns one [`WindowOutcome`] per window, so a backend can do it in one round trip
//! (a Redis script, a SQL function) or under its own locks (memory, disk).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::decision::{DecisionRequest, WindowOutcomes};
use crate::limit::Limit;
use crate::records::{Record, Records};
use crate::reservation::{Hold, SettleStatus, Settlement};

/// A boxed future as the [`Store`] methods return it; boxed so stores can be chosen at run time.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What a store answers for one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcomes {
    /// One outcome per window, in [`DecisionRequest::windows`] order.
    pub windows: WindowOutcomes,
    /// Decided without the shared store (the store-failure policy stepped in).
    pub degraded: bool,
}

/// Counts a store keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Counters currently held (where the backend can tell cheaply).
    pub keys: u64,
    /// Counters dropped before they expired because the store was full.
    pub evictions: u64,
    /// Decisions answered from a local cache of denials, without a round trip to the
    /// shared store (the Redis store's deny cache).
    pub local_denials: u64,
}

/// Why a store could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store did not answer in time.
    #[error("store timed out after {0:?}")]
    Timeout(Duration),
    /// The store answered something this version does not understand.
    #[error("store protocol error: {0}")]
    Protocol(String),
}

/// Where counters live. Implementations must decide a request atomically: either every
/// charge of a decision lands or none does (but `charge_denied` windows), and two
/// concurrent decisions on one counter behave as if one ran after the other.
pub trait Store: Send + Sync {
    /// Decides every window of `request` at once.
    fn decide<'a>(&'a self, request: &'a DecisionRequest) -> StoreFuture<'a, Outcomes>;

    /// Decides `request` as [`Store::decide`] does, when the store can answer without
    /// waiting (it keeps its counters in this process); `None` when it must wait. The
    /// engine asks here first, which spares an in-process store a boxed future per
    /// decision. The default never answers.
    fn decide_now(&self, _request: &DecisionRequest) -> Option<Result<Outcomes, StoreError>> {
        None
    }

    /// Forgets every window of `limit` for `key`.
    fn reset<'a>(&'a self, limit: &'a Limit, key: &'a str) -> StoreFuture<'a, ()>;

    /// Forgets every key's windows of `limit`; returns how many counters were removed.
    /// Backends that cannot enumerate keys cheaply may refuse.
    fn reset_limit<'a>(&'a self, limit: &'a Limit) -> StoreFuture<'a, u64> {
        let backend = self.backend();
        let name = limit.name().to_string();
        Box::pin(async move {
            Err(StoreError::Protocol(format!(
                "the {backend} store cannot reset every key of {name}"
            )))
        })
    }

    /// Gives back what an earlier decision of `request` charged: the cost of every
    /// window whose `charged` flag is set (in [`DecisionRequest::windows`] order, as
    /// [`Decision::charged_windows`](crate::Decision::charged_windows) says), atomically,
    /// never below an empty counter (see [`Window::refund`](crate::Window::refund)).
    /// Not retried by callers: a refund that may have run must not run twice. Stores
    /// that cannot refund answer an error saying so.
    fn refund<'a>(
        &'a self,
        request: &'a DecisionRequest,
        charged: &'a [bool],
    ) -> StoreFuture<'a, ()> {
        let _ = (request, charged);
        let backend = self.backend();
        Box::pin(async move {
            Err(StoreError::Protocol(format!(
                "refunds not supported by this store ({backend})"
            )))
        })
    }

    /// Decides `request` like [`Store::decide`], and when it is allowed (and not a dry
    /// run) records `hold` and gives it one slot of every concurrency window, in the
    /// same atomic step (see [`reservation`](crate::reservation)). Never repeated by
    /// callers. Stores without reservations answer an error saying so.
    fn reserve<'a>(
        &'a self,
        request: &'a DecisionRequest,
        hold: &'a Hold,
    ) -> StoreFuture<'a, Outcomes> {
        let _ = (request, hold);
        let backend = self.backend();
        Box::pin(async move {
            Err(StoreError::Protocol(format!(
                "reservations not supported by this store ({backend})"
            )))
        })
    }

    /// Applies `settlement` atomically: when it names a hold, only if that hold is open
    /// (then marks it settled and frees its slots); without one, unconditionally. Never
    /// repeated by callers (a settlement is idempotent only when it names a hold).
    fn settle<'a>(&'a self, settlement: &'a Settlement) -> StoreFuture<'a, SettleStatus> {
        let _ = settlement;
        let backend = self.backend();
        Box::pin(async move {
            Err(StoreError::Protocol(format!(
                "reservations not supported by this store ({backend})"
            )))
        })
    }

    /// Every record with their version (see [`records`](crate::records)). Stores
    /// without records answer an error saying so.
    fn records(&self) -> StoreFuture<'_, Records> {
        Box::pin(std::future::ready(Err(self.no_records())))
    }

    /// The records' version alone: what instances poll to learn of a change, one round
    /// trip.
    fn records_version(&self) -> StoreFuture<'_, u64> {
        Box::pin(std::future::ready(Err(self.no_records())))
    }

    /// Writes `record` (replacing one with its id) and moves the version; answers the
    /// new version. Durable, where counters are, once it answers.
    fn put_record<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, u64> {
        let _ = record;
        Box::pin(std::future::ready(Err(self.no_records())))
    }

    /// Removes the record `id`, moving the version when there was one; answers whether
    /// there was.
    fn remove_record<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let _ = id;
        Box::pin(std::future::ready(Err(self.no_records())))
    }

    /// The error of a store without records.
    #[doc(hidden)]
    fn no_records(&self) -> StoreError {
        StoreError::Protocol(format!(
            "runtime assignments and block lists are not supported by this store ({})",
            self.backend()
        ))
    }

    /// Succeeds when the store can serve decisions: one round trip to the store.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// Whether the store can serve decisions, as cheaply as the store can tell: what
    /// unauthenticated endpoints (`/readyz`, `/v1/stats`) answer from, so that flooding
    /// them cannot flood the store. The default asks [`Store::ping`], which costs nothing
    /// for in-process stores; a store behind a network keeps a state instead (the
    /// failure policy's wrapper does, refreshing it at most once a probe interval).
    fn health(&self) -> StoreFuture<'_, ()> {
        self.ping()
    }

    /// Counters for metrics.
    fn stats(&self) -> StoreStats;

    /// The backend's name, e.g. `memory`.
    fn backend(&self) -> &'static str;
}
