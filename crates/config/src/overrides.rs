//! `SLUICE_*` environment overrides applied to the document tree.
//!
//! The name after `SLUICE_`, split on `__` and lowercased, is a path into the
//! document: `SLUICE_STORAGE__MAX_KEYS=5000` sets `storage.max_keys`. Only names
//! whose first segment is a top-level config key are overrides; any other
//! `SLUICE_*` variable (`SLUICE_LOG`, `SLUICE_CONFIG`, `SLUICE_ADMIN_TOKEN`, ...)
//! is left alone.

use crate::error::{Fail, Origin};
use crate::tree::{self, Entry, Kind, Node, Scalar, Value};

/// Prefix of every override variable.
pub(crate) const PREFIX: &str = "SLUICE_";

/// Longest override path accepted (the deepest setting is far shallower).
const MAX_PATH: usize = 16;

/// The top-level keys of the config file.
pub(crate) const TOP_LEVEL: &[&str] = &[
    "listen",
    "admin",
    "storage",
    "limits",
    "http",
    "client_ip",
    "responses",
    "forward_auth",
    "routes",
    "envoy",
    "proxy",
    "sessions",
    "jwt",
    "plan_from",
    "stats",
];

/// The config path `name` addresses, if it is an override at all.
fn path_of(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix(PREFIX)?;
    let segments: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    let first = segments.first()?;
    TOP_LEVEL.contains(&first.as_str()).then_some(segments)
}

/// Applies every override in `overrides` (in the order given) to `root`.
pub(crate) fn apply(root: &mut Node, overrides: &[(String, String)]) -> Result<(), Fail> {
    for (name, value) in overrides {
        let Some(path) = path_of(name) else {
            continue;
        };
        let origin = Origin::Env { var: name.clone() };
        let dotted = path.join(".");
        if path.iter().any(String::is_empty) {
            return Err(Fail::new(
                &origin,
                &dotted,
                "the variable name has an empty segment: separate fields with exactly two underscores, e.g. SLUICE_STORAGE__MAX_KEYS",
            ));
        }
        if path.len() > MAX_PATH {
            return Err(Fail::new(
                &origin,
                &dotted,
                format!(
                    "the path is deeper than {MAX_PATH} fields: no config setting is that deep"
                ),
            ));
        }
        let value = parse_value(value, &origin, &dotted)?;
        set(root, &path, value, &origin)?;
    }
    Ok(())
}

/// An override's value: a flow list or mapping, or a quoted string, is read as YAML; anything
/// else is taken literally as a plain scalar and typed by the core schema (so `5000` is a
/// number, and a token containing `: ` or `#` stays one string). An empty value is an empty
/// string.
fn parse_value(text: &str, origin: &Origin, path: &str) -> Result<Node, Fail> {
    let trimmed = text.trim();
    if trimmed.starts_with(['[', '{', '"', '\'']) {
        let parsed = tree::parse(trimmed, None).map_err(|fail| {
            Fail::new(
                origin,
                path,
                format!("cannot read the value as YAML: {}", fail.message),
            )
        })?;
        let mut node = parsed.unwrap_or(Node {
            value: Value::Scalar(Scalar {
                text: String::new(),
                kind: Kind::Str,
            }),
            origin: origin.clone(),
        });
        node.restamp(origin);
        return Ok(node);
    }
    let kind = if text.is_empty() {
        Kind::Str
    } else {
        tree::resolve_plain(text)
    };
    Ok(Node {
        value: Value::Scalar(Scalar {
            text: text.to_string(),
            kind,
        }),
        origin: origin.clone(),
    })
}

/// Puts `value` at `path` under `node`, creating mappings on the way.
fn set(node: &mut Node, path: &[String], value: Node, origin: &Origin) -> Result<(), Fail> {
    let mut node = node;
    let mut walked = String::new();
    for (i, segment) in path.iter().enumerate() {
        if node.is_null() {
            *node = Node::empty_map(origin.clone());
        }
        let described = node.describe();
        let Value::Map(entries) = &mut node.value else {
            return Err(Fail::new(
                origin,
                &path.join("."),
                format!("`{walked}` is {described}, not a mapping, so it has no field `{segment}`",),
            ));
        };
        let position = match entries.iter().position(|entry| entry.key == *segment) {
            Some(position) => position,
            None => {
                entries.push(Entry {
                    key: segment.clone(),
                    key_origin: origin.clone(),
                    value: Node {
                        value: Value::Scalar(Scalar {
                            text: String::new(),
                            kind: Kind::Null,
                        }),
                        origin: origin.clone(),
                    },
                });
                entries.len() - 1
            }
        };
        walked = crate::error::join(&walked, segment);
        let entry = &mut entries[position];
        if i + 1 == path.len() {
            entry.value = value;
            return Ok(());
        }
        node = &mut entry.value;
    }
    Ok(())
}
