//! `sluice admin`: the admin calls of a running server, from the command line.
//!
//! ```text
//! sluice admin [--url URL] [--token TOKEN] reset LIMIT KEY
//! sluice admin [--url URL] [--token TOKEN] reset-limit LIMIT
//! sluice admin [--url URL] [--token TOKEN] state LIMIT KEY
//! sluice admin [--url URL] [--token TOKEN] reload
//! sluice admin [--url URL] [--token TOKEN] status
//! sluice admin [--url URL] [--token TOKEN] top [LIMIT] [--by spend|denials] [--window minute|hour] [-n N] [--json]
//! ```
//!
//! The server's base URL comes from `--url` or `SLUICE_ADMIN_URL` (default
//! `http://127.0.0.1:8080`; point it at `admin.listen` when that is set), the bearer
//! token from `--token` or `SLUICE_ADMIN_TOKEN`. The token is only ever sent in the
//! `Authorization` header: it is never printed, not even in `--help`.
//!
//! On success the server's JSON answer is printed to stdout, pretty, and the exit code
//! is 0; `top` prints a table instead (its JSON with `--json`). An HTTP error prints `error: <code>: <message>` (the server's error body) to
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
    /// List runtime entries: plans, overrides, blocks and allows (`GET /v1/admin/entries`).
    Entries,
    /// Put a subject (a key value, e.g. `customer:42`) on a plan, on every instance.
    Assign {
        /// The key value the limits see.
        subject: String,
        /// A plan some limit has (`plans:` in the config).
        plan: String,
        #[command(flatten)]
        about: EntryTerms,
    },
    /// Give a subject its own rates for one limit (counters are kept).
    Override {
        /// The key value the limits see.
        subject: String,
        /// The limit's name.
        limit: String,
        /// One or more rates, e.g. `2000/hour`.
        #[arg(required = true)]
        rates: Vec<String>,
        #[command(flatten)]
        about: EntryTerms,
    },
    /// Refuse a subject's or an address's requests (403 by default) before any limit.
    Block {
        #[command(flatten)]
        target: EntryTarget,
        #[command(flatten)]
        about: EntryTerms,
    },
    /// Let a subject's or an address's requests past every limit. A subject matches
    /// only keys the client cannot choose: decision API keys, Envoy descriptors, and
    /// route keys built from {client_ip}, {jwt.*}, {session} and literals alone.
    Allow {
        #[command(flatten)]
        target: EntryTarget,
        #[command(flatten)]
        about: EntryTerms,
    },
    /// Remove an entry, named as it was added (`plan`, `rate`, `block` or `allow`).
    Remove {
        /// The entry's kind: plan, rate, block or allow.
        kind: String,
        #[command(flatten)]
        target: EntryTarget,
        /// The limit, for a `rate` entry.
        #[arg(long)]
        limit: Option<String>,
    },
    /// Show the keys spending the most, or denied the most, per limit (`GET /v1/admin/top`).
    Top {
        /// Only this limit (default: every limit).
        limit: Option<String>,
        /// Rank by cost charged (`spend`) or by checks denied (`denials`).
        #[arg(long, default_value = "spend", value_parser = ["spend", "denials"])]
        by: String,
        /// Over the last `minute` or the last `hour`.
        #[arg(long, default_value = "minute", value_parser = ["minute", "hour"])]
        window: String,
        /// Keys per limit (1 to 100).
        #[arg(short = 'n', long = "count", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=100))]
        n: u16,
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Whom a block, allow or removal is about: exactly one of a subject or an address.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct EntryTarget {
    /// A key value, e.g. `user:7`.
    #[arg(long)]
    subject: Option<String>,
    /// An address or CIDR, e.g. `203.0.113.0/24`.
    #[arg(long)]
    ip: Option<String>,
}

/// How long an entry lasts and why.
#[derive(clap::Args)]
pub struct EntryTerms {
    /// How long it applies, e.g. `30m`, `12h`, `30days` (default: until removed).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<std::time::Duration>,
    /// Why, for the operators (a blocked client is told it too).
    #[arg(long)]
    reason: Option<String>,
}

impl EntryTerms {
    fn add_to(&self, mut body: Value) -> Value {
        if let Some(ttl) = self.ttl {
            body["ttl_ms"] = json!(ttl.as_millis() as u64);
        }
        if let Some(reason) = &self.reason {
            body["reason"] = json!(reason);
        }
        body
    }
}

impl EntryTarget {
    fn body(&self, kind: &str) -> Value {
        match (&self.subject, &self.ip) {
            (Some(subject), _) => json!({"kind": kind, "subject": subject}),
            (None, ip) => json!({"kind": kind, "ip": ip}),
        }
    }
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
            AdminCommand::Entries => Call::Get {
                path: "/v1/admin/entries",
                query: Vec::new(),
            },
            AdminCommand::Assign {
                subject,
                plan,
                about,
            } => Call::Post {
                path: "/v1/admin/entries",
                body: Some(about.add_to(json!({"kind": "plan", "subject": subject, "plan": plan}))),
            },
            AdminCommand::Override {
                subject,
                limit,
                rates,
                about,
            } => Call::Post {
                path: "/v1/admin/entries",
                body: Some(about.add_to(
                    json!({"kind": "rate", "subject": subject, "limit": limit, "rate": rates}),
                )),
            },
            AdminCommand::Block { target, about } => Call::Post {
                path: "/v1/admin/entries",
                body: Some(about.add_to(target.body("block"))),
            },
            AdminCommand::Allow { target, about } => Call::Post {
                path: "/v1/admin/entries",
                body: Some(about.add_to(target.body("allow"))),
            },
            AdminCommand::Remove {
                kind,
                target,
                limit,
            } => {
                let mut body = target.body(kind);
                if let Some(limit) = limit {
                    body["limit"] = json!(limit);
                }
                Call::Post {
                    path: "/v1/admin/entries/remove",
                    body: Some(body),
                }
            }
            AdminCommand::Top {
                limit,
                by,
                window,
                n,
                ..
            } => {
                let mut query = vec![
                    ("by", by.clone()),
                    ("window", window.clone()),
                    ("n", n.to_string()),
                ];
                if let Some(limit) = limit {
                    query.push(("limit", limit.clone()));
                }
                Call::Get {
                    path: "/v1/admin/top",
                    query,
                }
            }
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
        if let (AdminCommand::Top { json: false, .. }, Some(answer)) = (&args.command, &parsed) {
            return Ok(top_table(answer));
        }
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

/// `GET /v1/admin/top`'s answer as a table per limit: rank, key, count, error.
fn top_table(answer: &Value) -> String {
    let by = answer["by"].as_str().unwrap_or("spend");
    let window = answer["window"].as_str().unwrap_or("minute");
    let mut out = String::new();
    let limits = answer["limits"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if limits.is_empty() {
        out.push_str("no limits\n");
    }
    for (i, limit) in limits.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let name = limit["limit"].as_str().unwrap_or("?");
        let total = limit["total"].as_u64().unwrap_or(0);
        let bound = limit["error_bound"].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "{name}: top keys by {by}, last {window} (total {total}; counts at most {bound} too high)\n"
        ));
        let keys = limit["keys"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if keys.is_empty() {
            out.push_str(&format!("  no {by} in the last {window}\n"));
            continue;
        }
        let width = keys
            .iter()
            .map(|k| k["key"].as_str().map_or(0, |s| s.chars().count()))
            .max()
            .unwrap_or(0)
            .max(3);
        out.push_str(&format!(
            "  {:>4}  {:<width$}  {:>12}  {:>8}\n",
            "#", "key", by, "± error"
        ));
        for (rank, key) in keys.iter().enumerate() {
            out.push_str(&format!(
                "  {:>4}  {:<width$}  {:>12}  {:>8}\n",
                rank + 1,
                key["key"].as_str().unwrap_or("?"),
                key["count"].as_u64().unwrap_or(0),
                key["error"].as_u64().unwrap_or(0),
            ));
        }
    }
    out.trim_end().to_string()
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
    fn top_answer_becomes_a_table() {
        let answer = json!({"by": "spend", "window": "minute", "capacity": 100, "limits": [
            {"limit": "api", "total": 30, "error_bound": 0, "keys": [
                {"key": "alice", "count": 20, "error": 0},
                {"key": "bob", "count": 10, "error": 0},
            ]},
            {"limit": "ip", "total": 0, "error_bound": 0, "keys": []},
        ]});
        let table = top_table(&answer);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("api: top keys by spend, last minute (total 30"));
        assert!(
            lines[2].contains("1  alice") && lines[2].contains("20"),
            "{table}"
        );
        assert!(lines[3].contains("2  bob"), "{table}");
        assert!(table.contains("ip: top keys") && table.contains("no spend in the last minute"));
    }

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
