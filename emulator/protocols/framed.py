"""``framed``: the generic SafeQ-lab request/response, server stub and client probe.

SafeQ's own inter-component protocols (Spooler Controller ↔ Management on
6010/6020, SPM discovery on 64099/udp, ...) are proprietary and cannot be
reproduced byte for byte. This module stands in for every protocol that has no
dedicated module yet: it puts a realistic amount of payload on the real port,
and its reply proves end to end *which* host answered and *whom* it saw, which
is what a firewall test needs.

Wire format, version 1
======================

A *payload* is one header line, a newline, then a body::

    payload = header  b"\\n"  body
    header  = one compact JSON object (ASCII, so it holds no raw newline)
    body    = exactly header["size"] bytes

Request::

    {"v": 1, "op": "hello", "nonce": "<1-128 chars>", "size": n}   + n body bytes

Reply::

    {"v": 1, "ok": true, "nonce": "<echoed>", "host": "<persona host>",
     "roles": ["<role>", ...], "port": <server's local port>,
     "peer": "<client IP as the server saw it>", "size": m}          + m body bytes

The reply body is the first ``m`` bytes of the request body, so the client can
tell whether the payload was altered in transit. ``m == n`` unless the reply
header plus ``n`` bytes would exceed the transport's limit, then ``m`` is
capped to fit.

Error reply (malformed request: not JSON, missing/ill-typed field, unknown
``op`` or ``v``, size mismatch, too long)::

    {"v": 1, "ok": false, "error": "<reason>"}                      + no body

TCP
    Each payload travels in one frame prefixed by its length as a 4-byte
    big-endian unsigned integer (``Int32StringReceiver``); a payload is at most
    ``MAX_FRAME`` (1 MiB). A connection may carry several request/reply
    pairs. After an error reply the server closes the connection; other
    connections are unaffected. Idle connections are dropped after
    ``IDLE_TIMEOUT`` seconds.

UDP
    Each payload is one datagram, no length prefix, at most ``MAX_DATAGRAM``
    (8 KiB). Error replies are sent for malformed datagrams too. The reply goes
    to the datagram's source address and port.

Round trips (probe option ``rounds``, TCP only)
    With ``options['rounds'] = N`` (1-``MAX_ROUNDS``) the probe keeps the connection open after
    the first exchange and sends N more requests of ``ROUND_BYTES`` bytes, one at a time, each
    after the previous reply. The median of their request-to-reply times is the result's
    ``round_trip_ms``: the link's own round-trip time, without the first exchange's TCP slow
    start over a large payload. The server needs nothing new: a connection may carry several
    pairs anyway.

Job metadata (probe options ``carries``/``holder``, see ``jobstore``; invented, like the rest)
    The request header also carries ``"job": {"name", "owner", "bytes", "sha256"}``, a job the
    probe's host holds, and the body is that job's metadata (``payloads.job_metadata``, 40-60 kB,
    deterministic for the job) instead of random bytes: a FlexiSpooler telling its Spooler
    Controller about a job. The server keeps an ``accounting`` entry for it in its host's
    jobstore (the job's name, owner, size and sha256, and the metadata's size) and answers as
    usual, echoing the body.

``security``: 'tls' listeners and targets carry the same frames inside TLS
(the lab CA's certificates, verified by the probe); 'starttls' and 'optional'
stay plaintext, as framed has no in-band upgrade. Protocol modules with TLS replace it per protocol.
"""

from __future__ import annotations

import json
import secrets
import statistics
from dataclasses import replace
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.protocols.basic import Int32StringReceiver

from OpenSSL import SSL

from . import jobstore, tls
from .serving import LISTEN_BACKLOG, StubConnection, listen_udp, loads_json
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .payloads import job_metadata, noise
from .probing import (DatagramVerdict, OnRequest, ProbeClientFactory, StreamVerdict, Verdict,
                      connect_timeout, crashed, error_result, no_connection_detail, report)

NOT_TLS = frozenset({'ssh'})  # encrypted by their own protocol, not TLS: framed stays plain there


def uses_tls(endpoint: Listener | ProbeTarget) -> bool:
    """Secured TCP ports carry the same frames inside TLS (lab CA); there is no DTLS for UDP."""
    return endpoint.security == 'tls' and endpoint.transport == 'tcp' and endpoint.protocol not in NOT_TLS

PROTOCOL_ID = 'framed'
VERSION = 1
MAX_FRAME = 1 << 20          # largest TCP payload, without its 4-byte prefix
MAX_DATAGRAM = 8 << 10       # largest UDP payload
MAX_NONCE = 128
MAX_ROUNDS = 100             # option 'rounds': extra round trips a probe may make on its connection
ROUND_BYTES = 64             # body of each extra round trip: small, so it measures latency, not rate


class FramedError(ValueError):
    """A payload that does not follow the framed wire format."""


# --- codec (shared by server and client) -----------------------------------

def encode(header: dict[str, Any], body: bytes = b'') -> bytes:
    line = json.dumps(header, separators=(',', ':'), ensure_ascii=True).encode('ascii')
    return line + b'\n' + body


def decode(payload: bytes) -> tuple[dict[str, Any], bytes]:
    line, newline, body = payload.partition(b'\n')
    if not newline:
        raise FramedError('no header line (newline missing)')
    try:
        header = loads_json(line)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too deeply nested
        raise FramedError(f'header is not JSON: {exc}') from None
    if not isinstance(header, dict):
        raise FramedError('header is not a JSON object')
    if header.get('v') != VERSION:
        raise FramedError(f'unsupported version {header.get("v")!r}')
    return header, body


def _sized_body(header: dict[str, Any], body: bytes) -> bytes:
    size = header.get('size')
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FramedError(f'size must be a non-negative integer, got {size!r}')
    if size != len(body):
        raise FramedError(f'size says {size} B but the body has {len(body)} B')
    return body


def encode_request(nonce: str, body: bytes, job: dict[str, Any] | None = None) -> bytes:
    header = {'v': VERSION, 'op': 'hello', 'nonce': nonce, 'size': len(body)}
    return encode(header if job is None else {**header, 'job': job}, body)


def job_header(doc: jobstore.Document) -> dict[str, Any]:
    return {'name': doc.name, 'owner': doc.owner, 'bytes': doc.size, 'sha256': doc.sha256}


def accounted(header: dict[str, Any], body: bytes, peer: str) -> jobstore.Document | None:
    """The accounting entry a request's ``job`` header asks for; None without one (or a bad one)."""
    job = header.get('job')
    if not isinstance(job, dict):
        return None
    try:
        return jobstore.Document.from_dict({'name': job.get('name'), 'kind': 'accounting', 'size': job.get('bytes'),
                                            'sha256': job.get('sha256'), 'owner': job.get('owner', ''),
                                            'via': 'framed', 'peer': peer, 'metadata_bytes': len(body)})
    except ValueError:
        return None


def decode_request(payload: bytes) -> tuple[str, bytes]:
    """Return (nonce, body) of a valid request, else raise FramedError."""
    header, body = decode(payload)
    if header.get('op') != 'hello':
        raise FramedError(f'unknown op {header.get("op")!r}')
    nonce = header.get('nonce')
    if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE:
        raise FramedError(f'nonce must be a string of 1-{MAX_NONCE} characters')
    return nonce, _sized_body(header, body)


def encode_reply(persona: Persona, port: int, peer: str, nonce: str, body: bytes,
                 limit: int) -> bytes:
    header = {'v': VERSION, 'ok': True, 'nonce': nonce, 'host': persona.host,
              'roles': list(persona.roles), 'port': port, 'peer': peer, 'size': len(body)}
    payload = encode(header, body)
    if len(payload) > limit:
        # The reply header is longer than the request's, so an echo of a
        # request that just fit would not. Shrinking size can only shorten
        # the header, so one recomputation is enough.
        room = max(0, limit - (len(payload) - len(body)))
        body = body[:room]
        header['size'] = len(body)
        payload = encode(header, body)
    return payload


def encode_error(reason: str) -> bytes:
    return encode({'v': VERSION, 'ok': False, 'error': reason})


def decode_reply(payload: bytes, nonce: str, sent: bytes) -> tuple[dict[str, Any], bytes]:
    """Check a reply against the request it answers; raise FramedError if it is wrong."""
    header, body = decode(payload)
    if header.get('ok') is False:
        raise FramedError(f'server rejected the request: {header.get("error")!r}')
    if header.get('ok') is not True:
        raise FramedError(f'ok must be true or false, got {header.get("ok")!r}')
    if header.get('nonce') != nonce:
        raise FramedError(f'nonce mismatch: sent {nonce!r}, got {header.get("nonce")!r}')
    body = _sized_body(header, body)
    if body != sent[:len(body)]:
        raise FramedError('reply body differs from the request body (payload altered in transit?)')
    for name in ('host', 'peer'):
        if not isinstance(header.get(name), str):
            raise FramedError(f'{name} must be a string, got {header.get(name)!r}')
    return header, body


def answer(persona: Persona, payload: bytes, *, port: int, peer: str,
           limit: int) -> tuple[bytes, dict[str, Any] | None]:
    """Reply payload for one request payload, and the request record
    (``None`` when the request was malformed)."""
    try:
        nonce, body = decode_request(payload)
    except FramedError as exc:
        return encode_error(str(exc)), None
    record = {'port': port, 'peer': peer, 'nonce': nonce, 'size': len(body)}
    return encode_reply(persona, port, peer, nonce, body, limit), record


# --- server stub --------------------------------------------------------------

class _HelloServer(StubConnection, Int32StringReceiver):
    MAX_LENGTH = MAX_FRAME

    def __init__(self, factory: _HelloFactory) -> None:
        self.factory = factory

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def stringReceived(self, string: bytes) -> None:
        if self.closing:  # frames already buffered behind a bad one
            return
        peer = self.transport.getPeer().host
        reply, record = answer(self.factory.persona, string,
                               port=self.transport.getHost().port, peer=peer, limit=MAX_FRAME)
        self.sendString(reply)
        if record is None:
            self.hang_up()
            return
        entry = accounted(*decode(string), peer)
        if entry is not None:
            jobstore.store_for(self.factory.persona.host).keep(entry)
            record = {**record, 'job': entry.name, 'metadata_bytes': entry.metadata_bytes}
        report(self.factory.on_request, {'transport': 'tcp', **record})

    def lengthLimitExceeded(self, length: int) -> None:
        # Int32StringReceiver calls this again on every later chunk.
        if not self.closing:
            self.sendString(encode_error(f'frame of {length} B exceeds the {MAX_FRAME} B limit'))
            self.hang_up()


class _HelloFactory(Factory):
    noisy = False

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None) -> None:
        self.reactor = reactor
        self.persona = persona
        self.on_request = on_request

    def buildProtocol(self, addr) -> _HelloServer:
        return _HelloServer(self)


class _HelloDatagramServer(DatagramProtocol):
    noisy = False
    def __init__(self, persona: Persona, on_request: OnRequest | None) -> None:
        self.persona = persona
        self.on_request = on_request

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if len(datagram) > MAX_DATAGRAM:
            reply, record = encode_error(f'datagram exceeds the {MAX_DATAGRAM} B limit'), None
        else:
            reply, record = answer(self.persona, datagram, port=self.transport.getHost().port,
                                   peer=addr[0], limit=MAX_DATAGRAM)
        self.transport.write(reply, addr)
        if record is not None:
            report(self.on_request, {'transport': 'udp', **record})


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '') -> IListeningPort:
    """Serve framed on ``listener``; bind errors (CannotListenError) propagate."""
    if listener.transport == 'tcp':
        factory = _HelloFactory(reactor, persona, on_request)
        if uses_tls(listener):
            return tls.listen_tls(reactor, listener.port, factory, persona, interface=interface)
        return reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG, interface=interface)
    if listener.transport == 'udp':
        # One byte more than the limit so an oversized datagram is seen as
        # such instead of being silently truncated into a size mismatch.
        return listen_udp(reactor, listener.port, _HelloDatagramServer(persona, on_request),
                          interface=interface, max_packet=MAX_DATAGRAM + 1)
    raise ValueError(f'framed cannot listen on {listener.transport!r}')


# --- client probe -------------------------------------------------------------

class _Exchange(Verdict):
    """One hello exchange, then ``rounds`` small ones (TCP); subclasses add the transport.

    ``done`` fires once the verdict is known *and* the socket is closed, so a
    caller that stops its reactor on the last result leaks nothing.
    """

    limit: int

    def __init__(self, reactor, target: ProbeTarget) -> None:
        super().__init__(reactor, target)
        self.nonce = secrets.token_hex(8)
        self.job, self.problem = (jobstore.need_held(target.options, ('print-job', 'accounting'), bytes_too=False)
                                  if target.options.get('carries') else (None, ''))
        if self.job is not None:
            self.body = job_metadata(self.job.name, self.job.owner, self.job.size, self.job.sha256)
        else:
            # Random bytes: a realistic, incompressible stand-in for job data.
            self.body = noise(target.size)
        self.request = encode_request(self.nonce, self.body, None if self.job is None else job_header(self.job))
        self.rounds = target.options.get('rounds', 0)
        self.round_trips: list[float] = []   # seconds, one per completed extra round trip
        self._round: tuple[str, bytes, float] | None = None   # nonce, body, sent at
        self._first_reply: tuple[dict[str, Any], int] | None = None

    @property
    def exchange(self) -> str:
        if self.job is not None:
            return f'framed/{self.target.transport} job {self.job.name!r} metadata {len(self.body)} B'
        return f'framed/{self.target.transport} hello {self.target.size} B'

    def start(self) -> Deferred[ProbeResult]:
        if self.problem:
            self.decide('error', self.problem)
            return self.done
        if len(self.request) > self.limit:
            self.decide('error', f'size {self.target.size} B does not fit one {self.limit} B '
                                 f'{self.target.transport} message')
            return self.done
        problem = self._rounds_problem()
        if problem:
            self.decide('error', problem)
            return self.done
        return self.launch(self._begin)

    def _rounds_problem(self) -> str:
        if self.rounds == 0:
            return ''
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or not 0 < self.rounds <= MAX_ROUNDS:
            return f'option rounds must be an integer from 1 to {MAX_ROUNDS}, got {self.rounds!r}'
        if self.target.transport != 'tcp':
            return 'option rounds measures round trips on a connection: tcp only'
        return ''

    def decide(self, outcome: str, detail: str = '', peer_seen: str | None = None,
               reply_size: int | None = None) -> bool:
        """Record the verdict once; later events (e.g. the close we cause) are ignored."""
        exchange = self.exchange if reply_size is None else f'{self.exchange} → {reply_size} B'
        if self.round_trips:
            exchange += (f', then {len(self.round_trips)} round trips of {ROUND_BYTES} B: '
                         f'median {self.round_trip_ms:.1f} ms')
        if uses_tls(self.target):
            exchange = f'TLS {exchange}'
        elif self.target.security in ('tls', 'starttls'):
            # Say so in the report: a TLS-inspecting firewall may treat the
            # plaintext stand-in differently from the real upgraded traffic.
            exchange += f' (plaintext: {self.target.security} not emulated)'
        return self.settle(outcome, detail, exchange, peer_seen)

    @property
    def round_trip_ms(self) -> float:
        return statistics.median(self.round_trips) * 1000

    def _release(self) -> None:
        # settle() has just built the result; the measured round trips ride on an ok one
        if self.result.outcome == 'ok' and self.round_trips:
            self.result = replace(self.result, round_trip_ms=round(self.round_trip_ms, 3))
        super()._release()

    def reply(self, payload: bytes) -> None:
        if self._round is not None:
            self._round_reply(payload)
            return
        try:
            header, body = decode_reply(payload, self.nonce, self.body)
        except FramedError as exc:
            self.decide('protocol_error', str(exc))
            return
        self._first_reply = header, len(body)
        if self.rounds:
            self._next_round()
        else:
            self._answered()

    def _answered(self) -> None:
        header, reply_size = self._first_reply
        roles = ','.join(map(str, header.get('roles') or ())) or '-'
        self.decide('ok', f'answered by {header["host"]} ({roles}) on port {header.get("port")}',
                    peer_seen=header['peer'], reply_size=reply_size)

    def _next_round(self) -> None:
        if self.result is not None:
            return
        nonce, body = secrets.token_hex(8), noise(ROUND_BYTES)
        self._round = nonce, body, self.reactor.seconds()
        self.send_round(encode_request(nonce, body))

    def _round_reply(self, payload: bytes) -> None:
        nonce, body, sent = self._round
        try:
            decode_reply(payload, nonce, body)
        except FramedError as exc:
            self.decide('protocol_error', f'round trip {len(self.round_trips) + 1} of {self.rounds}: {exc}')
            return
        self.round_trips.append(max(0.0, self.reactor.seconds() - sent))
        if len(self.round_trips) < self.rounds:
            self._next_round()
        else:
            self._answered()

    def send_round(self, payload: bytes) -> None:
        raise NotImplementedError   # TCP only (_rounds_problem keeps rounds off UDP)

    def _begin(self) -> None:
        raise NotImplementedError


class _HelloClient(Int32StringReceiver):
    MAX_LENGTH = MAX_FRAME

    def __init__(self, exchange: _TcpExchange) -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        if self.exchange.connected(self):
            no_delay = getattr(self.transport, 'setTcpNoDelay', None)
            if self.exchange.rounds and no_delay is not None:
                no_delay(True)   # each round trip is one small frame: Nagle must not hold it back
            self.sendString(self.exchange.request)

    def stringReceived(self, string: bytes) -> None:
        self.exchange.reply(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self.exchange.decide('protocol_error', f'reply frame of {length} B exceeds {MAX_FRAME} B')

    def connectionLost(self, reason) -> None:
        self.exchange.lost(reason)


class _TcpExchange(_Exchange, StreamVerdict):
    limit = MAX_FRAME

    def _begin(self) -> None:
        factory = ProbeClientFactory(self, partial(_HelloClient, self))
        if uses_tls(self.target):
            self._connector = tls.connect_tls(self.reactor, self.target, factory,
                                              timeout=connect_timeout(self.target))
        else:
            self._connector = self.reactor.connectTCP(self.target.host, self.target.port, factory,
                                                      timeout=connect_timeout(self.target))

    def send_round(self, payload: bytes) -> None:
        self.protocol.sendString(payload)

    def lost(self, reason) -> None:
        self._open = False
        if uses_tls(self.target) and reason.check(SSL.Error):
            self.decide('protocol_error', tls.describe_failure(reason))
        else:
            self.decide('protocol_error', f'connection closed before a valid reply: '
                                          f'{reason.getErrorMessage()}')
        self.fire()

    def _timeout_detail(self) -> str:
        if self._round is not None:
            return (f'{len(self.round_trips)} of {self.rounds} round trips done within '
                    f'{self.target.timeout:g} s')
        if self._made:
            return f'connected, but no reply within {self.target.timeout:g} s'
        return no_connection_detail(self.target)


class _UdpExchange(_Exchange, DatagramVerdict):
    limit = MAX_DATAGRAM

    def _begin(self) -> None:
        self.send(self.request, MAX_DATAGRAM + 1)

    def datagram(self, data: bytes) -> None:
        self.reply(data)

    def _timeout_detail(self) -> str:
        return f'no reply within {self.target.timeout:g} s (datagram or reply dropped, no ICMP seen)'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Run one hello exchange against ``target``; always fires with a ProbeResult."""
    try:
        if target.transport == 'tcp':
            return _TcpExchange(reactor, target).start()
        if target.transport == 'udp':
            return _UdpExchange(reactor, target).start()
    except Exception as exc:
        return crashed(target, f'framed/{target.transport}', exc)
    return error_result(target, f'framed/{target.transport}',
                        f'framed speaks tcp/udp, not {target.transport}')
