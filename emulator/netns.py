"""Network namespaces for a role daemon that serves several lab hosts in one process.

A socket belongs to the network namespace of the thread that created it, for its whole life: a
listener bound, or a probe's client socket made, while the thread is inside host A's namespace
serves, or speaks from, A's address, whatever the thread does next. So one process (one reactor)
can serve many hosts as long as every socket of a host is made inside that host's namespace:

- `HostReactor(reactor, fd)`: the reactor as one host sees it. Its listen*/connect* calls make their
  socket inside the host's namespace (Twisted creates it synchronously in those calls), its thread
  pool runs each call inside it (ftplib probes), its spawnProcess starts children inside it (ping).
  Stubs and probes are handed this reactor and never learn there is more than one host.
- `made_in(reactor)`: for the few sockets made by hand (knocks, the NetBIOS probe), the namespace
  of the host that reactor belongs to (none for a plain reactor: the process's own).

A thread started inside a host's namespace stays there (pyftpdlib's server thread: its passive
data sockets are that host's). setns costs about 2 us, so switching per socket is cheap.
"""
from __future__ import annotations

import ctypes
import inspect
import os
import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

from zope.interface import directlyProvides, providedBy

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_where = threading.local()  # .fd: the namespace fd this thread last entered through us


def open_namespace(pid: int) -> int:
    """A descriptor of the network namespace process `pid` is in (kept open: it pins the namespace)."""
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def enter(fd: int) -> None:
    """Move the calling thread (only it) into the namespace of `fd`."""
    # os.setns arrived in Python 3.12; Debian 12 has 3.11
    if getattr(_where, "fd", None) == fd:
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns into a host's network namespace: {os.strerror(errno)}")
    _where.fd = fd


@contextmanager
def inside(fd: int) -> Iterator[None]:
    """The calling thread inside `fd`'s namespace for the block, then back where it was."""
    before = getattr(_where, "fd", None)
    if before is None:  # not entered through us: remember where the thread is, to come back
        before = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        _where.fd = before
    enter(fd)
    try:
        yield
    finally:
        enter(before)


def in_namespace(fd: int, function: Callable) -> Callable:
    """`function`, run in the calling thread after it entered `fd`'s namespace (for pool threads)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        enter(fd)
        return function(*args, **kwargs)
    return run


def made_in(reactor) -> Any:
    """Context: the namespace whose sockets `reactor` makes (see the module docstring)."""
    fd = getattr(reactor, "namespace", None)
    return inside(fd) if fd is not None else nullcontext()


class _HostThreadPool:
    """A thread pool whose calls run inside one host's namespace (what deferToThreadPool uses)."""

    def __init__(self, pool, fd: int) -> None:
        self._pool, self._fd = pool, fd

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs) -> None:
        self._pool.callInThreadWithCallback(on_result, in_namespace(self._fd, function), *args, **kwargs)

    def callInThread(self, function, *args, **kwargs) -> None:
        self._pool.callInThread(in_namespace(self._fd, function), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def _made_inside(name: str) -> Callable:
    def make(self, *args: Any, **kwargs: Any) -> Any:
        with inside(self.namespace):
            return getattr(self._reactor, name)(*args, **kwargs)
    make.__name__ = name
    return make


class HostReactor:
    """The process's reactor, making every socket inside one host's namespace (module docstring)."""

    def __init__(self, reactor, fd: int) -> None:
        self._reactor = reactor
        self.namespace = fd
        directlyProvides(self, *providedBy(reactor))  # endpoints check IReactorTCP & co

    # spawnProcess too: a child process starts in the namespace of the thread that forks it (ping)
    for _name in ("listenTCP", "listenUDP", "listenSSL", "listenMulticast", "connectTCP", "connectSSL",
                  "spawnProcess"):
        locals()[_name] = _made_inside(_name)
    del _name

    def getThreadPool(self):
        return _HostThreadPool(self._reactor.getThreadPool(), self.namespace)

    def callInThread(self, function, *args, **kwargs) -> None:
        self._reactor.callInThread(in_namespace(self.namespace, function), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._reactor, name)
        if inspect.ismethod(value):  # kept: the next callLater & co skip this fallback (state, never)
            setattr(self, name, value)
        return value
