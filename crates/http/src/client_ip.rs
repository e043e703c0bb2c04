//! Who is the client? The socket peer, unless the peer is a trusted proxy: then the
//! proxy's `X-Forwarded-For` (or RFC 7239 `Forwarded`) is walked from the right,
//! past trusted hops, to the first address no trusted proxy vouches for.
//!
//! A forwarding header from an untrusted peer is ignored, so a client cannot spoof its
//! address. An entry that cannot be read (garbage, `unknown`, an obfuscated
//! identifier) stops the walk at the last address that could be, which is a trusted
//! proxy's: such requests share that proxy's bucket rather than pick their own. The
//! walk reads at most [`MAX_HOPS`] entries from the right, however long the header.
//!
//! Keys: IPv4-mapped IPv6 addresses count as IPv4; IPv6 addresses are grouped by
//! `ipv6_prefix` (default /64, what one subscriber usually gets), so rotating
//! addresses inside one allocation share a bucket; with a hash secret, the key is a
//! keyed hash, so raw addresses never reach the store or the logs.

use std::borrow::Cow;
use std::net::IpAddr;

use hmac::{Hmac, KeyInit, Mac};
use http::header::HeaderMap;
use ipnet::{IpNet, Ipv6Net};
use sha2::Sha256;

/// The most forwarding entries read from the right of a header.
pub const MAX_HOPS: usize = 32;

/// Which header trusted proxies put the client's address in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the default).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// How client addresses are found and turned into keys.
#[derive(Clone)]
pub struct ClientIpConfig {
    /// Proxies whose forwarding header is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The header they set.
    pub header: ForwardedHeader,
    /// IPv6 addresses are grouped by this prefix length (1 to 128).
    pub ipv6_prefix: u8,
    /// When set, keys are a keyed hash of the (grouped) address.
    pub hash_secret: Option<Vec<u8>>,
}

/// Prints everything but the hash secret.
impl std::fmt::Debug for ClientIpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIpConfig")
            .field("trusted_proxies", &self.trusted_proxies)
            .field("header", &self.header)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field(
                "hash_secret",
                &self.hash_secret.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

impl Default for ClientIpConfig {
    fn default() -> Self {
        ClientIpConfig {
            trusted_proxies: Vec::new(),
            header: ForwardedHeader::XForwardedFor,
            ipv6_prefix: 64,
            hash_secret: None,
        }
    }
}

/// Resolves client addresses and their keys.
#[derive(Debug, Clone)]
pub struct ClientIpResolver {
    config: ClientIpConfig,
}

/// Treats IPv4-mapped IPv6 (`::ffff:203.0.113.7`) as the IPv4 address it carries.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `ip` as text after [`canonical`], exactly as `Display` writes it. IPv4 is written
/// by hand: std's formatter goes through the formatting machinery, about a thousand
/// instructions, and a proxied request needs the address twice (its key and
/// `X-Forwarded-For`).
pub fn ip_text(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(itoa::Buffer::new().format(octet));
            }
            text
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// Reads one `X-Forwarded-For` entry: an address, optionally with a port or in brackets.
pub fn parse_forwarded_for_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim().trim_matches('"');
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = entry.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    let (ip, rest) = entry.strip_prefix('[')?.split_once(']')?;
    let port_ok = rest.is_empty()
        || rest
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok());
    if !port_ok {
        return None;
    }
    ip.parse::<IpAddr>().ok()
}

/// Splits `text` at each `separator` outside a quoted string (RFC 9110 §5.6.4: `"`
/// opens and closes, `\\` escapes the next character), scanning from the right: the
/// right end is what the trusted proxies wrote, well formed, while a client controls
/// the left and may leave a quote open to swallow what follows it. Parts come left to
/// right; the leftmost is `None` when an unclosed quote makes it unreadable.
fn split_outside_quotes(text: &str, separator: u8) -> Vec<Option<&str>> {
    let bytes = text.as_bytes();
    let mut parts = Vec::new();
    let (mut end, mut quoted) = (bytes.len(), false);
    let mut i = bytes.len();
    while i > 0 {
        i -= 1;
        match bytes[i] {
            b'"' => {
                let backslashes = bytes[..i].iter().rev().take_while(|&&b| b == b'\\').count();
                if backslashes % 2 == 0 {
                    quoted = !quoted;
                }
            }
            b if b == separator && !quoted => {
                parts.push(Some(&text[i + 1..end]));
                end = i;
            }
            _ => {}
        }
    }
    parts.push((!quoted).then(|| &text[..end]));
    parts.reverse();
    parts
}

/// The elements of one RFC 7239 `Forwarded` line, left to right; `None` for one that
/// cannot be read (which stops the walk, as garbage does).
fn forwarded_elements(line: &str) -> Vec<Option<&str>> {
    split_outside_quotes(line, b',')
}

/// The address in an element's `for=` pair: a token or a quoted string, with a port or
/// in brackets. `None` for `unknown`, an obfuscated identifier, or no `for`.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let pairs = split_outside_quotes(element, b';');
    let value = pairs.into_iter().find_map(|pair| {
        let (name, value) = pair?.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let value = match value.strip_prefix('"') {
        Some(quoted) => {
            let inner = quoted.strip_suffix('"')?;
            let mut unescaped = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                unescaped.push(if c == '\\' { chars.next()? } else { c });
            }
            unescaped
        }
        None => value.to_string(),
    };
    parse_forwarded_for_entry(&value)
}

impl ClientIpResolver {
    /// A resolver with `config`; `ipv6_prefix` is clamped to 1..=128.
    pub fn new(mut config: ClientIpConfig) -> Self {
        config.ipv6_prefix = config.ipv6_prefix.clamp(1, 128);
        ClientIpResolver { config }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientIpConfig {
        &self.config
    }

    /// Whether `peer` is a trusted proxy, whose forwarding headers are believed.
    pub fn is_trusted_peer(&self, peer: IpAddr) -> bool {
        self.is_trusted(canonical(peer))
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.config
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// The client's address for a request that arrived from `peer` with `headers`.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        // Header lines in reverse, each line's entries in reverse: right to left overall.
        // A line is read byte by byte, not refused whole when it holds a byte outside
        // visible ASCII: the client writes the left of the line and the trusted proxy
        // appends the address it saw on the right, so one byte of the client's choosing
        // must not hide that address. An entry that is not text becomes U+FFFD
        // characters, never a `,`, `;` or `"` (UTF-8 continuation bytes are all above
        // ASCII), so it stays one entry, which cannot be read, at its own position.
        let name = match self.config.header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        let lines: Vec<Cow<'_, str>> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()))
            .collect();
        match self.config.header {
            ForwardedHeader::XForwardedFor => {
                let entries = lines.iter().rev().flat_map(|line| line.rsplit(','));
                self.walk(peer, entries.map(parse_forwarded_for_entry))
            }
            ForwardedHeader::Forwarded => {
                let entries = lines
                    .iter()
                    .rev()
                    .flat_map(|line| forwarded_elements(line).into_iter().rev());
                self.walk(peer, entries.map(|element| element.and_then(forwarded_for)))
            }
        }
    }

    fn walk(&self, peer: IpAddr, entries: impl Iterator<Item = Option<IpAddr>>) -> IpAddr {
        let mut client = peer;
        for entry in entries.take(MAX_HOPS) {
            let Some(ip) = entry else {
                return client;
            };
            client = canonical(ip);
            if !self.is_trusted(client) {
                return client;
            }
        }
        client
    }

    /// The key a client address is counted under: IPv6 grouped by prefix, hashed when
    /// a secret is configured.
    pub fn key(&self, ip: IpAddr) -> String {
        let text = match canonical(ip) {
            IpAddr::V4(_) => ip_text(ip),
            IpAddr::V6(v6) if self.config.ipv6_prefix >= 128 => v6.to_string(),
            IpAddr::V6(v6) => match Ipv6Net::new(v6, self.config.ipv6_prefix) {
                Ok(net) => net.trunc().to_string(),
                Err(_) => v6.to_string(),
            },
        };
        match &self.config.hash_secret {
            Some(secret) => keyed_hash(secret, &text),
            None => text,
        }
    }
}

/// `ip:` and the first 16 bytes of HMAC-SHA256(secret, text), in hex.
fn keyed_hash(secret: &[u8], text: &str) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        // HMAC accepts keys of any length; unreachable, but never fall back to the raw text.
        return "ip:unhashable".to_string();
    };
    mac.update(text.as_bytes());
    let digest = mac.finalize().into_bytes();
    format!("ip:{}", crate::hex(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn ip_text_writes_what_display_writes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut addresses: Vec<IpAddr> = ["0.0.0.0", "255.255.255.255", "10.0.0.1", "1.20.255.9"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        for _ in 0..2_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            addresses.push(IpAddr::V4(std::net::Ipv4Addr::from(seed as u32)));
        }
        for ip in addresses {
            assert_eq!(ip_text(ip), ip.to_string());
        }
        // IPv4-mapped IPv6 is written as the IPv4 address it maps, like the keys.
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(ip_text(mapped), "192.0.2.7");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_text(v6), "2001:db8::1");
    }

    fn resolver(trusted: &[&str]) -> ClientIpResolver {
        ClientIpResolver::new(ClientIpConfig {
            trusted_proxies: trusted.iter().map(|n| n.parse().unwrap()).collect(),
            ..Default::default()
        })
    }

    fn headers(name: &'static str, values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(name, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_header_from_an_untrusted_peer_is_ignored() {
        let r = resolver(&["10.0.0.0/8"]);
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        assert_eq!(r.resolve(ip("203.0.113.9"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn trusted_hops_are_skipped_from_the_right() {
        let r = resolver(&["10.0.0.0/8"]);
        // The client put a fake entry first; the proxy chain appended the truth.
        let h = headers("x-forwarded-for", &["6.6.6.6, 198.51.100.7, 10.0.0.2"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        let split = headers("x-forwarded-for", &["6.6.6.6", "198.51.100.7, 10.0.0.2"]);
        assert_eq!(
            r.resolve(ip("10.0.0.1"), &split),
            ip("198.51.100.7"),
            "several header lines read as one list"
        );
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_trusted_hop() {
        let r = resolver(&["10.0.0.0/8"]);
        for bad in [
            "garbage",
            "unknown",
            "_hidden",
            "1.2.3.4.5",
            "",
            "[::1",
            "[::1]x",
            "[1.2.3.4]:99999",
            "1.2.3.4 5.6.7.8",
            "0x7f.1",
        ] {
            let h = headers("x-forwarded-for", &[&format!("6.6.6.6, {bad}, 10.0.0.2")]);
            assert_eq!(
                r.resolve(ip("10.0.0.1"), &h),
                ip("10.0.0.2"),
                "entry {bad:?}"
            );
        }
    }

    /// A client writes the left of the line and the proxy appends what it saw: bytes of
    /// the client's outside visible ASCII (which `HeaderValue::to_str` refuses) must not
    /// hide the proxy's entry, in either header, on one line or several. They are one
    /// unreadable entry at their own position, which stops the walk as garbage does.
    #[test]
    fn bytes_outside_ascii_are_one_unreadable_entry_not_a_lost_header() {
        let raw = |name: &'static str, lines: &[&[u8]]| {
            let mut map = HeaderMap::new();
            for line in lines {
                map.append(name, HeaderValue::from_bytes(line).unwrap());
            }
            map
        };
        let r = resolver(&["10.0.0.0/8"]);
        let cases: [(&[&[u8]], &str); 5] = [
            (&[b"\xff, 198.51.100.7"], "198.51.100.7"),
            (&[b"\xff", b"198.51.100.7"], "198.51.100.7"),
            (&["caf\u{e9}, 198.51.100.7".as_bytes()], "198.51.100.7"),
            (
                &[b"6.6.6.6, \xff\xfe, 198.51.100.7, 10.0.0.2"],
                "198.51.100.7",
            ),
            // Right next to the trusted hops, it stops the walk at the last of them.
            (&[b"6.6.6.6, 1.2.\xff.4, 10.0.0.2"], "10.0.0.2"),
        ];
        for (lines, expected) in cases {
            let h = raw("x-forwarded-for", lines);
            assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip(expected), "{lines:?}");
        }
        let r = ClientIpResolver::new(ClientIpConfig {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            header: ForwardedHeader::Forwarded,
            ..Default::default()
        });
        let h = raw("forwarded", &[b"for=\xff;by=\"\xfe\", for=198.51.100.7"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        let h = raw("forwarded", &[b"for=\xff", b"for=198.51.100.7;proto=https"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        let h = raw("forwarded", &[b"for=198.51.100.7, for=\xff, for=10.0.0.2"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("10.0.0.2"));
    }

    #[test]
    fn ports_and_brackets_are_understood() {
        let r = resolver(&["10.0.0.0/8"]);
        for (entry, expected) in [
            ("198.51.100.7:4711", "198.51.100.7"),
            ("[2001:db8::7]:443", "2001:db8::7"),
            ("[2001:db8::7]", "2001:db8::7"),
            ("\"198.51.100.7\"", "198.51.100.7"),
            (" 198.51.100.7 ", "198.51.100.7"),
        ] {
            let h = headers("x-forwarded-for", &[entry]);
            assert_eq!(
                r.resolve(ip("10.0.0.1"), &h),
                ip(expected),
                "entry {entry:?}"
            );
        }
    }

    #[test]
    fn forwarded_header_is_walked_the_same_way() {
        let r = ClientIpResolver::new(ClientIpConfig {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            header: ForwardedHeader::Forwarded,
            ..Default::default()
        });
        let h = headers(
            "forwarded",
            &["for=6.6.6.6, for=\"[2001:db8::7]:443\";proto=https, for=10.0.0.2"],
        );
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("2001:db8::7"));
        let obfuscated = headers("forwarded", &["for=6.6.6.6, for=_hidden, for=10.0.0.2"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &obfuscated), ip("10.0.0.2"));
        // X-Forwarded-For is not read when Forwarded is configured.
        let xff = headers("x-forwarded-for", &["6.6.6.6"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &xff), ip("10.0.0.1"));
    }

    #[test]
    fn commas_and_semicolons_inside_quoted_forwarded_values_do_not_split() {
        let r = ClientIpResolver::new(ClientIpConfig {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            header: ForwardedHeader::Forwarded,
            ..Default::default()
        });
        for line in [
            r#"for=203.0.113.15;by="a,b""#,
            r#"for=203.0.113.15;by="a;for=10.0.0.9,x""#,
            r#"by="\",\"";for="203.0.113.15""#,
            r#"FOR="203.0.113.15:4711";proto=https"#,
        ] {
            let h = headers("forwarded", &[line]);
            assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("203.0.113.15"), "{line}");
        }
        // An unclosed quote is unreadable: the walk stops at the trusted peer.
        let h = headers("forwarded", &[r#"for=203.0.113.15;by="a,b"#]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn ten_thousand_entries_cost_only_the_last_few() {
        let r = resolver(&["10.0.0.0/8"]);
        let mut long = vec!["6.6.6.6"; 10_000].join(",");
        long.push_str(",10.0.0.3");
        let h = headers("x-forwarded-for", &[&long]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("6.6.6.6"));
        let all_trusted = vec!["10.1.1.1"; 10_000].join(",");
        let h = headers("x-forwarded-for", &[&all_trusted]);
        assert_eq!(
            r.resolve(ip("10.0.0.1"), &h),
            ip("10.1.1.1"),
            "stops after MAX_HOPS at a trusted hop"
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4_and_ipv6_is_grouped() {
        let r = resolver(&[]);
        assert_eq!(
            r.resolve(ip("::ffff:203.0.113.7"), &HeaderMap::new()),
            ip("203.0.113.7")
        );
        assert_eq!(r.key(ip("::ffff:203.0.113.7")), "203.0.113.7");
        assert_eq!(r.key(ip("2001:db8:1:2:aaaa::1")), "2001:db8:1:2::/64");
        assert_eq!(r.key(ip("2001:db8:1:2:ffff:1:2:3")), "2001:db8:1:2::/64");
        assert_ne!(r.key(ip("2001:db8:1:3::1")), r.key(ip("2001:db8:1:2::1")));
    }

    #[test]
    fn hashed_keys_hide_the_address_but_stay_stable() {
        let r = ClientIpResolver::new(ClientIpConfig {
            hash_secret: Some(b"s3cret".to_vec()),
            ..Default::default()
        });
        let key = r.key(ip("203.0.113.7"));
        assert!(key.starts_with("ip:") && key.len() == 35, "{key}");
        assert!(!key.contains("203.0.113"));
        assert_eq!(key, r.key(ip("203.0.113.7")));
        assert_ne!(key, r.key(ip("203.0.113.8")));
        let other = ClientIpResolver::new(ClientIpConfig {
            hash_secret: Some(b"other".to_vec()),
            ..Default::default()
        });
        assert_ne!(key, other.key(ip("203.0.113.7")), "the secret matters");
        assert!(
            !format!("{:?}", r.config()).contains("s3cret"),
            "Debug hides the secret"
        );
    }
}
