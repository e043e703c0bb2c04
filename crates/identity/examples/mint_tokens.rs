//! Signs tokens for the JWT benchmark (`bench/jwt-proxy.sh`): one per user, each valid
//! for an hour, one per line on stdout.
//!
//! ```sh
//! cargo run --release -p sluice-identity --example mint_tokens -- ES256 ec.pk8 1000
//! ```
//!
//! The key is a PKCS#8 PEM private key of the algorithm's family (`openssl genpkey`).

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [algorithm, key_path, count] = args.as_slice() else {
        return Err("usage: mint_tokens ALGORITHM PRIVATE_KEY_PEM COUNT".into());
    };
    let algorithm: Algorithm = algorithm.parse()?;
    let pem = std::fs::read(key_path)?;
    let key = match algorithm {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => EncodingKey::from_rsa_pem(&pem)?,
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem)?,
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem)?,
        _ => return Err("RS*, ES256/384 or EdDSA".into()),
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    for n in 0..count.parse::<u64>()? {
        let claims = serde_json::json!({
            "sub": format!("user-{n}"),
            "iss": "https://id.bench",
            "aud": "api",
            "iat": now,
            "exp": now + 3600,
        });
        println!("{}", encode(&Header::new(algorithm), &claims, &key)?);
    }
    Ok(())
}
