"""snmp against net-snmp: snmpget/snmpwalk/snmpbulkwalk/snmptrap/snmpinform and snmptrapd.

Our agent and receiver run as ``python -m emulator.roled`` processes on
127.0.0.1, our probe as ``python -m emulator.prober``; net-snmp's tools talk
to them on free high ports.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import client_tool, free_port, probe_targets, request_log, run_stub

pytestmark = pytest.mark.interop

PERSONA = {'identity': {'printer': True, 'vendor': 'Konica Minolta', 'make_model': 'bizhub C450i',
                        'sys_descr': 'KONICA MINOLTA bizhub C450i',
                        'sys_object_id': '1.3.6.1.4.1.18334.1.2.1.2.1.107.1.1'}}
SYS_DESCR = '1.3.6.1.2.1.1.1.0'
SYS_OBJECT_ID = '1.3.6.1.2.1.1.2.0'
HR_PRINTER_STATUS = '1.3.6.1.2.1.25.3.5.1.1.1'
COLD_START = '1.3.6.1.6.3.1.1.5.1'
LAB_STATE_CHANGE = '1.3.6.1.4.1.32473.6.0.1'




def stub(tmp_path: Path, listeners: list[dict], persona: dict | None = None):
    """roled as the Konica Minolta MFD (an empty persona means this module's too)."""
    return run_stub(tmp_path, listeners, persona or PERSONA, host='mfd-km', roles=('mfd-konica-minolta',))


def free_udp_tcp_port() -> int:
    """A port number free on both UDP and TCP."""
    for _ in range(50):
        number = free_port(socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(('127.0.0.1', number))
            except OSError:
                continue
        return number
    raise AssertionError('no port free on both udp and tcp')


@pytest.fixture
def net_snmp_env(tmp_path):
    """net-snmp without MIB files (numeric OIDs) and with its state under tmp_path."""
    return {**os.environ, 'MIBS': '', 'SNMP_PERSISTENT_DIR': str(tmp_path / 'net-snmp')}


def run(argv: list[str], env, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


# --- agent ---------------------------------------------------------------------

def test_snmpget_udp_and_tcp_read_the_persona(tmp_path, net_snmp_env):
    snmpget = client_tool('snmpget', 'snmp')
    port = free_udp_tcp_port()
    listeners = [{'transport': t, 'port': port, 'protocol': 'snmp'} for t in ('udp', 'tcp')]
    with stub(tmp_path, listeners) as log:
        outputs = {}
        for transport, address in (('udp', f'127.0.0.1:{port}'), ('tcp', f'tcp:127.0.0.1:{port}')):
            done = run([snmpget, '-v2c', '-c', 'public', '-On', '-t', '2', '-r', '0', address,
                        SYS_DESCR, SYS_OBJECT_ID, HR_PRINTER_STATUS], net_snmp_env)
            assert done.returncode == 0, done.stderr
            outputs[transport] = done.stdout
        seen = request_log(log, wait=3.0, count=2)
    for text in outputs.values():
        assert f'.{SYS_DESCR} = STRING: "KONICA MINOLTA bizhub C450i"' in text
        assert f'.{SYS_OBJECT_ID} = OID: .1.3.6.1.4.1.18334.1.2.1.2.1.107.1.1' in text
        assert f'.{HR_PRINTER_STATUS} = INTEGER: 3' in text
    assert [(r['transport'], r['op'], r['peer'], r['port']) for r in seen] == [
        ('udp', 'get', '127.0.0.1', port), ('tcp', 'get', '127.0.0.1', port)]
    assert seen[0]['oids'] == [SYS_DESCR, SYS_OBJECT_ID, HR_PRINTER_STATUS]


def test_snmpwalk_and_snmpbulkwalk(tmp_path, net_snmp_env):
    snmpwalk = client_tool('snmpwalk', 'snmp')
    snmpbulkwalk = client_tool('snmpbulkwalk', 'snmp')
    port = free_udp_tcp_port()
    listeners = [{'transport': t, 'port': port, 'protocol': 'snmp'} for t in ('udp', 'tcp')]
    with stub(tmp_path, listeners):
        walk = run([snmpwalk, '-v2c', '-c', 'public', '-On', '-t', '2', '-r', '0',
                    f'127.0.0.1:{port}', '1.3.6.1.2.1'], net_snmp_env)
        bulk = run([snmpbulkwalk, '-v2c', '-c', 'public', '-On', '-t', '2', '-r', '0',
                    f'tcp:127.0.0.1:{port}', '1.3.6.1.2.1.1'], net_snmp_env)
    assert walk.returncode == 0, walk.stderr
    assert '.1.3.6.1.2.1.1.5.0 = STRING: "mfd-km"' in walk.stdout
    assert '.1.3.6.1.2.1.25.3.2.1.5.1 = INTEGER: 2' in walk.stdout     # hrDeviceStatus running
    assert f'.{HR_PRINTER_STATUS} = INTEGER: 3' in walk.stdout          # hrPrinterStatus idle
    assert bulk.returncode == 0, bulk.stderr
    assert [line.split(' = ')[0] for line in bulk.stdout.splitlines()] == [
        f'.1.3.6.1.2.1.1.{n}.0' for n in range(1, 8)]


def test_snmpget_with_wrong_community_gets_no_answer(tmp_path, net_snmp_env):
    snmpget = client_tool('snmpget', 'snmp')
    port = free_port(socket.SOCK_DGRAM)
    with stub(tmp_path, [{'transport': 'udp', 'port': port, 'protocol': 'snmp'}]) as log:
        done = run([snmpget, '-v2c', '-c', 'private', '-t', '1', '-r', '0',
                    f'127.0.0.1:{port}', SYS_DESCR], net_snmp_env)
        # Then the right one, proving the agent was there all along.
        good = run([snmpget, '-v2c', '-c', 'public', '-t', '1', '-r', '0',
                    f'127.0.0.1:{port}', SYS_DESCR], net_snmp_env)
        seen = request_log(log, wait=3.0)
    assert done.returncode != 0 and 'Timeout' in done.stdout + done.stderr
    assert good.returncode == 0, good.stderr
    assert len(seen) == 1


# --- notifications --------------------------------------------------------------

def test_snmptrap_and_snmpinform_reach_our_receiver(tmp_path, net_snmp_env):
    snmptrap = client_tool('snmptrap', 'snmp')
    snmpinform = client_tool('snmpinform', 'snmp')
    port = free_port(socket.SOCK_DGRAM)
    with stub(tmp_path, [{'transport': 'udp', 'port': port, 'protocol': 'snmp-trap'}],
              persona={}) as log:
        trap = run([snmptrap, '-v2c', '-c', 'public', f'127.0.0.1:{port}', '', COLD_START],
                   net_snmp_env)
        inform = run([snmpinform, '-v2c', '-c', 'public', '-t', '2', '-r', '0',
                      f'127.0.0.1:{port}', '', COLD_START], net_snmp_env)
        v1 = run([snmptrap, '-v1', '-c', 'public', f'127.0.0.1:{port}', '1.3.6.1.4.1.8072',
                  '127.0.0.1', '6', '17', ''], net_snmp_env)
        seen = request_log(log, wait=3.0, count=3)
    assert trap.returncode == 0, trap.stderr
    assert inform.returncode == 0, inform.stderr      # acknowledged
    assert v1.returncode == 0, v1.stderr
    assert [(r['op'], r['pdu'], r['trap_oid'], r['peer']) for r in seen] == [
        ('trap', 'trap', COLD_START, '127.0.0.1'),
        ('trap', 'inform', COLD_START, '127.0.0.1'),
        ('trap', 'v1-trap', '1.3.6.1.4.1.8072.0.17', '127.0.0.1')]


def test_snmptrapd_acknowledges_our_probe(tmp_path, net_snmp_env):
    snmptrapd = client_tool('snmptrapd', 'snmptrapd')
    port = free_port(socket.SOCK_DGRAM)
    conf = tmp_path / 'snmptrapd.conf'
    conf.write_text('authCommunity log public\n')
    log = tmp_path / 'snmptrapd.log'
    daemon = subprocess.Popen([snmptrapd, '-f', '-Lf', str(log), '-C', '-c', str(conf), '-n', '-On',
                               f'udp:127.0.0.1:{port}'],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=net_snmp_env)
    try:
        deadline = time.monotonic() + 5
        while 'NET-SNMP version' not in (log.read_text() if log.exists() else ''):
            assert daemon.poll() is None, f'snmptrapd exited: {daemon.stderr.read()}'
            assert time.monotonic() < deadline, 'snmptrapd did not start'
            time.sleep(0.02)
        base = dict(host='127.0.0.1', transport='udp', protocol='snmp-trap', port=port,
                    timeout=2.0)
        results = probe_targets([
            {**base, 'id': 'state', 'options': {'state': 'authenticated'}},
            {**base, 'id': 'cold', 'options': {'trap_oid': COLD_START}},
            {**base, 'id': 'bad', 'timeout': 0.5, 'options': {'community': 'private'}},
        ])
        time.sleep(0.2)
        text = log.read_text()
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        daemon.stderr.close()
    assert [r['outcome'] for r in results] == ['ok', 'ok', 'timeout'], results
    assert results[0]['exchange'].startswith('SNMPv2c/UDP INFORM safeqLabStateChange')
    assert f'.1.3.6.1.6.3.1.1.4.1.0 = OID: .{LAB_STATE_CHANGE}' in text
    assert '.1.3.6.1.4.1.32473.6.1.1.0 = STRING: "authenticated"' in text
    assert f'.1.3.6.1.6.3.1.1.4.1.0 = OID: .{COLD_START}' in text
