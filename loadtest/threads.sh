#!/usr/bin/env bash
# loadtest's own --threads, in one run (release build):
#  A. one fixed-rate, fixed-count run (the same messages every time) with
#     loadtest --threads 1, 2 and 4 against udphub --threads 1: the same
#     deliveries and loss each time, and loadtest's own CPU per delivery;
#  B. closed loop against udphub --threads 2, loadtest --threads 1 vs 2,
#     alternating rounds: deliveries/s, and whether loadtest said it was the
#     bottleneck (loadtest_limited).
# Prints markdown tables; every run's JSON is kept in $OUT.
#
#   bash loadtest/threads.sh
#   ROUNDS=5 SECS=5s CLIENTS=1000 bash loadtest/threads.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS="${CLIENTS:-1000}"
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-4s}"
RATE="${RATE:-100}"          # A: messages/s (x CLIENTS deliveries/s)
MESSAGES="${MESSAGES:-400}"  # A: messages per run
OUT="${OUT:-target/lt-threads}"
PORT="${PORT:-19890}"

mkdir -p "$OUT"
rm -f "$OUT"/*.json
cargo build --release -q -p udphub -p loadtest
LT=target/release/loadtest

relay_pid=""
start_relay() { # $1: udphub --threads
    local ready="$OUT/ready"
    rm -f "$ready"
    target/release/udphub serve --bind "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" \
        --timeout 60s --log-level warn --threads "$1" --ready-file "$ready" 2>/dev/null &
    relay_pid=$!
    for _ in $(seq 100); do [ -s "$ready" ] && return 0; sleep 0.05; done
    echo "threads.sh: udphub never got ready" >&2
    exit 1
}
stop_relay() {
    [ -n "$relay_pid" ] || return 0
    kill -TERM "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
    relay_pid=""
}
trap 'stop_relay' EXIT
common=(--relay "127.0.0.1:$PORT" --metrics-url "http://127.0.0.1:$((PORT + 1))/metrics" --json)

start_relay 1
for round in $(seq "$ROUNDS"); do
    for t in 1 2 4; do
        "$LT" fanout "${common[@]}" --relay-pid "$relay_pid" --clients "$CLIENTS" --senders 4 \
            --rate "$RATE" --messages "$MESSAGES" --duration 30s --threads "$t" \
            >"$OUT/a-t$t-r$round.json"
    done
done
stop_relay

start_relay 2
for round in $(seq "$ROUNDS"); do
    for t in 1 2; do
        "$LT" fanout "${common[@]}" --relay-pid "$relay_pid" --clients "$CLIENTS" \
            --duration "$SECS" --threads "$t" >"$OUT/b-t$t-r$round.json"
    done
done
stop_relay

python3 - "$OUT" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
load = lambda n: json.load(open(f"{out}/{n}.json"))
med = statistics.median
print(f"A. fixed rate and count, udphub --threads 1; medians of {rounds} rounds")
print("| loadtest | messages | deliveries | lost | dup | reordered | relay = loadtest | loadtest CPU ns/delivery | vs 1 thread | relay CPU ns/delivery | limited by loadtest (rounds) |")
print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
why = lambda rs: " / ".join(",".join((r.get("loadtest_limited") or {}).get("reason", [])) or "-" for r in rs)
base = {r: load(f"a-t1-r{r}")["loadtest"]["cpu_ns_per_delivery"] for r in range(1, rounds + 1)}
for t in (1, 2, 4):
    rs = [load(f"a-t{t}-r{r}") for r in range(1, rounds + 1)]
    agree = all(r["metrics_check"]["relay_deliveries"] == r["metrics_check"]["loadtest_deliveries"]
                and r["metrics_check"]["relay_messages"] == r["metrics_check"]["loadtest_messages"] for r in rs)
    ratio = med([r["loadtest"]["cpu_ns_per_delivery"] / base[i + 1] for i, r in enumerate(rs)])
    print(f"| --threads {t} | {sorted({r['messages_sent'] for r in rs})} | {sorted({r['deliveries'] for r in rs})} "
          f"| {sorted({r['lost'] for r in rs})} | {sorted({r['duplicates'] for r in rs})} | {sorted({r['reordered'] for r in rs})} "
          f"| {'yes' if agree else 'NO'} | {med([r['loadtest']['cpu_ns_per_delivery'] for r in rs]):.0f} | {ratio:.3f}x "
          f"| {med([r['relay_usage']['cpu_ns_per_delivery'] for r in rs]):.0f} | {why(rs)} |")
print()
print(f"B. closed loop, udphub --threads 2; medians of {rounds} rounds, ratio paired per round")
print("| loadtest | deliveries/s | vs 1 thread | loss | p50 µs | p99 µs | busiest loadtest thread: ran + waited for a core | limited by loadtest (rounds) |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
b1 = [load(f"b-t1-r{r}") for r in range(1, rounds + 1)]
for t in (1, 2):
    rs = [load(f"b-t{t}-r{r}") for r in range(1, rounds + 1)]
    ratio = [r["deliveries_per_s"] / b["deliveries_per_s"] for r, b in zip(rs, b1)]
    busy = [max(zip(r["loadtest"]["thread_busy"] or [0], r["loadtest"]["thread_waiting"] or [0]), key=sum) for r in rs]
    print(f"| --threads {t} | {med([r['deliveries_per_s'] for r in rs]):.0f} | {med(ratio):.3f}x ({min(ratio):.2f}–{max(ratio):.2f}) "
          f"| {med([r['loss_ratio'] for r in rs]) * 100:.4f}% | {med([r['latency_us']['p50'] for r in rs]):.0f} "
          f"| {med([r['latency_us']['p99'] for r in rs]):.0f} | {med([b for b, _ in busy]) * 100:.0f}% + {med([w for _, w in busy]) * 100:.0f}% | {why(rs)} |")
EOF
