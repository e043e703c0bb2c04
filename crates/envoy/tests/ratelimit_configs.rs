//! envoyproxy/ratelimit's own config files (vendored in `ratelimit_configs/`, see its
//! README for origin and licence) load unchanged, and match as ratelimit's README and
//! config tests say they do.

use std::path::PathBuf;

use sluice_config::EnvoyConfig;
use sluice_config::envoy::Metadata;
use sluice_envoy::matcher::find;

/// The files in `ratelimit_configs/` named, as `envoy.config_files` would load them.
fn load(files: &[&str]) -> Result<EnvoyConfig, String> {
    load_with(files, "")
}

/// Like [`load`], with more `envoy:` settings (`extra`, one `key: value` line).
fn load_with(files: &[&str], extra: &str) -> Result<EnvoyConfig, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ratelimit_configs");
    let list = files.join(", ");
    let text = format!("envoy:\n  config_files: [{list}]\n  {extra}\n");
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

/// ratelimit's `TestDomainMerge` and `TestDuplicateKeyDomainMerge`: with
/// `MERGE_DOMAIN_CONFIG` (sluice: `merge_domains: true`) two files of one domain add up;
/// a top-level descriptor written twice is still refused; without it, a second document
/// of a domain is refused, saying how to merge.
#[test]
fn documents_of_one_domain_merge_when_asked() {
    let files = ["merge_domain_key1.yaml", "merge_domain_key2.yaml"];
    let merged = load_with(&files, "merge_domains: true").unwrap();
    assert_eq!(hit(&merged, &[("key1", "value1")]).unwrap().0, 10);
    assert_eq!(hit(&merged, &[("key2", "value2")]).unwrap().0, 20);
    assert!(hit(&merged, &[("key1", "other")]).is_none());

    let twice = load_with(
        &["merge_domain_key1.yaml", "merge_domain_key1.yaml"],
        "merge_domains: true",
    )
    .unwrap_err();
    assert!(
        twice.contains("merge_domain_key1.yaml") && twice.contains("`key1` with value `value1`"),
        "{twice}"
    );

    let unmerged = load(&files).unwrap_err();
    assert!(
        unmerged.contains("already defined") && unmerged.contains("merge_domains: true"),
        "{unmerged}"
    );
}

/// ratelimit's `unit_multiplier`: `20/minute` with multiplier 5 is 20 every five
/// minutes, its own counter; 0 is refused with the file and line.
#[test]
fn unit_multiplier_stretches_the_window_and_zero_is_refused() {
    let config = load(&["unit_multiplier.yaml"]).unwrap();
    let top = config.domains.get("test-domain").unwrap();
    let five = find(top, &[("key1", "x")]).unwrap().rule;
    let one = find(top, &[("key2", "x")]).unwrap().rule;
    let window = |rule: &sluice_config::envoy::Rule| match &rule.kind {
        sluice_config::envoy::RuleKind::Limited { limit, .. } => {
            limit.windows()[0].window.rate().period_secs()
        }
        other => panic!("a counted rule, not {other:?}"),
    };
    assert_eq!((five.kind.requests_per_unit(), window(five)), (20, 300));
    assert_eq!((one.kind.requests_per_unit(), window(one)), (25, 60));

    let zero = load(&["zero_unit_multiplier.yaml"]).unwrap_err();
    assert!(
        zero.contains("zero_unit_multiplier.yaml:") && zero.contains("unit_multiplier"),
        "{zero}"
    );
}
