//! envoyproxy/ratelimit's own config files (vendored in `ratelimit_configs/`, see its
//! README for origin and licence) load unchanged, and match as ratelimit's README and
//! config tests say they do.

use std::path::PathBuf;

use sluice_config::EnvoyConfig;
use sluice_config::envoy::Metadata;
use sluice_envoy::matcher::find;

/// The files in `ratelimit_configs/` named, as `envoy.config_files` would load them.
fn load(files: &[&str]) -> Result<EnvoyConfig, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ratelimit_configs");
    let list = files.join(", ");
    let text = format!("envoy:\n  config_files: [{list}]\n");
    let source = dir.join("sluice.yaml");
    sluice_config::load_str(&text, &source.to_string_lossy(), &|_| None, &[])
        .map_err(|error| error.to_string())
        .map(|config| config.envoy.expect("an envoy section"))
}

/// The requests per unit and counter key of the rule `entries` hit in `test-domain`.
fn hit(config: &EnvoyConfig, entries: &[(&str, &str)]) -> Option<(u32, String)> {
    let top = config.domains.get("test-domain")?;
    find(top, entries).map(|hit| {
        let per = hit.rule.kind.requests_per_unit();
        (per, hit.key)
    })
}

#[test]
fn wildcards_prefix_middle_and_several() {
    let config = load(&["wildcard.yaml"]).unwrap();
    // README Example 9: `foo*` is a prefix, each value its own counter.
    let (per, a) = hit(&config, &[("wild", "foo1")]).unwrap();
    let (_, b) = hit(&config, &[("wild", "foo2")]).unwrap();
    assert_eq!(per, 20);
    assert_ne!(a, b);
    assert!(hit(&config, &[("wild", "bar")]).is_none());
    assert!(hit(&config, &[("noWild", "foo1")]).is_none());
    // `bar*b`: a `*` in the middle matches any run between `bar` and `b`.
    assert_eq!(hit(&config, &[("midWild", "barab")]).unwrap().0, 20);
    assert_eq!(hit(&config, &[("midWild", "barb")]).unwrap().0, 20);
    assert!(hit(&config, &[("midWild", "bara")]).is_none());
    assert!(hit(&config, &[("midWild", "bab")]).is_none());
}

#[test]
fn share_threshold_file_loads_and_shares_counters() {
    let config = load(&["share_threshold.yaml"]).unwrap();
    // Every value under `files/*` shares one counter.
    let (per, a) = hit(&config, &[("files", "files/a.pdf")]).unwrap();
    let (_, b) = hit(&config, &[("files", "files/b.csv")]).unwrap();
    assert_eq!((per, a.as_str()), (100, "7:files/*"));
    assert_eq!(a, b);
    // Nested, and the same key at two levels.
    let (per, a) = hit(&config, &[("nested", "parent"), ("files", "nested/x")]).unwrap();
    let (_, b) = hit(&config, &[("nested", "parent"), ("files", "nested/y")]).unwrap();
    assert_eq!((per, &a), (200, &b));
    let (per, a) = hit(&config, &[("files", "top/1"), ("files", "nested/1")]).unwrap();
    let (_, b) = hit(&config, &[("files", "top/2"), ("files", "nested/2")]).unwrap();
    assert_eq!((per, &a), (300, &b));
    // A wildcard without share_threshold keeps a counter per value, under a shared parent.
    let (per, a) = hit(
        &config,
        &[("path", "path/1"), ("file", "file/a"), ("type", "t")],
    )
    .unwrap();
    let (_, b) = hit(
        &config,
        &[("path", "path/2"), ("file", "file/b"), ("type", "t")],
    )
    .unwrap();
    assert_eq!(per, 120);
    assert_ne!(a, b);
    let (_, c) = hit(
        &config,
        &[("path", "path/9"), ("file", "file/a"), ("type", "t")],
    )
    .unwrap();
    assert_eq!(a, c, "path/* is shared, file/a is the same value");
    // An exact value beats a wildcard with share_threshold.
    assert_eq!(hit(&config, &[("file", "test1")]).unwrap().0, 50);
    let (per, a) = hit(&config, &[("file", "test2")]).unwrap();
    let (_, b) = hit(&config, &[("file", "testing")]).unwrap();
    assert_eq!((per, &a), (100, &b));
    // A `*` in the middle, with share_threshold: one counter for every match.
    let (per, a) = hit(&config, &[("midpath", "/api/users/v1")]).unwrap();
    let (_, b) = hit(&config, &[("midpath", "/apiv1")]).unwrap();
    assert_eq!((per, &a), (100, &b));
    assert!(hit(&config, &[("midpath", "/api/users/v2")]).is_none());
    // Several `*`: the literal parts in order.
    let (per, a) = hit(&config, &[("multiroute", "svc-a.ep-b.rpc")]).unwrap();
    let (_, b) = hit(&config, &[("multiroute", "svcXepYrpc")]).unwrap();
    assert_eq!((per, &a), (50, &b));
    assert!(hit(&config, &[("multiroute", "svc-rpc")]).is_none());
    assert!(hit(&config, &[("multiroute", "svc-ep-rpc-x")]).is_none());
    assert_eq!(hit(&config, &[("midroute", "/api/x/v2")]).unwrap().0, 80);
    let (per, a) = hit(&config, &[("tenant", "t1-prod"), ("resource", "res-a-v2")]).unwrap();
    let (_, b) = hit(&config, &[("tenant", "t2prod"), ("resource", "resv2")]).unwrap();
    assert_eq!((per, &a), (60, &b));
    assert!(hit(&config, &[("tenant", "t1-dev"), ("resource", "res-a-v2")]).is_none());
}

#[test]
fn metadata_is_accepted_and_kept_as_written() {
    let config = load(&["metadata.yaml"]).unwrap();
    let top = config.domains.get("test-domain").unwrap();
    let subkey = &top.by_key["key1"].exact["value1"].children.by_key["subkey1"];
    let text = |s: &str| Metadata::Text(s.to_string());
    assert_eq!(
        subkey.any.as_ref().unwrap().metadata,
        Some(Metadata::Map(vec![("name".into(), text("service_1"))]))
    );
    assert_eq!(subkey.exact["subvalue1"].metadata, None);
    assert_eq!(
        top.by_key["key2"].any.as_ref().unwrap().metadata,
        Some(Metadata::Map(vec![(
            "service_with_quota".into(),
            Metadata::Map(vec![("name".into(), text("service_2"))])
        )]))
    );
    // Matching is unchanged by metadata: ratelimit's basic expectations.
    assert_eq!(
        hit(&config, &[("key1", "value1"), ("subkey1", "x")])
            .unwrap()
            .0,
        5
    );
    assert_eq!(
        hit(&config, &[("key1", "value1"), ("subkey1", "subvalue1")])
            .unwrap()
            .0,
        10
    );
    assert_eq!(hit(&config, &[("key2", "anything")]).unwrap().0, 20);
}

#[test]
fn quota_mode_is_a_rule_that_counts_but_never_denies() {
    let config = load(&["quota_mode.yaml"]).unwrap();
    let top = config.domains.get("test-domain").unwrap();
    let soft = find(top, &[("quota_limit", "a")]).unwrap().rule;
    assert!(soft.quota_mode && !soft.shadow);
    let sluice_config::envoy::RuleKind::Limited { limit, .. } = &soft.kind else {
        panic!("{:?}", soft.kind)
    };
    // Counted, and reported allowed when over: the engine's shadow switch.
    assert!(limit.shadow());
    let hard = find(top, &[("hard_limit", "a")]).unwrap().rule;
    assert!(!hard.quota_mode);
}
