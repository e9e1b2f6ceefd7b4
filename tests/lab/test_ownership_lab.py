"""The lab acts only on what it made, and a signal never leaves half a lab behind.

- `safeq-lab clean` (with or without --force) leaves alone a process that merely looks like a role
  daemon: a foreign command line with `-m emulator.roled`, and a real role daemon on loopback.
- SIGINT at seeded moments of an audit (while probing, while tearing down, twice in a row) exits
  130 with nothing left on the host and no `safeq-lab clean` needed.
- After a SIGKILL, the next audit refuses in one line naming `safeq-lab clean`; clean removes it
  all (links in the host's namespace included) and the audit after it passes.
"""
from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import pytest

from emulator import state
from tests.lab.helpers import SAFEQ_LAB, footprint, run_cli, small_topology

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
SEED = int(os.environ.get("SAFEQ_LAB_SEED", "9"))
UP_LINE = " up in "  # the CLI's stderr line once the lab is built and probing starts


def _foreign_daemons(tmp_path):
    """A command line that only looks like a role daemon, and a real role daemon on loopback."""
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "emulator.roled", "x"])
    spec = tmp_path / "loopback.json"
    spec.write_text(json.dumps({"host": "lo-test", "roles": [], "listeners": [], "interface": "127.0.0.1"}))
    real = subprocess.Popen([sys.executable, "-m", "emulator.roled", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert real.stdout.readline().startswith("READY"), real.stderr.read()
    return [fake, real]


def test_clean_never_touches_processes_it_did_not_start(lab_host, tmp_path):
    foreign = _foreign_daemons(tmp_path)
    try:
        pids = {p.pid for p in foreign}
        assert not pids & set(footprint()["processes"])
        for args in (("clean",), ("clean", "--force")):
            cleaned = run_cli(*args)
            assert cleaned.returncode == 0, cleaned.stderr
            assert all(p.poll() is None for p in foreign), f"`safeq-lab {' '.join(args)}` killed a foreign process"
            assert not any(f"process {pid}" in cleaned.stdout for pid in pids)
    finally:
        for proc in foreign:
            proc.kill()
            proc.communicate()


def _start_audit(tmp_path) -> subprocess.Popen:
    return subprocess.Popen([*SAFEQ_LAB, "audit", "--topology", small_topology(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _await_up(proc: subprocess.Popen, deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if UP_LINE in line:
            return
        if not line and proc.poll() is not None:
            pytest.fail(f"the audit exited before the lab was up: {proc.returncode}")
    pytest.fail("the lab did not come up")


def _daemons() -> int:
    """The lab's role daemons: the zygote's children (they keep its command line), and the zygote."""
    return sum("emulator.zygote" in what for what in state.lab_processes().values())


def _await_teardown(proc: subprocess.Popen, deadline: float = 60) -> None:
    """Until the lab has begun to tear down: a role daemon is gone while its network still stands."""
    end, seen = time.monotonic() + deadline, 0
    while time.monotonic() < end and proc.poll() is None:
        count = _daemons()
        seen = max(seen, count)
        if seen and count < seen:
            return
        time.sleep(0.005)
    pytest.fail("no teardown observed")


@pytest.mark.parametrize("moment", ["probing", "teardown", "twice"])
def test_sigint_at_any_moment_leaves_nothing(lab_host, tmp_path, moment):
    rng = random.Random(f"{SEED}-{moment}")
    proc = _start_audit(tmp_path)
    try:
        _await_up(proc)
        if moment == "teardown":
            _await_teardown(proc)
        else:
            time.sleep(rng.uniform(0.0, 0.4))  # a tiny audit probes and sweeps for about half a second
        proc.send_signal(signal.SIGINT)
        if moment == "twice":  # a second Ctrl-C lands in the teardown the first one started
            time.sleep(rng.uniform(0.05, 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # an interrupt during teardown may come after the audit finished: then the report stands
    assert proc.returncode in (130, 0), err
    if proc.returncode == 130:
        assert err.strip().splitlines()[-1] == "safeq-lab: interrupted; the lab was torn down", err
    assert "Traceback" not in err
    assert footprint() == CLEAN


def test_after_sigkill_the_next_audit_refuses_and_clean_restores_the_host(lab_host, tmp_path):
    proc = _start_audit(tmp_path)
    _await_up(proc)
    run_dir = state.run_dir("tiny")
    for directory in (run_dir, run_dir / "pki"):  # private keys: root only
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    proc.kill()
    proc.communicate(timeout=30)
    # the shells end with their stdin, the zygote stops the role daemons when its stdin ends:
    # the hosts' namespaces go, the bridges in the host's namespace and the state stay
    left = footprint()
    assert left["bridges"] and left["state"]
    refused = run_cli("audit", "--topology", small_topology(tmp_path))
    assert refused.returncode == 4, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "safeq-lab clean" in lines[0], refused.stderr
    cleaned = run_cli("clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "bridge sqlab1" in cleaned.stdout, cleaned.stdout
    assert footprint() == CLEAN  # at once: clean deleted whatever root-side veth end the kernel had not yet freed
    again = run_cli("audit", "--topology", small_topology(tmp_path))
    assert again.returncode == 0, again.stdout[-1500:] + again.stderr
    assert footprint() == CLEAN
