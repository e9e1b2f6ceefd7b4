"""HostReactor makes every socket, child process and pool call of one host inside that host's
namespace, and leaves the thread where it was. No root: `netns.enter` is replaced by a recorder
(the real setns is exercised by every lab test, whose hosts share daemon processes)."""
from __future__ import annotations

import threading

import pytest
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.testing import MemoryReactorClock

from emulator import netns

HOME, HOST_A, HOST_B = 101, 102, 103


@pytest.fixture
def entered(monkeypatch):
    """The namespace each thread is in, by thread name, as netns.enter moves it."""
    where: dict[str, int] = {}
    log: list[tuple[str, int]] = []

    def enter(fd: int) -> None:
        name = threading.current_thread().name
        log.append((name, fd))
        where[name] = fd
        netns._where.fd = fd

    monkeypatch.setattr(netns, "enter", enter)
    netns._where.fd = HOME
    yield where, log
    netns._where.__dict__.clear()


class Recording(MemoryReactorClock):
    """Records the namespace the calling thread is in at each socket-making call."""

    def __init__(self):
        super().__init__()
        self.made_in: list[tuple[str, int]] = []

    def listenTCP(self, *args, **kwargs):
        self.made_in.append(("listenTCP", netns._where.fd))
        return super().listenTCP(*args, **kwargs)

    def connectTCP(self, *args, **kwargs):
        self.made_in.append(("connectTCP", netns._where.fd))
        return super().connectTCP(*args, **kwargs)

    def listenUDP(self, *args, **kwargs):
        self.made_in.append(("listenUDP", netns._where.fd))

    def spawnProcess(self, *args, **kwargs):
        self.made_in.append(("spawnProcess", netns._where.fd))


def test_each_host_makes_its_sockets_inside_its_namespace_then_returns(entered):
    reactor = Recording()
    a, b = netns.HostReactor(reactor, HOST_A), netns.HostReactor(reactor, HOST_B)
    a.listenTCP(21, Factory())
    b.connectTCP("198.18.0.1", 21, ClientFactory())
    a.listenUDP(161, object())
    b.spawnProcess(None, "ping")
    assert reactor.made_in == [("listenTCP", HOST_A), ("connectTCP", HOST_B), ("listenUDP", HOST_A),
                               ("spawnProcess", HOST_B)]
    assert netns._where.fd == HOME  # every call came back home


def test_a_host_reactor_is_the_reactor_for_everything_else(entered):
    reactor = Recording()
    a = netns.HostReactor(reactor, HOST_A)
    assert IReactorTCP.providedBy(a) and IReactorTime.providedBy(a)  # endpoints check these
    a.callLater(5, lambda: None)
    assert len(reactor.getDelayedCalls()) == 1 and a.seconds() == reactor.seconds()
    reactor.advance(1)
    assert a.seconds() == 1  # state is read through, never kept


def test_nested_entries_come_back_in_order(entered):
    _where, log = entered
    with netns.inside(HOST_A):
        with netns.inside(HOST_B):
            assert netns._where.fd == HOST_B
        assert netns._where.fd == HOST_A
    assert netns._where.fd == HOME
    assert [fd for _name, fd in log] == [HOST_A, HOST_B, HOST_A, HOME]


def test_a_plain_reactor_makes_sockets_where_the_thread_is(entered):
    _where, log = entered
    with netns.made_in(Recording()):
        pass
    assert log == []


def test_pool_calls_run_inside_the_hosts_namespace(entered):
    where, _log = entered
    done = threading.Event()
    seen = []

    class Pool:
        def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
            def run():
                on_result(True, function(*args, **kwargs))
            threading.Thread(target=run, name="pool-worker").start()

    class Reactor(Recording):
        def getThreadPool(self):
            return Pool()

    a = netns.HostReactor(Reactor(), HOST_A)
    a.getThreadPool().callInThreadWithCallback(lambda ok, value: (seen.append(value), done.set()),
                                               lambda: where.get("pool-worker"))
    assert done.wait(5)
    assert seen == [HOST_A] and netns._where.fd == HOME  # the worker moved, not the caller
