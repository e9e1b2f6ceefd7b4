"""``amqp``: an AMQP 0-9-1 broker's connection handshake (server stub and client probe), usually
over implicit TLS (AMQPS).

Frames are encoded and decoded with ``pamqp`` (the maintained AMQP 0-9-1 codec under aiormq);
no maintained Python library has a broker side (pika, aiormq, py-amqp are clients), so the
broker's state machine is written here. Spec: AMQP 0-9-1 (amqp0-9-1.pdf, §4.2 and the class
reference); behaviour follows RabbitMQ where the spec leaves a choice.

Real (AMQP 0-9-1 wire protocol)::

    client  'AMQP' 0 0 9 1                      protocol header; any other header is answered
                                                with 'AMQP' 0 0 9 1 and a close (spec §4.2.2)
    frame   type:u8 channel:u16 size:u32 payload 0xCE     (1 method, 2 header, 3 body, 8 heartbeat)
    server  Connection.Start    version 0-9, server-properties, mechanisms 'PLAIN', locales 'en_US'
    client  Connection.StartOk  mechanism PLAIN, response '\\0user\\0password'
    server  Connection.Tune     channel-max, frame-max, heartbeat
    client  Connection.TuneOk, Connection.Open (virtual host)
    server  Connection.OpenOk
    client  Channel.Open (n)    -> Channel.OpenOk (n);  Channel.Close -> Channel.CloseOk
    client  Connection.Close    -> Connection.CloseOk, then the server closes the socket

A failed login gets ``Connection.Close 403 ACCESS_REFUSED`` (as RabbitMQ does), a method out of
order ``503 COMMAND_INVALID``, a frame over frame-max or with a bad end octet ``501
FRAME_ERROR``, any other method (Basic.Publish, Queue.Declare ...) ``540 NOT_IMPLEMENTED``;
each is followed by closing the socket at once (invented shortcut: a broker would wait for
Close-Ok). Heartbeat frames are accepted and ignored.

Invented: the broker. ``server-properties`` say ``product`` "safeq-lab AMQP broker", ``version``
0.9.1, ``cluster_name`` the persona's host and ``information`` "safeq-lab <host> (<roles>):
AMQP 0-9-1 stub; peer=<client IP as seen>", so a handshake proves which host answered. The lab
account is ``LAB_USER``/``LAB_PASSWORD``; any virtual host is opened. Tune proposes heartbeat 0
(none), so an idle client is dropped after ``IDLE_TIMEOUT``.

Security: ``tls`` listeners speak implicit TLS with the persona's certificate (AMQPS);
``plain`` is served too (AMQP's plain port, and nmap's ``amqp-info``, which cannot speak TLS).

Witness records (``on_request``): ``op`` ``login`` (``user``, ``accepted``), ``connection-open``
(``vhost``), ``channel-open`` / ``channel-close`` (``channel``), ``connection-close``; each with
``tls``.

The probe runs the handshake up to Connection.Open-Ok, opens channel 1, closes the connection
(Close-Ok expected) and checks that ``cluster_name`` is ``target.server_name``'s host; over
``tls`` the chain and name are verified (tls.client_creator). Options: ``user``, ``password``,
``vhost`` (default ``/``).
"""

from __future__ import annotations

import re
import struct
from typing import Any

from pamqp import commands, constants, frame, heartbeat
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from . import tls
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .probing import OnRequest, StreamClient, StreamProbe, crashed, error_result
from .serving import StubConnection, StubFactory

PROTOCOL_IDS = ('amqp',)

PROTOCOL_HEADER = b'AMQP\x00\x00\x09\x01'
FRAME_HEADER = struct.Struct('>BHI')
FRAME_END = 0xce
FRAME_MAX = 131072               # RabbitMQ's default frame-max
FRAME_MIN_SIZE = 4 << 10         # the spec's frame-min-size: no peer may ask for less
CHANNEL_MAX = 2047               # RabbitMQ's default channel-max
PRODUCT = 'safeq-lab AMQP broker'
VERSION = '0.9.1'
LAB_USER = 'safeq-edge'          # invented lab account
LAB_PASSWORD = 'edge-lab-pw'

# Reply codes (AMQP 0-9-1 constants).
REPLY_SUCCESS = 200
ACCESS_REFUSED = 403
FRAME_ERROR = 501
COMMAND_INVALID = 503
NOT_IMPLEMENTED = 540


class AmqpError(ValueError):
    """A frame or method the peer should not have sent; ``code`` is the AMQP reply code."""

    def __init__(self, code: int, text: str, method=None) -> None:
        super().__init__(text)
        self.code = code
        self.method = method


class _Incomplete(Exception):
    """More bytes are needed."""


# --- codec (framing around pamqp) --------------------------------------------------------------

def method_frame(method, channel: int = 0) -> bytes:
    return frame.marshal(method, channel)


def read_frame(buffer: bytes, frame_max: int = FRAME_MAX):
    """(bytes used, channel, frame object) of the first frame in ``buffer``.

    _Incomplete while the frame is still arriving; AmqpError(501) for a broken one.
    """
    if len(buffer) < FRAME_HEADER.size:
        raise _Incomplete()
    kind, channel, size = FRAME_HEADER.unpack_from(buffer)
    if size > frame_max:
        raise AmqpError(FRAME_ERROR, f'FRAME_ERROR - frame of {size} B exceeds frame-max {frame_max}')
    total = FRAME_HEADER.size + size + 1
    if len(buffer) < total:
        raise _Incomplete()
    if buffer[total - 1] != FRAME_END:
        raise AmqpError(FRAME_ERROR, 'FRAME_ERROR - frame end octet is not 0xCE')
    if kind == constants.FRAME_HEARTBEAT:
        return total, channel, heartbeat.Heartbeat()
    try:
        _used, _channel, value = frame.unmarshal(buffer[:total])
    except Exception as exc:   # pamqp's decoder on hostile bytes raises more than its own type
        raise AmqpError(FRAME_ERROR, f'FRAME_ERROR - undecodable frame: {type(exc).__name__}') from None
    return total, channel, value


def connection_close(error: AmqpError):
    """The Connection.Close a broker sends for ``error`` (naming the offending method, if any)."""
    index = getattr(error.method, 'index', 0) or 0
    return commands.Connection.Close(error.code, str(error)[:255], index >> 16, index & 0xffff)


def plain_response(user: str, password: str) -> str:
    return f'\0{user}\0{password}'


def parse_plain(response: str | bytes) -> tuple[str, str]:
    """(user, password) of a SASL PLAIN response ``[authzid] NUL user NUL password``."""
    text = response.decode('utf-8', 'replace') if isinstance(response, bytes) else str(response)
    parts = text.split('\0')
    if len(parts) != 3:
        raise AmqpError(ACCESS_REFUSED, 'ACCESS_REFUSED - malformed PLAIN response')
    return parts[1], parts[2]


def identity_line(persona: Persona, peer: str) -> str:
    return f'safeq-lab {persona.host} ({",".join(persona.roles)}): AMQP 0-9-1 stub; peer={peer}'


def server_properties(persona: Persona, peer: str) -> dict[str, Any]:
    # Strings, booleans and tables only: nmap's amqp library decodes no other field types.
    return {'product': PRODUCT, 'version': VERSION, 'platform': 'Python/Twisted',
            'cluster_name': persona.host, 'copyright': 'safeq-lab (emulated broker)',
            'information': identity_line(persona, peer),
            'capabilities': {'publisher_confirms': True, 'exchange_exchange_bindings': True,
                             'basic.nack': True, 'consumer_cancel_notify': True,
                             'connection.blocked': True, 'authentication_failure_close': True}}


# --- server stub -------------------------------------------------------------------------------

class _BrokerServer(StubConnection, Protocol):
    def __init__(self, factory: _BrokerFactory) -> None:
        self.factory = factory
        self.buffer = b''
        self.state = 'header'     # header -> start-ok -> tune-ok -> open -> opened (and ``closing``)
        self.channels: set[int] = set()
        self.frame_max = FRAME_MAX

    def dataReceived(self, data: bytes) -> None:
        if not self.buffered(data):
            return
        try:
            if self.state == 'header':
                self._header()
            while not self.closing and self.state != 'header' and self.buffer:
                used, channel, value = read_frame(self.buffer, self.frame_max)
                self.buffer = self.buffer[used:]
                self._frame(channel, value)
        except _Incomplete:
            return
        except AmqpError as exc:
            self.transport.write(method_frame(connection_close(exc)))
            self.hang_up()

    def _header(self) -> None:
        got = self.buffer[:len(PROTOCOL_HEADER)]
        if got != PROTOCOL_HEADER[:len(got)]:
            self.transport.write(PROTOCOL_HEADER)   # the version we speak, then close (spec §4.2.2)
            self.hang_up()
            return
        if len(got) < len(PROTOCOL_HEADER):
            raise _Incomplete()
        self.buffer = self.buffer[len(PROTOCOL_HEADER):]
        self.state = 'start-ok'
        self.transport.write(method_frame(commands.Connection.Start(
            0, 9, server_properties(self.factory.persona, self.peer), 'PLAIN', 'en_US')))

    def _frame(self, channel: int, value) -> None:
        if isinstance(value, heartbeat.Heartbeat):
            return
        name = getattr(value, 'name', type(value).__name__)
        handler = _HANDLERS.get((self.state, name))
        if handler is None:
            if self.state == 'opened' and name.split('.')[0] not in ('Connection', 'Channel'):
                raise AmqpError(NOT_IMPLEMENTED, f'NOT_IMPLEMENTED - {name} (safeq-lab stub broker)', value)
            raise AmqpError(COMMAND_INVALID, f'COMMAND_INVALID - {name} not expected now', value)
        if (channel != 0) != name.startswith('Channel.'):
            raise AmqpError(COMMAND_INVALID, f'COMMAND_INVALID - {name} on channel {channel}', value)
        handler(self, channel, value)

    def _start_ok(self, channel: int, method) -> None:
        if method.mechanism != 'PLAIN':
            raise AmqpError(ACCESS_REFUSED, f'ACCESS_REFUSED - mechanism {method.mechanism[:32]} '
                                            f'not offered', method)
        user, password = parse_plain(method.response)
        accepted = (user, password) == (LAB_USER, LAB_PASSWORD)
        self.report_request('login', user=user[:64], accepted=accepted)
        if not accepted:
            raise AmqpError(ACCESS_REFUSED, 'ACCESS_REFUSED - Login was refused using authentication '
                                            'mechanism PLAIN', method)
        self.state = 'tune-ok'
        self.transport.write(method_frame(commands.Connection.Tune(CHANNEL_MAX, FRAME_MAX, 0)))

    def _tune_ok(self, channel: int, method) -> None:
        if method.frame_max and not FRAME_MIN_SIZE <= method.frame_max <= FRAME_MAX:
            raise AmqpError(COMMAND_INVALID, f'COMMAND_INVALID - frame-max {method.frame_max}', method)
        self.frame_max = method.frame_max or FRAME_MAX
        self.state = 'open'

    def _open(self, channel: int, method) -> None:
        self.state = 'opened'
        self.transport.write(method_frame(commands.Connection.OpenOk()))
        self.report_request('connection-open', vhost=method.virtual_host[:128])

    def _channel_open(self, channel: int, method) -> None:
        if channel in self.channels or channel > CHANNEL_MAX:
            raise AmqpError(COMMAND_INVALID, f'COMMAND_INVALID - channel {channel} cannot be opened', method)
        self.channels.add(channel)
        self.transport.write(method_frame(commands.Channel.OpenOk(), channel))
        self.report_request('channel-open', channel=channel)

    def _channel_close(self, channel: int, method) -> None:
        self.channels.discard(channel)
        self.transport.write(method_frame(commands.Channel.CloseOk(), channel))
        self.report_request('channel-close', channel=channel)

    def _connection_close(self, channel: int, method) -> None:
        self.transport.write(method_frame(commands.Connection.CloseOk()))
        self.report_request('connection-close', reply_code=method.reply_code)
        self.hang_up()

    def request_fields(self) -> dict[str, Any]:
        return {'tls': self.factory.security == 'tls'}


# (state, pamqp method name) -> handler: what the broker accepts when.
_HANDLERS = {
    ('start-ok', 'Connection.StartOk'): _BrokerServer._start_ok,
    ('tune-ok', 'Connection.TuneOk'): _BrokerServer._tune_ok,
    ('open', 'Connection.Open'): _BrokerServer._open,
    ('opened', 'Channel.Open'): _BrokerServer._channel_open,
    ('opened', 'Channel.Close'): _BrokerServer._channel_close,
    **{(state, 'Connection.Close'): _BrokerServer._connection_close
       for state in ('start-ok', 'tune-ok', 'open', 'opened')},
}


class _BrokerFactory(StubFactory):
    protocol = _BrokerServer


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve the broker handshake on ``listener``: implicit TLS (AMQPS) for 'tls', else plain."""
    if listener.transport != 'tcp':
        raise ValueError(f'amqp runs over tcp, not {listener.transport}')
    if listener.security not in ('plain', 'tls'):
        raise ValueError(f'amqp 0-9-1 has no in-band TLS upgrade; listener security {listener.security!r}')
    factory = _BrokerFactory(reactor, persona, on_request, listener.security)
    return tls.listen_stream(reactor, listener, factory, persona, interface=interface)


# --- client probe -------------------------------------------------------------------------------

_IDENTITY = re.compile(r'^safeq-lab (?P<host>\S+) \((?P<roles>[^)]*)\): .*; peer=(?P<peer>\S+)$')


def _text(value) -> str:
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


class _ClientError(Exception):
    """The broker's answer is not the handshake the probe needs."""


class _AmqpClient(StreamClient):
    """Header, Start-Ok, Tune-Ok + Open, Channel.Open, Connection.Close."""

    def __init__(self, target: ProbeTarget, user: str, password: str, vhost: str) -> None:
        self.target = target
        self.user, self.password, self.vhost = user, password, vhost
        self.buffer = b''
        self.awaiting = 'Connection.Start'
        self.server: dict[str, Any] = {}
        self.steps: list[str] = []

    def begin(self) -> None:
        self._await('Connection.Start')
        self.transport.write(PROTOCOL_HEADER)

    def _await(self, name: str) -> None:
        self.awaiting = name
        self.probe.stage = f'waiting for {name}'

    def _send(self, method, channel: int = 0) -> None:
        self.transport.write(method_frame(method, channel))

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        try:
            while self.probe.result is None and self.buffer:
                if self.buffer[:4] == b'AMQP':
                    raise _ClientError(f'broker refused our protocol header; it speaks '
                                       f'{".".join(str(b) for b in self.buffer[4:8])}')
                used, channel, value = read_frame(self.buffer)
                self.buffer = self.buffer[used:]
                self._method(value)
        except _Incomplete:
            return
        except (AmqpError, _ClientError) as exc:
            self.probe.decide('protocol_error', f'{exc} ({self.probe.stage})', peer_seen=self._peer())

    def _method(self, value) -> None:
        name = getattr(value, 'name', type(value).__name__)
        if isinstance(value, heartbeat.Heartbeat):
            return
        if name == 'Connection.Close' and self.awaiting != 'Connection.CloseOk':
            raise _ClientError(f'broker closed the connection: {value.reply_code} {_text(value.reply_text)}')
        if name != self.awaiting:
            raise _ClientError(f'got {name}')
        getattr(self, '_on_' + name.replace('.', '_'))(value)

    def _on_Connection_Start(self, start) -> None:
        mechanisms = _text(start.mechanisms).split()
        if (start.version_major, start.version_minor) != (0, 9) or 'PLAIN' not in mechanisms:
            raise _ClientError(f'Connection.Start offers AMQP {start.version_major}-{start.version_minor}, '
                               f'mechanisms {" ".join(mechanisms)}')
        self.server = {key: _text(value) for key, value in (start.server_properties or {}).items()
                       if not isinstance(value, dict)}
        self.steps.append(f'Start ({self.server.get("product", "?")} {self.server.get("version", "")})'.strip())
        self._await('Connection.Tune')
        self._send(commands.Connection.StartOk(
            client_properties={'product': 'safeq-lab probe', 'platform': 'Python/Twisted',
                               'capabilities': {'authentication_failure_close': True}},
            mechanism='PLAIN', response=plain_response(self.user, self.password), locale='en_US'))

    def _on_Connection_Tune(self, tune) -> None:
        frame_max = min(tune.frame_max or FRAME_MAX, FRAME_MAX)
        self._send(commands.Connection.TuneOk(tune.channel_max, frame_max, 0))
        self._send(commands.Connection.Open(self.vhost))
        self.steps.append(f'login {self.user}')
        self._await('Connection.OpenOk')

    def _on_Connection_OpenOk(self, _open_ok) -> None:
        self.steps.append(f'open {self.vhost}')
        self._send(commands.Channel.Open(), 1)
        self._await('Channel.OpenOk')

    def _on_Channel_OpenOk(self, _open_ok) -> None:
        self.steps.append('channel 1')
        self._send(commands.Connection.Close(REPLY_SUCCESS, 'Normal shutdown', 0, 0))
        self._await('Connection.CloseOk')

    def _on_Connection_CloseOk(self, _close_ok) -> None:
        host = self.server.get('cluster_name', '')
        name = self.target.server_name
        if host and name and host != name and not name.startswith(host + '.'):
            raise _ClientError(f'broker of {host} answered, expected {name}')
        self.probe.exchange += ': ' + ', '.join(self.steps) + ', close → Close-Ok'
        who = f'broker of {host}' if host else 'a broker that did not say whose it is'
        self.probe.decide('ok', f'{who}; handshake, channel open and close completed',
                          peer_seen=self._peer())

    def _peer(self) -> str | None:
        found = _IDENTITY.match(self.server.get('information', ''))
        return found['peer'] if found else None

    def lost_detail(self, reason) -> str:
        return f'connection closed while {self.probe.stage}: {reason.getErrorMessage()}'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """AMQP 0-9-1 handshake to Open-Ok, a channel, a clean close; over TLS for 'tls' targets."""
    secure = target.security == 'tls'
    exchange = 'AMQPS handshake' if secure else 'AMQP handshake'
    options = target.options
    user, password = options.get('user', LAB_USER), options.get('password', LAB_PASSWORD)
    vhost = options.get('vhost', '/')
    if target.transport != 'tcp':
        return error_result(target, exchange, f'amqp runs over tcp, not {target.transport}')
    if not all(isinstance(v, str) for v in (user, password, vhost)):
        return error_result(target, exchange, 'options user, password and vhost must be strings')
    if target.security not in ('plain', 'tls'):
        return error_result(target, exchange, f'amqp has no {target.security} mode')
    try:
        client = _AmqpClient(target, user, password, vhost)
        return StreamProbe(reactor, target, exchange).start(client, tls=secure)
    except Exception as exc:
        return crashed(target, exchange, exc)


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'AmqpError', 'PROTOCOL_HEADER', 'read_frame',
           'method_frame', 'plain_response', 'parse_plain', 'server_properties', 'LAB_USER',
           'LAB_PASSWORD']
