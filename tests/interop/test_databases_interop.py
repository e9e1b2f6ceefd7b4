"""pgsql and mssql stubs against the real Debian clients: psql (postgresql-client) in plaintext and with
TLS verified against the lab CA, tsql (freetds-bin) with login-only and full TDS encryption, and nmap's
service detection naming both services.

One role daemon (``python -m emulator.roled``) serves both on 127.0.0.1 with the persona certificate
(issued to ``stub.lab`` with the IP SAN 127.0.0.1). psql checks the host name against the certificate,
so its conninfo names ``host=stub.lab`` and connects with ``hostaddr=127.0.0.1``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from emulator.pki import make_test_pki
from tests.support import client_tool, free_port, request_log, run_stub

pytestmark = pytest.mark.interop

USER, PASSWORD = 'safeq', 'safeq-lab-pw'



@pytest.fixture(scope='module')
def stub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('databases-interop')
    pki = make_test_pki(tmp / 'pki')
    other = make_test_pki(tmp / 'other-pki')
    ports = {'pgsql': free_port(), 'mssql': free_port()}
    listeners = [{'transport': 'tcp', 'port': port, 'protocol': protocol, 'security': 'optional'}
                 for protocol, port in ports.items()]
    with run_stub(tmp, listeners, persona=pki, host='database-server', roles=('database-server',)) as log:
        yield {'ports': ports, 'pki': pki, 'other_ca': other['ca_file'], 'log': log, 'home': tmp}


def records_for(stub, port: int, op: str, count: int) -> list[dict]:
    """The stub's witness records of ``op`` on ``port`` once there are ``count`` (it logs as it answers)."""
    deadline = time.monotonic() + 3
    while True:
        found = [r for r in request_log(stub['log']) if r['port'] == port and r['op'] == op]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# --- psql ---------------------------------------------------------------------------------------

def psql(stub, conninfo: str, sql: str, password: str = PASSWORD) -> subprocess.CompletedProcess:
    env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': str(stub['home']),   # no ~/.pgpass
           'PGPASSWORD': password, 'PGCONNECT_TIMEOUT': '5'}
    command = [client_tool('psql', 'postgresql-client'), conninfo, '-X', '-A', '-t', '-c', sql]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


def conninfo(stub, sslmode: str, ca_file: str | None = None) -> str:
    port = stub['ports']['pgsql']
    text = f'port={port} user={USER} dbname=safeq sslmode={sslmode}'
    if sslmode == 'disable':
        return f'host=127.0.0.1 {text}'
    return f'hostaddr=127.0.0.1 host=stub.lab {text} sslrootcert={ca_file or stub["pki"]["ca_file"]}'


def test_psql_plaintext_select_1(stub):
    before = len(records_for(stub, stub['ports']['pgsql'], 'query', 0))
    out = psql(stub, conninfo(stub, 'disable'), 'SELECT 1')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '1'
    query = records_for(stub, stub['ports']['pgsql'], 'query', before + 1)[-1]
    assert (query['sql'], query['tls'], query['peer'], query['result']) == ('SELECT 1', False, '127.0.0.1', 'ok')


def test_psql_verify_full_select_1_and_version(stub):
    out = psql(stub, conninfo(stub, 'verify-full'), 'SELECT 1')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '1'
    assert records_for(stub, stub['ports']['pgsql'], 'query', 1)[-1]['tls'] is True
    out = psql(stub, conninfo(stub, 'verify-full'), 'SELECT version()')
    assert out.returncode == 0 and 'safeq-lab database-server' in out.stdout, out


def test_psql_verify_full_rejects_another_ca(stub):
    out = psql(stub, conninfo(stub, 'verify-full', stub['other_ca']), 'SELECT 1')
    # Both CAs have the same subject: OpenSSL picks the wrong one and its signature check fails
    # ('SSL error: EVP lib' or 'certificate verify failed', depending on the OpenSSL version).
    assert out.returncode != 0 and 'SSL error' in out.stderr, out


def test_psql_wrong_password(stub):
    out = psql(stub, conninfo(stub, 'disable'), 'SELECT 1', password='wrong')
    assert out.returncode != 0 and 'password authentication failed for user "safeq"' in out.stderr, out


def test_psql_unknown_query_is_an_sql_error(stub):
    out = psql(stub, conninfo(stub, 'disable'), 'DELETE FROM jobs')
    assert out.returncode != 0 and 'ERROR:' in out.stderr, out


# --- tsql ---------------------------------------------------------------------------------------

def tsql(stub, config: str, sql: str = 'SELECT 1', password: str = PASSWORD) -> subprocess.CompletedProcess:
    conf = stub['home'] / 'freetds.conf'
    conf.write_text('[global]\n' + config)
    env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': str(stub['home']),
           'FREETDSCONF': str(conf), 'TDSVER': '7.4'}
    command = [client_tool('tsql', 'freetds-bin'), '-H', '127.0.0.1', '-p', str(stub['ports']['mssql']),
               '-U', USER, '-P', password]
    return subprocess.run(command, input=f'{sql}\ngo\nexit\n', env=env, capture_output=True, text=True,
                          timeout=30)


def selected_one(output: str) -> bool:
    lines = [line.strip() for line in output.splitlines()]
    return '1' in lines and '(1 row affected)' in lines


def test_tsql_default_encryption_select_1(stub):
    """FreeTDS's default (encryption = request) answers ENCRYPT_OFF: TLS for LOGIN7 only."""
    out = tsql(stub, '')
    assert out.returncode == 0 and selected_one(out.stdout), out
    port = stub['ports']['mssql']
    prelogin = records_for(stub, port, 'prelogin', 1)[-1]
    assert (prelogin['client_encryption'], prelogin['encryption']) == ('OFF', 'OFF')
    login = records_for(stub, port, 'login', 1)[-1]
    assert (login['user'], login['tls'], login['tds_version'], login['result']) == (USER, True, '7.4', 'ok')
    assert records_for(stub, port, 'batch', 1)[-1]['tls'] is False


def test_tsql_required_encryption_verified_against_the_lab_ca(stub):
    port = stub['ports']['mssql']
    before = len(records_for(stub, port, 'batch', 0))
    out = tsql(stub, f'\tencryption = require\n\tca file = {stub["pki"]["ca_file"]}\n')
    assert out.returncode == 0 and selected_one(out.stdout), out
    assert records_for(stub, port, 'prelogin', 1)[-1]['encryption'] == 'ON'
    batch = records_for(stub, port, 'batch', before + 1)[-1]
    assert (batch['tls'], batch['result']) == (True, 'ok')


def test_tsql_rejects_another_ca(stub):
    out = tsql(stub, f'\tencryption = require\n\tca file = {stub["other_ca"]}\n')
    assert out.returncode != 0 and 'connection failed' in out.stdout + out.stderr, out


def test_tsql_wrong_password(stub):
    out = tsql(stub, '', password='wrong')
    assert out.returncode != 0 and "Login failed for user 'safeq'" in out.stdout + out.stderr, out


def test_tsql_version_names_the_persona(stub):
    out = tsql(stub, '', sql='SELECT @@VERSION')
    assert out.returncode == 0 and 'safeq-lab database-server' in out.stdout, out


# --- nmap -sV -----------------------------------------------------------------------------------

@pytest.mark.parametrize('protocol, service', [('pgsql', 'postgresql'), ('mssql', 'ms-sql-s')])
def test_nmap_names_the_service(stub, protocol, service):
    port = stub['ports'][protocol]
    out = subprocess.run([client_tool('nmap', 'nmap'), '-sV', '-Pn', '-n', '-p', str(port), '127.0.0.1'],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert re.search(rf'^{port}/tcp\s+open\s+{re.escape(service)}\s', out.stdout, re.M), out.stdout
