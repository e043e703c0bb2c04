//! The bundle every HTTP front door uses: rules, client-IP resolution and responses.
//! Given what arrived (peer, method, URI, headers, session), it says which checks one
//! atomic decision makes; given the decision, how to answer.
//!
//! [`HttpPolicy::decision_request`] is for front doors that decide before the call and
//! never see its answer (forward-auth, the tower layer): a route that is charged from
//! the answer (`cost: usage`) or holds a concurrency slot until the call ends is refused
//! there ([`RequestError::NeedsAnswer`]) rather than half decided. The reverse proxy,
//! which sees the answer, uses [`HttpPolicy::plan`].

use std::net::IpAddr;

use http::StatusCode;
use http::header::HeaderMap;
use sluice_engine::DecisionRequest;

use crate::client_ip::ClientIpResolver;
use crate::metered::RequestPlan;
use crate::path::{PathError, RequestPath};
use crate::response::ResponseConfig;
use crate::rules::Rules;
use crate::template::{KeyError, RequestFacts};

/// Why a request cannot be decided: the client sent something sluice refuses to guess
/// about. Front doors answer it with [`RequestError::status`] (`400`, or `401` for a
/// token that did not verify) and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The path is spelled in a way applications disagree about.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A key template reads a name repeated with too many values.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The request matched a route that only a front door seeing the answer can decide:
    /// a limit charged from the answer's usage, or one counting calls in flight. Not the
    /// client's mistake but the deployment's: a `500`.
    #[error(
        "limit `{limit}` of the route this request matched {}, and this front door never sees the answer; only sluice's reverse proxy (`proxy:`) can decide such routes: send these calls through it, or reserve and settle from the app (POST /v1/reserve, /v1/settle)",
        if *.metered { "is charged the usage the answer reports (cost: usage)" } else { "counts calls in flight until each one ends (concurrency)" }
    )]
    NeedsAnswer {
        /// The first such limit.
        limit: String,
        /// Whether it is metered (`cost: usage`); else it is a concurrency limit.
        metered: bool,
    },
}

impl RequestError {
    /// The `error` code of the JSON answer.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::Path(_) => "invalid_path",
            RequestError::Key(KeyError::UnverifiedToken) => "invalid_token",
            RequestError::Key(_) => "ambiguous_key",
            RequestError::NeedsAnswer { .. } => "needs_reverse_proxy",
        }
    }

    /// The answer's status: `400` for what the client sent, `401` for a token that did
    /// not verify where a key reads its claims, `500` for a route this front door cannot
    /// decide.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::Key(KeyError::UnverifiedToken) => StatusCode::UNAUTHORIZED,
            RequestError::Path(_) | RequestError::Key(_) => StatusCode::BAD_REQUEST,
            RequestError::NeedsAnswer { .. } => StatusCode::INTERNAL_SERVER_ERROR,
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
    /// Which plan a request is on (`plan_from:`): its first rendered value.
    pub plan_from: Option<crate::template::KeyTemplate>,
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
    /// could read in more than one way is an error, never a guess; so is a route that
    /// needs the answer ([`RequestError::NeedsAnswer`]; see the module doc).
    pub fn decision_request(
        &self,
        incoming: &IncomingRequest<'_>,
        dry_run: bool,
    ) -> Result<DecisionRequest, RequestError> {
        self.screened_request(incoming, dry_run)
            .map(|(request, _)| request)
    }

    /// [`HttpPolicy::decision_request`] and the client's address as resolved for it
    /// (see [`RequestPlan::client`]), for a front door that screens the runtime
    /// entries' address lists.
    pub fn screened_request(
        &self,
        incoming: &IncomingRequest<'_>,
        dry_run: bool,
    ) -> Result<(DecisionRequest, Option<IpAddr>), RequestError> {
        let plan = self.plan(incoming, dry_run)?;
        if let Some((limit, metered)) = plan.needing_answer() {
            return Err(RequestError::NeedsAnswer {
                limit: limit.to_string(),
                metered,
            });
        }
        Ok((plan.request, plan.client))
    }

    /// What `incoming` makes of the routes: its checks, how each is priced (fixed, or
    /// from the answer's usage) and the usage settings that meter it. For a front door
    /// that sees the answer and settles what the call cost (the reverse proxy).
    pub fn plan(
        &self,
        incoming: &IncomingRequest<'_>,
        dry_run: bool,
    ) -> Result<RequestPlan, RequestError> {
        // Resolved once, for `{client_ip}` keys and for the front door's address lists.
        let client = incoming
            .peer
            .map(|peer| self.client_ip.resolve(peer, incoming.headers));
        if self.rules.is_empty() {
            return Ok(RequestPlan {
                request: DecisionRequest {
                    checks: Vec::new(),
                    dry_run,
                },
                client,
                ..RequestPlan::default()
            });
        }
        let (path, query) = match incoming.path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (incoming.path_and_query, None),
        };
        let path = RequestPath::parse(path)?;
        let client_key = client.map(|client| self.client_ip.key(client));
        // Verified only when a template reads a claim: signatures cost microseconds.
        let reads_claims =
            self.rules.uses_jwt() || self.plan_from.as_ref().is_some_and(|t| t.uses_jwt());
        let caller = match &self.identity {
            Some(identity) if reads_claims => identity.caller(incoming.headers),
            _ => sluice_identity::Caller::Anonymous,
        };
        let claims = match &caller {
            sluice_identity::Caller::Verified(claims) => Some(&**claims),
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
            claims,
            token_refused: matches!(caller, sluice_identity::Caller::Refused),
            plan: None,
            plan_unknown: false,
        };
        // The plan is read like a key; a template that does not resolve is the default plan.
        // A plan read from a token that was refused is unknown: only limits whose rates
        // depend on it refuse the request (`Rules::plan`), so a route keyed by address
        // (a login, a token refresh) still takes a caller with an expired token.
        let (plan, plan_unknown) = match &self.plan_from {
            Some(template) => match template.render(&facts) {
                Ok(values) => (values.and_then(|values| values.into_iter().next()), false),
                Err(KeyError::UnverifiedToken) => (None, true),
                Err(error) => return Err(error.into()),
            },
            None => (None, false),
        };
        let facts = RequestFacts {
            plan: plan.as_deref(),
            plan_unknown,
            ..facts
        };
        let mut plan = self.rules.plan(&facts, dry_run)?;
        plan.client = client;
        Ok(plan)
    }
}

impl Default for ClientIpResolver {
    fn default() -> Self {
        ClientIpResolver::new(crate::client_ip::ClientIpConfig::default())
    }
}
