//! Redis-only storage settings: `storage.tls` (certificates for `rediss://`) and
//! `storage.sentinel` (find the primary through Redis Sentinel).
//!
//! ```yaml
//! storage:
//!   backend: redis
//!   url: rediss://sluice:${REDIS_PASSWORD}@redis.internal:6380
//!   tls:
//!     ca_file: /etc/sluice/redis-ca.pem     # the CA that signed the server's certificate
//!     cert_file: /etc/sluice/client.pem     # with key_file: a client certificate
//!     key_file: /etc/sluice/client.key
//! ```
//!
//! The files are read and checked when the config is loaded, so an unreadable file or
//! one without a certificate (or key) is an error with its place, not a failure at the
//! first connection. Relative paths are read from the config file's directory.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::de::{Located, Place};
use crate::error::Fail;
use crate::tree::shorten;
use crate::{RedisSentinel, RedisTls, Secret};

/// `storage.tls:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    ca_file: Option<Located<String>>,
    cert_file: Option<Located<String>>,
    key_file: Option<Located<String>>,
}

/// `storage.sentinel:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SentinelSection {
    master: Option<Located<String>>,
    nodes: Option<Located<Vec<Located<String>>>>,
}

impl TlsSection {
    /// The files' contents, each checked; `at` is the section's place.
    pub(crate) fn build(self, at: &Place, source: &str) -> Result<RedisTls, Fail> {
        let base = Path::new(source).parent().unwrap_or(Path::new(""));
        let ca = self
            .ca_file
            .map(|file| read_pem(&file, base, Pem::Certificates))
            .transpose()?;
        let client = match (self.cert_file, self.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                read_pem(&cert, base, Pem::Certificates)?,
                Secret::new(read_pem(&key, base, Pem::Key)?),
            )),
            (Some(cert), None) => {
                return Err(cert.at.fail(
                    "storage.tls.cert_file needs key_file: give the client certificate's private key too",
                ));
            }
            (None, Some(key)) => {
                return Err(key.at.fail(
                    "storage.tls.key_file needs cert_file: give the client certificate the key belongs to",
                ));
            }
        };
        if ca.is_none() && client.is_none() {
            return Err(at.fail(
                "storage.tls names no file: give ca_file (a private CA) and/or cert_file and key_file (a client certificate); for a server whose certificate the system trusts, rediss:// alone is enough",
            ));
        }
        Ok(RedisTls { ca, client })
    }
}

impl SentinelSection {
    /// The service's name and the sentinels' URLs; `at` is the section's place.
    pub(crate) fn build(self, at: &Place) -> Result<RedisSentinel, Fail> {
        let master = match self.master {
            Some(master) if !master.value.trim().is_empty() => master.value.trim().to_string(),
            Some(master) => {
                return Err(master.at.fail(
                    "storage.sentinel.master is empty: give the name in the sentinels' `sentinel monitor <name> ...` line, e.g. mymaster",
                ));
            }
            None => {
                return Err(at.fail(
                    "storage.sentinel needs `master`: the name in the sentinels' `sentinel monitor <name> ...` line, e.g. mymaster",
                ));
            }
        };
        let nodes = match self.nodes {
            Some(nodes) if !nodes.value.is_empty() => nodes.value,
            Some(nodes) => {
                return Err(nodes.at.fail(
                    "storage.sentinel.nodes lists no sentinel: list them, e.g. [redis://10.0.0.1:26379, redis://10.0.0.2:26379]",
                ));
            }
            None => {
                return Err(at.fail(
                    "storage.sentinel needs `nodes`: the sentinels' URLs, e.g. [redis://10.0.0.1:26379, redis://10.0.0.2:26379]",
                ));
            }
        };
        let nodes = nodes
            .iter()
            .map(|node| crate::convert::store_url(node, true))
            .collect::<Result<_, _>>()?;
        Ok(RedisSentinel { master, nodes })
    }
}

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum Pem {
    /// At least one certificate.
    Certificates,
    /// A private key.
    Key,
}

/// The file's text, once it is known to hold what `kind` says.
fn read_pem(file: &Located<String>, base: &Path, kind: Pem) -> Result<String, Fail> {
    let field = file.at.path.as_str();
    let path = base.join(file.value.trim());
    let displayed = path.display().to_string();
    let shown = shorten(&displayed);
    let text = std::fs::read_to_string(&path).map_err(|error| {
        file.at
            .fail(format!("{field}: cannot read `{shown}`: {error}"))
    })?;
    match kind {
        Pem::Certificates => {
            let certificates = CertificateDer::pem_slice_iter(text.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| {
                    file.at.fail(format!(
                        "{field}: `{shown}` is not a PEM certificate file: {error}"
                    ))
                })?;
            if certificates.is_empty() {
                return Err(file.at.fail(format!(
                    "{field}: `{shown}` holds no certificate (expected -----BEGIN CERTIFICATE-----)"
                )));
            }
        }
        Pem::Key => {
            PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|error| {
                file.at.fail(format!(
                    "{field}: `{shown}` holds no PEM private key ({error}); expected -----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY)"
                ))
            })?;
        }
    }
    Ok(text)
}
