//! The `envoy:` section: the gRPC rate limit service's address and its descriptor
//! configuration, written in envoyproxy/ratelimit's YAML format.
//!
//! ```yaml
//! envoy:
//!   listen: 127.0.0.1:8081          # default; loopback unless configured
//!   response_headers: false         # true: X-RateLimit-Limit/-Remaining/-Reset to add
//!   response_dynamic_metadata: false  # true: ratelimit's RESPONSE_DYNAMIC_METADATA
//!   merge_domains: false            # true: ratelimit's MERGE_DOMAIN_CONFIG
//!   domains:                        # each entry is one envoyproxy/ratelimit document
//!     - domain: edge
//!       descriptors:
//!         - key: remote_address
//!           rate_limit: {unit: minute, requests_per_unit: 3}
//!   config_files: [ratelimit/config.yaml]   # existing files, loaded as they are
//! ```
//!
//! A document is `domain` plus nested `descriptors`, each with `key`, an optional `value`
//! (each `*` in it matches any run of characters: `foo*`, `/api*v1`, `svc*ep*rpc`), an optional `rate_limit` (`unit`,
//! `requests_per_unit`, `unit_multiplier`, `unlimited`, `name`, `replaces`), `metadata` (any mapping) and
//! the switches `shadow_mode`, `quota_mode`, `share_threshold`, `detailed_metric` and
//! `value_to_metric`. Two sluice extensions, which envoyproxy/ratelimit would reject:
//! `rate_limit.algorithm` and `rate_limit.debt: true` (hits are work already done,
//! such as the tokens of a finished stream: booked past the limit). Every rule becomes a fixed
//! window [`Limit`] named after its descriptor path. Files named in `config_files` are
//! read as they are (no `${VAR}` interpolation), relative to the sluice config file's
//! directory; their errors name their own file, line and column.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_engine::{Algorithm, Limit, LimitSpec, Rate};

use serde::Deserialize;

use crate::de::{FromText, ListKind, ListOf, Located, OneOrMany, Parsed, Place, Whole, from_node};
use crate::error::Fail;
use crate::tree::{self, shorten};

/// The most a rule may allow per unit: what sluice counts up to in one window.
pub const MAX_REQUESTS_PER_UNIT: u64 = sluice_engine::rate::MAX_QUOTA;

/// The gRPC rate limit service settings (`envoy:`).
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    /// Address of the gRPC listener. Default `127.0.0.1:8081`.
    pub listen: SocketAddr,
    /// Add `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` to every
    /// answer's `response_headers_to_add` (like envoyproxy/ratelimit's
    /// `LIMIT_RESPONSE_HEADERS_ENABLED`). Default false.
    pub response_headers: bool,
    /// Return `dynamic_metadata` in every answer (envoyproxy/ratelimit's
    /// `RESPONSE_DYNAMIC_METADATA`): the domain, the descriptors, the hits, quota mode's
    /// violations and the `metadata` of the descriptors within their limits. Default false.
    pub response_dynamic_metadata: bool,
    /// The files named in `config_files`, as resolved (for watching them).
    pub config_files: Vec<PathBuf>,
    /// Every domain's descriptor tree.
    pub domains: Arc<Domains>,
}

impl EnvoyConfig {
    /// The default listen address, `127.0.0.1:8081`.
    pub const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081));
}

/// All domains, by name.
#[derive(Debug, Clone, Default)]
pub struct Domains {
    by_name: HashMap<String, Level>,
    limits: Vec<Arc<Limit>>,
}

impl Domains {
    /// The top level of `domain`'s descriptors; `None` for a domain not configured.
    pub fn get(&self, domain: &str) -> Option<&Level> {
        self.by_name.get(domain)
    }

    /// How many domains there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The limit of every counted rule, in file order (for metrics).
    pub fn limits(&self) -> &[Arc<Limit>] {
        &self.limits
    }
}

/// The descriptors of one nesting level, by key.
#[derive(Debug, Clone, Default)]
pub struct Level {
    /// What each key matches, by the key.
    pub by_key: HashMap<String, KeyMatch>,
}

impl Level {
    /// Whether the level has no descriptors.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// The descriptors of one level that share a key, in matching order: an exact value
/// first, then wildcard values (`foo*`, `/api*v1`, `svc*ep*rpc`) in file order, then the
/// key alone.
#[derive(Debug, Clone, Default)]
pub struct KeyMatch {
    /// Descriptors with `value`, by the value.
    pub exact: HashMap<String, Descriptor>,
    /// Descriptors whose value holds a `*`, in file order.
    pub patterns: Vec<(Pattern, Descriptor)>,
    /// The descriptor with `key` and no `value`: any value.
    pub any: Option<Descriptor>,
}

/// A descriptor value with one or more `*`, each standing for any run of characters
/// (including none): `foo*` is a prefix, `/api*v1` a prefix and a suffix, `svc*ep*rpc`
/// several literal parts in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The value as configured, `*` included.
    text: String,
    /// The literal parts between the `*`s: at least two, the first and last possibly empty.
    parts: Vec<String>,
}

impl Pattern {
    /// The pattern for `value`, or `None` when it holds no `*` (an exact value).
    pub fn new(value: &str) -> Option<Pattern> {
        if !value.contains('*') {
            return None;
        }
        Some(Pattern {
            text: value.to_string(),
            parts: value.split('*').map(str::to_string).collect(),
        })
    }

    /// The value as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `value` matches: it starts with the first part, ends with the last, and
    /// holds the parts between in order without overlapping.
    pub fn matches(&self, value: &str) -> bool {
        let (Some((first, rest)), Some(last)) = (self.parts.split_first(), self.parts.last())
        else {
            return false;
        };
        let middle = &rest[..rest.len().saturating_sub(1)];
        if value.len() < first.len() + last.len()
            || !value.starts_with(first.as_str())
            || !value.ends_with(last.as_str())
        {
            return false;
        }
        // The stretch the `*`s may cover; the earliest match of each middle part leaves
        // the most room for the next, so a greedy scan finds a match whenever one exists.
        let mut between = &value[first.len()..value.len() - last.len()];
        for part in middle {
            match between.find(part.as_str()) {
                Some(at) => between = &between[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// One configured descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// Its rule, when it has a `rate_limit`.
    pub rule: Option<Arc<Rule>>,
    /// The descriptors nested under it.
    pub children: Level,
    /// `share_threshold: true` on a wildcard value: every value it matches shares one counter.
    pub share_threshold: bool,
    /// The configured value (`foo*` for a wildcard), used as the counter's key part when
    /// `share_threshold` is set.
    pub value: Option<String>,
    /// `metadata:` as written, for the answer (envoyproxy/ratelimit returns it with an
    /// under-limit status).
    pub metadata: Option<Metadata>,
}

/// A YAML value under `metadata:`, kept as written (scalars as their text).
#[derive(Debug, Clone, PartialEq)]
pub enum Metadata {
    /// `~` or an empty value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Any other scalar, as written.
    Text(String),
    /// A sequence.
    List(Vec<Metadata>),
    /// A mapping, in file order.
    Map(Vec<(String, Metadata)>),
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Metadata;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("metadata: a mapping, list or scalar")
            }
            fn visit_unit<E>(self) -> Result<Metadata, E> {
                Ok(Metadata::Null)
            }
            fn visit_none<E>(self) -> Result<Metadata, E> {
                Ok(Metadata::Null)
            }
            fn visit_bool<E>(self, value: bool) -> Result<Metadata, E> {
                Ok(Metadata::Bool(value))
            }
            fn visit_str<E>(self, value: &str) -> Result<Metadata, E> {
                Ok(Metadata::Text(value.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Metadata, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Metadata::List(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Metadata, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Metadata::Map(entries))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A `rate_limit` block, validated.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The descriptor path as envoyproxy/ratelimit writes it: `domain.key_value.key`.
    pub path: String,
    /// What the rule does.
    pub kind: RuleKind,
    /// `rate_limit.name`, reported as the limit's name and used by `replaces`.
    pub name: Option<String>,
    /// `rate_limit.replaces`: the names of rules this one replaces when both match.
    pub replaces: Vec<String>,
    /// `shadow_mode`: decide and count, but always answer OK.
    pub shadow: bool,
    /// `quota_mode`: decide and count, and answer OK when over the limit too (a soft
    /// quota, as envoyproxy/ratelimit's quota mode allows the request).
    pub quota_mode: bool,
    /// `rate_limit.debt` (a sluice extension): hits are work already done, such as the
    /// tokens Envoy reports when a stream ends (`apply_on_stream_done`): every hit is
    /// booked, past the limit if need be, and a descriptor is over the limit while
    /// nothing is left (so a call that sends `hits_addend: 0` first is refused while the
    /// key is in debt).
    pub debt: bool,
    /// Its descriptor's `metadata`, returned in the answer's dynamic metadata while the
    /// descriptor is within its limit (`response_dynamic_metadata`).
    pub metadata: Option<Metadata>,
}

/// What a rule does.
#[derive(Debug, Clone)]
pub enum RuleKind {
    /// `unlimited: true`: always OK, never counted.
    Unlimited,
    /// `requests_per_unit: 0`: every request is over the limit.
    BlockAll {
        /// The unit of the window reported.
        unit: Unit,
        /// `unit_multiplier`: the window is this many units long.
        multiplier: u64,
    },
    /// A counted fixed window.
    Limited {
        /// The window's unit.
        unit: Unit,
        /// `unit_multiplier`: the window is this many units long (default 1).
        multiplier: u64,
        /// Requests allowed per window.
        requests_per_unit: u32,
        /// The sluice limit that counts it.
        limit: Arc<Limit>,
    },
}

impl RuleKind {
    /// The requests each unit allows: 0 for a rule that blocks all, `u32::MAX` for an
    /// unlimited one (the remaining count envoyproxy/ratelimit reports for it).
    pub fn requests_per_unit(&self) -> u32 {
        match self {
            RuleKind::Unlimited => u32::MAX,
            RuleKind::BlockAll { .. } => 0,
            RuleKind::Limited {
                requests_per_unit, ..
            } => *requests_per_unit,
        }
    }
}

/// A rate limit unit, as envoyproxy/ratelimit spells it (any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day (UTC).
    Day,
    /// Seven days, aligned to the Unix epoch (so weeks start on Thursday 00:00 UTC), as
    /// envoyproxy/ratelimit counts them.
    Week,
    /// Thirty days aligned to the Unix epoch, as envoyproxy/ratelimit counts them.
    Month,
    /// 365 days aligned to the Unix epoch, as envoyproxy/ratelimit counts them.
    Year,
}

impl Unit {
    /// Every unit, in the order the spellings are listed in messages.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// The window length in seconds.
    pub fn seconds(&self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    /// The unit in any case (`minute`, `MINUTE`).
    pub fn parse(text: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|unit| unit.as_str().eq_ignore_ascii_case(text.trim()))
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `envoy:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnvoySection {
    listen: Option<Parsed<SocketAddr>>,
    domains: Option<ListOf<Located<RatelimitDocument>, DocumentList>>,
    /// Relative to the sluice config file's directory.
    config_files: Option<OneOrMany<Located<String>>>,
    response_headers: Option<bool>,
    /// envoyproxy/ratelimit's `MERGE_DOMAIN_CONFIG`: documents naming one domain merge.
    merge_domains: Option<bool>,
    /// envoyproxy/ratelimit's `RESPONSE_DYNAMIC_METADATA`.
    response_dynamic_metadata: Option<bool>,
}

struct DocumentList;
impl ListKind for DocumentList {
    const EXPECTING: &'static str =
        "a list of envoyproxy/ratelimit documents, e.g. `- domain: edge` with `descriptors: [...]`";
}

/// One envoyproxy/ratelimit document.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatelimitDocument {
    domain: Option<Located<String>>,
    descriptors: Option<Descriptors>,
}

type Descriptors = ListOf<Located<RatelimitDescriptor>, DescriptorList>;

struct DescriptorList;
impl ListKind for DescriptorList {
    const EXPECTING: &'static str = "a list of descriptors, e.g. `- key: remote_address`";
}

/// One descriptor.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatelimitDescriptor {
    key: Option<Located<String>>,
    /// A `*` anywhere makes it a wildcard; empty is no value.
    value: Option<String>,
    rate_limit: Option<Located<RatelimitRule>>,
    descriptors: Option<Descriptors>,
    shadow_mode: Option<bool>,
    /// Metric naming switches of envoyproxy/ratelimit: sluice counts per rule, so they
    /// are accepted (checked to be booleans) and change nothing.
    #[allow(dead_code)]
    detailed_metric: Option<bool>,
    #[allow(dead_code)]
    value_to_metric: Option<bool>,
    share_threshold: Option<Located<bool>>,
    /// envoyproxy/ratelimit's per-descriptor `metadata`: any mapping, kept as written.
    metadata: Option<Located<Metadata>>,
    /// envoyproxy/ratelimit's `quota_mode`: over the limit is still OK (a soft quota).
    quota_mode: Option<bool>,
}

/// A `rate_limit:` block.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatelimitRule {
    unit: Option<Located<Parsed<Unit>>>,
    requests_per_unit: Option<Located<Whole<0, MAX_REQUESTS_PER_UNIT>>>,
    unlimited: Option<bool>,
    name: Option<String>,
    replaces: Option<ListOf<Located<Option<RatelimitReplaces>>, ReplacesList>>,
    /// A sluice extension (envoyproxy/ratelimit rejects it): the rule's algorithm,
    /// `fixed_window` (ratelimit's, the default), `sliding_window` or `gcra`.
    algorithm: Option<Located<Parsed<Algorithm>>>,
    /// A sluice extension: hits are booked past the limit (see [`Rule::debt`]).
    debt: Option<Located<bool>>,
    /// envoyproxy/ratelimit's `unit_multiplier`: a window of this many units.
    unit_multiplier: Option<Located<Whole<1, 1_000_000>>>,
}

struct ReplacesList;
impl ListKind for ReplacesList {
    const EXPECTING: &'static str = "a list such as `- name: specific_limit`";
}

/// One of `replaces`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatelimitReplaces {
    name: Option<String>,
}

/// Adds `more`'s descriptors to `level` (`merge_domains`); a key and value both define
/// is refused, described for the message.
fn merge_level(level: &mut Level, more: Level) -> Result<(), String> {
    for (key, found) in more.by_key {
        let entry = level.by_key.entry(key.clone()).or_default();
        if let Some(any) = found.any {
            if entry.any.is_some() {
                return Err(format!("with key `{}` and no value", shorten(&key)));
            }
            entry.any = Some(any);
        }
        for (value, descriptor) in found.exact {
            if entry.exact.contains_key(&value) {
                return Err(format!(
                    "`{}` with value `{}`",
                    shorten(&key),
                    shorten(&value)
                ));
            }
            entry.exact.insert(value, descriptor);
        }
        for (pattern, descriptor) in found.patterns {
            if entry.patterns.iter().any(|(p, _)| p == &pattern) {
                return Err(format!(
                    "`{}` with value `{}`",
                    shorten(&key),
                    shorten(pattern.as_str())
                ));
            }
            entry.patterns.push((pattern, descriptor));
        }
    }
    Ok(())
}

impl FromText for Unit {
    fn from_text(text: &str) -> Result<Self, String> {
        Unit::parse(text).ok_or_else(|| {
            let units = Unit::ALL.map(|unit| unit.as_str()).join(", ");
            format!("unknown unit `{}`: use one of {units}", shorten(text))
        })
    }
}

impl EnvoySection {
    /// The section's config. `source` is the main config file's name, which relative
    /// `config_files` are resolved against.
    pub(crate) fn build(self, source: &str) -> Result<EnvoyConfig, Fail> {
        let mut builder = Builder {
            merge_domains: self.merge_domains.unwrap_or(false),
            ..Builder::default()
        };
        for document in self.domains.map_or(Vec::new(), |domains| domains.0) {
            builder.document(document, None)?;
        }
        let mut config_files = Vec::new();
        let base = Path::new(source).parent().unwrap_or(Path::new(""));
        for name in self.config_files.map_or(Vec::new(), |files| files.0) {
            if name.value.trim().is_empty() {
                return Err(name.at.fail(
                    "the file name is empty: give the path of an envoyproxy/ratelimit config file",
                ));
            }
            let file = base.join(name.value.trim());
            builder.file(&file, &name.at)?;
            config_files.push(file);
        }
        Ok(EnvoyConfig {
            listen: self
                .listen
                .map_or(EnvoyConfig::DEFAULT_LISTEN, |listen| listen.0),
            response_headers: self.response_headers.unwrap_or(false),
            response_dynamic_metadata: self.response_dynamic_metadata.unwrap_or(false),
            config_files,
            domains: Arc::new(builder.domains),
        })
    }
}

/// Builds the domains, remembering where each was defined and which limit names are taken.
#[derive(Default)]
struct Builder {
    domains: Domains,
    /// Where each domain was first defined: file (None: the main one) and line.
    defined_at: HashMap<String, (Option<String>, usize)>,
    names: HashSet<String>,
    /// `merge_domains`: a second document of a domain adds its descriptors.
    merge_domains: bool,
}

impl Builder {
    /// Reads one config file and adds its document.
    fn file(&mut self, file: &Path, at: &Place) -> Result<(), Fail> {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|error| {
            at.fail(format!(
                "cannot read the envoyproxy/ratelimit config file {shown}: {error} (relative names are taken from the sluice config file's directory)"
            ))
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        // Loaded as it is, as envoyproxy/ratelimit would: no ${VAR} interpolation.
        let root = tree::parse(text, None).map_err(|fail| fail.in_file(&shown))?;
        let Some(root) = root.filter(|root| !root.is_null()) else {
            return Err(at.fail(format!(
                "{shown} is empty: it needs `domain:` and `descriptors:`"
            )));
        };
        let document = from_node(&root, "").map_err(|fail| fail.in_file(&shown))?;
        let document = Located {
            value: document,
            at: Place {
                origin: root.origin.clone(),
                path: String::new(),
            },
        };
        self.document(document, Some(&shown))
            .map_err(|fail| fail.in_file(&shown))
    }

    /// One envoyproxy/ratelimit document: `domain` and `descriptors`.
    fn document(
        &mut self,
        document: Located<RatelimitDocument>,
        file: Option<&str>,
    ) -> Result<(), Fail> {
        let Located {
            value: document,
            at,
        } = document;
        let Some(Located {
            value: domain,
            at: domain_at,
        }) = document.domain
        else {
            return Err(at.fail(
                "missing `domain`: every envoyproxy/ratelimit document names its domain, e.g. `domain: edge`",
            ));
        };
        if domain.is_empty() {
            return Err(domain_at.fail(
                "the domain is empty: name it as Envoy's rate limit filter does (its `domain:`)",
            ));
        }
        let first = self
            .defined_at
            .get(&domain)
            .map(|(first_file, first_line)| match first_file {
                Some(first) => format!("{first}:{first_line}"),
                None => format!("line {first_line} of the sluice config"),
            });
        if let (Some(place), false) = (&first, self.merge_domains) {
            return Err(domain_at.fail(format!(
                "domain `{}` is already defined ({place}): merge the two documents' descriptors into one, or set `envoy.merge_domains: true` (envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG)",
                shorten(&domain)
            )));
        }
        self.defined_at
            .entry(domain.clone())
            .or_insert((file.map(str::to_string), domain_at.line()));
        let level = match document.descriptors {
            Some(descriptors) => self.level(descriptors, &domain)?,
            None => Level::default(),
        };
        match (self.domains.by_name.get_mut(&domain), first) {
            (Some(existing), Some(place)) => merge_level(existing, level).map_err(|duplicate| {
                domain_at.fail(format!(
                    "domain `{}` already has a top-level descriptor {duplicate} ({place}): with merge_domains, each top-level descriptor is written in one document only",
                    shorten(&domain)
                ))
            })?,
            _ => {
                self.domains.by_name.insert(domain, level);
            }
        }
        Ok(())
    }

    /// A `descriptors:` list. `parent` is the ratelimit-style path of the level's owner.
    fn level(&mut self, descriptors: Descriptors, parent: &str) -> Result<Level, Fail> {
        let mut level = Level::default();
        // Where each composite key (key, value) was first written, to report duplicates.
        let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
        for item in descriptors.0 {
            let at = item.at.clone();
            let (key, value, descriptor) = self.descriptor(item, parent)?;
            if let Some(first) = seen.insert((key.clone(), value.clone()), at.line()) {
                let what = match &value {
                    Some(value) => {
                        format!("key `{}` with value `{}`", shorten(&key), shorten(value))
                    }
                    None => format!("key `{}` without a value", shorten(&key)),
                };
                return Err(at.fail(format!(
                    "a second descriptor with {what} at this level (the first is on line {first}): keep one, or merge their nested descriptors"
                )));
            }
            let entry = level.by_key.entry(key).or_default();
            match value {
                None => entry.any = Some(descriptor),
                Some(value) => match Pattern::new(&value) {
                    Some(pattern) => entry.patterns.push((pattern, descriptor)),
                    None => {
                        entry.exact.insert(value, descriptor);
                    }
                },
            }
        }
        Ok(level)
    }

    /// One descriptor: its key, its value and what it holds.
    fn descriptor(
        &mut self,
        item: Located<RatelimitDescriptor>,
        parent: &str,
    ) -> Result<(String, Option<String>, Descriptor), Fail> {
        let Located { value: item, at } = item;
        let Some(Located {
            value: key,
            at: key_at,
        }) = item.key
        else {
            return Err(
                at.fail("missing `key`: every descriptor has one, e.g. `key: remote_address`")
            );
        };
        if key.is_empty() {
            return Err(key_at.fail(
                "the key is empty: use the descriptor key Envoy sends, e.g. remote_address",
            ));
        }
        // An empty value is no value, as envoyproxy/ratelimit reads it.
        let value = item.value.filter(|value| !value.is_empty());
        let own_path = match &value {
            Some(value) => format!("{parent}.{key}_{value}"),
            None => format!("{parent}.{key}"),
        };
        let shadow = item.shadow_mode.unwrap_or(false);
        let quota_mode = item.quota_mode.unwrap_or(false);
        if let Some(metadata) = &item.metadata
            && !matches!(metadata.value, Metadata::Map(_))
        {
            return Err(metadata
                .at
                .fail("metadata is a mapping, e.g. `metadata: {name: service_1}`"));
        }
        let share_threshold = match item.share_threshold {
            Some(share) if share.value => {
                if !value.as_deref().is_some_and(|value| value.contains('*')) {
                    return Err(share.at.fail(
                        "share_threshold only applies to a wildcard value (one with a `*`, e.g. `value: files/*` or `/api*v1`): add the `*` or remove share_threshold",
                    ));
                }
                true
            }
            _ => false,
        };
        let metadata = item.metadata.map(|metadata| metadata.value);
        let rule = match item.rate_limit {
            Some(rule) => {
                let mut rule = self.rule(rule, &own_path, shadow, quota_mode)?;
                rule.metadata = metadata.clone();
                Some(Arc::new(rule))
            }
            None => None,
        };
        let children = match item.descriptors {
            Some(descriptors) => self.level(descriptors, &own_path)?,
            None => Level::default(),
        };
        let descriptor = Descriptor {
            rule,
            children,
            share_threshold,
            value: value.clone(),
            metadata,
        };
        Ok((key, value, descriptor))
    }

    /// A `rate_limit:` block.
    fn rule(
        &mut self,
        rule: Located<RatelimitRule>,
        own_path: &str,
        shadow: bool,
        quota_mode: bool,
    ) -> Result<Rule, Fail> {
        let Located { value: rule, at } = rule;
        let name = rule.name.filter(|name| !name.is_empty());
        let mut replaces = Vec::new();
        for item in rule.replaces.map_or(Vec::new(), |list| list.0) {
            let replaced = item
                .value
                .and_then(|item| item.name)
                .filter(|name| !name.is_empty());
            let Some(replaced) = replaced else {
                return Err(item.at.fail(
                    "a replaces entry needs the name of the rule it replaces: `- name: specific_limit`",
                ));
            };
            if name.as_deref() == Some(replaced.as_str()) {
                return Err(item
                    .at
                    .fail("a rule cannot replace itself: name another rule's `rate_limit.name`"));
            }
            replaces.push(replaced);
        }
        let kind = if rule.unlimited.unwrap_or(false) {
            let unit = rule.unit.as_ref().map(|unit| &unit.at);
            let counted = unit
                .or(rule.requests_per_unit.as_ref().map(|r| &r.at))
                .or(rule.algorithm.as_ref().map(|a| &a.at))
                .or(rule.debt.as_ref().map(|d| &d.at))
                .or(rule.unit_multiplier.as_ref().map(|m| &m.at));
            if let Some(at) = counted {
                return Err(at.fail(
                    "an unlimited rule has no unit, requests_per_unit, unit_multiplier, algorithm or debt: remove them, or remove `unlimited: true`",
                ));
            }
            RuleKind::Unlimited
        } else {
            let Some(unit) = rule.unit.map(|unit| unit.value.0) else {
                let units = Unit::ALL.map(|unit| unit.as_str()).join(", ");
                return Err(at.fail(format!("missing `unit`: one of {units}")));
            };
            let Some(requests) = rule.requests_per_unit else {
                return Err(at.fail(
                    "missing `requests_per_unit`: how many requests each unit allows (0 blocks every request)",
                ));
            };
            let multiplier = rule.unit_multiplier.as_ref().map_or(1, |m| m.value.0);
            let period = unit.seconds().saturating_mul(multiplier);
            if period > sluice_engine::rate::MAX_PERIOD_SECS {
                let at = rule.unit_multiplier.as_ref().map_or(&at, |m| &m.at);
                return Err(at.fail(format!(
                    "a window of {multiplier} {} is longer than sluice's longest window (366 days): use a smaller unit_multiplier",
                    unit.as_str()
                )));
            }
            match Rate::new(requests.value.0, period) {
                Ok(rate) => RuleKind::Limited {
                    unit,
                    multiplier,
                    requests_per_unit: u32::try_from(requests.value.0).unwrap_or(u32::MAX),
                    // A quota-mode rule never denies: the engine's shadow switch counts it
                    // and reports allowed, so it also never stops the other counters.
                    limit: self.limit(
                        own_path,
                        rate,
                        rule.algorithm.map_or(Algorithm::FixedWindow, |a| a.value.0),
                        shadow || quota_mode,
                        &requests.at,
                    )?,
                },
                // Only 0 gets here: the range was checked when it was read.
                Err(_) => RuleKind::BlockAll { unit, multiplier },
            }
        };
        Ok(Rule {
            path: own_path.to_string(),
            kind,
            name,
            replaces,
            shadow,
            quota_mode,
            debt: rule.debt.is_some_and(|d| d.value),
            metadata: None,
        })
    }

    /// The sluice limit counting one rule, named after its descriptor path so that its
    /// counters survive reloads while the path, unit and shadow switch stay the same.
    fn limit(
        &mut self,
        own_path: &str,
        rate: Rate,
        algorithm: Algorithm,
        shadow: bool,
        at: &Place,
    ) -> Result<Arc<Limit>, Fail> {
        let name = self.limit_name(own_path);
        let mut spec = LimitSpec::new(vec![rate]);
        spec.algorithm = algorithm;
        spec.shadow = shadow;
        let limit = Limit::new(&name, spec).map_err(|error| at.fail(error.to_string()))?;
        let limit = Arc::new(limit);
        self.domains.limits.push(Arc::clone(&limit));
        Ok(limit)
    }

    /// `envoy.<path>` with characters a limit name cannot hold replaced by `_`; a name
    /// that is too long or already taken ends in a hash of the whole path instead.
    fn limit_name(&mut self, own_path: &str) -> String {
        const MAX: usize = 64;
        let clean: String = format!("envoy.{own_path}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let name = if clean.len() <= MAX && !self.names.contains(&clean) {
            clean
        } else {
            let hash = format!("{:016x}", fnv1a(own_path.as_bytes()));
            format!("{}-{hash}", &clean[..clean.len().min(MAX - 17)])
        };
        self.names.insert(name.clone());
        name
    }
}

/// 64-bit FNV-1a: a stable hash (unlike std's), so limit names do not change between builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<EnvoyConfig>, String> {
        crate::load_str(text, "sluice.yaml", &|_| None, &[])
            .map(|config| config.envoy)
            .map_err(|error| {
                let (line, column) = (error.line.unwrap_or(0), error.column.unwrap_or(0));
                let field = error.field.unwrap_or_default();
                format!("{line}:{column}: {field}: {}", error.message)
            })
    }

    #[test]
    fn limit_names_are_sanitised_and_unique() {
        let mut builder = Builder::default();
        assert_eq!(
            builder.limit_name("edge.remote_address"),
            "envoy.edge.remote_address"
        );
        assert_eq!(
            builder.limit_name("edge.path_/api/v1"),
            "envoy.edge.path__api_v1"
        );
        // `path_?api?v1` sanitises to the same name: the second gets a hash suffix.
        let second = builder.limit_name("edge.path_?api?v1");
        assert_ne!(second, "envoy.edge.path__api_v1");
        assert!(second.starts_with("envoy.edge.path__api_v1-"), "{second}");
        let long = builder.limit_name(&"x".repeat(200));
        assert!(long.len() <= 64, "{long}");
        assert!(Limit::new(&long, LimitSpec::new(vec![Rate::new(1, 1).unwrap()])).is_ok());
    }

    #[test]
    fn units_in_any_case() {
        assert_eq!(Unit::parse("MINUTE"), Some(Unit::Minute));
        assert_eq!(Unit::parse("week"), Some(Unit::Week));
        assert_eq!(Unit::parse("fortnight"), None);
        assert_eq!(Unit::Year.seconds(), 365 * 86_400);
    }

    #[test]
    fn requests_per_unit_zero_blocks() {
        let config = parse(
            "envoy:\n  domains:\n    - domain: d\n      descriptors:\n        - {key: k, value: bad, rate_limit: {unit: second, requests_per_unit: 0}}\n",
        )
        .unwrap()
        .unwrap();
        let level = config.domains.get("d").unwrap();
        let rule = level.by_key["k"].exact["bad"].rule.as_ref().unwrap();
        assert!(matches!(
            rule.kind,
            RuleKind::BlockAll {
                unit: Unit::Second,
                multiplier: 1
            }
        ));
        assert!(config.domains.limits().is_empty());
    }

    #[test]
    fn misplaced_key_is_reported_with_its_place() {
        let error = parse(
            "envoy:\n  domains:\n    - domain: d\n      descriptors:\n        - key: k\n          unit: second\n",
        )
        .unwrap_err();
        assert!(
            error.starts_with("6:11: envoy.domains[0].descriptors[0].unit: unknown field `unit`"),
            "{error}"
        );
    }
}
