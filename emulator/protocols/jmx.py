"""``jmx``: the RMI registry of a JMX agent, spoken in Java RMI's JRMP (server stub and client probe).

A JMX agent started with ``-Dcom.sun.management.jmxremote.port=P`` publishes an RMI registry on P
in which the connector server is bound as ``jmxrmi``. Clients (jconsole, VisualVM, ProactiveCare
monitoring) first talk JRMP to that registry. No Python library speaks JRMP or writes Java
serialization for RMI, so both are hand-written here, kept to what a registry needs.

Real (Java RMI wire protocol, docs.oracle.com/javase/8/docs/platform/rmi/spec/rmi-protocol3.html)::

    client  'JRMI' version:u16=2 protocol:u8     0x4b StreamProtocol | 0x4c SingleOpProtocol
    server  0x4e ProtocolAck  host:UTF port:i32   the client's endpoint as the server sees it
                                                  (0x4d MultiplexProtocol -> 0x4f ProtocolNotSupported)
    client  host:UTF port:i32                     the client's own endpoint (StreamProtocol only)
    client  0x50 Call       + serialization stream: ac ed 00 05, TC_BLOCKDATA
                              [ObjID: objNum:i64 unique:i32 time:i64 count:i16] op:i32 hash:i64, args
    server  0x51 ReturnData + serialization stream: ac ed 00 05, TC_BLOCKDATA
                              [0x01 NormalReturn, UID: unique:i32 time:i64 count:i16], result
    client  0x52 Ping       -> server 0x53 PingAck
    client  0x54 DgcAck UID -> no answer

The registry is ObjID 0 with interface hash 0x44154dc9d4e63bdf (``RegistryImpl_Stub``); ops
1 ``list()`` and 2 ``lookup(String)`` are served. ``list()`` returns a ``String[]`` written as
Java's ``MarshalOutputStream`` does: TC_ARRAY, class descriptor ``[Ljava.lang.String;`` with
serialVersionUID 0xadd256e7e91d7b47, its codebase annotation (TC_NULL, TC_ENDBLOCKDATA), no
superclass, the length and one TC_STRING per name. ``lookup`` of a bound name returns a dynamic
proxy stub (interfaces ``java.rmi.Remote`` and ``javax.management.remote.rmi.RMIServer``,
``RemoteObjectInvocationHandler`` holding a ``UnicastRef`` to this host and port), as a JMX
agent started with ``com.sun.management.jmxremote.rmi.port`` equal to its registry port does.
One connection carries any number of calls (StreamProtocol) or exactly one (SingleOpProtocol).

Invented: the bound names (``jmxrmi`` is real; the second, ``safeq-lab/<persona host>``, names
the host so a listing proves who answered); the exported objects are not served (a call on any
other ObjID, e.g. ``RMIServer.newClient`` or DGC ``dirty``, closes the connection); ``lookup``
of an unbound name and ``bind``/``rebind``/``unbind`` close the connection where a real
registry would return a serialized ``NotBoundException`` / ``AccessException``. Modified UTF-8
is decoded as UTF-8 with replacement. Anything that is not JRMP (wrong magic or version, an
unknown message, a malformed call, a buffer over ``MAX_BUFFER``) closes the connection, as a
JVM does.

Witness records (``on_request``): ``op`` ``list`` (``names``), ``lookup`` (``name``,
``bound``), ``ping``; each with ``rmi_protocol`` (``stream``/``single-op``) and the
``client_endpoint`` the client announced.

The probe does the StreamProtocol handshake (the ProtocolAck names the probe's address as the
server saw it: ``peer_seen``), calls ``list()``, checks the names (``jmxrmi`` or
``options['expect']``, and the ``safeq-lab/<host>`` name must be ``target.server_name``'s
host), then pings. nmap's ``-sV`` (java-rmi) and ``rmi-dumpregistry`` script are the real
clients the interop test uses.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .codec import ByteReader
from .probing import OnRequest, StreamClient, StreamProbe, crashed, error_result
from .serving import StubConnection, StubFactory, listen_plain_tcp

PROTOCOL_IDS = ('jmx',)

# --- JRMP transport constants (sun.rmi.transport.TransportConstants) ---------------------
MAGIC = b'JRMI'
VERSION = 2
STREAM_PROTOCOL = 0x4b
SINGLE_OP_PROTOCOL = 0x4c
MULTIPLEX_PROTOCOL = 0x4d
PROTOCOL_ACK = 0x4e
PROTOCOL_NOT_SUPPORTED = 0x4f
CALL = 0x50
RETURN_DATA = 0x51
PING = 0x52
PING_ACK = 0x53
DGC_ACK = 0x54
NORMAL_RETURN = 0x01

REGISTRY_OBJ_NUM = 0
REGISTRY_INTERFACE_HASH = 0x44154dc9d4e63bdf
REGISTRY_OPS = {0: 'bind', 1: 'list', 2: 'lookup', 3: 'rebind', 4: 'unbind'}
JMX_CONNECTOR_NAME = 'jmxrmi'
NAME_PREFIX = 'safeq-lab/'        # invented: the persona-specific bound name
MAX_BUFFER = 64 << 10             # a registry call is a few hundred bytes
MAX_NAMES = 1024                  # longest String[] the probe accepts

# --- Java object serialization (java.io.ObjectStreamConstants) ---------------------------
STREAM_HEADER = b'\xac\xed\x00\x05'
TC_NULL = 0x70
TC_REFERENCE = 0x71
TC_CLASSDESC = 0x72
TC_OBJECT = 0x73
TC_STRING = 0x74
TC_ARRAY = 0x75
TC_BLOCKDATA = 0x77
TC_ENDBLOCKDATA = 0x78
TC_BLOCKDATALONG = 0x7a
TC_PROXYCLASSDESC = 0x7d
SC_WRITE_METHOD = 0x01
SC_SERIALIZABLE = 0x02

STRING_ARRAY_CLASS = '[Ljava.lang.String;'
STRING_ARRAY_SUID = struct.unpack('>q', bytes.fromhex('add256e7e91d7b47'))[0]
PROXY_SUID = struct.unpack('>q', bytes.fromhex('e127da20cc1043cb'))[0]           # java.lang.reflect.Proxy
REMOTE_OBJECT_SUID = struct.unpack('>q', bytes.fromhex('d361b4910c61331e'))[0]   # java.rmi.server.RemoteObject
INVOCATION_HANDLER_SUID = 2                                                      # RemoteObjectInvocationHandler
STUB_INTERFACES = ('java.rmi.Remote', 'javax.management.remote.rmi.RMIServer')


class JrmpError(ValueError):
    """Bytes that are not the JRMP (or Java serialization) this module speaks."""


class _Incomplete(Exception):
    """More bytes are needed before the message can be read."""


# --- codec: writing ------------------------------------------------------------------------

def java_utf(text: str) -> bytes:
    """Java's modified UTF-8 (DataOutput.writeUTF): u16 length, NUL as two bytes (0xc0 0x80), astral characters
    as surrogate pairs."""
    out = bytearray()
    units = text.encode('utf-16-be', 'surrogatepass')
    for index in range(0, len(units), 2):
        unit = int.from_bytes(units[index:index + 2], 'big')
        if 0 < unit < 0x80:
            out.append(unit)
        elif unit < 0x800:
            out += bytes((0xc0 | unit >> 6, 0x80 | unit & 0x3f))
        else:
            out += bytes((0xe0 | unit >> 12, 0x80 | unit >> 6 & 0x3f, 0x80 | unit & 0x3f))
    if len(out) > 0xffff:
        raise ValueError('string too long for writeUTF')
    return struct.pack('>H', len(out)) + out


def protocol_header(protocol: int = STREAM_PROTOCOL) -> bytes:
    return MAGIC + struct.pack('>HB', VERSION, protocol)


def endpoint(host: str, port: int) -> bytes:
    """An EndpointIdentifier: host UTF + port int."""
    return java_utf(host) + struct.pack('>i', port)


def protocol_ack(host: str, port: int) -> bytes:
    return bytes((PROTOCOL_ACK,)) + endpoint(host, port)


@dataclass(frozen=True)
class ObjID:
    """java.rmi.server.ObjID: object number and the UID of the VM that exported it."""

    number: int
    unique: int = 0
    time: int = 0
    count: int = 0

    def encode(self) -> bytes:
        return struct.pack('>qiqh', self.number, self.unique, self.time, self.count)


def _block(data: bytes) -> bytes:
    if len(data) < 256:
        return bytes((TC_BLOCKDATA, len(data))) + data
    return bytes((TC_BLOCKDATALONG,)) + struct.pack('>i', len(data)) + data


def call(target: ObjID, op: int, interface_hash: int, arguments: bytes = b'') -> bytes:
    """A Call message as sun.rmi.transport.StreamRemoteCall writes it."""
    header = target.encode() + struct.pack('>iq', op, interface_hash)
    return bytes((CALL,)) + STREAM_HEADER + _block(header) + arguments


def string_object(text: str) -> bytes:
    return bytes((TC_STRING,)) + java_utf(text)


def return_data(result: bytes, uid: ObjID) -> bytes:
    """A ReturnData message with a normal return of ``result`` (serialized content)."""
    # The UID is the 14 bytes after an ObjID's number: unique, time, count.
    return (bytes((RETURN_DATA,)) + STREAM_HEADER
            + _block(bytes((NORMAL_RETURN,)) + uid.encode()[8:]) + result)


def _class_desc(name: str, suid: int, flags: int, fields: bytes = b'', field_count: int = 0,
                superclass: bytes = bytes((TC_NULL,))) -> bytes:
    # TC_NULL TC_ENDBLOCKDATA: MarshalOutputStream.annotateClass writes the (null) codebase.
    return (bytes((TC_CLASSDESC,)) + java_utf(name) + struct.pack('>qBH', suid, flags, field_count)
            + fields + bytes((TC_NULL, TC_ENDBLOCKDATA)) + superclass)


def string_array(names: list[str]) -> bytes:
    """A serialized String[] (TC_ARRAY)."""
    return (bytes((TC_ARRAY,)) + _class_desc(STRING_ARRAY_CLASS, STRING_ARRAY_SUID, SC_SERIALIZABLE)
            + struct.pack('>i', len(names)) + b''.join(string_object(n) for n in names))


def remote_stub(host: str, port: int, target: ObjID, interfaces=STUB_INTERFACES) -> bytes:
    """A serialized dynamic-proxy stub whose UnicastRef points at ``host``:``port``, ``target``."""
    proxy_desc = (bytes((TC_PROXYCLASSDESC,)) + struct.pack('>i', len(interfaces))
                  + b''.join(java_utf(i) for i in interfaces) + bytes((TC_NULL, TC_ENDBLOCKDATA))
                  + _class_desc('java.lang.reflect.Proxy', PROXY_SUID, SC_SERIALIZABLE,
                                fields=b'L' + java_utf('h')
                                + string_object('Ljava/lang/reflect/InvocationHandler;'),
                                field_count=1))
    remote_object = _class_desc('java.rmi.server.RemoteObject', REMOTE_OBJECT_SUID,
                                SC_SERIALIZABLE | SC_WRITE_METHOD)
    handler_desc = _class_desc('java.rmi.server.RemoteObjectInvocationHandler', INVOCATION_HANDLER_SUID,
                               SC_SERIALIZABLE, superclass=remote_object)
    # RemoteObject.writeObject: ref class name, then LiveRef.write: endpoint, ObjID,
    # isResultStream (true: the stub travels in a return value).
    ref = java_utf('UnicastRef') + endpoint(host, port) + target.encode() + b'\x01'
    handler = bytes((TC_OBJECT,)) + handler_desc + _block(ref) + bytes((TC_ENDBLOCKDATA,))
    return bytes((TC_OBJECT,)) + proxy_desc + handler


# --- codec: reading ------------------------------------------------------------------------

class _Reader(ByteReader):
    """Reads big-endian values from a buffer; _Incomplete when it runs out."""

    def short(self, count: int) -> Exception:
        return _Incomplete()   # a stream: the rest of the message is still to come

    def byte(self) -> int:
        return self.take(1)[0]

    def utf(self) -> str:
        return self.take(self.unpack('>H')).decode('utf-8', 'replace')

    def expect(self, wanted: bytes, what: str) -> None:
        got = self.take(len(wanted))
        if got != wanted:
            raise JrmpError(f'expected {what}, got {got.hex()}')

    def block(self) -> bytes:
        """One TC_BLOCKDATA / TC_BLOCKDATALONG's content."""
        tag = self.byte()
        if tag == TC_BLOCKDATA:
            return self.take(self.byte())
        if tag == TC_BLOCKDATALONG:
            length = self.unpack('>i')
            if not 0 <= length <= MAX_BUFFER:
                raise JrmpError(f'block data of {length} B')
            return self.take(length)
        raise JrmpError(f'expected block data, got type 0x{tag:02x}')

    def string(self) -> str:
        tag = self.byte()
        if tag != TC_STRING:
            raise JrmpError(f'expected a String (TC_STRING), got type 0x{tag:02x}')
        return self.utf()


@dataclass(frozen=True)
class Call:
    """A decoded registry Call: target object, operation, hash and (for lookup) the name."""

    target: ObjID
    op: int
    interface_hash: int
    name: str | None = None

    @property
    def registry_op(self) -> str | None:
        """'list' / 'lookup' / ... for a call on the registry, else None."""
        if self.target.number != REGISTRY_OBJ_NUM or self.interface_hash != REGISTRY_INTERFACE_HASH:
            return None
        return REGISTRY_OPS.get(self.op)


def read_message(reader: _Reader):
    """One client message after the handshake: 'ping', 'dgc-ack' or a Call."""
    kind = reader.byte()
    if kind == PING:
        return 'ping'
    if kind == DGC_ACK:
        reader.take(14)
        return 'dgc-ack'
    if kind != CALL:
        raise JrmpError(f'unknown JRMP message 0x{kind:02x}')
    reader.expect(STREAM_HEADER, 'the serialization stream header ac ed 00 05')
    header = _Reader(reader.block())
    try:
        target = ObjID(*header.unpack('>qiqh'))
        op, interface_hash = header.unpack('>iq')
    except _Incomplete:
        raise JrmpError('call header shorter than ObjID + op + hash') from None
    found = Call(target, op, interface_hash)
    if found.registry_op == 'lookup':
        return Call(target, op, interface_hash, reader.string())
    return found


def _skip_annotation(reader: _Reader) -> None:
    """A class annotation: TC_NULL or block data up to TC_ENDBLOCKDATA."""
    while True:
        tag = reader.byte()
        if tag == TC_ENDBLOCKDATA:
            return
        if tag == TC_NULL:
            continue
        if tag in (TC_BLOCKDATA, TC_BLOCKDATALONG):
            reader.pos -= 1
            reader.block()
            continue
        raise JrmpError(f'unexpected type 0x{tag:02x} in a class annotation')


def read_string_array(reader: _Reader) -> list[str]:
    """A serialized String[] as ``string_array`` (or a JVM) writes it."""
    if reader.byte() != TC_ARRAY or reader.byte() != TC_CLASSDESC:
        raise JrmpError('result is not an array with a class descriptor')
    name = reader.utf()
    suid, _flags, field_count = reader.unpack('>qBH')
    if name != STRING_ARRAY_CLASS or suid != STRING_ARRAY_SUID or field_count:
        raise JrmpError(f'result is a {name} (serialVersionUID {suid:#x}), not a String[]')
    _skip_annotation(reader)
    if reader.byte() != TC_NULL:
        raise JrmpError('String[] with a superclass descriptor')
    length = reader.unpack('>i')
    if not 0 <= length <= MAX_NAMES:
        raise JrmpError(f'String[] of {length} elements')
    return [reader.string() for _ in range(length)]


def read_return(reader: _Reader) -> _Reader:
    """The ReturnData header; the reader is left at the result. JrmpError for an exception."""
    kind = reader.byte()
    if kind != RETURN_DATA:
        raise JrmpError(f'expected ReturnData (0x51), got 0x{kind:02x}')
    reader.expect(STREAM_HEADER, 'the serialization stream header ac ed 00 05')
    header = reader.block()
    if not header or header[0] != NORMAL_RETURN:
        raise JrmpError('the registry threw an exception (ExceptionalReturn)')
    return reader


def bound_names(persona: Persona) -> list[str]:
    return [JMX_CONNECTOR_NAME, f'{NAME_PREFIX}{persona.host}']


# --- server stub -----------------------------------------------------------------------------

class _RegistryServer(StubConnection, Protocol):
    def __init__(self, factory: _RegistryFactory) -> None:
        self.factory = factory
        self.buffer = b''
        self.state = 'header'          # header -> endpoint -> messages; single (one message) (and ``closing``)
        self.rmi_protocol = ''
        self.client_endpoint = ''

    def dataReceived(self, data: bytes) -> None:
        if not self.buffered(data):
            return
        try:
            while not self.closing and self.buffer:
                reader = _Reader(self.buffer)
                try:
                    getattr(self, f'_read_{self.state}')(reader)
                except _Incomplete:
                    if len(self.buffer) > MAX_BUFFER:
                        raise JrmpError(f'no complete message in {MAX_BUFFER} B') from None
                    return
                self.buffer = self.buffer[reader.pos:]
        except JrmpError:
            self.hang_up()   # a JVM drops a connection it cannot parse; nothing to answer

    def _read_header(self, reader: _Reader) -> None:
        reader.expect(MAGIC, "the 'JRMI' magic")
        version, protocol = reader.unpack('>HB')
        if version != VERSION:
            raise JrmpError(f'JRMP version {version}')
        if protocol == STREAM_PROTOCOL:
            self.rmi_protocol, self.state = 'stream', 'endpoint'
            peer = self.transport.getPeer()
            self.transport.write(protocol_ack(peer.host, peer.port))
        elif protocol == SINGLE_OP_PROTOCOL:
            self.rmi_protocol, self.state = 'single-op', 'single'
        elif protocol == MULTIPLEX_PROTOCOL:
            self.transport.write(bytes((PROTOCOL_NOT_SUPPORTED,)))
            self.hang_up()
        else:
            raise JrmpError(f'unknown JRMP protocol 0x{protocol:02x}')

    def _read_endpoint(self, reader: _Reader) -> None:
        host = reader.utf()
        port = reader.unpack('>i')
        self.client_endpoint = f'{host[:64]}:{port}'
        self.state = 'messages'

    def _read_single(self, reader: _Reader) -> None:
        self._read_messages(reader)
        self.hang_up()

    def _read_messages(self, reader: _Reader) -> None:
        message = read_message(reader)
        if message == 'ping':
            self.transport.write(bytes((PING_ACK,)))
            self.report_request('ping')
        elif isinstance(message, Call):
            self._answer(message)

    def _answer(self, message: Call) -> None:
        op = message.registry_op
        names = self.factory.names
        if op == 'list':
            self.transport.write(return_data(string_array(names), self.factory.uid))
            self.report_request('list', names=names)
        elif op == 'lookup' and message.name in names:
            local = self.transport.getHost()
            stub = remote_stub(local.host, local.port, self.factory.exported[message.name])
            self.transport.write(return_data(stub, self.factory.uid))
            self.report_request('lookup', name=message.name, bound=True)
        elif op == 'lookup':
            self.report_request('lookup', name=message.name[:128], bound=False)
            self.hang_up()   # invented: a registry would return a serialized NotBoundException
        else:
            raise JrmpError(f'call op {message.op} on ObjID {message.target.number} is not served')

    def request_fields(self) -> dict[str, Any]:
        return {'rmi_protocol': self.rmi_protocol, 'client_endpoint': self.client_endpoint}


class _RegistryFactory(StubFactory):
    protocol = _RegistryServer

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None) -> None:
        super().__init__(reactor, persona, on_request)
        self.names = bound_names(persona)
        # One exporting "VM" per listener: its UID and one ObjID per bound object.
        started = int(reactor.seconds() * 1000)
        self.uid = ObjID(0, secrets.randbits(31), started, 0)
        self.exported = {name: ObjID(secrets.randbits(63), self.uid.unique, started, 0)
                         for name in self.names}


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve the RMI registry on ``listener`` (plain TCP: JMX here has no TLS)."""
    return listen_plain_tcp(reactor, listener, _RegistryFactory(reactor, persona, on_request),
                            'jmx (RMI registry)', interface)


# --- client probe ------------------------------------------------------------------------------

def expected_names(target: ProbeTarget) -> list[str]:
    expect = target.options.get('expect')
    if expect is None:
        return [JMX_CONNECTOR_NAME]
    if not isinstance(expect, list) or not all(isinstance(n, str) for n in expect):
        raise ValueError(f'options.expect must be a list of names, got {expect!r}')
    return expect


def host_matches(host: str, server_name: str) -> bool:
    return not server_name or host == server_name or server_name.startswith(host + '.')


class _RegistryClient(StreamClient):
    """Handshake, list(), ping; each step waits for its answer in ``buffer``."""

    def __init__(self, target: ProbeTarget, expect: list[str]) -> None:
        self.target = target
        self.expect = expect
        self.buffer = b''
        self.step = 'ack'
        self.peer_seen: str | None = None
        self.names: list[str] = []

    def begin(self) -> None:
        self.probe.stage = 'waiting for the ProtocolAck'
        self.transport.write(protocol_header(STREAM_PROTOCOL))

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.probe.result is not None:
            return
        reader = _Reader(self.buffer)
        try:
            getattr(self, f'_on_{self.step}')(reader)
        except _Incomplete:
            if len(self.buffer) > MAX_BUFFER:
                self._fail(f'no complete answer in {MAX_BUFFER} B')
            return
        except JrmpError as exc:
            self._fail(str(exc))
            return
        self.buffer = self.buffer[reader.pos:]

    def _fail(self, detail: str) -> None:
        self.probe.decide('protocol_error', f'{detail} ({self.probe.stage})', peer_seen=self.peer_seen)

    def _on_ack(self, reader: _Reader) -> None:
        kind = reader.byte()
        if kind == PROTOCOL_NOT_SUPPORTED:
            raise JrmpError('server answered ProtocolNotSupported (0x4f)')
        if kind != PROTOCOL_ACK:
            raise JrmpError(f'expected ProtocolAck (0x4e), got 0x{kind:02x}: not JRMP')
        self.peer_seen = reader.utf()
        reader.unpack('>i')
        local = self.transport.getHost()
        self.transport.write(endpoint(local.host, 0)
                             + call(ObjID(REGISTRY_OBJ_NUM), 1, REGISTRY_INTERFACE_HASH))
        self.step, self.probe.stage = 'list', 'waiting for the list() ReturnData'

    def _on_list(self, reader: _Reader) -> None:
        self.names = read_string_array(read_return(reader))
        missing = [name for name in self.expect if name not in self.names]
        listed = ', '.join(self.names) or 'no names'
        if missing:
            raise JrmpError(f'registry lists {listed}; missing {", ".join(missing)}')
        hosts = [n[len(NAME_PREFIX):] for n in self.names if n.startswith(NAME_PREFIX)]
        if hosts and not host_matches(hosts[0], self.target.server_name):
            raise JrmpError(f'registry of {hosts[0]} answered, expected {self.target.server_name}')
        self.host = hosts[0] if hosts else None
        self.transport.write(bytes((PING,)))
        self.step, self.probe.stage = 'ping', 'waiting for the PingAck'

    def _on_ping(self, reader: _Reader) -> None:
        kind = reader.byte()
        if kind != PING_ACK:
            raise JrmpError(f'expected PingAck (0x53), got 0x{kind:02x}')
        self.probe.exchange += f' → {", ".join(self.names)}'
        who = f'registry of {self.host}' if self.host else 'a registry that did not say whose it is'
        self.probe.decide('ok', f'{who} lists {len(self.names)} names; ping acknowledged',
                          peer_seen=self.peer_seen)

    def lost_detail(self, reason) -> str:
        return f'connection closed while {self.probe.stage}: {reason.getErrorMessage()}'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """JRMP handshake, registry ``list()`` (names checked) and a ping; always fires."""
    exchange = 'JRMP handshake + registry list() + ping'
    try:
        if target.transport != 'tcp':
            return error_result(target, exchange, f'jmx (RMI) runs over tcp, not {target.transport}')
        client = _RegistryClient(target, expected_names(target))
    except ValueError as exc:
        return error_result(target, exchange, str(exc))
    try:
        return StreamProbe(reactor, target, exchange).start(client)
    except Exception as exc:
        return crashed(target, exchange, exc)


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'JrmpError', 'Call', 'ObjID', 'call', 'return_data',
           'string_array', 'read_string_array', 'read_return', 'read_message', 'remote_stub',
           'protocol_header', 'protocol_ack', 'endpoint', 'java_utf', 'bound_names']
