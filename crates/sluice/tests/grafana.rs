//! The Grafana dashboard in `packaging/grafana/` queries only metrics sluice exports:
//! every `sluice_*` series named in a panel's expression exists in `GET /metrics` of a
//! server with every front door configured (a renamed metric fails here, not on a
//! user's wall screen).

mod common;

use std::collections::BTreeSet;

use common::*;

const EVERYTHING: &str = r#"
limits:
  api: {rate: 10/minute}
routes:
  - match: {path: /api}
    limits: [{limit: api, key: "{client_ip}"}]
proxy:
  upstream: http://127.0.0.1:9
  sluice_endpoints: main
envoy:
  listen: 127.0.0.1:0
  domains:
    - domain: edge
      descriptors:
        - key: remote_address
          rate_limit: {unit: minute, requests_per_unit: 3}
"#;

/// The series a dashboard expression reads: every `sluice_...` name in it.
fn series_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("sluice_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.push(expr[start..end].to_string());
        i = end;
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_exists() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging/grafana/sluice-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(series_in(target["expr"].as_str().expect("expr")));
        }
    }
    assert!(
        queried.len() >= 10,
        "the dashboard queries sluice's metrics: {queried:?}"
    );

    let s =
        Server::start(&EVERYTHING.replace("127.0.0.1:0", &format!("127.0.0.1:{}", free_port())));
    let text = s.get("/metrics").body;
    // What each `# TYPE` family exports, by its type's suffixes.
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for suffix in suffixes {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\n{text}"
    );
}
