# Shared by compare.sh and shards.sh (sourced, from the repository root):
# builds the release binaries and finds the bare recvmmsg/sendmmsg baseline
# relay (the baseline_relay bench binary, run with --serve ADDR).

# Builds udphub and loadtest (release) and sets $baseline_bin.
build_and_find_baseline() {
    cargo build --release --locked -p udphub -p loadtest >&2
    baseline_bin=$(cargo bench --locked --bench baseline_relay --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "baseline_relay" in m["executable"]:
        print(m["executable"])' | tail -1)
}
