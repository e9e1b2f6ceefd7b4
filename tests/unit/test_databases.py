"""pgsql and mssql: codecs, server stubs over StringTransport (malformed input, errors, state machine)
and each stub against its own probe on loopback (plain, in-band TLS, wrong CA, wrong password)."""

from __future__ import annotations

import re
import socket
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from emulator import protocols
from emulator.pki import make_test_pki
from emulator.protocols import mssql, pgsql
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import run_on_reactor, tls_clocked_reactor

CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)
SERVER = IPv4Address('TCP', '198.18.0.2', 5432)


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp('pki'))


@pytest.fixture(scope='module')
def other_pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp('other-pki'))


def persona(pki: dict | None = None, **identity) -> Persona:
    return Persona(host='database-lab', roles=('database-server',), address='127.0.0.1',
                   identity=identity, **(pki or {}))


def connect(module, security: str = 'plain', who: Persona | None = None):
    """A stub connection over StringTransport, and the records it logs."""
    records: list[dict] = []
    factory_class = module._PgFactory if module is pgsql else module._TdsFactory
    factory = factory_class(MemoryReactorClock(), who or persona(), records.append, security)
    server = factory.buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    server.makeConnection(transport)
    return server, transport, records


def take(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


# --- pgsql codec and stub ---------------------------------------------------------------------

def pg_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while data:
        kind, body, used = pgsql.split_message(data)
        out.append((kind, body))
        data = data[used:]
    return out


def pg_login(server, transport, user='safeq', password='safeq-lab-pw'):
    server.dataReceived(pgsql.startup_message({'user': user, 'database': 'safeq'}))
    (kind, body), = pg_messages(take(transport))
    assert kind == b'R' and struct.unpack('!I', body[:4])[0] == pgsql.AUTH_MD5
    server.dataReceived(pgsql.message(b'p', pgsql.cstring(pgsql.md5_password(user, password, body[4:8]))))
    return pg_messages(take(transport))


def test_pg_md5_login_sends_parameters_key_and_ready():
    server, transport, records = connect(pgsql)
    replies = pg_login(server, transport)
    kinds = [kind for kind, _ in replies]
    assert kinds[0] == b'R' and replies[0][1] == struct.pack('!I', 0)
    status = dict(body.split(b'\0')[:2] for kind, body in replies if kind == b'S')
    assert status[b'server_version'] == b'15.6' and status[b'client_encoding'] == b'UTF8'
    assert kinds[-2:] == [b'K', b'Z'] and replies[-1][1] == b'I'
    assert records[-1] == {'transport': 'tcp', 'port': 5432, 'peer': '198.18.0.9', 'op': 'login', 'tls': False,
                           'user': 'safeq', 'database': 'safeq', 'application': '', 'result': 'ok'}


def test_pg_wrong_password_is_fatal_28p01_and_closes():
    server, transport, records = connect(pgsql)
    replies = pg_login(server, transport, password='wrong')
    assert replies[0][0] == b'E' and pgsql.parse_fields(replies[0][1])['C'] == '28P01'
    assert transport.disconnecting and records[-1]['result'] == 'failed'


def test_pg_cleartext_auth_when_the_persona_asks():
    server, transport, _ = connect(pgsql, who=persona(pgsql_auth='password'))
    server.dataReceived(pgsql.startup_message({'user': 'safeq'}))
    assert pg_messages(take(transport)) == [(b'R', struct.pack('!I', pgsql.AUTH_CLEARTEXT))]
    server.dataReceived(pgsql.message(b'p', b'safeq-lab-pw\0'))
    assert pg_messages(take(transport))[-1] == (b'Z', b'I')


def test_pg_queries_answer_rows_and_errors_keep_the_session():
    server, transport, records = connect(pgsql)
    pg_login(server, transport)
    server.dataReceived(pgsql.message(b'Q', b'SELECT 1; select  inet_client_addr() ;SELECT version()\0'))
    replies = pg_messages(take(transport))
    rows = [pgsql.parse_data_row(body)[0] for kind, body in replies if kind == b'D']
    assert rows[:2] == ['1', '198.18.0.9'] and 'safeq-lab database-lab' in rows[2]
    assert replies[-1] == (b'Z', b'I')
    server.dataReceived(pgsql.message(b'Q', b'DROP TABLE jobs\0'))
    replies = pg_messages(take(transport))
    assert [k for k, _ in replies] == [b'E', b'Z'] and pgsql.parse_fields(replies[0][1])['C'] == '0A000'
    server.dataReceived(pgsql.message(b'Q', b'SELECT current_user\0'))
    assert [pgsql.parse_data_row(b)[0] for k, b in pg_messages(take(transport)) if k == b'D'] == ['safeq']
    assert [r['result'] for r in records if r['op'] == 'query'] == ['ok', '0A000', 'ok']


def test_pg_extended_protocol_errors_once_until_sync():
    server, transport, _ = connect(pgsql)
    pg_login(server, transport)
    server.dataReceived(pgsql.message(b'P', b'\0SELECT 1\0\0\0') + pgsql.message(b'B', b'\0\0' + b'\0' * 6)
                        + pgsql.message(b'E', b'\0\0\0\0\0') + pgsql.message(b'S'))
    assert [k for k, _ in pg_messages(take(transport))] == [b'E', b'Z']
    assert not transport.disconnecting


def test_pg_ssl_request_without_certificate_is_declined():
    server, transport, records = connect(pgsql, security='optional')
    server.dataReceived(pgsql.ssl_request())
    assert take(transport) == b'N' and records[-1]['answer'] == 'N'
    server.dataReceived(struct.pack('!II', 8, pgsql.GSSENC_REQUEST_CODE))
    assert take(transport) == b'N'
    assert pg_login(server, transport)[-1] == (b'Z', b'I')


def test_pg_other_protocol_version_gets_postgres_shaped_fatal():
    server, transport, _ = connect(pgsql)
    server.dataReceived(b'\0\0\0\xa4\xff\x53\x4d\x42' + b'\0' * 156)   # nmap's SMBProgNeg probe
    reply = take(transport)
    assert re.match(rb'^E\0\0\0.S[^\0]+\0VFATAL\0C0A000\0Munsupported frontend protocol 65363', reply, re.S)
    assert transport.disconnecting


@pytest.mark.parametrize('data', [b'\0\0\0\x02xxxx', b'\x7f\xff\xff\xff', b'GET / HTTP/1.1\r\n\r\n'])
def test_pg_bad_startup_length_is_fatal(data):
    server, transport, _ = connect(pgsql)
    server.dataReceived(data)
    assert transport.disconnecting and b'08P01' in transport.value()


def test_pg_oversized_or_unknown_message_after_login_closes():
    for data in (b'Q\x7f\xff\xff\xff', b'\x01\0\0\0\x04'):
        server, transport, _ = connect(pgsql)
        pg_login(server, transport)
        server.dataReceived(data)
        assert transport.disconnecting and b'08P01' in transport.value()


def test_pg_starttls_port_refuses_plaintext_startup(pki):
    server, transport, records = connect(pgsql, security='starttls', who=persona(pki))
    server.dataReceived(pgsql.startup_message({'user': 'safeq'}))
    assert b'28000' in take(transport) and transport.disconnecting
    assert records[-1]['result'] == 'no-encryption'


# --- mssql codec and stub ---------------------------------------------------------------------

def tds_messages(data: bytes) -> list[tuple[int, bytes]]:
    reader = mssql.MessageReader()
    messages = reader.feed(data)
    assert reader.buffer == b''
    return messages


def test_tds_prelogin_answer_has_the_layout_nmap_recognises(pki):
    server, transport, records = connect(mssql, 'optional', persona(pki))
    nmap_probe = bytes.fromhex('1201003400000000000015000601001b000102001c000c0300280004ff080001550000004d'
                               '5353514c5365727665720048 0f0000'.replace(' ', ''))
    server.dataReceived(nmap_probe)
    reply = take(transport)
    assert reply.startswith(b'\x04\x01\x00\x25\x00\x00\x01\x00\x00\x00\x15\x00\x06\x01\x00\x1b\x00\x01\x02'
                            b'\x00\x1c\x00\x01\x03\x00\x1d\x00\x00\xff\x0f\x00')
    (kind, payload), = tds_messages(reply)
    assert mssql.decode_prelogin(payload)[mssql.PL_ENCRYPTION] == bytes([mssql.ENCRYPT_OFF])
    assert records[-1]['encryption'] == 'OFF' and records[-1]['client_encryption'] == 'OFF'


@pytest.mark.parametrize('cert, forced, client, answer, mode', [
    (False, False, mssql.ENCRYPT_ON, mssql.ENCRYPT_NOT_SUP, 'none'),
    (False, False, mssql.ENCRYPT_OFF, mssql.ENCRYPT_NOT_SUP, 'none'),
    (True, False, mssql.ENCRYPT_OFF, mssql.ENCRYPT_OFF, 'login'),
    (True, False, mssql.ENCRYPT_ON, mssql.ENCRYPT_ON, 'all'),
    (True, False, mssql.ENCRYPT_NOT_SUP, mssql.ENCRYPT_NOT_SUP, 'none'),
    (True, True, mssql.ENCRYPT_OFF, mssql.ENCRYPT_REQ, 'all'),
    (True, True, mssql.ENCRYPT_NOT_SUP, mssql.ENCRYPT_REQ, 'none'),
])
def test_tds_encryption_negotiation_table(cert, forced, client, answer, mode):
    assert mssql.negotiate(cert, forced, client) == (answer, mode)


def test_tds_client_side_of_the_negotiation():
    assert mssql.client_mode(mssql.ENCRYPT_OFF, mssql.ENCRYPT_OFF) == 'login'
    assert mssql.client_mode(mssql.ENCRYPT_ON, mssql.ENCRYPT_ON) == 'all'
    assert mssql.client_mode(mssql.ENCRYPT_ON, mssql.ENCRYPT_NOT_SUP) == 'none'
    assert mssql.client_mode(mssql.ENCRYPT_ON, mssql.ENCRYPT_NOT_SUP, required=True) is None
    assert mssql.client_mode(mssql.ENCRYPT_ON, mssql.ENCRYPT_OFF) is None
    assert mssql.client_mode(mssql.ENCRYPT_NOT_SUP, mssql.ENCRYPT_REQ) is None


def test_tds_login7_round_trip_deobfuscates_the_password():
    payload = mssql.encode_login7('safeq', 'pä55 wörd', 'spool', 'app', 'db.lab')
    login = mssql.decode_login7(payload)
    assert (login.user, login.password, login.database, login.app, login.server) == \
        ('safeq', 'pä55 wörd', 'spool', 'app', 'db.lab')
    assert login.tds_version == mssql.TDS_7_4 and not login.integrated
    assert b'p\x00\xe4' not in payload   # obfuscated on the wire


def test_tds_packets_split_and_reassemble():
    payload = bytes(range(256)) * 40
    data = mssql.packets(mssql.SQL_BATCH, payload, packet_size=512)
    assert data.count(b'\x01\x00\x02\x00') >= 19     # full packets: type 1, status 0, length 512
    assert tds_messages(data) == [(mssql.SQL_BATCH, payload)]


def tds_login(server, transport, password='safeq-lab-pw'):
    server.dataReceived(mssql.packets(mssql.PRELOGIN, mssql.encode_prelogin(
        [(mssql.PL_VERSION, b'\0' * 6), (mssql.PL_ENCRYPTION, bytes([mssql.ENCRYPT_NOT_SUP]))])))
    take(transport)
    server.dataReceived(mssql.packets(mssql.LOGIN7, mssql.encode_login7('safeq', password, 'safeq', 'test', 'x')))
    (kind, payload), = tds_messages(take(transport))
    return list(mssql.TokenReader(payload).tokens())


def batch(server, transport, sql: str):
    headers = struct.pack('<IIHQI', 22, 18, 2, 0, 1)
    server.dataReceived(mssql.packets(mssql.SQL_BATCH, headers + sql.encode('utf-16-le')))
    (kind, payload), = tds_messages(take(transport))
    return list(mssql.TokenReader(payload).tokens())


def test_tds_login_then_batches_with_error_in_between():
    server, transport, records = connect(mssql)
    tokens = tds_login(server, transport)
    assert [t for t, _ in tokens] == [mssql.TOKEN_ENVCHANGE, mssql.TOKEN_ENVCHANGE, mssql.TOKEN_LOGINACK,
                                      mssql.TOKEN_DONE]
    tokens = batch(server, transport, "SELECT 1; SELECT CONNECTIONPROPERTY('client_net_address')")
    assert [v for t, v in tokens if t == mssql.TOKEN_ROW] == [[1], ['198.18.0.9']]
    assert [v for t, v in tokens if t == mssql.TOKEN_DONE] == [mssql.DONE_COUNT | mssql.DONE_MORE, mssql.DONE_COUNT]
    tokens = batch(server, transport, 'EXEC xp_cmdshell')
    assert mssql.message_text(tokens[0][1])[0] == 50000 and tokens[-1] == (mssql.TOKEN_DONE, mssql.DONE_ERROR)
    tokens = batch(server, transport, 'select @@version')
    assert 'safeq-lab database-lab' in [v for t, v in tokens if t == mssql.TOKEN_ROW][0][0]
    assert [r['op'] for r in records] == ['prelogin', 'login', 'batch', 'batch', 'batch']
    assert not transport.disconnecting


def test_tds_wrong_password_is_error_18456_and_close():
    server, transport, records = connect(mssql)
    tokens = tds_login(server, transport, password='nope')
    assert mssql.message_text(tokens[0][1]) == (18456, "Login failed for user 'safeq'.")
    assert transport.disconnecting and records[-1]['result'] == 'failed'


@pytest.mark.parametrize('data', [
    b'GET / HTTP/1.0\r\n\r\n',                          # not TDS
    b'\x12\x01\x00\x04\x00\x00\x00\x00',                # packet length below the header
    mssql.packets(mssql.SQL_BATCH, b'SELECT 1'),        # a batch before login
    mssql.packets(mssql.LOGIN7, b'\x00' * 20),          # truncated LOGIN7
    mssql.packets(mssql.PRELOGIN, b'\x00\x00\x50\x00\x06\xff'),   # option past the end
])
def test_tds_garbage_closes_without_traceback(data):
    server, transport, _ = connect(mssql)
    server.dataReceived(data)
    assert transport.disconnecting


def test_tds_oversized_message_closes():
    server, transport, _ = connect(mssql)
    chunk = b'\x12\x00\x7f\xff\x00\x00\x00\x00' + b'x' * (32767 - 8)
    for _ in range(40):
        server.dataReceived(chunk)
        if transport.disconnecting:
            break
    assert transport.disconnecting


def test_tds_forced_encryption_hangs_up_on_a_client_without_tls(pki):
    server, transport, _ = connect(mssql, 'starttls', persona(pki))
    server.dataReceived(mssql.packets(mssql.PRELOGIN, mssql.encode_prelogin(
        [(mssql.PL_ENCRYPTION, bytes([mssql.ENCRYPT_NOT_SUP]))])))
    (kind, payload), = tds_messages(take(transport))
    assert mssql.decode_prelogin(payload)[mssql.PL_ENCRYPTION] == bytes([mssql.ENCRYPT_REQ])
    assert transport.disconnecting


# --- stub against probe on loopback ----------------------------------------------------------

def exchange(monkeypatch, protocol: str, security: str, who: Persona, ca_file: str = '', **options):
    reactor = tls_clocked_reactor(monkeypatch)
    records: list[dict] = []

    def go(reactor):
        port = protocols.listen(reactor, Listener('tcp', 0, protocol, security), who,
                                on_request=records.append, interface='127.0.0.1')
        target = ProbeTarget(id='t', host='127.0.0.1', transport='tcp', protocol=protocol,
                             port=port.getHost().port, security=security, timeout=5.0,
                             server_name='stub.lab', ca_file=ca_file, options=options)
        d = protocols.probe(reactor, target)
        d.addBoth(lambda result: port.stopListening().addCallback(lambda _: result))
        return d

    return run_on_reactor(reactor, go, limit=15), records


@pytest.mark.parametrize('protocol', ['pgsql', 'mssql'])
def test_plain_probe_reads_one_and_the_peer(monkeypatch, protocol):
    result, records = exchange(monkeypatch, protocol, 'plain', persona())
    assert result.outcome == 'ok', result.detail
    assert result.peer_seen == '127.0.0.1' and 'safeq-lab database-lab' in result.detail
    assert 'SELECT 1 → 1' in result.exchange and result.tls_issuer == ''
    assert all(r['tls'] is False for r in records)


@pytest.mark.parametrize('protocol', ['pgsql', 'mssql'])
def test_optional_probe_upgrades_and_verifies(monkeypatch, pki, protocol):
    result, records = exchange(monkeypatch, protocol, 'optional', persona(pki), ca_file=pki['ca_file'])
    assert result.outcome == 'ok', result.detail
    assert result.tls_issuer and ('+ TLS' in result.exchange or 'SSLRequest→S' in result.exchange)
    assert [r for r in records if r['op'] in ('login', 'batch', 'query')][-1]['tls'] is True


@pytest.mark.parametrize('protocol', ['pgsql', 'mssql'])
def test_optional_probe_without_server_certificate_stays_plain(monkeypatch, pki, protocol):
    result, records = exchange(monkeypatch, protocol, 'optional', persona(), ca_file=pki['ca_file'])
    assert result.outcome == 'ok', result.detail
    assert result.tls_issuer == '' and ('→N' in result.exchange or 'NOT_SUP' in result.exchange)


@pytest.mark.parametrize('protocol', ['pgsql', 'mssql'])
def test_wrong_ca_is_a_certificate_error(monkeypatch, pki, other_pki, protocol):
    result, _ = exchange(monkeypatch, protocol, 'optional', persona(pki), ca_file=other_pki['ca_file'])
    assert result.outcome == 'protocol_error' and 'certificate' in result.detail, result.detail


@pytest.mark.parametrize('protocol', ['pgsql', 'mssql'])
def test_wrong_password_is_a_protocol_error(monkeypatch, protocol):
    result, records = exchange(monkeypatch, protocol, 'plain', persona(), password='nope')
    assert result.outcome == 'protocol_error'
    assert '28P01' in result.detail or '18456' in result.detail
    assert [r['result'] for r in records if r['op'] == 'login'] == ['failed']


@pytest.mark.parametrize('protocol', ['pgsql', 'mssql'])
def test_forced_tls_port(monkeypatch, pki, protocol):
    result, records = exchange(monkeypatch, protocol, 'starttls', persona(pki), ca_file=pki['ca_file'])
    assert result.outcome == 'ok', result.detail
    assert result.tls_issuer


def test_tds_login_only_encryption(monkeypatch, pki):
    result, records = exchange(monkeypatch, 'mssql', 'optional', persona(pki), ca_file=pki['ca_file'],
                               encrypt='off')
    assert result.outcome == 'ok', result.detail
    assert 'encryption OFF→OFF + TLS' in result.exchange
    login, query = [r for r in records if r['op'] in ('login', 'batch')]
    assert (login['tls'], query['tls']) == (True, False)


@pytest.mark.parametrize('protocol', ['pgsql', 'mssql'])
def test_stub_survives_garbage_and_still_answers(monkeypatch, pki, protocol):
    reactor = tls_clocked_reactor(monkeypatch)
    who = persona(pki)

    def go(reactor):
        port = protocols.listen(reactor, Listener('tcp', 0, protocol, 'optional'), who, interface='127.0.0.1')
        number = port.getHost().port

        # The kernel completes the connection from the backlog; the stub reads it once the probe runs.
        with socket.create_connection(('127.0.0.1', number), timeout=2) as garbage:
            garbage.sendall(b'\x00\xff\x16\x03GARBAGE \r\n\r\n' * 64)
        target = ProbeTarget(id='t', host='127.0.0.1', transport='tcp', protocol=protocol, port=number,
                             security='optional', timeout=5.0, server_name='stub.lab', ca_file=pki['ca_file'])
        d = protocols.probe(reactor, target)
        d.addBoth(lambda result: port.stopListening().addCallback(lambda _: result))
        return d

    result = run_on_reactor(reactor, go, limit=15)
    assert result.outcome == 'ok', result.detail


def test_listen_refuses_implicit_tls_and_udp(pki):
    for module in (pgsql, mssql):
        with pytest.raises(ValueError):
            module.listen(MemoryReactorClock(), Listener('tcp', 0, 'x', 'tls'), persona(pki))
        with pytest.raises(ValueError):
            module.listen(MemoryReactorClock(), Listener('udp', 0, 'x', 'plain'), persona(pki))


@pytest.mark.parametrize('protocol, transport, options, says', [
    ('pgsql', 'udp', {}, 'pgsql runs over TCP, not udp'),
    ('mssql', 'udp', {}, 'mssql runs over TCP, not udp'),
    ('mssql', 'tcp', {'encrypt': 'maybe'}, "options.encrypt must be 'on', 'off' or 'none'"),
])
def test_bad_target_is_one_clear_error_row(protocol, transport, options, says):
    target = ProbeTarget(id='t', host='127.0.0.1', transport=transport, protocol=protocol, port=1,
                         options=options)
    results = []
    protocols.probe(MemoryReactorClock(), target).addCallback(results.append)
    assert [(r.outcome, r.detail[:len(says)]) for r in results] == [('error', says)]
