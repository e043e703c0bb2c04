//! The in-process counter store: sluice's embedded default and the fallback the
//! store-failure policy `local` decides with.
//!
//! Counters live in a fixed number of shards, each a `Mutex` around a [`table`]: packed
//! entries in chunks, found through a hash index of their positions.
//! A decision locks the shards of all its counters in ascending index order (so two
//! decisions can never wait on each other in a cycle), reads the states, runs
//! [`sluice_engine::apply`] and writes back what changed: atomic across every window
//! of every check.
//!
//! Memory is bounded. Every entry carries the time its state expires; a background
//! thread sweeps expired entries every `sweep_interval`, and a shard that is full when
//! a new counter arrives first drops its expired entries and then evicts the
//! sixteenth of its capacity nearest to expiry, the least spent first among those that
//! expire together (counted in [`StoreStats::evictions`]). A flood of distinct keys
//! therefore costs at most `max_keys` entries, and the counters evicted first are the
//! ones that had least time left to matter and least quota spent.
//!
//! Reservations (`Store::reserve`, `Store::settle`; see `sluice_engine::reservation`):
//! a concurrency window's entry keeps its holders (reservation id and expiry) and its
//! state is counted from them; the hold records live in their own shards, bounded by
//! `max_keys` like the counters and swept when they expire. A reservation locks its
//! counters' shards first and its hold's shard last, so reservations and settlements
//! never wait on each other in a cycle.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use hashbrown::DefaultHashBuilder;
use sluice_engine::{
    Algorithm, Clock, DecisionRequest, Hold, Limit, Micros, Outcomes, Record, Records,
    SettleStatus, Settlement, Slot, State, Store, StoreError, StoreFuture, StoreStats, SystemClock,
    Window, WindowOutcomes, apply, refund, settle,
};
use smallvec::SmallVec;
use std::hash::BuildHasher;

mod index;
mod table;

use table::{Entry, Table};

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
    /// For a concurrency window: the reservations holding its slots, with their expiry.
    pub holders: &'a [Holder],
}

/// A reservation holding one slot of a concurrency window: its id and when it expires.
pub type Holder = (u128, Micros);

/// A hold record as a reservation or settlement left it, as [`MemoryStore::reserve_sync_with`]
/// and [`MemoryStore::settle_sync_with`] report it (a durable store journals it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldChange<'a> {
    /// The reservation id.
    pub id: u128,
    /// The digest it was made with.
    pub digest: &'a str,
    /// When it expires.
    pub expires_at: Micros,
    /// Whether it has been settled (or released).
    pub settled: bool,
}

/// What a store holds about one reservation.
#[derive(Debug, Clone)]
struct HoldRecord {
    digest: Box<str>,
    expires_at: Micros,
    settled: bool,
}

/// What an operation does to the holders of the concurrency windows it touches.
#[derive(Debug, Clone, Copy)]
enum Holders {
    /// Nothing (a decision, a refund).
    Keep,
    /// The reservation takes a slot in every concurrency window it charged.
    Add(Holder),
    /// The reservation gives back its slot in every concurrency window.
    Remove(u128),
}

/// Settings of a [`MemoryStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStoreConfig {
    /// The most counters held at once; one counter is one window of one limit for one key.
    /// At most about a billion are held whatever this says (64 shards of fewer than
    /// 2^24 counters, 64 GiB of entries).
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
    holds: Box<[Mutex<HashMap<u128, HoldRecord>>]>,
    hasher: DefaultHashBuilder,
    clock: Arc<dyn Clock>,
    shard_capacity: usize,
    evictions: AtomicU64,
    /// Runtime records (see [`sluice_engine::records`]): few, written by admin calls.
    records: Mutex<RecordMap>,
}

/// The records and their version.
#[derive(Default)]
struct RecordMap {
    version: u64,
    map: std::collections::BTreeMap<String, String>,
}

struct Shard {
    table: Table,
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
        let hasher = DefaultHashBuilder::default();
        let inner = Arc::new(Inner {
            shards: (0..shard_count)
                .map(|_| {
                    Mutex::new(Shard {
                        table: Table::new(hasher.clone()),
                    })
                })
                .collect(),
            holds: (0..shard_count)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher,
            clock,
            // A shard's index points at fewer than 2^24 entries; the slack is for the
            // counters one decision may add to a full shard (see `Shard::make_room`).
            shard_capacity: (max_keys / shard_count).clamp(1, index::MAX_ENTRIES - 65_536),
            evictions: AtomicU64::new(0),
            records: Mutex::new(RecordMap::default()),
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

    /// Every record and their version, now.
    pub fn records_sync(&self) -> Records {
        let records = self.records_lock();
        Records {
            version: records.version,
            records: records
                .map
                .iter()
                .map(|(id, body)| Record {
                    id: id.clone(),
                    body: body.clone(),
                })
                .collect(),
        }
    }

    /// Writes `record`; answers the new version.
    pub fn put_record_sync(&self, record: &Record) -> u64 {
        let mut records = self.records_lock();
        records.map.insert(record.id.clone(), record.body.clone());
        records.version += 1;
        records.version
    }

    /// Removes the record `id`; answers whether there was one.
    pub fn remove_record_sync(&self, id: &str) -> bool {
        let mut records = self.records_lock();
        let removed = records.map.remove(id).is_some();
        if removed {
            records.version += 1;
        }
        removed
    }

    fn records_lock(&self) -> MutexGuard<'_, RecordMap> {
        self.inner
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

    /// Reserves `request` (see [`Store::reserve`]) synchronously.
    pub fn reserve_sync(&self, request: &DecisionRequest, hold: &Hold) -> Outcomes {
        self.reserve_sync_with(request, hold, |_, _| {})
    }

    /// Like [`MemoryStore::reserve_sync`], and calls `changed` with the counters it wrote
    /// and the hold it recorded (when allowed), under its locks (see
    /// [`MemoryStore::decide_sync_with`]).
    pub fn reserve_sync_with(
        &self,
        request: &DecisionRequest,
        hold: &Hold,
        changed: impl FnOnce(&[Change<'_>], Option<HoldChange<'_>>),
    ) -> Outcomes {
        let Some(id) = parse_hold_id(&hold.id.id) else {
            // Not an id this store could ever settle: decide without holding anything.
            return self.decide_sync(request);
        };
        let digest = hold.id.digest.as_str();
        let recorded: Cell<Option<Micros>> = Cell::new(None);
        let mut changed = Some(changed);
        let windows = self.inner.update(
            request,
            |request, slot_of, slots, now| {
                let expires_at = now.saturating_add(hold.ttl.max(1));
                let outcomes = apply(request, slot_of, slots, now);
                let allowed = request
                    .windows()
                    .zip(&outcomes)
                    .all(|((check, _), o)| o.allowed || check.limit().shadow());
                if !allowed || request.dry_run {
                    return (outcomes, Holders::Keep);
                }
                let record = HoldRecord {
                    digest: digest.into(),
                    expires_at,
                    settled: false,
                };
                let evicted = self
                    .inner
                    .record_hold(id, record, now, self.inner.shard_capacity);
                self.inner.count_evictions(evicted);
                recorded.set(Some(expires_at));
                (outcomes, Holders::Add((id, expires_at)))
            },
            |changes| {
                if let Some(changed) = changed.take() {
                    changed(changes, hold_change(id, digest, recorded.get(), false));
                }
            },
        );
        if let (Some(changed), Some(_)) = (changed, recorded.get()) {
            changed(&[], hold_change(id, digest, recorded.get(), false));
        }
        Outcomes {
            windows,
            degraded: false,
        }
    }

    /// Settles (see [`Store::settle`]) synchronously.
    pub fn settle_sync(&self, settlement: &Settlement) -> SettleStatus {
        self.settle_sync_with(settlement, |_, _| {})
    }

    /// Like [`MemoryStore::settle_sync`], and calls `changed` with the counters it wrote
    /// and the hold it marked settled, under its locks.
    pub fn settle_sync_with(
        &self,
        settlement: &Settlement,
        changed: impl FnOnce(&[Change<'_>], Option<HoldChange<'_>>),
    ) -> SettleStatus {
        if !settlement.is_well_formed() {
            return SettleStatus::Unknown;
        }
        let hold = match &settlement.hold {
            None => None,
            Some(hold) => match parse_hold_id(&hold.id) {
                Some(id) => Some((id, hold.digest.as_str())),
                None => return SettleStatus::Unknown,
            },
        };
        let mut status = SettleStatus::Settled;
        let closed: Cell<Option<Micros>> = Cell::new(None);
        let mut changed = Some(changed);
        self.inner.update(
            &settlement.request,
            |_, slot_of, slots, now| {
                if let Some((id, digest)) = hold {
                    match self.inner.close_hold(id, digest, now) {
                        Ok(expires_at) => closed.set(Some(expires_at)),
                        Err(answer) => {
                            status = answer;
                            return (WindowOutcomes::new(), Holders::Keep);
                        }
                    }
                }
                settle(settlement, slot_of, slots, now);
                let holders = hold.map_or(Holders::Keep, |(id, _)| Holders::Remove(id));
                (WindowOutcomes::new(), holders)
            },
            |changes| {
                if let (Some(changed), Some((id, digest))) = (changed.take(), hold) {
                    changed(changes, hold_change(id, digest, closed.get(), true));
                } else if let Some(changed) = changed.take() {
                    changed(changes, None);
                }
            },
        );
        if let (Some(changed), Some((id, digest)), Some(_)) = (changed, hold, closed.get()) {
            changed(&[], hold_change(id, digest, closed.get(), true));
        }
        status
    }

    /// Puts a hold record back, e.g. one a durable store read at start (an expired one
    /// is ignored).
    pub fn restore_hold(&self, id: u128, digest: &str, expires_at: Micros, settled: bool) {
        let now = self.inner.clock.now();
        if expires_at <= now {
            return;
        }
        let evicted = self.inner.record_hold(
            id,
            HoldRecord {
                digest: digest.into(),
                expires_at,
                settled,
            },
            now,
            self.inner.shard_capacity,
        );
        self.inner.count_evictions(evicted);
    }

    /// Puts a concurrency window's holders back (a durable store at start); expired
    /// holders are dropped.
    pub fn restore_holders(&self, counter: &Arc<str>, key: &str, holders: &[Holder]) {
        let now = self.inner.clock.now();
        let live: Vec<Holder> = holders.iter().copied().filter(|h| h.1 > now).collect();
        let Some(expires_at) = holders_expiry(&live) else {
            return;
        };
        let state = concurrency_state(&live, now);
        self.restore(counter, key, state, expires_at);
        let hash = self.inner.hasher.hash_one((&**counter, key));
        let mut shard = self.inner.lock(self.inner.shard_of(hash));
        if shard.table.find(hash, counter, key).is_some() {
            *shard.table.holders_mut(hash, counter, key) = live;
        }
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
                (WindowOutcomes::new(), Holders::Keep)
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
            self.inner.lock_shard(shard).table.retain(|name, e| {
                let drop = counters.contains(&&**name);
                if drop {
                    removed(name, e.key());
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
            shard.table.remove(hash, &lw.counter, key);
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
        if let Some(entry) = shard.table.find_mut(hash, counter, key) {
            entry.set_state(state);
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
        let windows = self.update(
            request,
            |request, slot_of, slots, now| (apply(request, slot_of, slots, now), Holders::Keep),
            changed,
        );
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
        op: impl FnOnce(&DecisionRequest, &[usize], &mut [Slot], Micros) -> (WindowOutcomes, Holders),
        changed: impl FnOnce(&[Change<'_>]),
    ) -> WindowOutcomes {
        let one_rate_window = match request.checks.as_slice() {
            [check] => match check.limit().windows() {
                [lw] => lw.window.algorithm() != Algorithm::Concurrency,
                _ => false,
            },
            _ => false,
        };
        if one_rate_window {
            self.update_one_counter(request, op, changed)
        } else {
            self.update_many_counters(request, op, changed)
        }
    }

    /// The common case, one window of one check: one lock, one lookup.
    fn update_one_counter(
        &self,
        request: &DecisionRequest,
        op: impl FnOnce(&DecisionRequest, &[usize], &mut [Slot], Micros) -> (WindowOutcomes, Holders),
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
        match shard.table.find_mut(hash, &lw.counter, key) {
            Some(entry) => {
                slots[0].state = (entry.expires_at > now).then(|| entry.state());
                let (outcomes, _) = op(request, &[0], &mut slots, now);
                if let (true, Some(state)) = (slots[0].dirty, slots[0].state) {
                    entry.set_state(state);
                    entry.expires_at = lw.window.expires_at(&state);
                    changed(&[Change {
                        counter: &lw.counter,
                        key,
                        state,
                        expires_at: entry.expires_at,
                        holders: &[],
                    }]);
                }
                outcomes
            }
            None => {
                let (outcomes, _) = op(request, &[0], &mut slots, now);
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
                        holders: &[],
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
        op: impl FnOnce(&DecisionRequest, &[usize], &mut [Slot], Micros) -> (WindowOutcomes, Holders),
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
            .map(|c| {
                let table = &guards[guard_index(c.shard)].table;
                let entry = table
                    .find(c.hash, c.counter, c.key)
                    .filter(|e| e.expires_at > now);
                let state = if c.window.algorithm() == Algorithm::Concurrency {
                    let holders = match entry {
                        Some(_) => table.holders(c.hash, c.counter, c.key),
                        None => &[],
                    };
                    Some(concurrency_state(holders, now))
                } else {
                    entry.map(Entry::state)
                };
                Slot {
                    state,
                    dirty: false,
                }
            })
            .collect();

        let (outcomes, holders) = op(request, &slot_of, &mut slots, now);

        // Which counters changed, and the holder lists of the concurrency ones (kept
        // here so the changes can borrow them while the shards stay locked).
        let mut written: SmallVec<[Written; 4]> = SmallVec::new();
        for (index, (slot, c)) in slots.iter().zip(&counters).enumerate() {
            if c.window.algorithm() == Algorithm::Concurrency {
                let change = match holders {
                    Holders::Add(holder) if slot.dirty => Some((Some(holder), None)),
                    Holders::Remove(id) => Some((None, Some(id))),
                    _ => None,
                };
                let Some((add, remove)) = change else {
                    continue;
                };
                let shard = &mut guards[guard_index(c.shard)];
                let (state, list, evicted) =
                    shard.update_holders(c, add, remove, now, self.shard_capacity, &own);
                self.count_evictions(evicted);
                if let Some(list) = list {
                    written.push((index, state, Some(list)));
                }
            } else if let (true, Some(state)) = (slot.dirty, slot.state) {
                let evicted =
                    guards[guard_index(c.shard)].upsert(c, state, now, self.shard_capacity, &own);
                self.count_evictions(evicted);
                written.push((index, state, None));
            }
        }
        if !written.is_empty() {
            let changes: SmallVec<[Change<'_>; 4]> = written
                .iter()
                .map(|(index, state, list)| {
                    let c = &counters[*index];
                    let holders: &[Holder] = list.as_deref().unwrap_or(&[]);
                    Change {
                        counter: c.counter,
                        key: c.key,
                        state: *state,
                        expires_at: holders_expiry(holders)
                            .unwrap_or_else(|| c.window.expires_at(state)),
                        holders,
                    }
                })
                .collect();
            changed(&changes);
        }
        drop(guards);
        outcomes
    }

    fn hold_shard(&self, id: u128) -> MutexGuard<'_, HashMap<u128, HoldRecord>> {
        let shard = &self.holds[(id as usize) & (self.holds.len() - 1)];
        shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a hold, making room as counters do when its shard is full: expired
    /// holds go first, then the sixteenth nearest to expiry. Returns how many live holds
    /// were evicted.
    fn record_hold(&self, id: u128, record: HoldRecord, now: Micros, capacity: usize) -> u64 {
        let mut holds = self.hold_shard(id);
        let mut evicted = 0;
        if holds.len() >= capacity && !holds.contains_key(&id) {
            holds.retain(|_, h| h.expires_at > now);
            if holds.len() >= capacity {
                let batch = (capacity / 16).max(1);
                let mut expiries: Vec<Micros> = holds.values().map(|h| h.expires_at).collect();
                let (_, threshold, _) = expiries.select_nth_unstable(batch - 1);
                let threshold = *threshold;
                holds.retain(|_, h| {
                    let evict = evicted < batch && h.expires_at <= threshold;
                    evicted += usize::from(evict);
                    !evict
                });
            }
        }
        holds.insert(id, record);
        evicted as u64
    }

    /// Marks an open hold settled: its expiry, or why it cannot be settled.
    fn close_hold(&self, id: u128, digest: &str, now: Micros) -> Result<Micros, SettleStatus> {
        let mut holds = self.hold_shard(id);
        match holds.get_mut(&id) {
            Some(hold) if hold.expires_at > now && *hold.digest == *digest => {
                if hold.settled {
                    Err(SettleStatus::AlreadySettled)
                } else {
                    hold.settled = true;
                    Ok(hold.expires_at)
                }
            }
            _ => Err(SettleStatus::Unknown),
        }
    }

    fn count_evictions(&self, evicted: u64) {
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    fn sweep(&self) {
        for shard in self.shards.iter() {
            let now = self.clock.now();
            self.lock_shard(shard)
                .table
                .retain(|_, e| e.expires_at > now);
        }
        for holds in self.holds.iter() {
            let now = self.clock.now();
            holds
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, h| h.expires_at > now);
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
        match self.table.find_mut(at.hash, at.counter, at.key) {
            Some(entry) => {
                entry.set_state(state);
                entry.expires_at = at.window.expires_at(&state);
                0
            }
            None => self.insert_new(at, state, now, capacity, keep),
        }
    }

    /// Adds and/or removes a holder of a concurrency window, dropping expired ones:
    /// the window's state after it, its holder list when the entry changed (for the
    /// journal), and how many live counters were evicted to make room.
    fn update_holders(
        &mut self,
        at: &Location<'_>,
        add: Option<Holder>,
        remove: Option<u128>,
        now: Micros,
        capacity: usize,
        keep: &[u64],
    ) -> (State, Option<Vec<Holder>>, u64) {
        let mut evicted = 0;
        if self.table.find(at.hash, at.counter, at.key).is_none() {
            if add.is_none() {
                return (concurrency_state(&[], now), None, 0);
            }
            let state = concurrency_state(&[], now);
            evicted = self.insert_new(at, state, now, capacity, keep);
        }
        if self.table.find(at.hash, at.counter, at.key).is_none() {
            return (concurrency_state(&[], now), None, evicted);
        }
        let list = self.table.holders_mut(at.hash, at.counter, at.key);
        list.retain(|&(id, expires_at)| expires_at > now && Some(id) != remove);
        if let Some(holder) = add {
            list.push(holder);
        }
        let list = list.clone();
        let state = concurrency_state(&list, now);
        if let Some(entry) = self.table.find_mut(at.hash, at.counter, at.key) {
            entry.set_state(state);
            entry.expires_at = holders_expiry(&list).unwrap_or(now);
        }
        (state, Some(list), evicted)
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
        self.table
            .insert_unique(hash, counter, key, state, expires_at);
        evicted
    }

    /// Drops expired entries; if that is not enough, evicts the sixteenth of the
    /// capacity nearest to expiry, so the next inserts need no scan. Among counters that
    /// expire together (every fixed window of a limit ends at once) the least spent go
    /// first: evicting a counter hands its key a fresh quota, and by expiry alone a
    /// flood of invented keys, each spent once, would as likely evict a key that spent
    /// its whole quota (found by review: a client reset its own spent counter that way).
    fn make_room(&mut self, now: Micros, capacity: usize, keep: &[u64]) -> u64 {
        self.table.retain(|_, e| e.expires_at > now);
        if self.table.len() < capacity {
            return 0;
        }
        let batch = (capacity / 16).max(1);
        let mut order: Vec<(Micros, u64)> =
            self.table.iter().map(|(_, e)| eviction_order(e)).collect();
        let (_, threshold, _) = order.select_nth_unstable(batch - 1);
        let threshold = *threshold;
        let mut evicted = 0;
        let hasher = self.table.hasher().clone();
        self.table.retain(|name, e| {
            // A counter the current decision just wrote is never its own victim (a tiny
            // shard may then hold a few more than its capacity, bounded by one decision).
            let evict = evicted < batch
                && eviction_order(e) <= threshold
                && !keep.contains(&hasher.hash_one((&**name, e.key())));
            evicted += usize::from(evict);
            !evict
        });
        evicted as u64
    }
}

/// Where `entry` stands in the eviction order, first to go first: by expiry, then by how
/// much it has counted (a gcra state that has spent more already expires later).
fn eviction_order(entry: &table::Entry) -> (Micros, u64) {
    let spent = match entry.state() {
        State::Gcra { .. } => 0,
        State::Fixed { count, .. } => count,
        State::Sliding {
            count, previous, ..
        } => count.saturating_add(previous),
        State::Concurrency { open, .. } => open,
    };
    (entry.expires_at, spent)
}

/// A counter an update wrote: its index in the update, its state, and for a
/// concurrency window its holders.
type Written = (usize, State, Option<Vec<Holder>>);

/// A concurrency window's state counted from its holders at `now`.
fn concurrency_state(holders: &[Holder], now: Micros) -> State {
    let live = holders.iter().filter(|&&(_, expires_at)| expires_at > now);
    State::Concurrency {
        open: live.clone().count() as u64,
        free_at: live.map(|&(_, expires_at)| expires_at).min().unwrap_or(now),
    }
}

fn hold_change(
    id: u128,
    digest: &str,
    expires_at: Option<Micros>,
    settled: bool,
) -> Option<HoldChange<'_>> {
    expires_at.map(|expires_at| HoldChange {
        id,
        digest,
        expires_at,
        settled,
    })
}

/// When the last holder expires (the entry may be dropped then).
fn holders_expiry(holders: &[Holder]) -> Option<Micros> {
    holders.iter().map(|&(_, expires_at)| expires_at).max()
}

/// A reservation id as stores write it: 32 hex digits.
pub fn parse_hold_id(id: &str) -> Option<u128> {
    (id.len() == 32)
        .then(|| u128::from_str_radix(id, 16).ok())
        .flatten()
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

    fn decide_now(&self, request: &DecisionRequest) -> Option<Result<Outcomes, StoreError>> {
        Some(Ok(self.decide_sync(request)))
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

    fn reserve<'a>(
        &'a self,
        request: &'a DecisionRequest,
        hold: &'a Hold,
    ) -> StoreFuture<'a, Outcomes> {
        Box::pin(std::future::ready(Ok(self.reserve_sync(request, hold))))
    }

    fn settle<'a>(&'a self, settlement: &'a Settlement) -> StoreFuture<'a, SettleStatus> {
        Box::pin(std::future::ready(Ok(self.settle_sync(settlement))))
    }

    fn records(&self) -> StoreFuture<'_, Records> {
        Box::pin(std::future::ready(Ok(self.records_sync())))
    }

    fn records_version(&self) -> StoreFuture<'_, u64> {
        Box::pin(std::future::ready(Ok(self.records_lock().version)))
    }

    fn put_record<'a>(&'a self, record: &'a Record) -> StoreFuture<'a, u64> {
        Box::pin(std::future::ready(Ok(self.put_record_sync(record))))
    }

    fn remove_record<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(self.remove_record_sync(id))))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            keys: self.len() as u64,
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            local_denials: 0,
        }
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}
