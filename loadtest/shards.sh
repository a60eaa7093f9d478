#!/usr/bin/env bash
# Several loops vs one, in one run: udphub --threads 1 and --threads 2 (and
# the bare recvmmsg/sendmmsg loop), each driven by `loadtest fanout --sink`
# (receivers that never read: deliveries counted by the kernel, so the
# load generator needs almost no CPU and the relay's send path is what is
# measured), alternating rounds so the machine's drift hits all alike.
# Prints a markdown table with paired ratios to --threads 1.
#
#   bash loadtest/shards.sh                               # 1000 clients, 5 rounds of 5 s
#   ROUNDS=7 RELAYS="t1 t2 t4 baseline" bash loadtest/shards.sh
#   PIN=1 bash loadtest/shards.sh                         # with --pin-threads
#   UDPHUB_REF=/path/to/older/udphub RELAYS="t1 t2 r1 r2" bash loadtest/shards.sh
#                                                         # rN: the older build with --threads N
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS="${CLIENTS:-1000}"
ROUNDS="${ROUNDS:-5}"
SECS="${SECS:-5s}"
RATE="${RATE:-2000}"
RELAYS="${RELAYS:-t1 t2 baseline}"
OUT="${OUT:-target/shards}"
PORT="${PORT:-19880}"
PIN="${PIN:-}"

mkdir -p "$OUT"
rm -f "$OUT"/*.json
source loadtest/baselines/common.sh
build_and_find_baseline

relay_pid=""
start_relay() {
    metrics=()
    case "$1" in
    t[0-9]* | r[0-9]*)
        pin=()
        [ -n "$PIN" ] && pin=(--pin-threads)
        bin=target/release/udphub
        if [ "${1:0:1}" = r ]; then
            bin="${UDPHUB_REF:?rN needs UDPHUB_REF=/path/to/udphub}"
        fi
        "$bin" serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
            --timeout 60s --log-level warn --threads "${1:1}" "${pin[@]}" 2>/dev/null &
        metrics=(--metrics-url "http://127.0.0.1:$((PORT + 1))/metrics") ;;
    baseline)
        [ -x "$baseline_bin" ] || { echo "shards.sh: baseline_relay bench binary not found" >&2; exit 1; }
        "$baseline_bin" --serve "127.0.0.1:$PORT" 2>/dev/null & ;;
    *) echo "unknown relay $1" >&2; exit 2 ;;
    esac
    relay_pid=$!
    sleep 0.5
}
stop_relay() {
    [ -n "$relay_pid" ] || return 0
    kill -TERM "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
    relay_pid=""
}
trap 'stop_relay' EXIT

for round in $(seq 1 "$ROUNDS"); do
    for relay in $RELAYS; do
        start_relay "$relay"
        echo "shards.sh: $relay, round $round" >&2
        target/release/loadtest fanout --sink --relay "127.0.0.1:$PORT" --clients "$CLIENTS" \
            --rate "$RATE" --duration "$SECS" --relay-pid "$relay_pid" --json "${metrics[@]}" \
            >"$OUT/$relay-$round.json" || echo "shards.sh: $relay run failed" >&2
        stop_relay
    done
done

{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), Linux $(uname -r); loadtest fanout --sink, $CLIENTS clients, senders at $RATE msgs/s, $ROUNDS rounds of $SECS${PIN:+, --pin-threads}. Medians over rounds; ratios are medians of each round's ratio to that round's t1 run."
    echo
    python3 - "$OUT" "$ROUNDS" $RELAYS <<'PY'
import json, statistics, sys
out, rounds, relays = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def load(r, i):
    try:
        return json.load(open(f"{out}/{r}-{i}.json"))
    except Exception:
        return None
print("| relay | deliveries/s (kernel) | relay CPU ns/delivery | relay-counted deliveries/s | deliveries/s vs t1 | CPU/delivery vs t1 |")
print("|---|---:|---:|---:|---:|---:|")
for r in relays:
    runs = [load(r, i) for i in range(1, rounds + 1)]
    ok = [x for x in runs if x]
    if not ok:
        print(f"| {r} | failed | | | | |"); continue
    dps = statistics.median(x["kernel_deliveries_per_s"] for x in ok)
    cpus = [x["relay_cpu_ns_per_delivery"] for x in ok if x.get("relay_cpu_ns_per_delivery")]
    cpu = statistics.median(cpus) if cpus else float("nan")
    rel = [x["relay_deliveries"] / x["seconds"] for x in ok if x.get("relay_deliveries") is not None]
    relc = f"{statistics.median(rel):.0f}" if rel else "—"
    ratios, cratios = [], []
    for i in range(1, rounds + 1):
        a, b = load(r, i), load("t1", i)
        if a and b:
            ratios.append(a["kernel_deliveries_per_s"] / b["kernel_deliveries_per_s"])
            if a.get("relay_cpu_ns_per_delivery") and b.get("relay_cpu_ns_per_delivery"):
                cratios.append(a["relay_cpu_ns_per_delivery"] / b["relay_cpu_ns_per_delivery"])
    rr = f"{statistics.median(ratios):.3f}x (rounds {min(ratios):.2f}–{max(ratios):.2f})" if ratios else "—"
    cr = f"{statistics.median(cratios):.3f}x" if cratios else "—"
    print(f"| {r} | {dps:.0f} | {cpu:.0f} | {relc} | {rr} | {cr} |")
PY
} | tee "$OUT/table.md"
