//! Counters, reservations and runtime records survive closing and reopening the store;
//! expired counters do not come back.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::{Algorithm, Check, DecisionRequest, Limit, LimitSpec, ManualClock, decide};
use sluice_store_disk::{DiskStore, DiskStoreConfig};

const START: i64 = 20_000 * 86_400 * 1_000_000 + 250_000;

fn limit(name: &str, rates: &[&str], algorithm: Algorithm) -> Arc<Limit> {
    let mut spec = LimitSpec::new(rates.iter().map(|r| r.parse().expect("rate")).collect());
    spec.algorithm = algorithm;
    Arc::new(Limit::new(name, spec).expect("limit"))
}

async fn charge(store: &DiskStore, l: &Arc<Limit>, key: &str, cost: u64) -> Vec<u64> {
    let request = DecisionRequest {
        checks: vec![Check::new(Arc::clone(l), key, cost).expect("check")],
        dry_run: false,
    };
    let d = decide(store, &request).await.expect("decide");
    d.results.iter().map(|r| r.remaining).collect()
}

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> DiskStore {
    DiskStore::open_with_clock(DiskStoreConfig::new(dir), clock.clone()).expect("open")
}

#[tokio::test]
async fn counters_survive_reopen_and_expired_ones_are_gone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(START));
    let gcra = limit("gcra", &["5/minute"], Algorithm::Gcra);
    let fixed = limit("fixed", &["10/hour"], Algorithm::FixedWindow);
    let sliding = limit("sliding", &["10/hour"], Algorithm::SlidingWindow);
    let layered = limit("layered", &["5/minute", "60/hour"], Algorithm::Gcra);
    let short = limit("short", &["2/second"], Algorithm::Gcra);

    {
        let store = open(dir.path(), &clock);
        assert_eq!(store.load_report().restored, 0);
        for _ in 0..3 {
            charge(&store, &gcra, "a", 1).await;
        }
        charge(&store, &fixed, "b", 4).await;
        charge(&store, &sliding, "c", 2).await;
        charge(&store, &layered, "d", 2).await;
        charge(&store, &short, "e", 1).await;
        charge(&store, &gcra, "reset-me", 5).await;
        sluice_engine::Store::reset(&store, &gcra, "reset-me")
            .await
            .expect("reset");
    }

    clock.advance(Duration::from_millis(1_500));
    let store = open(dir.path(), &clock);
    let report = store.load_report();
    assert_eq!(report.restored, 5, "a, b, c, d (two windows): {report:?}");
    assert_eq!(report.expired, 1, "e expired while closed: {report:?}");
    assert_eq!(report.unreadable, 0);
    assert_eq!(charge(&store, &gcra, "a", 0).await, vec![2]);
    assert_eq!(charge(&store, &fixed, "b", 0).await, vec![6]);
    assert_eq!(charge(&store, &sliding, "c", 0).await, vec![8]);
    assert_eq!(charge(&store, &layered, "d", 0).await, vec![3, 58]);
    assert_eq!(charge(&store, &short, "e", 0).await, vec![2], "expired");
    assert_eq!(charge(&store, &gcra, "reset-me", 0).await, vec![5], "reset");
}

/// Many concurrent decisions on one counter are persisted in decision order: after a
/// reopen the count is exactly what was admitted, never an earlier state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_persist_in_decision_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(START));
    let l = limit("hot", &["100000/day"], Algorithm::FixedWindow);
    let shared = limit("pair", &["100000/day"], Algorithm::SlidingWindow);
    {
        let store = Arc::new(open(dir.path(), &clock));
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = Arc::clone(&store);
                let (l, shared) = (Arc::clone(&l), Arc::clone(&shared));
                tokio::spawn(async move {
                    for i in 0..250 {
                        let request = DecisionRequest {
                            checks: vec![
                                Check::new(Arc::clone(&l), "k", 1).expect("check"),
                                Check::new(Arc::clone(&shared), format!("t{}", (t + i) % 3), 2)
                                    .expect("check"),
                            ],
                            dry_run: false,
                        };
                        assert!(decide(&*store, &request).await.expect("decide").allowed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    }
    let store = open(dir.path(), &clock);
    assert_eq!(charge(&store, &l, "k", 0).await, vec![100_000 - 2_000]);
    let spent: u64 = {
        let mut total = 0;
        for k in ["t0", "t1", "t2"] {
            total += 100_000 - charge(&store, &shared, k, 0).await[0];
        }
        total
    };
    assert_eq!(spent, 2 * 2_000);
}

/// A reservation made before a restart is settled after it, once; its concurrency slot
/// stays held across the restart and comes back when it is settled.
#[tokio::test]
async fn reservations_and_their_slots_survive_reopen() {
    use sluice_engine::{Decision, Hold, HoldId, SettleStatus, Settlement, Store};
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(START));
    let tokens = limit("tokens", &["100/hour"], Algorithm::FixedWindow);
    let in_flight = Arc::new(Limit::new("in_flight", LimitSpec::concurrency(1)).expect("limit"));
    let request = DecisionRequest {
        checks: vec![
            Check::new(Arc::clone(&tokens), "u", 40).expect("check"),
            Check::new(Arc::clone(&in_flight), "u", 1).expect("check"),
        ],
        dry_run: false,
    };
    let hold = Hold {
        id: HoldId {
            id: format!("{:032x}", 0xfeed_u128),
            digest: "d1".into(),
        },
        ttl: 600_000_000,
    };
    {
        let store = open(dir.path(), &clock);
        let outcomes = store.reserve(&request, &hold).await.expect("reserve");
        let decision = Decision::from_outcomes(&request, &outcomes.windows, false);
        assert!(decision.allowed);
    }
    clock.advance(Duration::from_secs(1));
    let store = open(dir.path(), &clock);
    assert_eq!(store.load_report().unreadable, 0);
    let second = Hold {
        id: HoldId {
            id: format!("{:032x}", 0xbeef_u128),
            digest: "d2".into(),
        },
        ..hold.clone()
    };
    let blocked = store.reserve(&request, &second).await.expect("reserve");
    assert!(!blocked.windows[1].allowed, "the slot is still held");
    let settlement = Settlement {
        hold: Some(hold.id.clone()),
        request: request.clone(),
        actual: vec![10, 1],
        windows: vec![true, true],
    };
    assert_eq!(
        store.settle(&settlement).await.expect("settle"),
        SettleStatus::Settled
    );
    assert_eq!(
        charge(&store, &tokens, "u", 0).await,
        vec![90],
        "settled at 10"
    );
    drop(store);
    let store = open(dir.path(), &clock);
    assert_eq!(
        store.settle(&settlement).await.expect("settle"),
        SettleStatus::AlreadySettled,
        "settled before the restart"
    );
    let again = store.reserve(&request, &second).await.expect("reserve");
    assert!(again.windows[1].allowed, "the settled slot came back");
}

/// Runtime records (plan assignments, block entries) survive a restart, removals too.
#[tokio::test]
async fn records_survive_reopen() {
    use sluice_engine::{Record, Store};
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(START));
    let record = |id: &str, body: &str| Record {
        id: id.to_string(),
        body: body.to_string(),
    };
    {
        let store = open(dir.path(), &clock);
        store
            .put_record(&record("plan/customer:42", "{\"plan\":\"pro\"}"))
            .await
            .expect("put");
        store
            .put_record(&record("block/user:7", "{\"reason\":\"abuse\"}"))
            .await
            .expect("put");
        store
            .put_record(&record("allow/ip:10.0.0.1", "{}"))
            .await
            .expect("put");
        assert!(
            store
                .remove_record("allow/ip:10.0.0.1")
                .await
                .expect("remove")
        );
    }
    let store = open(dir.path(), &clock);
    let mut read: Vec<(String, String)> = store
        .records()
        .await
        .expect("records")
        .records
        .into_iter()
        .map(|r| (r.id, r.body))
        .collect();
    read.sort();
    assert_eq!(
        read,
        [
            (
                "block/user:7".to_string(),
                "{\"reason\":\"abuse\"}".to_string()
            ),
            (
                "plan/customer:42".to_string(),
                "{\"plan\":\"pro\"}".to_string()
            ),
        ]
    );
}
