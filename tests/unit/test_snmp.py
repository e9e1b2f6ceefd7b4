"""snmp: persona MIB, RFC 3430 framing, reply checks, agent/receiver stubs and probes.

Loopback tests run stub and probe on real sockets on 127.0.0.1, each on a
fresh (non-global) epoll reactor; one runs them in a subprocess on Twisted's
asyncioreactor, which the role daemon and prober use for pysnmp.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest
from pyasn1.codec.ber import decoder, encoder
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater

from emulator.protocols import snmp
from emulator.protocols.base import Listener, Persona, ProbeResult, ProbeTarget
from tests import support
from tests.support import free_port
from pysnmp.proto import rfc1905
from pysnmp.proto.api import v1, v2c

MFD = Persona(host='mfd-km', roles=('mfd-konica-minolta',),
              identity={'printer': True, 'vendor': 'Konica Minolta', 'make_model': 'bizhub C450i',
                        'sys_descr': 'KONICA MINOLTA bizhub C450i',
                        'sys_object_id': '1.3.6.1.4.1.18334.1.2.1.2.1.107.1.1'})
TERMINAL = Persona(host='tul-1', roles=('terminal-ultralight',),
                   identity={'snmp_community': 'yscom'})
RECEIVER = Persona(host='user-1', roles=('user',))


# --- helpers ------------------------------------------------------------------

def run_on_fresh_reactor(fn, limit: float = 8.0):
    """Run ``fn(reactor)`` on a new epoll reactor; returns (result, leftovers).

    ``leftovers`` lists what was still scheduled or registered when ``fn``
    finished (delayed calls, file descriptors beyond the reactor's own), so
    tests can prove nothing leaked.
    """
    leftovers: list = []

    def traced(reactor):
        # Taken as fn starts: the reactor's own waker and the runner's watchdog.
        delayed = set(reactor.getDelayedCalls())
        baseline = set(reactor.getReaders() + reactor.getWriters())

        def finished(result):
            # Taken before the reactor stops: shutdown closes every socket.
            leftovers.extend(c for c in reactor.getDelayedCalls() if c not in delayed)
            leftovers.extend(s for s in reactor.getReaders() + reactor.getWriters()
                             if s not in baseline)
            return result

        return maybeDeferred(fn, reactor).addBoth(finished)

    return support.run_on_fresh_reactor(traced, limit), leftovers


def target(port, transport='udp', protocol='snmp', **overrides) -> ProbeTarget:
    fields = dict(id='lo', host='127.0.0.1', transport=transport, protocol=protocol,
                  port=port, timeout=2.0)
    fields.update(overrides)
    return ProbeTarget(**fields)


def serve_and_probe(persona, transport='udp', protocol='snmp', before=None, **overrides):
    """Start a stub, optionally run ``before(reactor, port)``, probe it, stop it."""
    records: list[dict] = []

    async def scenario(reactor):
        service = snmp.listen(reactor, Listener(transport, 0, protocol), persona,
                              on_request=records.append, interface='127.0.0.1')
        number = service.getHost().port
        try:
            if before is not None:
                await maybeDeferred(before, reactor, number)
            return await snmp.probe(reactor, target(number, transport, protocol, **overrides))
        finally:
            await service.stopListening()

    (result, leftovers) = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert leftovers == [], f'leaked: {leftovers}'
    return result, records


def encode_message(pdu, community=b'public', version=v2c) -> bytes:
    message = version.Message()
    version.apiMessage.set_defaults(message)
    version.apiMessage.set_community(message, community)
    version.apiMessage.set_pdu(message, pdu)
    return encoder.encode(message)


def response_to(request_bytes: bytes, status=0, community=None, var_binds=None) -> bytes:
    message, _ = decoder.decode(request_bytes, asn1Spec=v2c.Message())
    request = v2c.apiMessage.get_pdu(message)
    response = v2c.apiPDU.get_response(request)
    v2c.apiPDU.set_error_status(response, status)
    v2c.apiPDU.set_error_index(response, 1 if status else 0)
    v2c.apiPDU.set_varbinds(response, var_binds if var_binds is not None
                            else [(name, v2c.OctetString(b'x')) for name, _ in
                                  v2c.apiPDU.get_varbinds(request)])
    if community is None:
        community = v2c.apiMessage.get_community(message)
    return encode_message(response, community)


# --- persona MIB ------------------------------------------------------------------

def test_persona_objects_printer():
    objects = snmp.persona_objects(MFD, lambda: 4242)
    mib = snmp.PersonaMib(objects)
    assert mib.value(snmp.SYS_DESCR).asOctets() == b'KONICA MINOLTA bizhub C450i'
    assert snmp.oid_text(mib.value(snmp.SYS_OBJECT_ID)) == '1.3.6.1.4.1.18334.1.2.1.2.1.107.1.1'
    assert mib.value(snmp.SYS_NAME).asOctets() == b'mfd-km'
    assert int(mib.value(snmp.SYS_UPTIME)) == 4242
    assert int(mib.value(snmp.HR_DEVICE_STATUS)) == 2          # running
    assert int(mib.value(snmp.HR_PRINTER_STATUS)) == 3         # idle
    assert mib.value(snmp.HR_DEVICE_DESCR).asOctets() == b'bizhub C450i'


def test_persona_objects_terminal_defaults_and_overrides():
    objects = snmp.persona_objects(TERMINAL, lambda: 0)
    assert snmp.HR_PRINTER_STATUS not in objects and snmp.HR_DEVICE_STATUS not in objects
    assert objects[snmp.SYS_DESCR].asOctets() == b'SafeQ lab device tul-1'
    assert snmp.oid_text(objects[snmp.SYS_OBJECT_ID]) == snmp.DEFAULT_SYS_OBJECT_ID
    busy = Persona(host='x', roles=('user',), identity={
        'printer': True, 'printer_status': 'printing', 'device_status': 'warning',
        'sys_location': 'Floor 2'})
    objects = snmp.persona_objects(busy, lambda: 0)
    assert int(objects[snmp.HR_PRINTER_STATUS]) == 4
    assert int(objects[snmp.HR_DEVICE_STATUS]) == 3
    assert snmp.oid_text(objects[snmp.SYS_OBJECT_ID]) == snmp.DEFAULT_SYS_OBJECT_ID
    assert objects[snmp.SYS_LOCATION].asOctets() == b'Floor 2'
    with pytest.raises(ValueError, match="field 'sys_object_id' must be oid"):
        Persona(host='x', roles=('r',), identity={'sys_object_id': 'not an oid'})


def test_persona_mib_get_and_getnext():
    mib = snmp.PersonaMib(snmp.persona_objects(MFD, lambda: 1))
    name = v2c.ObjectIdentifier
    [(_, descr), (_, no_instance), (_, no_object)] = mib.read_variables(
        (name(snmp.SYS_DESCR), None), (name((1, 3, 6, 1, 2, 1, 1, 1, 1)), None),
        (name((1, 3, 6, 1, 4, 1, 9)), None))
    assert descr.asOctets().startswith(b'KONICA')
    assert isinstance(no_instance, rfc1905.NoSuchInstance)
    assert isinstance(no_object, rfc1905.NoSuchObject)
    [(first, _), (after_descr, _), (_, end)] = mib.read_next_variables(
        (name((1, 3, 6, 1, 2, 1)), None), (name(snmp.SYS_DESCR), None),
        (name(snmp.SNMP_ENGINE_MAX_MESSAGE_SIZE), None))   # the last object served
    assert tuple(first) == snmp.SYS_DESCR
    assert tuple(after_descr) == snmp.SYS_OBJECT_ID
    assert isinstance(end, rfc1905.EndOfMibView)


# --- RFC 3430 framing ---------------------------------------------------------------

@pytest.mark.parametrize('buffer, length', [
    (b'', None), (b'\x30', None), (b'\x30\x03abc', 5), (b'\x30\x03ab', 5),
    (b'\x30\x82\x01', None), (b'\x30\x82\x01\x00' + b'x' * 256, 260),
])
def test_ber_message_length(buffer, length):
    assert snmp.ber_message_length(buffer) == length


@pytest.mark.parametrize('buffer, message', [
    (b'GET / HTTP/1.1\r\n', 'BER SEQUENCE'), (b'\x30\x80', 'indefinite'),
    (b'\x30\x85\x01\x02\x03\x04\x05', 'octets'), (b'\x30\x84\x7f\xff\xff\xff', 'exceeds'),
])
def test_ber_message_length_rejects(buffer, message):
    with pytest.raises(snmp.FramingError, match=message):
        snmp.ber_message_length(buffer)


# --- requests and reply checks --------------------------------------------------------

def test_get_request_encodes_community_and_oids():
    request = snmp.build_request(target(161, options={'community': 'yscom'}))
    message, _ = decoder.decode(request.message, asn1Spec=v2c.Message())
    assert v2c.apiMessage.get_community(message).asOctets() == b'yscom'
    pdu = v2c.apiMessage.get_pdu(message)
    assert pdu.tagSet == v2c.GetRequestPDU.tagSet
    assert [tuple(n) for n, _ in v2c.apiPDU.get_varbinds(pdu)] == [
        snmp.SYS_DESCR, snmp.SYS_OBJECT_ID, snmp.HR_PRINTER_STATUS]
    assert int(v2c.apiPDU.get_request_id(pdu)) == request.request_id
    assert request.label == 'GET sysDescr.0 sysObjectID.0 hrPrinterStatus.1'


def test_inform_request_carries_state_change():
    request = snmp.build_request(target(162, protocol='snmp-trap', options={'state': 'authenticated'}))
    message, _ = decoder.decode(request.message, asn1Spec=v2c.Message())
    pdu = v2c.apiMessage.get_pdu(message)
    assert pdu.tagSet == v2c.InformRequestPDU.tagSet
    binds = {tuple(n): v for n, v in v2c.apiPDU.get_varbinds(pdu)}
    assert tuple(binds[snmp.SNMP_TRAP_OID]) == snmp.LAB_STATE_CHANGE
    assert binds[snmp.LAB_STATE].asOctets() == b'authenticated'
    cold = snmp.build_request(target(162, protocol='snmp-trap', options={'trap_oid': '1.3.6.1.6.3.1.1.5.1'}))
    assert cold.label == 'INFORM coldStart'


def test_judge_reply():
    request = snmp.build_request(target(161))
    ok = response_to(request.message, var_binds=[
        (v2c.ObjectIdentifier(snmp.SYS_DESCR), v2c.OctetString(b'Xerox AltaLink C8135')),
        (v2c.ObjectIdentifier(snmp.SYS_OBJECT_ID), v2c.ObjectIdentifier((1, 3, 6, 1, 4, 1, 253))),
        (v2c.ObjectIdentifier(snmp.HR_PRINTER_STATUS), v2c.Integer(4))])
    outcome, detail = snmp.judge_reply(request, ok)
    assert outcome == 'ok'
    assert detail == ('sysDescr.0 "Xerox AltaLink C8135", sysObjectID.0 1.3.6.1.4.1.253, '
                      'hrPrinterStatus printing(4)')
    assert snmp.judge_reply(request, response_to(request.message, status=5)) == (
        'protocol_error', 'Response errorStatus genErr(5) at index 1')
    assert snmp.judge_reply(request, response_to(request.message, community=b'other'))[0] == 'protocol_error'
    assert snmp.judge_reply(request, b'HTTP/1.1 400 Bad Request\r\n\r\n') == (
        'protocol_error', 'reply is not an SNMP message (28 B)')
    no_descr = response_to(request.message, var_binds=[
        (v2c.ObjectIdentifier(oid), rfc1905.noSuchObject)
        for oid in (snmp.SYS_DESCR, snmp.SYS_OBJECT_ID, snmp.HR_PRINTER_STATUS)])
    assert snmp.judge_reply(request, no_descr)[0] == 'protocol_error'
    # Someone else's request-id: not ours, keep waiting.
    other = snmp.build_request(target(161))
    assert snmp.judge_reply(request, response_to(other.message)) is None
    # An SNMPv1 reply to a v2c request is wrong.
    v1_pdu = v1.GetResponsePDU()
    v1.apiPDU.set_defaults(v1_pdu)
    assert 'version 1' in snmp.judge_reply(request, encode_message(v1_pdu, version=v1))[1]


def test_probe_bad_options_is_an_error_row():
    result = snmp.probe(None, target(161, options={'oids': ['1.3.x']}))
    box = []
    result.addBoth(box.append)
    assert isinstance(box[0], ProbeResult) and box[0].outcome == 'error'
    assert 'not an OID' in box[0].detail


# --- loopback: agent ----------------------------------------------------------------

def test_udp_agent_and_probe():
    result, records = serve_and_probe(MFD)
    assert result.outcome == 'ok', result
    assert result.exchange == 'SNMPv2c/UDP GET sysDescr.0 sysObjectID.0 hrPrinterStatus.1 -> Response'
    assert result.detail == ('sysDescr.0 "KONICA MINOLTA bizhub C450i", '
                             'sysObjectID.0 1.3.6.1.4.1.18334.1.2.1.2.1.107.1.1, hrPrinterStatus idle(3)')
    assert records == [{'transport': 'udp', 'port': records[0]['port'], 'peer': '127.0.0.1',
                        'op': 'get', 'version': 'v2c',
                        'oids': ['1.3.6.1.2.1.1.1.0', '1.3.6.1.2.1.1.2.0', '1.3.6.1.2.1.25.3.5.1.1.1']}]


def test_tcp_agent_and_probe():
    result, records = serve_and_probe(TERMINAL, transport='tcp', options={'community': 'yscom'})
    assert result.outcome == 'ok', result
    assert result.exchange.startswith('SNMPv2c/TCP (RFC 3430) GET')
    assert 'sysDescr.0 "SafeQ lab device tul-1"' in result.detail
    assert 'no Printer-MIB' in result.detail
    assert [(r['transport'], r['op']) for r in records] == [('tcp', 'get')]


@pytest.mark.parametrize('transport', ['udp', 'tcp'])
def test_wrong_community_times_out_silently(transport):
    result, records = serve_and_probe(MFD, transport=transport, timeout=0.3,
                                      options={'community': 'private'})
    assert result.outcome == ('silent' if transport == 'tcp' else 'timeout'), result
    assert 'wrong community' in result.detail
    assert 0.3 <= result.elapsed < 1.5
    assert records == []


def test_malformed_datagrams_are_ignored_and_agent_keeps_serving():
    async def garbage(reactor, port):
        good = snmp.build_request(target(port)).message
        junk = [b'', b'\x00' * 10, b'GET / HTTP/1.0\r\n\r\n', good[:len(good) // 2],
                b'\x30\x84\x7f\xff\xff\xff', good[:-3] + b'\xff\xff\xff',
                # A well-formed message the agent must not answer: a Response PDU.
                response_to(good)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            s.connect(('127.0.0.1', port))
            for datagram in junk:
                s.send(datagram)
            await deferLater(reactor, 0.2)
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(65535)    # nothing answered

    result, records = serve_and_probe(MFD, before=garbage)
    assert result.outcome == 'ok', result
    assert len(records) == 1


async def read_until_closed(reactor, sock, wait: float = 1.0) -> tuple[bytes, bool]:
    """What ``sock`` receives within ``wait`` s without blocking the reactor; (data, closed)."""
    sock.setblocking(False)
    data = b''
    for _ in range(int(wait / 0.02)):
        await deferLater(reactor, 0.02)
        try:
            chunk = sock.recv(65535)
        except BlockingIOError:
            continue
        if not chunk:
            return data, True
        data += chunk
    return data, False


def test_malformed_tcp_stream_closes_that_connection_only():
    async def garbage(reactor, port):
        with socket.create_connection(('127.0.0.1', port), timeout=2) as s:
            s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            assert await read_until_closed(reactor, s) == (b'', True)   # no answer, closed
        # Two requests back to back on one stream, the second split in two.
        requests = [snmp.build_request(target(port)) for _ in range(2)]
        first, second = (r.message for r in requests)
        with socket.create_connection(('127.0.0.1', port), timeout=2) as s:
            s.sendall(first + second[:5])
            await deferLater(reactor, 0.05)
            s.sendall(second[5:])
            data, closed = await read_until_closed(reactor, s, wait=0.3)
            assert not closed
            replies = []
            while data:
                length = snmp.ber_message_length(data)
                replies.append(data[:length])
                data = data[length:]
            assert [snmp.judge_reply(r, reply)[0] for r, reply in zip(requests, replies)] == ['ok', 'ok']
            assert len(replies) == 2

    result, records = serve_and_probe(MFD, transport='tcp', before=garbage)
    assert result.outcome == 'ok', result
    assert len(records) == 3


def test_set_is_refused_as_not_writable():
    async def set_request(reactor, port):
        pdu = v2c.SetRequestPDU()
        v2c.apiPDU.set_defaults(pdu)
        v2c.apiPDU.set_varbinds(pdu, [(snmp.SYS_CONTACT, v2c.OctetString(b'mallory'))])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(('127.0.0.1', port))
            s.send(encode_message(pdu))
            data, _ = await read_until_closed(reactor, s, wait=0.2)
            reply, _ = decoder.decode(data, asn1Spec=v2c.Message())
        status = v2c.apiPDU.get_error_status(v2c.apiMessage.get_pdu(reply))
        assert status.prettyPrint() == 'notWritable'

    result, records = serve_and_probe(MFD, before=set_request)
    assert result.outcome == 'ok'
    assert [r['op'] for r in records] == ['set', 'get']


# --- loopback: notification receiver --------------------------------------------------

def test_inform_probe_is_acknowledged_by_receiver():
    result, records = serve_and_probe(RECEIVER, protocol='snmp-trap')
    assert result.outcome == 'ok', result
    assert result.exchange == ('SNMPv2c/UDP INFORM safeqLabStateChange (a trap is unacknowledged: '
                               'sent as an inform) -> Response')
    assert result.detail == 'inform acknowledged (3 var-binds echoed)'
    assert records == [{'transport': 'udp', 'port': records[0]['port'], 'peer': '127.0.0.1',
                        'op': 'trap', 'pdu': 'inform', 'version': 'v2c',
                        'trap_oid': '1.3.6.1.4.1.32473.6.0.1'}]


def test_receiver_logs_plain_traps_and_drops_bad_community():
    async def traps(reactor, port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for community in (b'public', b'wrong'):
                pdu = v2c.SNMPv2TrapPDU()
                v2c.apiTrapPDU.set_defaults(pdu)
                v2c.apiPDU.set_varbinds(pdu, [
                    (snmp.SYS_UPTIME, v2c.TimeTicks(1)),
                    (snmp.SNMP_TRAP_OID, v2c.ObjectIdentifier(snmp.COLD_START))])
                s.sendto(encode_message(pdu, community), ('127.0.0.1', port))
            s.sendto(b'\x30\x03\x02\x01', ('127.0.0.1', port))   # truncated
        await deferLater(reactor, 0.1)

    result, records = serve_and_probe(RECEIVER, protocol='snmp-trap', before=traps)
    assert result.outcome == 'ok', result
    assert [(r['pdu'], r['trap_oid']) for r in records] == [
        ('trap', '1.3.6.1.6.3.1.1.5.1'), ('inform', '1.3.6.1.4.1.32473.6.0.1')]


def test_inform_with_wrong_community_times_out():
    result, records = serve_and_probe(RECEIVER, protocol='snmp-trap', timeout=0.3,
                                      options={'community': 'private'})
    assert result.outcome == 'timeout', result
    assert records == []


# --- probe outcomes against other servers -----------------------------------------------

def test_probe_closed_ports():
    udp, leftovers = run_on_fresh_reactor(
        lambda r: snmp.probe(r, target(free_port(socket.SOCK_DGRAM), timeout=1.0)))
    assert udp.outcome in ('refused', 'timeout'), udp   # timeout only if ICMP is filtered
    assert leftovers == []
    tcp, leftovers = run_on_fresh_reactor(lambda r: snmp.probe(r, target(free_port(), 'tcp')))
    assert tcp.outcome == 'refused', tcp
    assert leftovers == []


class _FakeAgent(DatagramProtocol):
    def __init__(self, answer):
        self.answer = answer

    def datagramReceived(self, datagram, addr):
        for reply in self.answer(datagram):
            self.transport.write(reply, addr)


@pytest.mark.parametrize('answer, outcome, detail', [
    (lambda d: [response_to(d, status=5)], 'protocol_error', 'genErr(5)'),
    (lambda d: [b'\x01\x02garbage'], 'protocol_error', 'not an SNMP message'),
    # A stale reply first (other request-id), then ours: the stale one is skipped.
    (lambda d: [response_to(snmp.build_request(target(1)).message), response_to(d)], 'ok', 'sysDescr.0 "x"'),
])
def test_probe_judges_fake_agents(answer, outcome, detail):
    async def scenario(reactor):
        port = reactor.listenUDP(0, _FakeAgent(answer), interface='127.0.0.1')
        try:
            return await snmp.probe(reactor, target(port.getHost().port, timeout=1.0))
        finally:
            await maybeDeferred(port.stopListening)

    result, leftovers = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert (result.outcome, leftovers) == (outcome, []), result
    assert detail in result.detail


def test_udp_probe_retransmits_within_its_timeout():
    seen = []

    def drop_the_first_two(datagram):
        seen.append(datagram)
        return [response_to(datagram)] if len(seen) == 3 else []

    async def scenario(reactor):
        port = reactor.listenUDP(0, _FakeAgent(drop_the_first_two), interface='127.0.0.1')
        try:
            return await snmp.probe(reactor, target(port.getHost().port, timeout=0.9))
        finally:
            await maybeDeferred(port.stopListening)

    result, leftovers = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert (result.outcome, leftovers) == ('ok', []), result
    assert len(seen) == 3 and len(set(seen)) == 1        # the same request, resent twice
    assert 0.55 <= result.elapsed < 0.9


def test_udp_probe_without_retries_sends_once():
    seen = []

    async def scenario(reactor):
        port = reactor.listenUDP(0, _FakeAgent(lambda d: seen.append(d) or []), interface='127.0.0.1')
        try:
            return await snmp.probe(reactor, target(port.getHost().port, timeout=0.3, options={'retries': 0}))
        finally:
            await maybeDeferred(port.stopListening)

    result, leftovers = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert (result.outcome, leftovers, len(seen)) == ('timeout', [], 1)


@pytest.mark.parametrize('transport', ['udp', 'tcp'])
def test_hostile_messages_are_dropped_with_one_line_not_a_traceback(transport):
    from twisted.logger import globalLogPublisher
    events = []

    async def garbage(reactor, port):
        good = snmp.build_request(target(port)).message
        junk = [b'GARBAGE', b'\x30\x03\x02\x01\x05', good[:-3] + b'\xff\xff\xff', b'\x30\x00']
        if transport == 'udp':
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for datagram in junk:
                    s.sendto(datagram, ('127.0.0.1', port))
        else:
            for message in junk[1:]:
                with socket.create_connection(('127.0.0.1', port), timeout=2) as s:
                    s.sendall(message)
        await deferLater(reactor, 0.2)

    globalLogPublisher.addObserver(events.append)
    try:
        result, _ = serve_and_probe(MFD, transport=transport, before=garbage)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert result.outcome == 'ok', result
    assert [e for e in events if 'log_failure' in e or e.get('log_level').name == 'critical'] == []


# --- lifecycle -------------------------------------------------------------------------

@pytest.mark.parametrize('transport, kind', [('udp', socket.SOCK_DGRAM), ('tcp', socket.SOCK_STREAM)])
def test_stop_listening_frees_the_port_and_bind_errors_propagate(transport, kind):
    async def scenario(reactor):
        service = snmp.listen(reactor, Listener(transport, 0, 'snmp'), MFD, interface='127.0.0.1')
        number = service.getHost().port
        with pytest.raises(CannotListenError):
            snmp.listen(reactor, Listener(transport, number, 'snmp'), MFD, interface='127.0.0.1')
        await service.stopListening()
        await service.stopListening()      # idempotent
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(('127.0.0.1', number))

    _, leftovers = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))
    assert leftovers == []


def test_listen_rejects_foreign_protocol():
    with pytest.raises(ValueError, match='cannot serve'):
        snmp.listen(None, Listener('udp', 161, 'http'), MFD)


ASYNCIO_SCRIPT = textwrap.dedent('''
    import json, sys
    from twisted.internet import asyncioreactor
    asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from emulator.protocols import snmp
    from emulator.protocols.base import Listener, Persona, ProbeTarget

    persona = Persona(host='mfd-x', roles=('mfd-xerox',), identity={'printer': True, 'sys_descr': 'Xerox AltaLink'})
    records, out = [], {}

    async def main():
        try:
            agent = snmp.listen(reactor, Listener('udp', 0, 'snmp'), persona, records.append, '127.0.0.1')
            traps = snmp.listen(reactor, Listener('udp', 0, 'snmp-trap'), persona, records.append, '127.0.0.1')
            for name, service, protocol in (('get', agent, 'snmp'), ('inform', traps, 'snmp-trap')):
                result = await snmp.probe(reactor, ProbeTarget(
                    id=name, host='127.0.0.1', transport='udp', protocol=protocol,
                    port=service.getHost().port, timeout=2.0))
                out[name] = result.to_dict()
                await service.stopListening()
            out['records'] = records
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()
    print(json.dumps(out))
''')


def test_runs_on_twisted_asyncioreactor():
    proc = subprocess.run([sys.executable, '-c', ASYNCIO_SCRIPT], capture_output=True,
                          text=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['get']['outcome'] == 'ok' and 'Xerox AltaLink' in out['get']['detail'], out
    assert out['inform']['outcome'] == 'ok', out
    assert [r['op'] for r in out['records']] == ['get', 'trap']


# --- Printer-MIB from the persona, imported objects ----------------------------------------------

def test_printer_mib_rows_come_from_the_persona_and_walk_in_order():
    persona = Persona(host='mfd-sharp', roles=('mfd', 'mfd-sharp-esf'), identity={
        'printer': True, 'make_model': 'SHARP MX-M3071', 'serial_number': 'S-42', 'page_count': 12345, 'color': False,
        'toner': 'black:61', 'input_trays': 'Tray 1=550; Bypass Tray=100'})
    objects = snmp.persona_objects(persona, lambda: 0)
    supplies = snmp.PRT_SUPPLIES
    assert objects[snmp.PRT_GENERAL_SERIAL_NUMBER].asOctets() == b'S-42'
    assert objects[snmp.PRT_GENERAL_PRINTER_NAME].asOctets() == b'SHARP MX-M3071'
    assert int(objects[snmp.PRT_MARKER_LIFE_COUNT]) == 12345
    assert objects[supplies + (6, 1, 1)].asOctets() == b'Black Toner'
    assert [int(objects[supplies + (column, 1, 1)]) for column in (5, 7, 8, 9)] == [3, 19, 100, 61]
    assert supplies + (6, 1, 2) not in objects   # mono: one cartridge
    assert int(objects[snmp.PRT_INPUT + (2, 1, 2)]) == 5 and int(objects[snmp.PRT_INPUT + (9, 1, 1)]) == 550
    mib = snmp.PersonaMib(objects)
    walked, name = [], v2c.ObjectIdentifier(snmp.PRINTER_MIB)
    while True:
        [(name, value)] = mib.read_next_variables((name, None))
        if tuple(name)[:len(snmp.PRINTER_MIB)] != snmp.PRINTER_MIB:
            break
        walked.append(tuple(name))
    assert walked == sorted(o for o in objects if o[:len(snmp.PRINTER_MIB)] == snmp.PRINTER_MIB)
    assert tuple(name) == snmp.SNMP_ENGINE_ID   # the walk leaves the subtree, not the MIB


def test_terminals_serve_no_printer_mib():
    assert not any(oid[:7] == snmp.PRINTER_MIB for oid in snmp.persona_objects(TERMINAL, lambda: 0))


def test_imported_objects_are_served_exactly_and_bad_ones_are_refused():
    persona = Persona(host='x', roles=('mfd',), identity={'printer': True, 'snmp_objects': {
        '1.3.6.1.4.1.367.9.1.0': {'type': 'gauge32', 'value': 7},
        '1.3.6.1.2.1.1.1.0': {'type': 'hex', 'value': '00ff'},
        '1.3.6.1.2.1.1.3.0': {'type': 'timeticks', 'value': 999}}})
    objects = snmp.persona_objects(persona, lambda: 5)
    assert objects[(1, 3, 6, 1, 4, 1, 367, 9, 1, 0)] == v2c.Gauge32(7)
    assert objects[snmp.SYS_DESCR].asOctets() == b'\x00\xff'
    assert objects[snmp.SYS_UPTIME]() == v2c.TimeTicks(5)
    broken = Persona(host='x', roles=('mfd',), identity={'snmp_objects': {'1.3.6.1': {'type': 'gauge32', 'value': -1}}})
    with pytest.raises(ValueError, match='unsigned 32-bit'):   # listen builds these before serving
        snmp.persona_objects(broken, lambda: 0)


def test_a_second_engine_compiles_no_mib_module_again(monkeypatch):
    # pysnmp compiles its MIB modules from source for each engine: 80 % of building one (65 ms)
    import builtins

    from pysnmp.entity.engine import SnmpEngine

    SnmpEngine()
    compiled = []
    real = builtins.compile
    monkeypatch.setattr(builtins, 'compile', lambda source, path, *args, **kwargs: (
        compiled.append(path), real(source, path, *args, **kwargs))[1])
    engine = SnmpEngine()
    assert compiled == []
    mib = engine.get_mib_builder()
    (descr,) = mib.import_symbols('SNMPv2-MIB', 'sysDescr')
    assert descr.name == (1, 3, 6, 1, 2, 1, 1, 1)
    assert snmp._mibs.install()  # installed once, and saying so again changes nothing
