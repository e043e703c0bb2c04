//! Who gets what, changed at run time, without a reload: a subject (a key value such as
//! `customer:42`) put on a plan or given its own rates for one limit, and block and
//! allow lists by subject, address or CIDR, each with an optional expiry and reason.
//!
//! Entries are kept as records in the counters' store (see `sluice_engine::records`),
//! so every instance sharing the store enforces a change once it next polls the
//! records' version, and they survive a restart wherever counters do. A change keeps
//! the counters: plans and overrides share the limit's name, so what was spent stays
//! spent in every window whose algorithm and period stay the same.
//!
//! [`Entry`] is what an operator writes and what is stored; [`Directory`] is the
//! indexed snapshot decisions read; [`Access`] holds the directory an instance
//! enforces and refreshes it from the store.

mod directory;
mod enforced;
mod entry;

pub use directory::{Directory, Screen};
pub use enforced::{Access, POLL_INTERVAL, now_ms};
pub use entry::{Entry, EntryError, Kind, MAX_REASON_CHARS, Rates, canonical, parse_net};
