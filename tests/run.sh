#!/usr/bin/env bash
# The test command: installs the real tools the tests drive (nc, socat,
# prometheus and promtool, systemd-analyze and systemd-socket-activate,
# tmux, ip, taskset and setpriv, nats-server, openssl, python3, python3-pytest, nodejs and npm from Debian; PyJWT from PyPI;
# npm's jsonwebtoken and jose into target/npm) if they are missing, then
# runs every test: cargo's, then the Python package's (clients/python).
# Under CI=true a tool that is still missing fails its test; it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nc >/dev/null || missing+=(netcat-openbsd)
command -v socat >/dev/null || missing+=(socat)
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
# systemd-socket-activate (tests/activation.rs) comes with systemd-analyze.
command -v systemd-analyze >/dev/null && command -v systemd-socket-activate >/dev/null || missing+=(systemd)
command -v python3 >/dev/null || missing+=(python3)
# pytest runs the Python client package's tests (clients/python/tests).
{ python3 -m pytest --version || /usr/bin/python3 -m pytest --version; } >/dev/null 2>&1 || missing+=(python3-pytest)
command -v tmux >/dev/null || missing+=(tmux)
command -v ip >/dev/null || missing+=(iproute2)
# taskset and setpriv (tests/faults.rs, tests/cli.rs): util-linux, on every
# Debian, but a slim image may lack them.
command -v taskset >/dev/null && command -v setpriv >/dev/null || missing+=(util-linux)
command -v nats-server >/dev/null || missing+=(nats-server)
command -v openssl >/dev/null || missing+=(openssl)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
# PyJWT mints the room tokens the tests check udphub against (a JWT
# library nobody here wrote): Debian's python3-jwt, or pip's below.
python3 -c "import jwt" 2>/dev/null || missing+=(python3-jwt)
if ((${#missing[@]})); then
    echo "tests/run.sh: installing ${missing[*]}" >&2
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c "import jwt" 2>/dev/null; then
    echo "tests/run.sh: installing PyJWT from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check pyjwt 2>&1 | grep -v "^WARNING: Running pip as" >&2 ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages pyjwt >&2 || true
fi

# npm's jsonwebtoken and jose, the JWT libraries Node backends mint room
# tokens with (tests/token_interop.rs), into a cache of their own under
# target/ (the test finds them there, or wherever UDPHUB_NPM_DIR says).
npm_dir="${UDPHUB_NPM_DIR:-target/npm}"
if [ ! -f "$npm_dir/node_modules/jsonwebtoken/package.json" ] || [ ! -f "$npm_dir/node_modules/jose/package.json" ]; then
    echo "tests/run.sh: installing npm jsonwebtoken and jose into $npm_dir" >&2
    mkdir -p "$npm_dir"
    npm install --prefix "$npm_dir" --no-audit --no-fund --loglevel=error jsonwebtoken@9 jose@5 >&2 || true
fi
export UDPHUB_NPM_DIR="$(cd "$npm_dir" && pwd)"

# Run everything, then close with one summary line over all test binaries
# (cargo's own last line is the doc-tests', which may well be "0 passed").
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The protocol suites again with four loops on one port (`--threads 4`
# through the environment): whichever loop a client lands on, the
# relay must behave the same.
if [ "$status" = 0 ]; then
    echo "== the protocol tests with UDPHUB_THREADS=4" | tee -a "$log"
    set +e
    UDPHUB_THREADS=4 cargo test --locked --test relay --test rooms --test verify --test metrics \
        --test clients --test client_api --test reload --test faults 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    set -e
fi
# The Python package (clients/python) against the debug relay binary. A
# python3 on PATH without pytest (a pyenv one) leaves it to Debian's.
echo "== the Python client package (clients/python/tests)" | tee -a "$log"
python=python3
python3 -m pytest --version >/dev/null 2>&1 || python=/usr/bin/python3
set +e
cargo build --locked --quiet --bin udphub 2>&1 | tee -a "$log"
py_status=${PIPESTATUS[0]}
if [ "$py_status" = 0 ]; then
    UDPHUB_BIN="$PWD/target/debug/udphub" "$python" -m pytest -q -p no:cacheprovider clients/python/tests 2>&1 | tee -a "$log"
    py_status=${PIPESTATUS[0]}
fi
set -e
if [ "$py_status" != 0 ] && [ "$status" = 0 ]; then status=$py_status; fi
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
exit "$status"
