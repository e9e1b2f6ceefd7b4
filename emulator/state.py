"""What a running lab owns, written down so that `safeq-lab clean` can undo a killed run.

One state file per topology under /run/safeq-lab: the owning pid, the bridges it creates (one
per zone, plus the transit segment joining several firewall nodes), its firewall nodes, and the
pids of its host and firewall shells, role daemons and `nft monitor trace` processes (killing
those ends their namespaces and veths).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from emulator.errors import LabError
from emulator.topology import BRIDGE_PREFIX, Topology

RUN_DIR = Path(os.environ.get("SAFEQ_LAB_RUN_DIR", "/run/safeq-lab"))
DAEMON_MARKERS = ("emulator.roled", "emulator.prober")


def _state_file(topology_name: str) -> Path:
    return RUN_DIR / f"{topology_name}.state.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(topology: Topology) -> None:
    """Refuse to build over a running or crashed lab of the same topology or with the same bridges."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for path in RUN_DIR.glob("*.state.json"):
        try:
            owner = json.loads(path.read_text())
        except ValueError:
            raise LabError(f"{path} is damaged: run `safeq-lab clean`") from None
        if _alive(owner.get("pid", 0)) and owner.get("pid") != os.getpid():
            raise LabError(f"a lab is already running (topology {owner.get('topology')}, pid {owner['pid']}); "
                           "stop it first, or run `safeq-lab clean --force`")
        raise LabError(f"a killed run left lab state behind (topology {owner.get('topology')}): run `safeq-lab clean`")
    existing = set(_our_bridges())
    if existing:
        raise LabError(f"lab bridges already exist ({', '.join(sorted(existing))}): run `safeq-lab clean`")
    record(topology, pids=[], note="claimed")


def record(topology: Topology, pids: list[int], note: str = "running") -> None:
    _state_file(topology.name).write_text(json.dumps({
        "pid": os.getpid(), "topology": topology.name, "note": note,
        "bridges": topology.bridges, "firewalls": [fw.name for fw in topology.firewalls],
        "pids": pids, "time": time.time(),
    }))


def release(topology: Topology) -> None:
    _state_file(topology.name).unlink(missing_ok=True)


def _our_bridges() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(BRIDGE_PREFIX)]


def _our_processes() -> list[int]:
    """Role daemons and probers of any lab run, found by their module name."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(f"-m {marker}" in cmdline for marker in DAEMON_MARKERS):
            pids.append(int(proc.name))
    return pids


def clean(force: bool = False) -> list[str]:
    """Remove what killed runs left: processes, namespaces (with them), bridges, state files."""
    if os.geteuid() != 0:
        raise LabError("cleaning lab leftovers needs root: run it with sudo")
    removed: list[str] = []
    pids: set[int] = set()
    if RUN_DIR.exists():
        for path in RUN_DIR.glob("*.state.json"):
            try:
                owner = json.loads(path.read_text())
            except ValueError:
                owner = {}
            owner_pid = owner.get("pid", 0)
            if owner_pid and owner_pid != os.getpid() and _alive(owner_pid) and not force:
                raise LabError(f"a lab is running (topology {owner.get('topology')}, pid {owner_pid}); "
                               "stop it, or run `safeq-lab clean --force`")
            if force and owner_pid and owner_pid != os.getpid() and _alive(owner_pid):
                pids.add(owner_pid)
            pids.update(owner.get("pids", []))
            path.unlink(missing_ok=True)
            removed.append(f"state {path.name}")
    pids.update(_our_processes())
    pids.discard(os.getpid())
    for pid in sorted(pids):
        try:
            os.kill(pid, signal.SIGKILL)
            removed.append(f"process {pid}")
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for bridge in _our_bridges():
        subprocess.run(["ip", "link", "set", bridge, "down"], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        removed.append(f"bridge {bridge}")
    if RUN_DIR.exists():
        for child in RUN_DIR.iterdir():
            if child.is_dir():
                subprocess.run(["rm", "-rf", str(child)])
                removed.append(f"run dir {child.name}")
    return removed
