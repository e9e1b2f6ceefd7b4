"""``smb``: SMB2/SMB3 file sharing over direct TCP ([MS-SMB2], 445/tcp in the catalog),
server stub and client probe sharing one hand-written codec.

Why hand-written and not impacket's ``smbserver``: impacket (0.13) installs beside our pinned
pyOpenSSL/cryptography, but its server is a ``socketserver`` with a thread per connection that
binds its own socket in its constructor, logs through ``logging`` and prints tracebacks on
hostile input, and pulls in a dozen packages (Flask, ldap3, pycryptodomex, ...). Run inside the
role daemon it would need a second event loop on a thread, witness records handed across
threads, and its own idle-timeout and shutdown story. The subset a scanner's "scan to folder"
uses (below) is a few hundred lines of structs on Twisted, with our limits and records.

Transport: each message is framed by a 4-byte header, a zero byte and a 24-bit big-endian
length (RFC 1002 session message, as [MS-SMB2] 2.1 uses it on 445). Messages longer than
``MAX_MESSAGE`` close the connection.

What the stub does
    NEGOTIATE
        Dialects 2.0.2, 2.1, 3.0, 3.0.2 and 3.1.1; the highest the client offers wins. 3.1.1
        answers the client's preauth-integrity context (SHA-512, fresh salt); no encryption,
        compression or signing context (so none is used). Security mode: signing enabled, not
        required (a Windows member server's default). The security buffer is a SPNEGO
        NegTokenInit2 offering NTLMSSP only. An SMB1 NEGOTIATE first (multi-protocol
        negotiate) that offers ``SMB 2.???`` gets the SMB2 wildcard answer (dialect 0x02FF),
        one that offers ``SMB 2.002`` gets 2.0.2, and one that offers only ``NT LM 0.12`` gets
        an SMB1 NT LM 0.12 answer shaped like Windows Server 2008 R2 - 2012 (non-extended
        security, challenge, workgroup and server name), so ``nmap -sV`` names the port
        ``microsoft-ds``; any SMB1 command after that closes the connection (invented: SMB1
        stops at NEGOTIATE).
    SESSION_SETUP
        SPNEGO (or bare NTLMSSP) in two rounds: NTLMSSP NEGOTIATE -> CHALLENGE
        (STATUS_MORE_PROCESSING_REQUIRED), AUTHENTICATE -> success. An empty user name is an
        anonymous (null) session (SessionFlags IS_NULL), what ``smbclient -N`` does.
        invented: any named user is let in as guest (IS_GUEST) without a password check;
        the stub computes no NTLM session key, so it neither signs nor checks a SPNEGO
        mechListMIC (clients that insist on signing with a named account fail).
    TREE_CONNECT
        ``IPC$`` (pipe share: no pipe can be opened in it) and any disk share, or only the
        names in ``identity['smb_shares']`` when the persona lists them (else
        STATUS_BAD_NETWORK_NAME).
    CREATE / READ / WRITE / CLOSE / FLUSH / QUERY_INFO / SET_INFO / QUERY_DIRECTORY
        A flat share (no sub-directories) per share name, held in memory for the daemon's
        life, shared by all connections of one listener: at most ``MAX_STORE`` bytes and
        ``MAX_FILES`` files in all; invented: a write that needs room drops the oldest files
        nobody has open (STATUS_DISK_FULL only when open files fill it). Common file and file-system information classes (basic,
        standard, all, network-open, end-of-file, rename, disposition; volume, size,
        attribute, device). Security descriptors, locks, change notification, oplocks and
        leases are not supported (STATUS_NOT_SUPPORTED; LOCK succeeds without locking).
    IOCTL
        FSCTL_VALIDATE_NEGOTIATE_INFO is answered; other control codes get
        STATUS_INVALID_DEVICE_REQUEST, as for a share with no DFS.
    ECHO, LOGOFF, TREE_DISCONNECT, CANCEL; compounded (chained and related) requests.
    Not there: DCE/RPC over named pipes, so ``smbclient -L`` gets an empty share list (srvsvc
    cannot be opened in IPC$), and SMB1 beyond NEGOTIATE.

Hostile input: an unknown command or a malformed body gets an error response with an NT
status; a frame that is not SMB, a second NEGOTIATE, a command before NEGOTIATE or an
oversized frame closes the connection. Silent connections are dropped after ``IDLE_TIMEOUT``.

Witness records (``on_request``): ``negotiate`` (``dialect``), ``session-setup`` (``user``,
``domain``, ``workstation``, ``anonymous``, ``guest``), ``tree-connect`` (``share``, ``status``),
``create`` failures (``name``, ``status``), and on CLOSE of a file that was written or read,
``write-file`` / ``read-file`` (``share``, ``name``, ``bytes``, ``size``).

The probe does what ``smbclient //server/share -N -c 'put f; get f'`` does: NEGOTIATE
(2.0.2-3.1.1), anonymous SPNEGO/NTLMSSP session, TREE_CONNECT ``\\\\server\\share``
(option ``share``, default ``scans``; server = ``target.server_name`` or the address),
CREATE a new file (option ``file_name``), WRITE a PDF of ``target.size`` bytes in chunks,
READ it back, CLOSE; ``ok`` only when the bytes read equal the bytes written.
"""

from __future__ import annotations

import fnmatch
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .payloads import scanned_pdf
from .netbios import DEFAULT_WORKGROUP, netbios_name_of
from .probing import OnRequest, StreamClient, StreamProbe, crashed
from .serving import StubConnection, StubFactory, listen_plain_tcp

PROTOCOL_IDS = ('smb',)

MAX_IO = 1 << 20                # advertised MaxRead/MaxWrite/MaxTransact (2.1 and later)
SMB2_02_MAX_IO = 1 << 16        # 2.0.2 has no multi-credit requests
MAX_MESSAGE = MAX_IO + 4096     # one frame: the largest write plus headers
MAX_COMPOUND = 64               # commands in one chained frame
MAX_STORE = 64 << 20            # bytes all shares of one listener hold (oldest closed files make room)
MAX_FILES = 4096                # files all shares of one listener hold
MAX_SESSIONS = 64               # sessions on one connection
MAX_HANDLES = 1024              # open files on one connection
MAX_NAME = 255                  # characters in a file or share name
MAX_CREDITS = 512               # credits granted per response at most
DEFAULT_SHARE = 'scans'
FILETIME_EPOCH = 11644473600    # seconds from 1601-01-01 to 1970-01-01

SMB2_MAGIC = b'\xfeSMB'
SMB1_MAGIC = b'\xffSMB'
HEADER = struct.Struct('<4sHHIHHIIQIIQ16s')   # [MS-SMB2] 2.2.1.2, sync form
SERVER_TO_REDIR, ASYNC_COMMAND, RELATED_OPERATIONS, SIGNED = 0x1, 0x2, 0x4, 0x8

NEGOTIATE, SESSION_SETUP, LOGOFF, TREE_CONNECT, TREE_DISCONNECT, CREATE, CLOSE, FLUSH, READ, \
    WRITE, LOCK, IOCTL, CANCEL, ECHO, QUERY_DIRECTORY, CHANGE_NOTIFY, QUERY_INFO, SET_INFO, \
    OPLOCK_BREAK = range(19)

DIALECTS = {0x0202: '2.0.2', 0x0210: '2.1', 0x0300: '3.0', 0x0302: '3.0.2', 0x0311: '3.1.1'}
WILDCARD_DIALECT = 0x02FF
CAP_LARGE_MTU = 0x4
SIGNING_ENABLED = 0x1
PREAUTH_INTEGRITY = 0x0001
SHA512 = 0x0001

STATUS = {
    'SUCCESS': 0x00000000, 'NO_MORE_FILES': 0x80000006, 'MORE_PROCESSING_REQUIRED': 0xC0000016,
    'INVALID_INFO_CLASS': 0xC0000003, 'INFO_LENGTH_MISMATCH': 0xC0000004, 'INVALID_PARAMETER': 0xC000000D,
    'NO_SUCH_FILE': 0xC000000F, 'INVALID_DEVICE_REQUEST': 0xC0000010, 'END_OF_FILE': 0xC0000011,
    'ACCESS_DENIED': 0xC0000022, 'OBJECT_NAME_INVALID': 0xC0000033, 'OBJECT_NAME_NOT_FOUND': 0xC0000034,
    'OBJECT_NAME_COLLISION': 0xC0000035, 'OBJECT_PATH_NOT_FOUND': 0xC000003A, 'LOGON_FAILURE': 0xC000006D,
    'DISK_FULL': 0xC000007F, 'FILE_IS_A_DIRECTORY': 0xC00000BA, 'NOT_SUPPORTED': 0xC00000BB,
    'NETWORK_NAME_DELETED': 0xC00000C9, 'BAD_NETWORK_NAME': 0xC00000CC, 'NOT_A_DIRECTORY': 0xC0000103,
    'FILE_CLOSED': 0xC0000128, 'USER_SESSION_DELETED': 0xC0000203, 'TOO_MANY_OPENED_FILES': 0xC000011F,
    'INSUFFICIENT_RESOURCES': 0xC000009A,
}
STATUS_NAMES = {code: name for name, code in STATUS.items()}

# CREATE
FILE_DIRECTORY_FILE, FILE_NON_DIRECTORY_FILE, FILE_DELETE_ON_CLOSE = 0x1, 0x40, 0x1000
SUPERSEDE, OPEN, CREATE_NEW, OPEN_IF, OVERWRITE, OVERWRITE_IF = range(6)
SUPERSEDED, OPENED, CREATED, OVERWRITTEN = range(4)
ATTR_DIRECTORY, ATTR_ARCHIVE = 0x10, 0x20
DISK_SHARE, PIPE_SHARE = 0x01, 0x02
FULL_ACCESS = 0x001F01FF
FSCTL_VALIDATE_NEGOTIATE_INFO = 0x00140204

# NTLMSSP ([MS-NLMP] 2.2)
NTLMSSP = b'NTLMSSP\x00'
NTLM_UNICODE, NTLM_OEM, NTLM_REQUEST_TARGET, NTLM_NTLM, NTLM_ANONYMOUS = 0x1, 0x2, 0x4, 0x200, 0x800
NTLM_ALWAYS_SIGN, NTLM_TARGET_SERVER, NTLM_ESS, NTLM_TARGET_INFO = 0x8000, 0x20000, 0x80000, 0x800000
NTLM_VERSION, NTLM_128, NTLM_KEY_EXCH, NTLM_56 = 0x2000000, 0x20000000, 0x40000000, 0x80000000
WINDOWS_VERSION = bytes([10, 0]) + struct.pack('<H', 14393) + b'\x00\x00\x00\x0f'  # 10.0.14393, NTLM rev 15

# SPNEGO (RFC 4178): DER by hand, a few fixed shapes (pyasn1 would need the ASN.1 module written out)
SPNEGO_OID = b'\x06\x06\x2b\x06\x01\x05\x05\x02'
NTLMSSP_OID = b'\x06\x0a\x2b\x06\x01\x04\x01\x82\x37\x02\x02\x0a'
ACCEPT_COMPLETED, ACCEPT_INCOMPLETE = 0, 1


class Malformed(ValueError):
    """A request body the stub cannot read: answered with STATUS_INVALID_PARAMETER."""


class SmbError(Exception):
    """A request refused with an NT status."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def filetime(unix: float) -> int:
    return int((unix + FILETIME_EPOCH) * 10_000_000)


def utf16(text: str) -> bytes:
    return text.encode('utf-16-le')


def from_utf16(data: bytes) -> str:
    return data.decode('utf-16-le', errors='replace')


def frame(message: bytes) -> bytes:
    return struct.pack('>I', len(message)) + message


def take_frames(buffer: bytearray, limit: int = MAX_MESSAGE) -> list[bytes]:
    """Complete messages at the front of ``buffer`` (removed from it); ValueError if a frame
    is oversized or not a session message."""
    messages = []
    while len(buffer) >= 4:
        if buffer[0] != 0:
            raise ValueError(f'session message type 0x{buffer[0]:02x}, not 0x00')
        (length,) = struct.unpack_from('>I', buffer)
        if length > limit:
            raise ValueError(f'frame of {length} B exceeds {limit} B')
        if len(buffer) < 4 + length:
            break
        messages.append(bytes(buffer[4:4 + length]))
        del buffer[:4 + length]
    return messages


def field_at(message: bytes, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` from the header start, which must lie inside the message."""
    if length == 0:
        return b''
    if offset < HEADER.size or offset + length > len(message):
        raise Malformed('buffer outside the message')
    return message[offset:offset + length]


# --- DER / SPNEGO ---------------------------------------------------------------------------

def der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, 'big')
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The TLVs concatenated in ``data`` as (tag, content)."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise Malformed('truncated DER')
        tag, size = data[offset], data[offset + 1]
        offset += 2
        if size & 0x80:
            count = size & 0x7F
            if not 1 <= count <= 4 or offset + count > len(data):
                raise Malformed('bad DER length')
            size = int.from_bytes(data[offset:offset + count], 'big')
            offset += count
        if offset + size > len(data):
            raise Malformed('DER value runs past its container')
        items.append((tag, data[offset:offset + size]))
        offset += size
    return items


def der_fields(data: bytes) -> dict[int, bytes]:
    """The context-tagged fields ([0], [1], ...) of a DER SEQUENCE, by tag number."""
    items = der_items(data)
    if len(items) != 1 or items[0][0] != 0x30:
        raise Malformed('expected a SEQUENCE')
    return {tag & 0x1F: value for tag, value in der_items(items[0][1]) if tag & 0xE0 == 0xA0}


def octet_string(value: bytes) -> bytes:
    items = der_items(value)
    if len(items) != 1 or items[0][0] != 0x04:
        raise Malformed('expected an OCTET STRING')
    return items[0][1]


def spnego_server_hello() -> bytes:
    """NegTokenInit2 for the NEGOTIATE response: NTLMSSP only, with the usual negHints."""
    hints = der(0x30, der(0xA0, der(0x1B, b'not_defined_in_RFC4178@please_ignore')))
    init = der(0x30, der(0xA0, der(0x30, NTLMSSP_OID)) + der(0xA3, hints))
    return der(0x60, SPNEGO_OID + der(0xA0, init))


def spnego_init(mech_token: bytes) -> bytes:
    """The client's first token: NegTokenInit offering NTLMSSP, carrying its NEGOTIATE."""
    init = der(0x30, der(0xA0, der(0x30, NTLMSSP_OID)) + der(0xA2, der(0x04, mech_token)))
    return der(0x60, SPNEGO_OID + der(0xA0, init))


def spnego_response(state: int | None = None, token: bytes = b'', mech: bool = False) -> bytes:
    """NegTokenResp: negState, supportedMech (first reply only), responseToken."""
    parts = b''
    if state is not None:
        parts += der(0xA0, der(0x0A, bytes([state])))
    if mech:
        parts += der(0xA1, NTLMSSP_OID)
    if token:
        parts += der(0xA2, der(0x04, token))
    return der(0xA1, der(0x30, parts))


def mech_token(blob: bytes) -> tuple[bytes, int | None]:
    """(NTLMSSP token, negState) from a SPNEGO NegTokenInit/NegTokenResp or a bare NTLMSSP blob."""
    if blob.startswith(NTLMSSP):
        return blob, None
    items = der_items(blob)
    if len(items) != 1:
        raise Malformed('not one SPNEGO token')
    tag, value = items[0]
    if tag == 0x60:       # [APPLICATION 0] { OID spnego, [0] NegTokenInit }
        inner = der_items(value)
        if len(inner) != 2 or der(inner[0][0], inner[0][1]) != SPNEGO_OID or inner[1][0] != 0xA0:
            raise Malformed('not a SPNEGO NegTokenInit')
        fields = der_fields(inner[1][1])
        mechs = der_items(fields.get(0, b''))
        if not mechs or NTLMSSP_OID not in [der(t, v) for t, v in der_items(mechs[0][1])]:
            raise Malformed('client does not offer NTLMSSP')
        return octet_string(fields[2]) if 2 in fields else b'', None
    if tag == 0xA1:       # NegTokenResp
        fields = der_fields(value)
        state = der_items(fields[0])[0][1][0] if 0 in fields else None
        return (octet_string(fields[2]) if 2 in fields else b''), state
    raise Malformed('not a SPNEGO token')


# --- NTLMSSP -------------------------------------------------------------------------------

NEGOTIATE_FLAGS = (NTLM_UNICODE | NTLM_OEM | NTLM_REQUEST_TARGET | NTLM_NTLM | NTLM_ALWAYS_SIGN | NTLM_ESS
                   | NTLM_VERSION | NTLM_128 | NTLM_KEY_EXCH | NTLM_56)


def ntlm_negotiate() -> bytes:
    return NTLMSSP + struct.pack('<II', 1, NEGOTIATE_FLAGS) + bytes(16) + WINDOWS_VERSION


def _ntlm_fields(data: bytes, at: int) -> bytes:
    length, _max, offset = struct.unpack_from('<HHI', data, at)
    value = data[offset:offset + length]
    if len(value) != length:
        raise Malformed('NTLMSSP field runs past the message')
    return value


def ntlm_message_type(token: bytes) -> int:
    if len(token) < 12 or not token.startswith(NTLMSSP):
        raise Malformed('not an NTLMSSP message')
    return struct.unpack_from('<I', token, 8)[0]


def ntlm_challenge(client_flags: int, computer: str, dns_name: str, now: float) -> bytes:
    """CHALLENGE for a stand-alone server named ``computer``."""
    flags = (NTLM_UNICODE | NTLM_REQUEST_TARGET | NTLM_NTLM | NTLM_ALWAYS_SIGN | NTLM_TARGET_SERVER | NTLM_ESS
             | NTLM_TARGET_INFO | NTLM_VERSION | (client_flags & (NTLM_128 | NTLM_56 | NTLM_KEY_EXCH | 0x30)))
    target = utf16(computer)
    pairs = [(2, utf16(computer)), (1, utf16(computer)), (4, utf16(dns_name)), (3, utf16(dns_name)),
             (7, struct.pack('<Q', filetime(now)))]
    info = b''.join(struct.pack('<HH', kind, len(value)) + value for kind, value in pairs) + bytes(4)
    header = 56
    return (NTLMSSP + struct.pack('<I', 2) + struct.pack('<HHI', len(target), len(target), header) +
            struct.pack('<I', flags) + secrets.token_bytes(8) + bytes(8) +
            struct.pack('<HHI', len(info), len(info), header + len(target)) + WINDOWS_VERSION + target + info)


@dataclass(frozen=True)
class Authenticate:
    user: str
    domain: str
    workstation: str
    anonymous: bool


def parse_authenticate(token: bytes) -> Authenticate:
    if ntlm_message_type(token) != 3 or len(token) < 64:
        raise Malformed('not an NTLMSSP AUTHENTICATE')
    flags = struct.unpack_from('<I', token, 60)[0]
    decode = from_utf16 if flags & NTLM_UNICODE else (lambda b: b.decode('latin-1'))
    nt_response = _ntlm_fields(token, 20)
    user = decode(_ntlm_fields(token, 36))[:MAX_NAME]
    return Authenticate(user=user, domain=decode(_ntlm_fields(token, 28))[:MAX_NAME],
                        workstation=decode(_ntlm_fields(token, 44))[:MAX_NAME],
                        anonymous=not user and not nt_response)


def ntlm_anonymous_authenticate(workstation: str = '') -> bytes:
    """AUTHENTICATE of a null session: empty user and NT response, LM response one zero byte."""
    flags = (NEGOTIATE_FLAGS | NTLM_ANONYMOUS) & ~NTLM_KEY_EXCH
    host = utf16(workstation)
    lm = b'\x00'
    header = 72
    fields = struct.pack('<HHI', len(lm), len(lm), header)                  # LmChallengeResponse
    fields += struct.pack('<HHI', 0, 0, header + len(lm))                   # NtChallengeResponse
    fields += struct.pack('<HHI', 0, 0, header + len(lm))                   # DomainName
    fields += struct.pack('<HHI', 0, 0, header + len(lm))                   # UserName
    fields += struct.pack('<HHI', len(host), len(host), header + len(lm))   # Workstation
    fields += struct.pack('<HHI', 0, 0, header + len(lm) + len(host))       # EncryptedRandomSessionKey
    return NTLMSSP + struct.pack('<I', 3) + fields + struct.pack('<I', flags) + WINDOWS_VERSION + lm + host


# --- SMB2 messages --------------------------------------------------------------------------

@dataclass
class Header:
    command: int
    status: int = 0
    flags: int = 0
    next_command: int = 0
    message_id: int = 0
    tree_id: int = 0
    session_id: int = 0
    credit_charge: int = 0
    credits: int = 1

    def pack(self) -> bytes:
        return HEADER.pack(SMB2_MAGIC, 64, self.credit_charge, self.status, self.command, self.credits,
                           self.flags, self.next_command, self.message_id, 0, self.tree_id,
                           self.session_id, bytes(16))

    @classmethod
    def unpack(cls, message: bytes) -> Header:
        if len(message) < HEADER.size:
            raise Malformed('shorter than an SMB2 header')
        (magic, size, charge, status, command, credits, flags, next_command, message_id, _reserved,
         tree_id, session_id, _signature) = HEADER.unpack_from(message)
        if magic != SMB2_MAGIC or size != 64:
            raise Malformed('not an SMB2 header')
        if flags & ASYNC_COMMAND:   # async form: AsyncId where Reserved+TreeId are
            tree_id = 0
        return cls(command, status, flags, next_command, message_id, tree_id, session_id, charge, credits)


def smb1_dialects(message: bytes) -> list[str]:
    """The dialect strings of an SMB1 NEGOTIATE request ([MS-CIFS] 2.2.4.52.1)."""
    if len(message) < 35 or message[4] != 0x72:
        raise Malformed('not an SMB1 NEGOTIATE')
    words_end = 33 + 2 * message[32]
    (byte_count,) = struct.unpack_from('<H', message, words_end)
    raw = message[words_end + 2:words_end + 2 + byte_count]
    return [d[1:].decode('latin-1') for d in raw.split(b'\x00') if d.startswith(b'\x02')]


def error_body() -> bytes:
    return struct.pack('<HBBI', 9, 0, 0, 0) + b'\x00'


def compound(parts: list[bytes]) -> bytes:
    """Chain responses: each padded to 8 bytes, NextCommand pointing at the next."""
    out = b''
    for index, part in enumerate(parts):
        if index < len(parts) - 1:
            part += bytes(-len(part) % 8)
            part = part[:20] + struct.pack('<I', len(part)) + part[24:]
        out += part
    return out


def negotiate_contexts(contexts: list[tuple[int, bytes]], start: int) -> bytes:
    """Negotiate contexts laid out from ``start`` (8-aligned): type, length, reserved, data."""
    out = b''
    for kind, data in contexts:
        out += bytes(-(start + len(out)) % 8)
        out += struct.pack('<HHI', kind, len(data), 0) + data
    return out


def parse_contexts(message: bytes, offset: int, count: int) -> dict[int, bytes]:
    contexts: dict[int, bytes] = {}
    for _ in range(min(count, 16)):
        offset += -offset % 8
        if offset + 8 > len(message):
            raise Malformed('negotiate context runs past the message')
        kind, length, _ = struct.unpack_from('<HHI', message, offset)
        contexts[kind] = field_at(message, offset + 8, length) if length else b''
        offset += 8 + length
    return contexts


def preauth_context() -> bytes:
    return struct.pack('<HHH', 1, 32, SHA512) + secrets.token_bytes(32)


# --- the stub's files ----------------------------------------------------------------------

@dataclass
class StoredFile:
    name: str
    data: bytearray = field(default_factory=bytearray)
    created: float = 0.0
    modified: float = 0.0
    index: int = 0
    opened: int = 0               # handles open on it (never dropped to make room while open)


class ShareStore:
    """Every share's files for one listener, in memory: ``MAX_STORE`` bytes and ``MAX_FILES``
    files at most. invented: when a write needs room, the oldest files nobody has open are
    dropped (a scan folder that a workflow empties), so a long lab run never fills it."""

    def __init__(self, limit: int = MAX_STORE, max_files: int = MAX_FILES) -> None:
        self.limit = limit
        self.max_files = max_files
        self.files: OrderedDict[tuple[str, str], StoredFile] = OrderedDict()   # oldest first
        self.used = 0
        self.counter = 0

    def get(self, share: str, name: str) -> StoredFile | None:
        return self.files.get((share.lower(), name.lower()))

    def create(self, share: str, name: str, now: float) -> StoredFile:
        if len(self.files) >= self.max_files:
            self.make_room(0, keep=None)
        if len(self.files) >= self.max_files:
            raise SmbError('DISK_FULL')
        self.counter += 1
        stored = StoredFile(name, created=now, modified=now, index=self.counter)
        self.files[(share.lower(), name.lower())] = stored
        return stored

    def remove(self, share: str, name: str) -> None:
        stored = self.files.pop((share.lower(), name.lower()), None)
        if stored is not None:
            self.used -= len(stored.data)

    def rename(self, share: str, old: str, new: str) -> None:
        stored = self.files.pop((share.lower(), old.lower()))
        stored.name = new
        self.files[(share.lower(), new.lower())] = stored

    def listing(self, share: str) -> list[StoredFile]:
        return [f for (s, _), f in self.files.items() if s == share.lower()]

    def make_room(self, size: int, keep: StoredFile | None) -> None:
        """Drop the oldest closed files until ``size`` more bytes fit (and a file slot is free)."""
        for key, stored in list(self.files.items()):
            if self.used + size <= self.limit and len(self.files) < self.max_files:
                return
            if stored is not keep and not stored.opened:
                del self.files[key]
                self.used -= len(stored.data)

    def resize(self, stored: StoredFile, size: int) -> None:
        grow = size - len(stored.data)
        if grow > 0 and self.used + grow > self.limit:
            self.make_room(grow, keep=stored)
            if self.used + grow > self.limit:
                raise SmbError('DISK_FULL')
        if grow > 0:
            stored.data.extend(bytes(grow))
        else:
            del stored.data[size:]
        self.used += grow

    def write(self, stored: StoredFile, offset: int, data: bytes, now: float) -> None:
        if offset + len(data) > len(stored.data):
            self.resize(stored, offset + len(data))
        stored.data[offset:offset + len(data)] = data
        stored.modified = now


@dataclass
class Session:
    session_id: int
    authenticated: bool = False
    anonymous: bool = True
    user: str = ''
    trees: dict[int, str] = field(default_factory=dict)   # tree id -> share name ('IPC$' = pipe)


@dataclass
class Handle:
    file_id: bytes
    session_id: int
    tree_id: int
    share: str
    name: str                     # '' = the share's root directory
    stored: StoredFile | None = None
    delete_on_close: bool = False
    written: int = 0
    read: int = 0
    listing: list | None = None   # QUERY_DIRECTORY cursor: entries still to return

    @property
    def is_dir(self) -> bool:
        return self.stored is None


INVALID_NAME_CHARS = set('<>:"|?*/') | {chr(c) for c in range(32)}


def info_times(stored: StoredFile | None, started: float) -> tuple[int, int, int, int]:
    created = stored.created if stored else started
    modified = stored.modified if stored else started
    return filetime(created), filetime(modified), filetime(modified), filetime(modified)


def file_attributes(handle_or_file: StoredFile | None) -> int:
    return ATTR_ARCHIVE if handle_or_file is not None else ATTR_DIRECTORY


def allocation(size: int) -> int:
    return (size + 4095) // 4096 * 4096


# --- server stub ----------------------------------------------------------------------------

class _SmbServer(StubConnection, Protocol):
    """One client connection: sessions, trees and open handles live here; files in the store."""

    def __init__(self, factory: _SmbFactory) -> None:
        self.factory = factory
        self.buffer = bytearray()
        self.dialect = 0
        self.client_guid = bytes(16)
        self.client_security = 0
        self.client_capabilities = 0
        self.sessions: dict[int, Session] = {}
        self.handles: dict[bytes, Handle] = {}
        self.smb1_done = False
        self.next_id = 1
        self.related_file_id: bytes | None = None   # FileId of the previous CREATE in a related chain

    # --- framing -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self.buffered(data):
            return
        try:
            messages = take_frames(self.buffer)
        except ValueError:
            return self.hang_up()
        for message in messages:
            if self.closing:
                return None
            self.message(message)
        return None

    def message(self, message: bytes) -> None:
        if message.startswith(SMB1_MAGIC) and not self.dialect and not self.smb1_done:
            return self.smb1_negotiate(message)
        if not message.startswith(SMB2_MAGIC):
            return self.hang_up()   # SMB1 after NEGOTIATE, encrypted transform, or garbage
        responses = []
        state = {'session_id': 0, 'tree_id': 0, 'file_id': None, 'status': 0}
        offset = 0
        for _ in range(MAX_COMPOUND):
            part_end = len(message)
            try:
                header = Header.unpack(message[offset:])
                if header.next_command:
                    if header.next_command % 8 or offset + header.next_command >= len(message):
                        raise Malformed('bad NextCommand')
                    part_end = offset + header.next_command
            except Malformed:
                return self.hang_up()
            if header.command != NEGOTIATE and not self.dialect:
                return self.hang_up()   # [MS-SMB2] 3.3.5.2.4: no command before NEGOTIATE
            response = self.request(header, message[offset:part_end], state)
            if self.closing:
                return None
            if response is not None:
                responses.append(response)
            if not header.next_command:
                break
            offset = part_end
        if responses:
            self.transport.write(frame(compound(responses)))
        return None

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        for handle in list(self.handles.values()):
            self.close_handle(handle)

    # --- one request ----------------------------------------------------------------------

    def request(self, header: Header, message: bytes, state: dict) -> bytes | None:
        related = bool(header.flags & RELATED_OPERATIONS)
        if related:   # ids of 0 or all ones mean "the previous request's" ([MS-SMB2] 3.3.5.2.7.2)
            if header.session_id in (0, 0xFFFFFFFFFFFFFFFF):
                header.session_id = state['session_id']
            if header.tree_id in (0, 0xFFFFFFFF):
                header.tree_id = state['tree_id']
        self.related_file_id = state['file_id'] if related else None
        reply = Header(header.command, flags=SERVER_TO_REDIR | (header.flags & RELATED_OPERATIONS),
                       message_id=header.message_id, tree_id=header.tree_id, session_id=header.session_id,
                       credit_charge=header.credit_charge,
                       credits=min(max(header.credits, 1), MAX_CREDITS))
        if header.command == CANCEL:
            return None
        if related and state['status'] and header.command != NEGOTIATE:
            status, body = state['status'], error_body()
        else:
            handler = self.HANDLERS.get(header.command)
            try:
                if handler is None:
                    raise SmbError('NOT_SUPPORTED')
                status, body = handler(self, header, message, reply)
            except SmbError as exc:
                status, body = STATUS[exc.status], error_body()
            except (ValueError, struct.error, IndexError, KeyError, OverflowError):
                # Malformed and UnicodeError are ValueErrors: the body was not what it claimed
                status, body = STATUS['INVALID_PARAMETER'], error_body()
        if self.closing:
            return None
        state.update(session_id=reply.session_id, tree_id=reply.tree_id,
                     status=status if status not in (0, STATUS['MORE_PROCESSING_REQUIRED']) else 0)
        if header.command == CREATE and status == 0:
            state['file_id'] = body[64:80]
        reply.status = status
        return reply.pack() + body

    # --- identity -------------------------------------------------------------------------

    @property
    def persona(self) -> Persona:
        return self.factory.persona

    @property
    def computer(self) -> str:
        return str(self.persona.identity.get('netbios_name') or netbios_name_of(self.persona.host)).upper()[:15]

    @property
    def workgroup(self) -> str:
        return str(self.persona.identity.get('workgroup') or DEFAULT_WORKGROUP).upper()[:15]

    def now(self) -> float:
        return self.factory.reactor.seconds()

    # --- NEGOTIATE ------------------------------------------------------------------------

    def smb1_negotiate(self, message: bytes) -> None:
        try:
            dialects = smb1_dialects(message)
        except (ValueError, struct.error, IndexError):
            return self.hang_up()
        self.smb1_done = True
        if 'SMB 2.???' in dialects or 'SMB 2.002' in dialects:
            chosen = WILDCARD_DIALECT if 'SMB 2.???' in dialects else 0x0202
            if chosen == 0x0202:
                self.dialect = chosen
            reply = Header(NEGOTIATE, flags=SERVER_TO_REDIR)
            self.report_request('negotiate', dialect=DIALECTS.get(chosen, '2.???'), smb1_request=True)
            self.transport.write(frame(reply.pack() + self.negotiate_body(chosen, [])))
            return None
        if 'NT LM 0.12' not in dialects:
            return self.hang_up()
        self.report_request('negotiate', dialect='NT LM 0.12', smb1_request=True)
        self.transport.write(frame(self.smb1_negotiate_response(message, dialects.index('NT LM 0.12'))))
        return None

    def smb1_negotiate_response(self, request: bytes, index: int) -> bytes:
        """NT LM 0.12, non-extended security, as Windows Server 2008 R2 - 2012 answers."""
        pid, uid, mid = struct.unpack_from('<HHH', request, 26)
        header = SMB1_MAGIC + struct.pack('<BIBH', 0x72, 0, 0x88, 0x4001) + bytes(14) + \
            struct.pack('<HHH', pid, uid, mid)
        now = self.now()
        words = struct.pack('<HBHHIIIIQhB', index, 0x03, 50, 1, 16644, 65536, 0, 0x0001E3FC,
                            filetime(now), 0, 8)
        data = secrets.token_bytes(8) + utf16(self.workgroup) + b'\x00\x00' + utf16(self.computer) + b'\x00\x00'
        return header + bytes([17]) + words + struct.pack('<H', len(data)) + data

    def negotiate_body(self, dialect: int, contexts: list[tuple[int, bytes]]) -> bytes:
        max_io = SMB2_02_MAX_IO if dialect in (0x0202, WILDCARD_DIALECT) else MAX_IO
        capabilities = CAP_LARGE_MTU if max_io > SMB2_02_MAX_IO else 0
        blob = spnego_server_hello()
        blob_offset = HEADER.size + 64
        context_offset = (blob_offset + len(blob) + 7) // 8 * 8 if contexts else 0
        body = struct.pack('<HHHH16sIIIIQQHHI', 65, SIGNING_ENABLED, dialect, len(contexts),
                           self.factory.server_guid, capabilities, max_io, max_io, max_io,
                           filetime(self.now()), 0, blob_offset, len(blob), context_offset) + blob
        if contexts:
            body += bytes(-(HEADER.size + len(body)) % 8) + negotiate_contexts(contexts, context_offset)
        return body

    def negotiate(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        if self.dialect:
            self.hang_up()   # a second NEGOTIATE: [MS-SMB2] 3.3.5.3 says disconnect
            return 0, b''
        (size, count, security, _reserved, capabilities, guid, ctx_offset, ctx_count,
         _r2) = struct.unpack_from('<HHHHI16sIHH', message, HEADER.size)
        if size != 36 or not count:
            raise Malformed('NEGOTIATE without dialects')
        offered = struct.unpack_from(f'<{count}H', field_at(message, HEADER.size + 36, 2 * count))
        common = [d for d in offered if d in DIALECTS]
        if not common:
            raise SmbError('NOT_SUPPORTED')
        dialect = max(common)
        contexts = []
        if dialect == 0x0311:
            if PREAUTH_INTEGRITY not in parse_contexts(message, ctx_offset, ctx_count):
                raise Malformed('3.1.1 NEGOTIATE without a preauth integrity context')
            contexts = [(PREAUTH_INTEGRITY, preauth_context())]
        self.dialect, self.client_guid = dialect, guid
        self.client_security, self.client_capabilities = security, capabilities
        self.report_request('negotiate', dialect=DIALECTS[dialect])
        return 0, self.negotiate_body(dialect, contexts)

    def validate_negotiate(self) -> bytes:
        capabilities = CAP_LARGE_MTU if self.dialect != 0x0202 else 0
        return struct.pack('<I16sHH', capabilities, self.factory.server_guid, SIGNING_ENABLED, self.dialect)

    # --- SESSION_SETUP / LOGOFF -----------------------------------------------------------

    def session_setup(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        (_size, _flags, _security, _caps, _channel, blob_offset, blob_length,
         _previous) = struct.unpack_from('<HBBIIHHQ', message, HEADER.size)
        blob = field_at(message, blob_offset, blob_length)
        token, _state = mech_token(blob)
        bare = blob.startswith(NTLMSSP)
        kind = ntlm_message_type(token)
        if kind == 1:
            if len(self.sessions) >= MAX_SESSIONS:
                raise SmbError('INSUFFICIENT_RESOURCES')
            session = Session(self.next_id * 0x100000001 & 0xFFFFFFFFFFFF)
            self.next_id += 1
            self.sessions[session.session_id] = session
            reply.session_id = session.session_id
            flags = struct.unpack_from('<I', token, 12)[0] if len(token) >= 16 else 0
            dns_name = self.persona.host.lower()
            challenge = ntlm_challenge(flags, self.computer, dns_name, self.now())
            out = challenge if bare else spnego_response(ACCEPT_INCOMPLETE, challenge, mech=True)
            return STATUS['MORE_PROCESSING_REQUIRED'], self.session_body(0, out)
        session = self.sessions.get(header.session_id)
        if kind != 3 or session is None or session.authenticated:
            self.sessions.pop(header.session_id, None)
            raise SmbError('LOGON_FAILURE')
        login = parse_authenticate(token)
        session.authenticated, session.anonymous, session.user = True, login.anonymous, login.user
        self.report_request('session-setup', user=login.user, domain=login.domain,
                            workstation=login.workstation, anonymous=login.anonymous,
                            guest=not login.anonymous)
        out = b'' if bare else spnego_response(ACCEPT_COMPLETED)
        return 0, self.session_body(0x2 if login.anonymous else 0x1, out)

    @staticmethod
    def session_body(session_flags: int, blob: bytes) -> bytes:
        return struct.pack('<HHHH', 9, session_flags, HEADER.size + 8 if blob else 0, len(blob)) + (blob or b'\x00')

    def session(self, header: Header) -> Session:
        session = self.sessions.get(header.session_id)
        if session is None or not session.authenticated:
            raise SmbError('USER_SESSION_DELETED')
        return session

    def logoff(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        self.session(header)
        for handle in [h for h in self.handles.values() if h.session_id == header.session_id]:
            self.close_handle(handle)
        del self.sessions[header.session_id]
        return 0, struct.pack('<HH', 4, 0)

    # --- TREE_CONNECT / TREE_DISCONNECT ---------------------------------------------------

    def tree_connect(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        session = self.session(header)
        _size, _flags, path_offset, path_length = struct.unpack_from('<HHHH', message, HEADER.size)
        path = from_utf16(field_at(message, path_offset, path_length))
        share = path.rstrip('\\').rsplit('\\', 1)[-1]
        if not self.share_exists(share):
            self.report_request('tree-connect', share=share[:MAX_NAME], status='BAD_NETWORK_NAME')
            raise SmbError('BAD_NETWORK_NAME')
        if len(session.trees) >= 64:
            raise SmbError('ACCESS_DENIED')
        tree_id = self.next_id
        self.next_id += 1
        session.trees[tree_id] = share
        reply.tree_id = tree_id
        self.report_request('tree-connect', share=share, status='SUCCESS')
        share_type = PIPE_SHARE if share.upper() == 'IPC$' else DISK_SHARE
        return 0, struct.pack('<HBBIII', 16, share_type, 0, 0, 0, FULL_ACCESS)

    def share_exists(self, share: str) -> bool:
        if share.upper() == 'IPC$':
            return True
        if not share or len(share) > 80 or any(c in INVALID_NAME_CHARS | {'\\'} for c in share):
            return False
        listed = self.persona.identity.get('smb_shares')
        return not listed or share.lower() in {str(s).lower() for s in listed}

    def tree(self, header: Header) -> tuple[Session, str]:
        session = self.session(header)
        share = session.trees.get(header.tree_id)
        if share is None:
            raise SmbError('NETWORK_NAME_DELETED')
        return session, share

    def tree_disconnect(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        session, _share = self.tree(header)
        for handle in [h for h in self.handles.values() if h.tree_id == header.tree_id]:
            self.close_handle(handle)
        del session.trees[header.tree_id]
        return 0, struct.pack('<HH', 4, 0)

    # --- CREATE / CLOSE --------------------------------------------------------------------

    def create(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        _session, share = self.tree(header)
        (_size, _sec, _oplock, _imp, _flags, _res, _access, _attrs, _share_access, disposition, options,
         name_offset, name_length, _ctx_offset, _ctx_length) = struct.unpack_from('<HBBIQQIIIIIHHII', message,
                                                                                 HEADER.size)
        name = from_utf16(field_at(message, name_offset, name_length)).strip('\\')
        if len(self.handles) >= MAX_HANDLES:
            raise SmbError('TOO_MANY_OPENED_FILES')
        try:
            stored, action = self.open_file(share, name, disposition, options)
        except SmbError as exc:
            self.report_request('create', share=share, name=name[:MAX_NAME], status=exc.status)
            raise
        file_id = secrets.token_bytes(8) + struct.pack('<Q', self.next_id)
        self.next_id += 1
        if stored is not None:
            stored.opened += 1
        self.handles[file_id] = Handle(file_id, header.session_id, header.tree_id, share, name, stored,
                                       delete_on_close=bool(options & FILE_DELETE_ON_CLOSE))
        created, accessed, written, changed = info_times(stored, self.factory.started)
        size = len(stored.data) if stored else 0
        return 0, struct.pack('<HBBIQQQQQQII16sII', 89, 0, 0, action, created, accessed, written, changed,
                              allocation(size), size, file_attributes(stored), 0, file_id, 0, 0)

    def open_file(self, share: str, name: str, disposition: int, options: int) -> tuple[StoredFile | None, int]:
        if share.upper() == 'IPC$':
            raise SmbError('OBJECT_NAME_NOT_FOUND')   # no named pipes here
        if not name:
            if options & FILE_NON_DIRECTORY_FILE:
                raise SmbError('FILE_IS_A_DIRECTORY')
            if disposition not in (OPEN, OPEN_IF):
                raise SmbError('ACCESS_DENIED')
            return None, OPENED
        if '\\' in name:
            raise SmbError('OBJECT_PATH_NOT_FOUND')   # flat share: no sub-directories
        if len(name) > MAX_NAME or any(c in INVALID_NAME_CHARS for c in name):
            raise SmbError('OBJECT_NAME_INVALID')
        if options & FILE_DIRECTORY_FILE:
            raise SmbError('NOT_A_DIRECTORY' if self.factory.store.get(share, name) else 'ACCESS_DENIED')
        store, now = self.factory.store, self.now()
        existing = store.get(share, name)
        if disposition > OVERWRITE_IF:
            raise SmbError('INVALID_PARAMETER')
        if existing is None:
            if disposition in (OPEN, OVERWRITE):
                raise SmbError('OBJECT_NAME_NOT_FOUND')
            return store.create(share, name, now), CREATED
        if disposition == CREATE_NEW:
            raise SmbError('OBJECT_NAME_COLLISION')
        if disposition in (SUPERSEDE, OVERWRITE, OVERWRITE_IF):
            store.resize(existing, 0)
            existing.modified = now
            return existing, SUPERSEDED if disposition == SUPERSEDE else OVERWRITTEN
        return existing, OPENED

    def handle(self, header: Header, file_id: bytes) -> Handle:
        if file_id == b'\xff' * 16 and self.related_file_id is not None:
            file_id = self.related_file_id
        self.tree(header)
        handle = self.handles.get(file_id)
        if handle is None or handle.session_id != header.session_id:
            raise SmbError('FILE_CLOSED')
        return handle

    def close(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        _size, flags, _reserved, file_id = struct.unpack_from('<HHI16s', message, HEADER.size)
        handle = self.handle(header, file_id)
        self.close_handle(handle)
        if not flags & 1:
            return 0, struct.pack('<HHI', 60, 0, 0) + bytes(52)
        created, accessed, written, changed = info_times(handle.stored, self.factory.started)
        size = len(handle.stored.data) if handle.stored else 0
        return 0, struct.pack('<HHIQQQQQQI', 60, 1, 0, created, accessed, written, changed,
                              allocation(size), size, file_attributes(handle.stored))

    def close_handle(self, handle: Handle) -> None:
        self.handles.pop(handle.file_id, None)
        if handle.stored is None:
            return
        handle.stored.opened -= 1
        if handle.written or handle.read:
            self.report_request('write-file' if handle.written else 'read-file', share=handle.share,
                                name=handle.stored.name, bytes=handle.written or handle.read,
                                size=len(handle.stored.data))
        if handle.delete_on_close:
            self.factory.store.remove(handle.share, handle.stored.name)

    # --- READ / WRITE / FLUSH / LOCK ------------------------------------------------------

    def read(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        _size, _pad, _flags, length, offset, file_id = struct.unpack_from('<HBBIQ16s', message, HEADER.size)
        handle = self.handle(header, file_id)
        if handle.stored is None:
            raise SmbError('INVALID_DEVICE_REQUEST')
        if length > MAX_IO:
            raise SmbError('INVALID_PARAMETER')
        data = bytes(handle.stored.data[offset:offset + length])
        if not data and length:
            raise SmbError('END_OF_FILE')
        handle.read += len(data)
        return 0, struct.pack('<HBBIII', 17, HEADER.size + 16, 0, len(data), 0, 0) + data

    def write(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        _size, data_offset, length, offset, file_id = struct.unpack_from('<HHIQ16s', message, HEADER.size)
        handle = self.handle(header, file_id)
        if handle.stored is None:
            raise SmbError('INVALID_DEVICE_REQUEST')
        if offset > MAX_STORE:
            raise SmbError('DISK_FULL')
        data = field_at(message, data_offset, length)
        self.factory.store.write(handle.stored, offset, data, self.now())
        handle.written += len(data)
        return 0, struct.pack('<HHIIHH', 17, 0, len(data), 0, 0, 0)

    def flush(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        self.handle(header, struct.unpack_from('<HHI16s', message, HEADER.size)[3])
        return 0, struct.pack('<HH', 4, 0)

    def lock(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        self.handle(header, struct.unpack_from('<HHI16s', message, HEADER.size)[3])
        return 0, struct.pack('<HH', 4, 0)   # invented: locks are granted and not kept

    def echo(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        return 0, struct.pack('<HH', 4, 0)

    # --- IOCTL ------------------------------------------------------------------------------

    def ioctl(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        _size, _reserved, code, file_id = struct.unpack_from('<HHI16s', message, HEADER.size)
        self.tree(header)
        if code != FSCTL_VALIDATE_NEGOTIATE_INFO:
            raise SmbError('INVALID_DEVICE_REQUEST')
        out = self.validate_negotiate()
        return 0, struct.pack('<HHI16sIIIIII', 49, 0, code, file_id, HEADER.size + 48, 0,
                              HEADER.size + 48, len(out), 0, 0) + out

    # --- QUERY_INFO / SET_INFO --------------------------------------------------------------

    def query_info(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        (_size, info_type, info_class, out_length, _in_offset, _r, _in_length, _additional, _flags,
         file_id) = struct.unpack_from('<HBBIHHIII16s', message, HEADER.size)
        handle = self.handle(header, file_id)
        if info_type == 1:
            info = self.file_info(handle, info_class)
        elif info_type == 2:
            info = self.fs_info(info_class)
        else:
            raise SmbError('NOT_SUPPORTED')   # security descriptors, quota
        if len(info) > out_length:
            raise SmbError('INFO_LENGTH_MISMATCH')
        return 0, struct.pack('<HHI', 9, HEADER.size + 8, len(info)) + (info or b'\x00')

    def file_info(self, handle: Handle, info_class: int) -> bytes:
        stored = handle.stored
        created, accessed, written, changed = info_times(stored, self.factory.started)
        size = len(stored.data) if stored else 0
        attributes = file_attributes(stored)
        basic = struct.pack('<QQQQII', created, accessed, written, changed, attributes, 0)
        standard = struct.pack('<QQIBBH', allocation(size), size, 1, int(handle.delete_on_close),
                               int(stored is None), 0)
        internal = struct.pack('<Q', stored.index if stored else 0)
        name = utf16('\\' + handle.name)
        table = {
            4: lambda: basic,
            5: lambda: standard,
            6: lambda: internal,
            7: lambda: struct.pack('<I', 0),
            8: lambda: struct.pack('<I', FULL_ACCESS),
            14: lambda: struct.pack('<Q', 0),
            16: lambda: struct.pack('<I', 0),
            17: lambda: struct.pack('<I', 0),
            18: lambda: basic + standard + internal + struct.pack('<IIQII', 0, FULL_ACCESS, 0, 0, 0) +
            struct.pack('<I', len(name)) + name,
            22: lambda: (struct.pack('<IIQQ', 0, 14, size, allocation(size)) + utf16('::$DATA')) if stored else b'',
            34: lambda: struct.pack('<QQQQQQII', created, accessed, written, changed, allocation(size), size,
                                    attributes, 0),
            35: lambda: struct.pack('<II', attributes, 0),
        }
        if info_class == 21:   # FileAlternateNameInformation: no 8.3 names, as on a modern NTFS volume
            raise SmbError('OBJECT_NAME_NOT_FOUND')
        if info_class not in table:
            raise SmbError('INVALID_INFO_CLASS')
        return table[info_class]()

    def fs_info(self, info_class: int) -> bytes:
        free_units = max(0, MAX_STORE - self.factory.store.used) // 4096
        total_units = MAX_STORE // 4096
        label = utf16(self.computer)
        table = {
            1: lambda: struct.pack('<QIIBB', filetime(self.factory.started), self.factory.volume_serial,
                                   len(label), 0, 0) + label,
            3: lambda: struct.pack('<QQII', total_units, free_units, 8, 512),
            4: lambda: struct.pack('<II', 0x07, 0x20),   # FILE_DEVICE_DISK, FILE_DEVICE_IS_MOUNTED
            5: lambda: struct.pack('<III', 0x0000008F, MAX_NAME, 8) + utf16('NTFS'),
            7: lambda: struct.pack('<QQQII', total_units, free_units, free_units, 8, 512),
        }
        if info_class not in table:
            raise SmbError('INVALID_INFO_CLASS')
        return table[info_class]()

    def set_info(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        (_size, info_type, info_class, length, offset, _r, _additional,
         file_id) = struct.unpack_from('<HBBIHHI16s', message, HEADER.size)
        handle = self.handle(header, file_id)
        data = field_at(message, offset, length)
        if info_type != 1:
            raise SmbError('ACCESS_DENIED')
        if info_class == 20 and handle.stored is not None:            # FileEndOfFileInformation
            (size,) = struct.unpack_from('<Q', data)
            if size > MAX_STORE:
                raise SmbError('DISK_FULL')
            self.factory.store.resize(handle.stored, size)
        elif info_class == 13:                                          # FileDispositionInformation
            handle.delete_on_close = bool(data[0])
        elif info_class == 64:                                          # FileDispositionInformationEx
            handle.delete_on_close = bool(struct.unpack_from('<I', data)[0] & 1)
        elif info_class == 10 and handle.stored is not None:           # FileRenameInformation
            self.rename(handle, data)
        elif info_class not in (4, 19, 20):                             # basic, allocation: accepted
            raise SmbError('INVALID_INFO_CLASS')
        return 0, struct.pack('<H', 2)

    def rename(self, handle: Handle, data: bytes) -> None:
        replace = data[0]
        (name_length,) = struct.unpack_from('<I', data, 16)
        new = from_utf16(data[20:20 + name_length]).strip('\\')
        if not new or '\\' in new or len(new) > MAX_NAME or any(c in INVALID_NAME_CHARS for c in new):
            raise SmbError('OBJECT_NAME_INVALID')
        store = self.factory.store
        existing = store.get(handle.share, new)
        if existing is not None and existing is not handle.stored:
            if not replace:
                raise SmbError('OBJECT_NAME_COLLISION')
            store.remove(handle.share, new)
        store.rename(handle.share, handle.stored.name, new)
        handle.name = new

    # --- QUERY_DIRECTORY --------------------------------------------------------------------

    def query_directory(self, header: Header, message: bytes, reply: Header) -> tuple[int, bytes]:
        (_size, info_class, flags, _index, file_id, name_offset, name_length,
         out_length) = struct.unpack_from('<HBBI16sHHI', message, HEADER.size)
        handle = self.handle(header, file_id)
        if not handle.is_dir:
            raise SmbError('INVALID_PARAMETER')
        if info_class not in DIRECTORY_CLASSES:
            raise SmbError('INVALID_INFO_CLASS')
        pattern = from_utf16(field_at(message, name_offset, name_length)) or '*'
        first = handle.listing is None or flags & 0x11   # first call, RESTART_SCANS or REOPEN
        if first:
            entries = [('.', None), ('..', None)] + [(f.name, f) for f in self.factory.store.listing(handle.share)]
            handle.listing = [e for e in entries if fnmatch.fnmatchcase(e[0].lower(), pattern.lower())]
            if not handle.listing:
                raise SmbError('NO_SUCH_FILE')
        if not handle.listing:
            raise SmbError('NO_MORE_FILES')
        entries: list[bytes] = []
        used = 0
        while handle.listing:
            entry = directory_entry(DIRECTORY_CLASSES[info_class], *handle.listing[0], self.factory.started)
            if used + len(entry) > out_length:
                if not entries:
                    raise SmbError('INFO_LENGTH_MISMATCH')
                break
            entries.append(entry)
            used += len(entry) + (-len(entry) % 8)
            handle.listing.pop(0)
            if flags & 0x02:   # RETURN_SINGLE_ENTRY
                break
        out = chain_entries(entries)
        return 0, struct.pack('<HHI', 9, HEADER.size + 8, len(out)) + out

    HANDLERS: dict[int, Callable] = {}   # command -> handler, filled in below the class


# FileInformationClass -> layout name
DIRECTORY_CLASSES = {1: 'directory', 2: 'full', 3: 'both', 12: 'names', 37: 'id_both', 38: 'id_full'}


def directory_entry(layout: str, name: str, stored: StoredFile | None, started: float) -> bytes:
    """One entry of a directory listing, NextEntryOffset still 0 (``chain_entries`` sets it)."""
    raw = utf16(name)
    if layout == 'names':
        return struct.pack('<III', 0, 0, len(raw)) + raw
    created, accessed, written, changed = info_times(stored, started)
    size = len(stored.data) if stored else 0
    common = struct.pack('<IIQQQQQQII', 0, 0, created, accessed, written, changed, size, allocation(size),
                         file_attributes(stored), len(raw))
    if layout == 'directory':
        return common + raw
    common += struct.pack('<I', 0)   # EaSize
    file_id = struct.pack('<Q', stored.index if stored else 0)
    if layout == 'full':
        return common + raw
    if layout == 'id_full':
        return common + struct.pack('<I', 0) + file_id + raw
    both = common + struct.pack('<BB', 0, 0) + bytes(24)
    if layout == 'both':
        return both + raw
    return both + struct.pack('<H', 0) + file_id + raw   # id_both


def chain_entries(entries: list[bytes]) -> bytes:
    """Directory entries back to back, each but the last padded to 8 bytes with its
    NextEntryOffset pointing at the next."""
    out = b''
    for index, entry in enumerate(entries):
        if index < len(entries) - 1:
            entry += bytes(-len(entry) % 8)
            entry = struct.pack('<I', len(entry)) + entry[4:]
        out += entry
    return out


_SmbServer.HANDLERS = {
    NEGOTIATE: _SmbServer.negotiate, SESSION_SETUP: _SmbServer.session_setup, LOGOFF: _SmbServer.logoff,
    TREE_CONNECT: _SmbServer.tree_connect, TREE_DISCONNECT: _SmbServer.tree_disconnect,
    CREATE: _SmbServer.create, CLOSE: _SmbServer.close, FLUSH: _SmbServer.flush, READ: _SmbServer.read,
    WRITE: _SmbServer.write, LOCK: _SmbServer.lock, IOCTL: _SmbServer.ioctl, ECHO: _SmbServer.echo,
    QUERY_DIRECTORY: _SmbServer.query_directory, QUERY_INFO: _SmbServer.query_info,
    SET_INFO: _SmbServer.set_info,
}


class _SmbFactory(StubFactory):
    protocol = _SmbServer

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, security: str = 'plain') -> None:
        super().__init__(reactor, persona, on_request, security)
        self.store = ShareStore()
        self.server_guid = secrets.token_bytes(16)
        self.volume_serial = secrets.randbits(32)
        self.started = reactor.seconds()


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve SMB2/3 on ``listener`` (plain TCP: SMB3 encryption is not offered)."""
    return listen_plain_tcp(reactor, listener, _SmbFactory(reactor, persona, on_request), 'smb', interface)


# --- client probe -----------------------------------------------------------------------------

PROBE_DIALECTS = (0x0202, 0x0210, 0x0300, 0x0302, 0x0311)
PROBE_CHUNK = 1 << 16           # bytes per READ/WRITE: one credit each
STATUS_PENDING = 0x00000103
READ_WRITE_ACCESS = 0x0012019F
PROBE_CREDITS = 64


def negotiate_request(dialects=PROBE_DIALECTS) -> bytes:
    """NEGOTIATE body: the dialects, and for 3.1.1 a SHA-512 preauth integrity context."""
    dialect_bytes = struct.pack(f'<{len(dialects)}H', *dialects)
    context_offset = (HEADER.size + 36 + len(dialect_bytes) + 7) // 8 * 8
    contexts = [(PREAUTH_INTEGRITY, preauth_context())] if 0x0311 in dialects else []
    body = struct.pack('<HHHHI16sIHH', 36, len(dialects), SIGNING_ENABLED, 0, 0, secrets.token_bytes(16),
                       context_offset if contexts else 0, len(contexts), 0) + dialect_bytes
    if contexts:
        body += bytes(context_offset - HEADER.size - len(body)) + negotiate_contexts(contexts, context_offset)
    return body


def session_setup_request(blob: bytes) -> bytes:
    return struct.pack('<HBBIIHHQ', 25, 0, SIGNING_ENABLED, 0, 0, HEADER.size + 24, len(blob), 0) + blob


def tree_connect_request(path: str) -> bytes:
    raw = utf16(path)
    return struct.pack('<HHHH', 9, 0, HEADER.size + 8, len(raw)) + raw


def create_request(name: str, disposition: int = OVERWRITE_IF, options: int = FILE_NON_DIRECTORY_FILE) -> bytes:
    raw = utf16(name)
    return struct.pack('<HBBIQQIIIIIHHII', 57, 0, 0, 2, 0, 0, READ_WRITE_ACCESS, 0x80, 0x7, disposition,
                       options, HEADER.size + 56, len(raw), 0, 0) + (raw or b'\x00')


def write_request(file_id: bytes, offset: int, data: bytes) -> bytes:
    return struct.pack('<HHIQ16sIIHHI', 49, HEADER.size + 48, len(data), offset, file_id, 0, 0, 0, 0, 0) + data


def read_request(file_id: bytes, offset: int, length: int) -> bytes:
    return struct.pack('<HBBIQ16sIIIHH', 49, 0, 0, length, offset, file_id, 0, 0, 0, 0, 0) + b'\x00'


def close_request(file_id: bytes) -> bytes:
    return struct.pack('<HHI16s', 24, 0, 0, file_id)


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, f'0x{status:08x}')


class _SmbClient(StreamClient):
    """The probe's SMB2 client: one request in flight, each reply checked before the next."""

    def __init__(self, target: ProbeTarget) -> None:
        options = target.options
        self.share = str(options.get('share') or DEFAULT_SHARE)
        self.server = target.server_name or target.host
        self.file_name = str(options.get('file_name') or f'safeq-lab-{secrets.token_hex(4)}.pdf')
        self.payload = scanned_pdf(target.size)
        self.buffer = bytearray()
        self.message_id = 0
        self.session_id = 0
        self.tree_id = 0
        self.dialect = 0
        self.chunk = PROBE_CHUNK
        self.file_id = b''
        self.offset = 0
        self.read_back = bytearray()
        self.on_reply: Callable[[Header, bytes], None] | None = None
        self.step = ''   # the request in flight, for error details

    def begin(self) -> None:
        self.send(NEGOTIATE, negotiate_request(), self.negotiated, 'negotiating the dialect')

    def send(self, command: int, body: bytes, on_reply: Callable[[Header, bytes], None], stage: str) -> None:
        charge = 0 if self.dialect in (0, 0x0202) else 1
        header = Header(command, message_id=self.message_id, session_id=self.session_id, tree_id=self.tree_id,
                        credit_charge=charge, credits=PROBE_CREDITS)
        self.message_id += 1
        self.expected = header.message_id
        self.on_reply = on_reply
        self.step = stage
        self.probe.stage = f'waiting for the reply {stage}'
        self.transport.write(frame(header.pack() + body))

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        try:
            messages = take_frames(self.buffer)
        except ValueError as exc:
            self.probe.decide('protocol_error', f'not an SMB2 stream: {exc}')
            return
        for message in messages:
            if self.probe.result is not None:
                return
            try:
                self.reply(message)
            except (Malformed, struct.error, IndexError, ValueError) as exc:
                self.probe.decide('protocol_error', f'malformed reply {self.probe.stage}: {exc}')

    def reply(self, message: bytes) -> None:
        if message.startswith(SMB1_MAGIC):
            raise Malformed('the server answered in SMB1')
        header = Header.unpack(message)
        if header.status == STATUS_PENDING and header.flags & ASYNC_COMMAND:
            return   # interim response: the real one follows
        if not header.flags & SERVER_TO_REDIR or header.message_id != self.expected:
            raise Malformed(f'reply to message {header.message_id}, expected {self.expected}')
        handler, self.on_reply = self.on_reply, None
        if handler is not None:
            handler(header, message)

    def refused(self, header: Header, expected: int = 0) -> bool:
        if header.status == expected:
            return False
        self.probe.decide('protocol_error', f'{status_name(header.status)} {self.step}')
        return True

    # --- the steps, in order -------------------------------------------------------------

    def negotiated(self, header: Header, message: bytes) -> None:
        if self.refused(header):
            return
        (size, _security, dialect, _count, _guid, _caps, _transact, max_read, max_write, _time, _start,
         blob_offset, blob_length, _ctx) = struct.unpack_from('<HHHH16sIIIIQQHHI', message, HEADER.size)
        if size != 65 or dialect not in PROBE_DIALECTS:
            raise Malformed(f'NEGOTIATE response with dialect 0x{dialect:04x}')
        mech_token(field_at(message, blob_offset, blob_length))   # must be SPNEGO offering NTLMSSP
        self.dialect = dialect
        self.chunk = max(1, min(PROBE_CHUNK, max_read, max_write))
        self.probe.exchange += f' → SMB {DIALECTS[dialect]}'
        self.send(SESSION_SETUP, session_setup_request(spnego_init(ntlm_negotiate())), self.challenged,
                  'to the NTLMSSP NEGOTIATE')

    def challenged(self, header: Header, message: bytes) -> None:
        if self.refused(header, STATUS['MORE_PROCESSING_REQUIRED']):
            return
        _size, _flags, blob_offset, blob_length = struct.unpack_from('<HHHH', message, HEADER.size)
        token, _state = mech_token(field_at(message, blob_offset, blob_length))
        if ntlm_message_type(token) != 2:
            raise Malformed('no NTLMSSP CHALLENGE')
        self.session_id = header.session_id
        self.send(SESSION_SETUP, session_setup_request(spnego_response(token=ntlm_anonymous_authenticate())),
                  self.authenticated, 'to the anonymous NTLMSSP AUTHENTICATE')

    def authenticated(self, header: Header, message: bytes) -> None:
        if self.refused(header):
            return
        self.probe.exchange += ', anonymous session'
        path = f'\\\\{self.server}\\{self.share}'
        self.send(TREE_CONNECT, tree_connect_request(path), self.connected_tree, f'to TREE_CONNECT {path}')

    def connected_tree(self, header: Header, message: bytes) -> None:
        if self.refused(header):
            return
        share_type = message[HEADER.size + 2]
        if share_type != DISK_SHARE:
            raise Malformed(f'share type {share_type}, not a disk share')
        self.tree_id = header.tree_id
        self.probe.exchange += f', \\\\{self.server}\\{self.share}'
        self.send(CREATE, create_request(self.file_name), self.created, f'to CREATE {self.file_name}')

    def created(self, header: Header, message: bytes) -> None:
        if self.refused(header):
            return
        self.file_id = message[HEADER.size + 64:HEADER.size + 80]
        self.offset = 0
        self.write_next()

    def write_next(self) -> None:
        if self.offset >= len(self.payload):
            self.offset = 0
            return self.read_next()
        data = self.payload[self.offset:self.offset + self.chunk]
        self.send(WRITE, write_request(self.file_id, self.offset, data), self.written,
                  f'to WRITE at {self.offset}')
        return None

    def written(self, header: Header, message: bytes) -> None:
        if self.refused(header):
            return
        (count,) = struct.unpack_from('<I', message, HEADER.size + 4)
        if count <= 0:
            raise Malformed('WRITE wrote nothing')
        self.offset += count
        self.write_next()

    def read_next(self) -> None:
        if self.offset >= len(self.payload):
            self.send(CLOSE, close_request(self.file_id), self.closed, 'to CLOSE')
            return
        length = min(self.chunk, len(self.payload) - self.offset)
        self.send(READ, read_request(self.file_id, self.offset, length), self.was_read, f'to READ at {self.offset}')

    def was_read(self, header: Header, message: bytes) -> None:
        if self.refused(header):
            return
        data_offset, _reserved, length = struct.unpack_from('<BBI', message, HEADER.size + 2)
        data = field_at(message, data_offset, length)
        if not data:
            raise Malformed('READ returned no data before the end of the file')
        self.read_back += data
        self.offset += len(data)
        self.read_next()

    def closed(self, header: Header, message: bytes) -> None:
        if self.refused(header):
            return
        size = len(self.payload)
        self.probe.exchange += f', wrote and read back {self.file_name} ({size} B)'
        if bytes(self.read_back) != self.payload:
            self.probe.decide('protocol_error', f'read back {len(self.read_back)} B that differ from the '
                                                f'{size} B written')
            return
        self.probe.decide('ok', f'{size} B stored in \\\\{self.server}\\{self.share}\\{self.file_name} '
                                f'and read back identical')

    def lost_detail(self, reason) -> str:
        return f'SMB server closed the connection {self.probe.stage}: {reason.getErrorMessage()}'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Write a file of ``target.size`` bytes to a share anonymously and read it back."""
    exchange = f'SMB2 anonymous write+read {target.size} B'
    try:
        if target.transport != 'tcp':
            raise ValueError(f'smb is a TCP protocol, not {target.transport}')
        return StreamProbe(reactor, target, exchange).start(_SmbClient(target))
    except Exception as exc:
        return crashed(target, exchange, exc)
