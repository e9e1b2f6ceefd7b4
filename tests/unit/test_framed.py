"""framed: codec, server stub and client probe.

In-memory tests drive the protocols over StringTransport with a
MemoryReactorClock, so timeouts are checked with clock.advance() instead of
real waiting. A few loopback tests run stub and probe on real sockets on
127.0.0.1, each on a fresh (non-global) reactor so tests stay independent.
"""

from __future__ import annotations

import errno
import socket
import struct
from functools import partial

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import (ConnectError, ConnectionDone, ConnectionRefusedError,
                                    NoRouteError)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import (MemoryReactorClock, StringTransport,
                                      StringTransportWithDisconnection)
from twisted.python.failure import Failure

from emulator import protocols
from emulator.protocols import framed
from emulator.protocols.serving import IDLE_TIMEOUT
from emulator.protocols.base import Listener, Persona, ProbeResult, ProbeTarget
from tests import support
from tests.support import fired, free_port

PERSONA = Persona(host='spooler-1', roles=('spooler_controller', 'fts'))
SERVER = IPv4Address('TCP', '198.18.0.2', 6010)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)


# --- helpers ------------------------------------------------------------------

def frame(payload: bytes) -> bytes:
    return struct.pack('>I', len(payload)) + payload


def unframe(data: bytes) -> list[bytes]:
    payloads = []
    while data:
        (length,) = struct.unpack('>I', data[:4])
        assert len(data) >= 4 + length, 'truncated frame'
        payloads.append(data[4:4 + length])
        data = data[4 + length:]
    return payloads


def tcp_server(reactor=None):
    reactor = reactor or MemoryReactorClock()
    records: list[dict] = []
    port = framed.listen(reactor, Listener('tcp', SERVER.port, 'safeq'), PERSONA,
                         on_request=records.append)
    assert port is not None
    factory = reactor.tcpServers[-1][1]
    proto = factory.buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    proto.makeConnection(transport)
    return reactor, proto, transport, records


class FakeUDPPort:
    """Just enough of udp.Port for the framed datagram protocols."""

    def __init__(self, protocol, port: int) -> None:
        self.protocol = protocol
        self.port = port
        self.written: list[tuple[bytes, object]] = []
        self.connected_to = None
        self.listening = True
        protocol.makeConnection(self)

    def connect(self, host, port):
        self.connected_to = (host, port)

    def write(self, datagram, addr=None):
        self.written.append((datagram, addr))

    def getHost(self):
        return IPv4Address('UDP', '198.18.0.2', self.port)

    def die(self):
        # What udp.Port.connectionLost does: the protocol stops once.
        if self.listening:
            self.listening = False
            self.protocol.doStop()

    def stopListening(self):
        self.die()


class UDPMemoryReactor(MemoryReactorClock):
    """MemoryReactorClock has no listenUDP; record calls like listenTCP does."""

    def __init__(self):
        super().__init__()
        self.udp_listens: list[tuple[int, object, str, int, FakeUDPPort]] = []

    def listenUDP(self, port, protocol, interface='', maxPacketSize=8192):
        fake = FakeUDPPort(protocol, port or 50000)
        self.udp_listens.append((port, protocol, interface, maxPacketSize, fake))
        return fake


def target(transport='tcp', **overrides) -> ProbeTarget:
    fields = dict(id='t1', host=SERVER.host, transport=transport, protocol='safeq',
                  port=SERVER.port, timeout=2.0, size=1024)
    fields.update(overrides)
    return ProbeTarget(**fields)


def start_tcp_probe(**overrides):
    clock = MemoryReactorClock()
    d = framed.probe(clock, target(**overrides))
    host, port, factory, _timeout, _bind = clock.tcpClients[-1]
    assert (host, port) == (SERVER.host, SERVER.port)
    return clock, d, factory


def connect_client(factory):
    proto = factory.buildProtocol(SERVER)
    transport = StringTransportWithDisconnection(hostAddress=CLIENT, peerAddress=SERVER)
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


# --- codec --------------------------------------------------------------------

def test_request_round_trip():
    payload = framed.encode_request('abc', b'\x00\n' * 5)
    assert payload.startswith(b'{"v":1,"op":"hello","nonce":"abc","size":10}\n')
    assert framed.decode_request(payload) == ('abc', b'\x00\n' * 5)


@pytest.mark.parametrize('payload, message', [
    (b'no newline', 'newline'),
    (b'{not json}\n', 'not JSON'),
    (b'[1]\n', 'not a JSON object'),
    (b'{"v":2,"op":"hello","nonce":"n","size":0}\n', 'version'),
    (b'{"v":1,"op":"bye","nonce":"n","size":0}\n', 'op'),
    (b'{"v":1,"op":"hello","size":0}\n', 'nonce'),
    (b'{"v":1,"op":"hello","nonce":"","size":0}\n', 'nonce'),
    (b'{"v":1,"op":"hello","nonce":"n"}\n', 'size'),
    (b'{"v":1,"op":"hello","nonce":"n","size":true}\n', 'size'),
    (b'{"v":1,"op":"hello","nonce":"n","size":3}\nab', 'body has 2 B'),
    (b'[' * 1000 + b']' * 1000 + b'\n', 'nested too deeply'),   # RecursionError in json, not a crash
])
def test_decode_request_rejects(payload, message):
    with pytest.raises(framed.FramedError, match=message):
        framed.decode_request(payload)


def test_udp_server_answers_deeply_nested_json_with_the_error_reply():
    sent = []

    class Transport:
        def getHost(self):
            return IPv4Address('UDP', '198.18.0.2', 6010)

        def write(self, data, addr):
            sent.append((data, addr))

    server = framed._HelloDatagramServer(PERSONA, None)
    server.transport = Transport()
    server.datagramReceived(b'[' * 1000 + b'\n', ('198.18.0.9', 5000))
    [(reply, addr)] = sent
    header, _ = framed.decode(reply)
    assert header['ok'] is False and 'nested too deeply' in header['error'] and addr == ('198.18.0.9', 5000)


def test_reply_is_capped_to_the_limit():
    body = bytes(range(256)) * 4
    reply = framed.encode_reply(PERSONA, 6010, '198.18.0.9', 'n', body, limit=600)
    assert len(reply) <= 600
    header, echoed = framed.decode(reply)
    assert 0 < header['size'] == len(echoed) < len(body)
    assert echoed == body[:len(echoed)]


def test_decode_reply_checks_nonce_and_body():
    body = b'x' * 10
    good = framed.encode_reply(PERSONA, 6010, '198.18.0.9', 'n1', body, limit=framed.MAX_FRAME)
    header, echoed = framed.decode_reply(good, 'n1', body)
    assert (header['host'], header['peer'], echoed) == ('spooler-1', '198.18.0.9', body)
    with pytest.raises(framed.FramedError, match='nonce mismatch'):
        framed.decode_reply(good, 'n2', body)
    with pytest.raises(framed.FramedError, match='altered'):
        framed.decode_reply(good, 'n1', b'y' * 10)
    with pytest.raises(framed.FramedError, match='rejected'):
        framed.decode_reply(framed.encode_error('bad'), 'n1', body)


# --- TCP server over StringTransport -------------------------------------------

def test_server_answers_hello_with_nonce_host_and_peer():
    _, proto, transport, records = tcp_server()
    proto.dataReceived(frame(framed.encode_request('nonce-1', b'B' * 100)))
    [reply] = unframe(transport.value())
    header, body = framed.decode(reply)
    assert header == {'v': 1, 'ok': True, 'nonce': 'nonce-1', 'host': 'spooler-1',
                      'roles': ['spooler_controller', 'fts'], 'port': SERVER.port,
                      'peer': CLIENT.host, 'size': 100}
    assert body == b'B' * 100
    assert records == [{'transport': 'tcp', 'port': SERVER.port, 'peer': CLIENT.host,
                        'nonce': 'nonce-1', 'size': 100}]
    assert not transport.disconnecting  # the connection may carry more requests


def test_server_handles_fragments_and_several_requests():
    _, proto, transport, records = tcp_server()
    data = frame(framed.encode_request('a', b'1' * 7)) + frame(framed.encode_request('b', b''))
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    nonces = [framed.decode(p)[0]['nonce'] for p in unframe(transport.value())]
    assert nonces == ['a', 'b']
    assert [r['nonce'] for r in records] == ['a', 'b']


def test_server_rejects_malformed_frame_and_closes():
    _, proto, transport, records = tcp_server()
    proto.dataReceived(frame(b'{"v":1,"op":"hello"\n') + frame(framed.encode_request('late', b'')))
    [reply] = unframe(transport.value())  # the frame behind the bad one is ignored
    header, body = framed.decode(reply)
    assert header['ok'] is False and 'not JSON' in header['error'] and body == b''
    assert transport.disconnecting
    assert records == []


def test_server_closes_on_oversized_length_prefix():
    _, proto, transport, records = tcp_server()
    proto.dataReceived(struct.pack('>I', framed.MAX_FRAME + 1) + b'x' * 10)
    proto.dataReceived(b'y' * 10)  # more of the same: no second error reply
    [reply] = unframe(transport.value())
    header, _ = framed.decode(reply)
    assert header['ok'] is False and 'exceeds' in header['error']
    assert transport.disconnecting
    assert records == []


def test_server_drops_idle_connection():
    clock, proto, transport, _ = tcp_server()
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    proto.dataReceived(b'\x00')  # any byte counts as activity
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnected  # aborted, not a graceful close
    proto.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_server_survives_a_failing_on_request():
    clock = MemoryReactorClock()

    def boom(record):
        raise RuntimeError('disk full')

    framed.listen(clock, Listener('tcp', SERVER.port, 'safeq'), PERSONA, on_request=boom)
    proto = clock.tcpServers[-1][1].buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    proto.makeConnection(transport)
    proto.dataReceived(frame(framed.encode_request('n', b'')))
    assert framed.decode(unframe(transport.value())[0])[0]['ok'] is True


def test_listen_passes_port_interface_and_backlog():
    clock = MemoryReactorClock()
    framed.listen(clock, Listener('tcp', 6020, 'safeq'), PERSONA, interface='198.18.0.2')
    port, _factory, backlog, interface = clock.tcpServers[-1]
    assert (port, backlog, interface) == (6020, framed.LISTEN_BACKLOG, '198.18.0.2')


# --- UDP server -----------------------------------------------------------------

def udp_server():
    reactor = UDPMemoryReactor()
    records: list[dict] = []
    framed.listen(reactor, Listener('udp', 64099, 'spm-discovery'), PERSONA,
                  on_request=records.append)
    port_number, _proto, _iface, max_packet, fake = reactor.udp_listens[-1]
    assert port_number == 64099 and max_packet > framed.MAX_DATAGRAM
    return fake, records


def test_udp_server_replies_to_sender():
    fake, records = udp_server()
    fake.protocol.datagramReceived(framed.encode_request('u1', b'D' * 300), ('198.18.0.9', 5555))
    [(reply, addr)] = fake.written
    header, body = framed.decode(reply)
    assert addr == ('198.18.0.9', 5555)
    assert (header['ok'], header['nonce'], header['peer'], header['port']) == \
        (True, 'u1', '198.18.0.9', 64099)
    assert body == b'D' * 300
    assert records == [{'transport': 'udp', 'port': 64099, 'peer': '198.18.0.9',
                        'nonce': 'u1', 'size': 300}]


@pytest.mark.parametrize('datagram, message', [
    (b'garbage', 'newline'),
    (b'x' * (framed.MAX_DATAGRAM + 1), 'exceeds'),
])
def test_udp_server_answers_malformed_datagram_with_error(datagram, message):
    fake, records = udp_server()
    fake.protocol.datagramReceived(datagram, ('198.18.0.9', 5555))
    [(reply, addr)] = fake.written
    header, _ = framed.decode(reply)
    assert addr == ('198.18.0.9', 5555)
    assert header['ok'] is False and message in header['error']
    assert records == []


# --- TCP probe, in memory -------------------------------------------------------

def test_tcp_probe_against_stub_in_memory():
    clock, d, factory = start_tcp_probe(size=2000)
    client, client_transport = connect_client(factory)
    _, server, server_transport, records = tcp_server()
    server.dataReceived(client_transport.value())  # the request reaches the stub
    client.dataReceived(server_transport.value())  # and its reply the probe
    result = fired(d)
    assert result.outcome == 'ok', result
    assert result.peer_seen == CLIENT.host
    assert result.exchange == 'framed/tcp hello 2000 B → 2000 B'
    assert 'spooler-1' in result.detail
    assert records[0]['size'] == 2000
    assert not client_transport.connected  # closed after the reply
    assert clock.getDelayedCalls() == []


def test_tcp_probe_times_out_when_connect_never_completes():
    clock, d, factory = start_tcp_probe(timeout=3.0)
    clock.advance(2.9)
    assert not d.called
    clock.advance(0.1)
    result = fired(d)
    assert (result.outcome, result.elapsed) == ('timeout', 3.0)
    assert 'no TCP connection' in result.detail
    assert clock.connectors[-1].stoppedConnecting
    assert clock.getDelayedCalls() == []


def test_tcp_probe_times_out_when_no_reply():
    clock, d, factory = start_tcp_probe()
    _, transport = connect_client(factory)
    assert transport.value()  # the hello went out
    clock.advance(2.0)
    result = fired(d)
    assert result.outcome == 'silent' and 'no reply' in result.detail
    assert transport.disconnected  # aborted
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize('reason, outcome', [
    (ConnectionRefusedError(), 'refused'),
    (NoRouteError(), 'unreachable'),
    (ConnectError(osError=errno.EHOSTUNREACH, string='No route to host'), 'unreachable'),
    (ConnectError(osError=errno.EACCES, string='Permission denied'), 'error'),
])
def test_tcp_probe_classifies_connect_failures(reason, outcome):
    clock, d, factory = start_tcp_probe()
    clock.advance(0.25)
    factory.clientConnectionFailed(clock.connectors[-1], Failure(reason))
    result = fired(d)
    assert (result.outcome, result.elapsed) == (outcome, 0.25)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize('reply, detail', [
    (frame(b'HTTP/1.1 400 Bad Request\r\n'), 'not JSON'),
    (b'HTTP/1.1 400 Bad Request\r\n', 'exceeds'),
    (frame(framed.encode_error('nope')), 'rejected'),
    (frame(b'{"v":1,"ok":true,"nonce":"wrong","size":0}\n'), 'nonce mismatch'),
])
def test_tcp_probe_reports_bad_reply_as_protocol_error(reply, detail):
    clock, d, factory = start_tcp_probe()
    client, transport = connect_client(factory)
    client.dataReceived(reply)
    result = fired(d)
    assert result.outcome == 'protocol_error' and detail in result.detail, result
    assert result.peer_seen is None
    assert transport.disconnected
    assert clock.getDelayedCalls() == []


def test_tcp_probe_reports_early_close_as_protocol_error():
    clock, d, factory = start_tcp_probe()
    client, _ = connect_client(factory)
    client.connectionLost(Failure(ConnectionDone()))
    result = fired(d)
    assert result.outcome == 'protocol_error' and 'closed before' in result.detail
    assert clock.getDelayedCalls() == []


def test_tcp_probe_result_waits_for_the_socket_to_close():
    clock, d, factory = start_tcp_probe()
    client = factory.buildProtocol(SERVER)
    transport = StringTransport(hostAddress=CLIENT, peerAddress=SERVER)  # no auto connectionLost
    client.makeConnection(transport)
    clock.advance(2.0)
    assert transport.disconnected and not d.called
    client.connectionLost(Failure(ConnectionDone()))
    assert fired(d).outcome == 'silent'


def test_probe_rejects_size_beyond_one_frame():
    clock = MemoryReactorClock()
    result = fired(framed.probe(clock, target(size=framed.MAX_FRAME)))
    assert result.outcome == 'error' and 'does not fit' in result.detail
    assert clock.tcpClients == [] and clock.getDelayedCalls() == []


# --- UDP probe, in memory -------------------------------------------------------

def start_udp_probe(**overrides):
    reactor = UDPMemoryReactor()
    d = framed.probe(reactor, target('udp', port=64099, **overrides))
    local_port, _proto, _iface, _max, fake = reactor.udp_listens[-1]
    assert local_port == 0  # ephemeral source port
    assert fake.connected_to == (SERVER.host, 64099)
    return reactor, d, fake


def test_udp_probe_against_stub_in_memory():
    reactor, d, client_port = start_udp_probe(size=512)
    server_port, records = udp_server()
    [(request, _)] = client_port.written
    server_port.protocol.datagramReceived(request, ('198.18.0.9', 50000))
    [(reply, _)] = server_port.written
    client_port.protocol.datagramReceived(reply, (SERVER.host, 64099))
    result = fired(d)
    assert (result.outcome, result.peer_seen) == ('ok', '198.18.0.9')
    assert result.exchange == 'framed/udp hello 512 B → 512 B'
    assert not client_port.listening
    assert reactor.getDelayedCalls() == []


def test_udp_probe_times_out():
    reactor, d, port = start_udp_probe(timeout=1.5)
    reactor.advance(1.5)
    result = fired(d)
    assert (result.outcome, result.elapsed) == ('timeout', 1.5)
    assert not port.listening and reactor.getDelayedCalls() == []


def test_udp_probe_refused_via_connection_refused():
    reactor, d, port = start_udp_probe()
    port.protocol.connectionRefused()  # what select/poll reactors call
    assert fired(d).outcome == 'refused'
    assert not port.listening and reactor.getDelayedCalls() == []


class FakeSocket:
    def __init__(self, error: int):
        self.error = error

    def getsockopt(self, level, option):
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR)
        return self.error


@pytest.mark.parametrize('error, outcome', [
    (errno.ECONNREFUSED, 'refused'),
    (errno.EHOSTUNREACH, 'unreachable'),
    (0, 'error'),
])
def test_udp_probe_reads_the_socket_error_when_the_port_dies(error, outcome):
    # epoll closes a connected UDP port on EPOLLERR without calling doRead.
    reactor, d, port = start_udp_probe()
    port.getHandle = lambda: FakeSocket(error)
    port.die()
    assert fired(d).outcome == outcome
    assert reactor.getDelayedCalls() == []


def test_udp_probe_send_error_is_classified_and_cleaned_up():
    class Unroutable(FakeUDPPort):
        def write(self, datagram, addr=None):
            raise OSError(errno.ENETUNREACH, 'Network is unreachable')

    class Reactor(UDPMemoryReactor):
        def listenUDP(self, port, protocol, interface='', maxPacketSize=8192):
            self.fake = Unroutable(protocol, 50000)
            return self.fake

    reactor = Reactor()
    result = fired(framed.probe(reactor, target('udp')))
    assert result.outcome == 'unreachable', result
    assert not reactor.fake.listening and reactor.getDelayedCalls() == []


def test_exchange_says_when_tls_is_not_emulated():
    reactor, d, port = start_udp_probe(security='tls')
    reactor.advance(2.0)
    assert fired(d).exchange == 'framed/udp hello 1024 B (plaintext: tls not emulated)'  # no DTLS


def test_udp_probe_rejects_size_beyond_one_datagram():
    reactor = UDPMemoryReactor()
    result = fired(framed.probe(reactor, target('udp', size=framed.MAX_DATAGRAM)))
    assert result.outcome == 'error' and reactor.udp_listens == []


def test_framed_probe_never_errbacks_on_icmp_target():
    result = fired(framed.probe(MemoryReactorClock(), target('icmp', port=None)))
    assert isinstance(result, ProbeResult) and result.outcome == 'error'


# --- registry -------------------------------------------------------------------

def test_registry_falls_back_to_framed():
    assert protocols.module_for('framed') is framed
    assert protocols.module_for('safeq-proprietary') is framed
    assert protocols.module_for('icmp') is protocols.icmp
    with pytest.raises(ValueError, match='no stub'):
        protocols.listen(MemoryReactorClock(), Listener('tcp', 1, 'icmp'), PERSONA)


# --- loopback, real sockets -------------------------------------------------------

# framed's loopback exchanges take milliseconds: a hang fails after 5 s.
run_on_fresh_reactor = partial(support.run_on_fresh_reactor, limit=5.0)


def loopback(transport, port, **overrides) -> ProbeTarget:
    fields = dict(id='lo', host='127.0.0.1', transport=transport, protocol='safeq',
                  port=port, timeout=2.0)
    fields.update(overrides)
    return ProbeTarget(**fields)


def probe_stub(transport: str, count: int = 1):
    records: list[dict] = []

    async def scenario(reactor):
        port = framed.listen(reactor, Listener(transport, 0, 'safeq'), PERSONA,
                             on_request=records.append, interface='127.0.0.1')
        number = port.getHost().port
        try:
            return await gatherResults([
                framed.probe(reactor, loopback(transport, number, id=str(i)))
                for i in range(count)])
        finally:
            await maybeDeferred(port.stopListening)

    return run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r))), records


def test_loopback_tcp_ok():
    [result], records = probe_stub('tcp')
    assert result.outcome == 'ok', result
    assert result.peer_seen == '127.0.0.1'
    assert records[0]['peer'] == '127.0.0.1' and records[0]['size'] == 1024


def test_loopback_udp_ok():
    [result], records = probe_stub('udp')
    assert (result.outcome, result.peer_seen) == ('ok', '127.0.0.1'), result
    assert records[0]['transport'] == 'udp'


def test_loopback_many_concurrent_tcp_probes():
    results, records = probe_stub('tcp', count=100)
    assert [r.outcome for r in results] == ['ok'] * 100
    assert len({r['nonce'] for r in records}) == 100


def test_loopback_tcp_refused():
    result = run_on_fresh_reactor(lambda r: framed.probe(r, loopback('tcp', free_port())))
    assert result.outcome == 'refused', result


def test_loopback_udp_closed_port():
    result = run_on_fresh_reactor(
        lambda r: framed.probe(r, loopback('udp', free_port(socket.SOCK_DGRAM), timeout=1.0)))
    # Linux answers a datagram to a closed loopback port with ICMP port
    # unreachable and never rate-limits it on loopback, so 'refused' is
    # expected. 'timeout' is tolerated because a sandboxed network stack may
    # drop the ICMP error; anything else would be a bug.
    assert result.outcome in ('refused', 'timeout'), result


def test_loopback_udp_stub_survives_icmp_backscatter():
    # The stub's reply to a client that has gone returns as ICMP port
    # unreachable; on the stub's unconnected socket that must not kill it.
    records: list[dict] = []

    async def scenario(reactor):
        port = framed.listen(reactor, Listener('udp', 0, 'safeq'), PERSONA,
                             on_request=records.append, interface='127.0.0.1')
        number = port.getHost().port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.sendto(framed.encode_request('gone', b''), ('127.0.0.1', number))
        # Let the stub read it and reply into the void.
        await deferLater(reactor, 0.05)
        result = await framed.probe(reactor, loopback('udp', number))
        await maybeDeferred(port.stopListening)
        return result

    result = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert result.outcome == 'ok', result
    assert [r['nonce'] for r in records][0] == 'gone'


class _Garbage(Protocol):
    def dataReceived(self, data):
        self.transport.write(b'HTTP/1.1 400 Bad Request\r\n\r\n')


class _HangUp(Protocol):
    def connectionMade(self):
        self.transport.loseConnection()


@pytest.mark.parametrize('server, detail', [(_Garbage, 'exceeds'), (_HangUp, 'closed before')])
def test_loopback_protocol_error(server, detail):
    async def scenario(reactor):
        port = reactor.listenTCP(0, Factory.forProtocol(server), interface='127.0.0.1')
        try:
            return await framed.probe(reactor, loopback('tcp', port.getHost().port))
        finally:
            await maybeDeferred(port.stopListening)

    result = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert result.outcome == 'protocol_error' and detail in result.detail, result


# --- option rounds: the link's round-trip time on the open connection ------------

def serve_in_memory(client, client_transport, server, server_transport, clock=None, delay=0.0):
    """Pass every pending frame between probe and stub until both are quiet; `delay` seconds per trip."""
    while client_transport.value() and client_transport.connected:
        if clock is not None:
            clock.advance(delay / 2)
        request = client_transport.value()
        client_transport.clear()
        server.dataReceived(request)
        if clock is not None:
            clock.advance(delay / 2)
        reply = server_transport.value()
        server_transport.clear()
        client.dataReceived(reply)


def test_rounds_measure_the_median_round_trip_on_one_connection():
    clock, d, factory = start_tcp_probe(size=2000, options={'rounds': 5}, timeout=10.0)
    client, client_transport = connect_client(factory)
    _, server, server_transport, records = tcp_server()
    serve_in_memory(client, client_transport, server, server_transport, clock, delay=0.09)
    result = fired(d)
    assert result.outcome == 'ok', result
    assert result.round_trip_ms == pytest.approx(90.0)
    assert [r['size'] for r in records] == [2000] + [framed.ROUND_BYTES] * 5  # one connection, six pairs
    assert 'then 5 round trips of 64 B: median 90.0 ms' in result.exchange
    assert result.elapsed == pytest.approx(6 * 0.09)
    assert not client_transport.connected and clock.getDelayedCalls() == []
    assert ProbeResult.from_dict(result.to_dict()) == result   # JSON-safe, like every result field


def test_without_rounds_no_round_trip_is_reported():
    clock, d, factory = start_tcp_probe()
    client, client_transport = connect_client(factory)
    _, server, server_transport, records = tcp_server()
    serve_in_memory(client, client_transport, server, server_transport)
    result = fired(d)
    assert result.outcome == 'ok' and result.round_trip_ms is None and len(records) == 1


def test_a_round_without_reply_times_out_naming_the_rounds_done():
    clock, d, factory = start_tcp_probe(options={'rounds': 3}, timeout=2.0)
    client, client_transport = connect_client(factory)
    _, server, server_transport, _records = tcp_server()
    server.dataReceived(client_transport.value())
    client_transport.clear()
    client.dataReceived(server_transport.value())   # first exchange done; round 1 is on its way
    assert client_transport.value()
    clock.advance(2.0)
    result = fired(d)
    assert result.outcome == 'silent' and '0 of 3 round trips' in result.detail
    assert result.round_trip_ms is None


def test_a_wrong_round_reply_is_a_protocol_error():
    clock, d, factory = start_tcp_probe(options={'rounds': 2})
    client, client_transport = connect_client(factory)
    _, server, server_transport, _records = tcp_server()
    server.dataReceived(client_transport.value())
    client_transport.clear()
    client.dataReceived(server_transport.value())
    client.dataReceived(frame(b'{"v":1,"ok":true,"nonce":"wrong","size":0}\n'))
    result = fired(d)
    assert result.outcome == 'protocol_error' and 'round trip 1 of 2' in result.detail
    assert result.round_trip_ms is None


@pytest.mark.parametrize('rounds, transport, words', [
    (0.5, 'tcp', 'integer from 1'), (True, 'tcp', 'integer from 1'), (framed.MAX_ROUNDS + 1, 'tcp', 'integer from 1'),
    (-1, 'tcp', 'integer from 1'), ('3', 'tcp', 'integer from 1'), (3, 'udp', 'tcp only'),
])
def test_bad_rounds_option_is_an_error_before_any_packet(rounds, transport, words):
    clock = UDPMemoryReactor()
    result = fired(framed.probe(clock, target(transport, options={'rounds': rounds})))
    assert result.outcome == 'error' and words in result.detail
    assert clock.tcpClients == [] and clock.udp_listens == []


@pytest.mark.parametrize('value', [-1.0, float('nan'), float('inf'), '12', True])
def test_probe_result_rejects_a_bad_round_trip(value):
    with pytest.raises(ValueError, match='round_trip_ms'):
        ProbeResult('x', 'ok', 0.1, round_trip_ms=value)


def test_loopback_tcp_rounds():
    records: list[dict] = []

    async def scenario(reactor):
        port = framed.listen(reactor, Listener('tcp', 0, 'safeq'), PERSONA,
                             on_request=records.append, interface='127.0.0.1')
        try:
            return await framed.probe(reactor, loopback('tcp', port.getHost().port, options={'rounds': 7}))
        finally:
            await maybeDeferred(port.stopListening)

    result = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert result.outcome == 'ok', result
    assert 0 <= result.round_trip_ms < 50   # loopback: well under a millisecond, unless the machine is busy
    assert len(records) == 8 and len({r['nonce'] for r in records}) == 8
