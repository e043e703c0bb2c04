#!/usr/bin/env bash
# Memory per runtime entry in steady state: ENTRIES plan assignments written to a disk
# store, the server restarted (entries read once, one directory built), its RSS beside an
# empty server's started in the same second.
#
# Usage: bench/entries-memory.sh            ENTRIES=100000  SLUICE_BIN=path (else built)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
ENTRIES="${ENTRIES:-100000}"
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

serve() { # name port -> pid in $pid
    cat > "$scratch/$1.yaml" <<YAML
listen: 127.0.0.1:$2
admin: {token: $TOKEN}
storage: {backend: disk, path: $scratch/data-$1}
limits:
  api:
    rate: 1000000/second
    plans: {pro: {rate: 900000/second}}
YAML
    "$SLUICE_BIN" serve --config "$scratch/$1.yaml" > "$scratch/$1.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$2/healthz" > /dev/null && return; sleep 0.1; done
    echo "sluice ($1) did not start" >&2; exit 1
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

loaded_port="$(free_port)"
serve loaded "$loaded_port"
python3 "$here/load_entries.py" "$loaded_port" "$ENTRIES" "$TOKEN"
echo "after loading $ENTRIES entries live: $(rss_kb "$pid") kB"
kill "$pid"; wait "$pid" 2>/dev/null || true
serve loaded "$loaded_port"; loaded="$pid"
serve empty "$(free_port)"; empty="$pid"
sleep 2
echo "restarted with $ENTRIES entries: $(rss_kb "$loaded") kB; empty: $(rss_kb "$empty") kB;" \
     "$(( ($(rss_kb "$loaded") - $(rss_kb "$empty")) * 1024 / ENTRIES )) bytes per entry"
