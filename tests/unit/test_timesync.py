"""timesync (RFC 868 'time'): codec, UDP/TCP stub and probe."""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import (MemoryReactorClock, StringTransport,
                                      StringTransportWithDisconnection)
from twisted.python.failure import Failure

from emulator.protocols import timesync
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import fired, run_on_fresh_reactor

PERSONA = Persona(host='terminal-server-1', roles=('terminal-server',))
SERVER = IPv4Address('TCP', '198.18.0.3', 37)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)
NOW = 1_780_000_000.25          # a lab clock reading (2026)


def clock_at(seconds: float) -> MemoryReactorClock:
    clock = UDPMemoryReactor()
    clock.advance(seconds)
    return clock


class FakeUDPPort:
    def __init__(self, protocol, port: int) -> None:
        self.protocol, self.port = protocol, port
        self.written: list[tuple[bytes, object]] = []
        self.connected_to = None
        self.listening = True
        protocol.makeConnection(self)

    def connect(self, host, port):
        self.connected_to = (host, port)

    def write(self, datagram, addr=None):
        self.written.append((datagram, addr))

    def getHost(self):
        return IPv4Address('UDP', '198.18.0.3', self.port)

    def stopListening(self):
        if self.listening:
            self.listening = False
            self.protocol.doStop()


class UDPMemoryReactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.udp: list[FakeUDPPort] = []

    def listenUDP(self, port, protocol, interface='', maxPacketSize=8192):
        fake = FakeUDPPort(protocol, port or 50000)
        self.udp.append(fake)
        return fake


# --- codec --------------------------------------------------------------------

def test_encode_is_seconds_since_1900_big_endian():
    assert timesync.encode_time(0) == struct.pack('>I', 2208988800)
    assert timesync.encode_time(NOW) == struct.pack('>I', 1_780_000_000 + 2208988800)


def test_decode_round_trip_and_era_after_2036():
    assert timesync.decode_time(timesync.encode_time(NOW), NOW) == 1_780_000_000
    after_wrap = 2_100_000_000                 # year 2036, past the 32-bit rollover
    assert struct.unpack('>I', timesync.encode_time(after_wrap))[0] < 2208988800
    assert timesync.decode_time(timesync.encode_time(after_wrap), after_wrap) == after_wrap


@pytest.mark.parametrize('answer', [b'', b'abc', b'abcde'])
def test_decode_rejects_wrong_length(answer):
    with pytest.raises(ValueError, match='RFC 868 sends 4'):
        timesync.decode_time(answer, NOW)


# --- server -------------------------------------------------------------------------

def test_udp_server_answers_any_datagram_with_the_time():
    clock = clock_at(NOW)
    records: list[dict] = []
    timesync.listen(clock, Listener('udp', 37, 'time'), PERSONA, on_request=records.append)
    port = clock.udp[-1]
    for request in (b'', b'x' * 1000):
        port.protocol.datagramReceived(request, ('198.18.0.9', 40000))
    assert port.written == [(struct.pack('>I', 1_780_000_000 + 2208988800), ('198.18.0.9', 40000))] * 2
    assert records[0] == {'transport': 'udp', 'port': 37, 'peer': '198.18.0.9', 'op': 'time',
                          'answer': 1_780_000_000, 'request_bytes': 0}


def test_tcp_server_sends_the_time_and_closes():
    clock = clock_at(NOW)
    records: list[dict] = []
    timesync.listen(clock, Listener('tcp', 37, 'time'), PERSONA, on_request=records.append)
    proto = clock.tcpServers[-1][1].buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    proto.makeConnection(transport)
    assert transport.value() == timesync.encode_time(NOW) and transport.disconnecting
    proto.dataReceived(b'ignored')
    assert records[0]['peer'] == CLIENT.host and records[0]['transport'] == 'tcp'


def test_listen_refuses_tls():
    with pytest.raises(ValueError):
        timesync.listen(clock_at(0), Listener('tcp', 37, 'time', 'tls'), PERSONA)


# --- probe, in memory ------------------------------------------------------------------

def target(transport='udp', **overrides) -> ProbeTarget:
    fields = dict(id='t', host=SERVER.host, transport=transport, protocol='time', port=37,
                  timeout=2.0)
    fields.update(overrides)
    return ProbeTarget(**fields)


def udp_probe(**overrides):
    clock = clock_at(NOW)
    d = timesync.probe(clock, target(**overrides))
    port = clock.udp[-1]
    assert port.connected_to == (SERVER.host, 37) and port.written == [(b'', None)]
    return clock, d, port


@pytest.mark.parametrize('server_time, outcome', [
    (NOW, 'ok'), (NOW - 0.9, 'ok'), (NOW + 1.0, 'ok'),
    (NOW - 1.9, 'protocol_error'), (NOW + 1.9, 'protocol_error'),
    (NOW - 2.5, 'protocol_error'), (NOW + 5, 'protocol_error'), (NOW + 86400, 'protocol_error'),
])
def test_udp_probe_compares_clocks(server_time, outcome):
    clock, d, port = udp_probe()
    clock.advance(0.01)
    port.protocol.datagramReceived(timesync.encode_time(server_time), (SERVER.host, 37))
    result = fired(d)
    assert result.outcome == outcome, result
    assert not port.listening and clock.getDelayedCalls() == []


def test_udp_probe_tolerance_option():
    clock, d, port = udp_probe(options={'tolerance': 10})
    port.protocol.datagramReceived(timesync.encode_time(NOW + 5), (SERVER.host, 37))
    assert fired(d).outcome == 'ok'


def test_udp_probe_rejects_a_wrong_length_answer():
    _, d, port = udp_probe()
    port.protocol.datagramReceived(b'\x00' * 48, (SERVER.host, 37))   # e.g. an NTP packet
    result = fired(d)
    assert result.outcome == 'protocol_error' and '48 B' in result.detail


def test_udp_probe_timeout_and_refused():
    clock, d, port = udp_probe(timeout=1.0)
    clock.advance(1.0)
    assert fired(d).outcome == 'timeout' and not port.listening
    _, d, port = udp_probe()
    port.protocol.connectionRefused()
    assert fired(d).outcome == 'refused'


def test_tcp_probe_reads_four_bytes():
    clock = clock_at(NOW)
    d = timesync.probe(clock, target('tcp'))
    proto = clock.tcpClients[-1][2].buildProtocol(SERVER)
    transport = StringTransportWithDisconnection(hostAddress=CLIENT, peerAddress=SERVER)
    transport.protocol = proto
    proto.makeConnection(transport)
    assert transport.value() == b''
    answer = timesync.encode_time(NOW)
    proto.dataReceived(answer[:2])
    proto.dataReceived(answer[2:])
    assert fired(d).outcome == 'ok'


def test_tcp_probe_short_answer_is_a_protocol_error():
    clock = clock_at(NOW)
    d = timesync.probe(clock, target('tcp'))
    proto = clock.tcpClients[-1][2].buildProtocol(SERVER)
    transport = StringTransportWithDisconnection(hostAddress=CLIENT, peerAddress=SERVER)
    transport.protocol = proto
    proto.makeConnection(transport)
    proto.dataReceived(b'\x01\x02')
    proto.connectionLost(Failure(ConnectionDone()))
    result = fired(d)
    assert result.outcome == 'protocol_error' and '2 of 4 bytes' in result.detail


# --- loopback, real sockets -----------------------------------------------------

class SkewedClock:
    """The stub's reactor, but its clock is ``skew`` seconds off."""

    def __init__(self, reactor, skew: float) -> None:
        self._reactor, self._skew = reactor, skew

    def seconds(self) -> float:
        return self._reactor.seconds() + self._skew

    def __getattr__(self, name):
        return getattr(self._reactor, name)


@pytest.mark.parametrize('transport', ['udp', 'tcp'])
@pytest.mark.parametrize('skew, outcome', [(0.0, 'ok'), (-30.0, 'protocol_error')])
def test_loopback(transport, skew, outcome):
    records: list[dict] = []

    async def run(reactor):
        port = timesync.listen(SkewedClock(reactor, skew), Listener(transport, 0, 'time'), PERSONA,
                               on_request=records.append, interface='127.0.0.1')
        try:
            return await timesync.probe(reactor, target(transport, host='127.0.0.1',
                                                        port=port.getHost().port))
        finally:
            await deferLater(reactor, 0.01)
            await maybeDeferred(port.stopListening)

    result = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(run(r)))
    assert result.outcome == outcome, result
    assert records[0]['peer'] == '127.0.0.1' and records[0]['transport'] == transport


def test_loopback_udp_stub_survives_a_vanished_client():
    async def run(reactor):
        port = timesync.listen(reactor, Listener('udp', 0, 'time'), PERSONA, interface='127.0.0.1')
        number = port.getHost().port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.sendto(b'\xff' * 3000, ('127.0.0.1', number))
        await deferLater(reactor, 0.05)      # the reply bounces as ICMP port unreachable
        try:
            return await timesync.probe(reactor, target(host='127.0.0.1', port=number))
        finally:
            await maybeDeferred(port.stopListening)

    assert run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(run(r))).outcome == 'ok'


def test_loopback_udp_closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('127.0.0.1', 0))
        number = s.getsockname()[1]
    result = run_on_fresh_reactor(
        lambda r: timesync.probe(r, target(host='127.0.0.1', port=number, timeout=1.0)))
    assert result.outcome in ('refused', 'timeout'), result   # see test_framed's twin
