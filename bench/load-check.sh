#!/usr/bin/env bash
# Load test of sluice's HTTP decision API (POST /v1/check) with wrk.
#
# Usage:
#   bench/load-check.sh                      # build release, start sluice, run both variants
#   bench/load-check.sh --variant 1          # only one check per request
#   bench/load-check.sh --variant 2          # only two checks per request
#   bench/load-check.sh --variant "1 reserve"  # one check per request, then reserve +
#                                            # settle pairs (bench/reserve.lua), same server
#   bench/load-check.sh --target http://host:port   # no build/start: load an existing server
#                                                  # (it must define limits `api` and `api_ip`)
# Environment:
#   DURATION=20   seconds per run        THREADS=2      wrk threads
#   CONNECTIONS=64                       KEYS=10000     distinct keys (k0..k9999)
#   WRK=wrk                              KEEP=1         keep the scratch dir
#   STORAGE=memory   memory | disk | disk-sync (backend disk in the scratch dir, sync: true)
#                    | redis (starts its own redis-server on a free loopback port,
#                      --save '' --appendonly no, in the scratch dir; stopped at exit)
#                    | redis-cluster (three redis-server --cluster-enabled yes on free
#                      loopback ports, joined by redis-cli --cluster create; storage
#                      cluster: true; the Redis figures are summed over the nodes)
#   REDIS_SERVER=redis-server  REDIS_CLI=redis-cli   (STORAGE=redis, redis-cluster)
#   DENY_CACHE=true  (STORAGE=redis) storage.local_deny_cache; false: every decision goes
#                    to Redis
#   API_RATE=100/second   the rate of limit `api` (e.g. 10/minute with KEYS=1000: nearly
#                    every request hits a key already over its limit)
#                    | postgres (initdb + pg_ctl of its own cluster in the scratch dir, as the
#                      postgres user when run as root, on a free loopback port; stopped at exit)
#   PG_BIN=$(pg_config --bindir)   PG_TRACK=top   (STORAGE=postgres; pg_stat_statements.track)
#   PG_POOL=16  PG_TIMEOUT_MS=200                (STORAGE=postgres; storage.pool_size, timeout_ms)
#   SLUICE_BIN=path  run this binary instead of building target/release/sluice
#                    (to compare two builds in the same minutes)
#
# Each run prints req/s, p50 and p99 latency, the status-code histogram and the
# number of non-200 answers; full wrk output goes to bench/results/. With
# STORAGE=redis it also prints, per run, the EVALSHA calls Redis counted
# (INFO commandstats, reset before the run) divided by the requests wrk completed, every
# command Redis ran (the scripts' TIME, GET, SET... included) per request,
# and the degraded decisions and store errors from /metrics (a run with any degraded
# decision did not measure Redis and fails). With STORAGE=postgres it prints the calls of
# sluice_decide (pg_stat_statements, reset before the run) per request, every statement
# pg_stat_statements saw per request (with PG_TRACK=all, the ones inside the function
# too), and the same degraded / store-error deltas.
set -euo pipefail
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

DURATION="${DURATION:-20}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
KEYS="${KEYS:-10000}"
WRK="${WRK:-wrk}"
STORAGE="${STORAGE:-memory}"
target=""
variants="1 2"

usage() { sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --target) target="${2:?--target needs a URL}"; shift 2 ;;
        --target=*) target="${1#--target=}"; shift ;;
        --variant) variants="${2:?--variant needs 1 or 2}"; shift 2 ;;
        --variant=*) variants="${1#--variant=}"; shift ;;
        --duration) DURATION="${2:?}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

if ! command -v "$WRK" >/dev/null 2>&1; then
    echo "wrk not found; install it with: apt-get install -y wrk" >&2
    exit 1
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")"
server_pid=""
redis_pid=""
redis_port=""
# STORAGE=redis-cluster: the nodes' pids and ports (redis_port is the first node's).
cluster_pids=()
cluster_ports=()
pg_data=""
pg_port=""
cleanup() {
    local rc=$?
    if [[ -n "$pg_data" ]]; then
        pg_as "$PG_BIN/pg_ctl" -D "$pg_data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    for pid in $redis_pid "${cluster_pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [[ -n "${KEEP:-}" ]]; then
        echo "scratch dir kept: $scratch" >&2
    else
        rm -rf "$scratch"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a PostgreSQL server command as the cluster's owner (initdb refuses root).
pg_as() {
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# psql against the benchmark cluster: unaligned, tuples only.
pg_sql() {
    "$PG_BIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -c "$1"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

if [[ -z "$target" ]]; then
    if [[ -n "${SLUICE_BIN:-}" ]]; then
        bin="$SLUICE_BIN"
    else
        echo "==> building release binary" >&2
        (cd "$root" && cargo build --release -p sluice)
        bin="${CARGO_TARGET_DIR:-$root/target}/release/sluice"
    fi
    port="$(free_port)"
    config="$scratch/bench.yaml"
    case "$STORAGE" in
        memory) storage="{backend: memory, max_keys: 1000000}" ;;
        disk) storage="{backend: disk, path: '$scratch/data', max_keys: 1000000}" ;;
        disk-sync) storage="{backend: disk, path: '$scratch/data', sync: true, max_keys: 1000000}" ;;
        redis | redis-cluster)
            REDIS_SERVER="${REDIS_SERVER:-redis-server}"
            REDIS_CLI="${REDIS_CLI:-redis-cli}"
            for tool in "$REDIS_SERVER" "$REDIS_CLI"; do
                if ! command -v "$tool" >/dev/null 2>&1; then
                    echo "$tool not found; install it with: apt-get install -y redis-server redis-tools" >&2
                    exit 1
                fi
            done
            mkdir -p "$scratch/redis"
            nodes=1
            if [[ "$STORAGE" == redis-cluster ]]; then nodes=3; fi
            for node in $(seq 1 "$nodes"); do
                node_pid=""
                mkdir -p "$scratch/redis/$node"
                cluster_args=()
                if [[ "$nodes" != 1 ]]; then
                    cluster_args=(--cluster-enabled yes --cluster-config-file "$scratch/redis/$node/nodes.conf")
                fi
                for _ in 1 2 3 4 5; do
                    node_port="$(free_port)"
                    "$REDIS_SERVER" --port "$node_port" --bind 127.0.0.1 --save '' --appendonly no \
                        --dir "$scratch/redis/$node" "${cluster_args[@]}" >"$scratch/redis/$node.log" 2>&1 &
                    node_pid=$!
                    for _ in $(seq 1 100); do
                        if "$REDIS_CLI" -p "$node_port" PING 2>/dev/null | grep -q PONG; then break 2; fi
                        if ! kill -0 "$node_pid" 2>/dev/null; then break; fi
                        sleep 0.1
                    done
                    kill "$node_pid" 2>/dev/null || true
                    wait "$node_pid" 2>/dev/null || true
                    node_pid=""
                done
                if [[ -z "$node_pid" ]]; then
                    echo "redis-server did not start; log:" >&2
                    cat "$scratch/redis/$node.log" >&2
                    exit 1
                fi
                cluster_pids+=("$node_pid")
                cluster_ports+=("$node_port")
            done
            redis_pid="${cluster_pids[0]}"
            redis_port="${cluster_ports[0]}"
            if [[ "$nodes" == 1 ]]; then
                cluster_pids=()
                echo "==> redis-server (pid $redis_pid) on 127.0.0.1:$redis_port" >&2
                storage="{backend: redis, url: 'redis://127.0.0.1:$redis_port/', prefix: 'bench:', local_deny_cache: ${DENY_CACHE:-true}}"
            else
                "$REDIS_CLI" --cluster create $(printf '127.0.0.1:%s ' "${cluster_ports[@]}") \
                    --cluster-replicas 0 --cluster-yes >"$scratch/redis/create.log" 2>&1 || {
                    echo "redis-cli --cluster create failed:" >&2
                    cat "$scratch/redis/create.log" >&2
                    exit 1
                }
                # Every node must know the whole layout before the load starts (a node
                # that does not yet answers with an error, and decisions degrade).
                for node_port in "${cluster_ports[@]}"; do
                    for _ in $(seq 1 100); do
                        "$REDIS_CLI" -p "$node_port" CLUSTER INFO 2>/dev/null |
                            grep -q 'cluster_state:ok' && break
                        sleep 0.1
                    done
                done
                echo "==> Redis Cluster of ${#cluster_ports[@]} masters on 127.0.0.1:${cluster_ports[*]}" >&2
                storage="{backend: redis, url: 'redis://127.0.0.1:$redis_port/', cluster: true, prefix: 'bench:', local_deny_cache: ${DENY_CACHE:-true}}"
            fi
            ;;
        postgres)
            PG_BIN="${PG_BIN:-$(pg_config --bindir 2>/dev/null || true)}"
            if [[ ! -x "$PG_BIN/initdb" ]]; then
                echo "PostgreSQL server binaries not found (PG_BIN=$PG_BIN); install them with: apt-get install -y postgresql" >&2
                exit 1
            fi
            mkdir -p "$scratch/pg"
            if [[ "$(id -u)" == 0 ]]; then
                # The cluster runs as postgres, which must reach its directory.
                chmod o+x "$scratch"
                chown postgres: "$scratch/pg"
            fi
            pg_data="$scratch/pg/data"
            pg_as "$PG_BIN/initdb" -D "$pg_data" -A trust -U postgres -E UTF8 --locale=C --no-sync >/dev/null
            for _ in 1 2 3 4 5; do
                pg_port="$(free_port)"
                if pg_as "$PG_BIN/pg_ctl" -D "$pg_data" -l "$scratch/pg/server.log" -w -o \
                    "-p $pg_port -k $scratch/pg -c listen_addresses=127.0.0.1 -c max_connections=100 -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=${PG_TRACK:-top}" \
                    start >/dev/null; then
                    break
                fi
                pg_port=""
            done
            if [[ -z "$pg_port" ]]; then
                echo "PostgreSQL did not start; log:" >&2
                cat "$scratch/pg/server.log" >&2
                exit 1
            fi
            pg_sql "CREATE EXTENSION pg_stat_statements" >/dev/null
            echo "==> PostgreSQL $(pg_sql 'SHOW server_version') on 127.0.0.1:$pg_port (data in $pg_data)" >&2
            storage="{backend: postgres, url: 'postgres://postgres@127.0.0.1:$pg_port/postgres', prefix: 'bench:', pool_size: ${PG_POOL:-16}, timeout_ms: ${PG_TIMEOUT_MS:-200}}"
            ;;
        *) echo "STORAGE must be memory, disk, disk-sync, redis, redis-cluster or postgres, not $STORAGE" >&2; exit 2 ;;
    esac
    cat >"$config" <<EOF
listen: 127.0.0.1:$port
admin: {token: bench-token-0123456789}
storage: $storage
limits:
  # one gcra limit per API key; 10k distinct keys
  api: {rate: ${API_RATE:-100/second}}
  # the second check of variant 2: per-"IP", two sliding windows
  api_ip: {rate: [1000/second, 1000000/hour], algorithm: sliding_window}
EOF
    echo "==> starting $bin serve on 127.0.0.1:$port" >&2
    "$bin" serve --config "$config" >"$scratch/stdout.log" 2>"$scratch/stderr.log" &
    server_pid=$!
    base="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do
        if curl -fsS -o /dev/null "$base/healthz" 2>/dev/null; then break; fi
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "sluice exited during startup; stderr:" >&2
            cat "$scratch/stderr.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    if ! curl -fsS -o /dev/null "$base/healthz"; then
        echo "sluice did not become healthy within 10 s; stderr:" >&2
        cat "$scratch/stderr.log" >&2
        exit 1
    fi
else
    base="${target%/}"
    base="${base%/v1/check}"
fi

# Sanity: one request of each variant must be a 200 before loading.
for v in $variants; do
    path=/v1/check
    if [[ "$v" == 2 ]]; then
        body='{"checks":[{"limit":"api","key":"k0"},{"limit":"api_ip","key":"ip0"}]}'
    elif [[ "$v" == reserve ]]; then
        body='{"checks":[{"limit":"api","key":"k0"}],"dry_run":true}'
        path=/v1/reserve
    else
        body='{"checks":[{"limit":"api","key":"k0"}]}'
    fi
    code="$(curl -sS -o "$scratch/probe.json" -w '%{http_code}' -H 'Content-Type: application/json' \
        -d "$body" "$base$path")"
    if [[ "$code" != 200 ]]; then
        echo "probe of variant $v answered $code: $(cat "$scratch/probe.json")" >&2
        exit 1
    fi
done

# The sum of a /metrics counter over its labels (0 when absent).
metric() {
    curl -fsS "$base/metrics" 2>/dev/null |
        awk -v name="$1" '$1 == name || index($1, name "{") == 1 {s += $NF} END {printf "%d", s}'
}

mkdir -p "$root/bench/results"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
summary=()
for v in $variants; do
    out="$root/bench/results/check-v$v-$stamp.txt"
    for node_port in $redis_port "${cluster_ports[@]:1}"; do
        "$REDIS_CLI" -p "$node_port" CONFIG RESETSTAT >/dev/null
    done
    if [[ -n "$pg_port" ]]; then
        pg_sql "SELECT pg_stat_statements_reset()" >/dev/null
    fi
    degraded_before="$(metric sluice_degraded_decisions_total)"
    errors_before="$(metric sluice_store_errors_total)"
    local_before="$(metric sluice_store_local_denials_total)"
    if [[ "$v" == reserve ]]; then
        echo "==> wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, reserve + settle pairs, $KEYS keys -> $base" >&2
        "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$here/reserve.lua" \
            "$base" -- "keys=$KEYS" | tee "$out"
    else
        echo "==> wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $v check(s)/request, $KEYS keys -> $base/v1/check" >&2
        "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$here/check.lua" \
            "$base/v1/check" -- "checks=$v" "keys=$KEYS" | tee "$out"
    fi
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
    p50="$(awk '/Latency Distribution/ {d=1} d && $1=="50%" {print $2; exit}' "$out")"
    p99="$(awk '/Latency Distribution/ {d=1} d && $1=="99%" {print $2; exit}' "$out")"
    non200="$(awk -F': ' '/^non-200 responses:/ {print $2}' "$out")"
    line="checks/request=$v  req/s=${rps:-?}  p50=${p50:-?}  p99=${p99:-?}  non-200=${non200:-?}"
    line+="  $(awk '/^decisions:/ {print $2 " " $3; exit}' "$out")"
    if [[ "$v" == reserve ]]; then
        line+="  pairs/s=$(awk '/^pairs\/sec:/ {print $2}' "$out")"
    fi
    if [[ -n "$redis_pid" ]]; then
        requests="$(awk '/requests in/ {print $1; exit}' "$out")"
        # Over every node of a cluster (one node otherwise).
        stats="$(for node_port in $redis_port "${cluster_ports[@]:1}"; do
            "$REDIS_CLI" -p "$node_port" INFO commandstats | tr -d '\r'
        done)"
        evalsha="$(awk -F'[:,=]' '$1 == "cmdstat_evalsha" {s += $3} END {print s + 0}' <<<"$stats")"
        # Every command Redis ran (the scripts' own TIME/GET/SET included), but this
        # script's CONFIG and INFO, and a cluster client's CLUSTER SLOTS.
        commands="$(awk -F'[:,=]' '$1 ~ /^cmdstat_/ && $1 !~ /^cmdstat_(config|info|cluster)/ {s += $3} END {print s + 0}' <<<"$stats")"
        grep '^cmdstat_' <<<"$stats" >>"$out"
        degraded=$(( $(metric sluice_degraded_decisions_total) - degraded_before ))
        errors=$(( $(metric sluice_store_errors_total) - errors_before ))
        per="$(awk -v e="${evalsha:-0}" -v r="${requests:-0}" 'BEGIN { if (r > 0) printf "%.3f", e / r; else print "?" }')"
        commands_per="$(awk -v e="${commands:-0}" -v r="${requests:-0}" 'BEGIN { if (r > 0) printf "%.3f", e / r; else print "?" }')"
        local_denials=$(( $(metric sluice_store_local_denials_total) - local_before ))
        line+="  evalsha=${evalsha:-0}  requests=${requests:-?}  evalsha/request=$per  commands/request=$commands_per  local-denials=$local_denials  degraded=$degraded  store-errors=$errors"
        if [[ "$degraded" != 0 ]]; then line+="  (DEGRADED: not all decided by Redis)"; fi
    fi
    if [[ -n "$pg_port" ]]; then
        requests="$(awk '/requests in/ {print $1; exit}' "$out")"
        # Read before anything else runs on the cluster; this script's own queries
        # mention pg_stat_statements and are left out.
        stats="$(pg_sql "SELECT coalesce(sum(calls) FILTER (WHERE toplevel AND query LIKE '%sluice_decide%'), 0) || ' ' || coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%'")"
        pg_sql "SELECT calls || '  ' || CASE WHEN toplevel THEN 'top   ' ELSE 'nested' END || '  ' || regexp_replace(query, '\s+', ' ', 'g') FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY calls DESC LIMIT 12" >>"$out"
        read -r decide_calls all_calls <<<"$stats"
        degraded=$(( $(metric sluice_degraded_decisions_total) - degraded_before ))
        errors=$(( $(metric sluice_store_errors_total) - errors_before ))
        per="$(awk -v e="${decide_calls:-0}" -v r="${requests:-0}" 'BEGIN { if (r > 0) printf "%.3f", e / r; else print "?" }')"
        all_per="$(awk -v e="${all_calls:-0}" -v r="${requests:-0}" 'BEGIN { if (r > 0) printf "%.3f", e / r; else print "?" }')"
        line+="  sluice_decide=${decide_calls:-0}  requests=${requests:-?}  decide/request=$per  statements/request=$all_per  degraded=$degraded  store-errors=$errors"
        if [[ "$degraded" != 0 ]]; then line+="  (DEGRADED: not all decided by PostgreSQL)"; fi
    fi
    summary+=("$line")
done

echo
echo "==> summary ($base, storage ${STORAGE}, ${DURATION}s, -t$THREADS -c$CONNECTIONS, $KEYS keys)"
for line in "${summary[@]}"; do echo "    $line"; done
if [[ -n "$server_pid" ]]; then
    echo "    server rss: $(awk '/VmRSS/ {print $2 " " $3}' "/proc/$server_pid/status" 2>/dev/null || echo '?')"
fi

status=0
for line in "${summary[@]}"; do
    case "$line" in *"non-200=0"*) ;; *) status=1 ;; esac
    case "$line" in *DEGRADED*) status=1 ;; esac
done
if [[ "$status" != 0 ]]; then
    echo "some responses were not 200 (see above)" >&2
fi
exit "$status"
