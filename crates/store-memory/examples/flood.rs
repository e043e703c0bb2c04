//! A flood of distinct fake keys against a memory store with a small `max_keys`,
//! printing the process's resident memory as it goes: memory must stay flat.
//!
//! Run: `cargo run --release -p sluice-store-memory --example flood -- [KEYS] [MAX_KEYS]`
//! (defaults: 10,000,000 keys, max_keys 100,000).

use std::sync::Arc;
use std::time::Instant;

use sluice_engine::{Check, DecisionRequest, Limit, LimitSpec, Store};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let keys: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let max_keys: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let store = MemoryStore::new(MemoryStoreConfig {
        max_keys,
        ..Default::default()
    });
    let limit = Arc::new(
        Limit::new(
            "login_ip",
            LimitSpec::new(vec!["5/minute".parse().unwrap()]),
        )
        .unwrap(),
    );
    println!(
        "flood: {keys} distinct keys, max_keys {max_keys}, limit 5/minute (each counter lives 12 s)"
    );
    println!(
        "{:>12} {:>10} {:>12} {:>10} {:>10} {:>9}",
        "keys sent", "held", "evictions", "RSS MiB", "peak MiB", "secs"
    );
    println!(
        "{:>12} {:>10} {:>12} {:>10.1} {:>10.1} {:>9.1}",
        0,
        0,
        0,
        status_kib("VmRSS:") as f64 / 1024.0,
        status_kib("VmHWM:") as f64 / 1024.0,
        0.0
    );
    let started = Instant::now();
    let step = (keys / 10).max(1);
    for i in 0..keys {
        let request = DecisionRequest {
            checks: vec![
                Check::new(
                    Arc::clone(&limit),
                    format!("203.0.{}.{}:{i}", i % 256, i / 256 % 256),
                    1,
                )
                .unwrap(),
            ],
            dry_run: false,
        };
        store.decide_sync(&request);
        if (i + 1) % step == 0 {
            let stats = store.stats();
            println!(
                "{:>12} {:>10} {:>12} {:>10.1} {:>10.1} {:>9.1}",
                i + 1,
                stats.keys,
                stats.evictions,
                status_kib("VmRSS:") as f64 / 1024.0,
                status_kib("VmHWM:") as f64 / 1024.0,
                started.elapsed().as_secs_f64()
            );
        }
    }
}
