"""ipp interop: CUPS's ``ipptool`` (cups-ipp-utils) and ``curl`` against ``python -m emulator.roled``.

ipptool runs the standard test files shipped in /usr/share/cups/ipptool: the single-operation
ones (get-printer-attributes, print-job, validate-job, get-jobs) and the IPP/2.0 conformance
suite (ipp-2.0.test, which includes ipp-1.1.test). ipptool (CUPS 2.4) encrypts ipps:// but
does not evaluate the server certificate, so the chain and host name are verified with curl
(--cacert, --resolve) posting an IPP request built by our codec.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from emulator.protocols import payloads
from emulator import pki
from emulator.protocols import ipp
from tests.support import client_tool, free_port, request_log, run_stub

pytestmark = pytest.mark.interop

TEST_FILES = Path('/usr/share/cups/ipptool')
IDENTITY = {'vendor': 'Konica Minolta', 'make_model': 'KONICA MINOLTA bizhub C300i',
            'http_server': 'KM-MFP-http/V1.0'}
DOCUMENT_SIZE = 70_000



def ipptool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # -T as CUPS's ipp backend runs it: ipptool 2.4 (GnuTLS) then reads a TLS 1.3 NewSessionTicket
    # as "0 bytes in response" and reconnects in a loop; IPPS serves TLS 1.2 for that reason.
    command = [client_tool('ipptool', 'cups-ipp-utils'), '-T', '10', *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


def standard(name: str) -> str:
    path = TEST_FILES / name
    if not path.is_file():
        pytest.fail(f'{path} is missing: apt-get install cups-ipp-utils')
    return str(path)


@pytest.fixture(scope='module')
def stub(tmp_path_factory):
    directory = tmp_path_factory.mktemp('ipp-stub')
    material = pki.make_test_pki(directory / 'pki')
    plain, secure = free_port(), free_port()
    listeners = [{'transport': 'tcp', 'port': plain, 'protocol': 'ipp', 'security': 'plain'},
                 {'transport': 'tcp', 'port': secure, 'protocol': 'ipp', 'security': 'tls'}]
    with run_stub(directory, listeners, persona={**material, 'identity': IDENTITY}, host='stub',
                  roles=('mfd',)) as log:
        yield {'plain': plain, 'secure': secure, 'log': Path(log), 'ca_file': material['ca_file'],
               'dir': directory}


@pytest.fixture(scope='module')
def document(stub) -> Path:
    path = stub['dir'] / 'doc.pdf'
    path.write_bytes(payloads.print_document(DOCUMENT_SIZE))
    return path


def records(stub, op: str) -> list[dict]:
    return [r for r in request_log(stub['log']) if r.get('op') == op]


def test_ipptool_get_printer_attributes(stub):
    run = ipptool('-tv', f'ipp://127.0.0.1:{stub["plain"]}/ipp/print', standard('get-printer-attributes.test'))
    assert run.returncode == 0, run.stdout + run.stderr
    assert '[PASS]' in run.stdout and '[FAIL]' not in run.stdout
    assert 'printer-make-and-model (textWithoutLanguage) = KONICA MINOLTA bizhub C300i' in run.stdout
    assert 'printer-state (enum) = idle' in run.stdout
    assert records(stub, 'Get-Printer-Attributes')[-1]['peer'] == '127.0.0.1'


def test_ipptool_print_validate_and_get_jobs(stub, document):
    run = ipptool('-tv', '-f', str(document), f'ipp://127.0.0.1:{stub["plain"]}/ipp/print',
                  standard('print-job.test'), standard('validate-job.test'), standard('get-jobs.test'))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count('[PASS]') == 3 and '[FAIL]' not in run.stdout
    job = records(stub, 'Print-Job')[-1]
    assert job['document_bytes'] == DOCUMENT_SIZE and job['document_format'] == 'application/pdf'
    assert job['ipp_status'] == 'successful-ok' and job['tls'] is False
    assert records(stub, 'Validate-Job') and records(stub, 'Get-Jobs')


def test_ipptool_ipp_2_0_conformance_suite(stub, document, tmp_path):
    # ipp-1.1.test prints sample documents named relative to the test file; give it small ones.
    for name in ('ipp-1.1.test', 'ipp-2.0.test'):
        shutil.copy(standard(name), tmp_path / name)
    for name in ('document-a4.pdf', 'document-letter.pdf'):
        (tmp_path / name).write_bytes(payloads.print_document(8192))
    for name in ('document-a4.ps', 'document-letter.ps'):
        (tmp_path / name).write_bytes(b'%!PS-Adobe-3.0\n' + b'%' * 8000 + b'\nshowpage\n')
    for name in ('color.jpg', 'gray.jpg'):
        (tmp_path / name).write_bytes(b'\xff\xd8\xff\xe0\x00\x10JFIF\x00' + bytes(8000) + b'\xff\xd9')
    run = ipptool('-t', '-f', str(document), f'ipp://127.0.0.1:{stub["plain"]}/ipp/print',
                  str(tmp_path / 'ipp-2.0.test'), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert '[FAIL]' not in run.stdout
    assert run.stdout.count('[PASS]') >= 30, run.stdout
    for name in ('Bad request-id value 0', 'Unsupported IPP version 0.0', 'No printer-uri operation attribute',
                 'Cancel-Job Operation (completed job)', 'Required Printer Description Attributes',
                 'Print-Job with A4 PDF'):
        line = next((l for l in run.stdout.splitlines() if name in l), '')
        assert line.endswith('[PASS]'), (name, line)


def test_ipptool_over_ipps(stub, document):
    run = ipptool('-tv', '-f', str(document), f'ipps://127.0.0.1:{stub["secure"]}/ipp/print',
                  standard('get-printer-attributes.test'), standard('print-job.test'))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count('[PASS]') == 2
    assert f'printer-uri-supported (uri) = ipps://localhost:{stub["secure"]}/ipp/print' in run.stdout
    assert 'uri-security-supported (keyword) = tls' in run.stdout
    job = records(stub, 'Print-Job')[-1]
    assert job['tls'] is True and job['port'] == stub['secure'] and job['document_bytes'] == DOCUMENT_SIZE


def curl(stub, name: str, ca_file: str, out: Path) -> subprocess.CompletedProcess:
    body = out.with_suffix('.req')
    body.write_bytes(ipp.encode(ipp.get_printer_attributes_request(
        7, f'ipps://{name}:{stub["secure"]}/ipp/print', 'curl')))
    command = [client_tool('curl', 'curl'), '-sS', '--max-time', '10', '--cacert', ca_file,
               '--resolve', f'{name}:{stub["secure"]}:127.0.0.1', '-H', 'Content-Type: application/ipp',
               '--data-binary', f'@{body}', '-o', str(out), '-w', '%{http_code} %{content_type}',
               f'https://{name}:{stub["secure"]}/ipp/print']
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_curl_verifies_the_ipps_certificate_chain_and_name(stub, tmp_path):
    run = curl(stub, 'stub.lab', stub['ca_file'], tmp_path / 'ok.ipp')
    assert run.returncode == 0, run.stderr
    assert run.stdout == '200 application/ipp'
    reply = ipp.decode((tmp_path / 'ok.ipp').read_bytes())
    assert (reply.code, reply.request_id) == (0, 7)
    assert reply.value('printer-uri-supported', ipp.PRINTER) == f'ipps://stub.lab:{stub["secure"]}/ipp/print'
    assert reply.value('printer-make-and-model', ipp.PRINTER) == IDENTITY['make_model']


@pytest.mark.parametrize('name, ca', [('other.lab', 'lab CA'), ('stub.lab', 'system CAs')])
def test_curl_rejects_a_wrong_name_or_ca(stub, tmp_path, name, ca):
    ca_file = stub['ca_file'] if ca == 'lab CA' else '/etc/ssl/certs/ca-certificates.crt'
    run = curl(stub, name, ca_file, tmp_path / 'no.ipp')
    assert run.returncode == 60, (run.returncode, run.stderr)  # CURLE_PEER_FAILED_VERIFICATION
    assert not (tmp_path / 'no.ipp').exists()
