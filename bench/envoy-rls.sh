#!/usr/bin/env bash
# Load test of sluice's Envoy rate limit service (gRPC ShouldRateLimit) with h2load.
#
# Usage:
#   bench/envoy-rls.sh            # build release, start sluice, run: one connection, then many
# Environment:
#   REQUESTS=200000   calls per run          ONE_STREAMS=64   streams on the one connection
#   CONNECTIONS=32    connections (many)     MANY_STREAMS=8   streams per connection (many)
#   H2LOAD_THREADS=1  h2load threads         SLUICE_BIN=...   use this binary, no build
#   KEEP=1            keep the scratch dir
#
# Every run uses its own descriptor value under a rule of REQUESTS/2 per hour, so exactly
# half the answers must be OK and half OVER_LIMIT. h2load only checks HTTP status, so the
# script checks the answers itself: sluice's per-code call counters must add up to
# REQUESTS with no gRPC error, and one more call, decoded from its protobuf, must be
# OVER_LIMIT with 0 remaining. Latency percentiles come from h2load's per-request log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
REQUESTS="${REQUESTS:-200000}"
ONE_STREAMS="${ONE_STREAMS:-64}"
CONNECTIONS="${CONNECTIONS:-32}"
MANY_STREAMS="${MANY_STREAMS:-8}"
H2LOAD_THREADS="${H2LOAD_THREADS:-1}"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
for tool in h2load curl python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$tool not found (h2load: apt-get install -y nghttp2-client)" >&2
        exit 1
    fi
done

if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -p sluice --locked)
    SLUICE_BIN="${CARGO_TARGET_DIR:-$root/target}/release/sluice"
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-envoy-bench.XXXXXX")"
server_pid=""
cleanup() {
    [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    if [[ -z "${KEEP:-}" ]]; then rm -rf "$scratch"; else echo "kept $scratch"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port="$(free_port)"
grpc_port="$(free_port)"
cat > "$scratch/sluice.yaml" <<YAML
listen: 127.0.0.1:$http_port
storage: {backend: memory}
envoy:
  listen: 127.0.0.1:$grpc_port
  domains:
    - domain: bench
      descriptors:
        - key: remote_address
          rate_limit: {unit: hour, requests_per_unit: $((REQUESTS / 2))}
YAML
SLUICE_LOG=warn "$SLUICE_BIN" serve --config "$scratch/sluice.yaml" >"$scratch/sluice.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$http_port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

url="http://127.0.0.1:$grpc_port/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
calls() { # code -> sluice_envoy_calls_total for that code
    curl -fsS "http://127.0.0.1:$http_port/metrics" |
        awk -v code="$1" '$1 == "sluice_envoy_calls_total{code=\"" code "\"}" {print $2}'
}

run() { # name connections streams
    local name="$1" connections="$2" streams="$3" value="ip-$1-$RANDOM"
    python3 "$here/envoy_grpc.py" request bench remote_address "$value" "$scratch/$name.bin"
    local ok0 over0 err0
    ok0="$(calls ok)"; over0="$(calls over_limit)"; err0="$(calls error)"
    h2load -n "$REQUESTS" -c "$connections" -m "$streams" -t "$H2LOAD_THREADS" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        -d "$scratch/$name.bin" --log-file "$scratch/$name.log" "$url" >"$scratch/$name.out"
    local ok over err
    ok=$(( $(calls ok) - ok0 )); over=$(( $(calls over_limit) - over0 )); err=$(( $(calls error) - err0 ))
    local rps
    rps="$(grep -o '[0-9.]* req/s' "$scratch/$name.out" | head -1)"
    local p50 p99
    read -r p50 p99 < <(cut -f3 "$scratch/$name.log" | sort -n |
        awk '{v[NR]=$1} END {printf "%.2f %.2f\n", v[int(NR*0.50)]/1000, v[int(NR*0.99)]/1000}')
    # One more call, decoded: the counter is spent, so OVER_LIMIT with nothing left.
    curl -fsS --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
        --data-binary "@$scratch/$name.bin" -o "$scratch/$name.answer" "$url"
    local answer
    answer="$(python3 "$here/envoy_grpc.py" response "$scratch/$name.answer" | tr '\n' ' ')"
    echo "$name: connections=$connections streams=$streams  $rps  p50=${p50}ms p99=${p99}ms  ok=$ok over_limit=$over error=$err"
    echo "    $(grep -E '^requests:' "$scratch/$name.out")"
    echo "    check call: $answer"
    local expected=$((REQUESTS / 2))
    if (( ok != expected || over != REQUESTS - expected || err != 0 )); then
        echo "FAIL: expected ok=$expected over_limit=$((REQUESTS - expected)) error=0" >&2
        exit 1
    fi
    if [[ "$answer" != "overall_code OVER_LIMIT status OVER_LIMIT requests_per_unit $expected limit_remaining 0 " ]]; then
        echo "FAIL: the check call should be OVER_LIMIT with 0 remaining" >&2
        exit 1
    fi
}

echo "sluice $("$SLUICE_BIN" --version) | h2load threads=$H2LOAD_THREADS | $(nproc) cores"
run one 1 "$ONE_STREAMS"
run many "$CONNECTIONS" "$MANY_STREAMS"
