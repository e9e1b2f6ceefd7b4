"""Zygote: one process imports every protocol once, then forks each lab host's role daemon.

A role daemon started as its own interpreter costs about 57 MiB and a fifth of a CPU second to
import Twisted, pysnmp, ldaptor, pyftpdlib and the lab's protocol modules. The zygote pays that
once: it imports them all, freezes what it built out of the garbage collector's reach
(`gc.freeze`, so a collection in a child does not touch, and copy, the shared pages), and forks
one child per host. The child enters the host's network namespace (`setns`), then runs
`emulator.roled` exactly as a separate process would; the reactor is only imported after the
fork, so no child shares an epoll descriptor with another.

A child may serve several hosts (emulator.netns): it enters the first host's namespace, then
makes each host's sockets inside that host's own (`roled.serve`).

Wire protocol, one line each way (stdin: JSON jobs; stdout: events, each written with a single
`write`, so children sharing the pipe never interleave):

    stdin   {"hosts": [{"host": "mfd-0001", "netns": <pid of a process in the host's namespace, 0: stay>,
                        "spec": "/run/.../mfd-0001.json"}, ...],
             "stderr": "/run/.../mfd-0001.stderr"}          one child for all these hosts
    stdout  READY - zygote          once everything is imported
            SPAWNED <host> <pid>    the child serving it exists
            READY <host> <n>        its n listeners are bound (roled's handshake)
            ERROR <host> <reason>   it could not start (a bad job, namespace or spec)
            EXITED <host> <status> <pid>  reaped (status as subprocess gives it, negative: killed by
                                    signal), or the host alone stopped by its job server (status 0)

End of stdin (the lab finished, or was killed) makes the zygote stop its children and exit.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

# Modules daemons import on first use: imported once here, or every daemon compiles them again.
# Never twisted.internet.reactor (nor ldaptor.inmemory, which imports it): one epoll per child.
PRELOADED = ("twisted.internet.epollreactor", "twisted.internet.tcp", "twisted.internet.udp",
             "twisted.internet.unix", "twisted.internet.ssl", "twisted.internet._sslverify",
             "twisted.internet.endpoints", "twisted.internet.threads", "twisted.python.threadpool",
             "twisted.web.client", "twisted.web.http_headers", "twisted.web.pages",
             "service_identity", "service_identity.exceptions",
             # what the LDAP, mail and TLS-name code pulls in on first use (measured: none of these
             # imports the reactor), so the daemons needing them start as fast as the others
             "encodings.idna", "stringprep", "email.generator", "pyparsing", "passlib.hash",
             "ldaptor.ldapfilter", "ldaptor.entry", "ldaptor.protocols.ldap.ldifprotocol",
             "twisted.mail._pop3client")
# glibc gives threads that allocate arenas of their own and keeps them: a daemon's FTP probes run in
# threads moving MiB-sized documents (two arenas saved ~3 MiB per MFD daemon over an audit).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2"}
STOP_WAIT = 5.0  # seconds children get to stop after SIGTERM before SIGKILL
FIRST_JOB_GRACE = 0.1  # seconds a ready zygote waits for jobs before it builds spares
ZYGOTE = "zygote"


# -- the zygote ------------------------------------------------------------------------------------
def _write(line: str) -> None:
    os.write(1, (" ".join(line.split("\n")) + "\n").encode(errors="replace"))


OOM_SCORE_ADJ = 1000  # the most a process may ask: the kernel's OOM killer takes it before any other


def _first_to_go_when_memory_runs_out() -> None:
    """Make this daemon the OOM killer's first choice. A lab too big for the machine then loses a
    daemon (its host's checks become lab faults) instead of the lab's own process, which alone can
    tear the lab down; a process may always raise its own score."""
    try:
        with open("/proc/self/oom_score_adj", "w") as score:
            score.write(str(OOM_SCORE_ADJ))
    except OSError:  # no procfs: the kernel's own choice stands
        pass


def _parse_job(line: str) -> dict:
    job = json.loads(line)
    if not isinstance(job, dict) or not isinstance(job.get("hosts"), list) or not job["hosts"]:
        raise ValueError("a job has hosts: a non-empty list")
    for member in job["hosts"]:
        if not isinstance(member, dict) or not isinstance(member.get("host"), str) \
                or not member["host"].isprintable() or " " in member["host"] or not member["host"]:
            raise ValueError("each of a job's hosts needs a host name without spaces")
        if not isinstance(member.get("netns"), int) or isinstance(member["netns"], bool) or member["netns"] < 0:
            raise ValueError("netns must be the pid of a process in the host's namespace (0: the zygote's own)")
        if not isinstance(member.get("spec"), str) or not member["spec"]:
            raise ValueError("spec must be a path")
    if not isinstance(job.get("stderr"), str) or not job["stderr"]:
        raise ValueError("stderr must be a path")
    return job


def _hosts(job: dict) -> list[str]:
    return [member["host"] for member in job["hosts"]]


def _child(job: dict) -> None:
    """Become the role daemon of `job`'s hosts; never returns."""
    from emulator import netns, roled

    status = roled.EXIT_SPEC
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()  # the terminal's Ctrl-C is the lab's to handle, not its daemons'
        _first_to_go_when_memory_runs_out()
        stderr = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(stderr, 2)
        os.close(stderr)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdout = sys.stderr  # fd 1 is the zygote's event pipe: only `say` writes there
        members = []
        for member in job["hosts"]:
            namespace = netns.open_namespace(member["netns"]) if member["netns"] else None
            members.append(roled.Member(member["spec"], _teller(member["host"]), namespace))
        if members[0].namespace is not None:
            # the process's home: never the zygote's (the machine's) namespace, whatever makes a socket
            netns.enter(members[0].namespace)
        status = roled.serve(members)
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the lab must hear of it, then we exit
        traceback.print_exc()
        for host in _hosts(job):
            _write(f"ERROR {host} {exc.__class__.__name__}: {exc}")
        status = status or 1
    finally:
        sys.stderr.flush()
        os._exit(status)


def _teller(host: str):
    """roled's handshake line, said for `host` on the event pipe."""
    def say(line: str) -> None:
        word, _, rest = line.partition(" ")
        _write(f"{word} {host} {rest}")
    return say


# Names the interpreter itself defines (in the python binary's data, a page every child writes anyway)
# and every class has: looked up last, they fill the method cache.
_PARKED_NAMES = ("__init__", "__new__", "__eq__", "__hash__")


def park_method_cache() -> None:
    """Leave the interpreter's method cache (4096 entries, each holding a reference to the attribute
    name it cached) holding only the interpreter's own names.

    A child replacing an entry drops the reference to the old name: were it one of the zygote's
    strings, that write would copy the string's shared page, for thousands of names per daemon.
    Looking the names up on every class fills the cache with them (`sys._clear_type_cache` would
    too, but it also invalidates every class's version tag, so each child would re-tag, and copy,
    the classes it uses)."""
    classes, todo = {object}, [object]
    while todo:
        for subclass in type.__subclasses__(todo.pop()):
            if subclass not in classes:
                classes.add(subclass)
                todo.append(subclass)
    for cls in classes:
        for name in _PARKED_NAMES:
            try:
                getattr(cls, name, None)
            except Exception:  # noqa: BLE001 - a metaclass's own lookup failing costs one cache entry, nothing more
                pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def fill_allocator_holes() -> int:
    """Take every free block the zygote's allocators hold between live objects, for good; the bytes taken.

    A child reuses such a hole for its first allocations of that size, and its write copies the whole
    shared page around it: a few thousand scattered holes (pymalloc pools, glibc heap chunks) cost each
    daemon MiB of copied pages. Taken here once (under 1 MiB, shared), children allocate into pages
    of their own, densely."""
    return _fill_pymalloc_holes() + _fill_glibc_holes()


def _fill_pymalloc_holes() -> int:
    # pymalloc says how many blocks each size class has free only through its debug statistics
    # (printed on fd 2): used pools' free blocks, one line per size class.
    taken = 0
    malloc = ctypes.pythonapi.PyObject_Malloc
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    for _pass in range(2):  # the first pass's own objects (ints, the text parsed) leave a few
        free = [(size, count) for size, count in _pymalloc_free_blocks() if count]
        for size, count in free:
            for _ in range(count):
                malloc(size)
            taken += size * count
    return taken


def _pymalloc_free_blocks() -> list[tuple[int, int]]:
    """(block size, free blocks in used pools) per size class, from sys._debugmallocstats()."""
    import tempfile
    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 5 and all(f.isdigit() for f in fields):  # class size pools in-use available
            rows.append((int(fields[1]), int(fields[4])))
    return rows


def _fill_glibc_holes() -> int:
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
    except (AttributeError, OSError):  # not glibc (or older than 2.33): nothing to fill this way
        return 0
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    free = libc.mallinfo2().fordblks  # nothing can be taken beyond what is free now
    taken, size = 0, 64 * 1024
    while size >= 16:
        while taken < free:  # take chunks of `size` until malloc has to cut one from the heap's top
            before = libc.mallinfo2()
            block = libc.malloc(size)
            after = libc.mallinfo2()
            if (after.keepcost, after.arena, after.hblks) != (before.keepcost, before.arena, before.hblks):
                libc.free(block)
                break
            taken += size
        size //= 2
    return taken


class _JobLines:
    """Lines of a descriptor, with a non-blocking `pending()` (select alone misses lines already read)."""

    def __init__(self, fd: int) -> None:
        self.fd, self._buffer, self._ended = fd, b"", False

    def pending(self, wait: float) -> bool:
        return b"\n" in self._buffer or self._ended or bool(select.select([self.fd], [], [], wait)[0])

    def readline(self) -> str | None:
        """The next line (without its end), None at end of input."""
        while b"\n" not in self._buffer and not self._ended:
            chunk = os.read(self.fd, 65536)
            self._buffer += chunk
            self._ended = not chunk
        if b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
        elif self._buffer:
            line, self._buffer = self._buffer, b""
        else:
            return None
        return line.decode(errors="replace")


def _status(wait_status: int) -> int:
    return -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)


def serve() -> int:
    from emulator import protocols, roled  # noqa: F401 - imported here once, for every child

    protocols.warm()
    for module in PRELOADED:
        importlib.import_module(module)
    children: dict[int, list[str]] = {}

    def reap(*_args) -> None:
        while children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            _exited(children.pop(pid, ["?"]), wait_status, pid)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the lab stops us (end of stdin), never the terminal
    signal.signal(signal.SIGCHLD, reap)
    gc.collect()
    gc.freeze()
    park_method_cache()
    fill_allocator_holes()
    _write(f"READY - {ZYGOTE}")
    jobs = _JobLines(sys.stdin.fileno())
    # Until the first job comes (a fleet's network takes seconds to build), build what a daemon serving
    # many hosts takes per host (SNMP engines), once, for every child to copy. A lab already waiting
    # for us sends its jobs at once: then nothing is built, and nothing delays them.
    if not jobs.pending(FIRST_JOB_GRACE):
        while not jobs.pending(0.0) and protocols.prepare_more():
            gc.freeze()
    while (line := jobs.readline()) is not None:
        try:
            job = _parse_job(line)
        except ValueError as exc:
            _write(f"ERROR - bad job: {exc}")
            continue
        # a child that dies at once must not be reaped before it is known
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
        try:
            pid = os.fork()
            if pid == 0:
                _child(job)
            children[pid] = _hosts(job)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        for host in _hosts(job):
            _write(f"SPAWNED {host} {pid}")
    _stop(children, reap)
    return 0


def _exited(hosts: list[str], wait_status: int, pid: int) -> None:
    for host in hosts:
        _write(f"EXITED {host} {_status(wait_status)} {pid}")


def _stop(children: dict[int, list[str]], reap) -> None:
    for pid in list(children):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while children and time.monotonic() < deadline:
        time.sleep(0.05)
        reap()
    for pid in list(children):
        _signal(pid, signal.SIGKILL)
    while children:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        _exited(children.pop(pid, ["?"]), wait_status, pid)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# -- the lab's side ---------------------------------------------------------------------------------
MAX_HOSTS_PER_DAEMON = 32
DAEMONS_PER_CPU = 2


def daemon_groups(hosts: list[str], cpus: int, most: int | None = None) -> list[list[str]]:
    """The hosts each role-daemon process serves: at least DAEMONS_PER_CPU processes per CPU (probes are
    CPU-bound), at most `most` (MAX_HOSTS_PER_DAEMON) hosts per process, dealt round robin so that busy
    servers, listed together, land in different processes."""
    most = most or MAX_HOSTS_PER_DAEMON
    count = min(len(hosts), max(DAEMONS_PER_CPU * cpus, -(-len(hosts) // most)))
    return [hosts[index::count] for index in range(count)] if hosts else []


@dataclass
class Daemon:
    """A host's role daemon as the zygote reports it."""
    host: str
    pid: int = 0
    said: str = ""  # its READY or ERROR line, once it said one
    returncode: int | None = None  # once reaped

    @property
    def started(self) -> bool:
        return bool(self.said) or self.returncode is not None


@dataclass
class Zygote:
    """The lab's handle on a zygote process: spawn daemons, watch them, stop them."""
    proc: subprocess.Popen
    daemons: dict[str, Daemon] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # ERROR lines about no particular host
    ready: bool = False
    closed: bool = False  # its stdout reached end of file: the zygote is gone

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="zygote-events", daemon=True).start()

    @classmethod
    def launch(cls, python: str, env: dict[str, str], stderr_path: str) -> "Zygote":
        """Start a zygote; it imports in the background (see `await_ready`)."""
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen([python, "-m", "emulator.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=stderr, env={**env, **MALLOC_ENV}, text=True, start_new_session=True)
        return cls(proc)

    def await_ready(self, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.ready or self.closed, timeout):
                raise TimeoutError(f"the zygote did not import the protocols within {timeout:.0f}s")
        if not self.ready:
            raise RuntimeError(f"the zygote exited with status {self.proc.wait()}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            event, _, rest = line.rstrip("\n").partition(" ")
            host, _, detail = rest.partition(" ")
            with self._changed:
                if event == "READY" and detail == ZYGOTE:
                    self.ready = True
                elif host == "-" or host not in self.daemons:
                    self.errors.append(f"{event} {rest}")
                elif event == "SPAWNED":
                    self.daemons[host].pid = int(detail)
                elif event in ("READY", "ERROR"):
                    self.daemons[host].said = self.daemons[host].said or f"{event} {detail}".strip()
                elif event == "EXITED":
                    status, _, pid = detail.partition(" ")
                    if int(pid or 0) in (0, self.daemons[host].pid):  # not an earlier process of a restarted host
                        self.daemons[host].returncode = int(status)
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def spawn(self, host: str, netns_pid: int, spec: str, stderr: str) -> None:
        """One daemon process for one host."""
        self.spawn_group([(host, netns_pid, spec)], stderr)

    def spawn_group(self, members: list[tuple[str, int, str]], stderr: str) -> None:
        """One daemon process serving several hosts: (host, pid in its namespace, spec path) each."""
        with self._changed:
            for host, _netns, _spec in members:
                self.daemons[host] = Daemon(host)
        hosts = [{"host": host, "netns": netns_pid, "spec": spec} for host, netns_pid, spec in members]
        self.proc.stdin.write(json.dumps({"hosts": hosts, "stderr": stderr}) + "\n")
        self.proc.stdin.flush()

    def await_started(self, hosts, timeout: float) -> list[str]:
        """Wait until every host's daemon said READY or ERROR, or exited; the hosts still silent."""
        hosts = list(hosts)
        with self._changed:
            self._changed.wait_for(lambda: self.closed or all(self.daemons[h].started for h in hosts), timeout)
            return [h for h in hosts if not self.daemons[h].started]

    def pids(self) -> list[int]:
        """The daemon processes running (one per group of hosts)."""
        with self._changed:
            return sorted({d.pid for d in self.daemons.values() if d.pid and d.returncode is None})

    def sharing(self, host: str) -> list[str]:
        """The other hosts still served by `host`'s daemon process."""
        with self._changed:
            pid = self.daemons[host].pid
            return [h for h, d in self.daemons.items()
                    if h != host and pid and d.pid == pid and d.returncode is None]

    def await_exited(self, host: str, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.closed or self.daemons[host].returncode is not None, timeout)

    def stop(self, hosts=None, timeout: float = STOP_WAIT) -> None:
        """SIGTERM the hosts' daemons (all by default) at once, SIGKILL what is left after `timeout`.
        A daemon serving several hosts stops with them all (a host alone: its job server's StopJob)."""
        with self._changed:
            chosen = [self.daemons[h] for h in (self.daemons if hosts is None else hosts)]
        for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            with self._changed:
                live = [d for d in chosen if d.pid and d.returncode is None]
            for pid in {d.pid for d in live}:
                _signal(pid, signum)
            with self._changed:
                if self._changed.wait_for(lambda: self.closed or all(d.returncode is not None for d in live), wait):
                    return

    def close(self, timeout: float = STOP_WAIT) -> None:
        """Stop every daemon, then the zygote itself (end of its stdin)."""
        if self.proc.poll() is None:
            self.stop(timeout=timeout)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        for pid in self.pids():
            _signal(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    sys.exit(serve())
