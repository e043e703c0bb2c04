//! Redis killed while load runs: no 5xx and no panic, decisions go on degraded under
//! `on_error: local` and are counted; when Redis is back, shared counting resumes by
//! itself and each change of state is logged once.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;
use sluice_testkit::servers::RedisServer;

#[test]
fn killing_redis_under_load_degrades_without_5xx_and_sharing_resumes_after_restart() {
    let mut redis = RedisServer::start().expect("redis-server (scripts/test installs it)");
    let s = Server::start(&format!(
        "storage: {{backend: redis, url: \"{}\", prefix: \"fault:\", on_error: local, timeout_ms: 200}}\nlimits:\n  api: {{rate: 1000000/hour}}\n",
        redis.url()
    ));
    let stop = AtomicBool::new(false);
    let degraded = AtomicUsize::new(0);
    let statuses: Mutex<BTreeMap<u16, usize>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for t in 0..6 {
            let (s, stop, degraded, statuses) = (&s, &stop, &degraded, &statuses);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = s.post_json(
                        "/v1/check",
                        &json!({"checks": [{"limit": "api", "key": format!("k{t}")}]}),
                    );
                    *statuses.lock().unwrap().entry(r.status).or_default() += 1;
                    if r.status == 200 && r.json()["degraded"] == true {
                        degraded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(800));
        redis.stop();
        std::thread::sleep(Duration::from_millis(1500));
        redis.restart().expect("restart redis-server");
        std::thread::sleep(Duration::from_millis(2000));
        stop.store(true, Ordering::Relaxed);
    });
    let statuses = statuses.into_inner().unwrap();
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "only 200s, never a 5xx: {statuses:?}"
    );
    assert!(
        degraded.load(Ordering::Relaxed) > 0,
        "decisions while Redis was down were degraded"
    );

    // Shared counting is back: fresh decisions are not degraded and land in Redis.
    let started = Instant::now();
    loop {
        let d = s.hit("api", "after-restart", None);
        if d["degraded"] == false {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still degraded 3 s after the restart: {d}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = s.get("/metrics").body;
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("sluice_degraded_decisions_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        counted > 0,
        "degraded decisions are counted in metrics:\n{metrics}"
    );
    let log = std::fs::read_to_string(&s.stderr_path).unwrap_or_default();
    assert_eq!(
        log.matches("store unreachable").count(),
        1,
        "the outage is logged once:\n{log}"
    );
    assert!(
        log.contains("store reachable again"),
        "and the recovery:\n{log}"
    );
}

/// How long `/readyz` took to answer `status`; panics after `within`.
fn readyz_turns(s: &Server, status: u16, within: Duration) -> Duration {
    let started = Instant::now();
    assert!(
        common::readyz_becomes(s, status, within),
        "/readyz not {status} within {within:?}\n{}",
        s.stderr()
    );
    started.elapsed()
}

#[test]
fn readyz_and_stats_answer_from_the_known_state_without_flooding_redis() {
    use common::RedisCommands;
    let mut redis = RedisServer::start().expect("redis-server (scripts/test installs it)");
    let s = Server::start(&format!(
        "storage: {{backend: redis, url: \"{}\", prefix: \"health:\", on_error: local, timeout_ms: 200}}\nlimits:\n  api: {{rate: 1000000/hour}}\n",
        redis.url()
    ));
    let pings = |redis: &RedisServer| {
        redis
            .command_stats()
            .get(&("ping".to_string(), "calls".to_string()))
            .copied()
            .unwrap_or(0)
    };
    let before = pings(&redis);
    let started = Instant::now();
    for i in 0..1000 {
        let path = if i % 2 == 0 { "/readyz" } else { "/v1/stats" };
        let r = s.get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let took = started.elapsed();
    let sent = pings(&redis) - before;
    // At most one ping per second (the probe interval), and one to start with.
    let allowed = took.as_secs() + 2;
    assert!(
        sent <= allowed,
        "1000 calls of /readyz and /v1/stats in {took:?} sent {sent} PINGs to Redis (at most {allowed})"
    );
    assert_eq!(s.get("/v1/stats").json()["store"]["reachable"], true);

    // An outage is still seen with no decisions flowing, and so is the recovery.
    redis.stop();
    let went = readyz_turns(&s, 503, Duration::from_secs(3));
    assert_eq!(s.get("/v1/stats").json()["store"]["reachable"], false);
    redis.restart().expect("restart redis-server");
    let came = readyz_turns(&s, 200, Duration::from_secs(4));
    eprintln!("/readyz turned 503 after {went:?}, 200 after {came:?}");
    assert_eq!(s.get("/v1/stats").json()["store"]["reachable"], true);
}
