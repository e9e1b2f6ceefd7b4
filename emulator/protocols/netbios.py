"""``netbios-ns`` / ``netbios-dgm``: the NetBIOS name and datagram services of RFC 1001/1002
(137/udp, 138/udp in the catalog), server stub and client probe over one hand-written codec
(no maintained Python library speaks NetBIOS: Twisted has none, impacket's nmb is thread-based).

There is no TLS in NetBIOS. The catalog marks these endpoints ``optional``; the stub and the
probe treat ``optional`` exactly like ``plain`` (nothing to upgrade to) and say so.

Who the stub is
    The persona's NetBIOS name is ``identity['netbios_name']`` or else the first label of its
    host name, upper-cased and cut to 15 characters; its workgroup is
    ``identity['workgroup']`` (invented default ``WORKGROUP``); its adapter address in node
    status is ``identity['mac']`` (default all zeros, as Samba reports). It owns the names a
    Windows file server that is its workgroup's master browser registers, in ``nbtstat -n``
    order: ``NAME<00>`` unique, ``WORKGROUP<00>`` group, ``NAME<20>`` unique,
    ``WORKGROUP<1E>`` group, ``WORKGROUP<1D>`` unique, ``\\x01\\x02__MSBROWSE__\\x02<01>``
    group; each flagged active, M-node (NB flags 0x44/0xC4, what nmap's fingerprints show for
    Windows). Its address is ``persona.address``, or else the local address the kernel would
    use to answer the asker (the socket may be bound to every address).

Name service (RFC 1002 4.2; header as in DNS, names first-level encoded: 16 bytes, each
nibble + ``'A'``, optional scope labels)
    - NAME QUERY (opcode 0, QTYPE NB 0x20) for one of its names: POSITIVE NAME QUERY RESPONSE
      (flags R|AA, RD copied, TTL 300000 s, NB_FLAGS + address). For a name it does not own:
      a NEGATIVE response (RCODE 3, NAM_ERR) when the query was unicast, nothing when it was
      broadcast (B flag), as a node that is not the NBNS behaves.
    - NODE STATUS (QTYPE NBSTAT 0x21) for ``*`` (the wildcard that ``nmblookup -A`` and nmap's
      ``nbstat``/``-sV`` ask) or for one of its names: NODE STATUS RESPONSE (flags R|AA, TTL 0)
      listing its names, then the 46-byte statistics block (MAC first, the rest zero, as Windows).
    - Anything else (registration, release, refresh, WACK, a question for a foreign name in
      a node status, a compressed name, a short or oversized datagram) is dropped silently:
      a host that does not understand a NetBIOS datagram sends nothing back.

Datagram service (RFC 1002 4.4)
    - DIRECT_UNIQUE / DIRECT_GROUP / BROADCAST datagrams are recorded (source and destination
      names, the mailslot and the browser opcode when the user data is an SMB mailslot write).
    - A direct datagram for a name the stub does not own is answered with a DATAGRAM ERROR
      0x82 (DESTINATION NAME NOT PRESENT), as RFC 1002 5.3.3 says.
    - A browser ``GetBackupListRequest`` (``\\MAILSLOT\\BROWSE`` opcode 9, RFC-less but
      documented in [MS-BRWS] 2.2.10) addressed to one of its names is answered with a
      ``GetBackupListResponse`` (opcode 10) naming the stub itself as the backup browser and
      echoing the request's token; the reply is a DIRECT_UNIQUE datagram from ``NAME<00>`` to
      the request's source name.
    - DATAGRAM QUERY REQUEST (0x14): POSITIVE (0x15) or NEGATIVE (0x16) QUERY RESPONSE.
    - invented: replies go to the UDP source address and port of the request, where real
      nodes send to the header's SOURCE_IP and port 138: a probe cannot bind 138, and a
      stateful firewall only lets an answer back to where the request came from.

Every datagram the stub understood gives one ``on_request`` record: ``transport``, ``port``,
``peer``, ``op`` (``name-query``, ``node-status``, ``datagram``, ``datagram-query``,
``datagram-error``), the ``name`` asked for (``NAME<20>`` form) and ``answered``.

Probes
    netbios-ns: with a server name (``target.server_name`` or option ``name``) a NAME QUERY
    for ``NAME<20>`` (option ``suffix``), ``ok`` when a positive answer gives ``target.host``
    as the address (option ``address`` overrides it when a NAT is expected); without one, or
    with option ``query: status``, a node status for ``*``, ``ok`` when it lists names
    (and the server's name among them, when known).
    netbios-dgm: a DIRECT_UNIQUE datagram from ``SAFEQ-LAB<00>`` (option ``source_name``) to
    ``WORKGROUP<1D>`` (options ``workgroup``, ``destination``) carrying a GetBackupList
    request; ``ok`` when the GetBackupListResponse comes back with the same token to our
    name, listing the server's name when it is known. A DATAGRAM ERROR is a ``protocol_error``.
"""

from __future__ import annotations

import secrets
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol

from .. import netns
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .probing import DatagramProbe, OnRequest, crashed, report
from .serving import listen_udp

PROTOCOL_IDS = ('netbios-ns', 'netbios-dgm')

MAX_DATAGRAM = 1 << 16          # read buffer; NetBIOS datagrams are at most 576 B on the wire
MAX_SCOPE = 255                 # longest scope id (DNS name rules)
NAME_TTL = 300000               # seconds; what Windows answers
DEFAULT_WORKGROUP = 'WORKGROUP'

# name service
OPCODE_QUERY = 0
FLAG_RESPONSE = 0x8000
FLAG_AA = 0x0400
FLAG_RD = 0x0100
FLAG_BROADCAST = 0x0010
RCODE_NAM_ERR = 3
TYPE_NB = 0x0020
TYPE_NBSTAT = 0x0021
TYPE_NULL = 0x000A
CLASS_IN = 0x0001
NB_GROUP = 0x8000
NB_ONT_M = 0x4000               # owner node type M (what nmap's Windows fingerprints show)
NB_ACTIVE = 0x0400              # node status only: the name is active
STATISTICS_TAIL = 40            # statistics block after the 6-byte unit id (46 B in all)

# datagram service
DIRECT_UNIQUE, DIRECT_GROUP, BROADCAST = 0x10, 0x11, 0x12
DATAGRAM_ERROR, QUERY_REQUEST, POSITIVE_QUERY, NEGATIVE_QUERY = 0x13, 0x14, 0x15, 0x16
DGM_FIRST = 0x02                # FLAGS: first (and only) fragment, B node
ERROR_NAME_NOT_PRESENT = 0x82
DGM_TYPES = {DIRECT_UNIQUE: 'direct-unique', DIRECT_GROUP: 'direct-group', BROADCAST: 'broadcast',
             DATAGRAM_ERROR: 'error', QUERY_REQUEST: 'query-request',
             POSITIVE_QUERY: 'positive-query-response', NEGATIVE_QUERY: 'negative-query-response'}

# SMB mailslot write carried in a datagram ([MS-MAIL] 2.2.1) and the browser protocol ([MS-BRWS])
SMB_MAGIC = b'\xffSMB'
SMB_COM_TRANSACTION = 0x25
BROWSE_MAILSLOT = '\\MAILSLOT\\BROWSE'
BROWSER_OPS = {1: 'HostAnnouncement', 2: 'AnnouncementRequest', 8: 'RequestElection',
               9: 'GetBackupListRequest', 10: 'GetBackupListResponse', 11: 'BecomeBackup',
               12: 'DomainAnnouncement', 13: 'MasterAnnouncement', 15: 'LocalMasterAnnouncement'}
GET_BACKUP_LIST_REQUEST, GET_BACKUP_LIST_RESPONSE = 9, 10
MSBROWSE = '\x01\x02__MSBROWSE__\x02'
WILDCARD = '*'


class MalformedPacket(ValueError):
    """The datagram is not NetBIOS the stub understands: it is dropped."""


# --- names ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NetbiosName:
    """A 15-character NetBIOS name, its 16th-byte suffix and the scope."""

    name: str
    suffix: int
    scope: str = ''

    def __str__(self) -> str:
        shown = self.name.replace('\x01', '\\x01').replace('\x02', '\\x02')
        return f'{shown}<{self.suffix:02X}>'

    def padded(self) -> bytes:
        """The 16 raw bytes: the name padded with spaces (NULs for ``*``), then the suffix."""
        pad = b'\x00' if self.name == WILDCARD else b' '
        raw = self.name.encode('latin-1', 'replace')[:15]
        return raw.ljust(15, pad) + bytes([self.suffix])

    def same(self, other: NetbiosName) -> bool:
        return (self.name.upper() == other.name.upper() and self.suffix == other.suffix
                and self.scope.lower() == other.scope.lower())


def encode_name(name: NetbiosName) -> bytes:
    """First-level encoding (RFC 1001 14.1): each nibble + 'A', then the scope labels."""
    half = bytearray()
    for byte in name.padded():
        half += bytes([0x41 + (byte >> 4), 0x41 + (byte & 0x0F)])
    out = bytes([32]) + bytes(half)
    for label in filter(None, name.scope.split('.')):
        raw = label.encode('ascii')
        out += bytes([len(raw)]) + raw
    return out + b'\x00'


def decode_name(data: bytes, offset: int) -> tuple[NetbiosName, int]:
    """The name at ``offset`` and the offset after it. Compressed names (label pointers) are
    refused: no query carries them, and following them is how parsers loop."""
    if offset >= len(data) or data[offset] != 32:
        raise MalformedPacket('NetBIOS name must start with a 32-byte label')
    encoded = data[offset + 1:offset + 33]
    if len(encoded) != 32 or any(not 0x41 <= c <= 0x50 for c in encoded):
        raise MalformedPacket('bad first-level encoded name')
    raw = bytes(((encoded[i] - 0x41) << 4) | (encoded[i + 1] - 0x41) for i in range(0, 32, 2))
    offset += 33
    labels = []
    while True:
        if offset >= len(data):
            raise MalformedPacket('name runs past the datagram')
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise MalformedPacket('compressed or reserved label')
        label = data[offset:offset + length]
        if len(label) != length:
            raise MalformedPacket('scope label runs past the datagram')
        labels.append(label.decode('latin-1'))
        offset += length
    scope = '.'.join(labels)
    if len(scope) > MAX_SCOPE:
        raise MalformedPacket('scope too long')
    text = raw[:15].decode('latin-1')
    text = text.rstrip('\x00') if text.startswith(WILDCARD) else text.rstrip(' ')
    return NetbiosName(text, raw[15], scope), offset


def netbios_name_of(host: str) -> str:
    """A host's NetBIOS name: its first DNS label, upper-case, at most 15 characters."""
    return host.split('.')[0].upper()[:15]


# --- who the stub is ----------------------------------------------------------------------

@dataclass(frozen=True)
class OwnedName:
    name: NetbiosName
    group: bool


@dataclass(frozen=True)
class NodeIdentity:
    """The names a persona owns and what its node status says."""

    computer: str
    workgroup: str
    mac: bytes
    address: str = ''
    names: tuple[OwnedName, ...] = field(default=())

    @classmethod
    def from_persona(cls, persona: Persona) -> NodeIdentity:
        identity = persona.identity
        computer = str(identity.get('netbios_name') or netbios_name_of(persona.host)).upper()[:15]
        workgroup = str(identity.get('workgroup') or DEFAULT_WORKGROUP).upper()[:15]
        mac = parse_mac(str(identity.get('mac') or ''))
        names = (OwnedName(NetbiosName(computer, 0x00), False),
                 OwnedName(NetbiosName(workgroup, 0x00), True),
                 OwnedName(NetbiosName(computer, 0x20), False),
                 OwnedName(NetbiosName(workgroup, 0x1E), True),
                 OwnedName(NetbiosName(workgroup, 0x1D), False),
                 OwnedName(NetbiosName(MSBROWSE, 0x01), True))
        return cls(computer, workgroup, mac, persona.address, names)

    def owned(self, name: NetbiosName) -> OwnedName | None:
        return next((o for o in self.names if o.name.same(NetbiosName(name.name, name.suffix))), None)


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or with ``-``) as 6 bytes; anything else is all zeros."""
    try:
        raw = bytes.fromhex(text.replace(':', '').replace('-', ''))
    except ValueError:
        return bytes(6)
    return raw if len(raw) == 6 else bytes(6)


def local_address_towards(peer: str, reactor=None) -> str:
    """The address this host (``reactor``'s, emulator.netns) would send from to reach ``peer`` (no
    packet is sent: connecting a UDP socket only asks the routing table)."""
    with netns.made_in(reactor), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_socket:
        try:
            probe_socket.connect((peer, 1))
            return probe_socket.getsockname()[0]
        except OSError:
            return '0.0.0.0'


# --- name service codec ---------------------------------------------------------------------

@dataclass(frozen=True)
class NameQuestion:
    trn_id: int
    flags: int
    name: NetbiosName
    qtype: int
    raw_name: bytes          # the question name as sent: echoed as the answer's RR_NAME

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)


def encode_ns_query(trn_id: int, name: NetbiosName, qtype: int = TYPE_NB,
                    broadcast: bool = False, recursion: bool = False) -> bytes:
    flags = (FLAG_BROADCAST if broadcast else 0) | (FLAG_RD if recursion else 0)
    return struct.pack('>HHHHHH', trn_id, flags, 1, 0, 0, 0) + encode_name(name) + \
        struct.pack('>HH', qtype, CLASS_IN)


def decode_ns_question(data: bytes) -> NameQuestion:
    """A NAME QUERY or NODE STATUS request; anything else is MalformedPacket."""
    if len(data) < 12:
        raise MalformedPacket('shorter than a name service header')
    trn_id, flags, qdcount, ancount, _nscount, _arcount = struct.unpack_from('>HHHHHH', data)
    if flags & FLAG_RESPONSE or (flags >> 11) & 0x0F != OPCODE_QUERY:
        raise MalformedPacket('not a query request')
    if qdcount != 1 or ancount != 0:
        raise MalformedPacket('a query carries exactly one question')
    name, offset = decode_name(data, 12)
    if offset + 4 > len(data):
        raise MalformedPacket('question type/class missing')
    qtype, qclass = struct.unpack_from('>HH', data, offset)
    if qclass != CLASS_IN or qtype not in (TYPE_NB, TYPE_NBSTAT):
        raise MalformedPacket(f'unsupported question type 0x{qtype:04x} class 0x{qclass:04x}')
    return NameQuestion(trn_id, flags, name, qtype, data[12:offset])


def _answer(trn_id: int, flags: int, raw_name: bytes, rrtype: int, ttl: int, rdata: bytes) -> bytes:
    return (struct.pack('>HHHHHH', trn_id, flags, 0, 1, 0, 0) + raw_name +
            struct.pack('>HHIH', rrtype, CLASS_IN, ttl, len(rdata)) + rdata)


def positive_name_response(question: NameQuestion, owned: OwnedName, address: str) -> bytes:
    nb_flags = (NB_GROUP if owned.group else 0) | NB_ONT_M
    flags = FLAG_RESPONSE | FLAG_AA | (question.flags & FLAG_RD)
    rdata = struct.pack('>H', nb_flags) + socket.inet_aton(address)
    return _answer(question.trn_id, flags, question.raw_name, TYPE_NB, NAME_TTL, rdata)


def negative_name_response(question: NameQuestion) -> bytes:
    flags = FLAG_RESPONSE | FLAG_AA | (question.flags & FLAG_RD) | RCODE_NAM_ERR
    return _answer(question.trn_id, flags, question.raw_name, TYPE_NULL, 0, b'')


def node_status_response(question: NameQuestion, node: NodeIdentity) -> bytes:
    rdata = bytearray([len(node.names)])
    for owned in node.names:
        flags = (NB_GROUP if owned.group else 0) | NB_ONT_M | NB_ACTIVE
        rdata += owned.name.padded() + struct.pack('>H', flags)
    rdata += node.mac + bytes(STATISTICS_TAIL)
    return _answer(question.trn_id, FLAG_RESPONSE | FLAG_AA, question.raw_name, TYPE_NBSTAT, 0, bytes(rdata))


@dataclass(frozen=True)
class NameAnswer:
    """What a name service response says (the probe's view)."""

    trn_id: int
    rcode: int
    rrtype: int
    addresses: tuple[tuple[str, bool], ...] = ()   # name query: (address, group)
    names: tuple[tuple[NetbiosName, int], ...] = ()  # node status: (name, flags)
    mac: bytes = b''


def decode_ns_answer(data: bytes) -> NameAnswer:
    if len(data) < 12:
        raise MalformedPacket('shorter than a name service header')
    trn_id, flags, _qd, ancount, _ns, _ar = struct.unpack_from('>HHHHHH', data)
    if not flags & FLAG_RESPONSE:
        raise MalformedPacket('not a response')
    rcode = flags & 0x0F
    if ancount < 1:
        return NameAnswer(trn_id, rcode, 0)
    _name, offset = decode_name(data, 12)
    if offset + 10 > len(data):
        raise MalformedPacket('resource record header missing')
    rrtype, _class, _ttl, rdlength = struct.unpack_from('>HHIH', data, offset)
    rdata = data[offset + 10:offset + 10 + rdlength]
    if len(rdata) != rdlength:
        raise MalformedPacket('RDATA runs past the datagram')
    if rrtype == TYPE_NB:
        if rdlength % 6:
            raise MalformedPacket('NB RDATA is not a list of 6-byte entries')
        entries = tuple((socket.inet_ntoa(rdata[i + 2:i + 6]), bool(rdata[i] & 0x80))
                        for i in range(0, rdlength, 6))
        return NameAnswer(trn_id, rcode, rrtype, addresses=entries)
    if rrtype == TYPE_NBSTAT:
        if not rdata:
            raise MalformedPacket('empty node status')
        count = rdata[0]
        if 1 + 18 * count > len(rdata):
            raise MalformedPacket('node status lists more names than it holds')
        names = []
        for i in range(count):
            entry = rdata[1 + 18 * i:19 + 18 * i]
            text = entry[:15].decode('latin-1').rstrip(' \x00')
            names.append((NetbiosName(text, entry[15]), struct.unpack('>H', entry[16:18])[0]))
        mac = rdata[1 + 18 * count:7 + 18 * count]
        return NameAnswer(trn_id, rcode, rrtype, names=tuple(names), mac=mac)
    return NameAnswer(trn_id, rcode, rrtype)


# --- datagram service codec ------------------------------------------------------------------

@dataclass(frozen=True)
class Datagram:
    msg_type: int
    dgm_id: int
    source_ip: str
    source_port: int
    source: NetbiosName | None = None        # direct/broadcast datagrams
    destination: NetbiosName | None = None   # direct/broadcast datagrams and queries
    user_data: bytes = b''
    error_code: int = 0                      # DATAGRAM ERROR


def encode_datagram(msg_type: int, dgm_id: int, source_ip: str, source_port: int,
                    source: NetbiosName, destination: NetbiosName, user_data: bytes) -> bytes:
    """A DIRECT_UNIQUE, DIRECT_GROUP or BROADCAST datagram (one fragment)."""
    body = encode_name(source) + encode_name(destination) + user_data
    return (struct.pack('>BBH4sH', msg_type, DGM_FIRST, dgm_id, socket.inet_aton(source_ip), source_port) +
            struct.pack('>HH', len(body), 0) + body)


def encode_datagram_error(dgm_id: int, source_ip: str, source_port: int, code: int) -> bytes:
    return struct.pack('>BBH4sHB', DATAGRAM_ERROR, DGM_FIRST, dgm_id, socket.inet_aton(source_ip),
                       source_port, code)


def encode_datagram_query(msg_type: int, dgm_id: int, source_ip: str, source_port: int,
                          destination: NetbiosName) -> bytes:
    return (struct.pack('>BBH4sH', msg_type, DGM_FIRST, dgm_id, socket.inet_aton(source_ip), source_port) +
            encode_name(destination))


def decode_datagram(data: bytes) -> Datagram:
    if len(data) < 10:
        raise MalformedPacket('shorter than a datagram header')
    msg_type, _flags, dgm_id, raw_ip, source_port = struct.unpack_from('>BBH4sH', data)
    source_ip = socket.inet_ntoa(raw_ip)
    if msg_type in (DIRECT_UNIQUE, DIRECT_GROUP, BROADCAST):
        if len(data) < 14:
            raise MalformedPacket('datagram header truncated')
        length, packet_offset = struct.unpack_from('>HH', data, 10)
        if packet_offset != 0:
            raise MalformedPacket('fragments are not reassembled')
        body = data[14:14 + length]
        if len(body) != length:
            raise MalformedPacket('DGM_LENGTH runs past the datagram')
        source, offset = decode_name(body, 0)
        destination, offset = decode_name(body, offset)
        return Datagram(msg_type, dgm_id, source_ip, source_port, source, destination, body[offset:])
    if msg_type == DATAGRAM_ERROR:
        if len(data) < 11:
            raise MalformedPacket('datagram error code missing')
        return Datagram(msg_type, dgm_id, source_ip, source_port, error_code=data[10])
    if msg_type in (QUERY_REQUEST, POSITIVE_QUERY, NEGATIVE_QUERY):
        destination, _ = decode_name(data, 10)
        return Datagram(msg_type, dgm_id, source_ip, source_port, destination=destination)
    raise MalformedPacket(f'unknown datagram type 0x{msg_type:02x}')


def encode_mailslot(mailslot: str, data: bytes) -> bytes:
    """An SMB_COM_TRANSACTION mailslot write ([MS-MAIL] 2.2.1): class 2 (unreliable), as
    browser datagrams are sent."""
    name = mailslot.encode('ascii') + b'\x00'
    data_offset = 32 + 1 + 34 + 2 + len(name)
    header = SMB_MAGIC + struct.pack('<BIBHH8sHHHHH', SMB_COM_TRANSACTION, 0, 0, 0, 0, bytes(8), 0, 0, 0, 0, 0)
    words = struct.pack('<HHHHBBHIHHHHHBB', 0, len(data), 0, 0, 0, 0, 0, 0, 0, 0, data_offset,
                        len(data), data_offset, 3, 0) + struct.pack('<HHH', 1, 1, 2)
    return header + bytes([17]) + words + struct.pack('<H', len(name) + len(data)) + name + data


def decode_mailslot(payload: bytes) -> tuple[str, bytes]:
    """(mailslot name, data) of an SMB mailslot write; MalformedPacket otherwise."""
    if len(payload) < 33 + 34 + 2 or payload[:4] != SMB_MAGIC or payload[4] != SMB_COM_TRANSACTION:
        raise MalformedPacket('not an SMB transaction')
    word_count = payload[32]
    if word_count < 17 or 33 + 2 * word_count + 2 > len(payload):
        raise MalformedPacket('transaction words truncated')
    fields = struct.unpack_from('<HHHHBBHIHHHHHBB', payload, 33)
    data_count, data_offset = fields[11], fields[12]
    names_at = 33 + 2 * word_count + 2
    end = payload.find(b'\x00', names_at, names_at + 256)
    if end < 0:
        raise MalformedPacket('mailslot name not terminated')
    data = payload[data_offset:data_offset + data_count]
    if len(data) != data_count:
        raise MalformedPacket('transaction data runs past the datagram')
    return payload[names_at:end].decode('latin-1'), data


def get_backup_list_request(token: int, count: int = 4) -> bytes:
    return struct.pack('<BBI', GET_BACKUP_LIST_REQUEST, count, token)


def get_backup_list_response(token: int, servers: list[str]) -> bytes:
    names = b''.join(s.encode('latin-1') + b'\x00' for s in servers)
    return struct.pack('<BBI', GET_BACKUP_LIST_RESPONSE, len(servers), token) + names


def decode_backup_list_response(data: bytes) -> tuple[int, list[str]]:
    if len(data) < 6 or data[0] != GET_BACKUP_LIST_RESPONSE:
        raise MalformedPacket('not a GetBackupListResponse')
    count, token = struct.unpack_from('<BI', data, 1)
    servers = [s.decode('latin-1') for s in data[6:].split(b'\x00')[:count]]
    return token, servers


# --- server stubs ---------------------------------------------------------------------------

class _NetbiosServer(DatagramProtocol):
    noisy = False

    def __init__(self, persona: Persona, on_request: OnRequest | None) -> None:
        self.node = NodeIdentity.from_persona(persona)
        self.on_request = on_request

    def address_for(self, peer: str) -> str:
        if self.node.address:
            return self.node.address
        bound = self.transport.getHost().host
        return bound if bound not in ('', '0.0.0.0') else local_address_towards(peer)

    def datagramReceived(self, datagram: bytes, addr) -> None:
        try:
            fields = self.handle(datagram, addr)
        except (MalformedPacket, UnicodeError, struct.error, OSError):
            return   # not NetBIOS we understand: a real node stays silent
        report(self.on_request, {'transport': 'udp', 'port': self.transport.getHost().port,
                                  'peer': addr[0], **fields})

    def handle(self, datagram: bytes, addr) -> dict[str, Any]:
        raise NotImplementedError


class _NameServer(_NetbiosServer):

    def handle(self, datagram: bytes, addr) -> dict[str, Any]:
        question = decode_ns_question(datagram)
        if question.qtype == TYPE_NBSTAT:
            if question.name.name != WILDCARD and self.node.owned(question.name) is None:
                raise MalformedPacket('node status for a name not ours')
            self.transport.write(node_status_response(question, self.node), addr)
            return {'op': 'node-status', 'name': str(question.name), 'answered': True}
        owned = self.node.owned(question.name)
        if owned is not None:
            reply = positive_name_response(question, owned, self.address_for(addr[0]))
        elif not question.broadcast:
            reply = negative_name_response(question)
        else:
            reply = b''
        if reply:
            self.transport.write(reply, addr)
        return {'op': 'name-query', 'name': str(question.name), 'answered': owned is not None,
                'broadcast': question.broadcast}


class _DatagramServer(_NetbiosServer):

    def handle(self, datagram: bytes, addr) -> dict[str, Any]:
        packet = decode_datagram(datagram)
        kind = DGM_TYPES[packet.msg_type]
        if packet.msg_type == QUERY_REQUEST:
            owned = self.node.owned(packet.destination) is not None
            reply_type = POSITIVE_QUERY if owned else NEGATIVE_QUERY
            self.transport.write(encode_datagram_query(reply_type, packet.dgm_id, self.address_for(addr[0]),
                                                       self.transport.getHost().port, packet.destination), addr)
            return {'op': 'datagram-query', 'name': str(packet.destination), 'answered': owned}
        if packet.msg_type not in (DIRECT_UNIQUE, DIRECT_GROUP, BROADCAST):
            return {'op': 'datagram-error' if packet.msg_type == DATAGRAM_ERROR else 'datagram',
                    'msg_type': kind, 'error_code': packet.error_code, 'answered': False}
        fields: dict[str, Any] = {'op': 'datagram', 'msg_type': kind, 'source_name': str(packet.source),
                                  'name': str(packet.destination), 'answered': False}
        try:
            mailslot, data = decode_mailslot(packet.user_data)
        except MalformedPacket:
            mailslot, data = '', b''
        if mailslot:
            fields['mailslot'] = mailslot
            fields['browser_op'] = BROWSER_OPS.get(data[0], f'0x{data[0]:02x}') if data else ''
        ours = self.node.owned(packet.destination) is not None
        if packet.msg_type != BROADCAST and not ours:
            self.transport.write(encode_datagram_error(packet.dgm_id, self.address_for(addr[0]),
                                                       self.transport.getHost().port,
                                                       ERROR_NAME_NOT_PRESENT), addr)
            fields['error_code'] = ERROR_NAME_NOT_PRESENT
        elif ours and mailslot.upper() == BROWSE_MAILSLOT and len(data) >= 6 \
                and data[0] == GET_BACKUP_LIST_REQUEST:
            (token,) = struct.unpack_from('<I', data, 2)
            self.transport.write(self.backup_list(packet, token, addr), addr)
            fields['answered'] = True
        return fields

    def backup_list(self, request: Datagram, token: int, addr) -> bytes:
        reply = encode_mailslot(BROWSE_MAILSLOT, get_backup_list_response(token, [self.node.computer]))
        return encode_datagram(DIRECT_UNIQUE, (request.dgm_id + 1) & 0xFFFF, self.address_for(addr[0]),
                               self.transport.getHost().port, NetbiosName(self.node.computer, 0x00),
                               request.source, reply)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve the NetBIOS name (``netbios-ns``) or datagram (``netbios-dgm``) service over UDP."""
    if listener.transport != 'udp':
        raise ValueError(f'{listener.protocol} runs over udp, not {listener.transport}')
    if listener.security not in ('plain', 'optional'):   # NetBIOS has no TLS to offer
        raise ValueError(f'{listener.protocol} has no TLS; listener security {listener.security!r}')
    servers = {'netbios-ns': _NameServer, 'netbios-dgm': _DatagramServer}
    if listener.protocol not in servers:
        raise ValueError(f'netbios cannot serve protocol {listener.protocol!r}')
    server = servers[listener.protocol](persona, on_request)
    return listen_udp(reactor, listener.port, server, interface=interface, max_packet=MAX_DATAGRAM)


# --- client probes --------------------------------------------------------------------------

def _server_name(target: ProbeTarget) -> str:
    return str(target.options.get('name') or netbios_name_of(target.server_name or '')).upper()[:15]


def _probe_name_service(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    server = _server_name(target)
    trn_id = secrets.randbelow(0x10000)
    by_status = target.options.get('query') == 'status' or not server
    if by_status:
        request = encode_ns_query(trn_id, NetbiosName(WILDCARD, 0x00), TYPE_NBSTAT)
        exchange = 'NetBIOS node status *<00>'
    else:
        suffix = int(target.options.get('suffix', 0x20))
        asked = NetbiosName(server, suffix)
        request = encode_ns_query(trn_id, asked)
        exchange = f'NetBIOS name query {asked}'
    expected_address = str(target.options.get('address') or target.host)

    def judge(probe: DatagramProbe, data: bytes) -> None:
        try:
            answer = decode_ns_answer(data)
        except (MalformedPacket, struct.error, OSError) as exc:
            probe.decide('protocol_error', f'undecodable name service reply: {exc}')
            return
        if answer.trn_id != trn_id:
            return   # an answer to an earlier copy or someone else's: keep waiting
        if answer.rcode:
            probe.decide('protocol_error', f'negative response, RCODE {answer.rcode} (name not registered)')
        elif by_status:
            judge_status(probe, answer, server)
        else:
            judge_query(probe, answer, expected_address)

    exchange += ' (no TLS in NetBIOS)' if target.security == 'optional' else ''
    return DatagramProbe(reactor, target, exchange, request, judge).start()


def judge_status(probe: DatagramProbe, answer: NameAnswer, server: str) -> None:
    if answer.rrtype != TYPE_NBSTAT or not answer.names:
        probe.decide('protocol_error', 'node status response lists no names')
        return
    listed = ', '.join(str(name) for name, _flags in answer.names)
    probe.exchange += f' → {len(answer.names)} names'
    if server and not any(name.name.upper() == server and not flags & NB_GROUP for name, flags in answer.names):
        probe.decide('protocol_error', f'node status does not list {server}: {listed}')
        return
    probe.decide('ok', f'names: {listed}')


def judge_query(probe: DatagramProbe, answer: NameAnswer, expected: str) -> None:
    if answer.rrtype != TYPE_NB or not answer.addresses:
        probe.decide('protocol_error', 'positive response without an address')
        return
    addresses = [address for address, _group in answer.addresses]
    probe.exchange += f' → {", ".join(addresses)}'
    if expected not in addresses:
        probe.decide('protocol_error', f'name resolves to {", ".join(addresses)}, not {expected}')
        return
    probe.decide('ok', f'name registered at {expected}')


def _probe_datagram_service(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    options = target.options
    workgroup = str(options.get('workgroup') or DEFAULT_WORKGROUP).upper()[:15]
    destination = NetbiosName(str(options.get('destination') or workgroup).upper()[:15], 0x1D)
    source = NetbiosName(str(options.get('source_name') or 'SAFEQ-LAB').upper()[:15], 0x00)
    server = _server_name(target)
    token = secrets.randbelow(1 << 32)
    # SOURCE_PORT names the datagram service port, which real nodes send from; the stub
    # answers to the UDP source anyway (see the module docstring).
    request = encode_datagram(DIRECT_UNIQUE, secrets.randbelow(0x8000), local_address_towards(target.host, reactor),
                              target.port, source, destination,
                              encode_mailslot(BROWSE_MAILSLOT, get_backup_list_request(token)))
    exchange = f'NetBIOS datagram {source} → {destination} GetBackupListRequest'
    exchange += ' (no TLS in NetBIOS)' if target.security == 'optional' else ''

    def judge(probe: DatagramProbe, data: bytes) -> None:
        try:
            reply = decode_datagram(data)
            if reply.msg_type == DATAGRAM_ERROR:
                meaning = ' (destination name not present)' if reply.error_code == ERROR_NAME_NOT_PRESENT else ''
                probe.decide('protocol_error', f'DATAGRAM ERROR 0x{reply.error_code:02x}{meaning}')
                return
            if reply.msg_type != DIRECT_UNIQUE or not reply.destination.same(source):
                probe.decide('protocol_error', f'unexpected {DGM_TYPES[reply.msg_type]} datagram')
                return
            mailslot, payload = decode_mailslot(reply.user_data)
            answered_token, servers = decode_backup_list_response(payload)
        except (MalformedPacket, KeyError, struct.error, OSError) as exc:
            probe.decide('protocol_error', f'undecodable datagram reply: {exc}')
            return
        if answered_token != token:
            return   # a reply to some other request: keep waiting
        probe.exchange += f' → GetBackupListResponse [{", ".join(servers)}] from {reply.source}'
        if mailslot.upper() != BROWSE_MAILSLOT:
            probe.decide('protocol_error', f'reply on mailslot {mailslot!r}, not {BROWSE_MAILSLOT}')
        elif server and server not in (s.upper() for s in servers):
            probe.decide('protocol_error', f'backup list {servers} does not name {server}')
        else:
            probe.decide('ok', f'{reply.source} answered with token {token:#010x}')

    return DatagramProbe(reactor, target, exchange, request, judge).start()


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Resolve the server's NetBIOS name (netbios-ns) or ask it for its backup browser list
    through the datagram service (netbios-dgm)."""
    exchange = f'{target.protocol}/{target.transport}'
    try:
        if target.transport != 'udp':
            raise ValueError(f'{target.protocol} runs over udp, not {target.transport}')
        if target.protocol == 'netbios-ns':
            return _probe_name_service(reactor, target)
        if target.protocol == 'netbios-dgm':
            return _probe_datagram_service(reactor, target)
        raise ValueError(f'netbios cannot probe protocol {target.protocol!r}')
    except Exception as exc:
        return crashed(target, exchange, exc)
