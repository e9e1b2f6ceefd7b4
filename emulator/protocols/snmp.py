"""``snmp`` / ``snmp-trap``: SNMPv2c agent, notification receiver and probes.

Agent (``snmp``, 161/udp, and 161/tcp where the catalog says "SNMPv2c over
TCP/IP")
    A pysnmp 7 ``SnmpEngine`` with the standard command responders
    (GET, GETNEXT, GETBULK; SET answers notWritable) and a community from
    ``persona.identity['snmp_community']`` (default ``public``). A request
    with another community is dropped silently, as real agents do. It serves
    the SNMPv2-MIB system group (sysDescr, sysObjectID, sysUpTime, sysContact,
    sysName = persona.host, sysLocation, sysServices) from the persona, and on
    printers (``identity['printer']``) what print
    management polls: the HOST-RESOURCES-MIB device row (hrDeviceDescr,
    hrDeviceStatus.1 = running(2), hrPrinterStatus.1 = idle(3) unless the
    persona says otherwise) and the Printer-MIB (RFC 3805) for hrDeviceIndex 1:
    prtGeneral (printer name, serial number, default indexes), prtInputTable
    (one row per tray), prtMarkerTable (marker 1: electrophotographic laser,
    prtMarkerLifeCount = the persona's page counter), prtMarkerSuppliesTable
    and prtMarkerColorantTable (one toner per colour: description, type,
    unit, max capacity, level). Their values come from the persona
    (``emulator.persona_import``: serial_number, page_count, toner, trays);
    invented where the persona gives none: the counters, margins and media
    sizes. A persona imported from a real device (``snmp_objects``) is served
    exactly (OIDs, types, values) on top, except the live sysUpTime.

Notification receiver (``snmp-trap``, 162/udp)
    A pysnmp ``NotificationReceiver`` for the same community: SNMPv1/v2c traps
    are accepted, InformRequests acknowledged with a Response.

Every accepted request is reported once with ``on_request``:
``{'transport', 'port', 'peer', 'op': 'get'|'getnext'|'getbulk'|'set', 'oids'}``
or ``{..., 'op': 'trap', 'pdu': 'trap'|'inform'|'v1-trap', 'trap_oid'}``.

Transports
    pysnmp's own carriers need an asyncio loop, bind asynchronously (a busy
    port would not fail ``listen``) and its TCP carrier never closes the
    listening socket, so the sockets here are Twisted's: a small Twisted
    carrier feeds datagrams and stream messages into the pysnmp engine. This
    runs on any Twisted reactor (epoll, asyncioreactor, ...). On TCP the
    messages travel as in RFC 3430: whole BER-encoded SNMP messages back to
    back on the stream, no extra framing; a stream that is not BER SEQUENCEs,
    or a message above ``MAX_MESSAGE``, closes the connection.

Probes
    ``snmp``: one v2c GetRequest for sysDescr.0, sysObjectID.0 and
    hrPrinterStatus.1 (options: ``community``, ``oids``; over UDP ``retries``,
    default ``UDP_RETRIES``, resent evenly within the timeout as net-snmp does). ``ok`` when the
    Response carries our request-id and community, errorStatus 0 and a
    sysDescr; a wrong community or a drop both give ``timeout`` (an agent is
    silent then), errorStatus != 0 gives ``protocol_error``.
    ``snmp-trap``: a trap is never answered, so the probe sends the same
    notification as an InformRequest, which a v2c receiver must acknowledge,
    and reports ``ok`` on that acknowledgement (options: ``community``,
    ``trap_oid``, ``state``).
    Messages are built with pysnmp's protocol API (``pysnmp.proto.api.v2c``)
    and sent on a connected UDP socket, so an ICMP port unreachable reads as
    ``refused``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pyasn1.codec.ber import decoder, encoder
from pyasn1.type import univ
from pysnmp.carrier.asyncio.dgram.udp import SNMP_UDP_DOMAIN, UdpTransportAddress
from pysnmp.carrier.asyncio.stream.tcp import SNMP_TCP_DOMAIN, TcpTransportAddress
from pysnmp.carrier.base import AbstractTransport, AbstractTransportDispatcher
from pysnmp.entity import config
from pysnmp.entity.engine import SnmpEngine
from pysnmp.entity.rfc3413 import cmdrsp, ntfrcv
from pysnmp.entity.rfc3413.context import SnmpContext
from pysnmp.proto import api, rfc1905
from pysnmp.proto.api import v1, v2c
from pysnmp.proto.proxy import rfc2576
from pysnmp.smi.instrum import AbstractMibInstrumController
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .serving import LISTEN_BACKLOG, listen_udp
from .probing import (DatagramVerdict, OnRequest, ProbeClientFactory, StreamVerdict, Verdict,
                      connect_timeout, crashed, error_result, no_connection_detail)

PROTOCOL_IDS = ('snmp', 'snmp-trap')

MAX_MESSAGE = 65535        # largest SNMP message accepted (one UDP datagram / one BER message on TCP)
IDLE_TIMEOUT = 120         # seconds before an idle TCP manager connection is dropped
TIMER_RESOLUTION = 0.5     # seconds between pysnmp engine timer ticks (cache expiry)
DEFAULT_COMMUNITY = 'public'


_log = Logger()

# --- OIDs ----------------------------------------------------------------------

SYS_DESCR = (1, 3, 6, 1, 2, 1, 1, 1, 0)
SYS_OBJECT_ID = (1, 3, 6, 1, 2, 1, 1, 2, 0)
SYS_UPTIME = (1, 3, 6, 1, 2, 1, 1, 3, 0)
SYS_CONTACT = (1, 3, 6, 1, 2, 1, 1, 4, 0)
SYS_NAME = (1, 3, 6, 1, 2, 1, 1, 5, 0)
SYS_LOCATION = (1, 3, 6, 1, 2, 1, 1, 6, 0)
SYS_SERVICES = (1, 3, 6, 1, 2, 1, 1, 7, 0)
HR_DEVICE_INDEX = (1, 3, 6, 1, 2, 1, 25, 3, 2, 1, 1, 1)
HR_DEVICE_TYPE = (1, 3, 6, 1, 2, 1, 25, 3, 2, 1, 2, 1)
HR_DEVICE_DESCR = (1, 3, 6, 1, 2, 1, 25, 3, 2, 1, 3, 1)
HR_DEVICE_ID = (1, 3, 6, 1, 2, 1, 25, 3, 2, 1, 4, 1)
HR_DEVICE_STATUS = (1, 3, 6, 1, 2, 1, 25, 3, 2, 1, 5, 1)
HR_PRINTER_STATUS = (1, 3, 6, 1, 2, 1, 25, 3, 5, 1, 1, 1)
HR_PRINTER_ERROR_STATE = (1, 3, 6, 1, 2, 1, 25, 3, 5, 1, 2, 1)
HR_DEVICE_PRINTER = (1, 3, 6, 1, 2, 1, 25, 3, 1, 5)   # hrDeviceTypes.hrDevicePrinter
SNMP_ENGINE_ID = (1, 3, 6, 1, 6, 3, 10, 2, 1, 1, 0)
SNMP_ENGINE_BOOTS = (1, 3, 6, 1, 6, 3, 10, 2, 1, 2, 0)
SNMP_ENGINE_TIME = (1, 3, 6, 1, 6, 3, 10, 2, 1, 3, 0)
SNMP_ENGINE_MAX_MESSAGE_SIZE = (1, 3, 6, 1, 6, 3, 10, 2, 1, 4, 0)
SNMP_TRAP_OID = (1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0)
COLD_START = (1, 3, 6, 1, 6, 3, 1, 1, 5, 1)
# SafeQ's own notification MIB is not public; the lab's state-change
# notification lives under 32473, the enterprise number RFC 5612 reserves for
# documentation, so it can never be mistaken for a real vendor's OID.
LAB_STATE_CHANGE = (1, 3, 6, 1, 4, 1, 32473, 6, 0, 1)
LAB_STATE = (1, 3, 6, 1, 4, 1, 32473, 6, 1, 1, 0)
# NET-SNMP-MIB::linux: what an embedded-Linux terminal's stock agent reports.
DEFAULT_SYS_OBJECT_ID = '1.3.6.1.4.1.8072.3.2.10'

_NAMES = {
    SYS_DESCR: 'sysDescr.0', SYS_OBJECT_ID: 'sysObjectID.0', SYS_UPTIME: 'sysUpTime.0',
    SYS_CONTACT: 'sysContact.0', SYS_NAME: 'sysName.0', SYS_LOCATION: 'sysLocation.0',
    SYS_SERVICES: 'sysServices.0', HR_DEVICE_STATUS: 'hrDeviceStatus.1',
    HR_PRINTER_STATUS: 'hrPrinterStatus.1', SNMP_TRAP_OID: 'snmpTrapOID.0',
    COLD_START: 'coldStart', LAB_STATE_CHANGE: 'safeqLabStateChange', LAB_STATE: 'safeqLabState.0',
}
HR_DEVICE_STATUSES = {'unknown': 1, 'running': 2, 'warning': 3, 'testing': 4, 'down': 5}
HR_PRINTER_STATUSES = {'other': 1, 'unknown': 2, 'idle': 3, 'printing': 4, 'warmup': 5}
_PRINTER_STATUS_NAMES = {v: k for k, v in HR_PRINTER_STATUSES.items()}


def oid_text(oid) -> str:
    return '.'.join(str(part) for part in tuple(oid))


def oid_name(oid) -> str:
    oid = tuple(oid)
    return _NAMES.get(oid, oid_text(oid))


def parse_oid(text: Any) -> tuple[int, ...]:
    """``'1.3.6.1...'`` (a leading dot allowed) as a tuple; ValueError otherwise."""
    if isinstance(text, (tuple, list)):
        parts = tuple(text)
    elif isinstance(text, str):
        parts = tuple(text.strip().lstrip('.').split('.'))
    else:
        raise ValueError(f'not an OID: {text!r}')
    try:
        oid = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f'not an OID: {text!r}') from None
    if len(oid) < 2 or any(p < 0 for p in oid):
        raise ValueError(f'not an OID: {text!r}')
    return oid


# --- RFC 3430 stream framing ----------------------------------------------------

class FramingError(ValueError):
    """The stream does not carry BER-encoded SNMP messages."""


def ber_message_length(buffer: bytes, limit: int = MAX_MESSAGE) -> int | None:
    """Length of the first whole SNMP message in ``buffer``, None if incomplete.

    An SNMP message is a BER SEQUENCE (tag 0x30) with a definite length
    (RFC 3417 section 8); anything else raises FramingError.
    """
    if not buffer:
        return None
    if buffer[0] != 0x30:
        raise FramingError(f'expected a BER SEQUENCE (0x30), got 0x{buffer[0]:02x}')
    if len(buffer) < 2:
        return None
    first = buffer[1]
    if first < 0x80:
        total = 2 + first
    else:
        count = first & 0x7F
        if count == 0:
            raise FramingError('indefinite BER length is not allowed in SNMP')
        if count > 4:
            raise FramingError(f'BER length of {count} octets')
        if len(buffer) < 2 + count:
            return None
        total = 2 + count + int.from_bytes(buffer[2:2 + count], 'big')
    if total > limit:
        raise FramingError(f'message of {total} B exceeds the {limit} B limit')
    return total


# --- persona MIB ------------------------------------------------------------------

def _is_printer(persona: Persona) -> bool:
    return persona.identity.get('printer', False)


def _choice(table: dict[str, int], value: Any, default: str) -> int:
    """A named-number value from a persona field given as its name or its number."""
    if isinstance(value, int) and not isinstance(value, bool) and value in table.values():
        return value
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    return table[default]


PRINTER_MIB = (1, 3, 6, 1, 2, 1, 43)
PRT_GENERAL = PRINTER_MIB + (5, 1, 1)           # prtGeneralEntry, index hrDeviceIndex
PRT_INPUT = PRINTER_MIB + (8, 2, 1)             # prtInputEntry, index hrDeviceIndex.prtInputIndex
PRT_MARKER = PRINTER_MIB + (10, 2, 1)           # prtMarkerEntry, index hrDeviceIndex.prtMarkerIndex
PRT_SUPPLIES = PRINTER_MIB + (11, 1, 1)         # prtMarkerSuppliesEntry, hrDeviceIndex.prtMarkerSuppliesIndex
PRT_COLORANT = PRINTER_MIB + (12, 1, 1)         # prtMarkerColorantEntry
PRT_GENERAL_PRINTER_NAME = PRT_GENERAL + (16, 1)
PRT_GENERAL_SERIAL_NUMBER = PRT_GENERAL + (17, 1)
PRT_MARKER_LIFE_COUNT = PRT_MARKER + (4, 1, 1)
DEVICE = 1                                       # hrDeviceIndex of the printer
A4_MICROMETERS = (297000, 210000)                # feed x cross-feed


def _octets(text: str) -> Any:
    return v2c.OctetString(str(text).encode('utf-8'))


def printer_mib_objects(persona: Persona, model: str) -> dict[tuple[int, ...], Any]:
    """Printer-MIB rows for the persona's device (see the module docstring)."""
    from emulator.persona_import import input_trays, number, supplies, SUPPLY_UNITS

    ident = persona.identity
    toners = supplies(ident)
    trays = input_trays(ident)
    page_count = number(ident, 'page_count', 0)
    g = PRT_GENERAL
    objects: dict[tuple[int, ...], Any] = {
        g + (1, DEVICE): v2c.Counter32(0),                     # prtGeneralConfigChanges
        g + (2, DEVICE): v2c.Integer(1),                       # prtGeneralCurrentLocalization
        g + (3, DEVICE): v2c.Integer(3),                       # prtGeneralReset: notResetting(3)
        g + (6, DEVICE): v2c.Integer(1),                       # prtInputDefaultIndex
        g + (7, DEVICE): v2c.Integer(1),                       # prtOutputDefaultIndex
        g + (8, DEVICE): v2c.Integer(1),                       # prtMarkerDefaultIndex
        g + (9, DEVICE): v2c.Integer(1),                       # prtMediaPathDefaultIndex
        PRT_GENERAL_PRINTER_NAME: _octets(ident.get('printer_name') or model),
        PRT_GENERAL_SERIAL_NUMBER: _octets(ident.get('serial_number') or ''),
        g + (18, DEVICE): v2c.Counter32(0),                    # prtAlertCriticalEvents
        g + (19, DEVICE): v2c.Counter32(0),                    # prtAlertAllEvents
    }
    for index, tray in enumerate(trays, 1):
        row = (DEVICE, index)
        objects.update({
            PRT_INPUT + (2,) + row: v2c.Integer(5 if tray.manual else 3),   # sheetFeedManual / AutoRemovableTray
            PRT_INPUT + (3,) + row: v2c.Integer(4),                         # micrometers
            PRT_INPUT + (4,) + row: v2c.Integer(A4_MICROMETERS[0]),
            PRT_INPUT + (5,) + row: v2c.Integer(A4_MICROMETERS[1]),
            PRT_INPUT + (8,) + row: v2c.Integer(8),                         # sheets
            PRT_INPUT + (9,) + row: v2c.Integer(tray.capacity),
            PRT_INPUT + (10,) + row: v2c.Integer(-3),                       # at least one sheet
            PRT_INPUT + (11,) + row: v2c.Integer(0),                        # available and idle
            PRT_INPUT + (12,) + row: _octets('A4'),
            PRT_INPUT + (13,) + row: _octets(tray.name),
            PRT_INPUT + (18,) + row: _octets(tray.name),
            PRT_INPUT + (21,) + row: _octets('stationery'),
            PRT_INPUT + (22,) + row: _octets('white'),
        })
    marker = (DEVICE, 1)
    objects.update({
        PRT_MARKER + (2,) + marker: v2c.Integer(4),              # electrophotographicLaser
        PRT_MARKER + (3,) + marker: v2c.Integer(7),              # impressions
        PRT_MARKER_LIFE_COUNT: v2c.Counter32(page_count),
        PRT_MARKER + (5,) + marker: v2c.Counter32(0),            # prtMarkerPowerOnCount
        PRT_MARKER + (6,) + marker: v2c.Integer(len(toners)),    # prtMarkerProcessColorants
        PRT_MARKER + (7,) + marker: v2c.Integer(0),
        PRT_MARKER + (8,) + marker: v2c.Integer(3),              # tenThousandthsOfInches
        PRT_MARKER + (9,) + marker: v2c.Integer(600),
        PRT_MARKER + (10,) + marker: v2c.Integer(600),
        PRT_MARKER + (15,) + marker: v2c.Integer(0),
    })
    for index, toner in enumerate(toners, 1):
        row = (DEVICE, index)
        objects.update({
            PRT_SUPPLIES + (2,) + row: v2c.Integer(1),           # prtMarkerSuppliesMarkerIndex
            PRT_SUPPLIES + (3,) + row: v2c.Integer(index),       # prtMarkerSuppliesColorantIndex
            PRT_SUPPLIES + (4,) + row: v2c.Integer(3),           # supplyThatIsConsumed
            PRT_SUPPLIES + (5,) + row: v2c.Integer(5 if toner.kind == 'ink' else 3),   # ink(5) / toner(3)
            PRT_SUPPLIES + (6,) + row: _octets(toner.description),
            PRT_SUPPLIES + (7,) + row: v2c.Integer(SUPPLY_UNITS[toner.unit]),
            PRT_SUPPLIES + (8,) + row: v2c.Integer(toner.capacity),
            PRT_SUPPLIES + (9,) + row: v2c.Integer(toner.level),
            PRT_COLORANT + (2,) + row: v2c.Integer(1),           # prtMarkerColorantMarkerIndex
            PRT_COLORANT + (3,) + row: v2c.Integer(3),           # process
            PRT_COLORANT + (4,) + row: _octets(toner.colour),
            PRT_COLORANT + (5,) + row: v2c.Integer(256),         # tonality levels
        })
    return objects


_SNMP_VALUE_TYPES = {
    'integer': v2c.Integer, 'timeticks': v2c.TimeTicks, 'counter32': v2c.Counter32,
    'gauge32': v2c.Gauge32, 'counter64': v2c.Counter64,
}


def imported_value(kind: str, value: Any):
    """A persona ``snmp_objects`` value (already validated) as the pysnmp value it stands for."""
    if kind in _SNMP_VALUE_TYPES:
        return _SNMP_VALUE_TYPES[kind](value)
    if kind == 'string':
        return v2c.OctetString(value.encode('utf-8'))
    if kind == 'hex':
        return v2c.OctetString(bytes.fromhex(value))
    if kind == 'opaque':
        return v2c.Opaque(bytes.fromhex(value))
    if kind == 'oid':
        return v2c.ObjectIdentifier(parse_oid(value))
    return v2c.IpAddress(value)   # ipaddress


def imported_objects(persona: Persona) -> dict[tuple[int, ...], Any]:
    """The persona's ``snmp_objects`` (a capture of a real device), sysUpTime excepted."""
    from emulator.persona_import import snmp_objects

    return {parse_oid(oid): imported_value(entry['type'], entry['value'])
            for oid, entry in snmp_objects(persona.identity).items() if parse_oid(oid) != SYS_UPTIME}


def engine_id(sys_object_id: tuple[int, ...], host: str) -> bytes:
    """RFC 3411 snmpEngineID: the vendor's enterprise number, format 4 (text), the host name."""
    enterprise = sys_object_id[6] if sys_object_id[:6] == (1, 3, 6, 1, 4, 1) and len(sys_object_id) > 6 else 8072
    return (0x80000000 | enterprise).to_bytes(4, 'big') + b'\x04' + host.encode('utf-8', 'replace')[:27]


def persona_objects(persona: Persona, uptime: Callable[[], int]) -> dict[tuple[int, ...], Any]:
    """OID -> value (or zero-argument callable) served by the agent for ``persona``."""
    ident = persona.identity
    vendor = ident.get('vendor') or ''
    model = ident.get('make_model') or ''
    default_descr = ' '.join(part for part in (vendor, model) if part) or f'SafeQ lab device {persona.host}'
    sys_descr = str(ident.get('sys_descr') or default_descr)
    try:
        sys_object_id = parse_oid(ident.get('sys_object_id') or DEFAULT_SYS_OBJECT_ID)
    except ValueError:
        _log.warn('persona {host}: bad sys_object_id {oid!r}, using the default',
                  host=persona.host, oid=ident.get('sys_object_id'))
        sys_object_id = parse_oid(DEFAULT_SYS_OBJECT_ID)
    objects: dict[tuple[int, ...], Any] = {
        SYS_DESCR: v2c.OctetString(sys_descr.encode('utf-8')),
        SYS_OBJECT_ID: v2c.ObjectIdentifier(sys_object_id),
        SYS_UPTIME: lambda: v2c.TimeTicks(uptime()),
        SYS_CONTACT: v2c.OctetString(str(ident.get('sys_contact', 'SafeQ lab administrator')).encode()),
        SYS_NAME: v2c.OctetString(str(ident.get('sys_name') or persona.host).encode()),
        SYS_LOCATION: v2c.OctetString(str(ident.get('sys_location', 'SafeQ lab')).encode()),
        # physical(1) + application(64) + end-to-end(8): a host offering services.
        SYS_SERVICES: v2c.Integer(int(ident.get('sys_services', 72))),
        # SNMP-FRAMEWORK-MIB snmpEngine group, as every SNMPv3-capable agent serves it (and a walk
        # of the standard MIBs then ends at a subtree boundary, not at the end of the MIB).
        SNMP_ENGINE_ID: v2c.OctetString(engine_id(sys_object_id, persona.host)),
        SNMP_ENGINE_BOOTS: v2c.Integer(1),
        SNMP_ENGINE_TIME: lambda: v2c.Integer(uptime() // 100),
        SNMP_ENGINE_MAX_MESSAGE_SIZE: v2c.Integer(MAX_MESSAGE - 28),   # a UDP/IPv4 datagram's payload
    }
    if _is_printer(persona):
        objects.update({
            HR_DEVICE_INDEX: v2c.Integer(1),
            HR_DEVICE_TYPE: v2c.ObjectIdentifier(HR_DEVICE_PRINTER),
            HR_DEVICE_DESCR: v2c.OctetString((model or sys_descr).encode('utf-8')),
            HR_DEVICE_ID: v2c.ObjectIdentifier((0, 0)),
            HR_DEVICE_STATUS: v2c.Integer(_choice(HR_DEVICE_STATUSES, ident.get('device_status'), 'running')),
            HR_PRINTER_STATUS: v2c.Integer(_choice(HR_PRINTER_STATUSES, ident.get('printer_status'), 'idle')),
            HR_PRINTER_ERROR_STATE: v2c.OctetString(b'\x00'),   # no error bits set
        })
        objects.update(printer_mib_objects(persona, model or sys_descr))
    objects.update(imported_objects(persona))
    return objects


class PersonaMib(AbstractMibInstrumController):
    """A read-only MIB view over a fixed OID table, for pysnmp's command responders."""

    def __init__(self, objects: dict[tuple[int, ...], Any]) -> None:
        self._objects = dict(objects)
        self._order = sorted(self._objects)
        self._parents = {oid[:-1] for oid in self._order}

    def value(self, oid: tuple[int, ...]):
        value = self._objects[oid]
        return value() if callable(value) else value

    def read_variables(self, *varBinds, **context):
        result = []
        for name, _ in varBinds:
            oid = tuple(name)
            if oid in self._objects:
                result.append((name, self.value(oid)))
            elif oid[:-1] in self._parents:
                result.append((name, rfc1905.noSuchInstance))
            else:
                result.append((name, rfc1905.noSuchObject))
        return result

    def read_next_variables(self, *varBinds, **context):
        result = []
        for name, _ in varBinds:
            index = bisect.bisect_right(self._order, tuple(name))
            if index < len(self._order):
                oid = self._order[index]
                result.append((v2c.ObjectIdentifier(oid), self.value(oid)))
            else:
                result.append((name, rfc1905.endOfMibView))
        return result

    # write_variables: the inherited one raises NoSuchObjectError, which the
    # SET responder answers as notWritable: a read-only community.


# --- Twisted carrier for the pysnmp engine ----------------------------------------

class TwistedDispatcher(AbstractTransportDispatcher):
    """pysnmp transport dispatcher driven by a Twisted reactor (timer ticks only:
    the carriers below push received messages themselves)."""

    def __init__(self, reactor) -> None:
        super().__init__()
        self._reactor = reactor
        self._ticker: LoopingCall | None = None
        self.set_timer_resolution(TIMER_RESOLUTION)

    def register_transport(self, tDomain, transport) -> None:
        super().register_transport(tDomain, transport)
        if self._ticker is None:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self._reactor
            self._ticker.start(self.get_timer_resolution(), now=False)

    def _tick(self) -> None:
        try:
            self.handle_timer_tick(self._reactor.seconds())
        except Exception:
            _log.failure('SNMP engine timer tick failed')

    def run_dispatcher(self, timeout: float = 0.0) -> None:
        raise NotImplementedError('the Twisted reactor runs the dispatcher')

    def close_dispatcher(self) -> None:
        if self._ticker is not None:
            if self._ticker.running:
                self._ticker.stop()
            self._ticker = None
        super().close_dispatcher()


def _deliver(carrier: AbstractTransport, address, message: bytes) -> None:
    """Hand one received message to the engine; a bad message must not kill the stub."""
    callback = carrier._callback_function
    if callback is None:   # closed, or not yet registered
        return
    try:
        api.decodeMessageVersion(message)
    except Exception as exc:
        # Not BER, or no version field: not SNMP at all. One line, as a real agent counts it
        # in snmpInASNParseErrs; hostile input must not fill the log with tracebacks.
        _log.info('SNMP: {size} B from {peer} dropped, not an SNMP message ({why})',
                  size=len(message), peer=address[0], why=type(exc).__name__)
        return
    try:
        callback(carrier, address, message)
    except Exception as exc:
        # pysnmp drops most undecodable messages itself; some malformed ones make it raise
        # (pyasn1 errors, even TypeError deep in its decoder). A rejection, not a stub fault.
        _log.info('SNMP: {size} B from {peer} dropped, malformed message ({why}: {detail})',
                  size=len(message), peer=address[0], why=type(exc).__name__, detail=str(exc)[:120])


class UdpCarrier(DatagramProtocol, AbstractTransport):
    """SNMP over UDP (RFC 3417): one message per datagram."""

    PROTO_TRANSPORT_DISPATCHER = TwistedDispatcher
    ADDRESS_TYPE = UdpTransportAddress
    noisy = False

    def datagramReceived(self, datagram: bytes, addr) -> None:
        local = self.transport.getHost()
        address = UdpTransportAddress(addr[:2]).set_local_address((local.host, local.port))
        _deliver(self, address, datagram)

    def send_message(self, outgoingMessage, transportAddress) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(bytes(outgoingMessage), (transportAddress[0], transportAddress[1]))
        except OSError as exc:
            _log.warn('SNMP reply to {peer} not sent: {exc}', peer=transportAddress[0], exc=exc)

    def connectionRefused(self) -> None:
        pass  # ICMP backscatter from a manager that has gone: keep serving


class _StreamServer(Protocol, TimeoutMixin):
    """One manager connection: BER messages back to back (RFC 3430)."""

    def __init__(self, carrier: TcpCarrier) -> None:
        self.carrier = carrier
        self.buffer = b''
        self.key: tuple[str, int] | None = None
        self.closing = False

    def callLater(self, period, func):  # TimeoutMixin's timer on the injected reactor, not the global one
        return self.carrier.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.key = (peer.host, peer.port)
        self.carrier.connections[self.key] = self
        self.setTimeout(IDLE_TIMEOUT)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        self.buffer += data
        while self.buffer and not self.closing:
            try:
                length = ber_message_length(self.buffer)
            except FramingError as exc:
                _log.info('SNMP/TCP from {peer}: {exc}; closing', peer=self.key[0], exc=exc)
                self.closing = True
                self.transport.loseConnection()
                return
            if length is None or len(self.buffer) < length:
                return
            message, self.buffer = self.buffer[:length], self.buffer[length:]
            local = self.transport.getHost()
            _deliver(self.carrier,
                     TcpTransportAddress(self.key).set_local_address((local.host, local.port)),
                     message)

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.setTimeout(None)
        if self.carrier.connections.get(self.key) is self:
            del self.carrier.connections[self.key]


class TcpCarrier(Factory, AbstractTransport):
    """SNMP over TCP (RFC 3430): replies go back on the request's connection."""

    PROTO_TRANSPORT_DISPATCHER = TwistedDispatcher
    ADDRESS_TYPE = TcpTransportAddress
    noisy = False

    def __init__(self, reactor) -> None:
        self.reactor = reactor   # the idle timers' clock
        self.connections: dict[tuple[str, int], _StreamServer] = {}

    def buildProtocol(self, addr) -> _StreamServer:
        return _StreamServer(self)

    def send_message(self, outgoingMessage, transportAddress) -> None:
        connection = self.connections.get((transportAddress[0], transportAddress[1]))
        if connection is not None and not connection.closing:
            connection.transport.write(bytes(outgoingMessage))

    def abort_all(self) -> None:
        for connection in list(self.connections.values()):
            connection.transport.abortConnection()


# --- stub ---------------------------------------------------------------------------

_REQUEST_OPS = {
    v2c.GetRequestPDU.tagSet: 'get',
    v2c.GetNextRequestPDU.tagSet: 'getnext',
    v2c.GetBulkRequestPDU.tagSet: 'getbulk',
    v2c.SetRequestPDU.tagSet: 'set',
}
_NOTIFICATION_PDUS = {
    v2c.SNMPv2TrapPDU.tagSet: 'trap',
    v2c.InformRequestPDU.tagSet: 'inform',
    v1.TrapPDU.tagSet: 'v1-trap',
}


def _trap_oid(pdu) -> str:
    if pdu.tagSet == v1.TrapPDU.tagSet:
        pdu = rfc2576.v1_to_v2(pdu)
    for name, value in v2c.apiPDU.get_varbinds(pdu):
        if tuple(name) == SNMP_TRAP_OID:
            return oid_text(value)
    return ''


def _request_record(transport: str, port: int, variables: dict[str, Any]) -> dict[str, Any] | None:
    pdu = variables['pdu']
    record: dict[str, Any] = {'transport': transport, 'port': port,
                              'peer': str(variables['transportAddress'][0])}
    if pdu.tagSet in _REQUEST_OPS:
        record['op'] = _REQUEST_OPS[pdu.tagSet]
        record['oids'] = [oid_text(name) for name, _ in v2c.apiPDU.get_varbinds(pdu)]
    elif pdu.tagSet in _NOTIFICATION_PDUS:
        record['op'] = 'trap'
        record['pdu'] = _NOTIFICATION_PDUS[pdu.tagSet]
        record['trap_oid'] = _trap_oid(pdu)
    else:
        return None
    record['version'] = 'v1' if variables.get('messageProcessingModel') == 0 else 'v2c'
    return record


class SnmpService:
    """What ``listen`` returns: the bound port plus the engine behind it."""

    def __init__(self, port, engine: SnmpEngine, carrier: AbstractTransport) -> None:
        self.port = port
        self.engine = engine
        self.carrier = carrier
        self._stopped: Deferred | None = None

    def getHost(self):
        return self.port.getHost()

    def stopListening(self) -> Deferred:
        if self._stopped is None:
            try:
                self.engine.close_dispatcher()
            except Exception:
                _log.failure('closing the SNMP engine failed')
            if isinstance(self.carrier, TcpCarrier):
                self.carrier.abort_all()
            self._stopped = maybeDeferred(self.port.stopListening)
        return self._stopped


class _MibsCompiledOnce:
    """pysnmp compiles each MIB module from its source for every engine it builds, twice unless
    Python runs with -O (its source read, then ``runpy.run_path``): 80 % of an engine's ~70 ms.
    This keeps each module's code object, compiled once per process, for both. No pysnmp API
    takes compiled MIBs, so its reader and its ``runpy`` are replaced (and left alone if absent)."""

    def __init__(self) -> None:
        self.code: dict[str, Any] = {}   # a module's full path -> its code object

    def install(self) -> bool:
        from pysnmp.smi import builder
        source = getattr(builder, '__AbstractMibSource', None)
        if source is None or not hasattr(source, 'read') or not hasattr(builder, 'runpy'):
            return False
        if getattr(source.read, 'compiled_once', False):
            return True
        read = source.read

        def read_once(mib_source, name):
            for suffix in builder.SOURCE_SUFFIXES:
                code = self.code.get(mib_source.full_path(name, suffix))
                if code is not None:
                    return code, suffix
            code, suffix = read(mib_source, name)
            return self.code.setdefault(mib_source.full_path(name, suffix), code), suffix

        read_once.compiled_once = True
        source.read = read_once
        builder.runpy = self
        return True

    def run_path(self, path: str, init_globals: dict | None = None, run_name: str | None = None) -> dict:
        # runpy.run_path's contract, for what pysnmp passes: a fresh namespace seeded by init_globals
        code = self.code.get(path)
        if code is None:
            with open(path, 'rb') as source:
                code = self.code.setdefault(path, compile(source.read(), path, 'exec'))
        namespace = {**(init_globals or {}), '__name__': run_name or '<run_path>', '__file__': path}
        exec(code, namespace)  # noqa: S102 - pysnmp's own MIB modules, as runpy would run them
        return namespace


_mibs = _MibsCompiledOnce()
_mibs.install()


# Engines built before the zygote forks: each daemon takes its own copy of one instead of spending
# ~12 ms executing pysnmp's MIB modules again. A host serves at most agent + trap receiver (`warm`);
# a daemon serves up to 32 hosts, whose engines the zygote builds while it waits (`prepare_more`).
SPARE_ENGINES = 2
MAX_SPARE_ENGINES = 64
_spare_engines: list[SnmpEngine] = []


def warm() -> None:
    while len(_spare_engines) < SPARE_ENGINES:
        _spare_engines.append(SnmpEngine())


def prepare_more() -> bool:
    if len(_spare_engines) >= MAX_SPARE_ENGINES:
        return False
    _spare_engines.append(SnmpEngine())
    return True


def _build_engine(reactor, carrier: AbstractTransport, domain, community: str) -> SnmpEngine:
    engine = _spare_engines.pop() if _spare_engines else SnmpEngine()
    engine.register_transport_dispatcher(TwistedDispatcher(reactor))
    config.add_transport(engine, domain, carrier)
    # Community -> security name; the same community serves SNMPv1 and v2c.
    config.add_v1_system(engine, 'safeq-lab', community)
    return engine


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '') -> SnmpService:
    """Serve the SNMP agent (``snmp``) or notification receiver (``snmp-trap``).

    Bind errors (CannotListenError) propagate. SNMPv2c has no TLS form:
    ``listener.security`` is ignored.
    """
    if listener.protocol not in PROTOCOL_IDS:
        raise ValueError(f'snmp cannot serve protocol {listener.protocol!r}')
    if listener.transport == 'udp':
        carrier: AbstractTransport = UdpCarrier()
        port = listen_udp(reactor, listener.port, carrier, interface=interface,
                          max_packet=MAX_MESSAGE)
        domain = SNMP_UDP_DOMAIN
    elif listener.transport == 'tcp':
        carrier = TcpCarrier(reactor)
        port = reactor.listenTCP(listener.port, carrier, backlog=LISTEN_BACKLOG, interface=interface)
        domain = SNMP_TCP_DOMAIN
    else:
        raise ValueError(f'snmp cannot listen on {listener.transport!r}')
    try:
        community = str(persona.identity.get('snmp_community') or DEFAULT_COMMUNITY)
        engine = _build_engine(reactor, carrier, domain, community)
        bound = port.getHost().port
        if listener.protocol == 'snmp':
            started = reactor.seconds()
            mib = PersonaMib(persona_objects(
                persona, lambda: int((reactor.seconds() - started) * 100) % (1 << 32)))
            snmp_context = SnmpContext(engine)
            snmp_context.unregister_context_name(b'')
            snmp_context.register_context_name(b'', mib)
            for responder in (cmdrsp.GetCommandResponder, cmdrsp.NextCommandResponder,
                              cmdrsp.BulkCommandResponder, cmdrsp.SetCommandResponder):
                responder(engine, snmp_context)
        else:
            ntfrcv.NotificationReceiver(engine, lambda *args: None)

        def observed(snmp_engine, execpoint, variables, cb_ctx) -> None:
            # Runs once a message passed the community check and has a
            # handler: exactly the valid requests.
            if on_request is None:
                return
            try:
                record = _request_record(listener.transport, bound, variables)
                if record is not None:
                    on_request(record)
            except Exception:
                _log.failure('SNMP on_request callback failed')

        engine.observer.register_observer(observed, 'rfc3412.receiveMessage:request')
    except Exception:
        port.stopListening()
        raise
    return SnmpService(port, engine, carrier)


# --- client probe ---------------------------------------------------------------

_MISSING = (rfc1905.NoSuchObject, rfc1905.NoSuchInstance, rfc1905.EndOfMibView)


def _show(value) -> str:
    """A var-bind value for a report line."""
    if isinstance(value, _MISSING):
        return value.__class__.__name__[0].lower() + value.__class__.__name__[1:]
    if isinstance(value, univ.OctetString):
        text = value.asOctets().decode('utf-8', 'replace')
        text = ' '.join(text.split())
        return '"' + (text if len(text) <= 80 else text[:77] + '...') + '"'
    if isinstance(value, univ.ObjectIdentifier):
        return oid_text(value)
    return value.prettyPrint()


@dataclass
class SnmpRequest:
    """One encoded request and how to judge its Response's var-binds."""

    label: str                     # e.g. 'GET sysDescr.0 sysObjectID.0'
    message: bytes
    request_id: int
    community: bytes
    judge: Callable[[list], tuple[str, str]]   # var-binds -> (outcome, detail)


def _encode(pdu, community: bytes) -> bytes:
    message = v2c.Message()
    v2c.apiMessage.set_defaults(message)
    v2c.apiMessage.set_community(message, community)
    v2c.apiMessage.set_pdu(message, pdu)
    return encoder.encode(message)


def _judge_get(oids: list[tuple[int, ...]]) -> Callable[[list], tuple[str, str]]:
    def judge(var_binds: list) -> tuple[str, str]:
        got = {tuple(name): value for name, value in var_binds}
        missing = [oid_name(oid) for oid in oids if oid not in got]
        if missing:
            return 'protocol_error', f'Response lacks {", ".join(missing)}'
        if SYS_DESCR in got and isinstance(got[SYS_DESCR], _MISSING):
            return 'protocol_error', f'agent has no sysDescr.0 ({_show(got[SYS_DESCR])})'
        parts = []
        for oid in oids:
            value = got[oid]
            if oid == HR_PRINTER_STATUS:
                if isinstance(value, _MISSING):
                    parts.append('no Printer-MIB')
                    continue
                status = int(value) if isinstance(value, univ.Integer) else None
                parts.append(f'hrPrinterStatus {_PRINTER_STATUS_NAMES.get(status, "?")}({status})')
                continue
            parts.append(f'{oid_name(oid)} {_show(value)}')
        return 'ok', ', '.join(parts)
    return judge


def get_request(community: str, oids: list[tuple[int, ...]]) -> SnmpRequest:
    pdu = v2c.GetRequestPDU()
    v2c.apiPDU.set_defaults(pdu)
    v2c.apiPDU.set_varbinds(pdu, [(oid, v2c.null) for oid in oids])
    return SnmpRequest(label='GET ' + ' '.join(oid_name(oid) for oid in oids),
                       message=_encode(pdu, community.encode()),
                       request_id=int(v2c.apiPDU.get_request_id(pdu)),
                       community=community.encode(), judge=_judge_get(oids))


def inform_request(community: str, trap_oid: tuple[int, ...], state: str) -> SnmpRequest:
    pdu = v2c.InformRequestPDU()
    v2c.apiPDU.set_defaults(pdu)
    var_binds = [
        # Monotonic time is the host's time since boot: what sysUpTime means.
        (SYS_UPTIME, v2c.TimeTicks(int(time.monotonic() * 100) % (1 << 32))),
        (SNMP_TRAP_OID, v2c.ObjectIdentifier(trap_oid)),
    ]
    if trap_oid == LAB_STATE_CHANGE:
        var_binds.append((LAB_STATE, v2c.OctetString(state.encode())))
    v2c.apiPDU.set_varbinds(pdu, var_binds)

    def judge(reply: list) -> tuple[str, str]:
        # RFC 3416 4.2.7: the Response repeats the InformRequest's var-binds.
        return 'ok', f'inform acknowledged ({len(reply)} var-binds echoed)'

    return SnmpRequest(label=f'INFORM {oid_name(trap_oid)}',
                       message=_encode(pdu, community.encode()),
                       request_id=int(v2c.apiPDU.get_request_id(pdu)),
                       community=community.encode(), judge=judge)


def build_request(target: ProbeTarget) -> SnmpRequest:
    options = target.options
    community = str(options.get('community', DEFAULT_COMMUNITY))
    if target.protocol == 'snmp-trap':
        trap_oid = parse_oid(options.get('trap_oid', LAB_STATE_CHANGE))
        return inform_request(community, trap_oid, str(options.get('state', 'connected')))
    oids = options.get('oids') or [SYS_DESCR, SYS_OBJECT_ID, HR_PRINTER_STATUS]
    return get_request(community, [parse_oid(oid) for oid in oids])


def judge_reply(request: SnmpRequest, data: bytes) -> tuple[str, str] | None:
    """(outcome, detail) for a reply datagram/message, None if it is not ours."""
    try:
        version = int(api.decodeMessageVersion(data))
    except Exception:
        return 'protocol_error', f'reply is not an SNMP message ({len(data)} B)'
    if version != api.SNMP_VERSION_2C:
        return 'protocol_error', f'reply is an SNMP version {version + 1} message, not v2c'
    try:
        message, _rest = decoder.decode(data, asn1Spec=v2c.Message())
        pdu = v2c.apiMessage.get_pdu(message)
        community = v2c.apiMessage.get_community(message).asOctets()
        request_id = int(v2c.apiPDU.get_request_id(pdu))
    except Exception as exc:
        return 'protocol_error', f'undecodable SNMPv2c reply: {type(exc).__name__}'
    if pdu.tagSet != v2c.ResponsePDU.tagSet:
        return 'protocol_error', f'reply is a {pdu.__class__.__name__}, not a Response'
    if request_id != request.request_id:
        return None   # a late answer to someone else's request
    if community != request.community:
        return 'protocol_error', 'Response carries another community than the request'
    status = v2c.apiPDU.get_error_status(pdu)
    if int(status):
        index = int(v2c.apiPDU.get_error_index(pdu, muteErrors=True))
        return 'protocol_error', f'Response errorStatus {status.prettyPrint()}({int(status)}) at index {index}'
    try:
        var_binds = v2c.apiPDU.get_varbinds(pdu)
    except Exception as exc:
        return 'protocol_error', f'undecodable var-binds: {type(exc).__name__}'
    return request.judge(var_binds)


class _Exchange(Verdict):
    """One request/response; subclasses add the transport.

    ``done`` fires once the verdict is known and the socket is closed.
    """

    def __init__(self, reactor, target: ProbeTarget, request: SnmpRequest) -> None:
        super().__init__(reactor, target)
        self.request = request

    @property
    def exchange(self) -> str:
        transport = 'UDP' if self.target.transport == 'udp' else 'TCP (RFC 3430)'
        text = f'SNMPv2c/{transport} {self.request.label}'
        if self.target.protocol == 'snmp-trap':
            text += ' (a trap is unacknowledged: sent as an inform)'
        return text

    def start(self) -> Deferred[ProbeResult]:
        return self.launch(self._begin)

    def received(self, data: bytes) -> None:
        verdict = judge_reply(self.request, data)
        if verdict is None:
            return
        outcome, detail = verdict
        self.decide(outcome, detail, replied=True)

    def decide(self, outcome: str, detail: str = '', replied: bool = False) -> bool:
        exchange = self.exchange
        if replied:
            exchange += ' -> Response'
        if self.target.security != 'plain':
            exchange += f' ({self.target.security} not applicable: SNMPv2c is plaintext)'
        return self.settle(outcome, detail, exchange)

    def _begin(self) -> None:
        raise NotImplementedError


class _UdpExchange(_Exchange, DatagramVerdict):
    """GET/INFORM over UDP, retransmitted like net-snmp's ``-r`` retries (``DatagramVerdict``
    resends every timeout / (retries + 1) seconds; option ``retries``, default ``UDP_RETRIES``)
    with the same request-id, so one lost datagram is not read as a firewall drop."""

    awaited = 'Response'

    def _begin(self) -> None:
        # maxPacketSize: the largest SNMP message is also the largest datagram.
        self.send(self.request.message, MAX_MESSAGE)

    def datagram(self, data: bytes) -> None:
        self.received(data)

    def _timeout_detail(self) -> str:
        return (f'no Response within {self.target.timeout:g} s (an agent stays silent on a wrong '
                f'community; or the datagram was dropped, no ICMP seen)')


class _StreamClient(Protocol):
    def __init__(self, exchange: _TcpExchange) -> None:
        self.exchange = exchange
        self.buffer = b''

    def connectionMade(self) -> None:
        if self.exchange.connected(self):
            self.transport.write(self.exchange.request.message)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer and self.exchange.result is None:
            try:
                length = ber_message_length(self.buffer)
            except FramingError as exc:
                self.exchange.decide('protocol_error', f'reply stream is not SNMP: {exc}')
                return
            if length is None or len(self.buffer) < length:
                return
            message, self.buffer = self.buffer[:length], self.buffer[length:]
            self.exchange.received(message)

    def connectionLost(self, reason) -> None:
        self.exchange.lost(reason)


class _TcpExchange(_Exchange, StreamVerdict):

    def _begin(self) -> None:
        self._connector = self.reactor.connectTCP(
            self.target.host, self.target.port, ProbeClientFactory(self, partial(_StreamClient, self)),
            timeout=connect_timeout(self.target))

    def lost(self, reason) -> None:
        self._open = False
        self.decide('protocol_error', f'connection closed before a Response: {reason.getErrorMessage()}')
        self.fire()

    def _timeout_detail(self) -> str:
        if self._made:
            return (f'connected, but no Response within {self.target.timeout:g} s '
                    f'(an agent stays silent on a wrong community)')
        return no_connection_detail(self.target)


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """One SNMPv2c GET (``snmp``) or INFORM (``snmp-trap``); always fires with a ProbeResult."""
    try:
        request = build_request(target)
        if target.transport == 'udp':
            return _UdpExchange(reactor, target, request).start()
        if target.transport == 'tcp':
            return _TcpExchange(reactor, target, request).start()
    except Exception as exc:
        return crashed(target, f'SNMPv2c/{target.transport}', exc)
    return error_result(target, f'SNMPv2c/{target.transport}',
                        f'SNMP runs over udp/tcp, not {target.transport}')
