#!/usr/bin/env bash
# Decisions per second with 100k runtime entries held, beside none, in the same minutes;
# and the memory each entry costs.
#
# Usage: bench/entries.sh
# Environment:
#   ENTRIES=100000   plan assignments loaded into the "loaded" server (subjects k0..)
#   DURATION=15      seconds per wrk run      ROUNDS=3   none/loaded pairs, interleaved
#   THREADS=2 CONNECTIONS=64 KEYS=10000      wrk load (bench/check.lua, keys k0..k9999)
#   SLUICE_BIN=path  run this binary instead of building target/release/sluice
#
# Two `sluice serve` processes on the memory store with the same config; one gets
# ENTRIES plan assignments through POST /v1/admin/entries (1000 per call), so every key
# wrk sends (k0..k9999) is assigned to `pro`, and its RSS growth over the load divided by
# ENTRIES is the memory per entry. Then wrk loads each in turn, ROUNDS times, the order
# flipping every round.
set -euo pipefail
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
ENTRIES="${ENTRIES:-100000}"
DURATION="${DURATION:-15}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
KEYS="${KEYS:-10000}"
TOKEN=bench-entries-admin-token-0123456789

if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="$root/target/release/sluice"
fi
scratch="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$scratch"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() { # name -> sets port_<name>, pid_<name>
    local name="$1" port
    port="$(free_port)"
    cat > "$scratch/$name.yaml" <<YAML
listen: 127.0.0.1:$port
admin: {token: $TOKEN}
storage: {backend: memory, max_keys: 1000000}
limits:
  api:
    rate: 1000000/second
    plans: {pro: {rate: 900000/second}}
  api_ip: {rate: 1000000/second}
YAML
    "$SLUICE_BIN" serve --config "$scratch/$name.yaml" > "$scratch/$name.log" 2>&1 &
    pids+=($!)
    eval "port_$name=$port pid_$name=$!"
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && return; sleep 0.1; done
    echo "sluice ($name) did not start" >&2; cat "$scratch/$name.log" >&2; exit 1
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

start none
start loaded
before="$(rss_kb "$pid_loaded")"
python3 "$here/load_entries.py" "$port_loaded" "$ENTRIES" "$TOKEN"
sleep 1
after="$(rss_kb "$pid_loaded")"
held="$(curl -sf -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$port_loaded/v1/admin/entries" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["entries"]))')"
echo "entries held: $held; RSS $before kB -> $after kB: $(( (after - before) * 1024 / ENTRIES )) bytes per entry"
curl -sf -X POST -H 'content-type: application/json' "http://127.0.0.1:$port_loaded/v1/check" \
    -d '{"checks":[{"limit":"api","key":"k7"}],"dry_run":true}' | grep -q '"plan":"pro"' \
    || { echo "the loaded server does not apply its entries" >&2; exit 1; }

run() { # name -> req/s
    local port="port_$1"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$here/check.lua" \
        "http://127.0.0.1:${!port}/v1/check" -- checks=1 keys="$KEYS" > "$scratch/wrk.txt"
    awk '/Requests\/sec/ {print $2}' "$scratch/wrk.txt"
}

for round in $(seq "$ROUNDS"); do
    # The order flips every round, so neither server always runs in the later minute.
    if (( round % 2 )); then
        none="$(run none)"
        loaded="$(run loaded)"
    else
        loaded="$(run loaded)"
        none="$(run none)"
    fi
    echo "round $round: none $none req/s, $ENTRIES entries $loaded req/s, ratio $(python3 -c "print(f'{$loaded/$none:.3f}')")"
done
