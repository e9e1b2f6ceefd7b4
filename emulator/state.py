"""What a running lab owns, written down so that `safeq-lab clean` can undo a killed run.

Every run has an id (RUN_ID: three characters, unused by any state file or lab link) and one state
file, /run/safeq-lab/<id>-<topology>.state.json, next to its run directory <id>-<topology>/
(specs, logs, control sockets, traces). The file holds the owning process, the links the run
creates in the host's own namespace, all named with its id so that labs run side by side
(emulator.topology.bridge_name: one bridge per zone, plus the transit segment joining several
firewall nodes, and the root-side veth end of every link to them), its firewall nodes, and the
processes it started (host and bridge shells, role daemons, `nft monitor trace`; killing the shells
ends their namespaces). Every process is written as (pid, start time in clock ticks since boot, field
22 of /proc/<pid>/stat): a pid the kernel has since given to another process is never signalled.

Every process a lab starts also carries ``SAFEQ_LAB_RUN=<its run directory>`` in its environment,
so the few it starts between two records are still found, and tests can tell lab processes from
anything else on the machine (a role daemon on loopback, another Mininet).
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from emulator.errors import LabError
from emulator.topology import BRIDGE_PREFIX, RUN_ID, Topology

RUN_DIR = Path(os.environ.get("SAFEQ_LAB_RUN_DIR", "/run/safeq-lab"))
RUN_ENV = "SAFEQ_LAB_RUN"  # environment variable of every process a lab starts: its run directory
ROLED = "emulator.roled"
KILL_WAIT = 5.0  # seconds for killed processes to be gone
LINK_WAIT = 10.0  # seconds for deleted links to be gone from the host's namespace

Process = tuple[int, int]  # (pid, start time in ticks since boot)


_ID_FIRST = "abcdefghijklmnopqrstuvwxyz"
_ID_REST = _ID_FIRST + "0123456789"
_BRIDGE = re.compile(rf"^{BRIDGE_PREFIX}(\d+)((?:[a-z][a-z0-9]{{2}})?)$")  # sqlab<N><run>, sqlab<N> (older runs)
_PORT = r"(?:p\d+|-eth\d+)"  # a bridge's port M: p<M>, or -eth<M> as older runs named it


def run_name(run_id: str, topology_name: str) -> str:
    """The name of a run's state file and run directory: <id>-<topology>."""
    return f"{run_id}-{topology_name}"


def _state_file(name: str) -> Path:
    return RUN_DIR / f"{name}.state.json"


def run_dir(topology_name: str, run_id: str | None = None) -> Path:
    """Where a run keeps its specs, logs, sockets, traces and private keys (mode 0700, removed with the run).

    Without `run_id`: the run directory of the one recorded run of that topology.
    """
    if run_id is not None:
        return RUN_DIR / run_name(run_id, topology_name)
    found = [Path(owner["run_dir"]) for _path, owner in runs()
             if owner.get("topology") == topology_name and owner.get("run_dir")]
    if len(found) != 1:
        raise LabError(f"{len(found) or 'no'} runs of topology {topology_name} are recorded under {RUN_DIR}")
    return found[0]


def runs() -> list[tuple[Path, dict]]:
    """Every recorded run: (its state file, the record; {} when the file is damaged)."""
    found = []
    for path in sorted(RUN_DIR.glob("*.state.json")) if RUN_DIR.exists() else []:
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            found.append((path, {}))
    return found


@contextmanager
def _locked() -> Iterator[None]:
    """Runs claim, and clean, one at a time (an flock on RUN_DIR itself: no file of its own)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(RUN_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


def run_of_process(pid: int) -> str | None:
    """The run directory of the lab run that started the process; None for any other process."""
    return _lab_run_of(pid, _cmdline(pid))


def _lab_run_of(pid: int, argv: list[str]) -> str | None:
    run = _run_of(pid)
    if run is None and ROLED in argv:
        spec = argv[argv.index(ROLED) + 1] if argv.index(ROLED) + 1 < len(argv) else ""
        if spec and argv[argv.index(ROLED) - 1] == "-m" and _under(spec, RUN_DIR):
            run = str(Path(spec).resolve().parent)
    return str(Path(run)) if run is not None and _under(run, RUN_DIR) else None


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
        run = _lab_run_of(pid, argv)
        if run is None or (runs is not None and run not in runs):
            continue
        shell = next((a for a in argv if a.startswith("mininet:")), None)
        found[pid] = f"shell {shell[len('mininet:'):]}" if shell else " ".join(argv)[:120]
    return found


def _our_processes() -> list[int]:
    """Lab processes other than Mininet's shells (kept for tests/bench.py)."""
    return sorted(pid for pid, what in lab_processes().items() if not what.startswith("shell "))


# -- links in the host's namespace -------------------------------------------------------------------
def lab_links() -> list[str]:
    """Links in the host's own namespace named like the lab's (bridges sqlab<N><run> and their ports)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(BRIDGE_PREFIX)]


def _our_bridges() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(BRIDGE_PREFIX)]


def _ports(bridge: str) -> re.Pattern | None:
    """The names of a bridge's ports: sqlab<N>p<M><run> (older runs: sqlab<N>-eth<M><run>) for bridge sqlab<N><run>."""
    match = _BRIDGE.match(bridge)
    if not match:
        return None
    port = _PORT if match[2] else r"-eth\d+"  # runs without an id predate p<M>: sqlab1p23 is run p23's bridge
    return re.compile(rf"^{BRIDGE_PREFIX}{match[1]}{port}{match[2]}$")


def _recorded_links(owner: dict, existing: list[str]) -> list[str]:
    """The links a run recorded, plus the ports of its recorded bridges."""
    bridges = owner.get("bridges", [])
    wanted = set(owner.get("interfaces", [])) | set(bridges)
    patterns = [p for p in map(_ports, bridges) if p is not None]
    return [n for n in existing if n in wanted or any(p.match(n) for p in patterns)]


def _id_of(link: str) -> str | None:
    """The run id a lab link's name carries (None for an older run's name)."""
    match = re.match(rf"^{BRIDGE_PREFIX}\d+{_PORT}?([a-z][a-z0-9]{{2}})$", link)
    return match[1] if match else None


# -- the record ---------------------------------------------------------------------------------------
def claim(topology: Topology, interfaces: Callable[[str], list[str]]) -> tuple[str, list[str]]:
    """A new run of the topology: its id and the links it will create (`interfaces(id)`), recorded.

    Other live runs are no obstacle; a dead run's state, or lab links in the host's namespace that no
    live run recorded, are refused (one line naming `safeq-lab clean`).
    """
    with _locked():
        live, used = [], set()
        for path, owner in runs():
            used.add(path.name.split("-", 1)[0])
            if not owner:
                raise LabError(f"{path} is damaged: run `safeq-lab clean`")
            if not _owner_alive(owner):
                raise LabError(f"a killed run left lab state behind (topology {owner.get('topology')}): "
                               "run `safeq-lab clean`")
            live.append(owner)
        existing = lab_links()
        theirs = {n for owner in live for n in _recorded_links(owner, existing)}
        leftover = [n for n in existing if n not in theirs]
        if leftover:
            shown = ", ".join(sorted(leftover)[:6]) + (", ..." if len(leftover) > 6 else "")
            raise LabError(f"lab links no running lab recorded exist in the host's namespace ({shown}): "
                           "run `safeq-lab clean` (a killed lab's links can take a while to go)")
        used |= {i for i in map(_id_of, existing) if i} | {p.name.split("-", 1)[0] for p in RUN_DIR.iterdir()}
        run_id = _new_id(used)
        names = interfaces(run_id)
        record(topology, run_id, processes=[], interfaces=names, note="claimed")
    return run_id, names


def _new_id(used: set[str]) -> str:
    rng = random.SystemRandom()
    while True:
        run_id = rng.choice(_ID_FIRST) + "".join(rng.choice(_ID_REST) for _ in range(2))
        if run_id not in used:
            assert RUN_ID.match(run_id)
            return run_id


def record(topology: Topology, run_id: str, processes: list[Process], interfaces: list[str],
           note: str = "running") -> None:
    path = _state_file(run_name(run_id, topology.name))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "pid": os.getpid(), "start": start_time(os.getpid()), "topology": topology.name, "run": run_id,
        "note": note, "run_dir": str(run_dir(topology.name, run_id)), "bridges": topology.run_bridges(run_id),
        "interfaces": interfaces, "firewalls": [fw.name for fw in topology.firewalls],
        "processes": [list(p) for p in processes], "time": time.time(),
    }))
    tmp.replace(path)  # a kill never leaves half a state file


def release(topology: Topology, run_id: str) -> None:
    _state_file(run_name(run_id, topology.name)).unlink(missing_ok=True)


def owner_alive(owner: dict) -> bool:
    """The process that recorded the run still runs (the very one, not a process reusing its pid)."""
    return _owner_alive(owner)


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
    that run's SAFEQ_LAB_RUN), links by their recorded names. Live runs are left alone, unless
    `force`: then they are stopped too.
    """
    if os.geteuid() != 0:
        raise LabError("cleaning lab leftovers needs root: run it with sudo")
    if not RUN_DIR.exists():
        return []
    with _locked():
        return _clean(force)


def _clean(force: bool) -> list[str]:
    removed: list[str] = []
    dead = [(path, owner) for path, owner in runs()
            if force or owner.get("pid") == os.getpid() or not _owner_alive(owner)]
    existing = lab_links()
    for path, owner in dead:
        directory = Path(owner.get("run_dir") or RUN_DIR / path.name.removesuffix(".state.json"))
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
        elif child.name.endswith(".state.tmp") and not _live(_state_file(child.name.removesuffix(".state.tmp"))):
            child.unlink(missing_ok=True)  # half a record of a dead run (a live one is rewriting its own)
    return removed


def _live(path: Path) -> bool:
    try:
        return _owner_alive(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False
