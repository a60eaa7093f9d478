#!/usr/bin/env bash
# One cluster measurement: nats-server and two relays on loopback (release
# build), `loadtest fanout --relay A,B` over them, and one JSON line: the
# loadtest report's scalars, chat messages published and received by the
# relays, NATS messages into the server (/varz in_msgs), chat messages per
# NATS message, and the relays' CPU per bus message (published + received).
#
#   bash loadtest/cluster.sh THREADS KEY(0|1) window|rate VALUE
#   bash loadtest/cluster.sh 2 1 window 128      # --threads 2, --cluster-key-file, closed loop
#   bash loadtest/cluster.sh 1 0 rate 2000       # open loop (latency)
set -u
cd "$(dirname "$0")/.."
set -u
T=$1; KEY=$2; MODE=$3; VAL=$4
B=target/release
D=$(mktemp -d)
NP=$((14300 + RANDOM % 500))
nats-server -a 127.0.0.1 -p $NP -m $((NP+1000)) >$D/nats.log 2>&1 &
NPID=$!
sleep 0.5
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > $D/key
keyarg=(); [ "$KEY" = 1 ] && keyarg=(--cluster-key-file $D/key)
for n in 1 2; do
  $B/udphub serve --bind 127.0.0.1:0 --metrics 127.0.0.1:0 --cluster nats://127.0.0.1:$NP --node-id n$n --threads $T --log-level warn --ready-file $D/r$n "${keyarg[@]}" 2>$D/relay$n.log &
  echo $! > $D/pid$n
done
for n in 1 2; do for i in $(seq 100); do [ -s $D/r$n ] && break; sleep 0.1; done; done
U1=$(grep '^udp=' $D/r1 | cut -d= -f2); U2=$(grep '^udp=' $D/r2 | cut -d= -f2)
M1=$(grep '^metrics=' $D/r1 | cut -d= -f2); M2=$(grep '^metrics=' $D/r2 | cut -d= -f2)
P1=$(cat $D/pid1); P2=$(cat $D/pid2)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
for i in $(seq 50); do curl -s http://$M1/metrics | grep -q '^udphub_cluster_connected 1' && curl -s http://$M2/metrics | grep -q '^udphub_cluster_connected 1' && break; sleep 0.1; done
c1=$(cpu $P1); c2=$(cpu $P2); n0=$(curl -s http://127.0.0.1:$((NP+1000))/varz | python3 -c 'import json,sys; print(json.load(sys.stdin)["in_msgs"])')
if [ "$MODE" = window ]; then modearg=(--window $VAL); else modearg=(--rate $VAL); fi
$B/loadtest fanout --relay $U1,$U2 --metrics-url http://$M1/metrics,http://$M2/metrics --clients 4 --rooms 2 --senders 4 --duration 8s "${modearg[@]}" --json > $D/out.json 2>$D/lt.err
rc=$?
c1b=$(cpu $P1); c2b=$(cpu $P2); n1=$(curl -s http://127.0.0.1:$((NP+1000))/varz | python3 -c 'import json,sys; print(json.load(sys.stdin)["in_msgs"])')
m1=$(curl -s http://$M1/metrics); m2=$(curl -s http://$M2/metrics)
python3 - "$D/out.json" "$rc" "$T" "$KEY" "$MODE" "$VAL" "$((c1b-c1))" "$((c2b-c2))" "$((n1-n0))" <<PY "$m1" "$m2"
import json,sys
f,rc,T,KEY,MODE,VAL,cpu1,cpu2,nats=sys.argv[1:10]
m1,m2=sys.argv[10],sys.argv[11]
def metric(text,name):
    t=0.0
    for l in text.splitlines():
        if l.startswith(name) and not l.startswith('#'):
            try: t+=float(l.split()[-1])
            except: pass
    return t
try: j=json.load(open(f))
except Exception as e: j={}
pub=metric(m1,'udphub_cluster_published_total')+metric(m2,'udphub_cluster_published_total')
rec=metric(m1,'udphub_cluster_received_total')+metric(m2,'udphub_cluster_received_total')
drops=metric(m1,'udphub_cluster_dropped_total')+metric(m2,'udphub_cluster_dropped_total')
hz=100.0
cpu=(int(cpu1)+int(cpu2))/hz
keys=sorted(k for k in j.keys())
sent=j.get('sent') or j.get('messages_sent')
lat=j.get('latency_us') or j.get('cross_latency_us') or {}
lat={k:j[k] for k in j if "lat" in k or "p50" in k or "cross" in k}
print(json.dumps({"lat":lat,"threads":T,"key":KEY,"mode":MODE,"val":VAL,"rc":rc,"published":pub,"received":rec,"cluster_drops":drops,"nats_in_msgs":nats,"msgs_per_nats":(pub/int(nats) if int(nats) else None),"relay_cpu_s":cpu,"cpu_us_per_bus_msg":(cpu*1e6/(pub+rec) if pub+rec else None),"loadtest":{k:j[k] for k in keys if not isinstance(j[k],(list,dict))}}))
PY
kill $P1 $P2 $NPID 2>/dev/null; wait 2>/dev/null
rm -rf $D
