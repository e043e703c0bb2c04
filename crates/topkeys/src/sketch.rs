//! The Space-Saving sketch: the heaviest keys of a stream in `k` counters.
//!
//! Each counter holds a key, its count and its error (how much of the count may belong
//! to keys it replaced). A key already held adds its weight to its counter; a new key
//! takes a free counter, or else replaces the key with the smallest count, inheriting
//! that count as its error. So every count overestimates its key's true weight by at
//! most its error, and every error is at most the smallest count, which is at most
//! `N / k` (`N` the total weight fed, since the `k` counts sum to `N`). Any key whose
//! true weight exceeds `N / k` is held.
//!
//! Counters sit in a binary min-heap on count (an increment is a sift down, a
//! replacement takes the root) and are found by a hash table of counter indices, hashed
//! with the caller's keyed hasher (seeded at random per process, so callers cannot
//! choose keys that collide). A replaced counter reuses its key's allocation.

use hashbrown::HashTable;

/// One key the sketch holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Its estimated weight: at least the true weight, at most `error` above it.
    pub count: u64,
    /// How far `count` may be above the true weight.
    pub error: u64,
}

#[derive(Debug)]
struct Counter {
    key: String,
    hash: u64,
    error: u64,
    /// This counter's place in the heap, which holds its count.
    pos: usize,
}

/// A heap entry: a counter's count beside its index, so that sifting compares counts
/// in one array instead of reaching into the counters.
#[derive(Debug, Clone, Copy)]
struct Node {
    count: u64,
    counter: usize,
}

/// A Space-Saving sketch of at most `capacity` counters. Memory grows with the keys
/// seen up to `capacity` counters and then stays.
#[derive(Debug)]
pub struct SpaceSaving {
    capacity: usize,
    counters: Vec<Counter>,
    /// The counts, with their counters' indices: a min-heap on count.
    heap: Vec<Node>,
    /// Counter indices, found by key.
    table: HashTable<usize>,
    total: u64,
}

impl SpaceSaving {
    /// An empty sketch of `capacity` counters (at least 1).
    pub fn new(capacity: usize) -> Self {
        SpaceSaving {
            capacity: capacity.max(1),
            counters: Vec::new(),
            heap: Vec::new(),
            table: HashTable::new(),
            total: 0,
        }
    }

    /// How many counters it may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The total weight fed since the last [`SpaceSaving::clear`].
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether every counter is taken (so a key not held may have been replaced).
    pub fn is_full(&self) -> bool {
        self.counters.len() >= self.capacity
    }

    /// The most a key that is not held can have weighed: the smallest count once every
    /// counter is taken, 0 before (no key was ever replaced).
    pub fn floor(&self) -> u64 {
        if self.is_full() {
            self.heap.first().map_or(0, |node| node.count)
        } else {
            0
        }
    }

    /// Forgets every key, keeping the allocations.
    pub fn clear(&mut self) {
        self.counters.clear();
        self.heap.clear();
        self.table.clear();
        self.total = 0;
    }

    /// Adds `weight` to `key`, whose hash (by the caller's hasher, the same for every
    /// call on this sketch) is `hash`.
    pub fn add(&mut self, key: &str, hash: u64, weight: u64) {
        if weight == 0 {
            return;
        }
        self.total = self.total.saturating_add(weight);
        let counters = &mut self.counters;
        if let Some(&i) = self.table.find(hash, |&i| {
            counters[i].hash == hash && counters[i].key == key
        }) {
            let pos = counters[i].pos;
            self.heap[pos].count = self.heap[pos].count.saturating_add(weight);
            self.sift_down(pos);
            return;
        }
        if counters.len() < self.capacity {
            let i = counters.len();
            counters.push(Counter {
                key: key.to_owned(),
                hash,
                error: 0,
                pos: self.heap.len(),
            });
            self.heap.push(Node {
                count: weight,
                counter: i,
            });
            self.table.insert_unique(hash, i, |&j| counters[j].hash);
            self.sift_up(self.heap.len() - 1);
            return;
        }
        // Replace the smallest counter: its count becomes the new key's error.
        let Some(root) = self.heap.first_mut() else {
            return;
        };
        let i = root.counter;
        let floor = root.count;
        root.count = floor.saturating_add(weight);
        let old = counters[i].hash;
        if let Ok(entry) = self.table.find_entry(old, |&j| j == i) {
            entry.remove();
        }
        let counter = &mut counters[i];
        counter.key.clear();
        counter.key.push_str(key);
        counter.hash = hash;
        counter.error = floor;
        self.table.insert_unique(hash, i, |&j| counters[j].hash);
        self.sift_down(0);
    }

    /// The held keys, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.counters
            .iter()
            .map(|c| (c.key.as_str(), self.heap[c.pos].count, c.error))
    }

    /// The held keys, heaviest first (ties by key).
    pub fn top(&self, n: usize) -> Vec<Entry> {
        let mut all: Vec<Entry> = self
            .entries()
            .map(|(key, count, error)| Entry {
                key: key.to_owned(),
                count,
                error,
            })
            .collect();
        sort_heaviest_first(&mut all);
        all.truncate(n);
        all
    }

    /// Puts `node` at `pos` and tells its counter where it is.
    fn place(&mut self, pos: usize, node: Node) {
        self.heap[pos] = node;
        self.counters[node.counter].pos = pos;
    }

    // Both sifts carry the moving node in hand and shift the others into the hole it
    // leaves, writing it once at the end: half the writes of swapping at every level,
    // which matters because a uniform stream sinks a replaced root to a leaf every time.

    fn sift_up(&mut self, mut pos: usize) {
        let node = self.heap[pos];
        while pos > 0 {
            let parent = (pos - 1) / 2;
            let above = self.heap[parent];
            if above.count <= node.count {
                break;
            }
            self.place(pos, above);
            pos = parent;
        }
        self.place(pos, node);
    }

    fn sift_down(&mut self, mut pos: usize) {
        let len = self.heap.len();
        let node = self.heap[pos];
        loop {
            let left = 2 * pos + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let child = if right < len && self.heap[right].count < self.heap[left].count {
                right
            } else {
                left
            };
            let below = self.heap[child];
            if node.count <= below.count {
                break;
            }
            self.place(pos, below);
            pos = child;
        }
        self.place(pos, node);
    }
}

/// Sorts heaviest first, ties by key, so answers are stable.
pub(crate) fn sort_heaviest_first(entries: &mut [Entry]) {
    entries.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::hash::{BuildHasher, RandomState};

    fn feed(sketch: &mut SpaceSaving, hasher: &RandomState, key: &str, weight: u64) {
        sketch.add(key, hasher.hash_one(key), weight);
    }

    #[test]
    fn exact_while_keys_fit() {
        let hasher = RandomState::new();
        let mut s = SpaceSaving::new(4);
        for (key, n) in [("a", 5), ("b", 3), ("c", 9)] {
            for _ in 0..n {
                feed(&mut s, &hasher, key, 1);
            }
        }
        let top = s.top(10);
        let got: Vec<_> = top
            .iter()
            .map(|e| (e.key.as_str(), e.count, e.error))
            .collect();
        assert_eq!(got, [("c", 9, 0), ("a", 5, 0), ("b", 3, 0)]);
        assert_eq!(s.total(), 17);
        assert_eq!(s.floor(), 0);
    }

    /// A skewed stream over many more keys than counters: every count is within its
    /// error of the truth, every error within N/k, and the heavy keys are all found.
    #[test]
    fn error_bound_holds_on_a_skewed_stream() {
        let hasher = RandomState::new();
        let k = 32;
        let mut s = SpaceSaving::new(k);
        let mut truth: HashMap<String, u64> = HashMap::new();
        let mut x: u64 = 12345;
        for i in 0..200_000u64 {
            // Every 4th item goes to one of 5 heavy keys; the rest spread over 10,000.
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = if i % 4 == 0 {
                format!("heavy{}", (x >> 33) % 5)
            } else {
                format!("k{}", (x >> 33) % 10_000)
            };
            let weight = 1 + (x >> 60) % 3;
            feed(&mut s, &hasher, &key, weight);
            *truth.entry(key).or_default() += weight;
        }
        let n: u64 = truth.values().sum();
        assert_eq!(s.total(), n);
        let bound = n / k as u64;
        for (key, count, error) in s.entries() {
            let real = truth[key];
            assert!(count >= real, "{key}: {count} < {real}");
            assert!(count - real <= error, "{key}: {count} - {real} > {error}");
            assert!(error <= bound, "{key}: error {error} > N/k {bound}");
        }
        let top: Vec<String> = s.top(5).into_iter().map(|e| e.key).collect();
        let mut expected: Vec<String> = (0..5).map(|i| format!("heavy{i}")).collect();
        let mut got = top.clone();
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "top 5 {top:?}");
    }

    #[test]
    fn clear_forgets_and_reuses() {
        let hasher = RandomState::new();
        let mut s = SpaceSaving::new(2);
        for key in ["a", "b", "c", "a"] {
            feed(&mut s, &hasher, key, 1);
        }
        assert!(s.is_full());
        s.clear();
        assert_eq!(s.total(), 0);
        assert!(s.top(5).is_empty());
        feed(&mut s, &hasher, "z", 7);
        assert_eq!(s.top(5)[0].count, 7);
    }
}
