"""Real Debian clients against the netbios and smb stubs (``python -m emulator.roled`` on
127.0.0.1, tests.support.run_stub).

- netbios-ns: ``nmblookup`` (package samba-common-bin) has no port option (Samba 4.17's
  source3 client always sends to 137; ``--option='nbt port=...'`` is not used by it), so the
  nmblookup test runs the stub and nmblookup in a network namespace of its own (``unshare
  --net``, root), where port 137 of its loopback is free whatever this host runs. ``nmap -sU -sV`` (package nmap) sends
  its NBTStat probe to any port: that test runs on a free port and checks nmap names the
  service like a Windows host (netbios-ns, workgroup, host name).
- netbios-dgm: no Debian client sends a browser datagram to a chosen port (``nmblookup -M``
  and ``smbclient -L`` use 137/138 and need a real browse list); the datagram service is
  covered by the prober through the role daemon (last test) and by the unit tests.
- smb: ``smbclient`` (package smbclient) on a free port (``-p``) puts a file, lists the
  share and gets the file back, with the default (SMB 3.1.1) and the oldest (SMB 2.0.2)
  dialect; ``nmap -sV`` names the port microsoft-ds; ``nmap --script smb-protocols,
  smb2-capabilities`` with ``--script-args smbport=PORT`` lists the dialects.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from emulator.protocols import module_for, netbios, smb
from emulator.protocols.payloads import scanned_pdf
from tests.support import client_tool, REPO, free_port, request_log, run_stub

pytestmark = pytest.mark.interop

CLIENT_TIMEOUT = 60
PERSONA = {'address': '127.0.0.1', 'identity': {'workgroup': 'SAFEQLAB'}}



def run(args: list[str], timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'LC_ALL': 'C'})


@pytest.fixture(autouse=True)
def registered():
    for protocol_id, module in (('netbios-ns', netbios), ('netbios-dgm', netbios), ('smb', smb)):
        assert module_for(protocol_id) is module, \
            f'{protocol_id!r} is not served by {module.__name__}: register it in emulator/protocols'


# --- netbios-ns -----------------------------------------------------------------------------

# Runs inside `unshare --net`: its own loopback, so the real name-service port is free.
NMBLOOKUP_IN_NAMESPACE = """
import json, socket, subprocess, sys
from pathlib import Path
from tests.support import request_log, run_stub
subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)
tmp, persona, nmblookup = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
port = socket.getservbyname('netbios-ns', 'udp')
listeners = [{'transport': 'udp', 'port': port, 'protocol': 'netbios-ns', 'security': 'optional'}]
def ask(*args):
    done = subprocess.run([nmblookup, *args], capture_output=True, text=True, timeout=60, env={'LC_ALL': 'C'})
    return {'returncode': done.returncode, 'out': done.stdout + done.stderr}
with run_stub(tmp, listeners, persona=persona, host='shared-folder') as log:
    answers = {'status': ask('-A', '127.0.0.1'), 'query': ask('-U', '127.0.0.1', 'SHARED-FOLDER#20'),
               'missing': ask('-U', '127.0.0.1', 'NOBODY')}
    answers['records'] = request_log(log, count=3)
print(json.dumps(answers))
"""


def test_nmblookup_node_status_and_name_query(tmp_path):
    nmblookup = client_tool('nmblookup', 'samba-common-bin')
    unshare = client_tool('unshare', 'util-linux')
    done = subprocess.run([unshare, '--net', sys.executable, '-c', NMBLOOKUP_IN_NAMESPACE, str(tmp_path),
                           json.dumps(PERSONA), nmblookup], capture_output=True, text=True,
                          timeout=4 * CLIENT_TIMEOUT, cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert done.returncode == 0, f'nmblookup needs a network namespace of its own (run as root): {done.stderr[-2000:]}'
    answers = json.loads(done.stdout)
    status, query, missing = answers['status'], answers['query'], answers['missing']
    assert status['returncode'] == 0, status['out']
    lines = [' '.join(line.split()) for line in status['out'].splitlines()]
    for expected in ('SHARED-FOLDER <00> - M <ACTIVE>', 'SAFEQLAB <00> - <GROUP> M <ACTIVE>',
                     'SHARED-FOLDER <20> - M <ACTIVE>', 'SAFEQLAB <1d> - M <ACTIVE>'):
        assert expected in lines, status['out']
    assert '127.0.0.1 SHARED-FOLDER<20>' in query['out'], query['out']
    assert 'name_query failed to find name NOBODY' in missing['out']
    assert [(r['op'], r['name'], r['answered']) for r in answers['records']] == [
        ('node-status', '*<00>', True), ('name-query', 'SHARED-FOLDER<20>', True), ('name-query', 'NOBODY<00>', False)]


def test_nmap_version_scan_names_the_name_service(tmp_path):
    nmap = client_tool('nmap', 'nmap')
    port = free_port(socket.SOCK_DGRAM)
    listeners = [{'transport': 'udp', 'port': port, 'protocol': 'netbios-ns', 'security': 'optional'}]
    with run_stub(tmp_path, listeners, persona=PERSONA, host='shared-folder') as log:
        done = run([nmap, '-Pn', '-n', '-sU', '-sV', '--version-intensity', '7', '-p', str(port), '127.0.0.1'])
        records = request_log(log)
    assert done.returncode == 0, done.stderr
    assert f'{port}/udp open  netbios-ns' in done.stdout, done.stdout
    assert 'workgroup: SAFEQLAB' in done.stdout and 'Host: SHARED-FOLDER' in done.stdout, done.stdout
    assert any(r['op'] == 'node-status' for r in records)


# --- smb ------------------------------------------------------------------------------------

def smbclient(binary: str, port: int, commands: str, *extra: str) -> subprocess.CompletedProcess:
    return run([binary, '//127.0.0.1/scans', '-p', str(port), '-N', *extra, '-c', commands])


@pytest.mark.parametrize('max_protocol, dialect', [(None, '3.1.1'), ('SMB2_02', '2.0.2')])
def test_smbclient_puts_lists_and_gets_a_file(tmp_path, max_protocol, dialect):
    binary = client_tool('smbclient', 'smbclient')
    port = free_port()
    scan = tmp_path / 'scan.pdf'
    scan.write_bytes(scanned_pdf(300_000))
    back = tmp_path / 'back.pdf'
    extra = ('-m', max_protocol) if max_protocol else ()
    with run_stub(tmp_path, [{'transport': 'tcp', 'port': port, 'protocol': 'smb'}],
                  persona=PERSONA, host='shared-folder') as log:
        done = smbclient(binary, port, f'put {scan} scan.pdf; ls; get scan.pdf {back}', *extra)
        records = request_log(log, count=5)
    assert done.returncode == 0, done.stdout + done.stderr
    assert back.read_bytes() == scan.read_bytes()
    listing = [line.split() for line in done.stdout.splitlines()]
    assert ['scan.pdf', 'A', '300000'] in [entry[:3] for entry in listing], done.stdout
    ops = [(r['op'], r.get('dialect') or r.get('share') or '') for r in records]
    assert ops[:3] == [('negotiate', dialect), ('session-setup', ''), ('tree-connect', 'scans')], records
    assert {'op': 'write-file', 'share': 'scans', 'name': 'scan.pdf', 'bytes': 300_000, 'size': 300_000}.items() \
        <= next(r for r in records if r['op'] == 'write-file').items()


def test_smbclient_sees_a_missing_share_and_file(tmp_path):
    binary = client_tool('smbclient', 'smbclient')
    port = free_port()
    persona = {**PERSONA, 'identity': {'smb_shares': ['scans']}}
    with run_stub(tmp_path, [{'transport': 'tcp', 'port': port, 'protocol': 'smb'}], persona=persona) as log:
        missing_file = smbclient(binary, port, f'get nothing.pdf {tmp_path / "x"}')
        missing_share = run([binary, '//127.0.0.1/other', '-p', str(port), '-N', '-c', 'ls'])
        records = request_log(log, count=6)
    assert 'NT_STATUS_OBJECT_NAME_NOT_FOUND' in missing_file.stdout + missing_file.stderr
    assert missing_share.returncode != 0
    assert 'NT_STATUS_BAD_NETWORK_NAME' in missing_share.stdout + missing_share.stderr
    assert {'op': 'tree-connect', 'share': 'other', 'status': 'BAD_NETWORK_NAME'}.items() <= records[-1].items()


def test_nmap_identifies_microsoft_ds_and_smb2_dialects(tmp_path):
    nmap = client_tool('nmap', 'nmap')
    port = free_port()
    with run_stub(tmp_path, [{'transport': 'tcp', 'port': port, 'protocol': 'smb'}], persona=PERSONA,
                  host='shared-folder'):
        version = run([nmap, '-Pn', '-n', '-sV', '-p', str(port), '127.0.0.1'])
        scripts = run([nmap, '-Pn', '-n', '-p', str(port), '--script', 'smb-protocols,smb2-capabilities',
                       '--script-args', f'smbport={port}', '127.0.0.1'])
    assert f'{port}/tcp open  microsoft-ds' in version.stdout, version.stdout
    assert 'Microsoft Windows' in version.stdout
    dialects = re.findall(r'^\|[_ ]\s+(\d{3})\s*$', scripts.stdout, re.M)
    assert dialects == ['202', '210', '300', '302', '311'], scripts.stdout
    assert 'Multi-credit operations' in scripts.stdout


# --- the probes through the role daemon, as the lab runs them ----------------------------------

def test_prober_checks_every_netbios_and_smb_listener(tmp_path):
    udp_ports = [free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)]
    while udp_ports[1] == udp_ports[0]:
        udp_ports[1] = free_port(socket.SOCK_DGRAM)
    tcp_port = free_port()
    listeners = [{'transport': 'udp', 'port': udp_ports[0], 'protocol': 'netbios-ns', 'security': 'optional'},
                 {'transport': 'udp', 'port': udp_ports[1], 'protocol': 'netbios-dgm', 'security': 'optional'},
                 {'transport': 'tcp', 'port': tcp_port, 'protocol': 'smb'}]
    targets = [{'id': l['protocol'], 'host': '127.0.0.1', 'transport': l['transport'], 'protocol': l['protocol'],
                'port': l['port'], 'security': l.get('security', 'plain'), 'size': 100_000, 'timeout': 5.0,
                'server_name': 'shared-folder.lab', 'options': {'workgroup': 'SAFEQLAB'}} for l in listeners]
    with run_stub(tmp_path, listeners, persona=PERSONA, host='shared-folder') as log:
        done = subprocess.run([sys.executable, '-m', 'emulator.prober'], input=json.dumps(targets),
                              capture_output=True, text=True, cwd=REPO, timeout=CLIENT_TIMEOUT)
        records = request_log(log, count=6)
    assert done.returncode == 0, done.stderr
    results = {r['id']: r for r in json.loads(done.stdout)}
    outcomes = {k: r['outcome'] for k, r in results.items()}
    assert outcomes == {'netbios-ns': 'ok', 'netbios-dgm': 'ok', 'smb': 'ok'}, results
    assert {r['op'] for r in records} >= {'name-query', 'datagram', 'negotiate', 'write-file'}
