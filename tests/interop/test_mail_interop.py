"""smtp, pop3 and imap stubs against real Debian clients: swaks (package swaks) and curl (curl).

One role daemon (``python -m emulator.roled``) on 127.0.0.1 serves SMTP plain, SMTP with
STARTTLS offered ('optional'), SMTPS, POP3, POP3S, IMAP and IMAPS, all over the one mailbox.
TLS is verified against the test CA (swaks --tls-verify --tls-ca-path, curl --cacert); the
URLs carry the IP address, which the test certificate has as a SAN. What swaks and curl send
must show in the stub's request log, and curl must read it back over POP3 and IMAP.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from emulator.protocols import payloads
from emulator.pki import make_test_pki
from emulator.protocols import imap, mailstore, module_for, pop3, smtp
from tests.support import client_tool, request_log, run_stub

pytestmark = pytest.mark.interop

CLIENT_TIMEOUT = 30
USER, PASSWORD = mailstore.LAB_USER, mailstore.LAB_PASSWORD
LISTENERS = {('smtp', 'plain'), ('smtp', 'optional'), ('smtp', 'tls'), ('pop3', 'plain'),
             ('pop3', 'tls'), ('imap', 'plain'), ('imap', 'tls')}



@pytest.fixture(scope='module')
def swaks():
    return client_tool('swaks', 'swaks')


@pytest.fixture(scope='module')
def swaks_tls(swaks):
    """swaks that can speak TLS: Debian's swaks only recommends the Perl TLS modules."""
    support = subprocess.run([swaks, '--support'], capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    tls_line = next((line for line in (support.stdout + support.stderr).splitlines() if ' TLS ' in line), '')
    if 'TLS supported' not in tls_line:
        pytest.fail(f'swaks cannot speak TLS ({tls_line.strip("*= ")}): '
                    f'apt-get install libnet-ssleay-perl libio-socket-ssl-perl')
    return swaks


@pytest.fixture(scope='module')
def curl():
    return client_tool('curl', 'curl')


@pytest.fixture(autouse=True)
def registered():
    for protocol_id, module in (('smtp', smtp), ('pop3', pop3), ('imap', imap)):
        assert module_for(protocol_id) is module, \
            f'{protocol_id!r} is not served by {module.__name__}: register it in emulator/protocols'


def distinct_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope='module')
def stub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('mail-interop')
    pki = make_test_pki(tmp / 'pki')
    kinds = sorted(LISTENERS)
    ports = dict(zip(kinds, distinct_ports(len(kinds))))
    listeners = [{'transport': 'tcp', 'port': port, 'protocol': protocol, 'security': security}
                 for (protocol, security), port in ports.items()]
    with run_stub(tmp, listeners, persona=pki, host='mail-server', roles=('mail-server',)) as log:
        yield {'ports': ports, 'pki': pki, 'log': log, 'home': tmp}


def records(stub, port: int, op: str, count: int = 1) -> list[dict]:
    deadline = time.monotonic() + 3
    while True:
        found = [r for r in request_log(stub['log']) if r['port'] == port and r['op'] == op]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def attachment_file(tmp_path, size: int = 3000, name: str = 'scan.pdf'):
    path = tmp_path / name
    path.write_bytes(payloads.pdf_document(size, 'interop scan', name))
    return path


def run(args: list[str], home) -> subprocess.CompletedProcess:
    env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': str(home)}   # no ~/.curlrc, ~/.swaksrc
    return subprocess.run(args, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, env=env)


def swaks_send(swaks, stub, port, *options, subject='interop', attach=None):
    command = [swaks, '--server', '127.0.0.1', '--port', str(port), '--timeout', '15',
               '--from', f'scan@{mailstore.MAIL_DOMAIN}', '--to', f'alice@{mailstore.MAIL_DOMAIN}',
               '--header', f'Subject: {subject}', '--helo', 'mfd.lab']
    if attach is not None:
        command += ['--attach-type', 'application/pdf', '--attach-name', attach.name, '--attach', f'@{attach}']
    return run(command + list(options), stub['home'])


def curl_get(curl, stub, url: str, *options) -> subprocess.CompletedProcess:
    return run([curl, '--silent', '--show-error', '--max-time', '15', '--user', f'{USER}:{PASSWORD}',
                '--cacert', stub['pki']['ca_file'], *options, url], stub['home'])


# --- SMTP: swaks -----------------------------------------------------------------------------

def test_swaks_plain_delivery_is_logged_and_read_back_over_pop3(swaks, curl, stub, tmp_path):
    port = stub['ports'][('smtp', 'plain')]
    pdf = attachment_file(tmp_path, 3000, 'plain-scan.pdf')
    out = swaks_send(swaks, stub, port, subject='plain scan', attach=pdf)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r'<-\s+220 mail-server ESMTP safeq-lab', out.stdout), out.stdout
    assert 'STARTTLS' not in out.stdout      # 'plain' listeners do not offer it
    [mail] = records(stub, port, 'mail')
    assert (mail['peer'], mail['tls'], mail['user'], mail['result']) == ('127.0.0.1', False, None, 'queued')
    assert [(a['name'], a['bytes']) for a in mail['attachments']] == [('plain-scan.pdf', 3000)]
    assert f'queued as {mail["queue_id"]}' in out.stdout
    # curl lists the POP3 mailbox and reads the newest message: swaks's mail, attachment intact
    pop3_url = f'pop3://127.0.0.1:{stub["ports"][("pop3", "plain")]}/'
    listing = curl_get(curl, stub, pop3_url)
    assert listing.returncode == 0, listing.stderr
    numbers = [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]
    newest = curl_get(curl, stub, pop3_url + numbers[-1])
    assert newest.returncode == 0, newest.stderr
    found = mailstore.attachments(newest.stdout.encode())
    assert [(a.name, a.size, a.sha256) for a in found] == [
        ('plain-scan.pdf', 3000, mail['attachments'][0]['sha256'])]


def test_swaks_starttls_verified_with_auth(swaks_tls, stub, tmp_path):
    swaks = swaks_tls
    port = stub['ports'][('smtp', 'optional')]
    out = swaks_send(swaks, stub, port, '--tls', '--tls-verify', '--tls-ca-path', stub['pki']['ca_file'],
                     '--auth', 'PLAIN', '--auth-user', USER, '--auth-password', PASSWORD,
                     subject='starttls scan', attach=attachment_file(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'STARTTLS' in out.stdout and 'TLS started' in out.stdout, out.stdout
    assert records(stub, port, 'starttls')[-1]['result'] == 'success'
    auth = records(stub, port, 'auth')[-1]
    assert (auth['user'], auth['result'], auth['tls']) == (USER, 'success', True)
    mail = records(stub, port, 'mail')[-1]
    assert (mail['tls'], mail['user']) == (True, USER)


def test_swaks_auth_login_with_a_wrong_password_is_refused(swaks, stub):
    port = stub['ports'][('smtp', 'optional')]
    out = swaks_send(swaks, stub, port, '--auth', 'LOGIN', '--auth-user', USER, '--auth-password', 'wrong')
    assert out.returncode != 0 and '535' in out.stdout, out.stdout
    assert any(r['result'] == 'failure' and r['mechanism'] == 'LOGIN' for r in records(stub, port, 'auth'))


def test_swaks_implicit_tls(swaks_tls, stub, tmp_path):
    swaks = swaks_tls
    port = stub['ports'][('smtp', 'tls')]
    out = swaks_send(swaks, stub, port, '--tlsc', '--tls-verify', '--tls-ca-path', stub['pki']['ca_file'],
                     '--auth', 'LOGIN', '--auth-user', USER, '--auth-password', PASSWORD,
                     subject='smtps scan', attach=attachment_file(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    mail = records(stub, port, 'mail')[-1]
    assert (mail['tls'], mail['user'], mail['result']) == (True, USER, 'queued')


def test_swaks_refuses_a_server_signed_by_another_ca(swaks_tls, stub, tmp_path):
    swaks = swaks_tls
    other = make_test_pki(tmp_path / 'other')
    out = swaks_send(swaks, stub, stub['ports'][('smtp', 'tls')], '--tlsc', '--tls-verify',
                     '--tls-ca-path', other['ca_file'])
    assert out.returncode != 0, out.stdout


# --- SMTP: curl ------------------------------------------------------------------------------

def test_curl_smtp_upload_is_logged_and_found_over_imap(curl, stub, tmp_path):
    port = stub['ports'][('smtp', 'plain')]
    message = tmp_path / 'mail.eml'
    subject = 'curl-upload-7f3a'
    message.write_bytes(mailstore.compose(f'scan@{mailstore.MAIL_DOMAIN}', f'alice@{mailstore.MAIL_DOMAIN}',
                                          subject, 'sent by curl', 'curl-scan.pdf',
                                          payloads.pdf_document(2000, 'curl', 'c')))
    out = run([curl, '--silent', '--show-error', '--max-time', '15', f'smtp://127.0.0.1:{port}',
               '--mail-from', f'scan@{mailstore.MAIL_DOMAIN}', '--mail-rcpt', f'bob@{mailstore.MAIL_DOMAIN}',
               '-T', str(message)], stub['home'])
    assert out.returncode == 0, out.stderr
    mail = [r for r in records(stub, port, 'mail', 2) if r['to'] == [f'bob@{mailstore.MAIL_DOMAIN}']][-1]
    assert [(a['name'], a['bytes']) for a in mail['attachments']] == [('curl-scan.pdf', 2000)]
    imap_url = f'imap://127.0.0.1:{stub["ports"][("imap", "plain")]}/INBOX'
    search = curl_get(curl, stub, imap_url, '--request', f'UID SEARCH SUBJECT "{subject}"')
    assert search.returncode == 0, search.stderr
    [uid] = re.findall(r'\* SEARCH (\d+)', search.stdout)
    fetched = curl_get(curl, stub, f'{imap_url};UID={uid}')
    assert fetched.returncode == 0, fetched.stderr
    assert f'Subject: {subject}' in fetched.stdout
    assert [(a.name, a.size) for a in mailstore.attachments(fetched.stdout.encode())] == [('curl-scan.pdf', 2000)]


def curl_send(curl, stub, url: str, message, *options) -> subprocess.CompletedProcess:
    return run([curl, '--silent', '--show-error', '--max-time', '15', '--cacert', stub['pki']['ca_file'],
                '--mail-from', f'scan@{mailstore.MAIL_DOMAIN}', '--mail-rcpt', f'alice@{mailstore.MAIL_DOMAIN}',
                '-T', str(message), *options, url], stub['home'])


def test_curl_smtp_starttls_verified_with_auth(curl, stub, tmp_path):
    port = stub['ports'][('smtp', 'optional')]
    message = tmp_path / 'starttls.eml'
    message.write_bytes(mailstore.compose(f'scan@{mailstore.MAIL_DOMAIN}', f'alice@{mailstore.MAIL_DOMAIN}',
                                          'curl starttls', 'x', 'tls-scan.pdf', payloads.pdf_document(1500, 't', 't')))
    out = curl_send(curl, stub, f'smtp://127.0.0.1:{port}', message, '--ssl-reqd',
                    '--user', f'{USER}:{PASSWORD}')
    assert out.returncode == 0, out.stderr
    assert records(stub, port, 'starttls')[-1]['result'] == 'success'
    auth = records(stub, port, 'auth')[-1]
    assert (auth['user'], auth['result'], auth['tls']) == (USER, 'success', True)
    mail = [r for r in records(stub, port, 'mail') if r['attachments'] and
            r['attachments'][0]['name'] == 'tls-scan.pdf'][-1]
    assert (mail['tls'], mail['user'], mail['attachments'][0]['bytes']) == (True, USER, 1500)


def test_curl_smtps_with_auth(curl, stub, tmp_path):
    port = stub['ports'][('smtp', 'tls')]
    message = tmp_path / 'smtps.eml'
    message.write_bytes(mailstore.compose(f'scan@{mailstore.MAIL_DOMAIN}', f'alice@{mailstore.MAIL_DOMAIN}',
                                          'curl smtps', 'x', 'smtps-scan.pdf', payloads.pdf_document(1500, 's', 's')))
    out = curl_send(curl, stub, f'smtps://127.0.0.1:{port}', message, '--user', f'{USER}:{PASSWORD}')
    assert out.returncode == 0, out.stderr
    mail = records(stub, port, 'mail')[-1]
    assert (mail['tls'], mail['user'], mail['result']) == (True, USER, 'queued')


def test_curl_smtp_starttls_is_not_offered_on_a_plain_listener(curl, stub, tmp_path):
    message = tmp_path / 'plain.eml'
    message.write_bytes(b'Subject: x\r\n\r\nbody\r\n')
    out = curl_send(curl, stub, f'smtp://127.0.0.1:{stub["ports"][("smtp", "plain")]}', message, '--ssl-reqd')
    assert out.returncode == 64, out   # CURLE_USE_SSL_FAILED


# --- POP3 and IMAP: curl reads the seeded print-by-mail job --------------------------------

@pytest.mark.parametrize('scheme,security', [('pop3', 'plain'), ('pop3s', 'tls')])
def test_curl_pop3_reads_the_print_job(curl, stub, scheme, security):
    port = stub['ports'][('pop3', security)]
    out = curl_get(curl, stub, f'{scheme}://127.0.0.1:{port}/1')
    assert out.returncode == 0, out.stderr
    found = mailstore.attachments(out.stdout.encode())
    assert [(a.name, a.is_pdf) for a in found] == [(mailstore.SEED_ATTACHMENT, True)]
    login = records(stub, port, 'login')[-1]
    assert (login['user'], login['result'], login['tls']) == (USER, 'success', security == 'tls')
    assert records(stub, port, 'retr')[-1]['message'] == '1'


@pytest.mark.parametrize('scheme,security', [('imap', 'plain'), ('imaps', 'tls')])
def test_curl_imap_reads_the_print_job(curl, stub, scheme, security):
    port = stub['ports'][('imap', security)]
    out = curl_get(curl, stub, f'{scheme}://127.0.0.1:{port}/INBOX;UID=1')
    assert out.returncode == 0, out.stderr
    found = mailstore.attachments(out.stdout.encode())
    assert [(a.name, a.is_pdf) for a in found] == [(mailstore.SEED_ATTACHMENT, True)]
    assert records(stub, port, 'select')[-1]['mailbox'] == 'INBOX'
    fetch = records(stub, port, 'fetch')[-1]
    assert (fetch['uid'], fetch['tls'], fetch['peer']) == (True, security == 'tls', '127.0.0.1')


def test_curl_pop3_wrong_password_is_refused(curl, stub):
    port = stub['ports'][('pop3', 'plain')]
    out = run([curl, '--silent', '--show-error', '--max-time', '15', '--user', f'{USER}:wrong',
               f'pop3://127.0.0.1:{port}/1'], stub['home'])
    assert out.returncode == 67, out   # CURLE_LOGIN_DENIED
    assert records(stub, port, 'login')[-1]['result'] == 'failure'


def test_curl_imaps_with_an_untrusted_ca_fails(curl, stub, tmp_path):
    other = make_test_pki(tmp_path / 'other')
    port = stub['ports'][('imap', 'tls')]
    out = run([curl, '--silent', '--show-error', '--max-time', '15', '--user', f'{USER}:{PASSWORD}',
               '--cacert', other['ca_file'], f'imaps://127.0.0.1:{port}/INBOX;UID=1'], stub['home'])
    # 60 CURLE_PEER_FAILED_VERIFICATION; 35 when OpenSSL tries the same-named other CA's key
    assert out.returncode in (35, 60), out
