"""Audits killed at seeded random moments (SIGINT and SIGKILL), `clean` after each, then a normal
audit: every normal audit passes and the host is left byte-identical to before the first run."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest

from tests.lab.helpers import SAFEQ_LAB, footprint, run_cli, small_topology

pytestmark = pytest.mark.lab
KILLS = 20
SEED = int(os.environ.get("SAFEQ_LAB_SEED", "7"))
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
STARTED_TOO_EARLY = "interrupted inside the interpreter's startup"
_NUMBERS = re.compile(r"\b(packets|bytes) \d+|\[\d+:\d+\]")


def _run(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60).stdout


def _our_kind_of_process(cmdline: str) -> bool:
    return any(marker in cmdline for marker in ("emulator.roled", "emulator.zygote", "emulator.prober", "emulator.delayer",
                                                 "mininet:", "mnexec",
                                                 "monitor trace", "emulator.cli"))


def host_state() -> dict[str, str]:
    """What a lab could leave or change on the host, with traffic counters blanked out."""
    processes = []
    for entry in sorted(os.listdir("/proc"), key=lambda p: (len(p), p)):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if _our_kind_of_process(cmdline):
                processes.append(f"{entry} {cmdline}")
    return {
        "interfaces": re.sub(r"\s+link/\S+ \S+ brd \S+", "", _run("ip", "-o", "link", "show")),
        "addresses": _run("ip", "-o", "addr", "show"),
        "namespaces": _run("ip", "netns", "list") + _run("lsns", "-t", "net", "-n", "-o", "NS"),
        "routes": _run("ip", "route", "show", "table", "all") + _run("ip", "-6", "route", "show", "table", "all"),
        "iptables": _NUMBERS.sub("", "\n".join(l for l in _run("iptables-save").splitlines() if not l.startswith("#"))),
        "nft": _NUMBERS.sub("", _run("nft", "list", "ruleset")),
        "processes": "\n".join(processes),
    }


def interrupted_audit(topology: str, delay: float, signum: int) -> int:
    proc = subprocess.Popen([*SAFEQ_LAB, "audit", "--topology", topology, "--timeout", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if "Traceback" in err:
        # Python's own startup (site, runpy) runs before any safeq-lab code can catch Ctrl-C
        assert signum == signal.SIGINT and proc.returncode in (1, -signal.SIGINT), err
        assert "emulator" not in err and err.rstrip().endswith("KeyboardInterrupt"), err
        return STARTED_TOO_EARLY, err.strip().splitlines()[-1:]
    return proc.returncode, err.strip().splitlines()[-1:]


def test_audits_killed_at_random_moments_leave_the_host_as_it_was(lab_host, tmp_path):
    topology = small_topology(tmp_path)
    before = host_state()
    started = time.monotonic()
    first = run_cli("audit", "--topology", topology, "--timeout", "1")
    assert first.returncode == 0, first.stdout[-1500:] + first.stderr
    duration = time.monotonic() - started
    rng = random.Random(SEED)
    moments = []
    for kill in range(KILLS):
        signum = signal.SIGINT if kill % 2 == 0 else signal.SIGKILL
        delay = rng.uniform(0.0, duration)
        status, said = interrupted_audit(topology, delay, signum)
        moments.append((signum.name, round(delay, 2), status, said))
        if signum == signal.SIGINT:
            # finished first, interrupted and torn down, or died of SIGINT's default action (the status
            # CPython gives when it exits after a KeyboardInterrupt; a shell shows 130 for it too)
            assert status in (0, 130, -signal.SIGINT, STARTED_TOO_EARLY), moments
            assert footprint() == CLEAN, moments  # Ctrl-C tears down by itself: `clean` is for SIGKILL
        cleaned = run_cli("clean")
        assert cleaned.returncode == 0, cleaned.stderr
        normal = run_cli("audit", "--topology", topology, "--timeout", "1")
        assert normal.returncode == 0, (moments, normal.stdout[-1000:], normal.stderr)
    assert footprint() == CLEAN, moments
    after = host_state()
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert changed == {}, (moments, changed)
