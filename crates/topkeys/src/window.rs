//! One limit's heaviest keys over the last minute and the last hour.
//!
//! Each window is a ring of time buckets, each holding two [`SpaceSaving`] sketches (one
//! fed the cost charged, one fed 1 per denial):
//!
//! | window | buckets | covers |
//! |---|---|---|
//! | [`Window::Minute`] | 6 of 10 s | the current bucket and the 5 before it: the last 50 to 60 s |
//! | [`Window::Hour`] | 12 of 5 min | the current bucket and the 11 before it: the last 55 to 60 min |
//!
//! A decision feeds the current bucket of both rings; a bucket is cleared when its slot
//! comes round again. A query merges the window's buckets without dropping any key: a
//! key's count is the sum over buckets of its count there, or of that bucket's
//! [`SpaceSaving::floor`] where it is not held (the most it can have weighed there). So
//! every reported count is at least the truth and at most `N / k` above it, `N` being
//! the window's total (the errors add up to at most the sum of the buckets' `N_b / k`),
//! and every key that weighed more than `N / k` in the window is listed.
//!
//! The rings are sharded by recording thread (see [`TopKeys`]); a query merges the
//! shards' buckets the same way, and the bound holds over all of them.
//!
//! Memory: `2 × (6 + 12) × k` counters per shard per limit, each holding one key (keys
//! are at most 512 bytes), whatever the number of distinct keys; a sketch grows only as
//! keys arrive. A decision takes its thread's shard's mutex (uncontended) for one hash
//! and two or four counter updates.

use std::collections::HashMap;
use std::hash::BuildHasher;

use hashbrown::DefaultHashBuilder;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use crate::sketch::{Entry, SpaceSaving, sort_heaviest_first};

/// Which time window to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last minute (50 to 60 s, in 10 s buckets).
    Minute,
    /// The last hour (55 to 60 min, in 5 min buckets).
    Hour,
}

/// What to rank keys by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// Cost charged.
    Spend,
    /// Checks denied.
    Denials,
}

/// A window or ranking name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not `minute` or `hour`.
    #[error("unknown window `{0}`: use minute or hour")]
    Window(String),
    /// Not `spend` or `denials`.
    #[error("unknown ranking `{0}`: use spend or denials")]
    By(String),
}

impl Window {
    /// Both windows.
    pub const ALL: [Window; 2] = [Window::Minute, Window::Hour];

    /// The window's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
        }
    }

    /// Seconds per bucket and buckets per window.
    fn shape(self) -> (u64, usize) {
        match self {
            Window::Minute => (10, 6),
            Window::Hour => (300, 12),
        }
    }
}

impl FromStr for Window {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "minute" => Ok(Window::Minute),
            "hour" => Ok(Window::Hour),
            other => Err(ParseError::Window(other.chars().take(40).collect())),
        }
    }
}

impl By {
    /// The ranking's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            By::Spend => "spend",
            By::Denials => "denials",
        }
    }
}

impl FromStr for By {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "spend" => Ok(By::Spend),
            "denials" => Ok(By::Denials),
            other => Err(ParseError::By(other.chars().take(40).collect())),
        }
    }
}

/// The answer to a query: the heaviest keys of one window by one ranking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Top {
    /// The window's total (cost charged, or denials) over every key.
    pub total: u64,
    /// The most any count may be above the truth: `total / k`.
    pub error_bound: u64,
    /// The heaviest keys, heaviest first.
    pub keys: Vec<Entry>,
}

#[derive(Debug)]
struct Bucket {
    /// The bucket's number (seconds / bucket length) plus one; 0 when never used.
    epoch: u64,
    spend: SpaceSaving,
    denials: SpaceSaving,
}

#[derive(Debug)]
struct Ring {
    window: Window,
    buckets: Vec<Bucket>,
}

impl Ring {
    fn new(window: Window, capacity: usize) -> Self {
        let (_, count) = window.shape();
        let buckets = (0..count)
            .map(|_| Bucket {
                epoch: 0,
                spend: SpaceSaving::new(capacity),
                denials: SpaceSaving::new(capacity),
            })
            .collect();
        Ring { window, buckets }
    }

    fn epoch(&self, now_secs: u64) -> u64 {
        now_secs / self.window.shape().0 + 1
    }

    fn current(&mut self, now_secs: u64) -> &mut Bucket {
        let epoch = self.epoch(now_secs);
        let len = self.buckets.len();
        let bucket = &mut self.buckets[(epoch % len as u64) as usize];
        if bucket.epoch != epoch {
            bucket.epoch = epoch;
            bucket.spend.clear();
            bucket.denials.clear();
        }
        bucket
    }

    /// The buckets inside the window at `now_secs`.
    fn live(&self, now_secs: u64) -> impl Iterator<Item = &Bucket> {
        let epoch = self.epoch(now_secs);
        let oldest = epoch.saturating_sub(self.buckets.len() as u64 - 1);
        self.buckets
            .iter()
            .filter(move |b| b.epoch != 0 && b.epoch >= oldest && b.epoch <= epoch)
    }
}

#[derive(Debug)]
struct Rings {
    minute: Ring,
    hour: Ring,
}

/// One thread's share of a limit's sketches, alone on its cache lines so that two
/// threads recording at once do not pull each other's lines back and forth.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<Rings>);

/// One limit's heaviest keys, by spend and by denials, over the last minute and hour.
///
/// The sketches are sharded by recording thread (one shard per core by default): a
/// serving thread keeps to its own shard, so recording takes an uncontended lock on
/// memory no other core writes. A query merges every shard's buckets the way it merges
/// buckets (each shard's sketches bound their own errors by their own totals, so the
/// bound over all of them is still `N / k`).
#[derive(Debug)]
pub struct TopKeys {
    capacity: usize,
    /// foldhash, seeded at random per process (as the memory store's tables are):
    /// callers choose keys but cannot see or aim at hashes.
    hasher: DefaultHashBuilder,
    shards: Box<[Shard]>,
}

impl TopKeys {
    /// Empty, with `capacity` counters per sketch (so an error bound of `N / capacity`)
    /// and one shard per core (at most [`TopKeys::MAX_SHARDS`]).
    pub fn new(capacity: usize) -> Self {
        Self::with_shards(capacity, crate::default_shards())
    }

    /// The most shards [`TopKeys::new`] makes.
    pub const MAX_SHARDS: usize = 8;

    /// Empty, with `capacity` counters per sketch and `shards` shards (1 to
    /// [`TopKeys::MAX_SHARDS`]).
    pub fn with_shards(capacity: usize, shards: usize) -> Self {
        let capacity = capacity.max(1);
        let shards = shards.clamp(1, Self::MAX_SHARDS);
        TopKeys {
            capacity,
            hasher: DefaultHashBuilder::default(),
            shards: (0..shards)
                .map(|_| {
                    Shard(Mutex::new(Rings {
                        minute: Ring::new(Window::Minute, capacity),
                        hour: Ring::new(Window::Hour, capacity),
                    }))
                })
                .collect(),
        }
    }

    /// Counters per sketch.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many shards the sketches are split into.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Records one check of `key` at `now_secs`: `spend` the cost it charged (0 for
    /// none), `denied` whether it was denied.
    pub fn record(&self, key: &str, spend: u64, denied: bool, now_secs: u64) {
        if spend == 0 && !denied {
            return;
        }
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[crate::thread_slot() % self.shards.len()];
        let mut guard = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
        let rings = &mut *guard;
        for ring in [&mut rings.minute, &mut rings.hour] {
            let bucket = ring.current(now_secs);
            bucket.spend.add(key, hash, spend);
            if denied {
                bucket.denials.add(key, hash, 1);
            }
        }
    }

    /// The `n` heaviest keys of `window` by `by`, at `now_secs`.
    pub fn top(&self, window: Window, by: By, n: usize, now_secs: u64) -> Top {
        let mut total: u64 = 0;
        let mut floors: u64 = 0;
        // Per key, over the sketches that hold it: its counts above their floors, its
        // errors, and their floors. Its merged count is then the sum of every sketch's
        // floor plus the first; its error the sum of the floors of the sketches that do
        // not hold it plus the second.
        let mut merged: HashMap<String, [u64; 3]> = HashMap::new();
        for shard in &self.shards {
            let rings = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
            let ring = match window {
                Window::Minute => &rings.minute,
                Window::Hour => &rings.hour,
            };
            for bucket in ring.live(now_secs) {
                let sketch = match by {
                    By::Spend => &bucket.spend,
                    By::Denials => &bucket.denials,
                };
                total = total.saturating_add(sketch.total());
                let floor = sketch.floor();
                floors = floors.saturating_add(floor);
                for (key, count, error) in sketch.entries() {
                    let slot = match merged.get_mut(key) {
                        Some(slot) => slot,
                        None => merged.entry(key.to_owned()).or_default(),
                    };
                    // A held count is at least its sketch's floor.
                    slot[0] = slot[0].saturating_add(count.saturating_sub(floor));
                    slot[1] = slot[1].saturating_add(error);
                    slot[2] = slot[2].saturating_add(floor);
                }
            }
        }
        let mut keys: Vec<Entry> = merged
            .into_iter()
            .map(|(key, [above, errors, held_floors])| Entry {
                key,
                count: floors.saturating_add(above),
                error: floors.saturating_sub(held_floors).saturating_add(errors),
            })
            .collect();
        sort_heaviest_first(&mut keys);
        keys.truncate(n);
        Top {
            total,
            error_bound: total / self.capacity as u64,
            keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn minute_forgets_after_a_minute_and_hour_keeps() {
        let top = TopKeys::new(8);
        for _ in 0..5 {
            top.record("alice", 2, false, 100);
        }
        top.record("bob", 1, true, 100);
        let minute = top.top(Window::Minute, By::Spend, 10, 105);
        assert_eq!(minute.total, 11);
        assert_eq!(minute.keys[0].key, "alice");
        assert_eq!(minute.keys[0].count, 10);
        let denials = top.top(Window::Minute, By::Denials, 10, 105);
        assert_eq!(denials.keys.len(), 1);
        assert_eq!(denials.keys[0].key, "bob");
        // 100 s is in bucket [100, 110); at 160 s the window is [110, 170).
        assert!(top.top(Window::Minute, By::Spend, 10, 160).keys.is_empty());
        let hour = top.top(Window::Hour, By::Spend, 10, 160);
        assert_eq!(hour.keys[0].key, "alice");
        // 100 s is in the 5-minute bucket [0, 300); at 3600 s the window is [300, 3600].
        assert!(top.top(Window::Hour, By::Spend, 10, 3600).keys.is_empty());
    }

    #[test]
    fn merged_buckets_add_up_and_report_their_error() {
        let top = TopKeys::new(2);
        // Bucket 1: a=3, b=2, c=1 (c replaces b: count 3, error 2).
        for (key, n) in [("a", 3), ("b", 2), ("c", 1)] {
            for _ in 0..n {
                top.record(key, 1, false, 0);
            }
        }
        // Bucket 2: a=4 only.
        for _ in 0..4 {
            top.record("a", 1, false, 10);
        }
        let got = top.top(Window::Minute, By::Spend, 10, 15);
        assert_eq!(got.total, 10);
        assert_eq!(got.error_bound, 5);
        assert_eq!(got.keys[0].key, "a");
        assert_eq!(got.keys[0].count, 7);
        for entry in &got.keys {
            assert!(entry.error <= got.error_bound, "{entry:?}");
        }
    }

    /// Many keys over every bucket of the minute: each merged count is within its error
    /// of the truth, each error within N/k, and every key above N/k is listed.
    #[test]
    fn merged_window_keeps_the_bound() {
        let k = 16;
        let top = TopKeys::new(k);
        let mut truth: HashMap<String, u64> = HashMap::new();
        let mut x: u64 = 99;
        for i in 0..60_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = match i % 10 {
                0..=2 => format!("hot{}", (x >> 40) % 3),
                _ => format!("k{}", (x >> 33) % 2_000),
            };
            let weight = 1 + (x >> 61);
            // Spread over 60 s: the six 10 s buckets of the minute at 60 s.
            top.record(&key, weight, false, i / 1_000);
            *truth.entry(key).or_default() += weight;
        }
        let answer = top.top(Window::Minute, By::Spend, usize::MAX, 59);
        let n: u64 = truth.values().sum();
        assert_eq!(answer.total, n);
        assert_eq!(answer.error_bound, n / k as u64);
        for entry in &answer.keys {
            let real = truth[&entry.key];
            assert!(entry.count >= real, "{entry:?} < {real}");
            assert!(entry.count - real <= entry.error, "{entry:?} vs {real}");
            assert!(entry.error <= answer.error_bound, "{entry:?}");
        }
        let listed: Vec<&str> = answer.keys.iter().map(|e| e.key.as_str()).collect();
        for (key, weight) in &truth {
            if *weight > answer.error_bound {
                assert!(listed.contains(&key.as_str()), "{key} ({weight}) missing");
            }
        }
        assert_eq!(&answer.keys[0].key[..3], "hot");
    }

    /// Threads record into their own shards; a query sees the sum.
    #[test]
    fn shards_merge_into_one_answer() {
        let top = Arc::new(TopKeys::with_shards(50, 4));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let top = Arc::clone(&top);
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        top.record("shared", 1, false, 5);
                    }
                    top.record(&format!("t{t}"), t + 1, true, 5);
                })
            })
            .collect();
        for thread in threads {
            assert!(thread.join().is_ok());
        }
        let spend = top.top(Window::Minute, By::Spend, 3, 5);
        assert_eq!(spend.total, 40 + 10);
        assert_eq!(
            spend.keys[0],
            Entry {
                key: "shared".into(),
                count: 40,
                error: 0
            }
        );
        assert_eq!(spend.keys[1].key, "t3");
        let denials = top.top(Window::Minute, By::Denials, 10, 5);
        assert_eq!(denials.total, 4);
        assert_eq!(denials.keys.len(), 4);
    }

    #[test]
    fn names_parse() {
        assert_eq!("hour".parse::<Window>(), Ok(Window::Hour));
        assert_eq!("denials".parse::<By>(), Ok(By::Denials));
        assert!("day".parse::<Window>().is_err());
        assert!("cost".parse::<By>().is_err());
    }
}
