"""Helpers shared by lab tests: the lab's footprint on the host, and CLI runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from emulator import state
from emulator.state import RUN_DIR, lab_links, lab_processes

SAFEQ_LAB = [sys.executable, "-m", "emulator.cli"]


def footprint() -> dict:
    """Everything lab runs of this process (its own or its children's) or dead runs leave on the host;
    empty lists when they cleaned up after themselves.

    Only what a lab made counts: its links in the host's namespace (bridges sqlab<N><run> and their
    veth ports, under "bridges"), processes carrying a run's SAFEQ_LAB_RUN mark or role daemons
    whose spec lies under RUN_DIR (never a role daemon someone runs on loopback), Mininet shells
    of lab runs, and whatever is under RUN_DIR. A live run some other process started (another lab
    side by side) is not ours: its state, links and processes are left out.
    """
    others = [(path, owner) for path, owner in state.runs()
              if owner and state.owner_alive(owner) and not _ours(owner.get("pid", 0))]
    their_dirs = {str(Path(owner.get("run_dir", ""))) for _path, owner in others}
    their_files = {path.name for path, _owner in others} | {Path(d).name for d in their_dirs}
    their_links = {n for _path, owner in others
                   for n in set(owner.get("interfaces", [])) | set(owner.get("bridges", []))}
    processes = {pid: what for pid, what in lab_processes().items() if state.run_of_process(pid) not in their_dirs}
    return {"bridges": [n for n in lab_links() if n not in their_links],
            "processes": sorted(pid for pid, what in processes.items() if not what.startswith("shell ")),
            "state": sorted(p.name for p in RUN_DIR.glob("*") if p.name not in their_files
                            and p.name.removesuffix(".state.tmp") not in their_files) if RUN_DIR.exists() else [],
            "mininet_shells": sorted(pid for pid, what in processes.items() if what.startswith("shell "))}


def _ours(pid: int) -> bool:
    """The process is this one or one of its descendants."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


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


def policy_line(path: Path) -> int:
    """The line that sets the forward chain's drop policy: `:FORWARD DROP` or the nft chain's `policy drop;`."""
    lines = path.read_text().splitlines()
    found = [i + 1 for i, line in enumerate(lines)
             if line.startswith(":FORWARD DROP") or ("hook forward" in line and "policy drop;" in line)]
    assert len(found) == 1, path
    return found[0]
