//! The bundle every HTTP front door uses: rules, client-IP resolution and responses.
//! Given what arrived (peer, method, URI, headers, session), it says which checks one
//! atomic decision makes; given the decision, how to answer.

use std::net::IpAddr;

use http::header::HeaderMap;
use sluice_engine::DecisionRequest;

use crate::client_ip::ClientIpResolver;
use crate::path::{PathError, RequestPath};
use crate::response::ResponseConfig;
use crate::rules::Rules;
use crate::template::{KeyError, RequestFacts};

/// Why a request cannot be decided: the client sent something sluice refuses to guess
/// about. Front doors answer it with `400` and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The path is spelled in a way applications disagree about.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A key template reads a name repeated with too many values.
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl RequestError {
    /// The `error` code of the JSON answer.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::Path(_) => "invalid_path",
            RequestError::Key(_) => "ambiguous_key",
        }
    }
}

/// Rules, client identity and answers, as configured.
#[derive(Debug, Clone, Default)]
pub struct HttpPolicy {
    /// Which limits apply to which requests.
    pub rules: Rules,
    /// How the client's address is found and keyed.
    pub client_ip: ClientIpResolver,
    /// How denials and rate-limit state are answered.
    pub responses: ResponseConfig,
    /// Who the caller is, from a bearer token it verifies (`jwt:`), for `{jwt.CLAIM}`.
    pub identity: Option<std::sync::Arc<sluice_identity::JwtVerifier>>,
}

/// One incoming HTTP request, as a front door sees it.
#[derive(Debug, Clone, Copy)]
pub struct IncomingRequest<'a> {
    /// The socket peer, when known.
    pub peer: Option<IpAddr>,
    /// The method.
    pub method: &'a str,
    /// Path and query, as sent (decoded and checked here, see [`crate::path`]).
    pub path_and_query: &'a str,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The session id, when the front door manages sessions.
    pub session: Option<&'a str>,
}

impl HttpPolicy {
    /// The decision request for `incoming`: every limit of every matching route whose
    /// key resolves. Empty when no route applies. A path or key that applications
    /// could read in more than one way is an error, never a guess.
    pub fn decision_request(
        &self,
        incoming: &IncomingRequest<'_>,
        dry_run: bool,
    ) -> Result<DecisionRequest, RequestError> {
        if self.rules.is_empty() {
            return Ok(DecisionRequest {
                checks: Vec::new(),
                dry_run,
            });
        }
        let (path, query) = match incoming.path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (incoming.path_and_query, None),
        };
        let path = RequestPath::parse(path)?;
        let client_key = incoming.peer.map(|peer| {
            self.client_ip
                .key(self.client_ip.resolve(peer, incoming.headers))
        });
        // Verified only when a template reads a claim: signatures cost microseconds.
        let claims = match &self.identity {
            Some(identity) if self.rules.uses_jwt() => identity.claims(incoming.headers),
            _ => None,
        };
        let facts = RequestFacts {
            method: incoming.method,
            path: &path.canonical,
            literal_path: &path.literal,
            query,
            headers: incoming.headers,
            client_ip: client_key.as_deref(),
            session: incoming.session,
            claims: claims.as_ref(),
        };
        Ok(self.rules.decision_request(&facts, dry_run)?)
    }
}

impl Default for ClientIpResolver {
    fn default() -> Self {
        ClientIpResolver::new(crate::client_ip::ClientIpConfig::default())
    }
}
