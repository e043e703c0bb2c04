#!/usr/bin/env bash
# What verified identity costs the reverse proxy: requests keyed on `{jwt.sub}` of a
# bearer token sluice verifies itself, beside the same proxy keyed on `{client_ip}`
# (no token read), alternated round by round in front of one nginx answering a fixed
# 200. USERS tokens (one per user, signed once by the `mint_tokens` example) are sent
# in turn by every connection, as an application's users would send theirs.
#
# Usage: bench/jwt-proxy.sh [ROUNDS]   (default 3; DURATION=8 seconds per run;
#        ALGORITHMS="ES256 RS256" (also EdDSA); USERS=1000;
#        SLUICE_BIN=path to a release binary, else built with cargo --release;
#        BEFORE_BIN=path also runs another build keyed on {jwt.sub} in every round)
# Needs: wrk, nginx, openssl (apt-get install -y wrk nginx-light openssl).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib-check-peers.sh
source "$root/bench/lib-check-peers.sh"
rounds="${1:-3}"
DURATION="${DURATION:-8}"
USERS="${USERS:-1000}"
ALGORITHMS="${ALGORITHMS:-ES256 RS256}"
for tool in wrk openssl; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install -y wrk openssl" >&2; exit 1; }
done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
[ -x "$NGINX" ] || { echo "needs nginx: apt-get install -y nginx-light" >&2; exit 1; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-jwt-bench.XXXXXX")"
pids=()
stop_servers() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
cleanup() {
    stop_servers
    "$NGINX" -c "$scratch/upstream.conf" -s stop 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

target="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build --release -q -p sluice-identity --example mint_tokens)
if [ -z "${SLUICE_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="$target/release/sluice"
fi

upstream_port="$(free_port)"
write_upstream_config "$scratch/upstream.conf" "$scratch" "$upstream_port"
"$NGINX" -c "$scratch/upstream.conf"

# sluice_config FILE PORT KEY ALGORITHM: the proxy with one limit far above the load,
# keyed on KEY, and /probe, one request per user and hour, to check the keying.
sluice_config() {
    cat > "$1" <<YAML
listen: 127.0.0.1:$2
storage: {backend: memory, max_keys: 1000000}
jwt:
  algorithms: [$4]
  public_keys: [$scratch/$4.pub]
  issuer: https://id.bench
  audience: api
limits:
  per_user: {rate: 100000/second}
  probe: {rate: 1/hour}
routes:
  - match: {path: /probe}
    limits:
      - {limit: probe, key: "user:{jwt.sub}"}
  - match: {path: "/*"}
    limits:
      - {limit: per_user, key: $3}
proxy:
  upstream: http://127.0.0.1:$upstream_port
YAML
}

# start BIN CONFIG PORT: starts a server and waits for it.
start() {
    "$1" serve --config "$2" 2>"$2.log" & pids+=($!)
    for _ in $(seq 1 50); do
        curl -s -o /dev/null "http://127.0.0.1:$3/search" && return
        sleep 0.1
    done
    echo "sluice on port $3 did not start" >&2; cat "$2.log" >&2; exit 1
}

# probe PORT TOKENS: the first user's second request is refused, the second user's
# first is not: requests are keyed on the verified subject.
probe() {
    local a b
    a="$(sed -n 1p "$2")"; b="$(sed -n 2p "$2")"
    curl -s -o /dev/null -H "Authorization: Bearer $a" "http://127.0.0.1:$1/probe"
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $a" "http://127.0.0.1:$1/probe")" = 429 ] &&
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $b" "http://127.0.0.1:$1/probe")" = 200 ] ||
        { echo "port $1 does not key /probe on the token's subject" >&2; exit 1; }
}

run() { # port tokens -> "req/s p99"
    wrk -t2 -c64 -d"${DURATION}s" --latency -s "$root/bench/bearer.lua" "http://127.0.0.1:$1/search" -- "$2" 2>&1 \
      | awk '/Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} /Non-2xx/ {bad=$NF} END {print rps, p99, (bad == "" ? 0 : bad)}'
}

for alg in $ALGORITHMS; do
    case "$alg" in
        RS*) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$scratch/$alg.key" 2>/dev/null ;;
        ES256) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$scratch/$alg.key" 2>/dev/null ;;
        EdDSA) openssl genpkey -algorithm ED25519 -out "$scratch/$alg.key" 2>/dev/null ;;
        *) echo "ALGORITHMS: RS256, ES256 or EdDSA" >&2; exit 2 ;;
    esac
    openssl pkey -in "$scratch/$alg.key" -pubout -out "$scratch/$alg.pub"
    openssl pkcs8 -topk8 -nocrypt -in "$scratch/$alg.key" -out "$scratch/$alg.pk8"
    "$target/release/examples/mint_tokens" "$alg" "$scratch/$alg.pk8" "$USERS" > "$scratch/$alg.tokens"

    ip_port="$(free_port)"; jwt_port="$(free_port)"; before_port="$(free_port)"
    sluice_config "$scratch/ip.yaml" "$ip_port" '"{client_ip}"' "$alg"
    sluice_config "$scratch/jwt.yaml" "$jwt_port" '["user:{jwt.sub}", "ip:{client_ip}"]' "$alg"
    start "$SLUICE_BIN" "$scratch/ip.yaml" "$ip_port"
    start "$SLUICE_BIN" "$scratch/jwt.yaml" "$jwt_port"
    probe "$jwt_port" "$scratch/$alg.tokens"
    if [ -n "${BEFORE_BIN:-}" ]; then
        sluice_config "$scratch/before.yaml" "$before_port" '["user:{jwt.sub}", "ip:{client_ip}"]' "$alg"
        start "$BEFORE_BIN" "$scratch/before.yaml" "$before_port"
        probe "$before_port" "$scratch/$alg.tokens"
    fi

    echo "$alg, $USERS users:"
    printf "%-6s %-24s %-24s %s\n" round "sluice {client_ip}" "sluice {jwt.sub}" "${BEFORE_BIN:+before {jwt.sub\}}"
    : > "$scratch/results"
    for r in $(seq 1 "$rounds"); do
        ports=("$ip_port" "$jwt_port")
        [ -n "${BEFORE_BIN:-}" ] && ports+=("$before_port")
        # Every other round in reverse order: a run's place in a round is worth a few
        # percent on this VM.
        if (( r % 2 == 0 )); then ports=($(printf '%s\n' "${ports[@]}" | tac)); fi
        declare -A got=()
        for port in "${ports[@]}"; do
            read -r rps p99 bad < <(run "$port" "$scratch/$alg.tokens")
            [ "$bad" = 0 ] || { echo "round $r, port $port: $bad non-2xx answers" >&2; exit 1; }
            got[$port]="$rps $p99"
        done
        before="${BEFORE_BIN:+${got[$before_port]}}"
        printf "%-6s %-24s %-24s %s\n" "$r" "${got[$ip_port]}" "${got[$jwt_port]}" "$before"
        echo "${got[$ip_port]} ${got[$jwt_port]} ${before:-0 0}" >> "$scratch/results"
        unset got
    done
    python3 - "$scratch/results" <<'PY'
import statistics, sys
def ms(t):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * f
    return float(t)
rows = [line.split() for line in open(sys.argv[1])]
ip, jwt, before = (statistics.median(float(r[i]) for r in rows) for i in (0, 2, 4))
ip99, jwt99 = (statistics.median(ms(r[i]) for r in rows) for i in (1, 3))
print(f"median  {{client_ip}} {ip:.0f} req/s p99 {ip99:.2f} ms | {{jwt.sub}} {jwt:.0f} req/s p99 {jwt99:.2f} ms "
      f"({jwt / ip:.2f} of {{client_ip}})", end="")
if before:
    b99 = statistics.median(ms(r[5]) for r in rows)
    ratios = [float(r[2]) / float(r[4]) for r in rows]
    print(f" | before {before:.0f} req/s p99 {b99:.2f} ms ({before / ip:.2f}); "
          f"after / before round by round: {' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
else:
    print()
PY
    stop_servers
done
