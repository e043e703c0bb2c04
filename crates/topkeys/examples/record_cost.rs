//! Time per `TopKeys::record` on one thread and on two threads sharing one limit:
//! `cargo run --release -p sluice-topkeys --example record_cost [KEYS] [CAPACITY]`.
//! Keys cycle uniformly over KEYS (default 10,000): with more keys than counters nearly
//! every record replaces a counter, the most expensive path.

use std::sync::Arc;
use std::time::Instant;

use sluice_topkeys::TopKeys;

fn main() {
    let mut args = std::env::args().skip(1);
    let keys: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let capacity: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let names: Arc<Vec<String>> = Arc::new((0..keys).map(|i| format!("k{i}")).collect());
    let rounds = 2_000_000;
    for threads in [1, 2] {
        let top = Arc::new(TopKeys::new(capacity));
        let started = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (top, names) = (Arc::clone(&top), Arc::clone(&names));
                std::thread::spawn(move || {
                    for i in 0..rounds {
                        let key = &names[(i * 7 + t * 13) % names.len()];
                        top.record(key, 1, i % 10 == 0, (i / 100_000) as u64);
                    }
                })
            })
            .collect();
        for handle in handles {
            let _ = handle.join();
        }
        let per = started.elapsed().as_nanos() as f64 / (rounds * threads) as f64;
        println!(
            "{threads} thread(s), {keys} keys, k = {capacity}: {per:.0} ns per record (wall time / records)"
        );
    }
}
