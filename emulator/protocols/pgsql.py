"""``pgsql``: PostgreSQL frontend/backend protocol v3 (PostgreSQL docs, "Frontend/Backend Protocol"),
server stub and client probe. Hand-written: no maintained Python library implements the server side.

Wire format
    Startup-phase packets have no type byte: ``int32 length`` (itself included) + ``int32 code`` + body.
    ``code`` 80877103 is SSLRequest (server answers one byte, ``S`` then TLS, or ``N``), 80877104
    GSSENCRequest (always ``N`` here), 80877102 CancelRequest, 196608 (3.0) StartupMessage with
    ``key\\0value\\0 ... \\0`` parameters (``user`` required, ``database`` defaults to the user).
    Every later message is ``type byte`` + ``int32 length`` (itself included) + body.

Server
    After the StartupMessage: AuthenticationMD5Password (salt), the client's PasswordMessage ``p``
    (``"md5" + md5(md5(password + user) + salt)``), then AuthenticationOk, ParameterStatus
    (server_version, client_encoding UTF8, server_encoding, DateStyle, ...), BackendKeyData and
    ReadyForQuery ``I``. ``persona.identity['pgsql_auth'] = 'password'`` asks for a cleartext
    password instead. Lab account (invented): user ``safeq``, password ``safeq-lab-pw``
    (``identity['db_accounts']``, a user -> password mapping, replaces it); every database name exists
    (invented). A wrong password or unknown user gets FATAL 28P01 and a close, as PostgreSQL does.
    Simple Query ``Q`` only: the text is split at ``;`` (invented simplification: no quoting) and each
    statement must be one of the lab queries: ``SELECT <integer>``, ``SELECT version()`` (names the
    persona host), ``SELECT current_user``/``session_user``/``user``, ``SELECT current_database()``,
    ``SELECT inet_client_addr()`` (the client IP the stub saw), ``SHOW server_version``. Each answers
    RowDescription, DataRow, CommandComplete; an empty query gets EmptyQueryResponse; anything else
    gets ErrorResponse (SQLSTATE 0A000 feature_not_supported, or 42601 for text that is not SQL) and
    the statements after it are skipped; ReadyForQuery follows and the session stays usable. The
    extended query protocol (Parse/Bind/...) gets one ErrorResponse 0A000 and is skipped until Sync.
    Terminate ``X`` closes. A startup packet of another protocol version gets FATAL 0A000
    "unsupported frontend protocol" shaped like PostgreSQL 15's (nmap -sV recognises it); a bad
    length (startup outside 8-10000 B, message outside 4 B-1 MiB) or an unknown message type gets
    FATAL 08P01 and a close. Security: ``plain`` answers SSLRequest with ``N``; ``optional``
    answers ``S`` and TLS with the persona's certificate when it has one (``N`` otherwise);
    ``starttls`` (hostssl only) also refuses a StartupMessage sent before TLS (FATAL 28000).
    Records (``on_request``): ``sslrequest``, ``gssencrequest``, ``cancel``, ``login`` (user,
    database, application, result), ``query`` (sql, statements, result), each with ``tls``.

Probe
    Connect; for ``optional``/``starttls`` targets with a CA (``target.ca_file``; option ``tls``
    overrides) send SSLRequest and, on ``S``, TLS verifying the chain and ``target.server_name``;
    StartupMessage; MD5 or cleartext password; then one Query
    ``SELECT 1; SELECT inet_client_addr(); SELECT version()``, ok when the first row is ``1``.
    The second result is the peer the server saw (``peer_seen``). Options: ``user``, ``password``,
    ``database``, ``tls`` (bool).
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from . import labsql, tls
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .labsql import LAB_PASSWORD, LAB_USER, LabQueries, QueryError, Session
from .probing import OnRequest, StreamClient, tcp_client_probe
from .serving import StubConnection, StubFactory

PROTOCOL_IDS = ('pgsql',)

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
MAX_STARTUP = 10000            # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
MAX_MESSAGE = 1 << 20          # largest typed message either side accepts
SERVER_VERSION = '15.6'        # invented default: a version SafeQ 6 supports (identity 'pgsql_version')

# type OIDs (pg_type.dat)
INT4_OID, TEXT_OID, NAME_OID, INET_OID = 23, 25, 19, 869

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5 = 0, 3, 5


class PgWireError(ValueError):
    """Bytes that break the framing or the state machine of the protocol."""


# --- codec (shared by server and client) ---------------------------------------------------------

def message(kind: bytes, body: bytes = b'') -> bytes:
    return kind + struct.pack('!I', len(body) + 4) + body


def cstring(text: str) -> bytes:
    return text.replace('\0', '').encode('utf-8') + b'\0'


def ssl_request() -> bytes:
    return struct.pack('!II', 8, SSL_REQUEST_CODE)


def startup_message(parameters: dict[str, str]) -> bytes:
    body = struct.pack('!I', PROTOCOL_3_0) + b''.join(cstring(k) + cstring(v) for k, v in parameters.items())
    body += b'\0'
    return struct.pack('!I', len(body) + 4) + body


def split_startup(buffer: bytes) -> tuple[int, bytes, int] | None:
    """(code, body after the code, bytes used) of the first startup-phase packet; None while incomplete."""
    if len(buffer) < 4:
        return None
    (length,) = struct.unpack_from('!I', buffer)
    if not 8 <= length <= MAX_STARTUP:
        raise PgWireError(f'invalid length of startup packet ({length} B)')
    if len(buffer) < length:
        return None
    (code,) = struct.unpack_from('!I', buffer, 4)
    return code, buffer[8:length], length


def split_message(buffer: bytes, limit: int = MAX_MESSAGE) -> tuple[bytes, bytes, int] | None:
    """(type, body, bytes used) of the first typed message; None while incomplete."""
    if len(buffer) < 5:
        return None
    kind = buffer[:1]
    (length,) = struct.unpack_from('!I', buffer, 1)
    if not 4 <= length <= limit:
        raise PgWireError(f'invalid message length {length} for message type {kind!r}')
    if len(buffer) < 1 + length:
        return None
    return kind, buffer[5:1 + length], 1 + length


def parse_parameters(body: bytes) -> dict[str, str]:
    """StartupMessage parameters: ``key\\0value\\0`` pairs ending with an empty key."""
    parts = body.split(b'\0')
    if len(parts) < 2 or parts[-1] != b'' or parts[-2] != b'':
        raise PgWireError('startup packet parameters are not NUL-terminated')
    items = parts[:-2]
    if len(items) % 2:
        raise PgWireError('startup packet has a parameter without a value')
    text = [item.decode('utf-8', 'replace') for item in items]
    return dict(zip(text[::2], text[1::2]))


def error_fields(severity: str, code: str, text: str, **extra: str) -> bytes:
    """ErrorResponse/NoticeResponse body: S, V, C, M and any further (F, L, R) fields."""
    fields = [('S', severity), ('V', severity), ('C', code), ('M', text)] + list(extra.items())
    return b''.join(key.encode('ascii') + cstring(value) for key, value in fields) + b'\0'


def error_response(severity: str, code: str, text: str, **extra: str) -> bytes:
    return message(b'E', error_fields(severity, code, text, **extra))


def parse_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b'\0'):
        if part:
            fields[chr(part[0])] = part[1:].decode('utf-8', 'replace')
    return fields


def md5_password(user: str, password: str, salt: bytes) -> str:
    inner = hashlib.md5((password + user).encode('utf-8')).hexdigest()
    return 'md5' + hashlib.md5(inner.encode('ascii') + salt).hexdigest()


def row_description(name: str, type_oid: int) -> bytes:
    size = 4 if type_oid == INT4_OID else 64 if type_oid == NAME_OID else -1
    body = struct.pack('!H', 1) + cstring(name) + struct.pack('!IhIhih', 0, 0, type_oid, size, -1, 0)
    return message(b'T', body)


def data_row(values: list[str | None]) -> bytes:
    body = struct.pack('!H', len(values))
    for value in values:
        if value is None:
            body += struct.pack('!i', -1)
        else:
            raw = value.encode('utf-8')
            body += struct.pack('!i', len(raw)) + raw
    return message(b'D', body)


def parse_data_row(body: bytes) -> list[str | None]:
    (count,) = struct.unpack_from('!H', body)
    offset, values = 2, []
    for _ in range(count):
        (size,) = struct.unpack_from('!i', body, offset)
        offset += 4
        if size < 0:
            values.append(None)
            continue
        if offset + size > len(body):
            raise PgWireError('DataRow column runs past the message')
        values.append(body[offset:offset + size].decode('utf-8', 'replace'))
        offset += size
    return values


# --- lab queries ---------------------------------------------------------------------------------

def version_text(session: Session) -> str:
    return (f'PostgreSQL {session.version} on x86_64-pc-linux-gnu, compiled by gcc (Debian 12.2.0-14) '
            f'12.2.0, 64-bit (safeq-lab {session.host})')


# statement -> (column name, type OID, value)
_LAB_QUERIES = LabQueries(
    {'select version()': ('version', TEXT_OID, version_text),
     'select current_user': ('current_user', NAME_OID, lambda s: s.user),
     'select session_user': ('session_user', NAME_OID, lambda s: s.user),
     'select user': ('user', NAME_OID, lambda s: s.user),
     'select current_database()': ('current_database', NAME_OID, lambda s: s.database),
     'select inet_client_addr()': ('inet_client_addr', INET_OID, lambda s: s.peer),
     'show server_version': ('server_version', TEXT_OID, lambda s: s.version)},
    integer=lambda number: ('?column?', INT4_OID, lambda s: str(number)),
    syntax_error=('42601', 'syntax error at or near "{near}"'),
    unsupported=('0A000', 'safeq-lab stub answers only its lab queries (SELECT 1, SELECT version(), '
                          'SELECT current_user, SELECT current_database(), SELECT inet_client_addr())'))


def answer_statement(statement: str, session: Session) -> tuple[str, int, str]:
    """(column name, type OID, value) of one lab statement; QueryError for anything else."""
    name, type_oid, value = _LAB_QUERIES.find(statement)
    return name, type_oid, value(session)


def answer_query(sql: str, session: Session) -> tuple[bytes, str]:
    """The reply to a simple Query (up to, not including, ReadyForQuery) and a one-word result."""
    statements = labsql.split_statements(sql)
    if not statements:
        return message(b'I'), 'empty'
    reply = b''
    for statement in statements:
        try:
            name, type_oid, value = answer_statement(statement, session)
        except QueryError as exc:
            return reply + error_response('ERROR', exc.code, exc.text), exc.code
        reply += row_description(name, type_oid) + data_row([value]) + message(b'C', cstring('SELECT 1'))
    return reply, 'ok'


# --- server stub ---------------------------------------------------------------------------------

_EXTENDED_QUERY = frozenset(b'PBDECHFd')  # Parse, Bind, Describe, Execute, Close, Flush, FunctionCall, CopyData


class _PgServer(StubConnection, Protocol):
    def __init__(self, factory: _PgFactory) -> None:
        self.factory = factory
        self.buffer = b''
        self.state = 'startup'          # startup -> password -> ready (and ``closing``)
        self.tls = False
        self.user = self.database = self.application = ''
        self.salt = b''
        self.skipping_to_sync = False

    # framing ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self.buffered(data):
            return
        try:
            while not self.closing and self.buffer:
                if not self._next():
                    return
        except PgWireError as exc:
            self._fatal('08P01', str(exc))

    def _next(self) -> bool:
        """Handle the first complete packet in the buffer; False while it is incomplete."""
        if self.state == 'startup':
            packet = split_startup(self.buffer)
            if packet is None:
                return False
            code, body, used = packet
            self.buffer = self.buffer[used:]
            self._startup(code, body)
            return True
        packet = split_message(self.buffer)
        if packet is None:
            return False
        kind, body, used = packet
        self.buffer = self.buffer[used:]
        if self.state == 'password':
            self._password(kind, body)
        else:
            self._ready(kind, body)
        return True

    # startup phase ------------------------------------------------------------

    def _startup(self, code: int, body: bytes) -> None:
        if code == SSL_REQUEST_CODE:
            return self._ssl_request()
        if code == GSSENC_REQUEST_CODE:
            self.report_request('gssencrequest', answer='N')
            self.transport.write(b'N')
            return None
        if code == CANCEL_REQUEST_CODE:
            self.report_request('cancel')
            return self.hang_up()
        if code >> 16 != 3:
            # Shaped like PostgreSQL 15's answer, which nmap's service probes recognise.
            return self._fatal('0A000', f'unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: '
                                        f'server supports 3.0 to 3.0',
                               F='postmaster.c', L='2194', R='ProcessStartupPacket')
        parameters = parse_parameters(body)
        self.user = parameters.get('user', '')
        self.database = parameters.get('database') or self.user
        self.application = parameters.get('application_name', '')
        if not self.user:
            return self._fatal('28000', 'no PostgreSQL user name specified in startup packet')
        if self.factory.require_tls and not self.tls:
            self.report_request('login', user=self.user, database=self.database, result='no-encryption')
            return self._fatal('28000', f'no pg_hba.conf entry for host "{self.peer}", user "{self.user}", '
                                        f'database "{self.database}", no encryption')
        self.state = 'password'
        if self.factory.auth == 'password':
            self.transport.write(message(b'R', struct.pack('!I', AUTH_CLEARTEXT)))
        else:
            self.salt = secrets.token_bytes(4)
            self.transport.write(message(b'R', struct.pack('!I', AUTH_MD5) + self.salt))
        return None

    def _ssl_request(self) -> None:
        if self.tls or self.factory.tls_options is None:
            self.report_request('sslrequest', answer='N')
            self.transport.write(b'N')
            return
        if self.buffer:
            # PostgreSQL refuses plaintext pipelined behind SSLRequest (CVE-2021-23214).
            self._fatal('08P01', 'received unencrypted data after SSL request')
            return
        self.report_request('sslrequest', answer='S')
        self.transport.write(b'S')
        self.tls = True
        self.transport.startTLS(self.factory.tls_options)

    def _password(self, kind: bytes, body: bytes) -> None:
        if kind != b'p':
            raise PgWireError(f'expected password response, got message type {kind!r}')
        given = body.rstrip(b'\0').decode('utf-8', 'replace')
        expected = self.factory.accounts.get(self.user)
        if expected is not None and self.factory.auth != 'password':
            expected = md5_password(self.user, expected, self.salt)
        if expected is None or not secrets.compare_digest(given.encode(), expected.encode()):
            self.report_request('login', user=self.user, database=self.database, application=self.application,
                         result='failed')
            return self._fatal('28P01', f'password authentication failed for user "{self.user}"')
        self.report_request('login', user=self.user, database=self.database, application=self.application,
                     result='ok')
        self.state = 'ready'
        self.transport.write(message(b'R', struct.pack('!I', AUTH_OK)) + self._parameter_status()
                             + message(b'K', struct.pack('!II', secrets.randbelow(1 << 22) + 1,
                                                         secrets.randbits(32)))
                             + message(b'Z', b'I'))
        return None

    def _parameter_status(self) -> bytes:
        parameters = {
            'application_name': self.application, 'client_encoding': 'UTF8', 'DateStyle': 'ISO, MDY',
            'default_transaction_read_only': 'off', 'in_hot_standby': 'off', 'integer_datetimes': 'on',
            'IntervalStyle': 'postgres', 'is_superuser': 'off', 'server_encoding': 'UTF8',
            'server_version': self.factory.version, 'session_authorization': self.user,
            'standard_conforming_strings': 'on', 'TimeZone': 'Etc/UTC'}
        return b''.join(message(b'S', cstring(k) + cstring(v)) for k, v in parameters.items())

    # ready for queries ----------------------------------------------------------

    def _ready(self, kind: bytes, body: bytes) -> None:
        if kind == b'X':
            return self.hang_up()
        if kind == b'Q':
            return self._query(body.rstrip(b'\0').decode('utf-8', 'replace'))
        if kind == b'S':
            self.skipping_to_sync = False
            self.transport.write(message(b'Z', b'I'))
            return None
        if kind[0] in _EXTENDED_QUERY:
            if not self.skipping_to_sync:
                self.skipping_to_sync = True
                self.report_request('query', sql='', statements=0, result='0A000 extended protocol')
                self.transport.write(error_response(
                    'ERROR', '0A000', 'safeq-lab stub speaks only the simple query protocol'))
            return None
        raise PgWireError(f'invalid frontend message type {kind[0]}')

    def _query(self, sql: str) -> None:
        session = Session(self.user, self.database, self.peer, self.factory.persona.host, self.factory.version)
        reply, result = answer_query(sql, session)
        self.report_request('query', sql=sql[:200], statements=len(labsql.split_statements(sql)),
                     result=result)
        self.transport.write(reply + message(b'Z', b'I'))

    # ending -----------------------------------------------------------------

    def _fatal(self, code: str, text: str, **extra: str) -> None:
        self.transport.write(error_response('FATAL', code, text, **extra))
        self.hang_up()

    def hang_up(self) -> None:
        self.buffer = b''
        super().hang_up()

    def request_fields(self) -> dict[str, Any]:
        return {'tls': self.tls}


class _PgFactory(StubFactory):
    protocol = _PgServer

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, security: str) -> None:
        super().__init__(reactor, persona, on_request, security)
        identity = persona.identity
        offers_tls = labsql.offers_encryption(persona, security)
        self.tls_options = tls.server_options(persona) if offers_tls else None  # TLSMaterialMissing
        self.require_tls = security == 'starttls'
        self.auth = 'password' if identity.get('pgsql_auth') == 'password' else 'md5'
        self.accounts = labsql.accounts(identity)
        self.version = str(identity.get('pgsql_version') or SERVER_VERSION)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve PostgreSQL on ``listener`` (TLS only in band, through SSLRequest)."""
    return labsql.listen(reactor, listener, persona, on_request, interface,
                         factory_class=_PgFactory, name='pgsql', upgrade='SSLRequest')


# --- client probe --------------------------------------------------------------------------------

PROBE_QUERY = 'SELECT 1; SELECT inet_client_addr(); SELECT version()'


class _PgClient(StreamClient):
    def __init__(self, target: ProbeTarget, use_tls: bool) -> None:
        self.target = target
        self.use_tls = use_tls
        self.user, self.password, self.database = labsql.login(target.options)
        self.buffer = b''
        self.phase = 'ssl' if use_tls else 'startup'
        self.parameters: dict[str, str] = {}
        self.results: list[list[list[str | None]]] = []

    def begin(self) -> None:
        if self.use_tls:
            self.probe.stage = 'waiting for the answer to SSLRequest'
            self.transport.write(ssl_request())
        else:
            self._startup()

    def _startup(self) -> None:
        self.phase = 'startup'
        self.probe.stage = 'waiting for the authentication request'
        self.transport.write(startup_message({'user': self.user, 'database': self.database,
                                              'application_name': 'safeq-lab-probe',
                                              'client_encoding': 'UTF8'}))

    def dataReceived(self, data: bytes) -> None:
        if self.probe.result is not None:
            return
        self.buffer += data
        if self.phase == 'ssl':
            self._ssl_answer()
        try:
            while self.probe.result is None and self.phase != 'ssl':
                packet = split_message(self.buffer)
                if packet is None:
                    return
                kind, body, used = packet
                self.buffer = self.buffer[used:]
                self._message(kind, body)
        except (PgWireError, struct.error, UnicodeError) as exc:
            self.probe.decide('protocol_error', f'bad PostgreSQL reply: {exc}')

    def _ssl_answer(self) -> None:
        answer, self.buffer = self.buffer[:1], self.buffer[1:]
        if answer == b'S' and not self.buffer:
            self.probe.exchange += ' SSLRequest→S'
            if self.probe.start_tls():
                self._startup()
        elif answer == b'N' and self.target.security != 'starttls':
            self.probe.exchange += ' SSLRequest→N (plaintext)'
            self._startup()
        elif answer == b'N':
            self.probe.decide('protocol_error', 'server declined SSLRequest (N) on a TLS-only port')
        else:
            self.probe.decide('protocol_error', f'not a PostgreSQL answer to SSLRequest: {answer!r}')

    def _message(self, kind: bytes, body: bytes) -> None:
        if kind == b'E':
            fields = parse_fields(body)
            self.probe.decide('protocol_error', f'server error {fields.get("C", "?")} while '
                                                f'{self.probe.stage}: {fields.get("M", "")}')
        elif kind == b'R':
            self._authentication(body)
        elif kind == b'S':
            key, _, value = body.partition(b'\0')
            self.parameters[key.decode('utf-8', 'replace')] = value.rstrip(b'\0').decode('utf-8', 'replace')
        elif kind == b'T':
            self.results.append([])
        elif kind == b'D':
            if not self.results:
                raise PgWireError('DataRow before RowDescription')
            self.results[-1].append(parse_data_row(body))
        elif kind == b'Z':
            self._ready()
        # K (BackendKeyData), C (CommandComplete), N (notice), I: nothing to check

    def _authentication(self, body: bytes) -> None:
        (code,) = struct.unpack_from('!I', body)
        if code == AUTH_OK:
            self.probe.exchange += ' + login'
            self.probe.stage = 'waiting for ReadyForQuery'
            return
        if code == AUTH_MD5 and len(body) == 8:
            answer = md5_password(self.user, self.password, body[4:8])
        elif code == AUTH_CLEARTEXT:
            answer = self.password
        else:
            self.probe.decide('protocol_error', f'unsupported authentication request {code} '
                                                f'(the probe speaks cleartext and MD5)')
            return
        self.probe.stage = 'waiting for the authentication result'
        self.transport.write(message(b'p', cstring(answer)))

    def _ready(self) -> None:
        if self.phase == 'startup':
            self.phase = 'query'
            self.probe.stage = 'waiting for the query result'
            self.transport.write(message(b'Q', cstring(PROBE_QUERY)))
            return
        first = self.results[0][0][0] if self.results and self.results[0] else None
        if first != '1':
            self.probe.decide('protocol_error', f'SELECT 1 returned {first!r}, not 1')
            return
        peer = self._value(1)
        version = self._value(2) or f'server_version {self.parameters.get("server_version", "?")}'
        self.transport.write(message(b'X'))
        self.probe.exchange += ' + SELECT 1 → 1'
        self.probe.decide('ok', f'{self.user}@{self.database}: {version}', peer_seen=peer or None)

    def _value(self, index: int) -> str | None:
        if len(self.results) > index and self.results[index] and self.results[index][0]:
            return self.results[index][0][0]
        return None


def _wants_tls(target: ProbeTarget) -> bool:
    choice = target.options.get('tls')
    if isinstance(choice, bool):
        return choice
    return labsql.wants_encryption(target)


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Log in and run ``SELECT 1`` (plus the peer and version) on ``target``'s PostgreSQL."""
    return tcp_client_probe(reactor, target, 'PostgreSQL', lambda target: _PgClient(target, _wants_tls(target)))


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'answer_query', 'md5_password', 'startup_message',
           'ssl_request', 'message', 'split_message', 'Session', 'LAB_USER', 'LAB_PASSWORD']
