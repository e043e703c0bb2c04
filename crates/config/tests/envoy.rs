//! The `envoy:` section: envoyproxy/ratelimit documents inline and from files, defaults,
//! and every bad input reported at its file, line, column and field.

use std::fs;
use std::path::PathBuf;

use sluice_config::envoy::{RuleKind, Unit};
use sluice_config::{ConfigError, load_str};

fn load(text: &str) -> Result<sluice_config::Config, ConfigError> {
    load_str(text, "sluice.yaml", &|_| None, &[])
}

fn error(text: &str) -> String {
    load(text).expect_err("should be rejected").to_string()
}

fn scratch(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluice-config-envoy-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

const DOCUMENT: &str = "
envoy:
  domains:
    - domain: edge
      descriptors:
        - key: remote_address
          rate_limit:
            unit: MINUTE
            requests_per_unit: 3
            name: per_ip
        - key: remote_address
          value: 50.0.0.5
          rate_limit: {unit: second, requests_per_unit: 0}
        - key: internal
          rate_limit: {unlimited: true}
        - key: service
          descriptors:
            - key: user
              value: user-a
              shadow_mode: true
              detailed_metric: true
              rate_limit: {unit: week, requests_per_unit: 10, replaces: [{name: per_ip}]}
";

#[test]
fn a_document_becomes_rules_and_limits() {
    let config = load(DOCUMENT).unwrap();
    let envoy = config.envoy.expect("envoy section");
    assert_eq!(envoy.listen.to_string(), "127.0.0.1:8081");
    assert!(!envoy.response_headers);
    let edge = envoy.domains.get("edge").unwrap();
    let per_ip = edge.by_key["remote_address"].any.as_ref().unwrap();
    let rule = per_ip.rule.as_ref().unwrap();
    assert_eq!(rule.name.as_deref(), Some("per_ip"));
    assert_eq!(rule.path, "edge.remote_address");
    let RuleKind::Limited {
        unit,
        requests_per_unit,
        limit,
        ..
    } = &rule.kind
    else {
        panic!("{:?}", rule.kind)
    };
    assert_eq!((*unit, *requests_per_unit), (Unit::Minute, 3));
    assert_eq!(limit.name(), "envoy.edge.remote_address");
    assert_eq!(limit.windows()[0].window.rate().period_secs(), 60);
    assert_eq!(limit.algorithm(), sluice_engine::Algorithm::FixedWindow);

    let nested =
        &edge.by_key["service"].any.as_ref().unwrap().children.by_key["user"].exact["user-a"];
    let rule = nested.rule.as_ref().unwrap();
    assert!(rule.shadow);
    assert_eq!(rule.replaces, vec!["per_ip".to_string()]);
    let RuleKind::Limited { limit, unit, .. } = &rule.kind else {
        panic!()
    };
    assert!(limit.shadow());
    assert_eq!(unit.seconds(), 7 * 86_400);
    assert!(matches!(
        edge.by_key["internal"]
            .any
            .as_ref()
            .unwrap()
            .rule
            .as_ref()
            .unwrap()
            .kind,
        RuleKind::Unlimited
    ));
    // Counted rules only: the blocked address and the unlimited key have no limit.
    assert_eq!(envoy.domains.limits().len(), 2);
}

#[test]
fn no_envoy_section_no_service() {
    assert!(load("listen: 127.0.0.1:9000\n").unwrap().envoy.is_none());
    let config = load("envoy: {listen: 0.0.0.0:9081, response_headers: true}\n").unwrap();
    let envoy = config.envoy.unwrap();
    assert_eq!(envoy.listen.to_string(), "0.0.0.0:9081");
    assert!(envoy.response_headers && envoy.domains.is_empty());
}

#[test]
fn the_listen_address_can_be_overridden() {
    let overrides = [(
        "SLUICE_ENVOY__LISTEN".to_string(),
        "127.0.0.1:9999".to_string(),
    )];
    let config = load_str("envoy: {}\n", "sluice.yaml", &|_| None, &overrides).unwrap();
    assert_eq!(config.envoy.unwrap().listen.port(), 9999);
}

#[test]
fn existing_files_load_unchanged_and_their_errors_name_them() {
    let dir = scratch("files");
    // An envoyproxy/ratelimit file: `$` is kept as it is, never interpolated.
    fs::write(
        dir.join("a.yaml"),
        "domain: files\ndescriptors:\n  - key: generic_key\n    value: ${NOT_A_VAR}\n    rate_limit: {unit: hour, requests_per_unit: 7}\n",
    )
    .unwrap();
    let main = dir.join("sluice.yaml");
    let text = "envoy:\n  config_files: [a.yaml]\n";
    let config = load_str(text, main.to_str().unwrap(), &|_| None, &[]).unwrap();
    let envoy = config.envoy.unwrap();
    assert_eq!(envoy.config_files, vec![dir.join("a.yaml")]);
    let files = envoy.domains.get("files").unwrap();
    assert!(
        files.by_key["generic_key"]
            .exact
            .contains_key("${NOT_A_VAR}")
    );

    fs::write(
        dir.join("bad.yaml"),
        "domain: files2\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 1\n",
    )
    .unwrap();
    let text = "envoy:\n  config_files: [bad.yaml]\n";
    let error = load_str(text, main.to_str().unwrap(), &|_| None, &[]).unwrap_err();
    assert_eq!(error.source, dir.join("bad.yaml").display().to_string());
    assert_eq!((error.line, error.column), (Some(5), Some(13)));
    assert_eq!(
        error.field.as_deref(),
        Some("descriptors[0].rate_limit.unit")
    );
    assert!(
        error.message.contains("unknown unit `fortnight`"),
        "{error}"
    );

    let text = "envoy:\n  config_files: [missing.yaml]\n";
    let error = load_str(text, main.to_str().unwrap(), &|_| None, &[])
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(":2:18: envoy.config_files[0]: cannot read"),
        "{error}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bad_documents_are_reported_at_their_place() {
    let doc = |descriptors: &str| {
        format!("envoy:\n  domains:\n    - domain: d\n      descriptors:\n{descriptors}")
    };
    let cases: &[(String, &str)] = &[
        (
            doc("        - key: k\n          rate_limit: {unit: minute, requests_per_unit: 1, burst: 5}\n"),
            "sluice.yaml:6:60: envoy.domains[0].descriptors[0].rate_limit.burst: unknown field `burst`",
        ),
        (
            doc("        - ~\n"),
            "sluice.yaml:5:11: envoy.domains[0].descriptors[0]: an empty descriptor: give it at least `key:`",
        ),
        (
            "envoy:\n  domains:\n    - ~\n".to_string(),
            "sluice.yaml:3:7: envoy.domains[0]: an empty document: give it `domain:` and `descriptors:`",
        ),
        (
            doc("        - value: v\n"),
            "sluice.yaml:5:11: envoy.domains[0].descriptors[0]: missing `key`",
        ),
        (
            doc("        - key: k\n          rate_limit: {unit: minute}\n"),
            "sluice.yaml:6:23: envoy.domains[0].descriptors[0].rate_limit: missing `requests_per_unit`",
        ),
        (
            doc("        - key: k\n          rate_limit: {requests_per_unit: 1}\n"),
            "missing `unit`: one of second, minute, hour, day, week, month, year",
        ),
        (
            doc("        - key: k\n          rate_limit: {unit: minute, requests_per_unit: -1}\n"),
            "envoy.domains[0].descriptors[0].rate_limit.requests_per_unit: must be from 0 to 1000000000",
        ),
        (
            doc("        - key: k\n          rate_limit: {unit: minute, requests_per_unit: \"5\"}\n"),
            "remove the quotes",
        ),
        (
            doc("        - key: k\n          rate_limit: {unlimited: true, unit: second}\n"),
            "sluice.yaml:6:47: envoy.domains[0].descriptors[0].rate_limit.unit: an unlimited rule has no unit",
        ),
        (
            doc("        - key: k\n        - key: k\n"),
            "sluice.yaml:6:11: envoy.domains[0].descriptors[1]: a second descriptor with key `k` without a value at this level (the first is on line 5)",
        ),
        (
            doc("        - {key: k, value: x, share_threshold: true}\n"),
            "share_threshold only applies to a wildcard value",
        ),
        (
            doc("        - key: k\n          rate_limit: {name: a, unit: second, requests_per_unit: 1, replaces: [{name: a}]}\n"),
            "a rule cannot replace itself",
        ),
        (
            doc("        - key: k\n          shadow_mode: yes\n"),
            "envoy.domains[0].descriptors[0].shadow_mode: expected true or false, found the string `yes`",
        ),
        (
            "envoy:\n  domains:\n    - domain: d\n    - domain: d\n".to_string(),
            "sluice.yaml:4:15: envoy.domains[1].domain: domain `d` is already defined (line 3 of the sluice config)",
        ),
        (
            "envoy:\n  domains:\n    - descriptors: []\n".to_string(),
            "envoy.domains[0]: missing `domain`",
        ),
        (
            "envoy:\n  domains:\n    - domain: d\n      quota_mode: true\n".to_string(),
            "sluice.yaml:4:7: envoy.domains[0].quota_mode: unknown field `quota_mode`, expected one of `domain`, `descriptors` (sluice reads envoyproxy/ratelimit's descriptor format",
        ),
        (
            "envoy:\n  domain: d\n".to_string(),
            "sluice.yaml:2:3: envoy.domain: unknown field `domain`, expected one of `listen`, `domains`, `config_files`, `response_headers`",
        ),
        (
            "envoy:\n  listen: 8081\n".to_string(),
            "envoy.listen: `8081` is a port without an address",
        ),
        (
            "limits:\n  envoy.d.k: {rate: 1/minute}\nenvoy:\n  domains:\n    - domain: d\n      descriptors:\n        - {key: k, rate_limit: {unit: minute, requests_per_unit: 1}}\n".to_string(),
            "limit `envoy.d.k` has the name sluice gives an envoy descriptor rule",
        ),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(text, expected)| {
            let message = error(text);
            (!message.contains(expected))
                .then(|| format!("for\n{text}\nexpected `{expected}` in\n{message}\n"))
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A sluice extension: a rule may choose its algorithm (envoyproxy/ratelimit counts
/// fixed windows only, and rejects the key).
#[test]
fn a_rule_may_choose_its_algorithm() {
    let config = load(
        "envoy:\n  domains:\n    - domain: d\n      descriptors:\n        - {key: a, rate_limit: {unit: minute, requests_per_unit: 5}}\n        - {key: b, rate_limit: {unit: minute, requests_per_unit: 5, algorithm: gcra}}\n        - {key: c, rate_limit: {unit: hour, requests_per_unit: 5, algorithm: sliding_window}}\n",
    )
    .expect("valid");
    let envoy = config.envoy.expect("envoy");
    let algorithms: Vec<&str> = envoy
        .domains
        .limits()
        .iter()
        .map(|l| l.algorithm().as_str())
        .collect();
    assert_eq!(algorithms, ["fixed_window", "gcra", "sliding_window"]);
    let bad = error(
        "envoy:\n  domains:\n    - domain: d\n      descriptors:\n        - {key: a, rate_limit: {unit: minute, requests_per_unit: 5, algorithm: leaky}}\n",
    );
    assert!(bad.starts_with("sluice.yaml:5:80: envoy.domains[0].descriptors[0].rate_limit.algorithm: unknown algorithm \"leaky\""), "{bad}");
    assert!(bad.contains("algorithm"), "{bad}");
    let unlimited = error(
        "envoy:\n  domains:\n    - domain: d\n      descriptors:\n        - {key: a, rate_limit: {unlimited: true, algorithm: gcra}}\n",
    );
    assert!(
        unlimited.contains("remove `unlimited: true`"),
        "{unlimited}"
    );
}
