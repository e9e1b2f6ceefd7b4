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
The job's last complete PDL section is also kept in the host's ``jobstore`` (kind
``print-job``, named by ``@PJL JOB NAME``, with its sha256 and bytes).
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

With the probe options ``carries``/``holder`` (``jobstore``) the job is named after ``carries``
and its PostScript is the job the holder host keeps under that name (FlexiSpooler releasing it).

The print payload (``payloads.postscript_job``, a realistic PostScript page
of an exact size) is shared with ``lpd``; the client machinery is ``probing``'s.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from . import jobstore
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .serving import StubConnection, StubFactory, listen_plain_tcp
from .probing import OnRequest, StreamClient, tcp_client_probe
from .payloads import postscript_job

PROTOCOL_IDS = ('raw',)

UEL = b'\x1b%-12345X'          # PJL Universal Exit Language
MAX_PJL_LINE = 4096            # longest PJL command line the stub accepts
FORM_FEED = b'\x0c'            # ends every PJL reply
MAX_REPLY = 64 << 10           # the probe gives up on replies larger than this


# =============================================================================
# Print payload (also used by lpd)
# =============================================================================

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
class _RawServer(StubConnection, Protocol):

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
        self.end = 'close'
        self.pdl_digest, self.pdl_kept = hashlib.sha256(), bytearray()   # the PDL section in progress
        self.section: tuple[int, str, bytes | None] | None = None        # the last complete one



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
                    self._pdl_bytes(self._take(len(self.buffer) - keep))
                    return
                self.pdl += index
                self._pdl_bytes(self._take(index))
                kept = bytes(self.pdl_kept) if len(self.pdl_kept) == self.pdl else None
                self.section = (self.pdl, self.pdl_digest.hexdigest(), kept)
                self.pdl_digest, self.pdl_kept = hashlib.sha256(), bytearray()
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

    def _pdl_bytes(self, data: bytes) -> None:
        self.pdl_digest.update(data)
        if len(self.pdl_kept) + len(data) <= jobstore.MAX_DOCUMENT_BYTES:
            self.pdl_kept += data

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
        super().timeoutConnection()

    def _finish(self, end: str) -> None:
        self.end = end
        self._report()
        self.hang_up()

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self._report()

    def _report(self) -> None:
        if self.reported or self.total == 0:
            return
        self.reported = True
        pdl_bytes = self.pdl_total + self.pdl   # a job may end without a closing UEL
        self.report_request('print-job', bytes=self.total, pdl_bytes=pdl_bytes, pjl=self.pjl_seen,
                            language=self.language, job=self.job, end=self.end)
        if self.section is not None:
            size, sha256, data = self.section
            jobstore.store_for(self.factory.persona.host).keep(jobstore.Document(
                self.job, 'print-job', size, sha256, via='raw', peer=self.peer, data=data))


class _RawFactory(StubFactory):
    protocol = _RawServer


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve RAW/JetDirect on ``listener`` (plain TCP only)."""
    return listen_plain_tcp(reactor, listener, _RawFactory(reactor, persona, on_request), 'raw (JetDirect)',
                            interface)


# =============================================================================
# RAW / JetDirect: client probe
# =============================================================================

def build_job(size: int, name: str, data: bytes | None = None) -> tuple[bytes, bytes, int]:
    """(job bytes, PDL data, TOTAL the stub must report at INFO LABBYTES); ``data``: the
    PostScript to send (default a new page of ``size`` bytes)."""
    data = postscript_job(size, name) if data is None else data
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
        carried, why = jobstore.to_send(target.options, ('print-job',), lambda: postscript_job(target.size, self.name))
        if why:
            raise ValueError(why)
        if carried is not None:
            self.name = carried.name
        self.job, self.data, self.expected_total = build_job(
            target.size, self.name, None if carried is None else carried.data)
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
    carried = (lambda client: f'JetDirect PJL job {client.name!r} {len(client.data)} B PostScript'
               ) if target.options.get('carries') else None
    return tcp_client_probe(reactor, target, exchange, _RawClient, carried)
