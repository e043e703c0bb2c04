//! The key streams the memory store is measured on, shared by the criterion benchmark
//! (`benches/memory_store.rs`) and the `hot_loop` example that
//! `bench/engine-vs-governor.sh` pairs with governor: the same draws on both.

/// Draws per stream; a power of two, so a loop can wrap with a mask.
pub const STREAM: usize = 1 << 20;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// [`STREAM`] ranks drawn uniformly from `0..keys`.
pub fn uniform(keys: usize) -> Vec<usize> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    (0..STREAM)
        .map(|_| (rng.next() % keys as u64) as usize)
        .collect()
}

/// [`STREAM`] ranks drawn from Zipf(s = 1.0) over `0..keys`, by inverting the
/// cumulative weights.
pub fn zipf(keys: usize) -> Vec<usize> {
    let mut cumulative = Vec::with_capacity(keys);
    let mut total = 0.0;
    for rank in 1..=keys {
        total += 1.0 / rank as f64;
        cumulative.push(total);
    }
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    (0..STREAM)
        .map(|_| {
            let target = rng.unit() * total;
            cumulative.partition_point(|&c| c < target).min(keys - 1)
        })
        .collect()
}
