"""raw (JetDirect 9100): PJL parsing, the LABBYTES witness, the probe, and the
shared client machinery (StreamProbe, DatagramProbe, postscript_job).

In-memory tests drive the protocols over StringTransport with a
MemoryReactorClock; loopback tests run stub and probe on 127.0.0.1 on a fresh
reactor per test.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import (MemoryReactorClock, StringTransport,
                                      StringTransportWithDisconnection)
from twisted.python.failure import Failure

from emulator.protocols import payloads
from emulator.protocols import serving, raw
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import fired, run_on_fresh_reactor

PERSONA = Persona(host='mfd-km', roles=('mfd',),
                  identity={'make_model': 'KONICA MINOLTA bizhub C300i'})
SERVER = IPv4Address('TCP', '198.18.0.5', 9100)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)
SIZE = 70_000


# --- helpers ------------------------------------------------------------------

def server(persona=PERSONA):
    clock = MemoryReactorClock()
    records: list[dict] = []
    raw.listen(clock, Listener('tcp', SERVER.port, 'raw'), persona, on_request=records.append)
    proto = clock.tcpServers[-1][1].buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    proto.makeConnection(transport)
    return clock, proto, transport, records


def feed(proto, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        proto.dataReceived(data[i:i + chunk])


def replies(transport) -> list[tuple[str, list[str]]]:
    parsed, rest = raw.parse_pjl_replies(transport.value())
    assert rest == b''
    return parsed


def target(**overrides) -> ProbeTarget:
    fields = dict(id='r1', host=SERVER.host, transport='tcp', protocol='raw', port=SERVER.port,
                  timeout=2.0, size=SIZE)
    fields.update(overrides)
    return ProbeTarget(**fields)


def start_probe(**overrides):
    clock = MemoryReactorClock()
    d = raw.probe(clock, target(**overrides))
    factory = clock.tcpClients[-1][2]
    proto = factory.buildProtocol(SERVER)
    transport = StringTransportWithDisconnection(hostAddress=CLIENT, peerAddress=SERVER)
    transport.protocol = proto
    proto.makeConnection(transport)
    return clock, d, proto, transport


# --- payload ------------------------------------------------------------------

@pytest.mark.parametrize('size', [0, 1, 100, 400, 65, 65_536, 100_003])
def test_postscript_job_has_the_exact_size_and_no_uel(size):
    data = payloads.postscript_job(size, 'probe')
    assert len(data) == size
    assert raw.UEL not in data and data.isascii()
    if size > 1000:
        assert data.startswith(b'%!PS-Adobe-3.0\n') and data.endswith(b'%%EOF\n')


def test_postscript_job_is_random():
    assert payloads.postscript_job(5000) != payloads.postscript_job(5000)


# --- server: PJL job and the LABBYTES witness -----------------------------------

@pytest.mark.parametrize('chunk', [1, 7, 8, 9, 4096, 1 << 20])
def test_server_counts_the_job_whatever_the_chunking(chunk):
    _, proto, transport, records = server()
    job, data, total = raw.build_job(SIZE, 'report')
    feed(proto, job, chunk)
    [(first_id, id_lines), (first_lab, lab_lines)] = replies(transport)
    assert (first_id, id_lines) == ('@PJL INFO ID', ['"KONICA MINOLTA bizhub C300i"'])
    assert first_lab == '@PJL INFO LABBYTES'
    fields = raw.reply_fields(lab_lines)
    assert fields == {'PDL': str(SIZE), 'TOTAL': str(total), 'PJL': 'TRUE',
                      'LANGUAGE': 'POSTSCRIPT', 'PEER': CLIENT.host, 'HOST': 'mfd-km'}
    assert records == []                       # logged when the job ends
    proto.readConnectionLost()                 # client half-closes (nc -N)
    assert transport.disconnecting
    assert records == [{'transport': 'tcp', 'port': 9100, 'peer': CLIENT.host, 'op': 'print-job',
                        'bytes': len(job), 'pdl_bytes': SIZE, 'pjl': True,
                        'language': 'POSTSCRIPT', 'job': 'report', 'end': 'half-close'}]
    proto.connectionLost(Failure(ConnectionDone()))
    assert len(records) == 1


def test_server_counts_a_bare_postscript_job_without_pjl():
    _, proto, transport, records = server()
    data = payloads.postscript_job(5000)
    proto.dataReceived(data)
    proto.connectionLost(Failure(ConnectionDone()))
    assert transport.value() == b''            # JetDirect never answers print data
    assert records[0]['bytes'] == records[0]['pdl_bytes'] == 5000
    assert records[0]['pjl'] is False and records[0]['end'] == 'close'


def test_server_counts_pcl_started_without_enter_language():
    _, proto, transport, records = server()
    job = raw.UEL + b'@PJL JOB\r\n' + b'\x1bE' + b'x' * 100 + raw.UEL
    proto.dataReceived(job)
    proto.connectionLost(Failure(ConnectionDone()))
    assert records[0]['pdl_bytes'] == 102 and records[0]['pjl'] is True


@pytest.mark.parametrize('command, first, lines', [
    (b'@PJL INFO STATUS', '@PJL INFO STATUS', ['CODE=10001', 'DISPLAY="Ready"', 'ONLINE=TRUE']),
    (b'@pjl info id', '@PJL INFO ID', ['"KONICA MINOLTA bizhub C300i"']),
    (b'@PJL ECHO hello 42', '@PJL ECHO hello 42', []),
    (b'@PJL INFO PAGECOUNT', '@PJL INFO PAGECOUNT', ['?']),
])
def test_server_answers_pjl_queries(command, first, lines):
    _, proto, transport, _ = server()
    proto.dataReceived(raw.UEL + command + b'\r\n' + raw.UEL)
    assert replies(transport) == [(first, lines)]


def test_server_reports_job_end_when_asked_with_ustatus():
    _, proto, transport, _ = server()
    proto.dataReceived(raw.UEL + b'@PJL USTATUS JOB=ON\n@PJL JOB NAME="a"\n'
                       b'@PJL ENTER LANGUAGE=PCL\n\x1bE' + raw.UEL + b'@PJL EOJ NAME="a"\n')
    assert replies(transport) == [('@PJL USTATUS JOB', ['END', 'NAME="a"', 'PAGES=1'])]


def test_make_model_defaults_to_the_host():
    _, proto, transport, _ = server(Persona(host='edee-1', roles=('edee',)))
    proto.dataReceived(raw.UEL + b'@PJL INFO ID\n')
    assert replies(transport) == [('@PJL INFO ID', ['"safeq-lab edee-1"'])]


def test_overlong_pjl_line_closes_but_logs_what_came():
    _, proto, transport, records = server()
    proto.dataReceived(raw.UEL + b'@PJL COMMENT ' + b'x' * raw.MAX_PJL_LINE)
    assert transport.disconnecting
    proto.dataReceived(b'more\n')   # ignored after the close
    proto.connectionLost(Failure(ConnectionDone()))
    assert [r['end'] for r in records] == ['malformed']


def test_silent_connection_is_not_a_job():
    _, proto, _, records = server()
    proto.connectionLost(Failure(ConnectionDone()))
    assert records == []


def test_server_drops_idle_connection_and_logs_the_partial_job():
    clock, proto, transport, records = server()
    proto.dataReceived(raw.UEL + b'@PJL ENTER LANGUAGE=POSTSCRIPT\n%!PS\n')
    clock.advance(serving.IDLE_TIMEOUT)
    assert transport.disconnected
    proto.connectionLost(Failure(ConnectionDone()))
    assert records[0]['end'] == 'timeout' and records[0]['pdl_bytes'] == 5
    assert clock.getDelayedCalls() == []


def test_listen_refuses_udp_and_tls():
    with pytest.raises(ValueError):
        raw.listen(MemoryReactorClock(), Listener('udp', 9100, 'raw'), PERSONA)
    with pytest.raises(ValueError):
        raw.listen(MemoryReactorClock(), Listener('tcp', 9100, 'raw', 'tls'), PERSONA)


# --- probe, in memory ------------------------------------------------------------

def stub_reply(pdl: int, total: int) -> bytes:
    return (raw.pjl_reply('@PJL INFO ID', '"HP LaserJet"') +
            raw.pjl_reply('@PJL INFO LABBYTES', f'PDL={pdl}', f'TOTAL={total}', 'PJL=TRUE',
                          'PEER="198.18.0.9"', 'HOST="mfd-hp"'))


def test_probe_sends_a_pjl_job_and_accepts_the_right_count():
    clock, d, proto, transport = start_probe()
    sent = transport.value()
    assert sent.startswith(raw.UEL + b'@PJL JOB NAME="safeq-lab probe ')
    assert b'@PJL ENTER LANGUAGE=POSTSCRIPT\r\n%!PS-Adobe-3.0' in sent
    assert sent.endswith(b'@PJL INFO ID\r\n@PJL INFO LABBYTES\r\n' + raw.UEL)
    reply = stub_reply(SIZE, len(sent) - len(raw.UEL))
    for i in range(len(reply)):                 # byte by byte
        proto.dataReceived(reply[i:i + 1])
    result = fired(d)
    assert result.outcome == 'ok', result
    assert result.peer_seen == '198.18.0.9' and 'HP LaserJet' in result.exchange
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize('pdl_delta, total_delta', [(-1, -1), (0, 5)])
def test_probe_flags_a_wrong_count(pdl_delta, total_delta):
    _, d, proto, transport = start_probe()
    total = len(transport.value()) - len(raw.UEL)
    proto.dataReceived(stub_reply(SIZE + pdl_delta, total + total_delta))
    result = fired(d)
    assert result.outcome == 'protocol_error' and 'lost or altered' in result.detail


def test_probe_times_out_without_a_reply():
    clock, d, _, transport = start_probe(timeout=1.5)
    clock.advance(1.5)
    result = fired(d)
    assert result.outcome == 'silent' and 'INFO ID' in result.detail
    assert not transport.connected and clock.getDelayedCalls() == []


def test_probe_times_out_without_a_connection():
    clock = MemoryReactorClock()
    d = raw.probe(clock, target(timeout=1.0))
    clock.advance(1.0)
    result = fired(d)
    assert result.outcome == 'timeout' and 'no TCP connection' in result.detail
    assert clock.connectors[-1].stoppedConnecting
    assert clock.getDelayedCalls() == []


def test_probe_rejects_non_pjl_garbage():
    _, d, proto, _ = start_probe()
    proto.dataReceived(b'HTTP/1.1 400 Bad Request\r\n' * 5000)
    assert fired(d).outcome == 'protocol_error'


def test_probe_rejects_udp_targets_with_a_result():
    result = fired(raw.probe(MemoryReactorClock(), target(transport='udp')))
    assert result.outcome == 'error' and 'TCP' in result.detail


# --- loopback, real sockets -----------------------------------------------------

def loopback(port: int, **overrides) -> ProbeTarget:
    return target(host='127.0.0.1', port=port, **overrides)


class _HalfCloser(Protocol):
    """A JetDirect client like ``nc -N``: write, half-close, read until EOF."""

    def __init__(self, data: bytes, done: Deferred) -> None:
        self.data, self.done, self.received = data, done, b''

    def connectionMade(self):
        self.transport.write(self.data)
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


def scenario(body, persona=PERSONA):
    """Run ``body(reactor, port_number)`` against a loopback stub; returns (result, records)."""
    records: list[dict] = []

    async def run(reactor):
        port = raw.listen(reactor, Listener('tcp', 0, 'raw'), persona, on_request=records.append,
                          interface='127.0.0.1')
        try:
            return await body(reactor, port.getHost().port)
        finally:
            await maybeDeferred(port.stopListening)

    return run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(run(r))), records


def test_loopback_probe_ok_and_the_stub_witnesses_it():
    async def body(reactor, number):
        return await raw.probe(reactor, loopback(number, size=256 << 10))

    result, records = scenario(body)
    assert result.outcome == 'ok', result
    assert result.peer_seen == '127.0.0.1'
    [record] = records
    assert record['pdl_bytes'] == 256 << 10 and record['pjl'] is True
    assert record['peer'] == '127.0.0.1' and record['end'] in ('close', 'half-close')


def test_loopback_half_close_client_gets_replies_and_is_logged():
    job, _, _ = raw.build_job(SIZE, 'nc job')

    async def body(reactor, number):
        from twisted.internet.protocol import ClientCreator
        done: Deferred = Deferred()
        await ClientCreator(reactor, _HalfCloser, job, done).connectTCP('127.0.0.1', number)
        return await done

    received, records = scenario(body)
    parsed, _ = raw.parse_pjl_replies(received)
    assert [first for first, _ in parsed] == ['@PJL INFO ID', '@PJL INFO LABBYTES']
    assert raw.reply_fields(parsed[1][1])['PDL'] == str(SIZE)
    assert records[0]['bytes'] == len(job) and records[0]['end'] == 'half-close'


def test_loopback_stub_keeps_serving_after_a_malformed_client():
    async def body(reactor, number):
        with socket.create_connection(('127.0.0.1', number)) as bad:
            bad.sendall(raw.UEL + b'@PJL ' + b'x' * (raw.MAX_PJL_LINE + 10))
        return await raw.probe(reactor, loopback(number))

    result, records = scenario(body)
    assert result.outcome == 'ok', result
    assert sorted(r['end'] for r in records) in (['close', 'malformed'], ['half-close', 'malformed'])
    assert [r['pdl_bytes'] for r in records if r['end'] != 'malformed'] == [SIZE]


class _Silent(Protocol):
    def connectionMade(self):
        self.transport.loseConnection()


def test_loopback_probe_against_a_non_pjl_server():
    async def body(reactor):
        port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface='127.0.0.1')
        try:
            return await raw.probe(reactor, loopback(port.getHost().port))
        finally:
            await maybeDeferred(port.stopListening)

    result = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(body(r)))
    assert result.outcome == 'protocol_error' and 'connection closed' in result.detail, result


def test_loopback_refused():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        number = s.getsockname()[1]
    result = run_on_fresh_reactor(lambda r: raw.probe(r, loopback(number)))
    assert result.outcome == 'refused', result
