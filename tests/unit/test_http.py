"""http: REST, SOAP and WebDAV stub and probe.

Server logic is driven in memory: an HTTPChannel from ``site_for`` over a StringTransport
with a MemoryReactorClock (no sockets). Probes run against the stub on 127.0.0.1, each on
a fresh epoll reactor, including HTTPS with a throw-away lab CA; one test runs the real
``roled`` and ``prober`` processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

import roles as role_data
from emulator.protocols import payloads
from emulator import protocols
from emulator.catalog import load_catalog
from emulator.pki import LAB_CA_NAME, make_test_pki
from emulator.protocols import http
from emulator.protocols.base import Listener, Persona, ProbeResult, ProbeTarget
from tests.support import free_port, fresh_reactor, run_on_reactor

REPO = Path(__file__).resolve().parents[2]


def lab_persona(host: str, roles=(), identity=None, **more) -> Persona:
    """A persona as the role layer builds it: the HTTP surface of its roles, then ``identity``."""
    return Persona(host=host, roles=tuple(roles),
                   identity={**role_data.http_surface(roles), **(identity or {})}, **more)


SERVER = IPv4Address('TCP', '198.18.0.2', 5021)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)
TS = lab_persona(host='ts-1', roles=('terminal-server',), identity={'http_server': 'SafeQ-TerminalServer'})
SC = lab_persona(host='sc-1', roles=('spooler-controller',))
MFD = lab_persona(host='mfd-km', roles=('mfd-konica-minolta',),
              identity={'vendor': 'Konica Minolta', 'make_model': 'KONICA MINOLTA bizhub C450i',
                        'http_server': 'KM-MFP-http/V0.0.1'})
CARD = '0004211337'


# --- helpers ------------------------------------------------------------------------------

class Conn:
    """One in-memory HTTP connection to a site built by http.site_for."""

    def __init__(self, site, reactor) -> None:
        self.reactor = reactor
        self.proto = site.buildProtocol(CLIENT)
        self.transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
        self.proto.makeConnection(self.transport)

    def send(self, raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
        self.transport.clear()
        self.proto.dataReceived(raw)
        return parse_responses(self.transport.value())

    def close(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError('test over')))


def make_site(persona=TS, extra=None, listener=None):
    reactor = MemoryReactorClock()
    records: list[dict] = []
    site = http.site_for(listener or Listener('tcp', SERVER.port, 'http'), persona, extra,
                         reactor=reactor, on_request=records.append)
    site.doStart()
    return site, reactor, records


def request(method: str, path: str, body: bytes = b'', headers: dict[str, str] | None = None) -> bytes:
    lines = [f'{method} {path} HTTP/1.1', 'Host: stub.lab']
    for name, value in (headers or {}).items():
        lines.append(f'{name}: {value}')
    if body or method in ('POST', 'PUT', 'PROPFIND'):
        lines.append(f'Content-Length: {len(body)}')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        head, sep, rest = data.partition(b'\r\n\r\n')
        assert sep, f'incomplete response head: {data[:200]!r}'
        lines = head.decode('latin-1').split('\r\n')
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(':')
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            data = rest
            continue
        length = int(headers.get('content-length', len(rest)))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def one(persona=TS, raw: bytes = b'', extra=None):
    site, reactor, records = make_site(persona, extra)
    conn = Conn(site, reactor)
    responses = conn.send(raw)
    assert len(responses) == 1, responses
    return responses[0], records, conn


def soap11(op: str, params: dict, ns='urn:safeq-lab:terminal', action=None) -> bytes:
    body = http.soap_envelope('1.1', ns, op, params)
    return request('POST', '/services/TerminalService', body,
                   {'Content-Type': 'text/xml; charset=utf-8', 'SOAPAction': f'"{action or ns + "#" + op}"'})


def soap12(op: str, params: dict, ns='urn:safeq-lab:terminal') -> bytes:
    body = http.soap_envelope('1.2', ns, op, params)
    return request('POST', '/ws', body, {'Content-Type': f'application/soap+xml; charset=utf-8; action="{ns}#{op}"'})


def run_on_fresh_reactor(fn, limit: float = 10.0):
    """Run ``fn(reactor)`` to completion on a new epoll reactor; it must leave no timer behind."""
    reactor = fresh_reactor()
    result = run_on_reactor(reactor, fn, limit)
    leftover = reactor.getDelayedCalls()   # the runner's watchdog is cancelled or spent by now
    assert leftover == [], f'leaked delayed calls: {leftover}'
    return result


def target(port: int, flow: str = '', **overrides) -> ProbeTarget:
    """A probe target; ``flow`` adds the options the audit gives a probe of that catalog flow."""
    options = {**role_data.probe_options(flow), **overrides.pop('options', {})}
    fields = dict(id='t', host='127.0.0.1', transport='tcp', protocol='http', port=port, timeout=3.0,
                  options=options)
    fields.update(overrides)
    return ProbeTarget(**fields)


def probe_stub(persona: Persona, targets: list[dict], security='plain', extra=None):
    """Serve ``persona`` on a loopback port and probe it once per target overrides dict."""
    records: list[dict] = []

    async def scenario(reactor):
        port = http.listen(reactor, Listener('tcp', 0, 'http', security), persona,
                           on_request=records.append, interface='127.0.0.1', extra_resources=extra)
        number = port.getHost().port
        results = []
        try:
            for overrides in targets:
                results.append(await http.probe(reactor, target(number, security=security, **overrides)))
        finally:
            await port.stopListening()
        return results

    return run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r))), records


# --- data -------------------------------------------------------------------------------------

def test_data_file_loads_and_every_flow_is_served_by_its_server_role():
    surface = http.load_surface()
    catalog = load_catalog()
    unmapped = []
    for flow in catalog.flows:
        protocols_used = {ep.protocol for ep in flow.endpoints}
        options = role_data.probe_options(flow.id)
        served = role_data.identity([flow.server])
        if 'http' in protocols_used:
            name = options.get('endpoint')
            if name is None:
                unmapped.append(flow.id)
                continue
            assert name in surface.endpoints, f'{flow.id}: no endpoint {name}'
            assert name in served['http_endpoints'], f'{flow.id}: role {flow.server} does not mount {name}'
        if 'soap' in protocols_used:
            assert options.get('operation') in surface.soap_operations, f'{flow.id}: SOAP flow without an operation'
            assert served['http_soap'], f'{flow.id}: {flow.server} lacks SOAP'
        if 'webdav' in protocols_used:
            assert served['http_webdav'], f'{flow.id}: {flow.server} lacks WebDAV'
    # Only rows without a meaningful payload fall back to the health check.
    assert sorted(unmapped) == ['others-28', 'others-38']


@pytest.mark.parametrize('mutate, message', [
    (lambda d: d['endpoints']['accounting'].update(kind='magic'), 'kind must be'),
    (lambda d: d['endpoints']['accounting'].pop('user_by'), 'without user_by'),
    (lambda d: d['endpoints']['accounting'].update(path='/scan/accounting'), 'WebDAV collection'),
    (lambda d: d['endpoints']['accounting'].update(roles=['spooler']), 'unknown key'),
    (lambda d: d['endpoints']['job-preview'].update(example={}), 'path parameter'),
    (lambda d: d['endpoints']['accounting']['reply'].update(x='{secret}'), 'unknown name'),
    (lambda d: d['soap'].update(default_operation='Nope'), 'default_operation'),
])
def test_bad_data_is_rejected_with_the_place_named(mutate, message):
    data = yaml.safe_load(http.DATA_FILE.read_text())
    mutate(data)
    with pytest.raises(http.DataError, match=message):
        http.parse_surface(data)


def test_render_keeps_types_of_single_placeholders_and_check_fields_compares():
    ctx = {'req': {'pages': 12, 'id': 'J-1'}, 'user': {'login': 'alice'}}
    assert http.render({'p': '{req[pages]}', 's': 'job {req[id]}', 'n': [1, '{user[login]}']}, ctx) == \
        {'p': 12, 's': 'job J-1', 'n': [1, 'alice']}
    template = {'pages': '{req[pages]}', 'id': '{uuid}', 'ok': True}
    assert http.check_fields(template, {'pages': 12, 'id': 'x', 'ok': True}, ctx) == []
    problems = http.check_fields(template, {'pages': 13, 'ok': 'true'}, ctx)
    assert problems == ['pages=13, expected 12', 'id missing']


# --- codecs -----------------------------------------------------------------------------------

@pytest.mark.parametrize('version', ['1.1', '1.2'])
def test_soap_envelope_round_trip(version):
    data = http.soap_envelope(version, 'urn:x', 'Op', {'a': '1 < 2', 'list': [{'b': 'x'}, {'b': 'y'}]})
    found, element = http.parse_soap(data, version)
    assert found == version and element.tag == '{urn:x}Op'
    assert http.soap_params(element) == {'a': '1 < 2', 'list': [{'b': 'x'}, {'b': 'y'}]}


@pytest.mark.parametrize('data, code', [
    (b'<broken', 'Client'),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', 'Client'),
    (b'<notsoap/>', 'Client'),
    (b'<e:Envelope xmlns:e="urn:other"><e:Body/></e:Envelope>', 'VersionMismatch'),
    (http.soap_envelope('1.2', 'urn:x', 'Op', {}), 'VersionMismatch'),  # parsed as 1.1
    (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"/>', 'Client'),
    (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body/></s:Envelope>', 'Client'),
])
def test_parse_soap_rejects(data, code):
    with pytest.raises(http.SoapFault) as caught:
        http.parse_soap(data, '1.1')
    assert caught.value.code == code


@pytest.mark.parametrize('version, code', [('1.1', 'soap:Client'), ('1.2', 'soap:Sender')])
def test_soap_fault_shape(version, code):
    _v, element = http.parse_soap(http.soap_fault(version, 'Client', 'bad & worse'), version)
    assert element.tag.endswith('}Fault')
    assert http.fault_text(element) == f'{code}: bad & worse'


def test_png_is_valid_and_corruption_is_caught():
    image = payloads.make_png(16, 9)
    assert payloads.check_png(image) == (16, 9)
    broken = bytearray(image)
    broken[40] ^= 0xFF
    with pytest.raises(ValueError, match='CRC'):
        payloads.check_png(bytes(broken))
    with pytest.raises(ValueError, match='signature'):
        payloads.check_png(b'GIF89a')


def test_documents_have_the_exact_size_and_a_real_frame():
    pdf = payloads.scanned_pdf(200 << 10)
    assert len(pdf) == 200 << 10 and pdf.startswith(b'%PDF-1.4') and pdf.rstrip().endswith(b'%%EOF')
    job = payloads.print_job(50_000)
    assert len(job) == 50_000 and job.startswith(b'\x1b%-12345X@PJL') and job.endswith(b'\x1b%-12345X')
    assert len(payloads.scanned_pdf(10)) == 10


def test_dav_store_is_bounded_oldest_first():
    store = http.DavStore(max_bytes=100, max_docs=3)
    for i in range(4):
        store.put(f'd{i}', b'x' * 10, 'text/plain', float(i))
    assert list(store.docs) == ['d1', 'd2', 'd3']
    store.put('big', b'y' * 95, 'text/plain', 9.0)
    assert list(store.docs) == ['big'] and store.size == 95
    assert store.put('big', b'z', 'text/plain', 10.0) is True


def test_dav_store_keeps_the_documents_of_500_concurrent_probes():
    store = http.DavStore()
    document = b'%' * http.DOC_FLOOR
    for i in range(500):     # every probe PUTs before any of them reads back
        store.put(f'scan-{i}.pdf', document, 'application/pdf', float(i))
    assert len(store.docs) == 500 and store.size <= store.max_bytes
    for i in range(2000):    # memory stays bounded however many come
        store.put(f'more-{i}.pdf', b'x' * 1000, 'application/pdf', float(i))
    assert len(store.docs) <= http.DAV_MAX_DOCS and store.size <= http.DAV_MAX_STORE


# --- server: REST ---------------------------------------------------------------------------

def test_health_names_the_persona_and_the_client_and_is_recorded():
    (status, headers, body), records, _ = one(TS, request('GET', '/'))
    assert status == 200 and headers['server'] == 'SafeQ-TerminalServer'
    assert headers['x-lab-host'] == 'ts-1' and headers['x-lab-peer'] == '198.18.0.9'
    value = json.loads(body)
    assert value['host'] == 'ts-1' and value['roles'] == ['terminal-server'] and value['peer'] == '198.18.0.9'
    assert records == [{'transport': 'tcp', 'port': 5021, 'peer': '198.18.0.9', 'method': 'GET', 'path': '/',
                        'bytes': 0, 'status': 200, 'tls': False, 'endpoint': 'health'}]


def test_endpoints_are_mounted_by_role():
    (status, headers, body), _, _ = one(SC, request('GET', '/jobs/J-7/preview?width=8&height=4'))
    assert status == 200 and headers['content-type'] == 'image/png'
    assert payloads.check_png(body) == (8, 4)
    (status, _, body), _, _ = one(MFD, request('GET', '/jobs/J-7/preview'))
    assert status == 404 and 'mfd-km' in json.loads(body)['error']
    (status, headers, body), _, _ = one(MFD, request('GET', '/install'))
    assert status == 200 and headers['server'] == 'KM-MFP-http/V0.0.1'
    assert b'KONICA MINOLTA bizhub C450i - Embedded Terminal installation' in body


def test_wrong_method_is_405_with_allow():
    (status, headers, _), _, _ = one(SC, request('DELETE', '/accounting'))
    assert status == 405 and headers['allow'] == 'POST'


def test_json_endpoint_answers_from_data():
    body = json.dumps({'jobId': 'J-1', 'userName': 'alice', 'pages': 3}).encode()
    (status, _, reply), records, _ = one(SC, request('POST', '/accounting', body, {'Content-Type': 'application/json'}))
    value = json.loads(reply)
    assert status == 201 and value['accepted'] is True and value['jobId'] == 'J-1' and value['pages'] == 3
    assert records[0]['bytes'] == len(body) and records[0]['status'] == 201


@pytest.mark.parametrize('body, ctype, status, message', [
    (b'{"jobId": "J-1", "userName": "alice"}', 'application/json', 400, 'missing field(s): pages'),
    (b'{"jobId": "J-1"', 'application/json', 400, 'unreadable'),
    (b'[1, 2]', 'application/json', 400, 'must be an object'),
    (b'[' * 1000 + b']' * 1000, 'application/json', 400, 'nested too deeply'),
    (b'{"jobId": "J-1", "userName": "mallory", "pages": 1}', 'application/json', 404, 'unknown user'),
    (b'jobId=J-1', 'text/plain', 415, 'expected application/json'),
])
def test_json_endpoint_rejects_bad_requests(body, ctype, status, message):
    (got, _, reply), records, _ = one(SC, request('POST', '/accounting', body, {'Content-Type': ctype}))
    assert got == status and message in json.loads(reply)['error']
    assert records[0]['status'] == status


def test_form_login_and_query_endpoints():
    form = b'username=alice&password=secret'
    site, reactor, _ = make_site(lab_persona(host='eui', roles=('end-user-interface',)))
    conn = Conn(site, reactor)
    [(status, _, body)] = conn.send(request('POST', '/login', form,
                                            {'Content-Type': 'application/x-www-form-urlencoded'}))
    assert status == 200 and json.loads(body)['fullName'] == 'Alice Novak'
    (status, _, body), _, _ = one(lab_persona(host='pay', roles=('payment-system',)),
                                  request('GET', '/payment/credit?user=bob'))
    assert status == 200 and json.loads(body)['credit'] == 3.0


def test_upload_returns_size_and_digest():
    doc = payloads.scanned_pdf(5000)
    (status, _, body), records, _ = one(TS, request('POST', '/api/v1/scans', doc, {'Content-Type': 'application/pdf'}))
    value = json.loads(body)
    assert status == 201 and value['size'] == 5000 and value['sha256'] == hashlib.sha256(doc).hexdigest()
    assert records[0]['stored'] == 5000


def test_etcd_and_infinispan_are_not_http_surfaces():
    # They have their own modules now (etcd.py, infinispan.py; tests in test_cluster_protocols.py).
    persona = lab_persona(host='big', roles=('terminal-server', 'infinispan', 'js-infinispan'))
    for path in ('/v2/keys/safeq/locks/mfd1', '/v3/kv/range', '/rest/v2/caches/jobs/J-1'):
        (status, _, _), _, _ = one(persona, request('GET', path))
        assert status == 404, path
    assert not {'terminal-server-38', 'terminal-server-39', 'others-02', 'others-29'} & set(role_data._probe_options())


# --- server: SOAP -----------------------------------------------------------------------------

def test_soap11_login_by_card():
    (status, headers, body), records, _ = one(TS, soap11('LoginByCard', {'cardNumber': CARD}))
    assert status == 200 and headers['content-type'].startswith('text/xml')
    _v, element = http.parse_soap(body, '1.1')
    params = http.soap_params(element)
    assert element.tag == '{urn:safeq-lab:terminal}LoginResponse' and params['userName'] == 'alice'
    assert params['sessionId']
    assert records[0]['soap'] == '1.1' and records[0]['op'] == 'LoginByCard'


def test_soap12_job_list():
    (status, headers, body), records, _ = one(TS, soap12('GetJobList', {'userName': 'alice'}))
    assert status == 200 and headers['content-type'].startswith('application/soap+xml')
    _v, element = http.parse_soap(body, '1.2')
    jobs = http.soap_params(element)['jobs']['job']
    assert [job['id'] for job in jobs] == ['J-1001', 'J-1002']


@pytest.mark.parametrize('raw, version, reason', [
    (request('POST', '/x', b'<s:Envelope', {'SOAPAction': '""', 'Content-Type': 'text/xml'}), '1.1', 'well-formed'),
    (request('POST', '/x', b'<s:Envelope', {'Content-Type': 'application/soap+xml'}), '1.2', 'well-formed'),
    (soap11('Shutdown', {}), '1.1', 'unknown operation'),
    (soap11('LoginByCard', {}), '1.1', 'missing parameter'),
    (soap11('LoginByCard', {'cardNumber': '999'}), '1.1', 'unknown user'),
    (soap11('LoginByCard', {'cardNumber': CARD}, action='urn:safeq-lab:terminal#Logout'), '1.1', 'does not match'),
    (request('POST', '/x', http.soap_envelope('1.2', 'urn:safeq-lab:terminal', 'Logout', {'sessionId': '1'}),
             {'SOAPAction': '""', 'Content-Type': 'text/xml'}), '1.1', 'does not match SOAP 1.1'),
])
def test_bad_soap_gets_a_fault_and_the_stub_keeps_serving(raw, version, reason):
    site, reactor, records = make_site(TS)
    [(status, headers, body)] = Conn(site, reactor).send(raw)
    assert status == 500
    _v, element = http.parse_soap(body, version)
    assert element.tag.endswith('}Fault') and reason in http.fault_text(element)
    assert records[0]['status'] == 500 and 'fault' in records[0]
    [(status, _, _)] = Conn(site, reactor).send(soap11('LoginByCard', {'cardNumber': CARD}))
    assert status == 200


# --- server: WebDAV ---------------------------------------------------------------------------

def multistatus(body: bytes) -> dict:
    return http.parse_multistatus(body)


def test_webdav_put_propfind_get_delete():
    site, reactor, records = make_site(TS)
    conn = Conn(site, reactor)
    doc = os.urandom(3000)
    [(status, _, _)] = conn.send(request('PROPFIND', '/scan/', b'', {'Depth': '1'}))
    assert status == 207
    [(status, headers, _)] = conn.send(request('PUT', '/scan/a%20b.pdf', doc, {'Content-Type': 'application/pdf'}))
    assert status == 201 and headers['location'] == '/scan/a%20b.pdf'
    [(status, _, _)] = conn.send(request('PUT', '/scan/a%20b.pdf', doc, {'Content-Type': 'application/pdf'}))
    assert status == 204
    [(status, _, body)] = conn.send(request('PROPFIND', '/scan/', b'', {'Depth': '1'}))
    listing = multistatus(body)
    assert status == 207 and listing['/scan/']['collection'] is True
    assert listing['/scan/a b.pdf']['getcontentlength'] == '3000'
    [(status, _, body)] = conn.send(request('PROPFIND', '/scan/', b'', {'Depth': '0'}))
    assert list(multistatus(body)) == ['/scan/']
    wanted = (b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:z="urn:z"><D:prop>'
              b'<D:getcontentlength/><z:color/></D:prop></D:propfind>')
    [(status, _, body)] = conn.send(request('PROPFIND', '/scan/a%20b.pdf', wanted, {'Depth': '0'}))
    assert status == 207 and b'404 Not Found' in body and b'<D:getcontentlength>3000<' in body
    [(status, headers, body)] = conn.send(request('GET', '/scan/a%20b.pdf'))
    assert status == 200 and body == doc and headers['content-type'] == 'application/pdf'
    [(status, _, _)] = conn.send(request('DELETE', '/scan/a%20b.pdf'))
    assert status == 204
    [(status, _, _)] = conn.send(request('GET', '/scan/a%20b.pdf'))
    assert status == 404
    put = [r for r in records if r['method'] == 'PUT']
    assert [r['stored'] for r in put] == [3000, 3000] and put[0]['bytes'] == 3000


def test_webdav_listing_built_from_kept_responses_is_what_each_document_says_now():
    site, reactor, _ = make_site(TS)
    conn = Conn(site, reactor)
    allprop = b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>'
    for name, size in (('a.pdf', 10), ('b%20c.pdf', 20), ('a.pdf', 30)):   # the last replaces a.pdf
        conn.send(request('PUT', f'/scan/{name}', b'x' * size, {'Content-Type': 'application/pdf'}))
        [(status, _, body)] = conn.send(request('PROPFIND', '/scan/', allprop, {'Depth': '1'}))
        assert status == 207
    listing = multistatus(body)
    assert {k: v.get('getcontentlength') for k, v in listing.items()} == {
        '/scan/': None, '/scan/b c.pdf': '20', '/scan/a.pdf': '30'}
    assert listing['/scan/a.pdf']['getetag'] and listing['/scan/b c.pdf']['getcontenttype'] == 'application/pdf'
    wanted = b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:prop><D:getcontentlength/></D:prop></D:propfind>'
    [(_, _, by_prop)] = conn.send(request('PROPFIND', '/scan/', wanted, {'Depth': '1'}))   # rendered afresh
    assert {k: v.get('getcontentlength') for k, v in multistatus(by_prop).items()} == {
        '/scan/': None, '/scan/b c.pdf': '20', '/scan/a.pdf': '30'}


@pytest.mark.parametrize('raw, status', [
    (request('PROPFIND', '/scan/', b'', {'Depth': '2'}), 400),
    (request('PROPFIND', '/scan/', b'<D:propfind xmlns:D="DAV:"', {'Depth': '1'}), 400),
    (request('PROPFIND', '/scan/', b'<x/>', {'Depth': '1'}), 400),
    (request('PROPFIND', '/scan/missing.pdf', b'', {'Depth': '0'}), 404),
    (request('PUT', '/scan/', b'x'), 405),
    (request('PUT', '/scan/sub/x.pdf', b'x'), 409),
    (request('MKCOL', '/scan/sub'), 403),
    (request('LOCK', '/scan/x.pdf'), 405),
])
def test_webdav_rejects(raw, status):
    (got, _, _), _, conn = one(TS, raw)
    assert got == status
    [(ok, _, _)] = conn.send(request('OPTIONS', '/scan/'))
    assert ok == 200


def test_webdav_options_advertise_class_1():
    (status, headers, _), _, _ = one(TS, request('OPTIONS', '/scan/'))
    assert status == 200 and headers['dav'] == '1' and 'PROPFIND' in headers['allow']


# --- server: transport-level behaviour ---------------------------------------------------------

def test_oversized_body_is_refused_unread_and_not_recorded():
    site, reactor, records = make_site(TS)
    conn = Conn(site, reactor)
    head = f'PUT /scan/huge.pdf HTTP/1.1\r\nHost: x\r\nContent-Length: {http.MAX_BODY + 1}\r\n' \
           f'Expect: 100-continue\r\n\r\n'.encode()
    [(status, headers, _)] = conn.send(head)
    assert status == 413 and headers['connection'] == 'close'
    assert conn.transport.disconnecting
    conn.proto.dataReceived(b'x' * 1000)  # whatever was in flight is ignored
    conn.close()
    assert records == []
    [(status, _, _)] = Conn(site, reactor).send(request('GET', '/'))
    assert status == 200


def test_oversized_chunked_body_is_refused(monkeypatch):
    monkeypatch.setattr(http.server, 'MAX_BODY', 1000)
    site, reactor, records = make_site(TS)
    conn = Conn(site, reactor)
    head = b'PUT /scan/c.pdf HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
    chunk = b'%x\r\n%s\r\n' % (600, b'y' * 600)
    responses = conn.send(head + chunk + chunk)
    assert [r[0] for r in responses] == [413] and conn.transport.disconnecting
    assert records == []


def test_garbage_gets_400_and_close_and_others_are_served():
    site, reactor, records = make_site(TS)
    conn = Conn(site, reactor)
    conn.proto.dataReceived(b'\x16\x03\x01 not http at all\r\n\r\n')
    assert conn.transport.value().startswith(b'HTTP/1.1 400') and conn.transport.disconnecting
    [(status, _, _)] = Conn(site, reactor).send(request('GET', '/'))
    assert status == 200 and len(records) == 1


def test_idle_connection_is_dropped_on_the_injected_clock():
    site, reactor, _ = make_site(TS)
    conn = Conn(site, reactor)
    reactor.advance(http.IDLE_TIMEOUT + 1)
    assert conn.transport.disconnecting


def test_extra_resources_share_the_site():
    class Ipp(Resource):
        isLeaf = True

        def render_POST(self, request):
            http.note(request, op='Print-Job')
            request.setHeader(b'content-type', b'application/ipp')
            return b'\x02\x00\x00\x00\x00\x00\x00\x01\x03'

    ipp = Ipp()
    site, reactor, records = make_site(MFD, extra={b'ipp': ipp, b'': ipp})
    conn = Conn(site, reactor)
    for path in ('/ipp/print', '/'):
        [(status, headers, body)] = conn.send(request('POST', path, b'\x02\x00', {'Content-Type': 'application/ipp'}))
        assert status == 200 and headers['content-type'] == 'application/ipp'
        assert headers['server'] == 'KM-MFP-http/V0.0.1' and headers['x-lab-host'] == 'mfd-km'
    [(status, _, body)] = conn.send(request('GET', '/'))
    assert status == 200 and json.loads(body)['host'] == 'mfd-km'
    assert [r.get('op') for r in records] == ['Print-Job', 'Print-Job', None]


def test_registry_routes_all_three_protocol_ids_here():
    for protocol_id in http.PROTOCOL_IDS:
        assert protocols.module_for(protocol_id) is http


# --- probe over loopback ---------------------------------------------------------------------

ALL_ROLES = lab_persona(host='big', roles=('terminal-server', 'spooler-controller', 'flexispooler', 'infinispan',
                                       'mfd-ricoh', 'payment-system', 'ims'),
                    identity={'make_model': 'RICOH IM C3000', 'vendor': 'Ricoh'})


def test_probe_every_kind_ok():
    cases = [dict(), dict(flow='spooler-controller-02'), dict(flow='spooler-controller-07'),
             dict(flow='terminal-server-07'), dict(flow='flexi-spooler-01', size=4096),
             dict(flow='mfd-04'),
             dict(flow='payment-03'), dict(flow='ims-03'),
             dict(protocol='soap', flow='terminal-server-11'),
             dict(protocol='soap', flow='terminal-server-12', options={'soap_version': '1.2'}),
             dict(protocol='webdav', flow='terminal-server-43')]
    results, records = probe_stub(ALL_ROLES, cases)
    for case, result in zip(cases, results):
        assert result.outcome == 'ok', (case, result)
        assert result.peer_seen == '127.0.0.1' and 'answered by big' in result.detail
    by_flow = {case.get('flow', ''): r for case, r in zip(cases, results)}
    assert 'PNG 256x' in by_flow['spooler-controller-02'].detail
    assert by_flow['flexi-spooler-01'].exchange.startswith(f'HTTP POST /jobs {http.DOC_FLOOR} B -> 201')
    assert by_flow['terminal-server-11'].exchange == 'SOAP 1.1 LoginByCard -> 200 LoginResponse'
    assert by_flow['terminal-server-12'].exchange == 'SOAP 1.2 GetJobList -> 200 GetJobListResponse'
    dav = by_flow['terminal-server-43']
    assert dav.exchange.count('WebDAV ') == 3 and '-> 201' in dav.exchange
    assert [r for r in records if r['method'] == 'PUT' and r.get('dav')][0]['stored'] == http.DOC_FLOOR
    assert all(r['peer'] == '127.0.0.1' for r in records)


def test_probe_size_above_the_floor_is_sent_as_asked():
    results, records = probe_stub(TS, [dict(protocol='webdav', size=300_000)])
    assert results[0].outcome == 'ok', results[0]
    assert [r['stored'] for r in records if r['method'] == 'PUT'] == [300_000]


def test_probe_optional_security_says_plain():
    results, _ = probe_stub(TS, [dict()], security='optional')
    assert results[0].outcome == 'ok' and results[0].exchange.endswith('(optional TLS: plain HTTP)')


def test_probe_wrong_role_is_a_protocol_error():
    results, records = probe_stub(MFD, [dict(flow='spooler-controller-02'), dict(protocol='soap'),
                                        dict(protocol='webdav')])
    assert [r.outcome for r in results] == ['protocol_error'] * 3
    assert all('HTTP 404' in r.detail for r in results), results
    assert [r['status'] for r in records] == [404, 404, 404]


def test_probe_soap_operation_option():
    results, records = probe_stub(TS, [dict(protocol='soap', options={'operation': 'GetCredit'}),
                                       dict(protocol='soap', options={'operation': 'LoginByPin',
                                                                      'soap_version': '1.2'})])
    assert [r.outcome for r in results] == ['ok', 'ok'], results
    assert [(r['op'], r['soap']) for r in records] == [('GetCredit', '1.1'), ('LoginByPin', '1.2')]


def test_probe_reports_a_soap_fault(monkeypatch):
    surface = http.load_surface()
    broken = http.Surface(**{**surface.__dict__, 'users': ()})  # the stub knows no card at all
    for module in (http.server, http.plans):   # the stub's surface and the probe's
        monkeypatch.setattr(module, 'load_surface', lambda *a: broken)
    results, _ = probe_stub(TS, [dict(protocol='soap')])
    assert results[0].outcome == 'protocol_error'
    assert results[0].detail.startswith('SOAP Fault soap:Client') and 'Fault' in results[0].exchange


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    good = make_test_pki(tmp_path_factory.mktemp('pki'), host='ts-1.lab')
    other = make_test_pki(tmp_path_factory.mktemp('other'), host='ts-1.lab')
    return good, other


def test_probe_https_verifies_chain_and_name(pki):
    good, other = pki
    persona = lab_persona(host='ts-1', roles=('terminal-server',), **good)
    cases = [dict(server_name='ts-1.lab', ca_file=good['ca_file']),
             dict(protocol='soap', server_name='ts-1.lab', ca_file=good['ca_file']),
             dict(protocol='webdav', server_name='ts-1.lab', ca_file=good['ca_file']),
             dict(server_name='mfd-km.lab', ca_file=good['ca_file']),
             dict(server_name='ts-1.lab', ca_file=other['ca_file']),
             dict(server_name='ts-1.lab', ca_file='')]
    results, records = probe_stub(persona, cases, security='tls')
    assert [r.outcome for r in results] == ['ok', 'ok', 'ok', 'protocol_error', 'protocol_error', 'error']
    assert results[0].exchange == 'HTTPS GET / -> 200 application/json'
    # the certificate the probe actually received, as the audit reports it
    assert [r.tls_issuer for r in results[:3]] == [LAB_CA_NAME] * 3 and results[3].tls_issuer == ''
    assert results[1].exchange.startswith('SOAP 1.1/HTTPS LoginByCard -> 200')
    assert results[2].exchange.startswith('WebDAVS PROPFIND')
    assert results[3].detail.startswith('certificate:') and 'mfd-km.lab' in results[3].detail
    assert results[4].detail.startswith('certificate:') and 'verify failed' in results[4].detail
    assert 'ca_file' in results[5].detail
    assert records and all(r['tls'] for r in records)
    assert len(records) == 1 + 1 + 3  # rejected handshakes never become requests


def open_sockets() -> int:
    count = 0
    for name in os.listdir('/proc/self/fd'):
        try:
            count += os.readlink(f'/proc/self/fd/{name}').startswith('socket:')
        except OSError:
            pass   # closed meanwhile (the listing's own descriptor, for one)
    return count


@pytest.mark.parametrize('security', ['tls', 'plain'])
def test_pipelined_requests_then_close_leave_no_server_connection(pki, security, monkeypatch):
    """A client pipelines requests and hangs up: the server's side must be gone within a second
    (the issue 9 fuzzing saw TLS connections stay in CLOSE_WAIT for good)."""
    import socket
    import ssl
    import time
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThreadPool
    from tests.support import tls_clocked_reactor

    good, _ = pki
    persona = lab_persona(host='ts-1', roles=('terminal-server',), **good)
    one_request = b'GET / HTTP/1.1\r\nHost: ts-1.lab\r\n\r\n'

    def client(port_number):
        context = ssl.create_default_context(cafile=good['ca_file'])
        context.check_hostname = False
        for pipelined in (2, 2, 40):
            raw = socket.create_connection(('127.0.0.1', port_number), timeout=2)
            sock = context.wrap_socket(raw, server_hostname='ts-1.lab') if security == 'tls' else raw
            sock.sendall(one_request * pipelined)
            sock.close()

    async def scenario(reactor):
        port = http.listen(reactor, Listener('tcp', 0, 'http', security), persona, interface='127.0.0.1')
        try:
            # Sockets, not the reactor's readers: a connection left in CLOSE_WAIT is a paused
            # one, which the reactor no longer reads from.
            baseline = open_sockets()
            await deferToThreadPool(reactor, reactor.getThreadPool(), client, port.getHost().port)
            started = time.monotonic()
            while open_sockets() > baseline:   # a server connection still open
                if time.monotonic() - started > 1.0:
                    return 'still open after 1 s'
                await deferLater(reactor, 0.02)
            return 'closed'
        finally:
            await port.stopListening()

    reactor = tls_clocked_reactor(monkeypatch)
    assert run_on_reactor(reactor, scenario) == 'closed'


def test_probe_refused():
    result = run_on_fresh_reactor(lambda r: http.probe(r, target(free_port())))
    assert result.outcome == 'refused' and result.exchange == 'HTTP GET /'


def test_probe_timeout_when_the_server_never_answers():
    async def scenario(reactor):
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface='127.0.0.1')
        try:
            return await http.probe(reactor, target(port.getHost().port, timeout=0.3))
        finally:
            await port.stopListening()

    result = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert result.outcome == 'silent' and result.detail.startswith('connected, but no complete answer')
    assert 0.3 <= result.elapsed < 1.0


def test_probe_timeout_without_a_connection_on_a_memory_reactor():
    reactor = MemoryReactorClock()
    d = http.probe(reactor, target(5021, timeout=1.5))
    assert len(reactor.tcpClients) == 1
    reactor.advance(1.5)
    result = fired(d)
    assert result.outcome == 'timeout' and 'no TCP connection' in result.detail
    assert reactor.getDelayedCalls() == []


def fired(d: Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box, 'Deferred has not fired'
    return box[0]


@pytest.mark.parametrize('reply', [
    b'SSH-2.0-OpenSSH_9.2\r\n',
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n[1,2,3]',
    b'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi',
    b'',
])
def test_probe_non_http_or_wrong_answers_are_protocol_errors(reply):
    class Liar(Protocol):
        def dataReceived(self, data):
            self.transport.write(reply)
            self.transport.loseConnection()

    async def scenario(reactor):
        port = reactor.listenTCP(0, Factory.forProtocol(Liar), interface='127.0.0.1')
        try:
            return await http.probe(reactor, target(port.getHost().port))
        finally:
            await port.stopListening()

    result = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert result.outcome == 'protocol_error', result


def test_probe_misuse_is_an_error_result():
    reactor = MemoryReactorClock()
    udp = fired(http.probe(reactor, ProbeTarget(id='u', host='127.0.0.1', transport='udp', protocol='http', port=80)))
    assert udp.outcome == 'error' and 'tcp' in udp.detail
    unknown = fired(http.probe(reactor, target(80, options={'endpoint': 'nope'})))
    assert unknown.outcome == 'error' and 'nope' in unknown.detail
    assert reactor.tcpClients == []


# --- real processes ---------------------------------------------------------------------------

def test_roled_and_prober_processes(tmp_path, pki):
    good, _ = pki
    port, tls_port = free_port(), free_port()
    log = tmp_path / 'requests.jsonl'
    spec = {'host': 'ts-1', 'roles': ['terminal-server'], 'interface': '127.0.0.1', 'log': str(log),
            'persona': {**good, 'identity': role_data.identity(['terminal-server'])},
            'listeners': [{'transport': 'tcp', 'port': port, 'protocol': 'soap', 'security': 'plain'},
                          {'transport': 'tcp', 'port': tls_port, 'protocol': 'http', 'security': 'tls'}]}
    (tmp_path / 'spec.json').write_text(json.dumps(spec))
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    daemon = subprocess.Popen([sys.executable, '-m', 'emulator.roled', str(tmp_path / 'spec.json')],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert daemon.stdout.readline().strip() == 'READY 2', daemon.stderr.read()
        targets = [target(port, id='soap', protocol='soap', flow='terminal-server-11').to_dict(),
                   target(port, id='rest', flow='terminal-server-13').to_dict(),
                   target(tls_port, id='tls', security='tls', flow='terminal-server-22', server_name='ts-1.lab',
                          ca_file=good['ca_file']).to_dict()]
        out = subprocess.run([sys.executable, '-m', 'emulator.prober'], input=json.dumps(targets),
                             capture_output=True, text=True, timeout=20, cwd=REPO, env=env)
        assert out.returncode == 0, out.stderr
        results = [ProbeResult.from_dict(r) for r in json.loads(out.stdout)]
        assert [r.outcome for r in results] == ['ok', 'ok', 'ok'], results
        logged = [json.loads(line) for line in log.read_text().splitlines()]
        assert {(r['port'], r['path'], r['tls']) for r in logged} == {
            (port, '/services/TerminalService', False), (port, '/terminal/login', False),
            (tls_port, '/terminal/login', True)}
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        daemon.stdout.close()
        daemon.stderr.close()
