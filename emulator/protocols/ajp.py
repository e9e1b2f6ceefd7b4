"""``ajp``: the container side of the Apache JServ Protocol 1.3 (server stub and client probe).

A web server (Apache mod_jk / mod_proxy_ajp, IIS isapi_redirect) forwards HTTP requests to a
servlet container (Tomcat's AJP connector) over AJP13. No maintained Python library serves or
speaks AJP13 (``ajpy`` is an unmaintained client-side packet crafter), so the codec is
hand-written here (spec: tomcat.apache.org/connectors-doc/ajp/ajpv13a.html).

Real (AJP13 wire format)::

    web server -> container   0x12 0x34 length:u16 payload         (payload <= 8186 B)
    container  -> web server  'A' 'B'   length:u16 payload
    string = length:u16 bytes 0x00   (length 0xffff = null, no bytes, no terminator)

    payload type  2 FORWARD_REQUEST  method:u8 protocol uri remote_addr remote_host server_name
                                     server_port:u16 is_ssl:u8 num_headers:u16
                                     (name | 0xA0nn code) value ...  attributes ... 0xff
                  10 CPING           -> 9 CPONG ('AB' 00 01 09)
    container     4 SEND_HEADERS     status:u16 message num_headers:u16 (name | 0xA0nn) value ...
                  3 SEND_BODY_CHUNK  length:u16 bytes 0x00
                  6 GET_BODY_CHUNK   requested:u16    (asks for the next request-body packet)
                  5 END_RESPONSE     reuse:u8

A request with a Content-Length gets its body as data packets (length:u16 + bytes) right
after the FORWARD_REQUEST; the stub counts them (GET_BODY_CHUNK for each further one) until
Content-Length bytes or an empty packet arrived, then answers. A packet whose magic is not
0x1234 (e.g. plain HTTP sent to the AJP port) or whose payload is malformed gets a
``400 Bad Request`` SEND_HEADERS + END_RESPONSE and the connection is closed, as nmap's
Apache JServ fingerprint of that case shows; a SHUTDOWN (7) packet or an unknown type is
closed without answer.

Invented: the application. Every path answers ``200 OK`` with a small HTML page naming the
persona (``safeq-lab <host> (<roles>): ...; peer=<client IP as seen>``); HEAD gets the
headers only; OPTIONS gets ``Allow: GET, HEAD, POST, OPTIONS``; other methods ``405``.

Witness records (``on_request``): ``op`` ``cping`` or ``forward-request`` with ``method``,
``uri``, ``status``, ``body_bytes`` (request body counted), ``remote_addr`` (the address the
web server forwarded), ``server_name``.

The probe sends a CPing (expects CPong), then a GET forward request for ``options['path']``
(default ``/``) on the same connection and is ``ok`` on a complete 200 response whose page
names ``target.server_name``'s host. nmap's ``-sV`` (ajp13) and ``ajp-methods``/``ajp-headers``
are the real clients the interop test uses.
"""

from __future__ import annotations

import html
import re
import struct
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .codec import ByteReader
from .probing import OnRequest, StreamClient, StreamProbe, crashed, error_result
from .serving import StubConnection, StubFactory, listen_plain_tcp

PROTOCOL_IDS = ('ajp',)

SERVER_MAGIC = b'\x12\x34'       # packets from the web server
CONTAINER_MAGIC = b'AB'          # packets from the container
MAX_PACKET = 8192                # whole packet, header included (the AJP default)
MAX_PAYLOAD = MAX_PACKET - 4
MAX_CHUNK = MAX_PACKET - 4 - 3 - 1   # SEND_BODY_CHUNK data per packet
NULL_STRING = 0xffff

FORWARD_REQUEST = 2
SEND_BODY_CHUNK = 3
SEND_HEADERS = 4
END_RESPONSE = 5
GET_BODY_CHUNK = 6
SHUTDOWN = 7
CPONG = 9
CPING = 10
ATTRIBUTES_DONE = 0xff

METHODS = ('OPTIONS', 'GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'TRACE', 'PROPFIND', 'PROPPATCH',
           'MKCOL', 'COPY', 'MOVE', 'LOCK', 'UNLOCK', 'ACL', 'REPORT', 'VERSION-CONTROL', 'CHECKIN',
           'CHECKOUT', 'UNCHECKOUT', 'SEARCH', 'MKWORKSPACE', 'UPDATE', 'LABEL', 'MERGE',
           'BASELINE-CONTROL', 'MKACTIVITY')                      # codes 1..27
REQUEST_HEADERS = ('accept', 'accept-charset', 'accept-encoding', 'accept-language', 'authorization',
                   'connection', 'content-type', 'content-length', 'cookie', 'cookie2', 'host',
                   'pragma', 'referer', 'user-agent')             # codes 0xA001..0xA00E
RESPONSE_HEADERS = ('Content-Type', 'Content-Language', 'Content-Length', 'Date', 'Last-Modified',
                    'Location', 'Set-Cookie', 'Set-Cookie2', 'Servlet-Engine', 'Status',
                    'WWW-Authenticate')                           # codes 0xA001..0xA00B
# Request attributes: code -> name; 0x0A carries its own name, 0x0B (ssl_key_size) is an integer.
ATTRIBUTES = {0x01: 'context', 0x02: 'servlet_path', 0x03: 'remote_user', 0x04: 'auth_type',
              0x05: 'query_string', 0x06: 'route', 0x07: 'ssl_cert', 0x08: 'ssl_cipher',
              0x09: 'ssl_session', 0x0a: 'req_attribute', 0x0b: 'ssl_key_size', 0x0c: 'secret',
              0x0d: 'stored_method'}
ALLOWED = ('GET', 'HEAD', 'POST', 'OPTIONS')
STATUS_TEXT = {200: 'OK', 400: 'Bad Request', 405: 'Method Not Allowed'}


class AjpError(ValueError):
    """Bytes that are not a well-formed AJP13 packet."""


class _Incomplete(Exception):
    """More bytes are needed."""


# --- codec -----------------------------------------------------------------------------------

def ajp_string(value: str | None) -> bytes:
    if value is None:
        return struct.pack('>H', NULL_STRING)
    data = value.encode('utf-8')
    if len(data) >= NULL_STRING:
        raise ValueError('AJP string too long')
    return struct.pack('>H', len(data)) + data + b'\x00'


def _coded_name(name: str, table: tuple[str, ...], case_insensitive: bool) -> bytes:
    key = name.lower() if case_insensitive else name
    names = [n.lower() for n in table] if case_insensitive else list(table)
    if key in names:
        return struct.pack('>H', 0xa001 + names.index(key))
    return ajp_string(name)


class _Reader(ByteReader):
    def short(self, count: int) -> Exception:
        return AjpError('payload ends inside a field')   # a packet is read whole: short is malformed

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return self.unpack('>H')

    def string(self) -> str | None:
        length = self.u16()
        if length == NULL_STRING:
            return None
        text = self.take(length).decode('utf-8', 'replace')
        if self.u8() != 0:
            raise AjpError('string without its 0x00 terminator')
        return text

    def name(self, table: tuple[str, ...]) -> str:
        """A header name: a 0xA0nn code from ``table`` or a string."""
        if self.pos + 2 <= len(self.data) and self.data[self.pos] == 0xa0:
            code = self.u16()
            if not 0xa001 <= code < 0xa001 + len(table):
                raise AjpError(f'unknown header code 0x{code:04x}')
            return table[code - 0xa001]
        return self.string() or ''


@dataclass
class ForwardRequest:
    """An AJP13 FORWARD_REQUEST (the HTTP request a web server forwards)."""

    method: str
    uri: str
    protocol: str = 'HTTP/1.1'
    remote_addr: str = ''
    remote_host: str | None = None
    server_name: str = ''
    server_port: int = 0           # the web server's port as the client used it (probe: the target's)
    is_ssl: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def encode(self) -> bytes:
        """The whole packet (magic, length, payload)."""
        if self.method not in METHODS:
            raise ValueError(f'AJP13 has no code for method {self.method!r}')
        payload = bytearray(struct.pack('>BB', FORWARD_REQUEST, METHODS.index(self.method) + 1))
        for text in (self.protocol, self.uri, self.remote_addr, self.remote_host, self.server_name):
            payload += ajp_string(text)
        payload += struct.pack('>HBH', self.server_port, self.is_ssl, len(self.headers))
        for name, value in self.headers:
            payload += _coded_name(name, REQUEST_HEADERS, case_insensitive=True) + ajp_string(value)
        codes = {name: code for code, name in ATTRIBUTES.items()}
        for name, value in self.attributes.items():
            if name in codes and name not in ('req_attribute', 'ssl_key_size'):
                payload += bytes((codes[name],)) + ajp_string(value)
            else:
                payload += bytes((0x0a,)) + ajp_string(name) + ajp_string(value)
        payload.append(ATTRIBUTES_DONE)
        return server_packet(bytes(payload))


def decode_forward_request(payload: bytes) -> ForwardRequest:
    """A FORWARD_REQUEST payload (type byte included); AjpError when malformed."""
    reader = _Reader(payload)
    if reader.u8() != FORWARD_REQUEST:
        raise AjpError('not a FORWARD_REQUEST')
    code = reader.u8()
    if not 1 <= code <= len(METHODS):
        raise AjpError(f'unknown method code {code}')
    protocol, uri, remote_addr, remote_host, server_name = (reader.string() for _ in range(5))
    server_port, is_ssl, count = reader.u16(), reader.u8(), reader.u16()
    headers = [(reader.name(REQUEST_HEADERS), reader.string() or '') for _ in range(count)]
    attributes: dict[str, str] = {}
    while True:
        attribute = reader.u8()
        if attribute == ATTRIBUTES_DONE:
            break
        if attribute not in ATTRIBUTES:
            raise AjpError(f'unknown attribute code 0x{attribute:02x}')
        name = ATTRIBUTES[attribute]
        if attribute == 0x0a:
            name = reader.string() or ''
        value = str(reader.u16()) if attribute == 0x0b else reader.string() or ''
        attributes[name] = value
    if uri is None or not uri.startswith('/'):
        raise AjpError(f'request URI {uri!r} is not a path')
    return ForwardRequest(METHODS[code - 1], uri, protocol or '', remote_addr or '', remote_host,
                          server_name or '', server_port, bool(is_ssl), headers, attributes)


def server_packet(payload: bytes) -> bytes:
    return SERVER_MAGIC + struct.pack('>H', len(payload)) + payload


def container_packet(payload: bytes) -> bytes:
    return CONTAINER_MAGIC + struct.pack('>H', len(payload)) + payload


def send_headers(status: int, headers: list[tuple[str, str]], message: str | None = None) -> bytes:
    payload = struct.pack('>BH', SEND_HEADERS, status) + ajp_string(message or STATUS_TEXT.get(status, ''))
    payload += struct.pack('>H', len(headers))
    for name, value in headers:
        payload += _coded_name(name, RESPONSE_HEADERS, case_insensitive=False) + ajp_string(value)
    return container_packet(payload)


def body_chunks(body: bytes) -> bytes:
    return b''.join(container_packet(struct.pack('>BH', SEND_BODY_CHUNK, len(chunk)) + chunk + b'\x00')
                    for chunk in (body[i:i + MAX_CHUNK] for i in range(0, len(body), MAX_CHUNK)))


def end_response(reuse: bool = True) -> bytes:
    return container_packet(struct.pack('>BB', END_RESPONSE, reuse))


CPING_PACKET = server_packet(bytes((CPING,)))
CPONG_PACKET = container_packet(bytes((CPONG,)))
# What a container answers to bytes that are no AJP request (nmap's ajp13 fingerprint of it).
BAD_REQUEST = send_headers(400, []) + end_response(True)


def split_packet(buffer: bytes, magic: bytes) -> tuple[bytes, bytes]:
    """(payload, rest) of the first packet in ``buffer``; _Incomplete or AjpError."""
    if len(buffer) < 4:
        if not magic.startswith(buffer[:2]):
            raise AjpError(f'bad magic {buffer[:2].hex()}')
        raise _Incomplete()
    if buffer[:2] != magic:
        raise AjpError(f'bad magic {buffer[:2].hex()}')
    length = struct.unpack('>H', buffer[2:4])[0]
    if length > MAX_PAYLOAD:
        raise AjpError(f'packet of {length} B exceeds {MAX_PAYLOAD} B')
    if len(buffer) < 4 + length:
        raise _Incomplete()
    return buffer[4:4 + length], buffer[4 + length:]


# --- server stub ------------------------------------------------------------------------------

def identity_line(persona: Persona, peer: str) -> str:
    return f'safeq-lab {persona.host} ({",".join(persona.roles)}): AJP/1.3 container; peer={peer}'


class _ContainerServer(StubConnection, Protocol):
    def __init__(self, factory: _ContainerFactory) -> None:
        self.factory = factory
        self.buffer = b''
        self.request: ForwardRequest | None = None   # set while its body is arriving
        self.body_left = 0
        self.body_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        if not self.buffered(data):
            return
        while not self.closing and self.buffer:
            try:
                payload, self.buffer = split_packet(self.buffer, SERVER_MAGIC)
                self._packet(payload)
            except _Incomplete:
                return
            except AjpError:
                self.transport.write(BAD_REQUEST)
                self.hang_up()

    def _packet(self, payload: bytes) -> None:
        if self.request is not None:
            return self._body_packet(payload)
        kind = payload[:1]
        if kind == bytes((CPING,)):
            self.transport.write(CPONG_PACKET)
            self.report_request('cping')
        elif kind == bytes((FORWARD_REQUEST,)):
            self._forward_request(decode_forward_request(payload))
        else:
            self.hang_up()   # SHUTDOWN, PING or unknown: nothing a container answers here
        return None

    def _forward_request(self, request: ForwardRequest) -> None:
        length = request.header('content-length') or '0'
        if not length.isdigit():
            raise AjpError(f'Content-Length {length[:20]!r}')
        self.body_left, self.body_bytes = int(length), 0
        if self.body_left:
            self.request = request   # the body follows in data packets
        else:
            self._respond(request)

    def _body_packet(self, payload: bytes) -> None:
        if payload:
            if len(payload) < 2 or struct.unpack('>H', payload[:2])[0] != len(payload) - 2:
                raise AjpError('body packet length does not match its data')
            self.body_bytes += len(payload) - 2
            self.body_left = max(0, self.body_left - (len(payload) - 2))
        if payload and self.body_left:
            self.transport.write(container_packet(struct.pack('>BH', GET_BODY_CHUNK,
                                                              min(self.body_left, MAX_CHUNK))))
            return
        request, self.request = self.request, None
        self._respond(request)

    def _respond(self, request: ForwardRequest) -> None:
        persona = self.factory.persona
        if request.method == 'OPTIONS':
            status, headers, body = 200, [('Allow', ', '.join(ALLOWED)), ('Content-Length', '0')], b''
        elif request.method in ALLOWED:
            page = (f'<!DOCTYPE html><html><head><title>{html.escape(persona.host)}</title></head>'
                    f'<body><h1>{html.escape(identity_line(persona, self.peer))}</h1>'
                    f'<p>{html.escape(request.method)} {html.escape(request.uri)}</p></body></html>\n')
            body = page.encode('utf-8')
            status, headers = 200, [('Content-Type', 'text/html;charset=UTF-8'),
                                    ('Content-Length', str(len(body)))]
            if request.method == 'HEAD':
                body = b''
        else:
            status, headers, body = 405, [('Allow', ', '.join(ALLOWED)), ('Content-Length', '0')], b''
        self.transport.write(send_headers(status, headers) + body_chunks(body) + end_response(True))
        self.report_request('forward-request', method=request.method, uri=request.uri[:256], status=status,
                            body_bytes=self.body_bytes, remote_addr=request.remote_addr[:64],
                            server_name=request.server_name[:128])


class _ContainerFactory(StubFactory):
    protocol = _ContainerServer


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve AJP13 on ``listener`` (plain TCP: AJP has no TLS of its own)."""
    return listen_plain_tcp(reactor, listener, _ContainerFactory(reactor, persona, on_request),
                            'ajp', interface)


# --- client probe ------------------------------------------------------------------------------

@dataclass
class Response:
    """A container's answer, as the probe collects it."""

    status: int = 0
    message: str = ''
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b''
    complete: bool = False


def read_container_packet(payload: bytes, response: Response) -> None:
    """Add one container packet to ``response``; AjpError for what a container never sends."""
    reader = _Reader(payload)
    kind = reader.u8()
    if kind == SEND_HEADERS:
        response.status = reader.u16()
        response.message = reader.string() or ''
        response.headers = [(reader.name(RESPONSE_HEADERS), reader.string() or '')
                            for _ in range(reader.u16())]
    elif kind == SEND_BODY_CHUNK:
        response.body += reader.take(reader.u16())
    elif kind == END_RESPONSE:
        response.complete = True
    elif kind == GET_BODY_CHUNK:
        raise AjpError('container asked for a request body the probe did not announce')
    else:
        raise AjpError(f'unexpected container packet type {kind}')


_IDENTITY = re.compile(r'safeq-lab (?P<host>\S+) \((?P<roles>[^)]*)\): [^;<]*; peer=(?P<peer>[^<\s]+)')


class _WebServerClient(StreamClient):
    """CPing, then one GET forward request, on one connection."""

    def __init__(self, target: ProbeTarget, path: str) -> None:
        self.target = target
        self.path = path
        self.buffer = b''
        self.step = 'cpong'
        self.response = Response()

    def begin(self) -> None:
        self.probe.stage = 'waiting for the CPong'
        self.transport.write(CPING_PACKET)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.probe.result is None and self.buffer:
            try:
                payload, self.buffer = split_packet(self.buffer, CONTAINER_MAGIC)
                getattr(self, f'_on_{self.step}')(payload)
            except _Incomplete:
                return
            except AjpError as exc:
                self.probe.decide('protocol_error', f'{exc} ({self.probe.stage})')
                return

    def _on_cpong(self, payload: bytes) -> None:
        if payload != bytes((CPONG,)):
            raise AjpError(f'expected CPong, got {payload[:16].hex()}')
        local, peer = self.transport.getHost(), self.transport.getPeer()
        name = self.target.server_name or self.target.host
        request = ForwardRequest('GET', self.path, remote_addr=local.host, server_name=name,
                                 server_port=peer.port,
                                 headers=[('host', name), ('user-agent', 'safeq-lab probe')])
        self.transport.write(request.encode())
        self.step, self.probe.stage = 'response', 'waiting for the GET response'

    def _on_response(self, payload: bytes) -> None:
        read_container_packet(payload, self.response)
        if self.response.complete:
            self._judge()

    def _judge(self) -> None:
        response = self.response
        self.probe.exchange += f' → {response.status} {response.message}'
        if response.status != 200:
            raise AjpError(f'GET {self.path} answered {response.status} {response.message}')
        found = _IDENTITY.search(response.body.decode('utf-8', 'replace'))
        if found is None:
            self.probe.decide('ok', f'200 with {len(response.body)} B from a container that did not '
                                    f'say who it is')
            return
        host = found['host']
        name = self.target.server_name
        if name and host != name and not name.startswith(host + '.'):
            raise AjpError(f'page of {host} answered, expected {name}')
        self.probe.decide('ok', f'200 with {len(response.body)} B from {host} ({found["roles"]})',
                          peer_seen=found['peer'])

    def lost_detail(self, reason) -> str:
        return f'connection closed while {self.probe.stage}: {reason.getErrorMessage()}'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """CPing -> CPong, then GET ``options['path']`` (default ``/``) -> 200; always fires."""
    path = target.options.get('path', '/')
    exchange = f'AJP13 CPing + GET {path}'
    if target.transport != 'tcp':
        return error_result(target, exchange, f'ajp runs over tcp, not {target.transport}')
    if not isinstance(path, str) or not path.startswith('/'):
        return error_result(target, exchange, f'options.path must be a path, got {path!r}')
    try:
        return StreamProbe(reactor, target, exchange).start(_WebServerClient(target, path))
    except Exception as exc:
        return crashed(target, exchange, exc)


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'AjpError', 'ForwardRequest', 'Response',
           'decode_forward_request', 'read_container_packet', 'split_packet', 'send_headers',
           'body_chunks', 'end_response', 'CPING_PACKET', 'CPONG_PACKET', 'BAD_REQUEST']
