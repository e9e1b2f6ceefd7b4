"""roled: spec parsing and start_listeners on a MemoryReactor, and the
READY/ERROR/SIGTERM contract of ``python -m emulator.roled`` in a subprocess
on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport

from emulator import roled
from emulator.protocols import framed
from emulator.protocols.base import Listener, Persona, ProbeResult
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
SPEC = {
    'host': 'spooler-1',
    'roles': ['spooler_controller'],
    'listeners': [
        {'transport': 'tcp', 'port': 6010, 'protocol': 'safeq', 'security': 'optional'},
        {'transport': 'udp', 'port': 64099, 'protocol': 'spm-discovery'},
        {'transport': 'tcp', 'port': 6020, 'protocol': 'safeq'},
    ],
}


class RecordingPort:
    def __init__(self, transport, port, protocol):
        self.transport, self.port, self.protocol = transport, port, protocol
        self.stopped = False

    def stopListening(self):
        self.stopped = True

    def getHost(self):
        return IPv4Address(self.transport.upper(), '0.0.0.0', self.port)


class FakeReactor(MemoryReactorClock):
    """Records binds; ports listed in ``busy`` fail like an address in use."""

    def __init__(self, busy=()):
        super().__init__()
        self.busy = set(busy)
        self.ports: list[RecordingPort] = []

    def _bind(self, transport, port, protocol, interface):
        if (transport, port) in self.busy:
            raise CannotListenError(interface, port, OSError(98, 'Address already in use'))
        self.ports.append(RecordingPort(transport, port, protocol))
        return self.ports[-1]

    def listenTCP(self, port, factory, backlog=50, interface=''):
        super().listenTCP(port, factory, backlog, interface)
        return self._bind('tcp', port, factory, interface)

    def listenUDP(self, port, protocol, interface='', maxPacketSize=8192):
        return self._bind('udp', port, protocol, interface)


def write_spec(tmp_path, spec) -> Path:
    path = tmp_path / 'spec.json'
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def run_roled(spec_path, timeout=10.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'emulator.roled', str(spec_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


# --- parse_spec ---------------------------------------------------------------------

def test_parse_spec():
    spec = roled.parse_spec({**SPEC, 'log': '/tmp/x.jsonl', 'interface': '198.18.0.2'})
    assert spec.persona == Persona('spooler-1', ('spooler_controller',))
    assert spec.listeners[0] == Listener('tcp', 6010, 'safeq', 'optional')
    assert spec.listeners[1] == Listener('udp', 64099, 'spm-discovery', 'plain')
    assert (spec.log, spec.interface) == ('/tmp/x.jsonl', '198.18.0.2')
    assert (roled.parse_spec(SPEC).log, roled.parse_spec(SPEC).interface) == (None, '')


@pytest.mark.parametrize('change, message', [
    ({'host': ''}, 'host'),
    ({'roles': 'mfd'}, 'roles'),
    ({'listeners': {}}, 'list'),
    ({'listeners': [{'transport': 'tcp', 'port': 70000, 'protocol': 'x'}]}, 'port'),
    ({'listeners': [{'transport': 'tcp', 'port': 0, 'protocol': 'x'}]}, 'port 0'),
    ({'listeners': [{'transport': 'icmp', 'port': 1, 'protocol': 'icmp'}]}, 'transport'),
    ({'listeners': [{'transport': 'tcp', 'port': 7, 'protocol': 'icmp'}]}, 'no stub'),
    ({'listeners': [{'transport': 'tcp', 'port': 21, 'protocol': 'ftp'}] * 2}, 'twice'),
    ({'lsteners': []}, 'unknown'),
    ({'log': 5}, 'log'),
])
def test_parse_spec_rejects(change, message):
    with pytest.raises(roled.SpecError, match=message):
        roled.parse_spec({**SPEC, **change})


# --- start_listeners on a fake reactor -------------------------------------------------

def test_start_listeners_binds_every_listener_and_logs_requests(tmp_path):
    log = tmp_path / 'requests.jsonl'
    spec = roled.parse_spec({**SPEC, 'log': str(log), 'interface': '198.18.0.2'})
    reactor = FakeReactor()
    reactor.advance(1000.0)
    ports = roled.start_listeners(reactor, spec)
    assert [(p.transport, p.port) for p in ports] == [('tcp', 6010), ('udp', 64099), ('tcp', 6020)]
    assert [server[3] for server in reactor.tcpServers] == ['198.18.0.2', '198.18.0.2']

    proto = ports[0].protocol.buildProtocol(None)
    transport = StringTransport(hostAddress=IPv4Address('TCP', '198.18.0.2', 6010),
                                peerAddress=IPv4Address('TCP', '198.18.0.9', 40001))
    proto.makeConnection(transport)
    request = framed.encode_request('n-1', b'z' * 33)
    proto.dataReceived(struct.pack('>I', len(request)) + request)
    assert json.loads(log.read_text()) == {
        'time': 1000.0, 'host': 'spooler-1', 'transport': 'tcp', 'port': 6010,
        'peer': '198.18.0.9', 'nonce': 'n-1', 'size': 33}


def test_start_listeners_accepts_the_json_dict():
    reactor = FakeReactor()
    assert len(roled.start_listeners(reactor, SPEC)) == 3
    with pytest.raises(roled.SpecError):
        roled.start_listeners(reactor, {'host': 'h'})


def test_start_listeners_is_all_or_nothing():
    reactor = FakeReactor(busy={('udp', 64099)})
    with pytest.raises(roled.BindError) as caught:
        roled.start_listeners(reactor, roled.parse_spec(SPEC))
    assert str(caught.value).startswith('udp/64099: ')
    assert 'Address already in use' in str(caught.value)
    assert [(p.port, p.stopped) for p in reactor.ports] == [(6010, True)]


def test_start_listeners_fails_early_on_unwritable_log(tmp_path):
    spec = roled.parse_spec({**SPEC, 'log': str(tmp_path / 'missing-dir' / 'r.jsonl')})
    reactor = FakeReactor()
    with pytest.raises(OSError):
        roled.start_listeners(reactor, spec)
    assert reactor.ports == []


# --- python -m emulator.roled ------------------------------------------------------------

@contextlib.contextmanager
def daemon_of(spec_path):
    """``python -m emulator.roled`` running ``spec_path``; the body ends with the daemon stopped
    by SIGTERM and checks it exited 0 (it is killed if the body failed first)."""
    daemon = subprocess.Popen([sys.executable, '-m', 'emulator.roled', str(spec_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        yield daemon
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=5) == 0, daemon.stderr.read()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stdout.close()
        daemon.stderr.close()


def test_daemon_serves_logs_and_stops_on_sigterm(tmp_path):
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    log = tmp_path / 'requests.jsonl'
    spec_path = write_spec(tmp_path, {
        'host': 'mfd-km', 'roles': ['mfd'], 'log': str(log), 'interface': '127.0.0.1',
        'listeners': [{'transport': 'tcp', 'port': tcp_port, 'protocol': 'safeq'},
                      {'transport': 'udp', 'port': udp_port, 'protocol': 'spm-discovery'}]})
    with daemon_of(spec_path) as daemon:
        assert daemon.stdout.readline() == 'READY 2\n'
        targets = [{'id': 'tcp', 'host': '127.0.0.1', 'transport': 'tcp', 'protocol': 'safeq',
                    'port': tcp_port, 'size': 4096},
                   {'id': 'udp', 'host': '127.0.0.1', 'transport': 'udp',
                    'protocol': 'spm-discovery', 'port': udp_port, 'size': 100}]
        probe = subprocess.run([sys.executable, '-m', 'emulator.prober'], input=json.dumps(targets),
                               capture_output=True, text=True, cwd=REPO, timeout=10)
        assert probe.returncode == 0, probe.stderr
        results = [ProbeResult.from_dict(r) for r in json.loads(probe.stdout)]
        assert [(r.id, r.outcome, r.peer_seen) for r in results] == [
            ('tcp', 'ok', '127.0.0.1'), ('udp', 'ok', '127.0.0.1')], results
    records = sorted((json.loads(line) for line in log.read_text().splitlines()),
                     key=lambda r: r['transport'])
    assert [(r['host'], r['transport'], r['port'], r['peer'], r['size']) for r in records] == [
        ('mfd-km', 'tcp', tcp_port, '127.0.0.1', 4096),
        ('mfd-km', 'udp', udp_port, '127.0.0.1', 100)]
    assert all(len(r['nonce']) == 16 and r['time'] > 0 for r in records)


def test_a_lab_daemon_keeps_received_documents_in_its_spool_and_removes_it_when_stopped(tmp_path):
    port = free_port()
    spec_path = write_spec(tmp_path, {
        'host': 'spooler-2', 'roles': ['flexispooler'], 'interface': '127.0.0.1', 'control': str(tmp_path / 'h.ctl'),
        'listeners': [{'transport': 'tcp', 'port': port, 'protocol': 'lpr'}]})
    spool = tmp_path / 'h.spool'
    with daemon_of(spec_path) as daemon:
        assert daemon.stdout.readline() == 'READY 2\n'
        target = {'id': 'lpr', 'host': '127.0.0.1', 'transport': 'tcp', 'protocol': 'lpr', 'port': port,
                  'size': 50_000}
        probe = subprocess.run([sys.executable, '-m', 'emulator.prober'], input=json.dumps([target]),
                               capture_output=True, text=True, cwd=REPO, timeout=10)
        assert [r['outcome'] for r in json.loads(probe.stdout)] == ['ok'], probe.stderr
        for _ in range(50):     # the stub keeps the job once the client has closed
            if any(spool.iterdir()):
                break
            time.sleep(0.05)
        assert [f.stat().st_size for f in spool.iterdir()] == [50_000]
    assert not spool.exists()


def test_daemon_reports_port_in_use(tmp_path):
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
        holder.bind(('127.0.0.1', 0))
        holder.listen()
        busy = holder.getsockname()[1]
        spec_path = write_spec(tmp_path, {
            'host': 'h', 'roles': [], 'interface': '127.0.0.1',
            'listeners': [{'transport': 'udp', 'port': free_port(socket.SOCK_DGRAM),
                           'protocol': 'x'},
                          {'transport': 'tcp', 'port': busy, 'protocol': 'x'}]})
        proc = run_roled(spec_path)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'ERROR tcp/{busy}: '), proc.stdout
    assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('content', [
    '{"host": "h", "roles": [], "listeners": [',
    '{"host": "h", "roles": [], "listeners": [{"transport": "tcp", "port": "21"}]}',
    '[]',
])
def test_daemon_rejects_malformed_spec(tmp_path, content):
    proc = run_roled(write_spec(tmp_path, content))
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith('ERROR spec: '), proc.stdout
    assert proc.stderr == ''


def test_daemon_rejects_missing_spec(tmp_path):
    proc = run_roled(tmp_path / 'nope.json')
    assert proc.returncode == 2
    assert proc.stdout.startswith('ERROR spec: cannot read') and proc.stdout.count('\n') == 1


def test_a_tls_listener_without_certificates_is_a_one_line_error(tmp_path):
    spec = tmp_path / 'spec.json'
    spec.write_text(json.dumps({'host': 'h', 'roles': ['r'], 'interface': '127.0.0.1', 'listeners': [
        {'transport': 'tcp', 'port': free_port(), 'protocol': 'safeq', 'security': 'tls'}]}))
    proc = subprocess.run([sys.executable, '-m', 'emulator.roled', str(spec)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stdout.startswith('ERROR tcp/') and 'cert_file' in proc.stdout
