#!/usr/bin/env bash
# Sink mode, one build against another, one round each, alternating:
# `loadtest fanout --sink` (1,000 receivers that never read, one sender
# asking 2,000 msgs/s) against each binary for 5 s. Prints, per round and
# build, deliveries/s counted by the kernel, relay CPU ns per delivery and
# the relay's dropped deliveries. Every run is bounded (timeout 60 s).
#
#   BINS="/tmp/udphub-before target/release/udphub" ROUNDS=2 bash loadtest/sink_ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BINS="${BINS:-target/release/udphub}"
ROUNDS="${ROUNDS:-2}"
PORT="${PORT:-19930}"
OUT="${OUT:-target/sink_ab}"
mkdir -p "$OUT"
cargo build --release -q -p loadtest

for round in $(seq 1 "$ROUNDS"); do
    for bin in $BINS; do
        "$bin" serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
            --timeout 60s --log-level warn 2>/dev/null &
        pid=$!
        sleep 0.5
        json="$OUT/$(basename "$bin")-$round.json"
        timeout 60 target/release/loadtest fanout --sink --relay "127.0.0.1:$PORT" \
            --clients 1000 --rate 2000 --duration 5s --relay-pid "$pid" \
            --metrics-url "http://127.0.0.1:$((PORT + 1))/metrics" --register-timeout 20s \
            --json >"$json" || echo "sink_ab.sh: $bin round $round failed" >&2
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], round(d['kernel_deliveries_per_s']), round(d['relay_cpu_ns_per_delivery']), d['relay_delivery_dropped'])" \
            "$json" "$bin" "$round" || true
    done
done
