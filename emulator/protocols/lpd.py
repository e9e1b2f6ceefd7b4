"""``lpr``: the LPD protocol of RFC 1179 (515/tcp and friends), server stub and client probe.

Every LPD command is one byte, operands separated by spaces, ending with LF.

Daemon commands (the first line of a connection)::

    \\x01 queue LF                    print any waiting jobs        -> no reply, close
    \\x02 queue LF                    receive a printer job         -> ack 0x00, subcommands follow
    \\x03 queue [list] LF             send queue state (short)      -> text, close
    \\x04 queue [list] LF             send queue state (long)       -> text, close
    \\x05 queue agent [list] LF       remove jobs                   -> no reply, close

Receive-job subcommands::

    \\x01 LF                          abort job (files so far are discarded; no reply)
    \\x02 count SP cfXnnnhost LF      control file follows: ack 0x00, then count bytes + 0x00 -> ack 0x00
    \\x03 count SP dfXnnnhost LF      data file follows:    ack 0x00, then count bytes + 0x00 -> ack 0x00

The client ends the job by closing the connection. The stub then logs one
``on_request`` record ``op='receive-job'`` with ``queue``, ``bytes`` (data file
bytes), ``control_bytes``, ``files``, and ``user``/``job``/``client_host`` from
the control file (P, J, H lines). A connection that closes in the middle of a
file is an aborted job and is not logged. A received job is also kept in the host's
``jobstore`` (kind ``print-job``, named by its J line, owner from P, the data file's sha256
and bytes), so a workflow can list it and pass it on. Queue state and the other daemon
commands are logged with ``op`` ``queue-state``, ``print-waiting`` or
``remove-jobs``.

Queues: the persona's ``identity['lpd_queues']`` (a list of names) when set,
otherwise any queue name is accepted. Real BSD lpd accepts clients only from
privileged source ports (721-731); print servers and MFDs do not, and neither
does the stub.

Malformed input (unknown command byte, bad count or file name, a file not
ending with 0x00, an over-long line, an unknown queue) gets a negative
acknowledgement (one non-zero byte, 0x01) and the connection is closed; other
clients are unaffected. Silent connections are dropped after ``IDLE_TIMEOUT``.

The probe submits one job: control file (H host, P user, J and N job name,
``l`` + U for the data file) first, then a PostScript data file of exactly
``target.size`` bytes, and is ``ok`` when every one of the five
acknowledgements is 0x00. Options: ``queue`` (default ``lp``), ``user``
(default ``safeq``), ``client_host`` (default ``safeq-lab``), and ``carries``/``holder``
(``jobstore``): the job is named after ``carries`` and its data file is the job the holder
host keeps under that name (a spooler releasing it), or a new one it then keeps (a user).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from twisted.internet.defer import Deferred
from twisted.protocols.basic import LineReceiver

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .serving import StubConnection, StubFactory, listen_plain_tcp
from .probing import OnRequest, StreamClient, tcp_client_probe
from . import jobstore
from .payloads import postscript_job

PROTOCOL_IDS = ('lpr',)

ACK = b'\x00'
NAK = b'\x01'
MAX_LINE = 1024               # longest command line
MAX_CONTROL = 64 << 10        # largest control file the stub accepts (they are a few hundred bytes)
MAX_DATA = 1 << 40            # largest data file (counted, never stored)
DEFAULT_QUEUE = 'lp'

_FILE_NAME = re.compile(rb'^[!-~]{1,255}$')   # printable ASCII, no spaces


def control_file(host: str, user: str, job: str, data_name: str) -> bytes:
    """An RFC 1179 control file printing one PostScript-ready data file."""
    return (f'H{host}\nP{user}\nJ{job}\nN{job}\nl{data_name}\nU{data_name}\n').encode('ascii')


def parse_control(data: bytes) -> dict[str, Any]:
    """The useful lines of a control file: client host (H), user (P), job name (J),
    and the data files it prints (lower-case commands)."""
    info: dict[str, Any] = {'client_host': '', 'user': '', 'job': '', 'prints': []}
    keys = {'H': 'client_host', 'P': 'user', 'J': 'job'}
    for raw_line in data.split(b'\n'):
        line = raw_line.decode('latin-1').rstrip('\r')
        if not line:
            continue
        code, value = line[0], line[1:][:128]
        if code in keys:
            info[keys[code]] = value
        elif code.islower():
            info['prints'].append(value)
    return info


# --- server stub ----------------------------------------------------------------

class _LpdServer(StubConnection, LineReceiver):
    delimiter = b'\n'
    MAX_LENGTH = MAX_LINE

    def __init__(self, factory: _LpdFactory) -> None:
        self.factory = factory
        self.state = 'command'        # command -> job <-> file -> job ... (and ``closing`` once hung up)
        self.queue = ''
        self.file_kind = ''
        self.remaining = 0            # bytes of the current file still to come
        self.control = b''
        self.file_size = 0
        self.data_bytes = 0
        self.control_bytes = 0
        self.files = 0
        self.info: dict[str, Any] = {}
        self.data_digest = hashlib.sha256()   # of the current data file
        self.data_kept = bytearray()          # its bytes, up to what the jobstore keeps



    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        super().dataReceived(data)

    # --- lines ---------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self.closing:
            return
        if self.state == 'command':
            self._daemon_command(line)
        elif self.state == 'job':
            self._subcommand(line)

    def _accepts(self, queue: str) -> bool:
        queues = self.factory.persona.identity.get('lpd_queues')
        return not queues or queue in queues

    def _daemon_command(self, line: bytes) -> None:
        if not line:
            return self._nak('empty command line')
        code, operands = line[0], line[1:].decode('latin-1').split()
        if not operands or not _FILE_NAME.match(operands[0].encode('latin-1')):
            return self._nak('missing or invalid queue name')
        queue = operands[0]
        if code == 0x02:
            if not self._accepts(queue):
                return self._nak(f'unknown queue {queue!r}')
            self.queue = queue
            self.state = 'job'
            self.transport.write(ACK)
        elif code in (0x03, 0x04):
            self.report_request('queue-state', queue=queue, long=code == 0x04)
            self.transport.write(self._queue_state(queue, long=code == 0x04))
            self.hang_up()
        elif code in (0x01, 0x05):
            self.report_request('print-waiting' if code == 0x01 else 'remove-jobs', queue=queue)
            self.hang_up()
        else:
            self._nak(f'unknown command byte 0x{code:02x}')

    def _queue_state(self, queue: str, long: bool) -> bytes:
        identity = self.factory.persona.identity
        model = identity.get('make_model') or f'safeq-lab {self.factory.persona.host}'
        if not self._accepts(queue):
            return f'{queue}: unknown printer\n'.encode('latin-1')
        text = f'{model}: {queue} is ready and printing\nno entries\n'
        if long:
            text = f'{self.factory.persona.host}: {queue}\n' + text
        return text.encode('latin-1', 'replace')

    def _subcommand(self, line: bytes) -> None:
        if not line:
            return self._nak('empty subcommand line')
        code = line[0]
        if code == 0x01:
            # Abort job: forget the files received so far; no reply.
            self.data_bytes = self.control_bytes = self.files = 0
            self.info = {}
            return None
        if code not in (0x02, 0x03):
            return self._nak(f'unknown subcommand byte 0x{code:02x}')
        operands = line[1:].split(b' ')
        if len(operands) != 2 or not operands[0].isdigit():
            return self._nak('subcommand needs "count name"')
        count, name = int(operands[0]), operands[1].rstrip(b'\r')
        kind = 'control' if code == 0x02 else 'data'
        if not _FILE_NAME.match(name) or not name.startswith(b'cf' if kind == 'control' else b'df'):
            return self._nak(f'invalid {kind} file name {name[:64]!r}')
        if count > (MAX_CONTROL if kind == 'control' else MAX_DATA):
            return self._nak(f'{kind} file of {count} B is too large')
        self.file_kind, self.remaining, self.file_size = kind, count, count
        self.control = b''
        self.data_digest, self.data_kept = hashlib.sha256(), bytearray()
        self.state = 'file'
        self.transport.write(ACK)
        self.setRawMode()
        return None

    # --- file bodies -----------------------------------------------------------

    def rawDataReceived(self, data: bytes) -> None:
        if self.state != 'file':
            return
        body = data[:self.remaining]
        self.remaining -= len(body)
        if self.file_kind == 'control':
            self.control += body
        else:
            self.data_digest.update(body)
            if len(self.data_kept) <= jobstore.MAX_DOCUMENT_BYTES:
                self.data_kept += body
        rest = data[len(body):]
        if self.remaining or not rest:
            return   # more body to come, or the 0x00 end marker is still on its way
        if rest[:1] != b'\x00':
            self._nak(f'{self.file_kind} file not followed by a 0x00 byte')
            return
        if self.file_kind == 'control':
            self.control_bytes += self.file_size
            self.info = parse_control(self.control)
        else:
            self.data_bytes += self.file_size
        self.files += 1
        self.state = 'job'
        self.transport.write(ACK)
        self.setLineMode(rest[1:])

    # --- end --------------------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        self._nak(f'command line longer than {MAX_LINE} B')

    def _nak(self, reason: str) -> None:
        if self.closing:
            return
        self.transport.write(NAK)
        self.hang_up()

    def connectionLost(self, reason) -> None:
        if self.queue and self.files and self.state == 'job' and not self.closing:
            self.report_request('receive-job', queue=self.queue, bytes=self.data_bytes,
                                control_bytes=self.control_bytes, files=self.files,
                                user=self.info.get('user', ''), job=self.info.get('job', ''),
                                client_host=self.info.get('client_host', ''))
            self._keep_job()
        super().connectionLost(reason)

    def _keep_job(self) -> None:
        size = len(self.data_kept) if len(self.data_kept) <= jobstore.MAX_DOCUMENT_BYTES else self.file_size
        data = bytes(self.data_kept) if size == len(self.data_kept) else None
        jobstore.store_for(self.factory.persona.host).keep(jobstore.Document(
            self.info.get('job', ''), 'print-job', size, self.data_digest.hexdigest(), via='lpr',
            peer=self.transport.getPeer().host, owner=self.info.get('user', ''), data=data))


class _LpdFactory(StubFactory):
    protocol = _LpdServer


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve LPD on ``listener`` (plain TCP only: RFC 1179 has no TLS)."""
    return listen_plain_tcp(reactor, listener, _LpdFactory(reactor, persona, on_request), 'lpr', interface)


# --- client probe ---------------------------------------------------------------------

class _LpdClient(StreamClient):
    """Sends the job step by step, each step after the previous 0x00."""

    def __init__(self, target: ProbeTarget) -> None:
        options = target.options
        self.queue = str(options.get('queue') or DEFAULT_QUEUE)
        host = str(options.get('client_host') or 'safeq-lab')
        user = str(options.get('user') or 'safeq')
        number = secrets.randbelow(1000)
        job = f'safeq-lab probe {target.id}'[:99]
        data_name = f'dfA{number:03d}{host}'
        carried, why = jobstore.to_send(options, ('print-job',), lambda: postscript_job(target.size, job))
        if why:
            raise ValueError(why)
        if carried is not None:
            job, user = carried.name, carried.owner or user
        self.data = postscript_job(target.size, job) if carried is None else carried.data
        self.job, self.user = job, user
        self.control = control_file(host, user, job, data_name)
        control_name = f'cfA{number:03d}{host}'
        # (what to send, what the next 0x00 acknowledges)
        self.steps = [
            (b'\x02' + self.queue.encode('latin-1') + b'\n', f'receive job on queue {self.queue!r}'),
            (f'\x02{len(self.control)} {control_name}\n'.encode('latin-1'), 'control file header'),
            (self.control + b'\x00', f'control file ({len(self.control)} B)'),
            (f'\x03{len(self.data)} {data_name}\n'.encode('latin-1'), 'data file header'),
            (self.data + b'\x00', f'data file ({len(self.data)} B)'),
        ]
        self.step = 0

    def begin(self) -> None:
        self._send()

    def _send(self) -> None:
        data, what = self.steps[self.step]
        self.probe.stage = f'waiting for the ack of the {what}'
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        for byte in data:
            if self.probe.result is not None:
                return
            what = self.steps[self.step][1]
            if byte != 0:
                self.probe.decide('protocol_error', f'LPD refused the {what}: '
                                                    f'negative acknowledgement 0x{byte:02x}')
                return
            self.step += 1
            if self.step == len(self.steps):
                self.probe.exchange += ' → 5 acks 0x00'
                self.probe.decide('ok', f'queue {self.queue!r} accepted the job: control '
                                        f'{len(self.control)} B, data {len(self.data)} B')
                return
            self._send()

    def lost_detail(self, reason) -> str:
        return f'LPD closed the connection {self.probe.stage}: {reason.getErrorMessage()}'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Submit one print job (control + PostScript data file of ``target.size`` B)."""
    queue = target.options.get('queue') or DEFAULT_QUEUE
    exchange = f'LPD receive-job {queue} {target.size} B PostScript'
    carried = (lambda client: f'LPD receive-job {queue} job {client.job!r} of {client.user}, {len(client.data)} B'
               ) if target.options.get('carries') else None
    return tcp_client_probe(reactor, target, exchange, _LpdClient, carried)
