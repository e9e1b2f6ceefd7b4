"""``terminal`` and ``discovery``: SafeQ terminal / payment machine (SPM) protocols, stub and probe.

YSoft's terminal protocols (Terminal Pro / UltraLight sessions on 4096/tcp,
remote management on 4095/tcp, SPM on 4196-4199/tcp, discovery on
64099/udp) are proprietary and undocumented. This module stands in for them
with a documented session of the vendor's shape and size, carried in the
``framed`` codec (``framed.encode``/``framed.decode``: one compact JSON header
line, LF, then ``size`` body bytes; version 1).

``discovery`` (UDP, one datagram each way)
==========================================

Request::

    {"v": 1, "op": "discover", "nonce": "<1-128 chars>", "size": 0}

Reply (the server's identity, as YSoft's terminal tool or an SPM shows it)::

    {"v": 1, "ok": true, "op": "discover", "nonce": "<echoed>", "host": "<persona host>",
     "roles": [...], "product": "<identity product>", "version": "<identity version>",
     "address": "<persona address, else the stub's listening address>",
     "port": <server port>, "peer": "<client IP as seen>", "size": 0}

``terminal`` (TCP, or TLS)
==========================

Each payload travels in one frame prefixed by its length (4-byte big-endian,
as in framed; at most ``framed.MAX_FRAME``). Every request carries ``op``,
``seq`` (a non-negative integer echoed in the reply) and ``size``; every reply
is acknowledged with ``ok``, the echoed ``op`` and ``seq``, and the server's
``host``, ``roles``, ``port`` and the ``peer`` it saw. A session::

    starttls   {}                                 -> ok; both sides start TLS   (optional)
    login      {"card": "<4-32 digits>", "terminal": "<name>", "pin": "<digits>"?}
                                                  -> {"session": "<hex>", "user": "<name>"}
    jobs       {"session": s, "want": n}          -> {"count": k, "sha256": "<hex>"} + n bytes:
                                                     the user's job list as a JSON array
                                                     (name, pages, copies, colour, duplex,
                                                     paper, price, ...), space-padded to n
    logout     {"session": s}                     -> ok; the session ends

The vendor gives 40-60 kB of job metadata per session: the probe asks for
``target.size`` clamped into ``JOB_METADATA_RANGE`` (or exactly
``options['metadata_size']``), so the session has a realistic size whatever
the plan's default payload size is.

Security: ``tls`` listeners speak implicit TLS with the persona's certificate
(``tls.listen_tls``); ``optional`` listeners serve plain and offer
``starttls``; ``starttls`` listeners refuse everything but ``starttls`` until
the upgrade; ``plain`` listeners refuse ``starttls``. The probe uses implicit
TLS for ``tls`` targets, upgrades for ``starttls`` targets and for
``optional`` ones when it has a CA to verify with (``target.ca_file``;
``options['starttls']`` overrides), and verifies the chain and
``target.server_name`` either way.

Errors: any malformed request (not framed v1, unknown op, missing or ill-typed
field, unknown session, ``jobs`` before ``login``, oversized frame) is
answered with framed's error reply ``{"v": 1, "ok": false, "error": "..."}``
and the connection is closed (discovery: the error datagram is sent, the stub
keeps serving). Every valid request is logged with ``on_request`` (``op``
and, for sessions, ``session`` and ``bytes``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import secrets
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.protocols.basic import Int32StringReceiver

from . import framed
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .framed import FramedError
from .serving import LISTEN_BACKLOG, StubConnection, StubFactory, listen_udp, loads_json
from .probing import DatagramProbe, OnRequest, StreamClient, StreamProbe, crashed, report

PROTOCOL_IDS = ('terminal', 'discovery')

OPS = ('starttls', 'login', 'jobs', 'logout')
JOB_METADATA_RANGE = (40_000, 60_000)
MAX_METADATA = 512 << 10
MAX_NONCE = framed.MAX_NONCE
_CARD = re.compile(r'^[0-9]{4,32}$')
_PIN = re.compile(r'^[0-9]{0,16}$')

DEFAULT_PRODUCT = 'YSoft SafeQ 6'

_DOCUMENTS = ('Quarterly report', 'Invoice', 'Meeting minutes', 'Contract draft', 'Boarding pass',
              'Timesheet', 'Presentation', 'Purchase order', 'Lecture notes', 'Floor plan')
_EXTENSIONS = ('docx', 'pdf', 'xlsx', 'pptx', 'txt', 'png')


def product_of(persona: Persona) -> str:
    # The role layer names each SafeQ component's product (roles/personas.yaml 'product').
    return persona.identity.get('product') or DEFAULT_PRODUCT


def job_metadata(size: int, owner: str, spooler: str, now: float) -> tuple[bytes, int]:
    """(JSON array of job descriptions padded with spaces to exactly ``size`` bytes, job count).

    Below 2 bytes no JSON fits; the body is then ``size`` spaces and count 0.
    """
    if size < 2:
        return b' ' * size, 0
    parts: list[bytes] = []
    used = 2                                   # '[' and ']'
    while True:
        index = len(parts)
        submitted = datetime.datetime.fromtimestamp(now - 97 * (index + 1), datetime.timezone.utc)
        pages = 1 + secrets.randbelow(40)
        job = {'id': secrets.token_hex(16), 'name': f'{_DOCUMENTS[index % len(_DOCUMENTS)]} '
                                                    f'{index + 1}.{_EXTENSIONS[index % len(_EXTENSIONS)]}',
               'owner': owner, 'pages': pages, 'copies': 1 + index % 3, 'color': index % 2 == 0,
               'duplex': index % 3 != 0, 'paper': 'A4' if index % 5 else 'A3',
               'submitted': submitted.strftime('%Y-%m-%dT%H:%M:%SZ'),
               'bytes': 20_000 * pages + secrets.randbelow(50_000), 'spooler': spooler,
               'price': f'{pages * 0.04:.2f}', 'favorite': index % 7 == 0, 'status': 'waiting'}
        part = json.dumps(job, separators=(',', ':')).encode('ascii')
        extra = len(part) + (1 if parts else 0)
        if used + extra > size:
            break
        parts.append(part)
        used += extra
    body = b'[' + b','.join(parts) + b' ' * (size - used) + b']'
    return body, len(parts)


# --- server: terminal sessions -----------------------------------------------------

class _RequestError(Exception):
    """A request the server answers with an error reply and a close."""


class _TerminalServer(StubConnection, Int32StringReceiver):
    MAX_LENGTH = framed.MAX_FRAME

    def __init__(self, factory: _TerminalFactory) -> None:
        self.factory = factory
        self.session: str | None = None
        self.user = ''
        self.tls = factory.security == 'tls'



    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        super().dataReceived(data)

    def stringReceived(self, string: bytes) -> None:
        if self.closing:
            return
        try:
            header, body = framed.decode(string)
            op, seq = self._check(header, body)
            reply_fields, reply_body, record = getattr(self, f'_op_{op}')(header)
        except (FramedError, _RequestError) as exc:
            self.sendString(framed.encode_error(str(exc)))
            self.hang_up()
            return
        self.sendString(self._reply(op, seq, reply_fields, reply_body))
        self.report_request(op, **record)
        if op == 'starttls':
            from . import tls as tls_helper
            self.transport.startTLS(tls_helper.server_options(self.factory.persona))
            self.tls = True

    def _check(self, header: dict[str, Any], body: bytes) -> tuple[str, int]:
        op, seq, size = header.get('op'), header.get('seq'), header.get('size')
        if op not in OPS:
            raise _RequestError(f'unknown op {op!r}')
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise _RequestError(f'seq must be a non-negative integer, got {seq!r}')
        if not isinstance(size, int) or isinstance(size, bool) or size != len(body):
            raise _RequestError(f'size {size!r} does not match the {len(body)} B body')
        if op != 'starttls' and self.factory.security == 'starttls' and not self.tls:
            raise _RequestError('STARTTLS required first on this port')
        if op in ('jobs', 'logout'):
            if self.session is None:
                raise _RequestError(f'{op} outside a session (login first)')
            if header.get('session') != self.session:
                raise _RequestError(f'unknown session {str(header.get("session"))[:40]!r}')
        return op, seq

    def _reply(self, op: str, seq: int, fields: dict[str, Any], body: bytes) -> bytes:
        persona = self.factory.persona
        header = {'v': framed.VERSION, 'ok': True, 'op': op, 'seq': seq, 'host': persona.host,
                  'roles': list(persona.roles), 'port': self.port, 'peer': self.peer,
                  **fields, 'size': len(body)}
        return framed.encode(header, body)

    def _op_starttls(self, header):
        if self.tls:
            raise _RequestError('TLS already active')
        if self.factory.security not in ('starttls', 'optional'):
            raise _RequestError('STARTTLS not offered on this port')
        return {}, b'', {}

    def _op_login(self, header):
        card, pin, name = header.get('card'), header.get('pin', ''), header.get('terminal', '')
        if not isinstance(card, str) or not _CARD.match(card):
            raise _RequestError('card must be a string of 4-32 digits')
        if not isinstance(pin, str) or not _PIN.match(pin):
            raise _RequestError('pin must be a string of at most 16 digits')
        if not isinstance(name, str) or len(name) > 64:
            raise _RequestError('terminal must be a name of at most 64 characters')
        self.session = secrets.token_hex(16)
        self.user = f'card-{card[-4:]}'
        return ({'session': self.session, 'user': self.user,
                 'product': product_of(self.factory.persona)}, b'',
                {'session': self.session, 'card': f'…{card[-4:]}', 'terminal': name})

    def _op_jobs(self, header):
        want = header.get('want')
        if not isinstance(want, int) or isinstance(want, bool) or not 0 <= want <= MAX_METADATA:
            raise _RequestError(f'want must be an integer 0-{MAX_METADATA}, got {want!r}')
        body, count = job_metadata(want, self.user, self.factory.persona.host,
                                   self.factory.reactor.seconds())
        return ({'session': self.session, 'count': count,
                 'sha256': hashlib.sha256(body).hexdigest()}, body,
                {'session': self.session, 'bytes': len(body), 'count': count})

    def _op_logout(self, header):
        session, self.session = self.session, None
        return {'session': session}, b'', {'session': session}

    def lengthLimitExceeded(self, length: int) -> None:
        if not self.closing:
            self.sendString(framed.encode_error(f'frame of {length} B exceeds the '
                                                f'{framed.MAX_FRAME} B limit'))
            self.hang_up()

    def request_fields(self) -> dict[str, Any]:
        return {'tls': self.tls}


class _TerminalFactory(StubFactory):
    protocol = _TerminalServer


# --- server: discovery --------------------------------------------------------------

def _discovery_answer(persona: Persona, datagram: bytes, port: int, local: str,
                      peer: str) -> tuple[bytes, dict[str, Any] | None]:
    try:
        header, body = framed.decode(datagram)
        if header.get('op') != 'discover':
            raise FramedError(f'unknown op {header.get("op")!r}')
        nonce = header.get('nonce')
        if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE:
            raise FramedError(f'nonce must be a string of 1-{MAX_NONCE} characters')
        if body or header.get('size', 0) != 0:
            raise FramedError('discover carries no body (size 0)')
    except FramedError as exc:
        return framed.encode_error(str(exc)), None
    reply = {'v': framed.VERSION, 'ok': True, 'op': 'discover', 'nonce': nonce,
             'host': persona.host, 'roles': list(persona.roles), 'product': product_of(persona),
             'version': str(persona.identity.get('version', '')),
             'address': persona.address or local, 'port': port, 'peer': peer, 'size': 0}
    return framed.encode(reply), {'op': 'discover', 'nonce': nonce}


class _DiscoveryServer(DatagramProtocol):
    noisy = False

    def __init__(self, persona: Persona, on_request: OnRequest | None) -> None:
        self.persona = persona
        self.on_request = on_request

    def datagramReceived(self, datagram: bytes, addr) -> None:
        host = self.transport.getHost()
        if len(datagram) > framed.MAX_DATAGRAM:
            reply, record = framed.encode_error(f'datagram exceeds the {framed.MAX_DATAGRAM} B limit'), None
        else:
            reply, record = _discovery_answer(self.persona, datagram, host.port, host.host, addr[0])
        self.transport.write(reply, addr)
        if record is not None:
            report(self.on_request, {'transport': 'udp', 'port': host.port, 'peer': addr[0], **record})


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve ``terminal`` sessions (TCP, TLS per listener.security) or ``discovery`` (UDP)."""
    if listener.protocol == 'discovery' or listener.transport == 'udp':
        if listener.transport != 'udp' or listener.security != 'plain':
            raise ValueError(f'discovery is plain UDP, not {listener.security} {listener.transport}')
        return listen_udp(reactor, listener.port, _DiscoveryServer(persona, on_request),
                          interface=interface, max_packet=framed.MAX_DATAGRAM + 1)
    if listener.transport != 'tcp':
        raise ValueError(f'terminal sessions run over TCP, not {listener.transport}')
    factory = _TerminalFactory(reactor, persona, on_request, listener.security)
    if listener.security == 'tls':
        from . import tls as tls_helper
        return tls_helper.listen_tls(reactor, listener.port, factory, persona, interface=interface)
    if listener.security in ('starttls', 'optional'):
        from . import tls as tls_helper
        tls_helper.server_options(persona)   # fail at bind time, not at the first STARTTLS
    return reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG, interface=interface)


# --- client probes ---------------------------------------------------------------------

def metadata_size(target: ProbeTarget) -> int:
    explicit = target.options.get('metadata_size')
    if isinstance(explicit, int) and not isinstance(explicit, bool) and 0 <= explicit <= MAX_METADATA:
        return explicit
    low, high = JOB_METADATA_RANGE
    return min(max(target.size, low), high)


def wants_starttls(target: ProbeTarget) -> bool:
    if target.security == 'starttls':
        return True
    if target.security == 'optional':
        return bool(target.options.get('starttls', bool(target.ca_file)))
    return False


class _TerminalClient(StreamClient):

    def __init__(self, target: ProbeTarget) -> None:
        self.target = target
        self.card = str(target.options.get('card') or '0004' + ''.join(
            str(secrets.randbelow(10)) for _ in range(8)))
        self.want = metadata_size(target)
        self.starttls = wants_starttls(target)
        self.session: str | None = None
        self.seq = 0
        self.pending: str | None = None
        self.peer_seen: str | None = None
        self.steps: list[str] = []

    def begin(self) -> None:
        self._request('starttls' if self.starttls else 'login')

    def _request(self, op: str) -> None:
        self.seq += 1
        self.pending = op
        header: dict[str, Any] = {'v': framed.VERSION, 'op': op, 'seq': self.seq, 'size': 0}
        if op == 'login':
            header.update(card=self.card, terminal=f'safeq-lab probe {self.target.id}'[:64])
        elif op == 'jobs':
            header.update(session=self.session, want=self.want)
        elif op == 'logout':
            header.update(session=self.session)
        self.probe.stage = f'waiting for the {op} reply'
        self.sendString(framed.encode(header))

    def sendString(self, string: bytes) -> None:
        self.transport.write(len(string).to_bytes(4, 'big') + string)

    # A tiny Int32 de-framer: StreamClient is a plain Protocol.
    _buffer = b''

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4 and self.probe.result is None:
            length = int.from_bytes(self._buffer[:4], 'big')
            if length > framed.MAX_FRAME:
                self.probe.decide('protocol_error', f'reply frame of {length} B exceeds '
                                                    f'{framed.MAX_FRAME} B (not this protocol?)')
                return
            if len(self._buffer) < 4 + length:
                return
            payload, self._buffer = self._buffer[4:4 + length], self._buffer[4 + length:]
            self._reply(payload)

    def _fail(self, detail: str) -> None:
        self.probe.decide('protocol_error', detail, peer_seen=self.peer_seen)

    def _reply(self, payload: bytes) -> None:
        op = self.pending
        try:
            header, body = framed.decode(payload)
        except FramedError as exc:
            return self._fail(f'{op} reply: {exc}')
        if header.get('ok') is False:
            return self._fail(f'server refused {op}: {header.get("error")!r}')
        if header.get('ok') is not True or header.get('op') != op or header.get('seq') != self.seq:
            return self._fail(f'{op} reply does not acknowledge request {self.seq}: '
                              f'ok={header.get("ok")!r} op={header.get("op")!r} '
                              f'seq={header.get("seq")!r}')
        if header.get('size') != len(body):
            return self._fail(f'{op} reply size {header.get("size")!r} != {len(body)} B body')
        if isinstance(header.get('peer'), str):
            self.peer_seen = header['peer']
        return getattr(self, f'_after_{op}')(header, body)

    def _after_starttls(self, header, body) -> None:
        if self.probe.start_tls():
            self._request('login')

    def _after_login(self, header, body) -> None:
        session = header.get('session')
        if not isinstance(session, str) or not session:
            return self._fail('login reply without a session id')
        self.session = session
        self.server = f'{header.get("host")} ({header.get("product", "?")})'
        self.steps.append(f'login card …{self.card[-4:]} → session')
        return self._request('jobs')

    def _after_jobs(self, header, body) -> None:
        if header.get('session') != self.session:
            return self._fail('jobs reply for another session')
        if len(body) != self.want:
            return self._fail(f'asked for {self.want} B of job metadata, got {len(body)} B')
        if header.get('sha256') != hashlib.sha256(body).hexdigest():
            return self._fail('job metadata does not match its sha256 (altered in transit?)')
        if self.want >= 2:
            try:
                jobs = loads_json(body)
            except ValueError:
                return self._fail('job metadata is not JSON')
            if not isinstance(jobs, list) or len(jobs) != header.get('count'):
                return self._fail('job metadata is not the announced list of jobs')
        self.steps.append(f'jobs {len(body)} B ({header.get("count")} jobs)')
        return self._request('logout')

    def _after_logout(self, header, body) -> None:
        if header.get('session') != self.session:
            return self._fail('logout reply for another session')
        self.steps.append('logout')
        self.probe.exchange += ': ' + ', '.join(self.steps) + ' → all acked'
        self.probe.decide('ok', f'session with {self.server} on port {header.get("port")}',
                          peer_seen=self.peer_seen)

    def lost_detail(self, reason) -> str:
        return f'connection closed {self.probe.stage}: {reason.getErrorMessage()}'


def _judge_discovery(nonce: str):
    def judge(probe: DatagramProbe, datagram: bytes) -> None:
        try:
            header, _body = framed.decode(datagram)
        except FramedError as exc:
            probe.decide('protocol_error', f'discovery reply: {exc}')
            return
        if header.get('ok') is False:
            probe.decide('protocol_error', f'server refused discover: {header.get("error")!r}')
            return
        if header.get('ok') is not True or header.get('op') != 'discover' or header.get('nonce') != nonce:
            probe.decide('protocol_error', 'reply does not answer our discover (op/nonce mismatch)')
            return
        host, peer = header.get('host'), header.get('peer')
        if not isinstance(host, str) or not isinstance(peer, str):
            probe.decide('protocol_error', 'discovery reply without host/peer')
            return
        product = header.get('product', '?')
        probe.exchange += f' → {host} ({product})'
        roles = ','.join(map(str, header.get('roles') or ())) or '-'
        probe.decide('ok', f'discovered {host} ({roles}) at {header.get("address")}', peer_seen=peer)
    return judge


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """``discovery``: one discover datagram. ``terminal``: a full session
    (login, job metadata, logout), over TLS where the target says so."""
    exchange = f'{target.protocol}/{target.transport}'
    try:
        if target.protocol == 'discovery' or target.transport == 'udp':
            if target.transport != 'udp':
                raise ValueError(f'discovery runs over udp, not {target.transport}')
            nonce = secrets.token_hex(8)
            request = framed.encode({'v': framed.VERSION, 'op': 'discover', 'nonce': nonce, 'size': 0})
            return DatagramProbe(reactor, target, 'discovery discover', request,
                                 _judge_discovery(nonce)).start()
        if target.transport != 'tcp':
            raise ValueError(f'terminal sessions run over tcp, not {target.transport}')
        exchange = 'terminal session'
        return StreamProbe(reactor, target, exchange).start(_TerminalClient(target),
                                                            tls=target.security == 'tls')
    except Exception as exc:
        return crashed(target, exchange, exc)

