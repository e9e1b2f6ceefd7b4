"""Real Debian clients against the ssh and mdns stubs (``python -m emulator.roled`` on 127.0.0.1,
tests.support.run_stub, with lab PKI material from emulator.pki.make_test_pki).

- ssh:  ``ssh-keyscan`` (openssh-client) gets the host key, which must be the one the stub
        published next to the lab CA; ``ssh -i <lab client key> ... hostname`` (openssh-client,
        BatchMode: a key or nothing) prints the persona's host name; an unknown command exits 127;
        ``nmap -sV`` (nmap) names the service ssh.
- mdns: ``dig -p PORT @127.0.0.1 _ipp._tcp.local PTR`` (dnsutils) gets the PTR to the printer
        instance with its SRV, TXT and A records (a legacy unicast query, RFC 6762 §6.7).
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from emulator import pki
from emulator.protocols import mdns, module_for, ssh
from tests.support import client_tool, free_port, request_log, run_stub

pytestmark = pytest.mark.interop

CLIENT_TIMEOUT = 20
NMAP_TIMEOUT = 90



@pytest.fixture(autouse=True)
def registered():
    """The daemon must serve these protocols with their own modules, not framed."""
    assert module_for('ssh') is ssh, "'ssh' is not served by emulator.protocols.ssh"
    assert module_for('mdns') is mdns, "'mdns' is not served by emulator.protocols.mdns"


@pytest.fixture
def material(tmp_path):
    return pki.make_test_pki(tmp_path / 'pki', host='stub.lab', address='127.0.0.1')


@pytest.fixture
def ssh_stub(tmp_path, material):
    """An ssh listener with security 'tls', as the catalog lists it; yields (port, request log)."""
    port = free_port()
    with run_stub(tmp_path, [{'transport': 'tcp', 'port': port, 'protocol': 'ssh', 'security': 'tls'}],
                  persona=material) as log:
        yield port, log


def run(args: list[str], timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'LC_ALL': 'C'})


def ssh_command(material: dict, port: int, command: str) -> subprocess.CompletedProcess:
    key = Path(material['ca_file']).parent / pki.SSH_CLIENT_KEY_FILE
    return run([client_tool('ssh', 'openssh-client'), '-p', str(port), '-i', str(key), '-F', '/dev/null',
                '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'BatchMode=yes',
                '-o', 'IdentitiesOnly=yes', '-o', 'ConnectTimeout=10', f'{ssh.LAB_USER}@127.0.0.1', command])


def test_ssh_keyscan_gets_the_published_host_key(ssh_stub, material):
    port, log = ssh_stub
    done = run([client_tool('ssh-keyscan', 'openssh-client'), '-T', '10', '-t', 'ed25519', '-p', str(port), '127.0.0.1'])
    assert done.returncode == 0, done.stderr
    scanned = done.stdout.split()
    published = pki.ssh_host_key_file(Path(material['ca_file']).parent, 'stub').read_text().split()
    assert scanned[0] == f'[127.0.0.1]:{port}' and scanned[1:3] == published[:2]
    assert 'SSH-2.0-' in done.stderr   # keyscan prints the server's banner as a comment
    assert any(r['op'] == 'hello' and 'keyscan' in r['client_version'] for r in request_log(log))


def test_openssh_client_logs_in_with_the_lab_key_and_runs_hostname(ssh_stub, material):
    port, log = ssh_stub
    done = ssh_command(material, port, 'hostname')
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'stub\n'
    records = request_log(log, count=3)
    assert [(r['op'], r.get('method'), r.get('command')) for r in records] == [
        ('hello', None, None), ('auth', 'publickey', None), ('exec', None, 'hostname')]
    assert records[0]['client_version'].startswith('SSH-2.0-OpenSSH')


def test_openssh_client_gets_127_for_anything_outside_the_table(ssh_stub, material):
    port, log = ssh_stub
    done = ssh_command(material, port, 'cat /etc/passwd')
    assert done.returncode == 127 and done.stdout == ''
    assert 'cat: not found' in done.stderr
    assert [r['exit_status'] for r in request_log(log, count=3) if r['op'] == 'exec'] == [127]


def test_nmap_identifies_ssh(ssh_stub):
    port, _log = ssh_stub
    done = run([client_tool('nmap', 'nmap'), '-sV', '-Pn', '-n', '--host-timeout', '60s', '-p', str(port), '127.0.0.1'],
               timeout=NMAP_TIMEOUT)
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if l.startswith(f'{port}/tcp'))
    assert line.split()[1:3] == ['open', 'ssh'], done.stdout


def test_dig_gets_the_ipp_ptr_with_srv_txt_and_a(tmp_path, material):
    port = free_port(socket.SOCK_DGRAM)
    persona = {**material, 'address': '127.0.0.1',
               'identity': {'make_model': 'RICOH IM C3000', 'ipp_port': port + 1}}
    with run_stub(tmp_path, [{'transport': 'udp', 'port': port, 'protocol': 'mdns'}], persona=persona) as log:
        done = run([client_tool('dig', 'dnsutils'), '+time=3', '+tries=2', '+noall', '+answer', '+additional',
                    '-p', str(port), '@127.0.0.1', '_ipp._tcp.local', 'PTR'])
        records = request_log(log)
    assert done.returncode == 0, done.stderr
    lines = [l.split(None, 4) for l in done.stdout.splitlines() if l and not l.startswith(';')]
    by_type = {fields[3]: fields for fields in lines}
    instance = r'RICOH\032IM\032C3000\032[stub]._ipp._tcp.local.'
    assert by_type['PTR'][0] == '_ipp._tcp.local.' and by_type['PTR'][4] == instance
    assert by_type['SRV'][4] == f'0 0 {port + 1} stub.local.'
    assert '"ty=RICOH IM C3000"' in by_type['TXT'][4] and '"rp=ipp/print"' in by_type['TXT'][4]
    assert by_type['A'][0] == 'stub.local.' and by_type['A'][4] == '127.0.0.1'
    assert records and records[0]['op'] == 'query' and records[0]['legacy_unicast'] is True
    assert records[0]['questions'] == ['_ipp._tcp.local PTR'] and records[0]['peer'] == '127.0.0.1'
