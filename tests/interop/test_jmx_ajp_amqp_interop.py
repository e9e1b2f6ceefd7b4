"""nmap (package nmap) against the jmx, ajp and amqp stubs on 127.0.0.1.

One role daemon (``python -m emulator.roled``) serves four listeners: jmx (plain), ajp (plain),
amqp plain and amqp over implicit TLS (AMQPS, the catalog's form).

- ``-sV`` must name the services from nmap's own probes: ``java-rmi`` (JavaRMI probe: the
  ProtocolAck), ``ajp13`` (GetRequest: the container's 400 Bad Request packet), ``amqp`` (GetRequest:
  the broker's protocol header) and, on the TLS port, ``ssl/amqp`` (nmap finds TLS, then reruns
  its probes inside it).
- ``rmi-dumpregistry`` lists the bound names and the stubs' class hierarchy.
- ``ajp-methods`` reads the Allow header of an OPTIONS forward request.
- ``amqp-info`` prints the broker's server-properties. The script always connects in clear text
  (nselib/amqp.lua: ``connect(host, port, "tcp")``), so it runs against the plain listener; over
  the TLS port it cannot work, and that is asserted too (the codec behind both is the same).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from emulator.pki import make_test_pki
from tests.support import client_tool, free_port, request_log, run_stub

pytestmark = pytest.mark.interop

NMAP_TIMEOUT = 90          # seconds for the subprocess; nmap itself stops at --host-timeout


@pytest.fixture(scope='module')
def nmap():
    path = client_tool('nmap', 'nmap')
    return path


@pytest.fixture(scope='module')
def stub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('jmx-ajp-amqp-interop')
    pki = make_test_pki(tmp / 'pki', host='edge.lab')
    ports = {'jmx': free_port(), 'ajp': free_port(), 'amqp': free_port(), 'amqps': free_port()}
    listeners = [{'transport': 'tcp', 'port': ports['jmx'], 'protocol': 'jmx'},
                 {'transport': 'tcp', 'port': ports['ajp'], 'protocol': 'ajp'},
                 {'transport': 'tcp', 'port': ports['amqp'], 'protocol': 'amqp'},
                 {'transport': 'tcp', 'port': ports['amqps'], 'protocol': 'amqp', 'security': 'tls'}]
    with run_stub(tmp, listeners, persona=pki, host='edge', roles=('edge-remote-site-server-config',)) as log:
        yield {'ports': ports, 'log': log}


def run_nmap(nmap: str, port: int, *args: str) -> str:
    command = [nmap, '-Pn', '-n', '--host-timeout', '60s', '-p', str(port), *args, '127.0.0.1']
    done = subprocess.run(command, capture_output=True, text=True, timeout=NMAP_TIMEOUT,
                          env={**os.environ, 'LC_ALL': 'C'})
    assert done.returncode == 0, f'{" ".join(command)} exited {done.returncode}: {done.stderr}'
    return done.stdout


def port_line(output: str, port: int) -> str:
    lines = [line for line in output.splitlines() if line.startswith(f'{port}/tcp ')]
    assert lines, output
    return lines[0]


def records(stub, port: int, op: str) -> list[dict]:
    return [r for r in request_log(stub['log'], wait=0.5) if r['port'] == port and r['op'] == op]


@pytest.mark.parametrize('listener, service', [
    ('jmx', 'java-rmi'), ('ajp', 'ajp13'), ('amqp', 'amqp'), ('amqps', 'ssl/amqp')])
def test_nmap_version_scan_names_the_service(nmap, stub, listener, service):
    port = stub['ports'][listener]
    line = port_line(run_nmap(nmap, port, '-sV'), port)
    assert line.split()[1:3] == ['open', service], line


def test_rmi_dumpregistry_lists_the_bound_names(nmap, stub):
    port = stub['ports']['jmx']
    output = run_nmap(nmap, port, '-sV', '--script', 'rmi-dumpregistry')
    assert '| rmi-dumpregistry: \n|   jmxrmi\n' in output, output
    assert '|   safeq-lab/edge\n' in output, output
    assert 'javax.management.remote.rmi.RMIServer' in output and f'@127.0.0.1:{port}' in output, output
    assert {r['name'] for r in records(stub, port, 'lookup')} >= {'jmxrmi', 'safeq-lab/edge'}


def test_ajp_methods_reads_the_allow_header(nmap, stub):
    port = stub['ports']['ajp']
    output = run_nmap(nmap, port, '-sV', '--script', 'ajp-methods,ajp-request')   # portrule: ajp13
    assert 'Supported methods: GET HEAD POST OPTIONS' in output, output
    assert 'AJP/1.3 200 OK' in output and 'safeq-lab edge (edge-remote-site-server-config)' in output, output
    assert {r['method'] for r in records(stub, port, 'forward-request')} >= {'OPTIONS', 'GET'}


def test_amqp_info_prints_the_server_properties(nmap, stub):
    port = stub['ports']['amqp']
    output = run_nmap(nmap, port, '-sV', '--script', 'amqp-info')
    assert 'safeq-lab AMQP broker 0.9.1 (0-9)' in port_line(output, port), output
    for line in ('cluster_name: edge', 'mechanisms: PLAIN', 'locales: en_US', 'product: safeq-lab AMQP broker'):
        assert f'|   {line}' in output or f'|_  {line}' in output, output


def test_amqp_info_cannot_speak_tls(nmap, stub):
    """nmap's amqp library has no TLS: on the AMQPS port its clear-text header meets TLS."""
    port = stub['ports']['amqps']
    output = run_nmap(nmap, port, '-sV', '--script', 'amqp-info')
    assert 'ssl/amqp' in port_line(output, port)
    assert 'amqp-info: ERROR: AMQP:handshake connection closed unexpectedly' in output, output
    assert records(stub, port, 'login') == []
