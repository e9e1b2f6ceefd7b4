"""``mdns``: Multicast DNS (RFC 6762) with DNS-SD (RFC 6763) printer advertisements, as an
AirPrint-capable device answers them; server stub and client probe over ``twisted.names.dns``.

Unicast only. The stub never joins the multicast group (the lab probes unicast, and a join would
put IGMP traffic on the lab's links); it answers every query datagram that reaches its port with a
unicast datagram to the query's source address and port:

* legacy unicast (source port other than the stub's own, RFC 6762 §6.7: ``dig -p PORT``): the
  reply echoes the query ID and the questions, TTLs are capped at 10 s, no cache-flush bits;
* from the mDNS port itself (a QU question or a plain one, sent unicast): an mDNS response, ID 0,
  no questions, cache-flush bit on the unique records (SRV, TXT, A).

Both have QR and AA set. Names are compared case-insensitively; class IN (or ANY), QU bit ignored.
Questions about names the host does not own get no answer at all (mDNS never says NXDOMAIN).

What the host advertises (invented from persona data, formats as Bonjour Printing 1.2 / AirPrint):

    _services._dns-sd._udp.local  PTR  _ipp._tcp.local, _ipps._tcp.local, _printer._tcp.local
    <type>                        PTR  <instance>.<type>        instance = identity['dnssd_name'],
                                                                else '<make_model> [<host>]'
    <instance>.<type>             TXT  txtvers=1 qtotal=1 rp=ipp/print (_printer: rp=<first of
                                       identity['lpd_queues']> or lp) ty=<make_model>
                                       product=(<make_model>) pdl=<identity['pdl']> URF=<identity['urf']>
    <instance>.<type>             SRV  0 0 <port> <host>.local  only when the persona's identity gives
                                       the port: 'ipp_port', 'ipps_port', 'lpd_port' (no port is assumed)
    <host>.local                  A    persona.address, else the address the listener is bound to

A PTR answer carries the instance's SRV, TXT and the host's A record as additional records (RFC
6763 §12), an SRV answer the A record. TTLs: 120 s for SRV and A, 4500 s for PTR and TXT (RFC 6762
§10). Invented defaults: ``make_model`` 'safeq-lab <host>', ``pdl``
'application/pdf,application/postscript,image/urf', ``URF`` 'CP1,RS300,SRGB24,W8,DM1'.

Witness records (``on_request``), one per datagram: ``op='query'`` with ``questions`` (``'name
TYPE'``), ``answers`` (count), ``legacy_unicast``; ``op='ignored'`` with ``reason`` for a
malformed datagram, a response or a non-query opcode (no reply is sent for those).

Probe: one legacy-unicast query, PTR ``_ipp._tcp.local`` (option ``service``) from an ephemeral
port, retransmitted like every UDP probe. ``ok`` when the reply echoes the ID, a PTR answer names
an instance of the service, and an A record gives ``target.host``, for ``<first label of
server_name>.local`` when the target has a ``server_name``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .probing import DatagramProbe, OnRequest, crashed, report
from .serving import listen_udp

PROTOCOL_IDS = ('mdns',)

SERVICE_TYPES = b'_services._dns-sd._udp.local'
# DNS-SD service type -> the persona identity key that gives its port (for the SRV record)
SERVICES: dict[bytes, str] = {
    b'_ipp._tcp.local': 'ipp_port',
    b'_ipps._tcp.local': 'ipps_port',
    b'_printer._tcp.local': 'lpd_port',
}
PROBE_SERVICE = '_ipp._tcp.local'
HOST_TTL = 120            # RFC 6762 §10: records naming a host
SERVICE_TTL = 4500        # RFC 6762 §10: other records
LEGACY_TTL = 10           # RFC 6762 §6.7: cap for legacy unicast replies
CACHE_FLUSH = 0x8000      # top bit of rrclass in a response: unique record (RFC 6762 §10.2)
UNICAST_RESPONSE = 0x8000  # top bit of qclass in a question: QU (RFC 6762 §5.4)
MAX_MESSAGE = 9000        # RFC 6762 §17
MAX_LABEL = 63
MAX_QUESTIONS_RECORDED = 8
DEFAULT_PDL = 'application/pdf,application/postscript,image/urf'
DEFAULT_URF = 'CP1,RS300,SRGB24,W8,DM1'


# --- codec: what the host owns and how a query is answered (no I/O) ---------------------------

@dataclass
class Zone:
    """The records one host owns: (lower-case name, type) -> [(name, payload)]; names match
    case-insensitively (RFC 6762 §16) and are answered as advertised."""

    host: bytes = b''   # <host>.local: the target of every SRV record here
    records: dict[tuple[bytes, int], list[tuple[bytes, Any]]] = field(default_factory=dict)
    unique_types: frozenset[int] = frozenset({dns.SRV, dns.TXT, dns.A})

    def add(self, name: bytes, payload) -> None:
        self.records.setdefault((name.lower(), payload.TYPE), []).append((name, payload))

    def lookup(self, name: bytes, qtype: int) -> list[tuple[bytes, Any]]:
        name = name.lower()
        if qtype == dns.ALL_RECORDS:
            return [record for (n, _t), records in self.records.items() if n == name for record in records]
        return list(self.records.get((name, qtype), []))


def instance_label(persona: Persona) -> bytes:
    """The DNS-SD instance name: one label, so no dots, at most 63 bytes of UTF-8."""
    make_model = persona.identity.get('make_model') or f'safeq-lab {persona.host}'
    text = str(persona.identity.get('dnssd_name') or f'{make_model} [{persona.host}]').replace('.', '-')
    return text.encode('utf-8')[:MAX_LABEL].decode('utf-8', 'ignore').encode('utf-8')


def _txt(persona: Persona, service: bytes) -> dns.Record_TXT:
    identity = persona.identity
    make_model = str(identity.get('make_model') or f'safeq-lab {persona.host}')
    if service == b'_printer._tcp.local':
        queues = identity.get('lpd_queues') or ['lp']
        resource = str(queues[0])
    else:
        resource = 'ipp/print'
    pairs = [('txtvers', '1'), ('qtotal', '1'), ('rp', resource), ('ty', make_model),
             ('product', f'({make_model})'), ('pdl', str(identity.get('pdl') or DEFAULT_PDL)),
             ('URF', str(identity.get('urf') or DEFAULT_URF))]
    return dns.Record_TXT(*(f'{k}={v}'.encode('utf-8')[:255] for k, v in pairs), ttl=SERVICE_TTL)


def _port(persona: Persona, key: str) -> int | None:
    value = persona.identity.get(key)
    try:
        port = int(value)
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def host_name(host: str) -> bytes:
    return f'{host}.local'.encode('utf-8')


def build_zone(persona: Persona, address: str) -> Zone:
    """Everything the host advertises (see the module docstring)."""
    target = host_name(persona.host)
    zone = Zone(host=target)
    label = instance_label(persona)
    for service, port_key in SERVICES.items():
        instance = label + b'.' + service
        zone.add(SERVICE_TYPES, dns.Record_PTR(service, ttl=SERVICE_TTL))
        zone.add(service, dns.Record_PTR(instance, ttl=SERVICE_TTL))
        zone.add(instance, _txt(persona, service))
        port = _port(persona, port_key)
        if port is not None:
            zone.add(instance, dns.Record_SRV(0, 0, port, target, ttl=HOST_TTL))
    if address:
        zone.add(target, dns.Record_A(address, ttl=HOST_TTL))
    return zone


def _additional(zone: Zone, answers: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
    """RFC 6763 §12: with a PTR its instance's SRV, TXT and the host's A (also when no SRV could be
    given: the host owns the instance); with an SRV its target's A."""
    extra: list[tuple[bytes, Any]] = []
    for _name, payload in answers:
        if payload.TYPE == dns.PTR and zone.lookup(payload.name.name, dns.TXT):   # an instance of ours
            instance = payload.name.name
            extra += zone.lookup(instance, dns.SRV) + zone.lookup(instance, dns.TXT) + zone.lookup(zone.host, dns.A)
        elif payload.TYPE == dns.SRV:
            extra += zone.lookup(payload.target.name, dns.A)
    unique = []
    for record in extra:
        if record not in answers and record not in unique:
            unique.append(record)
    return unique


def _header(zone: Zone, name: bytes, payload, legacy: bool) -> dns.RRHeader:
    ttl = min(payload.ttl, LEGACY_TTL) if legacy else payload.ttl
    flush = CACHE_FLUSH if payload.TYPE in zone.unique_types and not legacy else 0
    return dns.RRHeader(name=name, type=payload.TYPE, cls=dns.IN | flush, ttl=ttl, payload=payload, auth=True)


def answer(zone: Zone, datagram: bytes, legacy: bool) -> tuple[bytes | None, dict[str, Any]]:
    """(reply datagram or None, witness fields) for one received datagram."""
    query = dns.Message()
    try:
        query.fromStr(datagram)
    except Exception as exc:   # twisted.names raises many types on garbage (struct, EOF, Value...)
        return None, {'op': 'ignored', 'reason': f'malformed: {type(exc).__name__}'}
    if query.answer:
        return None, {'op': 'ignored', 'reason': 'a response, not a query'}
    if query.opCode != dns.OP_QUERY:
        return None, {'op': 'ignored', 'reason': f'opcode {query.opCode}'}
    answers: list[tuple[bytes, Any]] = []
    for question in query.queries:
        if question.cls & ~UNICAST_RESPONSE not in (dns.IN, dns.ANY):
            continue
        for record in zone.lookup(question.name.name, question.type):
            if record not in answers:
                answers.append(record)
    fields = {'op': 'query', 'legacy_unicast': legacy, 'answers': len(answers),
              'questions': [f'{q.name.name.decode("utf-8", "replace")[:255]} {dns.QUERY_TYPES.get(q.type, q.type)}'
                            for q in query.queries[:MAX_QUESTIONS_RECORDED]]}
    if not answers:
        return None, fields
    reply = dns.Message(id=query.id if legacy else 0, answer=1, auth=True, maxSize=MAX_MESSAGE)
    if legacy:
        reply.queries = query.queries
    reply.answers = [_header(zone, n, p, legacy) for n, p in answers]
    reply.additional = [_header(zone, n, p, legacy) for n, p in _additional(zone, answers)]
    return reply.toStr(), fields


# --- server stub ---------------------------------------------------------------------------------

class _Responder(DatagramProtocol):
    noisy = False

    def __init__(self, persona: Persona, on_request: OnRequest | None) -> None:
        self.persona = persona
        self.on_request = on_request
        self.zone = Zone()

    def startProtocol(self) -> None:
        bound = self.transport.getHost().host
        address = self.persona.address or ('' if bound in ('', '0.0.0.0') else bound)
        self.zone = build_zone(self.persona, address)

    def datagramReceived(self, datagram: bytes, addr) -> None:
        own_port = self.transport.getHost().port
        reply, fields = answer(self.zone, datagram, legacy=addr[1] != own_port)
        if reply is not None:
            try:
                self.transport.write(reply, addr)
            except OSError as exc:   # e.g. no route back: the query is still witnessed
                fields['send_error'] = str(exc)
        report(self.on_request, {'transport': 'udp', 'port': own_port, 'peer': addr[0], **fields})


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Answer mDNS/DNS-SD queries unicast on ``listener`` (UDP, plain); no multicast join."""
    if listener.transport != 'udp':
        raise ValueError(f'mdns runs over udp, not {listener.transport}')
    if listener.security != 'plain':
        raise ValueError(f'mdns has no TLS; listener security {listener.security!r}')
    return listen_udp(reactor, listener.port, _Responder(persona, on_request), interface=interface,
                      max_packet=MAX_MESSAGE)


# --- client probe --------------------------------------------------------------------------------

def ptr_query(service: bytes, query_id: int) -> bytes:
    query = dns.Message(id=query_id)
    query.addQuery(service, dns.PTR, dns.IN)
    return query.toStr()


def judge(probe: DatagramProbe, datagram: bytes, service: bytes, query_id: int) -> None:
    """Decide from the reply: our ID, a PTR to an instance of ``service``, an A for the target."""
    reply = dns.Message()
    try:
        reply.fromStr(datagram)
    except Exception as exc:
        probe.decide('protocol_error', f'undecodable DNS reply: {type(exc).__name__}')
        return
    if not reply.answer or reply.id != query_id:
        probe.decide('protocol_error', f'not a reply to our query (QR={reply.answer}, ID {reply.id} != {query_id})')
        return
    records = reply.answers + reply.additional
    instances = [r.payload.name.name for r in reply.answers
                 if r.type == dns.PTR and r.name.name.lower() == service.lower()]
    if not instances:
        probe.decide('protocol_error', f'no PTR answer for {service.decode()} (rcode {reply.rCode}, '
                                       f'{len(reply.answers)} answers)')
        return
    addresses = {(r.name.name.lower(), r.payload.dottedQuad()) for r in records if r.type == dns.A}
    probe.exchange += f' → {instances[0].decode("utf-8", "replace")}'
    expected_name = host_name(probe.target.server_name.split('.')[0]).lower() if probe.target.server_name else None
    matching = [name for name, address in addresses
                if address == probe.target.host and (expected_name is None or name == expected_name)]
    if matching:
        probe.exchange += f' → A {matching[0].decode("utf-8", "replace")} {probe.target.host}'
        probe.decide('ok', f'{len(instances)} instance(s) advertised; A record names the target')
        return
    shown = ', '.join(f'{n.decode("utf-8", "replace")}={a}' for n, a in sorted(addresses)) or 'none'
    want = f'{expected_name.decode()}={probe.target.host}' if expected_name else probe.target.host
    probe.decide('protocol_error', f'no A record {want} (A records: {shown})')


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Legacy-unicast PTR query for the printer service: ok when the target advertises itself."""
    service = str(target.options.get('service', PROBE_SERVICE)).encode('utf-8')
    exchange = f'mDNS PTR {service.decode()}?'
    try:
        if target.transport != 'udp':
            raise ValueError(f'mdns runs over udp, not {target.transport}')
        query_id = random.getrandbits(16)
        return DatagramProbe(reactor, target, exchange, ptr_query(service, query_id),
                             lambda p, data: judge(p, data, service, query_id)).start()
    except Exception as exc:
        return crashed(target, exchange, exc)
