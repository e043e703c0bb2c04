#!/usr/bin/env bash
# How much of POST /v1/check's cost is the HTTP stack: nginx returning a fixed 200,
# hyper alone returning the same fixed body, sluice's serving loop with an axum route
# returning it (crates/runtime/examples/fixed_answer.rs), and sluice deciding, all
# loaded with the same wrk command (bench/check.lua) and alternated round by round so
# every server sees the same machine conditions. Prints each round and the medians as
# ratios to nginx.
#
# Usage: bench/http-floor.sh [ROUNDS]      (default 3; DURATION=8 seconds per run)
# SLUICE_BIN=path runs that binary instead of building target/release/sluice;
# BEFORE_BIN=path adds a column for another build of sluice (say, main before a change).
# throttlecrab-server, when installed (apt-get install -y protobuf-compiler, then cargo
# install --locked throttlecrab-server: without protoc its build fails, and a retry
# needs a clean target directory; THROTTLECRAB= names another path), gets a column too: the same keys as GCRA at 100 per second
# (bench/check.lua peer=throttlecrab), on its HTTP front.
# Needs: wrk and nginx (apt-get install -y wrk nginx-light).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib-check-peers.sh
source "$root/bench/lib-check-peers.sh"
rounds="${1:-3}"
DURATION="${DURATION:-8}"
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "needs wrk and nginx: apt-get install -y wrk nginx-light" >&2; exit 1; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-floor.XXXXXX")"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -c "$scratch/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$scratch"; }
trap cleanup EXIT

nginx_port="$(free_port)"; hyper_port="$(free_port)"; loop_port="$(free_port)"; sluice_port="$(free_port)"
before_port="$(free_port)"; crab_port="$(free_port)"
THROTTLECRAB="${THROTTLECRAB:-throttlecrab-server}"

(cd "$root" && cargo build --release -q -p sluice-runtime --example fixed_answer)
if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="$root/target/release/sluice"
fi
fixed="$root/target/release/examples/fixed_answer"
write_sluice_config "$scratch/sluice.yaml" "$sluice_port"
write_nginx_config "$scratch/nginx.conf" "$scratch" "$nginx_port"
nginx -c "$scratch/nginx.conf"
"$fixed" "$hyper_port" hyper & pids+=($!)
"$fixed" "$loop_port" loop & pids+=($!)
"$SLUICE_BIN" serve --config "$scratch/sluice.yaml" 2>"$scratch/sluice.log" & pids+=($!)
ports=("$nginx_port" "$hyper_port" "$loop_port" "$sluice_port")
names=("nginx fixed 200" "hyper fixed" "sluice loop fixed" "sluice /v1/check")
servers=("$(cat "$scratch/nginx.pid")" "${pids[0]}" "${pids[1]}" "${pids[2]}")
if [[ -n "${BEFORE_BIN:-}" ]]; then
    sed "s/:$sluice_port/:$before_port/" "$scratch/sluice.yaml" > "$scratch/before.yaml"
    "$BEFORE_BIN" serve --config "$scratch/before.yaml" 2>"$scratch/before.log" & pids+=($!)
    ports+=("$before_port"); names+=("sluice before"); servers+=("${pids[3]}")
fi
paths=("/v1/check" "/v1/check" "/v1/check" "/v1/check")
[[ -n "${BEFORE_BIN:-}" ]] && paths+=("/v1/check")
if command -v "$THROTTLECRAB" >/dev/null 2>&1; then
    "$THROTTLECRAB" --http --http-port "$crab_port" >/dev/null 2>&1 & pids+=($!)
    ports+=("$crab_port"); names+=("throttlecrab"); servers+=("$!"); paths+=("/throttle")
fi
sleep 1

# CPU seconds a server (and, for nginx, its workers) has used: a measure of cost per
# request that does not depend on how the scheduler shares the two cores with wrk.
cpu_seconds() {
    local all=("$1" $(pgrep -P "$1" || true))
    local ticks=0 p f
    for p in "${all[@]}"; do
        read -ra f < "/proc/$p/stat"
        ticks=$(( ticks + f[13] + f[14] ))
    done
    python3 -c "print($ticks / $(getconf CLK_TCK))"
}
run() { # url server-pid -> "req/s p99 cpu-us-per-request"
    local before after peer=()
    [[ "$1" == */throttle ]] && peer=(-- peer=throttlecrab)
    before="$(cpu_seconds "$2")"
    wrk -t2 -c64 -d"${DURATION}s" --latency -s "$root/bench/check.lua" "$1" "${peer[@]}" > "$scratch/wrk.out" 2>&1
    after="$(cpu_seconds "$2")"
    awk -v cpu="$(python3 -c "print($after - $before)")" \
        '/requests in/ {n=$1} /Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} END {printf "%s %s %.1f\n", rps, p99, cpu * 1e6 / n}' \
        "$scratch/wrk.out"
}
columns() { printf "%-6s" "$1"; shift; printf " %-28s" "$@"; echo; }
echo "each cell: requests/s (p99, server CPU µs per request)"
columns round "${names[@]}"
: > "$scratch/results"
for r in $(seq 1 "$rounds"); do
    # Every other round runs the servers in reverse order: a run's place in the round
    # is worth several percent on this VM (see proxy-vs-nginx.sh), which would
    # otherwise favour whoever always runs in the better place.
    order=("${!ports[@]}")
    if (( r % 2 == 0 )); then
        order=(); for (( i = ${#ports[@]} - 1; i >= 0; i-- )); do order+=("$i"); done
    fi
    cells=(); figures=()
    for i in "${order[@]}"; do
        read -r rps p99 cpu < <(run "http://127.0.0.1:${ports[$i]}${paths[$i]}" "${servers[$i]}")
        cells[i]="$rps ($p99, $cpu µs)"
        figures[i]="$rps $cpu"
    done
    row=()
    for i in "${!ports[@]}"; do
        row+=("${cells[$i]}")
        printf "%s " "${figures[$i]}" >> "$scratch/results"
    done
    echo >> "$scratch/results"
    columns "$r" "${row[@]}"
done
python3 - "$scratch/results" "${names[@]}" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
names = sys.argv[2:]
rps = [statistics.median(r[2 * i] for r in rows) for i in range(len(names))]
cpu = [statistics.median(r[2 * i + 1] for r in rows) for i in range(len(names))]
print("median req/s: " + ", ".join(f"{n} {m:.0f}" for n, m in zip(names, rps)))
print("median CPU µs per request: " + ", ".join(f"{n} {c:.1f}" for n, c in zip(names, cpu)))
print("throughput / nginx: " + ", ".join(f"{n} {m/rps[0]:.2f}" for n, m in zip(names[1:], rps[1:])))
sluice = names.index("sluice /v1/check")
for peer in ("nginx fixed 200", "throttlecrab"):
    if peer in names:
        p = names.index(peer)
        ratios = sorted(r[2 * sluice] / r[2 * p] for r in rows)
        print(f"sluice /v1/check / {peer}, round by round: " + " ".join(f"{x:.2f}" for x in ratios)
              + f" (median {statistics.median(ratios):.2f})")
PY
