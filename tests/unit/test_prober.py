"""prober: concurrency and ordering on a MemoryReactorClock, and the
stdin/stdout contract of ``python -m emulator.prober`` in a subprocess."""

from __future__ import annotations

import gc
import json
import socket
import weakref

import pytest
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock

from emulator import prober, protocols
from emulator.protocols import framed, icmp
from emulator.protocols.base import ProbeResult, ProbeTarget
from tests.support import fired, run_prober

BLACKHOLE = '192.0.2.1'  # TEST-NET-1: never routed, so connects would hang


def blackholed(count: int, timeout: float = 2.0, **overrides) -> list[ProbeTarget]:
    return [ProbeTarget(id=f'p{i}', host=BLACKHOLE, transport='tcp', protocol='safeq',
                        port=6000 + i, timeout=timeout, **overrides) for i in range(count)]


# --- run_probes on a clock ------------------------------------------------------

def no_timer_but_the_heap_return(clock) -> bool:
    """No probe left a timer behind: the one pending call is the heap's return, which then goes too."""
    calls = clock.getDelayedCalls()
    if [call.func for call in calls] != [prober.return_freed_memory]:
        return False
    clock.advance(prober.QUIET_BEFORE_RETURN)
    return clock.getDelayedCalls() == []


def test_blackholed_probes_run_concurrently():
    clock = MemoryReactorClock()
    d = prober.run_probes(clock, blackholed(50, timeout=2.0), concurrency=256)
    assert len(clock.tcpClients) == 50  # all in flight at once
    clock.advance(2.0)  # one timeout, not 50 of them
    results = fired(d)
    assert [r.id for r in results] == [f'p{i}' for i in range(50)]
    assert {(r.outcome, r.elapsed) for r in results} == {('timeout', 2.0)}
    assert no_timer_but_the_heap_return(clock)


def test_concurrency_limit_batches_probes():
    clock = MemoryReactorClock()
    d = prober.run_probes(clock, blackholed(50, timeout=2.0), concurrency=10)
    assert len(clock.tcpClients) == 10
    for batch in range(1, 5):
        clock.advance(2.0)
        assert not d.called
        assert len(clock.tcpClients) == 10 * (batch + 1)
    clock.advance(2.0)
    results = fired(d)
    assert clock.seconds() == 10.0 and len(results) == 50
    assert no_timer_but_the_heap_return(clock)


def test_results_keep_input_order_not_completion_order():
    clock = MemoryReactorClock()
    targets = [ProbeTarget(id=name, host=BLACKHOLE, transport='tcp', protocol='safeq',
                           port=6010, timeout=t) for name, t in (('slow', 3.0), ('fast', 1.0))]
    d = prober.run_probes(clock, targets)
    clock.advance(1.0)
    assert not d.called
    clock.advance(2.0)
    assert [(r.id, r.elapsed) for r in fired(d)] == [('slow', 3.0), ('fast', 1.0)]


def test_the_end_of_a_run_frees_the_probes_reference_cycles(monkeypatch):
    # a probe's client, factory and connector form cycles holding the document it sent
    class Client:
        pass

    left = []

    def probe_in_a_cycle(reactor, target):
        client = Client()
        client.me = client
        left.append(weakref.ref(client))
        return succeed(ProbeResult(id=target.id, outcome='open', elapsed=0.0))

    monkeypatch.setattr(framed, 'probe', probe_in_a_cycle)
    collecting = gc.isenabled()
    gc.disable()   # the collector's own pace: it may not have run for a long while
    clock = MemoryReactorClock()
    try:
        fired(prober.run_probes(clock, blackholed(3)))
        assert [ref() for ref in left] != [None] * 3   # not at once: more runs may be coming
        clock.advance(prober.QUIET_BEFORE_RETURN)
    finally:
        if collecting:
            gc.enable()
    assert len(left) == 3 and [ref() for ref in left] == [None] * 3


def test_runs_that_follow_each_other_return_the_heap_once(monkeypatch):
    # an audit hands a daemon hundreds of jobs in a row: one collection of its heap, not one per job
    returns = []
    monkeypatch.setattr(prober, 'return_freed_memory', lambda: returns.append(clock.seconds()))
    monkeypatch.setattr(framed, 'probe', lambda reactor, target: succeed(
        ProbeResult(id=target.id, outcome='open', elapsed=0.0)))
    clock = MemoryReactorClock()
    for _ in range(3):
        fired(prober.run_probes(clock, blackholed(2)))
        clock.advance(prober.QUIET_BEFORE_RETURN / 2)
    assert returns == []
    clock.advance(prober.QUIET_BEFORE_RETURN / 2)
    assert len(returns) == 1 and clock.getDelayedCalls() == []


def test_a_crashing_probe_still_yields_its_result(monkeypatch):
    def crash(reactor, target):
        raise RuntimeError('bug')

    monkeypatch.setattr(framed, 'probe', crash)
    clock = MemoryReactorClock()
    [result] = fired(prober.run_probes(clock, blackholed(1)))
    assert result.outcome == 'error' and 'bug' in result.detail


def test_icmp_without_ping_names_the_package(monkeypatch):
    monkeypatch.setattr(icmp.shutil, 'which', lambda name: None)
    target = ProbeTarget(id='ping', host='127.0.0.1', transport='icmp', protocol='icmp')
    [result] = fired(prober.run_probes(MemoryReactorClock(), [target]))
    assert result.outcome == 'error' and 'iputils-ping' in result.detail


@pytest.mark.parametrize('code, outcome', [(0, 'ok'), (1, 'timeout'), (2, 'error')])
def test_icmp_maps_ping_exit_codes(monkeypatch, code, outcome):
    calls = []

    def fake_ping(executable, args, env, reactor):
        calls.append((executable, args))
        return succeed((b'', b'ping: sendmsg: Operation not permitted\n', code))

    monkeypatch.setattr(icmp.shutil, 'which', lambda name: '/usr/bin/ping')
    monkeypatch.setattr(icmp, 'getProcessOutputAndValue', fake_ping)
    target = ProbeTarget(id='ping', host='198.18.0.2', transport='icmp', protocol='icmp',
                         timeout=1.5)
    [result] = fired(prober.run_probes(MemoryReactorClock(), [target]))
    assert result.outcome == outcome
    assert calls == [('/usr/bin/ping', ('-n', '-c', '1', '-W', '2', '198.18.0.2'))]


def test_icmp_probe_needs_icmp_transport():
    target = ProbeTarget(id='x', host='127.0.0.1', transport='tcp', protocol='icmp', port=7)
    result = fired(protocols.probe(MemoryReactorClock(), target))
    assert result.outcome == 'error' and 'transport' in result.detail


def test_run_probes_rejects_zero_concurrency():
    with pytest.raises(ValueError):
        prober.run_probes(MemoryReactorClock(), [], concurrency=0)


# --- parsing ----------------------------------------------------------------------

def test_parse_targets_round_trip():
    target = ProbeTarget(id='a', host='198.18.0.2', transport='udp', protocol='spm',
                         port=64099, timeout=1.5, size=64)
    assert prober.parse_targets(json.dumps([target.to_dict()])) == [target]
    icmp_only = prober.parse_targets('[{"id": "b", "host": "198.18.0.2", "transport": "icmp", '
                                     '"protocol": "icmp"}]')
    assert icmp_only[0].port is None and icmp_only[0].timeout == 2.0


@pytest.mark.parametrize('text, message', [
    ('not json', 'not JSON'),
    ('{"id": "a"}', 'JSON list'),
    ('[42]', 'target 0'),
    ('[{"id": "a", "host": "198.18.0.2", "transport": "tcp", "protocol": "x"}]', 'port'),
    ('[{"id": "a", "host": "printer.local", "transport": "tcp", "protocol": "x", "port": 1}]',
     'IPv4'),
    ('[{"id": "a", "host": "198.18.0.2", "transport": "sctp", "protocol": "x", "port": 1}]',
     'transport'),
    ('[{"id": "a", "host": "198.18.0.2", "transport": "tcp", "protocol": "x", "port": 1, '
     '"timeout": 0}]', 'timeout'),
    ('[{"id": "a", "host": "198.18.0.2", "transport": "tcp", "protocol": "x", "port": 1, '
     '"sise": 10}]', 'sise'),
])
def test_parse_targets_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        prober.parse_targets(text)


def test_result_round_trip():
    result = ProbeResult(id='a', outcome='ok', elapsed=0.5, exchange='e', peer_seen='198.18.0.9')
    assert ProbeResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


# --- python -m emulator.prober -----------------------------------------------------

@pytest.mark.parametrize('stdin, args', [
    ('{"broken": ', ()),
    ('[{"id": "a"}]', ()),
    ('[]', ('--concurrency', '0')),
])
def test_main_rejects_bad_input_with_one_line(stdin, args):
    proc = run_prober(stdin, *args)
    assert proc.returncode == 2
    assert proc.stdout == ''
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr


def test_main_probes_and_keeps_order():
    def closed(kind):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(('127.0.0.1', 0))
            return s.getsockname()[1]

    targets = [
        {'id': 'tcp-closed', 'host': '127.0.0.1', 'transport': 'tcp', 'protocol': 'safeq',
         'port': closed(socket.SOCK_STREAM)},
        {'id': 'udp-closed', 'host': '127.0.0.1', 'transport': 'udp', 'protocol': 'safeq',
         'port': closed(socket.SOCK_DGRAM), 'timeout': 1.0},
    ]
    proc = run_prober(json.dumps(targets))
    assert proc.returncode == 0, proc.stderr
    results = [ProbeResult.from_dict(r) for r in json.loads(proc.stdout)]
    assert [r.id for r in results] == ['tcp-closed', 'udp-closed']
    assert results[0].outcome == 'refused'
    # ICMP port unreachable on loopback is not rate-limited, so 'refused';
    # 'timeout' only if the sandbox drops the ICMP error.
    assert results[1].outcome in ('refused', 'timeout')


def test_a_probe_that_never_settles_is_an_error_row_not_a_hang(monkeypatch):
    from twisted.internet.defer import Deferred

    clock = MemoryReactorClock()
    monkeypatch.setattr(framed, 'probe', lambda reactor, target: Deferred())   # a bug: never fires
    target = blackholed(1, timeout=2.0)[0]
    d = protocols.probe(clock, target)
    clock.advance(2.0 * protocols.OVERDUE_FACTOR + protocols.OVERDUE_GRACE)
    result = fired(d)
    assert (result.id, result.outcome) == ('p0', 'error') and 'never settled' in result.detail
    assert clock.getDelayedCalls() == []
