"""Server-side plumbing shared by stubs: the server limits every stub obeys (listen backlog, idle
timeout, hostile-input-safe JSON), the factory that carries reactor, persona and the witness
callback, and the connection basics (port, peer, idle timeout). No protocol logic here."""
from __future__ import annotations

import json
import socket
import sys
from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.protocols.policies import TimeoutMixin

from .base import Listener, Persona
from .probing import OnRequest, report

# Probes from many lab hosts may connect at once; a backlog of 50 (the default of listenTCP)
# would turn a burst into SYN drops, which a probe would report as 'timeout'. Every TCP stub
# listens with this one.
LISTEN_BACKLOG = 1024
IDLE_TIMEOUT = 60.0          # seconds a server keeps a silent connection (unless its module says otherwise)
# A burst of probes at one UDP stub arrives faster than one reactor turn reads it: the default
# receive buffer (~200 KiB, about 90 datagrams of 1 KiB once the kernel's overhead is counted)
# would drop the rest. Root may go past net.core.rmem_max (SO_RCVBUFFORCE); others get what it allows.
UDP_RECEIVE_BUFFER = 8 << 20
_SO_RCVBUFFORCE = getattr(socket, 'SO_RCVBUFFORCE', 33 if sys.platform.startswith('linux') else None)


def loads_json(data: bytes | str) -> Any:
    """``json.loads`` for bytes a peer sent: every way it can fail is a ValueError.

    Deep nesting (a thousand ``[``) makes the decoder raise RecursionError, which is no
    ValueError and would escape the stub's error reply as an unhandled traceback.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError('JSON nested too deeply') from None


class StubFactory(Factory):
    """Builds `protocol(factory)` connections that share the reactor, persona and on_request."""

    noisy = False

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, security: str = 'plain') -> None:
        self.reactor = reactor
        self.persona = persona
        self.on_request = on_request
        self.security = security

    def buildProtocol(self, addr):
        return self.protocol(self)


class StubConnection(TimeoutMixin):
    """Mixin for a stub's TCP connection: remembers the local port and the peer's address,
    drops silent connections, hangs up one way, and reports request records.

    ``closing`` turns True once the stub hangs up (``hang_up``, the idle timeout) or the peer
    does; input after that is the stub's to ignore. Put it before the Twisted protocol class
    in the bases, so these override Protocol's."""

    closing = False

    def callLater(self, period, func):  # TimeoutMixin's timer on the injected reactor
        return self.factory.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        # Kept now: the socket is gone by the time connectionLost reports.
        self.port = self.transport.getHost().port
        self.peer = self.transport.getPeer().host
        self.setTimeout(IDLE_TIMEOUT)

    @property
    def tls_active(self) -> bool:
        """The connection runs over TLS now (implicit, or after an in-band upgrade)."""
        return ISSLTransport.providedBy(self.transport)

    def buffered(self, data: bytes) -> bool:
        """Add the peer's bytes to ``self.buffer`` (a stub that frames its own stream keeps one) and
        restart the idle timer; False, and the bytes dropped, once the connection is closing."""
        if self.closing:
            return False
        self.resetTimeout()
        self.buffer += data
        return True

    def hang_up(self) -> None:
        """Close once what was written is sent."""
        self.closing = True
        self.setTimeout(None)
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        # An idle peer may not read either; a graceful close could wait forever.
        self.closing = True
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.closing = True
        self.setTimeout(None)
        super().connectionLost(reason)

    def request_fields(self) -> dict[str, Any]:
        """Fields every record of this connection carries besides transport, port and peer."""
        return {}

    def report_request(self, op: str, **fields: Any) -> None:
        """One witness record (see ``probing.report``) of a request this connection handled."""
        report(self.factory.on_request, {'transport': 'tcp', 'port': self.port, 'peer': self.peer, 'op': op,
                                         **self.request_fields(), **fields})


def listen_udp(reactor, port: int, protocol, interface: str = '', max_packet: int = 8192):
    """``reactor.listenUDP`` with a receive buffer large enough for a burst (``UDP_RECEIVE_BUFFER``)."""
    udp = reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=max_packet)
    enlarge_receive_buffer(udp)
    return udp


def enlarge_receive_buffer(port, size: int = UDP_RECEIVE_BUFFER) -> None:
    try:
        handle = port.getHandle()
    except AttributeError:
        return   # a test double, not a socket
    options = [_SO_RCVBUFFORCE, socket.SO_RCVBUF] if _SO_RCVBUFFORCE is not None else [socket.SO_RCVBUF]
    for option in options:
        try:
            handle.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue   # no CAP_NET_ADMIN: fall back to the capped SO_RCVBUF


def listen_plain_tcp(reactor, listener: Listener, factory: Factory, name: str, interface: str = ''):
    """Listen for a protocol that only exists as plain TCP (no TLS variant: LPD, JetDirect)."""
    if listener.transport != 'tcp':
        raise ValueError(f'{name} is a TCP protocol, not {listener.transport}')
    if listener.security != 'plain':
        raise ValueError(f'{name} has no TLS; listener security {listener.security!r}')
    return reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG, interface=interface)
