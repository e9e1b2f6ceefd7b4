"""Helpers shared by lab tests: the lab's footprint on the host, and CLI runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from emulator.state import RUN_DIR, _our_bridges, _our_processes

SAFEQ_LAB = [sys.executable, "-m", "emulator.cli"]


def footprint() -> dict:
    """Everything a lab run leaves on the host; empty lists when it cleaned up after itself."""
    return {"bridges": _our_bridges(), "processes": _our_processes(),
            "state": sorted(p.name for p in RUN_DIR.glob("*")) if RUN_DIR.exists() else [],
            "mininet_shells": _mininet_shells()}


def _mininet_shells() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"mininet:" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


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
