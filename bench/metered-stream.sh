#!/usr/bin/env bash
# What reading usage from streamed LLM answers costs the reverse proxy: sluice in front
# of a stand-in LLM API (bench/sse_upstream.py) that answers every POST with an
# OpenAI-style stream of CHUNKS content chunks and its usage chunk, on a metered route
# (`usage: {format: FORMAT}`, one limit charged `cost: usage`), beside the same build
# proxying the same route unmetered (`plain`: one request-counting limit, the stream
# passed through unread). Reported per server, in
# rounds alternated in order: answers per second and the CPU sluice spent per answer and
# per event (from /proc), the figure to compare, as the Python upstream is the bottleneck.
#
# Usage: bench/metered-stream.sh [ROUNDS]   (default 3; DURATION=8 seconds per run;
#        CHUNKS=500; FORMAT=openai;
#        SLUICE_BIN=path to a release binary, else built with cargo --release;
#        BEFORE_BIN=path also runs another build in every round)
# Needs: wrk, python3 (apt-get install -y wrk python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib-check-peers.sh
source "$root/bench/lib-check-peers.sh"
rounds="${1:-3}"
DURATION="${DURATION:-8}"
CHUNKS="${CHUNKS:-500}"
FORMAT="${FORMAT:-openai}"
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-metered-bench.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$scratch"
}
trap cleanup EXIT

if [ -z "${SLUICE_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="${CARGO_TARGET_DIR:-$root/target}/release/sluice"
fi

upstream_port="$(free_port)"
python3 "$root/bench/sse_upstream.py" "$upstream_port" "$CHUNKS" & pids+=($!)

cat > "$scratch/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":1000,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say many words."}]}'
LUA

# serve NAME BIN [plain]: a sluice on a metered route (or, with `plain`, an unmetered
# one) in front of the upstream; prints its port and pid.
serve() {
    local port admin_port metered="usage: {format: $FORMAT}" cost="cost: usage"
    port="$(free_port)"; admin_port="$(free_port)"
    if [ "${3:-}" = plain ]; then metered="# unmetered"; cost="cost: 1"; fi
    cat > "$scratch/$1.yaml" <<YAML
listen: 127.0.0.1:$port
admin: {listen: 127.0.0.1:$admin_port}
storage: {backend: memory}
limits:
  tokens: {rate: 1000000000/minute, algorithm: fixed_window}
routes:
  - match: {path: /v1/chat/completions, methods: [POST]}
    $metered
    limits:
      - {limit: tokens, key: "{client_ip}", $cost}
proxy:
  upstream: http://127.0.0.1:$upstream_port
YAML
    "$2" serve --config "$scratch/$1.yaml" 2>"$scratch/$1.log" & pids+=($!)
    echo "$port $! $admin_port"
}
read -r after_port after_pid after_admin < <(serve after "$SLUICE_BIN")
read -r plain_port plain_pid _ < <(serve plain "$SLUICE_BIN" plain)
names=(after plain); ports=("$after_port" "$plain_port"); procs=("$after_pid" "$plain_pid")
if [ -n "${BEFORE_BIN:-}" ]; then
    read -r before_port before_pid _ < <(serve before "$BEFORE_BIN")
    names+=(before); ports+=("$before_port"); procs+=("$before_pid")
fi
sleep 1
for port in "${ports[@]}"; do
    body="$(curl -sf -X POST -H 'content-type: application/json' -d '{"max_tokens":10}' "http://127.0.0.1:$port/v1/chat/completions")" ||
        { echo "port $port does not answer" >&2; cat "$scratch"/*.log >&2; exit 1; }
    grep -q '"usage"' <<<"$body" || { echo "no usage chunk in the stream" >&2; exit 1; }
done
# The metered server read the usage: its settlements say so.
curl -s "http://127.0.0.1:$after_admin/metrics" | grep -q 'sluice_proxy_settlements_total{outcome="usage"} [1-9]' ||
    { echo "the metered route did not settle at the stream's usage" >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # index -> "answers/s cpu_us_per_answer"
    local port="${ports[$1]}" pid="${procs[$1]}" before after out
    before="$(cpu_ticks "$pid")"
    out="$(wrk -t1 -c8 -d"${DURATION}s" -s "$scratch/post.lua" "http://127.0.0.1:$port/v1/chat/completions")"
    after="$(cpu_ticks "$pid")"
    python3 -c "
import re, sys, os
out = sys.argv[1]
requests = int(re.search(r'(\d+) requests in', out).group(1))
bad = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
if bad: sys.exit('non-2xx answers: ' + bad.group(1))
ticks = int(sys.argv[3]) - int(sys.argv[2])
us = ticks / os.sysconf('SC_CLK_TCK') * 1e6 / requests
print(f'{requests / float(sys.argv[4]):.0f} {us:.0f}')" "$out" "$before" "$after" "$DURATION"
}

printf "%-6s" round; for n in "${names[@]}"; do printf " %-28s" "$n (answers/s, µs CPU/answer)"; done; echo
: > "$scratch/results"
for r in $(seq 1 "$rounds"); do
    order=("${!names[@]}")
    if (( r % 2 == 0 )); then order=($(printf '%s\n' "${order[@]}" | tac)); fi
    declare -A got=()
    for i in "${order[@]}"; do got[$i]="$(run "$i")"; done
    printf "%-6s" "$r"; for i in "${!names[@]}"; do printf " %-28s" "${got[$i]}"; done; echo
    for i in "${!names[@]}"; do echo "$i ${got[$i]}"; done >> "$scratch/results"
    unset got
done
python3 - "$scratch/results" "$CHUNKS" "${names[@]}" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
chunks = int(sys.argv[2])
for i, name in enumerate(sys.argv[3:]):
    cpu = statistics.median(float(r[2]) for r in rows if r[0] == str(i))
    rate = statistics.median(float(r[1]) for r in rows if r[0] == str(i))
    print(f"median {name}: {rate:.0f} answers/s, {cpu:.0f} µs CPU per answer, {cpu * 1000 / (chunks + 2):.0f} ns per event")
PY
