"""Findings from real clients, checked with those clients against ``python -m emulator.roled``.

* CUPS's ipptool (GnuTLS) over ipps:// with a timeout (-T), as CUPS's own ipp backend runs:
  with TLS 1.3 the server's post-handshake NewSessionTicket made it read "0 bytes" and reconnect
  in a loop. ipptool 2.4 does not evaluate the server certificate (HOME is empty: no
  ~/.cups/ssl is read or written); gnutls-cli verifies it against the lab CA.
* A TLS client offering only ALPN http/1.0 got an internal_error alert.
* Print management's SNMP polls of the Printer-MIB for each vendor persona (snmpwalk, GETBULK).
* ``safeq-lab persona import``: a capture imported, served, and read back with snmpget/ipptool.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import roles
from emulator import persona_import
from emulator.pki import make_test_pki
from tests.support import client_tool, free_port, run_stub

pytestmark = pytest.mark.interop

DATA = Path(__file__).resolve().parents[1] / 'data' / 'personas'
PRINTER_MIB = '1.3.6.1.2.1.43'



def run(*command: str, home: Path, stdin: str = '', timeout: float = 60) -> subprocess.CompletedProcess:
    env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': str(home)}
    return subprocess.run(list(command), input=stdin, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def printer(tmp_path_factory):
    """An MFD persona (Epson: ink, TLS) serving IPP, IPPS, SNMP, and a non-HTTP TLS port."""
    directory = tmp_path_factory.mktemp('findings')
    pki = make_test_pki(directory / 'pki')
    ports = {'ipp': free_port(), 'ipps': free_port(), 'snmp': free_port(), 'framed': free_port()}
    listeners = [{'transport': 'tcp', 'port': ports['ipp'], 'protocol': 'ipp', 'security': 'plain'},
                 {'transport': 'tcp', 'port': ports['ipps'], 'protocol': 'ipp', 'security': 'tls'},
                 {'transport': 'udp', 'port': ports['snmp'], 'protocol': 'snmp', 'security': 'plain'},
                 {'transport': 'tcp', 'port': ports['framed'], 'protocol': 'terminal-x', 'security': 'tls'}]
    identity = roles.identity(['mfd', 'mfd-epson'])
    home = directory / 'home'
    home.mkdir()
    with run_stub(directory, listeners, persona={**pki, 'identity': identity}, host='mfd-epson',
                  roles=('mfd', 'mfd-epson')) as log:
        yield {'ports': ports, 'ca': pki['ca_file'], 'home': home, 'log': log, 'identity': identity,
               'dir': directory}


def test_ipptool_with_a_timeout_over_ipps_gets_the_response(printer):
    document = printer['dir'] / 'doc.pdf'
    document.write_bytes(b'%PDF-1.4\n' + b'0' * 4000 + b'\n%%EOF\n')
    url = f'ipps://127.0.0.1:{printer["ports"]["ipps"]}/ipp/print'
    out = run(client_tool('ipptool', 'cups-ipp-utils'), '-T', '5', '-tv', '-f', str(document), url,
              'get-printer-attributes.test', 'print-job.test', home=printer['home'], timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert out.stdout.count('[PASS]') == 2 and 'RECEIVED: 0 bytes' not in out.stdout
    assert 'printer-make-and-model (textWithoutLanguage) = EPSON WF-C879R' in out.stdout
    assert 'marker-types (1setOf keyword) = ink-cartridge,ink-cartridge,ink-cartridge,ink-cartridge' in out.stdout
    assert not any(printer['home'].iterdir())   # ipptool kept no trust store: it does not verify


def test_gnutls_cli_verifies_and_completes_the_ipps_handshake(printer):
    out = run(client_tool('gnutls-cli', 'gnutls-bin'), '--x509cafile', printer['ca'], '-p', str(printer['ports']['ipps']),
              '127.0.0.1', stdin='GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n',
              home=printer['home'], timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '- Handshake was completed' in out.stdout and 'HTTP/1.1 200 OK' in out.stdout


@pytest.mark.parametrize('port, offered, negotiated', [
    ('ipps', 'http/1.0', None), ('ipps', 'http/1.1', 'http/1.1'), ('ipps', 'h2,http/1.1', 'http/1.1'),
    ('framed', 'http/1.0', None),
])
def test_alpn_without_a_shared_protocol_goes_on_without_alpn(printer, port, offered, negotiated):
    out = run(client_tool('openssl', 'openssl'), 's_client', '-connect', f'127.0.0.1:{printer["ports"][port]}',
              '-alpn', offered, '-CAfile', printer['ca'], '-verify_return_error', stdin='Q\n',
              home=printer['home'], timeout=30)
    assert 'alert' not in out.stderr.lower() and out.returncode == 0, out.stderr
    expected = f'ALPN protocol: {negotiated}' if negotiated else 'No ALPN negotiated'
    assert expected in out.stdout


def snmp(command: str, printer, *args: str) -> subprocess.CompletedProcess:
    return run(client_tool(command, 'snmp'), '-v2c', '-c', 'public', '-On', '-t', '2', '-r', '1',
               f'127.0.0.1:{printer["ports"]["snmp"]}', *args, home=printer['home'], timeout=60)


def walk_values(output: str) -> dict[str, str]:
    return dict(line.split(' = ', 1) for line in output.splitlines() if ' = ' in line)


def test_snmpwalk_and_bulkwalk_read_the_printer_mib_of_the_persona(printer):
    walk, bulk = snmp('snmpwalk', printer, PRINTER_MIB), snmp('snmpbulkwalk', printer, PRINTER_MIB)
    assert walk.returncode == 0 and bulk.returncode == 0, walk.stderr + bulk.stderr
    assert walk.stdout == bulk.stdout and 'No more variables' not in walk.stdout   # ends at the subtree
    values = walk_values(walk.stdout)
    oids = [tuple(map(int, oid.lstrip('.').split('.'))) for oid in values]
    assert oids == sorted(oids)
    identity = printer['identity']
    assert values['.1.3.6.1.2.1.43.5.1.1.16.1'] == 'STRING: "EPSON WF-C879R"'
    assert values['.1.3.6.1.2.1.43.5.1.1.17.1'] == f'STRING: "{identity["serial_number"]}"'
    assert values['.1.3.6.1.2.1.43.10.2.1.4.1.1'] == f'Counter32: {identity["page_count"]}'
    levels = [int(item.split(':')[1]) for item in identity['toner'].split()]
    assert [values[f'.1.3.6.1.2.1.43.11.1.1.9.1.{i}'] for i in (1, 2, 3, 4)] == [f'INTEGER: {n}' for n in levels]
    assert values['.1.3.6.1.2.1.43.11.1.1.6.1.2'] == 'STRING: "Cyan Ink"'
    assert values['.1.3.6.1.2.1.43.11.1.1.5.1.2'] == 'INTEGER: 5'           # ink
    assert values['.1.3.6.1.2.1.43.8.2.1.13.1.3'] == 'STRING: "Rear Paper Feed Manual"'
    host = snmp('snmpget', printer, '.1.3.6.1.2.1.25.3.2.1.3.1', '.1.3.6.1.2.1.25.3.5.1.1.1')
    assert walk_values(host.stdout) == {'.1.3.6.1.2.1.25.3.2.1.3.1': 'STRING: "EPSON WF-C879R"',
                                        '.1.3.6.1.2.1.25.3.5.1.1.1': 'INTEGER: 3'}


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
    """The stub serving a persona imported from the sample Ricoh captures."""
    directory = tmp_path_factory.mktemp('imported')
    walk, ipp_capture = DATA / 'ricoh-im-c3000.walk', DATA / 'ricoh-im-c3000.ipptool.txt'
    [(_, entry)] = persona_import.import_persona(walk, ipp_capture, 'mfd-ricoh').items()
    ports = {'ipp': free_port(), 'snmp': free_port()}
    listeners = [{'transport': 'tcp', 'port': ports['ipp'], 'protocol': 'ipp', 'security': 'plain'},
                 {'transport': 'udp', 'port': ports['snmp'], 'protocol': 'snmp', 'security': 'plain'}]
    home = directory / 'home'
    home.mkdir()
    with run_stub(directory, listeners, persona={'identity': entry}, host='mfd-ricoh', roles=('mfd', 'mfd-ricoh')):
        yield {'ports': ports, 'home': home, 'walk': walk}


def test_imported_snmp_objects_come_back_exactly(imported, tmp_path):
    out = snmp('snmpwalk', imported, '.1')
    assert out.returncode == 0, out.stderr
    served_walk = tmp_path / 'served.walk'
    served_walk.write_text(out.stdout)
    # The served walk, read by the same importer, is the captured one (OIDs, types, values)
    # but for the live sysUpTime; the stub adds its own objects around them.
    captured, served = persona_import.parse_walk(imported['walk']), persona_import.parse_walk(served_walk)
    uptime = persona_import.SYS_UPTIME
    assert {oid: served.get(oid) for oid in captured if oid != uptime} == \
        {oid: value for oid, value in captured.items() if oid != uptime}
    assert served[uptime]['type'] == 'timeticks' and served[uptime]['value'] < captured[uptime]['value']
    location = snmp('snmpget', imported, '.1.3.6.1.2.1.1.6.0')
    assert location.stdout.strip().endswith('"Building 2, floor 3,\ncopy room"')


def test_imported_ipp_attributes_come_back_with_their_types(imported):
    url = f'ipp://127.0.0.1:{imported["ports"]["ipp"]}/ipp/print'
    out = run(client_tool('ipptool', 'cups-ipp-utils'), '-T', '5', '-tv', url, 'get-printer-attributes.test',
              home=imported['home'], timeout=60)
    assert out.returncode == 0, out.stdout[-3000:]
    for line in ('printer-make-and-model (textWithoutLanguage) = RICOH IM C3000',
                 'finishings-supported (1setOf enum) = none,staple,punch,staple-top-left,punch-dual-left',
                 'printer-resolution-supported (1setOf resolution) = 600dpi,1200dpi',
                 'copies-supported (rangeOfInteger) = 1-999',
                 'marker-levels (1setOf integer) = 70,64,44,69',
                 'natural-language-configured (naturalLanguage) = en-us',
                 f'printer-uri-supported (uri) = ipp://localhost:{imported["ports"]["ipp"]}/ipp/print'):
        assert line in out.stdout, line
