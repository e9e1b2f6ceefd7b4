"""What a running lab owns, written down so that `safeq-lab clean` can undo a killed run.

One state file per topology under /run/safeq-lab: the owning process, the links it creates in the
host's own namespace (one bridge per zone, plus the transit segment joining several firewall
nodes, and the root-side veth end of every link to them), its firewall nodes, and the processes
it started (host and bridge shells, role daemons, `nft monitor trace`; killing the shells ends
their namespaces). Every process is written as (pid, start time in clock ticks since boot, field
22 of /proc/<pid>/stat): a pid the kernel has since given to another process is never signalled.

Every process a lab starts also carries ``SAFEQ_LAB_RUN=<its run directory>`` in its environment,
so the few it starts between two records are still found, and tests can tell lab processes from
anything else on the machine (a role daemon on loopback, another Mininet).
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
RUN_ENV = "SAFEQ_LAB_RUN"  # environment variable of every process a lab starts: its run directory
ROLED = "emulator.roled"
KILL_WAIT = 5.0  # seconds for killed processes to be gone
LINK_WAIT = 10.0  # seconds for deleted links to be gone from the host's namespace

Process = tuple[int, int]  # (pid, start time in ticks since boot)


def _state_file(topology_name: str) -> Path:
    return RUN_DIR / f"{topology_name}.state.json"


def run_dir(topology_name: str) -> Path:
    """Where a run keeps its specs, logs, traces and private keys (mode 0700, removed with the run)."""
    return RUN_DIR / topology_name


# -- processes --------------------------------------------------------------------------------------
def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot); None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def process(pid: int) -> Process | None:
    start = start_time(pid)
    return None if start is None else (pid, start)


def _is(proc: Process) -> bool:
    """The very process recorded is still alive (not merely a process with its pid)."""
    return proc[0] > 0 and start_time(proc[0]) == proc[1]


def _run_of(pid: int) -> str | None:
    """The run directory in the process's environment, if a lab started it."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{RUN_ENV}=".encode()
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _under(path: str, directory: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(directory.resolve())
    except (OSError, ValueError):
        return False


def _pids() -> list[int]:
    return sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())


def lab_processes(runs: set[str] | None = None) -> dict[int, str]:
    """pid -> what it is ('shell NAME' or its command), for processes some lab run started.

    A lab process carries the run's directory in SAFEQ_LAB_RUN (under RUN_DIR), or is a role daemon
    whose spec lies under RUN_DIR. `runs` limits it to those run directories.
    """
    found = {}
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        argv = _cmdline(pid)
        run = _run_of(pid)
        if run is None and ROLED in argv:
            spec = argv[argv.index(ROLED) + 1] if argv.index(ROLED) + 1 < len(argv) else ""
            if spec and argv[argv.index(ROLED) - 1] == "-m" and _under(spec, RUN_DIR):
                run = str(Path(spec).resolve().parent)
        if run is None or not _under(run, RUN_DIR) or (runs is not None and str(Path(run)) not in runs):
            continue
        shell = next((a for a in argv if a.startswith("mininet:")), None)
        found[pid] = f"shell {shell[len('mininet:'):]}" if shell else " ".join(argv)[:120]
    return found


def _our_processes() -> list[int]:
    """Lab processes other than Mininet's shells (kept for tests/bench.py)."""
    return sorted(pid for pid, what in lab_processes().items() if not what.startswith("shell "))


# -- links in the host's namespace -------------------------------------------------------------------
def lab_links() -> list[str]:
    """Links in the host's own namespace named like the lab's (bridges sqlab<N> and their ports)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(BRIDGE_PREFIX)]


def _our_bridges() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(BRIDGE_PREFIX)]


def _recorded_links(owner: dict, existing: list[str]) -> list[str]:
    """The links a run recorded, plus the ports of its recorded bridges (`<bridge>-eth<N>`)."""
    bridges = owner.get("bridges", [])
    wanted = set(owner.get("interfaces", [])) | set(bridges)
    ports = {n for n in existing for b in bridges
             if n.startswith(f"{b}-eth") and n[len(b) + 4:].isdigit()}
    return [n for n in existing if n in wanted | ports]


# -- the record ---------------------------------------------------------------------------------------
def claim(topology: Topology, interfaces: list[str]) -> None:
    """Refuse to build over a running or crashed lab, or over links left in the host's namespace."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for path in RUN_DIR.glob("*.state.json"):
        try:
            owner = json.loads(path.read_text())
        except ValueError:
            raise LabError(f"{path} is damaged: run `safeq-lab clean`") from None
        if _owner_alive(owner) and owner.get("pid") != os.getpid():
            raise LabError(f"a lab is already running (topology {owner.get('topology')}, pid {owner['pid']}); "
                           "stop it first, or run `safeq-lab clean --force`")
        raise LabError(f"a killed run left lab state behind (topology {owner.get('topology')}): run `safeq-lab clean`")
    leftover = lab_links()
    if leftover:
        shown = ", ".join(sorted(leftover)[:6]) + (", ..." if len(leftover) > 6 else "")
        raise LabError(f"lab links already exist in the host's namespace ({shown}): run `safeq-lab clean` "
                       "(a killed lab's links can take a while to go)")
    record(topology, processes=[], interfaces=interfaces, note="claimed")


def record(topology: Topology, processes: list[Process], interfaces: list[str], note: str = "running") -> None:
    path = _state_file(topology.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "pid": os.getpid(), "start": start_time(os.getpid()), "topology": topology.name, "note": note,
        "run_dir": str(run_dir(topology.name)), "bridges": topology.bridges, "interfaces": interfaces,
        "firewalls": [fw.name for fw in topology.firewalls],
        "processes": [list(p) for p in processes], "time": time.time(),
    }))
    tmp.replace(path)  # a kill never leaves half a state file


def release(topology: Topology) -> None:
    _state_file(topology.name).unlink(missing_ok=True)


def _owner_alive(owner: dict) -> bool:
    pid = owner.get("pid", 0)
    if not pid:
        return False
    if owner.get("start") is not None:
        return _is((pid, owner["start"]))
    return start_time(pid) is not None and _started_before(pid, owner.get("time", 0))


def _started_before(pid: int, when: float) -> bool:
    """The process started before `when` (epoch seconds): for records that carry no start time."""
    start = start_time(pid)
    if start is None:
        return False
    try:
        boot = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return False
    return boot + start / os.sysconf("SC_CLK_TCK") <= when + 1


def _recorded_processes(owner: dict) -> list[Process]:
    found = []
    for entry in owner.get("processes", []):
        if isinstance(entry, list) and len(entry) == 2 and _is((entry[0], entry[1])):
            found.append((entry[0], entry[1]))
    for pid in owner.get("pids", []):  # an older record: pids only, checked against the record's time
        if isinstance(pid, int) and _started_before(pid, owner.get("time", 0)):
            found.append((pid, start_time(pid)))
    return found


def _kill(procs: list[Process]) -> list[int]:
    """SIGKILL each process that is still the one recorded (through a pidfd: no pid reuse race)."""
    killed = []
    for pid, start in procs:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if start_time(pid) == start:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed.append(pid)
        except OSError:
            pass
        finally:
            os.close(fd)
    deadline = time.monotonic() + KILL_WAIT
    while any(_is(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def _delete_links(names: list[str], bridges: set[str]) -> list[str]:
    for name in names:  # ports first: deleting one end of a veth removes its peer in the dead namespace too
        if name not in bridges:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    for name in names:
        if name in bridges:
            subprocess.run(["ip", "link", "set", name, "down"], capture_output=True)
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    deadline = time.monotonic() + LINK_WAIT
    left = [n for n in names if n in set(lab_links())]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        for name in left:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        left = [n for n in names if n in set(lab_links())]
    return left


def clean(force: bool = False) -> list[str]:
    """Undo what killed runs recorded: their processes, links, run directories and state files.

    Only what a state file names is touched: processes recorded with their start time (or carrying
    that run's SAFEQ_LAB_RUN), links by their recorded names. A live run is refused unless `force`.
    """
    if os.geteuid() != 0:
        raise LabError("cleaning lab leftovers needs root: run it with sudo")
    removed: list[str] = []
    if not RUN_DIR.exists():
        return removed
    runs: list[tuple[Path, dict]] = []
    for path in sorted(RUN_DIR.glob("*.state.json")):
        try:
            owner = json.loads(path.read_text())
        except ValueError:
            owner = {}
        if owner.get("pid") != os.getpid() and _owner_alive(owner):
            if not force:
                raise LabError(f"a lab is running (topology {owner.get('topology')}, pid {owner['pid']}); "
                               "stop it, or run `safeq-lab clean --force`")
        runs.append((path, owner))
    existing = lab_links()
    for path, owner in runs:
        topology = owner.get("topology") or path.name.removesuffix(".state.json")
        directory = Path(owner.get("run_dir") or run_dir(topology))
        procs = _recorded_processes(owner)
        if owner.get("pid") and owner.get("pid") != os.getpid() and _owner_alive(owner):  # --force
            procs.insert(0, (owner["pid"], start_time(owner["pid"])))
        known = {p[0] for p in procs}
        procs += [p for pid in lab_processes({str(directory)}) if pid not in known and (p := process(pid))]
        removed += [f"process {pid}" for pid in _kill(procs)]
        links = _recorded_links(owner, existing)
        left = _delete_links(links, set(owner.get("bridges", [])))
        removed += [f"{'bridge' if n in owner.get('bridges', []) else 'interface'} {n}" for n in links if n not in left]
        if directory.is_dir() and _under(str(directory), RUN_DIR):
            subprocess.run(["rm", "-rf", str(directory)])
            removed.append(f"run dir {directory.name}")
        if left:
            raise LabError(f"lab links {', '.join(left)} are still there {LINK_WAIT:.0f}s after deleting them "
                           f"(the kernel is still freeing a killed run's namespaces): run `safeq-lab clean` again")
        path.unlink(missing_ok=True)
        removed.append(f"state {path.name}")
    for child in sorted(RUN_DIR.iterdir()):  # a run directory whose state file is gone: no run owns it
        if child.is_dir() and not _state_file(child.name).exists():
            subprocess.run(["rm", "-rf", str(child)])
            removed.append(f"run dir {child.name}")
        elif child.name.endswith(".state.tmp"):
            child.unlink(missing_ok=True)
    return removed
