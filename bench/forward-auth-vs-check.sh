#!/usr/bin/env bash
# Forward-auth decisions/s beside POST /v1/check on the same server, alternated round by
# round (this VM's speed drifts). Forward-auth runs the route rules (path match, key
# template, client IP) before the same decision; /v1/check parses a JSON body instead.
#
# Usage: bench/forward-auth-vs-check.sh [ROUNDS]   (default 3; DURATION=8 s per run;
#        SLUICE_BIN=path runs that binary instead of building target/release/sluice)
set -euo pipefail
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds="${1:-3}"
DURATION="${DURATION:-8}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-fa.XXXXXX")"
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$scratch"' EXIT
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="$root/target/release/sluice"
fi
cat > "$scratch/sluice.yaml" <<YAML
listen: 127.0.0.1:$port
storage: {backend: memory, max_keys: 1000000}
limits:
  api: {rate: 100/second}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits:
      - {limit: api, key: ["user:{header.x-user-id}", "ip:{client_ip}"]}
YAML
"$SLUICE_BIN" serve --config "$scratch/sluice.yaml" 2>"$scratch/sluice.log" & pid=$!
sleep 1
run() { # script path -> "req/s p50 p99 statuses"
    wrk -t2 -c64 -d"${DURATION}s" --latency -s "$1" "http://127.0.0.1:$port$2" 2>&1 \
      | awk '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /^status codes:/ {sub(/^status codes: /,""); st=$0} END {print rps, p50, p99, st}'
}
printf "%-6s %-40s %s\n" round "/v1/check (req/s p50 p99)" "/v1/forward-auth (req/s p50 p99 statuses)"
for r in $(seq 1 "$rounds"); do
    check=$(run "$root/bench/check.lua" /v1/check)
    fa=$(run "$root/bench/forward_auth.lua" /v1/forward-auth)
    printf "%-6s %-40s %s\n" "$r" "$check" "$fa"
done
