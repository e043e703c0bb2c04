//! The request path as the application behind sluice will route it.
//!
//! A limit is only as good as the path it is matched on: if sluice and the application
//! read one request as two different paths, a client can reach a limited handler for
//! free. Frameworks percent-decode the path before routing (Starlette, Django, Flask,
//! Spring), some fold case (Express, ASP.NET), some treat `\` as `/` (IIS) or cut
//! `;params` off a segment (Tomcat, Jetty). So sluice:
//!
//! - **decodes** every percent-escape, as those frameworks do, and matches on the
//!   result, written in one canonical spelling (see [`normalize_path`]);
//! - **refuses** what frameworks disagree about, with [`PathError`]: an encoded slash
//!   (`%2F`), a backslash (`\`, `%5C`), a control character (`%00`, `%0A`, ...), a
//!   `;` (`;jsessionid=...`, `%3B`), a `.` or `..` segment (also as `%2E`), and bytes
//!   that are not UTF-8 once decoded. Browsers and HTTP clients never send these;
//! - **merges** repeated slashes and drops a trailing slash;
//! - **ignores ASCII case** when matching routes (see [`crate::rules`]).

use std::fmt::Write;

/// Why a request path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F` inside a segment: some applications decode it into a separator, some do not.
    #[error(
        "the path contains an encoded slash (%2F): applications disagree on whether it separates segments; send a plain /"
    )]
    EncodedSlash,
    /// `\` or `%5C`: some servers treat it as a separator.
    #[error("the path contains a backslash (\\ or %5C): send / to separate segments")]
    Backslash,
    /// A control character such as `%00` or `%0A`.
    #[error("the path contains a control character (such as %00 or %0A): remove it")]
    ControlCharacter,
    /// `;` or `%3B`: some servers cut `;params` off a segment, others keep them.
    #[error(
        "the path contains `;` (or %3B): servers disagree on whether `;params` are part of the path; move them to the query"
    )]
    Semicolon,
    /// A `.` or `..` segment (also `%2E`): clients resolve these before sending.
    #[error(
        "the path contains a `.` or `..` segment: resolve it before sending, e.g. /a/../b is /b"
    )]
    DotSegment,
    /// Bytes that are not UTF-8 once percent-decoded.
    #[error("the path is not UTF-8 once percent-decoded: encode the path's text as UTF-8")]
    NotUtf8,
}

/// Whether `byte` stands for itself in the canonical spelling: RFC 3986's `pchar` but
/// for percent-escapes (unreserved, sub-delims, `:` and `@`). Everything else (`%`,
/// space, controls, `?`, `#`, non-ASCII, an encoded `/`) is written as an escape.
fn stands_for_itself(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

/// One path segment's bytes, percent-decoded; a `%` that starts no escape is itself.
/// `encoded_slash` says whether a `%2F` was decoded.
fn decode_segment(raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(raw.len());
    let mut encoded_slash = false;
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(high), Some(low)) = (hex_value(raw[i + 1]), hex_value(raw[i + 2]))
        {
            let byte = high * 16 + low;
            encoded_slash |= byte == b'/';
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    (out, encoded_slash)
}

fn encode_segment(decoded: &[u8], out: &mut String) {
    for &byte in decoded {
        if stands_for_itself(byte) {
            out.push(byte as char);
        } else {
            // Writing into a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// Splits `raw` (a path, maybe followed by `?query` or `#fragment`, which are dropped)
/// into percent-decoded segments, skipping empty ones.
fn decoded_segments(raw: &str) -> impl Iterator<Item = (Vec<u8>, bool)> + '_ {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| decode_segment(s.as_bytes()))
}

/// The canonical spelling of a path, for route patterns and configured paths: every
/// percent-escape decoded and re-encoded only where RFC 3986 requires it (uppercase
/// hex), repeated slashes merged, `.` and `..` segments resolved, a trailing slash
/// dropped (but for `/` itself), the query dropped. Two spellings that a decoding
/// framework reads as one path get one canonical spelling, and normalising twice
/// changes nothing. Requests go through the stricter [`RequestPath::parse`].
pub fn normalize_path(raw: &str) -> String {
    let mut segments: Vec<String> = Vec::new();
    for (decoded, _) in decoded_segments(raw) {
        match decoded.as_slice() {
            b"." => {}
            b".." => {
                segments.pop();
            }
            bytes => {
                let mut segment = String::with_capacity(bytes.len());
                encode_segment(bytes, &mut segment);
                segments.push(segment);
            }
        }
    }
    join(&segments)
}

fn join(segments: &[String]) -> String {
    if segments.is_empty() {
        return "/".to_string();
    }
    let mut path = String::with_capacity(segments.iter().map(|s| s.len() + 1).sum());
    for segment in segments {
        path.push('/');
        path.push_str(segment);
    }
    path
}

/// A request's path, accepted for matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    /// The canonical spelling (see [`normalize_path`]), case kept.
    pub canonical: String,
    /// The path exactly as a decoding framework routes it (Starlette, Django): escapes
    /// spelled canonically, but repeated and trailing slashes kept. Only the `default`
    /// route looks at it (see [`crate::rules`]).
    pub literal: String,
}

impl RequestPath {
    /// Reads a request path (as sent, percent-encoded; a query is ignored), refusing
    /// what applications disagree about (see the module doc). Bytes above 0x7F that a
    /// proxy passed through raw are read as if percent-encoded.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        let mut segments: Vec<String> = Vec::new();
        let mut literal = String::with_capacity(raw.len());
        let path = raw.split(['?', '#']).next().unwrap_or("");
        for (i, raw_segment) in path.split('/').enumerate() {
            if i > 0 {
                literal.push('/');
            }
            if raw_segment.is_empty() {
                continue;
            }
            let (decoded, encoded_slash) = decode_segment(raw_segment.as_bytes());
            if encoded_slash {
                return Err(PathError::EncodedSlash);
            }
            if decoded.contains(&b'\\') {
                return Err(PathError::Backslash);
            }
            if decoded.iter().any(|b| b.is_ascii_control()) {
                return Err(PathError::ControlCharacter);
            }
            if decoded.contains(&b';') {
                return Err(PathError::Semicolon);
            }
            if decoded == b"." || decoded == b".." {
                return Err(PathError::DotSegment);
            }
            if std::str::from_utf8(&decoded).is_err() {
                return Err(PathError::NotUtf8);
            }
            let mut segment = String::with_capacity(decoded.len());
            encode_segment(&decoded, &mut segment);
            literal.push_str(&segment);
            segments.push(segment);
        }
        if !literal.starts_with('/') {
            literal.insert(0, '/');
        }
        Ok(RequestPath {
            canonical: join(&segments),
            literal,
        })
    }
}

/// Percent-encodes bytes outside visible ASCII, so a header value that a proxy passed
/// through raw (UTF-8, or anything else) keeps every byte and reads as a URI.
pub fn encode_raw_bytes(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &byte in raw {
        if byte.is_ascii_graphic() {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("/é%", "/%C3%A9%25"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/%é1", "/%25%C3%A91"),
            ("/a%", "/a%25"),
            ("/a%20b", "/a%20b"),
            ("/a%3Bb", "/a;b"),
            ("/a%3fb", "/a%3Fb"),
            ("/%41pi", "/Api"),
        ] {
            assert_eq!(normalize_path(raw), expected, "{raw:?}");
            assert_eq!(normalize_path(expected), expected, "twice: {raw:?}");
        }
    }

    #[test]
    fn requests_are_refused_where_apps_disagree() {
        for (raw, error) in [
            ("/chat%2Fmessage", PathError::EncodedSlash),
            ("/chat%2fmessage", PathError::EncodedSlash),
            ("/chat%5Cmessage", PathError::Backslash),
            ("/chat\\message", PathError::Backslash),
            ("/chat/message%00", PathError::ControlCharacter),
            ("/chat/message%0a", PathError::ControlCharacter),
            ("/chat/message;jsessionid=1", PathError::Semicolon),
            ("/chat/message%3bx", PathError::Semicolon),
            ("/chat/./message", PathError::DotSegment),
            ("/x/../chat/message", PathError::DotSegment),
            ("/x/%2e%2E/chat/message", PathError::DotSegment),
            ("/chat/%ff", PathError::NotUtf8),
        ] {
            assert_eq!(RequestPath::parse(raw), Err(error), "{raw:?}");
        }
        for (raw, canonical) in [
            ("/chat/message", "/chat/message"),
            ("/chat//message/", "/chat/message"),
            ("/Chat/%6Dessage", "/Chat/message"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/a%25b", "/a%25b"),
            ("/a.b/..c", "/a.b/..c"),
        ] {
            assert_eq!(
                RequestPath::parse(raw).map(|p| p.canonical),
                Ok(canonical.to_string()),
                "{raw:?}"
            );
        }
        for (raw, literal) in [
            ("/chat//Message/", "/chat//Message/"),
            ("//%63hat", "//chat"),
            ("", "/"),
            ("/", "/"),
        ] {
            assert_eq!(
                RequestPath::parse(raw).map(|p| p.literal),
                Ok(literal.to_string()),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn raw_bytes_are_kept_as_escapes() {
        assert_eq!(encode_raw_bytes("/café".as_bytes()), "/caf%C3%A9");
        assert_eq!(encode_raw_bytes(b"/a b\xff"), "/a%20b%FF");
    }
}
