"""jmx (RMI registry over JRMP), ajp (AJP13 container) and amqp (AMQP 0-9-1 broker handshake):
codecs against golden bytes, stubs over StringTransport, and each stub against its own probe on
loopback (plain; amqp also over implicit TLS)."""

from __future__ import annotations

import re
import struct

import pytest
from pamqp import commands
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from emulator import pki
from emulator.protocols import ajp, amqp, jmx, module_for
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import run_on_reactor

PERSONA = Persona(host='spooler-controller-1', roles=('spooler-controller',), address='198.18.0.7')
SERVER = IPv4Address('TCP', '198.18.0.7', 9898)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)


def server(module, protocol: str, security: str = 'plain', persona: Persona = PERSONA):
    """A stub connection over StringTransport: (protocol, transport, records)."""
    clock = MemoryReactorClock()
    records: list[dict] = []
    module.listen(clock, Listener('tcp', SERVER.port, protocol, security), persona,
                  on_request=records.append)
    proto = clock.tcpServers[-1][1].buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    proto.makeConnection(transport)
    return proto, transport, records


def test_modules_are_registered():
    assert module_for('jmx') is jmx and module_for('ajp') is ajp and module_for('amqp') is amqp


# --- jmx: codec -----------------------------------------------------------------------------

def test_string_array_is_what_a_jvm_writes():
    # ObjectOutputStream bytes of new String[]{"jmxrmi"} from a MarshalOutputStream (as in any
    # captured registry list() reply): the class annotation is TC_NULL TC_ENDBLOCKDATA.
    golden = bytes.fromhex('757200135b4c6a6176612e6c616e672e537472696e673badd256e7e91d7b4702000070787000'
                           '0000017400066a6d78726d69')
    assert jmx.string_array(['jmxrmi']) == golden
    assert jmx.read_string_array(jmx._Reader(golden)) == ['jmxrmi']


def test_java_utf_is_modified_utf8():
    assert jmx.java_utf('a\0é') == b'\x00\x05a\xc0\x80\xc3\xa9'
    assert jmx.java_utf('😀') == b'\x00\x06\xed\xa0\xbd\xed\xb8\x80'   # a surrogate pair, 3 bytes each


def test_registry_call_header_is_nmaps():
    # What nmap's rmi.lua sends for list(): Call, stream header, 34-byte block, op 1, registry hash.
    assert jmx.call(jmx.ObjID(0), 1, jmx.REGISTRY_INTERFACE_HASH) == (
        b'\x50\xac\xed\x00\x05\x77\x22' + b'\x00' * 22 + b'\x00\x00\x00\x01' + bytes.fromhex('44154dc9d4e63bdf'))


# --- jmx: stub over StringTransport ---------------------------------------------------------

def handshake(proto, transport) -> None:
    proto.dataReceived(jmx.protocol_header())
    assert transport.value() == jmx.protocol_ack(CLIENT.host, CLIENT.port)
    transport.clear()
    proto.dataReceived(jmx.endpoint('198.18.0.9', 0))


def test_registry_lists_its_names_byte_by_byte():
    proto, transport, records = server(jmx, 'jmx')
    data = jmx.protocol_header() + jmx.endpoint('198.18.0.9', 0) + \
        jmx.call(jmx.ObjID(0), 1, jmx.REGISTRY_INTERFACE_HASH) + bytes((jmx.PING,))
    for index in range(len(data)):
        proto.dataReceived(data[index:index + 1])
    reply = transport.value()
    ack = jmx.protocol_ack(CLIENT.host, CLIENT.port)
    assert reply.startswith(ack) and reply.endswith(bytes((jmx.PING_ACK,)))
    names = jmx.read_string_array(jmx.read_return(jmx._Reader(reply[len(ack):-1])))
    assert names == ['jmxrmi', 'safeq-lab/spooler-controller-1']
    assert [r['op'] for r in records] == ['list', 'ping']
    assert records[0] == {'transport': 'tcp', 'port': 9898, 'peer': '198.18.0.9', 'op': 'list',
                          'rmi_protocol': 'stream', 'client_endpoint': '198.18.0.9:0', 'names': names}
    assert not transport.disconnecting


def test_registry_lookup_returns_a_stub_pointing_here():
    proto, transport, records = server(jmx, 'jmx')
    handshake(proto, transport)
    proto.dataReceived(jmx.call(jmx.ObjID(0), 2, jmx.REGISTRY_INTERFACE_HASH) + jmx.string_object('jmxrmi'))
    reply = transport.value()
    assert reply[0] == jmx.RETURN_DATA
    assert b'javax.management.remote.rmi.RMIServer' in reply and b'UnicastRef' in reply
    assert jmx.endpoint(SERVER.host, SERVER.port) in reply
    assert records[-1]['op'] == 'lookup' and records[-1]['bound'] is True


@pytest.mark.parametrize('after_handshake, data', [
    (False, b'GET / HTTP/1.0\r\n\r\n'),                      # not JRMP
    (False, b'JRMI\x00\x01\x4b'),                            # version 1
    (False, b'JRMI\x00\x02\x99'),                            # unknown protocol
    (True, b'\x99'),                                          # unknown message
    (True, b'\x50\xac\xed\x00\x05\x77\x02\x00\x00'),         # call header too short
    (True, b'\x50\xac\xed\x00\x05\x77\x22' + b'\x00' * 22 + b'\x00\x00\x00\x00' + bytes(8)),  # bind
    (True, jmx.call(jmx.ObjID(0), 2, jmx.REGISTRY_INTERFACE_HASH) + b'\x70'),               # lookup(null)
    (True, jmx.call(jmx.ObjID(0), 2, jmx.REGISTRY_INTERFACE_HASH) + jmx.string_object('nope')),
    (True, jmx.call(jmx.ObjID(2), 1, -669196253586618813)),   # DGC dirty: exported objects not served
])
def test_registry_closes_on_what_it_does_not_serve(after_handshake, data):
    proto, transport, records = server(jmx, 'jmx')
    if after_handshake:
        handshake(proto, transport)
    proto.dataReceived(data)
    assert transport.value() == b'' and transport.disconnecting
    assert all(r['op'] == 'lookup' and r['bound'] is False for r in records)


def test_registry_multiplex_is_not_supported_and_single_op_is_one_call():
    proto, transport, _ = server(jmx, 'jmx')
    proto.dataReceived(jmx.protocol_header(jmx.MULTIPLEX_PROTOCOL))
    assert transport.value() == bytes((jmx.PROTOCOL_NOT_SUPPORTED,)) and transport.disconnecting
    proto, transport, records = server(jmx, 'jmx')
    proto.dataReceived(jmx.protocol_header(jmx.SINGLE_OP_PROTOCOL) + bytes((jmx.PING,)))
    assert transport.value() == bytes((jmx.PING_ACK,)) and transport.disconnecting
    assert records[0]['rmi_protocol'] == 'single-op'


def test_registry_bounds_its_buffer():
    proto, transport, _ = server(jmx, 'jmx')
    handshake(proto, transport)
    proto.dataReceived(b'\x50\xac\xed\x00\x05\x7a\x00\x00\xff\xff' + b'\x00' * (jmx.MAX_BUFFER + 1))
    assert transport.disconnecting


def test_jmx_refuses_tls_and_udp_listeners():
    with pytest.raises(ValueError):
        jmx.listen(MemoryReactorClock(), Listener('tcp', 9999, 'jmx', 'tls'), PERSONA)
    with pytest.raises(ValueError):
        jmx.listen(MemoryReactorClock(), Listener('udp', 9999, 'jmx'), PERSONA)


# --- ajp: codec and stub ----------------------------------------------------------------------

NMAP_AJP13_BAD_REQUEST = re.compile(rb'^AB\0\x13\x04\x01\x90\0\x0bBad Request\0\0\0AB\0\x02\x05\x01$')
NMAP_AJP13_CPONG = re.compile(rb'^\x41\x42\x00\x01\x09$')


def test_forward_request_round_trip():
    request = ajp.ForwardRequest('POST', '/scan', remote_addr='198.18.0.9', remote_host=None,
                                 server_name='eui.lab', server_port=443, is_ssl=True,
                                 headers=[('content-type', 'text/plain'), ('X-Card', '1234')],
                                 attributes={'query_string': 'a=1', 'JK_LB_ACTIVATION': 'ACT'})
    payload, rest = ajp.split_packet(request.encode(), ajp.SERVER_MAGIC)
    assert rest == b'' and payload[:2] == b'\x02\x04'
    assert b"\xa0\x07" in payload            # content-type sent as its header code (decoded lower-case)
    assert ajp.decode_forward_request(payload) == request


def test_cpong_and_bad_request_match_nmaps_fingerprints():
    proto, transport, records = server(ajp, 'ajp')
    proto.dataReceived(ajp.CPING_PACKET)
    assert NMAP_AJP13_CPONG.match(transport.value())
    assert records == [{'transport': 'tcp', 'port': 9898, 'peer': '198.18.0.9', 'op': 'cping'}]
    proto, transport, _ = server(ajp, 'ajp')
    proto.dataReceived(b'GET / HTTP/1.0\r\n\r\n')
    assert NMAP_AJP13_BAD_REQUEST.match(transport.value()) and transport.disconnecting


def responses(data: bytes) -> list[ajp.Response]:
    out, current = [], ajp.Response()
    while data:
        payload, data = ajp.split_packet(data, ajp.CONTAINER_MAGIC)
        ajp.read_container_packet(payload, current)
        if current.complete:
            out.append(current)
            current = ajp.Response()
    return out


@pytest.mark.parametrize('method, status, has_body', [
    ('GET', 200, True), ('HEAD', 200, False), ('OPTIONS', 200, False), ('DELETE', 405, False)])
def test_forward_requests_answer_per_method(method, status, has_body):
    proto, transport, records = server(ajp, 'ajp')
    proto.dataReceived(ajp.ForwardRequest(method, '/portal', remote_addr='198.18.0.21').encode())
    [response] = responses(transport.value())
    assert response.status == status and bool(response.body) is has_body
    if has_body:
        assert b'safeq-lab spooler-controller-1 (spooler-controller)' in response.body
        assert b'peer=198.18.0.9' in response.body
        assert dict(response.headers)['Content-Length'] == str(len(response.body))
    if method in ('OPTIONS', 'DELETE'):
        assert dict(response.headers)['Allow'] == 'GET, HEAD, POST, OPTIONS'
    assert records[-1]['op'] == 'forward-request' and records[-1]['status'] == status
    assert not transport.disconnecting   # END_RESPONSE says reuse: the connection stays


def test_request_body_is_pulled_with_get_body_chunk():
    proto, transport, records = server(ajp, 'ajp')
    body = b'x' * 10_000
    proto.dataReceived(ajp.ForwardRequest('POST', '/upload', headers=[('content-length', str(len(body)))])
                       .encode())
    first, rest = body[:8186], body[8186:]
    proto.dataReceived(ajp.server_packet(struct.pack('>H', len(first)) + first))
    assert transport.value() == ajp.container_packet(struct.pack('>BH', ajp.GET_BODY_CHUNK, len(rest)))
    transport.clear()
    proto.dataReceived(ajp.server_packet(struct.pack('>H', len(rest)) + rest))
    [response] = responses(transport.value())
    assert response.status == 200 and records[-1]['body_bytes'] == len(body)


@pytest.mark.parametrize('data', [
    ajp.server_packet(b'\x02\x63'),                                  # unknown method code
    ajp.server_packet(b'\x02\x02\x00\x05HTTP'),                      # truncated string
    b'\x12\x34\xff\xff',                                             # longer than a packet may be
    ajp.ForwardRequest('GET', '/', headers=[('content-length', 'ten')]).encode(),
])
def test_malformed_requests_get_400_and_close(data):
    proto, transport, records = server(ajp, 'ajp')
    proto.dataReceived(data)
    assert NMAP_AJP13_BAD_REQUEST.match(transport.value()) and transport.disconnecting
    assert records == []


def test_shutdown_is_closed_without_answer():
    proto, transport, _ = server(ajp, 'ajp')
    proto.dataReceived(ajp.server_packet(bytes((ajp.SHUTDOWN,))))
    assert transport.value() == b'' and transport.disconnecting


# --- amqp: stub over StringTransport ----------------------------------------------------------

def frames(data: bytes) -> list:
    out = []
    while data:
        used, channel, value = amqp.read_frame(data)
        out.append((channel, value))
        data = data[used:]
    return out


def amqp_login(proto, transport, password=amqp.LAB_PASSWORD):
    proto.dataReceived(amqp.PROTOCOL_HEADER)
    [(channel, start)] = frames(transport.value())
    assert channel == 0
    transport.clear()
    proto.dataReceived(amqp.method_frame(commands.Connection.StartOk(
        {}, 'PLAIN', amqp.plain_response(amqp.LAB_USER, password), 'en_US')))
    return start


def test_broker_handshake_to_close():
    proto, transport, records = server(amqp, 'amqp')
    start = amqp_login(proto, transport)
    assert (start.version_major, start.version_minor) == (0, 9)
    assert start.mechanisms == 'PLAIN' and start.locales == 'en_US'
    assert start.server_properties['cluster_name'] == 'spooler-controller-1'
    assert start.server_properties['information'].endswith('peer=198.18.0.9')
    [(channel, tune)] = frames(transport.value())
    assert channel == 0
    assert tune.name == 'Connection.Tune' and tune.frame_max == amqp.FRAME_MAX
    transport.clear()
    proto.dataReceived(amqp.method_frame(commands.Connection.TuneOk(tune.channel_max, 65536, 0))
                       + amqp.method_frame(commands.Connection.Open('/lab')))
    assert [v.name for _, v in frames(transport.value())] == ['Connection.OpenOk']
    transport.clear()
    proto.dataReceived(b'\x08\x00\x00\x00\x00\x00\x00\xce'          # a heartbeat
                       + amqp.method_frame(commands.Channel.Open(), 3)
                       + amqp.method_frame(commands.Channel.Close(200, 'bye', 0, 0), 3)
                       + amqp.method_frame(commands.Connection.Close(200, 'bye', 0, 0)))
    assert [(c, v.name) for c, v in frames(transport.value())] == [
        (3, 'Channel.OpenOk'), (3, 'Channel.CloseOk'), (0, 'Connection.CloseOk')]
    assert transport.disconnecting
    assert [r['op'] for r in records] == ['login', 'connection-open', 'channel-open', 'channel-close',
                                          'connection-close']
    assert records[0]['accepted'] is True and records[1]['vhost'] == '/lab'


@pytest.mark.parametrize('header', [b'AMQP\x01\x01\x00\x0a', b'AMQP\x00\x00\x09\x00', b'GET / HTTP/1.0\r\n\r\n'])
def test_broker_answers_a_wrong_header_with_its_own(header):
    proto, transport, _ = server(amqp, 'amqp')
    proto.dataReceived(header)
    assert transport.value() == b'AMQP\x00\x00\x09\x01' and transport.disconnecting


def closed_with(transport) -> int:
    [(channel, close)] = frames(transport.value())
    assert channel == 0 and close.name == 'Connection.Close' and transport.disconnecting
    return close.reply_code


def test_broker_refuses_a_wrong_password():
    proto, transport, records = server(amqp, 'amqp')
    amqp_login(proto, transport, password='wrong')
    assert closed_with(transport) == amqp.ACCESS_REFUSED
    assert records == [{'transport': 'tcp', 'port': 9898, 'peer': '198.18.0.9', 'op': 'login',
                        'tls': False, 'user': amqp.LAB_USER, 'accepted': False}]


@pytest.mark.parametrize('data, code', [
    (amqp.method_frame(commands.Connection.Open('/')), amqp.COMMAND_INVALID),        # before Start-Ok
    (b'\x01\x00\x00\x00\x00\x00\x04\x00\x0a\x00\x0b\x00', amqp.FRAME_ERROR),         # bad frame end
    (b'\x01\x00\x00\x7f\xff\xff\xff', amqp.FRAME_ERROR),                              # over frame-max
    (b'\x01\x00\x00\x00\x00\x00\x04\x00\x0a\x00\x0b\xce', amqp.FRAME_ERROR),         # truncated Start-Ok
    (b'\x01\x00\x00\x00\x00\x00\x04\x7f\x7f\x00\x01\xce', amqp.FRAME_ERROR),         # unknown method
])
def test_broker_closes_on_broken_frames(data, code):
    proto, transport, _ = server(amqp, 'amqp')
    proto.dataReceived(amqp.PROTOCOL_HEADER)
    transport.clear()
    proto.dataReceived(data)
    assert closed_with(transport) == code


def test_broker_does_not_implement_messaging():
    proto, transport, _ = server(amqp, 'amqp')
    amqp_login(proto, transport)
    proto.dataReceived(amqp.method_frame(commands.Connection.TuneOk(0, 0, 0))
                       + amqp.method_frame(commands.Connection.Open('/')))
    transport.clear()
    proto.dataReceived(amqp.method_frame(commands.Queue.Declare(queue='jobs'), 1))
    assert closed_with(transport) == amqp.NOT_IMPLEMENTED


def test_amqp_listener_needs_a_certificate_for_tls():
    from emulator.protocols.tls import TLSMaterialMissing
    with pytest.raises(TLSMaterialMissing):
        amqp.listen(MemoryReactorClock(), Listener('tcp', 5671, 'amqp', 'tls'), PERSONA)
    with pytest.raises(ValueError):
        amqp.listen(MemoryReactorClock(), Listener('tcp', 5671, 'amqp', 'starttls'), PERSONA)


# --- loopback: each stub against its own probe ------------------------------------------------

@pytest.fixture
def lab_persona(tmp_path):
    material = pki.make_test_pki(tmp_path / 'pki', host='stub.lab', address='127.0.0.1')
    return Persona(host='stub', roles=('edge-remote-site-server-config',), address='127.0.0.1', **material)


def loopback(reactor, module, persona, listener, records, garbage: bytes = b'', **target_fields):
    """Probe the stub, send ``garbage`` on a connection of its own, probe again: both results."""
    async def body(reactor):
        port = module.listen(reactor, listener, persona, on_request=records.append, interface='127.0.0.1')
        try:
            fields = dict(id='t1', host='127.0.0.1', port=port.getHost().port, transport='tcp',
                          protocol=listener.protocol, security=listener.security, timeout=5.0,
                          server_name='stub.lab', ca_file=persona.ca_file)
            fields.update(target_fields)
            first = await module.probe(reactor, ProbeTarget(**fields))
            if garbage:
                await send_and_wait_close(reactor, fields['port'], garbage, listener.security == 'tls')
            second = await module.probe(reactor, ProbeTarget(**fields))
            return first, second
        finally:
            await maybeDeferred(port.stopListening)

    return run_on_reactor(reactor, lambda r: Deferred.fromCoroutine(body(r)))


def send_and_wait_close(reactor, port: int, data: bytes, over_tls: bool) -> Deferred:
    """Connect, send ``data``, fire when the server has closed (the stub must hang up)."""
    from twisted.internet.protocol import ClientFactory, Protocol

    closed: Deferred = Deferred()

    class Garbage(Protocol):
        def connectionMade(self):
            self.transport.write(data)

        def connectionLost(self, reason):
            closed.callback(None)

    factory = ClientFactory.forProtocol(Garbage)
    if over_tls:
        from twisted.internet import ssl
        reactor.connectSSL('127.0.0.1', port, factory, ssl.CertificateOptions(verify=False))
    else:
        reactor.connectTCP('127.0.0.1', port, factory)
    return closed


GARBAGE = b'\x00\xff\x16\x03GARBAGE \r\n\r\n' * 64


def test_loopback_jmx(fresh_reactor, lab_persona):
    records: list[dict] = []
    first, second = loopback(fresh_reactor, jmx, lab_persona, Listener('tcp', 0, 'jmx'), records, GARBAGE)
    for result in (first, second):
        assert result.outcome == 'ok', result
        assert result.peer_seen == '127.0.0.1'
        assert 'jmxrmi, safeq-lab/stub' in result.exchange and 'registry of stub' in result.detail
    assert [r['op'] for r in records] == ['list', 'ping'] * 2


@pytest.mark.parametrize('overrides, detail', [
    ({'server_name': 'ldap-replicator.lab'}, 'registry of stub answered, expected ldap-replicator.lab'),
    ({'options': {'expect': ['jmxrmi', 'jmxconnector']}}, 'missing jmxconnector'),
])
def test_loopback_jmx_checks_the_names(fresh_reactor, lab_persona, overrides, detail):
    first, _ = loopback(fresh_reactor, jmx, lab_persona, Listener('tcp', 0, 'jmx'), [], **overrides)
    assert first.outcome == 'protocol_error' and detail in first.detail, first


def test_loopback_ajp(fresh_reactor, lab_persona):
    records: list[dict] = []
    first, second = loopback(fresh_reactor, ajp, lab_persona, Listener('tcp', 0, 'ajp'), records, GARBAGE)
    for result in (first, second):
        assert result.outcome == 'ok', result
        assert result.exchange.endswith('→ 200 OK') and 'from stub' in result.detail
        assert result.peer_seen == '127.0.0.1'
    assert [r['op'] for r in records] == ['cping', 'forward-request'] * 2
    assert records[1]['server_name'] == 'stub.lab' and records[1]['uri'] == '/'


def test_loopback_ajp_checks_the_host(fresh_reactor, lab_persona):
    first, _ = loopback(fresh_reactor, ajp, lab_persona, Listener('tcp', 0, 'ajp'), [],
                        server_name='other.lab')
    assert first.outcome == 'protocol_error' and 'expected other.lab' in first.detail, first


@pytest.mark.parametrize('security', ['plain', 'tls'])
def test_loopback_amqp(fresh_reactor, lab_persona, security):
    records: list[dict] = []
    first, second = loopback(fresh_reactor, amqp, lab_persona, Listener('tcp', 0, 'amqp', security),
                             records, GARBAGE)
    for result in (first, second):
        assert result.outcome == 'ok', result
        assert 'Close-Ok' in result.exchange and 'broker of stub' in result.detail
        assert result.peer_seen == '127.0.0.1'
        assert bool(result.tls_issuer) is (security == 'tls')
    assert [r['op'] for r in records] == ['login', 'connection-open', 'channel-open', 'connection-close'] * 2
    assert all(r['tls'] is (security == 'tls') for r in records)


def test_loopback_amqp_wrong_password(fresh_reactor, lab_persona):
    records: list[dict] = []
    first, _ = loopback(fresh_reactor, amqp, lab_persona, Listener('tcp', 0, 'amqp', 'tls'), records,
                        options={'password': 'nope'})
    assert first.outcome == 'protocol_error' and '403' in first.detail, first
    assert records[0]['accepted'] is False


def test_loopback_amqps_verifies_the_certificate(fresh_reactor, lab_persona, tmp_path):
    other = pki.make_test_pki(tmp_path / 'other')
    first, _ = loopback(fresh_reactor, amqp, lab_persona, Listener('tcp', 0, 'amqp', 'tls'), [],
                        ca_file=other['ca_file'])
    assert first.outcome == 'protocol_error' and first.detail.startswith('certificate: '), first


def test_probes_against_the_wrong_protocol_fail(fresh_reactor, lab_persona):
    """Each probe pointed at another of these stubs reports protocol_error, never ok."""
    async def body(reactor):
        results = []
        for serving, probing, protocol in ((ajp, jmx, 'ajp'), (amqp, ajp, 'amqp'), (jmx, amqp, 'jmx')):
            port = serving.listen(reactor, Listener('tcp', 0, protocol), lab_persona, interface='127.0.0.1')
            try:
                results.append(await probing.probe(reactor, ProbeTarget(
                    id='x', host='127.0.0.1', port=port.getHost().port, transport='tcp',
                    protocol=probing.PROTOCOL_IDS[0], timeout=3.0, server_name='stub.lab')))
            finally:
                await maybeDeferred(port.stopListening)
        return results

    results = run_on_reactor(fresh_reactor, lambda r: Deferred.fromCoroutine(body(r)))
    assert [r.outcome for r in results] == ['protocol_error'] * 3, results
