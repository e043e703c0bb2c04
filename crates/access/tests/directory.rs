//! Entries are checked before they are stored, and the directory applies them: blocks
//! win over allows, addresses match their CIDR, expired entries stop applying, plans and
//! overrides change a check's rates but not its key or cost.

use std::net::IpAddr;
use std::sync::Arc;

use sluice_access::{Directory, Entry, EntryError, Kind, Screen};
use sluice_engine::{Check, DecisionRequest, Limit, LimitSet, LimitSpec, Record, Records};

const NOW: u64 = 1_800_000_000_000;

fn limits() -> LimitSet {
    let api = Limit::new("api", LimitSpec::new(vec!["5/minute".parse().unwrap()]))
        .unwrap()
        .with_plans([(
            "pro".to_string(),
            Limit::new("api", LimitSpec::new(vec!["100/minute".parse().unwrap()])).unwrap(),
        )])
        .unwrap();
    let other = Limit::new("other", LimitSpec::new(vec!["1/second".parse().unwrap()])).unwrap();
    LimitSet::new([api, other]).unwrap()
}

fn entry(json: &str) -> Entry {
    serde_json::from_str(json).expect("entry JSON")
}

fn directory(entries: &[&str], limits: &LimitSet) -> Directory {
    let records = entries
        .iter()
        .map(|json| {
            let e = entry(json).checked(limits, NOW).expect("valid entry");
            Record {
                id: e.id(),
                body: e.body(),
            }
        })
        .collect();
    Directory::build(
        &Records {
            version: 1,
            records,
        },
        limits,
    )
}

/// Checks with trusted keys, as the decision API makes them.
fn request(limits: &LimitSet, keys: &[(&str, &str)]) -> DecisionRequest {
    DecisionRequest {
        checks: keys
            .iter()
            .map(|(l, k)| check(limits, l, k, true))
            .collect(),
        dry_run: false,
    }
}

fn check(limits: &LimitSet, limit: &str, key: &str, trusted: bool) -> Check {
    Check::new(Arc::clone(limits.get(limit).unwrap()), key, 3)
        .unwrap()
        .with_trusted_key(trusted)
}

fn ip(text: &str) -> Option<IpAddr> {
    Some(text.parse().unwrap())
}

#[test]
fn blocks_win_over_allows_and_cidrs_match_their_addresses() {
    let limits = limits();
    let dir = directory(
        &[
            r#"{"kind":"allow","ip":"10.0.0.0/8"}"#,
            r#"{"kind":"block","ip":"10.1.2.0/24","reason":"scraper"}"#,
            r#"{"kind":"block","subject":"user:7"}"#,
            r#"{"kind":"allow","subject":"user:vip"}"#,
        ],
        &limits,
    );
    let req = request(&limits, &[("api", "user:1")]);
    assert!(matches!(
        dir.screen(&req, ip("10.9.9.9"), NOW),
        Screen::Allowed(_)
    ));
    match dir.screen(&req, ip("10.1.2.3"), NOW) {
        Screen::Blocked(listed) => assert_eq!(listed.reason.as_deref(), Some("scraper")),
        other => panic!("expected a block, got {other:?}"),
    }
    // An IPv4-mapped IPv6 peer is the IPv4 address.
    assert!(matches!(
        dir.screen(&req, ip("::ffff:10.1.2.3"), NOW),
        Screen::Blocked(_)
    ));
    assert_eq!(dir.screen(&req, ip("192.0.2.1"), NOW), Screen::Limits);
    // A subject block wins over an address allow.
    let seven = request(&limits, &[("other", "x"), ("api", "user:7")]);
    assert!(matches!(
        dir.screen(&seven, ip("10.9.9.9"), NOW),
        Screen::Blocked(_)
    ));
    let vip = request(&limits, &[("api", "user:vip")]);
    assert!(matches!(dir.screen(&vip, None, NOW), Screen::Allowed(_)));
    // Extra subjects (the Envoy service's `key=value` descriptor entries) are looked up
    // like checks' keys, even in a request with no checks.
    let none = DecisionRequest::default();
    let subjects = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(matches!(
        dir.screen_with(&none, None, &subjects(&["path=/x", "user:7"]), NOW),
        Screen::Blocked(_)
    ));
    assert!(matches!(
        dir.screen_with(&none, None, &subjects(&["user:vip"]), NOW),
        Screen::Allowed(_)
    ));
    assert_eq!(
        dir.screen_with(&none, None, &subjects(&["user:8"]), NOW),
        Screen::Limits
    );
}

#[test]
fn an_allow_subject_matches_only_trusted_keys_and_blocks_match_every_key() {
    let limits = limits();
    let dir = directory(
        &[
            r#"{"kind":"allow","subject":"10.20.30.40","reason":"internal batch host"}"#,
            r#"{"kind":"allow","subject":"user_id=42"}"#,
            r#"{"kind":"block","subject":"user:7"}"#,
        ],
        &limits,
    );
    // The finding's request: a per-IP check on the client's own address and a
    // client-written `{query.api_key}` check naming the allowed subject beside its real
    // key. It is decided by its limits, every check of it.
    let attack = DecisionRequest {
        checks: vec![
            check(&limits, "other", "9.9.9.50", true),
            check(&limits, "api", "10.20.30.40", false),
            check(&limits, "api", "mine", false),
        ],
        dry_run: false,
    };
    assert_eq!(dir.screen(&attack, ip("9.9.9.50"), NOW), Screen::Limits);
    // Nor can a client-written key name an Envoy subject.
    let envoy_name = DecisionRequest {
        checks: vec![check(&limits, "api", "user_id=42", false)],
        dry_run: false,
    };
    assert_eq!(dir.screen(&envoy_name, None, NOW), Screen::Limits);
    // The same subject on a trusted key (the allowed host's own `{client_ip}` check, a
    // decision API key) is allowed, as is the Envoy descriptor entry itself.
    let host = DecisionRequest {
        checks: vec![check(&limits, "other", "10.20.30.40", true)],
        dry_run: false,
    };
    assert!(matches!(
        dir.screen(&host, ip("10.20.30.40"), NOW),
        Screen::Allowed(_)
    ));
    let none = DecisionRequest::default();
    assert!(matches!(
        dir.screen_with(&none, None, &["user_id=42".to_string()], NOW),
        Screen::Allowed(_)
    ));
    // A trusted allow still lets the whole request past (its untrusted checks too)...
    let mixed = DecisionRequest {
        checks: vec![
            check(&limits, "other", "10.20.30.40", true),
            check(&limits, "api", "anything", false),
        ],
        dry_run: false,
    };
    assert!(matches!(dir.screen(&mixed, None, NOW), Screen::Allowed(_)));
    // ...and a block matches an untrusted key all the same: it can only refuse.
    let blocked = DecisionRequest {
        checks: vec![
            check(&limits, "other", "10.20.30.40", true),
            check(&limits, "api", "user:7", false),
        ],
        dry_run: false,
    };
    assert!(matches!(
        dir.screen(&blocked, None, NOW),
        Screen::Blocked(_)
    ));
}

#[test]
fn expired_entries_stop_applying_and_are_listed_for_removal() {
    let limits = limits();
    let dir = directory(
        &[r#"{"kind":"block","subject":"user:7","ttl_ms":1000}"#],
        &limits,
    );
    let req = request(&limits, &[("api", "user:7")]);
    assert!(matches!(
        dir.screen(&req, None, NOW + 999),
        Screen::Blocked(_)
    ));
    assert_eq!(dir.screen(&req, None, NOW + 1000), Screen::Limits);
    assert_eq!(dir.expired(NOW + 1000).len(), 1);
    assert!(dir.expired(NOW).is_empty());
}

#[test]
fn plans_and_overrides_change_rates_not_keys_or_costs() {
    let limits = limits();
    let dir = directory(
        &[
            r#"{"kind":"plan","subject":"customer:42","plan":"pro"}"#,
            r#"{"kind":"rate","subject":"customer:43","limit":"api","rate":["2000/hour","50/minute"]}"#,
        ],
        &limits,
    );
    let mut req = request(
        &limits,
        &[
            ("api", "customer:42"),
            ("api", "customer:43"),
            ("other", "customer:42"),
            ("api", "customer:44"),
        ],
    );
    assert!(dir.assign(&mut req, NOW));
    let plans: Vec<Option<&str>> = req.checks.iter().map(|c| c.limit().plan()).collect();
    assert_eq!(plans, [Some("pro"), Some("override"), None, None]);
    assert_eq!(req.checks[1].limit().windows().len(), 2);
    assert_eq!(
        req.checks[1].limit().name(),
        "api",
        "same name: same counters"
    );
    assert!(req.checks.iter().all(|c| c.cost() == 3));
    assert_eq!(req.checks[0].key(), "customer:42");
}

#[test]
fn bad_entries_are_refused_with_what_to_change() {
    let limits = limits();
    let err = |json: &str| entry(json).checked(&limits, NOW).unwrap_err();
    assert!(matches!(
        err(r#"{"kind":"plan","subject":"c:1","plan":"gold"}"#),
        EntryError::UnknownPlan { .. }
    ));
    assert!(
        err(r#"{"kind":"plan","subject":"c:1","plan":"gold"}"#)
            .to_string()
            .contains("known plans: pro")
    );
    assert!(matches!(
        err(r#"{"kind":"block","ip":"10.0.0.0/33"}"#),
        EntryError::BadIp(_)
    ));
    assert!(matches!(
        err(r#"{"kind":"block","subject":"u","expires_at_ms":1}"#),
        EntryError::ExpiryInThePast { .. }
    ));
    assert!(matches!(
        err(r#"{"kind":"rate","subject":"u","limit":"nope","rate":"1/second"}"#),
        EntryError::UnknownLimit(_)
    ));
    assert!(matches!(
        err(r#"{"kind":"rate","subject":"u","limit":"api","rate":"ten/second"}"#),
        EntryError::BadRate { .. }
    ));
    assert!(matches!(
        err(r#"{"kind":"block","subject":"u","ip":"10.0.0.1"}"#),
        EntryError::Shape(_)
    ));
    assert!(serde_json::from_str::<Entry>(r#"{"kind":"block","subjct":"u"}"#).is_err());
    let ok = entry(r#"{"kind":"block","ip":"10.1.2.3/24"}"#)
        .checked(&limits, NOW)
        .unwrap();
    assert_eq!(ok.ip.as_deref(), Some("10.1.2.0/24"), "host bits cleared");
    assert_eq!(ok.kind, Kind::Block);
}

#[test]
fn a_record_the_config_no_longer_fits_is_skipped_not_guessed() {
    let limits = limits();
    let e = entry(r#"{"kind":"rate","subject":"u","limit":"other","rate":"9/second"}"#)
        .checked(&limits, NOW)
        .unwrap();
    let only_api =
        LimitSet::new([
            Limit::new("api", LimitSpec::new(vec!["5/minute".parse().unwrap()])).unwrap(),
        ])
        .unwrap();
    let dir = Directory::build(
        &Records {
            version: 2,
            records: vec![
                Record {
                    id: e.id(),
                    body: e.body(),
                },
                Record {
                    id: "x".into(),
                    body: "{not json".into(),
                },
            ],
        },
        &only_api,
    );
    assert!(dir.is_empty());
    assert_eq!(dir.skipped().count(), 2);
    // A reload that brings the limit back brings its override back, without the store.
    let again = dir.rebuild(&limits);
    assert_eq!(again.entries().len(), 1);
    assert_eq!(
        again.skipped().count(),
        1,
        "the broken record stays skipped"
    );
    assert_eq!(again.version(), 2);
}
