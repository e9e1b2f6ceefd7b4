"""etcd, Infinispan REST and JGroups stubs against real clients.

The stubs run as ``python -m emulator.roled`` on 127.0.0.1 (tests.support.run_stub).

- etcd:       ``curl`` (package curl) speaks the v3 JSON gateway as the etcd documentation
              shows (``curl -L http://host:2379/v3/kv/put -X POST -d '{"key": ..., "value": ...}'``).
              ``etcdctl`` (package etcd-client) speaks gRPC, which the stub does not serve.
- infinispan: ``curl`` PUT/GET/HEAD/DELETE on ``/rest/v2/caches/...`` as Infinispan's REST guide does.
- jgroups:    Debian packages no JGroups client (it is a Java library), so the test sends the
              preamble and a GET_MBRS_REQ written out byte for byte with Python's socket module,
              and runs the real ``emulator.prober`` process against every listener.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import uuid

import pytest

from emulator.protocols import etcd, infinispan, jgroups, module_for
from tests.support import client_tool, free_port, probe_targets, request_log, run_stub

pytestmark = pytest.mark.interop

CLIENT_TIMEOUT = 15


@pytest.fixture(autouse=True)
def registered():
    for protocol_id, module in (('etcd', etcd), ('infinispan', infinispan), ('jgroups', jgroups)):
        assert module_for(protocol_id) is module, f'{protocol_id!r} is not served by {module.__name__}'


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """(HTTP status, response headers, body); curl must exit 0."""
    binary = client_tool('curl', 'curl')
    proc = subprocess.run([binary, '-sS', '--max-time', '10', '-D', '-', '-o', '/dev/stderr', *args],
                          capture_output=True, timeout=CLIENT_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-500:]
    lines = proc.stdout.decode('latin-1').strip().split('\r\n\r\n')[-1].split('\r\n')
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(':') for line in lines[1:])}
    return int(lines[0].split()[1]), headers, proc.stderr


@pytest.fixture(scope='module')
def stub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cluster-interop')
    ports = {'etcd': free_port(), 'infinispan': free_port(), 'jgroups-tcp': free_port(),
             'jgroups-udp': free_port(socket.SOCK_DGRAM)}
    listeners = [{'transport': 'tcp', 'port': ports['etcd'], 'protocol': 'etcd', 'security': 'plain'},
                 {'transport': 'tcp', 'port': ports['infinispan'], 'protocol': 'infinispan', 'security': 'plain'},
                 {'transport': 'tcp', 'port': ports['jgroups-tcp'], 'protocol': 'jgroups', 'security': 'optional'},
                 {'transport': 'udp', 'port': ports['jgroups-udp'], 'protocol': 'jgroups', 'security': 'plain'}]
    with run_stub(tmp, listeners, host='ispn-1', roles=('infinispan', 'terminal-server')) as log:
        yield {'ports': ports, 'log': log}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- etcd ---------------------------------------------------------------------------------

def test_etcd_lock_with_curl(stub):
    url = f'http://127.0.0.1:{stub["ports"]["etcd"]}'
    key, value = b'/safeq/locks/mfd-7', b'{"owner": "ts-1"}'
    status, _, body = curl('-X', 'POST', '-d', json.dumps({'key': b64(key), 'value': b64(value)}), f'{url}/v3/kv/put')
    revision = int(json.loads(body)['header']['revision'])
    assert status == 200 and revision >= 2
    status, _, body = curl('-d', json.dumps({'key': b64(key)}), f'{url}/v3/kv/range')
    [kv] = json.loads(body)['kvs']
    assert status == 200 and base64.b64decode(kv['value']) == value and kv['mod_revision'] == str(revision)
    status, _, body = curl('-d', json.dumps({'key': b64(key)}), f'{url}/v3/kv/deleterange')
    assert status == 200 and json.loads(body)['deleted'] == '1'
    status, _, body = curl('-d', '{"key": ""}', f'{url}/v3/kv/range')
    assert status == 400 and json.loads(body)['message'] == 'etcdserver: key is not provided'
    status, _, body = curl(f'{url}/version')
    assert status == 200 and json.loads(body)['etcdserver'].startswith('3.5.')
    records = [r for r in request_log(stub['log'], count=5) if r['port'] == stub['ports']['etcd']]
    assert [r.get('op') for r in records][:3] == ['put', 'range', 'deleterange']
    assert all(r['peer'] == '127.0.0.1' for r in records) and records[0]['key'] == key.decode()


# --- infinispan ---------------------------------------------------------------------------

def test_infinispan_cache_entry_with_curl(stub):
    url = f'http://127.0.0.1:{stub["ports"]["infinispan"]}/rest/v2'
    document = json.dumps({'id': 'J-42', 'owner': 'alice', 'pages': 3})
    status, _, _ = curl('-X', 'PUT', '-H', 'Content-Type: application/json', '--data-binary', document,
                        f'{url}/caches/jobs/J-42')
    assert status == 204
    status, headers, body = curl(f'{url}/caches/jobs/J-42')
    assert status == 200 and body == document.encode() and headers['content-type'] == 'application/json'
    status, headers, body = curl('-I', f'{url}/caches/jobs/J-42')
    assert status == 200 and headers['etag']
    status, _, body = curl(f'{url}/caches')
    assert 'jobs' in json.loads(body)
    status, _, body = curl(f'{url}/server')
    assert json.loads(body)['version'] == infinispan.SERVER_VERSION
    assert curl('-X', 'DELETE', f'{url}/caches/jobs/J-42')[0] == 204
    assert curl(f'{url}/caches/jobs/J-42')[0] == 404
    records = [r for r in request_log(stub['log'], count=7) if r['port'] == stub['ports']['infinispan']]
    assert records[0]['op'] == 'put' and records[0]['stored'] == len(document) and records[0]['peer'] == '127.0.0.1'


# --- jgroups ------------------------------------------------------------------------------

ASKER = uuid.UUID('0123456789abcdef0123456789abcdef')


def discovery_request(cluster: bytes = b'ISPN') -> bytes:
    """GET_MBRS_REQ written out by hand (see jgroups.py's docstring for the layout)."""
    name = b'interop-member'
    ping_data = (b'\x02' + ASKER.bytes + b'\x00' + b'\x01' + struct.pack('>H', len(name)) + name
                 + b'\x01' + struct.pack('>h', -1))              # physical: null; members: none
    return (struct.pack('>hBhBh', 0x288c, 0, 0, 0x02, 0) + b'\x02' + ASKER.bytes
            + struct.pack('>hhhB', 1, 10, 53, 1) + b'\x01' + struct.pack('>H', len(cluster)) + cluster + b'\x01'
            + struct.pack('>i', len(ping_data)) + ping_data)


def test_jgroups_tcp_discovery_by_hand(stub):
    port = stub['ports']['jgroups-tcp']
    with socket.create_connection(('127.0.0.1', port), timeout=5) as sock:
        sender = b'\x04' + socket.inet_aton('127.0.0.1') + struct.pack('>H', 7800)
        request = discovery_request()
        sock.sendall(b'bela' + struct.pack('>hh', 0x288c, len(sender)) + sender
                     + struct.pack('>i', len(request)) + request)
        data = b''
        while len(data) < 4 or len(data) < 4 + struct.unpack('>i', data[:4])[0]:
            chunk = sock.recv(4096)
            assert chunk, f'closed after {data!r}'
            data += chunk
    reply = jgroups.decode_message(data[4:])
    assert reply.type == jgroups.GET_MBRS_RSP and reply.dest == ASKER
    assert reply.data.logical_name == 'ispn-1' and reply.data.physical.port == port
    with socket.create_connection(('127.0.0.1', port), timeout=5) as sock:   # not JGroups: closed
        sock.sendall(b'GET / HTTP/1.1\r\n\r\n')
        assert sock.recv(100) == b''


def test_jgroups_udp_discovery_by_hand(stub):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b'garbage', ('127.0.0.1', stub['ports']['jgroups-udp']))
        sock.sendto(discovery_request(), ('127.0.0.1', stub['ports']['jgroups-udp']))
        reply = jgroups.decode_message(sock.recv(65536))
    assert reply.type == jgroups.GET_MBRS_RSP and reply.data.logical_name == 'ispn-1'
    records = [r for r in request_log(stub['log'], count=3) if r['transport'] == 'udp']
    assert [r['op'] for r in records][-2:] == ['ignored', 'discovery']


def test_the_prober_process_gets_ok_from_every_listener(stub):
    ports = stub['ports']
    targets = [{'id': 'etcd', 'transport': 'tcp', 'protocol': 'etcd', 'port': ports['etcd']},
               {'id': 'infinispan', 'transport': 'tcp', 'protocol': 'infinispan', 'port': ports['infinispan']},
               {'id': 'jgroups-tcp', 'transport': 'tcp', 'protocol': 'jgroups', 'port': ports['jgroups-tcp'],
                'security': 'optional'},
               {'id': 'jgroups-udp', 'transport': 'udp', 'protocol': 'jgroups', 'port': ports['jgroups-udp']}]
    results = probe_targets([{**t, 'host': '127.0.0.1', 'server_name': 'ispn-1.lab', 'timeout': 5.0}
                             for t in targets])
    assert {r['id']: r['outcome'] for r in results} == {t['id']: 'ok' for t in targets}, results
