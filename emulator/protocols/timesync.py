"""``time``: the Time Protocol of RFC 868 (37/udp, 37/tcp), server stub and client probe.

(The module is ``timesync``, not ``time``, so that it can never shadow the
standard library's ``time`` module, e.g. when a file in this directory is run
as a script.)

The server's answer is the time as a 32-bit unsigned big-endian integer: the
number of seconds since 1900-01-01 00:00 UTC. The count wraps in February
2036; the probe resolves the era as the one nearest its own clock.

UDP
    Any datagram (normally an empty one) is answered with one 4-byte datagram
    to its source address.
TCP
    The server sends the 4 bytes as soon as the connection is made, then
    closes; anything the client sends is ignored.

The stub reads the lab clock with ``reactor.seconds()`` and logs one
``on_request`` record per answer (``op='time'``, ``answer`` = the value sent as
Unix seconds). There is nothing to be malformed on the server side; the stub
keeps serving after any client (datagrams of any size, clients that reset).

The probe (UDP or TCP as the target says) is ``ok`` when the server's clock
is within ``TOLERANCE`` (1 s) of the prober's (``reactor.seconds()``). The
answer has whole-second resolution, so the server clock read somewhere in
``[answer, answer + 1)`` while the request was out: the probe accepts unless
that interval proves the clocks differ by more than the tolerance
(``answer <= received + 1 s`` and ``answer + 1 s >= sent - 1 s``). An answer
of the wrong length or a clock further off is a ``protocol_error`` (a
firewall test is no place for a lab whose clocks disagree). Option
``tolerance`` (seconds) overrides it.
"""

from __future__ import annotations

import struct

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .serving import LISTEN_BACKLOG, listen_udp
from .probing import DatagramProbe, OnRequest, StreamClient, StreamProbe, crashed, report

PROTOCOL_IDS = ('time',)

EPOCH_OFFSET = 2208988800      # seconds from 1900-01-01 to 1970-01-01 (RFC 868)
ERA = 1 << 32
TOLERANCE = 1.0
MAX_DATAGRAM = 8 << 10         # read buffer; the request's content is ignored


def encode_time(unix_seconds: float) -> bytes:
    return struct.pack('>I', (int(unix_seconds) + EPOCH_OFFSET) % ERA)


def decode_time(answer: bytes, near: float) -> int:
    """Unix seconds of a 4-byte answer, in the 2^32 s era closest to ``near``."""
    if len(answer) != 4:
        raise ValueError(f'answer has {len(answer)} B, RFC 868 sends 4')
    (value,) = struct.unpack('>I', answer)
    unix = value - EPOCH_OFFSET
    return unix + round((near - unix) / ERA) * ERA


# --- server stub ----------------------------------------------------------------

class _TimeDatagramServer(DatagramProtocol):
    noisy = False

    def __init__(self, reactor, on_request: OnRequest | None) -> None:
        self.reactor = reactor
        self.on_request = on_request

    def datagramReceived(self, datagram: bytes, addr) -> None:
        now = self.reactor.seconds()
        self.transport.write(encode_time(now), addr)
        report(self.on_request, {'transport': 'udp', 'port': self.transport.getHost().port,
                                  'peer': addr[0], 'op': 'time', 'answer': int(now),
                                  'request_bytes': len(datagram)})


class _TimeStreamServer(Protocol):

    def connectionMade(self) -> None:
        now = self.factory.reactor.seconds()
        self.transport.write(encode_time(now))
        self.transport.loseConnection()
        report(self.factory.on_request, {'transport': 'tcp', 'port': self.transport.getHost().port,
                                          'peer': self.transport.getPeer().host, 'op': 'time',
                                          'answer': int(now)})

    def dataReceived(self, data: bytes) -> None:
        pass   # RFC 868: the client sends nothing; ignore whatever it does send


class _TimeFactory(Factory):
    noisy = False
    protocol = _TimeStreamServer

    def __init__(self, reactor, on_request: OnRequest | None) -> None:
        self.reactor = reactor
        self.on_request = on_request


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve RFC 868 time on ``listener`` (UDP or TCP, plain)."""
    if listener.security != 'plain':
        raise ValueError(f'time (RFC 868) has no TLS; listener security {listener.security!r}')
    if listener.transport == 'udp':
        return listen_udp(reactor, listener.port, _TimeDatagramServer(reactor, on_request),
                          interface=interface, max_packet=MAX_DATAGRAM)
    if listener.transport == 'tcp':
        return reactor.listenTCP(listener.port, _TimeFactory(reactor, on_request),
                                 backlog=LISTEN_BACKLOG, interface=interface)
    raise ValueError(f'time cannot listen on {listener.transport!r}')


# --- client probe ---------------------------------------------------------------------

def judge(probe, answer: bytes) -> None:
    """Decide ``probe`` (a StreamProbe or DatagramProbe) from the server's answer."""
    received = probe.reactor.seconds()
    tolerance = float(probe.target.options.get('tolerance', TOLERANCE))
    try:
        server = decode_time(answer, received)
    except ValueError as exc:
        probe.decide('protocol_error', str(exc))
        return
    probe.exchange += f' → {server} (Unix s)'
    # The answer is whole seconds: during the exchange the server's clock read
    # somewhere in [server, server + 1). Its offset from ours lies in
    # [server - received, server + 1 - sent]; accept unless that range proves
    # the clocks differ by more than the tolerance.
    low, high = server - received, server + 1 - probe.started
    estimate = server + 0.5 - (probe.started + received) / 2
    if low <= tolerance and high >= -tolerance:
        probe.decide('ok', f'server clock within {tolerance:g} s of ours '
                           f'(offset {estimate:+.1f} s ± 0.5 s)')
    else:
        probe.decide('protocol_error', f'server clock is {estimate:+.1f} s (± 0.5 s) off ours, '
                                       f'more than {tolerance:g} s')


class _TimeStreamClient(StreamClient):

    def __init__(self) -> None:
        self.answer = b''

    def begin(self) -> None:
        self.probe.stage = 'waiting for the 4-byte time'

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        if len(self.answer) >= 4:
            judge(self.probe, self.answer)   # more than 4 bytes is a protocol error

    def lost_detail(self, reason) -> str:
        return (f'connection closed after {len(self.answer)} of 4 bytes: '
                f'{reason.getErrorMessage()}')


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Ask for the time (empty UDP datagram, or a TCP connection) and compare clocks."""
    exchange = f'RFC 868 time/{target.transport}'
    try:
        if target.transport == 'udp':
            return DatagramProbe(reactor, target, exchange, b'', judge).start()
        if target.transport == 'tcp':
            return StreamProbe(reactor, target, exchange).start(_TimeStreamClient())
        raise ValueError(f'time runs over udp or tcp, not {target.transport}')
    except Exception as exc:
        return crashed(target, exchange, exc)
