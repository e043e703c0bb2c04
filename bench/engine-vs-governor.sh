#!/usr/bin/env bash
# The memory store's decisions beside governor's keyed limiter on the same key stream,
# alternated run by run so both see the same machine conditions (this VM drifts by
# ±20% between minutes; criterion measures one side after the other). Each run is the
# `hot_loop` example: 1M keys `user:N`, a stream of 2^20 draws (uniform or Zipf 1.0,
# the criterion benchmark's), every key warmed first, `1000/hour` on both sides.
# sluice builds a whole `DecisionRequest` per decision (owned key) and returns
# remaining, reset and retry figures; governor checks a borrowed key. Both run in one
# binary on the server's allocator, mimalloc (governor's per-key `String`s pack tighter
# there than on glibc's, which moves the ratio: BENCHMARKS.md).
#
# Usage: bench/engine-vs-governor.sh [ROUNDS]   (default 5)
# Environment: ITERATIONS=4000000 per run, KEYS=1000000, STREAMS="uniform zipf"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds="${1:-5}"
ITERATIONS="${ITERATIONS:-4000000}"
KEYS="${KEYS:-1000000}"
STREAMS="${STREAMS:-uniform zipf}"

(cd "$root" && cargo build --release -q -p sluice-store-memory --example hot_loop)
bin="$root/target/release/examples/hot_loop"
ns() { "$bin" "$ITERATIONS" "$KEYS" "$1" "$2" | awk '{print $3}'; }

for stream in $STREAMS; do
    echo "== $stream, $KEYS keys, $ITERATIONS decisions per run (ns per decision)"
    printf "%-6s %-10s %-10s %s\n" round sluice governor "sluice/governor"
    results=()
    for r in $(seq 1 "$rounds"); do
        s=$(ns sluice "$stream"); g=$(ns governor "$stream")
        ratio=$(python3 -c "print(f'{$s/$g:.2f}')")
        printf "%-6s %-10s %-10s %s\n" "$r" "$s" "$g" "$ratio"
        results+=("$ratio")
    done
    python3 -c "import statistics,sys; r=[float(x) for x in sys.argv[1:]]; print(f'median sluice/governor: {statistics.median(r):.2f} (range {min(r):.2f}-{max(r):.2f})')" "${results[@]}"
done
