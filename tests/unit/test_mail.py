"""smtp / pop3 / imap stubs and probes, and the mailbox they share (mailstore)."""

from __future__ import annotations

import base64
import hashlib
import itertools
import subprocess
import sys

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import alsoProvides

from emulator.protocols import payloads
from emulator import pki
from emulator.protocols import imap, mailstore, pop3, smtp
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import free_port, run_on_reactor, tls_clocked_reactor

SERVER = IPv4Address('TCP', '198.18.0.25', 25)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)
_hosts = itertools.count()


@pytest.fixture(scope='module')
def material(tmp_path_factory):
    return pki.make_test_pki(tmp_path_factory.mktemp('pki'), host='mail.lab', address='127.0.0.1')


def persona(material=None) -> Persona:
    """A persona of its own (so a mailbox of its own: stores are per persona host)."""
    return Persona(host=f'mail-{next(_hosts)}', roles=('mail-server',), **(material or {}))


@pytest.fixture
def logged_failures():
    """Everything logged as an error or failure while the test runs (a daemon's tracebacks)."""
    seen: list[dict] = []

    def observe(event):
        if 'log_failure' in event or event.get('log_level') in (LogLevel.error, LogLevel.critical):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# --- mailstore ---------------------------------------------------------------------------

@pytest.mark.parametrize('size', [0, 100, 700, 1024, 1033, 1034, 4096, 100_003])
def test_pdf_document_is_a_pdf_of_exactly_the_size_asked(size):
    document = payloads.pdf_document(size, 'scan', 'seed')
    smallest = len(payloads.pdf_document(0, 'scan', 'seed'))
    assert len(document) == max(size, smallest)
    assert document.startswith(b'%PDF-1.4') and document.endswith(b'%%EOF\n')
    xref = int(document.rsplit(b'startxref\n', 1)[1].split(b'\n')[0])
    assert document[xref:xref + 4] == b'xref'
    assert payloads.pdf_document(size, 'scan', 'seed') == document   # deterministic


@pytest.mark.parametrize('text', ['', 'scan (1) \\ done'])
def test_a_pdf_layout_is_sized_without_building_it(text):
    """The sizing rounds of payloads.pdf use the arithmetic, not a throwaway document: it must agree
    at every digit boundary of /Length and startxref."""
    edges = [n + d for n in (0, 9, 99, 999, 9_999, 99_999, 999_999) for d in (-1, 0, 1, 2) if n + d >= 0]
    for image in sorted(set(edges) | set(range(200, 1_400))):   # where startxref gains its fourth digit
        assert payloads._pdf_size(image, text) == len(payloads._pdf_layout(bytes(image), text, 0)), image


def test_compose_and_attachments_round_trip():
    pdf = payloads.pdf_document(2000, 'x', 'y')
    message = mailstore.compose('a@safeq.lab', 'b@safeq.lab', 'Scan', 'hello', 'scan.pdf', pdf)
    assert b'\r\n' in message and b'\n' not in message.replace(b'\r\n', b'')
    [found] = mailstore.attachments(message)
    assert (found.name, found.size, found.is_pdf, found.content_type) == ('scan.pdf', 2000, True, 'application/pdf')
    assert mailstore.header(message, 'Subject') == 'Scan'
    assert mailstore.attachments(b'\xff\x00 not a mail') == []


def test_store_keeps_the_seed_and_stays_bounded():
    store = mailstore.MailStore(max_messages=4, max_bytes=50_000)
    seed = store.messages()[0]
    assert seed.seed and mailstore.check_job(seed.data)[0]
    for n in range(6):
        store.deliver(b'Subject: %d\n\nline\n' % n)
    kept = store.messages()
    assert len(kept) == 4 and kept[0] == seed
    assert [m.data for m in kept[1:]] == [b'Subject: %d\r\n\r\nline\r\n' % n for n in (3, 4, 5)]
    store.deliver(b'x' * 60_000)   # over the byte bound: everything but the seed and it goes
    assert [m.seed for m in store.messages()] == [True, False] and store.messages()[1].data.startswith(b'xxx')
    assert store.delete([m.uid for m in store.messages()]) == 1
    assert store.messages() == (seed,)


def test_store_for_shares_one_mailbox_per_persona_host():
    one = persona()
    assert mailstore.store_for(one) is mailstore.store_for(Persona(host=one.host, roles=('x',)))
    assert mailstore.store_for(one) is not mailstore.store_for(persona())


def test_modules_do_not_install_the_global_reactor_at_import():
    code = ('import sys; import emulator.protocols.smtp, emulator.protocols.pop3, emulator.protocols.imap; '
            'sys.exit("twisted.internet.reactor" in sys.modules)')
    assert subprocess.run([sys.executable, '-c', code], timeout=60).returncode == 0


# --- stub against probe, every security the catalog uses -----------------------------------

CASES = [('smtp', 'plain'), ('smtp', 'optional'), ('smtp', 'tls'), ('smtp', 'starttls'),
         ('pop3', 'plain'), ('pop3', 'tls'), ('imap', 'plain'), ('imap', 'tls')]
MODULES = {'smtp': smtp, 'pop3': pop3, 'imap': imap}


def probe_stub(monkeypatch, material, protocol, security, *, listener_security=None, options=None,
               size=3000, stub_persona=None):
    reactor = tls_clocked_reactor(monkeypatch)
    module = MODULES[protocol]
    records: list[dict] = []
    stub_persona = stub_persona or persona(material)

    def go(reactor):
        port = module.listen(reactor, Listener('tcp', 0, protocol, listener_security or security),
                             stub_persona, records.append, '127.0.0.1')
        target = ProbeTarget(id='t1', host='127.0.0.1', transport='tcp', protocol=protocol,
                             port=port.getHost().port, security=security, size=size, timeout=5.0,
                             server_name='mail.lab', ca_file=material['ca_file'], options=options or {})
        return module.probe(reactor, target).addBoth(lambda result: (port.stopListening(), result)[1])

    return run_on_reactor(reactor, go), records


@pytest.mark.parametrize('protocol,security', CASES)
def test_probe_against_stub(monkeypatch, material, protocol, security):
    result, records = probe_stub(monkeypatch, material, protocol, security)
    assert result.outcome == 'ok', result.detail
    assert result.peer_seen == '127.0.0.1'
    uses_tls = security != 'plain'
    assert (result.tls_issuer == pki.LAB_CA_NAME) == uses_tls
    ops = [r['op'] for r in records]
    assert all(r['peer'] == '127.0.0.1' for r in records)
    if protocol == 'smtp':
        [mail] = [r for r in records if r['op'] == 'mail']
        assert (mail['tls'], mail['user'], mail['result']) == (uses_tls, mailstore.LAB_USER, 'queued')
        assert mail['attachments'][0]['bytes'] == 3000 and mail['queue_id'] in result.exchange
        assert ('starttls' in ops) == (security in ('optional', 'starttls'))
    else:
        assert records[0] == {**records[0], 'op': 'login', 'result': 'success', 'tls': uses_tls}
        assert (('retr' if protocol == 'pop3' else 'fetch') in ops)
        assert mailstore.SEED_ATTACHMENT in result.detail


def test_smtp_probe_on_a_plain_listener_says_starttls_was_not_offered(monkeypatch, material):
    result, records = probe_stub(monkeypatch, material, 'smtp', 'optional', listener_security='plain')
    assert result.outcome == 'ok' and 'STARTTLS not offered' in result.detail
    assert not result.tls_issuer and 'starttls' not in [r['op'] for r in records]


def test_smtp_starttls_probe_fails_where_it_is_not_offered(monkeypatch, material):
    result, _ = probe_stub(monkeypatch, material, 'smtp', 'starttls', listener_security='plain')
    assert result.outcome == 'protocol_error' and 'STARTTLS refused: 454' in result.detail


def test_smtp_optional_without_a_certificate_serves_plain(monkeypatch, material):
    result, _ = probe_stub(monkeypatch, material, 'smtp', 'optional', stub_persona=persona())
    assert result.outcome == 'ok' and 'STARTTLS not offered' in result.detail


@pytest.mark.parametrize('protocol', ['smtp', 'pop3', 'imap'])
def test_wrong_password_is_a_protocol_error_and_recorded(monkeypatch, material, protocol):
    result, records = probe_stub(monkeypatch, material, protocol, 'plain', options={'password': 'nope'})
    assert result.outcome == 'protocol_error', result
    op = 'auth' if protocol == 'smtp' else 'login'
    assert [r['result'] for r in records if r['op'] == op] == ['failure']


def test_tls_probe_with_another_ca_fails_verification(monkeypatch, material, tmp_path):
    other = pki.make_test_pki(tmp_path / 'other', host='mail.lab')
    result, _ = probe_stub(monkeypatch, {**material, 'ca_file': other['ca_file']}, 'imap', 'tls',
                           stub_persona=persona(material))
    assert result.outcome == 'protocol_error' and result.detail.startswith(('certificate', 'tls'))


def test_smtp_probe_to_a_closed_port_is_refused(monkeypatch, material):
    reactor = tls_clocked_reactor(monkeypatch)
    target = ProbeTarget(id='t', host='127.0.0.1', transport='tcp', protocol='smtp', port=free_port())
    result = run_on_reactor(reactor, lambda r: smtp.probe(r, target))
    assert result.outcome == 'refused'


def test_pop3_and_imap_refuse_securities_they_do_not_serve():
    for module, protocol in ((pop3, 'pop3'), (imap, 'imap')):
        with pytest.raises(ValueError):
            module.listen(MemoryReactorClock(), Listener('tcp', 1, protocol, 'starttls'), persona())


# --- hostile input over StringTransport ------------------------------------------------------

def connect(factory):
    protocol = factory.buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    protocol.makeConnection(transport)
    return protocol, transport


def smtp_session(security='plain', store=None):
    records: list[dict] = []
    factory = smtp.SMTPStubFactory(MemoryReactorClock(), persona(), records.append, security,
                                   store or mailstore.MailStore())
    protocol, transport = connect(factory)
    return protocol, transport, records, factory


def test_smtp_greeting_names_the_host_and_ehlo_the_peer():
    protocol, transport, _, _ = smtp_session()
    greeting = transport.value()
    assert greeting.startswith(b'220 mail-') and greeting.endswith(b' ESMTP safeq-lab\r\n')
    transport.clear()
    protocol.dataReceived(b'EHLO mfd\r\n')
    reply = transport.value().decode()
    assert 'Hello 198.18.0.9' in reply and '250-AUTH PLAIN LOGIN' in reply.replace('LOGIN PLAIN', 'PLAIN LOGIN')
    assert f'SIZE {mailstore.MAX_MESSAGE_BYTES}' in reply and 'STARTTLS' not in reply


def test_smtp_survives_garbage_and_keeps_serving(logged_failures):
    protocol, transport, records, _ = smtp_session()
    for junk in (b'\xff\xfe\r\n', b'AUTH PLAIN !!!notbase64\r\n', b'AUTH PLAIN ' + base64.b64encode(b'x') + b'\r\n',
                 b'AUTH\r\n', b'MAIL FROM:<<<>\r\n', b'RCPT TO:<a@b>\r\n', b'DATA\r\n', b'\x00\r\n'):
        transport.clear()
        protocol.dataReceived(junk)
        assert transport.value()[:1] in (b'4', b'5'), (junk, transport.value())
    transport.clear()
    protocol.dataReceived(b'EHLO again\r\n')
    assert transport.value().startswith(b'250-')
    assert logged_failures == [] and not transport.disconnecting


def test_smtp_delivers_once_for_many_recipients_and_dot_unstuffs():
    store = mailstore.MailStore()
    protocol, transport, records, _ = smtp_session(store=store)
    protocol.dataReceived(b'EHLO x\r\nMAIL FROM:<a@safeq.lab>\r\nRCPT TO:<b@safeq.lab>\r\n'
                          b'RCPT TO:<c@safeq.lab>\r\nDATA\r\n')
    transport.clear()
    protocol.dataReceived(b'Subject: dots\r\n\r\n..leading dot\r\n.\r\n')
    assert transport.value().startswith(b'250 2.0.0 Ok: queued as ')
    [mail] = [r for r in records if r['op'] == 'mail']
    assert mail['to'] == ['b@safeq.lab', 'c@safeq.lab'] and mail['attachments'] == []
    delivered = store.messages()[-1].data
    assert delivered.startswith(b'Received: from x ([198.18.0.9])') and b'\r\n.leading dot\r\n' in delivered
    assert len(store.messages()) == 2


def test_smtp_refuses_an_oversized_message(monkeypatch):
    monkeypatch.setattr(mailstore, 'MAX_MESSAGE_BYTES', 300)
    store = mailstore.MailStore()
    protocol, transport, records, _ = smtp_session(store=store)
    protocol.dataReceived(b'HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n')
    transport.clear()
    protocol.dataReceived(b'Subject: big\r\n\r\n' + b'x' * 180 + b'\r\n' + b'y' * 180 + b'\r\n.\r\n')
    assert transport.value().startswith(b'552 5.3.4')
    assert [r['result'] for r in records if r['op'] == 'mail'] == ['rejected'] and len(store.messages()) == 1


def test_smtp_over_long_line_closes_the_connection():
    protocol, transport, _, _ = smtp_session()
    protocol.dataReceived(b'x' * (smtp.MAX_LINE + 10))
    assert transport.disconnecting and b'500' in transport.value()


def test_smtp_starttls_listener_requires_tls_before_mail_and_auth(material):
    records: list[dict] = []
    factory = smtp.SMTPStubFactory(MemoryReactorClock(), persona(material), records.append, 'starttls',
                                   mailstore.MailStore())
    protocol = factory.buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    alsoProvides(transport, ITLSTransport)   # as a TCP transport: STARTTLS is possible
    protocol.makeConnection(transport)
    transport.clear()
    protocol.dataReceived(b'EHLO x\r\n')
    assert b'250-STARTTLS' in transport.value() or b'250 STARTTLS' in transport.value()
    for command in (b'MAIL FROM:<a@b>\r\n', b'AUTH PLAIN AHNhZmVxAHg=\r\n'):
        transport.clear()
        protocol.dataReceived(command)
        assert transport.value().startswith(b'530 5.7.0'), transport.value()


def pop3_session(store=None):
    records: list[dict] = []
    factory = pop3.POP3StubFactory(MemoryReactorClock(), persona(), records.append, 'plain',
                                   store or mailstore.MailStore())
    protocol, transport = connect(factory)
    return protocol, transport, records


def test_pop3_session_retr_top_dele_and_errors(logged_failures):
    store = mailstore.MailStore()
    store.deliver(b'Subject: dots\r\n\r\n.starts with a dot\r\nsecond\r\n')
    protocol, transport, records = pop3_session(store)
    assert transport.value().startswith(b'+OK mail-') and b'(peer 198.18.0.9) <' in transport.value()
    for junk in (b'RETR 1\r\n', b'\xff\r\n', b'USER\r\n', b'PASS x\r\n'):
        transport.clear()
        protocol.dataReceived(junk)
        assert transport.value().startswith(b'-ERR'), (junk, transport.value())
    protocol.dataReceived(f'USER {mailstore.LAB_USER}\r\nPASS {mailstore.LAB_PASSWORD}\r\n'.encode())
    transport.clear()
    protocol.dataReceived(b'RETR 2\r\n')
    assert transport.value() == (b'+OK %d octets\r\nSubject: dots\r\n\r\n..starts with a dot\r\nsecond\r\n.\r\n'
                                 % len(store.messages()[1].data))
    transport.clear()
    protocol.dataReceived(b'TOP 2 0\r\n')
    assert transport.value() == b'+OK Top of message follows\r\nSubject: dots\r\n\r\n.\r\n'
    for junk in (b'RETR 0\r\n', b'RETR x\r\n', b'RETR 9\r\n', b'TOP 1 -1\r\n', b'DELE x\r\n', b'FOO\r\n'):
        transport.clear()
        protocol.dataReceived(junk)
        assert transport.value().startswith(b'-ERR'), (junk, transport.value())
    protocol.dataReceived(b'DELE 1\r\nDELE 2\r\nQUIT\r\n')
    assert store.messages()[0].seed and len(store.messages()) == 1   # the seed stays
    assert [r['bytes'] is not None for r in records if r['op'] == 'retr'] == [True, False, False, False]
    assert logged_failures == []
    assert [r['result'] for r in records if r['op'] == 'login'] == ['success']   # PASS before USER: no attempt


def test_pop3_apop_login():
    protocol, transport, records = pop3_session()
    magic = transport.value().split()[-1]
    digest = hashlib.md5(magic + mailstore.LAB_PASSWORD.encode()).hexdigest().encode()
    transport.clear()
    protocol.dataReceived(b'APOP ' + mailstore.LAB_USER.encode() + b' ' + digest + b'\r\n')
    assert transport.value().startswith(b'+OK')
    assert records[-1]['result'] == 'success'


def imap_session(store=None):
    records: list[dict] = []
    factory = imap.IMAPStubFactory(MemoryReactorClock(), persona(), records.append, 'plain',
                                   store or mailstore.MailStore())
    protocol, transport = connect(factory)
    protocol.dataReceived(f'a1 LOGIN {mailstore.LAB_USER} {mailstore.LAB_PASSWORD}\r\na2 SELECT INBOX\r\n'.encode())
    return protocol, transport, records, factory


def imap_reply(protocol, transport, factory, command: bytes) -> bytes:
    transport.clear()
    protocol.dataReceived(command)
    for _ in range(100):   # FETCH answers in cooperative steps on the factory's reactor
        factory.reactor.advance(0)
    return transport.value()


def test_imap_fetch_sections_of_the_print_job():
    protocol, transport, records, factory = imap_session()
    assert b'a2 OK [READ-ONLY] SELECT successful' in transport.value() and b'* 1 EXISTS' in transport.value()
    subject = imap_reply(protocol, transport, factory, b'a3 FETCH 1 (BODY[HEADER.FIELDS (SUBJECT)])\r\n')
    assert b'Subject: Print: print-by-mail.pdf\r\n\r\n' in subject and b'a3 OK' in subject
    part = imap_reply(protocol, transport, factory, b'a4 FETCH 1 (BODY[2])\r\n')
    encoded = part.split(b'}\r\n', 1)[1].rsplit(b')\r\n', 1)[0]
    assert base64.b64decode(encoded).startswith(b'%PDF-1.4')
    partial = imap_reply(protocol, transport, factory, b'a5 FETCH 1 (BODY[]<0.10>)\r\n')
    assert b'BODY[]<0> {10}\r\n' in partial
    structure = imap_reply(protocol, transport, factory, b'a6 UID FETCH 1:* (BODYSTRUCTURE FLAGS)\r\n')
    assert b'"application" "pdf"' in structure.lower() and b'UID 1' in structure
    missing = imap_reply(protocol, transport, factory, b'a7 FETCH 1 (BODY[9])\r\n')
    assert b'BODY[9] NIL' in missing and b'a7 OK' in missing
    found = imap_reply(protocol, transport, factory, b'a8 SEARCH SUBJECT "print-by-mail"\r\n')
    assert b'* SEARCH 1\r\n' in found
    assert [r['op'] for r in records] == ['login', 'select'] + ['fetch'] * 5


def test_imap_refuses_writes_and_survives_garbage(logged_failures):
    store = mailstore.MailStore()
    store.deliver(b'Content-Type: multipart/mixed; junk\r\nSubject: \xff\xfe\r\n\r\n--x\r\n')
    protocol, transport, _, factory = imap_session(store)
    for command in (b'a3 STORE 1 +FLAGS (\\Deleted)\r\n', b'a4 EXPUNGE\r\n', b'a5 UID COPY 1 INBOX\r\n',
                    b'a6 CREATE foo\r\n', b'a7 APPEND INBOX {5}\r\n'):
        assert b' NO ' in imap_reply(protocol, transport, factory, command), command
    for junk in (b'\xff\xfe\r\n', b'a8 FETCH\r\n', b'a9 FETCH 1:4294967295 (BODY[1.2.3.4])\r\n',
                 b'a10 FETCH 2 (BODYSTRUCTURE ENVELOPE BODY)\r\n', b'a11 SEARCH SINCE garbage\r\n',
                 b'a12 FETCH 1 (BODY[HEADER.FIELDS (\r\n', b'a13 UID FOO\r\n', b'a14 LOGIN x\r\n'):
        reply = imap_reply(protocol, transport, factory, junk)
        assert reply, junk
    assert b'a15 OK' in imap_reply(protocol, transport, factory, b'a15 NOOP\r\n')
    assert logged_failures == [] and not transport.disconnecting
