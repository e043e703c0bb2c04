#!/usr/bin/env bash
# Memory per held key on the memory store, per algorithm: RSS growth of a `sluice serve`
# after KEYS distinct keys of KEY_BYTES bytes (key-0000000.., padded with x after
# "key-" beyond 11 bytes) were each checked at least once
# through POST /v1/check, divided by the keys the store says it holds (`/v1/stats`).
# The rate (10/hour) keeps every key's state alive for the whole run, for every
# algorithm (at 1000/hour a gcra state expires 3.6 s after its hit and is swept).
#
# When throttlecrab-server is installed (apt-get install -y protobuf-compiler, then
# cargo install --locked throttlecrab-server), the same
# keys go to it afterwards through its POST /throttle (GCRA, burst 10, 10 per hour), and
# its RSS growth is divided by KEYS (it has no count of held keys; at 10 per hour it
# keeps every key it saw).
#
# Usage: bench/memory-per-key.sh
# Environment:
#   KEYS=300000  DURATION=12   SLUICE_BIN=path (default: build target/release/sluice)
#   KEY_BYTES=11 (at least 11; the memory store keeps keys up to 24 bytes inline)
#   ALGORITHMS="gcra fixed_window sliding_window"   THROTTLECRAB=throttlecrab-server
set -euo pipefail
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
KEYS="${KEYS:-300000}"
KEY_BYTES="${KEY_BYTES:-11}"
if (( KEY_BYTES < 11 )); then echo "KEY_BYTES must be at least 11" >&2; exit 2; fi
# "key-", padding, seven digits.
key_format="key-$(printf '%*s' $(( KEY_BYTES - 11 )) '' | tr ' ' x)%07d"
DURATION="${DURATION:-12}"
ALGORITHMS="${ALGORITHMS:-gcra fixed_window sliding_window}"
THROTTLECRAB="${THROTTLECRAB:-throttlecrab-server}"
if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="$root/target/release/sluice"
fi
scratch="$(mktemp -d)"
pid=""
cleanup() { [[ -n "$pid" ]] && kill "$pid" 2>/dev/null; rm -rf "$scratch"; }
trap cleanup EXIT
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

# Each of the two wrk threads walks its own half of the key space first.
cat > "$scratch/keys.lua" <<LUA
local n, i, id = $KEYS, 0, 0
function setup(t) t:set("id", id); id = id + 1 end
function init(args) i = id * math.floor(n / 2) end   -- two threads, two halves
request = function()
  i = i + 1
  local body = string.format('{"checks":[{"limit":"api","key":"$key_format"}]}', i % n)
  return wrk.format("POST", nil, {["content-type"] = "application/json"}, body)
end
LUA
sed -e "s|{\"checks\":\\[{\"limit\":\"api\",\"key\":\"$key_format\"}\\]}|{\"key\":\"$key_format\",\"max_burst\":10,\"count_per_period\":10,\"period\":3600,\"quantity\":1}|" \
    "$scratch/keys.lua" > "$scratch/throttlecrab.lua"

for algorithm in $ALGORITHMS; do
    cat > "$scratch/sluice.yaml" <<YAML
listen: 127.0.0.1:$port
storage: {backend: memory, max_keys: $(( KEYS * 2 ))}
limits:
  api: {rate: 10/hour, algorithm: $algorithm}
YAML
    "$SLUICE_BIN" serve --config "$scratch/sluice.yaml" > "$scratch/sluice.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break; sleep 0.1; done
    before="$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")"
    wrk -t2 -c16 -d"${DURATION}s" -s "$scratch/keys.lua" "http://127.0.0.1:$port/v1/check" > "$scratch/wrk.txt"
    sleep 1.5   # a sweep, so only held keys remain
    after="$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")"
    held="$(curl -sf "http://127.0.0.1:$port/v1/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["store"]["keys"])')"
    sent="$(awk '/requests in/ {print $1}' "$scratch/wrk.txt")"
    echo "$algorithm ($KEY_BYTES-byte keys): $sent checks, $held keys held, RSS $before kB -> $after kB: $(( (after - before) * 1024 / held )) bytes per held key"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done

if command -v "$THROTTLECRAB" > /dev/null 2>&1; then
    "$THROTTLECRAB" --http --http-port "$port" > "$scratch/throttlecrab.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        curl -sf -o /dev/null -X POST -H 'content-type: application/json' \
            -d '{"key":"probe","max_burst":1,"count_per_period":1,"period":1}' \
            "http://127.0.0.1:$port/throttle" && break
        sleep 0.1
    done
    before="$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")"
    wrk -t2 -c16 -d"${DURATION}s" -s "$scratch/throttlecrab.lua" "http://127.0.0.1:$port/throttle" > "$scratch/wrk.txt"
    sleep 1.5
    after="$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")"
    sent="$(awk '/requests in/ {print $1}' "$scratch/wrk.txt")"
    echo "throttlecrab-server (gcra, $KEY_BYTES-byte keys): $sent checks, $KEYS keys sent, RSS $before kB -> $after kB: $(( (after - before) * 1024 / KEYS )) bytes per key"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
fi
