"""``raw``: RAW / HP JetDirect printing (the printer's 9100/tcp), server stub and client probe.

RAW printing has no protocol of its own: the client opens a connection, writes
the job and closes (or half-closes) its side. Jobs are usually wrapped in PJL
(HP Printer Job Language)::

    ESC%-12345X@PJL JOB NAME="report"          <- UEL, then PJL command lines
    @PJL ENTER LANGUAGE=POSTSCRIPT              <- the PDL starts after this LF
    %!PS-Adobe-3.0 ... %%EOF                    <- page description (PostScript, PCL, ...)
    ESC%-12345X@PJL EOJ NAME="report"          <- the next UEL ends the PDL
    ESC%-12345X

Server stub
===========

Counts every byte until the client closes or half-closes, then logs one
``on_request`` record: ``op='print-job'``, ``bytes`` (all bytes received),
``pdl_bytes`` (page description bytes), ``pjl`` (a ``ESC%-12345X@PJL`` header
was seen), ``language``, ``job`` and ``end`` (``half-close``, ``close`` or
``timeout``). A connection that sends nothing is not a job and is not logged.
After a client half-close the stub writes any pending reply and closes.

Between UELs the stub reads PJL command lines (case-insensitive, CR optional)
and answers the ones a real printer answers, each reply ending with a form
feed (``\\f``), as printers do:

``@PJL INFO ID``       ``@PJL INFO ID\\r\\n"<identity make_model>"\\r\\n\\f``
``@PJL INFO STATUS``   ``@PJL INFO STATUS\\r\\nCODE=10001\\r\\nDISPLAY="Ready"\\r\\n``
                       ``ONLINE=TRUE\\r\\n\\f``
``@PJL ECHO <text>``   ``@PJL ECHO <text>\\r\\n\\f``
``@PJL USTATUS JOB=ON``, then at ``@PJL EOJ``:
                       ``@PJL USTATUS JOB\\r\\nEND\\r\\nNAME="<job>"\\r\\nPAGES=1\\r\\n\\f``

Unknown ``INFO`` categories get the category echoed and a ``?`` line; other
PJL commands (``SET``, ``COMMENT``, ...) are accepted silently. A line that is
not PJL starts the PDL implicitly (a bare PostScript job is fine).

Lab extension: ``@PJL INFO LABBYTES``
-------------------------------------

JetDirect never acknowledges data, so a client cannot tell how much of its job
arrived. The stub adds one ``INFO`` category (lab only, no real printer has
it) that makes the count visible in band::

    @PJL INFO LABBYTES\\r\\n
    PDL=<bytes of the last complete PDL section>\\r\\n
    TOTAL=<bytes received on this connection up to the end of this command line>\\r\\n
    PJL=TRUE|FALSE\\r\\n                 (a UEL + @PJL header was seen)
    LANGUAGE=<last ENTER LANGUAGE, or AUTO>\\r\\n
    PEER="<client IP as the stub saw it>"\\r\\n
    HOST="<persona host>"\\r\\n
    \\f

The probe sends ``UEL @PJL JOB``, ``@PJL ENTER LANGUAGE=POSTSCRIPT``,
``target.size`` bytes of PostScript, ``UEL @PJL EOJ``, ``@PJL INFO ID``,
``@PJL INFO LABBYTES`` and a final UEL, reads both replies, and is ``ok`` only
when ``PDL`` equals ``target.size`` and ``TOTAL`` equals what it sent up to
that line. The same job can be sent by any client, e.g.
``nc -N HOST 9100 < job.pcl``, and the replies appear on its stdout.

Malformed input: a PJL command line longer than ``MAX_PJL_LINE`` closes the
connection (the job is still logged); everything else is print data, as on a
printer. Silent connections are dropped after ``IDLE_TIMEOUT`` seconds.

Shared client machinery
=======================

``StreamProbe``/``StreamClient`` (one TCP or TLS exchange with a single
verdict, one timer and clean teardown), ``DatagramProbe`` (one UDP
request/reply) and ``postscript_job`` (a realistic print payload of an exact
size) live here and are reused by ``lpd``, ``terminal`` and ``timesync``.
"""

from __future__ import annotations

import errno
import math
import os
import re
import secrets
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .framed import IDLE_TIMEOUT, LISTEN_BACKLOG, _classify_os_error, _report

PROTOCOL_IDS = ('raw',)

UEL = b'\x1b%-12345X'          # PJL Universal Exit Language
MAX_PJL_LINE = 4096            # longest PJL command line the stub accepts
FORM_FEED = b'\x0c'            # ends every PJL reply
MAX_REPLY = 64 << 10           # the probe gives up on replies larger than this

OnRequest = Callable[[dict[str, Any]], None]

_log = Logger()


# =============================================================================
# Shared client machinery (also used by lpd, terminal and timesync)
# =============================================================================

class _Verdict:
    """One probe: the verdict is recorded once, then resources are released,
    then ``done`` fires (so a caller stopping its reactor leaks nothing)."""

    def __init__(self, reactor, target: ProbeTarget, exchange: str) -> None:
        self.reactor = reactor
        self.target = target
        self.exchange = exchange      # what was done; subclasses extend it as steps succeed
        self.stage = 'waiting for the first reply'
        self.started = reactor.seconds()
        self.result: ProbeResult | None = None
        self.done: Deferred[ProbeResult] = Deferred()
        self._timer = None

    def _arm(self) -> None:
        self._timer = self.reactor.callLater(self.target.timeout, self._timed_out)

    def decide(self, outcome: str, detail: str = '', peer_seen: str | None = None) -> bool:
        """Record the verdict once; later events (e.g. the close we cause) are ignored."""
        if self.result is not None:
            return False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.result = ProbeResult(id=self.target.id, outcome=outcome,
                                  elapsed=max(0.0, self.reactor.seconds() - self.started),
                                  exchange=self.exchange, detail=detail, peer_seen=peer_seen)
        self._release()
        return True

    def fire(self) -> None:
        if self.result is not None and not self.done.called:
            self.done.callback(self.result)

    def _timed_out(self) -> None:
        self._timer = None
        self.decide('timeout', self._timeout_detail())

    def _timeout_detail(self) -> str:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


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


class _StreamClientFactory(ClientFactory):
    # reactor.connectTCP/connectSSL rather than endpoints, like framed.
    noisy = False

    def __init__(self, probe: StreamProbe, client: StreamClient) -> None:
        self.probe = probe
        self.client = client

    def buildProtocol(self, addr) -> StreamClient:
        self.client.factory = self
        return self.client

    def clientConnectionFailed(self, connector, reason) -> None:
        self.probe.connect_failed(reason)


class StreamProbe(_Verdict):
    """One TCP exchange, over implicit TLS when ``tls=True`` (chain and host
    name verified by ``tls.client_creator``). STARTTLS clients call
    ``start_tls()`` from their protocol."""

    _connector = None     # set while the TCP handshake is pending
    _open = False         # a connection exists and has not been lost yet
    _made = False         # the TCP handshake completed at some point
    tls_active = False    # TLS was requested (implicit or STARTTLS)
    handshake_done = False

    def start(self, client: StreamClient, tls: bool = False) -> Deferred[ProbeResult]:
        client.probe = self
        self.client = client
        factory = _StreamClientFactory(self, client)
        backstop = math.ceil(self.target.timeout) + 1   # our own timer fires first
        try:
            self._arm()
            if tls:
                from . import tls as tls_helper   # pyOpenSSL only when TLS is used
                self.tls_active = True
                self.exchange += ' over TLS'
                self._connector = tls_helper.connect_tls(self.reactor, self.target, factory,
                                                         timeout=backstop)
            else:
                self._connector = self.reactor.connectTCP(self.target.host, self.target.port,
                                                          factory, timeout=backstop)
        except Exception as exc:  # TLSMaterialMissing, unreadable CA file, ...
            outcome, detail = _classify_os_error(exc)
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

    def connected(self, client: StreamClient) -> bool:
        """The TCP connection is up; True if the client should begin its exchange."""
        self._connector = None
        self._made = self._open = True
        if self.result is not None:   # connected after the verdict: just hang up
            client.transport.abortConnection()
            return False
        return True

    def connect_failed(self, reason) -> None:
        self._connector = None
        self.decide(*_classify_os_error(reason.value))   # ignored after our own stopConnecting

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
            return f'no TCP connection within {wait} (SYN dropped?)'
        if self.tls_active and not self.handshake_done:
            return f'connected, but the TLS handshake did not finish within {wait}'
        return f'connected, but no answer within {wait} while {self.stage}'

    def _release(self) -> None:
        if self._open:
            transport = self.client.transport
            if self.result.outcome == 'ok':
                transport.loseConnection()    # the peer has answered everything: nothing to flush
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
    noisy = False

    def __init__(self, probe: DatagramProbe) -> None:
        self.probe = probe

    def datagramReceived(self, datagram: bytes, addr) -> None:
        if self.probe.result is None:
            self.probe.on_reply(self.probe, datagram)

    def connectionRefused(self) -> None:
        self.probe.decide('refused', 'ICMP port unreachable (ECONNREFUSED)')

    def stopProtocol(self) -> None:
        self.probe.port_stopped()


class DatagramProbe(_Verdict):
    """One UDP request and its reply; ``on_reply(probe, datagram)`` must decide."""

    _port = None
    max_reply = 8 << 10

    def __init__(self, reactor, target: ProbeTarget, exchange: str, request: bytes,
                 on_reply: Callable[[DatagramProbe, bytes], None]) -> None:
        super().__init__(reactor, target, exchange)
        self.request = request
        self.on_reply = on_reply
        self.stage = 'waiting for the reply datagram'

    def start(self) -> Deferred[ProbeResult]:
        self._arm()
        try:
            self._port = self.reactor.listenUDP(0, _DatagramClient(self),
                                                maxPacketSize=self.max_reply + 1)
            # A connected socket makes the kernel report ICMP port unreachable
            # to us (ECONNREFUSED) and filters datagrams from anyone else.
            self._port.connect(self.target.host, self.target.port)
            self._port.write(self.request)
        except Exception as exc:  # e.g. EHOSTUNREACH on send
            self.decide(*_classify_os_error(exc))
        return self.done

    def port_stopped(self) -> None:
        """See framed._UdpExchange.port_stopped: epoll closes a UDP port on an
        ICMP error without calling connectionRefused; read the error here."""
        if self.result is not None or self._port is None:
            return
        code = 0
        try:
            code = self._port.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except (AttributeError, OSError):
            pass
        if code == errno.ECONNREFUSED:
            self.decide('refused', 'ICMP port unreachable (ECONNREFUSED)')
        elif code:
            outcome, detail = _classify_os_error(OSError(code, os.strerror(code)))
            self.decide(outcome, f'UDP socket error: {detail}')
        else:
            self.decide('error', 'UDP socket closed while waiting for the reply, cause unknown')

    def _timeout_detail(self) -> str:
        return (f'no reply within {self.target.timeout:g} s '
                f'(datagram or reply dropped, no ICMP seen)')

    def _release(self) -> None:
        if self._port is None:
            self.fire()
            return
        port, self._port = self._port, None
        stopped = maybeDeferred(port.stopListening)
        stopped.addErrback(lambda failure: _log.failure('stopListening failed', failure))
        stopped.addBoth(lambda _: self.fire())


def crashed(target: ProbeTarget, exchange: str, exc: BaseException) -> Deferred[ProbeResult]:
    """The one result row of a probe that failed before it could run."""
    return succeed(ProbeResult(id=target.id, outcome='error', elapsed=0.0, exchange=exchange,
                               detail=f'probe crashed: {type(exc).__name__}: {exc}'))


def postscript_job(size: int, title: str = 'safeq-lab probe') -> bytes:
    """A PostScript page of exactly ``size`` bytes: a DSC header, one line of
    text and a hex-encoded grey image of random (incompressible) samples.

    Pure ASCII, so it never contains a PJL UEL. Sizes smaller than the
    header and trailer yield a truncated header (still ``size`` bytes).
    """
    safe_title = re.sub(r'[^A-Za-z0-9 ._-]', '_', title)[:64]
    head = (b'%!PS-Adobe-3.0\n'
            b'%%Creator: safeq-lab\n'
            b'%%Title: ' + safe_title.encode('ascii') + b'\n'
            b'%%Pages: 1\n%%BoundingBox: 0 0 595 842\n%%EndComments\n'
            b'%%Page: 1 1\n'
            b'/Helvetica findfont 12 scalefont setfont\n'
            b'72 770 moveto (' + safe_title.encode('ascii') + b') show\n'
            b'gsave 72 72 translate 451 451 scale\n'
            b'/picstr 32 string def\n'
            b'256 256 8 [256 0 0 -256 0 256] {currentfile picstr readhexstring pop} image\n')
    tail = b'\ngrestore\nshowpage\n%%Trailer\n%%EOF\n'
    room = size - len(head) - len(tail)
    if room < 0:
        return (head + tail)[:size]
    full, rest = divmod(room, 65)          # 64 hex digits + newline per line
    digits = os.urandom((full * 64 + rest) // 2 + 1).hex().encode('ascii')
    lines = [digits[i * 64:(i + 1) * 64] + b'\n' for i in range(full)]
    if rest:
        lines.append(digits[full * 64:full * 64 + rest - 1] + b'\n')
    return head + b''.join(lines) + tail


# =============================================================================
# RAW / JetDirect: PJL codec
# =============================================================================

def pjl_reply(*lines: str) -> bytes:
    return ''.join(f'{line}\r\n' for line in lines).encode('ascii', 'replace') + FORM_FEED


def _pjl_words(line: bytes) -> tuple[str, list[str], str]:
    """(command, words, rest) of one ``@PJL`` line: 'INFO', ['INFO', 'ID'], 'ID'."""
    text = line.decode('latin-1').strip()
    body = text[4:].strip()                       # after '@PJL'
    normal = re.sub(r'\s*=\s*', '=', body)
    words = normal.split()
    command = words[0].upper() if words else ''
    rest = body[len(words[0]):].strip() if words else ''
    return command, words, rest


def _quoted_value(words: list[str], key: str) -> str:
    """Value of KEY=... (quotes removed) in normalized PJL words."""
    text = ' '.join(words)
    match = re.search(rf'\b{key}="([^"]*)"', text, re.I) or re.search(rf'\b{key}=(\S+)', text, re.I)
    return match.group(1) if match else ''


def parse_pjl_replies(data: bytes) -> tuple[list[tuple[str, list[str]]], bytes]:
    """Split form-feed terminated PJL replies: ([(first line, other lines)], rest)."""
    replies = []
    while FORM_FEED in data:
        reply, _, data = data.partition(FORM_FEED)
        lines = [line.strip() for line in reply.decode('latin-1').splitlines() if line.strip()]
        if lines:
            replies.append((lines[0], lines[1:]))
    return replies, data


def reply_fields(lines: list[str]) -> dict[str, str]:
    fields = {}
    for line in lines:
        key, eq, value = line.partition('=')
        if eq:
            fields[key.strip().upper()] = value.strip().strip('"')
    return fields


# =============================================================================
# RAW / JetDirect: server stub
# =============================================================================

@implementer(IHalfCloseableProtocol)
class _RawServer(Protocol, TimeoutMixin):

    def __init__(self, factory: _RawFactory) -> None:
        self.factory = factory
        self.buffer = b''
        self.consumed = 0         # bytes before self.buffer[0]
        self.total = 0
        self.mode = 'pjl'
        self.after_uel = False
        self.pjl_seen = False
        self.pdl = 0              # bytes of the PDL section in progress
        self.pdl_total = 0
        self.last_pdl = 0         # bytes of the last complete PDL section
        self.language = 'AUTO'
        self.job = ''
        self.ustatus_job = False
        self.reported = False
        self.closing = False
        self.end = 'close'

    def callLater(self, period, func):
        return self.factory.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        # Kept now: the socket is gone by the time connectionLost reports.
        self.port = self.transport.getHost().port
        self.peer = self.transport.getPeer().host
        self.setTimeout(IDLE_TIMEOUT)

    # --- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        self.total += len(data)
        self.buffer += data
        self._parse()

    def _take(self, count: int) -> bytes:
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        self.consumed += count
        return taken

    def _parse(self) -> None:
        while self.buffer and not self.closing:
            if self.mode == 'pdl':
                index = self.buffer.find(UEL)
                if index < 0:
                    # Keep a possible partial UEL at the end for the next chunk.
                    keep = next((n for n in range(len(UEL) - 1, 0, -1)
                                 if self.buffer.endswith(UEL[:n])), 0)
                    self.pdl += len(self.buffer) - keep
                    self._take(len(self.buffer) - keep)
                    return
                self.pdl += index
                self._take(index)
                self.last_pdl = self.pdl
                self.pdl_total += self.pdl
                self.pdl = 0
                self.mode = 'pjl'
                continue
            if self.buffer.startswith(UEL):
                self._take(len(UEL))
                self.after_uel = True
                continue
            if UEL.startswith(self.buffer) or (len(self.buffer) <= 4
                                               and b'@PJL'.startswith(self.buffer.upper())):
                return  # too short to tell yet (a partial UEL or '@PJL')
            if self.buffer[:4].upper() == b'@PJL':
                end = self.buffer.find(b'\n')
                if end < 0:
                    if len(self.buffer) > MAX_PJL_LINE:
                        self._finish('malformed')   # not a printer's idea of a command line
                    return
                if end + 1 > MAX_PJL_LINE:
                    self._finish('malformed')
                    return
                line = self._take(end + 1)
                if self.after_uel:
                    self.pjl_seen = True
                self.after_uel = False
                self._command(line)
                continue
            if self.buffer[:1] in (b'\r', b'\n'):
                self._take(1)   # blank line between PJL commands
                continue
            # Anything else is print data: the PDL starts implicitly.
            self.after_uel = False
            self.mode = 'pdl'

    def _command(self, line: bytes) -> None:
        command, words, rest = _pjl_words(line)
        upper = [w.upper() for w in words]
        if command == 'ENTER' and len(upper) > 1 and upper[1].startswith('LANGUAGE='):
            self.language = upper[1].split('=', 1)[1] or 'AUTO'
            self.mode = 'pdl'
            self.pdl = 0
        elif command == 'JOB':
            self.job = _quoted_value(words, 'NAME')[:128]
        elif command == 'EOJ':
            if self.ustatus_job:
                name = _quoted_value(words, 'NAME')[:128] or self.job
                self._send(pjl_reply('@PJL USTATUS JOB', 'END', f'NAME="{name}"', 'PAGES=1'))
        elif command == 'USTATUS' and len(upper) > 1 and upper[1].startswith('JOB='):
            self.ustatus_job = upper[1] != 'JOB=OFF'
        elif command == 'ECHO':
            self._send(pjl_reply(f'@PJL ECHO {rest}'))
        elif command == 'INFO' and len(upper) > 1:
            self._info(upper[1])

    def _info(self, category: str) -> None:
        identity = self.factory.persona.identity
        if category == 'ID':
            model = identity.get('make_model') or f'safeq-lab {self.factory.persona.host}'
            self._send(pjl_reply('@PJL INFO ID', f'"{model}"'))
        elif category == 'STATUS':
            self._send(pjl_reply('@PJL INFO STATUS', 'CODE=10001', 'DISPLAY="Ready"', 'ONLINE=TRUE'))
        elif category == 'LABBYTES':
            self._send(pjl_reply('@PJL INFO LABBYTES', f'PDL={self.last_pdl}',
                                 f'TOTAL={self.consumed}',
                                 f'PJL={"TRUE" if self.pjl_seen else "FALSE"}',
                                 f'LANGUAGE={self.language}',
                                 f'PEER="{self.peer}"',
                                 f'HOST="{self.factory.persona.host}"'))
        else:
            self._send(pjl_reply(f'@PJL INFO {category}', '?'))

    def _send(self, data: bytes) -> None:
        self.transport.write(data)

    # --- end of job ----------------------------------------------------------

    def readConnectionLost(self) -> None:
        self._finish('half-close')

    def writeConnectionLost(self) -> None:
        pass

    def timeoutConnection(self) -> None:
        self.end = 'timeout'
        self._report()
        self.closing = True
        self.transport.abortConnection()

    def _finish(self, end: str) -> None:
        self.end = end
        self._report()
        self.closing = True
        self.setTimeout(None)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.setTimeout(None)
        self._report()

    def _report(self) -> None:
        if self.reported or self.total == 0:
            return
        self.reported = True
        pdl_bytes = self.pdl_total + self.pdl   # a job may end without a closing UEL
        _report(self.factory.on_request, {
            'transport': 'tcp', 'port': self.port, 'peer': self.peer, 'op': 'print-job',
            'bytes': self.total, 'pdl_bytes': pdl_bytes, 'pjl': self.pjl_seen, 'language': self.language,
            'job': self.job, 'end': self.end})


class _RawFactory(Factory):
    noisy = False

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None) -> None:
        self.reactor = reactor
        self.persona = persona
        self.on_request = on_request

    def buildProtocol(self, addr) -> _RawServer:
        return _RawServer(self)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve RAW/JetDirect on ``listener`` (plain TCP only)."""
    if listener.transport != 'tcp':
        raise ValueError(f'raw is a TCP protocol, not {listener.transport}')
    if listener.security != 'plain':
        raise ValueError(f'raw (JetDirect) has no TLS; listener security {listener.security!r}')
    return reactor.listenTCP(listener.port, _RawFactory(reactor, persona, on_request),
                             backlog=LISTEN_BACKLOG, interface=interface)


# =============================================================================
# RAW / JetDirect: client probe
# =============================================================================

def build_job(size: int, name: str) -> tuple[bytes, bytes, int]:
    """(job bytes, PDL data, TOTAL the stub must report at INFO LABBYTES)."""
    data = postscript_job(size, name)
    quoted = f'"{name}"'.encode('ascii')
    head = (UEL + b'@PJL JOB NAME=' + quoted + b'\r\n'
            b'@PJL ENTER LANGUAGE=POSTSCRIPT\r\n')
    trailer = UEL + b'@PJL EOJ NAME=' + quoted + b'\r\n@PJL INFO ID\r\n@PJL INFO LABBYTES\r\n'
    job = head + data + trailer + UEL
    return job, data, len(head) + len(data) + len(trailer)


class _RawClient(StreamClient):

    def __init__(self, target: ProbeTarget) -> None:
        self.target = target
        self.name = f'safeq-lab probe {secrets.token_hex(4)}'
        self.job, self.data, self.expected_total = build_job(target.size, self.name)
        self.buffer = b''
        self.model = None

    def begin(self) -> None:
        self.probe.stage = 'waiting for the @PJL INFO ID reply'
        self.transport.write(self.job)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_REPLY:
            self.probe.decide('protocol_error', f'more than {MAX_REPLY} B of reply, not PJL')
            return
        replies, self.buffer = parse_pjl_replies(self.buffer)
        for first, lines in replies:
            if self.probe.result is not None:
                return
            self._reply(first.upper(), lines)

    def _reply(self, first: str, lines: list[str]) -> None:
        if first == '@PJL INFO ID':
            self.model = lines[0].strip('"') if lines else ''
            self.probe.stage = 'waiting for the @PJL INFO LABBYTES reply'
            return
        if first != '@PJL INFO LABBYTES':
            return  # e.g. unsolicited USTATUS: printers may send those
        if self.model is None:
            self.probe.decide('protocol_error', 'INFO LABBYTES answered before INFO ID')
            return
        fields = reply_fields(lines)
        if not fields.get('PDL', '').isdigit() or not fields.get('TOTAL', '').isdigit():
            self.probe.decide('protocol_error', f'INFO LABBYTES without byte counts: {lines!r}')
            return
        pdl, total = int(fields['PDL']), int(fields['TOTAL'])
        self.probe.exchange += f' → INFO ID "{self.model}", LABBYTES PDL={pdl}'
        peer = fields.get('PEER') or None
        if pdl != len(self.data) or total != self.expected_total:
            self.probe.decide('protocol_error',
                              f'stub counted PDL={pdl} B, TOTAL={total} B; sent {len(self.data)} B '
                              f'of PDL, {self.expected_total} B in all (data lost or altered)',
                              peer_seen=peer)
            return
        self.probe.decide('ok', f'{fields.get("HOST", "?")} ({self.model}) counted all '
                                f'{pdl} B of PostScript', peer_seen=peer)

    def lost_detail(self, reason) -> str:
        return (f'connection closed {self.probe.stage} (no PJL reply: not a PJL printer, or '
                f'the job was cut): {reason.getErrorMessage()}')


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Send a PJL-wrapped PostScript job of ``target.size`` bytes and check the
    stub's byte count (``@PJL INFO LABBYTES``)."""
    exchange = f'JetDirect PJL job {target.size} B PostScript'
    try:
        if target.transport != 'tcp':
            raise ValueError(f'raw is a TCP protocol, not {target.transport}')
        return StreamProbe(reactor, target, exchange).start(_RawClient(target))
    except Exception as exc:
        return crashed(target, exchange, exc)
