#!/usr/bin/env bash
# Instructions the server executes per request, counted by valgrind's callgrind: a
# figure that does not drift with this VM's speed the way requests per second do, so
# two builds can be compared one after the other. The server runs under callgrind,
# wrk sends requests for DURATION seconds at low concurrency, and the instructions of
# an idle run of the same length are subtracted (timers, the memory store's sweeper).
#
# Usage: bench/instructions-per-request.sh [check|proxy|fixed] [BIN...]
#   check  POST /v1/check, one check per request (bench/check.lua, 10,000 keys)
#   proxy  GET /search through the reverse proxy to nginx answering a fixed 200
#   fixed  crates/runtime/examples/fixed_answer loop (the HTTP floor; BIN ignored)
# BIN: one or more sluice binaries to measure in turn (default: target/release/sluice,
# built first). DURATION=15 seconds of load per run.
# Needs: valgrind, wrk, nginx for `proxy` (apt-get install -y valgrind wrk nginx-light).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib-check-peers.sh
source "$root/bench/lib-check-peers.sh"
what="${1:-check}"
shift || true
DURATION="${DURATION:-15}"
for tool in valgrind wrk; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install -y valgrind wrk" >&2; exit 1; }
done

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-instructions.XXXXXX")"
cleanup() {
    nginx -c "$scratch/upstream.conf" -s stop 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT
port="$(free_port)"

bins=("$@")
if [[ "$what" == fixed ]]; then
    (cd "$root" && cargo build --release -q -p sluice-runtime --example fixed_answer)
    bins=("$root/target/release/examples/fixed_answer")
elif [[ ${#bins[@]} -eq 0 ]]; then
    (cd "$root" && cargo build --release -q -p sluice)
    bins=("$root/target/release/sluice")
fi

case "$what" in
    check | fixed)
        write_sluice_config "$scratch/sluice.yaml" "$port"
        url="http://127.0.0.1:$port/v1/check"
        wrk_args=(-s "$root/bench/check.lua")
        ;;
    proxy)
        command -v nginx >/dev/null || { echo "needs nginx: apt-get install -y nginx-light" >&2; exit 1; }
        upstream_port="$(free_port)"
        write_nginx_config "$scratch/upstream.conf" "$scratch" "$upstream_port"
        nginx -c "$scratch/upstream.conf"
        write_proxy_config "$scratch/sluice.yaml" "$port" "$upstream_port"
        url="http://127.0.0.1:$port/search"
        wrk_args=()
        ;;
    *) echo "usage: $0 [check|proxy|fixed] [BIN...]" >&2; exit 2 ;;
esac

# Runs BIN under callgrind with LOAD (yes/no); prints "requests instructions".
measure() {
    local bin="$1" load="$2" requests=0 pid
    if [[ "$what" == fixed ]]; then
        valgrind --tool=callgrind --callgrind-out-file="$scratch/cg.out" \
            "$bin" "$port" loop 2>"$scratch/valgrind.log" &
    else
        valgrind --tool=callgrind --callgrind-out-file="$scratch/cg.out" \
            "$bin" serve --config "$scratch/sluice.yaml" 2>"$scratch/valgrind.log" &
    fi
    pid=$!
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && break
        sleep 0.2
    done
    if [[ "$load" == yes ]]; then
        requests="$(wrk -t1 -c4 -d"${DURATION}s" "${wrk_args[@]}" "$url" | awk '/requests in/ {print $1}')"
    else
        sleep "$DURATION"
    fi
    # sluice shuts down on SIGINT; the example does not always under valgrind, and
    # callgrind still writes its counts on SIGTERM.
    kill -INT "$pid"
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$requests $(awk '/Collected :/ {gsub(",", "", $4); print $4}' "$scratch/valgrind.log")"
}

for bin in "${bins[@]}"; do
    read -r _ idle < <(measure "$bin" no)
    read -r requests loaded < <(measure "$bin" yes)
    python3 -c "
requests, loaded, idle = $requests, $loaded, $idle
print(f'$what $bin: {requests} requests, {(loaded - idle) / requests:,.0f} instructions per request')"
done
