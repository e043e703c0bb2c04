//! Key templates such as `user:{header.x-user-id}`, and the request facts they read.
//!
//! Placeholders: `{client_ip}`, `{header.NAME}`, `{cookie.NAME}`, `{query.NAME}`,
//! `{session}`, `{method}`, `{path}`. `{{` and `}}` are literal braces. A template
//! renders only when every placeholder resolves to a non-empty value; a route lists
//! templates in order and uses the first that renders.

use std::fmt;
use std::str::FromStr;

use http::header::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use sluice_engine::MAX_KEY_BYTES;

/// What a template can read from one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The method, e.g. `POST`.
    pub method: &'a str,
    /// The normalised path (see [`normalize_path`]).
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The client address's key (grouped, maybe hashed); `None` when the front door
    /// does not know the socket peer, so `{client_ip}` does not resolve.
    pub client_ip: Option<&'a str>,
    /// The session id, when the front door has one.
    pub session: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    ClientIp,
    Header(HeaderName),
    Cookie(String),
    Query(String),
    Session,
    Method,
    Path,
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    text: String,
    parts: Vec<Part>,
}

/// Why a template was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{` without `}`, or a lone `}`.
    #[error(
        "unbalanced brace in key template {0:?}: write placeholders as {{name}} and literal braces as {{{{ and }}}}"
    )]
    Unbalanced(String),
    /// A placeholder that does not exist.
    #[error(
        "unknown placeholder {{{0}}}: use client_ip, header.NAME, cookie.NAME, query.NAME, session, method or path"
    )]
    Unknown(String),
    /// `header.`, `cookie.` or `query.` without a name, or a header name that is not valid.
    #[error("placeholder {{{0}}} needs a valid name after the dot, e.g. {{header.x-user-id}}")]
    BadName(String),
    /// An empty template.
    #[error("key template is empty")]
    Empty,
}

impl FromStr for KeyTemplate {
    type Err = TemplateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(TemplateError::Unbalanced(text.to_string())),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(TemplateError::Unbalanced(text.to_string()));
                            }
                            Some(c) => name.push(c),
                        }
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(placeholder(name.trim())?);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(KeyTemplate {
            text: text.to_string(),
            parts,
        })
    }
}

fn placeholder(name: &str) -> Result<Part, TemplateError> {
    let named = |prefix: &str| name.strip_prefix(prefix).map(str::trim);
    let bad = || TemplateError::BadName(name.to_string());
    if let Some(header) = named("header.") {
        let header =
            HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes()).map_err(|_| bad())?;
        return Ok(Part::Header(header));
    }
    if let Some(cookie) = named("cookie.") {
        return if cookie.is_empty() {
            Err(bad())
        } else {
            Ok(Part::Cookie(cookie.to_string()))
        };
    }
    if let Some(query) = named("query.") {
        return if query.is_empty() {
            Err(bad())
        } else {
            Ok(Part::Query(query.to_string()))
        };
    }
    match name {
        "client_ip" => Ok(Part::ClientIp),
        "session" => Ok(Part::Session),
        "method" => Ok(Part::Method),
        "path" => Ok(Part::Path),
        other => Err(TemplateError::Unknown(other.to_string())),
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl KeyTemplate {
    /// Whether the template reads the session (so a front door knows to issue one).
    pub fn uses_session(&self) -> bool {
        self.parts.contains(&Part::Session)
    }

    /// The key for this request, or `None` when a placeholder does not resolve. Keys
    /// longer than the engine accepts are replaced by `sha256:` and their hash, so a
    /// long identifier still gets a bucket of its own.
    pub fn render(&self, facts: &RequestFacts<'_>) -> Option<String> {
        let mut key = String::new();
        for part in &self.parts {
            let value: std::borrow::Cow<'_, str> = match part {
                Part::Literal(text) => text.as_str().into(),
                Part::ClientIp => facts.client_ip?.into(),
                Part::Method => facts.method.into(),
                Part::Path => facts.path.into(),
                Part::Session => facts.session?.into(),
                Part::Header(name) => header_value(facts.headers, name)?.into(),
                Part::Cookie(name) => cookie_value(facts.headers, name)?.into(),
                Part::Query(name) => query_value(facts.query?, name)?.into(),
            };
            if value.is_empty() {
                return None;
            }
            key.push_str(&value);
        }
        if key.len() > MAX_KEY_BYTES {
            return Some(format!(
                "sha256:{}",
                crate::hex(&Sha256::digest(key.as_bytes()))
            ));
        }
        Some(key)
    }
}

fn header_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    let value = headers.get(name)?;
    std::str::from_utf8(value.as_bytes()).ok().map(str::trim)
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The path as the application will most likely route it, so a limit cannot be dodged
/// by spelling the path differently: percent-encoded unreserved characters decoded
/// (`%6d` → `m`), repeated slashes merged, `.` and `..` segments resolved, and a
/// trailing slash dropped (except for `/` itself); a `%` that starts no escape is
/// written `%25`. The query is not part of it. Normalising twice changes nothing.
pub fn normalize_path(raw: &str) -> String {
    let raw = raw.split(['?', '#']).next().unwrap_or("");
    let mut decoded = String::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let byte = (high * 16 + low) as u8;
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(byte as char);
                } else {
                    decoded.push('%');
                    decoded.push(bytes[i + 1].to_ascii_uppercase() as char);
                    decoded.push(bytes[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        if bytes[i] == b'%' {
            // A '%' that starts no escape is written as one, so decoding can never
            // assemble a new escape and normalising twice changes nothing.
            decoded.push_str("%25");
            i += 1;
            continue;
        }
        // `i` only ever advances by whole characters, so it is a char boundary.
        let ch = raw[i..].chars().next().unwrap_or('/');
        decoded.push(ch);
        i += ch.len_utf8();
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn facts<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> RequestFacts<'a> {
        RequestFacts {
            method: "POST",
            path: "/chat/message",
            query,
            headers,
            client_ip: Some("203.0.113.7"),
            session: None,
        }
    }

    #[test]
    fn renders_placeholders_and_literals() {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("42"));
        h.insert("cookie", HeaderValue::from_static("theme=dark; sid=abc"));
        let t: KeyTemplate =
            "user:{header.X-User-Id}:{cookie.sid}:{query.org}:{method}{path}:{{x}}"
                .parse()
                .unwrap();
        assert_eq!(
            t.render(&facts(&h, Some("a=1&org=acme"))).as_deref(),
            Some("user:42:abc:acme:POST/chat/message:{x}")
        );
    }

    #[test]
    fn a_missing_or_empty_value_leaves_the_template_unresolved() {
        let mut h = HeaderMap::new();
        h.insert("x-empty", HeaderValue::from_static(""));
        for t in [
            "user:{header.x-user-id}",
            "{header.x-empty}",
            "{cookie.sid}",
            "{query.org}",
            "{session}",
        ] {
            let t: KeyTemplate = t.parse().unwrap();
            assert_eq!(t.render(&facts(&h, Some("a=1"))), None, "{t}");
        }
    }

    #[test]
    fn over_long_keys_are_hashed_not_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-user-id",
            HeaderValue::from_str(&"a".repeat(2000)).unwrap(),
        );
        let t: KeyTemplate = "user:{header.x-user-id}".parse().unwrap();
        let key = t.render(&facts(&h, None)).unwrap();
        assert!(key.starts_with("sha256:") && key.len() == 71, "{key}");
    }

    #[test]
    fn malformed_templates_are_rejected_with_the_reason() {
        assert!(matches!(
            "user:{header.x".parse::<KeyTemplate>(),
            Err(TemplateError::Unbalanced(_))
        ));
        assert!(matches!(
            "user}".parse::<KeyTemplate>(),
            Err(TemplateError::Unbalanced(_))
        ));
        assert!(matches!(
            "{ip}".parse::<KeyTemplate>(),
            Err(TemplateError::Unknown(_))
        ));
        assert!(matches!(
            "{header.}".parse::<KeyTemplate>(),
            Err(TemplateError::BadName(_))
        ));
        assert!(matches!(
            "{header.bad name}".parse::<KeyTemplate>(),
            Err(TemplateError::BadName(_))
        ));
        assert!(matches!(
            "".parse::<KeyTemplate>(),
            Err(TemplateError::Empty)
        ));
    }

    #[test]
    fn paths_are_normalised_the_way_apps_route_them() {
        for (raw, expected) in [
            ("/chat/message", "/chat/message"),
            ("/chat/message/", "/chat/message"),
            ("//chat///message", "/chat/message"),
            ("/chat/%6dessage", "/chat/message"),
            ("/chat/%6Dessage?x=1", "/chat/message"),
            ("/chat/./message", "/chat/message"),
            ("/other/../chat/message", "/chat/message"),
            ("/../../chat/message", "/chat/message"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/%%30a", "/%250a"),
            ("/", "/"),
            ("", "/"),
            ("/%", "/%25"),
            ("/%zz", "/%25zz"),
            ("/é%", "/é%25"),
            ("/%é1", "/%25é1"),
            ("/a%", "/a%25"),
        ] {
            assert_eq!(normalize_path(raw), expected, "{raw:?}");
        }
    }
}
