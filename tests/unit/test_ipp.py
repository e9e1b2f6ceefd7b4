"""ipp: codec (golden bytes both ways, round-trip properties, malformed input),
the printer's operation logic on a MemoryReactorClock, and the twisted.web
stub against the probe on 127.0.0.1 (fresh reactor per test; IPPS against a
real ``python -m emulator.roled`` because the server-side TLS wrapper of
listenSSL schedules on the global reactor)."""

from __future__ import annotations

import datetime
import struct
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from emulator.protocols import payloads
from emulator import pki
from emulator.protocols import http, ipp
from emulator.protocols.base import Listener, Persona, ProbeTarget
from emulator.protocols.ipp import (BEG_COLLECTION, BOOLEAN, CHARSET, DATE_TIME, ENUM, INTEGER, JOB,
                                    KEYWORD, LANGUAGE, MIME, NAME, NAME_LANG, NO_VALUE, OCTET_STRING,
                                    OPERATION, PRINTER, RANGE, RESOLUTION, TEXT, TEXT_LANG, UNKNOWN,
                                    UNSUPPORTED, URI, Attribute, Context, Group, IppError, LangString,
                                    Message, Range, Resolution)
from tests import support
from tests.support import free_port, request_log, run_stub

PERSONA = Persona(host='mfd-km', roles=('mfd',),
                  identity={'vendor': 'Konica Minolta', 'make_model': 'KONICA MINOLTA bizhub C300i'})


# --- helpers ------------------------------------------------------------------

def attr(name: str, tag: int, *values) -> Attribute:
    return Attribute(name, tag, list(values))


def field(tag: int, name: bytes, value: bytes) -> bytes:
    """One attribute-with-one-value (or additional value when name is b'') per RFC 8010 3.1.4."""
    return bytes([tag]) + struct.pack('>H', len(name)) + name + struct.pack('>H', len(value)) + value


HEADER_CHARSET = field(0x47, b'attributes-charset', b'utf-8') + field(0x48, b'attributes-natural-language', b'en')


def operation_attrs(*more: Attribute) -> Group:
    return Group(OPERATION, [attr('attributes-charset', CHARSET, 'utf-8'),
                             attr('attributes-natural-language', LANGUAGE, 'en'), *more])


# An IPP exchange is two requests on loopback: a hang fails after 8 s.
run_on_fresh_reactor = partial(support.run_on_fresh_reactor, limit=8.0)


def leftovers(reactor) -> list:
    """Sockets and timers still registered (the waker is the reactor's own)."""
    readers = [r for r in reactor.getReaders() if r is not getattr(reactor, 'waker', None)]
    timers = [c for c in reactor.getDelayedCalls() if c.active() and c.func != reactor.stop]  # not the watchdog
    return readers + reactor.getWriters() + timers


def target(port: int, **overrides) -> ProbeTarget:
    fields = dict(id='t1', host='127.0.0.1', transport='tcp', protocol='ipp', port=port,
                  timeout=3.0, size=1024)
    fields.update(overrides)
    return ProbeTarget(**fields)


# --- codec: golden bytes both ways -------------------------------------------

GOLDEN = [
    ('minimal Get-Printer-Attributes request',
     Message(0x000B, 1, [operation_attrs()]),
     b'\x02\x00\x00\x0b\x00\x00\x00\x01\x01' + HEADER_CHARSET + b'\x03'),
    ('1setOf keyword, uri, name; IPP/1.1',
     Message(0x000B, 0x01020304, [operation_attrs(
         attr('printer-uri', URI, 'ipp://p/ipp/print'),
         attr('requesting-user-name', NAME, 'bob'),
         attr('requested-attributes', KEYWORD, 'printer-name', 'printer-state'))], version=(1, 1)),
     b'\x01\x01\x00\x0b\x01\x02\x03\x04\x01' + HEADER_CHARSET
     + field(0x45, b'printer-uri', b'ipp://p/ipp/print')
     + field(0x42, b'requesting-user-name', b'bob')
     + field(0x44, b'requested-attributes', b'printer-name')
     + field(0x44, b'', b'printer-state') + b'\x03'),
    ('response: integer, enum, boolean, range, resolution, text, mime, no-value',
     Message(0x0000, 7, [operation_attrs(), Group(PRINTER, [
         attr('queued-job-count', INTEGER, -2),
         attr('printer-state', ENUM, 3),
         attr('printer-is-accepting-jobs', BOOLEAN, True, False),
         attr('copies-supported', RANGE, Range(1, 999)),
         attr('printer-resolution-default', RESOLUTION, Resolution(600, 1200, 3)),
         attr('printer-info', TEXT, 'Büro 2'),
         attr('document-format-supported', MIME, 'application/pdf'),
         attr('printer-location', NO_VALUE, None)])]),
     b'\x02\x00\x00\x00\x00\x00\x00\x07\x01' + HEADER_CHARSET + b'\x04'
     + field(0x21, b'queued-job-count', b'\xff\xff\xff\xfe')
     + field(0x23, b'printer-state', b'\x00\x00\x00\x03')
     + field(0x22, b'printer-is-accepting-jobs', b'\x01') + field(0x22, b'', b'\x00')
     + field(0x33, b'copies-supported', b'\x00\x00\x00\x01\x00\x00\x03\xe7')
     + field(0x32, b'printer-resolution-default', b'\x00\x00\x02\x58\x00\x00\x04\xb0\x03')
     + field(0x41, b'printer-info', 'Büro 2'.encode())
     + field(0x49, b'document-format-supported', b'application/pdf')
     + field(0x13, b'printer-location', b'') + b'\x03'),
    ('textWithLanguage, dateTime, octetString, mixed keyword|name 1setOf',
     Message(0x0000, 2, [Group(JOB, [
         attr('job-state-message', TEXT_LANG, LangString('de', 'Fertig')),
         attr('date-time-at-creation', DATE_TIME, datetime.datetime(
             2024, 5, 6, 7, 8, 9, 500000,
             tzinfo=datetime.timezone(datetime.timedelta(hours=-1, minutes=-30)))),
         attr('x-opaque', OCTET_STRING, b'\x00\xff'),
         Attribute('job-sheets', KEYWORD, ['none', 'Firm'], tags=[KEYWORD, NAME])])]),
     b'\x02\x00\x00\x00\x00\x00\x00\x02\x02'
     + field(0x35, b'job-state-message', b'\x00\x02de\x00\x06Fertig')
     + field(0x31, b'date-time-at-creation', b'\x07\xe8\x05\x06\x07\x08\x09\x05-\x01\x1e')
     + field(0x30, b'x-opaque', b'\x00\xff')
     + field(0x44, b'job-sheets', b'none') + field(0x42, b'', b'Firm') + b'\x03'),
    ('collection media-col {media-size {x-dimension}, media-type} and document data',
     Message(0x0002, 9, [Group(JOB, [
         attr('media-col', BEG_COLLECTION, ipp.collection(
             media_size=(BEG_COLLECTION, ipp.collection(x_dimension=(INTEGER, 21000))),
             media_type=(KEYWORD, 'stationery')))])], data=b'%PDF-1.4\n'),
     b'\x02\x00\x00\x02\x00\x00\x00\x09\x02'
     + field(0x34, b'media-col', b'')
     + field(0x4A, b'', b'media-size') + field(0x34, b'', b'')
     + field(0x4A, b'', b'x-dimension') + field(0x21, b'', b'\x00\x00\x52\x08')
     + field(0x37, b'', b'')
     + field(0x4A, b'', b'media-type') + field(0x44, b'', b'stationery')
     + field(0x37, b'', b'') + b'\x03%PDF-1.4\n'),
]


@pytest.mark.parametrize('message, wire', [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_encode(message, wire):
    assert ipp.encode(message) == wire


@pytest.mark.parametrize('message, wire', [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_decode(message, wire):
    assert ipp.decode(wire) == message


def test_decode_attributes_reports_where_the_document_starts():
    wire = GOLDEN[-1][2]
    message, offset = ipp.decode_attributes(wire)
    assert wire[offset:] == b'%PDF-1.4\n' and message.data == b''


def test_message_helpers():
    message = ipp.decode(GOLDEN[1][2])
    assert message.value('requested-attributes', OPERATION) == 'printer-name'
    assert message.get('requested-attributes').values == ['printer-name', 'printer-state']
    assert message.value('printer-uri', PRINTER) is None
    assert message.value('nope', default=5) == 5


# --- codec: malformed input ---------------------------------------------------

HDR = b'\x02\x00\x00\x0b\x00\x00\x00\x01'
MALFORMED = [
    (b'', 'shorter than'),
    (HDR, 'shorter than'),
    (HDR + b'\x01' + HEADER_CHARSET, 'end-of-attributes-tag missing'),
    (HDR + field(0x47, b'attributes-charset', b'utf-8') + b'\x03', 'before any group'),
    (HDR + b'\x01' + field(0x44, b'', b'x') + b'\x03', 'additional value without an attribute'),
    (HDR + b'\x01\x47\x00\x20attr', 'truncated'),
    (HDR + b'\x01' + field(0x47, b'attributes-charset', b'utf-8')[:-3], 'truncated'),
    (HDR + b'\x01' + field(0x21, b'copies', b'\x00\x01') + b'\x03', 'needs 4 octets'),
    (HDR + b'\x01' + field(0x22, b'flag', b'\x02') + b'\x03', 'boolean must be 0 or 1'),
    (HDR + b'\x01' + field(0x33, b'r', b'\x00' * 7) + b'\x03', 'needs 8 octets'),
    (HDR + b'\x01' + field(0x32, b'r', b'\x00' * 8) + b'\x03', 'needs 9 octets'),
    (HDR + b'\x01' + field(0x31, b'd', b'\x07\xe8\x0d\x01\x00\x00\x00\x00+\x00\x00') + b'\x03', 'out of range'),
    (HDR + b'\x01' + field(0x31, b'd', b'\x07\xe8\x01\x01\x00\x00\x00\x00*\x00\x00') + b'\x03', 'time zone'),
    (HDR + b'\x01' + field(0x41, b'info', b'\xff\xfe') + b'\x03', 'bad text encoding'),
    (HDR + b'\x01' + field(0x35, b'info', b'\x00\x09en') + b'\x03', 'truncated'),
    (HDR + b'\x01' + field(0x41, b'\xc3\xa9', b'x') + b'\x03', 'not ASCII'),
    (HDR + b'\x00' + b'\x03', 'reserved delimiter'),
    (HDR + b'\x01' + field(0x7F, b'x', b'\x40\x00\x00\x01') + b'\x03', 'extension'),
    (HDR + b'\x01' + field(0x4A, b'', b'x') + b'\x03', 'outside a collection'),
    (HDR + b'\x01' + field(0x37, b'', b'') + b'\x03', 'outside a collection'),
    (HDR + b'\x01' + field(0x34, b'c', b'') + field(0x4A, b'', b'm') + field(0x21, b'', b'\0\0\0\1') + b'\x03',
     'not closed'),
    (HDR + b'\x01' + field(0x34, b'c', b'') + field(0x21, b'', b'\0\0\0\1') + b'\x03',
     'before any memberAttrName'),
    (HDR + b'\x01' + field(0x34, b'c', b'') + field(0x4A, b'', b'm') + field(0x21, b'named', b'\0\0\0\1'),
     'carries a name'),
    (HDR + b'\x01' + field(0x34, b'c', b'') + (field(0x4A, b'', b'm') + field(0x34, b'', b'')) * 20,
     'nested deeper'),
]


@pytest.mark.parametrize('wire, message', MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_messages_raise_ipp_error(wire, message):
    with pytest.raises(IppError, match=message):
        ipp.decode(wire)


@pytest.mark.parametrize('attribute, message', [
    (attr('n', INTEGER, 1 << 31), 'signed 32-bit'),
    (attr('n', INTEGER, True), 'needs an int'),
    (attr('n', BOOLEAN, 1), 'needs a bool'),
    (attr('n', KEYWORD, 'café'), 'ascii'),
    (attr('n', TEXT, 3), 'needs a str'),
    (attr('n', TEXT, 'x' * 70000), 'longer than 65535'),
    (attr('n', RESOLUTION, Resolution(1, 1, 9)), 'units'),
    (attr('n', DATE_TIME, datetime.datetime(2024, 1, 1)), 'aware datetime'),
    (attr('n', KEYWORD), 'has no value'),
    (attr('', KEYWORD, 'x'), 'without a name'),
])
def test_unencodable_values_raise_ipp_error(attribute, message):
    with pytest.raises(IppError, match=message):
        ipp.encode(Message(0, 1, [Group(PRINTER, [attribute])]))


# --- codec: properties (hypothesis) ---------------------------------------------


_ascii = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)
_utf8 = st.text(alphabet=st.characters(blacklist_categories=('Cs',)), max_size=20)
_int32 = st.integers(-(1 << 31), (1 << 31) - 1)
_datetimes = st.builds(
    lambda dt, minutes: dt.replace(microsecond=dt.microsecond // 100000 * 100000,
                                   tzinfo=datetime.timezone(datetime.timedelta(minutes=minutes))),
    st.datetimes(min_value=datetime.datetime(1, 1, 2), max_value=datetime.datetime(9999, 12, 30)),
    st.integers(-(23 * 60 + 59), 23 * 60 + 59))
_scalar = st.one_of(
    st.tuples(st.sampled_from([INTEGER, ENUM]), _int32),
    st.tuples(st.just(BOOLEAN), st.booleans()),
    st.tuples(st.sampled_from([KEYWORD, URI, CHARSET, LANGUAGE, MIME]), _ascii),
    st.tuples(st.sampled_from([TEXT, NAME]), _utf8),
    st.tuples(st.sampled_from([TEXT_LANG, NAME_LANG]), st.builds(LangString, _ascii, _utf8)),
    st.tuples(st.just(RANGE), st.builds(Range, _int32, _int32)),
    st.tuples(st.just(RESOLUTION), st.builds(Resolution, _int32, _int32, st.sampled_from([3, 4]))),
    st.tuples(st.just(DATE_TIME), _datetimes),
    st.tuples(st.just(OCTET_STRING), st.binary(max_size=20)),
    st.tuples(st.sampled_from([NO_VALUE, UNKNOWN, UNSUPPORTED]), st.none()),
)


def _attribute(name: str, pairs) -> Attribute:
    return Attribute(name, pairs[0][0], [v for _, v in pairs], tags=[t for t, _ in pairs])


def _members(values):
    return st.dictionaries(_ascii, st.lists(values, min_size=1, max_size=3), max_size=3).map(
        lambda d: {name: _attribute(name, pairs) for name, pairs in d.items()})


_value = st.one_of(_scalar, st.tuples(st.just(BEG_COLLECTION), _members(st.one_of(
    _scalar, st.tuples(st.just(BEG_COLLECTION), _members(_scalar))))))
_attributes = st.lists(st.builds(_attribute, _ascii, st.lists(_value, min_size=1, max_size=3)), max_size=5)
_messages = st.builds(
    Message, st.integers(0, 0xFFFF), _int32,
    st.lists(st.builds(Group, st.sampled_from([OPERATION, JOB, PRINTER, 0x05, 0x07]), _attributes),
             max_size=3),
    st.binary(max_size=40),
    st.tuples(st.integers(0, 255), st.integers(0, 255)))


@settings(max_examples=300, deadline=None)
@given(_messages)
def test_property_decode_inverts_encode(message):
    assert ipp.decode(ipp.encode(message)) == message


@settings(max_examples=300, deadline=None)
@given(_messages, st.data())
def test_property_damaged_messages_raise_only_ipp_error(message, data):
    wire = bytearray(ipp.encode(message))
    cut = data.draw(st.integers(0, len(wire)))
    if data.draw(st.booleans()) and cut < len(wire):
        wire[cut] ^= data.draw(st.integers(1, 255))
    else:
        wire = wire[:cut]
    try:
        ipp.decode(bytes(wire))
    except IppError:
        pass


# --- printer logic (no sockets) -------------------------------------------------

def printer(identity=None):
    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    persona = Persona(host='mfd-km', roles=('mfd',), identity=identity or PERSONA.identity)
    return clock, ipp.Printer(clock, persona)


CTX = Context(host='198.18.0.5:631', path='/ipp/print', secure=False, peer='198.18.0.9', port=631)


def request(op: str, *operation: Attribute, groups=(), data=b'', request_id=5, version=(2, 0)):
    return Message(ipp.OP[op] if isinstance(op, str) else op, request_id,
                   [operation_attrs(attr('printer-uri', URI, 'ipp://198.18.0.5:631/ipp/print'), *operation),
                    *groups], data=data, version=version)


def names(message: Message, tag: int) -> set[str]:
    return {a.name for g in message.groups if g.tag == tag for a in g.attributes}


def test_get_printer_attributes_says_who_the_printer_is():
    _, p = printer()
    response, record = ipp.handle(p, request('Get-Printer-Attributes'), CTX)
    assert (response.code, response.request_id, response.version) == (0, 5, (2, 0))
    assert response.value('printer-make-and-model', PRINTER) == 'KONICA MINOLTA bizhub C300i'
    assert response.value('printer-name', PRINTER) == 'mfd-km'
    assert response.value('printer-state', PRINTER) == 3
    assert response.value('printer-is-accepting-jobs', PRINTER) is True
    assert response.value('printer-uri-supported', PRINTER) == 'ipp://198.18.0.5:631/ipp/print'
    assert response.value('uri-security-supported', PRINTER) == 'none'
    assert response.get('ipp-versions-supported').values == ['1.0', '1.1', '2.0']
    assert ipp.OP['Print-Job'] in response.get('operations-supported').values
    assert 'application/pdf' in response.get('document-format-supported').values
    assert response.value('printer-device-id', PRINTER).startswith('MFG:Konica Minolta;MDL:bizhub C300i;CMD:PDF,')
    assert record == {'op': 'Get-Printer-Attributes', 'request_id': 5, 'version': '2.0',
                      'requested': ['all'], 'ipp_status': 'successful-ok'}
    ipp.encode(response)  # every value fits its tag


def test_printer_attributes_are_built_once_but_their_clock_values_are_live():
    clock, p = printer()
    first = ipp.encode(ipp.handle(p, request('Get-Printer-Attributes'), CTX)[0])
    clock.advance(90)
    later, _ = ipp.handle(p, request('Get-Printer-Attributes'), CTX)
    assert later.value('printer-up-time', PRINTER) == 91
    assert later.value('printer-current-time', PRINTER) == datetime.datetime.fromtimestamp(
        1_700_000_090, datetime.timezone.utc)
    # What encode copies from the kept encodings is what it would pack afresh.
    fresh = Message(later.code, later.request_id, [Group(g.tag, [Attribute(a.name, a.tag, list(a.values),
                                                                        list(a.tags)) for a in g.attributes])
                                                   for g in later.groups], version=later.version)
    assert ipp.encode(later) == ipp.encode(fresh) != first
    assert len(ipp.encode(later)) == len(first)
    other = Context(host='mfd-km.lab:631', path='/ipp/print', secure=True, peer='198.18.0.9', port=631)
    assert ipp.handle(p, request('Get-Printer-Attributes'), other)[0].value(
        'printer-uri-supported', PRINTER) == 'ipps://mfd-km.lab:631/ipp/print'


def test_get_printer_attributes_honours_requested_attributes_and_tls():
    _, p = printer()
    secure = Context(host='mfd-km.lab', path='/', secure=True, peer='198.18.0.9', port=443)
    response, _ = ipp.handle(p, request('Get-Printer-Attributes', attr(
        'requested-attributes', KEYWORD, 'printer-uri-supported', 'uri-security-supported', 'job-template')),
        secure)
    printer_names = names(response, PRINTER)
    assert {'printer-uri-supported', 'uri-security-supported', 'copies-default', 'media-col-default'} <= printer_names
    assert 'printer-name' not in printer_names
    assert response.value('printer-uri-supported', PRINTER) == 'ipps://mfd-km.lab/'
    assert response.value('uri-security-supported', PRINTER) == 'tls'


def test_print_job_records_the_document_and_completes():
    clock, p = printer()
    document = b'%PDF-1.4\n' + b'\0' * 70_000
    response, record = ipp.handle(p, request(
        'Print-Job', attr('requesting-user-name', NAME, 'alice'), attr('job-name', NAME, 'report'),
        attr('document-format', MIME, 'application/pdf'),
        groups=[Group(JOB, [attr('copies', INTEGER, 2)])], data=document), CTX)
    assert response.code == 0
    assert response.value('job-id', JOB) == 1
    assert response.value('job-uri', JOB) == 'ipp://198.18.0.5:631/ipp/print/1'
    assert response.value('job-state', JOB) == ipp.JOB_COMPLETED
    assert response.value('job-originating-host-name', JOB) == '198.18.0.9'
    assert record['document_bytes'] == len(document) and record['job_id'] == 1 and record['user'] == 'alice'
    clock.advance(5)
    jobs, _ = ipp.handle(p, request('Get-Job-Attributes', attr('job-id', INTEGER, 1)), CTX)
    assert jobs.value('job-name', JOB) == 'report'
    assert jobs.value('job-k-octets', JOB) == 69
    assert jobs.value('job-printer-up-time', JOB) > jobs.value('time-at-creation', JOB)
    ipp.encode(jobs)


def test_print_job_counts_a_document_the_caller_did_not_keep():
    _, p = printer()
    _, record = ipp.handle(p, request('Print-Job'), CTX, document_size=123_456)
    assert record['document_bytes'] == 123_456


def test_validate_job_and_unsupported_document_format():
    _, p = printer({'document_formats': ['application/pdf']})
    ok, _ = ipp.handle(p, request('Validate-Job', attr('document-format', MIME, 'application/pdf')), CTX)
    assert ok.code == 0 and not p.jobs
    bad, record = ipp.handle(p, request('Print-Job', attr('document-format', MIME, 'image/x-foo')), CTX)
    assert ipp.status_name(bad.code) == 'client-error-document-format-not-supported'
    assert bad.group(ipp.UNSUPPORTED_GROUP).get('document-format').value == 'image/x-foo'
    assert record['ipp_status'] == 'client-error-document-format-not-supported' and not p.jobs
    gz, _ = ipp.handle(p, request('Print-Job', attr('compression', KEYWORD, 'gzip')), CTX)
    assert ipp.status_name(gz.code) == 'client-error-compression-not-supported'


def test_get_jobs_which_jobs_and_my_jobs():
    _, p = printer()
    for user in ('alice', 'bob'):
        ipp.handle(p, request('Print-Job', attr('requesting-user-name', NAME, user)), CTX)
    pending, _ = ipp.handle(p, request('Get-Jobs'), CTX)
    assert pending.code == 0 and pending.group(JOB) is None
    done, record = ipp.handle(p, request('Get-Jobs', attr('which-jobs', KEYWORD, 'completed')), CTX)
    job_groups = [g for g in done.groups if g.tag == JOB]
    assert [g.get('job-id').value for g in job_groups] == [2, 1] and record['jobs'] == 2
    assert {a.name for a in job_groups[0].attributes} == {'job-id', 'job-uri'}
    mine, _ = ipp.handle(p, request('Get-Jobs', attr('requesting-user-name', NAME, 'bob'),
                                    attr('which-jobs', KEYWORD, 'completed'),
                                    attr('my-jobs', BOOLEAN, True)), CTX)
    assert [g.get('job-id').value for g in mine.groups if g.tag == JOB] == [2]
    bad, _ = ipp.handle(p, request('Get-Jobs', attr('which-jobs', KEYWORD, 'sometime')), CTX)
    assert ipp.status_name(bad.code) == 'client-error-attributes-or-values-not-supported'


def test_cancel_and_get_job_errors():
    _, p = printer()
    ipp.handle(p, request('Print-Job'), CTX)
    done, _ = ipp.handle(p, request('Cancel-Job', attr('job-id', INTEGER, 1)), CTX)
    assert ipp.status_name(done.code) == 'client-error-not-possible'
    missing, _ = ipp.handle(p, request('Get-Job-Attributes', attr('job-id', INTEGER, 99)), CTX)
    assert ipp.status_name(missing.code) == 'client-error-not-found'
    no_id, _ = ipp.handle(p, request('Cancel-Job'), CTX)
    assert ipp.status_name(no_id.code) == 'client-error-bad-request'
    p.jobs[0].state = ipp.JOB_PENDING
    ok, _ = ipp.handle(p, request('Cancel-Job', attr('job-id', INTEGER, 1)), CTX)
    assert ok.code == 0 and p.jobs[0].state == ipp.JOB_CANCELED


@pytest.mark.parametrize('message, status', [
    (request(0x0005), 'server-error-operation-not-supported'),          # Create-Job
    (request(0x4001), 'server-error-operation-not-supported'),          # vendor operation
    (request('Get-Printer-Attributes', request_id=0), 'client-error-bad-request'),
    (request('Get-Printer-Attributes', version=(0, 0)), 'server-error-version-not-supported'),
    (request('Get-Printer-Attributes', version=(3, 0)), 'server-error-version-not-supported'),
    (Message(0x000B, 1, [Group(OPERATION)]), 'client-error-bad-request'),
    (Message(0x000B, 1, [Group(OPERATION, [attr('attributes-natural-language', LANGUAGE, 'en'),
                                           attr('attributes-charset', CHARSET, 'utf-8')])]),
     'client-error-bad-request'),
    (Message(0x000B, 1, [Group(OPERATION, [attr('attributes-charset', CHARSET, 'iso-8859-1'),
                                           attr('attributes-natural-language', LANGUAGE, 'en'),
                                           attr('printer-uri', URI, 'ipp://x/')])]),
     'client-error-charset-not-supported'),
    (Message(0x000B, 1, [operation_attrs()]), 'client-error-bad-request'),   # no printer-uri
    (Message(0x000B, 1, []), 'client-error-bad-request'),
])
def test_bad_requests_get_ipp_error_statuses(message, status):
    _, p = printer()
    response, record = ipp.handle(p, message, CTX)
    assert ipp.status_name(response.code) == status
    assert record['ipp_status'] == status
    assert response.group(PRINTER) is None
    ipp.encode(response)


def test_context_printer_uri_for_root_and_job_paths():
    assert Context('h:631', '/', False, 'p', 631).printer_uri == 'ipp://h:631/'
    assert Context('h:631', '/ipp/print/17', False, 'p', 631).printer_uri == 'ipp://h:631/ipp/print'
    assert Context('h', '/ipp/printer', True, 'p', 443).printer_uri == 'ipps://h/ipp/printer'


def test_make_document_is_a_pdf_of_the_exact_size():
    for size in (65536, 200_000, 10):
        document = payloads.print_document(size)
        assert len(document) == size
    assert payloads.print_document(65536).startswith(b'%PDF-1.4') and payloads.print_document(65536).endswith(b'%%EOF\n')
    assert len(payloads.print_document(5000, 'application/postscript')) == 5000


def test_probe_rejects_a_bad_mode_and_udp():
    clock = MemoryReactorClock()
    result = []
    ipp.probe(clock, target(631, options={'mode': 'scan'})).addCallback(result.append)
    ipp.probe(clock, target(631, transport='udp')).addCallback(result.append)
    assert [r.outcome for r in result] == ['error', 'error']
    assert 'mode' in result[0].detail and 'tcp' in result[1].detail
    assert not clock.getDelayedCalls() and not clock.tcpClients


def test_probe_without_ca_file_is_an_error():
    clock = MemoryReactorClock()
    result = []
    ipp.probe(clock, target(443, security='tls')).addCallback(result.append)
    assert result[0].outcome == 'error' and 'ca_file' in result[0].detail


# --- stub and probe on loopback ---------------------------------------------------

async def _serve_and(reactor, persona, body, listener_security='plain'):
    records: list[dict] = []
    port = ipp.listen(reactor, Listener('tcp', 0, 'ipp', listener_security), persona,
                      on_request=records.append, interface='127.0.0.1')
    try:
        return await body(reactor, port.getHost().port), records
    finally:
        await maybeDeferred(port.stopListening)


def _post(reactor, url: str, body: bytes, content_type: str | bytes = 'application/ipp', method=b'POST'):
    """One request through the probes' HTTP client: (status, headers, body)."""
    address = urlsplit(url)
    client = http.HttpClient(reactor, target(address.port))
    if isinstance(content_type, bytes):
        content_type = content_type.decode('latin-1')   # the client sends it back as these bytes

    async def go():
        try:
            reply = await client.request(method.decode('ascii'), address.path, {'content-type': content_type},
                                         body if method == b'POST' else None)
        finally:
            await client.close(abort=False)
        return reply.status, dict(reply.headers.getAllRawHeaders()), reply.body

    return Deferred.fromCoroutine(go())


def test_loopback_probe_prints_64k_and_the_stub_witnesses_it():
    async def body(reactor, port):
        result = await ipp.probe(reactor, target(port))
        return result, leftovers_after(reactor)

    def leftovers_after(reactor):
        return [x for x in leftovers(reactor) if not _is_server_side(x)]

    (result, left), records = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(_serve_and(r, PERSONA, body)))
    assert result.outcome == 'ok', result
    assert result.exchange == 'IPP/2.0 Get-Printer-Attributes + Print-Job 64 KiB -> job 1'
    assert 'KONICA MINOLTA bizhub C300i' in result.detail and result.peer_seen == '127.0.0.1'
    assert [(r['op'], r['ipp_status'], r['status']) for r in records] == [
        ('Get-Printer-Attributes', 'successful-ok', 200), ('Print-Job', 'successful-ok', 200)]
    assert records[1]['document_bytes'] == 65536 and records[1]['peer'] == '127.0.0.1'
    assert records[1]['bytes'] > 65536  # the whole HTTP body: attributes + document
    assert records[1]['document_format'] == 'application/pdf' and records[1]['tls'] is False
    assert left == []


def _is_server_side(thing) -> bool:
    # The stub's listening port, its connections, their idle timers and the Site's clock tick.
    from twisted.internet.tcp import Port, Server
    from twisted.web.http import HTTPChannel, HTTPFactory
    owner = getattr(getattr(thing, 'func', None), '__self__', None)
    return isinstance(thing, (Port, Server)) or isinstance(owner, (HTTPChannel, HTTPFactory))


def test_loopback_status_flow_only_asks_printer_attributes():
    async def body(reactor, port):
        return await ipp.probe(reactor, target(port, options={'mode': 'status'}, size=10_000_000))

    result, records = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(_serve_and(r, PERSONA, body)))
    assert result.outcome == 'ok', result
    assert result.exchange == 'IPP/2.0 Get-Printer-Attributes -> idle'
    assert [r['op'] for r in records] == ['Get-Printer-Attributes']


def test_loopback_large_document_and_options():
    async def body(reactor, port):
        return await ipp.probe(reactor, target(port, size=3_000_000, options={
            'path': '/ipp/printer', 'user': 'jdoe', 'document_format': 'application/postscript'}))

    result, records = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(_serve_and(r, PERSONA, body)))
    assert result.outcome == 'ok', result
    assert 'Print-Job 3000000 B' in result.exchange
    assert records[1]['document_bytes'] == 3_000_000 and records[1]['user'] == 'jdoe'
    assert records[1]['path'] == '/ipp/printer'


def test_loopback_print_job_refused_by_printer_is_protocol_error():
    persona = Persona(host='old', roles=('mfd',), identity={'document_formats': ['application/postscript']})

    async def body(reactor, port):
        return await ipp.probe(reactor, target(port))

    result, records = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(_serve_and(r, persona, body)))
    assert result.outcome == 'protocol_error', result
    assert 'client-error-document-format-not-supported' in result.detail
    assert records[-1]['ipp_status'] == 'client-error-document-format-not-supported'


def test_loopback_malformed_requests_get_http_errors_and_the_stub_keeps_serving():
    good = ipp.encode(request('Get-Printer-Attributes'))

    async def body(reactor, port):
        base = f'http://127.0.0.1:{port}'
        answers = {
            'garbage': await _post(reactor, f'{base}/ipp/print', b'\x02\x00garbage'),
            'wrong type': await _post(reactor, f'{base}/ipp/print', good, content_type='text/plain'),
            'truncated': await _post(reactor, f'{base}/ipp/print', good[:-1]),
            # Not UTF-8: was an unhandled UnicodeDecodeError (500 and a traceback).
            'bad type byte': await _post(reactor, f'{base}/ipp/print', good, content_type=b'application/ipp\xe9'),
            'get printer': await _post(reactor, f'{base}/ipp/print', b'', method=b'GET'),
            'get root': await _post(reactor, f'{base}/', b'', method=b'GET'),
            'unknown path': await _post(reactor, f'{base}/nothing', good),
            'root post': await _post(reactor, f'{base}/', good),
            'job uri post': await _post(reactor, f'{base}/ipp/print/3', good),
            'unsupported op': await _post(reactor, f'{base}/ipp/print', ipp.encode(request(0x0005))),
        }
        answers['probe'] = await ipp.probe(reactor, target(port))
        return answers

    answers, records = run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(_serve_and(r, PERSONA, body)))
    for name in ('garbage', 'wrong type', 'truncated', 'bad type byte'):
        code, _, payload = answers[name]
        assert code == 400, (name, payload)
    assert b'malformed IPP message' in answers['garbage'][2]
    assert b'application/ipp' in answers['wrong type'][2]
    assert answers['get printer'][0] == 405
    assert answers['get root'][0] == 200 and b'mfd-km' in answers['get root'][2]  # http's health page
    assert answers['unknown path'][0] == 404
    for name in ('root post', 'job uri post'):
        code, headers, payload = answers[name]
        assert code == 200 and headers[b'Content-Type'] == [b'application/ipp'], name
        assert ipp.decode(payload).code == 0
    code, _, payload = answers['unsupported op']
    assert code == 200 and ipp.status_name(ipp.decode(payload).code) == 'server-error-operation-not-supported'
    assert answers['probe'].outcome == 'ok', answers['probe']
    # Every request is witnessed (by the http Site); well-formed IPP ones carry the operation.
    assert [(r['method'], r['path'], r['status'], r.get('op')) for r in records] == [
        ('POST', '/ipp/print', 400, None), ('POST', '/ipp/print', 400, None), ('POST', '/ipp/print', 400, None),
        ('POST', '/ipp/print', 400, None), ('GET', '/ipp/print', 405, None), ('GET', '/', 200, None), ('POST', '/nothing', 404, None),
        ('POST', '/', 200, 'Get-Printer-Attributes'), ('POST', '/ipp/print/3', 200, 'Get-Printer-Attributes'),
        ('POST', '/ipp/print', 200, 'Create-Job'),
        ('POST', '/ipp/print', 200, 'Get-Printer-Attributes'), ('POST', '/ipp/print', 200, 'Print-Job')]


def test_loopback_refused():
    result = run_on_fresh_reactor(lambda r: ipp.probe(r, target(free_port())))
    assert result.outcome == 'refused', result


def _run_against(protocol_factory, **overrides):
    """Probe a raw TCP server built from ``protocol_factory`` on a fresh reactor."""
    async def scenario(reactor):
        factory = Factory.forProtocol(protocol_factory)
        port = reactor.listenTCP(0, factory, interface='127.0.0.1')
        try:
            result = await ipp.probe(reactor, target(port.getHost().port, **overrides))
            return result, leftovers(reactor)
        finally:
            await maybeDeferred(port.stopListening)

    return run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)))


class Silent(Protocol):
    """Accepts and never answers (a firewall that lets SYN through and drops data does the same)."""


class HangUp(Protocol):
    def dataReceived(self, data):
        self.transport.loseConnection()


class NotIpp(Protocol):
    def dataReceived(self, data):
        if b'\r\n\r\n' in data:
            self.transport.write(b'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\nhello')


class BadIpp(Protocol):
    def dataReceived(self, data):
        if b'\r\n\r\n' in data:
            body = b'\x02\x00\x00\x00\x00\x00'
            self.transport.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/ipp\r\n'
                                 b'Content-Length: %d\r\n\r\n%s' % (len(body), body))


def test_loopback_silent_server_times_out_and_leaks_nothing():
    (result, left) = _run_against(Silent, timeout=0.5)
    assert result.outcome == 'timeout', result
    assert result.detail.startswith('connected, but no complete IPP exchange')
    assert [x for x in left if not _is_server_side(x)] == []


@pytest.mark.parametrize('server, outcome, detail', [
    (HangUp, 'protocol_error', 'connection closed before a complete IPP response'),
    (NotIpp, 'protocol_error', "Content-Type 'text/html'"),
    (BadIpp, 'protocol_error', 'malformed IPP response'),
])
def test_loopback_broken_servers(server, outcome, detail):
    result, _ = _run_against(server)
    assert (result.outcome, detail in result.detail) == (outcome, True), result


def test_unanswered_syn_times_out_with_connect_detail():
    # MemoryReactorClock never completes the TCP handshake.
    clock = MemoryReactorClock()
    results = []
    ipp.probe(clock, target(631, timeout=2.0)).addCallback(results.append)
    assert len(clock.tcpClients) == 1
    clock.advance(2.0)
    assert results and results[0].outcome == 'timeout'
    assert 'no TCP connection' in results[0].detail
    assert not [c for c in clock.getDelayedCalls() if c.active()]


# --- IPPS against a real role daemon ------------------------------------------------

@pytest.fixture(scope='module')
def ipps_stub(tmp_path_factory):
    directory = tmp_path_factory.mktemp('ipps')
    material = pki.make_test_pki(directory / 'pki')
    port = free_port()
    persona = {**material, 'identity': PERSONA.identity}
    with run_stub(directory, [{'transport': 'tcp', 'port': port, 'protocol': 'ipp', 'security': 'tls'}],
                  persona=persona, host='stub') as log:
        yield port, material['ca_file'], log


def test_ipps_probe_verifies_the_lab_certificate(ipps_stub):
    port, ca_file, log = ipps_stub

    def go(reactor):
        d = ipp.probe(reactor, target(port, security='tls', server_name='stub.lab', ca_file=ca_file))
        return d.addCallback(lambda result: (result, leftovers(reactor)))

    result, left = run_on_fresh_reactor(go)
    assert result.outcome == 'ok', result
    assert result.exchange.startswith('IPPS/2.0 Get-Printer-Attributes + Print-Job 64 KiB -> job ')
    assert result.tls_issuer == pki.LAB_CA_NAME
    assert left == []
    records = [r for r in request_log(Path(log)) if r['op'] == 'Print-Job']
    assert records and records[-1]['tls'] is True and records[-1]['document_bytes'] == 65536


@pytest.mark.parametrize('overrides, detail', [
    ({'server_name': 'other.lab'}, 'certificate: host name does not match'),
    ({'ca_file': '/etc/ssl/certs/ca-certificates.crt'}, 'certificate: '),
])
def test_ipps_probe_rejects_a_wrong_host_or_ca(ipps_stub, overrides, detail):
    port, ca_file, _ = ipps_stub
    fields = {'security': 'tls', 'server_name': 'stub.lab', 'ca_file': ca_file, **overrides}

    def go(reactor):
        d = ipp.probe(reactor, target(port, **fields))
        return d.addCallback(lambda result: (result, leftovers(reactor)))

    result, left = run_on_fresh_reactor(go)
    assert result.outcome == 'protocol_error', result
    assert result.detail.startswith(detail), result.detail
    assert left == []


def test_plain_probe_on_the_ipps_port_is_a_protocol_error(ipps_stub):
    port, _, _ = ipps_stub
    result = run_on_fresh_reactor(lambda r: ipp.probe(r, target(port)))
    assert result.outcome == 'protocol_error', result


# --- persona data, IPPS TLS ----------------------------------------------------------------------

def test_printer_reads_typed_persona_fields_and_strings_where_types_belong_are_refused():
    persona = Persona(host='m', roles=('mfd',), identity={
        'color': False, 'document_formats': ['application/pdf', 'image/urf'], 'ipp_versions': ['1.1', '2.0'],
        'pages_per_minute': 33, 'toner': 'black:40', 'toner_capacity': 80})
    printer = ipp.Printer(MemoryReactorClock(), persona)
    served = {a.name: a.values for _, a in printer.printer_attributes(
        ipp.Context('h:1', '/ipp/print', False, 'p', 1))}
    assert served['color-supported'] == [False] and served['print-color-mode-supported'] == ['monochrome']
    assert served['document-format-supported'] == ['application/pdf', 'image/urf']
    assert served['ipp-versions-supported'] == ['1.1', '2.0'] and served['pages-per-minute'] == [33]
    assert served['marker-names'] == ['Black Toner'] and served['marker-levels'] == [50]
    for field, text in (('color', 'False'), ('pages_per_minute', '33'), ('ipp_versions', '1.1 2.0')):
        with pytest.raises(ValueError, match=f"field '{field}' must be"):
            Persona(host='m', roles=('mfd',), identity={field: text})


def test_imported_attributes_replace_generated_ones_and_bad_ones_fail_at_listen():
    persona = Persona(host='m', roles=('mfd',), identity={'ipp_attributes': {
        'sides-supported': {'syntax': 'keyword', 'values': ['one-sided']},
        'printer-kind': {'syntax': 'keyword', 'values': ['document']},
        'printer-state': {'syntax': 'enum', 'values': [5]}}})
    pairs = ipp.Printer(MemoryReactorClock(), persona).printer_attributes(ipp.Context('h:1', '/', False, 'p', 1))
    groups = {a.name: (g, a.values) for g, a in pairs}
    assert groups['sides-supported'] == ('job-template', ['one-sided'])
    assert groups['printer-kind'] == ('printer-description', ['document'])
    assert groups['printer-state'][1] == [ipp.PRINTER_IDLE]   # live: never the captured value
    broken = Persona(host='m', roles=('mfd',), identity={'ipp_attributes': {
        'printer-name': {'syntax': 'keyword', 'values': ['ünïcode keyword']}}})
    with pytest.raises(ValueError, match='printer-name'):
        ipp.listen(MemoryReactorClock(), Listener('tcp', 0, 'ipp'), broken)


def test_ipps_is_capped_at_tls_1_2_unless_the_persona_says_otherwise():
    plain = Persona(host='m', roles=('mfd',), identity={'vendor': 'X'})
    assert ipp.ipps_persona(plain).identity == {'vendor': 'X', 'tls_max_version': '1.2'}
    chosen = Persona(host='m', roles=('mfd',), identity={'tls_max_version': '1.3'})
    assert ipp.ipps_persona(chosen) is chosen
