//! Property tests over the header parsers with arbitrary input: they never panic, an
//! untrusted peer's headers are never believed, and whatever a client writes to the
//! left of the entry its trusted proxy appended cannot change the resolved address.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use sluice_http::{ClientIpConfig, ClientIpResolver, ForwardedHeader, KeyTemplate, normalize_path};

fn resolver(header: ForwardedHeader) -> ClientIpResolver {
    ClientIpResolver::new(ClientIpConfig {
        trusted_proxies: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        header,
        ..Default::default()
    })
}

fn header_map(name: &'static str, value: &str) -> Option<HeaderMap> {
    let value = HeaderValue::from_str(value).ok()?;
    let mut map = HeaderMap::new();
    map.insert(name, value);
    Some(map)
}

/// Header-ish text: separators, brackets, quotes, digits, hex, colons and junk.
fn junk() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just(",".to_string()),
            Just(";".to_string()),
            Just("for=".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just("\"".to_string()),
            Just(":".to_string()),
            Just(" ".to_string()),
            Just("unknown".to_string()),
            Just("_obf".to_string()),
            "[0-9]{1,4}".prop_map(|s| s),
            "[0-9a-f]{1,4}".prop_map(|s| s),
            Just(".".to_string()),
            Just("::".to_string()),
            Just("10.0.0.7".to_string()),
            Just("203.0.113.9".to_string()),
            Just("::ffff:1.2.3.4".to_string()),
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

fn public_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (1u8..=9, any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c, d)| IpAddr::from([a, b, c, d])),
        any::<[u16; 8]>().prop_map(|mut s| {
            s[0] = 0x2001;
            IpAddr::from(s)
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn untrusted_peers_are_never_overridden(value in junk(), header in prop_oneof![Just(ForwardedHeader::XForwardedFor), Just(ForwardedHeader::Forwarded)]) {
        let name = if header == ForwardedHeader::Forwarded { "forwarded" } else { "x-forwarded-for" };
        if let Some(headers) = header_map(name, &value) {
            let peer: IpAddr = "198.51.100.1".parse().unwrap();
            prop_assert_eq!(resolver(header).resolve(peer, &headers), peer);
        }
    }

    #[test]
    fn client_text_left_of_the_proxy_entry_cannot_spoof(prefix in junk(), real in public_ip()) {
        let xff = format!("{prefix}, {real}");
        if let Some(headers) = header_map("x-forwarded-for", &xff) {
            let got = resolver(ForwardedHeader::XForwardedFor).resolve("10.0.0.1".parse().unwrap(), &headers);
            prop_assert_eq!(got, real, "XFF {:?}", xff);
        }
        let real_node = match real { IpAddr::V6(v6) => format!("\"[{v6}]\""), IpAddr::V4(v4) => v4.to_string() };
        let forwarded = format!("{prefix}, for={real_node}");
        if let Some(headers) = header_map("forwarded", &forwarded) {
            let got = resolver(ForwardedHeader::Forwarded).resolve("10.0.0.1".parse().unwrap(), &headers);
            prop_assert_eq!(got, real, "Forwarded {:?}", forwarded);
        }
    }

    #[test]
    fn the_resolved_address_is_the_peer_or_was_in_the_header(value in junk()) {
        if let Some(headers) = header_map("x-forwarded-for", &value) {
            let peer: IpAddr = "10.0.0.1".parse().unwrap();
            let got = resolver(ForwardedHeader::XForwardedFor).resolve(peer, &headers);
            let mentioned = value.split(',').filter_map(sluice_http::client_ip::parse_forwarded_for_entry)
                .any(|ip| sluice_http::client_ip::canonical(ip) == got);
            prop_assert!(got == peer || mentioned, "{got} from {value:?}");
        }
    }

    #[test]
    fn template_and_path_parsers_never_panic(text in "\\PC{0,60}", raw in "[/%a-zA-Z0-9.é~_-]{0,40}") {
        let _ = text.parse::<KeyTemplate>();
        let path = normalize_path(&raw);
        prop_assert!(path.starts_with('/'));
        prop_assert!(!path.contains("//"));
        prop_assert_eq!(normalize_path(&path), path.clone(), "normalising twice changes nothing");
    }
}
