"""Starts the real relay binary for the tests (UDPHUB_BIN, or the debug build)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

HERE = Path(__file__).resolve().parent
# The package from its source tree, unless it is installed.
sys.path.insert(0, str(HERE.parent / "src"))

BIN = Path(os.environ.get("UDPHUB_BIN", HERE.parent.parent.parent / "target" / "debug" / "udphub"))
#: How long a relay may take to start.
START_WAIT = 20.0


class Relay:
    """A running `udphub serve`, its UDP and metrics addresses."""

    def __init__(self, tmp: Path, args: List[str], bind: str = "127.0.0.1:0") -> None:
        if not BIN.exists():
            pytest.fail(f"no relay binary at {BIN}: run `cargo build --bin udphub` or set UDPHUB_BIN")
        ready = tmp / f"ready-{time.monotonic_ns()}"
        metrics_bind = "[::1]:0" if bind.startswith("[") else "127.0.0.1:0"
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--bind", bind, "--metrics", metrics_bind, "--ready-file", str(ready), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + START_WAIT
        while not ready.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"relay exited: {self.proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("relay did not write its ready file")
            time.sleep(0.02)
        fields: Dict[str, str] = dict(line.split("=", 1) for line in ready.read_text().split())
        self.addr = fields["udp"]
        self.metrics_addr = fields["metrics"]

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (0 if absent)."""
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_metric(self, name: str, want: float, wait: float = 10.0) -> float:
        """Polls ``name`` until it equals ``want`` (bounded); returns the last value."""
        deadline = time.monotonic() + wait
        value = self.metric(name)
        while value != want and time.monotonic() < deadline:
            time.sleep(0.05)
            value = self.metric(name)
        return value

    def stop(self, sig: int = signal.SIGTERM) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def relay(tmp_path: Path) -> Iterator:
    """A factory: ``relay(*args, bind=...)`` starts one; all are stopped after the test."""
    started: List[Relay] = []

    def start(*args: str, bind: str = "127.0.0.1:0") -> Relay:
        r = Relay(tmp_path, list(args), bind)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
