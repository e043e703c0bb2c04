//! A small YAML document tree whose every node remembers where it came from.
//!
//! Built from saphyr-parser's events. `${VAR}` interpolation happens here, on each
//! scalar value as it is read (never on keys, never by substituting text in the
//! file), and plain scalars are then typed with the YAML 1.2 core schema.

use std::borrow::Cow;
use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};

use crate::error::{Fail, Origin};

/// Deepest nesting of lists and mappings accepted.
const MAX_DEPTH: usize = 64;

/// Most values a document may hold, counting every expansion of an alias.
const MAX_NODES: usize = 1_000_000;

/// A value and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub value: Value,
    pub origin: Origin,
}

/// A scalar, a list or a mapping.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// A scalar's text (after interpolation) and its resolved type.
#[derive(Debug, Clone)]
pub(crate) struct Scalar {
    pub text: String,
    pub kind: Kind,
}

/// The core-schema type of a scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    Int,
    Float,
    Str,
}

/// One `key: value` of a mapping.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_origin: Origin,
    pub value: Node,
}

impl Node {
    /// An empty mapping.
    pub(crate) fn empty_map(origin: Origin) -> Node {
        Node {
            value: Value::Map(Vec::new()),
            origin,
        }
    }

    /// Whether this is a null scalar (`~`, `null` or nothing at all).
    pub(crate) fn is_null(&self) -> bool {
        matches!(
            &self.value,
            Value::Scalar(Scalar {
                kind: Kind::Null,
                ..
            })
        )
    }

    /// Sets the origin of this node and everything under it.
    pub(crate) fn restamp(&mut self, origin: &Origin) {
        self.origin = origin.clone();
        match &mut self.value {
            Value::Scalar(_) => {}
            Value::Seq(items) => items.iter_mut().for_each(|item| item.restamp(origin)),
            Value::Map(entries) => entries.iter_mut().for_each(|entry| {
                entry.key_origin = origin.clone();
                entry.value.restamp(origin);
            }),
        }
    }

    /// How many nodes this is (itself and everything under it).
    fn size(&self) -> usize {
        1 + match &self.value {
            Value::Scalar(_) => 0,
            Value::Seq(items) => items.iter().map(Node::size).sum(),
            Value::Map(entries) => entries.iter().map(|entry| 1 + entry.value.size()).sum(),
        }
    }

    /// A short description for error messages: "a list", "the number `5`", ...
    pub(crate) fn describe(&self) -> String {
        match &self.value {
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
            Value::Scalar(scalar) => {
                let text = shorten(&scalar.text);
                match scalar.kind {
                    Kind::Null => "an empty value (null)".to_string(),
                    Kind::Bool(_) => format!("`{text}`"),
                    Kind::Int | Kind::Float => format!("the number `{text}`"),
                    Kind::Str => format!("the string `{text}`"),
                }
            }
        }
    }
}

/// Cuts long text for error messages.
pub(crate) fn shorten(text: &str) -> Cow<'_, str> {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &text[..cut])),
        None => Cow::Borrowed(text),
    }
}

/// Resolves `${VAR}` references.
pub(crate) type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Parses one YAML document into a tree. `env` resolves `${VAR}` in scalar values;
/// `None` turns interpolation off. An empty stream gives `None`.
pub(crate) fn parse(text: &str, env: Option<EnvLookup<'_>>) -> Result<Option<Node>, Fail> {
    let mut builder = Builder {
        stack: Vec::new(),
        root: None,
        documents: 0,
        anchors: HashMap::new(),
        nodes: 0,
        env,
    };
    for event in Parser::new_from_str(text) {
        match event {
            Ok((event, span)) => builder.event(event, span)?,
            Err(error) => {
                let origin = Origin::File {
                    line: error.marker().line(),
                    column: error.marker().col() + 1,
                };
                return Err(Fail::new(
                    &origin,
                    &builder.path(),
                    format!("invalid YAML: {}", error.info()),
                ));
            }
        }
    }
    Ok(builder.root)
}

/// A list or mapping still being read.
struct Frame {
    origin: Origin,
    anchor: usize,
    kind: FrameKind,
}

enum FrameKind {
    Seq(Vec<Node>),
    Map {
        entries: Vec<Entry>,
        /// The key whose value is being read.
        key: Option<(String, Origin)>,
        /// Keys seen so far, with the line each was first seen on.
        seen: HashMap<String, Origin>,
    },
}

struct Builder<'e> {
    stack: Vec<Frame>,
    root: Option<Node>,
    documents: usize,
    /// Completed anchored nodes and their sizes, by anchor id.
    anchors: HashMap<usize, (Node, usize)>,
    nodes: usize,
    env: Option<EnvLookup<'e>>,
}

fn file_origin(span: &Span) -> Origin {
    Origin::File {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

impl Builder<'_> {
    /// The dotted path of the value being read.
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match &frame.kind {
                FrameKind::Seq(items) => path.push_str(&format!("[{}]", items.len())),
                FrameKind::Map {
                    key: Some((key, _)),
                    ..
                } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                FrameKind::Map { key: None, .. } => {}
            }
        }
        path
    }

    fn count(&mut self, nodes: usize, origin: &Origin) -> Result<(), Fail> {
        self.nodes = self.nodes.saturating_add(nodes);
        if self.nodes > MAX_NODES {
            return Err(Fail::new(
                origin,
                &self.path(),
                format!(
                    "the document holds more than {MAX_NODES} values (aliases expanded); this is not a config file sluice can use"
                ),
            ));
        }
        Ok(())
    }

    fn at_key(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame {
                kind: FrameKind::Map { key: None, .. },
                ..
            })
        )
    }

    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), Fail> {
        let origin = file_origin(&span);
        match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => Ok(()),
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(Fail::new(
                        &origin,
                        "",
                        "a config file holds one YAML document: remove the second `---` and what follows it, or merge the documents",
                    ));
                }
                Ok(())
            }
            Event::Alias(id) => {
                let Some((node, size)) = self.anchors.get(&id) else {
                    return Err(Fail::new(
                        &origin,
                        &self.path(),
                        "this alias refers to an anchor that is not complete here (an alias cannot refer to a node that contains it)",
                    ));
                };
                let (mut node, size) = (node.clone(), *size);
                self.count(size, &origin)?;
                node.origin = origin;
                self.finish(node, 0)
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1, &origin)?;
                let scalar = if self.at_key() {
                    Scalar {
                        text: text.into_owned(),
                        kind: Kind::Str,
                    }
                } else {
                    self.value_scalar(text, style, tag.as_deref(), &origin)?
                };
                self.finish(
                    Node {
                        value: Value::Scalar(scalar),
                        origin,
                    },
                    anchor,
                )
            }
            Event::SequenceStart(anchor, tag) => {
                self.check_collection_tag(tag.as_deref(), "seq", &origin)?;
                self.open(origin, anchor, FrameKind::Seq(Vec::new()))
            }
            Event::MappingStart(anchor, tag) => {
                self.check_collection_tag(tag.as_deref(), "map", &origin)?;
                let kind = FrameKind::Map {
                    entries: Vec::new(),
                    key: None,
                    seen: HashMap::new(),
                };
                self.open(origin, anchor, kind)
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = self.stack.pop() else {
                    return Ok(());
                };
                let value = match frame.kind {
                    FrameKind::Seq(items) => Value::Seq(items),
                    FrameKind::Map { entries, .. } => Value::Map(entries),
                };
                self.finish(
                    Node {
                        value,
                        origin: frame.origin,
                    },
                    frame.anchor,
                )
            }
        }
    }

    fn open(&mut self, origin: Origin, anchor: usize, kind: FrameKind) -> Result<(), Fail> {
        self.count(1, &origin)?;
        if self.stack.len() >= MAX_DEPTH {
            return Err(Fail::new(
                &origin,
                &self.path(),
                format!("lists and mappings are nested more than {MAX_DEPTH} deep"),
            ));
        }
        if self.at_key() {
            return Err(Fail::new(
                &origin,
                &self.path(),
                "a mapping key must be a plain name, not a list or a mapping",
            ));
        }
        self.stack.push(Frame {
            origin,
            anchor,
            kind,
        });
        Ok(())
    }

    fn check_collection_tag(
        &self,
        tag: Option<&Tag>,
        want: &str,
        origin: &Origin,
    ) -> Result<(), Fail> {
        match tag {
            None => Ok(()),
            Some(tag) if tag.is_yaml_core_schema() && tag.suffix == want => Ok(()),
            Some(tag) => Err(Fail::new(
                origin,
                &self.path(),
                format!("unsupported tag `{tag}` here: remove it"),
            )),
        }
    }

    /// Interpolates and types a scalar that is a value (not a key).
    fn value_scalar(
        &self,
        text: Cow<'_, str>,
        style: ScalarStyle,
        tag: Option<&Tag>,
        origin: &Origin,
    ) -> Result<Scalar, Fail> {
        let (text, interpolated) = match self.env {
            Some(env) if text.contains('$') => {
                let text = interpolate(&text, env)
                    .map_err(|message| Fail::new(origin, &self.path(), message))?;
                (text, true)
            }
            _ => (text.into_owned(), false),
        };
        let kind = match tag {
            Some(tag) => tagged_kind(tag, &text)
                .map_err(|message| Fail::new(origin, &self.path(), message))?,
            // An interpolated value that came out empty is an empty string, not null, so
            // `token: ${TOKEN}` with TOKEN set to "" is reported rather than silently dropped.
            None if style == ScalarStyle::Plain && interpolated && text.is_empty() => Kind::Str,
            None if style == ScalarStyle::Plain => resolve_plain(&text),
            None => Kind::Str,
        };
        Ok(Scalar { text, kind })
    }

    /// Places a completed node in its parent (or as the root).
    fn finish(&mut self, node: Node, anchor: usize) -> Result<(), Fail> {
        if anchor != 0 {
            let size = node.size();
            self.anchors.insert(anchor, (node.clone(), size));
        }
        let path = self.path();
        let Some(frame) = self.stack.last_mut() else {
            self.root = Some(node);
            return Ok(());
        };
        match &mut frame.kind {
            FrameKind::Seq(items) => items.push(node),
            FrameKind::Map { entries, key, seen } => match key.take() {
                Some((key, key_origin)) => entries.push(Entry {
                    key,
                    key_origin,
                    value: node,
                }),
                None => {
                    let Value::Scalar(scalar) = node.value else {
                        return Err(Fail::new(
                            &node.origin,
                            &path,
                            "a mapping key must be a plain name, not a list or a mapping",
                        ));
                    };
                    let field = crate::error::join(&path, &scalar.text);
                    if let Some(first) = seen.get(&scalar.text) {
                        let first = match first {
                            Origin::File { line, .. } => format!(" (first defined on line {line})"),
                            Origin::Env { .. } => String::new(),
                        };
                        return Err(Fail::new(
                            &node.origin,
                            &field,
                            format!(
                                "duplicate key `{}`{first}: keep one of them",
                                shorten(&scalar.text)
                            ),
                        ));
                    }
                    seen.insert(scalar.text.clone(), node.origin.clone());
                    *key = Some((scalar.text, node.origin));
                }
            },
        }
        Ok(())
    }
}

/// The type a core-schema tag gives `text`.
fn tagged_kind(tag: &Tag, text: &str) -> Result<Kind, String> {
    if tag.handle == "!" && tag.suffix.is_empty() {
        return Ok(Kind::Str);
    }
    if !tag.is_yaml_core_schema() {
        return Err(format!("unsupported tag `{tag}`: remove it"));
    }
    let want = match tag.suffix.as_str() {
        "str" => return Ok(Kind::Str),
        "null" => "null",
        "bool" => "bool",
        "int" => "int",
        "float" => "float",
        _ => return Err(format!("unsupported tag `{tag}` on a scalar: remove it")),
    };
    let kind = resolve_plain(text);
    let ok = matches!(
        (want, kind),
        ("null", Kind::Null)
            | ("bool", Kind::Bool(_))
            | ("int", Kind::Int)
            | ("float", Kind::Float | Kind::Int)
    );
    if ok {
        Ok(if want == "float" { Kind::Float } else { kind })
    } else {
        Err(format!("`{}` is not a valid {tag}", shorten(text)))
    }
}

/// The YAML 1.2 core-schema type of a plain scalar.
pub(crate) fn resolve_plain(text: &str) -> Kind {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => Kind::Null,
        "true" | "True" | "TRUE" => Kind::Bool(true),
        "false" | "False" | "FALSE" => Kind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => Kind::Float,
        _ if parse_int(text).is_some() || is_int_syntax(text) => Kind::Int,
        _ if is_float_syntax(text) => Kind::Float,
        _ => Kind::Str,
    }
}

/// Whether `text` is written as a core-schema integer (whatever its size).
fn is_int_syntax(text: &str) -> bool {
    let digits = |s: &str, radix: u32| !s.is_empty() && s.chars().all(|c| c.is_digit(radix));
    if let Some(octal) = text.strip_prefix("0o") {
        return digits(octal, 8);
    }
    if let Some(hex) = text.strip_prefix("0x") {
        return digits(hex, 16);
    }
    digits(text.strip_prefix(['-', '+']).unwrap_or(text), 10)
}

/// A core-schema integer's value, if it is one that fits in an `i128`.
pub(crate) fn parse_int(text: &str) -> Option<i128> {
    if let Some(octal) = text.strip_prefix("0o") {
        return (!octal.is_empty() && !octal.starts_with(['+', '-']))
            .then(|| i128::from_str_radix(octal, 8).ok())
            .flatten();
    }
    if let Some(hex) = text.strip_prefix("0x") {
        return (!hex.is_empty() && !hex.starts_with(['+', '-']))
            .then(|| i128::from_str_radix(hex, 16).ok())
            .flatten();
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`
fn is_float_syntax(text: &str) -> bool {
    let s = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(at) => (&s[..at], Some(&s[at + 1..])),
        None => (s, None),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            all_digits(whole) && all_digits(fraction) && !(whole.is_empty() && fraction.is_empty())
        }
        None => !mantissa.is_empty() && all_digits(mantissa),
    };
    let exponent_ok = match exponent {
        None => true,
        Some(e) => {
            let e = e.strip_prefix(['-', '+']).unwrap_or(e);
            !e.is_empty() && all_digits(e)
        }
    };
    mantissa_ok && exponent_ok
}

/// Replaces `${VAR}` and `${VAR:-default}` with the variable's value and `$$` with `$`.
/// The default is used when the variable is unset or empty. Any other `$` stays as it is.
pub(crate) fn interpolate(text: &str, env: EnvLookup<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner_and_rest) = after.strip_prefix('{') {
            let Some(close) = inner_and_rest.find('}') else {
                return Err(format!(
                    "`${{` without a closing `}}` in `{}`: write ${{NAME}} or ${{NAME:-default}}, or $$ for a literal $",
                    shorten(text)
                ));
            };
            let inner = &inner_and_rest[..close];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            let name_ok = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !name_ok {
                return Err(format!(
                    "`${{{}}}` is not a variable reference: write ${{NAME}} or ${{NAME:-default}} (NAME of letters, digits and _), or $$ for a literal $",
                    shorten(inner)
                ));
            }
            match (env(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set: set it, or give a default with ${{{name}:-default}}"
                    ));
                }
            }
            rest = &inner_and_rest[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_schema_resolution() {
        for (text, kind) in [
            ("", Kind::Null),
            ("~", Kind::Null),
            ("null", Kind::Null),
            ("true", Kind::Bool(true)),
            ("False", Kind::Bool(false)),
            ("yes", Kind::Str),
            ("12", Kind::Int),
            ("-12", Kind::Int),
            ("0x1F", Kind::Int),
            ("0o17", Kind::Int),
            ("99999999999999999999999999999999999999999999", Kind::Int),
            ("1.5", Kind::Float),
            ("1e3", Kind::Float),
            (".5", Kind::Float),
            (".inf", Kind::Float),
            (".", Kind::Str),
            ("1_000", Kind::Str),
            ("5/minute", Kind::Str),
            ("127.0.0.1:8080", Kind::Str),
        ] {
            assert_eq!(resolve_plain(text), kind, "{text:?}");
        }
        assert_eq!(parse_int("0x10"), Some(16));
        assert_eq!(parse_int("0o-1"), None);
        assert_eq!(parse_int("+7"), Some(7));
    }

    #[test]
    fn interpolation_forms() {
        let env = |name: &str| match name {
            "A" => Some("x".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let run = |text: &str| interpolate(text, &env);
        assert_eq!(run("${A}").unwrap(), "x");
        assert_eq!(run("a${A}b${A}").unwrap(), "axbx");
        assert_eq!(run("${B:-def}").unwrap(), "def");
        assert_eq!(run("${EMPTY:-def}").unwrap(), "def");
        assert_eq!(run("${EMPTY}").unwrap(), "");
        assert_eq!(run("${B:-}").unwrap(), "");
        assert_eq!(run("$$5 and $5 and $").unwrap(), "$5 and $5 and $");
        assert_eq!(run("$${A}").unwrap(), "${A}");
        assert!(run("${B}").unwrap_err().contains("`B` is not set"));
        assert!(run("${A").unwrap_err().contains("closing"));
        assert!(run("${}").unwrap_err().contains("not a variable reference"));
        assert!(
            run("${1A}")
                .unwrap_err()
                .contains("not a variable reference")
        );
    }
}
