"""etcd (v3 JSON gateway), Infinispan REST v2 and JGroups discovery: stubs and probes.

Server logic is driven in memory (a Site over a StringTransport with a MemoryReactorClock, the
JGroups codec on bytes); the probes run against the stubs on 127.0.0.1 on a fresh reactor, for
every (transport, security) the catalog gives these protocols.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import uuid

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from emulator import protocols
from emulator.catalog import load_catalog
from emulator.protocols import etcd, http, infinispan, jgroups, timesync
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import free_port, run_on_fresh_reactor

SERVER = IPv4Address('TCP', '198.18.0.2', 2377)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)
TS = Persona(host='ts-1', roles=('terminal-server',), identity={'http_server': 'SafeQ-TerminalServer'})
ISPN = Persona(host='ispn-1', roles=('infinispan',))


# --- helpers ------------------------------------------------------------------------------

def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        head, _, rest = data.partition(b'\r\n\r\n')
        lines = head.decode('latin-1').split('\r\n')
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(':')
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get('content-length', 0))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


class Conn:
    """One in-memory HTTP connection to ``root`` mounted with http.lab_site."""

    def __init__(self, root, persona: Persona) -> None:
        self.records: list[dict] = []
        site = http.lab_site(root, persona, reactor=MemoryReactorClock(), on_request=self.records.append)
        self.proto = site.buildProtocol(CLIENT)
        self.transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
        self.proto.makeConnection(self.transport)

    def send(self, method: str, path: str, body: bytes = b'', headers: dict[str, str] | None = None):
        lines = [f'{method} {path} HTTP/1.1', 'Host: stub.lab', f'Content-Length: {len(body)}']
        lines += [f'{k}: {v}' for k, v in (headers or {}).items()]
        self.transport.clear()
        self.proto.dataReceived(('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body)
        [response] = parse_responses(self.transport.value())
        return response

    def close(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError('test over')))


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def etcd_call(conn: Conn, op: str, body: dict | bytes):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, headers, data = conn.send('POST', f'/v3/kv/{op}', raw, {'Content-Type': 'application/json'})
    return status, json.loads(data) if headers.get('content-type', '').startswith('application/json') else data


def probe_stub(module, persona: Persona, transport: str = 'tcp', security: str = 'plain',
               protocol: str | None = None, **target):
    """Serve ``module`` on a free loopback port and run its probe (or another module's) at it."""
    records: list[dict] = []
    protocol = protocol or module.PROTOCOL_IDS[0]

    def go(reactor):
        port = module.listen(reactor, Listener(transport, 0, module.PROTOCOL_IDS[0], security), persona,
                             records.append, interface='127.0.0.1')
        t = ProbeTarget(id='t', host='127.0.0.1', transport=transport, protocol=protocol,
                        port=port.getHost().port, security=security, **{'timeout': 3.0, **target})

        async def run():
            try:
                return await protocols.probe(reactor, t)
            finally:
                await port.stopListening()
        return Deferred.fromCoroutine(run())

    return run_on_fresh_reactor(go), records


# --- etcd: server -------------------------------------------------------------------------

def test_etcd_put_range_delete_with_growing_revisions():
    conn = Conn(etcd.EtcdGateway(TS), TS)
    status, put = etcd_call(conn, 'put', {'key': b64('/safeq/locks/mfd1'), 'value': b64('alice')})
    assert status == 200 and put['header']['revision'] == '2' and set(put) == {'header'}
    assert put['header']['raft_term'] == '2' and put['header']['member_id'].isdigit()
    status, again = etcd_call(conn, 'put', {'key': b64('/safeq/locks/mfd1'), 'value': b64('bob'), 'prev_kv': True})
    assert again['header']['revision'] == '3' and base64.b64decode(again['prev_kv']['value']) == b'alice'
    status, got = etcd_call(conn, 'range', {'key': b64('/safeq/locks/mfd1')})
    [kv] = got['kvs']
    assert status == 200 and got['count'] == '1'
    assert base64.b64decode(kv['value']) == b'bob' and base64.b64decode(kv['key']) == b'/safeq/locks/mfd1'
    assert (kv['create_revision'], kv['mod_revision'], kv['version']) == ('2', '3', '2')
    status, gone = etcd_call(conn, 'deleterange', {'key': b64('/safeq/locks/mfd1')})
    assert gone == {'header': {**gone['header'], 'revision': '4'}, 'deleted': '1'}
    _, missing = etcd_call(conn, 'range', {'key': b64('/safeq/locks/mfd1')})
    assert set(missing) == {'header'} and missing['header']['revision'] == '4'
    _, nothing = etcd_call(conn, 'deleterange', {'key': b64('/nope')})
    assert set(nothing) == {'header'} and nothing['header']['revision'] == '4'
    assert [(r['op'], r['key'], r['status']) for r in conn.records] == [
        ('put', '/safeq/locks/mfd1', 200), ('put', '/safeq/locks/mfd1', 200), ('range', '/safeq/locks/mfd1', 200),
        ('deleterange', '/safeq/locks/mfd1', 200), ('range', '/safeq/locks/mfd1', 200), ('deleterange', '/nope', 200)]
    assert all(r['peer'] == CLIENT.host and r['port'] == SERVER.port for r in conn.records)


def test_etcd_prefix_ranges_limit_keys_only_and_count_only():
    conn = Conn(etcd.EtcdGateway(TS), TS)
    for name in ('a', 'b', 'c'):
        etcd_call(conn, 'put', {'key': b64(f'/locks/{name}'), 'value': b64(name)})
    etcd_call(conn, 'put', {'key': b64('/other'), 'value': b64('x')})
    _, got = etcd_call(conn, 'range', {'key': b64('/locks/'), 'range_end': b64('/locks0'), 'limit': 2})
    assert [base64.b64decode(kv['key']) for kv in got['kvs']] == [b'/locks/a', b'/locks/b']
    assert got['count'] == '3' and got['more'] is True
    _, keys = etcd_call(conn, 'range', {'key': b64('/locks/'), 'range_end': b64('/locks0'), 'keys_only': True})
    assert all('value' not in kv for kv in keys['kvs'])
    _, counted = etcd_call(conn, 'range', {'key': b64('\0'), 'range_end': b64('\0'), 'count_only': True})
    assert counted['count'] == '4' and 'kvs' not in counted
    _, gone = etcd_call(conn, 'deleterange', {'key': b64('/locks/'), 'range_end': b64('/locks0'), 'prev_kv': True})
    assert gone['deleted'] == '3' and len(gone['prev_kvs']) == 3


@pytest.mark.parametrize('body, status, code, message', [
    ({'value': b64('x')}, 400, 3, 'etcdserver: key is not provided'),
    ({'key': '!!!not base64'}, 400, 3, 'illegal base64'),
    ({'key': 5}, 400, 3, 'expected base64'),
    (b'{"key": ', 400, 3, 'invalid JSON'),
    (b'[' * 1000 + b']' * 1000, 400, 3, 'nested too deeply'),
    (b'[1, 2]', 400, 3, 'must be a JSON object'),
    ({'key': b64('k'), 'lease': '7587'}, 404, 5, 'requested lease not found'),
    ({'key': b64('k'), 'lease': 'soon'}, 400, 3, 'expected int64'),
    ({'key': b64('k'), 'prev_kv': 'yes'}, 400, 3, 'expected bool'),
    ({'key': b64('k'), 'value': b64(b'v' * (etcd.MAX_VALUE + 1))}, 400, 3, 'request is too large'),
    ({'key': b64(b'k' * (etcd.MAX_KEY + 1))}, 400, 3, 'request is too large'),
])
def test_etcd_bad_requests_get_grpc_errors_and_the_stub_keeps_serving(body, status, code, message):
    conn = Conn(etcd.EtcdGateway(TS), TS)
    got_status, error = etcd_call(conn, 'put', body)
    assert got_status == status and error['code'] == code and message in error['message']
    assert error['error'] == error['message']
    assert etcd_call(conn, 'put', {'key': b64('k'), 'value': b64('v')})[0] == 200


def test_etcd_version_health_wrong_method_and_unknown_path():
    conn = Conn(etcd.EtcdGateway(TS), TS)
    status, headers, body = conn.send('GET', '/version')
    assert status == 200 and json.loads(body) == {'etcdserver': etcd.SERVER_VERSION, 'etcdcluster': '3.5.0'}
    assert headers['x-lab-host'] == 'ts-1' and headers['x-lab-peer'] == CLIENT.host
    assert json.loads(conn.send('GET', '/health')[2]) == {'health': 'true', 'reason': ''}
    status, _, body = conn.send('GET', '/v3/kv/put')
    assert status == 405 and json.loads(body)['code'] == 12
    assert conn.send('GET', '/v2/keys/x')[:3:2] == (404, b'404 page not found\n')
    assert conn.send('POST', '/v3/kv/range', b'x' * (etcd.MAX_BODY + 1))[0] == 400


def test_etcd_store_is_bounded_least_recently_written_first():
    store = etcd.KeyValueStore(max_keys=3)
    for name in (b'a', b'b', b'c'):
        store.put(name, name)
    store.put(b'a', b'again')           # rewritten: now the newest
    store.put(b'd', b'd')
    assert [kv.key for kv in store.range(b'\0', b'\0')] == [b'a', b'c', b'd']
    assert store.revision == 6


# --- infinispan: server -------------------------------------------------------------------

def ispn_conn(persona: Persona = ISPN) -> Conn:
    return Conn(infinispan.RestServer(MemoryReactorClock(), infinispan.CacheStore(infinispan._caches_of(persona))),
                persona)


def test_infinispan_put_get_head_delete_keep_the_media_type():
    conn = ispn_conn()
    doc = b'{"id": "J-1", "pages": 3}'
    path = '/rest/v2/caches/jobs/J%2F1'        # a '/' in a key is percent-encoded
    assert conn.send('PUT', path, doc, {'Content-Type': 'application/json; charset=UTF-8'})[0] == 204
    status, headers, body = conn.send('GET', path)
    assert status == 200 and body == doc and headers['content-type'] == 'application/json; charset=UTF-8'
    assert headers['etag'].startswith('"') and headers['last-modified'].endswith('GMT')
    status, headers, body = conn.send('HEAD', path)
    assert status == 200 and body == b''
    assert conn.send('POST', path, b'x', {'Content-Type': 'text/plain'})[0] == 409
    assert conn.send('PUT', '/rest/v2/caches/jobs/raw', b'\x00\x01')[0] == 204
    assert conn.send('GET', '/rest/v2/caches/jobs/raw')[1]['content-type'] == 'application/octet-stream'
    assert json.loads(conn.send('GET', '/rest/v2/caches/jobs?action=keys')[2]) == ['J/1', 'raw']
    assert json.loads(conn.send('GET', '/rest/v2/caches/jobs?action=size')[2]) == 2
    assert conn.send('DELETE', path)[0] == 204
    assert conn.send('GET', path)[:3:2] == (404, b'')
    assert conn.send('DELETE', path)[0] == 404
    assert [r['op'] for r in conn.records] == ['put', 'get', 'head', 'create', 'put', 'get', 'keys', 'size',
                                               'delete', 'get', 'delete']
    assert conn.records[0]['cache'] == 'jobs' and conn.records[0]['key'] == 'J/1' and conn.records[0]['stored'] == len(doc)


def test_infinispan_caches_server_and_errors():
    conn = ispn_conn(Persona(host='js', roles=('js-infinispan',), identity={'caches': 'jobs, tokens'}))
    assert json.loads(conn.send('GET', '/rest/v2/caches')[2]) == ['jobs', 'tokens']
    version = json.loads(conn.send('GET', '/rest/v2/server')[2])['version']
    assert version.startswith("Infinispan '") and '14.0.' in version
    assert conn.send('PUT', '/rest/v2/caches/nope/k', b'x')[0] == 404
    assert conn.send('POST', '/rest/v2/caches/nope', b'<config/>')[0] == 200
    assert conn.send('POST', '/rest/v2/caches/nope', b'')[0] == 409
    assert conn.send('PUT', '/rest/v2/caches/nope/k', b'x')[0] == 204
    assert conn.send('DELETE', '/rest/v2/caches/nope')[0] == 200
    assert conn.send('GET', '/rest/v2/caches/nope/k')[0] == 404
    assert conn.send('GET', '/rest/v2/caches/jobs')[0] == 400
    assert conn.send('PATCH', '/rest/v2/caches/jobs/k')[0] == 405
    assert conn.send('GET', '/rest/v1/caches')[0] == 404
    assert conn.send('GET', '/rest/v2/caches/jobs/k/extra')[0] == 404
    assert conn.send('PUT', '/rest/v2/caches/jobs/' + 'k' * (infinispan.MAX_NAME + 1), b'x')[0] == 400
    assert conn.send('PUT', '/rest/v2/caches/jobs/big', b'x' * (infinispan.MAX_VALUE + 1))[0] == 413
    assert conn.send('PUT', '/rest/v2/caches/jobs/k', b'still serving')[0] == 204


def test_infinispan_store_is_bounded(monkeypatch):
    monkeypatch.setattr(infinispan, 'MAX_ENTRIES', 3)
    monkeypatch.setattr(infinispan, 'MAX_STORE', 25)
    store = infinispan.CacheStore(('jobs', 'other'))
    for key in (b'a', b'b', b'c', b'd'):
        store.put('jobs', key, infinispan.Entry(b'12345', 'text/plain', 0.0))
    assert store.keys('jobs') == [b'b', b'c', b'd']
    store.put('other', b'big', infinispan.Entry(b'x' * 20, 'text/plain', 0.0))
    assert store.keys('jobs') == [b'd'] and store.keys('other') == [b'big']


def test_job_metadata_is_json_of_the_asked_size():
    for size in (0, 50, 1024, 5000):
        doc = infinispan.job_metadata('job-1', size)
        assert json.loads(doc)['id'] == 'job-1' and len(doc) == max(size, len(infinispan.job_metadata('job-1', 0)))


# --- JGroups: codec and answer ------------------------------------------------------------

ME = jgroups.Member(name='ispn-1', address=uuid.UUID(int=0x1234), cluster='ISPN')
ASKER = uuid.UUID(int=0xabcd)


def request(cluster: str | None = 'ISPN', kind: int = jgroups.GET_MBRS_REQ) -> jgroups.Discovery:
    data = jgroups.PingData(sender=ASKER, flags=0, logical_name='ispn-2',
                            physical=jgroups.IpAddress('198.18.0.22', 7800))
    return jgroups.Discovery(type=kind, cluster=cluster, sender=ASKER, data=data, initial=True,
                             protocol_id=jgroups.TCPPING_ID)


def test_jgroups_version_and_preamble_bytes():
    assert jgroups.encode_version(5, 2, 12) == 0x288c == jgroups.OUR_VERSION
    assert jgroups.decode_version(0x288c) == (5, 2, 12)
    assert jgroups.compatible(jgroups.encode_version(5, 2, 0)) and not jgroups.compatible(jgroups.encode_version(5, 3, 0))
    preamble = jgroups.encode_preamble(jgroups.IpAddress('198.18.0.22', 7800))
    # cookie | version | address size 7 | IpAddress: length 4, 198.18.0.22, port 7800
    assert preamble == b'bela' + bytes.fromhex('288c 0007 04 c6120016 1e78')
    assert jgroups.decode_preamble(preamble + b'rest') == (0x288c, jgroups.IpAddress('198.18.0.22', 7800), 15)
    for cut in range(len(preamble)):
        with pytest.raises(jgroups.Incomplete):
            jgroups.decode_preamble(preamble[:cut])


@pytest.mark.parametrize('data, reason', [
    (b'GET / HTTP/1.1\r\n', 'cookie'),
    (b'bel\x00', 'cookie'),
    (b'bela' + struct.pack('>hh', jgroups.encode_version(4, 2, 0), 7), 'not binary compatible'),
    (b'bela' + struct.pack('>hh', jgroups.OUR_VERSION, 7) + b'\x05', 'IP address of 5 bytes'),
])
def test_jgroups_bad_preambles(data, reason):
    with pytest.raises(ValueError, match=reason):
        jgroups.decode_preamble(data)


def test_jgroups_discovery_round_trip_and_layout():
    message = request()
    data = jgroups.encode_message(message)
    assert jgroups.decode_message(data) == message
    # version | tp flags | BytesMessage | leading: sender only | flags | UUID sender | 1 header: TCPPING, magic 53
    assert data[:8] == bytes.fromhex('288c 00 0000 02 0000')
    assert data[8:25] == b'\x02' + ASKER.bytes
    assert data[25:31] == struct.pack('>hhh', 1, 10, 53)
    assert data[31:40] == b'\x01' + b'\x01\x00\x04ISPN' + b'\x01'     # GET_MBRS_REQ, cluster, initial
    reply, fields = jgroups.answer(ME, message, jgroups.IpAddress('198.18.0.21', 7800))
    assert fields == {'member': 'ispn-2', 'cluster': 'ISPN', 'version': '5.2.12', 'op': 'discovery', 'answered': True}
    decoded = jgroups.decode_message(jgroups.encode_message(reply))
    assert decoded == reply and decoded.type == jgroups.GET_MBRS_RSP and decoded.dest == ASKER
    assert decoded.data.logical_name == 'ispn-1' and decoded.data.physical == jgroups.IpAddress('198.18.0.21', 7800)
    assert decoded.data.flags == jgroups.IS_SERVER | jgroups.IS_COORD and decoded.protocol_id == jgroups.TCPPING_ID


def test_jgroups_answer_drops_other_clusters_and_other_types():
    assert jgroups.answer(ME, request(cluster='other'), jgroups.IpAddress('198.18.0.21', 1))[0] is None
    reply, fields = jgroups.answer(ME, request(kind=jgroups.GET_MBRS_RSP), jgroups.IpAddress('198.18.0.21', 1))
    assert reply is None and fields['op'] == 'ignored'


def test_jgroups_decode_rejects_what_it_cannot_read():
    good = jgroups.encode_message(request())
    for cut in range(len(good)):
        with pytest.raises(ValueError):
            jgroups.decode_message(good[:cut])
    with pytest.raises(ValueError, match='after the message'):
        jgroups.decode_message(good + b'x')
    with pytest.raises(ValueError, match='message lists'):
        jgroups.decode_message(good[:2] + b'\x01' + good[3:])
    with pytest.raises(ValueError, match='not a PingHeader'):
        jgroups.decode_message(good[:29] + struct.pack('>h', 61) + good[31:])
    with pytest.raises(ValueError, match='address kind'):
        jgroups.decode_message(good[:8] + b'\x04' + good[9:])


class TcpStub:
    """The JGroups TCP stub over a StringTransport."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        factory = jgroups._JGroupsFactory(MemoryReactorClock(), ISPN, self.records.append)
        self.proto = factory.buildProtocol(CLIENT)
        self.transport = StringTransport(hostAddress=IPv4Address('TCP', '198.18.0.21', 7800), peerAddress=CLIENT)
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value()


def test_jgroups_tcp_stub_answers_frames_byte_by_byte_and_ignores_garbage_frames():
    stub = TcpStub()
    data = jgroups.encode_preamble(jgroups.IpAddress('198.18.0.22', 7800)) + jgroups.frame(b'\x00garbage')
    data += jgroups.frame(jgroups.encode_message(request()))
    answer = b''.join(stub.send(data[i:i + 1]) for i in range(len(data)))
    (length,) = struct.unpack('>i', answer[:4])
    reply = jgroups.decode_message(answer[4:4 + length])
    assert len(answer) == 4 + length and reply.data.logical_name == 'ispn-1'
    assert reply.data.physical == jgroups.IpAddress('198.18.0.21', 7800)
    assert not stub.transport.disconnecting
    assert [r['op'] for r in stub.records] == ['ignored', 'discovery']
    assert stub.records[1]['sender'] == '198.18.0.22:7800' and stub.records[1]['peer'] == CLIENT.host


@pytest.mark.parametrize('data', [
    b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03',          # a TLS ClientHello
    jgroups.encode_preamble(jgroups.IpAddress('198.18.0.22', 1), jgroups.encode_version(4, 0, 0)),
    jgroups.encode_preamble(jgroups.IpAddress('198.18.0.22', 1)) + struct.pack('>i', jgroups.MAX_FRAME + 1),
    jgroups.encode_preamble(jgroups.IpAddress('198.18.0.22', 1)) + struct.pack('>i', -5),
])
def test_jgroups_tcp_stub_closes_on_a_bad_preamble_or_frame(data):
    stub = TcpStub()
    assert stub.send(data) == b''
    assert stub.transport.disconnecting and stub.records[-1]['op'] == 'rejected'
    assert stub.send(jgroups.frame(jgroups.encode_message(request()))) == b''   # nothing after the close


def test_member_matches_lab_names():
    assert jgroups.member_matches('ispn-1', 'ispn-1.lab') and jgroups.member_matches('ispn-1', 'ispn-1')
    assert not jgroups.member_matches('ispn-2', 'ispn-1.lab')


# --- probes over loopback -----------------------------------------------------------------

def catalog_kinds(protocol: str) -> set[tuple[str, str]]:
    return {(ep.transport, ep.security) for flow in load_catalog().flows for ep in flow.endpoints
            if ep.protocol == protocol}


def test_registry_and_catalog_kinds():
    assert protocols.module_for('etcd') is etcd and protocols.module_for('infinispan') is infinispan
    assert protocols.module_for('jgroups') is jgroups
    assert catalog_kinds('etcd') == catalog_kinds('infinispan') == {('tcp', 'plain')}
    assert catalog_kinds('jgroups') <= {(t, s) for t in ('tcp', 'udp') for s in ('plain', 'optional')}


def test_etcd_probe_locks_reads_and_releases():
    result, records = probe_stub(etcd, TS, server_name='ts-1.lab', options={'device': 'mfd-7'})
    assert result.outcome == 'ok', result
    assert 'lock /safeq/locks/mfd-7 taken at revision 2' in result.detail and 'answered by ts-1' in result.detail
    assert result.peer_seen == '127.0.0.1' and result.exchange.count('etcd POST /v3/kv/') == 3
    assert [(r['op'], r['key']) for r in records] == [('put', '/safeq/locks/mfd-7'), ('range', '/safeq/locks/mfd-7'),
                                                       ('deleterange', '/safeq/locks/mfd-7')]


def test_infinispan_probe_stores_reads_back_and_removes():
    result, records = probe_stub(infinispan, ISPN, size=3000)
    assert result.outcome == 'ok', result
    assert result.detail.startswith('3000 B job metadata stored in cache jobs') and 'answered by ispn-1' in result.detail
    assert [r['op'] for r in records] == ['put', 'get', 'delete'] and records[0]['stored'] == 3000


def test_http_probes_at_the_wrong_service_are_protocol_errors():
    result, _ = probe_stub(infinispan, ISPN, protocol='etcd')
    assert result.outcome == 'protocol_error' and 'HTTP 404' in result.detail
    result, _ = probe_stub(etcd, TS, protocol='infinispan')
    assert result.outcome == 'protocol_error' and 'HTTP 404' in result.detail
    result, _ = probe_stub(infinispan, ISPN, options={'cache': 'nope'})
    assert result.outcome == 'protocol_error' and 'HTTP 404' in result.detail


@pytest.mark.parametrize('transport, security', [('tcp', 'plain'), ('tcp', 'optional'),
                                                 ('udp', 'plain'), ('udp', 'optional')])
def test_jgroups_members_see_each_other(transport, security):
    result, records = probe_stub(jgroups, ISPN, transport, security, server_name='ispn-1.lab')
    assert result.outcome == 'ok', result
    assert result.detail.startswith('coordinator ispn-1 of cluster ISPN at 127.0.0.1:')
    assert result.exchange.endswith('-> GET_MBRS_RSP from ispn-1')
    assert ('optional TLS: plain' in result.exchange) == (security == 'optional')
    [record] = records
    assert record['op'] == 'discovery' and record['answered'] and record['member'] == jgroups.PROBE_NAME
    assert record['transport'] == transport and record['peer'] == '127.0.0.1'


@pytest.mark.parametrize('transport', ['tcp', 'udp'])
def test_jgroups_probe_checks_the_member_name(transport):
    result, _ = probe_stub(jgroups, ISPN, transport, server_name='ispn-2.lab')
    assert result.outcome == 'protocol_error' and "member 'ispn-1' answered, expected 'ispn-2.lab'" in result.detail


@pytest.mark.parametrize('transport, outcome', [('tcp', 'silent'), ('udp', 'timeout')])
def test_jgroups_other_cluster_is_not_answered(transport, outcome):
    result, records = probe_stub(jgroups, ISPN, transport, timeout=0.5, options={'cluster': 'other'})
    assert result.outcome == outcome and records[0]['answered'] is False


def test_jgroups_probe_of_a_non_jgroups_port():
    # An RFC 868 time server sends 4 bytes and closes: no JGroups frame.
    result, _ = probe_stub(timesync, TS, protocol='jgroups')
    assert result.outcome == 'protocol_error', result
    # An HTTP server waits for a request line that never comes.
    result, _ = probe_stub(etcd, TS, protocol='jgroups', timeout=0.5)
    assert result.outcome == 'silent', result


def test_probes_of_closed_ports_are_refused():
    def go(reactor):
        async def run():
            out = []
            for protocol, transport in (('etcd', 'tcp'), ('infinispan', 'tcp'), ('jgroups', 'tcp'), ('jgroups', 'udp')):
                kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
                out.append(await protocols.probe(reactor, ProbeTarget(
                    id='x', host='127.0.0.1', transport=transport, protocol=protocol, port=free_port(kind), timeout=2.0)))
            return out
        return Deferred.fromCoroutine(run())
    assert [r.outcome for r in run_on_fresh_reactor(go)] == ['refused'] * 4


def test_listeners_refuse_what_they_cannot_serve():
    with pytest.raises(ValueError):
        jgroups.listen(MemoryReactorClock(), Listener('tcp', 0, 'jgroups', 'tls'), ISPN)


# --- HTTP-based protocols sharing an HTTP port ------------------------------------------------

def probe_shared_http_port(also: tuple[str, ...], protocol: str):
    """A WebDAV listener that also serves `also`, probed as `protocol` on the same port."""
    import roles

    site_roles = ('spooler-controller', 'infinispan', 'terminal-server')
    persona = Persona(host='site-1', roles=site_roles, identity=roles.identity(site_roles))

    def go(reactor):
        port = http.listen(reactor, Listener('tcp', 0, 'webdav', 'plain', also=also), persona,
                           interface='127.0.0.1')
        target = ProbeTarget(id='t', host='127.0.0.1', transport='tcp', protocol=protocol,
                             port=port.getHost().port, timeout=3.0)

        async def run():
            try:
                return await protocols.probe(reactor, target)
            finally:
                await port.stopListening()
        return Deferred.fromCoroutine(run())

    return run_on_fresh_reactor(go)


@pytest.mark.parametrize('protocol', ['infinispan', 'etcd'])
def test_an_http_port_shared_with_an_http_based_protocol_serves_both(protocol):
    assert probe_shared_http_port((protocol,), protocol).outcome == 'ok'
    assert probe_shared_http_port((protocol,), 'webdav').outcome == 'ok'
    # without the mount the HTTP site has no such surface: the probe reads a 404
    assert probe_shared_http_port((), protocol).outcome == 'protocol_error'


def test_roles_mount_http_based_protocols_on_the_port_they_share():
    import roles

    listeners = {(l.transport, l.port): l for l in roles.listeners(['terminal-server', 'infinispan'])}
    shared = [l for l in listeners.values() if 'infinispan' in l.also]
    assert shared and all(l.protocol in ('http', 'soap', 'webdav') for l in shared)
    assert Listener.from_dict(shared[0].to_dict()) == shared[0]
