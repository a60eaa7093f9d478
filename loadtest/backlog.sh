#!/usr/bin/env bash
# A big room in closed loop behind a real queue: does the relay drop
# deliveries when its send buffer fills? On plain loopback it never fills
# (the loopback device frees each datagram as it is sent), so this runs in
# a network namespace of its own whose loopback gets a queueing discipline
# (htb at RATE, pfifo): sent datagrams wait there charged to the relay's
# socket, as they do on a NIC. Needs root, ip and tc; never touches the
# host's network.
#
#   bash loadtest/backlog.sh                          # target/release/udphub, 10,000 clients, 1,200 B
#   BINS="/tmp/udphub-before target/release/udphub" ROUNDS=2 bash loadtest/backlog.sh
#
# Prints, per binary and round, loadtest's table and the relay's delivery
# counters (dropped by reason).
set -euo pipefail
cd "$(dirname "$0")/.."

BINS="${BINS:-target/release/udphub}"
CLIENTS="${CLIENTS:-10000}"
PAYLOAD="${PAYLOAD:-1200}"
SECS="${SECS:-10s}"
ROUNDS="${ROUNDS:-1}"
RATE="${RATE:-2gbit}"
SNDBUF="${SNDBUF:-262144}"
NS="udphub-backlog-$$"

cargo build --release -q -p loadtest
ip netns add "$NS"
trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
ip -n "$NS" link set lo up
tc -n "$NS" qdisc add dev lo root handle 1: htb default 20
tc -n "$NS" class add dev lo parent 1: classid 1:10 htb rate "$RATE" burst 64kb
tc -n "$NS" class add dev lo parent 1: classid 1:20 htb rate 10gbit quantum 60000
tc -n "$NS" qdisc add dev lo parent 1:10 handle 10: pfifo limit 100000
tc -n "$NS" filter add dev lo parent 1: protocol ip u32 match ip protocol 17 0xff flowid 1:10
# Receivers that keep up: loadtest's sockets ask for 4 MiB.
ip netns exec "$NS" sysctl -qw net.core.rmem_max=8388608 net.core.wmem_max=8388608

for round in $(seq 1 "$ROUNDS"); do
    for bin in $BINS; do
        echo "== $bin, round $round: $CLIENTS clients, $PAYLOAD B, closed loop, lo at $RATE, SO_SNDBUF $SNDBUF"
        ip netns exec "$NS" "$bin" serve --bind 127.0.0.1:19990 --metrics 127.0.0.1:19991 \
            --timeout 60s --log-level warn --send-buffer "$SNDBUF" --max-clients 100000 &
        relay=$!
        sleep 0.5
        ip netns exec "$NS" target/release/loadtest fanout --relay 127.0.0.1:19990 \
            --metrics-url http://127.0.0.1:19991/metrics --relay-pid "$relay" \
            --clients "$CLIENTS" --payload "$PAYLOAD" --window 8 --duration "$SECS" \
            --register-timeout 60s || true
        ip netns exec "$NS" curl -s http://127.0.0.1:19991/metrics |
            grep -E '^udphub_(fanout_recipients|deliveries|delivery_dropped|send_buffer_full|fanouts_parked)_total' || true
        kill -TERM "$relay" 2>/dev/null || true
        wait "$relay" 2>/dev/null || true
    done
done
