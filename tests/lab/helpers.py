"""Helpers shared by lab tests: the lab's footprint on the host, and CLI runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from emulator.state import RUN_DIR, lab_links, lab_processes

SAFEQ_LAB = [sys.executable, "-m", "emulator.cli"]


def footprint() -> dict:
    """Everything lab runs leave on the host; empty lists when they cleaned up after themselves.

    Only what a lab made counts: its links in the host's namespace (bridges sqlab<N> and their
    veth ports, under "bridges"), processes carrying a run's SAFEQ_LAB_RUN mark or role daemons
    whose spec lies under RUN_DIR (never a role daemon someone runs on loopback), Mininet shells
    of lab runs, and whatever is under RUN_DIR.
    """
    processes = lab_processes()
    return {"bridges": lab_links(),
            "processes": sorted(pid for pid, what in processes.items() if not what.startswith("shell ")),
            "state": sorted(p.name for p in RUN_DIR.glob("*")) if RUN_DIR.exists() else [],
            "mininet_shells": sorted(pid for pid, what in processes.items() if what.startswith("shell "))}


def run_cli(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*SAFEQ_LAB, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def small_topology(tmp_path: Path) -> str:
    """Two zones, three hosts: a quick lab for lifecycle tests."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "name: tiny\nfirewall: fw\nzones:\n"
        "  - name: servers\n    subnet: 198.18.100.0/24\n    hosts:\n"
        "      - {name: ts1, roles: [terminal-server, spooler-controller]}\n"
        "  - name: devices\n    subnet: 198.18.101.0/24\n    hosts:\n"
        "      - {name: km1, roles: [mfd, mfd-konica-minolta, embedded-terminal-konica-minolta]}\n"
        "      - {name: pc9, roles: [user]}\n")
    return str(path)
