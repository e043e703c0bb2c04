//! The rules about storage settings that the config loader (`sluice-config`) and the
//! stores both apply: what a PostgreSQL schema name may be, which URL schemes each shared
//! store takes, the PostgreSQL store's defaults, and the `on_error` choices.
//!
//! They live here, in a crate with no dependencies, so that the config loader refuses a
//! bad setting (with its file:line:column) by exactly the rule the store applies later,
//! without linking the stores' clients (tokio-postgres, redis) or their runtime. Each side
//! keeps its own messages: the config's point at the YAML, the stores' at their settings.

use std::fmt;

pub mod postgres {
    //! What the PostgreSQL store (`sluice-store-postgres`) accepts, and its defaults.

    /// The URL schemes the store takes: a URL, never a libpq `key=value` string, so the
    /// config can tell a URL (which holds a password) from anything else.
    pub const URL_SCHEMES: &[&str] = &["postgres://", "postgresql://"];

    /// The schema used when none is configured.
    pub const DEFAULT_SCHEMA: &str = "public";

    /// Connections a store keeps at most when not configured.
    pub const DEFAULT_POOL_SIZE: usize = 16;

    /// [`is_plain_schema_name`] in words, for error messages.
    pub const SCHEMA_NAME_RULE: &str =
        "use letters a-z, digits and _, starting with a letter or _, at most 63 bytes";

    /// Whether `name` is a schema name the store accepts: a lowercase identifier of at
    /// most 63 bytes (PostgreSQL's limit). The store writes the name into SQL between
    /// double quotes; such a name needs no quoting rules and means the same quoted or not.
    pub fn is_plain_schema_name(name: &str) -> bool {
        let mut bytes = name.bytes();
        name.len() <= 63
            && bytes
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }
}

pub mod redis {
    //! What the Redis store (`sluice-store-redis`) accepts.

    /// The URL schemes the Redis client opens (the TLS one only where TLS is built in).
    pub const URL_SCHEMES: &[&str] = &["redis://", "rediss://", "redis+unix://", "unix://"];
}

/// What follows the scheme when `url` starts with one of `schemes` (possibly nothing),
/// else `None`.
pub fn after_scheme<'a>(url: &'a str, schemes: &[&str]) -> Option<&'a str> {
    schemes.iter().find_map(|scheme| url.strip_prefix(scheme))
}

/// What to do while a shared store cannot answer (`storage.on_error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FailurePolicy {
    /// Allow every request (fail open).
    Allow,
    /// Deny every request (fail closed).
    Deny,
    /// Decide with in-process counters until the store is back. The default.
    #[default]
    Local,
}

impl FailurePolicy {
    /// The config spelling: `allow`, `deny` or `local`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FailurePolicy::Allow => "allow",
            FailurePolicy::Deny => "deny",
            FailurePolicy::Local => "local",
        }
    }

    /// The policy spelled `name` in the config, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            FailurePolicy::Allow,
            FailurePolicy::Deny,
            FailurePolicy::Local,
        ]
        .into_iter()
        .find(|policy| policy.as_str() == name)
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_lowercase_identifiers() {
        let longest = "a".repeat(63);
        for good in ["public", "sluice", "_s1", "a_b_c", longest.as_str()] {
            assert!(postgres::is_plain_schema_name(good), "{good}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "Sluice",
            "1abc",
            "a-b",
            "a\"b",
            "a b",
            "é",
            long.as_str(),
        ] {
            assert!(!postgres::is_plain_schema_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_url_needs_one_of_the_schemes() {
        let pg = postgres::URL_SCHEMES;
        assert_eq!(after_scheme("postgres://h/db", pg), Some("h/db"));
        assert_eq!(after_scheme("postgresql://", pg), Some(""));
        assert_eq!(after_scheme("host=h dbname=db", pg), None);
        assert_eq!(after_scheme("redis://h", pg), None);
        assert_eq!(
            after_scheme("rediss://h:6380", redis::URL_SCHEMES),
            Some("h:6380")
        );
        assert_eq!(after_scheme("http://h", redis::URL_SCHEMES), None);
    }

    #[test]
    fn policies_are_spelled_as_in_the_config() {
        for policy in [
            FailurePolicy::Allow,
            FailurePolicy::Deny,
            FailurePolicy::Local,
        ] {
            assert_eq!(FailurePolicy::from_name(policy.as_str()), Some(policy));
            assert_eq!(policy.to_string(), policy.as_str());
        }
        assert_eq!(FailurePolicy::from_name("Allow"), None);
        assert_eq!(FailurePolicy::default(), FailurePolicy::Local);
    }
}
