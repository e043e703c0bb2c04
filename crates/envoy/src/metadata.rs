//! The answer's `dynamic_metadata` (`envoy.response_dynamic_metadata`), shaped as
//! envoyproxy/ratelimit shapes it with `RESPONSE_DYNAMIC_METADATA=true`, so filters and
//! access logs written for it read sluice's the same way:
//!
//! - `domain`: the call's domain;
//! - `descriptors`: one `{"entries": ["key=value", ...]}` per descriptor sent, with its
//!   own `hitsAddend` when it set one;
//! - `hitsAddend`: the call's, when not 0;
//! - `quotaModeEnabled`: whether a `quota_mode` rule decided a descriptor, and
//!   `quotaModeViolations`: the indices of those that went over their limit (they still
//!   answered OK);
//! - `metadata`: the configured `metadata` of every descriptor within its limit,
//!   merged (mappings merge recursively; the first value of a key wins).

use std::collections::BTreeMap;

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use sluice_config::envoy::{Metadata, Rule};

use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;

/// The dynamic metadata of one answer: `rules[i]` decided descriptor `i` (none: no
/// rule), and `went_over[i]` says whether it went over its limit.
pub fn answer_metadata(
    request: &RateLimitRequest,
    rules: &[Option<&Rule>],
    went_over: &[bool],
) -> Struct {
    let mut fields = BTreeMap::new();
    fields.insert("domain".to_string(), text(&request.domain));
    let descriptors = request
        .descriptors
        .iter()
        .map(|descriptor| {
            let mut fields = BTreeMap::new();
            let entries = descriptor
                .entries
                .iter()
                .map(|e| text(&format!("{}={}", e.key, e.value)))
                .collect();
            fields.insert("entries".to_string(), list(entries));
            if let Some(hits) = descriptor.hits_addend {
                fields.insert("hitsAddend".to_string(), number(hits as f64));
            }
            object(fields)
        })
        .collect();
    fields.insert("descriptors".to_string(), list(descriptors));
    if request.hits_addend != 0 {
        fields.insert(
            "hitsAddend".to_string(),
            number(f64::from(request.hits_addend)),
        );
    }
    let quota_mode: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, rule)| rule.is_some_and(|rule| rule.quota_mode))
        .map(|(i, _)| i)
        .collect();
    fields.insert(
        "quotaModeEnabled".to_string(),
        boolean(!quota_mode.is_empty()),
    );
    let violations: Vec<Value> = quota_mode
        .iter()
        .filter(|&&i| went_over.get(i).copied().unwrap_or(false))
        .map(|&i| number(i as f64))
        .collect();
    if !violations.is_empty() {
        fields.insert("quotaModeViolations".to_string(), list(violations));
    }
    let mut merged = BTreeMap::new();
    for (rule, over) in rules.iter().zip(went_over) {
        if let (Some(rule), false) = (rule, over)
            && let Some(Metadata::Map(entries)) = &rule.metadata
        {
            merge(&mut merged, entries);
        }
    }
    if !merged.is_empty() {
        fields.insert("metadata".to_string(), object(merged));
    }
    Struct { fields }
}

/// Adds `entries` to `into`: a key already there keeps its value, except that two
/// mappings merge.
fn merge(into: &mut BTreeMap<String, Value>, entries: &[(String, Metadata)]) {
    for (key, value) in entries {
        match (into.get_mut(key), value) {
            (
                Some(Value {
                    kind: Some(Kind::StructValue(existing)),
                }),
                Metadata::Map(more),
            ) => merge(&mut existing.fields, more),
            (Some(_), _) => {}
            (None, value) => {
                into.insert(key.clone(), convert(value));
            }
        }
    }
}

/// A YAML value as a protobuf one: numbers as numbers (as YAML reads them), the rest
/// as written.
fn convert(value: &Metadata) -> Value {
    match value {
        Metadata::Null => Value {
            kind: Some(Kind::NullValue(0)),
        },
        Metadata::Bool(b) => boolean(*b),
        Metadata::Text(t) => match t.parse::<f64>() {
            Ok(n) if n.is_finite() => number(n),
            _ => text(t),
        },
        Metadata::List(items) => list(items.iter().map(convert).collect()),
        Metadata::Map(entries) => {
            let mut fields = BTreeMap::new();
            merge(&mut fields, entries);
            object(fields)
        }
    }
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn boolean(b: bool) -> Value {
    Value {
        kind: Some(Kind::BoolValue(b)),
    }
}

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

fn object(fields: BTreeMap<String, Value>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct { fields })),
    }
}
