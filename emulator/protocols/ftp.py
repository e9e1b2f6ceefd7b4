"""``ftp``: FTP (RFC 959) file upload, passive and active data channels: a
pyftpdlib server stub and a stdlib ``ftplib`` client probe.

Flows: an MFD uploads a scanned document to the Terminal Server (control on
the catalog's FTP port, data on 1024-65535 in passive mode, or active mode
where the server connects back to the MFD), and the Terminal Server uploads a
terminal installation package to Sharp/Lexmark MFDs (passive).

Why both channels matter
========================
FTP is the catalog's one protocol whose firewall rule is not "one port": the
control connection alone proves little. A firewall that admits the control
port but not the data ports (no passive range, no ``nf_conntrack_ftp``
helper, or an active connect-back dropped) lets login succeed and every
transfer fail. The probe therefore uploads a realistic document, reads its
size back, downloads it again and compares SHA-256, over a data channel of
the requested mode, and reports:

* ``ok``              the file went up and came back identical;
* ``refused`` / ``timeout`` / ``unreachable``
                      the *control* connection could not be made (or the
                      server never sent its greeting: ``timeout``);
* ``protocol_error``  control worked but something after it failed; when the
                      data channel could not be opened (PASV port refused or
                      dropped, connect-back never arrived) the detail starts
                      with ``data channel:``; bytes that differ say so too.

Server stub
===========
pyftpdlib runs its own IO loop, so each listener gets a private ``IOLoop`` in
a dedicated thread (not the reactor's thread pool, which the probes use).
``listen()`` binds synchronously (bind errors raise ``CannotListenError``) and
``stopListening()`` wakes the thread, which closes the server and every open
session; it returns once the thread has exited and the listener's upload
directory is removed, so the port is free when it returns.

* One lab user, ``identity['ftp_user']`` / ``identity['ftp_password']``
  (default ``scan`` / ``scan``), whose home is a temporary directory per
  listener. The probe deletes its upload once verified (``DELE``); whatever clients
  leave is bounded to ``MAX_KEPT_BYTES`` (oldest deleted first) and removed when the
  listener stops.
* Passive ports: ``identity['passive_ports']`` as ``[low, high]``, default
  30000-30999. The catalog allows 1024-65535 (whatever the device is set
  to); real sites configure a narrow range so the rule can be narrow. A fixed
  sub-range also keeps the data ports out of Linux's ephemeral range
  (32768-60999, which the host's own outgoing connections use) and clear of
  every catalog service port, so a passive bind never collides with a stub,
  and any rule admitting 1024-65535 admits it. pyftpdlib falls back to a
  kernel-chosen port (and logs a warning) if the whole range is busy.
* Active mode: like classic ftpd and ProFTPD, the server connects back from
  its control port minus one (20 for 21), or ``identity['ftp_data_port']``.
  pyftpdlib itself always uses an ephemeral source port (pyftpdlib issue
  #510), so ``_ConnectBack`` binds the source port with ``SO_REUSEADDR``
  (several connect-backs share it; their 4-tuples differ). Ports below 1024
  need root (the lab runs as root); if the bind fails the server logs a
  warning once and falls back to an ephemeral source port.
* ``on_request`` is called, from the reactor thread, once per completed
  upload: ``{'transport', 'port', 'peer', 'op': 'STOR', 'file', 'bytes',
  'sha256', 'mode': 'passive'|'active', 'data_port', 'data_peer_port'}``.
* Every completed upload is also kept in the host's ``jobstore`` (kind ``scan``, named by the
  file's stem), so a workflow can pass the scan on (to the Workflow Processing System).
* ``STAT`` without argument answers like vsftpd, naming the client address
  the server sees (``Connected to 198.18.0.9``): the probe reports it as
  ``peer_seen``, which reveals NAT in the path.
* Malformed commands get pyftpdlib's 5xx replies; the session stays usable.

Probe
=====
``ftplib`` runs in the reactor's thread pool. ``target.options``:
``mode`` (``passive`` default, or ``active``), ``user``, ``password``,
``document`` (``scan``, the default, or ``install``: a terminal package for
a device). The upload is ``max(target.size, MIN_UPLOAD)`` bytes,
deterministic for a target id and size (a PDF with one JPEG page image, or a
ZIP package). With ``carries``/``holder`` (``jobstore``) the file is ``NAME.pdf``: the scan
the holder keeps under that name, or a new random one it then keeps (the MFD scanning). The control connect and
every data-channel open are bounded by ``target.timeout``; the whole session
by ``transfer_budget(target.timeout)`` = max(3 x timeout, 10 s).

FTPS is not in the catalog: the exchange is always plain FTP; a target or
listener asking for TLS is served plain, and the probe's exchange says so.
"""

from __future__ import annotations

import contextlib
import ftplib
import hashlib
import os
import re
import secrets
import select
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import DTPHandler, FTPHandler
from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import FTPServer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

try:  # pyftpdlib >= 2.0
    from pyftpdlib.handlers.ftp.dispatchers import ActiveDTP
except ImportError:  # pragma: no cover - pyftpdlib 1.5
    from pyftpdlib.handlers import ActiveDTP

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .serving import LISTEN_BACKLOG
from .probing import UNREACHABLE_ERRNOS, OnRequest, crashed, error_result, report
from . import jobstore
from .payloads import install_package, scan_document, scanned_pdf

PROTOCOL_IDS = ('ftp',)

DEFAULT_USER = 'scan'
DEFAULT_PASSWORD = 'scan'
DEFAULT_PASSIVE_PORTS = (30000, 30999)
IDLE_TIMEOUT = 60            # seconds a server keeps a silent control connection
MAX_POLL_WAIT = 1.0          # the FTP thread re-checks its stop flag at least this often
# A one-page scan at an MFD's usual scan-to-folder setting (200-300 dpi JPEG) is 150-500 kB, the
# size of HTTP probes' scans (http.DOC_FLOOR); a flow or scenario step asking for more gets its size.
MIN_UPLOAD = 256 << 10
MAX_KEPT_BYTES = 64 << 20    # uploads a listener keeps at most; the oldest go first
MIN_BUDGET = 10.0            # seconds: the shortest whole-session bound
MAX_REPLY_BYTES = 1 << 16    # what the probe reads of a STAT reply, at most

_log = Logger()


# --- codec: documents, budgets, reply parsing (no I/O) ----------------------------

def transfer_budget(timeout: float) -> float:
    """Seconds a whole probe session may take: login, upload, size, download."""
    return max(timeout * 3, MIN_BUDGET)


def upload_for(target: ProbeTarget) -> tuple[str, bytes]:
    """(file name, content) the probe uploads for ``target``."""
    kind = target.options.get('document', 'scan')
    size = max(target.size, MIN_UPLOAD)
    carried, why = jobstore.to_send(target.options, ('scan',), lambda: scanned_pdf(size))
    if why:
        raise ValueError(why)
    if carried is not None:
        return f'{carried.name}.pdf', carried.data
    seed = f'{target.id or "ftp"}:{kind}:{size}'
    token = secrets.token_hex(6)
    if kind == 'install':
        return f'safeq-terminal_{token}.zip', install_package(size, seed)
    if kind == 'scan':
        return f'scan_{token}.pdf', scan_document(size, seed)
    raise ValueError(f"options['document'] must be 'scan' or 'install', got {kind!r}")


_STAT_PEER = re.compile(r'^\s*Connected to:?\s+(?:::ffff:)?(\d{1,3}(?:\.\d{1,3}){3})\b',
                        re.MULTILINE)


def parse_stat_peer(reply: str) -> str | None:
    """The client address a vsftpd-style STAT reply names, if any."""
    match = _STAT_PEER.search(reply)
    return match.group(1) if match else None


def passive_range(identity: dict[str, Any]) -> range:
    """The passive data ports a persona asks for (``[low, high]``, inclusive)."""
    value = identity.get('passive_ports', DEFAULT_PASSIVE_PORTS)
    try:
        low, high = value
        ok = all(isinstance(p, int) and not isinstance(p, bool) for p in (low, high)) \
            and 1024 <= low <= high <= 65535
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"persona identity 'passive_ports' must be [low, high] within "
                         f"1024-65535, got {value!r}")
    return range(low, high + 1)


# --- server stub -----------------------------------------------------------------

def _file_digest(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b''):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class _ConnectBack(ActiveDTP):
    """Active-mode data connection from the server's data port (control - 1)."""

    source_port = 0          # set per listener; 0 = ephemeral (pyftpdlib's default)
    warned = False

    def bind(self, addr):
        if addr[1] == 0 and self.source_port:
            try:
                # Concurrent and successive connect-backs share the port.
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                return super().bind((addr[0], self.source_port))
            except OSError as exc:
                if not type(self).warned:
                    type(self).warned = True
                    _log.warn('FTP active mode: cannot connect back from port {port} ({error});'
                              ' using an ephemeral source port', port=self.source_port,
                              error=exc.strerror or exc)
        return super().bind(addr)

    handed_over = False

    def handle_connect(self):
        # pyftpdlib 2.2 unregisters the fd here and hands the socket to a
        # DTPHandler, but keeps the fd number and unregisters it *again* when
        # the session's next PORT close()s this connector. By then the number
        # may belong to another session's new socket, which then never sees
        # its events (concurrent active sessions hang). close() forgets it.
        self.handed_over = True
        super().handle_connect()

    def close(self):
        if self.handed_over:
            self._fileno = None
        super().close()


class _DataChannel(DTPHandler):
    """Notes the data connection's ports on its session, for the request record."""

    def __init__(self, sock, cmd_channel):
        try:
            cmd_channel.data_link = (sock.getsockname()[1], sock.getpeername()[1])
        except OSError:
            cmd_channel.data_link = None
        super().__init__(sock, cmd_channel)


class UploadBound:
    """The uploads a listener keeps: at most ``max_bytes`` in all, the oldest deleted first.

    A probe deletes its file once it has verified it (``DELE``); this bounds what clients that
    do not (or a probe cut short) leave behind, which would otherwise stay until the daemon stops.
    """

    def __init__(self, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._files: dict[str, None] = {}   # insertion order = age

    def add(self, path: str) -> None:
        with self._lock:
            self._files.pop(path, None)
            self._files[path] = None
            sizes = {}
            for name in list(self._files):
                try:
                    sizes[name] = os.path.getsize(name)
                except OSError:   # deleted by the client (DELE) or replaced
                    del self._files[name]
            total = sum(sizes.values())
            for name in list(self._files):
                if total <= self.max_bytes or name == path:
                    break
                with contextlib.suppress(OSError):
                    os.remove(name)
                total -= sizes.get(name, 0)
                del self._files[name]


class _ScanHandler(FTPHandler):
    """One FTP control session. ``listen`` subclasses it per listener with the
    persona's user, banner, passive range and connect-back port."""

    timeout = IDLE_TIMEOUT
    dtp_handler = _DataChannel
    active_dtp = _ConnectBack
    deliver: Callable[[dict[str, Any]], None] = staticmethod(lambda record: None)
    keep: UploadBound
    documents: jobstore.JobStore | None = None   # the host's jobstore
    data_mode: str | None = None
    data_link: tuple[int, int] | None = None

    def ftp_PORT(self, line):
        self.data_mode = 'active'
        return super().ftp_PORT(line)

    def ftp_EPRT(self, line):
        self.data_mode = 'active'
        return super().ftp_EPRT(line)

    def ftp_PASV(self, line):
        self.data_mode = 'passive'
        return super().ftp_PASV(line)

    def ftp_EPSV(self, line):
        self.data_mode = 'passive'
        return super().ftp_EPSV(line)

    def ftp_STAT(self, path):
        if path:
            return super().ftp_STAT(path)
        # vsftpd's layout: it names the client as the server sees it.
        lines = [f'Connected to {self.remote_ip}']
        lines.append(f'Logged in as {self.username}' if self.authenticated else 'Not logged in')
        lines.append('TYPE: ' + ('ASCII' if getattr(self, '_current_type', 'i') == 'a' else 'BINARY'))
        lines.append('Session timeout in seconds is %d' % self.timeout)
        self.push('211-FTP server status:\r\n' + ''.join(f'     {line}\r\n' for line in lines))
        self.respond('211 End of status')

    def handle_auth_failed(self, msg, password):
        # pyftpdlib unregisters the socket, waits auth_failed_timeout, then re-registers it
        # unconditionally: by then the session may be closed and its descriptor number
        # reused, and the re-register fails with a traceback (or watches someone else's
        # socket). A lab stub needs no brute-force delay: answer 530 at once.
        msg = msg.capitalize() if msg else 'Authentication failed.'
        self.attempted_logins += 1
        if self.attempted_logins >= self.max_login_attempts:
            self.respond(f'530 {msg} Disconnecting.')
            self.close_when_done()
        else:
            self.respond(f'530 {msg}')
        self.log(f"USER '{self.username}' failed login.")
        self.on_login_failed(self.username, password)
        self.username = ''

    def on_file_received(self, file):
        self.keep.add(file)
        try:
            size, sha256 = _file_digest(file)
            try:
                name = self.fs.fs2ftp(file)
            except Exception:  # the session closed meanwhile
                name = '/' + os.path.basename(file)
            data_port, data_peer_port = self.data_link or (None, None)
            record = {'transport': 'tcp', 'port': self.server.address[1], 'peer': self.remote_ip,
                      'op': 'STOR', 'file': name, 'bytes': size, 'sha256': sha256,
                      'mode': self.data_mode, 'data_port': data_port,
                      'data_peer_port': data_peer_port}
            if self.documents is not None:
                self.documents.keep(_received(file, name, size, sha256, self.remote_ip))
        except Exception:
            _log.failure('cannot record the upload of {file}', file=file)
            return
        self.deliver(record)


def _received(path: str, name: str, size: int, sha256: str, peer: str) -> jobstore.Document:
    """The jobstore entry of an uploaded file: its bytes when small enough to pass on (a copy
    in the jobstore's spool when there is one, else read into memory)."""
    data, file = None, ''
    if size <= jobstore.MAX_DOCUMENT_BYTES:
        file = jobstore.spool_copy(path)
        if not file:
            with open(path, 'rb') as handle:
                data = handle.read(jobstore.MAX_DOCUMENT_BYTES + 1)
    return jobstore.Document(jobstore.name_of(name), 'scan', size, sha256, via='ftp', peer=peer, data=data,
                             file=file)


class _Waker:
    """Wakes the FTP thread's poll() from another thread (to stop it)."""

    def __init__(self, ioloop) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._fileno = self._reader.fileno()  # pyftpdlib's IOLoop.close() sorts by it
        ioloop.register(self._fileno, self, ioloop.READ)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read_event(self) -> None:
        try:
            while self._reader.recv(64):
                pass
        except OSError:
            pass  # drained (EAGAIN) or closed

    def handle_close(self) -> None:
        pass

    def handle_error(self) -> None:
        pass

    def wake(self) -> None:
        try:
            self._writer.send(b'!')
        except OSError:
            pass  # already awake (buffer full) or already closed

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class FtpListeningPort:
    """An FTP server in its own thread; quacks like Twisted's IListeningPort."""

    def __init__(self, server: FTPServer, ioloop, home: str, handler: type) -> None:
        self.server = server
        self.handler = handler      # the per-listener handler class (tests may patch it)
        self.home = home            # where uploads are kept until stopListening
        self._ioloop = ioloop
        self._waker = _Waker(ioloop)
        self._stopping = threading.Event()
        host, port = server.address
        self._address = IPv4Address('TCP', host, port)
        self._thread = threading.Thread(target=self._serve, name=f'ftp-{port}', daemon=True)

    def startListening(self) -> None:
        self._thread.start()

    def getHost(self) -> IPv4Address:
        return self._address

    def _serve(self) -> None:
        ioloop = self._ioloop
        try:
            while not self._stopping.is_set():
                soonest = ioloop.sched.poll()  # run due timers (idle, passive/active timeouts)
                ioloop.poll(MAX_POLL_WAIT if soonest is None else min(soonest, MAX_POLL_WAIT))
        except Exception:
            _log.failure('FTP server loop on {address} crashed', address=self._address)
        finally:
            ioloop.close()  # the server socket and every session

    def stopListening(self) -> Deferred:
        """Close the server and all sessions, join the thread, remove the uploads."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._waker.wake()
            if self._thread.is_alive():
                self._thread.join()
            else:  # never started: close here what the thread would have
                self._ioloop.close()
            shutil.rmtree(self.home, ignore_errors=True)
        return succeed(None)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '') -> FtpListeningPort:
    """Serve FTP on ``listener``; bind errors raise CannotListenError."""
    if listener.transport != 'tcp':
        raise ValueError(f'ftp listens on tcp, not {listener.transport!r}')
    identity = persona.identity
    passive_ports = passive_range(identity)
    data_port = identity.get('ftp_data_port')
    if data_port is not None and (not isinstance(data_port, int) or isinstance(data_port, bool)
                                  or not 0 <= data_port <= 65535):
        raise ValueError(f"persona identity 'ftp_data_port' must be a port number, got {data_port!r}")
    vendor = identity.get('vendor')
    banner = identity.get('ftp_banner') or (
        f'{persona.host} FTP server ({vendor}) ready.' if vendor else f'{persona.host} FTP server ready.')

    home = tempfile.mkdtemp(prefix='safeq-ftp-')
    authorizer = DummyAuthorizer()
    authorizer.add_user(identity.get('ftp_user', DEFAULT_USER),
                        identity.get('ftp_password', DEFAULT_PASSWORD),
                        home, perm='elradfmw')

    def deliver(record: dict[str, Any]) -> None:  # runs in the FTP thread
        reactor.callFromThread(report, on_request, record)

    connect_back = type('_ListenerConnectBack', (_ConnectBack,), {})
    handler = type('_ListenerScanHandler', (_ScanHandler,), {
        'authorizer': authorizer, 'banner': banner, 'passive_ports': list(passive_ports),
        'active_dtp': connect_back, 'deliver': staticmethod(deliver), 'keep': UploadBound(),
        'documents': jobstore.store_for(persona.host)})
    ioloop = IOLoop()
    try:
        server = FTPServer((interface or '0.0.0.0', listener.port), handler, ioloop=ioloop,
                           backlog=LISTEN_BACKLOG)
    except OSError as exc:
        ioloop.close()
        shutil.rmtree(home, ignore_errors=True)
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], OSError) else exc
        raise CannotListenError(interface, listener.port, cause) from exc
    bound = server.address[1]
    connect_back.source_port = bound - 1 if data_port is None else data_port
    port = FtpListeningPort(server, ioloop, home, handler)
    port.startListening()
    return port


# --- client probe ------------------------------------------------------------------

_REPLY_LINE = re.compile(r'^[1-5]\d\d[ -]')


class _Verdict(Exception):
    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return 'timed out'
    if isinstance(exc, EOFError):
        return 'server closed the control connection'
    if isinstance(exc, ftplib.Error):
        return str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return f'{type(exc).__name__}: {exc}'


class _Session:
    """One blocking FTP session (runs in a worker thread)."""

    def __init__(self, target: ProbeTarget) -> None:
        self.target = target
        self.mode = target.options.get('mode', 'passive')
        if self.mode not in ('passive', 'active'):
            raise _Verdict('error', f"options['mode'] must be 'passive' or 'active', got {self.mode!r}")
        self.user = target.options.get('user', DEFAULT_USER)
        self.password = target.options.get('password', DEFAULT_PASSWORD)
        try:
            self.name, self.payload = upload_for(target)
        except ValueError as exc:
            raise _Verdict('error', str(exc)) from None
        self.budget = transfer_budget(target.timeout)
        self.deadline = time.monotonic() + self.budget
        self.ftp = ftplib.FTP(encoding='latin-1')  # never fails to decode a reply
        self.milestones: list[str] = []   # e.g. 'login 230', for the exchange summary
        self.notes: list[str] = []
        self.sockets: list[socket.socket] = []
        self.step = 'connect'
        self.in_data = False
        self.greeting = ''
        self.peer_seen: str | None = None

    # -- plumbing

    def remaining(self, limit: float | None = None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Verdict('protocol_error', f'{self._where()}{self.step}: session not finished '
                                             f'within {self.budget:g} s')
        return left if limit is None else min(left, limit)

    def _where(self) -> str:
        return 'data channel: ' if self.in_data else ''

    def arm(self, limit: float | None = None) -> float:
        timeout = self.remaining(limit)
        self.ftp.sock.settimeout(timeout)
        return timeout

    def reply(self, limit: float | None = None) -> str:
        self.arm(limit)
        return self.ftp.getresp()

    def command(self, line: str, limit: float | None = None) -> str:
        self.arm(limit)
        self.ftp.putcmd(line)
        return self.reply(limit)

    def expect(self, resp: str, first: str, what: str) -> None:
        if not resp.startswith(first):
            raise _Verdict('protocol_error', f'{self._where()}{what}: unexpected reply {resp.strip()!r}')

    # -- the exchange

    def run(self) -> tuple[str, str]:
        self.connect()
        self.step = 'login'
        resp = self.command(f'USER {self.user}')
        if resp.startswith('3'):
            resp = self.command(f'PASS {self.password}')
        self.expect(resp, '2', 'login')
        self.milestones.append(f'login {resp[:3]}')
        self.step = 'TYPE I'
        self.expect(self.command('TYPE I'), '2', 'TYPE I')
        self.stat()
        self.upload()
        self.verify()
        self.step = 'DELE'
        try:   # the server need not keep a verified document; its reply changes no verdict
            self.command(f'DELE {self.name}', limit=self.target.timeout)
        except (ftplib.Error, EOFError, OSError, _Verdict):
            pass
        self.step = 'QUIT'
        try:
            self.command('QUIT', limit=self.target.timeout)
        except (ftplib.Error, EOFError, OSError, _Verdict):
            pass  # the transfer is proven; a lost goodbye changes nothing
        return 'ok', '; '.join([f'greeting {self.greeting!r}', *self.notes,
                               f'{len(self.payload)} B verified by SIZE and RETR sha256'])

    def connect(self) -> None:
        timeout = self.target.timeout
        address = (self.target.host, self.target.port)
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except ConnectionRefusedError:
            raise _Verdict('refused', 'control connection refused (TCP RST or ICMP port '
                                      'unreachable)') from None
        except TimeoutError:
            raise _Verdict('timeout', f'control: no TCP connection within {timeout:g} s') from None
        except OSError as exc:
            if exc.errno in UNREACHABLE_ERRNOS:
                raise _Verdict('unreachable', f'control: {os.strerror(exc.errno)} '
                                              f'(ICMP unreachable or no route)') from None
            raise _Verdict('error', f'control connect: {_describe(exc)}') from None
        # What ftplib.FTP.connect does, minus its greeting read: a server that
        # talks but not FTP must not look like a silent one.
        ftp = self.ftp
        ftp.host, ftp.port, ftp.timeout = address[0], address[1], timeout
        ftp.sock, ftp.af = sock, sock.family
        ftp.file = sock.makefile('r', encoding=ftp.encoding)
        self.step = 'greeting'
        try:
            line = ftp.getline()
        except TimeoutError:
            raise _Verdict('silent', f'control: TCP connected but no FTP greeting within '
                                      f'{timeout:g} s') from None
        if not _REPLY_LINE.match(line):
            raise _Verdict('protocol_error', f'greeting: not an FTP reply: {line[:80]!r}')
        if line[3:4] == '-':  # multi-line greeting: up to "<code> "
            self.arm()
            while True:
                more = ftp.getline()
                line += '\n' + more
                if more[:3] == line[:3] and more[3:4] != '-':
                    break
        self.greeting = line.strip()
        ftp.welcome = self.greeting
        self.milestones.append(self.greeting[:3])
        self.expect(self.greeting, '220', 'greeting')

    def stat(self) -> None:
        self.step = 'STAT'
        try:
            resp = self.command('STAT')
        except ftplib.Error:
            return  # optional: only tells us which address the server saw
        self.peer_seen = parse_stat_peer(resp[:MAX_REPLY_BYTES])

    def upload(self) -> None:
        self.step = 'STOR'
        conn = self.open_data(f'STOR {self.name}')
        conn.settimeout(self.remaining())
        conn.sendall(self.payload)
        conn.close()
        self.step = 'STOR completion'
        resp = self.reply()
        self.expect(resp, '2', 'STOR')
        self.milestones.append(f'STOR {len(self.payload)} B {resp[:3]}')
        self.in_data = False

    def verify(self) -> None:
        self.step = 'SIZE'
        resp = self.command(f'SIZE {self.name}')
        self.expect(resp, '213', 'SIZE')
        self.milestones.append('SIZE 213')
        try:
            stored = int(resp[3:].strip())
        except ValueError:
            raise _Verdict('protocol_error', f'SIZE: unreadable reply {resp.strip()!r}') from None
        if stored != len(self.payload):
            raise _Verdict('protocol_error', f'upload altered: server stores {stored} B, '
                                             f'{len(self.payload)} B were sent')
        self.step = 'RETR'
        conn = self.open_data(f'RETR {self.name}')
        digest = hashlib.sha256()
        received = 0
        while received <= len(self.payload):
            conn.settimeout(self.remaining())
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        conn.close()
        if received > len(self.payload):
            raise _Verdict('protocol_error', f'download altered: more than the '
                                             f'{len(self.payload)} B uploaded came back')
        self.step = 'RETR completion'
        resp = self.reply()
        self.expect(resp, '2', 'RETR')
        self.in_data = False
        if received != len(self.payload) or digest.digest() != hashlib.sha256(self.payload).digest():
            raise _Verdict('protocol_error', f'upload altered: {received} B came back and their '
                                             f'sha256 differs from the {len(self.payload)} B sent')
        self.milestones.append(f'RETR {resp[:3]} sha256 ok')

    def open_data(self, line: str) -> socket.socket:
        """Open the data channel for ``line`` (STOR/RETR) and send it; return the
        connected data socket once the server's 1xx reply is in."""
        self.in_data = True
        limit = self.target.timeout
        peer = self.ftp.sock.getpeername()[0]
        if self.mode == 'passive':
            resp = self.command('PASV')
            self.expect(resp, '227', 'PASV')
            try:
                advertised, port = ftplib.parse227(resp)
            except ftplib.Error:
                raise _Verdict('protocol_error', f'data channel: unreadable PASV reply '
                                                 f'{resp.strip()!r}') from None
            if advertised != peer:
                # Like ftplib, trust the control peer: the advertised address
                # may be a private one behind NAT.
                self.notes.append(f'PASV advertised {advertised}, used {peer}')
            timeout = self.remaining(limit)
            try:
                conn = socket.create_connection((peer, port), timeout=timeout)
            except ConnectionRefusedError:
                raise _Verdict('protocol_error', f'data channel: PASV port {port} refused '
                                                 f'(TCP RST or ICMP port unreachable)') from None
            except TimeoutError:
                raise _Verdict('protocol_error', f'data channel: no TCP connection to PASV port '
                                                 f'{port} within {timeout:.3g} s (SYN dropped?)') from None
            except OSError as exc:
                raise _Verdict('protocol_error', f'data channel: connect to PASV port {port}: '
                                                 f'{_describe(exc)}') from None
            self.sockets.append(conn)
            self.notes.append(f'{line.split()[0]} via PASV port {port}')
            self.expect(self.command(line, limit), '1', line.split()[0])
            return conn
        # Active: the server connects back to a port we listen on.
        local = self.ftp.sock.getsockname()[0]
        # No SO_REUSEADDR (unlike socket.create_server): the kernel must not
        # hand us a port still in TIME_WAIT with the server's data port, or
        # the connect-back's SYN would hit that old connection.
        waiter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.append(waiter)
        waiter.bind((local, 0))
        waiter.listen(1)
        port = waiter.getsockname()[1]
        try:
            # pyftpdlib connects before it answers PORT; others answer at once
            # and connect when the transfer command arrives.
            self.expect(self.command(self.ftp_port_line(local, port), limit), '2', 'PORT')
            self.expect(self.command(line, limit), '1', line.split()[0])
        except TimeoutError:
            pending = bool(select.select([waiter], [], [], 0)[0])
            raise _Verdict('protocol_error', 'data channel: ' + (
                f'connect-back to port {port} arrived but the server never confirmed it'
                if pending else
                f'no connect-back to port {port} within {limit:g} s (server\'s connection '
                f'to the client dropped?)')) from None
        except ftplib.Error as exc:
            raise _Verdict('protocol_error', f'data channel: server could not connect back to '
                                             f'port {port}: {_describe(exc)}') from None
        waiter.settimeout(self.remaining(limit))
        try:
            conn, (source, source_port) = waiter.accept()
        except TimeoutError:
            raise _Verdict('protocol_error', f'data channel: no connect-back to port {port} '
                                             f'within {limit:g} s') from None
        finally:
            waiter.close()
        self.sockets.append(conn)
        self.notes.append(f'{line.split()[0]} connect-back from {source}:{source_port}')
        if source != peer:
            self.notes.append(f'connect-back came from {source}, not the control peer {peer}')
        return conn

    @staticmethod
    def ftp_port_line(host: str, port: int) -> str:
        return 'PORT ' + ','.join(host.split('.') + [str(port >> 8), str(port & 0xff)])

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
        try:
            self.ftp.close()
        except OSError:
            pass

    def exchange(self, ok: bool) -> str:
        steps = self.milestones if ok else [*self.milestones, f'{self.step} failed']
        text = f'FTP {self.mode} upload → ' + ', '.join(steps)
        if self.target.security != 'plain':
            text += f' (plaintext: {self.target.security} not emulated)'
        return text


def run_session(target: ProbeTarget, clock: Callable[[], float] = time.monotonic) -> ProbeResult:
    """Run one blocking FTP upload + verification against ``target``."""
    started = clock()
    session = None
    try:
        session = _Session(target)
        outcome, detail = session.run()
    except _Verdict as verdict:
        outcome, detail = verdict.outcome, verdict.detail
    except (ftplib.Error, EOFError, OSError) as exc:
        where = session._where() if session else ''
        step = session.step if session else 'start'
        outcome, detail = 'protocol_error', f'{where}{step}: {_describe(exc)}'
    except Exception as exc:
        outcome, detail = 'error', f'probe crashed: {type(exc).__name__}: {exc}'
    finally:
        if session is not None:
            session.close()
    elapsed = max(0.0, clock() - started)
    if session is None:
        return ProbeResult(id=target.id, outcome=outcome, elapsed=elapsed,
                           exchange=f'FTP {target.options.get("mode", "passive")}', detail=detail)
    if outcome != 'ok' and session.greeting:
        detail = f'{detail} (greeting {session.greeting!r})'
    return ProbeResult(id=target.id, outcome=outcome, elapsed=elapsed,
                       exchange=session.exchange(outcome == 'ok'), detail=detail, peer_seen=session.peer_seen if outcome == 'ok' else None)


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Upload, size-check and download a document over FTP; always fires with a ProbeResult."""
    def session_crashed(failure) -> ProbeResult:
        return ProbeResult(id=target.id, outcome='error', elapsed=0.0, exchange='FTP',
                           detail=f'probe crashed: {failure.type.__name__}: {failure.getErrorMessage()}')

    try:
        if target.transport != 'tcp':
            return error_result(target, f'FTP/{target.transport}', f'ftp runs over tcp, not {target.transport}')
        d = deferToThreadPool(reactor, reactor.getThreadPool(), run_session, target, reactor.seconds)
    except Exception as exc:
        return crashed(target, 'FTP', exc)
    return d.addErrback(session_crashed)


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'run_session', 'scan_document', 'install_package',
           'upload_for', 'transfer_budget', 'parse_stat_peer', 'passive_range', 'FtpListeningPort']
