"""Test helpers: run a real role daemon on loopback and wait until it says READY, run the
prober, and drive Twisted code on a fresh reactor or check a Deferred that has fired."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

REPO = Path(__file__).resolve().parents[1]


def client_tool(name: str, package: str) -> str:
    """The path of a real client program (sbin included), or a test failure naming the Debian
    package: interop tests never skip."""
    import pytest

    path = shutil.which(name, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin')
    if path is None:
        pytest.fail(f'{name} is missing: apt-get install {package}')
    return path


def fired(d: Deferred):
    """The result of a Deferred that must already have fired (its failure is raised)."""
    box: list = []
    d.addBoth(box.append)
    assert box, 'Deferred has not fired'
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def fresh_reactor():
    """A new epoll reactor: loopback tests never run (or leak into) the global one."""
    from twisted.internet.epollreactor import EPollReactor
    return EPollReactor()


def tls_clocked_reactor(monkeypatch):
    """A fresh reactor that Twisted's TLS layer also uses: it flushes small writes on the
    *global* reactor's clock (twisted.protocols.tls._get_default_clock, documented as the
    hook to patch in tests), where they would never be sent."""
    from twisted.protocols import tls as twisted_tls
    reactor = fresh_reactor()
    monkeypatch.setattr(twisted_tls, '_get_default_clock', lambda: reactor)
    return reactor


def run_on_reactor(reactor, fn, limit: float = 10.0):
    """Run ``fn(reactor)`` to completion on ``reactor``; its result, or its failure raised.
    A watchdog stops the reactor after ``limit`` seconds, so a hung test fails instead."""
    box: list = []

    def go():
        d = maybeDeferred(fn, reactor)
        d.addBoth(box.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    watchdog = reactor.callLater(limit, reactor.stop)
    reactor.run(installSignalHandlers=False)
    if watchdog.active():
        watchdog.cancel()
    assert box, f'did not finish within {limit} s'
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def run_on_fresh_reactor(fn, limit: float = 10.0):
    """Run ``fn(reactor)`` to completion on a new epoll reactor (not the global one)."""
    return run_on_reactor(fresh_reactor(), fn, limit)


def run_prober(stdin: str, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """`python -m emulator.prober` with ``stdin``, as the lab runs it."""
    return subprocess.run([sys.executable, '-m', 'emulator.prober', *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def probe_targets(targets: list[dict], timeout: float = 60.0) -> list[dict]:
    """The prober's results for ``targets`` (it must exit 0)."""
    proc = run_prober(json.dumps(targets), timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def free_port(kind=socket.SOCK_STREAM) -> int:
    """A port nothing listens on right now (the kernel picked it, we released it)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A free FTP control port L whose data port L-1 is free too, below the ephemeral range.

    A kernel-chosen listening port is odd and Linux hands the even ones to connect(): L-1
    would often be some client's port, and the stub would fall back to an ephemeral source
    port (in the lab L is 21, so the stub connects back from 20)."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20001, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port - 1))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair found")


@contextlib.contextmanager
def run_stub(tmp_path: Path, listeners: list[dict], persona: dict | None = None, host: str = "stub",
             roles=("stub",), timeout: float = 20.0, control: str = ""):
    """Start `python -m emulator.roled` bound to 127.0.0.1 (taking jobs on the Unix socket `control`,
    if given); yields the request-log path."""
    log = tmp_path / f"{host}.requests.jsonl"
    spec = tmp_path / f"{host}.spec.json"
    spec.write_text(json.dumps({"host": host, "roles": list(roles), "listeners": listeners, "log": str(log),
                                "interface": "127.0.0.1", "persona": persona or {}, "control": control}))
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


def request_log(log: Path, wait: float = 2.0, count: int = 1) -> list[dict]:
    """The stub's witness records, once there are ``count`` of them or ``wait`` s have passed
    (the stub logs as it handles requests)."""
    deadline = time.monotonic() + wait
    while True:
        records = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


JUNIT_SCHEMA = REPO / "tests" / "data" / "junit.xsd"


def junit_problems(xml: str | Path) -> str:
    """What xmllint (libxml2) finds wrong with a JUnit XML document (a path or its text) against
    tests/data/junit.xsd; '' when it validates. A separate validator process: libxml2 is what many CI
    servers' parsers build on, and no Python import can change its verdict."""
    import shutil
    import tempfile

    if shutil.which("xmllint") is None:
        raise AssertionError("xmllint not found: apt-get install libxml2-utils")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(xml) if isinstance(xml, Path) else Path(scratch, "junit.xml")
        if not isinstance(xml, Path):
            path.write_text(xml)
        done = subprocess.run(["xmllint", "--noout", "--schema", str(JUNIT_SCHEMA), str(path)],
                              capture_output=True, text=True, timeout=60)
    return "" if done.returncode == 0 else done.stderr.strip()
