"""ftp: documents, parsing, and the pyftpdlib stub against the ftplib probe on 127.0.0.1.

Blocked data channels are simulated on loopback without root or firewall:
a PASV reply advertising a closed port (RST), a PASV reply advertising a port
whose accept queue is full (the kernel drops the SYN, as a DROP rule would),
and a server that never connects back in active mode.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
import zipfile

import pytest
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThreadPool

import roles
from emulator.protocols import payloads
from emulator.protocols import ftp
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import free_port, run_on_fresh_reactor
from tests.support import free_port_pair as control_port

PERSONA = Persona(host='terminal-server-1', roles=('terminal_server',),
                  identity={'vendor': 'Y Soft', 'passive_ports': [30000, 30999]})


# --- helpers ------------------------------------------------------------------

class Blackhole:
    """A loopback port that drops SYNs: a listener with a full accept queue."""

    def __enter__(self):
        self.server = socket.socket()
        self.server.bind(('127.0.0.1', 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.filler = socket.create_connection(('127.0.0.1', self.port))  # fills the queue
        return self

    def __exit__(self, *exc):
        self.filler.close()
        self.server.close()


def target(port: int, flow: str = 'terminal-server-42', **overrides) -> ProbeTarget:
    """A probe target with the options the audit gives a probe of catalog flow ``flow``."""
    options = {**roles.probe_options(flow), **overrides.pop('options', {})}
    fields = dict(id='t', host='127.0.0.1', transport='tcp', protocol='ftp', port=port,
                  timeout=1.0, options=options)
    fields.update(overrides)
    return ProbeTarget(**fields)


def with_stub(scenario, persona=PERSONA, patch=None, limit: float = 10.0):
    """Start a stub on 127.0.0.1, run ``scenario(reactor, port) -> Deferred``, stop the stub.

    Returns (scenario result, request records, the stub's port object)."""
    records: list[dict] = []
    box: dict = {}

    async def run(reactor):
        port = ftp.listen(reactor, Listener('tcp', control_port(), 'ftp'), persona,
                          on_request=records.append, interface='127.0.0.1')
        box['port'] = port
        if patch:
            patch(port)
        try:
            return await maybeDeferred(scenario, reactor, port)
        finally:
            await maybeDeferred(port.stopListening)

    result = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(run(r)), limit)
    return result, records, box['port']


def probe_stub(persona=PERSONA, patch=None, limit: float = 10.0, **overrides):
    return with_stub(lambda reactor, port: ftp.probe(reactor, target(port.getHost().port, **overrides)),
                     persona=persona, patch=patch, limit=limit)


def expected_upload(size=ftp.MIN_UPLOAD, target_id='t', kind='scan') -> bytes:
    maker = payloads.scan_document if kind == 'scan' else payloads.install_package
    return maker(size, f'{target_id}:{kind}:{size}')


def ftp_lines(sock_file) -> str:
    """One (possibly multi-line) FTP reply from a raw control connection."""
    line = sock_file.readline()
    text = line
    if line[3:4] == '-':
        while not (line[:3] == text[:3] and line[3:4] == ' '):
            line = sock_file.readline()
            assert line, 'connection closed inside a multi-line reply'
            text += line
    return text


# --- codec --------------------------------------------------------------------

def test_scan_document_is_an_exact_size_deterministic_pdf():
    doc = payloads.scan_document(1 << 20, 'seed')
    assert len(doc) == 1 << 20
    assert doc.startswith(b'%PDF-1.4\n') and doc.endswith(b'%%EOF\n')
    assert doc == payloads.scan_document(1 << 20, 'seed')
    assert doc != payloads.scan_document(1 << 20, 'other')
    # The xref offsets point at the objects they name.
    xref = int(doc.rsplit(b'startxref\n', 1)[1].split(b'\n')[0])
    assert doc[xref:xref + 5] == b'xref\n'
    entries = doc[xref:].split(b'\n')[3:8]
    for number, entry in enumerate(entries, start=1):
        offset = int(entry[:10])
        assert doc[offset:].startswith(b'%d 0 obj\n' % number)
    assert b'/Filter /DCTDecode' in doc and b'\xff\xd8' in doc
    for size in (700, 9999, 100_003):
        assert len(payloads.scan_document(size, 's')) == size
    with pytest.raises(ValueError, match='at least'):
        payloads.scan_document(100, 's')


def test_install_package_is_a_valid_zip_of_exact_size():
    data = payloads.install_package(300_000, 'seed')
    assert len(data) == 300_000
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None  # CRC checks out
        [info] = archive.infolist()
        assert info.filename == 'safeq-terminal/terminal.bin'
    with pytest.raises(ValueError):
        payloads.install_package(10, 'seed')


def test_upload_follows_flow_size_and_options():
    name, data = ftp.upload_for(target(21, size=1024))
    assert name.startswith('scan_') and name.endswith('.pdf')
    assert data == expected_upload()  # at least MIN_UPLOAD, deterministic
    assert ftp.upload_for(target(21, size=1024))[0] != name  # unique names
    name, data = ftp.upload_for(target(21, size=3 << 20, flow='mfd-11'))
    assert name.endswith('.zip') and len(data) == 3 << 20 and data.startswith(b'PK\x03\x04')
    name, _ = ftp.upload_for(target(21, flow='mfd-11', options={'document': 'scan'}))
    assert name.endswith('.pdf')
    with pytest.raises(ValueError, match='document'):
        ftp.upload_for(target(21, options={'document': 'fax'}))


def test_transfer_budget():
    assert ftp.transfer_budget(2.0) == 10.0
    assert ftp.transfer_budget(5.0) == 15.0


@pytest.mark.parametrize('reply, peer', [
    ('211-FTP server status:\r\n     Connected to 198.18.0.9\r\n211 End of status', '198.18.0.9'),
    ('211-Status\r\n Connected to: ::ffff:198.18.1.4\r\n211 End', '198.18.1.4'),
    ('211 nothing useful', None),
])
def test_parse_stat_peer(reply, peer):
    assert ftp.parse_stat_peer(reply) == peer


@pytest.mark.parametrize('value', [[10, 20], [2000, 1000], [1024], 'x', [1024.0, 2000], [True, 2000],
                                   [1024, 70000]])
def test_passive_range_rejects_bad_values(value):
    with pytest.raises(ValueError, match='passive_ports'):
        ftp.passive_range({'passive_ports': value})


def test_passive_range_default_is_clear_of_the_ephemeral_range():
    ports = ftp.passive_range({})
    assert (ports.start, ports.stop - 1) == ftp.DEFAULT_PASSIVE_PORTS
    assert ports.stop - 1 < 32768


def test_probe_rejects_bad_mode_and_transport():
    result = run_on_fresh_reactor(lambda r: ftp.probe(r, target(free_port(), options={'mode': 'pasv'})))
    assert result.outcome == 'error' and 'mode' in result.detail
    result = ftp.probe(MemoryReactorClock(), target(21, transport='udp'))
    box = []
    result.addBoth(box.append)
    assert box[0].outcome == 'error'


# --- stub vs probe, loopback ------------------------------------------------------

def test_passive_upload_is_verified_and_witnessed():
    result, records, port = probe_stub()
    assert result.outcome == 'ok', result
    assert result.peer_seen == '127.0.0.1'
    assert result.exchange.startswith(f'FTP passive upload → 220, login 230, STOR {ftp.MIN_UPLOAD} B 226')
    assert 'RETR 226 sha256 ok' in result.exchange
    assert 'terminal-server-1' in result.detail  # the greeting names the host that answered
    [record] = records
    sent = expected_upload()
    assert record['op'] == 'STOR' and record['mode'] == 'passive'
    assert (record['bytes'], record['sha256']) == (len(sent), hashlib.sha256(sent).hexdigest())
    assert record['peer'] == '127.0.0.1' and record['port'] == port.getHost().port
    assert 30000 <= record['data_port'] <= 30999
    assert f"PASV port {record['data_port']}" in result.detail


def test_active_upload_connects_back_from_control_port_minus_one():
    result, records, port = probe_stub(options={'mode': 'active'})
    assert result.outcome == 'ok', result
    assert result.exchange.startswith('FTP active upload')
    control = port.getHost().port
    [record] = records
    assert record['mode'] == 'active' and record['data_port'] == control - 1
    assert f'STOR connect-back from 127.0.0.1:{control - 1}' in result.detail
    assert record['sha256'] == hashlib.sha256(expected_upload()).hexdigest()


def test_install_upload_to_an_mfd():
    result, records, _ = probe_stub(flow='mfd-13', size=2_000_000)
    assert result.outcome == 'ok', result
    assert records[0]['file'].endswith('.zip') and records[0]['bytes'] == 2_000_000


def test_verified_uploads_are_deleted_and_stop_releases_everything():
    seen = {}

    async def scenario(reactor, port):
        result = await ftp.probe(reactor, target(port.getHost().port))
        seen['files'] = os.listdir(port.home)
        return result

    result, records, port = with_stub(scenario)
    assert result.outcome == 'ok'
    assert records[0]['op'] == 'STOR'
    assert seen['files'] == []   # the probe deleted what it had verified (DELE)
    number = port.getHost().port
    assert not os.path.exists(port.home)
    assert not port._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == f'ftp-{number}']
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(('127.0.0.1', number)) != 0
    with socket.socket() as s:  # and a new server can take the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(('127.0.0.1', number))
        s.listen()


def test_many_concurrent_sessions_in_both_modes():
    def scenario(reactor, port):
        number = port.getHost().port
        return gatherResults([ftp.probe(reactor, target(number, id=str(i), timeout=3.0,
                                                         options={'mode': ('passive', 'active')[i % 2]}))
                              for i in range(10)])

    results, records, _ = with_stub(scenario, limit=15.0)
    assert [r.outcome for r in results] == ['ok'] * 10, [r.detail for r in results if r.outcome != 'ok']
    assert sorted(r['mode'] for r in records) == ['active'] * 5 + ['passive'] * 5


def test_data_port_falls_back_when_it_cannot_be_bound():
    # Port 20 needs root: as root the server uses it, otherwise an ephemeral port.
    persona = Persona(host='ts', roles=('terminal_server',), identity={'ftp_data_port': 20})
    result, records, _ = probe_stub(persona=persona, options={'mode': 'active'})
    assert result.outcome == 'ok', result
    if os.geteuid() == 0:
        assert records[0]['data_port'] == 20
    else:
        assert records[0]['data_port'] >= 1024


def test_listen_reports_a_busy_port():
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        number = busy.getsockname()[1]
        with pytest.raises(CannotListenError):
            ftp.listen(MemoryReactorClock(), Listener('tcp', number, 'ftp'), PERSONA,
                       interface='127.0.0.1')


def test_listen_rejects_a_bad_persona():
    bad = Persona(host='x', roles=('y',), identity={'passive_ports': [1, 2]})
    with pytest.raises(ValueError, match='passive_ports'):
        ftp.listen(MemoryReactorClock(), Listener('tcp', 0, 'ftp'), bad, interface='127.0.0.1')


def test_stub_survives_a_failing_on_request():
    async def run(reactor):
        def boom(record):
            raise RuntimeError('disk full')

        port = ftp.listen(reactor, Listener('tcp', 0, 'ftp'), PERSONA, on_request=boom,
                          interface='127.0.0.1')
        try:
            first = await ftp.probe(reactor, target(port.getHost().port))
            second = await ftp.probe(reactor, target(port.getHost().port))
            return first, second
        finally:
            await maybeDeferred(port.stopListening)

    first, second = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(run(r)))
    assert (first.outcome, second.outcome) == ('ok', 'ok')


# --- control channel failures ----------------------------------------------------

def test_control_refused():
    result = run_on_fresh_reactor(lambda r: ftp.probe(r, target(free_port())))
    assert result.outcome == 'refused', result


def test_control_connect_timeout():
    with Blackhole() as hole:
        result = run_on_fresh_reactor(lambda r: ftp.probe(r, target(hole.port, timeout=0.5)))
    assert result.outcome == 'timeout' and 'no TCP connection' in result.detail, result
    assert 0.5 <= result.elapsed < 1.5


def _silent_or_chatty(greeting: bytes | None):
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen()

    def serve():
        conn, _ = server.accept()
        if greeting:
            conn.sendall(greeting)
        conn.recv(1024)  # hold the connection until the client goes
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_no_greeting_is_a_timeout():
    server, thread = _silent_or_chatty(None)
    try:
        result = run_on_fresh_reactor(lambda r: ftp.probe(r, target(server.getsockname()[1], timeout=0.5)))
    finally:
        thread.join(5)
        server.close()
    assert result.outcome == 'silent' and 'no FTP greeting' in result.detail, result


@pytest.mark.parametrize('greeting', [b'SSH-2.0-OpenSSH_9.2\r\n',
                                      b'421 Too many connections\r\n',
                                      b'HTTP/1.1 400 Bad Request\r\n\r\n'])
def test_not_an_ftp_server_is_a_protocol_error(greeting):
    server, thread = _silent_or_chatty(greeting)
    try:
        result = run_on_fresh_reactor(lambda r: ftp.probe(r, target(server.getsockname()[1])))
    finally:
        thread.join(5)
        server.close()
    assert result.outcome == 'protocol_error', result
    assert 'data channel' not in result.detail


def test_wrong_password_is_a_protocol_error():
    def fast_failures(port):
        port.handler.auth_failed_timeout = 0

    result, records, _ = probe_stub(patch=fast_failures, options={'password': 'nope'})
    assert result.outcome == 'protocol_error' and 'login' in result.detail, result
    assert '530' in result.detail and 'data channel' not in result.detail
    assert records == []


# --- data channel failures -----------------------------------------------------------

def advertise(port_number: int):
    """A PassiveDTP stand-in: answers PASV with ``port_number`` and never accepts."""

    class AdvertiseOnly:
        def __init__(self, cmd_channel, extmode=False):
            cmd_channel.respond('227 Entering passive mode (127,0,0,1,%d,%d).'
                                % (port_number >> 8, port_number & 0xff))

        def close(self):
            pass

    def patch(port):
        port.handler.passive_dtp = AdvertiseOnly

    return patch


def test_passive_data_port_dropped_is_a_protocol_error_within_the_timeout():
    with Blackhole() as hole:
        result, records, _ = probe_stub(patch=advertise(hole.port))
    assert result.outcome == 'protocol_error', result
    assert result.detail.startswith(f'data channel: no TCP connection to PASV port {hole.port}')
    assert 'login 230' in result.exchange and 'STOR failed' in result.exchange
    assert 1.0 <= result.elapsed < 2.5
    assert records == []


def test_passive_data_port_refused_is_a_protocol_error():
    closed = free_port()
    result, records, _ = probe_stub(patch=advertise(closed))
    assert result.outcome == 'protocol_error', result
    assert result.detail.startswith(f'data channel: PASV port {closed} refused')
    assert records == []


def test_active_connect_back_that_never_arrives_is_a_protocol_error():
    class NeverConnects:
        def __init__(self, ip, port, cmd_channel):
            pass

        def close(self):
            pass

    def patch(port):
        port.handler.active_dtp = NeverConnects

    result, records, _ = probe_stub(patch=patch, options={'mode': 'active'})
    assert result.outcome == 'protocol_error', result
    assert result.detail.startswith('data channel: no connect-back to port')
    assert 1.0 <= result.elapsed < 2.5
    assert records == []


def test_active_connect_back_refused_is_a_protocol_error():
    closed = free_port()

    def patch(port):
        base = port.handler.active_dtp

        class WrongPort(base):
            def __init__(self, ip, port_number, cmd_channel):
                super().__init__(ip, closed, cmd_channel)  # as if a firewall reset it

        port.handler.active_dtp = WrongPort

    result, _, _ = probe_stub(patch=patch, options={'mode': 'active'})
    assert result.outcome == 'protocol_error', result
    assert result.detail.startswith('data channel: server could not connect back')
    assert '425' in result.detail


def corrupt(how: str):
    def patch(port):
        original = port.handler.on_file_received

        def damaged(self, file):
            with open(file, 'r+b') as handle:
                if how == 'flip':
                    handle.seek(1000)
                    byte = handle.read(1)
                    handle.seek(1000)
                    handle.write(bytes([byte[0] ^ 0xff]))
                else:
                    handle.truncate(1000)
            original(self, file)

        port.handler.on_file_received = damaged

    return patch


@pytest.mark.parametrize('how, detail', [('flip', 'sha256 differs'), ('truncate', 'server stores 1000 B')])
def test_altered_bytes_are_a_protocol_error(how, detail):
    result, records, _ = probe_stub(patch=corrupt(how))
    assert result.outcome == 'protocol_error', result
    assert detail in result.detail and 'upload altered' in result.detail
    assert len(records) == 1  # the server did receive an upload


# --- malformed input -------------------------------------------------------------

def test_malformed_commands_get_errors_and_the_stub_keeps_serving():
    def scenario(reactor, port):
        number = port.getHost().port

        def raw_session():
            replies = {}
            with socket.create_connection(('127.0.0.1', number), timeout=5) as sock:
                f = sock.makefile('r', encoding='latin-1', newline='\r\n')

                def send(line: bytes) -> str:
                    sock.sendall(line + b'\r\n')
                    return ftp_lines(f)

                assert ftp_lines(f).startswith('220')
                replies['garbage'] = send(b'\x00\xff\xfe\x80 garbage')
                replies['unknown'] = send(b'FOO bar')
                replies['stor before login'] = send(b'STOR x.pdf')
                replies['user'] = send(b'USER scan')
                replies['pass'] = send(b'PASS scan')
                replies['short port'] = send(b'PORT 1,2,3')
                replies['foreign port'] = send(b'PORT 10,9,9,9,100,1')
                replies['privileged port'] = send(b'PORT 127,0,0,1,0,21')
                replies['eprt junk'] = send(b'EPRT |9|x|y|')
                replies['size missing'] = send(b'SIZE /nope.pdf')
                replies['escape'] = send(b'RETR ../../../../etc/passwd')
                replies['stat'] = send(b'STAT')
                replies['noop'] = send(b'NOOP')
                replies['long'] = send(b'NOOP ' + b'x' * 5000)
            return replies

        async def both():
            replies = await deferToThreadPool(reactor, reactor.getThreadPool(), raw_session)
            result = await ftp.probe(reactor, target(number))
            return replies, result

        return Deferred.fromCoroutine(both())

    (replies, result), records, _ = with_stub(scenario)
    codes = {name: reply[:3] for name, reply in replies.items()}
    assert codes['garbage'][0] == '5' and codes['unknown'] == '500'
    assert codes['stor before login'] == '530'
    assert (codes['user'], codes['pass']) == ('331', '230')
    for name in ('short port', 'foreign port', 'privileged port', 'eprt junk'):
        assert codes[name][0] == '5', (name, replies[name])
    assert codes['size missing'] == '550' and codes['escape'][0] == '5'
    assert 'Connected to 127.0.0.1' in replies['stat']
    assert codes['noop'] == '200'
    assert codes['long'][0] == '5'
    assert result.outcome == 'ok', result  # other clients are unaffected
    assert len(records) == 1


def test_upload_bound_deletes_the_oldest_files_first(tmp_path):
    keep = ftp.UploadBound(max_bytes=250)
    paths = []
    for index in range(4):
        path = tmp_path / f'scan-{index}.pdf'
        path.write_bytes(b'x' * 100)
        paths.append(path)
        keep.add(str(path))
    assert [p.exists() for p in paths] == [False, False, True, True]
    paths[3].unlink()            # a client's DELE: forgotten, not counted
    big = tmp_path / 'big.pdf'
    big.write_bytes(b'x' * 400)  # larger than the bound on its own: kept, the others go
    keep.add(str(big))
    assert big.exists() and not paths[2].exists()


def test_failed_logins_are_answered_at_once_and_leave_no_traceback():
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)

    def scenario(reactor, port):
        number = port.getHost().port
        replies = []
        for _ in range(3):
            with socket.create_connection(('127.0.0.1', number), timeout=2) as s:
                s.recv(1024)
                s.sendall(b'USER scan\r\nPASS wrong\r\n')
                data = b''
                while data.count(b'\r\n') < 2:
                    data += s.recv(1024)
                replies.append(data.split(b'\r\n')[1][:3])
        return replies

    try:
        started = time.monotonic()
        replies, _records, _port = with_stub(scenario)
        assert replies == [b'530'] * 3
        assert time.monotonic() - started < 2.5   # pyftpdlib's own answer waits 3 s per failure
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if 'log_failure' in e] == []
