//! The sluice decision engine: rates, the three algorithms, limits, atomic
//! multi-check decisions and the [`Store`] trait every storage backend implements.
//!
//! This crate does no I/O. A front door (HTTP API, proxy, gRPC, tower layer) turns
//! a request into [`Check`]s, hands a [`DecisionRequest`] to [`decide`], and gets a
//! [`Decision`] back. Where the counters live is the [`Store`]'s business; stores
//! that keep state in this process evaluate it with [`apply`], the same function
//! the reference tests drive, so every in-process backend shares one algorithm.
//!
//! Module map:
//! - [`rate`]: `5/minute`, `100/10s` and friends, and `100/month`.
//! - [`calendar`]: UTC calendar months, for `N/month` fixed windows.
//! - [`algorithm`]: gcra, sliding window and fixed window over one window's [`State`].
//! - [`limit`]: named limits with one or more windows, and the set of them.
//! - [`decision`]: checks, atomic decisions over many windows, results.
//! - [`reservation`]: reserve an estimate, settle the actual cost (refunds and debt).
//! - [`store`]: the storage trait and its error type.
//! - [`clock`]: the time source for in-process stores.

pub mod algorithm;
pub mod calendar;
pub mod clock;
pub mod decision;
pub mod limit;
pub mod rate;
pub mod records;
pub mod reservation;
pub mod store;

pub use algorithm::{Algorithm, Evaluation, MAX_DEBT_MICROS, State, Window};
pub use clock::{Clock, ManualClock, Micros, SystemClock, millis_ceil, seconds_ceil};
pub use decision::{
    Check, CheckError, Decision, DecisionRequest, Listed, MAX_KEY_BYTES, Slot, WindowOutcome,
    WindowOutcomes, WindowResult, apply, decide, refund,
};
pub use limit::{Limit, LimitError, LimitSet, LimitSpec, LimitWindow, OVERRIDE_PLAN};
pub use rate::{Period, Rate, RateError};
pub use records::{Record, Records};
pub use reservation::{Hold, HoldId, SettleStatus, Settlement, settle};
pub use store::{Outcomes, Store, StoreError, StoreFuture, StoreStats};
