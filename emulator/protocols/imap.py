"""``imap``: IMAP4rev1 (RFC 3501) mailbox access: a twisted.mail IMAP4 server stub over the mail
server's in-memory mailbox (``mailstore``), and a probe reading a print-by-mail job.

The Mobile Print Server collects print-by-mail jobs from the customer's mail server over IMAP
(143 plain, 993 implicit TLS, RFC 8314).

Server (twisted.mail.imap4.IMAP4Server)
    Greeting ``* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN ...] <host> IMAP4rev1 safeq-lab
    ready (peer <client IP>)`` (invented wording: it names the server and whom it saw). LOGIN
    and AUTHENTICATE PLAIN/LOGIN check the lab account (``mailstore.LAB_USER``/``LAB_PASSWORD``:
    ``safeq``/``safeq-lab-mail``). One mailbox, INBOX, seen as it was at SELECT: message 1 is
    always the seeded print-by-mail job with its PDF attachment, then what SMTP delivered.
    CAPABILITY, NOOP, LOGOUT, LIST, LSUB, STATUS, SELECT, EXAMINE, FETCH (BODY[...] sections,
    partial fetches, HEADER.FIELDS, MIME, TEXT, RFC822*, ENVELOPE, BODYSTRUCTURE, FLAGS, UID,
    INTERNALDATE), UID FETCH, SEARCH, UID SEARCH, CHECK, CLOSE, NAMESPACE and IDLE work.
    Invented: the lab INBOX is read-only (SELECT says READ-ONLY; CREATE, DELETE, RENAME,
    SUBSCRIBE, UNSUBSCRIBE, APPEND, STORE, COPY and EXPUNGE get ``NO``), so every reader finds
    the job. ``security``: ``plain``, or ``tls`` (implicit TLS with the persona's certificate);
    STARTTLS is not offered: the catalog has no IMAP STARTTLS. Malformed commands get ``BAD``
    and the session goes on; lines over ``MAX_LINE`` close it. ``on_request`` gets one record
    per login attempt (op ``login``, ``user``, ``result``), SELECT/EXAMINE (``mailbox``,
    ``exists``) and FETCH (``messages``, ``items``, ``uid``).

Probe
    LOGIN as the lab account, SELECT INBOX (at least one message), FETCH 1 (BODY[]), LOGOUT.
    ``ok`` needs the message to carry a PDF attachment (checked by parsing the MIME). Implicit
    TLS for ``tls`` targets, verifying the chain and ``target.server_name``.
    ``target.options``: ``user``, ``password``, ``mailbox`` (default INBOX), ``message``
    (sequence number to read, default 1), and ``carries``/``holder`` (``jobstore``): read the
    newest message instead, ``ok`` only when it carries the attachment ``NAME.pdf``, which the
    holder (the reader's host) then keeps (kind ``mail``): a user fetching a scan sent to them.
"""

from __future__ import annotations

import copy
import email
import email.policy
import io
import re
from email.utils import formatdate
from typing import Any

from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.mail._except import MailboxException, ReadOnlyMailbox
from twisted.mail.interfaces import (IAccountIMAP, IMailboxIMAP, IMessageIMAP, IMessageIMAPFile,
                                     IMessageIMAPPart)
from zope.interface import implementer

from . import jobstore, mailstore
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .mailstore import LabAccountChecker, MailboxClient, MailStore, StoredMessage
from .probing import OnRequest, tcp_client_probe
from .serving import IDLE_TIMEOUT, StubConnection, StubFactory

PROTOCOL_IDS = ('imap',)

MAX_LINE = 8192           # longest command line (literals are counted apart)
INBOX = 'INBOX'
FLAGS = ('\\Seen', '\\Answered', '\\Flagged', '\\Deleted', '\\Draft')
WRITE_COMMANDS = frozenset({b'CREATE', b'DELETE', b'RENAME', b'SUBSCRIBE', b'UNSUBSCRIBE', b'APPEND',
                            b'STORE', b'COPY', b'EXPUNGE'})

_log = Logger()


# --- messages -------------------------------------------------------------------------

def _header_fields(head: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw field with its folded lines) for each header field."""
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b'\r\n'):
        if line[:1] in (b' ', b'\t') and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b'\r\n' + line)
        elif line:
            fields.append((line.split(b':', 1)[0].strip().decode('ascii', 'replace').lower(), line))
    return fields


@implementer(IMessageIMAPPart)
class MessagePart:
    """One MIME entity of a stored message, from its raw CRLF bytes (headers, blank line, body)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        if raw.startswith(b'\r\n'):
            self.head, self.body = b'', raw[2:]
        else:
            self.head, _, self.body = raw.partition(b'\r\n\r\n')
        self._fields: list[tuple[str, bytes]] | None = None
        self._parts: list[MessagePart] | None = None

    @property
    def fields(self) -> list[tuple[str, bytes]]:
        if self._fields is None:
            self._fields = _header_fields(self.head)
        return self._fields

    def selected_fields(self, negate: bool, names) -> list[bytes]:
        """The raw header fields named (or, with ``negate``, not named) in ``names``."""
        wanted = {(n.decode('ascii', 'replace') if isinstance(n, bytes) else str(n)).lower() for n in names}
        return [raw for name, raw in self.fields if (name in wanted) != negate]

    def getHeaders(self, negate, *names) -> dict[str, str]:
        headers: dict[str, str] = {}
        for raw in self.selected_fields(bool(negate) or not names, names if names else ()):
            name, _, value = raw.decode('ascii', 'replace').partition(':')
            headers.setdefault(name.strip().lower(), ' '.join(value.split()))
        return headers

    def getBodyFile(self):
        return io.BytesIO(self.body)

    def getSize(self) -> int:
        return len(self.raw)

    def isMultipart(self) -> bool:
        return bool(self.parts)

    def getSubPart(self, part: int) -> MessagePart:
        if not 0 <= part < len(self.parts):
            raise IndexError(part)
        return self.parts[part]

    @property
    def parts(self) -> list[MessagePart]:
        if self._parts is None:
            self._parts = self._split()
        return self._parts

    def _split(self) -> list[MessagePart]:
        # RFC 2046 §5.1.1 by hand: the raw bytes of each part must stay as sent (sizes, literals).
        try:
            header = email.message_from_bytes(self.head + b'\r\n\r\n', policy=email.policy.compat32)
            boundary = header.get_boundary() if header.get_content_maintype() == 'multipart' else None
        except Exception:   # a hostile Content-Type: treat the entity as one part
            return []
        if not boundary:
            return []
        delimiter = b'\r\n--' + boundary.encode('ascii', 'replace')
        parts = []
        for segment in (b'\r\n' + self.body).split(delimiter)[1:]:
            if segment.startswith(b'--'):
                break
            _, found, content = segment.partition(b'\r\n')
            if found:
                parts.append(MessagePart(content))
        return parts


@implementer(IMessageIMAP, IMessageIMAPFile)
class Message(MessagePart):
    def __init__(self, stored: StoredMessage) -> None:
        super().__init__(stored.data)
        self.stored = stored

    def getUID(self) -> int:
        return self.stored.uid

    def getFlags(self) -> list[str]:
        return []

    def getInternalDate(self) -> str:
        return formatdate(self.stored.received)

    def open(self):
        return io.BytesIO(self.raw)


# --- mailbox and account -----------------------------------------------------------------

@implementer(IMailboxIMAP)
class SessionMailbox:
    """The INBOX as one SELECT sees it: a fixed, read-only view of the store."""

    def __init__(self, store: MailStore) -> None:
        self.store = store
        self.messages = [Message(m) for m in store.messages()]
        self.listeners: list = []

    def getFlags(self) -> list[str]:
        return list(FLAGS)

    def getHierarchicalDelimiter(self) -> str:
        return '/'

    def getUIDValidity(self) -> int:
        return self.store.uid_validity

    def getUIDNext(self) -> int:
        return max((m.getUID() for m in self.messages), default=0) + 1

    def getUID(self, message: int) -> int:
        return self.messages[message - 1].getUID()

    def getMessageCount(self) -> int:
        return len(self.messages)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        return len(self.messages)

    def isWriteable(self) -> bool:
        return False

    def destroy(self) -> None:
        raise ReadOnlyMailbox()

    def requestStatus(self, names) -> dict:
        # Unknown items are left out: twisted's answer to a failed STATUS raises (str + bytes).
        known = {'MESSAGES': self.getMessageCount, 'RECENT': self.getRecentCount,
                 'UIDNEXT': self.getUIDNext, 'UIDVALIDITY': self.getUIDValidity,
                 'UNSEEN': self.getUnseenCount}
        return {name: known[name.upper()]() for name in names if name.upper() in known}

    def addListener(self, listener) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def addMessage(self, message, flags=(), date=None):
        return fail(ReadOnlyMailbox())

    def expunge(self):
        raise ReadOnlyMailbox()

    def store(self, messages, flags, mode, uid):
        raise ReadOnlyMailbox()

    def fetch(self, messages, uid) -> list[tuple[int, Message]]:
        """(sequence number, message) for the set; membership is tested per message, so a
        range like 1:4294967295 costs no more than the mailbox holds."""
        numbered = list(enumerate(self.messages, 1))
        if not numbered:
            return []
        messages.last = numbered[-1][1].getUID() if uid else len(numbered)
        return [(seq, message) for seq, message in numbered
                if (message.getUID() if uid else seq) in messages]


@implementer(IAccountIMAP)
class Account:
    """The lab account: one read-only INBOX."""

    def __init__(self, session: LabIMAP) -> None:
        self.session = session

    def select(self, name, rw=True):
        if str(name).upper() != INBOX:
            return None
        mailbox = SessionMailbox(self.session.factory.store)
        self.session.report_request('select', mailbox=INBOX, exists=mailbox.getMessageCount())
        return mailbox

    def listMailboxes(self, ref, wildcard):
        try:
            matches = imap4.wildcardToRegexp(str(ref) + str(wildcard), '/').fullmatch(INBOX)
        except re.error:
            matches = None
        return [(INBOX, SessionMailbox(self.session.factory.store))] if matches else []

    def isSubscribed(self, name) -> bool:
        return str(name).upper() == INBOX

    def create(self, pathspec) -> bool:
        return False

    def addMailbox(self, name, mbox=None):
        raise MailboxException('the lab mailbox is read-only')

    delete = rename = subscribe = unsubscribe = addMailbox


@implementer(IRealm)
class _AccountRealm:
    def __init__(self, session: LabIMAP) -> None:
        self.session = session

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if imap4.IAccount not in interfaces:
            raise NotImplementedError('only IAccount')
        return imap4.IAccount, Account(self.session), lambda: None


# --- server stub ---------------------------------------------------------------------------

def _literal(data: bytes) -> bytes:
    return b'{%d}\r\n' % len(data) + data


def _section_label(part) -> bytes:
    """'BODY[<section>]' and, for a partial fetch, its origin '<n>' (RFC 3501 §7.4.2)."""
    label = part.getBytes().split(b'<', 1)[0]
    return label + (b'<%d>' % part.partialBegin if part.partialBegin is not None else b'')


def _checked_mailbox_names(handler, count: int):
    """``handler`` after its first ``count`` arguments (mailbox names) proved decodable: twisted
    logs a traceback (log.err) for a name that is not modified UTF-7 before refusing it."""
    def checked(self, tag, *args, **kwargs):
        for name in args[:count]:
            try:
                if isinstance(name, bytes):
                    name.decode('imap4-utf-7')
            except Exception:
                self.sendNegativeResponse(tag, b'Illegal mailbox name')
                return None
        return handler(self, tag, *args, **kwargs)
    return checked


class LabIMAP(imap4.IMAP4Server, StubConnection):
    """twisted's IMAP4 server with the persona's greeting, the injected reactor for timers and
    transfers, a read-only INBOX, witness records and one-line errors instead of tracebacks."""

    timeOut = IDLE_TIMEOUT
    POSTAUTH_TIMEOUT = 5 * IDLE_TIMEOUT
    MAX_LENGTH = MAX_LINE

    def __init__(self, factory: IMAPStubFactory) -> None:
        super().__init__(chal={b'PLAIN': PLAINCredentials, b'LOGIN': LOGINCredentials},
                         contextFactory=None, scheduler=factory.cooperator.coiterate)
        self.factory = factory
        user, password = mailstore.account(factory.persona)
        self.portal = Portal(_AccountRealm(self), [LabAccountChecker(user, password, self._login)])

    def connectionMade(self) -> None:
        StubConnection.connectionMade(self)
        self.IDENT = (f'{self.factory.persona.host} IMAP4rev1 safeq-lab ready '
                      f'(peer {self.peer})').encode()
        super().connectionMade()

    def request_fields(self) -> dict[str, Any]:
        return {'tls': self.tls_active}

    def _login(self, user: str, ok: bool) -> None:
        self.report_request('login', user=user, result='success' if ok else 'failure')

    # hostile input: answers, never tracebacks ------------------------------------------
    # twisted logs every unexpected exception with log.err (a traceback per bad line); these
    # overrides answer BAD instead. The name-mangled ones are IMAP4Server's private errbacks.

    def lineReceived(self, line: bytes) -> None:
        if self.blocked is not None:
            self.blocked.append(line)
            return
        self.resetTimeout()
        try:
            getattr(self, 'parse_' + self.parseState)(line)
        except Exception as exc:
            _log.info('imap {peer}: rejected input: {error}', peer=self.peer, error=exc)
            self.sendBadResponse(None, b'Malformed command')

    def _IMAP4Server__ebDispatch(self, failure, tag) -> None:
        self.sendBadResponse(tag, b'Illegal syntax: ' + mailstore.text(
            str(failure.value).encode(), 200).encode('ascii', 'replace'))

    def _IMAP4Server__ebSpewMessage(self, failure) -> None:
        _log.info('imap {peer}: FETCH response failed: {error}', peer=self.peer,
                  error=failure.getErrorMessage())
        self.transport.loseConnection()

    _server = imap4.IMAP4Server
    auth_SELECT = select_SELECT = (_checked_mailbox_names(_server._selectWork, 1), _server.arg_astring,
                                   1, b'SELECT')
    auth_EXAMINE = select_EXAMINE = (_checked_mailbox_names(_server._selectWork, 1), _server.arg_astring,
                                     0, b'EXAMINE')
    auth_STATUS = select_STATUS = (_checked_mailbox_names(_server.do_STATUS, 1), _server.arg_astring,
                                   _server.arg_plist)
    auth_LIST = select_LIST = (_checked_mailbox_names(_server._listWork, 2), _server.arg_astring,
                               _server.arg_astring, 0, b'LIST')
    auth_LSUB = select_LSUB = (_checked_mailbox_names(_server._listWork, 2), _server.arg_astring,
                               _server.arg_astring, 1, b'LSUB')
    del _server

    def lookupCommand(self, cmd: bytes):
        if cmd.upper() in WRITE_COMMANDS and self.state in ('auth', 'select'):
            return (LabIMAP._refuse_write, imap4.IMAP4Server.arg_line)
        return super().lookupCommand(cmd)

    def _refuse_write(self, tag, line, uid=None) -> None:
        self.sendNegativeResponse(tag, b'[READ-ONLY] the lab mailbox is read-only')

    # FETCH: literals written at once ------------------------------------------------------
    # twisted's FileProducer is a pull producer, which a TLS transport drives with the global
    # cooperator: never on an injected reactor. Messages are in memory and bounded anyway.

    def do_FETCH(self, tag, messages, query, uid=0) -> None:
        self.report_request('fetch', messages=str(messages)[:100], uid=bool(uid),
                    items=' '.join(str(item) for item in query)[:200])
        imap4.IMAP4Server.do_FETCH(self, tag, messages, query, uid)

    select_FETCH = (do_FETCH, imap4.IMAP4Server.arg_seqset, imap4.IMAP4Server.arg_fetchatt)

    def spew_body(self, part, id, msg, _w=None, _f=None):
        _w = _w or self.transport.write
        entity = msg
        try:
            for number in part.part:
                if entity.isMultipart():
                    entity = entity.getSubPart(number)
                elif number > 0:
                    raise IndexError(number)
        except IndexError:
            _w(_section_label(part) + b' NIL')   # no such part (as Dovecot answers)
            return None
        if part.header:
            names = part.header.fields or ()        # None for BODY[HEADER]: every field
            selected = entity.selected_fields(bool(part.header.negate) or not names, names)
            data = b''.join(field + b'\r\n' for field in selected) + b'\r\n'
        elif part.mime:
            data = entity.head + b'\r\n\r\n'
        elif part.text or (part.empty and part.part):
            data = entity.body
        elif part.empty:
            data = entity.raw
        else:
            return self._spew_structure(b'BODY', entity, False, _w)
        if part.partialBegin is not None:
            data = data[part.partialBegin:part.partialBegin + part.partialLength]
        _w(_section_label(part) + b' ' + _literal(data))
        return None

    def spew_rfc822(self, id, msg, _w=None, _f=None):
        (_w or self.transport.write)(b'RFC822 ' + _literal(msg.raw))

    def spew_rfc822text(self, id, msg, _w=None, _f=None):
        (_w or self.transport.write)(b'RFC822.TEXT ' + _literal(msg.body))

    def spew_rfc822header(self, id, msg, _w=None, _f=None):
        (_w or self.transport.write)(b'RFC822.HEADER ' + _literal(msg.head + b'\r\n\r\n'))

    def spew_bodystructure(self, id, msg, _w=None, _f=None):
        return self._spew_structure(b'BODYSTRUCTURE', msg, True, _w or self.transport.write)

    def spew_envelope(self, id, msg, _w=None, _f=None):
        _w = _w or self.transport.write
        try:
            _w(b'ENVELOPE ' + imap4.collapseNestedLists([imap4.getEnvelope(msg)]))
        except Exception:   # headers twisted cannot render: no envelope rather than no answer
            _w(b'ENVELOPE NIL')

    def _spew_structure(self, label: bytes, entity, extended: bool, _w) -> None:
        try:
            _w(label + b' ' + imap4.collapseNestedLists([imap4.getBodyStructure(entity, extended)]))
        except Exception:   # a Content-Type twisted cannot parse (e.g. a parameter without '=')
            _w(label + b' NIL')

    # SEARCH over the fixed view, synchronously ------------------------------------------
    # twisted's own search goes on with the global reactor's callLater after five messages.

    def do_SEARCH(self, tag, charset, query, uid=0) -> None:
        numbered = list(enumerate(self.mbox.messages, 1))
        last_seq, last_uid = (numbered[-1][0], numbered[-1][1].getUID()) if numbered else (0, 0)
        try:
            hits = [b'%d' % (message.getUID() if uid else seq) for seq, message in numbered
                    if self._searchFilter(copy.deepcopy(query), seq, message, last_seq, last_uid)]
        except Exception as exc:   # a search key twisted cannot evaluate
            self.sendBadResponse(tag, b'SEARCH failed: ' + str(exc)[:200].encode('ascii', 'replace'))
            return
        self.sendUntaggedResponse(b'SEARCH' + b''.join(b' ' + hit for hit in hits))
        self.sendPositiveResponse(tag, b'SEARCH completed')

    select_SEARCH = (do_SEARCH, imap4.IMAP4Server.opt_charset, imap4.IMAP4Server.arg_searchkeys)

    # twisted's header search keys compare the (str) header with the (bytes) search string.
    def _header_has(self, msg, name, needle) -> bool:
        name = name.decode('ascii', 'replace') if isinstance(name, bytes) else str(name)
        needle = needle.decode('utf-8', 'replace') if isinstance(needle, bytes) else str(needle)
        value = msg.getHeaders(False, name.lower()).get(name.lower(), '')
        return needle.lower() in value.lower()

    def search_SUBJECT(self, query, id, msg) -> bool:
        return self._header_has(msg, 'subject', query.pop(0))

    def search_FROM(self, query, id, msg) -> bool:
        return self._header_has(msg, 'from', query.pop(0))

    def search_TO(self, query, id, msg) -> bool:
        return self._header_has(msg, 'to', query.pop(0))

    def search_CC(self, query, id, msg) -> bool:
        return self._header_has(msg, 'cc', query.pop(0))

    def search_BCC(self, query, id, msg) -> bool:
        return self._header_has(msg, 'bcc', query.pop(0))

    def search_HEADER(self, query, id, msg) -> bool:
        name = query.pop(0)
        return self._header_has(msg, name, query.pop(0))


class IMAPStubFactory(StubFactory):
    protocol = LabIMAP

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, security: str,
                 store: MailStore) -> None:
        super().__init__(reactor, persona, on_request, security)
        self.store = store
        # FETCH responses are cooperative tasks: on this reactor, not the global one.
        self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '') -> IListeningPort:
    """Serve IMAP on ``listener``; bind errors (CannotListenError) propagate."""
    return mailstore.listen_mailbox(reactor, listener, persona, on_request, interface,
                                    factory_class=IMAPStubFactory, name='imap', upgrade='STARTTLS')


# --- client probe ---------------------------------------------------------------------

_TAGGED = re.compile(rb'^(a\d+) (OK|NO|BAD)\b ?(.*)$', re.I)
_EXISTS = re.compile(rb'^\* (\d+) EXISTS', re.I)
_LITERAL_AT_END = re.compile(rb'\{(\d+)\}$')


def _quoted(value: str) -> str:
    return '"' + value.replace('\\', '\\\\').replace('"', '\\"') + '"'


class _IMAPClient(MailboxClient):
    """LOGIN, SELECT, FETCH n (BODY[]), LOGOUT; each tagged reply judged by its stage."""

    def __init__(self, target: ProbeTarget) -> None:
        super().__init__(target)
        self.mailbox = str(target.options.get('mailbox') or INBOX)
        self.tag = ''
        self.tags = 0
        self.exists = 0
        self.body: bytes | None = None
        self.carried, self.holder = jobstore.carried(target.options)

    def begin(self) -> None:
        self.probe.stage = 'waiting for the * OK greeting'

    def _command(self, stage: str, line: str, shown: str) -> None:
        self.tags += 1
        self.tag = f'a{self.tags}'
        self.stage = stage
        self.probe.stage = f'waiting for the reply to {shown}'
        self.send(f'{self.tag} {line}')

    def line(self, line: bytes) -> None:
        if self.stage == 'greeting':
            self._on_greeting(line)
            return
        tagged = _TAGGED.match(line)
        if tagged and tagged.group(1).decode() == self.tag:
            if tagged.group(2).upper() != b'OK':
                self.probe.decide('protocol_error', f'{self.stage.upper()} answered '
                                                    f'{mailstore.text(tagged.group(2) + b" " + tagged.group(3))!r}')
                return
            getattr(self, f'_on_{self.stage}')()
            return
        exists = _EXISTS.match(line)
        if exists:
            self.exists = int(exists.group(1))
        literal = _LITERAL_AT_END.search(line)
        if literal and self.stage == 'fetch':
            self.literal_wanted = int(literal.group(1))
            if self.literal_wanted == 0:
                self.literal(b'')

    def literal(self, data: bytes) -> None:
        if self.body is None:
            self.body = data

    def _on_greeting(self, line: bytes) -> None:
        if not line.startswith(b'* OK'):
            self.probe.decide('protocol_error', f'greeting {mailstore.text(line)!r}')
            return
        greeting = mailstore.text(line.split(b']', 1)[-1] if b']' in line else line[4:])
        self.greeted((greeting.split() or ['?'])[0], greeting)
        self._command('login', f'LOGIN {_quoted(self.user)} {_quoted(self.password)}', 'LOGIN')

    def _on_login(self) -> None:
        self._command('select', f'SELECT {_quoted(self.mailbox)}', f'SELECT {self.mailbox}')

    def _on_select(self) -> None:
        if self.carried:
            self.number = max(self.exists, 1)
        if self.exists < self.number:
            self.probe.decide('protocol_error', f'{self.mailbox} holds {self.exists} message(s), '
                                                f'no message {self.number} to read')
            return
        self._command('fetch', f'FETCH {self.number} (BODY[])', f'FETCH {self.number}')

    def _on_fetch(self) -> None:
        if self.body is None:
            self.probe.decide('protocol_error', f'FETCH {self.number} completed without the message')
            return
        found, description = (self._carried_attachment() if self.carried else mailstore.check_job(self.body))
        if not found:
            self.probe.decide('protocol_error', f'FETCH {self.number}: {description}')
            return
        self.tags += 1
        self.send(f'a{self.tags} LOGOUT')
        self.probe.exchange += f' → {self.exists} message(s), job attached'
        self.probe.decide('ok', f'answered by {self.server_host}; logged in as {self.user}; '
                                f'{self.mailbox}: {self.exists} message(s); FETCH {self.number}: '
                                f'{description}', peer_seen=self.peer_seen)


    def _carried_attachment(self) -> tuple[bool, str]:
        """Whether the message carries ``NAME.pdf``; kept in the holder's jobstore when it does."""
        wanted = f'{self.carried}.pdf'
        found = [a for a in mailstore.attachments(self.body) if a.name == wanted]
        if not found:
            return False, f'the newest message ({len(self.body)} B) has no attachment {wanted}'
        attachment = found[0]
        jobstore.store_for(self.holder).keep(jobstore.Document(
            self.carried, 'mail', attachment.size, attachment.sha256, via='imap', peer=self.target.host))
        return True, f'{wanted} ({attachment.size} B, sha256 {attachment.sha256[:12]}...)'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Log in to ``target``'s mailbox and read a print-by-mail job; always fires with a ProbeResult."""
    exchange = 'IMAPS' if target.security == 'tls' else 'IMAP'
    return tcp_client_probe(
        reactor, target, exchange, _IMAPClient, tls=target.security == 'tls',
        renamed=lambda client: (f'{exchange} LOGIN + SELECT {client.mailbox} + '
                                f'FETCH {"the newest" if client.carried else client.number}'))


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'SessionMailbox', 'MessagePart', 'LabIMAP']
