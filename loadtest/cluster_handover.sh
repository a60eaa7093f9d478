#!/usr/bin/env bash
# Hand-overs of one node of a two-node cluster under load: nats-server on a
# free loopback port, release relays a and b (`--cluster`, b with
# `--control`), a closed-loop `loadtest fanout` whose rooms span both nodes
# (it counts every delivery across them), and HANDOVERS successive
# `udphub serve --takeover` of b, one every GAP seconds. Prints each
# hand-over's pause and the new process's catch-up line, and the load's
# report (lost, duplicated, reordered: across the nodes).
#
#   bash loadtest/cluster_handover.sh                 # 200 clients, 2 senders, 10 hand-overs
#   CLIENTS=1000 SENDERS=4 HANDOVERS=5 bash loadtest/cluster_handover.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS="${CLIENTS:-200}"
SENDERS="${SENDERS:-2}"
HANDOVERS="${HANDOVERS:-10}"
GAP="${GAP:-1}"
WARMUP="${WARMUP:-3}"
OUT="${OUT:-target/cluster-handover}"
EXTRA="${EXTRA:-}"
bin="${BIN:-target/release/udphub}"
lt="${LOADTEST:-target/release/loadtest}"
command -v nats-server >/dev/null || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 2; }

mkdir -p "$OUT"
rm -f "$OUT"/*
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nats-server -a 127.0.0.1 -p "$port" >"$OUT/nats.log" 2>&1 &
nats=$!
url="nats://127.0.0.1:$port"
ctl="$OUT/control.sock"
pids=()
cleanup() { kill "${pids[@]}" "$nats" 2>/dev/null || true; }
trap cleanup EXIT

ready() {
    for _ in $(seq 600); do
        [ -s "$1" ] && grep -q '^metrics=' "$1" && break
        sleep 0.05
    done
    grep "^$2=" "$1" | cut -d= -f2
}

# shellcheck disable=SC2086
"$bin" serve --bind 127.0.0.1:0 --metrics 127.0.0.1:0 --cluster "$url" --node-id a \
    --ready-file "$OUT/ready.a" $EXTRA 2>"$OUT/relay.a.log" &
pids+=($!)
# shellcheck disable=SC2086
"$bin" serve --bind 127.0.0.1:0 --metrics 127.0.0.1:0 --cluster "$url" --node-id b \
    --control "$ctl" --ready-file "$OUT/ready.0" $EXTRA 2>"$OUT/relay.0.log" &
pid=$!
udp_a=$(ready "$OUT/ready.a" udp)
udp_b=$(ready "$OUT/ready.0" udp)

secs=$((WARMUP + HANDOVERS * GAP + 3))
"$lt" fanout --relay "$udp_a,$udp_b" --clients "$CLIENTS" --senders "$SENDERS" \
    --duration "${secs}s" --json >"$OUT/load.json" 2>"$OUT/load.log" &
load=$!
sleep "$WARMUP"

for i in $(seq "$HANDOVERS"); do
    # shellcheck disable=SC2086
    "$bin" serve --bind "$udp_b" --metrics 127.0.0.1:0 --cluster "$url" --node-id b \
        --takeover "$ctl" --control "$ctl" --ready-file "$OUT/ready.$i" $EXTRA \
        2>"$OUT/relay.$i.log" &
    new=$!
    ready "$OUT/ready.$i" udp >/dev/null
    wait "$pid" || echo "hand-over $i: the old process exited $?"
    pid=$new
    sleep "$GAP"
done
pids+=("$pid")
wait "$load" || true

echo "| hand-over | members | pause ms (old b: stopped reading → let go) | new b: caught up with the cluster |"
echo "| ---: | ---: | ---: | --- |"
for i in $(seq 0 $((HANDOVERS - 1))); do
    line=$(grep -h 'handed over to the new process' "$OUT/relay.$i.log" || true)
    caught=$(grep -h 'caught up with the cluster' "$OUT/relay.$((i + 1)).log" | sed -E 's/.*caught up with the cluster: //' || true)
    echo "$line" | sed -E "s/.*: ([0-9]+) member\(s\), a ([0-9]+)-byte snapshot, reading paused ([0-9.]+) ms here.*/| $i | \1 | \3 | $caught |/"
done
grep -h 'handed over to the new process' "$OUT"/relay.*.log |
    sed -E 's/.*reading paused ([0-9.]+) ms.*/\1/' | sort -n |
    awk '{a[NR]=$1} END {if (NR) printf "pause: p50 %s ms, max %s ms over %d hand-overs\n", a[int((NR+1)/2)], a[NR], NR}'
echo "load report: $OUT/load.json"
python3 - "$OUT/load.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
keys = ["messages_sent", "deliveries_expected", "deliveries", "lost", "duplicates", "reordered", "deliveries_per_s"]
print(", ".join(f"{k} {j.get(k)}" for k in keys))
EOF
