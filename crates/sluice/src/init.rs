//! `sluice init MODE`: writes a commented starter config for one way of deploying
//! sluice, that passes `sluice check-config` and runs as written. It asks nothing.
//!
//! - `api`: the JSON decision API (`POST /v1/check`) that an app calls itself, e.g.
//!   through the Python client;
//! - `forward-auth`: `/v1/forward-auth` for nginx `auth_request`, Traefik ForwardAuth or
//!   Envoy ext_authz, with routes;
//! - `proxy --upstream URL`: a reverse proxy in front of the app at URL, with routes.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// The deployments `sluice init` writes a config for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// The decision API: your app asks sluice before each costly call.
    Api,
    /// Forward-auth: nginx, Traefik or Envoy asks sluice before forwarding.
    ForwardAuth,
    /// A reverse proxy in front of your app (needs --upstream).
    Proxy,
}

const HEADER: &str = "\
# sluice starter config, written by `sluice init`. Check it with
#   sluice check-config {file}
# and run it with
#   sluice serve --config {file}
#
# Any value can use ${VAR} or ${VAR:-default}; any setting can be overridden from the
# environment (SLUICE_LISTEN=0.0.0.0:8080, SLUICE_STORAGE__MAX_KEYS=50000, ...).
# The full reference is in README.md, \"Configuration\".

# Where sluice listens. Loopback only; use 0.0.0.0:8080 to accept other machines.
listen: 127.0.0.1:8080

# Where counters live. `memory` is in-process and bounded by max_keys. To share
# counters between instances use Redis or PostgreSQL:
#   storage: {backend: redis, url: \"${SLUICE_REDIS_URL}\", on_error: local}
storage:
  backend: memory
  max_keys: 1000000

# Admin calls (reset, reload, status) need a bearer token of at least 16 bytes:
#   admin: {token: \"${SLUICE_ADMIN_TOKEN}\"}
";

const LIMITS: &str = "
# Each limit has one or more rates, all enforced together on one key.
# A rate is N/unit: 5/minute, 60/hour, 100/10s, 50/day.
limits:
  # Per signed-in user: 5 a minute, and at most 60 an hour.
  per_user: {rate: [5/minute, 60/hour]}
  # Per client address, for anonymous and spoofed traffic.
  per_ip: {rate: 30/minute, algorithm: sliding_window}
  # Everyone together: protects the upstream's budget.
  global: {rate: 10000/hour}
";

const ROUTES: &str = "
# Routes map HTTP requests to limits; every limit of every matching route is decided
# at once. A key list is tried in order: users by id, anonymous callers by address.
# A header the client sets can be forged: key on it only when something in front of
# sluice sets it (an auth layer), and always keep an address limit beside it.
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits:
      - {limit: per_user, key: [\"user:{header.x-user-id}\", \"ip:{client_ip}\"]}
      - {limit: per_ip, key: \"{client_ip}\"}
      - {limit: global, key: all}
  - match: default
    limits:
      - {limit: per_ip, key: \"{client_ip}\"}

# Behind a load balancer or another proxy, name it so its X-Forwarded-For is believed
# (from anyone else the header is ignored):
# client_ip:
#   trusted_proxies: [10.0.0.0/8]
";

const API: &str = "
# Your app calls POST /v1/check before each costly call, e.g.
#   curl -s localhost:8080/v1/check -H 'content-type: application/json' \\
#     -d '{\"checks\": [{\"limit\": \"per_user\", \"key\": \"user:42\"}]}'
# and answers 429 when `allowed` is false. Keep this port private to your apps.
";

const FORWARD_AUTH: &str = "
# Point your proxy at /v1/forward-auth:
#   nginx:   auth_request /_sluice;  location = /_sluice { internal;
#            proxy_pass http://127.0.0.1:8080/v1/forward-auth;
#            proxy_set_header X-Original-URI $request_uri;
#            proxy_set_header X-Original-Method $request_method; }
#   Traefik: forwardAuth: {address: http://127.0.0.1:8080/v1/forward-auth}
# nginx passes only 401 and 403 through, so deny with 403 there:
forward_auth:
  deny_status: 403
";

const PROXY: &str = "
# Clients talk to sluice; allowed requests go on to your app, denied ones get 429.
proxy:
  upstream: {upstream}
  refund_on_status: [\"5xx\"]     # an answer the app failed costs nothing
  quota_path: /_sluice/quota     # GET /_sluice/quota?path=/chat/message: your own quota

# sluice's own endpoints (/metrics, /readyz, /v1/check, admin calls) are not served to
# the proxied clients: they are on this listener only.
admin:
  listen: 127.0.0.1:8081
";

/// The starter config for `mode`, mentioning `file` in its run instructions.
pub(crate) fn starter(mode: Mode, upstream: Option<&str>, file: &str) -> Result<String, String> {
    let mut text = HEADER.replace("{file}", file);
    text.push_str(LIMITS);
    match mode {
        Mode::Api => {
            if upstream.is_some() {
                return Err("--upstream is for `sluice init proxy`".into());
            }
            text.push_str(API);
        }
        Mode::ForwardAuth => {
            if upstream.is_some() {
                return Err("--upstream is for `sluice init proxy`".into());
            }
            text.push_str(ROUTES);
            text.push_str(FORWARD_AUTH);
        }
        Mode::Proxy => {
            let Some(upstream) = upstream else {
                return Err("`sluice init proxy` needs the app to protect: --upstream http://127.0.0.1:8000".into());
            };
            if !upstream.starts_with("http://") || upstream.contains(char::is_whitespace) {
                return Err(format!(
                    "--upstream {upstream:?} must be an http:// URL, e.g. http://127.0.0.1:8000"
                ));
            }
            text.push_str(ROUTES);
            text.push_str(&PROXY.replace("{upstream}", upstream));
        }
    }
    Ok(text)
}

/// Writes the starter config to `output` (`-` for standard output); an existing file
/// is kept unless `force`.
pub(crate) fn run(mode: Mode, upstream: Option<&str>, output: &Path, force: bool) -> ExitCode {
    let to_stdout = output == Path::new("-");
    let name = if to_stdout {
        "sluice.yaml".to_string()
    } else {
        output.display().to_string()
    };
    let text = match starter(mode, upstream, &name) {
        Ok(text) => text,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    if to_stdout {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let written = options
        .open(output)
        .and_then(|mut file| file.write_all(text.as_bytes()));
    match written {
        Ok(()) => {
            eprintln!(
                "wrote {name}; check it with `sluice check-config {name}` and run it with `sluice serve --config {name}`"
            );
            ExitCode::SUCCESS
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!(
                "error: {name} already exists: pass --force to replace it, or --output another file"
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: cannot write {name}: {error}");
            ExitCode::FAILURE
        }
    }
}
