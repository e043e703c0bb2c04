//! The disk store's promise, black-box: a decision that was answered survives the
//! process being killed with SIGKILL. Clients charge distinct and shared keys under
//! concurrent load, the server is killed mid-load (`Child::kill` sends SIGKILL), started
//! again on the same data directory, and every key must show at least every charge that
//! was acknowledged with an allowed 200.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, scratch_dir};
use serde_json::{Value, json};

const QUOTA: u64 = 100_000;
const CLIENTS: usize = 8;

fn config(data: &std::path::Path, sync: bool) -> String {
    format!(
        "storage: {{backend: disk, path: '{}', sync: {sync}}}
limits:
  own: {{rate: {QUOTA}/day}}
  shared_fixed: {{rate: {QUOTA}/day, algorithm: fixed_window}}
  shared_sliding: {{rate: {QUOTA}/day, algorithm: sliding_window}}
",
        data.display()
    )
}

/// Charges recorded from allowed 200s, per (limit, key).
type Acked = HashMap<(String, String), u64>;

fn load_then_kill(sync: bool) {
    let scratch = scratch_dir("disk-kill9");
    let data = scratch.join("data");
    let text = config(&data, sync);
    let server = Server::start(&text);
    let base = server.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::new()));
    let answered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let day = |t: Instant| {
        let elapsed = t.duration_since(started).as_micros() as u64;
        (common::now_ms() * 1_000 + elapsed) / 86_400_000_000
    };
    let first_day = day(started);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (base, stop, acked, answered) = (
                base.clone(),
                Arc::clone(&stop),
                Arc::clone(&acked),
                Arc::clone(&answered),
            );
            std::thread::spawn(move || {
                let agent = common::agent();
                let mut mine = Acked::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let cost = 1 + i % 3;
                    let checks = vec![
                        ("own", format!("client-{c}")),
                        ("shared_fixed", format!("shared-{}", i % 4)),
                        ("shared_sliding", "shared".to_string()),
                    ];
                    let body = json!({
                        "checks": checks.iter().map(|(l, k)| json!({"limit": l, "key": k})).collect::<Vec<_>>(),
                        "cost": cost,
                    });
                    let response = agent
                        .post(format!("{base}/v1/check"))
                        .header("content-type", "application/json")
                        .send(body.to_string().as_bytes());
                    // A failed or unfinished exchange was never acknowledged.
                    let Ok(mut response) = response else { break };
                    if response.status().as_u16() != 200 {
                        continue;
                    }
                    let Ok(text) = response.body_mut().read_to_string() else {
                        break;
                    };
                    let Ok(decision) = serde_json::from_str::<Value>(&text) else {
                        break;
                    };
                    answered.fetch_add(1, Ordering::Relaxed);
                    if decision["allowed"] == true {
                        for (limit, key) in checks {
                            *mine.entry((limit.to_string(), key)).or_default() += cost;
                        }
                    }
                }
                let mut all = acked.lock().unwrap();
                for (k, v) in mine {
                    *all.entry(k).or_default() += v;
                }
            })
        })
        .collect();

    // Let the load build up, then kill the server while requests are in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.load(Ordering::Relaxed) < 2_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let answered_before_kill = answered.load(Ordering::Relaxed);
    drop(server); // SIGKILL, then wait for the process
    let killed_at = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client thread");
    }
    assert!(
        answered_before_kill >= 500,
        "too little load before the kill: {answered_before_kill} answers"
    );

    let server = Server::start(&text);
    let acked = acked.lock().unwrap().clone();
    let total: u64 = acked.values().sum();
    assert!(total > 0, "nothing was acknowledged");
    let elapsed = killed_at.duration_since(started).as_secs_f64() + 1.0;
    let same_day = day(Instant::now()) == first_day;
    let mut checked = 0;
    for ((limit, key), charged) in &acked {
        let d = server.check(json!({"checks": [{"limit": limit, "key": key, "cost": 0}]}));
        let remaining = d["results"][0]["remaining"].as_u64().expect("remaining");
        // gcra refills continuously: QUOTA per day, so allow what came back meanwhile.
        let refill = match limit.as_str() {
            "own" => (elapsed * QUOTA as f64 / 86_400.0).ceil() as u64,
            _ if same_day => 0,
            // The run crossed 00:00 UTC: windowed counters started over.
            _ => continue,
        };
        assert!(
            remaining <= QUOTA - charged + refill,
            "{limit}/{key}: {charged} acknowledged before kill -9, but {remaining} of {QUOTA} remain after restart\nserver stderr:\n{}",
            server.stderr()
        );
        checked += 1;
    }
    eprintln!(
        "sync: {sync}: {answered_before_kill}+ answers before SIGKILL, {total} acknowledged charges over {} counters, {checked} checked after restart",
        acked.len()
    );
    assert!(checked >= CLIENTS, "every client's own counter was checked");
    drop(server);
}

#[test]
fn acknowledged_charges_survive_kill_9() {
    load_then_kill(false);
}

#[test]
fn acknowledged_charges_survive_kill_9_with_sync() {
    load_then_kill(true);
}
