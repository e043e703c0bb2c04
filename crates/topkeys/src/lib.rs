//! Who is spending a limit's budget, and who is being denied, in bounded memory.
//!
//! - [`sketch`]: [`SpaceSaving`], the heavy-hitters sketch (Metwally, Agrawal and El
//!   Abbadi, "Efficient computation of frequent and top-k elements in data streams",
//!   2005): `k` counters whatever the number of keys; every count it reports is at most
//!   `N / k` above the truth, `N` being the total weight it was fed.
//! - [`window`]: [`TopKeys`], one limit's sketches in rotating time buckets, for the last
//!   minute and the last hour, by spend (cost charged) and by denials.
//! - [`timeline`]: [`Timeline`], one limit's decisions and denials per minute over the
//!   last hour, in atomics.
//!
//! Nothing here does I/O or reads a clock: callers pass the time (seconds since some
//! start), so tests drive it.

pub mod sketch;
pub mod timeline;
pub mod window;

pub use sketch::{Entry, SpaceSaving};
pub use timeline::{Minute, Timeline};
pub use window::{By, ParseError, Top, TopKeys, Window};

use std::sync::atomic::{AtomicUsize, Ordering};

/// Hands each thread a number, round robin, the first time it records: the shard it
/// records into (modulo the number of shards). Only threads that decide take numbers,
/// so the serving threads of one listener get consecutive ones and distinct shards.
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_SLOT: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

/// This thread's number (see [`NEXT_THREAD`]).
fn thread_slot() -> usize {
    THREAD_SLOT.with(|slot| *slot)
}

/// Shards per structure by default: one per core, at most 8.
fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 8)
}
