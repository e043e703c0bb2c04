//! Key templates such as `user:{header.x-user-id}`, and the request facts they read.
//!
//! Placeholders: `{client_ip}`, `{header.NAME}`, `{cookie.NAME}`, `{query.NAME}`,
//! `{jwt.CLAIM}` (a claim of the request's verified bearer token, see `sluice_identity`),
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
    /// The path's canonical spelling ([`crate::RequestPath::canonical`]): routes match
    /// it ignoring case, and `{path}` reads it in lower case, so spelling the path
    /// another way neither dodges a route nor opens a fresh bucket.
    pub path: &'a str,
    /// The path as a decoding framework routes it ([`crate::RequestPath::literal`]).
    pub literal_path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The client address's key (grouped, maybe hashed); `None` when the front door
    /// does not know the socket peer, so `{client_ip}` does not resolve.
    pub client_ip: Option<&'a str>,
    /// The session id, when the front door has one.
    pub session: Option<&'a str>,
    /// The claims of the request's bearer token, when one verified (never unverified
    /// claims: `{jwt.CLAIM}` does not resolve without them).
    pub claims: Option<&'a sluice_identity::Claims>,
    /// The request carried a JWT that did not verify, or differing copies of one
    /// ([`sluice_identity::Caller::Refused`]): a template reading a claim refuses the
    /// request rather than fall back, as the application may know the user by it.
    pub token_refused: bool,
    /// The caller's plan (`plan_from`), which picks the rates of limits with `plans:`.
    pub plan: Option<&'a str>,
    /// `plan_from` reads a claim of a token that was refused: a limit with `plans:`
    /// cannot tell its rates, and refuses the request.
    pub plan_unknown: bool,
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
    Jwt(String),
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    text: String,
    parts: Vec<Part>,
    /// [`KeyTemplate::is_trusted`], worked out once when parsed: every check of every
    /// request carries it, so it is not recomputed per request.
    trusted: bool,
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
        "unknown placeholder {{{0}}}: use client_ip, header.NAME, cookie.NAME, query.NAME, jwt.CLAIM, session, method or path"
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
        let trusted = parts.iter().all(|part| match part {
            Part::Literal(_) | Part::ClientIp | Part::Session | Part::Jwt(_) => true,
            Part::Header(_) | Part::Cookie(_) | Part::Query(_) | Part::Method | Part::Path => false,
        });
        Ok(KeyTemplate {
            text: text.to_string(),
            parts,
            trusted,
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
    if let Some(claim) = named("jwt.") {
        return if claim.is_empty() {
            Err(bad())
        } else {
            Ok(Part::Jwt(claim.to_string()))
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

    /// Whether the template reads what a client writes as it likes: a header, a cookie
    /// or a query parameter.
    pub fn reads_client_input(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Header(_) | Part::Cookie(_) | Part::Query(_)))
    }

    /// Whether every key this template renders is out of the client's choosing, so an
    /// allow entry may match it: the template reads only literals, `{client_ip}` (the
    /// address resolved through `client_ip.trusted_proxies`), `{jwt.CLAIM}` (claims of a
    /// token whose signature verified) and `{session}` (an id sluice signed). A header,
    /// cookie, query parameter, `{path}` or `{method}` anywhere in it makes it untrusted,
    /// whatever else it reads: the client writes those as it likes, so it could make the
    /// key equal an allow-listed subject and skip every limit of the request.
    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// Whether the template reads a claim of a verified token (`{jwt.CLAIM}`).
    pub fn uses_jwt(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Jwt(_)))
    }

    /// The keys for this request, or `None` when a placeholder does not resolve.
    ///
    /// A name the request carries more than once (`?api_key=a&api_key=b`, a cookie
    /// sent twice, a repeated header) gives one key per distinct value: frameworks
    /// disagree on which copy the application reads (Starlette and Django the last
    /// query value, Flask the first, Express all of them), so every copy is charged
    /// and none goes free. A repeated header also counts as its values joined by `, `,
    /// which is how Express and Django read it. More than [`MAX_KEYS_PER_TEMPLATE`]
    /// keys is an error rather than a silent choice.
    ///
    /// Keys longer than the engine accepts are replaced by `sha256:` and their hash,
    /// so a long identifier still gets a bucket of its own.
    pub fn render(&self, facts: &RequestFacts<'_>) -> Result<Option<Vec<String>>, KeyError> {
        let mut keys = vec![String::new()];
        for part in &self.parts {
            let values: Vec<std::borrow::Cow<'_, str>> = match part {
                Part::Literal(text) => vec![text.as_str().into()],
                Part::ClientIp => one(facts.client_ip),
                Part::Method => one(Some(facts.method)),
                Part::Path => vec![facts.path.to_ascii_lowercase().into()],
                Part::Session => one(facts.session),
                Part::Jwt(_) if facts.token_refused => return Err(KeyError::UnverifiedToken),
                Part::Jwt(claim) => facts
                    .claims
                    .and_then(|claims| sluice_identity::claim_text(claims, claim))
                    .map(|text| vec![text.into()])
                    .unwrap_or_default(),
                Part::Header(name) => header_values(facts.headers, name),
                Part::Cookie(name) => cookie_values(facts.headers, name),
                Part::Query(name) => facts
                    .query
                    .map(|q| query_values(q, name))
                    .unwrap_or_default(),
            };
            if values.is_empty() {
                return Ok(None);
            }
            if keys.len() * values.len() > MAX_KEYS_PER_TEMPLATE {
                return Err(KeyError::TooManyValues {
                    template: self.text.clone(),
                });
            }
            if let [value] = values.as_slice() {
                // The usual case, one value: extend the keys in place.
                for key in &mut keys {
                    key.push_str(value);
                }
            } else {
                keys = keys
                    .iter()
                    .flat_map(|key| values.iter().map(move |value| format!("{key}{value}")))
                    .collect();
            }
        }
        for key in &mut keys {
            if key.len() > MAX_KEY_BYTES {
                *key = format!("sha256:{}", crate::hex(&Sha256::digest(key.as_bytes())));
            }
        }
        Ok(Some(keys))
    }
}

/// The most keys one template may give for one request (see [`KeyTemplate::render`]).
pub const MAX_KEYS_PER_TEMPLATE: usize = 8;

/// Why a request's keys could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A repeated parameter, cookie or header gave more distinct keys than are charged.
    #[error(
        "the request repeats a parameter, cookie or header read by the key `{template}` with more than 8 different values: send it once"
    )]
    TooManyValues {
        /// The template whose placeholders repeat.
        template: String,
    },
    /// A key reads a claim, and the request's token did not verify.
    #[error(
        "the request's bearer token did not verify (forged, expired, for another issuer or audience, sent twice with different values, or not in the canonical base64url form): send one valid token, or none"
    )]
    UnverifiedToken,
}

/// A value that is there and not empty.
fn one(value: Option<&str>) -> Vec<std::borrow::Cow<'_, str>> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| vec![v.into()])
        .unwrap_or_default()
}

/// Adds `value` unless it is empty or already there.
fn push_distinct<'a>(
    values: &mut Vec<std::borrow::Cow<'a, str>>,
    value: std::borrow::Cow<'a, str>,
) {
    if !value.is_empty() && !values.contains(&value) {
        values.push(value);
    }
}

fn header_values<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Vec<std::borrow::Cow<'h, str>> {
    let mut values = Vec::new();
    let mut all = Vec::new();
    for value in headers.get_all(name) {
        // A value that is not UTF-8 keeps its bytes as escapes: it still resolves, to a
        // key of its own, rather than fall through to the next template.
        let text: std::borrow::Cow<'h, str> = match std::str::from_utf8(value.as_bytes()) {
            Ok(text) => text.trim().into(),
            Err(_) => crate::path::encode_raw_bytes(value.as_bytes()).into(),
        };
        all.push(text.clone());
        push_distinct(&mut values, text);
    }
    if all.len() > 1 {
        push_distinct(&mut values, all.join(", ").into());
    }
    values
}

fn cookie_values<'h>(headers: &'h HeaderMap, name: &str) -> Vec<std::borrow::Cow<'h, str>> {
    let mut values = Vec::new();
    for cookie in headers
        .get_all(http::header::COOKIE)
        .iter()
        .map(cookie_line)
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|c| c.name() == name)
    {
        push_distinct(&mut values, cookie.value().to_string().into());
    }
    values
}

/// One `Cookie` line as text, whatever bytes it holds: a line with a byte outside
/// visible ASCII was skipped whole, so a client could add `x=\xff` (or `x=café`) to its
/// own cookies and leave every limit keyed on another cookie of that line unresolved
/// while its app still read that cookie. UTF-8 is kept; other bytes are
/// percent-encoded, like a header's (a value with them is a key of its own).
pub(crate) fn cookie_line(value: &http::HeaderValue) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(value.as_bytes()) {
        Ok(text) => text.into(),
        Err(_) => crate::path::encode_raw_bytes(value.as_bytes()).into(),
    }
}

/// Every value of `name`, also written `name[]` or `name[i]`: Express (through `qs`)
/// and PHP read those as the same parameter.
fn query_values<'q>(query: &'q str, name: &str) -> Vec<std::borrow::Cow<'q, str>> {
    let mut values = Vec::new();
    let same = |key: &str| {
        key == name
            || key
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('['))
                .is_some_and(|rest| rest.ends_with(']'))
    };
    for (_, value) in form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| same(k)) {
        push_distinct(&mut values, value);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn facts<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> RequestFacts<'a> {
        RequestFacts {
            method: "POST",
            path: "/chat/message",
            literal_path: "/chat/message",
            query,
            headers,
            client_ip: Some("203.0.113.7"),
            session: None,
            claims: None,
            token_refused: false,
            plan_unknown: false,
            plan: None,
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
            t.render(&facts(&h, Some("a=1&org=acme"))),
            Ok(Some(vec![
                "user:42:abc:acme:POST/chat/message:{x}".to_string()
            ]))
        );
    }

    #[test]
    fn only_templates_of_what_the_client_cannot_write_are_trusted() {
        for t in [
            "{client_ip}",
            "ip:{client_ip}",
            "{jwt.sub}",
            "s:{session}",
            "global",
        ] {
            assert!(t.parse::<KeyTemplate>().unwrap().is_trusted(), "{t}");
        }
        for t in [
            "{query.api_key}",
            "{header.x-api-key}",
            "{cookie.sid}",
            "{path}",
            "{method}",
            // One client-written part is enough: the client picks the whole key's tail.
            "{client_ip}:{query.api_key}",
            "{jwt.sub}:{path}",
        ] {
            assert!(!t.parse::<KeyTemplate>().unwrap().is_trusted(), "{t}");
        }
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
            assert_eq!(t.render(&facts(&h, Some("a=1"))), Ok(None), "{t}");
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
        let key = t.render(&facts(&h, None)).unwrap().unwrap().remove(0);
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
    fn every_copy_of_a_repeated_name_is_a_key() {
        let mut h = HeaderMap::new();
        h.append("x-user-id", HeaderValue::from_static("junk"));
        h.append("x-user-id", HeaderValue::from_static("42"));
        h.append("cookie", HeaderValue::from_static("sid=a; sid=b"));
        h.append("cookie", HeaderValue::from_static("sid=a"));
        let keys = |t: &str, query| {
            t.parse::<KeyTemplate>()
                .unwrap()
                .render(&facts(&h, query))
                .unwrap()
                .unwrap()
        };
        assert_eq!(
            keys(
                "{query.api_key}",
                Some("api_key=junk&api_key=REAL&api_key=junk")
            ),
            ["junk", "REAL"]
        );
        assert_eq!(
            keys("{query.api_key}", Some("api_key=&api_key=REAL")),
            ["REAL"]
        );
        assert_eq!(
            keys(
                "{query.api_key}",
                Some("api_key[]=REAL&api_key[1]=b&api_key_x=no")
            ),
            ["REAL", "b"]
        );
        assert_eq!(keys("s:{cookie.sid}", None), ["s:a", "s:b"]);
        assert_eq!(keys("{header.x-user-id}", None), ["junk", "42", "junk, 42"]);
        let many: String = (0..9).map(|i| format!("k={i}&")).collect();
        assert!(matches!(
            "{query.k}"
                .parse::<KeyTemplate>()
                .unwrap()
                .render(&facts(&h, Some(&many))),
            Err(KeyError::TooManyValues { .. })
        ));
    }

    #[test]
    fn a_header_that_is_not_utf8_still_resolves_to_its_own_key() {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_bytes(b"\xff42").unwrap());
        let t: KeyTemplate = "user:{header.x-user-id}".parse().unwrap();
        assert_eq!(
            t.render(&facts(&h, None)),
            Ok(Some(vec!["user:%FF42".to_string()]))
        );
    }
}
