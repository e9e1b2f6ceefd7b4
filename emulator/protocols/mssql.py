"""``mssql``: Microsoft SQL Server's Tabular Data Stream, TDS 7.0-7.4 ([MS-TDS]), server stub and client
probe. Hand-written: no maintained Python library implements the TDS server side.

Packets
    Every message travels in packets: an 8-byte header (type, status (0x01 = end of message),
    big-endian length including the header, SPID, packet id, window) and up to packet size - 8
    bytes of payload. Types used: 0x12 PRELOGIN, 0x10 LOGIN7, 0x01 SQL batch, 0x06 attention,
    0x03 RPC, 0x0E transaction manager; the server answers with 0x04 tabular result.

PRELOGIN and TLS
    The client's PRELOGIN lists options (token, big-endian offset and length, 0xFF end); the
    stub answers VERSION (``identity['mssql_version']``, default 15.0.2000.5 = SQL Server 2019),
    ENCRYPTION, INSTOPT (0: any instance name is accepted, invented) and an empty THREADID, the
    layout nmap's ms-sql-s fingerprints expect. ENCRYPTION follows [MS-TDS] 2.2.6.5: without a
    certificate (``plain``, or ``optional`` on a persona without one) ENCRYPT_NOT_SUP; with one
    (``optional``) the client's ENCRYPT_OFF is answered OFF (only LOGIN7 is encrypted, then both
    sides drop TLS), ENCRYPT_ON/REQ is answered ON (everything encrypted), NOT_SUP stays NOT_SUP;
    ``starttls`` (forced encryption) answers ENCRYPT_REQ and hangs up on a client that cannot encrypt.
    When encryption is agreed, the TLS handshake records travel as payload of PRELOGIN packets
    (0x12) both ways, as real clients and servers do; afterwards the TDS packets travel inside TLS
    records on the bare connection. TLS is capped at 1.2 without session tickets (TDS 7.x peers
    expect no TLS 1.3 post-handshake messages); the certificate is the persona's.

Login and queries
    LOGIN7 (user name, password obfuscated by nibble swap and XOR 0xA5, database, app name) against
    the lab account (invented): user ``safeq``, password ``safeq-lab-pw`` (``identity['db_accounts']``,
    a user -> password mapping, replaces it); any database name exists (invented). Success gets
    ENVCHANGE (database, packet size) + LOGINACK (interface T-SQL, the client's TDS version up to
    7.4, "Microsoft SQL Server") + DONE; failure gets ERROR 18456 ("Login failed for user ...")
    + DONE and a close. Integrated (SSPI) logins are refused the same way. SQL batches (the
    ALL_HEADERS of TDS 7.2+ skipped) are split at ``;`` (invented: no quoting) and each statement
    must be a lab query: ``SELECT <integer>`` (INT column), ``SELECT @@VERSION`` (names the persona
    host), ``SELECT @@SERVERNAME``, ``SELECT SUSER_NAME()``/``CURRENT_USER``/``SYSTEM_USER``,
    ``SELECT DB_NAME()``, ``SELECT @@SPID``, ``SELECT CONNECTIONPROPERTY('client_net_address')`` (the
    client IP the stub saw; invented: NVARCHAR, not sql_variant). Each answers COLMETADATA + ROW +
    DONE (DONE_MORE between statements); anything else gets ERROR (class 16) + DONE with DONE_ERROR
    and the session stays usable. Attention gets DONE_ATTN; RPC and transaction-manager requests get
    an ERROR. A first message that is not PRELOGIN or LOGIN7, a bad packet length, a message over
    ``MAX_MESSAGE`` or a malformed LOGIN7 closes the connection (as SQL Server does). Records: ``prelogin``
    (client and answered encryption), ``login``, ``batch``, ``attention``, ``rpc``, each with ``tls``.

Probe
    PRELOGIN asking ENCRYPT_ON when the target is ``optional``/``starttls`` and has a CA (option
    ``encrypt``: 'on' | 'off' | 'none' overrides), checks the answered flag against the table above,
    runs the TLS handshake inside PRELOGIN packets verifying ``target.ca_file`` and
    ``target.server_name``, LOGIN7, then the batch ``SELECT 1; SELECT
    CONNECTIONPROPERTY('client_net_address'); SELECT @@VERSION``: ok when the first row is 1.
    Options: ``user``, ``password``, ``database``, ``encrypt``.
"""

from __future__ import annotations

import os
import re
import secrets
import ssl
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from . import labsql, tls
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .labsql import LAB_PASSWORD, LAB_USER, LabQueries, QueryError, Session
from .probing import OnRequest, StreamClient, StreamProbe, tcp_client_probe
from .serving import StubConnection, StubFactory

PROTOCOL_IDS = ('mssql',)

# packet types
SQL_BATCH, RPC, TABULAR_RESULT, ATTENTION, TRANSACTION_MANAGER, LOGIN7, PRELOGIN = (
    0x01, 0x03, 0x04, 0x06, 0x0E, 0x10, 0x12)
CLIENT_TYPES = frozenset({SQL_BATCH, RPC, ATTENTION, 0x07, TRANSACTION_MANAGER, LOGIN7, PRELOGIN})
STATUS_EOM = 0x01
HEADER = struct.Struct('!BBHHBB')
MIN_PACKET, MAX_PACKET, DEFAULT_PACKET = 512, 32767, 4096
MAX_MESSAGE = 1 << 20

# PRELOGIN option tokens and ENCRYPTION values
PL_VERSION, PL_ENCRYPTION, PL_INSTOPT, PL_THREADID, PL_TERMINATOR = 0, 1, 2, 3, 0xFF
ENCRYPT_OFF, ENCRYPT_ON, ENCRYPT_NOT_SUP, ENCRYPT_REQ = 0, 1, 2, 3
ENCRYPTION_NAMES = {ENCRYPT_OFF: 'OFF', ENCRYPT_ON: 'ON', ENCRYPT_NOT_SUP: 'NOT_SUP', ENCRYPT_REQ: 'REQ'}

# TDS versions as LOGIN7 and LOGINACK carry them
TDS_VERSIONS = {0x70000000: '7.0', 0x71000000: '7.1', 0x71000001: '7.1', 0x72090002: '7.2',
                0x730A0003: '7.3A', 0x730B0003: '7.3B', 0x74000004: '7.4'}
TDS_7_2, TDS_7_4 = 0x72090002, 0x74000004

# tokens
TOKEN_COLMETADATA, TOKEN_ERROR, TOKEN_INFO, TOKEN_LOGINACK = 0x81, 0xAA, 0xAB, 0xAD
TOKEN_ROW, TOKEN_ENVCHANGE, TOKEN_DONE, TOKEN_DONEPROC, TOKEN_DONEINPROC = 0xD1, 0xE3, 0xFD, 0xFE, 0xFF
TOKEN_ORDER, TOKEN_RETURNSTATUS = 0xA9, 0x79
DONE_MORE, DONE_ERROR, DONE_COUNT, DONE_ATTN = 0x01, 0x02, 0x10, 0x20
INTN, NVARCHAR = 0x26, 0xE7
COLLATION = bytes.fromhex('0904d00034')   # SQL_Latin1_General_CP1_CI_AS
SELECT_COMMAND = 0xC1

SERVER_VERSION = '15.0.2000.5'   # SQL Server 2019 RTM (invented default for the lab)


class TdsWireError(ValueError):
    """Bytes that are not the TDS the current state expects."""


# --- packets ---------------------------------------------------------------------------------

def packets(kind: int, payload: bytes, packet_size: int = DEFAULT_PACKET) -> bytes:
    """``payload`` as one message: packets of at most ``packet_size`` bytes, EOM on the last."""
    room = packet_size - HEADER.size
    chunks = [payload[i:i + room] for i in range(0, len(payload), room)] or [b'']
    out = b''
    for index, chunk in enumerate(chunks):
        status = STATUS_EOM if index == len(chunks) - 1 else 0
        out += HEADER.pack(kind, status, HEADER.size + len(chunk), 0, (index + 1) % 256, 0) + chunk
    return out


class MessageReader:
    """Reassembles packets into (type, payload) messages, bounding every length."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.buffer = b''
        self.kind: int | None = None
        self.payload = b''
        self.limit = limit

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        messages = []
        while len(self.buffer) >= HEADER.size:
            kind, status, length, _spid, _id, _window = HEADER.unpack_from(self.buffer)
            if not HEADER.size <= length <= MAX_PACKET + 1:
                raise TdsWireError(f'TDS packet length {length} out of range')
            if self.kind is not None and kind != self.kind:
                raise TdsWireError(f'packet type 0x{kind:02x} inside a 0x{self.kind:02x} message')
            if len(self.buffer) < length:
                break
            self.kind = kind
            self.payload += self.buffer[HEADER.size:length]
            self.buffer = self.buffer[length:]
            if len(self.payload) > self.limit:
                raise TdsWireError(f'TDS message over {self.limit} B')
            if status & STATUS_EOM:
                messages.append((kind, self.payload))
                self.kind, self.payload = None, b''
        return messages

    def peek_type(self) -> int | None:
        return self.buffer[0] if self.buffer else self.kind


# --- PRELOGIN ----------------------------------------------------------------------------------

def encode_prelogin(options: list[tuple[int, bytes]]) -> bytes:
    table_size = 5 * len(options) + 1
    table, data = b'', b''
    for token, value in options:
        table += struct.pack('!BHH', token, table_size + len(data), len(value))
        data += value
    return table + bytes([PL_TERMINATOR]) + data


def decode_prelogin(payload: bytes) -> dict[int, bytes]:
    options, offset = {}, 0
    while True:
        if offset >= len(payload):
            raise TdsWireError('PRELOGIN option table without terminator')
        token = payload[offset]
        if token == PL_TERMINATOR:
            return options
        if offset + 5 > len(payload):
            raise TdsWireError('PRELOGIN option table truncated')
        _token, start, length = struct.unpack_from('!BHH', payload, offset)
        if start + length > len(payload):
            raise TdsWireError(f'PRELOGIN option 0x{token:02x} runs past the message')
        options[token] = payload[start:start + length]
        offset += 5


def version_bytes(version: str) -> bytes:
    """VERSION option value: major, minor, build (big-endian), sub-build."""
    parts = [int(p) for p in re.findall(r'\d+', version)[:4]] + [0, 0, 0, 0]
    major, minor, build, sub = parts[:4]
    return struct.pack('!BBHH', major & 0xFF, minor & 0xFF, build & 0xFFFF, sub & 0xFFFF)


def negotiate(has_certificate: bool, forced: bool, client_flag: int) -> tuple[int, str]:
    """([MS-TDS] 2.2.6.5) the ENCRYPTION answer and what gets encrypted: 'none', 'login' or 'all'."""
    client = client_flag & 0x0F   # 0x80 (ENCRYPT_CLIENT_CERT) is not supported: ignored
    if not has_certificate:
        return ENCRYPT_NOT_SUP, 'none'
    if forced:
        return ENCRYPT_REQ, 'none' if client == ENCRYPT_NOT_SUP else 'all'
    if client == ENCRYPT_NOT_SUP:
        return ENCRYPT_NOT_SUP, 'none'
    if client == ENCRYPT_OFF:
        return ENCRYPT_OFF, 'login'
    return ENCRYPT_ON, 'all'


def client_mode(sent: int, answer: int, required: bool = False) -> str | None:
    """What the client must encrypt after sending ``sent`` and reading ``answer``; None when the
    client must hang up ([MS-TDS] 2.2.6.5; ``required``: the client insists on encryption)."""
    if answer == ENCRYPT_NOT_SUP:
        return None if required else 'none'
    if sent == ENCRYPT_NOT_SUP:
        return None                      # the server wants TLS from a client that has none
    if answer in (ENCRYPT_ON, ENCRYPT_REQ):
        return 'all'
    if answer == ENCRYPT_OFF and sent == ENCRYPT_OFF and not required:
        return 'login'
    return None


# --- LOGIN7 ------------------------------------------------------------------------------------

_LOGIN_FIELDS = ('host', 'user', 'password', 'app', 'server', 'extension', 'library', 'language', 'database')
_LOGIN_FIXED = 94


def _obfuscate(password: str) -> bytes:
    return bytes((((b << 4) & 0xF0) | (b >> 4)) ^ 0xA5 for b in password.encode('utf-16-le'))


def _deobfuscate(data: bytes) -> str:
    return bytes((((b ^ 0xA5) << 4) & 0xF0) | ((b ^ 0xA5) >> 4) for b in data).decode('utf-16-le', 'replace')


def encode_login7(user: str, password: str, database: str, app: str, server: str, host: str = 'safeq-lab',
                  tds_version: int = TDS_7_4, packet_size: int = DEFAULT_PACKET) -> bytes:
    values = {'host': host, 'user': user, 'app': app, 'server': server, 'extension': '',
              'library': 'safeq-lab', 'language': '', 'database': database}
    table, data = b'', b''
    for name in _LOGIN_FIELDS:
        raw = _obfuscate(password) if name == 'password' else values[name].encode('utf-16-le')
        table += struct.pack('<HH', _LOGIN_FIXED + len(data), 0 if name == 'extension' else len(raw) // 2)
        data += raw
    end = _LOGIN_FIXED + len(data)
    table += b'\0' * 6 + struct.pack('<HHHHHHI', end, 0, end, 0, end, 0, 0)   # ClientID, SSPI, AtchDBFile, ChangePassword
    header = struct.pack('<IIIIII', _LOGIN_FIXED + len(data), tds_version, packet_size, 0x07000000,
                         os.getpid() & 0xFFFFFFFF, 0)
    header += bytes([0xE0, 0x03, 0x00, 0x00]) + struct.pack('<iI', 0, 0x0409)
    return header + table + data


@dataclass(frozen=True)
class Login:
    tds_version: int
    packet_size: int
    integrated: bool
    host: str
    user: str
    password: str
    app: str
    server: str
    database: str


def decode_login7(payload: bytes) -> Login:
    if len(payload) < _LOGIN_FIXED:
        raise TdsWireError(f'LOGIN7 of {len(payload)} B is shorter than its fixed part')
    _length, tds_version, packet_size = struct.unpack_from('<III', payload)
    option_flags2 = payload[25]
    values = {}
    for index, name in enumerate(_LOGIN_FIELDS):
        start, chars = struct.unpack_from('<HH', payload, 36 + 4 * index)
        if name == 'extension':
            continue
        raw = payload[start:start + 2 * chars]
        if start + 2 * chars > len(payload):
            raise TdsWireError(f'LOGIN7 {name} runs past the message')
        values[name] = _deobfuscate(raw) if name == 'password' else raw.decode('utf-16-le', 'replace')
    return Login(tds_version=tds_version, packet_size=packet_size, integrated=bool(option_flags2 & 0x80),
                 host=values['host'], user=values['user'], password=values['password'], app=values['app'],
                 server=values['server'], database=values['database'])


# --- tokens ------------------------------------------------------------------------------------

def b_varchar(text: str) -> bytes:
    raw = text[:255].encode('utf-16-le')
    return bytes([len(raw) // 2]) + raw


def us_varchar(text: str) -> bytes:
    raw = text[:4000].encode('utf-16-le')
    return struct.pack('<H', len(raw) // 2) + raw


def env_change(kind: int, new: str, old: str) -> bytes:
    body = bytes([kind]) + b_varchar(new) + b_varchar(old)
    return struct.pack('<BH', TOKEN_ENVCHANGE, len(body)) + body


def login_ack(tds_version: int, server_version: str) -> bytes:
    major, minor, build, _sub = struct.unpack('!BBHH', version_bytes(server_version))
    body = bytes([1]) + struct.pack('!I', tds_version) + b_varchar('Microsoft SQL Server') + \
        struct.pack('!BBH', major, minor, build)
    return struct.pack('<BH', TOKEN_LOGINACK, len(body)) + body


def done(status: int, rows: int = 0, command: int = 0, wide: bool = True) -> bytes:
    count = struct.pack('<Q', rows) if wide else struct.pack('<I', rows)
    return struct.pack('<BHH', TOKEN_DONE, status, command) + count


def message_token(token: int, number: int, severity: int, text: str, server: str, wide: bool = True) -> bytes:
    """ERROR (0xAA) or INFO (0xAB)."""
    body = struct.pack('<iBB', number, 1, severity) + us_varchar(text) + b_varchar(server) + b_varchar('')
    body += struct.pack('<i', 1) if wide else struct.pack('<H', 1)
    return struct.pack('<BH', token, len(body)) + body


def single_value(name: str, value: int | str, wide: bool = True) -> bytes:
    """COLMETADATA + ROW of one column: INT for an int, NVARCHAR(4000) for text."""
    user_type = struct.pack('<I', 0) if wide else struct.pack('<H', 0)
    if isinstance(value, int):
        type_info, cell = bytes([INTN, 4]), bytes([4]) + struct.pack('<i', value)
    else:
        raw = value.encode('utf-16-le')[:8000]
        type_info, cell = bytes([NVARCHAR]) + struct.pack('<H', 8000) + COLLATION, struct.pack('<H', len(raw)) + raw
    column = user_type + struct.pack('<H', 0x0001) + type_info + b_varchar(name)
    return struct.pack('<BH', TOKEN_COLMETADATA, 1) + column + bytes([TOKEN_ROW]) + cell


class TokenReader:
    """Client side: the tokens of one tabular-result message, as (kind, value) pairs."""

    def __init__(self, payload: bytes, wide: bool = True) -> None:
        self.data = payload
        self.offset = 0
        self.wide = wide
        self.columns: list[int] = []

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise TdsWireError('token stream truncated')
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def b_varchar(self) -> str:
        return self.take(self.take(1)[0] * 2).decode('utf-16-le', 'replace')

    def tokens(self):
        while self.offset < len(self.data):
            token = self.take(1)[0]
            if token in (TOKEN_ENVCHANGE, TOKEN_LOGINACK, TOKEN_ERROR, TOKEN_INFO, TOKEN_ORDER):
                (size,) = struct.unpack('<H', self.take(2))
                yield token, self.take(size)
            elif token in (TOKEN_DONE, TOKEN_DONEPROC, TOKEN_DONEINPROC):
                status, _command = struct.unpack('<HH', self.take(4))
                self.take(8 if self.wide else 4)
                yield token, status
            elif token == TOKEN_RETURNSTATUS:
                yield token, self.take(4)
            elif token == TOKEN_COLMETADATA:
                yield token, self._colmetadata()
            elif token == TOKEN_ROW:
                yield token, [self._cell(kind) for kind in self.columns]
            else:
                raise TdsWireError(f'unsupported token 0x{token:02x}')

    def _colmetadata(self) -> list[int]:
        (count,) = struct.unpack('<H', self.take(2))
        self.columns = []
        for _ in range(count if count != 0xFFFF else 0):
            self.take(4 if self.wide else 2)   # UserType
            self.take(2)                       # Flags
            kind = self.take(1)[0]
            if kind == INTN:
                self.take(1)
            elif kind == NVARCHAR:
                self.take(2 + 5)
            else:
                raise TdsWireError(f'unsupported column type 0x{kind:02x}')
            self.b_varchar()
            self.columns.append(kind)
        return self.columns

    def _cell(self, kind: int) -> int | str | None:
        if kind == INTN:
            size = self.take(1)[0]
            raw = self.take(size)
            return int.from_bytes(raw, 'little', signed=True) if size else None
        (size,) = struct.unpack('<H', self.take(2))
        return None if size == 0xFFFF else self.take(size).decode('utf-16-le', 'replace')


def message_text(body: bytes) -> tuple[int, str]:
    """(number, text) of an ERROR/INFO token body."""
    number = struct.unpack_from('<i', body)[0]
    (chars,) = struct.unpack_from('<H', body, 6)
    return number, body[8:8 + 2 * chars].decode('utf-16-le', 'replace')


# --- TLS inside TDS ----------------------------------------------------------------------------

class TlsPipe:
    """TLS over memory buffers: TDS carries the handshake inside PRELOGIN packets, which a
    socket-level TLS layer cannot do, and may drop TLS again after LOGIN7."""

    def __init__(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)

    def handshake(self, data: bytes = b'') -> tuple[bool, bytes]:
        """Feed handshake bytes; (finished, bytes to send). ssl.SSLError on failure."""
        self.incoming.write(data)
        try:
            self.tls.do_handshake()
            finished = True
        except ssl.SSLWantReadError:
            finished = False
        return finished, self.outgoing.read()

    def decrypt(self, data: bytes) -> bytes:
        self.incoming.write(data)
        plain = b''
        while True:
            try:
                chunk = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return plain
            if not chunk:
                return plain
            plain += chunk

    def encrypt(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    def peer_certificate(self):
        der = self.tls.getpeercert(binary_form=True)
        return crypto.X509.from_cryptography(x509.load_der_x509_certificate(der)) if der else None


@lru_cache(maxsize=None)
def _server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_TICKET
    context.load_cert_chain(cert_file, key_file)
    # a certificate swap (tls.swap_certificate) reaches TDS too: the stdlib context takes a new pair in place
    tls.serve_swappable(cert_file, key_file, context.load_cert_chain)
    return context


def server_context(persona: Persona) -> ssl.SSLContext:
    if not (persona.cert_file and persona.key_file):
        raise tls.TLSMaterialMissing(f'{persona.host}: TDS encryption needs persona cert_file and key_file')
    return _server_context(persona.cert_file, persona.key_file)


def client_context(target: ProbeTarget) -> ssl.SSLContext:
    if not target.ca_file:
        raise tls.TLSMaterialMissing('a TDS probe needs target.ca_file to verify the server')
    return ssl.create_default_context(cafile=target.ca_file)


# --- lab queries -------------------------------------------------------------------------------

def version_text(session: Session) -> str:
    return (f'Microsoft SQL Server 2019 (RTM) - {session.version} (X64)\n\tDeveloper Edition (64-bit) '
            f'on Linux (safeq-lab {session.host})')


# statement -> the value of its one-row, one-column result
_LAB_QUERIES = LabQueries(
    {'select @@version': version_text,
     'select @@servername': lambda s: s.host,
     'select suser_name()': lambda s: s.user,
     'select suser_sname()': lambda s: s.user,
     'select system_user': lambda s: s.user,
     'select current_user': lambda s: s.user,
     'select db_name()': lambda s: s.database,
     'select @@spid': lambda s: s.spid,
     "select connectionproperty('client_net_address')": lambda s: s.peer},
    integer=lambda number: lambda s: number,
    syntax_error=(102, "Incorrect syntax near '{near}'."),
    unsupported=(50000, 'safeq-lab stub answers only its lab queries (SELECT 1, SELECT @@VERSION, '
                        "SELECT SUSER_NAME(), SELECT DB_NAME(), SELECT CONNECTIONPROPERTY('client_net_address'))"))


def answer_statement(statement: str, session: Session) -> int | str:
    return _LAB_QUERIES.find(statement)(session)


def answer_batch(sql: str, session: Session, wide: bool = True) -> tuple[bytes, str]:
    """The tokens answering a SQL batch and a one-word result."""
    statements = labsql.split_statements(sql)
    if not statements:
        return done(0, wide=wide), 'empty'
    reply = b''
    for index, statement in enumerate(statements):
        try:
            value = answer_statement(statement, session)
        except QueryError as exc:
            return (reply + message_token(TOKEN_ERROR, exc.code, 16, exc.text, session.host, wide)
                    + done(DONE_ERROR, wide=wide)), f'error {exc.code}'
        more = DONE_MORE if index < len(statements) - 1 else 0
        reply += single_value('', value, wide) + done(DONE_COUNT | more, 1, SELECT_COMMAND, wide)
    return reply, 'ok'


# --- server stub -------------------------------------------------------------------------------

class _TdsServer(StubConnection, Protocol):
    def __init__(self, factory: _TdsFactory) -> None:
        self.factory = factory
        self.reader = MessageReader()
        self.state = 'prelogin'          # prelogin -> [handshake] -> login -> ready (and ``closing``)
        self.mode = 'none'               # what TLS covers: none, login, all
        self.pipe: TlsPipe | None = None
        self.tls_in = self.tls_out = False
        self.packet_size = DEFAULT_PACKET
        self.tds_version = TDS_7_4
        self.user = self.database = ''
        self.spid = 51 + secrets.randbelow(1000)

    @property
    def wide(self) -> bool:
        return self.tds_version >= TDS_7_2

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        try:
            if self.state == 'handshake':
                self._handshake_data(data)
                return
            if self.tls_in:
                data = self.pipe.decrypt(data)
            for kind, payload in self.reader.feed(data):
                if self.closing:
                    return
                self._message(kind, payload)
            if self.reader.peek_type() not in (None, *CLIENT_TYPES):
                raise TdsWireError(f'unknown packet type 0x{self.reader.peek_type():02x}')
        except (TdsWireError, ssl.SSLError, struct.error):
            self.hang_up()

    def _message(self, kind: int, payload: bytes) -> None:
        if self.state == 'prelogin' and kind == PRELOGIN:
            return self._prelogin(payload)
        if kind == LOGIN7 and (self.state == 'login' or (self.state == 'prelogin' and not self.factory.forced)):
            return self._login(payload)   # TDS 7.0 clients may skip PRELOGIN, unless encryption is forced
        if self.state != 'ready':
            raise TdsWireError(f'unexpected packet type 0x{kind:02x} during {self.state}')
        if kind == SQL_BATCH:
            return self._batch(payload)
        if kind == ATTENTION:
            self.report_request('attention')
            return self._send(done(DONE_ATTN, wide=self.wide))
        self.report_request('rpc', packet_type=kind)
        return self._send(message_token(TOKEN_ERROR, 50000, 16, f'safeq-lab stub does not run request type '
                                                               f'0x{kind:02x}', self.factory.persona.host,
                                        self.wide) + done(DONE_ERROR, wide=self.wide))

    def _prelogin(self, payload: bytes) -> None:
        options = decode_prelogin(payload)
        client_flag = options.get(PL_ENCRYPTION, bytes([ENCRYPT_NOT_SUP]))[:1] or bytes([ENCRYPT_NOT_SUP])
        answer, self.mode = negotiate(self.factory.has_certificate, self.factory.forced, client_flag[0])
        self.report_request('prelogin', client_encryption=ENCRYPTION_NAMES.get(client_flag[0] & 0x0F, 'other'),
                     encryption=ENCRYPTION_NAMES[answer])
        self._send(encode_prelogin([(PL_VERSION, version_bytes(self.factory.version)),
                                    (PL_ENCRYPTION, bytes([answer])), (PL_INSTOPT, b'\0'), (PL_THREADID, b'')]))
        if answer == ENCRYPT_REQ and self.mode == 'none':
            self.hang_up()   # the client cannot encrypt, the server requires it
        elif self.mode == 'none':
            self.state = 'login'
        else:
            self.state = 'handshake'
            self.pipe = TlsPipe(self.factory.tls_context, server_side=True)

    def _handshake_data(self, data: bytes) -> None:
        for kind, payload in self.reader.feed(data):
            if kind != PRELOGIN:
                raise TdsWireError(f'packet type 0x{kind:02x} during the TLS handshake')
            finished, out = self.pipe.handshake(payload)
            if out:
                self.transport.write(packets(PRELOGIN, out, self.packet_size))
            if finished:
                self.state = 'login'
                self.tls_in = True
                self.tls_out = self.mode == 'all'
                rest, self.reader = self.reader.buffer, MessageReader()
                if rest:
                    self.dataReceived(rest)
                return

    def _login(self, payload: bytes) -> None:
        login = decode_login7(payload)
        self.tds_version = login.tds_version if login.tds_version in TDS_VERSIONS else TDS_7_4
        self.tds_version = min(self.tds_version, TDS_7_4)
        self.packet_size = min(max(login.packet_size or DEFAULT_PACKET, MIN_PACKET), MAX_PACKET)
        self.user, self.database = login.user, login.database or 'master'
        expected = self.factory.accounts.get(login.user)
        ok = (not login.integrated and expected is not None
              and secrets.compare_digest(login.password.encode(), expected.encode()))
        self.report_request('login', user=login.user, database=self.database, app=login.app,
                     tds_version=TDS_VERSIONS.get(login.tds_version, hex(login.tds_version)),
                     result='ok' if ok else 'failed')
        if self.mode == 'login':
            self.tls_in = False      # ENCRYPT_OFF: only LOGIN7 travelled in TLS
        host = self.factory.persona.host
        if not ok:
            self._send(message_token(TOKEN_ERROR, 18456, 14, f"Login failed for user '{login.user}'.", host,
                                     self.wide) + done(DONE_ERROR, wide=self.wide))
            return self.hang_up()   # login failed
        self.state = 'ready'
        return self._send(env_change(1, self.database, 'master')
                          + env_change(4, str(self.packet_size), str(DEFAULT_PACKET))
                          + login_ack(self.tds_version, self.factory.version) + done(0, wide=self.wide))

    def _batch(self, payload: bytes) -> None:
        if self.wide:
            if len(payload) < 4:
                raise TdsWireError('SQL batch without ALL_HEADERS')
            (headers,) = struct.unpack_from('<I', payload)
            if not 4 <= headers <= len(payload):
                raise TdsWireError(f'ALL_HEADERS length {headers} out of range')
            payload = payload[headers:]
        sql = payload.decode('utf-16-le', 'replace')
        session = Session(self.user, self.database, self.peer, self.factory.persona.host,
                          self.factory.version, self.spid)
        reply, result = answer_batch(sql, session, self.wide)
        self.report_request('batch', sql=sql[:200], result=result)
        self._send(reply)

    def _send(self, payload: bytes, kind: int = TABULAR_RESULT) -> None:
        data = packets(kind, payload, self.packet_size)
        self.transport.write(self.pipe.encrypt(data) if self.tls_out else data)

    def request_fields(self) -> dict[str, Any]:
        return {'tls': self.tls_in or self.tls_out}


class _TdsFactory(StubFactory):
    protocol = _TdsServer

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, security: str) -> None:
        super().__init__(reactor, persona, on_request, security)
        identity = persona.identity
        self.forced = security == 'starttls'
        offers_tls = labsql.offers_encryption(persona, security)
        self.tls_context = server_context(persona) if offers_tls else None   # TLSMaterialMissing
        self.has_certificate = self.tls_context is not None
        self.accounts = labsql.accounts(identity)
        self.version = str(identity.get('mssql_version') or SERVER_VERSION)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve TDS on ``listener`` (TLS only as negotiated in PRELOGIN)."""
    return labsql.listen(reactor, listener, persona, on_request, interface, factory_class=_TdsFactory,
                         name='mssql', upgrade='forced encryption')


# --- client probe ------------------------------------------------------------------------------

PROBE_BATCH = "SELECT 1; SELECT CONNECTIONPROPERTY('client_net_address'); SELECT @@VERSION"
_ENCRYPT_OPTIONS = {'on': ENCRYPT_ON, 'off': ENCRYPT_OFF, 'none': ENCRYPT_NOT_SUP}


class _CertificateHolder:
    """What ``probing.certificate_issuer`` asks for the server's certificate."""

    def __init__(self, pipe: TlsPipe) -> None:
        self.pipe = pipe

    def getPeerCertificate(self):
        return self.pipe.peer_certificate()


class _TdsProbe(StreamProbe):
    pipe: TlsPipe | None = None

    def _tls_transports(self):
        return (_CertificateHolder(self.pipe),) if self.pipe is not None else ()


class _TdsClient(StreamClient):
    def __init__(self, target: ProbeTarget, encrypt: int) -> None:
        self.target = target
        self.encrypt = encrypt
        self.user, self.password, self.database = labsql.login(target.options)
        self.reader = MessageReader()
        self.phase = 'prelogin'
        self.mode = 'none'
        self.tls_in = self.tls_out = False

    def begin(self) -> None:
        self.probe.stage = 'waiting for the PRELOGIN response'
        self.transport.write(packets(PRELOGIN, encode_prelogin([
            (PL_VERSION, version_bytes('15.0.0.0')), (PL_ENCRYPTION, bytes([self.encrypt])),
            (PL_INSTOPT, b'MSSQLServer\0'), (PL_THREADID, struct.pack('!I', os.getpid() & 0xFFFFFFFF))])))

    def dataReceived(self, data: bytes) -> None:
        if self.probe.result is not None:
            return
        try:
            if self.tls_in:
                data = self.probe.pipe.decrypt(data)
            for kind, payload in self.reader.feed(data):
                if self.probe.result is not None:
                    return
                getattr(self, f'_on_{self.phase}')(kind, payload)
        except ssl.SSLCertVerificationError as exc:
            self.probe.decide('protocol_error', f'certificate: {exc.verify_message or exc}')
        except ssl.SSLError as exc:
            self.probe.decide('protocol_error', f'tls: {exc}')
        except (TdsWireError, struct.error, IndexError) as exc:
            self.probe.decide('protocol_error', f'bad TDS reply while {self.probe.stage}: {exc}')

    def _on_prelogin(self, kind: int, payload: bytes) -> None:
        options = decode_prelogin(payload)
        flag = options.get(PL_ENCRYPTION, b'')
        if kind != TABULAR_RESULT or PL_VERSION not in options or len(flag) != 1:
            raise TdsWireError('PRELOGIN response without VERSION or ENCRYPTION')
        self.mode = client_mode(self.encrypt, flag[0], required=self.target.security == 'starttls')
        name = ENCRYPTION_NAMES.get(flag[0], f'0x{flag[0]:02x}')
        self.probe.exchange += f' PRELOGIN encryption {ENCRYPTION_NAMES[self.encrypt]}→{name}'
        if self.mode is None:
            self.probe.decide('protocol_error', f'server answered ENCRYPTION {name} to '
                                                f'{ENCRYPTION_NAMES[self.encrypt]}: no agreement possible')
        elif self.target.security == 'starttls' and self.mode != 'all':
            self.probe.decide('protocol_error', f'encryption {name} on a port that must force encryption')
        elif self.mode == 'none':
            self._login()
        else:
            self.phase = 'handshake'
            self.probe.stage = 'in the TLS handshake'
            self.probe.pipe = TlsPipe(client_context(self.target), server_side=False,
                                      server_hostname=self.target.server_name or self.target.host)
            self._handshake(b'')

    def _on_handshake(self, kind: int, payload: bytes) -> None:
        if kind not in (PRELOGIN, TABULAR_RESULT):
            raise TdsWireError(f'packet type 0x{kind:02x} during the TLS handshake')
        self._handshake(payload)

    def _handshake(self, data: bytes) -> None:
        finished, out = self.probe.pipe.handshake(data)
        if out:
            self.transport.write(packets(PRELOGIN, out))
        if finished:
            self.probe.exchange += ' + TLS'
            self.tls_out = True
            self.tls_in = self.mode == 'all'
            self._login()

    def _login(self) -> None:
        self.phase = 'login'
        self.probe.stage = 'waiting for LOGINACK'
        server = self.target.server_name or self.target.host
        self._send(LOGIN7, encode_login7(self.user, self.password, self.database, 'safeq-lab-probe', server))
        if self.mode == 'login':
            self.tls_out = False   # ENCRYPT_OFF: TLS covered LOGIN7 only

    def _on_login(self, kind: int, payload: bytes) -> None:
        acknowledged = False
        for token, value in TokenReader(payload).tokens():
            if token == TOKEN_ERROR:
                number, text = message_text(value)
                self.probe.decide('protocol_error', f'login refused: error {number}: {text}')
                return
            acknowledged = acknowledged or token == TOKEN_LOGINACK
        if not acknowledged:
            raise TdsWireError('login answer without LOGINACK')
        self.probe.exchange += f' + LOGIN7 {self.user}'
        self.phase = 'batch'
        self.probe.stage = 'waiting for the batch result'
        headers = struct.pack('<IIHQI', 22, 18, 2, 0, 1)   # ALL_HEADERS: transaction descriptor, 1 request
        self._send(SQL_BATCH, headers + PROBE_BATCH.encode('utf-16-le'))

    def _on_batch(self, kind: int, payload: bytes) -> None:
        results: list[list] = []
        for token, value in TokenReader(payload).tokens():
            if token == TOKEN_ERROR:
                number, text = message_text(value)
                self.probe.decide('protocol_error', f'batch failed: error {number}: {text}')
                return
            if token == TOKEN_ROW:
                results.append(value)
        first = results[0][0] if results and results[0] else None
        if first != 1:
            self.probe.decide('protocol_error', f'SELECT 1 returned {first!r}, not 1')
            return
        peer = results[1][0] if len(results) > 1 and results[1] else None
        version = results[2][0] if len(results) > 2 and results[2] else 'SQL Server'
        self.probe.exchange += ' + SELECT 1 → 1'
        self.probe.decide('ok', f'{self.user}@{self.database}: {str(version).splitlines()[0]} '
                                f'{str(version).splitlines()[-1].strip()}'.strip(),
                          peer_seen=str(peer) if peer else None)

    def _send(self, kind: int, payload: bytes) -> None:
        data = packets(kind, payload)
        self.transport.write(self.probe.pipe.encrypt(data) if self.tls_out else data)


def _encryption_request(target: ProbeTarget) -> int:
    choice = target.options.get('encrypt')
    if choice in _ENCRYPT_OPTIONS:
        return _ENCRYPT_OPTIONS[choice]
    if choice is not None:
        raise ValueError(f"options.encrypt must be 'on', 'off' or 'none', got {choice!r}")
    return ENCRYPT_ON if labsql.wants_encryption(target) else ENCRYPT_NOT_SUP


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """PRELOGIN (+ TLS), LOGIN7 and ``SELECT 1`` against ``target``'s SQL Server."""
    # a bad options.encrypt is the target's problem: tcp_client_probe makes it one 'error' row
    return tcp_client_probe(reactor, target, 'TDS', lambda target: _TdsClient(target, _encryption_request(target)),
                            probe_class=_TdsProbe)


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'packets', 'MessageReader', 'encode_prelogin', 'decode_prelogin',
           'encode_login7', 'decode_login7', 'negotiate', 'client_mode', 'answer_batch', 'Session',
           'LAB_USER', 'LAB_PASSWORD']
