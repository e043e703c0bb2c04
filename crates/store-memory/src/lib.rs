//! The in-process counter store: sluice's embedded default and the fallback the
//! store-failure policy `local` decides with.
//!
//! Counters live in a fixed number of shards, each a `Mutex` around a hash table.
//! A decision locks the shards of all its counters in ascending index order (so two
//! decisions can never wait on each other in a cycle), reads the states, runs
//! [`sluice_engine::apply`] and writes back what changed: atomic across every window
//! of every check.
//!
//! Memory is bounded. Every entry carries the time its state expires; a background
//! thread sweeps expired entries every `sweep_interval`, and a shard that is full when
//! a new counter arrives first drops its expired entries and then evicts the
//! sixteenth of its capacity nearest to expiry (counted in
//! [`StoreStats::evictions`]). A flood of distinct keys therefore costs at most
//! `max_keys` entries, and the counters evicted first are the ones that had least
//! time left to matter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashTable};
use sluice_engine::{
    Clock, DecisionRequest, Limit, Micros, Outcomes, Slot, State, Store, StoreFuture, StoreStats,
    SystemClock, Window, WindowOutcomes, apply, refund,
};
use smallvec::SmallVec;
use std::hash::BuildHasher;

/// Entries per shard below which more shards would only cost memory.
const ENTRIES_PER_SHARD: usize = 1024;
/// The most shards a store uses; far more than the cores that contend for them.
const MAX_SHARDS: usize = 64;

/// A counter a decision wrote, as [`MemoryStore::decide_sync_with`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change<'a> {
    /// The counter's name (`<limit>:<algorithm tag><period seconds>`).
    pub counter: &'a str,
    /// The key it is counted on.
    pub key: &'a str,
    /// Its new state.
    pub state: State,
    /// When that state expires (the store drops it then).
    pub expires_at: Micros,
}

/// Settings of a [`MemoryStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStoreConfig {
    /// The most counters held at once; one counter is one window of one limit for one key.
    pub max_keys: usize,
    /// How often expired counters are swept.
    pub sweep_interval: Duration,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        MemoryStoreConfig {
            max_keys: 1_000_000,
            sweep_interval: Duration::from_secs(1),
        }
    }
}

/// A sharded, bounded, swept in-process store. Cheap to share behind an `Arc`.
pub struct MemoryStore {
    inner: Arc<Inner>,
    // Dropping the sender stops the sweeper thread.
    _stop_sweeper: mpsc::Sender<()>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: DefaultHashBuilder,
    clock: Arc<dyn Clock>,
    shard_capacity: usize,
    evictions: AtomicU64,
}

#[derive(Default)]
struct Shard {
    table: HashTable<Entry>,
}

struct Entry {
    hash: u64,
    counter: Arc<str>,
    key: CompactString,
    state: State,
    expires_at: Micros,
}

/// Where one counter lives.
struct Location<'a> {
    hash: u64,
    shard: usize,
    counter: &'a Arc<str>,
    key: &'a str,
    window: &'a Window,
}

impl MemoryStore {
    /// A store on the system clock.
    pub fn new(config: MemoryStoreConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock::new()))
    }

    /// A store on the given clock (tests use a manual one).
    pub fn with_clock(config: MemoryStoreConfig, clock: Arc<dyn Clock>) -> Self {
        let max_keys = config.max_keys.max(1);
        let shard_count = (max_keys / ENTRIES_PER_SHARD)
            .next_power_of_two()
            .clamp(1, MAX_SHARDS);
        let inner = Arc::new(Inner {
            shards: (0..shard_count)
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            hasher: DefaultHashBuilder::default(),
            clock,
            shard_capacity: (max_keys / shard_count).max(1),
            evictions: AtomicU64::new(0),
        });
        let (stop, stopped) = mpsc::channel();
        let weak = Arc::downgrade(&inner);
        let interval = config.sweep_interval.max(Duration::from_millis(10));
        // If the thread cannot be spawned the store still works; the shards' own
        // eviction keeps memory bounded.
        let _ = std::thread::Builder::new()
            .name("sluice-memory-sweeper".into())
            .spawn(move || sweep_until_dropped(weak, stopped, interval));
        MemoryStore {
            inner,
            _stop_sweeper: stop,
        }
    }

    /// Decides `request` now, synchronously: the whole of this store's work.
    pub fn decide_sync(&self, request: &DecisionRequest) -> Outcomes {
        self.inner.decide(request, |_| {})
    }

    /// Like [`MemoryStore::decide_sync`], and calls `changed` once with every counter the
    /// decision wrote (not at all when it wrote none) while the decision still holds its
    /// shard locks. A store layered on this one (the disk store's journal) records changes
    /// there, so two decisions on one counter are recorded in the order they were decided.
    /// `changed` must be quick and must not call back into this store.
    pub fn decide_sync_with(
        &self,
        request: &DecisionRequest,
        changed: impl FnOnce(&[Change<'_>]),
    ) -> Outcomes {
        self.inner.decide(request, changed)
    }

    /// Gives back what a decision of `request` charged to the windows flagged in
    /// `charged` (see [`Store::refund`]), synchronously.
    pub fn refund_sync(&self, request: &DecisionRequest, charged: &[bool]) {
        self.refund_sync_with(request, charged, |_| {});
    }

    /// Like [`MemoryStore::refund_sync`], and calls `changed` with every counter the
    /// refund wrote, under its locks (see [`MemoryStore::decide_sync_with`]).
    pub fn refund_sync_with(
        &self,
        request: &DecisionRequest,
        charged: &[bool],
        changed: impl FnOnce(&[Change<'_>]),
    ) {
        if request.window_count() != charged.len() || !charged.contains(&true) {
            return;
        }
        self.inner.update(
            request,
            |request, slot_of, slots, now| {
                refund(request, charged, slot_of, slots, now);
                WindowOutcomes::new()
            },
            changed,
        );
    }

    /// Forgets every window of `limit` for `key`, synchronously.
    pub fn reset_sync(&self, limit: &Limit, key: &str) {
        self.reset_sync_with(limit, key, |_| {});
    }

    /// Forgets every key's windows of `limit`, calling `removed` with each counter and
    /// key it drops (a durable store journals them); returns how many were dropped.
    pub fn reset_limit_sync_with(
        &self,
        limit: &Limit,
        mut removed: impl FnMut(&Arc<str>, &str),
    ) -> u64 {
        let counters: SmallVec<[&str; 4]> = limit.windows().iter().map(|w| &*w.counter).collect();
        let mut count = 0;
        for shard in self.inner.shards.iter() {
            self.inner.lock_shard(shard).table.retain(|e| {
                let drop = counters.contains(&&*e.counter);
                if drop {
                    removed(&e.counter, &e.key);
                    count += 1;
                }
                !drop
            });
        }
        count
    }

    /// Like [`MemoryStore::reset_sync`], and calls `removed` with each window's counter
    /// name while that counter's shard is locked (see [`MemoryStore::decide_sync_with`]).
    pub fn reset_sync_with(&self, limit: &Limit, key: &str, mut removed: impl FnMut(&str)) {
        for lw in limit.windows() {
            let hash = self.inner.hasher.hash_one((&*lw.counter, key));
            let mut shard = self.inner.lock(self.inner.shard_of(hash));
            if let Ok(entry) = shard
                .table
                .find_entry(hash, |e| e.matches(hash, &lw.counter, key))
            {
                entry.remove();
            }
            removed(&lw.counter);
        }
    }

    /// Puts a counter's state back, e.g. one a durable store read at start. An expired
    /// state is ignored; a full shard makes room as for a new counter. Pass the same
    /// `Arc` for every key of one counter to share its name.
    pub fn restore(&self, counter: &Arc<str>, key: &str, state: State, expires_at: Micros) {
        let now = self.inner.clock.now();
        if expires_at <= now {
            return;
        }
        let hash = self.inner.hasher.hash_one((&**counter, key));
        let mut shard = self.inner.lock(self.inner.shard_of(hash));
        if let Some(entry) = shard
            .table
            .find_mut(hash, |e| e.matches(hash, counter, key))
        {
            entry.state = state;
            entry.expires_at = expires_at;
            return;
        }
        let evicted = shard.insert_entry(
            hash,
            counter,
            key,
            state,
            expires_at,
            now,
            self.inner.shard_capacity,
            &[],
        );
        self.inner.count_evictions(evicted);
    }

    /// Drops every expired counter now (the sweeper does this periodically).
    pub fn sweep(&self) {
        self.inner.sweep();
    }

    /// How many counters are held.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| self.inner.lock_shard(s).table.len())
            .sum()
    }

    /// Whether no counters are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Entry {
    fn matches(&self, hash: u64, counter: &str, key: &str) -> bool {
        self.hash == hash && &*self.counter == counter && &*self.key == key
    }
}

impl Inner {
    fn shard_of(&self, hash: u64) -> usize {
        // Bits the table itself does not use for bucket or control bytes.
        ((hash >> 24) as usize) & (self.shards.len() - 1)
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        self.lock_shard(&self.shards[shard])
    }

    fn lock_shard<'a>(&self, shard: &'a Mutex<Shard>) -> MutexGuard<'a, Shard> {
        // No code path panics while holding a shard, so a poisoned lock still guards
        // consistent data: keep serving rather than failing every later decision.
        shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn decide(&self, request: &DecisionRequest, changed: impl FnOnce(&[Change<'_>])) -> Outcomes {
        let windows = self.update(request, apply, changed);
        Outcomes {
            windows,
            degraded: false,
        }
    }

    /// Runs `op` (the engine's [`apply`], or a refund) over the request's counters under
    /// their shard locks and writes back what it changed.
    fn update(
        &self,
        request: &DecisionRequest,
        op: impl FnOnce(&DecisionRequest, &[usize], &mut [Slot], Micros) -> WindowOutcomes,
        changed: impl FnOnce(&[Change<'_>]),
    ) -> WindowOutcomes {
        if request.window_count() == 1 {
            self.update_one_counter(request, op, changed)
        } else {
            self.update_many_counters(request, op, changed)
        }
    }

    /// The common case, one window of one check: one lock, one lookup.
    fn update_one_counter(
        &self,
        request: &DecisionRequest,
        op: impl FnOnce(&DecisionRequest, &[usize], &mut [Slot], Micros) -> WindowOutcomes,
        changed: impl FnOnce(&[Change<'_>]),
    ) -> WindowOutcomes {
        let Some((check, lw)) = request.windows().next() else {
            return WindowOutcomes::new();
        };
        let key = check.key();
        let hash = self.hasher.hash_one((&*lw.counter, key));
        let mut shard = self.lock(self.shard_of(hash));
        // Time is read under the lock: a decision that read the clock earlier but took the
        // lock later would judge a newer window's state by an older window.
        let now = self.clock.now();
        let mut slots = [Slot::default()];
        match shard
            .table
            .find_mut(hash, |e| e.matches(hash, &lw.counter, key))
        {
            Some(entry) => {
                slots[0].state = (entry.expires_at > now).then_some(entry.state);
                let outcomes = op(request, &[0], &mut slots, now);
                if let (true, Some(state)) = (slots[0].dirty, slots[0].state) {
                    entry.state = state;
                    entry.expires_at = lw.window.expires_at(&state);
                    changed(&[Change {
                        counter: &lw.counter,
                        key,
                        state,
                        expires_at: entry.expires_at,
                    }]);
                }
                outcomes
            }
            None => {
                let outcomes = op(request, &[0], &mut slots, now);
                if let (true, Some(state)) = (slots[0].dirty, slots[0].state) {
                    let at = Location {
                        hash,
                        shard: 0,
                        counter: &lw.counter,
                        key,
                        window: &lw.window,
                    };
                    let evicted = shard.insert_new(&at, state, now, self.shard_capacity, &[]);
                    self.count_evictions(evicted);
                    changed(&[Change {
                        counter: &lw.counter,
                        key,
                        state,
                        expires_at: lw.window.expires_at(&state),
                    }]);
                }
                outcomes
            }
        }
    }

    /// Several windows or checks: lock every shard involved, in index order.
    fn update_many_counters(
        &self,
        request: &DecisionRequest,
        op: impl FnOnce(&DecisionRequest, &[usize], &mut [Slot], Micros) -> WindowOutcomes,
        changed: impl FnOnce(&[Change<'_>]),
    ) -> WindowOutcomes {
        let mut counters: SmallVec<[Location<'_>; 8]> = SmallVec::new();
        let mut slot_of: SmallVec<[usize; 8]> = SmallVec::new();
        for (check, lw) in request.windows() {
            let key = check.key();
            let existing = counters
                .iter()
                .position(|c| **c.counter == *lw.counter && c.key == key);
            let slot = existing.unwrap_or_else(|| {
                let hash = self.hasher.hash_one((&*lw.counter, key));
                counters.push(Location {
                    hash,
                    shard: self.shard_of(hash),
                    counter: &lw.counter,
                    key,
                    window: &lw.window,
                });
                counters.len() - 1
            });
            slot_of.push(slot);
        }

        let mut shard_ids: SmallVec<[usize; 8]> = counters.iter().map(|c| c.shard).collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: SmallVec<[MutexGuard<'_, Shard>; 8]> =
            shard_ids.iter().map(|&id| self.lock(id)).collect();
        // Under every lock, for the same reason as in `update_one_counter`.
        let now = self.clock.now();
        // Every counter's shard is in `shard_ids` by construction.
        let guard_index = |shard: usize| shard_ids.binary_search(&shard).unwrap_or(0);
        // Counters this decision writes are never evicted to make room for each other.
        let own: SmallVec<[u64; 8]> = counters.iter().map(|c| c.hash).collect();

        let mut slots: SmallVec<[Slot; 8]> = counters
            .iter()
            .map(|c| Slot {
                state: guards[guard_index(c.shard)]
                    .table
                    .find(c.hash, |e| e.matches(c.hash, c.counter, c.key))
                    .filter(|e| e.expires_at > now)
                    .map(|e| e.state),
                dirty: false,
            })
            .collect();

        let outcomes = op(request, &slot_of, &mut slots, now);

        let mut changes: SmallVec<[Change<'_>; 4]> = SmallVec::new();
        for (slot, c) in slots.iter().zip(&counters) {
            if let (true, Some(state)) = (slot.dirty, slot.state) {
                let evicted =
                    guards[guard_index(c.shard)].upsert(c, state, now, self.shard_capacity, &own);
                self.count_evictions(evicted);
                changes.push(Change {
                    counter: c.counter,
                    key: c.key,
                    state,
                    expires_at: c.window.expires_at(&state),
                });
            }
        }
        if !changes.is_empty() {
            changed(&changes);
        }
        drop(guards);
        outcomes
    }

    fn count_evictions(&self, evicted: u64) {
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    fn sweep(&self) {
        for shard in self.shards.iter() {
            let now = self.clock.now();
            self.lock_shard(shard).table.retain(|e| e.expires_at > now);
        }
    }
}

impl Shard {
    /// Writes a counter's state, making room first when the shard is full.
    /// Returns how many live counters were evicted for it.
    fn upsert(
        &mut self,
        at: &Location<'_>,
        state: State,
        now: Micros,
        capacity: usize,
        keep: &[u64],
    ) -> u64 {
        match self
            .table
            .find_mut(at.hash, |e| e.matches(at.hash, at.counter, at.key))
        {
            Some(entry) => {
                entry.state = state;
                entry.expires_at = at.window.expires_at(&state);
                0
            }
            None => self.insert_new(at, state, now, capacity, keep),
        }
    }

    /// Inserts a counter known to be absent, making room first when the shard is full;
    /// counters whose hash is in `keep` are not evicted for it.
    fn insert_new(
        &mut self,
        at: &Location<'_>,
        state: State,
        now: Micros,
        capacity: usize,
        keep: &[u64],
    ) -> u64 {
        let expires_at = at.window.expires_at(&state);
        self.insert_entry(
            at.hash, at.counter, at.key, state, expires_at, now, capacity, keep,
        )
    }

    /// Inserts an entry known to be absent, making room first when the shard is full.
    #[allow(clippy::too_many_arguments)]
    fn insert_entry(
        &mut self,
        hash: u64,
        counter: &Arc<str>,
        key: &str,
        state: State,
        expires_at: Micros,
        now: Micros,
        capacity: usize,
        keep: &[u64],
    ) -> u64 {
        let evicted = if self.table.len() >= capacity {
            self.make_room(now, capacity, keep)
        } else {
            0
        };
        self.table.insert_unique(
            hash,
            Entry {
                hash,
                counter: counter.clone(),
                key: key.into(),
                state,
                expires_at,
            },
            |e| e.hash,
        );
        evicted
    }

    /// Drops expired entries; if that is not enough, evicts the sixteenth of the
    /// capacity nearest to expiry, so the next inserts need no scan.
    fn make_room(&mut self, now: Micros, capacity: usize, keep: &[u64]) -> u64 {
        self.table.retain(|e| e.expires_at > now);
        if self.table.len() < capacity {
            return 0;
        }
        let batch = (capacity / 16).max(1);
        let mut expiries: Vec<Micros> = self.table.iter().map(|e| e.expires_at).collect();
        let (_, threshold, _) = expiries.select_nth_unstable(batch - 1);
        let threshold = *threshold;
        let mut evicted = 0;
        self.table.retain(|e| {
            // A counter the current decision just wrote is never its own victim (a tiny
            // shard may then hold a few more than its capacity, bounded by one decision).
            let evict = evicted < batch && e.expires_at <= threshold && !keep.contains(&e.hash);
            evicted += usize::from(evict);
            !evict
        });
        evicted as u64
    }
}

fn sweep_until_dropped(store: Weak<Inner>, stop: mpsc::Receiver<()>, interval: Duration) {
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        match store.upgrade() {
            Some(inner) => inner.sweep(),
            None => return,
        }
    }
}

impl Store for MemoryStore {
    fn decide<'a>(&'a self, request: &'a DecisionRequest) -> StoreFuture<'a, Outcomes> {
        Box::pin(std::future::ready(Ok(self.decide_sync(request))))
    }

    fn reset<'a>(&'a self, limit: &'a Limit, key: &'a str) -> StoreFuture<'a, ()> {
        self.reset_sync(limit, key);
        Box::pin(std::future::ready(Ok(())))
    }

    fn reset_limit<'a>(&'a self, limit: &'a Limit) -> StoreFuture<'a, u64> {
        let removed = self.reset_limit_sync_with(limit, |_, _| {});
        Box::pin(std::future::ready(Ok(removed)))
    }

    fn refund<'a>(
        &'a self,
        request: &'a DecisionRequest,
        charged: &'a [bool],
    ) -> StoreFuture<'a, ()> {
        self.refund_sync(request, charged);
        Box::pin(std::future::ready(Ok(())))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            keys: self.len() as u64,
            evictions: self.inner.evictions.load(Ordering::Relaxed),
        }
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}
