"""``mailstore``: what the ``smtp``, ``pop3`` and ``imap`` modules share: the mail server's
in-memory mailbox, the lab mail account, the MIME messages the probes send and check, the
line-reading probe clients and how POP3 and IMAP (no in-band TLS upgrade) open their port.

Mailbox (invented: a lab stand-in for the customer's mail server)
    One mailbox per role daemon (``store_for(persona)``, keyed by the persona's host: the
    SMTP, POP3 and IMAP listeners of one mail server are built one by one, and must share it).
    SMTP delivers every accepted message into it, whatever the recipient; POP3 and IMAP read
    it as the lab account's INBOX. It is bounded (``MAX_MESSAGES`` messages and
    ``MAX_STORE_BYTES`` bytes, oldest delivered message dropped first) and always holds the
    seed: a print-by-mail message (the Mobile Print Server's input) with a small PDF
    attachment, so a POP3/IMAP probe finds a job even before any SMTP delivery. The seed is
    message 1 and cannot be deleted. Messages are kept as RFC 5322 bytes with CRLF line ends.

Lab account (invented, documented for people testing by hand)
    ``LAB_USER`` / ``LAB_PASSWORD`` (``safeq`` / ``safeq-lab-mail``): SMTP AUTH PLAIN/LOGIN,
    POP3 USER/PASS and APOP, IMAP LOGIN and AUTHENTICATE PLAIN/LOGIN.
    ``persona.identity['mail_user']`` / ``['mail_password']`` replace them for one server.
"""

from __future__ import annotations

import email.policy
import hashlib
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate, make_msgid
from typing import Any

from twisted.cred import credentials, error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from . import tls
from .base import Listener, Persona, ProbeTarget
from .probing import OnRequest, StreamClient
from .payloads import pdf_document

LAB_USER = 'safeq'
LAB_PASSWORD = 'safeq-lab-mail'
MAIL_DOMAIN = 'safeq.lab'           # the lab's mail domain (the lab directory's users are @safeq.lab)
MAX_MESSAGES = 64                   # messages a mailbox keeps (the seed included)
MAX_MESSAGE_BYTES = 32 << 20        # largest message SMTP accepts (announced as SIZE)
MAX_STORE_BYTES = 64 << 20          # bytes a mailbox keeps
MAX_REPLY_BYTES = MAX_MESSAGE_BYTES * 2   # what a probe client buffers before it gives up
SEED_ATTACHMENT = 'print-by-mail.pdf'
SEED_PDF_BYTES = 4096

_CRLF = re.compile(rb'\r?\n')
_GREETING_PEER = re.compile(r'\(peer (\S+?)\)')   # the stubs' greetings name whom they saw (invented)


# --- the account ----------------------------------------------------------------

def account(persona: Persona) -> tuple[str, str]:
    """(user, password) of the lab mail account on ``persona``'s server."""
    identity = persona.identity
    return str(identity.get('mail_user') or LAB_USER), str(identity.get('mail_password') or LAB_PASSWORD)


@implementer(ICredentialsChecker)
class LabAccountChecker:
    """Accepts the one lab account; tells ``on_attempt(user, ok)`` about every attempt, so a
    stub records each login whatever the mechanism (PLAIN, LOGIN, USER/PASS, APOP)."""

    credentialInterfaces = (credentials.IUsernamePassword, credentials.IUsernameHashedPassword)

    def __init__(self, user: str, password: str, on_attempt: Callable[[str, bool], None]) -> None:
        self.user = user.encode()
        self.password = password.encode()
        self.on_attempt = on_attempt

    def requestAvatarId(self, creds):
        name = creds.username if isinstance(creds.username, bytes) else str(creds.username or '').encode()
        try:
            ok = secrets.compare_digest(name, self.user) and self._password_matches(creds)
        except Exception:   # a malformed response (e.g. APOP digest) is a failed login, not a crash
            ok = False
        self.on_attempt(name.decode('utf-8', 'replace')[:256], ok)
        return succeed(name) if ok else fail(cred_error.UnauthorizedLogin())

    def _password_matches(self, creds) -> bool:
        magic, digest = getattr(creds, 'magic', None), getattr(creds, 'digest', None)
        if isinstance(magic, bytes) and digest is not None:
            # APOP: twisted's APOPCredentials.checkPassword compares a str digest with bytes
            # (never true). Duck-typed: importing twisted.mail.pop3 installs the global reactor.
            expected = hashlib.md5(magic + self.password).hexdigest().encode()
            digest = digest if isinstance(digest, bytes) else str(digest).encode()
            return secrets.compare_digest(expected, digest.lower())
        return bool(creds.checkPassword(self.password))


# --- documents and messages -------------------------------------------------------

def compose(sender: str, recipient: str, subject: str, text: str, attachment_name: str,
            attachment: bytes, domain: str = MAIL_DOMAIN) -> bytes:
    """An RFC 5322 message (CRLF lines) with a text part and one PDF attachment (base64)."""
    message = EmailMessage(policy=email.policy.SMTP)
    message['From'] = sender
    message['To'] = recipient
    message['Subject'] = subject
    message['Date'] = formatdate(usegmt=True)
    message['Message-ID'] = make_msgid('safeq-lab', domain=domain)
    message.set_content(text)
    message.add_attachment(attachment, maintype='application', subtype='pdf', filename=attachment_name)
    return message.as_bytes()


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    size: int
    sha256: str
    is_pdf: bool

    def to_dict(self) -> dict[str, Any]:
        return {'name': self.name, 'content_type': self.content_type, 'bytes': self.size,
                'sha256': self.sha256}


def attachments(data: bytes) -> list[Attachment]:
    """The attachments of an RFC 5322 message (parts with a file name or disposition
    'attachment'); [] for anything unparseable."""
    try:
        message = BytesParser(policy=email.policy.default).parsebytes(data)
        found = []
        for part in message.walk():
            if part.is_multipart():
                continue
            name = part.get_filename()
            if name is None and part.get_content_disposition() != 'attachment':
                continue
            payload = part.get_payload(decode=True) or b''
            found.append(Attachment(name=str(name or ''), content_type=part.get_content_type(),
                                    size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                                    is_pdf=payload.startswith(b'%PDF-')))
        return found
    except Exception:   # hostile MIME may trip the parser in many ways; no attachment then
        return []


def header(data: bytes, name: str) -> str:
    """One header of a message, '' when missing or unparseable."""
    try:
        head = data.split(b'\r\n\r\n', 1)[0][:64 << 10]
        return str(BytesParser(policy=email.policy.default).parsebytes(head, headersonly=True)
                   .get(name, '')).strip()
    except Exception:
        return ''


def seed_message(domain: str = MAIL_DOMAIN) -> bytes:
    """The print-by-mail job every mailbox starts with."""
    pdf = pdf_document(SEED_PDF_BYTES, 'safeq-lab print-by-mail test page', 'seed')
    return compose(f'alice@{domain}', f'print@{domain}', f'Print: {SEED_ATTACHMENT}',
                   'Please print the attached document (safeq-lab print-by-mail job).',
                   SEED_ATTACHMENT, pdf, domain)


# --- the mailbox ------------------------------------------------------------------

@dataclass(frozen=True)
class StoredMessage:
    uid: int
    data: bytes            # RFC 5322, CRLF line ends
    received: float        # epoch seconds
    queue_id: str
    seed: bool = False


class MailStore:
    """One server's mailbox: the seed plus the most recent deliveries, bounded."""

    def __init__(self, domain: str = MAIL_DOMAIN, clock: Callable[[], float] = time.time,
                 max_messages: int = MAX_MESSAGES, max_bytes: int = MAX_STORE_BYTES) -> None:
        self.clock = clock
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.uid_validity = int(clock()) & 0x7fffffff or 1
        self._uids = itertools.count(1)
        self._messages: list[StoredMessage] = []
        self._add(seed_message(domain), seed=True)

    def _add(self, data: bytes, seed: bool = False) -> StoredMessage:
        stored = StoredMessage(uid=next(self._uids), data=data, received=self.clock(),
                               queue_id=secrets.token_hex(5).upper(), seed=seed)
        self._messages.append(stored)
        return stored

    def deliver(self, data: bytes) -> StoredMessage:
        """Keep ``data`` (line ends made CRLF); the oldest deliveries go when over the bounds."""
        data = _CRLF.sub(b'\r\n', data)
        if data and not data.endswith(b'\r\n'):
            data += b'\r\n'
        stored = self._add(data)
        while len(self._messages) > self.max_messages or (
                self.size() > self.max_bytes and len(self._messages) > 2):
            victim = next(m for m in self._messages if not m.seed)
            self._messages.remove(victim)
        return stored

    def messages(self) -> tuple[StoredMessage, ...]:
        """The messages now, oldest (the seed) first: a session's fixed view."""
        return tuple(self._messages)

    def delete(self, uids) -> int:
        """Remove these messages (never the seed); how many went."""
        doomed = set(uids)
        before = len(self._messages)
        self._messages = [m for m in self._messages if m.seed or m.uid not in doomed]
        return before - len(self._messages)

    def size(self) -> int:
        return sum(len(m.data) for m in self._messages)


# Per daemon: the mail listeners of one persona share its mailbox (see the module docstring).
_STORES: dict[str, MailStore] = {}


def store_for(persona: Persona) -> MailStore:
    store = _STORES.get(persona.host)
    if store is None:
        store = _STORES[persona.host] = MailStore(str(persona.identity.get('mail_domain') or MAIL_DOMAIN))
    return store


# --- probe side ---------------------------------------------------------------------

class LineClient(StreamClient):
    """A probe client reading CRLF lines (and, when asked, a literal of n raw bytes) with a
    bounded buffer; subclasses implement ``line`` (and ``literal``). Hand-written rather than
    twisted.mail's clients: the probe must see every reply (greeting host, EHLO peer, queue
    id) and judge the first wrong one, which those clients fold into one Deferred."""

    def __init__(self) -> None:
        self.buffer = b''
        self.literal_wanted = 0       # > 0: the next bytes are a literal of this size

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.probe.result is None and self.buffer:
            if self.literal_wanted:
                if len(self.buffer) < self.literal_wanted:
                    break
                chunk, self.buffer = self.buffer[:self.literal_wanted], self.buffer[self.literal_wanted:]
                self.literal_wanted = 0
                self.literal(chunk)
                continue
            line, found, rest = self.buffer.partition(b'\n')
            if not found:
                break
            self.buffer = rest
            self.line(line.rstrip(b'\r'))
        if self.probe.result is None and len(self.buffer) > MAX_REPLY_BYTES:
            self.probe.decide('protocol_error', f'reply longer than {MAX_REPLY_BYTES} B')

    def send(self, line: bytes | str) -> None:
        self.transport.write((line.encode() if isinstance(line, str) else line) + b'\r\n')

    def line(self, line: bytes) -> None:
        raise NotImplementedError

    def literal(self, data: bytes) -> None:
        raise NotImplementedError


class MailboxClient(LineClient):
    """What the POP3 and IMAP probes share: the account they log in with (options ``user``,
    ``password``), the message they read (option ``message``: a positive integer, else 1) and
    what the greeting told them (``server_host``, ``peer_seen``)."""

    def __init__(self, target: ProbeTarget) -> None:
        super().__init__()
        self.target = target
        self.user = str(target.options.get('user') or LAB_USER)
        self.password = str(target.options.get('password') or LAB_PASSWORD)
        number = target.options.get('message', 1)
        self.number = number if isinstance(number, int) and not isinstance(number, bool) and number > 0 else 1
        self.stage = 'greeting'
        self.server_host = ''
        self.peer_seen: str | None = None

    def greeted(self, server_host: str, greeting: str) -> None:
        """Keep who answered and the client address the greeting names, if any."""
        self.server_host = server_host
        peer = _GREETING_PEER.search(greeting)
        self.peer_seen = peer.group(1) if peer else None


def listen_mailbox(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None, interface: str,
                   *, factory_class: type, name: str, upgrade: str):
    """Serve a mailbox protocol (POP3, IMAP) on plain or implicit TLS ports: the stubs offer no
    in-band upgrade (``upgrade`` names the one they lack). Every listener of one persona shares its store."""
    if listener.transport != 'tcp':
        raise ValueError(f'{name} cannot listen on {listener.transport!r} ({name.upper()} runs over TCP)')
    if listener.security not in ('plain', 'tls'):
        raise ValueError(f'{name} serves plain or implicit TLS, not {listener.security!r} (no {upgrade})')
    factory = factory_class(reactor, persona, on_request, listener.security, store_for(persona))
    return tls.listen_stream(reactor, listener, factory, persona, interface=interface)


def text(data: bytes, limit: int = 200) -> str:
    """Printable text of a reply for a report line."""
    return data.decode('utf-8', 'replace')[:limit]


def check_job(data: bytes) -> tuple[bool, str]:
    """(found, description) of the PDF attachment a print-by-mail reader needs in ``data``."""
    found = attachments(data)
    pdfs = [a for a in found if a.is_pdf]
    if not pdfs:
        names = ', '.join(a.name or a.content_type for a in found) or 'none'
        return False, f'no PDF attachment in the {len(data)} B message (attachments: {names})'
    first = pdfs[0]
    subject = header(data, 'Subject')
    return True, f'message "{subject[:80]}" ({len(data)} B) with {first.name} ({first.size} B PDF)'
