"""lpd (RFC 1179 'lpr'): receive-job server stub and job-submitting probe.

In-memory tests drive the protocols over StringTransport with a
MemoryReactorClock; loopback tests run stub and probe on 127.0.0.1 on a fresh
reactor per test.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import (MemoryReactorClock, StringTransport,
                                      StringTransportWithDisconnection)
from twisted.python.failure import Failure

from emulator.protocols import payloads
from emulator.protocols import serving, lpd
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import fired, run_on_fresh_reactor

PERSONA = Persona(host='flexispooler-1', roles=('flexispooler',),
                  identity={'make_model': 'YSoft SafeQ FlexiSpooler'})
SERVER = IPv4Address('TCP', '198.18.0.7', 515)
CLIENT = IPv4Address('TCP', '198.18.0.9', 721)
CONTROL = lpd.control_file('ws-17', 'alice', 'Quarterly report', 'dfA017ws-17')
DATA = payloads.postscript_job(70_000)


# --- helpers ------------------------------------------------------------------

def server(persona=PERSONA):
    clock = MemoryReactorClock()
    records: list[dict] = []
    lpd.listen(clock, Listener('tcp', SERVER.port, 'lpr'), persona, on_request=records.append)
    proto = clock.tcpServers[-1][1].buildProtocol(CLIENT)
    transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    proto.makeConnection(transport)
    return clock, proto, transport, records


def job(queue=b'secure', control=CONTROL, data=DATA) -> bytes:
    return (b'\x02' + queue + b'\n'
            + b'\x02%d cfA017ws-17\n' % len(control) + control + b'\x00'
            + b'\x03%d dfA017ws-17\n' % len(data) + data + b'\x00')


def closed(proto) -> None:
    proto.connectionLost(Failure(ConnectionDone()))


# --- codec --------------------------------------------------------------------

def test_control_file_and_parse():
    assert CONTROL == (b'Hws-17\nPalice\nJQuarterly report\nNQuarterly report\n'
                       b'ldfA017ws-17\nUdfA017ws-17\n')
    assert lpd.parse_control(CONTROL) == {'client_host': 'ws-17', 'user': 'alice',
                                          'job': 'Quarterly report', 'prints': ['dfA017ws-17']}


# --- server: receive job ---------------------------------------------------------

@pytest.mark.parametrize('chunk', [1, 3, 1000, 1 << 20])
def test_server_receives_a_job_and_acks_every_step(chunk):
    _, proto, transport, records = server()
    data = job()
    for i in range(0, len(data), chunk):
        proto.dataReceived(data[i:i + chunk])
    assert transport.value() == b'\x00' * 5
    assert records == []                       # the job ends when the client closes
    closed(proto)
    assert records == [{'transport': 'tcp', 'port': 515, 'peer': CLIENT.host, 'op': 'receive-job',
                        'queue': 'secure', 'bytes': len(DATA), 'control_bytes': len(CONTROL),
                        'files': 2, 'user': 'alice', 'job': 'Quarterly report',
                        'client_host': 'ws-17'}]


def test_server_accepts_data_file_first_and_empty_files():
    _, proto, transport, records = server()
    proto.dataReceived(b'\x02lp\n\x030 dfA001h\n\x00\x02%d cfA001h\n' % len(CONTROL)
                       + CONTROL + b'\x00')
    assert transport.value() == b'\x00' * 5
    closed(proto)
    assert records[0]['bytes'] == 0 and records[0]['files'] == 2


def test_server_honours_the_persona_queues():
    persona = Persona(host='mfd', roles=('mfd',), identity={'lpd_queues': ['print', 'raw']})
    _, proto, transport, records = server(persona)
    proto.dataReceived(b'\x02print\n')
    assert transport.value() == b'\x00'
    _, proto, transport, records = server(persona)
    proto.dataReceived(b'\x02secure\n')
    assert transport.value() == lpd.NAK and transport.disconnecting
    closed(proto)
    assert records == []


@pytest.mark.parametrize('code, long', [(b'\x03', False), (b'\x04', True)])
def test_server_reports_queue_state_and_closes(code, long):
    _, proto, transport, records = server()
    proto.dataReceived(code + b'secure alice\n')
    text = transport.value().decode()
    assert 'YSoft SafeQ FlexiSpooler: secure is ready' in text and 'no entries' in text
    assert ('flexispooler-1: secure' in text) is long
    assert transport.disconnecting
    assert records == [{'transport': 'tcp', 'port': 515, 'peer': CLIENT.host, 'op': 'queue-state',
                        'queue': 'secure', 'long': long}]


@pytest.mark.parametrize('line, op', [(b'\x01lp\n', 'print-waiting'),
                                      (b'\x05lp root 12\n', 'remove-jobs')])
def test_server_other_daemon_commands_close_without_reply(line, op):
    _, proto, transport, records = server()
    proto.dataReceived(line)
    assert transport.value() == b'' and transport.disconnecting
    assert records[0]['op'] == op


@pytest.mark.parametrize('data', [
    b'\n',                                                 # empty command
    b'\x09lp\n',                                           # unknown command byte
    b'\x02\n',                                             # no queue
    b'\x02lp\n\x07\n',                                     # unknown subcommand
    b'\x02lp\n\x02abc cfA001h\n',                          # count not a number
    b'\x02lp\n\x02-5 cfA001h\n',                           # negative count
    b'\x02lp\n\x0212\n',                                   # no file name
    b'\x02lp\n\x0212 dfA001h\n',                           # control file named like a data file
    b'\x02lp\n\x0312 cfA001h\n',                           # data file named like a control file
    b'\x02lp\n\x02999999 cfA001h\n',                       # control file too large
    b'\x02lp\n\x033 dfA001h\nabcX',                        # file not followed by 0x00
    b'\x02lp' + b'q' * 2000 + b'\n',                       # line too long
])
def test_server_naks_malformed_input_and_closes(data):
    _, proto, transport, records = server()
    proto.dataReceived(data)
    assert transport.value().endswith(lpd.NAK) and transport.disconnecting
    proto.dataReceived(b'\x02lp\n')                        # ignored after the close
    assert transport.value().count(lpd.NAK) == 1
    closed(proto)
    assert records == []


def test_server_does_not_log_an_aborted_or_cut_job():
    _, proto, _, records = server()
    proto.dataReceived(b'\x02lp\n\x02%d cfA001h\n' % len(CONTROL) + CONTROL + b'\x00\x01\n')
    closed(proto)                                          # abort subcommand, then close
    _, proto, _, more = server()
    proto.dataReceived(b'\x02lp\n\x03100 dfA001h\n' + b'x' * 50)
    proto.connectionLost(Failure(ConnectionLost()))        # cut in the middle of a file
    assert records == more == []


def test_server_drops_idle_connection():
    clock, proto, transport, _ = server()
    proto.dataReceived(b'\x02lp\n')
    clock.advance(serving.IDLE_TIMEOUT - 1)
    proto.dataReceived(b'\x03')                            # any byte counts as activity
    clock.advance(serving.IDLE_TIMEOUT - 1)
    assert not transport.disconnected
    clock.advance(1)
    assert transport.disconnected
    closed(proto)
    assert clock.getDelayedCalls() == []


# --- probe, in memory ------------------------------------------------------------

def target(**overrides) -> ProbeTarget:
    fields = dict(id='p1', host=SERVER.host, transport='tcp', protocol='lpr', port=SERVER.port,
                  timeout=2.0, size=70_000, options={'queue': 'secure', 'user': 'bob'})
    fields.update(overrides)
    return ProbeTarget(**fields)


def start_probe(**overrides):
    clock = MemoryReactorClock()
    d = lpd.probe(clock, target(**overrides))
    proto = clock.tcpClients[-1][2].buildProtocol(SERVER)
    transport = StringTransportWithDisconnection(hostAddress=CLIENT, peerAddress=SERVER)
    transport.protocol = proto
    proto.makeConnection(transport)
    return clock, d, proto, transport


def test_probe_submits_the_job_step_by_step():
    clock, d, proto, transport = start_probe()
    assert transport.value() == b'\x02secure\n'           # nothing more before the ack
    proto.dataReceived(b'\x00')
    header = transport.value()[len(b'\x02secure\n'):]
    assert header.startswith(b'\x02') and b' cfA' in header and header.endswith(b'\n')
    for _ in range(4):
        proto.dataReceived(b'\x00')
    result = fired(d)
    assert result.outcome == 'ok', result
    sent = transport.value()
    assert b'Pbob\n' in sent and b'\x0370000 dfA' in sent and sent.endswith(b'%%EOF\n\x00')
    assert clock.getDelayedCalls() == []

    # What the probe sent is a job the stub accepts.
    _, server_proto, server_transport, records = server()
    server_proto.dataReceived(sent)
    closed(server_proto)
    assert server_transport.value() == b'\x00' * 5
    assert records[0]['bytes'] == 70_000 and records[0]['user'] == 'bob'


@pytest.mark.parametrize('acks, what', [(b'\x01', 'receive job'), (b'\x00\x00\x02', 'control file (')])
def test_probe_reports_a_nak(acks, what):
    _, d, proto, _ = start_probe()
    proto.dataReceived(acks)
    result = fired(d)
    assert result.outcome == 'protocol_error' and what in result.detail, result


def test_probe_timeout_says_which_ack_is_missing():
    clock, d, proto, _ = start_probe(timeout=1.0)
    proto.dataReceived(b'\x00\x00')
    clock.advance(1.0)
    result = fired(d)
    assert result.outcome == 'silent' and 'control file (' in result.detail, result
    assert clock.getDelayedCalls() == []


def test_probe_reports_a_close_mid_job():
    _, d, proto, transport = start_probe()
    proto.dataReceived(b'\x00')
    transport.loseConnection()
    result = fired(d)
    assert result.outcome == 'protocol_error' and 'control file header' in result.detail


# --- loopback, real sockets -----------------------------------------------------

def scenario(body, persona=PERSONA):
    records: list[dict] = []

    async def run(reactor):
        port = lpd.listen(reactor, Listener('tcp', 0, 'lpr'), persona, on_request=records.append,
                          interface='127.0.0.1')
        try:
            return await body(reactor, port.getHost().port)
        finally:
            await maybeDeferred(port.stopListening)

    return run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(run(r))), records


def loopback(port, **overrides):
    return target(host='127.0.0.1', port=port, **overrides)


def test_loopback_job_ok_and_witnessed():
    async def body(reactor, number):
        from twisted.internet.task import deferLater
        result = await lpd.probe(reactor, loopback(number, size=300_000))
        await deferLater(reactor, 0.05)        # the stub logs when it sees the close
        return result

    result, records = scenario(body)
    assert result.outcome == 'ok', result
    assert records[0]['bytes'] == 300_000 and records[0]['peer'] == '127.0.0.1'
    assert records[0]['queue'] == 'secure' and records[0]['files'] == 2


def test_loopback_unknown_queue_is_a_protocol_error_and_the_stub_keeps_serving():
    persona = Persona(host='mfd', roles=('mfd',), identity={'lpd_queues': ['print']})

    async def body(reactor, number):
        refused = await lpd.probe(reactor, loopback(number))
        with socket.create_connection(('127.0.0.1', number)) as bad:
            bad.sendall(b'\x09garbage\n')
        accepted = await lpd.probe(reactor, loopback(number, options={'queue': 'print'}))
        return refused, accepted

    (refused, accepted), _ = scenario(body, persona)
    assert refused.outcome == 'protocol_error' and 'negative acknowledgement' in refused.detail
    assert accepted.outcome == 'ok', accepted


def test_loopback_refused():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        number = s.getsockname()[1]
    result = run_on_fresh_reactor(lambda r: lpd.probe(r, loopback(number)))
    assert result.outcome == 'refused', result
