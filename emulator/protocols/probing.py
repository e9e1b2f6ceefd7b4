"""Client-probe plumbing shared by the protocol modules: no protocol logic lives here.

Every probe does the same things around its own exchange: it classifies a socket error as
an outcome, records exactly one verdict (cancelling its timer and measuring the elapsed
time), releases its connection or port, and only then fires ``done``, so a caller that stops
its reactor on the last result leaks nothing. This module holds that skeleton
(``Verdict``, ``StreamVerdict``, ``DatagramVerdict``), ready-made probes for simple
exchanges (``StreamProbe``/``StreamClient``, ``DatagramProbe``) and the small helpers
around them. ``report`` is here too: every stub hands its request records to an
``on_request`` callback the same way.

What a protocol sends, how it judges a reply and what its report lines say stay in the
protocol's own module.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from collections.abc import Callable
from typing import Any

from cryptography.x509.oid import NameOID
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from .base import Outcome, ProbeResult, ProbeTarget

OnRequest = Callable[[dict[str, Any]], None]

UDP_RETRIES = 2            # retransmissions of a UDP probe's request within its timeout (net-snmp: -r)
UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENONET})

_log = Logger()


# --- small helpers -------------------------------------------------------------

def report(on_request: OnRequest | None, record: dict[str, Any]) -> None:
    """Hand one request record to a stub's ``on_request`` callback, if any."""
    if on_request is None:
        return
    try:
        on_request(record)
    except Exception:
        # A failing logger must not stop the stub from answering probes.
        _log.failure('on_request callback failed for {record!r}', record=record)


def classify_os_error(exc: BaseException) -> tuple[str, str]:
    """(outcome, detail) for a socket-level failure."""
    if isinstance(exc, net_error.ConnectionRefusedError):
        return 'refused', 'connection refused (TCP RST or ICMP port unreachable)'
    if isinstance(exc, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return 'timeout', f'connect timed out: {exc}'
    if isinstance(exc, net_error.NoRouteError):
        return 'unreachable', f'no route to host: {exc}'
    code = getattr(exc, 'osError', None) if isinstance(exc, net_error.ConnectError) else None
    if code is None and isinstance(exc, OSError):
        code = exc.errno
    if code in UNREACHABLE_ERRNOS:
        return 'unreachable', f'{os.strerror(code)} (ICMP unreachable or no route)'
    if code == errno.ECONNREFUSED:
        return 'refused', 'connection refused'
    if isinstance(exc, net_error.ConnectError) and code is None and 'ConnectionDone' in str(exc):
        # epoll reports an ICMP error on a connecting socket as a hang-up: Twisted then fails the
        # connect with ConnectionDone instead of the ECONNREFUSED it read for the same event elsewhere.
        return 'refused', 'connection attempt ended by an ICMP error or RST'
    return 'error', f'{type(exc).__name__}: {exc}'


def certificate_issuer(transports) -> str:
    """Issuer CN of the first peer certificate found on these transports ('' when none is TLS)."""
    for transport in transports:
        get_certificate = getattr(transport, 'getPeerCertificate', None)
        try:
            certificate = get_certificate() if get_certificate else None
        except Exception:  # not connected any more, or no handshake yet
            continue
        if certificate is not None:
            names = certificate.to_cryptography().issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
            return str(names[0].value) if names else '?'
    return ''


def error_result(target: ProbeTarget, exchange: str, detail: str) -> Deferred[ProbeResult]:
    """The one result row of a probe that could not run at all."""
    return succeed(ProbeResult(id=target.id, outcome='error', elapsed=0.0, exchange=exchange,
                               detail=detail))


def crashed(target: ProbeTarget, exchange: str, exc: BaseException) -> Deferred[ProbeResult]:
    """The one result row of a probe that failed before it could run: a bug must still
    yield a row, or the prober's output would no longer line up with its input."""
    return error_result(target, exchange, f'probe crashed: {type(exc).__name__}: {exc}')


def connect_timeout(target: ProbeTarget) -> int:
    """The connector's own timeout: only a backstop, the probe's timer fires first."""
    return math.ceil(target.timeout) + 1


def no_connection_detail(target: ProbeTarget) -> str:
    return f'no TCP connection within {target.timeout:g} s (SYN dropped?)'


# --- one verdict per probe -----------------------------------------------------

class Verdict:
    """One probe: the verdict is recorded once, then resources are released
    (``_release``), then ``done`` fires (``fire``).

    Subclasses name the exchange (``describe``, by default the ``exchange``
    attribute or property), say why a timeout happened (``_timeout_detail``)
    and release what they hold (``_release``, which must end in ``fire``).
    """

    def __init__(self, reactor, target: ProbeTarget) -> None:
        self.reactor = reactor
        self.target = target
        self.started = reactor.seconds()
        self.result: ProbeResult | None = None
        self.done: Deferred[ProbeResult] = Deferred()
        self._timer = None

    def arm(self) -> None:
        self._timer = self.reactor.callLater(self.target.timeout, self._timed_out)

    def launch(self, begin: Callable[[], Any]) -> Deferred[ProbeResult]:
        """Arm the timer and run ``begin``; a synchronous socket error (e.g.
        EHOSTUNREACH from a UDP send) is the verdict."""
        self.arm()
        try:
            begin()
        except Exception as exc:  # decide() cancels the timer
            self.decide(*classify_os_error(exc))
        return self.done

    def describe(self, outcome: str) -> str:
        return self.exchange

    def decide(self, outcome: str, detail: str = '', peer_seen: str | None = None) -> bool:
        """Record the verdict once; later events (e.g. the close we cause) are ignored."""
        return self.settle(outcome, detail, self.describe(outcome), peer_seen)

    def settle(self, outcome: str, detail: str, exchange: str, peer_seen: str | None = None) -> bool:
        """What ``decide`` does once the subclass has worded the exchange."""
        if self.result is not None:
            return False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        issuer = certificate_issuer(self._tls_transports()) if outcome == Outcome.OK else ''
        self.result = ProbeResult(id=self.target.id, outcome=outcome,
                                  elapsed=max(0.0, self.reactor.seconds() - self.started),
                                  exchange=exchange, detail=detail, peer_seen=peer_seen, tls_issuer=issuer)
        self._release()
        return True

    def _tls_transports(self):
        """The probe's open transports that may carry TLS, asked for the server's certificate."""
        return ()

    def fire(self) -> None:
        if self.result is not None and not self.done.called:
            self.done.callback(self.result)

    def _timed_out(self) -> None:
        self._timer = None
        # A completed handshake followed by silence reached the port: never to be read as closed.
        self.decide(Outcome.SILENT if self.reached else Outcome.TIMEOUT, self._timeout_detail())

    @property
    def reached(self) -> bool:
        """True once the server's side answered at the transport level (TCP handshake done)."""
        return False

    def _timeout_detail(self) -> str:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class ProbeClientFactory(ClientFactory):
    """Builds the probe's client protocol and reports a failed connect to the probe.

    reactor.connectTCP rather than TCP4ClientEndpoint: importing
    twisted.internet.endpoints pulls in twisted.internet.ssl, which fails when
    pyOpenSSL is installed without service_identity, and plain probes must not
    depend on the TLS stack.
    """

    noisy = False

    def __init__(self, verdict: StreamVerdict, build: Callable[[], Protocol]) -> None:
        self.verdict = verdict
        self.build = build

    def buildProtocol(self, addr) -> Protocol:
        protocol = self.build()
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector, reason) -> None:
        self.verdict.connect_failed(reason)


class StreamVerdict(Verdict):
    """A verdict over one TCP connection: the subclass sets ``_connector`` when it
    connects and its protocol calls ``connected``; ``lost`` stays the subclass's."""

    # Class defaults: a verdict may come before any connection attempt.
    _connector = None   # set while the TCP handshake is pending
    _open = False       # a connection exists and has not been lost yet
    _made = False       # the TCP handshake completed at some point
    protocol: Protocol | None = None

    @property
    def reached(self) -> bool:
        return self._made

    def _tls_transports(self):
        return (self.protocol.transport,) if self.protocol is not None else ()

    def connected(self, protocol: Protocol) -> bool:
        """The TCP connection is up; True if the exchange should begin."""
        self._connector = None
        self.protocol = protocol
        self._made = self._open = True
        if self.result is not None:   # connected after the verdict: just hang up
            protocol.transport.abortConnection()
            return False
        return True

    def connect_failed(self, reason) -> None:
        self._connector = None
        # After our own stopConnecting() the verdict is already in; ignored then.
        self.decide(*classify_os_error(reason.value))

    def _release(self) -> None:
        if self._open:
            transport = self.protocol.transport
            if self.result.outcome == 'ok':
                transport.loseConnection()    # graceful: flushes our goodbye (an LDAP unbind, TLS close_notify)
            else:
                transport.abortConnection()   # the peer may never read or ACK
            return  # fire() runs from connectionLost
        if self._connector is not None:
            connector, self._connector = self._connector, None
            try:
                connector.stopConnecting()
            except net_error.NotConnectingError:
                pass  # it failed in the same reactor turn; that failure is ignored
        self.fire()


class _DatagramClient(DatagramProtocol):
    noisy = False  # one start/stop log line per probe is noise

    def __init__(self, verdict: DatagramVerdict) -> None:
        self.verdict = verdict

    def datagramReceived(self, datagram: bytes, addr) -> None:
        self.verdict.datagram(datagram)

    def connectionRefused(self) -> None:
        self.verdict.decide('refused', 'ICMP port unreachable (ECONNREFUSED)')

    def stopProtocol(self) -> None:
        self.verdict.port_stopped()


class DatagramVerdict(Verdict):
    """A verdict over one connected UDP port; subclasses handle ``datagram``.

    The request is retransmitted like net-snmp's ``-r`` retries: it goes out again every
    timeout / (retries + 1) seconds until the verdict (option ``retries``, default
    ``UDP_RETRIES``), so one datagram lost to a full socket buffer (a burst of probes at one
    stub) or a congested link is not read as a firewall drop. Every copy is the same request:
    any answer will do.
    """

    _port = None        # class default: a verdict may come before the port exists
    _resend_call = None
    awaited = 'reply'   # what 'closed while waiting for the ...' names

    def send(self, request: bytes, max_packet: int) -> None:
        self._port = self.reactor.listenUDP(0, _DatagramClient(self), maxPacketSize=max_packet)
        # A connected socket is what makes the kernel report an ICMP port
        # unreachable to us (as ECONNREFUSED) and filter foreign datagrams.
        self._port.connect(self.target.host, self.target.port)
        self._port.write(request)
        retries = self.target.options.get('retries', UDP_RETRIES)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            retries = UDP_RETRIES
        self._request = request
        self._retries_left = retries
        self._interval = self.target.timeout / (retries + 1)
        self._schedule_resend()

    def _schedule_resend(self) -> None:
        if self._retries_left > 0:
            self._resend_call = self.reactor.callLater(self._interval, self._resend)

    def _resend(self) -> None:
        self._resend_call = None
        if self.result is not None or self._port is None:
            return
        self._retries_left -= 1
        try:
            self._port.write(self._request)
        except OSError:
            pass   # an ICMP error is reported through the port (connectionRefused / port_stopped)
        self._schedule_resend()

    def datagram(self, data: bytes) -> None:
        raise NotImplementedError

    def port_stopped(self) -> None:
        """The UDP port closed; unless we closed it, an ICMP error did.

        A connected UDP socket turns an ICMP unreachable into a pending socket
        error. The epoll reactor sees that as EPOLLERR and closes the port
        without calling doRead, so ``connectionRefused`` never runs there; the
        socket is still open at this point, so read the error from it.
        """
        if self.result is not None or self._port is None:
            return  # our own stopListening after the verdict
        code = 0
        try:
            code = self._port.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except (AttributeError, OSError):
            pass  # not a real socket, or already closed
        if code == errno.ECONNREFUSED:
            self.decide('refused', 'ICMP port unreachable (ECONNREFUSED)')
        elif code:
            outcome, detail = classify_os_error(OSError(code, os.strerror(code)))
            self.decide(outcome, f'UDP socket error: {detail}')
        else:
            self.decide('error', f'UDP socket closed while waiting for the {self.awaited}, cause unknown')

    def _release(self) -> None:
        if self._resend_call is not None and self._resend_call.active():
            self._resend_call.cancel()
        self._resend_call = None
        if self._port is None:
            self.fire()
            return
        port, self._port = self._port, None
        stopped = maybeDeferred(port.stopListening)
        stopped.addErrback(lambda failure: _log.failure('stopListening failed', failure))
        stopped.addBoth(lambda _: self.fire())


@implementer(IBodyProducer)
class BytesProducer:
    """An HTTP request body handed over at once (Content-Length known): probes send
    at most a few MiB, and this needs no global cooperator, unlike FileBodyProducer."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


# --- ready-made probes for simple exchanges ------------------------------------

@implementer(IHandshakeListener)
class StreamClient(Protocol):
    """Client side of one stream exchange; subclasses implement ``begin`` and
    ``dataReceived`` and call ``self.probe.decide(...)`` with the verdict."""

    probe: StreamProbe

    def begin(self) -> None:
        raise NotImplementedError

    def lost_detail(self, reason) -> str:
        return f'connection closed while {self.probe.stage}: {reason.getErrorMessage()}'

    def connectionMade(self) -> None:
        if self.probe.connected(self):
            self.begin()

    def handshakeCompleted(self) -> None:
        self.probe.handshake_done = True

    def connectionLost(self, reason) -> None:
        self.probe.lost(reason)


class StreamProbe(StreamVerdict):
    """One TCP exchange, over implicit TLS when ``tls=True`` (chain and host
    name verified by ``tls.client_creator``). STARTTLS clients call
    ``start_tls()`` from their protocol."""

    tls_active = False    # TLS was requested (implicit or STARTTLS)
    handshake_done = False

    def __init__(self, reactor, target: ProbeTarget, exchange: str) -> None:
        super().__init__(reactor, target)
        self.exchange = exchange      # what was done; clients extend it as steps succeed
        self.stage = 'waiting for the first reply'

    def start(self, client: StreamClient, tls: bool = False) -> Deferred[ProbeResult]:
        client.probe = self
        self.client = client
        factory = ProbeClientFactory(self, lambda: client)
        try:
            self.arm()
            if tls:
                from . import tls as tls_helper   # pyOpenSSL only when TLS is used
                self.tls_active = True
                self.exchange += ' over TLS'
                self._connector = tls_helper.connect_tls(self.reactor, self.target, factory,
                                                         timeout=connect_timeout(self.target))
            else:
                self._connector = self.reactor.connectTCP(self.target.host, self.target.port,
                                                          factory, timeout=connect_timeout(self.target))
        except Exception as exc:  # TLSMaterialMissing, unreadable CA file, ...
            outcome, detail = classify_os_error(exc)
            self.decide(outcome, detail if outcome != 'error' else f'cannot start: {detail}')
        return self.done

    def start_tls(self) -> bool:
        """Upgrade the open connection in band (STARTTLS); False if it failed to start."""
        from . import tls as tls_helper
        try:
            creator = tls_helper.client_creator(self.target)
        except Exception as exc:
            self.decide('error', f'cannot start TLS: {type(exc).__name__}: {exc}')
            return False
        self.tls_active = True
        self.exchange += ' +STARTTLS'
        self.client.transport.startTLS(creator)
        return True

    def lost(self, reason) -> None:
        self._open = False
        if self.result is None:
            if self.tls_active and not self.handshake_done:
                from . import tls as tls_helper
                self.decide('protocol_error', tls_helper.describe_failure(reason))
            else:
                self.decide('protocol_error', self.client.lost_detail(reason))
        self.fire()

    def _timeout_detail(self) -> str:
        wait = f'{self.target.timeout:g} s'
        if not self._made:
            return no_connection_detail(self.target)
        if self.tls_active and not self.handshake_done:
            return f'connected, but the TLS handshake did not finish within {wait}'
        return f'connected, but no answer within {wait} while {self.stage}'


class DatagramProbe(DatagramVerdict):
    """One UDP request and its reply; ``on_reply(probe, datagram)`` must decide."""

    max_reply = 8 << 10

    def __init__(self, reactor, target: ProbeTarget, exchange: str, request: bytes,
                 on_reply: Callable[[DatagramProbe, bytes], None]) -> None:
        super().__init__(reactor, target)
        self.exchange = exchange
        self.request = request
        self.on_reply = on_reply
        self.stage = 'waiting for the reply datagram'

    def start(self) -> Deferred[ProbeResult]:
        return self.launch(lambda: self.send(self.request, self.max_reply + 1))

    def datagram(self, data: bytes) -> None:
        if self.result is None:
            self.on_reply(self, data)

    def _timeout_detail(self) -> str:
        return (f'no reply within {self.target.timeout:g} s '
                f'(datagram or reply dropped, no ICMP seen)')


def tcp_client_probe(reactor, target: ProbeTarget, exchange: str, make_client: Callable,
                     renamed: Callable[[Any], str] | None = None, *, tls: bool = False,
                     probe_class: type[StreamProbe] = StreamProbe) -> Deferred[ProbeResult]:
    """Run ``make_client(target)`` (a StreamClient) as a TCP ``probe_class`` (over implicit TLS when
    ``tls``). A target on another transport, or a ValueError from ``make_client``, is the target's
    own problem (a bad option, a document the host holds none of to pass on): one 'error' row
    saying so. ``renamed(client)`` names the exchange once the client knows what it sends."""
    if target.transport != 'tcp':
        return error_result(target, exchange, f'{target.protocol} runs over TCP, not {target.transport}')
    try:
        try:
            client = make_client(target)
        except ValueError as exc:
            return error_result(target, exchange, str(exc))
        return probe_class(reactor, target, renamed(client) if renamed else exchange).start(client, tls=tls)
    except Exception as exc:
        return crashed(target, exchange, exc)
