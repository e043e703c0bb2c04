//! The memory store beside governor's keyed limiter (DashMap state store), on the
//! same key streams: one hot key, 1M keys uniform, 1M keys Zipf(1.0), and 2 threads.
//!
//! sluice's side builds a full `DecisionRequest` per call (an owned key, as the
//! server does after parsing JSON); governor's side checks a borrowed key.
//!
//! `uniform_1m_short_lived` is sluice alone at `100/second`: every counter expires
//! 10 ms after its hit, so each hit on a 1M-key uniform stream finds its counter swept
//! and inserts it again. That is the price of bounded memory, which governor's keyed
//! store does not pay (it keeps every key until `retain_recent` is called).
//!
//! Run: `cargo bench -p sluice-store-memory --bench memory_store`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use governor::{Quota, RateLimiter};
use sluice_engine::{Check, DecisionRequest, Limit, LimitSpec};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};

#[path = "support/streams.rs"]
mod streams;
use streams::STREAM;

const KEYS: usize = 1_000_000;
/// Long enough that a key's state outlives a pass over the stream and every check is
/// admitted, on both sides: governor never drops expired state, sluice does (see
/// `uniform_1m_short_lived`), so a short rate would compare different work.
const RATE: &str = "1000/hour";

fn sluice_store() -> (MemoryStore, Arc<Limit>) {
    sluice_store_with(RATE)
}

fn sluice_store_with(rate: &str) -> (MemoryStore, Arc<Limit>) {
    let store = MemoryStore::new(MemoryStoreConfig {
        max_keys: 2 * KEYS,
        ..Default::default()
    });
    let limit = Limit::new("bench", LimitSpec::new(vec![rate.parse().unwrap()])).unwrap();
    (store, Arc::new(limit))
}

fn short_lived(c: &mut Criterion, stream: &[usize], keys: &[String]) {
    let mut group = c.benchmark_group("uniform_1m_short_lived");
    group.throughput(Throughput::Elements(1));
    let (store, limit) = sluice_store_with("100/second");
    let mut i = 0;
    group.bench_function("sluice", |b| {
        b.iter(|| {
            i = (i + 1) & (STREAM - 1);
            decide(&store, &limit, &keys[stream[i]])
        })
    });
    group.finish();
}

fn decide(store: &MemoryStore, limit: &Arc<Limit>, key: &str) -> bool {
    let request = DecisionRequest {
        checks: vec![Check::new(Arc::clone(limit), key, 1).unwrap()],
        dry_run: false,
    };
    store.decide_sync(&request).windows[0].allowed
}

type Governor = RateLimiter<
    String,
    governor::state::keyed::DefaultKeyedStateStore<String>,
    governor::clock::DefaultClock,
>;

fn governor() -> Governor {
    RateLimiter::keyed(Quota::per_hour(NonZeroU32::new(1000).unwrap()))
}

fn single_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("single_key");
    group.throughput(Throughput::Elements(1));
    let (store, limit) = sluice_store();
    group.bench_function("sluice", |b| {
        b.iter(|| decide(&store, &limit, black_box("user:42")))
    });
    let gov = governor();
    let key = "user:42".to_string();
    group.bench_function("governor", |b| {
        b.iter(|| gov.check_key(black_box(&key)).is_ok())
    });
    group.finish();
}

fn many_keys(c: &mut Criterion, name: &str, stream: &[usize], keys: &[String]) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    let (store, limit) = sluice_store();
    let gov = governor();
    // Warm both to the full key set so the measurement is of a 1M-key table.
    for key in keys {
        decide(&store, &limit, key);
        let _ = gov.check_key(key);
    }
    let mut i = 0;
    group.bench_function("sluice", |b| {
        b.iter(|| {
            i = (i + 1) & (STREAM - 1);
            decide(&store, &limit, &keys[stream[i]])
        })
    });
    let mut i = 0;
    group.bench_function("governor", |b| {
        b.iter(|| {
            i = (i + 1) & (STREAM - 1);
            gov.check_key(&keys[stream[i]]).is_ok()
        })
    });
    group.finish();
}

fn two_threads(c: &mut Criterion, stream: &[usize], keys: &[String]) {
    let mut group = c.benchmark_group("uniform_1m_2_threads");
    group.throughput(Throughput::Elements(1));
    let (store, limit) = sluice_store();
    let gov = governor();
    for key in keys {
        decide(&store, &limit, key);
        let _ = gov.check_key(key);
    }
    let run = |iters: u64, one: &(dyn Fn(&String) -> bool + Sync)| -> Duration {
        let started = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..2 {
                scope.spawn(move || {
                    for n in 0..iters / 2 {
                        let i = (n as usize * 2 + t) & (STREAM - 1);
                        black_box(one(&keys[stream[i]]));
                    }
                });
            }
        });
        started.elapsed()
    };
    group.bench_function(BenchmarkId::new("sluice", 2), |b| {
        b.iter_custom(|iters| run(iters, &|key| decide(&store, &limit, key)))
    });
    group.bench_function(BenchmarkId::new("governor", 2), |b| {
        b.iter_custom(|iters| run(iters, &|key| gov.check_key(key).is_ok()))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    single_key(c);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("user:{i}")).collect();
    let uniform = streams::uniform(KEYS);
    many_keys(c, "uniform_1m", &uniform, &keys);
    many_keys(c, "zipf_1m", &streams::zipf(KEYS), &keys);
    two_threads(c, &uniform, &keys);
    short_lived(c, &uniform, &keys);
}

criterion_group! {
    name = memory_store;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(2)).sample_size(30);
    targets = benches
}
criterion_main!(memory_store);
