"""terminal / discovery: SafeQ terminal sessions (plain, TLS, STARTTLS) and SPM discovery."""

from __future__ import annotations

import hashlib
import json
import socket
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

import roles
from emulator import pki
from emulator.protocols import serving, framed, terminal
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import run_on_reactor

PERSONA = Persona(host='terminal-server-1', roles=('terminal-server',), address='198.18.0.4',
                  identity={'version': '6.0.87', 'product': 'YSoft SafeQ 6 Terminal Server'})
SERVER = IPv4Address('TCP', '198.18.0.4', 4096)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)


# --- helpers ------------------------------------------------------------------

def frame(header: dict, body: bytes = b'') -> bytes:
    payload = framed.encode({'v': 1, 'size': len(body), **header}, body)
    return struct.pack('>I', len(payload)) + payload


def unframe(data: bytes) -> list[tuple[dict, bytes]]:
    out = []
    while data:
        (length,) = struct.unpack('>I', data[:4])
        out.append(framed.decode(data[4:4 + length]))
        data = data[4 + length:]
    return out


def server(security='plain', persona=PERSONA):
    clock = MemoryReactorClock()
    records: list[dict] = []
    terminal.listen(clock, Listener('tcp', SERVER.port, 'terminal', security), persona,
                    on_request=records.append)
    proto = clock.tcpServers[-1][1].buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    proto.makeConnection(transport)
    return clock, proto, transport, records


def login(proto, transport) -> str:
    proto.dataReceived(frame({'op': 'login', 'seq': 1, 'card': '0004123456', 'terminal': 't1'}))
    [(header, _)] = unframe(transport.value())
    transport.clear()
    return header['session']


# --- job metadata ---------------------------------------------------------------

@pytest.mark.parametrize('size', [2, 3, 100, 40_000, 51_200, 60_000])
def test_job_metadata_is_a_json_job_list_of_the_exact_size(size):
    body, count = terminal.job_metadata(size, 'card-3456', 'spooler-1', 1_780_000_000)
    assert len(body) == size
    jobs = json.loads(body)
    assert isinstance(jobs, list) and len(jobs) == count
    if size >= 40_000:
        assert count > 100 and {'name', 'pages', 'copies', 'color', 'duplex', 'price'} <= set(jobs[0])


@pytest.mark.parametrize('size', [0, 1])
def test_job_metadata_below_json_size(size):
    assert terminal.job_metadata(size, 'o', 's', 0) == (b' ' * size, 0)


def test_product_from_identity_else_the_default():
    assert terminal.product_of(PERSONA) == 'YSoft SafeQ 6 Terminal Server'
    # roles name products in the persona data, never in the protocol module
    assert terminal.product_of(Persona(host='x', roles=('payment-machine',))) == terminal.DEFAULT_PRODUCT
    assert roles.identity(['payment-machine'])['product'] == 'YSoft Payment Machine (SPM)'
    assert terminal.product_of(Persona(host='x', roles=('a',), identity={'product': 'P'})) == 'P'


def target(**overrides) -> ProbeTarget:
    fields = dict(id='t1', host=SERVER.host, transport='tcp', protocol='terminal', port=4096,
                  timeout=2.0, size=1024)
    fields.update(overrides)
    return ProbeTarget(**fields)


@pytest.mark.parametrize('size, options, expected', [
    (1024, {}, 40_000), (51_200, {}, 51_200), (10 << 20, {}, 60_000),
    (1024, {'metadata_size': 123}, 123),
])
def test_metadata_size_is_clamped_to_the_vendor_range(size, options, expected):
    assert terminal.metadata_size(target(size=size, options=options)) == expected


@pytest.mark.parametrize('security, ca_file, options, expected', [
    ('plain', 'ca.pem', {}, False), ('tls', 'ca.pem', {}, False), ('starttls', '', {}, True),
    ('optional', 'ca.pem', {}, True), ('optional', '', {}, False),
    ('optional', 'ca.pem', {'starttls': False}, False),
])
def test_wants_starttls(security, ca_file, options, expected):
    assert terminal.wants_starttls(target(security=security, ca_file=ca_file,
                                          options=options)) is expected


# --- server: sessions -------------------------------------------------------------

def test_server_session_login_jobs_logout():
    _, proto, transport, records = server()
    session = login(proto, transport)
    proto.dataReceived(frame({'op': 'jobs', 'seq': 2, 'session': session, 'want': 50_000}))
    proto.dataReceived(frame({'op': 'logout', 'seq': 3, 'session': session}))
    (jobs, body), (logout, _) = unframe(transport.value())
    assert jobs['ok'] is True and (jobs['op'], jobs['seq'], jobs['size']) == ('jobs', 2, 50_000)
    assert jobs['sha256'] == hashlib.sha256(body).hexdigest() and jobs['count'] == len(json.loads(body))
    assert (jobs['host'], jobs['peer'], jobs['port']) == ('terminal-server-1', CLIENT.host, 4096)
    assert (logout['op'], logout['seq'], logout['session']) == ('logout', 3, session)
    assert [r['op'] for r in records] == ['login', 'jobs', 'logout']
    assert records[0]['card'] == '…3456' and records[1]['bytes'] == 50_000
    assert {r['peer'] for r in records} == {CLIENT.host} and not transport.disconnecting


def test_server_handles_fragments():
    _, proto, transport, records = server()
    data = frame({'op': 'login', 'seq': 7, 'card': '1234'})
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    [(header, _)] = unframe(transport.value())
    assert header['ok'] is True and header['seq'] == 7 and len(records) == 1


@pytest.mark.parametrize('request_frame, error', [
    (struct.pack('>I', 5) + b'hello', 'newline'),
    (frame({'op': 'fly', 'seq': 1}), 'unknown op'),
    (frame({'op': 'login', 'seq': -1, 'card': '1234'}), 'seq'),
    (frame({'op': 'login', 'seq': 1, 'card': '12ab'}), 'card'),
    (frame({'op': 'login', 'seq': 1, 'card': 1234}), 'card'),
    (frame({'op': 'login', 'seq': 1, 'card': '1234', 'pin': 'x'}), 'pin'),
    (frame({'op': 'jobs', 'seq': 1, 'session': 'abc', 'want': 10}), 'login first'),
    (frame({'op': 'logout', 'seq': 1, 'session': 'abc'}), 'login first'),
    (frame({'op': 'starttls', 'seq': 1}), 'not offered'),
    (struct.pack('>I', 38) + b'{"v":1,"op":"login","seq":1,"size":9}\n', 'size'),
    (struct.pack('>I', framed.MAX_FRAME + 1), 'exceeds'),
    (struct.pack('>I', 2001) + b'[' * 2000 + b'\n', 'nested too deeply'),
])
def test_server_answers_malformed_requests_with_an_error_and_closes(request_frame, error):
    _, proto, transport, records = server()
    proto.dataReceived(request_frame)
    proto.dataReceived(frame({'op': 'login', 'seq': 2, 'card': '1234'}))   # ignored after the error
    [(header, body)] = unframe(transport.value())
    assert header['ok'] is False and error in header['error'] and body == b''
    assert transport.disconnecting and records == []


@pytest.mark.parametrize('request_header, error', [
    ({'op': 'jobs', 'seq': 2, 'session': 'other', 'want': 10}, 'unknown session'),
    ({'op': 'jobs', 'seq': 2, 'want': terminal.MAX_METADATA + 1}, 'want'),
    ({'op': 'jobs', 'seq': 2, 'want': True}, 'want'),
])
def test_server_checks_session_requests(request_header, error):
    _, proto, transport, records = server()
    session = login(proto, transport)
    request_header.setdefault('session', session)
    proto.dataReceived(frame(request_header))
    [(header, _)] = unframe(transport.value())
    assert header['ok'] is False and error in header['error'] and transport.disconnecting
    assert [r['op'] for r in records] == ['login']


def test_starttls_listener_requires_the_upgrade(tmp_path):
    persona = Persona(host='stub', roles=('terminal-server',), **pki.make_test_pki(tmp_path))
    _, proto, transport, records = server('starttls', persona)
    proto.dataReceived(frame({'op': 'login', 'seq': 1, 'card': '1234'}))
    [(header, _)] = unframe(transport.value())
    assert 'STARTTLS required' in header['error'] and records == []


def test_starttls_listener_needs_a_certificate():
    with pytest.raises(ValueError, match='cert_file'):
        server('optional')


def test_server_drops_idle_connection():
    clock, proto, transport, _ = server()
    clock.advance(serving.IDLE_TIMEOUT)
    assert transport.disconnected
    proto.connectionLost(Failure(ConnectionError()))
    assert clock.getDelayedCalls() == []


# --- discovery ------------------------------------------------------------------------

def discover(datagram: bytes, persona=PERSONA):
    return terminal._discovery_answer(persona, datagram, 64099, '0.0.0.0', '198.18.0.9')


def test_discovery_answers_with_the_identity():
    reply, record = discover(framed.encode({'v': 1, 'op': 'discover', 'nonce': 'n1', 'size': 0}))
    header, body = framed.decode(reply)
    assert header == {'v': 1, 'ok': True, 'op': 'discover', 'nonce': 'n1',
                      'host': 'terminal-server-1', 'roles': ['terminal-server'],
                      'product': 'YSoft SafeQ 6 Terminal Server', 'version': '6.0.87',
                      'address': '198.18.0.4', 'port': 64099, 'peer': '198.18.0.9', 'size': 0}
    assert body == b'' and record == {'op': 'discover', 'nonce': 'n1'}


@pytest.mark.parametrize('datagram, error', [
    (b'', 'newline'),
    (b'{"v":1,"op":"hello","nonce":"n"}\n', 'unknown op'),
    (b'{"v":1,"op":"discover"}\n', 'nonce'),
    (b'{"v":1,"op":"discover","nonce":"n","size":2}\nab', 'no body'),
    (b'[' * 1000 + b'\n', 'nested too deeply'),
])
def test_discovery_rejects_malformed_datagrams(datagram, error):
    reply, record = discover(datagram)
    header, _ = framed.decode(reply)
    assert header['ok'] is False and error in header['error'] and record is None


def test_listen_refuses_odd_listeners():
    with pytest.raises(ValueError):
        terminal.listen(MemoryReactorClock(), Listener('tcp', 64099, 'discovery'), PERSONA)
    with pytest.raises(ValueError):
        terminal.listen(MemoryReactorClock(), Listener('udp', 64099, 'discovery', 'tls'), PERSONA)


# --- loopback, real sockets -----------------------------------------------------------

@pytest.fixture
def tls_persona(tmp_path):
    material = pki.make_test_pki(tmp_path / 'pki', host='stub.lab', address='127.0.0.1')
    return Persona(host='stub', roles=('payment-system',), address='127.0.0.1', **material)


def session(reactor, persona, listener, records, **target_fields):
    async def body(reactor):
        port = terminal.listen(reactor, listener, persona, on_request=records.append,
                               interface='127.0.0.1')
        try:
            fields = dict(host='127.0.0.1', port=port.getHost().port, security=listener.security,
                          transport=listener.transport, protocol=listener.protocol,
                          server_name='stub.lab', ca_file=persona.ca_file)
            fields.update(target_fields)
            return await terminal.probe(reactor, target(**fields))
        finally:
            await maybeDeferred(port.stopListening)

    return run_on_reactor(reactor, lambda r: Deferred.fromCoroutine(body(r)))


@pytest.mark.parametrize('security', ['plain', 'tls', 'starttls', 'optional'])
def test_loopback_session(fresh_reactor, tls_persona, security):
    records: list[dict] = []
    result = session(fresh_reactor, tls_persona, Listener('tcp', 0, 'terminal', security), records,
                     size=51_200)
    assert result.outcome == 'ok', result
    assert result.peer_seen == '127.0.0.1'
    assert 'jobs 51200 B' in result.exchange and 'logout' in result.exchange
    ops = [r['op'] for r in records]
    assert ops == (['starttls'] if security in ('starttls', 'optional') else []) + \
        ['login', 'jobs', 'logout']
    assert records[-1]['tls'] is (security != 'plain')


def test_loopback_optional_without_a_ca_stays_plain(fresh_reactor, tls_persona):
    records: list[dict] = []
    result = session(fresh_reactor, tls_persona, Listener('tcp', 0, 'terminal', 'optional'), records,
                     ca_file='')
    assert result.outcome == 'ok', result
    assert [r['tls'] for r in records] == [False, False, False]


@pytest.mark.parametrize('security', ['tls', 'starttls'])
@pytest.mark.parametrize('wrong', ['ca', 'name'])
def test_loopback_tls_verification_failure(fresh_reactor, tls_persona, tmp_path, security, wrong):
    records: list[dict] = []
    if wrong == 'ca':
        other = pki.make_test_pki(tmp_path / 'other')
        overrides = {'ca_file': other['ca_file']}
    else:
        overrides = {'server_name': 'spooler.lab'}
    result = session(fresh_reactor, tls_persona, Listener('tcp', 0, 'terminal', security), records,
                     **overrides)
    assert result.outcome == 'protocol_error', result
    assert result.detail.startswith('certificate: '), result
    assert [r['op'] for r in records if r['op'] != 'starttls'] == []


def test_loopback_tls_probe_without_a_ca_is_an_error(fresh_reactor, tls_persona):
    result = session(fresh_reactor, tls_persona, Listener('tcp', 0, 'terminal', 'tls'), [],
                     ca_file='')
    assert result.outcome == 'error' and 'ca_file' in result.detail, result


def test_loopback_plain_probe_against_tls_port(fresh_reactor, tls_persona):
    records: list[dict] = []

    async def body(reactor):
        port = terminal.listen(reactor, Listener('tcp', 0, 'terminal', 'tls'), tls_persona,
                               on_request=records.append, interface='127.0.0.1')
        try:
            return await terminal.probe(reactor, target(host='127.0.0.1', port=port.getHost().port,
                                                        timeout=1.0))
        finally:
            await maybeDeferred(port.stopListening)

    result = run_on_reactor(fresh_reactor, lambda r: Deferred.fromCoroutine(body(r)))
    assert result.outcome in ('protocol_error', 'timeout'), result
    assert records == []


def test_loopback_stub_keeps_serving_after_malformed_clients(fresh_reactor):
    records: list[dict] = []

    async def body(reactor):
        port = terminal.listen(reactor, Listener('tcp', 0, 'terminal'), PERSONA,
                               on_request=records.append, interface='127.0.0.1')
        number = port.getHost().port
        try:
            with socket.create_connection(('127.0.0.1', number)) as bad:
                bad.sendall(struct.pack('>I', 4) + b'junk')
            return await terminal.probe(reactor, target(host='127.0.0.1', port=number))
        finally:
            await maybeDeferred(port.stopListening)

    result = run_on_reactor(fresh_reactor, lambda r: Deferred.fromCoroutine(body(r)))
    assert result.outcome == 'ok', result
    assert [r['op'] for r in records] == ['login', 'jobs', 'logout']


def test_loopback_discovery(fresh_reactor):
    records: list[dict] = []

    async def body(reactor):
        port = terminal.listen(reactor, Listener('udp', 0, 'discovery'), PERSONA,
                               on_request=records.append, interface='127.0.0.1')
        number = port.getHost().port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bad:
                bad.sendto(b'\x00garbage', ('127.0.0.1', number))
                await deferLater(reactor, 0.1)      # let the stub answer
                bad.setblocking(False)
                error = bad.recv(2048)
            result = await terminal.probe(reactor, target(host='127.0.0.1', port=number,
                                                          transport='udp', protocol='discovery'))
            return error, result
        finally:
            await maybeDeferred(port.stopListening)

    error, result = run_on_reactor(fresh_reactor, lambda r: Deferred.fromCoroutine(body(r)))
    assert framed.decode(error)[0]['ok'] is False
    assert result.outcome == 'ok', result
    assert result.peer_seen == '127.0.0.1' and 'terminal-server-1' in result.exchange
    assert records == [{'transport': 'udp', 'port': records[0]['port'], 'peer': '127.0.0.1',
                        'op': 'discover', 'nonce': records[0]['nonce']}]


def test_loopback_discovery_closed_port(fresh_reactor):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('127.0.0.1', 0))
        number = s.getsockname()[1]
    result = run_on_reactor(fresh_reactor, lambda r: terminal.probe(
        r, target(host='127.0.0.1', port=number, transport='udp', protocol='discovery', timeout=1.0)))
    assert result.outcome in ('refused', 'timeout'), result
