"""Real Debian clients against the raw, lpd, timesync and terminal stubs.

Each stub runs as ``python -m emulator.roled`` on 127.0.0.1 (tests.support.run_stub).

- time:     ``rdate`` (package rdate) over UDP and TCP on a free high port (``-o``).
            No ``-n``: that switches rdate to SNTP instead of RFC 868.
- raw:      ``nc -N`` (package netcat-openbsd) sends a PJL job and half-closes, like a
            print spooler; the stub's @PJL INFO LABBYTES reply and its request log must
            agree with the bytes sent.
- lpr:      Debian has no LPD client that can reach an arbitrary port without a local
            daemon: ``lpr`` (lpr, cups-bsd) needs a configured printer/daemon, and
            ``rlpr`` (package rlpr) sends straight to the host but always to the
            ``printer`` service port 515 (its ``--port`` is for its rlprd proxy). So the
            LPR test uses a tiny RFC 1179 client written with Python's socket module.
- terminal: ``openssl s_client`` (package openssl) verifies the TLS listener's chain
            with the lab CA and fails without it or with the wrong host name.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import time

import pytest

from emulator.protocols import payloads
from emulator import pki
from emulator.protocols import lpd, module_for, raw, terminal, timesync
from tests.support import client_tool, free_port, request_log, run_stub

pytestmark = pytest.mark.interop

CLIENT_TIMEOUT = 15



@pytest.fixture(autouse=True)
def registered():
    """The daemon must serve these protocols with their own modules, not framed."""
    for protocol_id, module in (('time', timesync), ('raw', raw), ('lpr', lpd),
                                ('terminal', terminal)):
        assert module_for(protocol_id) is module, \
            f'{protocol_id!r} is not served by {module.__name__}: register it in emulator/protocols'


# --- time: rdate ------------------------------------------------------------------------

def rdate_time(rdate: str, port: int, udp: bool) -> float:
    args = [rdate, '-p'] + (['-u'] if udp else []) + ['-o', str(port), '127.0.0.1']
    done = subprocess.run(args, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                          env={**os.environ, 'TZ': 'UTC', 'LC_ALL': 'C'})
    assert done.returncode == 0, f'{" ".join(args)} exited {done.returncode}: {done.stderr}'
    # rdate -p prints the remote time like date(1): "Tue Nov 24 10:34:25 UTC 2026".
    text = done.stdout.strip().splitlines()[-1].split('\t')[-1].strip()
    stamp = datetime.datetime.strptime(text, '%a %b %d %H:%M:%S UTC %Y')
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


@pytest.mark.parametrize('transport', ['udp', 'tcp'])
def test_rdate_reads_the_time_stub(tmp_path, transport):
    rdate = client_tool('rdate', 'rdate')
    port = free_port(socket.SOCK_DGRAM if transport == 'udp' else socket.SOCK_STREAM)
    with run_stub(tmp_path, [{'transport': transport, 'port': port, 'protocol': 'time'}]) as log:
        before = time.time()
        remote = rdate_time(rdate, port, udp=transport == 'udp')
        after = time.time()
        records = request_log(log)
    # Whole seconds: the stub's answer is floor(its clock), within 1 s of ours.
    assert before - 1 <= remote <= after + 1, f'rdate says {remote}, our clock {before}..{after}'
    assert records and records[0]['op'] == 'time' and records[0]['transport'] == transport
    assert records[0]['peer'] == '127.0.0.1'


# --- raw: nc -N ---------------------------------------------------------------------------

def test_netcat_pjl_job_is_counted(tmp_path):
    nc = client_tool('nc', 'netcat-openbsd')
    size = 256 << 10
    job, data, _ = raw.build_job(size, 'netcat job')
    job_file = tmp_path / 'job.pcl'
    job_file.write_bytes(job)
    port = free_port()
    persona = {'identity': {'make_model': 'HP LaserJet M607'}}
    with run_stub(tmp_path, [{'transport': 'tcp', 'port': port, 'protocol': 'raw'}],
                  persona=persona) as log:
        with job_file.open('rb') as stdin:
            done = subprocess.run([nc, '-N', '-w', '10', '127.0.0.1', str(port)], stdin=stdin,
                                  capture_output=True, timeout=CLIENT_TIMEOUT)
        records = request_log(log)
    assert done.returncode == 0, done.stderr.decode(errors='replace')
    replies, _ = raw.parse_pjl_replies(done.stdout)
    assert replies[0] == ('@PJL INFO ID', ['"HP LaserJet M607"']), done.stdout[:500]
    fields = raw.reply_fields(replies[1][1])
    assert replies[1][0] == '@PJL INFO LABBYTES' and fields['PDL'] == str(len(data))
    assert records == [{**records[0], 'op': 'print-job', 'bytes': len(job), 'pdl_bytes': size,
                        'pjl': True, 'language': 'POSTSCRIPT', 'job': 'netcat job',
                        'end': 'half-close', 'peer': '127.0.0.1'}]


# --- lpr: a minimal RFC 1179 client (see the module docstring) ----------------------------

def lpr_submit(port: int, queue: str, control: bytes, data: bytes, number: int = 42,
               host: str = 'interop') -> bytes:
    """Submit one job the way BSD lpr does; returns the acknowledgement bytes."""
    acks = b''
    with socket.create_connection(('127.0.0.1', port), timeout=CLIENT_TIMEOUT) as conn:
        for chunk in (b'\x02' + queue.encode() + b'\n',
                      b'\x02%d cfA%03d%s\n' % (len(control), number, host.encode()),
                      control + b'\x00',
                      b'\x03%d dfA%03d%s\n' % (len(data), number, host.encode()),
                      data + b'\x00'):
            conn.sendall(chunk)
            ack = conn.recv(1)
            acks += ack
            if ack != b'\x00':
                break
    return acks


def test_rfc1179_client_submits_a_job(tmp_path):
    port = free_port()
    data = payloads.postscript_job(200_000, 'lpr job')
    control = lpd.control_file('interop', 'alice', 'lpr job', 'dfA042interop')
    persona = {'identity': {'lpd_queues': ['secure', 'direct']}}
    with run_stub(tmp_path, [{'transport': 'tcp', 'port': port, 'protocol': 'lpr'}],
                  persona=persona) as log:
        assert lpr_submit(port, 'secure', control, data) == b'\x00' * 5
        assert lpr_submit(port, 'nosuchqueue', control, data) == b'\x01'
        records = request_log(log)
    assert len(records) == 1
    assert {k: records[0][k] for k in ('op', 'queue', 'bytes', 'user', 'job', 'client_host')} == \
        {'op': 'receive-job', 'queue': 'secure', 'bytes': 200_000, 'user': 'alice',
         'job': 'lpr job', 'client_host': 'interop'}


# --- terminal TLS: openssl s_client ---------------------------------------------------------

def s_client(openssl: str, port: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([openssl, 's_client', '-connect', f'127.0.0.1:{port}',
                           '-verify_return_error', '-servername', 'stub.lab', *extra],
                          input='', capture_output=True, text=True, timeout=CLIENT_TIMEOUT)


def test_openssl_verifies_the_terminal_tls_listener(tmp_path):
    openssl = client_tool('openssl', 'openssl')
    material = pki.make_test_pki(tmp_path / 'pki', host='stub.lab', address='127.0.0.1')
    port = free_port()
    listener = {'transport': 'tcp', 'port': port, 'protocol': 'terminal', 'security': 'tls'}
    with run_stub(tmp_path, [listener], persona=material):
        trusted = s_client(openssl, port, '-CAfile', material['ca_file'])
        named = s_client(openssl, port, '-CAfile', material['ca_file'], '-verify_hostname', 'stub.lab')
        untrusted = s_client(openssl, port)
        misnamed = s_client(openssl, port, '-CAfile', material['ca_file'],
                            '-verify_hostname', 'spooler.lab')
    assert trusted.returncode == 0 and 'Verify return code: 0 (ok)' in trusted.stdout, \
        trusted.stdout[-800:] + trusted.stderr[-800:]
    assert named.returncode == 0 and 'Verify return code: 0 (ok)' in named.stdout
    assert untrusted.returncode != 0 and 'Verify return code: 0 (ok)' not in untrusted.stdout
    assert 'unable to get local issuer certificate' in untrusted.stdout + untrusted.stderr
    assert misnamed.returncode != 0
    assert 'hostname mismatch' in misnamed.stdout + misnamed.stderr
