#!/usr/bin/env bash
# The comparison run, in one command: udphub, the bare recvmmsg/sendmmsg
# baseline loop, and seed 002's Python server, each started on loopback and
# driven by `loadtest fanout` the same way (closed loop), alternating rounds
# so the machine's drift hits all alike. Writes a markdown table with ratios
# to the baseline (docs/BENCHMARKS.md has the committed one).
#
#   bash loadtest/compare.sh                      # 64 and 1000 clients, 3 rounds of 5 s
#   CLIENTS="64" ROUNDS=5 SECS=10s bash loadtest/compare.sh
#   RELAYS="baseline udphub udphub-raw" bash loadtest/compare.sh   # + udphub --format raw
#   RELAYS="baseline udphub udphub-verify" bash loadtest/compare.sh   # + verify mode, --client-rate set
#   RELAYS="baseline udphub udphub-v2" bash loadtest/compare.sh       # + every v2 feature on: verify mode,
#                                                   # rate limits, every client in one named room
#   RELAYS="baseline udphub udphub-t2" bash loadtest/compare.sh       # + --threads 2 (closed loop: see shards.sh)
#   UDPHUB_REF=/path/to/older/udphub RELAYS="baseline udphub udphub-ref" bash loadtest/compare.sh
#                                                   # A/B against another build of udphub
#   RELAYS="baseline udphub-noecho udpexchange" bash loadtest/compare.sh
#                                                   # against udpexchange 0.1.1 (crates.io), which
#                                                   # sends every datagram as is to every other client:
#                                                   # udphub --no-echo --format raw
#                                                   # does the same (installed into target/ if missing)
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS="${CLIENTS:-64 1000}"
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-5s}"
WINDOW="${WINDOW:-8}"
RELAYS="${RELAYS:-baseline udphub seed}"
OUT="${OUT:-target/compare}"
PORT="${PORT:-19870}"

# The interpreter itself, not a launcher script (pyenv's shims are bash
# scripts), so that --relay-pid measures the server's own process.
PYTHON="$(python3 -c 'import sys; print(sys.executable)')"

mkdir -p "$OUT"
rm -f "$OUT"/*.json
source loadtest/baselines/common.sh
build_and_find_baseline
[ -x "$baseline_bin" ] || { echo "compare.sh: baseline_relay bench binary not found" >&2; exit 1; }
UDPEXCHANGE="${UDPEXCHANGE:-target/udpexchange/bin/udpexchange}"
if [[ " $RELAYS " == *" udpexchange "* && ! -x "$UDPEXCHANGE" ]]; then
    cargo install --quiet udpexchange --version 0.1.1 --root target/udpexchange \
        || { echo "compare.sh: could not install udpexchange 0.1.1 (set UDPEXCHANGE to its binary)" >&2; exit 1; }
fi

start_relay() {
    loadtest_extra=()
    case "$1" in
    baseline) "$baseline_bin" --serve "127.0.0.1:$PORT" 2>/dev/null & ;;
    udphub) target/release/udphub serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
        --timeout 60s --log-level warn 2>/dev/null & ;;
    udphub-raw) target/release/udphub serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
        --timeout 60s --log-level warn --format raw 2>/dev/null & ;;
    udphub-verify) target/release/udphub serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
        --timeout 60s --log-level warn --verify-sources --client-rate 100000 --cookie-rate 100000 2>/dev/null &
        loadtest_extra=(--verify) ;;
    udphub-v2) target/release/udphub serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
        --timeout 60s --log-level warn --verify-sources --client-rate 100000 --cookie-rate 100000 \
        --max-clients-per-ip 100000 --max-room-clients 100000 2>/dev/null &
        loadtest_extra=(--verify --rooms 1) ;;
    udphub-noecho) target/release/udphub serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
        --timeout 60s --log-level warn --no-echo --format raw 2>/dev/null &
        loadtest_extra=(--no-echo) ;;
    udpexchange) "$UDPEXCHANGE" -t 60 "127.0.0.1:$PORT" >/dev/null 2>&1 &
        loadtest_extra=(--no-echo) ;;
    udphub-t2) target/release/udphub serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
        --timeout 60s --log-level warn --threads 2 2>/dev/null & ;;
    udphub-ref) "${UDPHUB_REF:?set UDPHUB_REF to the udphub binary to compare with}" serve \
        --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
        --timeout 60s --log-level warn 2>/dev/null & ;;
    seed) "$PYTHON" loadtest/baselines/seed002_server.py 127.0.0.1 "$PORT" >/dev/null 2>&1 & ;;
    *) echo "unknown relay $1" >&2; exit 2 ;;
    esac
    relay_pid=$!
    sleep 0.5
}

stop_relay() {
    kill -TERM "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
}
trap 'stop_relay' EXIT

for clients in $CLIENTS; do
    for round in $(seq 1 "$ROUNDS"); do
        for relay in $RELAYS; do
            start_relay "$relay"
            echo "compare.sh: $relay, $clients clients, round $round" >&2
            target/release/loadtest fanout --relay "127.0.0.1:$PORT" --clients "$clients" \
                --window "$WINDOW" --duration "$SECS" --relay-pid "$relay_pid" --json "${loadtest_extra[@]}" \
                >"$OUT/$relay-$clients-$round.json" || echo "compare.sh: $relay run failed" >&2
            stop_relay
        done
    done
done

{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), Linux $(uname -r); $ROUNDS rounds of $SECS, closed loop window $WINDOW, 64-byte messages. Values are medians over rounds; ratios are medians of each round's ratio to that round's baseline run (the rounds alternate relays, so a paired ratio cancels the machine's drift)."
    echo
    python3 loadtest/baselines/table.py "$OUT"
} | tee "$OUT/table.md"
