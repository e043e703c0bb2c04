//! PostgreSQL failing under sluice: crashed and restarted while load runs (no 5xx,
//! decisions go on degraded under `on_error: local` and are counted, `/readyz` says so,
//! shared counting resumes by itself with the counters kept, and each change of state
//! is logged once: `sluice_testkit::shared`, shared with Redis); down when sluice starts
//! (it starts anyway and installs the schema when the database answers); and the
//! `sluice migrate` command and `migrate: false`.

mod common;

use std::time::Duration;

use common::{PostgresServer, Server, hit_until_not_degraded, readyz_turns, run_cli, write_file};
use sluice_store_postgres::SCHEMA_VERSION;
use sluice_testkit::shared::{SharedStore, outage_under_load_degrades_and_sharing_resumes};

#[test]
fn restarting_postgres_under_load_degrades_without_5xx_and_sharing_resumes() {
    outage_under_load_degrades_and_sharing_resumes::<PostgresServer>(&common::bin());
}

#[test]
fn sluice_starts_while_postgres_is_down_and_installs_the_schema_when_it_answers() {
    let mut postgres = PostgresServer::start().expect("PostgreSQL");
    postgres.stop();
    let s = Server::start(&format!(
        "{}limits:\n  api: {{rate: 3/hour}}\n",
        postgres.storage("prefix: 'fault:', on_error: local, timeout_ms: 200")
    ));
    readyz_turns(&s, 503, Duration::from_secs(3));
    let d = s.hit("api", "k", None);
    assert_eq!(d["degraded"], true, "decided by on_error: {d}");
    let stats = s.get("/v1/stats").json();
    assert_eq!(stats["store"]["backend"], "postgres");
    assert_eq!(stats["store"]["reachable"], false, "{stats}");

    postgres.restart().expect("start PostgreSQL");
    readyz_turns(&s, 200, Duration::from_secs(5));
    let d = hit_until_not_degraded(&s, "api", "k", Duration::from_secs(3));
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
    assert!(
        out.contains(&format!("already at version {SCHEMA_VERSION}")),
        "{out}"
    );

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
