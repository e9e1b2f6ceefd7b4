"""Two labs side by side: audits running at once on one machine give the verdicts they give alone.

Each run has its own id in every name it creates in the host's namespace (bridges, veth ends), its
own state file and run directory; the labs' own namespaces keep their names (host-eth0, fw-servers).
One audit is of the small topology, the other of a copy of the same file: the same addresses, the
same host names, in separate namespaces.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from emulator import state
from tests.lab.helpers import SAFEQ_LAB, footprint, run_cli, small_topology

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
TIMEOUT = 120


def _summary(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("summary:")]
    assert len(lines) == 1, out[-2000:]
    return lines[0]


def test_two_audits_at_once_give_the_verdicts_they_give_alone(lab_host, tmp_path):
    first = small_topology(tmp_path)
    (tmp_path / "copy").mkdir()
    second = small_topology(tmp_path / "copy")  # the same topology from another file
    alone = {}
    for topology in (first, second):
        solo = run_cli("audit", "--topology", topology, timeout=TIMEOUT)
        assert solo.returncode == 0, solo.stdout[-2000:] + solo.stderr
        alone[topology] = _summary(solo.stdout)
    assert footprint() == CLEAN
    procs = {topology: subprocess.Popen([*SAFEQ_LAB, "audit", "--topology", topology], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
             for topology in (first, second)}
    try:
        together, end = set(), time.monotonic() + TIMEOUT
        while any(proc.poll() is None for proc in procs.values()) and time.monotonic() < end:
            live = {path.name for path, owner in state.runs() if owner and state.owner_alive(owner)}
            together = live if len(live) > len(together) else together
            time.sleep(0.05)
        outputs = {topology: proc.communicate(timeout=TIMEOUT) for topology, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for topology, proc in procs.items():
        out, err = outputs[topology]
        assert proc.returncode == 0, out[-2000:] + err
        assert _summary(out) == alone[topology]
    assert len(together) == 2, f"the two labs never ran at the same time: {together}"
    assert footprint() == CLEAN
