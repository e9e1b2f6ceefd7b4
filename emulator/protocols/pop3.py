"""``pop3``: POP3 (RFC 1939) mailbox access: a twisted.mail POP3 server stub over the mail
server's in-memory mailbox (``mailstore``), and a probe reading a print-by-mail job.

The Mobile Print Server collects print-by-mail jobs from the customer's mail server over POP3
(110 plain, 995 implicit TLS, RFC 8314).

Server (twisted.mail.pop3.POP3)
    Greeting ``+OK <host> POP3 safeq-lab ready (peer <client IP>) <APOP timestamp>`` (invented
    wording: it names the server and whom it saw). USER/PASS and APOP (RFC 1939 §7) check the
    lab account (``mailstore.LAB_USER``/``LAB_PASSWORD``: ``safeq``/``safeq-lab-mail``); SASL is
    not offered. After login the session sees the mailbox as it was then (RFC 1939's fixed
    numbering): message 1 is always the seeded print-by-mail job with its PDF attachment, then
    what SMTP delivered. STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP, CAPA and QUIT work as in
    RFC 1939/2449; DELE'd messages leave the mailbox at QUIT, except the seed (invented: it
    stays, so every reader finds a job). ``security``: ``plain``, or ``tls`` (implicit TLS with
    the persona's certificate); STLS (RFC 2595) is not offered: the catalog has no POP3
    STARTTLS. Malformed or unknown commands get ``-ERR`` and the session goes on; lines over
    ``MAX_LINE`` close it. ``on_request`` gets one record per login attempt (op ``login``,
    ``user``, ``result``), RETR/TOP (``message``, ``bytes``) and DELE.

Probe
    USER/PASS as the lab account, STAT (at least one message), RETR 1, QUIT. ``ok`` needs the
    message to carry a PDF attachment (checked by parsing the MIME). Implicit TLS for ``tls``
    targets, verifying the chain and ``target.server_name``. ``target.options``: ``user``,
    ``password``, ``message`` (number to read, default 1).
"""

from __future__ import annotations

import io
import os
import re
import secrets
from functools import lru_cache
from typing import Any

from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Cooperator
from twisted.mail._except import POP3Error
from twisted.mail.interfaces import IMailboxPOP3, IServerFactoryPOP3
from zope.interface import implementer

from . import mailstore
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .mailstore import LabAccountChecker, MailboxClient, MailStore
from .probing import OnRequest, tcp_client_probe
from .serving import IDLE_TIMEOUT, StubConnection, StubFactory

PROTOCOL_IDS = ('pop3',)

MAX_LINE = 1024           # RFC 2449: commands are at most 255 octets; generous


# --- server stub ------------------------------------------------------------------

@implementer(IMailboxPOP3)
class SessionMailbox:
    """A POP3 session's fixed view of the mailbox (0-based indexes, as twisted's IMailbox)."""

    def __init__(self, store: MailStore) -> None:
        self.store = store
        self.messages = store.messages()
        self.deleted: set[int] = set()

    def _index(self, i) -> int:
        if not isinstance(i, int) or not 0 <= i < len(self.messages):
            raise ValueError(f'no message {i}')
        return i

    def listMessages(self, i=None):
        if i is None:
            return [0 if n in self.deleted else len(m.data) for n, m in enumerate(self.messages)]
        index = self._index(i)
        return 0 if index in self.deleted else len(self.messages[index].data)

    def getMessage(self, i):
        index = self._index(i)
        if index in self.deleted:
            raise ValueError(f'message {i + 1} is deleted')
        return io.BytesIO(self.messages[index].data)

    def getUidl(self, i) -> bytes:
        index = self._index(i)
        message = self.messages[index]
        return b'%d.%s' % (message.uid, message.queue_id.encode())

    def deleteMessage(self, i) -> None:
        self.deleted.add(self._index(i))

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> None:
        self.store.delete(self.messages[n].uid for n in self.deleted)
        self.deleted.clear()


@implementer(IRealm)
class _MailboxRealm:
    def __init__(self, store: MailStore) -> None:
        self.store = store

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if IMailboxPOP3 not in interfaces:
            raise NotImplementedError('only IMailboxPOP3')
        return IMailboxPOP3, SessionMailbox(self.store), lambda: None


@lru_cache(maxsize=None)
def server_protocol() -> type:
    """The stub's protocol class, ``LabPOP3Session`` over twisted's POP3. Built on first use:
    twisted.mail.pop3 imports twisted.mail.smtp, which installs the global reactor, which must
    not happen when the zygote imports every protocol module before it forks the daemons."""
    from twisted.mail.pop3 import POP3

    return type('LabPOP3', (LabPOP3Session, POP3, StubConnection), {})


class LabPOP3Session:
    """What the stub adds to twisted's POP3 server (``server_protocol`` mixes them): the
    persona's greeting, the injected reactor for timers and transfers, witness records and
    one-line errors instead of logged tracebacks."""

    timeOut = IDLE_TIMEOUT
    MAX_LENGTH = MAX_LINE

    def __init__(self, factory: POP3StubFactory) -> None:
        self.factory = factory
        self.schedule = factory.cooperator.coiterate   # twisted's default runs on the global reactor
        user, password = mailstore.account(factory.persona)
        self.portal = Portal(_MailboxRealm(factory.store), [LabAccountChecker(user, password, self._login)])

    def connectionMade(self) -> None:
        StubConnection.connectionMade(self)
        # The APOP timestamp (RFC 1939 §7), naming the persona (twisted's names the real machine).
        self.magic = f'<{os.getpid()}.{secrets.randbelow(1 << 31)}@{self.factory.persona.host}>'.encode()
        self.successResponse(f'{self.factory.persona.host} POP3 safeq-lab ready (peer {self.peer}) '
                             f'{self.magic.decode()}')
        self.setTimeout(self.timeOut)

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def request_fields(self) -> dict[str, Any]:
        return {'tls': self.tls_active}

    def _login(self, user: str, ok: bool) -> None:
        self.report_request('login', user=user, result='success' if ok else 'failure')

    def state_COMMAND(self, line: bytes) -> None:
        self.processCommand(*line.split(b' '))

    def processCommand(self, command: bytes, *args: bytes):
        # twisted logs a traceback for every malformed or unknown command (log.err), or leaves
        # it unhandled in a Deferred when it was queued behind a pipelined STAT/LIST/UIDL.
        try:
            return super().processCommand(command, *args)
        except (ValueError, AttributeError, TypeError, UnicodeError, POP3Error) as exc:
            reason = exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else str(exc).encode()
            self.failResponse(b'bad command: ' + reason[:200])
            return None

    # commands that leave a witness ----------------------------------------------

    def _message(self, i) -> bytes | None:
        """Message ``i`` (1-based, as the client wrote it); None once a -ERR has been sent."""
        try:
            index = int(i) - 1
            if index < 0:
                raise ValueError(i)
            size = self.mbox.listMessages(index)
        except (ValueError, TypeError):
            self.failResponse(b'Bad message number argument')
            return None
        if not size:
            self.failResponse(b'message deleted')
            return None
        self._highest = max(self._highest, index + 1)
        return self.mbox.getMessage(index).read()

    # RETR and TOP send the message in one write: twisted's FileSender is a pull producer,
    # which a TLS transport drives with the global cooperator (so never on an injected reactor).
    def do_RETR(self, i) -> None:
        data = self._message(i)
        self.report_request('retr', message=mailstore.text(i, 20), bytes=None if data is None else len(data))
        if data is not None:
            self.successResponse(b'%d octets' % len(data))
            self.transport.write(dot_stuffed(data) + b'.\r\n')

    def do_TOP(self, i, lines) -> None:
        try:
            count = int(lines)
            if count < 0:
                raise ValueError(lines)
        except ValueError:
            self.failResponse(b'Bad line count argument')
            return
        data = self._message(i)
        self.report_request('top', message=mailstore.text(i, 20), lines=count)
        if data is not None:
            head, _, body = data.partition(b'\r\n\r\n')
            body_lines = body.split(b'\r\n')[:-1] if body.endswith(b'\r\n') else body.split(b'\r\n')
            top = head + b'\r\n\r\n' + b''.join(line + b'\r\n' for line in body_lines[:count])
            self.successResponse(b'Top of message follows')
            self.transport.write(dot_stuffed(top) + b'.\r\n')

    def do_DELE(self, i) -> None:
        super().do_DELE(i)
        self.report_request('dele', message=mailstore.text(i, 20))


def dot_stuffed(data: bytes) -> bytes:
    """RFC 1939 §3 byte-stuffing of a CRLF message (a line starting with '.' gets another)."""
    return re.sub(rb'(?m)^\.', b'..', data)


@implementer(IServerFactoryPOP3)
class POP3StubFactory(StubFactory):

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, security: str,
                 store: MailStore) -> None:
        super().__init__(reactor, persona, on_request, security)
        self.store = store
        # Message transfers are cooperative tasks: on this reactor, not the global one.
        self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self.protocol = server_protocol()

    # CAPA (RFC 2449) answers ---------------------------------------------------------

    def cap_IMPLEMENTATION(self) -> str:
        return f'safeq-lab {self.persona.host}'

    def cap_EXPIRE(self):
        raise NotImplementedError   # not announced

    def perUserExpiration(self) -> bool:
        return False

    def cap_LOGIN_DELAY(self):
        raise NotImplementedError   # not announced

    def perUserLoginDelay(self) -> bool:
        return False


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '') -> IListeningPort:
    """Serve POP3 on ``listener``; bind errors (CannotListenError) propagate."""
    return mailstore.listen_mailbox(reactor, listener, persona, on_request, interface,
                                    factory_class=POP3StubFactory, name='pop3', upgrade='STLS')


# --- client probe ---------------------------------------------------------------------

_STAT = re.compile(rb'^\+OK (\d+) (\d+)')


class _POP3Client(MailboxClient):
    """USER, PASS, STAT, RETR n, QUIT: each reply judged by the handler of the current stage."""

    def __init__(self, target: ProbeTarget) -> None:
        super().__init__(target)
        self.count = 0
        self.body: list[bytes] = []
        self.body_size = 0

    def begin(self) -> None:
        self.probe.stage = 'waiting for the +OK greeting'

    def _command(self, stage: str, line: str, shown: str | None = None) -> None:
        self.stage = stage
        self.probe.stage = f'waiting for the reply to {shown or line}'
        self.send(line)

    def line(self, line: bytes) -> None:
        if self.stage == 'body':
            self._body_line(line)
            return
        if not line.startswith(b'+OK'):
            what = 'greeting' if self.stage == 'greeting' else f'{self.stage.upper()}'
            self.probe.decide('protocol_error', f'{what} answered {mailstore.text(line)!r}')
            return
        getattr(self, f'_on_{self.stage}')(line)

    def _on_greeting(self, line: bytes) -> None:
        words = mailstore.text(line).split()
        self.greeted(words[1] if len(words) > 1 else '?', mailstore.text(line))
        self._command('user', f'USER {self.user}')

    def _on_user(self, line: bytes) -> None:
        self._command('pass', f'PASS {self.password}', 'PASS')

    def _on_pass(self, line: bytes) -> None:
        self._command('stat', 'STAT')

    def _on_stat(self, line: bytes) -> None:
        match = _STAT.match(line)
        if match is None:
            self.probe.decide('protocol_error', f'STAT answered {mailstore.text(line)!r}')
            return
        self.count = int(match.group(1))
        if self.count < self.number:
            self.probe.decide('protocol_error', f'mailbox holds {self.count} message(s), '
                                                f'no message {self.number} to read')
            return
        self._command('retr', f'RETR {self.number}')

    def _on_retr(self, line: bytes) -> None:
        self.stage = 'body'
        self.probe.stage = f'reading message {self.number}'

    def _body_line(self, line: bytes) -> None:
        if line == b'.':
            self._judge(b'\r\n'.join(self.body) + b'\r\n')
            return
        self.body.append(line[1:] if line.startswith(b'.') else line)   # RFC 1939 byte-stuffing
        self.body_size += len(line) + 2
        if self.body_size > mailstore.MAX_REPLY_BYTES:
            self.probe.decide('protocol_error', f'message {self.number} longer than '
                                                f'{mailstore.MAX_REPLY_BYTES} B')

    def _judge(self, message: bytes) -> None:
        self.body = []
        found, description = mailstore.check_job(message)
        if not found:
            self.probe.decide('protocol_error', f'RETR {self.number}: {description}')
            return
        self.send('QUIT')
        self.probe.exchange += f' → {self.count} message(s), job attached'
        self.probe.decide('ok', f'answered by {self.server_host}; logged in as {self.user}; '
                                f'{self.count} message(s); RETR {self.number}: {description}',
                          peer_seen=self.peer_seen)


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Log in to ``target``'s mailbox and read a print-by-mail job; always fires with a ProbeResult."""
    exchange = 'POP3S' if target.security == 'tls' else 'POP3'
    return tcp_client_probe(reactor, target, exchange, _POP3Client, tls=target.security == 'tls',
                            renamed=lambda client: f'{exchange} USER/PASS + STAT + RETR {client.number}')


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'SessionMailbox', 'server_protocol']
