#!/usr/bin/env bash
# Decisions/s with top keys on (the default, stats.top_keys: true) beside off
# (stats.top_keys: false): two servers of the same release binary, loaded one at a time
# and alternated round by round, the order flipped every round (this VM's speed drifts
# by ±20% between minutes; a ratio within a round is what counts).
#
# Load: bench/check.lua, POST /v1/check, CHECKS checks per request over KEYS distinct
# keys cycling uniformly (default 1 and 10,000: with 100 counters per sketch nearly every
# check replaces a counter, the sketch's most expensive path).
#
# Each run also reports the server's CPU time per request (utime + stime from
# /proc/PID/stat over the run, divided by the requests wrk completed): it drifts less
# than req/s when other processes share the cores.
#
# TOGETHER=1 loads both servers at once instead (one wrk each, same seconds): whatever
# else runs on the box then slows both alike, and the servers, sharing the cores, each
# get what the scheduler gives them, so the one needing more CPU per request serves
# fewer.
#
# Usage: bench/top-keys.sh [ROUNDS]   (default 4)
# Environment: DURATION=8 (s per run)  CHECKS=1  KEYS=10000  CONNECTIONS=64  THREADS=2
#              SLUICE_BIN=path (default: cargo build --release, $CARGO_TARGET_DIR/release/sluice)
#              BASE_BIN=path   also load a third server, this binary without a stats:
#                              section (a build from before top keys existed: what the
#                              per-minute timeline, on in both others, costs), each round
set -euo pipefail
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds="${1:-4}"
DURATION="${DURATION:-8}"
CHECKS="${CHECKS:-1}"
KEYS="${KEYS:-10000}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-topkeys.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$scratch"
}
trap cleanup EXIT
if [[ -n "${SLUICE_BIN:-}" ]]; then
    bin="$SLUICE_BIN"
else
    (cd "$root" && cargo build --release -q -p sluice)
    bin="${CARGO_TARGET_DIR:-$root/target}/release/sluice"
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() { # name stats-line: starts a server, sets $port (no subshell: $pids must see it)
    port="$(free_port)"
    cat >"$scratch/$1.yaml" <<YAML
listen: 127.0.0.1:$port
admin: {token: bench-token-0123456789}
storage: {backend: memory, max_keys: 1000000}
limits:
  api: {rate: 100/second}
  api_ip: {rate: [1000/second, 1000000/hour], algorithm: sliding_window}
$2
YAML
    "$bin" serve --config "$scratch/$1.yaml" >"$scratch/$1.out" 2>"$scratch/$1.log" &
    pids+=($!)
    for _ in $(seq 1 100); do
        curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break
        sleep 0.1
    done
}
start on "stats: {top_keys: true, top_keys_capacity: 100}"; on_port="$port"
start off "stats: {top_keys: false}"; off_port="$port"
base_port=""
if [[ -n "${BASE_BIN:-}" ]]; then
    saved_bin="$bin"; bin="$BASE_BIN"
    start base ""; base_port="$port"
    bin="$saved_bin"
fi

cpu_ticks() { # pid -> utime + stime of the process, in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}
hz="$(getconf CLK_TCK)"

run() { # port pid -> "req/s p99 non-200 cpu-µs/request"
    local before after out
    before="$(cpu_ticks "$2")"
    out="$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$root/bench/check.lua" \
        "http://127.0.0.1:$1/v1/check" -- "checks=$CHECKS" "keys=$KEYS" 2>&1)"
    after="$(cpu_ticks "$2")"
    awk -v ticks="$((after - before))" -v hz="$hz" '
        /requests in/ {n=$1} /Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} /^non-200 responses:/ {bad=$3}
        END {printf "%s %s %s %.1f", rps, p99, (bad == "" ? 0 : bad), (n > 0 ? ticks * 1e6 / hz / n : 0)}' <<<"$out"
}

echo "==> $bin; top keys on :$on_port, off :$off_port; ${TOGETHER:+both at once, }${DURATION}s runs, -t$THREADS -c$CONNECTIONS, $CHECKS check(s)/request, $KEYS keys"
printf "%-6s %-34s %-34s %-8s %-9s %s\n" round "on (req/s p99 non-200 cpu-µs/req)" "off (req/s p99 non-200 cpu-µs/req)" "on/off" "cpu on/off" "${base_port:+base (req/s p99 non-200 cpu-µs/req)  on/base}"
ratios=()
on_sum=0
off_sum=0
cpu_ratios=()
base_ratios=()
for r in $(seq 1 "$rounds"); do
    base=""
    if [[ -n "${TOGETHER:-}" ]]; then
        run "$on_port" "${pids[0]}" >"$scratch/on.run" &
        on_job=$!
        run "$off_port" "${pids[1]}" >"$scratch/off.run" &
        wait "$on_job" $!
        on="$(cat "$scratch/on.run")"; off="$(cat "$scratch/off.run")"
    elif (( r % 2 == 1 )); then
        on=$(run "$on_port" "${pids[0]}"); off=$(run "$off_port" "${pids[1]}")
        if [[ -n "$base_port" ]]; then base=$(run "$base_port" "${pids[2]}"); fi
    else
        if [[ -n "$base_port" ]]; then base=$(run "$base_port" "${pids[2]}"); fi
        off=$(run "$off_port" "${pids[1]}"); on=$(run "$on_port" "${pids[0]}")
    fi
    ratio=$(awk -v a="${on%% *}" -v b="${off%% *}" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "?" }')
    ratios+=("$ratio")
    on_sum=$(awk -v a="$on_sum" -v b="${on%% *}" 'BEGIN {print a + b}')
    off_sum=$(awk -v a="$off_sum" -v b="${off%% *}" 'BEGIN {print a + b}')
    cpu_ratio=$(awk -v a="${on##* }" -v b="${off##* }" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "?" }')
    cpu_ratios+=("$cpu_ratio")
    extra=""
    if [[ -n "$base" ]]; then
        base_ratio=$(awk -v a="${on%% *}" -v b="${base%% *}" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "?" }')
        base_ratios+=("$base_ratio")
        extra="$base  $base_ratio"
    fi
    printf "%-6s %-34s %-34s %-8s %-9s %s\n" "$r" "$on" "$off" "$ratio" "$cpu_ratio" "$extra"
done
median() { printf "%s\n" "$@" | sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else printf "%.3f", (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "==> req/s on/off per round: ${ratios[*]}; median $(median "${ratios[@]}") (target >= 0.97)"
echo "==> all rounds together: on $on_sum, off $off_sum req/s summed; on/off $(awk -v a="$on_sum" -v b="$off_sum" 'BEGIN { if (b > 0) printf "%.3f", a / b }')"
echo "==> server CPU per request on/off per round: ${cpu_ratios[*]}; median $(median "${cpu_ratios[@]}") (1.03 or less is the same target)"
if [[ -n "$base_port" ]]; then
    echo "==> req/s on/base per round: ${base_ratios[*]}; median $(median "${base_ratios[@]}")"
fi
curl -fsS -H 'authorization: Bearer bench-token-0123456789' "http://127.0.0.1:$on_port/v1/admin/top?limit=api&n=3" >"$scratch/top.json" &&
    echo "==> top keys of the 'on' server after the runs: $(cat "$scratch/top.json")"
echo "==> server rss: on $(awk '/VmRSS/ {print $2 " " $3}' "/proc/${pids[0]}/status"), off $(awk '/VmRSS/ {print $2 " " $3}' "/proc/${pids[1]}/status")"
echo "==> load average: $(cut -d' ' -f1-3 /proc/loadavg) (other builders share this VM's 2 cores)"
