//! A flood of distinct keys leaves a bounded data directory once its counters expire.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_engine::{Check, DecisionRequest, Limit, LimitSpec, ManualClock, decide};
use sluice_store_disk::{DiskStore, DiskStoreConfig};

const START: i64 = 20_000 * 86_400 * 1_000_000 + 250_000;
const KEYS_PER_ROUND: usize = 40_000;
const ROUNDS: usize = 6;
/// Long keys, so the journal passes fjall's 64 MB rotation point within the test.
const PADDING: &str =
    "an-attacker-rotates-its-keys-and-pads-them-to-make-every-counter-as-expensive-as-it-can";

/// Bytes allocated on disk under `path`, as `du` counts them (fjall preallocates its
/// journal as a sparse file, so apparent sizes say little).
fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).expect("read dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

fn list(path: &Path) {
    for entry in std::fs::read_dir(path).expect("read dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            list(&entry.path());
        } else {
            eprintln!(
                "  {} {} {}",
                entry.path().display(),
                meta.len(),
                meta.blocks() * 512
            );
        }
    }
}

async fn flood(store: &Arc<DiskStore>, l: &Arc<Limit>, round: usize) {
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (store, l) = (Arc::clone(store), Arc::clone(l));
            tokio::spawn(async move {
                for i in (t..KEYS_PER_ROUND).step_by(8) {
                    let key = format!("flood:{round}:{i}:{}", PADDING.repeat(5));
                    let request = DecisionRequest {
                        checks: vec![Check::new(Arc::clone(&l), key, 1).expect("check")],
                        dry_run: false,
                    };
                    decide(&*store, &request).await.expect("decide");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_flood_leaves_a_bounded_data_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(START));
    let store = Arc::new(
        DiskStore::open_with_clock(DiskStoreConfig::new(dir.path()), clock.clone()).expect("open"),
    );
    let l = Arc::new(
        Limit::new(
            "f",
            LimitSpec::new(vec!["10/second".parse().expect("rate")]),
        )
        .expect("limit"),
    );
    let empty = dir_size(dir.path());
    let mut after = Vec::new();
    for round in 0..ROUNDS {
        flood(&store, &l, round).await;
        let full = dir_size(dir.path());
        clock.advance(Duration::from_secs(2));
        store.compact().expect("compact");
        store.sweep();
        assert_eq!(store.len(), 0, "memory holds no expired counter");
        let size = dir_size(dir.path());
        let tables = dir_size(&dir.path().join("keyspaces"));
        eprintln!(
            "round {round}: {KEYS_PER_ROUND} keys, {full} bytes after the flood, {size} bytes after expiry + compaction, {tables} of them tables"
        );
        after.push((size, tables));
        if std::env::var_os("FLOOD_LIST").is_some() {
            list(dir.path());
        }
    }
    eprintln!("empty store: {empty} bytes");
    // Journals: the active one (sealed at 64 MB) plus at most 64 MiB of sealed ones;
    // tables: what the last flood left as tombstones, never the sum of all floods.
    let written = ROUNDS * KEYS_PER_ROUND * (PADDING.len() * 5 + 40);
    assert!(
        written > 100_000_000,
        "the test floods past a journal rotation"
    );
    let (first_tables, last_tables) = (after[0].1, after[ROUNDS - 1].1);
    assert!(
        last_tables <= first_tables + 1024 * 1024,
        "tables keep growing across floods: {after:?}"
    );
    let max_size = after.iter().map(|(size, _)| *size).max().unwrap_or(0);
    assert!(
        max_size < 64_000_000 + 64 * 1024 * 1024 + 2 * first_tables,
        "the directory outgrew its journals and one flood's tables: {after:?}"
    );
    drop(store);
    let store =
        DiskStore::open_with_clock(DiskStoreConfig::new(dir.path()), clock).expect("reopen");
    assert_eq!(
        store.load_report().restored,
        0,
        "nothing expired comes back"
    );
}
