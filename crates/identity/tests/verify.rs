//! What a token must be to be believed: signed with a configured key, by a configured
//! algorithm, unexpired, for the configured issuer and audience. Every way of getting
//! that wrong gives no claims. Keys are made by `openssl` for each run.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use sluice_identity::{Caller, JwtConfig, JwtVerifier, TokenSource, Unverified, claim_text};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "user-42", "plan": "pro", "org": 7, "exp": now() + 600,
                       "iss": "https://id.example", "aud": "api"});
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {args:?}");
}

/// A private key and its public PEM, of `kind`: rsa, ec or ed25519.
fn keypair(dir: &Path, kind: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{kind}.key"));
    let public = dir.join(format!("{kind}.pub"));
    let p = private.to_str().expect("path");
    match kind {
        "rsa" => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            p,
        ]),
        "ec" => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            p,
        ]),
        _ => openssl(&["genpkey", "-algorithm", "ED25519", "-out", p]),
    }
    openssl(&[
        "pkey",
        "-in",
        p,
        "-pubout",
        "-out",
        public.to_str().expect("path"),
    ]);
    if kind == "ec" {
        // jsonwebtoken signs ES256 with a PKCS#8 key.
        let pk8 = dir.join("ec.pk8");
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            p,
            "-out",
            pk8.to_str().expect("path"),
        ]);
        return (pk8, public);
    }
    (private, public)
}

/// Header lines of a request, as sent (bytes), what the caller is taken to be, and why.
type Case = (Vec<(&'static str, Vec<u8>)>, &'static str, &'static str);

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, key).expect("sign")
}

fn strict(algorithms: Vec<Algorithm>) -> JwtConfig {
    let mut config = JwtConfig::new(algorithms);
    config.issuers = vec!["https://id.example".into()];
    config.audiences = vec!["api".into()];
    config.leeway = Duration::from_secs(5);
    config
}

#[test]
fn hs256_tokens_verify_and_every_forgery_does_not() {
    let mut config = strict(vec![Algorithm::HS256]);
    config.secret = Some(SECRET.into());
    let verifier = JwtVerifier::new(&config).expect("verifier");
    let key = EncodingKey::from_secret(SECRET.as_bytes());

    let good = verifier.verify(&sign(Algorithm::HS256, &key, None, &claims(json!({}))));
    let good = good.expect("a valid token verifies");
    assert_eq!(claim_text(&good, "sub").as_deref(), Some("user-42"));
    assert_eq!(claim_text(&good, "org").as_deref(), Some("7"));
    assert_eq!(claim_text(&good, "missing"), None);

    let other = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!");
    let forged = sign(Algorithm::HS256, &other, None, &claims(json!({})));
    assert!(verifier.verify(&forged).is_none(), "wrong key");

    let expired = claims(json!({"exp": now() - 60}));
    assert!(
        verifier
            .verify(&sign(Algorithm::HS256, &key, None, &expired))
            .is_none()
    );
    let no_exp = {
        let mut c = claims(json!({}));
        c.as_object_mut().expect("object").remove("exp");
        c
    };
    assert!(
        verifier
            .verify(&sign(Algorithm::HS256, &key, None, &no_exp))
            .is_none(),
        "exp is required"
    );
    let early = claims(json!({"nbf": now() + 600}));
    assert!(
        verifier
            .verify(&sign(Algorithm::HS256, &key, None, &early))
            .is_none(),
        "not yet valid"
    );
    let wrong_aud = claims(json!({"aud": "billing"}));
    assert!(
        verifier
            .verify(&sign(Algorithm::HS256, &key, None, &wrong_aud))
            .is_none()
    );
    let wrong_iss = claims(json!({"iss": "https://evil.example"}));
    assert!(
        verifier
            .verify(&sign(Algorithm::HS256, &key, None, &wrong_iss))
            .is_none()
    );
    let hs512 = sign(Algorithm::HS512, &key, None, &claims(json!({})));
    assert!(
        verifier.verify(&hs512).is_none(),
        "an algorithm not configured"
    );

    // alg: none, with the payload of a valid token and no signature.
    let valid = sign(
        Algorithm::HS256,
        &key,
        None,
        &claims(json!({"sub": "admin"})),
    );
    let payload = valid.split('.').nth(1).expect("payload");
    for header in ["eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJhbGciOiJOb25lIn0"] {
        for tail in ["", "."] {
            let none = format!("{header}.{payload}{tail}");
            assert!(verifier.verify(&none).is_none(), "alg none: {none}");
        }
    }
    // Garbage of every shape.
    for junk in ["", "a", "a.b", "a.b.c", "...", &"x".repeat(20_000)] {
        assert!(verifier.verify(junk).is_none(), "{junk:.20}");
    }
}

#[test]
fn public_keys_verify_their_own_family_only() {
    let dir = tempfile::tempdir().expect("dir");
    let (rsa_private, rsa_public) = keypair(dir.path(), "rsa");
    let (ec_private, ec_public) = keypair(dir.path(), "ec");
    let (ed_private, ed_public) = keypair(dir.path(), "ed25519");
    let mut config = strict(vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]);
    config.public_keys = vec![rsa_public.clone(), ec_public, ed_public];
    let verifier = JwtVerifier::new(&config).expect("verifier");

    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(&rsa_private).expect("key")).expect("rsa");
    let ec = EncodingKey::from_ec_pem(&std::fs::read(&ec_private).expect("key")).expect("ec");
    let ed = EncodingKey::from_ed_pem(&std::fs::read(&ed_private).expect("key")).expect("ed");
    for (alg, key) in [
        (Algorithm::RS256, &rsa),
        (Algorithm::ES256, &ec),
        (Algorithm::EdDSA, &ed),
    ] {
        let token = sign(alg, key, None, &claims(json!({})));
        assert!(verifier.verify(&token).is_some(), "{alg:?} verifies");
    }

    // The HS/RS confusion: an HMAC token keyed with the RSA public key's bytes.
    let public_bytes = std::fs::read(&rsa_public).expect("public key");
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_bytes),
        None,
        &claims(json!({"sub": "admin"})),
    );
    assert!(
        verifier.verify(&confused).is_none(),
        "HS256 is not configured"
    );
    // Even when HS256 is configured beside RS256, the public key never keys HMAC.
    let mut both = config.clone();
    both.algorithms.push(Algorithm::HS256);
    both.secret = Some(SECRET.into());
    let both = JwtVerifier::new(&both).expect("verifier");
    assert!(both.verify(&confused).is_none(), "HS/RS confusion");

    // A private key is refused where a public one belongs.
    let mut private = strict(vec![Algorithm::RS256]);
    private.public_keys = vec![rsa_private];
    let error = JwtVerifier::new(&private)
        .expect_err("private key")
        .to_string();
    assert!(error.contains("private key"), "{error}");
}

#[test]
fn configuration_mistakes_are_refused_with_a_reason() {
    assert!(JwtVerifier::new(&JwtConfig::new(vec![])).is_err());
    let no_key = JwtVerifier::new(&JwtConfig::new(vec![Algorithm::RS256]))
        .expect_err("no key")
        .to_string();
    assert!(
        no_key.contains("RS256") && no_key.contains("public_keys"),
        "{no_key}"
    );
    let mut short = JwtConfig::new(vec![Algorithm::HS256]);
    short.secret = Some("short".into());
    let error = JwtVerifier::new(&short).expect_err("short").to_string();
    assert!(error.contains("32"), "{error}");
}

#[test]
fn the_token_comes_from_one_bearer_header_or_one_cookie() {
    let mut config = JwtConfig::new(vec![Algorithm::HS256]);
    config.secret = Some(SECRET.into());
    let bearer = JwtVerifier::new(&config).expect("verifier");
    let token = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        None,
        &claims(json!({})),
    );
    let caller = |verifier: &JwtVerifier, values: &[(&str, &[u8])]| {
        let mut headers = http::HeaderMap::new();
        for (name, value) in values {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                http::HeaderValue::from_bytes(value).expect("value"),
            );
        }
        match verifier.caller(&headers) {
            Caller::Verified(claims) => claim_text(&claims, "sub").unwrap_or_default(),
            Caller::Anonymous => "anonymous".into(),
            Caller::Refused => "refused".into(),
        }
    };
    let bearer_of = |text: &str| format!("Bearer {text}");
    let auth = |value: &str| ("authorization", value.as_bytes().to_vec());
    let run = |verifier: &JwtVerifier, values: Vec<(&'static str, Vec<u8>)>| {
        let refs: Vec<(&str, &[u8])> = values.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        caller(verifier, &refs)
    };
    let cases: Vec<Case> = vec![
        (
            vec![auth(&format!("bEaReR {token}"))],
            "user-42",
            "the scheme in any case",
        ),
        (
            vec![auth(&format!("Bearer\t{token}"))],
            "user-42",
            "a tab after the scheme",
        ),
        (
            vec![auth(&bearer_of(&token)), auth(&bearer_of(&token))],
            "user-42",
            "the same token twice is one token",
        ),
        (
            vec![auth(&bearer_of(&token)), auth("Bearer other")],
            "refused",
            "two different credentials, one a JWT: an app may read either",
        ),
        (
            vec![auth(&format!("Bearer {token}="))],
            "refused",
            "a padded signature, which lenient decoders accept",
        ),
        (
            vec![(
                "authorization",
                [b"Bearer ".as_slice(), token.as_bytes(), b"\xff"].concat(),
            )],
            "refused",
            "a byte outside ASCII does not hide the token",
        ),
        (
            vec![auth(&format!("Basic {token}"))],
            "user-42",
            "a JWT after any scheme: apps that split the value take it",
        ),
        (
            vec![auth(&format!("JWT {token}"))],
            "user-42",
            "the `JWT` scheme",
        ),
        (
            vec![auth(&token)],
            "user-42",
            "a bare token (`replace(\"Bearer \", \"\")`)",
        ),
        (
            vec![(
                "authorization",
                [b"Bearer\xa0".as_slice(), token.as_bytes()].concat(),
            )],
            "user-42",
            "a no-break space after the scheme, which JavaScript's \\s and Python's split() take",
        ),
        (
            vec![(
                "authorization",
                [b"Bearer\x85".as_slice(), token.as_bytes()].concat(),
            )],
            "user-42",
            "NEL after the scheme, which Python's split() takes",
        ),
        (
            vec![auth(&format!("Bearer {token} a.b.c"))],
            "refused",
            "two JWTs in one value",
        ),
        (
            vec![auth("Basic dXNlcjpwYXNz")],
            "anonymous",
            "Basic credentials",
        ),
        (
            vec![auth("Bearer sk-live-0123456789")],
            "anonymous",
            "an API key is no JWT",
        ),
        (vec![], "anonymous", "no credential"),
    ];
    for (values, expected, why) in cases {
        assert_eq!(run(&bearer, values), expected, "{why}");
    }

    // With `unverified: anonymous`, a JWT that does not verify is a stranger.
    let mut lenient = config.clone();
    lenient.unverified = Unverified::Anonymous;
    let lenient = JwtVerifier::new(&lenient).expect("verifier");
    assert_eq!(
        run(&lenient, vec![auth(&format!("Bearer {token}="))]),
        "anonymous"
    );

    config.source = TokenSource::Cookie("id".into());
    let cookie = JwtVerifier::new(&config).expect("verifier");
    let line = |text: String| ("cookie", text.into_bytes());
    let cases: Vec<Case> = vec![
        (
            vec![line(format!("a=1; id={token}"))],
            "user-42",
            "one cookie",
        ),
        (
            vec![line(format!("id=\"{token}\""))],
            "user-42",
            "a quoted value",
        ),
        (
            vec![
                line(format!("id={token}")),
                line(format!("x=1; id={token}")),
            ],
            "user-42",
            "the same value twice",
        ),
        (
            vec![line(format!("id=junk; id={token}"))],
            "refused",
            "two values of the name, one a JWT",
        ),
        (
            vec![(
                "cookie",
                [format!("id={token}; theme=caf").as_bytes(), b"\xc3\xa9"].concat(),
            )],
            "user-42",
            "a byte outside ASCII elsewhere in the line",
        ),
        (
            vec![line("id=a.b.c".into())],
            "refused",
            "a JWT that does not verify",
        ),
        (
            vec![line(format!("id=\"{}\"", token.replace('.', "\\056")))],
            "refused",
            "dots written as octal escapes, which Python's cookie parser unquotes",
        ),
        (
            vec![line("id=junk".into())],
            "refused",
            "anything in the token's cookie",
        ),
        (
            vec![(
                "cookie",
                [b"a=1;\xa0id=".as_slice(), token.as_bytes()].concat(),
            )],
            "user-42",
            "a no-break space before the name, which Python's strip() removes",
        ),
        (
            vec![(
                "cookie",
                [b"\x85id\xa0=".as_slice(), token.as_bytes()].concat(),
            )],
            "user-42",
            "NEL and a no-break space around the name",
        ),
        (vec![line("other=1".into())], "anonymous", "no such cookie"),
    ];
    for (values, expected, why) in cases {
        assert_eq!(run(&cookie, values), expected, "cookie: {why}");
    }
}

#[test]
fn a_configured_issuer_or_audience_must_be_in_the_token() {
    let mut config = strict(vec![Algorithm::HS256]);
    config.secret = Some(SECRET.into());
    let verifier = JwtVerifier::new(&config).expect("verifier");
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let with = |claims: Value| verifier.verify(&sign(Algorithm::HS256, &key, None, &claims));
    let mut no_aud = claims(json!({}));
    no_aud.as_object_mut().expect("object").remove("aud");
    let mut no_iss = claims(json!({}));
    no_iss.as_object_mut().expect("object").remove("iss");
    assert!(with(claims(json!({}))).is_some());
    assert!(
        with(no_aud).is_none(),
        "a token for no audience is for another service"
    );
    assert!(with(no_iss).is_none(), "a token from no issuer");
    assert!(
        with(claims(json!({"aud": 7}))).is_none(),
        "a numeric audience"
    );
    assert!(
        with(claims(json!({"iss": 7}))).is_none(),
        "a numeric issuer"
    );
}

#[test]
fn claims_that_json_reads_as_rounded_numbers_do_not_resolve() {
    let mut config = strict(vec![Algorithm::HS256]);
    config.secret = Some(SECRET.into());
    let verifier = JwtVerifier::new(&config).expect("verifier");
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    // Written by hand: 123456789012345678901 is past 64 bits.
    let token = sign(
        Algorithm::HS256,
        &key,
        None,
        &claims(json!({"big": 1.5, "neg": -7})),
    );
    let claims = verifier.verify(&token).expect("verifies");
    assert_eq!(claim_text(&claims, "big"), None, "a fraction");
    assert_eq!(claim_text(&claims, "neg").as_deref(), Some("-7"));
    let parsed: Value = serde_json::from_str(r#"{"sub": 123456789012345678901}"#).expect("json");
    let map = parsed.as_object().expect("object").clone();
    assert_eq!(claim_text(&map, "sub"), None, "a whole number past 64 bits");
}

/// base64url of big-endian bytes given in hex.
fn b64url_hex(hex: &str) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWKS with the RSA public key of `private` under `kid`.
fn rsa_jwks(private: &Path, kid: &str) -> String {
    let out = Command::new("openssl")
        .args([
            "rsa",
            "-in",
            private.to_str().expect("path"),
            "-noout",
            "-modulus",
        ])
        .output()
        .expect("openssl");
    let text = String::from_utf8(out.stdout).expect("utf8");
    let modulus = text.trim().trim_start_matches("Modulus=");
    json!({"keys": [{"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                      "n": b64url_hex(modulus), "e": "AQAB"}]})
    .to_string()
}

/// Serves `body` for every request, after `delay`, on a free port.
fn serve(body: String, delay: Duration) -> String {
    serve_current(std::sync::Arc::new(std::sync::Mutex::new(body)), delay)
}

/// Serves whatever `body` holds when a request comes, after `delay`, on a free port.
fn serve_current(body: std::sync::Arc<std::sync::Mutex<String>>, delay: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                std::thread::sleep(delay);
                let body = body.lock().expect("body").clone();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    url
}

/// Waits (up to 5 s) until the JWKS URL has been fetched and `token` verifies.
fn wait_until_verified(verifier: &JwtVerifier, token: &str) {
    let started = Instant::now();
    while verifier.verify(token).is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the JWKS URL was fetched"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn jwks_keys_are_chosen_by_kid_from_a_file_and_from_a_url() {
    let dir = tempfile::tempdir().expect("dir");
    let (private, _) = keypair(dir.path(), "rsa");
    let signing = EncodingKey::from_rsa_pem(&std::fs::read(&private).expect("key")).expect("rsa");
    let token = sign(Algorithm::RS256, &signing, Some("k1"), &claims(json!({})));
    let wrong_kid = sign(Algorithm::RS256, &signing, Some("k2"), &claims(json!({})));

    let file = dir.path().join("jwks.json");
    std::fs::write(&file, rsa_jwks(&private, "k1")).expect("write");
    let mut config = strict(vec![Algorithm::RS256]);
    config.jwks_file = Some(file);
    let verifier = JwtVerifier::new(&config).expect("verifier");
    assert!(verifier.verify(&token).is_some());
    assert!(verifier.verify(&wrong_kid).is_none(), "no key has that kid");

    let mut config = strict(vec![Algorithm::RS256]);
    config.jwks_url = Some(serve(rsa_jwks(&private, "k1"), Duration::ZERO));
    let verifier = JwtVerifier::new(&config).expect("verifier");
    wait_until_verified(&verifier, &token);

    // A provider that does not answer: nothing verifies, and nothing waits on it.
    let mut config = strict(vec![Algorithm::RS256]);
    config.jwks_url = Some(serve(rsa_jwks(&private, "k1"), Duration::from_secs(30)));
    config.jwks_timeout = Duration::from_millis(200);
    let verifier = JwtVerifier::new(&config).expect("verifier");
    let started = Instant::now();
    assert!(verifier.verify(&token).is_none());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        verifier.verify(&token).is_none(),
        "a slow JWKS never vouches"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "verify never waits for the URL"
    );
    // A provider that is down.
    let mut config = strict(vec![Algorithm::RS256]);
    config.jwks_url = Some("http://127.0.0.1:1/jwks.json".into());
    let verifier = JwtVerifier::new(&config).expect("verifier");
    std::thread::sleep(Duration::from_millis(200));
    assert!(verifier.verify(&token).is_none());
}

/// Flips the last character of a token's signature: the same header and claims, a
/// signature that no key made.
fn altered(token: &str) -> String {
    let mut altered = token.to_string();
    let last = altered.pop().expect("a token");
    altered.push(if last == 'A' { 'B' } else { 'A' });
    altered
}

#[test]
fn a_token_is_checked_once_and_remembered_only_until_it_expires() {
    let mut config = strict(vec![Algorithm::HS256]);
    config.secret = Some(SECRET.into());
    config.leeway = Duration::ZERO;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let expires = now() + 2;
    let token = sign(
        Algorithm::HS256,
        &key,
        None,
        &claims(json!({"exp": expires})),
    );
    let verifier = JwtVerifier::new(&config).expect("verifier");
    for _ in 0..100 {
        let claims = verifier.verify(&token).expect("verifies");
        assert_eq!(claim_text(&claims, "sub").as_deref(), Some("user-42"));
    }
    assert_eq!(
        verifier.signature_checks().checked,
        1,
        "one signature check for a hundred requests with the same token"
    );

    // A copy with another signature is another token: checked, and refused.
    assert!(verifier.verify(&altered(&token)).is_none());
    assert!(verifier.verify(&altered(&token)).is_none());
    let checks = verifier.signature_checks();
    assert_eq!((checks.checked, checks.verified), (3, 1));

    // Remembered or not, an expired token is refused.
    while now() <= expires {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        verifier.verify(&token).is_none(),
        "expired while remembered"
    );

    // With the cache off, every request's token is checked.
    config.cache_entries = 0;
    let verifier = JwtVerifier::new(&config).expect("verifier");
    let token = sign(Algorithm::HS256, &key, None, &claims(json!({})));
    for _ in 0..10 {
        assert!(verifier.verify(&token).is_some());
    }
    assert_eq!(verifier.signature_checks().checked, 10);
}

#[test]
fn remembered_tokens_keep_their_own_claims_when_the_cache_is_full() {
    let mut config = strict(vec![Algorithm::HS256]);
    config.secret = Some(SECRET.into());
    config.cache_entries = 2;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let tokens: Vec<(String, String)> = (0..6)
        .map(|n| {
            let sub = format!("user-{n}");
            let token = sign(Algorithm::HS256, &key, None, &claims(json!({"sub": sub})));
            (sub, token)
        })
        .collect();
    let verifier = JwtVerifier::new(&config).expect("verifier");
    for _ in 0..3 {
        for (sub, token) in &tokens {
            let claims = verifier.verify(token).expect("verifies");
            assert_eq!(claim_text(&claims, "sub").as_deref(), Some(sub.as_str()));
        }
    }
    let checks = verifier.signature_checks();
    assert!(
        checks.checked > 6,
        "six tokens do not fit in two entries: some were checked again ({checks:?})"
    );
    assert_eq!(checks.checked, checks.verified);
}

#[test]
fn a_remembered_token_is_checked_again_when_the_jwks_url_changes_its_keys() {
    let dir = tempfile::tempdir().expect("dir");
    let (private, _) = keypair(dir.path(), "rsa");
    let signing = EncodingKey::from_rsa_pem(&std::fs::read(&private).expect("key")).expect("rsa");
    let token = sign(Algorithm::RS256, &signing, Some("k1"), &claims(json!({})));
    let other_dir = tempfile::tempdir().expect("dir");
    let (other_private, _) = keypair(other_dir.path(), "rsa");

    let body = std::sync::Arc::new(std::sync::Mutex::new(rsa_jwks(&private, "k1")));
    let mut config = strict(vec![Algorithm::RS256]);
    config.jwks_url = Some(serve_current(body.clone(), Duration::ZERO));
    config.jwks_refresh = Duration::from_secs(1);
    let verifier = JwtVerifier::new(&config).expect("verifier");
    wait_until_verified(&verifier, &token);
    assert!(verifier.verify(&token).is_some(), "remembered");
    // Refreshes that serve the same keys keep it remembered.
    let checked = verifier.signature_checks().checked;
    std::thread::sleep(Duration::from_millis(2500));
    assert!(verifier.verify(&token).is_some());
    assert_eq!(
        verifier.signature_checks().checked,
        checked,
        "the same JWKS fetched again sent the token back to a signature check"
    );

    // The provider replaces the key under the same kid (a leaked key rotated out):
    // the token it signed stops verifying at the next refresh, remembered or not.
    *body.lock().expect("body") = rsa_jwks(&other_private, "k1");
    let rotated = Instant::now();
    while verifier.verify(&token).is_some() {
        assert!(
            rotated.elapsed() < Duration::from_secs(5),
            "a token signed by a key the provider dropped is still believed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn keys_sluice_cannot_use_are_skipped_one_by_one() {
    let dir = tempfile::tempdir().expect("dir");
    let (private, _) = keypair(dir.path(), "rsa");
    let signing = EncodingKey::from_rsa_pem(&std::fs::read(&private).expect("key")).expect("rsa");
    let token = sign(Algorithm::RS256, &signing, Some("k1"), &claims(json!({})));
    let mut set: Value = serde_json::from_str(&rsa_jwks(&private, "k1")).expect("json");
    let keys = set["keys"].as_array_mut().expect("keys");
    // Kinds jsonwebtoken does not read: an X25519 encryption key, and ES512.
    keys.insert(
        0,
        json!({"kty": "OKP", "crv": "X25519", "use": "enc", "kid": "enc1",
                          "x": "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"}),
    );
    keys.insert(
        0,
        json!({"kty": "EC", "crv": "P-521", "alg": "ES512", "kid": "e5",
                          "x": "AQ", "y": "AQ"}),
    );
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, set.to_string()).expect("write");
    let mut config = strict(vec![Algorithm::RS256]);
    config.jwks_file = Some(file.clone());
    let verifier = JwtVerifier::new(&config).expect("the usable key is read");
    assert!(verifier.verify(&token).is_some());

    // A key published for encryption never verifies a signature.
    let mut only_enc: Value = serde_json::from_str(&rsa_jwks(&private, "k1")).expect("json");
    only_enc["keys"][0]["use"] = "enc".into();
    std::fs::write(&file, only_enc.to_string()).expect("write");
    assert!(
        JwtVerifier::new(&config).is_err(),
        "no signing key: a config error"
    );
}

#[test]
fn a_reload_keeps_the_keys_the_provider_served_while_it_is_down() {
    let dir = tempfile::tempdir().expect("dir");
    let (private, _) = keypair(dir.path(), "rsa");
    let signing = EncodingKey::from_rsa_pem(&std::fs::read(&private).expect("key")).expect("rsa");
    let token = sign(Algorithm::RS256, &signing, Some("k1"), &claims(json!({})));
    let body = std::sync::Arc::new(std::sync::Mutex::new(rsa_jwks(&private, "k1")));
    let mut config = strict(vec![Algorithm::RS256]);
    config.jwks_url = Some(serve_current(body.clone(), Duration::ZERO));
    let running = JwtVerifier::new(&config).expect("verifier");
    wait_until_verified(&running, &token);

    *body.lock().expect("body") = "503: down for maintenance".into();
    let reloaded = JwtVerifier::new(&config).expect("verifier");
    std::thread::sleep(Duration::from_millis(300));
    assert!(reloaded.verify(&token).is_none(), "its own fetch failed");
    reloaded.keep_fetched_keys_of(&running);
    assert!(
        reloaded.verify(&token).is_some(),
        "the keys known before the reload"
    );

    // Another URL's keys are not taken over.
    let mut other = config.clone();
    other.jwks_url = Some(serve_current(body.clone(), Duration::ZERO));
    let elsewhere = JwtVerifier::new(&other).expect("verifier");
    elsewhere.keep_fetched_keys_of(&running);
    assert!(elsewhere.verify(&token).is_none());
}

#[test]
fn a_token_naming_a_key_not_yet_fetched_has_the_keys_fetched_early() {
    let dir = tempfile::tempdir().expect("dir");
    let (old_private, _) = keypair(dir.path(), "rsa");
    let new_dir = tempfile::tempdir().expect("dir");
    let (new_private, _) = keypair(new_dir.path(), "rsa");
    let signer = |private: &Path, kid: &str| {
        let key = EncodingKey::from_rsa_pem(&std::fs::read(private).expect("key")).expect("rsa");
        sign(Algorithm::RS256, &key, Some(kid), &claims(json!({})))
    };
    let body = std::sync::Arc::new(std::sync::Mutex::new(rsa_jwks(&old_private, "old")));
    let mut config = strict(vec![Algorithm::RS256]);
    config.jwks_url = Some(serve_current(body.clone(), Duration::ZERO));
    config.jwks_refresh = Duration::from_secs(3600);
    let verifier = JwtVerifier::new(&config).expect("verifier");
    wait_until_verified(&verifier, &signer(&old_private, "old"));

    // The provider publishes a new key and signs with it at once: the first token that
    // names it has the keys fetched now, not in an hour.
    let mut both: Value = serde_json::from_str(&rsa_jwks(&old_private, "old")).expect("json");
    let new: Value = serde_json::from_str(&rsa_jwks(&new_private, "new")).expect("json");
    both["keys"]
        .as_array_mut()
        .expect("keys")
        .push(new["keys"][0].clone());
    *body.lock().expect("body") = both.to_string();
    wait_until_verified(&verifier, &signer(&new_private, "new"));
}
