//! Server-issued session cookies for the `{session}` key placeholder.
//!
//! A session is a random 128-bit id that sluice hands a client in a cookie
//! (`sluice_session` by default) and counts on afterwards, so anonymous devices behind
//! one NAT get buckets of their own. The cookie value is `<id>.<tag>`: 32 hex digits of
//! id and the first 16 bytes of HMAC-SHA256(secret, "sluice-session-v1:" + id) in hex.
//! Only sluice can make a tag that verifies, so a client cannot choose its id (to share
//! or rotate into someone else's bucket) — it can only drop its cookie and get a fresh
//! one, which is why clients that refuse cookies are left to the IP layer. A cookie
//! whose tag does not verify (forged, tampered, signed with another secret) is treated
//! as absent; tags are compared in constant time.
//!
//! The cookie is `HttpOnly`, `SameSite=Lax`, `Path=/`, with a `Max-Age`, and `Secure`
//! when the request came over TLS (as a trusted proxy says with
//! `X-Forwarded-Proto: https`) or the config asks for it always.

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderValue;
use http::header::HeaderMap;
use sha2::Sha256;

/// Bytes of random id in a session.
const ID_BYTES: usize = 16;
/// Bytes of the HMAC kept as the tag (128 bits, as HMAC truncation allows).
const TAG_BYTES: usize = 16;
/// Domain separation, so a tag made here cannot be confused with any other HMAC use
/// of the same secret, and the format can change later.
const CONTEXT: &[u8] = b"sluice-session-v1:";

/// The default cookie name.
pub const DEFAULT_COOKIE: &str = "sluice_session";
/// The default cookie lifetime: 30 days.
pub const DEFAULT_MAX_AGE_SECONDS: u64 = 30 * 24 * 3600;
/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// How session cookies are named and sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCookie {
    /// The cookie's name (default `sluice_session`).
    pub name: String,
    /// `Max-Age` in seconds (default 30 days).
    pub max_age_seconds: u64,
    /// Send `Secure` on every cookie, not only on requests that came over TLS.
    pub always_secure: bool,
}

impl Default for SessionCookie {
    fn default() -> Self {
        SessionCookie {
            name: DEFAULT_COOKIE.to_string(),
            max_age_seconds: DEFAULT_MAX_AGE_SECONDS,
            always_secure: false,
        }
    }
}

/// Why sessions could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The operating system's random source failed.
    #[error("cannot read random bytes for a session: {0}")]
    Random(String),
    /// The secret is shorter than [`MIN_SECRET_BYTES`].
    #[error("the session secret must be at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret,
}

/// The session of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The id, the value of `{session}`.
    pub id: String,
    /// The cookie value to set on the response, when the id is new.
    pub issue: Option<String>,
}

/// Signs and verifies session cookies with one secret.
#[derive(Clone)]
pub struct Sessions {
    mac: Hmac<Sha256>,
    cookie: SessionCookie,
}

/// Prints the cookie settings, never the secret.
impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("cookie", &self.cookie)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// `n` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], SessionError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| SessionError::Random(e.to_string()))?;
    Ok(bytes)
}

impl Sessions {
    /// Sessions signed with `secret` (at least [`MIN_SECRET_BYTES`]).
    pub fn new(secret: &[u8], cookie: SessionCookie) -> Result<Self, SessionError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SessionError::ShortSecret);
        }
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .map_err(|_| SessionError::ShortSecret)?;
        Ok(Sessions { mac, cookie })
    }

    /// The cookie settings.
    pub fn cookie(&self) -> &SessionCookie {
        &self.cookie
    }

    fn tag(&self, id: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(CONTEXT);
        mac.update(id.as_bytes());
        mac
    }

    /// The session id carried by a valid cookie among `headers`, if any.
    pub fn verify(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(http::header::COOKIE)
            .iter()
            .map(crate::template::cookie_line)
            .flat_map(cookie::Cookie::split_parse)
            .filter_map(Result::ok)
            .filter(|c| c.name() == self.cookie.name)
            .find_map(|c| self.verify_value(c.value()))
    }

    /// The id in one cookie value, when its tag verifies.
    pub fn verify_value(&self, value: &str) -> Option<String> {
        let (id, tag) = value.split_once('.')?;
        if id.len() != ID_BYTES * 2 || !is_lower_hex(id) {
            return None;
        }
        let tag = decode_hex::<TAG_BYTES>(tag)?;
        self.tag(id).verify_truncated_left(&tag).ok()?;
        Some(id.to_string())
    }

    /// A new session: a random id and its signed cookie value.
    pub fn issue(&self) -> Result<Session, SessionError> {
        let id = crate::hex(&random_bytes::<ID_BYTES>()?);
        let tag = self.tag(&id).finalize().into_bytes();
        let value = format!("{id}.{}", crate::hex(&tag[..TAG_BYTES]));
        Ok(Session {
            id,
            issue: Some(value),
        })
    }

    /// The request's session: the valid one it carries, or a new one to issue.
    pub fn session(&self, headers: &HeaderMap) -> Result<Session, SessionError> {
        match self.verify(headers) {
            Some(id) => Ok(Session { id, issue: None }),
            None => self.issue(),
        }
    }

    /// The `Set-Cookie` header for `value`; `Secure` when `over_tls` or always configured.
    pub fn set_cookie(&self, value: &str, over_tls: bool) -> Option<HeaderValue> {
        let secure = if over_tls || self.cookie.always_secure {
            "; Secure"
        } else {
            ""
        };
        HeaderValue::from_str(&format!(
            "{}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
            self.cookie.name, self.cookie.max_age_seconds
        ))
        .ok()
    }
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !is_lower_hex(text) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(secret: &[u8]) -> Sessions {
        Sessions::new(secret, SessionCookie::default()).unwrap()
    }

    fn with_cookie(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; sluice_session={value}")).unwrap(),
        );
        headers
    }

    #[test]
    fn an_issued_cookie_verifies_and_carries_its_id() {
        let s = sessions(b"0123456789abcdef0123");
        let issued = s.issue().unwrap();
        let value = issued.issue.clone().unwrap();
        assert_eq!(issued.id.len(), 32);
        assert!(value.starts_with(&issued.id));
        let again = s.session(&with_cookie(&value)).unwrap();
        assert_eq!(again.id, issued.id);
        assert_eq!(again.issue, None, "a valid cookie is not issued again");
        assert_ne!(s.issue().unwrap().id, issued.id, "ids are random");
    }

    #[test]
    fn forged_tampered_or_foreign_cookies_are_absent() {
        let s = sessions(b"0123456789abcdef0123");
        let value = s.issue().unwrap().issue.unwrap();
        let (id, tag) = value.split_once('.').unwrap();
        let mut flipped = tag.to_string().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let other_id = format!("{}{}", &id[..31], if id.ends_with('0') { '1' } else { '0' });
        let foreign = sessions(b"another secret, just as long")
            .issue()
            .unwrap()
            .issue
            .unwrap();
        for bad in [
            format!("{id}.{}", String::from_utf8(flipped).unwrap()),
            format!("{other_id}.{tag}"),
            foreign,
            id.to_string(),
            format!("{id}."),
            format!("{}.{tag}", id.to_uppercase()),
            format!("{id}.{}", &tag[..30]),
            "".to_string(),
            "not-a-session".to_string(),
        ] {
            assert_eq!(s.verify(&with_cookie(&bad)), None, "{bad:?}");
            let session = s.session(&with_cookie(&bad)).unwrap();
            assert!(session.issue.is_some(), "{bad:?} gets a new session");
            assert_ne!(session.id, id);
        }
    }

    #[test]
    fn set_cookie_has_the_attributes_browsers_need() {
        let s = sessions(b"0123456789abcdef0123");
        let plain = s.set_cookie("v", false).unwrap();
        assert_eq!(
            plain.to_str().unwrap(),
            "sluice_session=v; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"
        );
        let tls = s.set_cookie("v", true).unwrap();
        assert!(tls.to_str().unwrap().ends_with("; Secure"));
        let always = Sessions::new(
            b"0123456789abcdef0123",
            SessionCookie {
                always_secure: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            always
                .set_cookie("v", false)
                .unwrap()
                .to_str()
                .unwrap()
                .ends_with("; Secure")
        );
    }

    #[test]
    fn short_secrets_are_refused_and_never_printed() {
        assert_eq!(
            Sessions::new(b"short", SessionCookie::default()).err(),
            Some(SessionError::ShortSecret)
        );
        let s = sessions(b"a very secret secret");
        assert!(!format!("{s:?}").contains("very secret"));
    }
}
