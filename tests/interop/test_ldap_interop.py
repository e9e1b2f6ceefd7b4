"""ldap stub against OpenLDAP's ldapsearch (Debian ldap-utils): plain LDAP, LDAPS, StartTLS.

One role daemon (``python -m emulator.roled``) serves three listeners on
127.0.0.1: plain, implicit TLS and StartTLS-required. TLS is verified the
strict way (LDAPTLS_REQCERT=demand against the test CA); the URL carries the
IP address, which the test certificate has as a SAN.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from emulator.pki import make_test_pki
from tests.support import client_tool, free_port, request_log, run_stub

pytestmark = pytest.mark.interop

BASE = 'dc=safeq,dc=lab'
ALICE = f'uid=alice,ou=people,{BASE}'
GROUPS = f'ou=groups,{BASE}'


@pytest.fixture(scope='module')
def ldapsearch():
    path = client_tool('ldapsearch', 'ldap-utils')
    return path


@pytest.fixture(scope='module')
def stub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ldap-interop')
    pki = make_test_pki(tmp / 'pki')
    ports = {security: free_port() for security in ('plain', 'tls', 'starttls')}
    listeners = [{'transport': 'tcp', 'port': port, 'protocol': 'ldap', 'security': security}
                 for security, port in ports.items()]
    with run_stub(tmp, listeners, persona=pki, host='terminal-server',
                  roles=('terminal-server',)) as log:
        yield {'ports': ports, 'pki': pki, 'log': log, 'home': tmp}


def run(ldapsearch, stub, url, *args, ca_file=None, password='alice-lab-pw', bind=True):
    env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
           'HOME': str(stub['home']),       # no ~/.ldaprc
           'LDAPCONF': os.devnull,          # no /etc/ldap/ldap.conf
           'LDAPTLS_CACERT': ca_file or stub['pki']['ca_file'],
           'LDAPTLS_REQCERT': 'demand'}
    command = [ldapsearch, '-x', '-LLL', '-o', 'nettimeout=5', '-H', url]
    if bind:
        command += ['-D', ALICE, '-w', password]
    return subprocess.run(command + list(args), env=env, capture_output=True, text=True, timeout=30)


def groups_of_alice(ldapsearch, stub, url, *options, **kwargs):
    return run(ldapsearch, stub, url, *options, '-b', GROUPS, f'(member={ALICE})', 'cn', **kwargs)


def cns(output: str) -> list[str]:
    return sorted(line.split(': ', 1)[1] for line in output.splitlines() if line.startswith('cn: '))


def records_for(stub, port: int, op: str) -> list[dict]:
    """The stub's witness records of ``op`` on ``port`` (it logs as it answers: wait briefly)."""
    deadline = time.monotonic() + 2
    while True:
        found = [r for r in request_log(stub['log']) if r['port'] == port and r['op'] == op]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_plain_bind_and_group_search(ldapsearch, stub):
    port = stub['ports']['plain']
    out = groups_of_alice(ldapsearch, stub, f'ldap://127.0.0.1:{port}')
    assert out.returncode == 0, out.stderr
    assert cns(out.stdout) == ['print-users', 'scan-users']
    search = records_for(stub, port, 'search')[-1]
    assert (search['peer'], search['tls'], search['entries']) == ('127.0.0.1', False, 2)
    assert search['filter'] == f'(member={ALICE})'


def test_ldaps_bind_and_group_search(ldapsearch, stub):
    port = stub['ports']['tls']
    out = groups_of_alice(ldapsearch, stub, f'ldaps://127.0.0.1:{port}')
    assert out.returncode == 0, out.stderr
    assert cns(out.stdout) == ['print-users', 'scan-users']
    assert records_for(stub, port, 'search')[-1]['tls'] is True


def test_starttls_bind_and_group_search(ldapsearch, stub):
    port = stub['ports']['starttls']
    out = groups_of_alice(ldapsearch, stub, f'ldap://127.0.0.1:{port}', '-ZZ')
    assert out.returncode == 0, out.stderr
    assert cns(out.stdout) == ['print-users', 'scan-users']
    assert records_for(stub, port, 'starttls')[-1]['result'] == 'success'
    assert records_for(stub, port, 'search')[-1]['tls'] is True


def test_starttls_port_refuses_plaintext_bind(ldapsearch, stub):
    out = groups_of_alice(ldapsearch, stub, f'ldap://127.0.0.1:{stub["ports"]["starttls"]}')
    assert out.returncode == 13 and 'Confidentiality required' in out.stderr, out


def test_starttls_is_refused_on_the_plain_port(ldapsearch, stub):
    out = groups_of_alice(ldapsearch, stub, f'ldap://127.0.0.1:{stub["ports"]["plain"]}', '-ZZ')
    assert out.returncode != 0 and 'Protocol error' in out.stderr, out


def test_wrong_password_is_invalid_credentials(ldapsearch, stub):
    port = stub['ports']['plain']
    out = groups_of_alice(ldapsearch, stub, f'ldap://127.0.0.1:{port}', password='wrong')
    assert out.returncode == 49 and 'Invalid credentials' in out.stderr, out
    time.sleep(0.2)  # the record is written as the refusal goes out
    assert any(r['result'] == 'invalidCredentials' for r in records_for(stub, port, 'bind'))


def test_ldaps_with_an_untrusted_ca_fails(ldapsearch, stub, tmp_path):
    other = make_test_pki(tmp_path / 'other')
    out = groups_of_alice(ldapsearch, stub, f'ldaps://127.0.0.1:{stub["ports"]["tls"]}',
                          ca_file=other['ca_file'])
    assert out.returncode != 0 and "Can't contact LDAP server" in out.stderr, out


def test_user_entry_never_shows_the_password(ldapsearch, stub):
    out = run(ldapsearch, stub, f'ldap://127.0.0.1:{stub["ports"]["plain"]}',
              '-b', f'ou=people,{BASE}', '(uid=alice)', '*')
    assert out.returncode == 0, out.stderr
    assert 'mail: alice@safeq.lab' in out.stdout and 'userPassword' not in out.stdout


def test_root_dse_advertises_starttls(ldapsearch, stub):
    out = run(ldapsearch, stub, f'ldap://127.0.0.1:{stub["ports"]["starttls"]}',
              '-s', 'base', '-b', '', '(objectClass=*)', 'supportedExtension', 'namingContexts',
              bind=False)
    assert out.returncode == 0, out.stderr
    assert 'supportedExtension: 1.3.6.1.4.1.1466.20037' in out.stdout
    assert f'namingContexts: {BASE}' in out.stdout


def test_stub_keeps_serving_after_malformed_ber(ldapsearch, stub):
    port = stub['ports']['plain']
    for junk in (b'\x30\x84\x7f\xff\xff\xff', b'GET / HTTP/1.0\r\n\r\n'):
        with socket.create_connection(('127.0.0.1', port), timeout=5) as raw:
            raw.sendall(junk)
            data = b''
            while chunk := raw.recv(4096):  # the stub answers, then closes
                data += chunk
        assert data.startswith(b'\x30') and b'1.3.6.1.4.1.1466.20036' in data
    out = groups_of_alice(ldapsearch, stub, f'ldap://127.0.0.1:{port}')
    assert out.returncode == 0 and cns(out.stdout) == ['print-users', 'scan-users'], out



ROOT_DSE_ATTRIBUTES = ('namingContexts', 'supportedLDAPVersion', 'supportedExtension',
                       'supportedSASLMechanisms')


def ldif_values(output: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in output.splitlines():
        if ': ' in line:
            name, value = line.split(': ', 1)
            values.setdefault(name, []).append(value)
    return values


@pytest.mark.parametrize('security', ['plain', 'starttls'])
def test_anonymous_root_dse_search_answers_like_a_real_directory(ldapsearch, stub, security):
    port = stub['ports'][security]
    out = run(ldapsearch, stub, f'ldap://127.0.0.1:{port}', '-b', '', '-s', 'base', '(objectClass=*)',
              *ROOT_DSE_ATTRIBUTES, bind=False)
    assert out.returncode == 0, out.stderr
    got = ldif_values(out.stdout)
    assert got['namingContexts'] == [BASE] and got['supportedLDAPVersion'] == ['3']
    starttls = ['1.3.6.1.4.1.1466.20037'] if security == 'starttls' else None
    assert got.get('supportedExtension') == starttls, got
    # ldapsearch's default filter is (objectclass=*), lower case: the same root DSE.
    out = run(ldapsearch, stub, f'ldap://127.0.0.1:{port}', '-b', '', '-s', 'base', bind=False)
    assert out.returncode == 0 and ldif_values(out.stdout)['namingContexts'] == [BASE], out


def test_other_anonymous_searches_stay_refused(ldapsearch, stub):
    out = run(ldapsearch, stub, f'ldap://127.0.0.1:{stub["ports"]["plain"]}', '-b', BASE, '(uid=alice)',
              bind=False)
    assert out.returncode == 1 and 'bind must be completed' in out.stderr + out.stdout, out
