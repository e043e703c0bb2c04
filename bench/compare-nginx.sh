#!/usr/bin/env bash
# sluice's POST /v1/check beside nginx returning a fixed 200 to the same requests,
# alternated round by round so both see the same machine conditions (this 2-core VM's
# throughput drifts by ±20% between minutes). Prints each round and the medians.
#
# Usage: bench/compare-nginx.sh [ROUNDS]      (default 5; DURATION=8 seconds per run)
# SLUICE_BIN=path runs that binary instead of building target/release/sluice.
# Needs: wrk and nginx (apt-get install -y wrk nginx-light).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib-check-peers.sh
source "$root/bench/lib-check-peers.sh"
rounds="${1:-5}"
DURATION="${DURATION:-8}"
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "needs wrk and nginx: apt-get install -y wrk nginx-light" >&2; exit 1; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-compare.XXXXXX")"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -c "$scratch/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$scratch"; }
trap cleanup EXIT

sluice_port="$(free_port)"; nginx_port="$(free_port)"

if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="$root/target/release/sluice"
fi
write_sluice_config "$scratch/sluice.yaml" "$sluice_port"
write_nginx_config "$scratch/nginx.conf" "$scratch" "$nginx_port"
"$SLUICE_BIN" serve --config "$scratch/sluice.yaml" 2>"$scratch/sluice.log" & pids+=($!)
nginx -c "$scratch/nginx.conf"
sleep 1

run() { # url -> "req/s p99"
    wrk -t2 -c64 -d"${DURATION}s" --latency -s "$root/bench/check.lua" "$1" 2>&1 \
      | awk '/Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} END {print rps, p99}'
}
printf "%-6s %-22s %-22s %s\n" round "nginx fixed 200" "sluice /v1/check" "ratio"
: > "$scratch/results"
for r in $(seq 1 "$rounds"); do
    read -r n_rps n_p99 < <(run "http://127.0.0.1:$nginx_port/v1/check")
    read -r s_rps s_p99 < <(run "http://127.0.0.1:$sluice_port/v1/check")
    ratio=$(python3 -c "print(f'{$s_rps/$n_rps:.2f}')")
    printf "%-6s %-22s %-22s %s\n" "$r" "$n_rps ($n_p99 p99)" "$s_rps ($s_p99 p99)" "$ratio"
    echo "$n_rps $s_rps" >> "$scratch/results"
done
python3 - "$scratch/results" <<'PY'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
n = statistics.median(r[0] for r in rows); s = statistics.median(r[1] for r in rows)
print(f"median: nginx {n:.0f} req/s, sluice {s:.0f} req/s, sluice/nginx {s/n:.2f}")
PY
