"""``smtp``: ESMTP (RFC 5321) mail submission: a twisted.mail ESMTP server stub delivering into the
mail server's in-memory mailbox (``mailstore``), and a probe sending a scanned document.

SafeQ components (Management, the Spooler Controller, the Mobile Print Server, EDEE, the workflow
and payment systems) send scan-to-mail and notification mail to the customer's mail server on
25/587 (plain, STARTTLS when offered) and 465 (implicit TLS, RFC 8314).

Server (twisted.mail.smtp.ESMTP)
    Greeting ``220 <host> ESMTP safeq-lab``; ``EHLO`` answers ``<host> Hello <client IP>, nice to
    meet you`` (the probe's proof of whom the server saw) and lists ``AUTH PLAIN LOGIN``,
    ``SIZE``, ``8BITMIME`` and, on ``optional``/``starttls`` listeners whose persona has a
    certificate, ``STARTTLS`` (RFC 3207; the session starts over after it). ``security``:
    ``plain`` no STARTTLS; ``optional`` STARTTLS offered, plaintext accepted; ``starttls``
    MAIL and AUTH before STARTTLS get ``530 5.7.0``; ``tls`` implicit TLS. AUTH PLAIN/LOGIN
    checks the lab account (``mailstore.LAB_USER``/``LAB_PASSWORD``: ``safeq``/``safeq-lab-mail``);
    wrong credentials get 535. Invented: like an internal relay trusting its network, mail is
    accepted without AUTH too, from any sender to any recipients (at most ``MAX_RECIPIENTS``),
    and kept once in the one mailbox. After DATA the reply is Postfix's ``250 2.0.0 Ok: queued as
    <id>`` followed by (invented) ``; <n> B, attachments: <name> <size> B, ...`` so a client sees
    what arrived. Messages over ``mailstore.MAX_MESSAGE_BYTES`` get ``552 5.3.4``; lines over
    ``MAX_LINE`` get 500 and a close; unknown commands 500, malformed AUTH responses 501 (the
    session goes on).
    ``on_request`` gets one record per EHLO/HELO, STARTTLS, AUTH and message (op ``ehlo``,
    ``starttls``, ``auth`` with ``user`` and ``result``, ``mail`` with ``from``, ``to``,
    ``bytes``, ``attachments``, ``queue_id``, ``user``, ``tls`` and ``result``).

Probe
    EHLO; STARTTLS when the target is ``starttls`` (required) or ``optional`` and the server
    offers it (and the probe has ``target.ca_file`` to verify with), then EHLO again; implicit
    TLS for ``tls``; TLS verifies the chain and ``target.server_name``. AUTH PLAIN (or LOGIN) as
    the lab account when offered, MAIL/RCPT/DATA of a scan-to-mail message carrying a PDF of
    ``target.size`` bytes (at least the smallest PDF), then QUIT. ``ok`` needs ``250`` with
    ``queued`` after DATA and, when the server lists the attachments (this stub does), the
    PDF at its size. ``target.options``: ``user``, ``password``, ``auth`` (false: no AUTH),
    ``sender``, ``recipient``, and ``carries``/``holder`` (``jobstore``): the attachment is
    ``NAME.pdf``, the scan the holder keeps under that name (the Workflow Processing System
    mailing a scan it received). The stub keeps each delivered attachment in its host's
    jobstore too (kind ``mail``, named by the file's stem).
"""

from __future__ import annotations

import base64
import re
from typing import Any

from email.utils import formatdate
from functools import lru_cache, partial

from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.mail._cred import PLAINCredentials
from twisted.mail._except import SMTPBadRcpt, SMTPServerError
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from zope.interface import implementer

from . import jobstore, mailstore, tls
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .mailstore import LabAccountChecker, LineClient
from .probing import OnRequest, StreamProbe, crashed, error_result
from .serving import IDLE_TIMEOUT, StubConnection, StubFactory

PROTOCOL_IDS = ('smtp',)

MAX_LINE = 16384          # longest command or DATA line (RFC 5321 asks for 1000; clients exceed it)
MAX_RECIPIENTS = 100
PROBE_HELO = 'safeq-lab-probe'

_log = Logger()


# --- server stub ------------------------------------------------------------------

class _Envelope:
    """One MAIL transaction: the message is kept once, whatever the number of recipients
    (twisted.mail makes one IMessage per recipient)."""

    def __init__(self, session: LabSMTPSession, sender: str) -> None:
        self.session = session
        self.sender = sender
        self.recipients: list[str] = []
        self.collector: _MessageCollector | None = None

    def open(self, recipient: str):
        if self.collector is None:
            self.collector = _MessageCollector(self)
            return self.collector
        return _Copy()


@implementer(IMessageSMTP)
class _MessageCollector:
    """Collects the DATA lines (bounded), then delivers into the mailbox."""

    def __init__(self, envelope: _Envelope) -> None:
        self.envelope = envelope
        self.lines: list[bytes] = []
        self.size = 0

    def lineReceived(self, line: bytes) -> None:
        self.size += len(line) + 2
        if self.size > mailstore.MAX_MESSAGE_BYTES:
            self.lines = []
            # bytes: twisted writes a DATA failure's text as it is (a sender check's it encodes)
            raise SMTPServerError(552, b'5.3.4 Message size exceeds the limit of %d bytes'
                                  % mailstore.MAX_MESSAGE_BYTES)
        self.lines.append(line)

    def eomReceived(self):
        data = b'\r\n'.join(self.lines) + b'\r\n'
        self.lines = []
        return succeed(self.envelope.session.delivered(self.envelope, data))

    def connectionLost(self) -> None:
        if self.lines or self.size > mailstore.MAX_MESSAGE_BYTES:
            self.envelope.session.rejected(self.envelope, self.size)
        self.lines = []


@implementer(IMessageSMTP)
class _Copy:
    """Another recipient of a message already being collected."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self):
        return succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(IMessageDelivery)
class _Delivery:
    """Accepts any sender and recipients for one session (as ``user``, None before AUTH)."""

    def __init__(self, session: LabSMTPSession, user: str | None) -> None:
        self.session = session
        self.user = user

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        helo_name = (helo[0] or b'unknown')[:255]
        peer = helo[1] if isinstance(helo[1], bytes) else str(helo[1]).encode()
        via = b'ESMTP' + (b'S' if self.session.tls_active else b'') + (b'A' if self.user else b'')
        return (b'Received: from ' + helo_name + b' ([' + peer + b'])\n\tby ' + self.session.host
                + b' (safeq-lab) with ' + via + b'; ' + formatdate(localtime=True).encode())

    def validateFrom(self, helo, origin):
        if self.session.factory.require_tls and not self.session.tls_active:
            raise SMTPServerError(530, '5.7.0 Must issue a STARTTLS command first')
        self.session.envelope = _Envelope(self.session, str(origin))
        return origin

    def validateTo(self, user):
        envelope = self.session.envelope
        if envelope is None:
            raise SMTPBadRcpt(user)
        if len(envelope.recipients) >= MAX_RECIPIENTS:
            raise SMTPBadRcpt(user, 452, '4.5.3 Too many recipients')
        envelope.recipients.append(str(user.dest))
        return partial(envelope.open, str(user.dest))


@implementer(IRealm)
class _SessionRealm:
    def __init__(self, session: LabSMTPSession) -> None:
        self.session = session

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if IMessageDelivery not in interfaces:
            raise NotImplementedError('only IMessageDelivery')
        user = avatar_id.decode('utf-8', 'replace') if isinstance(avatar_id, bytes) else str(avatar_id)
        return IMessageDelivery, _Delivery(self.session, user), lambda: None


@lru_cache(maxsize=None)
def server_protocol() -> type:
    """The stub's protocol class, ``LabSMTPSession`` over twisted's ESMTP. Built on first use:
    importing twisted.mail.smtp installs the global reactor, which must not happen when the
    zygote imports every protocol module before it forks the daemons."""
    from twisted.mail import smtp as twisted_smtp

    return type('LabESMTP', (LabSMTPSession, twisted_smtp.ESMTP, StubConnection), {})


class LabSMTPSession:
    """What the stub adds to twisted's ESMTP (``server_protocol`` mixes them): the persona's
    name, a per-session portal for AUTH, STARTTLS that starts the session over, witness
    records and no tracebacks on hostile input."""

    timeout = IDLE_TIMEOUT
    noisy = False
    MAX_LENGTH = MAX_LINE

    def __init__(self, factory: SMTPStubFactory) -> None:
        from twisted.mail.smtp import LOGINCredentials   # loaded already: server_protocol did

        super().__init__(chal={b'PLAIN': PLAINCredentials, b'LOGIN': LOGINCredentials},
                         contextFactory=factory.tls_options)
        self.factory = factory
        self.host = factory.persona.host
        self.envelope: _Envelope | None = None
        user, password = mailstore.account(factory.persona)
        self.portal = Portal(_SessionRealm(self), [LabAccountChecker(user, password, self._auth_attempt)])

    # connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        StubConnection.connectionMade(self)
        super().connectionMade()
        self.delivery = _Delivery(self, None)

    def timeoutConnection(self) -> None:
        self.sendCode(421, self.host + b' 4.4.2 Idle timeout, closing connection')
        self.transport.abortConnection()

    def request_fields(self) -> dict[str, Any]:
        return {'tls': self.tls_active}

    def greeting(self) -> bytes:
        return self.host + b' ESMTP safeq-lab'

    def lineReceived(self, line: bytes) -> None:
        try:
            super().lineReceived(line)
        except Exception as exc:  # e.g. a malformed AUTH response, a non-ASCII verb: answer, go on
            _log.info('smtp {peer}: rejected input: {error}', peer=self.peer, error=exc)
            self.mode = _command_mode()
            self.challenger = None
            self.sendCode(501, b'5.5.2 Syntax error')

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted answers 500 and keeps the over-long rest buffered, growing with every read.
        super().lineLengthExceeded(line)
        self._buffer = b''
        self.transport.loseConnection()

    def lookupMethod(self, command):
        try:
            return super().lookupMethod(command)
        except UnicodeError:
            return None

    # commands -----------------------------------------------------------------

    def extensions(self) -> dict:
        ext = super().extensions()
        ext[b'SIZE'] = [b'%d' % mailstore.MAX_MESSAGE_BYTES]
        ext[b'8BITMIME'] = None
        return ext

    def do_HELO(self, rest: bytes) -> None:
        super().do_HELO(rest)
        self.report_request('helo', helo=_text(rest))

    def do_EHLO(self, rest: bytes) -> None:
        super().do_EHLO(rest)
        self.report_request('ehlo', helo=_text(rest))

    def ext_STARTTLS(self, rest: bytes) -> None:
        was_started = self.startedTLS
        super().ext_STARTTLS(rest)
        if self.startedTLS and not was_started:
            # RFC 3207 §4.2: forget everything learnt before TLS; the client starts with EHLO.
            self._helo = (None, self.peer.encode())
            self._from, self._to = None, []
            self.authenticated = False
            self.delivery, self.envelope = _Delivery(self, None), None
            self.report_request('starttls', result='success', tls=True)
        elif not was_started:
            self.report_request('starttls', result='unavailable')

    def ext_AUTH(self, rest: bytes) -> None:
        if self.factory.require_tls and not self.tls_active:
            self.sendCode(530, b'5.7.0 Must issue a STARTTLS command first')
            return
        self._mechanism = _text(rest.split(None, 1)[0].upper()) if rest.strip() else ''
        super().ext_AUTH(rest)

    def _auth_attempt(self, user: str, ok: bool) -> None:
        self.report_request('auth', mechanism=getattr(self, '_mechanism', ''), user=user,
                    result='success' if ok else 'failure')

    def _messageHandled(self, resultList) -> None:
        # twisted answers "250 Delivery in progress"; a client (and the probe) wants the queue id.
        stored = next((result for ok, result in resultList if ok and result is not None), None)
        if stored is None:
            super()._messageHandled(resultList)
            return
        queue_id, summary = stored
        self.sendCode(250, f'2.0.0 Ok: queued as {queue_id}; {summary}'.encode())

    # delivery -----------------------------------------------------------------

    def delivered(self, envelope: _Envelope, data: bytes) -> tuple[str, str]:
        stored = self.factory.store.deliver(data)
        found = mailstore.attachments(stored.data)
        peer = self.transport.getPeer().host if self.transport is not None else ''
        for attachment in found[:10]:
            jobstore.store_for(self.factory.persona.host).keep(jobstore.Document(
                jobstore.name_of(attachment.name) or stored.queue_id, 'mail', attachment.size, attachment.sha256,
                via='smtp', peer=peer, owner=', '.join(map(str, envelope.recipients[:3]))))
        listed = ', '.join(f'{a.name or a.content_type} {a.size} B' for a in found) or 'none'
        self.report_request('mail', **{'from': envelope.sender}, to=envelope.recipients[:10],
                    recipients=len(envelope.recipients), bytes=len(stored.data),
                    attachments=[a.to_dict() for a in found[:10]], queue_id=stored.queue_id,
                    user=self.delivery.user if self.delivery else None, result='queued')
        self.envelope = None
        return stored.queue_id, f'{len(stored.data)} B, attachments: {listed}'

    def rejected(self, envelope: _Envelope, size: int) -> None:
        self.report_request('mail', **{'from': envelope.sender}, to=envelope.recipients[:10],
                    recipients=len(envelope.recipients), bytes=size, result='rejected')
        self.envelope = None


def _command_mode() -> str:
    from twisted.mail.smtp import COMMAND   # loaded already: server_protocol did

    return COMMAND


def _text(value: bytes, limit: int = 255) -> str:
    return value.decode('utf-8', 'replace')[:limit]


class SMTPStubFactory(StubFactory):

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, security: str,
                 store: mailstore.MailStore) -> None:
        super().__init__(reactor, persona, on_request, security)
        self.store = store
        self.require_tls = security == 'starttls'
        self.tls_options = None   # set where STARTTLS is offered
        if security == 'starttls' or (security == 'optional' and persona.cert_file and persona.key_file):
            self.tls_options = tls.server_options(persona)  # TLSMaterialMissing for starttls without a cert
        self.protocol = server_protocol()


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '') -> IListeningPort:
    """Serve ESMTP on ``listener``; bind errors (CannotListenError) propagate."""
    if listener.transport != 'tcp':
        raise ValueError(f'smtp cannot listen on {listener.transport!r} (SMTP runs over TCP)')
    factory = SMTPStubFactory(reactor, persona, on_request, listener.security, mailstore.store_for(persona))
    return tls.listen_stream(reactor, listener, factory, persona, interface=interface)


# --- client probe ---------------------------------------------------------------------

_REPLY = re.compile(rb'^(\d{3})([ -])(.*)$')
_HELLO_PEER = re.compile(r'Hello (\S+?),? ')
_QUEUED = re.compile(r'queued as (\S+?);?(?:\s|$)', re.I)
_LISTED = re.compile(r'(\S+) (\d+) B(?:,|$)')


def scan_mail(target: ProbeTarget) -> tuple[str, str, bytes, str, int]:
    """(sender, recipient, message, attachment name, attachment size) a scan-to-mail sends."""
    options = target.options
    sender = str(options.get('sender') or f'scan@{mailstore.MAIL_DOMAIN}')
    recipient = str(options.get('recipient') or f'alice@{mailstore.MAIL_DOMAIN}')
    name = re.sub(r'[^\w.-]+', '-', f'scan-{target.id or "probe"}')[:76] + '.pdf'   # one token in the 250 reply
    held, why = (jobstore.need_held(options, ('scan',)) if options.get('carries') else (None, ''))
    if why:
        raise ValueError(why)
    if held is not None:
        name, pdf = f'{held.name}.pdf', held.data
    else:
        pdf = mailstore.pdf_document(target.size, f'safeq-lab scan {target.id}', target.id or 'scan')
    message = mailstore.compose(sender, recipient, f'Scanned document {name}',
                                'Your scanned document is attached (safeq-lab).', name, pdf)
    return sender, recipient, message, name, len(pdf)


class _SMTPClient(LineClient):
    """The scripted submission: each reply is judged by the handler of the current stage."""

    def __init__(self, target: ProbeTarget) -> None:
        super().__init__()
        self.target = target
        self.user = str(target.options.get('user') or mailstore.LAB_USER)
        self.password = str(target.options.get('password') or mailstore.LAB_PASSWORD)
        self.sender, self.recipient, self.message, self.attachment, self.attachment_size = scan_mail(target)
        self.stage = 'greeting'
        self.reply: list[str] = []
        self.extensions: dict[str, str] = {}
        self.server_host = ''
        self.peer_seen: str | None = None
        self.notes: list[str] = []

    def begin(self) -> None:
        self.probe.stage = 'waiting for the 220 greeting'

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        if self.stage == 'tls':
            self._ehlo()

    # replies --------------------------------------------------------------------

    def line(self, line: bytes) -> None:
        match = _REPLY.match(line)
        if match is None:
            self.probe.decide('protocol_error', f'not an SMTP reply during {self.stage}: '
                                                f'{mailstore.text(line)!r}')
            return
        self.reply.append(mailstore.text(match.group(3), 500))
        if match.group(2) == b'-':
            if len(self.reply) > 100:
                self.probe.decide('protocol_error', 'multi-line reply of over 100 lines')
            return
        code, lines, self.reply = int(match.group(1)), self.reply, []
        getattr(self, f'_on_{self.stage}')(code, lines)

    def _expect(self, code: int, lines: list[str], wanted: tuple[int, ...], what: str) -> bool:
        if code in wanted:
            return True
        self.probe.decide('protocol_error', f'{what}: {code} {" / ".join(lines)[:300]}')
        return False

    def _command(self, stage: str, line: str, waiting: str) -> None:
        self.stage = stage
        self.probe.stage = f'waiting for the reply to {waiting}'
        self.send(line)

    def _on_greeting(self, code: int, lines: list[str]) -> None:
        if self._expect(code, lines, (220,), 'greeting'):
            self.server_host = (lines[0].split() or ['?'])[0]
            self._ehlo()

    def _ehlo(self) -> None:
        self._command('ehlo', f'EHLO {PROBE_HELO}', 'EHLO')

    def _on_ehlo(self, code: int, lines: list[str]) -> None:
        if not self._expect(code, lines, (250,), 'EHLO refused'):
            return
        peer = _HELLO_PEER.search(lines[0] + ' ')
        self.peer_seen = peer.group(1) if peer else self.peer_seen
        self.extensions = {}
        for extension in lines[1:]:
            keyword, _, value = extension.partition(' ')
            self.extensions[keyword.upper()] = value
        if self._wants_starttls():
            self._command('starttls', 'STARTTLS', 'STARTTLS')
            return
        self._auth_or_mail()

    def _wants_starttls(self) -> bool:
        if self.probe.tls_active:
            return False
        security = self.target.security
        offered = 'STARTTLS' in self.extensions
        if security == 'starttls':
            return True                      # the reply says whether the server can
        if security == 'optional':
            if not offered:
                self.notes.append('STARTTLS not offered')
            elif not self.target.ca_file:
                self.notes.append('STARTTLS offered, not used: no CA to verify the server with')
            return offered and bool(self.target.ca_file)
        return False

    def _on_starttls(self, code: int, lines: list[str]) -> None:
        if not self._expect(code, lines, (220,), 'STARTTLS refused'):
            return
        self.stage = 'tls'
        self.probe.stage = 'in the TLS handshake'
        self.probe.start_tls()               # handshakeCompleted sends EHLO again

    def _auth_or_mail(self) -> None:
        mechanisms = self.extensions.get('AUTH', '').upper().split()
        if self.target.options.get('auth') is False or not mechanisms:
            if self.target.options.get('auth') is not False:
                self.notes.append('AUTH not offered')
            self._mail()
        elif 'PLAIN' in mechanisms:
            token = base64.b64encode(f'\0{self.user}\0{self.password}'.encode()).decode()
            self._command('auth', f'AUTH PLAIN {token}', 'AUTH PLAIN')
        elif 'LOGIN' in mechanisms:
            self._command('auth_login_user', 'AUTH LOGIN', 'AUTH LOGIN')
        else:
            self.notes.append(f'no AUTH mechanism the probe speaks ({" ".join(mechanisms)})')
            self._mail()

    def _on_auth_login_user(self, code: int, lines: list[str]) -> None:
        if self._expect(code, lines, (334,), 'AUTH LOGIN refused'):
            self._command('auth_login_password', base64.b64encode(self.user.encode()).decode(), 'AUTH LOGIN user')

    def _on_auth_login_password(self, code: int, lines: list[str]) -> None:
        if self._expect(code, lines, (334,), 'AUTH LOGIN user refused'):
            self._command('auth', base64.b64encode(self.password.encode()).decode(), 'AUTH LOGIN password')

    def _on_auth(self, code: int, lines: list[str]) -> None:
        if self._expect(code, lines, (235,), f'AUTH as {self.user} failed'):
            self.notes.append(f'authenticated as {self.user}')
            self._mail()

    def _mail(self) -> None:
        self._command('mail', f'MAIL FROM:<{self.sender}> SIZE={len(self.message)}', 'MAIL FROM')

    def _on_mail(self, code: int, lines: list[str]) -> None:
        if self._expect(code, lines, (250,), f'MAIL FROM:<{self.sender}> refused'):
            self._command('rcpt', f'RCPT TO:<{self.recipient}>', 'RCPT TO')

    def _on_rcpt(self, code: int, lines: list[str]) -> None:
        if self._expect(code, lines, (250, 251), f'RCPT TO:<{self.recipient}> refused'):
            self._command('data', 'DATA', 'DATA')

    def _on_data(self, code: int, lines: list[str]) -> None:
        if not self._expect(code, lines, (354,), 'DATA refused'):
            return
        self.stage = 'sent'
        self.probe.stage = f'waiting for the reply to the {len(self.message)} B message'
        # RFC 5321 §4.5.2 transparency: a line starting with '.' gets another.
        body = re.sub(rb'(?m)^\.', b'..', self.message)
        self.transport.write(body + (b'' if body.endswith(b'\r\n') else b'\r\n') + b'.\r\n')

    def _on_sent(self, code: int, lines: list[str]) -> None:
        if not self._expect(code, lines, (250,), 'message not accepted'):
            return
        reply = ' '.join(lines)
        queued = _QUEUED.search(reply)
        if queued is None:
            self.probe.decide('protocol_error', f'250 without a queue id: {reply[:200]}')
            return
        listed = {name: int(size) for name, size in _LISTED.findall(reply.partition('attachments:')[2])}
        if listed and listed.get(self.attachment) != self.attachment_size:
            self.probe.decide('protocol_error', f'queued as {queued.group(1)}, but the server saw '
                                                f'attachments {listed}, not {self.attachment} '
                                                f'{self.attachment_size} B')
            return
        self.send('QUIT')
        notes = f' ({"; ".join(self.notes)})' if self.notes else ''
        self.probe.exchange += f' → queued as {queued.group(1)}'
        self.probe.decide('ok', f'answered by {self.server_host}{notes}; {self.attachment} '
                                f'({self.attachment_size} B PDF) in a {len(self.message)} B message '
                                f'queued as {queued.group(1)}', peer_seen=self.peer_seen)

    def _on_tls(self, code: int, lines: list[str]) -> None:
        self.probe.decide('protocol_error', f'reply {code} before the TLS handshake')


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Send a scanned document to ``target``; always fires with a ProbeResult."""
    exchange = {'tls': 'SMTPS', 'starttls': 'SMTP STARTTLS', 'optional': 'SMTP'}.get(target.security, 'SMTP')
    if target.transport != 'tcp':
        return error_result(target, exchange, f'smtp runs over TCP, not {target.transport}')
    try:
        exchange += f' EHLO + MAIL {target.size} B scan'
        try:
            client = _SMTPClient(target)
        except ValueError as exc:   # nothing to pass on
            return error_result(target, exchange, str(exc))
        if target.options.get('carries'):
            exchange = exchange.replace(f'{target.size} B scan', f'{client.attachment} ({client.attachment_size} B)')
        return StreamProbe(reactor, target, exchange).start(client, tls=target.security == 'tls')
    except Exception as exc:
        return crashed(target, exchange, exc)


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'scan_mail', 'server_protocol']
