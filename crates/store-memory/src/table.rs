//! One shard's counters: a dense array of entries and a hash index of 4-byte positions
//! into it ([`crate::index`]).
//!
//! Why not one hash table of entries: a power-of-two table is between 44% and 88%
//! full, so its empty buckets cost as much as the entries themselves (97-byte buckets
//! were about 170 bytes per held key at 300k keys). Here an empty slot costs 4 bytes
//! and the entries sit back to back in fixed chunks of 8 KiB ([`CHUNK`]). Chunks, not
//! one growing vector: a vector doubles by moving to a new block, and the allocator
//! keeps the old blocks resident (with the server's mimalloc, about 35 bytes per key at
//! 300k keys), while a chunk, once allocated, never moves. Removal moves the last
//! entry into the hole and repoints its index slot, so the array stays dense and only
//! the last chunk is partly empty.
//!
//! An entry is 64 bytes: the key inline (up to 24 bytes), the state packed into three
//! words and a tag, the expiry, and a 4-byte id of its counter's name, which the shard
//! keeps once. It does not keep its hash: that is computed again from the name and key
//! when the index grows or an entry moves, which is rare next to lookups. A
//! concurrency window's holders, few and rare, live in a side table keyed the same
//! way, so the many rate windows do not pay for them.

use std::cell::Cell;
use std::hash::BuildHasher;
use std::sync::Arc;

use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use sluice_engine::{Micros, State};

use crate::Holder;
use crate::index::{Index, MAX_ENTRIES};

/// Entries per chunk: as many as fit in 8 KiB. Measured with the server's allocator
/// (mimalloc) at 300k keys: 8 KiB chunks cost 87 bytes per 80-byte entry, 64 KiB ones
/// 94, and 40 KiB ones 127 (a size that allocator rounds up to 64 KiB).
const CHUNK: usize = 8192 / std::mem::size_of::<Entry>();

/// One counter: which window of which limit (an id into its shard's counter names),
/// for which key, and its state, packed: 64 bytes where the engine's `State` alone
/// takes 32. Aligned to a cache line so that reading one entry is one miss, whatever
/// the allocator's alignment of a chunk.
#[repr(align(64))]
pub(crate) struct Entry {
    key: CompactString,
    words: [u64; 3],
    /// When the state expires (the store drops it then).
    pub(crate) expires_at: Micros,
    counter: u32,
    algorithm: u8,
}

impl Entry {
    /// The counter's state.
    pub(crate) fn state(&self) -> State {
        let [a, b, c] = self.words;
        match self.algorithm {
            GCRA => State::Gcra { tat: a as Micros },
            FIXED => State::Fixed {
                start: a as Micros,
                count: b,
            },
            SLIDING => State::Sliding {
                start: a as Micros,
                count: b,
                previous: c,
            },
            _ => State::Concurrency {
                open: a,
                free_at: b as Micros,
            },
        }
    }

    /// Replaces the counter's state.
    pub(crate) fn set_state(&mut self, state: State) {
        (self.algorithm, self.words) = pack(state);
    }

    /// The key it is counted on.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    fn is_concurrency(&self) -> bool {
        self.algorithm == CONCURRENCY
    }
}

const GCRA: u8 = 0;
const FIXED: u8 = 1;
const SLIDING: u8 = 2;
const CONCURRENCY: u8 = 3;

/// A state as its algorithm and three words (times are stored as their bits).
fn pack(state: State) -> (u8, [u64; 3]) {
    match state {
        State::Gcra { tat } => (GCRA, [tat as u64, 0, 0]),
        State::Fixed { start, count } => (FIXED, [start as u64, count, 0]),
        State::Sliding {
            start,
            count,
            previous,
        } => (SLIDING, [start as u64, count, previous]),
        State::Concurrency { open, free_at } => (CONCURRENCY, [open, free_at as u64, 0]),
    }
}

/// A concurrency window's holders, beside its entry.
struct Held {
    hash: u64,
    counter: Arc<str>,
    key: CompactString,
    holders: Vec<Holder>,
}

/// The counters of one shard (see the module docs).
pub(crate) struct Table {
    hasher: DefaultHashBuilder,
    index: Index,
    entries: Dense,
    held: HashTable<Held>,
    /// The counter names this shard has held, by id. Kept for the shard's life: they
    /// are the limits' windows, few and fixed by the config.
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
    /// The id last looked up: most decisions on a shard are on one counter, and a name
    /// held in `names` is never freed, so its address identifies it.
    last: Cell<u32>,
}

/// Entries at dense positions `0..len`, in chunks that never move: full chunks by a
/// thin pointer each (a shard's list of them stays small enough to stay in cache,
/// where a list of `Vec` headers was a cache miss of its own on large tables), and the
/// last, partly filled one.
#[derive(Default)]
struct Dense {
    full: Vec<Box<[Entry; CHUNK]>>,
    tail: Vec<Entry>,
}

impl Dense {
    fn len(&self) -> usize {
        self.full.len() * CHUNK + self.tail.len()
    }

    fn get(&self, at: usize) -> Option<&Entry> {
        match self.full.get(at / CHUNK) {
            Some(chunk) => Some(&chunk[at % CHUNK]),
            None if at / CHUNK == self.full.len() => self.tail.get(at % CHUNK),
            None => None,
        }
    }

    fn get_mut(&mut self, at: usize) -> Option<&mut Entry> {
        let full = self.full.len();
        match self.full.get_mut(at / CHUNK) {
            Some(chunk) => Some(&mut chunk[at % CHUNK]),
            None if at / CHUNK == full => self.tail.get_mut(at % CHUNK),
            None => None,
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.full
            .iter()
            .flat_map(|chunk| chunk.iter())
            .chain(&self.tail)
    }

    fn push(&mut self, entry: Entry) {
        if self.tail.capacity() == 0 {
            self.tail.reserve_exact(CHUNK);
        }
        self.tail.push(entry);
        if self.tail.len() == CHUNK {
            let tail = std::mem::take(&mut self.tail).into_boxed_slice();
            // A boxed slice of exactly CHUNK entries converts in place, so the `Err` arm
            // never runs; it keeps the entries rather than drop them.
            match tail.try_into() {
                Ok(chunk) => self.full.push(chunk),
                Err(tail) => self.tail = Vec::from(tail as Box<[Entry]>),
            }
        }
    }

    /// Removes the entry at `at`, moving the last one into its place.
    fn swap_remove(&mut self, at: usize) -> Option<Entry> {
        if self.tail.is_empty() {
            let chunk: Box<[Entry]> = self.full.pop()?;
            self.tail = chunk.into_vec();
        }
        let last = self.tail.pop()?;
        if self.tail.is_empty() {
            // Give the emptied chunk back rather than keep a whole chunk for nothing.
            self.tail = Vec::new();
        }
        match self.get_mut(at) {
            Some(slot) => Some(std::mem::replace(slot, last)),
            None => Some(last),
        }
    }
}

impl Table {
    /// An empty table hashing with `hasher` (the store's, so a hash computed outside
    /// finds the same bucket).
    pub(crate) fn new(hasher: DefaultHashBuilder) -> Self {
        Table {
            hasher,
            index: Index::default(),
            entries: Dense::default(),
            held: HashTable::new(),
            names: Vec::new(),
            ids: HashMap::new(),
            last: Cell::new(0),
        }
    }

    /// How many counters are held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every counter's name and entry, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Entry)> {
        self.entries
            .iter()
            .filter_map(|entry| Some((self.names.get(entry.counter as usize)?, entry)))
    }

    /// The id of `counter` in this shard, if it has ever held it.
    fn id_of(&self, counter: &Arc<str>) -> Option<u32> {
        let last = self.last.get();
        if self
            .names
            .get(last as usize)
            .is_some_and(|name| Arc::ptr_eq(name, counter))
        {
            return Some(last);
        }
        let id = *self.ids.get(&**counter)?;
        self.last.set(id);
        Some(id)
    }

    /// The id of `counter`, given one if new.
    fn id_for(&mut self, counter: &Arc<str>) -> u32 {
        if let Some(id) = self.id_of(counter) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(Arc::clone(counter));
        self.ids.insert(Arc::clone(counter), id);
        id
    }

    /// The counter `counter` for `key`, whose hash is `hash`.
    pub(crate) fn find(&self, hash: u64, counter: &Arc<str>, key: &str) -> Option<&Entry> {
        let id = self.id_of(counter)?;
        let entries = &self.entries;
        let slot = self.index.find(hash, |at| matches(entries, at, id, key))?;
        entries.get(self.index.position(slot) as usize)
    }

    /// Like [`Table::find`], for writing.
    pub(crate) fn find_mut(
        &mut self,
        hash: u64,
        counter: &Arc<str>,
        key: &str,
    ) -> Option<&mut Entry> {
        let id = self.id_of(counter)?;
        let entries = &self.entries;
        let slot = self.index.find(hash, |at| matches(entries, at, id, key))?;
        self.entries.get_mut(self.index.position(slot) as usize)
    }

    /// Adds the counter `counter` for `key`, known to be absent, whose hash is `hash`.
    /// The store keeps a shard below [`MAX_ENTRIES`]; a table at that size keeps what
    /// it holds rather than corrupt its index.
    pub(crate) fn insert_unique(
        &mut self,
        hash: u64,
        counter: &Arc<str>,
        key: &str,
        state: State,
        expires_at: Micros,
    ) {
        if self.entries.len() >= MAX_ENTRIES {
            debug_assert!(false, "a shard outgrew its index");
            return;
        }
        if self.index.is_full() {
            self.rebuild_index(1);
        }
        let (algorithm, words) = pack(state);
        let entry = Entry {
            key: key.into(),
            words,
            expires_at,
            counter: self.id_for(counter),
            algorithm,
        };
        let at = self.entries.len() as u32;
        self.entries.push(entry);
        self.index.insert(hash, at);
    }

    /// Rebuilds the index from the entries, in their order, with room for `more`.
    fn rebuild_index(&mut self, more: usize) {
        let Table {
            hasher,
            index,
            entries,
            names,
            ..
        } = self;
        let hashes = (0..entries.len()).map(|at| {
            let hash = entries
                .get(at)
                .map_or(0, |entry| hash_of(hasher, names, entry));
            (at as u32, hash)
        });
        index.rebuild(hashes, more);
    }

    /// Removes the counter `counter` for `key`, if held.
    pub(crate) fn remove(&mut self, hash: u64, counter: &Arc<str>, key: &str) {
        let Some(id) = self.id_of(counter) else {
            return;
        };
        let entries = &self.entries;
        if let Some(slot) = self.index.find(hash, |at| matches(entries, at, id, key)) {
            let at = self.index.position(slot);
            self.index.remove(slot);
            self.remove_at(at as usize, hash);
        }
    }

    /// Keeps only the counters for which `keep(name, entry)` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Arc<str>, &Entry) -> bool) {
        let mut at = 0;
        while let Some(entry) = self.entries.get(at) {
            let Some(name) = self.names.get(entry.counter as usize) else {
                at += 1;
                continue;
            };
            if keep(name, entry) {
                at += 1;
                continue;
            }
            let hash = hash_of(&self.hasher, &self.names, entry);
            if let Some(slot) = self.index.find(hash, |i| i as usize == at) {
                self.index.remove(slot);
            }
            // The last entry moves into `at`, which is looked at again.
            self.remove_at(at, hash);
        }
        if self.index.is_sparse() {
            // A sweep or an eviction dropped most of the shard: give the slots back.
            self.rebuild_index(0);
        }
    }

    /// Drops the entry at `at` (already out of the index) by moving the last one into
    /// its place, and its holders.
    fn remove_at(&mut self, at: usize, hash: u64) {
        let Some(removed) = self.entries.swap_remove(at) else {
            return;
        };
        if removed.is_concurrency()
            && let Some(name) = self.names.get(removed.counter as usize)
            && let Ok(found) = self
                .held
                .find_entry(hash, |h| h.counter == *name && h.key == removed.key)
        {
            found.remove();
        }
        let moved_from = self.entries.len() as u32;
        if let Some(moved) = self.entries.get(at) {
            let moved_hash = hash_of(&self.hasher, &self.names, moved);
            if let Some(slot) = self.index.find(moved_hash, |i| i == moved_from) {
                self.index.set_position(slot, at as u32);
            }
        }
    }

    /// A concurrency window's holders (empty when it has none).
    pub(crate) fn holders(&self, hash: u64, counter: &str, key: &str) -> &[Holder] {
        self.held
            .find(hash, |h| *h.counter == *counter && h.key == key)
            .map_or(&[], |h| &h.holders)
    }

    /// A concurrency window's holders, to change; the window's entry must be held (so
    /// that removing it drops them).
    pub(crate) fn holders_mut(
        &mut self,
        hash: u64,
        counter: &Arc<str>,
        key: &str,
    ) -> &mut Vec<Holder> {
        let found = self.held.entry(
            hash,
            |h| *h.counter == **counter && h.key == key,
            |h| h.hash,
        );
        &mut found
            .or_insert_with(|| Held {
                hash,
                counter: Arc::clone(counter),
                key: key.into(),
                holders: Vec::new(),
            })
            .into_mut()
            .holders
    }

    /// The hasher the index is keyed with.
    pub(crate) fn hasher(&self) -> &DefaultHashBuilder {
        &self.hasher
    }
}

/// Whether the entry at `at` is counter `id` for `key` (an index that points nowhere,
/// which the table never makes, is no match rather than a panic).
fn matches(entries: &Dense, at: u32, id: u32, key: &str) -> bool {
    entries
        .get(at as usize)
        .is_some_and(|entry| entry.counter == id && entry.key == key)
}

/// The hash of `entry`'s counter name and key, as the store computes it.
fn hash_of(hasher: &DefaultHashBuilder, names: &[Arc<str>], entry: &Entry) -> u64 {
    let name = names.get(entry.counter as usize).map_or("", |name| name);
    hasher.hash_one((name, entry.key.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_sixty_four_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
    }

    #[test]
    fn every_state_reads_back_as_written() {
        let counter: Arc<str> = "api:g60".into();
        let mut table = Table::new(DefaultHashBuilder::default());
        table.insert_unique(1, &counter, "k", State::Gcra { tat: -5 }, 9);
        for state in [
            State::Gcra { tat: 1 << 50 },
            State::Fixed {
                start: 7,
                count: u64::MAX,
            },
            State::Sliding {
                start: -3,
                count: 4,
                previous: 5,
            },
            State::Concurrency {
                open: 2,
                free_at: 11,
            },
        ] {
            let entry = table.find_mut(1, &counter, "k").expect("held");
            entry.set_state(state);
            assert_eq!(table.find(1, &counter, "k").map(Entry::state), Some(state));
        }
    }

    #[test]
    fn removals_keep_every_other_entry_findable() {
        let hasher = DefaultHashBuilder::default();
        let mut table = Table::new(hasher.clone());
        let counter: Arc<str> = "api:g60".into();
        // The same name in another allocation (a reloaded config) finds the same entries.
        let reloaded: Arc<str> = "api:g60".into();
        let hash = |key: &str| hasher.hash_one(("api:g60", key));
        for n in 0..2000 {
            let key = format!("k{n}");
            table.insert_unique(hash(&key), &counter, &key, State::Gcra { tat: n }, n);
        }
        for n in (0..2000).step_by(3) {
            let key = format!("k{n}");
            table.remove(hash(&key), &reloaded, &key);
        }
        table.retain(|_, e| e.expires_at % 3 != 1);
        for n in 0..2000 {
            let key = format!("k{n}");
            let found = table.find(hash(&key), &counter, &key);
            assert_eq!(found.is_some(), n % 3 == 2, "key {key}");
            if let Some(found) = found {
                assert_eq!(found.state(), State::Gcra { tat: n });
                assert_eq!(found.key(), key);
            }
        }
        assert_eq!(table.len(), 666);
        let other: Arc<str> = "api:f60".into();
        assert!(table.find(hash("k2"), &other, "k2").is_none());
    }
}
