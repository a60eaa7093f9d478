#!/usr/bin/env bash
# Ten million clients on one node, live (issue 23): a release udphub and
# loadtest's join-storm of CLIENTS distinct 127.x.y.z sources.
#
#   rooms phase: CLIENTS members in ROOMS rooms, heartbeating every
#     HEARTBEAT (spread over the interval); a 30 s window of heartbeats
#     alone (relay CPU a heartbeat, kernel drops, RSS a client), then
#     closed-loop talkers in TALK_ROOMS rooms beside them for 30 s
#     (deliveries/s, the relay's fan-out p50/p99, loop passes over 5 ms,
#     kernel drops), then silence: the relay expires all of them (loop
#     passes over 5 ms meanwhile, the longest).
#   lobby phase: CLIENTS members in the lobby; one message into the lobby
#     every LOBBY_EVERY while a probe client in a room of its own measures
#     its echo's round trip (p50/p99) and the relay's kernel drops.
#
#   bash loadtest/tenmillion.sh                         # 10,000,000, --threads 1
#   THREADS=2 bash loadtest/tenmillion.sh
#   CLIENTS=1000000 ROOMS=10000 bash loadtest/tenmillion.sh   # a quick one
#
# Needs ~1.2 GB for the relay at ten million and 16 loopback ports. Prints
# one summary line per phase; everything else is under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS="${CLIENTS:-10000000}"
ROOMS="${ROOMS:-100000}"
THREADS="${THREADS:-1}"
HEARTBEAT="${HEARTBEAT:-60s}"
TALK_ROOMS="${TALK_ROOMS:-1000}"
LOBBY_EVERY="${LOBBY_EVERY:-5}"
# Joins paced to what the relay ingests (each join into a room is answered:
# ~90k/s on a busy 2-core VM); lobby members register by heartbeat, unanswered.
JOIN_RATE="${JOIN_RATE:-100000}"
# The relay's --timeout outlasts the registration plus a heartbeat interval
# (a source that expired before its first heartbeat would come back in the
# lobby, not its room).
TIMEOUT="${TIMEOUT:-200}"
LOBBY_JOIN_RATE="${LOBBY_JOIN_RATE:-$((JOIN_RATE * 3 / 2))}"
PHASES="${PHASES:-rooms lobby}"
OUT="${OUT:-target/tenmillion}"
# More relay flags, e.g. RELAY_ARGS="--recv-buffer 41943040".
RELAY_ARGS="${RELAY_ARGS:-}"

mkdir -p "$OUT"
bin=target/release/udphub
lt=target/release/loadtest
[ -x "$bin" ] && [ -x "$lt" ] || {
    echo "build first: cargo build --release -p udphub -p loadtest" >&2
    exit 2
}

relay_pid=
cleanup() { [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null || true; }
trap cleanup EXIT

start_relay() { # $1: tag; sets udp, metrics, relay_pid
    rm -f "$OUT/ready.$1"
    "$bin" serve --bind 127.0.0.1:0 --metrics 127.0.0.1:0 --log-level warn \
        --threads "$THREADS" --max-clients $((CLIENTS + CLIENTS / 5 + 10000)) \
        --expect-clients "$CLIENTS" --max-rooms $((ROOMS + TALK_ROOMS + 10)) \
        --timeout "${TIMEOUT}s" --ready-file "$OUT/ready.$1" $RELAY_ARGS 2>"$OUT/relay.$1.log" &
    relay_pid=$!
    for _ in $(seq 600); do
        [ -s "$OUT/ready.$1" ] && grep -q '^metrics=' "$OUT/ready.$1" && break
        sleep 0.05
    done
    udp=$(grep '^udp=' "$OUT/ready.$1" | cut -d= -f2)
    metrics="http://$(grep '^metrics=' "$OUT/ready.$1" | cut -d= -f2)/metrics"
}

scrape() { # $1: file; the relay's metrics plus its CPU seconds and RSS
    curl -s --max-time 5 "$metrics" >"$1"
    awk '{print "relay_cpu_seconds", ($14 + $15) / 100}' "/proc/$relay_pid/stat" >>"$1"
    awk '/^VmRSS/ {print "relay_rss_bytes", $2 * 1024}' "/proc/$relay_pid/status" >>"$1"
    # CPU time the hypervisor took from this VM (all CPUs): a pass that
    # "took" 5 ms may have been stolen, not spent.
    awk '/^cpu / {print "host_steal_seconds", $9 / 100}' /proc/stat >>"$1"
    # Time the relay's threads were runnable but waited for a CPU (other
    # processes on it): the guest's share of a long pass, beside the steal.
    cat /proc/"$relay_pid"/task/*/schedstat 2>/dev/null |
        awk '{w += $2} END {print "relay_runqueue_wait_seconds", w / 1e9}' >>"$1"
}

wait_clients() { # $1: at least this many clients (bounded: 10 minutes)
    for _ in $(seq 6000); do
        n=$(curl -s --max-time 5 "$metrics" | awk '$1=="udphub_clients"{print $2}')
        [ -n "$n" ] && awk -v n="$n" -v w="$1" 'BEGIN{exit !(n>=w)}' && return 0
        sleep 0.1
    done
    echo "the relay never counted $1 clients (has $n)" >&2
    return 1
}

# What happened between two scrapes, as one JSON object.
delta() { # $1 $2: scrape files; $3: window label
    python3 - "$1" "$2" "$3" <<'EOF'
import json, re, sys
def load(p):
    m = {}
    for line in open(p):
        if line.startswith('#') or not line.strip():
            continue
        k, _, v = line.rstrip().rpartition(' ')
        try:
            m[k] = float(v)
        except ValueError:
            pass
    return m
a, b = load(sys.argv[1]), load(sys.argv[2])
d = lambda k: b.get(k, 0.0) - a.get(k, 0.0)
def total(prefix):
    return sum(v - a.get(k, 0.0) for k, v in b.items() if k == prefix or k.startswith(prefix + '{'))
def hist(name):
    # Buckets summed over every label set (loops), then quantiles.
    buckets = {}
    for k, v in b.items():
        m = re.match(name + r'_bucket\{(.*)\}$', k)
        if not m:
            continue
        le = re.search(r'le="([^"]+)"', m.group(1)).group(1)
        le = float('inf') if le == '+Inf' else float(le)
        buckets[le] = buckets.get(le, 0.0) + v - a.get(k, 0.0)
    les = sorted(buckets)
    count = buckets.get(float('inf'), 0.0)
    q = lambda p: next((le for le in les if buckets[le] >= p * count), None) if count else None
    over5 = count - sum(v for le, v in buckets.items() if le == 0.005)
    return {'count': count, 'p50_le_s': q(0.5), 'p99_le_s': q(0.99), 'max_le_s': q(1.0),
            'over_5ms': over5 if 0.005 in buckets else None}
secs = d('relay_cpu_seconds')
hb = sum(v - a.get(k, 0.0) for k, v in b.items()
         if k.startswith('udphub_datagrams_received_total') and 'heartbeat' in k)
print(json.dumps({
    'window': sys.argv[3],
    'clients': b.get('udphub_clients'),
    'rss_bytes': b.get('relay_rss_bytes'),
    'relay_cpu_s': secs,
    'host_steal_s': d('host_steal_seconds'),
    'relay_runqueue_wait_s': d('relay_runqueue_wait_seconds'),
    'heartbeats': hb,
    'relay_cpu_ns_per_heartbeat': secs * 1e9 / hb if hb else None,
    'deliveries': total('udphub_deliveries_total'),
    'delivery_dropped': total('udphub_delivery_dropped_total'),
    'kernel_rx_dropped': d('udphub_kernel_rx_dropped_total'),
    'fanout': hist('udphub_fanout_duration_seconds'),
    'loop_iteration': hist('udphub_loop_iteration_seconds'),
}))
EOF
}

summary="$OUT/summary.jsonl"
: >"$summary"

if [[ " $PHASES " == *" rooms "* ]]; then
    start_relay rooms
    scrape "$OUT/s0"
    # The storm's steady phase outlasts both windows below (150 s from its
    # registration); then it goes silent and watches the relay expire
    # everyone.
    "$lt" join-storm --relay "$udp" --metrics-url "$metrics" --relay-pid "$relay_pid" \
        --clients "$CLIENTS" --rooms "$ROOMS" --heartbeat "$HEARTBEAT" --join-rate "$JOIN_RATE" \
        --register-timeout 600s --duration 150s --expire "$((TIMEOUT + 120))s" --json \
        >"$OUT/storm.rooms.json" 2>"$OUT/storm.rooms.log" &
    storm=$!
    wait_clients "$CLIENTS"
    sleep 5
    scrape "$OUT/s1"
    sleep 30
    scrape "$OUT/s2"
    "$lt" fanout --relay "$udp" --rooms "$TALK_ROOMS" --clients $((TALK_ROOMS * 2)) \
        --senders "$TALK_ROOMS" --window 4 --room-prefix talk --duration 30s --json \
        >"$OUT/talk.json" 2>"$OUT/talk.log"
    scrape "$OUT/s3"
    wait "$storm"
    scrape "$OUT/s4"
    delta "$OUT/s0" "$OUT/s1" registration >>"$summary"
    delta "$OUT/s1" "$OUT/s2" heartbeats-only >>"$summary"
    delta "$OUT/s2" "$OUT/s3" heartbeats+talkers >>"$summary"
    python3 - "$OUT/storm.rooms.json" "$OUT/talk.json" >>"$summary" <<'EOF'
import json, sys
s, t = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(json.dumps({'window': 'storm+talkers (loadtest)',
    'registered_seconds': s.get('registered_seconds'), 'join_seconds': s.get('join_seconds'),
    'rss_bytes_per_client': s.get('rss_bytes_per_client'), 'expiry': s.get('expiry'),
    'talk_deliveries_per_s': t.get('deliveries_per_s'), 'talk_lost': t.get('lost'),
    'talk_latency_us': t.get('latency_us')}))
EOF
    kill "$relay_pid"; wait "$relay_pid" 2>/dev/null || true; relay_pid=
fi

if [[ " $PHASES " == *" lobby "* ]]; then
    start_relay lobby
    "$lt" join-storm --relay "$udp" --metrics-url "$metrics" --relay-pid "$relay_pid" \
        --clients "$CLIENTS" --heartbeat "$HEARTBEAT" --join-rate "$LOBBY_JOIN_RATE" --register-timeout 600s \
        --duration 120s --expire 1s --json >"$OUT/storm.lobby.json" 2>"$OUT/storm.lobby.log" &
    storm=$!
    wait_clients "$CLIENTS"
    sleep 5
    # The probe alone first: its round trip with ten million heartbeating
    # members and no lobby traffic, the same run's baseline.
    "$lt" fanout --relay "$udp" --rooms 1 --clients 1 --rate 200 --room-prefix quiet \
        --duration 10s --json >"$OUT/probe-quiet.json" 2>"$OUT/probe-quiet.log"
    scrape "$OUT/l1"
    # One lobby message every LOBBY_EVERY s from a plain client, while a
    # probe in a room of its own measures its echo.
    python3 - "$udp" "$LOBBY_EVERY" 30 <<'EOF' &
import socket, sys, time
host, port = sys.argv[1].rsplit(':', 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('127.0.0.1', 0))
end = time.time() + float(sys.argv[3])
while time.time() < end:
    s.sendto(b'lobby message ' + b'x' * 50, (host, int(port)))
    time.sleep(float(sys.argv[2]))
EOF
    talker=$!
    "$lt" fanout --relay "$udp" --rooms 1 --clients 1 --rate 200 --room-prefix probe \
        --duration 25s --json >"$OUT/probe.json" 2>"$OUT/probe.log"
    wait "$talker"
    scrape "$OUT/l2"
    delta "$OUT/l1" "$OUT/l2" lobby-fanout+probe >>"$summary"
    for probe in probe-quiet probe; do
        python3 - "$OUT/$probe.json" "$probe" >>"$summary" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))
print(json.dumps({'window': sys.argv[2] + ' (loadtest)', 'probe_latency_us': p.get('latency_us'),
    'probe_lost': p.get('lost'), 'probe_deliveries': p.get('deliveries')}))
EOF
    done
    # (The relay goes next: no need for the storm's ten million quits.)
    kill "$storm" 2>/dev/null || true
    wait "$storm" 2>/dev/null || true
    kill "$relay_pid"; wait "$relay_pid" 2>/dev/null || true; relay_pid=
fi
cat "$summary"
