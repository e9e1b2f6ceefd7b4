"""The HTTP client the probes use (``http`` plans, ``ipp``, ``etcd``, ``infinispan``):
``twisted.web.client.Agent`` to the target's address whatever name the URL carries, HTTPS
verifying target.ca_file and target.server_name (``tls.client_creator``), request bodies sent
at once, response bodies read up to a bound, and every connection tracked so that a probe
releases them all before it reports (``HttpVerdict``). A failed request becomes an outcome
and a detail in one place (``classify_failure``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.web.http import PotentialDataLoss

from ..base import ProbeTarget
from ..probing import BytesProducer, Verdict, classify_os_error, connect_timeout, no_connection_detail
from ..serving import loads_json

MAX_REPLY = 16 << 20         # a probe reads at most this much of one response body
CLOSE_GRACE = 2.0            # seconds a probe waits for its sockets to close after the verdict
USER_AGENT = 'safeq-lab-probe/1'


class Reject(Exception):
    """The server answered, but not what the exchange expects: protocol_error."""


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes
    phrase: str = ''

    def header(self, name: str) -> str:
        values = self.headers.getRawHeaders(name.encode('latin-1'))
        return values[0].decode('latin-1') if values else ''

    @property
    def media(self) -> str:
        return self.header('content-type').split(';', 1)[0].strip().lower()

    def json(self) -> Any:
        if not (self.media == 'application/json' or self.media.endswith('+json')):
            raise Reject(f'expected JSON, got {self.media or "no content type"}')
        try:
            return loads_json(self.body)
        except ValueError as exc:
            raise Reject(f'reply is not JSON: {exc}') from None


def expect(reply: Reply, *statuses: int) -> None:
    """Reject a reply whose status is none of ``statuses``."""
    if reply.status not in statuses:
        excerpt = reply.body[:160].decode('utf-8', 'replace').strip()
        raise Reject(f'HTTP {reply.status}, expected {"/".join(map(str, statuses))}'
                     + (f': {excerpt}' if excerpt else ''))


def json_object(reply: Reply) -> dict[str, Any]:
    value = reply.json()
    if not isinstance(value, dict):
        raise Reject(f'reply is a JSON {type(value).__name__}, not an object')
    return value


class _BodyReader(Protocol):
    """Collects a response body up to ``limit``. Not readBody: it warns about our wrapped
    transport, and a cancelled read needs no abort here (the probe aborts its connections)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            self.done.errback(Reject(f'reply body exceeds {self.limit} B'))
            return
        self.parts.append(data)

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        from twisted.web.client import ResponseDone
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b''.join(self.parts))
        else:
            self.done.errback(reason)


class _TrackingFactory(Factory):
    """Wraps the Agent's protocol factory to learn when each connection closes."""

    noisy = False

    def __init__(self, inner, client: HttpClient) -> None:
        self.inner = inner
        self.client = client

    def buildProtocol(self, addr):
        protocol = self.inner.buildProtocol(addr)
        if protocol is None:
            return None
        client, lost = self.client, protocol.connectionLost

        def connection_lost(reason):
            try:
                lost(reason)
            finally:
                client.closed(protocol)

        protocol.connectionLost = connection_lost
        return protocol


class _TrackingEndpoint:
    """Counts connection attempts in flight and reports each connection made."""

    def __init__(self, inner, client: HttpClient) -> None:
        self.inner = inner
        self.client = client

    def connect(self, factory) -> Deferred:
        client = self.client
        client.connecting += 1
        d = self.inner.connect(_TrackingFactory(factory, client))

        def made(protocol):
            client.connecting -= 1
            client.opened(protocol)
            return protocol

        def failed(failure):
            client.connecting -= 1
            client.maybe_closed()
            return failure

        return d.addCallbacks(made, failed)


class HttpClient:
    """HTTP/1.1 requests to one probe target (HTTPS for security 'tls').

    ``keep_alive``: every request on one persistent connection, as a spooler's IPP backend
    does (a request on a connection the server closed fails rather than being resent);
    otherwise a connection per request. ``close`` releases every connection the client opened
    and fires once none is left.
    """

    def __init__(self, reactor, target: ProbeTarget, *, keep_alive: bool = False,
                 user_agent: str = USER_AGENT, max_reply: int = MAX_REPLY) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool
        self.reactor = reactor
        self.target = target
        self.secure = target.security == 'tls'
        self.creator = None
        if self.secure:
            from .. import tls
            self.creator = tls.client_creator(target)  # TLSMaterialMissing: the caller's 'error'
        self.user_agent = user_agent.encode('latin-1')
        self.max_reply = max_reply
        self.authority = f'{target.server_name or target.host}:{target.port}'
        self.pool = HTTPConnectionPool(reactor, persistent=keep_alive)
        if keep_alive:
            self.pool.retryAutomatically = False
            self.pool.maxPersistentPerHost = 1
        self.agent = Agent.usingEndpointFactory(reactor, self, self.pool)
        self.connections: set = set()
        self.connecting = 0
        self.made = False          # a TCP connection was established at some point
        self._closed: Deferred[None] | None = None
        self._grace = None

    # -- IAgentEndpointFactory ---------------------------------------------------------------
    def endpointForURI(self, uri):
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
        endpoint = TCP4ClientEndpoint(self.reactor, self.target.host, self.target.port,
                                      timeout=connect_timeout(self.target))
        if self.creator is not None:
            # The injected reactor as the TLS layer's clock, not the global one.
            endpoint = wrapClientTLS(self.creator, endpoint, clock=self.reactor)
        return _TrackingEndpoint(endpoint, self)

    # -- requests ----------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f'{"https" if self.secure else "http"}://{self.authority}{path}'

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes | None = None) -> Reply:
        """Send one request and read its whole response (at most ``max_reply`` bytes of body)."""
        from twisted.web.http_headers import Headers
        raw = {b'user-agent': [self.user_agent]}
        for name, value in (headers or {}).items():
            raw[name.lower().encode('latin-1')] = [value.encode('latin-1')]
        response = await self.agent.request(method.encode('ascii'), self.url(path).encode(), Headers(raw),
                                            BytesProducer(body) if body is not None else None)
        reader = _BodyReader(self.max_reply)
        response.deliverBody(reader)
        data = await reader.done
        phrase = response.phrase.decode('latin-1', 'replace') if response.phrase else ''
        return Reply(response.code, response.headers, data, phrase)

    # -- connections -------------------------------------------------------------------------
    def transports(self) -> list:
        """The open connections' transports (TLS ones carry the server's certificate)."""
        return [protocol.transport for protocol in self.connections]

    def opened(self, protocol) -> None:
        self.made = True
        self.connections.add(protocol)
        if self._closed is not None:   # connected after the probe closed: just hang up
            protocol.transport.abortConnection()

    def closed(self, protocol) -> None:
        self.connections.discard(protocol)
        self.maybe_closed()

    def close(self, abort: bool) -> Deferred[None]:
        """Release every connection: at once when ``abort``, else let each finish closing (at
        most CLOSE_GRACE seconds). Fires once no connection or attempt is left."""
        self._closed = Deferred()
        if abort:
            for protocol in list(self.connections):
                protocol.transport.abortConnection()
        # Idle keep-alive connections (and the pool's timers for them).
        self.pool.closeCachedConnections().addErrback(lambda failure: None)  # their close is tracked above
        self._grace = self.reactor.callLater(CLOSE_GRACE, self._force_close)
        self.maybe_closed()
        return self._closed

    def _force_close(self) -> None:
        self._grace = None
        for protocol in list(self.connections):
            protocol.transport.abortConnection()
        self.connections.clear()
        self.connecting = 0
        self.maybe_closed()

    def maybe_closed(self) -> None:
        if self._closed is None or self._closed.called or self.connections or self.connecting:
            return
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        self._closed.callback(None)


class HttpVerdict(Verdict):
    """A probe made of requests through one ``HttpClient`` (``self.client``, set by the
    subclass once it can be built): one verdict, then every connection released, then ``done``."""

    client: HttpClient | None = None
    awaited = 'answer'   # a timeout says: 'connected, but no complete <awaited> within ...'

    def _tls_transports(self):
        return self.client.transports() if self.client is not None else ()

    def _timeout_detail(self) -> str:
        if self.client is not None and self.client.made:
            return f'connected, but no complete {self.awaited} within {self.target.timeout:g} s'
        return no_connection_detail(self.target)

    def _release(self) -> None:
        if self.client is None:
            self.fire()
            return
        self.client.close(abort=self.result.outcome != 'ok').addCallback(lambda _: self.fire())


def _certificate_detail(failure) -> str | None:
    """'certificate: ...' / 'tls: ...' for a TLS failure, else None."""
    from OpenSSL import SSL
    try:
        from service_identity.exceptions import VerificationError
    except ImportError:  # pragma: no cover - service_identity is a dependency of TLS probes
        VerificationError = ()
    value = failure.value
    if VerificationError and isinstance(value, VerificationError):
        names = []
        for err in getattr(value, 'errors', ()):
            wanted = getattr(err, 'mismatched_id', None)
            name = getattr(wanted, 'hostname', None) or getattr(wanted, 'ip', None)
            if name is not None:
                names.append(name.decode('ascii', 'replace') if isinstance(name, bytes) else str(name))
        return f'certificate: host name does not match {", ".join(names) or "the server name"} ({value})'
    if isinstance(value, SSL.Error):
        from .. import tls
        return tls.describe_failure(failure)
    return None


def classify_failure(failure, awaited: str = 'response') -> tuple[str, str]:
    """(outcome, detail) for a request that failed; ``awaited`` names what did not arrive."""
    from twisted.web.client import (RequestGenerationFailed, RequestTransmissionFailed, ResponseFailed,
                                    ResponseNeverReceived)
    value = failure.value
    if isinstance(value, Reject):
        return 'protocol_error', str(value)
    if isinstance(value, (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed,
                          RequestGenerationFailed)):
        reasons = value.reasons
        for reason in reasons:
            detail = _certificate_detail(reason)
            if detail:
                return 'protocol_error', detail
        first = reasons[0] if reasons else None
        what = first.getErrorMessage() if first is not None else 'unknown reason'
        if isinstance(value, ResponseFailed) and first is not None and not first.check(
                net_error.ConnectionDone, net_error.ConnectionLost):
            return 'protocol_error', f'malformed HTTP response: {type(first.value).__name__}: {what}'
        return 'protocol_error', f'connection closed before a complete {awaited}: {what}'
    detail = _certificate_detail(failure)
    if detail:
        return 'protocol_error', detail
    if type(value).__name__ == 'TLSMaterialMissing':
        return 'error', f'probe misconfigured: {value}'
    return classify_os_error(value)
