//! The `envoy:` section: the gRPC rate limit service's address and its descriptor
//! configuration, written in envoyproxy/ratelimit's YAML format.
//!
//! ```yaml
//! envoy:
//!   listen: 127.0.0.1:8081          # default; loopback unless configured
//!   response_headers: false         # true: X-RateLimit-Limit/-Remaining/-Reset to add
//!   domains:                        # each entry is one envoyproxy/ratelimit document
//!     - domain: edge
//!       descriptors:
//!         - key: remote_address
//!           rate_limit: {unit: minute, requests_per_unit: 3}
//!   config_files: [ratelimit/config.yaml]   # existing files, loaded as they are
//! ```
//!
//! A document is `domain` plus nested `descriptors`, each with `key`, an optional `value`
//! (a trailing `*` makes it a prefix), an optional `rate_limit` (`unit`,
//! `requests_per_unit`, `unlimited`, `name`, `replaces`) and the switches `shadow_mode`,
//! `share_threshold`, `detailed_metric` and `value_to_metric`. Every rule becomes a fixed
//! window [`Limit`] named after its descriptor path. Files named in `config_files` are
//! read as they are (no `${VAR}` interpolation), relative to the sluice config file's
//! directory; their errors name their own file, line and column.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_engine::{Algorithm, Limit, LimitSpec, Rate};

use crate::convert::{Fields, boolean, listen, string, whole};
use crate::error::{Fail, Origin};
use crate::tree::{self, Node, Value, shorten};

const ENVOY_FIELDS: &[&str] = &["listen", "domains", "config_files", "response_headers"];
const DOCUMENT_FIELDS: &[&str] = &["domain", "descriptors"];
const DESCRIPTOR_FIELDS: &[&str] = &[
    "key",
    "value",
    "rate_limit",
    "descriptors",
    "shadow_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
];
const RATE_LIMIT_FIELDS: &[&str] = &["unit", "requests_per_unit", "unlimited", "name", "replaces"];
const REPLACES_FIELDS: &[&str] = &["name"];

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
/// first, then value prefixes (`value: foo*`) in file order, then the key alone.
#[derive(Debug, Clone, Default)]
pub struct KeyMatch {
    /// Descriptors with `value`, by the value.
    pub exact: HashMap<String, Descriptor>,
    /// Descriptors whose value ends in `*`: the prefix before it, in file order.
    pub prefixes: Vec<(String, Descriptor)>,
    /// The descriptor with `key` and no `value`: any value.
    pub any: Option<Descriptor>,
}

/// One configured descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// Its rule, when it has a `rate_limit`.
    pub rule: Option<Arc<Rule>>,
    /// The descriptors nested under it.
    pub children: Level,
    /// `share_threshold: true` on a prefix value: every value it matches shares one counter.
    pub share_threshold: bool,
    /// The configured value (`foo*` for a prefix), used as the counter's key part when
    /// `share_threshold` is set.
    pub value: Option<String>,
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
    },
    /// A counted fixed window.
    Limited {
        /// The window length.
        unit: Unit,
        /// Requests allowed per window.
        requests_per_unit: u32,
        /// The sluice limit that counts it.
        limit: Arc<Limit>,
    },
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

/// The `envoy:` section. `source` is the main config file's name, which relative
/// `config_files` are resolved against.
pub(crate) fn envoy(node: &Node, path: &str, source: &str) -> Result<Option<EnvoyConfig>, Fail> {
    let Some(fields) = Fields::of(node, path, ENVOY_FIELDS)? else {
        return Ok(None);
    };
    let mut builder = Builder::default();
    let mut config = EnvoyConfig {
        listen: EnvoyConfig::DEFAULT_LISTEN,
        response_headers: false,
        config_files: Vec::new(),
        domains: Arc::default(),
    };
    if let Some((node, path)) = fields.get("listen") {
        config.listen = listen(node, &path)?;
    }
    if let Some((node, path)) = fields.get("response_headers") {
        config.response_headers = boolean(node, &path)?;
    }
    if let Some((node, path)) = fields.get("domains") {
        let Value::Seq(items) = &node.value else {
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "expected a list of envoyproxy/ratelimit documents, e.g. `- domain: edge` with `descriptors: [...]`, found {}",
                    node.describe()
                ),
            ));
        };
        for (i, item) in items.iter().enumerate() {
            builder.document(item, &format!("{path}[{i}]"), None)?;
        }
    }
    if let Some((node, path)) = fields.get("config_files") {
        let items: Vec<(&Node, String)> = match &node.value {
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| (item, format!("{path}[{i}]")))
                .collect(),
            _ => vec![(node, path.clone())],
        };
        let base = Path::new(source).parent().unwrap_or(Path::new(""));
        for (item, path) in items {
            let name = string(item, &path)?;
            if name.trim().is_empty() {
                return Err(Fail::new(
                    &item.origin,
                    &path,
                    "the file name is empty: give the path of an envoyproxy/ratelimit config file",
                ));
            }
            let file = base.join(name.trim());
            builder.file(&file, item, &path)?;
            config.config_files.push(file);
        }
    }
    config.domains = Arc::new(builder.finish());
    Ok(Some(config))
}

/// Builds the domains, remembering where each was defined and which limit names are taken.
#[derive(Default)]
struct Builder {
    domains: Domains,
    /// Where each domain was first defined: file (None: the main one) and line.
    defined_at: HashMap<String, (Option<String>, usize)>,
    names: HashSet<String>,
}

impl Builder {
    /// Reads one config file and adds its document.
    fn file(&mut self, file: &Path, item: &Node, path: &str) -> Result<(), Fail> {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|error| {
            Fail::new(
                &item.origin,
                path,
                format!(
                    "cannot read the envoyproxy/ratelimit config file {shown}: {error} (relative names are taken from the sluice config file's directory)"
                ),
            )
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        // Loaded as it is, as envoyproxy/ratelimit would: no ${VAR} interpolation.
        let root = tree::parse(text, None).map_err(|fail| fail.in_file(&shown))?;
        match root {
            Some(root) if !root.is_null() => self
                .document(&root, "", Some(&shown))
                .map_err(|fail| fail.in_file(&shown)),
            _ => Err(Fail::new(
                &item.origin,
                path,
                format!("{shown} is empty: it needs `domain:` and `descriptors:`"),
            )),
        }
    }

    /// One envoyproxy/ratelimit document: `domain` and `descriptors`.
    fn document(&mut self, node: &Node, path: &str, file: Option<&str>) -> Result<(), Fail> {
        let Some(fields) = Fields::of(node, path, DOCUMENT_FIELDS).map_err(ratelimit_hint)? else {
            return Err(Fail::new(
                &node.origin,
                path,
                "an empty document: give it `domain:` and `descriptors:`",
            ));
        };
        let Some((domain_node, domain_path)) = fields.get("domain") else {
            return Err(Fail::new(
                &node.origin,
                path,
                "missing `domain`: every envoyproxy/ratelimit document names its domain, e.g. `domain: edge`",
            ));
        };
        let domain = string(domain_node, &domain_path)?.to_string();
        if domain.is_empty() {
            return Err(Fail::new(
                &domain_node.origin,
                &domain_path,
                "the domain is empty: name it as Envoy's rate limit filter does (its `domain:`)",
            ));
        }
        let line = match &domain_node.origin {
            Origin::File { line, .. } => *line,
            Origin::Env { .. } => 0,
        };
        if let Some((first_file, first_line)) = self.defined_at.get(&domain) {
            let place = match first_file {
                Some(first) => format!("{first}:{first_line}"),
                None => format!("line {first_line} of the sluice config"),
            };
            return Err(Fail::new(
                &domain_node.origin,
                &domain_path,
                format!(
                    "domain `{}` is already defined ({place}): merge the two documents' descriptors into one",
                    shorten(&domain)
                ),
            ));
        }
        self.defined_at
            .insert(domain.clone(), (file.map(str::to_string), line));
        let level = match fields.get("descriptors") {
            Some((node, path)) => self.level(node, &path, &domain)?,
            None => Level::default(),
        };
        self.domains.by_name.insert(domain, level);
        Ok(())
    }

    /// A `descriptors:` list. `parent` is the ratelimit-style path of the level's owner.
    fn level(&mut self, node: &Node, path: &str, parent: &str) -> Result<Level, Fail> {
        let Value::Seq(items) = &node.value else {
            return Err(Fail::new(
                &node.origin,
                path,
                format!(
                    "expected a list of descriptors, e.g. `- key: remote_address`, found {}",
                    node.describe()
                ),
            ));
        };
        let mut level = Level::default();
        // Where each composite key (key, value) was first written, to report duplicates.
        let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let (key, value, descriptor) = self.descriptor(item, &path, parent)?;
            let line = match &item.origin {
                Origin::File { line, .. } => *line,
                Origin::Env { .. } => 0,
            };
            if let Some(first) = seen.insert((key.clone(), value.clone()), line) {
                let what = match &value {
                    Some(value) => {
                        format!("key `{}` with value `{}`", shorten(&key), shorten(value))
                    }
                    None => format!("key `{}` without a value", shorten(&key)),
                };
                return Err(Fail::new(
                    &item.origin,
                    &path,
                    format!(
                        "a second descriptor with {what} at this level (the first is on line {first}): keep one, or merge their nested descriptors"
                    ),
                ));
            }
            let entry = level.by_key.entry(key).or_default();
            match value {
                None => entry.any = Some(descriptor),
                Some(value) => match value.strip_suffix('*') {
                    Some(prefix) => entry.prefixes.push((prefix.to_string(), descriptor)),
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
        node: &Node,
        path: &str,
        parent: &str,
    ) -> Result<(String, Option<String>, Descriptor), Fail> {
        let Some(fields) = Fields::of(node, path, DESCRIPTOR_FIELDS).map_err(ratelimit_hint)?
        else {
            return Err(Fail::new(
                &node.origin,
                path,
                "an empty descriptor: give it at least `key:`",
            ));
        };
        let Some((key_node, key_path)) = fields.get("key") else {
            return Err(Fail::new(
                &node.origin,
                path,
                "missing `key`: every descriptor has one, e.g. `key: remote_address`",
            ));
        };
        let key = string(key_node, &key_path)?.to_string();
        if key.is_empty() {
            return Err(Fail::new(
                &key_node.origin,
                &key_path,
                "the key is empty: use the descriptor key Envoy sends, e.g. remote_address",
            ));
        }
        let value = match fields.get("value") {
            Some((node, path)) => {
                let value = string(node, &path)?;
                // An empty value is no value, as envoyproxy/ratelimit reads it.
                (!value.is_empty()).then(|| value.to_string())
            }
            None => None,
        };
        let own_path = match &value {
            Some(value) => format!("{parent}.{key}_{value}"),
            None => format!("{parent}.{key}"),
        };
        let flag = |name: &str| -> Result<Option<(bool, &Node, String)>, Fail> {
            match fields.get(name) {
                Some((node, path)) => Ok(Some((boolean(node, &path)?, node, path))),
                None => Ok(None),
            }
        };
        let shadow = flag("shadow_mode")?.is_some_and(|(on, _, _)| on);
        // Metric naming switches of envoyproxy/ratelimit: sluice counts per rule, so
        // they are accepted (checked to be booleans) and change nothing.
        flag("detailed_metric")?;
        flag("value_to_metric")?;
        let share_threshold = match flag("share_threshold")? {
            Some((true, node, path)) => {
                if !value.as_deref().is_some_and(|value| value.ends_with('*')) {
                    return Err(Fail::new(
                        &node.origin,
                        &path,
                        "share_threshold only applies to a prefix value (one ending in `*`, e.g. `value: files*`): add the `*` or remove share_threshold",
                    ));
                }
                true
            }
            _ => false,
        };
        let rule = match fields.get("rate_limit") {
            Some((node, path)) => Some(Arc::new(self.rule(node, &path, &own_path, shadow)?)),
            None => None,
        };
        let children = match fields.get("descriptors") {
            Some((node, path)) => self.level(node, &path, &own_path)?,
            None => Level::default(),
        };
        let descriptor = Descriptor {
            rule,
            children,
            share_threshold,
            value: value.clone(),
        };
        Ok((key, value, descriptor))
    }

    /// A `rate_limit:` block.
    fn rule(
        &mut self,
        node: &Node,
        path: &str,
        own_path: &str,
        shadow: bool,
    ) -> Result<Rule, Fail> {
        let Some(fields) = Fields::of(node, path, RATE_LIMIT_FIELDS).map_err(ratelimit_hint)?
        else {
            return Err(Fail::new(
                &node.origin,
                path,
                "rate_limit is empty: give `unit` and `requests_per_unit`, e.g. `{unit: minute, requests_per_unit: 60}`, or `unlimited: true`",
            ));
        };
        let unlimited = match fields.get("unlimited") {
            Some((node, path)) => boolean(node, &path)?,
            None => false,
        };
        let name = match fields.get("name") {
            Some((node, path)) => {
                let name = string(node, &path)?;
                (!name.is_empty()).then(|| name.to_string())
            }
            None => None,
        };
        let mut replaces = Vec::new();
        if let Some((list, list_path)) = fields.get("replaces") {
            let Value::Seq(items) = &list.value else {
                return Err(Fail::new(
                    &list.origin,
                    &list_path,
                    format!(
                        "expected a list such as `- name: specific_limit`, found {}",
                        list.describe()
                    ),
                ));
            };
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{list_path}[{i}]");
                let replaced = Fields::of(item, &item_path, REPLACES_FIELDS)
                    .map_err(ratelimit_hint)?
                    .and_then(|fields| fields.get("name"))
                    .map(|(node, path)| string(node, &path).map(str::to_string))
                    .transpose()?
                    .filter(|name| !name.is_empty());
                let Some(replaced) = replaced else {
                    return Err(Fail::new(
                        &item.origin,
                        &item_path,
                        "a replaces entry needs the name of the rule it replaces: `- name: specific_limit`",
                    ));
                };
                if name.as_deref() == Some(replaced.as_str()) {
                    return Err(Fail::new(
                        &item.origin,
                        &item_path,
                        "a rule cannot replace itself: name another rule's `rate_limit.name`",
                    ));
                }
                replaces.push(replaced);
            }
        }
        let unit = fields.get("unit");
        let requests = fields.get("requests_per_unit");
        let kind = if unlimited {
            if let Some((node, path)) = unit.as_ref().or(requests.as_ref()) {
                return Err(Fail::new(
                    &node.origin,
                    path,
                    "an unlimited rule has no unit or requests_per_unit: remove them, or remove `unlimited: true`",
                ));
            }
            RuleKind::Unlimited
        } else {
            let units = Unit::ALL.map(|unit| unit.as_str()).join(", ");
            let Some((unit_node, unit_path)) = unit else {
                return Err(Fail::new(
                    &node.origin,
                    path,
                    format!("missing `unit`: one of {units}"),
                ));
            };
            let text = string(unit_node, &unit_path)?;
            let Some(unit) = Unit::parse(text) else {
                return Err(Fail::new(
                    &unit_node.origin,
                    &unit_path,
                    format!("unknown unit `{}`: use one of {units}", shorten(text)),
                ));
            };
            let Some((requests_node, requests_path)) = requests else {
                return Err(Fail::new(
                    &node.origin,
                    path,
                    "missing `requests_per_unit`: how many requests each unit allows (0 blocks every request)",
                ));
            };
            let requests = whole(requests_node, &requests_path, 0, MAX_REQUESTS_PER_UNIT)?;
            match Rate::new(requests, unit.seconds()) {
                Ok(rate) => {
                    let limit =
                        self.limit(own_path, rate, shadow, requests_node, &requests_path)?;
                    RuleKind::Limited {
                        unit,
                        requests_per_unit: u32::try_from(requests).unwrap_or(u32::MAX),
                        limit,
                    }
                }
                // Only 0 gets here: the range was checked above.
                Err(_) => RuleKind::BlockAll { unit },
            }
        };
        Ok(Rule {
            path: own_path.to_string(),
            kind,
            name,
            replaces,
            shadow,
        })
    }

    /// The sluice limit counting one rule, named after its descriptor path so that its
    /// counters survive reloads while the path, unit and shadow switch stay the same.
    fn limit(
        &mut self,
        own_path: &str,
        rate: Rate,
        shadow: bool,
        node: &Node,
        path: &str,
    ) -> Result<Arc<Limit>, Fail> {
        let name = self.limit_name(own_path);
        let mut spec = LimitSpec::new(vec![rate]);
        spec.algorithm = Algorithm::FixedWindow;
        spec.shadow = shadow;
        let limit = Limit::new(&name, spec)
            .map_err(|error| Fail::new(&node.origin, path, error.to_string()))?;
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

    fn finish(self) -> Domains {
        self.domains
    }
}

/// 64-bit FNV-1a: a stable hash (unlike std's), so limit names do not change between builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Says, on an unknown-field error in a ratelimit document, that sluice reads the
/// envoyproxy/ratelimit format without that field.
fn ratelimit_hint(fail: Fail) -> Fail {
    if fail.message.starts_with("unknown field") {
        Fail {
            message: format!(
                "{} (sluice reads envoyproxy/ratelimit's descriptor format; this key is not part of it here: remove it or move it to the level it belongs to)",
                fail.message
            ),
            ..fail
        }
    } else {
        fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<EnvoyConfig>, String> {
        let root = tree::parse(text, None).map_err(|f| f.message)?.unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("not a map")
        };
        let entry = entries.iter().find(|e| e.key == "envoy").unwrap();
        envoy(&entry.value, "envoy", "sluice.yaml").map_err(|f| {
            let place = match f.origin {
                Origin::File { line, column } => format!("{line}:{column}"),
                Origin::Env { var } => var,
            };
            format!("{place}: {}: {}", f.field.unwrap_or_default(), f.message)
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
            RuleKind::BlockAll { unit: Unit::Second }
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
