//! A serde `Deserializer` over the located document tree, so that the config sections are
//! plain `#[derive(Deserialize)]` types while every error still names the file, line,
//! column and field of the value it is about.
//!
//! The deserializer tracks the field path (`storage.cluster[1]`) as it descends. An error
//! made below a node (by serde's derived code, a leaf's visitor, or this module) is
//! placed at the innermost node it passes through on the way out, the way `toml`'s
//! `Spanned` works. So a check belongs in a visitor: an error made after the
//! deserializer has returned (as `#[serde(try_from)]` would) is placed at the parent.
//!
//! Besides the usual serde data model, three newtype-struct names are recognised:
//! [`Located`] receives its node's origin and path, [`OneOrMany`] takes a single value as
//! a list of one, and [`ByShape`] lets a type read a mapping as a struct and a scalar by
//! its own visitor.
//!
//! A null value in a struct's mapping counts as absent (`token: ~` is no token); unknown
//! fields are refused before any value is read, naming every known one. Where a struct
//! is required, a missing field or a null in its place gets the hint that section has
//! ([`MISSING_HINTS`], [`EMPTY_HINTS`]).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Expected, IntoDeserializer, MapAccess,
    SeqAccess, Unexpected, VariantAccess, Visitor,
};
use serde::{Deserialize, forward_to_deserialize_any};

use crate::error::{Fail, Origin, join};
use crate::tree::{Entry, Kind, Node, Scalar, Value, parse_int, shorten};

const LOCATED: &str = "$__sluice_located";
const ONE_OR_MANY: &str = "$__sluice_one_or_many";
const BY_SHAPE: &str = "$__sluice_by_shape";

/// In an "expected" text, what follows this separator comes after the "found ..." part:
/// `expected a whole number, found the string `x`: <hint>`.
pub(crate) const HINT: char = '\0';

/// What a missing required field's message adds, by (struct, field).
const MISSING_HINTS: &[(&str, &str, &str)] = &[
    (
        "RouteSection",
        "match",
        ": write `match: {path: /api/*}`, `match: {}` for every request, or `match: default` for requests no other route matches",
    ),
    (
        "RouteSection",
        "limits",
        ": a route applies at least one limit, e.g. `- match: {path: /api/*}` with `limits: [{limit: api, key: \"{client_ip}\"}]`",
    ),
    (
        "RouteLimitSection",
        "limit",
        ": name one of the configured limits, e.g. `{limit: api, key: \"{client_ip}\"}`",
    ),
    (
        "RouteLimitSection",
        "key",
        ": give a key template or a list of them to try in order, e.g. `{limit: api, key: \"{client_ip}\"}`",
    ),
    (
        "ProxySection",
        "upstream",
        ": the app to forward allowed requests to, e.g. `upstream: http://127.0.0.1:9000`",
    ),
];

/// What an empty (null) value says instead of "expected a mapping of fields", by struct:
/// list items that need settings (`routes: [~]`, `- ` with nothing after it).
const EMPTY_HINTS: &[(&str, &str)] = &[
    (
        "RouteSection",
        "route has no settings: give it `match` and `limits`, e.g. `- match: {path: /api/*}` with `limits: [{limit: api, key: \"{client_ip}\"}]`",
    ),
    (
        "RouteLimitSection",
        "empty entry: name a limit and a key, e.g. `{limit: api, key: \"{client_ip}\"}`",
    ),
    (
        "RatelimitDocument",
        "an empty document: give it `domain:` and `descriptors:`",
    ),
    (
        "RatelimitDescriptor",
        "an empty descriptor: give it at least `key:`",
    ),
];

/// Added to an unknown-field error in an envoyproxy/ratelimit document (structs named
/// `Ratelimit*`).
const RATELIMIT_HINT: &str = " (sluice reads envoyproxy/ratelimit's descriptor format; this key is not part of it here: remove it or move it to the level it belongs to)";

/// Deserializes `T` from `node`, whose field path is `path`.
pub(crate) fn from_node<T: de::DeserializeOwned>(node: &Node, path: &str) -> Result<T, Fail> {
    let de = NodeDe {
        node,
        path: path.to_string(),
    };
    T::deserialize(de).map_err(|error| error.place(&node.origin, path, || node.describe()).fail())
}

/// An error on its way out of the tree: placed once it has passed a node.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeError {
    /// Placed at its node.
    #[error("{}", .0.message)]
    Placed(Fail),
    /// A message for the innermost node.
    #[error("{0}")]
    Custom(String),
    /// `expected <this>, found <the node>` (see [`HINT`]).
    #[error("expected {0}")]
    Expected(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
}

impl DeError {
    /// The error placed at `origin` and `path`, unless it already is; `found` describes the node.
    fn place(self, origin: &Origin, path: &str, found: impl FnOnce() -> String) -> DeError {
        let message = match self {
            DeError::Placed(_) => return self,
            DeError::Custom(message) => message,
            DeError::Missing(field) => format!("missing field `{field}`"),
            DeError::Expected(what) => {
                let (what, hint) = what.split_once(HINT).unwrap_or((&what, ""));
                format!("expected {what}, found {}{hint}", found())
            }
        };
        DeError::Placed(Fail::new(origin, path, message))
    }

    fn fail(self) -> Fail {
        match self {
            DeError::Placed(fail) => fail,
            // `place` always gives `Placed`.
            other => Fail::new(&Origin::File { line: 1, column: 1 }, "", other.to_string()),
        }
    }
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        DeError::Custom(message.to_string())
    }

    fn invalid_type(_: Unexpected<'_>, expected: &dyn Expected) -> Self {
        DeError::Expected(expected.to_string())
    }

    fn invalid_value(_: Unexpected<'_>, expected: &dyn Expected) -> Self {
        DeError::Expected(expected.to_string())
    }

    fn missing_field(field: &'static str) -> Self {
        DeError::Missing(field)
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::Custom(format!(
            "unknown value `{}`, expected one of {}",
            shorten(variant),
            one_of(expected)
        ))
    }
}

/// "`a`, `b`, `c`"
fn one_of(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|name| format!("`{name}`")).collect();
    names.join(", ")
}

/// Where a value was written: its origin and field path.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub origin: Origin,
    pub path: String,
}

impl Place {
    /// A failure at this place.
    pub(crate) fn fail(&self, message: impl Into<String>) -> Fail {
        Fail::new(&self.origin, &self.path, message)
    }

    /// The line, or 0 for a value from an override.
    pub(crate) fn line(&self) -> usize {
        match self.origin {
            Origin::File { line, .. } => line,
            Origin::Env { .. } => 0,
        }
    }

    // Handed to `Located` as one string, the only way through serde's data model.
    fn encode(origin: &Origin, path: &str) -> String {
        match origin {
            Origin::File { line, column } => format!("{line}\0{column}\0{path}"),
            Origin::Env { var } => format!("\0{var}\0{path}"),
        }
    }

    fn decode(text: &str) -> Place {
        let mut parts = text.splitn(3, '\0');
        let (first, second) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let origin = if first.is_empty() {
            Origin::Env {
                var: second.to_string(),
            }
        } else {
            Origin::File {
                line: first.parse().unwrap_or(0),
                column: second.parse().unwrap_or(0),
            }
        };
        let path = parts.next().unwrap_or("").to_string();
        Place { origin, path }
    }
}

/// A value and where it was written, for checks that need it after deserialization.
#[derive(Debug)]
pub(crate) struct Located<T> {
    pub value: T,
    pub at: Place,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Located<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value with its place")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Located<T>, A::Error> {
                let place: String = seq.next_element()?.unwrap_or_default();
                let value = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("a located value without its value"))?;
                Ok(Located {
                    value,
                    at: Place::decode(&place),
                })
            }
        }
        deserializer.deserialize_newtype_struct(LOCATED, V(PhantomData))
    }
}

/// Reads a mapping with `visit_newtype_struct` (hand the deserializer to a derived
/// struct) and anything else as `deserialize_any` would, for values that are either.
pub(crate) fn by_shape<'de, D: Deserializer<'de>, V: Visitor<'de>>(
    deserializer: D,
    visitor: V,
) -> Result<V::Value, D::Error> {
    deserializer.deserialize_newtype_struct(BY_SHAPE, visitor)
}

/// What a list is, for "expected ..." messages.
pub(crate) trait ListKind {
    /// What is expected, e.g. "a list of routes, e.g. ...".
    const EXPECTING: &'static str;
    /// Whether an empty list is refused (with the same message).
    const NON_EMPTY: bool = false;
    /// Whether a single value is taken as a list of one.
    const ONE_OR_MANY: bool = false;
}

/// A list, or a single value as a list of one (`methods: GET`).
pub(crate) type OneOrMany<T> = ListOf<T, AnyList>;

#[derive(Debug)]
pub(crate) struct AnyList;
impl ListKind for AnyList {
    const EXPECTING: &'static str = "a value or a list of them";
    const ONE_OR_MANY: bool = true;
}

/// A list whose "expected ..." message is `M`'s.
#[derive(Debug)]
pub(crate) struct ListOf<T, M>(pub Vec<T>, PhantomData<M>);

impl<'de, T: Deserialize<'de>, M: ListKind> Deserialize<'de> for ListOf<T, M> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T, M>(PhantomData<(T, M)>);
        impl<'de, T: Deserialize<'de>, M: ListKind> Visitor<'de> for V<T, M> {
            type Value = ListOf<T, M>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(M::EXPECTING)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if M::NON_EMPTY && items.is_empty() {
                    return Err(de::Error::invalid_type(Unexpected::Seq, &self));
                }
                Ok(ListOf(items, PhantomData))
            }
        }
        if M::ONE_OR_MANY {
            deserializer.deserialize_newtype_struct(ONE_OR_MANY, V(PhantomData))
        } else {
            deserializer.deserialize_seq(V(PhantomData))
        }
    }
}

/// A whole number in `MIN..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Whole<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Whole<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let visitor = WholeVisitor {
            min: MIN,
            max: MAX,
            hint: "",
        };
        deserializer.deserialize_any(visitor).map(Whole)
    }
}

/// Reads a whole number in `min..=max`; `hint` ends every message about it.
pub(crate) struct WholeVisitor {
    pub min: u64,
    pub max: u64,
    pub hint: &'static str,
}

impl WholeVisitor {
    fn range(&self) -> String {
        if self.max == u64::MAX {
            format!("at least {}", self.min)
        } else {
            format!("from {} to {}", self.min, self.max)
        }
    }
}

impl<'de> Visitor<'de> for WholeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a whole number {}{HINT}{}", self.range(), self.hint)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        self.visit_i128(i128::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        self.visit_i128(i128::from(value))
    }

    fn visit_i128<E: de::Error>(self, value: i128) -> Result<u64, E> {
        u64::try_from(value)
            .ok()
            .filter(|value| (self.min..=self.max).contains(value))
            .ok_or_else(|| {
                E::custom(format!(
                    "must be {}, found {value}{}",
                    self.range(),
                    self.hint
                ))
            })
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
        let error = quoted_number(text, self.hint);
        Err(error.unwrap_or_else(|| E::invalid_type(Unexpected::Str(text), &self)))
    }
}

/// The error for a number written in quotes (`"5"`), which YAML reads as a string.
fn quoted_number<E: de::Error>(text: &str, hint: &str) -> Option<E> {
    parse_int(text.trim()).map(|_| {
        E::custom(format!(
            "expected a number, found the string `{}`: remove the quotes{hint}",
            shorten(text)
        ))
    })
}

/// Reads a whole number in `min..=max`, or one keyword (`cost: usage`,
/// `estimate: request`): `Some(number)`, or `None` for the keyword. `expecting` names
/// both; `hint` ends every message.
pub(crate) struct WholeOrWordVisitor {
    pub min: u64,
    pub max: u64,
    pub word: &'static str,
    pub expecting: &'static str,
    pub hint: &'static str,
}

impl<'de> Visitor<'de> for WholeOrWordVisitor {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{HINT}{}", self.expecting, self.hint)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Option<u64>, E> {
        self.visit_i128(i128::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Option<u64>, E> {
        self.visit_i128(i128::from(value))
    }

    fn visit_i128<E: de::Error>(self, value: i128) -> Result<Option<u64>, E> {
        let whole = WholeVisitor {
            min: self.min,
            max: self.max,
            hint: self.hint,
        };
        whole.visit_i128(value).map(Some)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Option<u64>, E> {
        if text.trim() == self.word {
            return Ok(None);
        }
        let error = quoted_number(text, self.hint);
        Err(error.unwrap_or_else(|| E::invalid_type(Unexpected::Str(text), &self)))
    }
}

/// A value read from a scalar's text (any non-null scalar: `prefix: 123` is "123").
pub(crate) trait FromText: Sized {
    /// What is expected, for "expected ..., found ..." (see [`HINT`]).
    const EXPECTING: &'static str = "a string";
    /// The value, or what is wrong with `text`.
    fn from_text(text: &str) -> Result<Self, String>;
}

/// A [`FromText`] value.
#[derive(Debug)]
pub(crate) struct Parsed<T>(pub T);

impl<'de, T: FromText> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: FromText> Visitor<'de> for V<T> {
            type Value = Parsed<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Parsed<T>, E> {
                T::from_text(text).map(Parsed).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V(PhantomData))
    }
}

/// What the caller asked the deserializer for.
enum Want {
    Any,
    Bool,
    Str,
    Seq,
    Map,
    Option,
    Enum,
    Newtype(&'static str),
    Struct(&'static str, &'static [&'static str]),
}

/// Deserializes from one node.
struct NodeDe<'a> {
    node: &'a Node,
    path: String,
}

impl<'a> NodeDe<'a> {
    fn drive<'de, V: Visitor<'de>>(self, want: Want, visitor: V) -> Result<V::Value, DeError> {
        let (node, path) = (self.node, self.path.clone());
        self.visit(want, visitor)
            .map_err(|error| error.place(&node.origin, &path, || node.describe()))
    }

    fn visit<'de, V: Visitor<'de>>(self, want: Want, visitor: V) -> Result<V::Value, DeError> {
        let expected = |visitor: &V| DeError::Expected((visitor as &dyn Expected).to_string());
        let null = self.node.is_null();
        match (want, &self.node.value) {
            (Want::Newtype(LOCATED), _) => {
                let place = Place::encode(&self.node.origin, &self.path);
                visitor.visit_seq(Then(Some(place), Some(self)))
            }
            (Want::Newtype(ONE_OR_MANY), Value::Seq(items)) => {
                visitor.visit_seq(Items::new(items, &self.path))
            }
            (Want::Newtype(ONE_OR_MANY), _) => visitor.visit_seq(Then(None, Some(self))),
            (Want::Newtype(BY_SHAPE), Value::Map(_)) => visitor.visit_newtype_struct(self),
            (Want::Newtype(BY_SHAPE), _) => self.visit(Want::Any, visitor),
            (Want::Newtype(_), _) => visitor.visit_newtype_struct(self),
            (Want::Option, _) if null => visitor.visit_none(),
            (Want::Option, _) => visitor.visit_some(self),
            (Want::Struct(name, fields), Value::Map(entries)) => {
                self.check_fields(name, fields, entries)?;
                let access = Entries::new(entries, &self.path, true);
                visitor.visit_map(access).map_err(|error| match error {
                    DeError::Missing(field) => {
                        let hint = MISSING_HINTS
                            .iter()
                            .find(|(s, f, _)| *s == name && *f == field)
                            .map_or("", |(_, _, hint)| hint);
                        DeError::Custom(format!("missing field `{field}`{hint}"))
                    }
                    other => other,
                })
            }
            (Want::Struct("File", fields), _) => Err(DeError::Custom(format!(
                "the config must be a mapping of settings ({}), found {}",
                fields.join(", "),
                self.node.describe()
            ))),
            (Want::Struct(name, fields), _) => {
                if let Some((_, message)) = EMPTY_HINTS.iter().find(|(s, _)| null && *s == name) {
                    return Err(DeError::Custom(message.to_string()));
                }
                let example = fields
                    .first()
                    .map_or(String::new(), |first| format!(", e.g. `{first}: ...`"));
                Err(DeError::Expected(format!("a mapping of fields{example}")))
            }
            (Want::Map | Want::Any, Value::Map(entries)) => {
                visitor.visit_map(Entries::new(entries, &self.path, false))
            }
            (Want::Seq | Want::Any, Value::Seq(items)) => {
                visitor.visit_seq(Items::new(items, &self.path))
            }
            (
                Want::Bool | Want::Any,
                Value::Scalar(Scalar {
                    kind: Kind::Bool(value),
                    ..
                }),
            ) => visitor.visit_bool(*value),
            (Want::Bool, _) => Err(DeError::Expected("true or false".to_string())),
            (Want::Str, Value::Scalar(scalar)) if !null => visitor.visit_str(&scalar.text),
            (Want::Enum, Value::Scalar(scalar)) if !null => {
                visitor.visit_enum(scalar.text.as_str().into_deserializer())
            }
            (Want::Enum, Value::Map(entries)) if entries.len() == 1 => {
                visitor.visit_enum(Variant {
                    entry: &entries[0],
                    path: join(&self.path, &entries[0].key),
                })
            }
            (Want::Any, _) if null => visitor.visit_unit(),
            (Want::Any, Value::Scalar(scalar)) => any_scalar(scalar, visitor),
            _ => Err(expected(&visitor)),
        }
    }

    /// Refuses unknown fields before any value is read, naming the known ones.
    fn check_fields(&self, name: &str, fields: &[&str], entries: &[Entry]) -> Result<(), DeError> {
        let Some(entry) = entries.iter().find(|e| !fields.contains(&e.key.as_str())) else {
            return Ok(());
        };
        let hint = if name.starts_with("Ratelimit") {
            RATELIMIT_HINT
        } else {
            ""
        };
        Err(DeError::Placed(Fail::new(
            &entry.key_origin,
            &join(&self.path, &entry.key),
            format!(
                "unknown field `{}`, expected one of {}{hint}",
                shorten(&entry.key),
                one_of(fields)
            ),
        )))
    }
}

/// A non-null scalar by its type.
fn any_scalar<'de, V: Visitor<'de>>(scalar: &Scalar, visitor: V) -> Result<V::Value, DeError> {
    let text = scalar.text.as_str();
    match scalar.kind {
        Kind::Int => match parse_int(text) {
            Some(value) => match (i64::try_from(value), u64::try_from(value)) {
                (Ok(value), _) => visitor.visit_i64(value),
                (_, Ok(value)) => visitor.visit_u64(value),
                _ => visitor.visit_i128(value),
            },
            None => Err(DeError::Custom(format!(
                "the number `{}` is too large",
                shorten(text)
            ))),
        },
        Kind::Float => {
            let value = match text.to_ascii_lowercase().as_str() {
                ".inf" | "+.inf" => f64::INFINITY,
                "-.inf" => f64::NEG_INFINITY,
                other => other.parse().unwrap_or(f64::NAN),
            };
            visitor.visit_f64(value)
        }
        Kind::Bool(value) => visitor.visit_bool(value),
        Kind::Str => visitor.visit_str(text),
        Kind::Null => visitor.visit_unit(),
    }
}

/// `deserialize_<name>` methods that drive a [`Want`].
macro_rules! drive {
    ($($method:ident => $want:expr),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            self.drive($want, visitor)
        }
    )*};
}

impl<'de> Deserializer<'de> for NodeDe<'_> {
    type Error = DeError;

    drive! {
        deserialize_any => Want::Any,
        deserialize_bool => Want::Bool,
        deserialize_str => Want::Str,
        deserialize_string => Want::Str,
        deserialize_seq => Want::Seq,
        deserialize_map => Want::Map,
        deserialize_option => Want::Option
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.drive(Want::Struct(name, fields), visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.drive(Want::Newtype(name), visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.drive(Want::Enum, visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit unit_struct
        tuple tuple_struct identifier
    }
}

/// A mapping key, which is always a string.
struct KeyDe<'a> {
    entry: &'a Entry,
    path: String,
}

impl<'de> Deserializer<'de> for KeyDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let (key, origin) = (&self.entry.key, &self.entry.key_origin);
        visitor.visit_str(key).map_err(|e: DeError| {
            e.place(origin, &self.path, || {
                format!("the string `{}`", shorten(key))
            })
        })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if name == LOCATED {
            let place = Place::encode(&self.entry.key_origin, &self.path);
            return visitor.visit_seq(Then(Some(place), Some(self)));
        }
        self.deserialize_any(visitor)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// A mapping's entries; a struct's skip null values (null is "use the default").
struct Entries<'a> {
    entries: std::slice::Iter<'a, Entry>,
    path: String,
    skip_null: bool,
    value: Option<(&'a Node, String)>,
}

impl<'a> Entries<'a> {
    fn new(entries: &'a [Entry], path: &str, skip_null: bool) -> Self {
        Entries {
            entries: entries.iter(),
            path: path.to_string(),
            skip_null,
            value: None,
        }
    }
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let skip_null = self.skip_null;
        let Some(entry) = self
            .entries
            .find(|entry| !(skip_null && entry.value.is_null()))
        else {
            return Ok(None);
        };
        let path = join(&self.path, &entry.key);
        self.value = Some((&entry.value, path.clone()));
        seed.deserialize(KeyDe { entry, path }).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (node, path) = self
            .value
            .take()
            .ok_or_else(|| DeError::Custom("a value read before its key".to_string()))?;
        seed.deserialize(NodeDe { node, path })
    }
}

/// A list's items, each at `path[i]`.
struct Items<'a> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
    path: String,
}

impl<'a> Items<'a> {
    fn new(items: &'a [Node], path: &str) -> Self {
        Items {
            items: items.iter().enumerate(),
            path: path.to_string(),
        }
    }
}

impl<'de> SeqAccess<'de> for Items<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some((i, node)) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{i}]", self.path);
        seed.deserialize(NodeDe { node, path }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// A sequence of an encoded place (for [`Located`]) and then a value.
struct Then<D>(Option<String>, Option<D>);

impl<'de, D: Deserializer<'de, Error = DeError>> SeqAccess<'de> for Then<D> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        if let Some(place) = self.0.take() {
            return seed.deserialize(place.into_deserializer()).map(Some);
        }
        match self.1.take() {
            Some(de) => seed.deserialize(de).map(Some),
            None => Ok(None),
        }
    }
}

/// An enum written as a single-key mapping: `{variant: value}`.
struct Variant<'a> {
    entry: &'a Entry,
    path: String,
}

impl<'de, 'a> EnumAccess<'de> for Variant<'a> {
    type Error = DeError;
    type Variant = NodeDe<'a>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, NodeDe<'a>), DeError> {
        let key = KeyDe {
            entry: self.entry,
            path: self.path.clone(),
        };
        let value = NodeDe {
            node: &self.entry.value,
            path: self.path,
        };
        Ok((seed.deserialize(key)?, value))
    }
}

impl<'de> VariantAccess<'de> for NodeDe<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        de::IgnoredAny::deserialize(self).map(|_| ())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_struct("", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(text: &str) -> Node {
        crate::tree::parse(text, None).unwrap().unwrap()
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Shape {
        Dot,
        Circle { r: Whole<0, 10> },
    }

    #[test]
    fn enums_from_strings_and_single_key_maps() {
        let shapes: Vec<Shape> = from_node(&node("[dot, {circle: {r: 3}}]"), "s").unwrap();
        assert_eq!(shapes, [Shape::Dot, Shape::Circle { r: Whole(3) }]);
        let error = from_node::<Vec<Shape>>(&node("[dot, {circle: {r: 30}}]"), "s").unwrap_err();
        assert_eq!(error.field.as_deref(), Some("s[1].circle.r"));
        assert_eq!(error.message, "must be from 0 to 10, found 30");
        let error = from_node::<Vec<Shape>>(&node("[square]"), "s").unwrap_err();
        assert_eq!(
            error.message,
            "unknown value `square`, expected one of `dot`, `circle`"
        );
    }

    #[test]
    fn located_values_know_their_place() {
        let found: Vec<Located<String>> = from_node(&node("- a\n- b\n"), "x").unwrap();
        assert_eq!(found[1].value, "b");
        assert_eq!(found[1].at.path, "x[1]");
        assert_eq!(found[1].at.line(), 2);
    }
}
