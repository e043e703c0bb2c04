//! PostgreSQL failing under sluice: restarted while load runs (no 5xx, decisions go on
//! degraded under `on_error: local` and are counted, `/readyz` says so, shared counting
//! resumes by itself and each change of state is logged once); down when sluice starts
//! (it starts anyway and installs the schema when the database answers); and the
//! `sluice migrate` command and `migrate: false`.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{PostgresServer, Server, readyz_becomes, run_cli, write_file};
use serde_json::json;

fn storage(postgres: &PostgresServer, extra: &str) -> String {
    format!(
        "storage: {{backend: postgres, url: \"{}\", prefix: \"fault:\", on_error: local, timeout_ms: 200{extra}}}\n",
        postgres.url()
    )
}

/// Waits until `/readyz` answers `status`; panics after `within`.
fn wait_readyz(s: &Server, status: u16, within: Duration) {
    assert!(
        readyz_becomes(s, status, within),
        "/readyz not {status} within {within:?}\nstderr:\n{}",
        s.stderr()
    );
}

fn degraded_total(s: &Server) -> u64 {
    s.get("/metrics")
        .body
        .lines()
        .find(|l| l.starts_with("sluice_degraded_decisions_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn restarting_postgres_under_load_degrades_without_5xx_and_sharing_resumes() {
    let mut postgres = PostgresServer::start().expect("PostgreSQL (scripts/test installs it)");
    let s = Server::start(&format!(
        "{}limits:\n  api: {{rate: 1000000/hour}}\n  kept: {{rate: 10/hour}}\n",
        storage(&postgres, "")
    ));
    // Spend 4 of `kept` before the outage; commits are asynchronous, so give the WAL
    // writer its few hundred milliseconds before the crash.
    for _ in 0..4 {
        assert_eq!(s.hit("kept", "k", None)["degraded"], false);
    }
    std::thread::sleep(Duration::from_millis(1_000));

    let stop = AtomicBool::new(false);
    let degraded = AtomicUsize::new(0);
    let statuses: Mutex<BTreeMap<u16, usize>> = Mutex::new(BTreeMap::new());
    let (went_unready, came_back) = std::thread::scope(|scope| {
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
        postgres.stop();
        let went_unready = readyz_becomes(&s, 503, Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(1_000));
        let restarted = postgres.restart();
        let came_back = restarted.is_ok() && readyz_becomes(&s, 200, Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1_000));
        // The load threads stop whatever happened above, so a failure cannot hang the test.
        stop.store(true, Ordering::Relaxed);
        (went_unready, came_back)
    });
    assert!(
        went_unready,
        "/readyz answered 503 while PostgreSQL was down"
    );
    assert!(
        came_back,
        "/readyz answered 200 again after the restart\n{}",
        s.stderr()
    );
    let statuses = statuses.into_inner().unwrap();
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "only 200s, never a 5xx: {statuses:?}"
    );
    assert!(
        degraded.load(Ordering::Relaxed) > 0,
        "decisions while PostgreSQL was down were degraded"
    );

    // Shared counting is back, with the counters kept over the restart.
    let started = Instant::now();
    let d = loop {
        let d = s.hit("kept", "k", None);
        if d["degraded"] == false {
            break d;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still degraded 3 s after the restart: {d}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        d["results"][0]["remaining"], 5,
        "the counter spent before the restart is still there: {d}"
    );
    assert!(
        degraded_total(&s) > 0,
        "degraded decisions are counted in metrics"
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
    assert!(
        !log.contains("WARN deadpool") && !log.contains("terminating connection"),
        "the pool's own per-connection chatter stays out of the default log:\n{log}"
    );
}

#[test]
fn sluice_starts_while_postgres_is_down_and_installs_the_schema_when_it_answers() {
    let mut postgres = PostgresServer::start().expect("PostgreSQL");
    postgres.stop();
    let s = Server::start(&format!(
        "{}limits:\n  api: {{rate: 3/hour}}\n",
        storage(&postgres, "")
    ));
    wait_readyz(&s, 503, Duration::from_secs(3));
    let d = s.hit("api", "k", None);
    assert_eq!(d["degraded"], true, "decided by on_error: {d}");
    let stats = s.get("/v1/stats").json();
    assert_eq!(stats["store"]["backend"], "postgres");
    assert_eq!(stats["store"]["reachable"], false, "{stats}");

    postgres.restart().expect("start PostgreSQL");
    wait_readyz(&s, 200, Duration::from_secs(5));
    let started = Instant::now();
    let d = loop {
        let d = s.hit("api", "k", None);
        if d["degraded"] == false {
            break d;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still degraded 3 s after PostgreSQL came up: {d}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        d["results"][0]["remaining"], 2,
        "a fresh shared counter: {d}"
    );
    assert_eq!(
        postgres
            .psql("SELECT count(*) FROM public.sluice_counters WHERE key LIKE 'fault:%'")
            .expect("count"),
        "1",
        "the schema was installed and the decision stored"
    );
    let log = s.stderr();
    assert!(
        log.contains("cannot reach PostgreSQL at start"),
        "the start is logged:\n{log}"
    );
    assert!(
        !log.contains("postgres://"),
        "the url never goes into the log:\n{log}"
    );
}

#[test]
fn migrate_prints_or_applies_the_schema_and_migrate_false_requires_it() {
    let postgres = PostgresServer::start().expect("PostgreSQL");
    let dir = common::scratch_dir("pg-migrate");
    let url = format!(
        "postgres://postgres:not-a-real-password@127.0.0.1:{}/postgres",
        postgres.port()
    );
    let config = write_file(
        &dir,
        "sluice.yaml",
        &format!(
            "storage: {{backend: postgres, url: \"{url}\", schema: rl, migrate: false}}\nlimits:\n  api: {{rate: 3/hour}}\n"
        ),
    );
    let config = config.to_str().expect("utf-8 path");

    // migrate: false on an empty database: serve refuses to start, saying what to do.
    let (status, _, err) = run_cli(&["serve", "--config", config]);
    assert!(!status.success());
    assert!(
        err.contains("sluice migrate --print") && err.contains("\"rl\""),
        "{err}"
    );
    assert!(!err.contains("not-a-real-password"), "no password: {err}");

    // --print connects to nothing and prints one transaction for the configured schema.
    let (status, sql, err) = run_cli(&["migrate", "--print", "--config", config]);
    assert!(status.success(), "{err}");
    assert!(sql.contains("BEGIN;") && sql.trim_end().ends_with("COMMIT;"));
    assert!(sql.contains("CREATE OR REPLACE FUNCTION \"rl\".sluice_decide"));
    assert_eq!(
        postgres
            .psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'rl'")
            .expect("count"),
        "0",
        "printing changed nothing"
    );

    // migrate applies it; a second run finds it up to date.
    let (status, out, err) = run_cli(&["migrate", "--config", config]);
    assert!(status.success(), "{err}");
    assert!(out.contains("installed in schema rl"), "{out}");
    let (status, out, err) = run_cli(&["migrate", "--config", config]);
    assert!(status.success(), "{err}");
    assert!(out.contains("already at version 2"), "{out}");

    // Now serve starts with migrate: false and decides through the database.
    let s = Server::start(&std::fs::read_to_string(config).expect("config"));
    let d = s.hit("api", "k", None);
    assert_eq!(
        (d["allowed"].as_bool(), d["degraded"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(
        postgres
            .psql("SELECT count(*) FROM rl.sluice_counters")
            .expect("count"),
        "1"
    );

    // migrate on a config that is not postgres says so.
    let memory = write_file(&dir, "memory.yaml", "limits:\n  api: {rate: 3/hour}\n");
    let (status, _, err) = run_cli(&["migrate", "--config", memory.to_str().expect("path")]);
    assert!(!status.success());
    assert!(err.contains("not postgres"), "{err}");
}
