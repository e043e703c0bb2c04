//! The hash index of one shard's table: from a counter's hash to its entry's position
//! in the dense array, in (nearly always) one cache line.
//!
//! Open addressing with linear probing over 4-byte slots. A slot holds an entry's
//! position plus one in its low 24 bits (0: no entry there) and 8 bits of the entry's
//! hash in its high byte, so a probe compares tags in the line it has already loaded
//! and reads an entry only when a tag matches (1 in 256 for another key). hashbrown's
//! table, which this replaces, keeps its control bytes and its buckets in two places
//! of one allocation: on a table larger than the cache that is two misses per lookup
//! before the entry's own, where this is one.
//!
//! Removing leaves a tombstone (or an empty slot when no probe can pass through it).
//! When live slots and tombstones fill [`MAX_LOAD_SIXTEENTHS`] of the slots, the next
//! insertion rebuilds the index from the table's entries at a size where they fill
//! at most half of that: it doubles when the table grew, and shrinks after a sweep
//! dropped most of it.

/// The most entries one index can point at (positions fit in 24 bits, 0 meaning none).
pub(crate) const MAX_ENTRIES: usize = (1 << 24) - 2;

/// Live slots and tombstones may fill this many sixteenths of the slots.
const MAX_LOAD_SIXTEENTHS: usize = 13;
/// A rebuilt index is at most this many sixteenths full: a little over half the
/// maximum, so that a full index rebuilt at twice its size fits.
const REBUILT_LOAD_SIXTEENTHS: usize = 7;
/// The fewest slots an index that holds anything has.
const MIN_SLOTS: usize = 16;

const EMPTY: u32 = 0;
/// Position field 0 (no entry) with a non-zero tag: something was here.
const TOMBSTONE: u32 = 1 << 24;
const POSITION: u32 = (1 << 24) - 1;

/// Positions of entries by hash (see the module docs).
#[derive(Default)]
pub(crate) struct Index {
    slots: Box<[u32]>,
    live: usize,
    tombstones: usize,
}

impl Index {
    /// Where a probe for `hash` starts: bits the tag and the store's shard choice do
    /// not use.
    fn home(&self, hash: u64) -> usize {
        (hash >> 32) as usize & (self.slots.len() - 1)
    }

    /// The slot with the position `matches` accepts among those tagged like `hash`.
    pub(crate) fn find(&self, hash: u64, mut matches: impl FnMut(u32) -> bool) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let tag = tag(hash);
        let mask = self.slots.len() - 1;
        let mut at = self.home(hash);
        // Terminates: a rebuild keeps a sixteenth or more of the slots empty.
        loop {
            let slot = self.slots[at];
            if slot == EMPTY {
                return None;
            }
            if slot & !POSITION == tag && slot & POSITION != 0 && matches((slot & POSITION) - 1) {
                return Some(at);
            }
            at = (at + 1) & mask;
        }
    }

    /// The position held in `slot` (one [`Index::find`] returned).
    pub(crate) fn position(&self, slot: usize) -> u32 {
        (self.slots[slot] & POSITION).wrapping_sub(1)
    }

    /// Points `slot` at `position` instead: the entry moved.
    pub(crate) fn set_position(&mut self, slot: usize, position: u32) {
        let tag = self.slots[slot] & !POSITION;
        self.slots[slot] = tag | (position + 1);
    }

    /// Whether the next [`Index::insert`] needs a [`Index::rebuild`] first.
    pub(crate) fn is_full(&self) -> bool {
        (self.live + self.tombstones + 1) * 16 > self.slots.len() * MAX_LOAD_SIXTEENTHS
    }

    /// Whether the index holds so few entries for its size (an eighth of its slots or
    /// less) that rebuilding it would give most of its memory back.
    pub(crate) fn is_sparse(&self) -> bool {
        self.slots.len() > MIN_SLOTS && self.live * 8 <= self.slots.len()
    }

    /// Rebuilds the index from every entry it should hold, as (position, hash), at the
    /// smallest size they (and `more` to come) fill at most [`REBUILT_LOAD_SIXTEENTHS`] of.
    pub(crate) fn rebuild(
        &mut self,
        entries: impl ExactSizeIterator<Item = (u32, u64)>,
        more: usize,
    ) {
        let wanted = entries.len() + more;
        let mut slots = MIN_SLOTS;
        while wanted * 16 > slots * REBUILT_LOAD_SIXTEENTHS {
            slots *= 2;
        }
        self.slots = vec![EMPTY; slots].into_boxed_slice();
        self.live = 0;
        self.tombstones = 0;
        for (position, hash) in entries {
            self.insert(hash, position);
        }
    }

    /// Adds `position` under `hash`; the caller knows it is absent and that the index is
    /// not [full](Index::is_full).
    pub(crate) fn insert(&mut self, hash: u64, position: u32) {
        debug_assert!((position as usize) <= MAX_ENTRIES && !self.slots.is_empty());
        let mask = self.slots.len() - 1;
        let mut at = self.home(hash);
        while self.slots[at] & POSITION != 0 {
            at = (at + 1) & mask;
        }
        if self.slots[at] == TOMBSTONE {
            self.tombstones -= 1;
        }
        self.slots[at] = tag(hash) | (position + 1);
        self.live += 1;
    }

    /// Empties `slot` (one [`Index::find`] returned).
    pub(crate) fn remove(&mut self, slot: usize) {
        let mask = self.slots.len() - 1;
        self.live -= 1;
        if self.slots[(slot + 1) & mask] != EMPTY {
            // A probe for a later entry may pass through here.
            self.slots[slot] = TOMBSTONE;
            self.tombstones += 1;
            return;
        }
        // Nothing follows: this slot and the tombstones just before it end no chain.
        self.slots[slot] = EMPTY;
        let mut at = slot.wrapping_sub(1) & mask;
        while self.slots[at] == TOMBSTONE {
            self.slots[at] = EMPTY;
            self.tombstones -= 1;
            at = at.wrapping_sub(1) & mask;
        }
    }

    /// Bytes held by the slots.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.slots.len() * 4
    }
}

/// The high byte of a slot for `hash`: bits the store's shard choice (24 to 30) and
/// [`Index::home`] (32 and up) do not use.
fn tag(hash: u64) -> u32 {
    (hash as u32) << 24
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A spread of hashes, with many sharing their tag and home on a small index.
    fn hash_of(key: u32) -> u64 {
        (u64::from(key)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(key % 7)
    }

    fn find(index: &Index, key: u32, positions: &HashMap<u32, u32>) -> Option<u32> {
        let slot = index.find(hash_of(key), |at| {
            positions.iter().any(|(k, p)| *k == key && *p == at)
        })?;
        Some(index.position(slot))
    }

    #[test]
    fn agrees_with_a_map_through_inserts_removals_and_rebuilds() {
        let mut index = Index::default();
        // key -> position, the model.
        let mut positions: HashMap<u32, u32> = HashMap::new();
        let mut next_position = 0;
        let mut state = 0x2545_F491_u64;
        for round in 0..20_000u32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let key = (state % 3000) as u32;
            let held = positions.contains_key(&key);
            if held && round % 3 != 0 {
                let slot = index
                    .find(hash_of(key), |at| positions[&key] == at)
                    .expect("a held key is found");
                index.remove(slot);
                positions.remove(&key);
            } else if !held {
                if index.is_full() {
                    let all: Vec<(u32, u64)> =
                        positions.iter().map(|(k, p)| (*p, hash_of(*k))).collect();
                    index.rebuild(all.into_iter(), 1);
                    assert!(!index.is_full());
                }
                index.insert(hash_of(key), next_position);
                positions.insert(key, next_position);
                next_position += 1;
            }
            if round % 97 == 0 {
                for probe in 0..3000 {
                    assert_eq!(
                        find(&index, probe, &positions),
                        positions.get(&probe).copied(),
                        "key {probe} at round {round}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_moved_entry_is_found_at_its_new_position() {
        let mut index = Index::default();
        index.rebuild(std::iter::empty(), 1);
        index.insert(hash_of(1), 7);
        let slot = index.find(hash_of(1), |at| at == 7).expect("held");
        index.set_position(slot, 3);
        assert_eq!(index.find(hash_of(1), |at| at == 7), None);
        let slot = index.find(hash_of(1), |at| at == 3).expect("moved");
        assert_eq!(index.position(slot), 3);
    }

    #[test]
    fn grows_by_doubling_and_shrinks_after_most_entries_go() {
        let mut index = Index::default();
        let mut held: Vec<(u32, u64)> = Vec::new();
        for key in 0..10_000u32 {
            if index.is_full() {
                index.rebuild(held.iter().copied(), 1);
            }
            index.insert(hash_of(key), key);
            held.push((key, hash_of(key)));
        }
        // 10,000 entries at most 13/16 full: 16,384 slots, 6.6 bytes per entry.
        assert_eq!(index.bytes(), 16_384 * 4);
        for (key, hash) in held.drain(100..) {
            let slot = index.find(hash, |at| at == key).expect("held");
            index.remove(slot);
        }
        index.rebuild(held.iter().copied(), 1);
        assert_eq!(index.bytes(), 256 * 4);
        for (key, hash) in held {
            assert_eq!(
                index.find(hash, |at| at == key).map(|s| index.position(s)),
                Some(key)
            );
        }
    }
}
