//! Denials cannot flood the log: a limit's denials get at most one line a second, the
//! next line says how many were not logged, and metrics still count every one.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CONFIG: &str =
    "storage: {backend: memory}\nlimits:\n  tiny: {rate: 1/hour}\n  other: {rate: 1/hour}\n";

/// The JSON log lines of `s` whose `limit` field is `limit`.
fn lines_of(s: &Server, limit: &str) -> Vec<Value> {
    s.stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["limit"] == limit)
        .collect()
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

#[test]
fn a_flood_of_denials_is_logged_as_a_few_lines_and_a_count() {
    let opts = ServeOpts {
        env: vec![("SLUICE_LOG_FORMAT".into(), "json".into())],
        ..Default::default()
    };
    let s = Server::start_with(CONFIG, &opts);
    let key = "user:raw-KEY-flood";
    assert!(allowed(&s.hit("tiny", key, None)));
    let started = Instant::now();
    for _ in 0..500 {
        assert!(!allowed(&s.hit("tiny", key, None)));
    }
    let took = started.elapsed();
    // Another limit is logged on its own: the flood of `tiny` does not hide it.
    assert!(allowed(&s.hit("other", key, None)));
    assert!(!allowed(&s.hit("other", key, None)));
    std::thread::sleep(Duration::from_millis(200));
    let flood = lines_of(&s, "tiny");
    let allowed_lines = took.as_secs() as usize + 1;
    assert!(
        flood.len() <= 2 * allowed_lines,
        "500 denials in {took:?} logged {} lines for the limit (at most {}):\n{}",
        flood.len(),
        2 * allowed_lines,
        s.stderr()
    );
    assert_eq!(
        lines_of(&s, "other")
            .iter()
            .filter(|l| message(l) == "denied")
            .count(),
        1
    );
    // One more denial after the interval: logged, after the count of the ones that were not.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(!allowed(&s.hit("tiny", key, None)));
    std::thread::sleep(Duration::from_millis(200));
    let lines = lines_of(&s, "tiny");
    let logged = lines.iter().filter(|l| message(l) == "denied").count() as u64;
    let summaries: Vec<&Value> = lines
        .iter()
        .filter(|l| message(l).starts_with("denials not logged"))
        .collect();
    assert!(!summaries.is_empty(), "no summary line:\n{}", s.stderr());
    let not_logged: u64 = summaries
        .iter()
        .map(|l| {
            l["fields"]["not_logged"]
                .as_u64()
                .expect("not_logged is a count")
        })
        .sum();
    assert_eq!(
        logged + not_logged,
        501,
        "every denial is either logged or counted in a summary:\n{}",
        s.stderr()
    );
    assert!(not_logged >= 490, "{not_logged}");
    let last = lines.last().expect("lines");
    assert_eq!(message(last), "denied", "{last}");
    // Lines that remain carry the key's hash, never the key.
    assert!(!s.stderr().contains("raw-KEY-flood"));
    assert!(
        last["fields"]["key_hash"]
            .as_str()
            .is_some_and(|h| h.len() == 16),
        "{last}"
    );
    // Metrics count every denial.
    let denied = s
        .metrics()
        .into_iter()
        .find(|m| {
            m.name == "sluice_decisions_total"
                && m.labels.get("limit").map(String::as_str) == Some("tiny")
                && m.labels.get("outcome").map(String::as_str) == Some("denied")
        })
        .map(|m| m.value);
    assert_eq!(denied, Some(501.0));
}
