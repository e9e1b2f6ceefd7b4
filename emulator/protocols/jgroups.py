"""``jgroups``: JGroups cluster discovery between Infinispan members (TCP and UDP), stub and probe.

AN APPROXIMATION. JGroups' wire format is binary, Java-specific and changes between releases;
no Python library speaks it, so this module hand-writes the smallest documented subset that
lets two members see each other: the TCP connection preamble and one discovery exchange
(PING/TCPPING ``GET_MBRS_REQ`` answered by ``GET_MBRS_RSP``). It is modelled on JGroups 5.2
(Infinispan 14) as read in its sources (``TcpConnection``, ``Version``, ``BaseMessage``,
``PingHeader``, ``PingData``, ``Util.writeAddress``); it was not checked against a capture of
a real cluster, and a real member would not join this stub (see "invented" below).

Big-endian throughout, as Java's DataOutput writes it.

TCP connection (``TcpConnection.sendLocalAddress``/``readPeerAddress``) -- real::

    "bela" (4-byte cookie) | version (short) | address size (short) | sender's IpAddress

then length-prefixed frames in both directions: ``int32 length | message``. The accepting
side sends no preamble back; it answers on the same connection. A wrong cookie or a version
whose major.minor differs from ours closes the connection, as JGroups does.

UDP: one message per datagram, no preamble, no length prefix. The stub answers the datagram's
source address (JGroups would answer the physical address in the request).

version (short): ``major << 11 | minor << 6 | micro`` (``Version.encode``) -- real; ours 5.2.12.

IpAddress: ``length byte (4 | 16 | 0) | address | [int32 scope id, IPv6 only] | port (ushort)``
-- real. Address (``Util.writeAddress``): a flags byte, 1 = null, 2 = UUID (two longs
follow), 16 = IpAddress -- real; other kinds (ExtendedUUID, site addresses) are rejected here.

Message (``Util.writeMessage`` + ``BaseMessage.writeTo``)::

    version (short) | transport flags (byte; 1 = message list, 2 = multicast)
    | message type (short; 0 = BytesMessage)
    | leading (byte; 1 = dest present, 2 = sender present) | message flags (short)
    | [dest address] | [sender address]
    | header count (short) | per header: protocol id (short) | magic id (short) | header
    | payload: int32 length (-1 = none) | bytes

Real: leading byte, flags, addresses, header framing (checked in ``BaseMessage``); believed
but not verified: the message-type short and the payload's length prefix (JGroups 5). Only
the discovery header can be parsed here (a JGroups header carries no length of its own):

PingHeader (magic 53; protocol id 6 = PING, 10 = TCPPING): ``type (byte; 1 = GET_MBRS_REQ,
2 = GET_MBRS_RSP) | cluster name (string) | initial discovery (boolean)`` -- real.
String (``Bits.writeString``): a presence byte, then Java's writeUTF (ushort length + bytes).

Payload, PingData: ``sender address | flags (byte; 1 = server, 2 = coordinator) | logical name
(string) | physical address (address) | members (short count, -1 = none, addresses)`` -- real.

Invented, or simplified: real members also send a transport header (cluster name) and bundle
messages into lists, which this module neither sends nor parses; Infinispan's members use
ExtendedUUID addresses, here plain UUIDs (the stub's is derived from its host name); the
member's logical name is the persona's host name (Infinispan's is ``<hostname>-<random>``);
the stub's physical address is its listener's address and port; the response carries the
cluster name too; message flags are 0; the default cluster name is ``ISPN`` (Infinispan's
embedded default; a persona's ``identity['jgroups_cluster']`` sets another). A request for
another cluster is dropped, as JGroups does ("discarding discovery request for cluster ...").

Security: 'optional' (as the catalog marks some JGroups ports) is served plain. JGroups
protects a cluster inside the stack (SSL_KEY_EXCHANGE + ASYM_ENCRYPT encrypt messages after the
join; Infinispan's ``<transport>`` TLS wraps the socket from the first byte); neither is an
in-band upgrade a plaintext peer could be offered, so there is nothing to negotiate: the probe
says so in its exchange text.

Stub: answers every well-formed ``GET_MBRS_REQ`` for its cluster with a ``GET_MBRS_RSP``
carrying its member name and physical address; ignores other messages; closes a TCP
connection on a bad preamble or a frame over ``MAX_FRAME``; drops undecodable messages (and
datagrams). Records: ``op`` (discovery | ignored | rejected), ``member`` and ``cluster`` of
the asker, ``answered``, ``reason`` for the rest.

Probe ("members see each other"): sends ``GET_MBRS_REQ`` for cluster ``ISPN`` (option
``cluster``) as member ``safeq-lab-probe`` (option ``name``) and is 'ok' when a
``GET_MBRS_RSP`` names a member that is ``target.server_name`` (or its first label), when
that is given. There is no Debian client for JGroups; the interop test drives it with
Python's socket module byte for byte.
"""

from __future__ import annotations

import ipaddress
import struct
import uuid
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, Protocol

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .codec import ByteReader
from .probing import DatagramProbe, OnRequest, StreamClient, StreamProbe, crashed, report
from .serving import LISTEN_BACKLOG, StubConnection, StubFactory, listen_udp

PROTOCOL_IDS = ('jgroups',)

COOKIE = b'bela'
VERSION = (5, 2, 12)
DEFAULT_CLUSTER = 'ISPN'
PROBE_NAME = 'safeq-lab-probe'
MAX_FRAME = 64 << 10          # invented bound: a discovery message is a few hundred bytes
MAX_DATAGRAM = 64 << 10
MAX_MEMBERS = 256             # addresses in a PingData member list

# Address kinds (Address.NULL, UUID_ADDR, IP_ADDR)
ADDR_NULL, ADDR_UUID, ADDR_IP = 1, 2, 16
# transport flags (TP.LIST, TP.MULTICAST); message leading byte (DEST_SET, SRC_SET)
TP_LIST, TP_MULTICAST = 1, 2
DEST_SET, SRC_SET = 1, 2
BYTES_MESSAGE = 0
PING_MAGIC = 53
PING_ID, TCPPING_ID = 6, 10
GET_MBRS_REQ, GET_MBRS_RSP = 1, 2
IS_SERVER, IS_COORD = 1, 2

def encode_version(major: int, minor: int, micro: int) -> int:
    return (major << 11) | (minor << 6) | micro


def decode_version(value: int) -> tuple[int, int, int]:
    return (value >> 11) & 0x1f, (value >> 6) & 0x1f, value & 0x3f


def compatible(value: int) -> bool:
    """JGroups' binary compatibility: the same major and minor version."""
    return decode_version(value)[:2] == VERSION[:2]


OUR_VERSION = encode_version(*VERSION)


@dataclass(frozen=True)
class IpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f'{self.host}:{self.port}'


@dataclass(frozen=True)
class PingData:
    sender: uuid.UUID | IpAddress | None
    flags: int
    logical_name: str | None
    physical: IpAddress | None
    members: tuple | None = None


@dataclass(frozen=True)
class Discovery:
    """One discovery message: a PingHeader and, usually, a PingData payload."""

    type: int
    cluster: str | None
    sender: uuid.UUID | IpAddress | None
    dest: uuid.UUID | IpAddress | None = None
    data: PingData | None = None
    initial: bool = False
    protocol_id: int = PING_ID
    version: int = OUR_VERSION
    multicast: bool = False


# --- writing ---------------------------------------------------------------------------------

def _utf(text: str) -> bytes:
    # Java's writeUTF is modified UTF-8: the same bytes as UTF-8 for text without NUL or emoji.
    data = text.encode('utf-8')
    if len(data) > 0xffff:
        raise ValueError('string too long for writeUTF')
    return struct.pack('>H', len(data)) + data


def write_string(text: str | None) -> bytes:
    return b'\x00' if text is None else b'\x01' + _utf(text)


def write_ip(address: IpAddress) -> bytes:
    packed = ipaddress.ip_address(address.host).packed
    scope = struct.pack('>i', 0) if len(packed) == 16 else b''
    return bytes([len(packed)]) + packed + scope + struct.pack('>H', address.port)


def write_address(address) -> bytes:
    if address is None:
        return bytes([ADDR_NULL])
    if isinstance(address, uuid.UUID):
        return bytes([ADDR_UUID]) + address.bytes    # mostSigBits, leastSigBits: two big-endian longs
    return bytes([ADDR_IP]) + write_ip(address)


def write_ping_data(data: PingData) -> bytes:
    members = struct.pack('>h', -1) if data.members is None else (
        struct.pack('>h', len(data.members)) + b''.join(write_address(m) for m in data.members))
    return (write_address(data.sender) + bytes([data.flags]) + write_string(data.logical_name)
            + write_address(data.physical) + members)


def encode_message(message: Discovery) -> bytes:
    leading = (DEST_SET if message.dest is not None else 0) | (SRC_SET if message.sender is not None else 0)
    out = [struct.pack('>hBhBh', message.version, TP_MULTICAST if message.multicast else 0, BYTES_MESSAGE,
                       leading, 0)]
    if message.dest is not None:
        out.append(write_address(message.dest))
    if message.sender is not None:
        out.append(write_address(message.sender))
    out.append(struct.pack('>hhhB', 1, message.protocol_id, PING_MAGIC, message.type))
    out.append(write_string(message.cluster) + (b'\x01' if message.initial else b'\x00'))
    if message.data is None:
        out.append(struct.pack('>i', -1))
    else:
        payload = write_ping_data(message.data)
        out.append(struct.pack('>i', len(payload)) + payload)
    return b''.join(out)


def frame(message: bytes) -> bytes:
    return struct.pack('>i', len(message)) + message


def encode_preamble(sender: IpAddress, version: int = OUR_VERSION) -> bytes:
    address = write_ip(sender)
    return COOKIE + struct.pack('>hh', version, len(address)) + address


# --- reading ---------------------------------------------------------------------------------

class Incomplete(ValueError):
    """More bytes are needed (a TCP stream only: in a datagram this is a truncated message)."""


class _Reader(ByteReader):
    def short(self, count: int) -> Exception:
        return Incomplete(f'message ends before byte {self.pos + count}')

    def string(self) -> str | None:
        present = self.unpack('>B')
        if present == 0:
            return None
        if present != 1:
            raise ValueError(f'string presence byte {present}')
        return self.take(self.unpack('>H')).decode('utf-8', 'replace')

    def ip(self) -> IpAddress:
        size = self.unpack('>B')
        if size not in (4, 16):
            raise ValueError(f'IP address of {size} bytes')
        host = str(ipaddress.ip_address(self.take(size)))
        if size == 16:
            self.unpack('>i')    # scope id
        return IpAddress(host, self.unpack('>H'))

    def address(self):
        kind = self.unpack('>B')
        if kind & ADDR_NULL:
            return None
        if kind == ADDR_UUID:
            return uuid.UUID(bytes=self.take(16))
        if kind == ADDR_IP:
            return self.ip()
        raise ValueError(f'address kind {kind:#x} is not supported here (only UUID and IpAddress)')

    def ping_data(self) -> PingData:
        sender = self.address()
        flags = self.unpack('>B')
        name = self.string()
        physical = self.address()
        if physical is not None and not isinstance(physical, IpAddress):
            raise ValueError('physical address is not an IpAddress')
        count = self.unpack('>h')
        if count > MAX_MEMBERS:
            raise ValueError(f'{count} members, at most {MAX_MEMBERS} accepted')
        members = None if count < 0 else tuple(self.address() for _ in range(count))
        return PingData(sender, flags, name, physical, members)


def decode_message(data: bytes) -> Discovery:
    """One whole message (a TCP frame or a datagram); ValueError unless it is discovery."""
    r = _Reader(data)
    try:
        version, tp_flags, kind, leading, _flags = r.unpack('>hBhBh')
        if tp_flags & TP_LIST:
            raise ValueError('message lists (bundled messages) are not supported here')
        if kind != BYTES_MESSAGE:
            raise ValueError(f'message type {kind} is not a BytesMessage')
        dest = r.address() if leading & DEST_SET else None
        sender = r.address() if leading & SRC_SET else None
        headers = r.unpack('>h')
        if headers != 1:
            raise ValueError(f'{headers} headers; only a lone discovery header is understood here')
        protocol_id, magic = r.unpack('>hh')
        if magic != PING_MAGIC:
            raise ValueError(f'header magic {magic} is not a PingHeader ({PING_MAGIC})')
        ping_type, cluster, initial = r.unpack('>B'), r.string(), r.unpack('>?')
        length = r.unpack('>i')
        ping_data = None
        if length >= 0:
            payload = _Reader(r.take(length))
            ping_data = payload.ping_data()
            if payload.pos != length:
                raise ValueError(f'{length - payload.pos} bytes after the PingData')
        if r.pos != len(r.data):
            raise ValueError(f'{len(r.data) - r.pos} bytes after the message')
    except Incomplete as exc:
        raise ValueError(f'truncated message: {exc}') from None
    except struct.error as exc:
        raise ValueError(str(exc)) from None
    return Discovery(type=ping_type, cluster=cluster, sender=sender, dest=dest, data=ping_data,
                     initial=initial, protocol_id=protocol_id, version=version,
                     multicast=bool(tp_flags & TP_MULTICAST))


def decode_preamble(data: bytes) -> tuple[int, IpAddress, int]:
    """(version, sender's address, bytes used); Incomplete if more is needed, ValueError if bad."""
    if data[:len(COOKIE)] != COOKIE[:len(data)]:
        raise ValueError(f'cookie {bytes(data[:4])!r} is not {COOKIE!r}')
    r = _Reader(data)
    r.take(len(COOKIE))
    version = r.unpack('>h')
    if not compatible(version):
        raise ValueError('version %d.%d.%d is not binary compatible with ours (%d.%d.%d)'
                         % (*decode_version(version), *VERSION))
    r.unpack('>h')      # address size: only JGroups' NIO server uses it
    sender = r.ip()
    return version, sender, r.pos


def member_matches(name: str, server_name: str) -> bool:
    """A member name is the lab host name; target.server_name may carry the lab domain."""
    return name == server_name or name == server_name.split('.', 1)[0]


# --- the member's answer (no I/O) ------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """Who the stub is in its cluster."""

    name: str
    address: uuid.UUID
    cluster: str

    @classmethod
    def of(cls, persona: Persona) -> Member:
        return cls(name=persona.host, address=uuid.uuid5(uuid.NAMESPACE_DNS, f'{persona.host}.jgroups.lab'),
                   cluster=str(persona.identity.get('jgroups_cluster') or DEFAULT_CLUSTER))


def answer(member: Member, request: Discovery, physical: IpAddress) -> tuple[Discovery | None, dict]:
    """The GET_MBRS_RSP for ``request`` (None: drop it) and the fields of the stub's record."""
    asker = request.data.logical_name if request.data and request.data.logical_name else ''
    record = {'member': asker[:100], 'cluster': (request.cluster or '')[:100],
              'version': '%d.%d.%d' % decode_version(request.version)}
    if request.type != GET_MBRS_REQ:
        return None, {**record, 'op': 'ignored', 'reason': f'discovery type {request.type}', 'answered': False}
    if request.cluster != member.cluster:
        return None, {**record, 'op': 'discovery', 'answered': False,
                      'reason': f'cluster {request.cluster!r} is not ours ({member.cluster!r})'}
    data = PingData(sender=member.address, flags=IS_SERVER | IS_COORD, logical_name=member.name, physical=physical)
    reply = Discovery(type=GET_MBRS_RSP, cluster=member.cluster, sender=member.address,
                      dest=request.data.sender if request.data else request.sender, data=data,
                      protocol_id=request.protocol_id)
    return reply, {**record, 'op': 'discovery', 'answered': True}


# --- server stubs ----------------------------------------------------------------------------

class _JGroupsConnection(StubConnection, Protocol):
    """One accepted TCP connection: the peer's preamble, then discovery frames."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.buffer = bytearray()
        self.peer_address: IpAddress | None = None

    def _reject(self, reason: str) -> None:
        self.report_request('rejected', reason=reason[:200])
        self.hang_up()

    def dataReceived(self, data: bytes) -> None:
        if not self.buffered(data):
            return
        if self.peer_address is None and not self._preamble():
            return
        while not self.closing and len(self.buffer) >= 4:
            (length,) = struct.unpack('>i', self.buffer[:4])
            if not 0 < length <= MAX_FRAME:
                self._reject(f'frame length {length} (1-{MAX_FRAME} accepted)')
                return
            if len(self.buffer) < 4 + length:
                return
            message = bytes(self.buffer[4:4 + length])
            del self.buffer[:4 + length]
            self._message(message)

    def _preamble(self) -> bool:
        try:
            _version, self.peer_address, used = decode_preamble(self.buffer)
        except Incomplete:
            return False
        except ValueError as exc:
            self._reject(f'preamble: {exc}')
            return False
        del self.buffer[:used]
        return True

    def _message(self, data: bytes) -> None:
        try:
            request = decode_message(data)
        except ValueError as exc:
            self.report_request('ignored', reason=str(exc)[:200], answered=False)
            return   # JGroups logs an undecodable message and keeps the connection
        local = self.transport.getHost()
        reply, fields = answer(self.factory.member, request, IpAddress(local.host, local.port))
        self.report_request(**fields, sender=str(self.peer_address))
        if reply is not None:
            self.transport.write(frame(encode_message(reply)))



class _JGroupsFactory(StubFactory):
    protocol = _JGroupsConnection

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, security: str = 'plain') -> None:
        super().__init__(reactor, persona, on_request, security)
        self.member = Member.of(persona)


class _JGroupsDatagrams(DatagramProtocol):
    noisy = False

    def __init__(self, persona: Persona, on_request: OnRequest | None) -> None:
        self.persona = persona
        self.member = Member.of(persona)
        self.on_request = on_request

    def datagramReceived(self, datagram: bytes, addr) -> None:
        local = self.transport.getHost()
        record = {'transport': 'udp', 'port': local.port, 'peer': addr[0]}
        try:
            request = decode_message(datagram)
        except ValueError as exc:
            report(self.on_request, {**record, 'op': 'ignored', 'reason': str(exc)[:200], 'answered': False})
            return
        host = self.persona.address or (local.host if local.host != '0.0.0.0' else '127.0.0.1')
        reply, fields = answer(self.member, request, IpAddress(host, local.port))
        report(self.on_request, {**record, **fields})   # the witness is written before the answer leaves
        if reply is not None:
            self.transport.write(encode_message(reply), addr)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Answer JGroups discovery on ``listener`` (TCP or UDP; 'optional' is served plain)."""
    if listener.security not in ('plain', 'optional'):
        raise ValueError(f'jgroups has no socket TLS here; listener security {listener.security!r}')
    if listener.transport == 'udp':
        return listen_udp(reactor, listener.port, _JGroupsDatagrams(persona, on_request),
                          interface=interface, max_packet=MAX_DATAGRAM)
    if listener.transport == 'tcp':
        return reactor.listenTCP(listener.port, _JGroupsFactory(reactor, persona, on_request, listener.security),
                                 backlog=LISTEN_BACKLOG, interface=interface)
    raise ValueError(f'jgroups cannot listen on {listener.transport!r}')


# --- client probe ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Asking:
    """What the probe asks as: its member address, name and cluster."""

    address: uuid.UUID
    name: str
    cluster: str

    @classmethod
    def of(cls, target: ProbeTarget) -> _Asking:
        options = target.options
        return cls(uuid.uuid4(), str(options.get('name') or PROBE_NAME),
                   str(options.get('cluster') or DEFAULT_CLUSTER))

    def request(self, physical: IpAddress | None, protocol_id: int, multicast: bool) -> bytes:
        data = PingData(sender=self.address, flags=0, logical_name=self.name, physical=physical)
        return encode_message(Discovery(type=GET_MBRS_REQ, cluster=self.cluster, sender=self.address,
                                        data=data, initial=True, protocol_id=protocol_id, multicast=multicast))


def judge(probe, asking: _Asking, data: bytes) -> None:
    """Decide ``probe`` from one message the peer sent."""
    try:
        message = decode_message(data)
    except ValueError as exc:
        probe.decide('protocol_error', f'not a JGroups discovery message: {exc}')
        return
    if not compatible(message.version):
        probe.decide('protocol_error', 'peer speaks JGroups %d.%d.%d' % decode_version(message.version))
        return
    if message.type != GET_MBRS_RSP or message.data is None:
        probe.decide('protocol_error', f'expected GET_MBRS_RSP with member data, got discovery type {message.type}')
        return
    if message.dest not in (None, asking.address):
        probe.decide('protocol_error', f'the response is addressed to {message.dest}, not to us')
        return
    if message.cluster not in (None, asking.cluster):
        probe.decide('protocol_error', f'member of cluster {message.cluster!r}, not {asking.cluster!r}')
        return
    member = message.data
    name = member.logical_name or ''
    probe.exchange += f' -> GET_MBRS_RSP from {name or "?"}'
    if not name:
        probe.decide('protocol_error', 'GET_MBRS_RSP without a logical member name')
        return
    wanted = probe.target.server_name
    if wanted and not member_matches(name, wanted):
        probe.decide('protocol_error', f'member {name!r} answered, expected {wanted!r}')
        return
    role = 'coordinator' if member.flags & IS_COORD else 'member'
    probe.decide('ok', f'{role} {name} of cluster {asking.cluster} at {member.physical or "?"} '
                       f'(JGroups %d.%d.%d)' % decode_version(message.version))


class _DiscoveryClient(StreamClient):
    def __init__(self, asking: _Asking) -> None:
        self.asking = asking
        self.buffer = bytearray()

    def begin(self) -> None:
        local = self.transport.getHost()
        physical = IpAddress(local.host, local.port)
        self.transport.write(encode_preamble(physical)
                             + frame(self.asking.request(physical, TCPPING_ID, multicast=False)))
        self.probe.stage = 'waiting for GET_MBRS_RSP'

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.probe.result is None and len(self.buffer) >= 4:
            (length,) = struct.unpack('>i', self.buffer[:4])
            if not 0 < length <= MAX_FRAME:
                self.probe.decide('protocol_error', f'frame length {length} is no JGroups message')
                return
            if len(self.buffer) < 4 + length:
                return
            message = bytes(self.buffer[4:4 + length])
            del self.buffer[:4 + length]
            judge(self.probe, self.asking, message)


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Discover the peer member (GET_MBRS_REQ) and check who answers."""
    exchange = ('JGroups TCP preamble + discovery GET_MBRS_REQ' if target.transport == 'tcp'
                else f'JGroups {target.transport.upper()} discovery GET_MBRS_REQ')
    if target.security == 'optional':
        exchange += ' (optional TLS: plain, JGroups encrypts in-stack)'
    try:
        asking = _Asking.of(target)
        if target.transport == 'udp':
            request = asking.request(None, PING_ID, multicast=True)
            return DatagramProbe(reactor, target, exchange, request,
                                 lambda p, data: judge(p, asking, data)).start()
        if target.transport == 'tcp':
            return StreamProbe(reactor, target, exchange).start(_DiscoveryClient(asking))
        raise ValueError(f'jgroups runs over tcp or udp, not {target.transport}')
    except Exception as exc:
        return crashed(target, exchange, exc)
