"""http stub against the real Debian client: curl (package ``curl``).

The stub runs as ``python -m emulator.roled`` on 127.0.0.1 (a Terminal Server persona with
a throw-away lab CA): plain HTTP, HTTPS verified with --cacert (and refused without it),
SOAP 1.1/1.2, a malformed SOAP envelope, WebDAV PROPFIND/PUT/GET, and the daemon's request
log as the server-side witness. (etcd and Infinispan: test_cluster_protocols_interop.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

import roles
from emulator.pki import make_test_pki
from tests.support import client_tool, free_port, request_log, run_stub

pytestmark = pytest.mark.interop

SOAP11 = 'http://schemas.xmlsoap.org/soap/envelope/'
SOAP12 = 'http://www.w3.org/2003/05/soap-envelope'
NS = 'urn:safeq-lab:terminal'


def curl(*args: str, data_file: str | None = None) -> tuple[int, dict[str, str], bytes, int]:
    """(HTTP status, final response headers, body, curl exit code)."""
    binary = client_tool('curl', 'curl')
    proc = subprocess.run([binary, '-sS', '--max-time', '10', '-D', '-', '-o', '/dev/stderr', *args],
                          capture_output=True, timeout=30)
    heads = proc.stdout.decode('latin-1').strip().split('\r\n\r\n')
    status, headers = 0, {}
    if heads and heads[-1]:
        lines = heads[-1].split('\r\n')  # the last block: 100 Continue comes first
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(':') for line in lines[1:])}
    return status, headers, proc.stderr, proc.returncode


@pytest.fixture(scope='module')
def stub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('http-interop')
    pki = make_test_pki(tmp / 'pki', host='ts-1.lab')
    port, tls_port = free_port(), free_port()
    listeners = [{'transport': 'tcp', 'port': port, 'protocol': 'soap', 'security': 'plain'},
                 {'transport': 'tcp', 'port': tls_port, 'protocol': 'http', 'security': 'tls'}]
    # as the role layer builds it: the terminal server's HTTP surface and persona
    persona = {**pki, 'identity': roles.identity(['terminal-server'])}
    with run_stub(tmp, listeners, persona=persona, host='ts-1', roles=('terminal-server',)) as log:
        yield {'url': f'http://127.0.0.1:{port}', 'port': port, 'tls_port': tls_port,
               'ca': pki['ca_file'], 'log': log, 'tmp': tmp}


def test_plain_get_health(stub):
    status, headers, body, rc = curl(f'{stub["url"]}/')
    assert rc == 0 and status == 200
    assert headers['server'] == 'SafeQ-TerminalServer' and headers['x-lab-peer'] == '127.0.0.1'
    value = json.loads(body)
    assert value['host'] == 'ts-1' and value['roles'] == ['terminal-server'] and value['status'] == 'UP'


def test_https_is_verified_with_the_lab_ca_and_refused_without(stub):
    url = f'https://ts-1.lab:{stub["tls_port"]}/'
    resolve = f'ts-1.lab:{stub["tls_port"]}:127.0.0.1'
    status, _, body, rc = curl('--cacert', stub['ca'], '--resolve', resolve, url)
    assert rc == 0 and status == 200 and json.loads(body)['host'] == 'ts-1'
    _, _, err, rc = curl('--resolve', resolve, url)  # system CAs only: the lab CA is unknown
    assert rc == 60, err
    other = f'mfd-km.lab:{stub["tls_port"]}:127.0.0.1'
    _, _, err, rc = curl('--cacert', stub['ca'], '--resolve', other, f'https://mfd-km.lab:{stub["tls_port"]}/')
    assert rc == 60, err  # right CA, wrong host name


def test_soap11_with_soapaction(stub):
    envelope = (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP11}"><s:Body>'
                f'<LoginByCard xmlns="{NS}"><cardNumber>0004211337</cardNumber></LoginByCard>'
                '</s:Body></s:Envelope>')
    status, headers, body, rc = curl('-X', 'POST', '-H', 'Content-Type: text/xml; charset=utf-8',
                                     '-H', f'SOAPAction: "{NS}#LoginByCard"', '--data-binary', envelope,
                                     f'{stub["url"]}/services/TerminalService')
    assert rc == 0 and status == 200 and headers['content-type'].startswith('text/xml')
    response = ET.fromstring(body).find(f'{{{SOAP11}}}Body/{{{NS}}}LoginResponse')
    assert response is not None and response.findtext(f'{{{NS}}}userName') == 'alice'


def test_soap12_with_action_parameter(stub):
    envelope = (f'<e:Envelope xmlns:e="{SOAP12}"><e:Body><GetCredit xmlns="{NS}">'
                '<userName>bob</userName></GetCredit></e:Body></e:Envelope>')
    status, headers, body, rc = curl('-H', f'Content-Type: application/soap+xml; charset=utf-8; action="{NS}#GetCredit"',
                                     '--data-binary', envelope, f'{stub["url"]}/ws')
    assert rc == 0 and status == 200 and headers['content-type'].startswith('application/soap+xml')
    response = ET.fromstring(body).find(f'{{{SOAP12}}}Body/{{{NS}}}GetCreditResponse')
    assert response.findtext(f'{{{NS}}}credit') == '3.0'


def test_malformed_soap_is_a_500_fault_and_the_stub_keeps_serving(stub):
    status, _, body, rc = curl('-H', 'Content-Type: text/xml', '-H', 'SOAPAction: "x"',
                               '--data-binary', '<s:Envelope xmlns:s="oops"><s:Body>',
                               f'{stub["url"]}/services/TerminalService')
    assert rc == 0 and status == 500
    fault = ET.fromstring(body).find(f'{{{SOAP11}}}Body/{{{SOAP11}}}Fault')
    assert fault is not None and fault.findtext('faultcode') == 'soap:Client'
    status, _, _, _ = curl(f'{stub["url"]}/')
    assert status == 200


def test_webdav_propfind_put_get(stub):
    status, _, body, rc = curl('-X', 'PROPFIND', '-H', 'Depth: 1', f'{stub["url"]}/scan/')
    assert rc == 0 and status == 207
    root = ET.fromstring(body)
    assert root.tag == '{DAV:}multistatus'
    assert '/scan/' in [href.text for href in root.iter('{DAV:}href')]

    document = stub['tmp'] / 'scan 0001.pdf'
    document.write_bytes(b'%PDF-1.7\n' + os.urandom(250_000) + b'\n%%EOF\n')
    url = f'{stub["url"]}/scan/scan%200001.pdf'
    status, headers, _, rc = curl('-T', str(document), url)
    assert rc == 0 and status == 201 and headers['location'] == '/scan/scan%200001.pdf'
    status, _, _, _ = curl('-T', str(document), url)
    assert status == 204  # replaced
    status, _, body, rc = curl(url)
    assert rc == 0 and status == 200 and body == document.read_bytes()
    status, _, body, _ = curl('-X', 'PROPFIND', '-H', 'Depth: 0', url)
    assert status == 207 and f'<D:getcontentlength>{document.stat().st_size}<'.encode() in body

    puts = [r for r in request_log(stub['log']) if r['method'] == 'PUT' and r['path'].startswith('/scan/')]
    assert [r['stored'] for r in puts][-2:] == [document.stat().st_size] * 2
    assert all(r['peer'] == '127.0.0.1' for r in puts)


def test_etcd_v2_keys_are_gone_from_http(stub):
    # etcd (v3 JSON gateway) has its own module now: tests/interop/test_cluster_protocols_interop.py.
    status, _, _, rc = curl('-X', 'PUT', '-d', 'value=alice', f'{stub["url"]}/v2/keys/safeq/locks/mfd-7')
    assert rc == 0 and status == 404


def test_request_log_is_the_servers_witness(stub):
    curl(f'{stub["url"]}/terminal/application?deviceId=mfd-1')
    records = request_log(stub['log'])
    app = [r for r in records if r['path'] == '/terminal/application']
    assert app and app[-1]['status'] == 200 and app[-1]['peer'] == '127.0.0.1' and app[-1]['port'] == stub['port']
    assert any(r['tls'] and r['port'] == stub['tls_port'] for r in records)
