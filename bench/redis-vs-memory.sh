#!/usr/bin/env bash
# The Redis store beside the memory store and throttlecrab-server, interleaved in the
# same minutes, with the load of bench/load-check.sh (wrk -t2 -c64, 10,000 keys, one
# check per request, every request allowed).
#
# Usage: bench/redis-vs-memory.sh [--over-limit] [rounds]      (default 3)
#   --over-limit: most requests hit a key already over its limit (API_RATE=10/minute,
#   KEYS=1000 unless set): memory, Redis with storage.local_deny_cache: false and Redis
#   with the deny cache (the default), interleaved; throttlecrab is skipped.
# Environment: DURATION=10 (seconds per run), SLUICE_BIN (default: the release build),
#   THROTTLECRAB=throttlecrab-server (skipped when not installed: cargo install
#   throttlecrab-server).
# Prints one line per run; bench/load-check.sh's summaries (req/s, p50, p99, and for
# Redis EVALSHA and all Redis commands per request) and wrk's output are kept in
# bench/results/.
set -euo pipefail
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
over_limit=""
if [[ "${1:-}" == --over-limit ]]; then
    over_limit=1
    shift
    export API_RATE="${API_RATE:-10/minute}" KEYS="${KEYS:-1000}"
fi
rounds="${1:-3}"
export DURATION="${DURATION:-10}"
THROTTLECRAB="${THROTTLECRAB:-throttlecrab-server}"
if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -p sluice)
    export SLUICE_BIN="${CARGO_TARGET_DIR:-$root/target}/release/sluice"
fi
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
for round in $(seq 1 "$rounds"); do
    if [[ -n "$over_limit" ]]; then
        for run in memory redis:false redis:true; do
            storage="${run%%:*}" cache="${run#*:}"
            [[ "$run" == memory ]] && cache=""
            echo "round $round $storage${cache:+ deny-cache=$cache} (load $(cut -d' ' -f1 /proc/loadavg)): $(STORAGE=$storage DENY_CACHE=${cache:-true} "$here/load-check.sh" --variant 1 2>/dev/null | grep 'checks/request=' | sed 's/^ *//')"
        done
        continue
    fi
    for storage in memory redis; do
        echo "round $round $storage: $(STORAGE=$storage "$here/load-check.sh" --variant 1 2>/dev/null | grep 'checks/request=' | sed 's/^ *//')"
    done
    if command -v "$THROTTLECRAB" >/dev/null 2>&1; then
        port="$(free_port)"
        "$THROTTLECRAB" --http --http-port "$port" >/dev/null 2>&1 &
        pid=$!
        for _ in $(seq 1 100); do
            curl -fsS -o /dev/null -X POST -H 'Content-Type: application/json' \
                -d '{"key":"probe","max_burst":1,"count_per_period":1,"period":1}' \
                "http://127.0.0.1:$port/throttle" 2>/dev/null && break
            sleep 0.1
        done
        mkdir -p "$root/bench/results"
        out="$root/bench/results/throttlecrab-$(date -u +%Y%m%dT%H%M%SZ).txt"
        wrk -t2 -c64 -d"${DURATION}s" --latency -s "$here/check.lua" \
            "http://127.0.0.1:$port/throttle" -- peer=throttlecrab >"$out" || true
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
        p50="$(awk '/Latency Distribution/ {d=1} d && $1=="50%" {print $2; exit}' "$out")"
        p99="$(awk '/Latency Distribution/ {d=1} d && $1=="99%" {print $2; exit}' "$out")"
        echo "round $round throttlecrab-server (memory): req/s=${rps:-?}  p50=${p50:-?}  p99=${p99:-?}  $(grep '^status codes' "$out")"
    fi
done
