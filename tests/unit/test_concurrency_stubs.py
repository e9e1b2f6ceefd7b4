"""Load and growth (issue 9): every stub answers 500 concurrent probes with 500 ``ok`` results,
the request log of a role daemon is bounded, and every TCP stub limits what one connection holds.

All stubs listen on 127.0.0.1 on one fresh reactor in this process, as one role daemon would
serve them; for each protocol 500 probes go out at once through ``prober.run_probes`` on the same
reactor and every result must be ``ok`` (no SYN dropped by a short backlog, no document evicted
before its probe read it back, no UDP answer lost for good). ``pytest -s`` prints the time each
batch took.

FTP runs ``FTP_COUNT`` probes, not 500: its probe runs blocking ftplib in the reactor's thread
pool (64 threads in the prober and roled), so 500 probes are eight sequential rounds of full
login/STAT/upload sessions against a stub that serves from its own thread. 500 pass too, but take
about 10 s (a sixth of this test's budget) against about 2.5 s for 128; 128 still exceeds the pool
twice over, so the queueing is exercised.
"""
from __future__ import annotations

import json
import struct
import time

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

import roles as role_data
from emulator import pki, protocols, roled
from emulator.prober import run_probes
from emulator.protocols import framed, ftp, http, ldap, lpd, snmp
from emulator.protocols.base import Listener, Persona, ProbeTarget
from emulator.protocols.serving import IDLE_TIMEOUT
from tests.support import run_on_reactor

COUNT = 500
FTP_COUNT = 128
# Generous: probes and stubs share one CPU-bound reactor here (TLS both ends, 200 KiB WebDAV
# documents up and down); alone, 500 WebDAV-over-TLS probes take 6-9 s.
PROBE_TIMEOUT = 30.0
ROLES = ('terminal-server', 'spooler-controller', 'mfd', 'management', 'ldap-server',
         'payment-system', 'terminal-ultralight')

# (name, protocol, transport, security)
KINDS = [
    ('framed tcp', 'safeq', 'tcp', 'plain'),
    ('framed tls', 'safeq', 'tcp', 'tls'),
    ('framed udp', 'safeq', 'udp', 'plain'),
    ('terminal', 'terminal', 'tcp', 'plain'),
    ('terminal tls', 'terminal', 'tcp', 'tls'),
    ('discovery', 'discovery', 'udp', 'plain'),
    ('http', 'http', 'tcp', 'plain'),
    ('http tls', 'http', 'tcp', 'tls'),
    ('soap', 'soap', 'tcp', 'plain'),
    ('soap tls', 'soap', 'tcp', 'tls'),
    ('webdav', 'webdav', 'tcp', 'plain'),
    ('webdav tls', 'webdav', 'tcp', 'tls'),
    ('ipp', 'ipp', 'tcp', 'plain'),
    ('ipps', 'ipp', 'tcp', 'tls'),
    ('lpd', 'lpr', 'tcp', 'plain'),
    ('raw', 'raw', 'tcp', 'plain'),
    ('ldap', 'ldap', 'tcp', 'plain'),
    ('ldaps', 'ldap', 'tcp', 'tls'),
    ('snmp udp', 'snmp', 'udp', 'plain'),
    ('snmp tcp', 'snmp', 'tcp', 'plain'),
    ('time udp', 'time', 'udp', 'plain'),
    ('time tcp', 'time', 'tcp', 'plain'),
    ('ftp', 'ftp', 'tcp', 'plain'),
]


def test_every_stub_answers_500_concurrent_probes(fresh_reactor, tmp_path):
    # 500 client and 500 server sockets in one process exceed the common soft limit of 1024 fds.
    roled._raise_file_limit()
    material = pki.make_test_pki(tmp_path / 'pki', host='stub.lab', address='127.0.0.1')
    persona = Persona.from_dict({**material, 'host': 'stub', 'roles': list(ROLES), 'identity': role_data.identity(ROLES)})
    records: list[dict] = []
    timings: list[tuple[str, int, float, list]] = []

    @inlineCallbacks
    def run(reactor):
        reactor.suggestThreadPoolSize(64)
        protocols.preload()
        ports = []
        try:
            for name, protocol, transport, security in KINDS:
                listener = Listener(transport=transport, port=0, protocol=protocol, security=security)
                port = protocols.listen(reactor, listener, persona, on_request=records.append,
                                        interface='127.0.0.1')
                ports.append(port)
                count = FTP_COUNT if protocol == 'ftp' else COUNT
                targets = [ProbeTarget(id=f'{name}#{i}', host='127.0.0.1', transport=transport,
                                       protocol=protocol, port=port.getHost().port, security=security,
                                       timeout=PROBE_TIMEOUT, server_name='stub.lab',
                                       ca_file=material['ca_file'])
                           for i in range(count)]
                started = time.monotonic()
                results = yield run_probes(reactor, targets, concurrency=COUNT)
                elapsed = time.monotonic() - started
                bad = [(r.outcome, r.detail) for r in results if r.outcome != 'ok']
                timings.append((name, count, elapsed, bad))
        finally:
            for port in ports:
                yield port.stopListening()

    started = time.monotonic()
    # A guard against a hang, not a speed target (`tox -e bench` measures speed): 2 busy cores take ~50-90 s.
    run_on_reactor(fresh_reactor, run, limit=300.0)
    total = time.monotonic() - started
    table = '\n'.join(f'{name:<14} {count:>4} probes {elapsed:6.2f} s  {len(bad):>4} not ok'
                      for name, count, elapsed, bad in timings)
    print(f'\n{table}\ntotal {total:.1f} s')
    failures = [f'{name}: {len(bad)} of {count} not ok, e.g. {bad[:3]}'
                for name, count, _, bad in timings if bad]
    assert not failures, f'\n{table}\n' + '\n'.join(failures)
    assert len(timings) == len(KINDS)


# --- growth: the request log is bounded per (transport, port) ----------------------------------

def test_request_log_keeps_every_first_record_and_caps_the_rest(tmp_path):
    log = tmp_path / 'requests.jsonl'
    spec = roled.parse_spec({'host': 'ldap-1', 'roles': ['ldap-server'], 'log': str(log),
                             'listeners': [{'transport': 'tcp', 'port': 389, 'protocol': 'ldap'}]})
    append = roled.request_logger(Clock(), spec, max_per_port=3)
    for _ in range(10):
        append({'transport': 'tcp', 'port': 389, 'peer': '198.18.0.9', 'op': 'search'})
    append({'transport': 'tcp', 'port': 389, 'peer': '198.18.0.10', 'op': 'bind'})   # a new client: kept
    append({'transport': 'udp', 'port': 389, 'peer': '198.18.0.9', 'op': 'search'})  # another port: kept
    for _ in range(5):
        append({'transport': 'tcp', 'port': 389, 'peer': '198.18.0.10', 'op': 'search'})
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r['transport'], r.get('peer'), r.get('dropped', False)) for r in records] == [
        ('tcp', '198.18.0.9', False), ('tcp', '198.18.0.9', False), ('tcp', '198.18.0.9', False),
        ('tcp', None, True),
        ('tcp', '198.18.0.10', False),
        ('udp', '198.18.0.9', False)]
    assert records[3]['limit'] == 3 and records[3]['port'] == 389
    assert all(r['host'] == 'ldap-1' for r in records)


def test_request_log_stays_bounded_under_a_flood(tmp_path):
    log = tmp_path / 'requests.jsonl'
    spec = roled.parse_spec({'host': 'h', 'roles': [], 'log': str(log),
                             'listeners': [{'transport': 'tcp', 'port': 80, 'protocol': 'http'}]})
    append = roled.request_logger(Clock(), spec, max_per_port=50)
    for index in range(5000):
        append({'transport': 'tcp', 'port': 80, 'peer': f'198.18.0.{index % 4}', 'path': '/'})
    assert len(log.read_text().splitlines()) == 50 + 1


# --- limits per connection: no client holds a stub's connection or memory for ever ------------

# (protocol, an oversized request that must close the connection, or None when the stream is
# counted and never kept: raw print data is a PDL of any length, like a real JetDirect port)
PLAIN_TCP_STUBS = [
    ('safeq', struct.pack('!I', framed.MAX_FRAME + 1)),
    ('terminal', struct.pack('!I', framed.MAX_FRAME + 1)),
    ('http', b'GET /' + b'a' * (1 << 20) + b' HTTP/1.1\r\n'),
    ('ipp', b'POST /ipp/print HTTP/1.1\r\nContent-Length: %d\r\n\r\n' % (http.MAX_BODY + 1)),
    ('lpr', b'\x02' + b'q' * (lpd.MAX_LINE + 1) + b'\n'),
    ('raw', None),
    ('ldap', b'\x30\x84' + struct.pack('!I', ldap.MAX_MESSAGE + 1)),
    ('snmp', b'\x30\x84' + struct.pack('!I', snmp.MAX_MESSAGE + 1)),
]


def _connect(protocol: str, material: dict):
    reactor = MemoryReactorClock()
    persona = Persona.from_dict({**material, 'host': 'stub', 'roles': list(ROLES), 'identity': role_data.identity(ROLES)})
    protocols.listen(reactor, Listener(transport='tcp', port=4000, protocol=protocol), persona)
    factory = reactor.tcpServers[-1][1]
    peer = IPv4Address('TCP', '127.0.0.1', 40000)
    proto = factory.buildProtocol(peer)
    transport = StringTransport(hostAddress=IPv4Address('TCP', '127.0.0.1', 4000), peerAddress=peer)
    proto.makeConnection(transport)
    return reactor, proto, transport


@pytest.fixture(scope='module')
def material(tmp_path_factory):
    return pki.make_test_pki(tmp_path_factory.mktemp('pki'), host='stub.lab', address='127.0.0.1')


@pytest.mark.parametrize('protocol', [p for p, _ in PLAIN_TCP_STUBS])
def test_every_tcp_stub_drops_a_silent_connection(protocol, material):
    reactor, _, transport = _connect(protocol, material)
    reactor.advance(IDLE_TIMEOUT / 2)
    assert not transport.disconnecting, 'dropped a connection that was not idle long yet'
    reactor.advance(max(IDLE_TIMEOUT, ldap.IDLE_TIMEOUT, snmp.IDLE_TIMEOUT) + 1)
    assert transport.disconnecting or transport.disconnected


@pytest.mark.parametrize('protocol, oversized', [(p, o) for p, o in PLAIN_TCP_STUBS if o is not None])
def test_every_tcp_stub_refuses_an_oversized_request(protocol, oversized, material):
    _, proto, transport = _connect(protocol, material)
    proto.dataReceived(oversized)
    assert transport.disconnecting or transport.disconnected


def test_ftp_has_an_idle_timeout_and_a_command_size_limit():
    # pyftpdlib runs FTP in its own thread and ioloop: its handler drops a session silent for
    # ``timeout`` seconds and answers "500 Command too long." past 2048 buffered bytes (a
    # constant inside FTPHandler.collect_incoming_data, not a class attribute).
    handler = ftp._ScanHandler
    assert handler.timeout == ftp.IDLE_TIMEOUT
    sent = []
    session = handler.__new__(handler)
    session._in_buffer, session._in_buffer_len = [], 0
    session.respond_w_warning = sent.append
    session.collect_incoming_data(b'S' * 4096)
    assert sent == ['500 Command too long.'] and session._in_buffer_len == 0
