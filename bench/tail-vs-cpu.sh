#!/usr/bin/env bash
# Where the p99 of a saturating wrk run comes from on this 2-core box: the same hyper
# server (crates/runtime/examples/fixed_answer.rs, `hyper` mode) with 0, 1 and 3 µs of
# spinning added per request, beside nginx's fixed 200 and sluice's /v1/check, loaded
# with http-floor.sh's wrk command and alternated round by round. If the spinning
# servers' p99 grows with the spin while their requests per second barely move, the tail
# is the CPU a request costs (two serving threads and two wrk threads sharing two cores),
# not anything in the serving loop.
#
# Usage: bench/tail-vs-cpu.sh [ROUNDS]   (default 4; DURATION=8 seconds per run)
# SLUICE_BIN=path runs that binary instead of building target/release/sluice;
# SPINS="0 1000 3000" the spins to try, in nanoseconds.
# Needs: wrk and nginx (apt-get install -y wrk nginx-light).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib-check-peers.sh
source "$root/bench/lib-check-peers.sh"
rounds="${1:-4}"
DURATION="${DURATION:-8}"
SPINS="${SPINS:-0 1000 3000}"
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "needs wrk and nginx: apt-get install -y wrk nginx-light" >&2; exit 1; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-tail.XXXXXX")"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -c "$scratch/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$scratch"; }
trap cleanup EXIT

(cd "$root" && cargo build --release -q -p sluice-runtime --example fixed_answer)
if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="$root/target/release/sluice"
fi
names=(); ports=()
port="$(free_port)"; write_nginx_config "$scratch/nginx.conf" "$scratch" "$port"; nginx -c "$scratch/nginx.conf"
names+=("nginx fixed 200"); ports+=("$port")
for spin in $SPINS; do
    port="$(free_port)"
    "$root/target/release/examples/fixed_answer" "$port" hyper "$spin" & pids+=($!)
    names+=("hyper +${spin}ns"); ports+=("$port")
done
port="$(free_port)"; write_sluice_config "$scratch/sluice.yaml" "$port"
"$SLUICE_BIN" serve --config "$scratch/sluice.yaml" 2>"$scratch/sluice.log" & pids+=($!)
names+=("sluice /v1/check"); ports+=("$port")
sleep 1

echo "each cell: requests/s, p50 / p90 / p99"
for r in $(seq 1 "$rounds"); do
    echo "round $r"
    order=("${!ports[@]}")
    if (( r % 2 == 0 )); then
        order=(); for (( i = ${#ports[@]} - 1; i >= 0; i-- )); do order+=("$i"); done
    fi
    for i in "${order[@]}"; do
        wrk -t2 -c64 -d"${DURATION}s" --latency -s "$root/bench/check.lua" "http://127.0.0.1:${ports[$i]}/v1/check" > "$scratch/wrk.out" 2>&1
        awk -v name="${names[$i]}" '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +90%/ {p90=$2} /^ +99%/ {p99=$2}
            END {printf "  %-18s %8.0f  %s / %s / %s\n", name, rps, p50, p90, p99}' "$scratch/wrk.out"
    done
done
