//! `sluice admin`: the admin calls of a running server, from the command line.
//!
//! ```text
//! sluice admin [--url URL] [--token TOKEN] reset LIMIT KEY
//! sluice admin [--url URL] [--token TOKEN] reset-limit LIMIT
//! sluice admin [--url URL] [--token TOKEN] state LIMIT KEY
//! sluice admin [--url URL] [--token TOKEN] reload
//! sluice admin [--url URL] [--token TOKEN] status
//! ```
//!
//! The server's base URL comes from `--url` or `SLUICE_ADMIN_URL` (default
//! `http://127.0.0.1:8080`; point it at `admin.listen` when that is set), the bearer
//! token from `--token` or `SLUICE_ADMIN_TOKEN`. The token is only ever sent in the
//! `Authorization` header: it is never printed, not even in `--help`.
//!
//! On success the server's JSON answer is printed to stdout, pretty, and the exit code
//! is 0. An HTTP error prints `error: <code>: <message>` (the server's error body) to
//! stderr and exits 1; so does a server that cannot be reached, with a message saying
//! which URL was tried.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Where the server is when neither `--url` nor `SLUICE_ADMIN_URL` says.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// How long one admin call may take, connecting included.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `sluice admin`: call a running server's admin endpoints.
#[derive(Args)]
pub struct AdminArgs {
    /// Base URL of the server (its admin.listen address when one is configured).
    #[arg(long, global = true, env = "SLUICE_ADMIN_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// The server's admin.token, sent as `Authorization: Bearer <token>`.
    #[arg(
        long,
        global = true,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// The admin call to make.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// One admin call.
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Forget one key's counters of one limit (`POST /v1/reset`).
    Reset {
        /// The limit's name.
        limit: String,
        /// The key whose counters are forgotten.
        key: String,
    },
    /// Forget every key's counters of one limit (`POST /v1/admin/reset-limit`).
    ResetLimit {
        /// The limit's name.
        limit: String,
    },
    /// Show one key's state in every window of a limit, without charging (`GET /v1/admin/state`).
    State {
        /// The limit's name.
        limit: String,
        /// The key to look at.
        key: String,
    },
    /// Reload the config file now (`POST /v1/admin/reload`).
    Reload,
    /// Show the config version, the last reload and what needs a restart (`GET /v1/status`).
    Status,
}

/// The HTTP call one [`AdminCommand`] makes.
enum Call {
    Get {
        path: &'static str,
        query: Vec<(&'static str, String)>,
    },
    Post {
        path: &'static str,
        body: Option<Value>,
    },
}

impl AdminCommand {
    fn call(&self) -> Call {
        match self {
            AdminCommand::Reset { limit, key } => Call::Post {
                path: "/v1/reset",
                body: Some(json!({"limit": limit, "key": key})),
            },
            AdminCommand::ResetLimit { limit } => Call::Post {
                path: "/v1/admin/reset-limit",
                body: Some(json!({ "limit": limit })),
            },
            AdminCommand::State { limit, key } => Call::Get {
                path: "/v1/admin/state",
                query: vec![("limit", limit.clone()), ("key", key.clone())],
            },
            AdminCommand::Reload => Call::Post {
                path: "/v1/admin/reload",
                body: None,
            },
            AdminCommand::Status => Call::Get {
                path: "/v1/status",
                query: Vec::new(),
            },
        }
    }
}

/// Runs one admin call and prints its answer; see the module docs for the output and
/// exit codes.
pub fn run(args: AdminArgs) -> ExitCode {
    match call(&args) {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Makes the call; `Ok` is the pretty JSON to print, `Err` the message after `error: `.
fn call(args: &AdminArgs) -> Result<String, String> {
    let base = args.url.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(format!(
            "--url {base:?} is not an http:// URL: pass the server's address, e.g. --url {DEFAULT_URL}"
        ));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into();
    let bearer = args
        .token
        .as_deref()
        .map(|t| format!("Bearer {}", t.trim()));
    let call = args.command.call();
    let (method, path) = match &call {
        Call::Get { path, .. } => ("GET", *path),
        Call::Post { path, .. } => ("POST", *path),
    };
    let url = format!("{base}{path}");
    let sent = match call {
        Call::Get { query, .. } => {
            let mut request = agent.get(&url);
            for (name, value) in &query {
                request = request.query(name, value);
            }
            if let Some(bearer) = &bearer {
                request = request.header("authorization", bearer);
            }
            request.call()
        }
        Call::Post { body, .. } => {
            let mut request = agent.post(&url);
            if let Some(bearer) = &bearer {
                request = request.header("authorization", bearer);
            }
            match body {
                Some(body) => request
                    .header("content-type", "application/json")
                    .send(body.to_string()),
                None => request.send_empty(),
            }
        }
    };
    let mut response = sent.map_err(|error| unreachable_message(method, &url, &error))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|error| format!("{method} {url}: reading the answer failed: {error}"))?;
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    if (200..300).contains(&status) {
        return Ok(match parsed {
            Some(value) => serde_json::to_string_pretty(&value).unwrap_or(text),
            None => text,
        });
    }
    Err(http_error_message(
        status,
        parsed.as_ref(),
        &text,
        args.token.is_none(),
    ))
}

/// `<code>: <message>` from sluice's error body (`{"error": ..., "message": ...}`), or the
/// status and raw body when the answer is not sluice's.
fn http_error_message(status: u16, body: Option<&Value>, raw: &str, no_token: bool) -> String {
    let code = body.and_then(|b| b["error"].as_str());
    let message = body.and_then(|b| b["message"].as_str());
    let mut out = match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => format!("{code}: HTTP {status}"),
        _ => {
            let raw = raw.trim();
            if raw.is_empty() {
                format!("http_{status}: the server answered HTTP {status} with no body")
            } else {
                format!("http_{status}: {raw}")
            }
        }
    };
    if status == 401 && no_token {
        out.push_str(" (pass --token or set SLUICE_ADMIN_TOKEN)");
    }
    out
}

/// A clear message for a call that got no HTTP answer at all.
fn unreachable_message(method: &str, url: &str, error: &ureq::Error) -> String {
    let why = match error {
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused: is sluice running there? (set --url or SLUICE_ADMIN_URL; with admin.listen configured, use that address)".to_string()
        }
        ureq::Error::Timeout(_) => format!("no answer within {} s", TIMEOUT.as_secs()),
        ureq::Error::HostNotFound => "host not found".to_string(),
        ureq::Error::BadUri(uri) => format!("not a valid URL: {uri}"),
        other => other.to_string(),
    };
    format!("cannot reach the server: {method} {url}: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_becomes_code_and_message() {
        let body = json!({"error": "unauthorized", "message": "the bearer token does not match admin.token"});
        assert_eq!(
            http_error_message(401, Some(&body), "", false),
            "unauthorized: the bearer token does not match admin.token"
        );
        assert!(http_error_message(401, Some(&body), "", true).contains("--token"));
        assert_eq!(
            http_error_message(502, None, "bad gateway", false),
            "http_502: bad gateway"
        );
    }
}
