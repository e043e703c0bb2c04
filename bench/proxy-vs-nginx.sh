#!/usr/bin/env bash
# The reverse proxy's cost: one fast upstream (nginx answering a fixed 200) served
#   1. directly,
#   2. through `sluice serve` as a reverse proxy with one limit on {client_ip},
#   3. through nginx with `limit_req` (one zone on $binary_remote_addr) and pooled
#      upstream connections,
# alternated round by round so all three see the same machine conditions (this 2-core
# VM's throughput drifts by ±20% between minutes). The limits are far above the offered
# load, so every request is decided and forwarded: the cost measured is deciding plus
# proxying. Prints each round and the medians (req/s, p99).
#
# Usage: bench/proxy-vs-nginx.sh [ROUNDS]   (default 3; DURATION=8 seconds per run;
#        SLUICE_BIN=path to a release binary, else it is built with cargo --release;
#        SLUICE_THREADS=N sluice's http.threads, default 0: one per core;
#        BEFORE_BIN=path also runs another build of sluice (say, main before a change)
#        in every round, as a fourth column)
# Needs: wrk and nginx (apt-get install -y wrk nginx-light).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib-check-peers.sh
source "$root/bench/lib-check-peers.sh"
rounds="${1:-3}"
DURATION="${DURATION:-8}"
CONNECTIONS="${CONNECTIONS:-64}"
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
[ -x "$NGINX" ] || { echo "needs nginx: apt-get install -y nginx-light" >&2; exit 1; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-proxy-bench.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    "$NGINX" -c "$scratch/upstream.conf" -s stop 2>/dev/null || true
    "$NGINX" -c "$scratch/front.conf" -s stop 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

upstream_port="$(free_port)"; sluice_port="$(free_port)"; front_port="$(free_port)"
before_port="$(free_port)"

if [ -z "${SLUICE_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q -p sluice)
    SLUICE_BIN="${CARGO_TARGET_DIR:-$root/target}/release/sluice"
fi

write_upstream_config "$scratch/upstream.conf" "$scratch" "$upstream_port"
# nginx in front with limit_req, the way it is usually set up for an API.
cat > "$scratch/front.conf" <<NGINX
worker_processes 2;
pid $scratch/front.pid;
error_log $scratch/front-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  limit_req_zone \$binary_remote_addr zone=api:10m rate=100000r/s;
  upstream app { server 127.0.0.1:$upstream_port; keepalive 128; }
  server {
    listen 127.0.0.1:$front_port;
    location / {
      limit_req zone=api burst=100000 nodelay;
      limit_req_status 429;
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
NGINX
write_proxy_config "$scratch/sluice.yaml" "$sluice_port" "$upstream_port" "${SLUICE_THREADS:-0}"
"$NGINX" -c "$scratch/upstream.conf"
"$NGINX" -c "$scratch/front.conf"
"$SLUICE_BIN" serve --config "$scratch/sluice.yaml" 2>"$scratch/sluice.log" & pids+=($!)
if [ -n "${BEFORE_BIN:-}" ]; then
    sed "s/:$sluice_port\$/:$before_port/" "$scratch/sluice.yaml" > "$scratch/before.yaml"
    "$BEFORE_BIN" serve --config "$scratch/before.yaml" 2>"$scratch/before.log" & pids+=($!)
fi
sleep 1
for port in "$upstream_port" "$front_port" "$sluice_port"; do
    curl -sf "http://127.0.0.1:$port/search" >/dev/null || { echo "port $port does not answer" >&2; cat "$scratch/sluice.log" >&2; exit 1; }
done
curl -si "http://127.0.0.1:$sluice_port/search" | grep -qi '^ratelimit:' || { echo "sluice did not decide the request" >&2; exit 1; }

run() { # url -> "req/s p99 non2xx"
    wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$1" 2>&1 \
      | awk '/Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} /Non-2xx/ {bad=$NF} END {print rps, p99, (bad == "" ? 0 : bad)}'
}
printf "%-6s %-24s %-24s %-24s %s\n" round "direct" "sluice proxy" "nginx limit_req" "${BEFORE_BIN:+sluice before}"
: > "$scratch/results"
for r in $(seq 1 "$rounds"); do
    read -r d_rps d_p99 d_bad < <(run "http://127.0.0.1:$upstream_port/search")
    # With a second build, the two trade places every other round: a run's place in
    # the round is worth several percent here (the last run measured about 8% faster
    # than the same binary run second), which would otherwise favour one side.
    if [ -n "${BEFORE_BIN:-}" ] && (( r % 2 == 0 )); then
        read -r b_rps b_p99 b_bad < <(run "http://127.0.0.1:$before_port/search")
        read -r n_rps n_p99 n_bad < <(run "http://127.0.0.1:$front_port/search")
        read -r s_rps s_p99 s_bad < <(run "http://127.0.0.1:$sluice_port/search")
    else
        read -r s_rps s_p99 s_bad < <(run "http://127.0.0.1:$sluice_port/search")
        read -r n_rps n_p99 n_bad < <(run "http://127.0.0.1:$front_port/search")
        if [ -n "${BEFORE_BIN:-}" ]; then
            read -r b_rps b_p99 b_bad < <(run "http://127.0.0.1:$before_port/search")
        fi
    fi
    before=""
    if [ -n "${BEFORE_BIN:-}" ]; then
        before="$b_rps ($b_p99)"
        echo "$s_rps $b_rps" >> "$scratch/before-results"
    fi
    for bad in "$d_bad" "$s_bad" "$n_bad"; do
        [ "$bad" = 0 ] || { echo "round $r: non-2xx answers ($d_bad/$s_bad/$n_bad): the limits are meant never to deny" >&2; exit 1; }
    done
    printf "%-6s %-24s %-24s %-24s %s\n" "$r" "$d_rps ($d_p99)" "$s_rps ($s_p99)" "$n_rps ($n_p99)" "$before"
    echo "$d_rps $s_rps $n_rps $d_p99 $s_p99 $n_p99" >> "$scratch/results"
done
python3 - "$scratch/results" <<'PY'
import statistics, sys
def ms(t):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * f
    return float(t)
rows = [line.split() for line in open(sys.argv[1])]
d, s, n = (statistics.median(float(r[i]) for r in rows) for i in range(3))
dp, sp, np_ = (statistics.median(ms(r[i]) for r in rows) for i in range(3, 6))
print(f"median  direct {d:.0f} req/s p99 {dp:.2f} ms | sluice {s:.0f} req/s p99 {sp:.2f} ms "
      f"({s / d:.2f} of direct) | nginx limit_req {n:.0f} req/s p99 {np_:.2f} ms ({n / d:.2f} of direct)")
print(f"sluice / nginx limit_req: {s / n:.2f}")
PY
if [ -n "${BEFORE_BIN:-}" ]; then
    python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
print("sluice / sluice before, round by round:", " ".join(f"{a / b:.2f}" for a, b in rows),
      f"(median {statistics.median(a / b for a, b in rows):.2f})")' "$scratch/before-results"
fi
