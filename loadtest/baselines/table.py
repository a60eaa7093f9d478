"""Turns loadtest/compare.sh's JSON reports into one markdown table.

Values are medians over rounds. Ratios are paired: each round's value over
the same round's baseline value, then the median of those — the rounds run
the relays back to back, so pairing cancels most of a noisy machine's drift.
"""
import glob
import json
import os
import statistics
import sys

out = sys.argv[1]
runs = {}  # (clients, relay) -> {round: report}
for path in glob.glob(os.path.join(out, "*.json")):
    relay, clients, rnd = os.path.basename(path)[:-5].rsplit("-", 2)
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        continue
    runs.setdefault((int(clients), relay), {})[int(rnd)] = report


def rate(r):
    return r["deliveries_per_s"]


def cpu(r):
    return (r.get("relay_usage") or {}).get("cpu_ns_per_delivery")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


print("| clients | relay | deliveries/s | relay CPU ns/delivery | loss | p50 µs | p99 µs | deliveries/s vs baseline | CPU/delivery vs baseline |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for clients in sorted({c for c, _ in runs}):
    base = runs.get((clients, "baseline"), {})
    for relay in ["baseline", "udphub", "udphub-v2", "udphub-t2", "udphub-verify", "udphub-ref", "udphub-raw", "udphub-noecho", "udpexchange", "seed"]:
        rounds = runs.get((clients, relay))
        if not rounds:
            continue
        reports = list(rounds.values())
        lost = sum(r["lost"] for r in reports)
        expected = sum(r["deliveries_expected"] for r in reports)

        def paired(f):
            ratios = []
            for rnd, r in rounds.items():
                b = base.get(rnd)
                if b is not None and f(r) is not None and f(b):
                    ratios.append(f(r) / f(b))
            return median(ratios)

        print(
            f"| {clients} | {relay} | {fmt(median(map(rate, reports)), '.0f')} "
            f"| {fmt(median(map(cpu, reports)), '.0f')} | {100.0 * lost / max(expected, 1):.4f}% "
            f"| {fmt(median(r['latency_us']['p50'] for r in reports), '.0f')} "
            f"| {fmt(median(r['latency_us']['p99'] for r in reports), '.0f')} "
            f"| {fmt(paired(rate), '.3f')}x | {fmt(paired(cpu), '.3f')}x |"
        )
