//! Which configured rule a request descriptor hits, as envoyproxy/ratelimit decides it,
//! and the key its counter is kept under.
//!
//! A descriptor's entries are matched level by level: at each level the entry's key
//! picks the configured descriptors with that key, and of those an exact value wins over
//! a wildcard value (`foo*`, `/api*v1`, `svc*ep*rpc`; the first in file order that
//! matches), which wins over the key alone. A rule
//! applies only when it sits on the descriptor's last entry: a request with more entries
//! than the configuration nests, or fewer, hits no rule.
//!
//! The counter is the rule's limit; its key is the request's values along the path (so
//! `remote_address` with no configured value counts each address apart), except where a
//! wildcard with `share_threshold` matched: there the pattern stands for every value.

use sluice_config::envoy::{Descriptor, Level, Rule};
use sluice_engine::MAX_KEY_BYTES;

/// One descriptor entry of a request.
pub trait EntryRef {
    /// The entry's key.
    fn key(&self) -> &str;
    /// The entry's value.
    fn value(&self) -> &str;
}

impl EntryRef
    for crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry
{
    fn key(&self) -> &str {
        &self.key
    }
    fn value(&self) -> &str {
        &self.value
    }
}

impl EntryRef for (&str, &str) {
    fn key(&self) -> &str {
        self.0
    }
    fn value(&self) -> &str {
        self.1
    }
}

/// A rule a descriptor hit, and the key of its counter.
#[derive(Debug, Clone)]
pub struct Hit<'a> {
    /// The rule.
    pub rule: &'a Rule,
    /// The counter key: the values along the path, length-prefixed so no two paths share
    /// one (hashed when longer than a key may be).
    pub key: String,
}

/// The rule `entries` hit under `top` (a domain's first level), if any.
pub fn find<'a, E: EntryRef>(top: &'a Level, entries: &[E]) -> Option<Hit<'a>> {
    let last = entries.len().checked_sub(1)?;
    let mut level = top;
    let mut key = String::new();
    for (i, entry) in entries.iter().enumerate() {
        let descriptor = step(level, entry)?;
        let part = match (&descriptor.value, descriptor.share_threshold) {
            (Some(pattern), true) => pattern.as_str(),
            _ => entry.value(),
        };
        // Length-prefixed, so ("a:b", "c") and ("a", "b:c") never share a key.
        key.push_str(&part.len().to_string());
        key.push(':');
        key.push_str(part);
        if i == last {
            return descriptor.rule.as_deref().map(|rule| Hit {
                rule,
                key: bounded(key),
            });
        }
        if descriptor.children.is_empty() {
            return None;
        }
        level = &descriptor.children;
    }
    None
}

/// The descriptor `entry` selects at `level`: exact value, then the first wildcard value
/// in file order that matches, then key alone.
fn step<'a, E: EntryRef>(level: &'a Level, entry: &E) -> Option<&'a Descriptor> {
    let candidates = level.by_key.get(entry.key())?;
    let value = entry.value();
    candidates
        .exact
        .get(value)
        .or_else(|| {
            candidates
                .patterns
                .iter()
                .find(|(pattern, _)| pattern.matches(value))
                .map(|(_, descriptor)| descriptor)
        })
        .or(candidates.any.as_ref())
}

/// `key` itself when it fits in a counter key, else a digest of it.
pub fn bounded(key: String) -> String {
    if !key.is_empty() && key.len() <= MAX_KEY_BYTES {
        return key;
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(2 + 40);
    out.push_str("h:");
    for byte in &digest[..20] {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The domain `d` of an inline `envoy:` section.
    fn domains(descriptors: &str) -> sluice_config::EnvoyConfig {
        let text =
            format!("envoy:\n  domains:\n    - domain: d\n      descriptors:\n{descriptors}");
        sluice_config::load_str(&text, "t.yaml", &|_| None, &[])
            .unwrap()
            .envoy
            .unwrap()
    }

    fn hit(
        config: &sluice_config::EnvoyConfig,
        entries: &[(&str, &str)],
    ) -> Option<(String, u32, String)> {
        let top = config.domains.get("d").unwrap();
        find(top, entries).map(|hit| {
            let per = hit.rule.kind.requests_per_unit();
            (hit.rule.path.clone(), per, hit.key)
        })
    }

    #[test]
    fn a_value_beats_the_key_alone() {
        let config = domains(
            "        - key: remote_address\n          rate_limit: {unit: second, requests_per_unit: 10}\n        - key: remote_address\n          value: 50.0.0.5\n          rate_limit: {unit: second, requests_per_unit: 0}\n",
        );
        let (path, per, key) = hit(&config, &[("remote_address", "50.0.0.1")]).unwrap();
        assert_eq!((path.as_str(), per), ("d.remote_address", 10));
        assert_eq!(key, "8:50.0.0.1");
        let (path, per, _) = hit(&config, &[("remote_address", "50.0.0.5")]).unwrap();
        assert_eq!((path.as_str(), per), ("d.remote_address_50.0.0.5", 0));
        assert!(hit(&config, &[("other", "x")]).is_none());
    }

    #[test]
    fn nested_descriptors_match_level_by_level_and_depth_must_agree() {
        // envoyproxy/ratelimit's Example 2 and Example 4.
        let config = domains(
            "        - key: message_type\n          value: marketing\n          descriptors:\n            - key: to_number\n              rate_limit: {unit: day, requests_per_unit: 5}\n        - key: to_number\n          rate_limit: {unit: day, requests_per_unit: 100}\n        - key: key\n          value: value\n          rate_limit: {unit: second, requests_per_unit: 300}\n",
        );
        let nested = hit(
            &config,
            &[("message_type", "marketing"), ("to_number", "2061111111")],
        )
        .unwrap();
        assert_eq!(
            (nested.0.as_str(), nested.1),
            ("d.message_type_marketing.to_number", 5)
        );
        assert_eq!(nested.2, "9:marketing10:2061111111");
        let flat = hit(&config, &[("to_number", "2061111111")]).unwrap();
        assert_eq!((flat.0.as_str(), flat.1), ("d.to_number", 100));
        // The placeholder level has no rule of its own.
        assert!(hit(&config, &[("message_type", "marketing")]).is_none());
        // Another message type has no nested config.
        assert!(hit(&config, &[("message_type", "other"), ("to_number", "1")]).is_none());
        // More entries than the configuration nests: no rule (Example 4).
        assert!(hit(&config, &[("key", "value"), ("subkey", "subvalue")]).is_none());
        assert_eq!(hit(&config, &[("key", "value")]).unwrap().1, 300);
    }

    #[test]
    fn prefixes_sit_between_exact_values_and_the_key_alone() {
        let config = domains(
            "        - {key: path, value: /api/special, rate_limit: {unit: minute, requests_per_unit: 1}}\n        - {key: path, value: \"/api/*\", rate_limit: {unit: minute, requests_per_unit: 2}}\n        - {key: path, value: \"/api/v*\", rate_limit: {unit: minute, requests_per_unit: 3}}\n        - {key: path, value: \"/shared*\", share_threshold: true, rate_limit: {unit: minute, requests_per_unit: 4}}\n        - {key: path, rate_limit: {unit: minute, requests_per_unit: 5}}\n",
        );
        assert_eq!(hit(&config, &[("path", "/api/special")]).unwrap().1, 1);
        // The first prefix in file order wins, as in envoyproxy/ratelimit.
        assert_eq!(hit(&config, &[("path", "/api/v2")]).unwrap().1, 2);
        assert_eq!(hit(&config, &[("path", "/other")]).unwrap().1, 5);
        // Each value under a plain prefix has its own counter; share_threshold shares one.
        assert_ne!(
            hit(&config, &[("path", "/api/a")]).unwrap().2,
            hit(&config, &[("path", "/api/b")]).unwrap().2
        );
        let (_, per, key_a) = hit(&config, &[("path", "/shared/a")]).unwrap();
        let (_, _, key_b) = hit(&config, &[("path", "/shared/b")]).unwrap();
        assert_eq!((per, key_a.as_str()), (4, "8:/shared*"));
        assert_eq!(key_a, key_b);
    }

    #[test]
    fn long_keys_are_hashed_and_no_request_matches_nothing() {
        let config =
            domains("        - {key: user, rate_limit: {unit: minute, requests_per_unit: 5}}\n");
        let long = "u".repeat(1000);
        let key = hit(&config, &[("user", long.as_str())]).unwrap().2;
        assert!(key.starts_with("h:") && key.len() == 42, "{key}");
        assert_ne!(key, hit(&config, &[("user", &long[1..])]).unwrap().2);
        let none: [(&str, &str); 0] = [];
        assert!(find(config.domains.get("d").unwrap(), &none).is_none());
    }
}
