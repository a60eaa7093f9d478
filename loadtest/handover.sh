#!/usr/bin/env bash
# Hand-overs under load: a release udphub with --control, a load, and
# HANDOVERS successive `udphub serve --takeover` (each new process takes the
# previous one over, one every GAP seconds). Prints each hand-over's pause
# (the old process's "reading paused P ms": from the loops' pause to the
# moment the old one lets go, after which the new one reads), its snapshot
# size and members, and the load's own report.
#
#   bash loadtest/handover.sh                       # fanout: 1,000 closed-loop clients, 10 hand-overs
#   LOAD=storm CLIENTS=10000 HANDOVERS=3 bash loadtest/handover.sh
#                                                   # join-storm: N heartbeating members
set -euo pipefail
cd "$(dirname "$0")/.."

LOAD="${LOAD:-fanout}"
CLIENTS="${CLIENTS:-1000}"
HANDOVERS="${HANDOVERS:-10}"
GAP="${GAP:-1}"
WARMUP="${WARMUP:-3}"
OUT="${OUT:-target/handover}"
EXTRA="${EXTRA:-}"

mkdir -p "$OUT"
rm -f "$OUT"/*
bin="${BIN:-target/release/udphub}"
lt=target/release/loadtest
ctl="$OUT/control"

ready() { # wait (bounded) for a ready file, print its udp= address
    for _ in $(seq 600); do
        [ -s "$1" ] && grep -q '^metrics=' "$1" && break
        sleep 0.05
    done
    grep '^udp=' "$1" | cut -d= -f2
}

# shellcheck disable=SC2086
"$bin" serve --bind 127.0.0.1:0 --metrics 127.0.0.1:0 --control "$ctl" \
    --ready-file "$OUT/ready.0" $EXTRA 2>"$OUT/relay.0.log" &
pid=$!
udp=$(ready "$OUT/ready.0")

case "$LOAD" in
fanout)
    secs=$((WARMUP + HANDOVERS * GAP + 3))
    "$lt" fanout --relay "$udp" --clients "$CLIENTS" --duration "${secs}s" --json \
        >"$OUT/load.json" 2>"$OUT/load.log" &
    ;;
storm)
    secs=$((WARMUP + HANDOVERS * GAP + 60))
    "$lt" join-storm --relay "$udp" --clients "$CLIENTS" --heartbeat "${HEARTBEAT:-1s}" --duration "${secs}s" --json \
        >"$OUT/load.json" 2>"$OUT/load.log" &
    ;;
esac
load=$!
if [ "$LOAD" = storm ]; then
    # Until every member is in the table.
    m=$(grep '^metrics=' "$OUT/ready.0" | cut -d= -f2)
    for _ in $(seq 1200); do
        n=$(curl -s "http://$m/metrics" | awk '$1=="udphub_clients"{print $2}')
        [ "${n:-0}" -ge "$CLIENTS" ] && break
        sleep 0.1
    done
fi
sleep "$WARMUP"

for i in $(seq "$HANDOVERS"); do
    # shellcheck disable=SC2086
    "$bin" serve --bind "$udp" --metrics 127.0.0.1:0 --takeover "$ctl" --control "$ctl" \
        --ready-file "$OUT/ready.$i" $EXTRA 2>"$OUT/relay.$i.log" &
    new=$!
    ready "$OUT/ready.$i" >/dev/null
    wait "$pid" || echo "hand-over $i: the old process exited $?"
    pid=$new
    sleep "$GAP"
done

if [ "$LOAD" = storm ]; then
    kill "$load" 2>/dev/null || true
fi
wait "$load" || true
# The kernel's own count of datagrams dropped on the relay's socket(s) over
# their whole life, every process included (/proc/net/udp, last column).
port=$(printf '%04X' "${udp##*:}")
drops=$(awk -v p=":$port" '$2 ~ p"$" {d += $NF} END {print d + 0}' /proc/net/udp)
kill -TERM "$pid"
wait "$pid" || true
echo "kernel receive drops on the relay's socket(s), whole run: $drops"

echo "| hand-over | members | snapshot bytes | pause ms (old: stopped reading → let go) | finishing the batch in hand ms | new: took ms |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
for i in $(seq 0 $((HANDOVERS - 1))); do
    line=$(grep -h 'handed over to the new process' "$OUT/relay.$i.log" || true)
    took=$(grep -h 'took over from' "$OUT/relay.$((i + 1)).log" | sed -E 's/.* in ([0-9.]+) ms.*/\1/' || true)
    echo "$line" | sed -E "s/.*: ([0-9]+) member\(s\), a ([0-9]+)-byte snapshot, reading paused ([0-9.]+) ms here \(after ([0-9.]+) ms.*/| $((i + 1)) | \1 | \2 | \3 | \4 | $took |/"
done
grep -h 'handed over to the new process' "$OUT"/relay.*.log |
    sed -E 's/.*reading paused ([0-9.]+) ms.*/\1/' | sort -n |
    awk '{a[NR]=$1} END {if (NR) printf "pause: p50 %s ms, max %s ms over %d hand-overs\n", a[int((NR+1)/2)], a[NR], NR}'
echo "load report: $OUT/load.json"
