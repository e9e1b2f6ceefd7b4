"""Test helpers: run a real role daemon on loopback and wait until it says READY."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_stub(tmp_path: Path, listeners: list[dict], persona: dict | None = None, host: str = "stub",
             roles=("stub",), timeout: float = 20.0):
    """Start `python -m emulator.roled` bound to 127.0.0.1; yields the request-log path."""
    log = tmp_path / f"{host}.requests.jsonl"
    spec = tmp_path / f"{host}.spec.json"
    spec.write_text(json.dumps({"host": host, "roles": list(roles), "listeners": listeners, "log": str(log),
                                "interface": "127.0.0.1", "persona": persona or {}}))
    proc = subprocess.Popen([sys.executable, "-m", "emulator.roled", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("READY"):
            raise AssertionError(f"stub did not start: {line} {proc.stderr.read()[-2000:]}")
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def request_log(log: Path, wait: float = 2.0) -> list[dict]:
    """The stub's witness records (waits briefly: the stub logs as it handles requests)."""
    deadline = time.monotonic() + wait
    while True:
        records = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
        if records or time.monotonic() > deadline:
            return records
        time.sleep(0.05)
