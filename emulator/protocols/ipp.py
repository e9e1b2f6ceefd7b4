"""``ipp``: the Internet Printing Protocol over HTTP/HTTPS (RFC 8010, RFC 8011).

Where the lab speaks IPP: the Spooler Controller polls an MFD's status
(Get-Printer-Attributes), FlexiSpooler / Spooler / mobile devices / system
spoolers submit jobs (Print-Job), on ports 80/443/631/632/5631/5632/8050.

Wire format
===========

An IPP message is the body of an HTTP POST (``Content-Type: application/ipp``)
and of its 200 response::

    version-number      2 bytes  major, minor (we speak 1.0, 1.1, 2.0, 2.1, 2.2)
    operation-id        2 bytes  request; status-code in a response
    request-id          4 bytes  signed, 1..2**31-1, echoed by the response
    attribute groups    delimiter tag (0x01 operation, 0x02 job, 0x04 printer,
                        0x05 unsupported), then attributes:
                            value-tag(1) name-length(2) name value-length(2) value
                        a 1setOf value repeats with name-length 0
    end-of-attributes   0x03
    data                the document (Print-Job), to the end of the body

Collections (``begCollection``/``memberAttrName``/``endCollection``) are
decoded into dicts, so a client's ``media-col`` does not trip the stub.

Server stub
===========

A twisted.web resource at ``/ipp/print`` and ``/ipp/printer`` (and any path
below them, e.g. a job URI) and for POST on ``/``, mounted in the ``http``
module's Site (``http.site_for``), so the same port also answers GET / and the
persona's HTTP endpoints (an MFD's install page) the way a printer's web server
does. It answers Get-Printer-Attributes, Print-Job, Validate-Job, Get-Jobs,
Get-Job-Attributes and Cancel-Job like an idle printer; jobs complete at once
(the document is counted; an accepted Print-Job's document is also kept in the host's
``jobstore``, kind ``print-job``, named by its job-name, so a workflow can pass it on). Printer attributes come from the persona
(``emulator.persona_import`` describes the fields): printer-make-and-model
(``make_model``), document-format-supported (``document_formats``),
ipp-versions-supported (``ipp_versions``), color-supported (``color``), the
marker-* attributes (``toner``); a persona imported from a real printer
(``ipp_attributes``) replaces generated attributes by name with the captured
ones (syntax and values), except those describing the live stub (URIs, state,
times, operations-supported: only the served operations are advertised).
Invented: media, finishing and resolution lists unless imported. IPPS tops out
at TLS 1.2 unless the persona says ``tls_max_version: '1.3'``: CUPS 2.4 clients
(GnuTLS) with a timeout read TLS 1.3's post-handshake session tickets as an empty
response (see ``tls``). Any other operation gets
``server-error-operation-not-supported``; a body that is not an IPP message,
or not ``application/ipp``, gets HTTP 400; other methods 405. Request checks
follow RFC 8011 section 4.1 (version, request-id, charset/natural-language
first, printer-uri), so CUPS's ``ipptool`` conformance files (ipp-1.1.test,
ipp-2.0.test) pass. Listener security 'tls' serves IPPS (implicit TLS);
'optional'/'starttls' serve plain IPP on the port (HTTP Upgrade to TLS is not
emulated). The http Site reports every request through ``on_request``
(method, path, bytes, HTTP status, tls, peer); IPP requests add 'op',
'ipp_status', 'request_id', 'version' and for Print-Job 'document_bytes',
'job_id', 'user', 'document_format'.

Probe
=====

Get-Printer-Attributes, then (unless options ``{'mode': 'status'}``: a client
that only polls device status) Print-Job with a
PDF-looking document of ``max(target.size, 64 KiB)`` bytes, over one
keep-alive HTTP/1.1 connection (HTTPS verifying target.ca_file and
target.server_name for 'tls' targets), like a spooler's IPP backend does.
Options: ``mode`` ('print' | 'status'), ``path`` (default /ipp/print),
``user`` (requesting-user-name), ``document_format`` (default application/pdf), and
``carries``/``holder`` (``jobstore``): the job is named after ``carries`` and its document is
the job the holder host keeps under that name (a spooler releasing it), or a new one it then
keeps (a user printing).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import math
import re
import struct
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import http as web_http
from twisted.web.resource import Resource

from emulator import persona_import as persona_data

from . import http, jobstore
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .payloads import print_document
from .probing import OnRequest, crashed, error_result

PROTOCOL_IDS = ('ipp',)
CONTENT_TYPE = 'application/ipp'
MIN_DOCUMENT = 64 << 10        # smallest document a probe prints: a realistic job, not a ping
MAX_ATTRIBUTES = 1 << 20       # largest attribute section the stub accepts (the document may be larger)
MAX_JOBS = 500                 # jobs a stub remembers for Get-Jobs / Get-Job-Attributes
MAX_DEPTH = 8                  # nesting of collections the decoder accepts
MAX_ATTRIBUTE_SETS = 8         # printer attribute sets a stub keeps built (one per URI a client used)
DEFAULT_PATH = '/ipp/print'
PRINTER_PATHS = (b'print', b'printer')   # children of /ipp
IPPS_TLS_MAX = '1.2'           # see ipps_persona

_log = Logger()


class IppError(ValueError):
    """Bytes that are not a well-formed IPP message (or a value that cannot be encoded)."""


# --- codec (shared by server and client) -----------------------------------
# Hand-written: no maintained PyPI package encodes *and* decodes IPP for both a printer and a
# client (pyipp, maintained, is an aiohttp printer-monitoring client; pkipplib is Python 2 era).

# Delimiter tags (RFC 8010 section 3.5.1).
OPERATION = 0x01
JOB = 0x02
END = 0x03
PRINTER = 0x04
UNSUPPORTED_GROUP = 0x05

# Value tags (RFC 8010 section 3.5.2).
UNSUPPORTED = 0x10
UNKNOWN = 0x12
NO_VALUE = 0x13
INTEGER = 0x21
BOOLEAN = 0x22
ENUM = 0x23
OCTET_STRING = 0x30
DATE_TIME = 0x31
RESOLUTION = 0x32
RANGE = 0x33
BEG_COLLECTION = 0x34
TEXT_LANG = 0x35
NAME_LANG = 0x36
END_COLLECTION = 0x37
TEXT = 0x41
NAME = 0x42
KEYWORD = 0x44
URI = 0x45
URI_SCHEME = 0x46
CHARSET = 0x47
LANGUAGE = 0x48
MIME = 0x49
MEMBER_NAME = 0x4A
EXTENSION = 0x7F

STRING_TAGS = frozenset({TEXT, NAME, KEYWORD, URI, URI_SCHEME, CHARSET, LANGUAGE, MIME, MEMBER_NAME})
_ASCII_TAGS = frozenset({KEYWORD, URI, URI_SCHEME, CHARSET, LANGUAGE, MIME, MEMBER_NAME})

# Operation ids (RFC 8011 section 5.4.15) and status codes (section B.1).
OPERATIONS = {
    0x0002: 'Print-Job', 0x0003: 'Print-URI', 0x0004: 'Validate-Job', 0x0005: 'Create-Job',
    0x0006: 'Send-Document', 0x0007: 'Send-URI', 0x0008: 'Cancel-Job',
    0x0009: 'Get-Job-Attributes', 0x000A: 'Get-Jobs', 0x000B: 'Get-Printer-Attributes',
    0x000C: 'Hold-Job', 0x000D: 'Release-Job', 0x000E: 'Restart-Job', 0x0010: 'Pause-Printer',
    0x0011: 'Resume-Printer', 0x0012: 'Purge-Jobs',
}
OP = {name: code for code, name in OPERATIONS.items()}

STATUS = {
    0x0000: 'successful-ok',
    0x0001: 'successful-ok-ignored-or-substituted-attributes',
    0x0400: 'client-error-bad-request',
    0x0401: 'client-error-forbidden',
    0x0402: 'client-error-not-authenticated',
    0x0403: 'client-error-not-authorized',
    0x0404: 'client-error-not-possible',
    0x0405: 'client-error-timeout',
    0x0406: 'client-error-not-found',
    0x0407: 'client-error-gone',
    0x0408: 'client-error-request-entity-too-large',
    0x0409: 'client-error-request-value-too-long',
    0x040A: 'client-error-document-format-not-supported',
    0x040B: 'client-error-attributes-or-values-not-supported',
    0x040C: 'client-error-uri-scheme-not-supported',
    0x040D: 'client-error-charset-not-supported',
    0x040E: 'client-error-conflicting-attributes',
    0x040F: 'client-error-compression-not-supported',
    0x0500: 'server-error-internal-error',
    0x0501: 'server-error-operation-not-supported',
    0x0502: 'server-error-service-unavailable',
    0x0503: 'server-error-version-not-supported',
    0x0507: 'server-error-busy',
    0x0508: 'server-error-job-canceled',
}
S = {name: code for code, name in STATUS.items()}


def status_name(code: int) -> str:
    return STATUS.get(code, f'status-0x{code:04x}')


def operation_name(code: int) -> str:
    return OPERATIONS.get(code, f'operation-0x{code:04x}')


class Range(NamedTuple):
    lower: int
    upper: int


class Resolution(NamedTuple):
    x: int
    y: int
    units: int = 3   # 3 dots per inch, 4 dots per centimetre


class LangString(NamedTuple):
    language: str
    text: str


@dataclass
class Attribute:
    """One attribute: a name and one or more values, each with its value tag.

    Value types: int (integer, enum), bool, str (text, name, keyword, uri,
    charset, naturalLanguage, mimeMediaType, ...), Range, Resolution,
    LangString (text/nameWithLanguage), datetime (dateTime), dict of
    Attribute (collection), None (out-of-band: no-value, unknown,
    unsupported), bytes (octetString and tags we do not interpret).

    An attribute served unchanged to many requests (a printer's) carries its encoding in
    ``packed`` (set by ``Printer.printer_attributes``), which ``encode`` then copies.
    """

    name: str
    tag: int
    values: list
    tags: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.values, list):
            self.values = list(self.values) if isinstance(self.values, tuple) else [self.values]
        if not self.tags:
            self.tags = [self.tag] * len(self.values)

    @property
    def value(self):
        return self.values[0] if self.values else None

    def add(self, tag: int, value) -> None:
        self.values.append(value)
        self.tags.append(tag)
        self.__dict__.pop('packed', None)   # its encoding, if kept (see Printer.printer_attributes), is stale now


@dataclass
class Group:
    tag: int
    attributes: list[Attribute] = field(default_factory=list)

    def add(self, name: str, tag: int, *values) -> Attribute:
        attribute = Attribute(name, tag, list(values))
        self.attributes.append(attribute)
        return attribute

    def get(self, name: str) -> Attribute | None:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        return None

    def names(self) -> list[str]:
        return [a.name for a in self.attributes]


@dataclass
class Message:
    """A request (``code`` = operation-id) or response (``code`` = status-code)."""

    code: int
    request_id: int
    groups: list[Group] = field(default_factory=list)
    data: bytes = b''
    version: tuple[int, int] = (2, 0)

    def group(self, tag: int) -> Group | None:
        for group in self.groups:
            if group.tag == tag:
                return group
        return None

    def add_group(self, tag: int) -> Group:
        group = Group(tag)
        self.groups.append(group)
        return group

    def get(self, name: str, tag: int | None = None) -> Attribute | None:
        for group in self.groups:
            if tag is None or group.tag == tag:
                found = group.get(name)
                if found is not None:
                    return found
        return None

    def value(self, name: str, tag: int | None = None, default=None):
        found = self.get(name, tag)
        return default if found is None or not found.values else found.values[0]


def _pack_string(text: str, tag: int) -> bytes:
    if not isinstance(text, str):
        raise IppError(f'value tag 0x{tag:02x} needs a str, got {type(text).__name__}')
    try:
        return text.encode('ascii' if tag in _ASCII_TAGS else 'utf-8')
    except UnicodeEncodeError as exc:
        raise IppError(f'value tag 0x{tag:02x}: {text[:40]!r} is not {exc.encoding}') from None


def _pack_int(value, tag: int) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool):
        raise IppError(f'value tag 0x{tag:02x} needs an int, got {value!r}')
    if not -(1 << 31) <= value < (1 << 31):
        raise IppError(f'{value} does not fit a signed 32-bit integer')
    return struct.pack('>i', value)


def _pack_datetime(value) -> bytes:
    # RFC 2579 DateAndTime, 11 octets, as RFC 8010 section 3.9 requires.
    if not isinstance(value, datetime.datetime) or value.utcoffset() is None:
        raise IppError(f'dateTime needs an aware datetime, got {value!r}')
    offset = int(value.utcoffset().total_seconds()) // 60
    sign = b'+' if offset >= 0 else b'-'
    hours, minutes = divmod(abs(offset), 60)
    if hours > 23 or not 0 <= value.year <= 0xFFFF:
        raise IppError(f'dateTime {value!r} cannot be encoded')
    return struct.pack('>HBBBBBB', value.year, value.month, value.day, value.hour, value.minute,
                       value.second, value.microsecond // 100000) + sign + bytes([hours, minutes])


def _unpack_datetime(raw: bytes) -> datetime.datetime:
    if len(raw) != 11:
        raise IppError(f'dateTime value must be 11 octets, got {len(raw)}')
    year, month, day, hour, minute, second, deci = struct.unpack('>HBBBBBB', raw[:8])
    sign, tz_hours, tz_minutes = raw[8:9], raw[9], raw[10]
    if sign not in (b'+', b'-') or tz_hours > 23 or tz_minutes > 59 or deci > 9:
        raise IppError('dateTime value has a bad time zone or deci-seconds field')
    offset = datetime.timedelta(hours=tz_hours, minutes=tz_minutes)
    try:
        return datetime.datetime(year, month, day, hour, minute, second, deci * 100000,
                                 tzinfo=datetime.timezone(-offset if sign == b'-' else offset))
    except ValueError as exc:
        raise IppError(f'dateTime value out of range: {exc}') from None


def _pack_value(tag: int, value) -> bytes:
    if 0x10 <= tag <= 0x1F:          # out-of-band: no value bytes
        return b''
    if tag in (INTEGER, ENUM):
        return _pack_int(value, tag)
    if tag == BOOLEAN:
        if not isinstance(value, bool):
            raise IppError(f'boolean needs a bool, got {value!r}')
        return b'\x01' if value else b'\x00'
    if tag == RANGE:
        lower, upper = value
        return _pack_int(lower, tag) + _pack_int(upper, tag)
    if tag == RESOLUTION:
        x, y, units = value
        if units not in (3, 4):
            raise IppError(f'resolution units must be 3 (dpi) or 4 (dpcm), got {units!r}')
        return _pack_int(x, tag) + _pack_int(y, tag) + bytes([units])
    if tag == DATE_TIME:
        return _pack_datetime(value)
    if tag in (TEXT_LANG, NAME_LANG):
        language, text = (_pack_string(part, tag) for part in value)
        return struct.pack('>H', len(language)) + language + struct.pack('>H', len(text)) + text
    if tag in STRING_TAGS:
        return _pack_string(value, tag)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise IppError(f'cannot encode {value!r} with value tag 0x{tag:02x}')


def _pack_field(tag: int, name: str, raw: bytes) -> bytes:
    encoded = name.encode('ascii') if name.isascii() else None
    if encoded is None:
        raise IppError(f'attribute name {name!r} is not ASCII')
    if len(encoded) > 0xFFFF or len(raw) > 0xFFFF:
        raise IppError(f'attribute {name!r}: name or value longer than 65535 octets')
    if not 0x10 <= tag <= 0xFF or tag == EXTENSION:
        raise IppError(f'0x{tag:02x} is not an encodable value tag')
    return bytes([tag]) + struct.pack('>H', len(encoded)) + encoded + struct.pack('>H', len(raw)) + raw


def _pack_values(name: str, tags: list[int], values: list, out: list[bytes], depth: int = 0) -> None:
    if not values:
        raise IppError(f'attribute {name!r} has no value')
    for index, (tag, value) in enumerate(zip(tags, values)):
        this_name = name if index == 0 else ''
        if tag == BEG_COLLECTION:
            if not isinstance(value, dict):
                raise IppError(f'collection {name!r} needs a dict of Attribute, got {value!r}')
            if depth >= MAX_DEPTH:
                raise IppError(f'collections nested deeper than {MAX_DEPTH}')
            out.append(_pack_field(BEG_COLLECTION, this_name, b''))
            for member_name, member in value.items():
                out.append(_pack_field(MEMBER_NAME, '', member_name.encode('ascii')))
                _pack_values('', member.tags, member.values, out, depth + 1)
            out.append(_pack_field(END_COLLECTION, '', b''))
        else:
            out.append(_pack_field(tag, this_name, _pack_value(tag, value)))


def encode(message: Message) -> bytes:
    """The bytes of ``message`` (raises IppError for a value its tag cannot carry)."""
    major, minor = message.version
    if not (0 <= major <= 255 and 0 <= minor <= 255 and 0 <= message.code <= 0xFFFF):
        raise IppError('version or operation/status code out of range')
    out = [struct.pack('>BBHi', major, minor, message.code, message.request_id)]
    for group in message.groups:
        if not 0x01 <= group.tag <= 0x0F or group.tag == END:
            raise IppError(f'0x{group.tag:02x} is not a group delimiter tag')
        out.append(bytes([group.tag]))
        for attribute in group.attributes:
            packed = attribute.__dict__.get('packed')
            if packed is not None:
                out.append(packed)
                continue
            if not attribute.name:
                raise IppError('attribute without a name')
            _pack_values(attribute.name, attribute.tags, attribute.values, out)
    out.append(bytes([END]))
    out.append(bytes(message.data))
    return b''.join(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise IppError(f'truncated message: {what} needs {size} octets at offset {self.pos}, '
                           f'{len(self.data) - self.pos} left')
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def field(self) -> tuple[str, bytes]:
        """name and raw value of the attribute whose value tag was just read."""
        (name_length,) = struct.unpack('>H', self.take(2, 'name-length'))
        raw_name = self.take(name_length, 'name')
        (value_length,) = struct.unpack('>H', self.take(2, 'value-length'))
        raw = self.take(value_length, 'value')
        try:
            name = raw_name.decode('ascii')
        except UnicodeDecodeError:
            raise IppError(f'attribute name {raw_name[:40]!r} is not ASCII') from None
        return name, raw


def _unpack_value(tag: int, raw: bytes, name: str):
    def need(size: int) -> None:
        if len(raw) != size:
            raise IppError(f'{name or "value"}: tag 0x{tag:02x} needs {size} octets, got {len(raw)}')

    if 0x10 <= tag <= 0x1F:
        return None
    if tag in (INTEGER, ENUM):
        need(4)
        return struct.unpack('>i', raw)[0]
    if tag == BOOLEAN:
        need(1)
        if raw[0] > 1:
            raise IppError(f'{name or "value"}: boolean must be 0 or 1, got {raw[0]}')
        return raw[0] == 1
    if tag == RANGE:
        need(8)
        return Range(*struct.unpack('>ii', raw))
    if tag == RESOLUTION:
        need(9)
        return Resolution(*struct.unpack('>iiB', raw))
    if tag == DATE_TIME:
        return _unpack_datetime(raw)
    try:
        if tag in (TEXT_LANG, NAME_LANG):
            reader = _Reader(raw)
            (size,) = struct.unpack('>H', reader.take(2, 'language length'))
            language = reader.take(size, 'language').decode('ascii')
            (size,) = struct.unpack('>H', reader.take(2, 'text length'))
            text = reader.take(size, 'text').decode('utf-8')
            if reader.pos != len(raw):
                raise IppError(f'{name or "value"}: trailing octets after the text')
            return LangString(language, text)
        if tag in STRING_TAGS:
            return raw.decode('utf-8')   # lenient: ASCII types decode as UTF-8 too
    except UnicodeDecodeError as exc:
        raise IppError(f'{name or "value"}: bad text encoding ({exc.reason})') from None
    return bytes(raw)                    # octetString and tags we do not interpret


def _read_collection(reader: _Reader, depth: int) -> dict[str, Attribute]:
    if depth >= MAX_DEPTH:
        raise IppError(f'collections nested deeper than {MAX_DEPTH}')
    members: dict[str, Attribute] = {}
    current: Attribute | None = None
    while True:
        tag = reader.byte('value tag in a collection')
        if tag < 0x10:
            raise IppError('collection not closed by endCollection')
        name, raw = reader.field()
        if name:
            raise IppError(f'collection member value carries a name ({name!r})')
        if tag == END_COLLECTION:
            return members
        if tag == MEMBER_NAME:
            member = raw.decode('ascii', errors='replace')
            if not member:
                raise IppError('memberAttrName with an empty name')
            current = members[member] = Attribute(member, 0, [])
            continue
        if current is None:
            raise IppError('collection value before any memberAttrName')
        value = _read_collection(reader, depth + 1) if tag == BEG_COLLECTION else _unpack_value(tag, raw, current.name)
        if not current.values:
            current.tag = tag
        current.add(tag, value)


def decode_attributes(data: bytes) -> tuple[Message, int]:
    """The message without its data, and the offset where the data starts."""
    if len(data) < 9:
        raise IppError(f'message of {len(data)} octets is shorter than the 9-octet minimum')
    major, minor, code, request_id = struct.unpack('>BBHi', data[:8])
    message = Message(code=code, request_id=request_id, version=(major, minor))
    reader = _Reader(data)
    reader.pos = 8
    group: Group | None = None
    last: Attribute | None = None
    while True:
        tag = reader.byte('tag (end-of-attributes-tag missing?)')
        if tag == END:
            break
        if tag < 0x10:
            if tag == 0x00:
                raise IppError('reserved delimiter tag 0x00')
            group = message.add_group(tag)
            last = None
            continue
        if tag == EXTENSION:
            raise IppError('extension value tag 0x7f is not supported')
        if group is None:
            raise IppError('attribute before any group delimiter')
        name, raw = reader.field()
        if tag == END_COLLECTION or tag == MEMBER_NAME:
            raise IppError(f'value tag 0x{tag:02x} outside a collection')
        value = _read_collection(reader, 0) if tag == BEG_COLLECTION else _unpack_value(tag, raw, name or (last.name if last else ''))
        if name:
            last = Attribute(name, tag, [value])
            group.attributes.append(last)
        elif last is None:
            raise IppError('additional value without an attribute')
        else:
            last.add(tag, value)
    return message, reader.pos


def decode(data: bytes) -> Message:
    """Parse one IPP message (header, attribute groups and data); raise IppError if malformed."""
    message, offset = decode_attributes(data)
    message.data = bytes(data[offset:])
    return message


def collection(**members) -> dict[str, Attribute]:
    """A collection value from name=(tag, value-or-list) pairs; '_' in names becomes '-'."""
    result = {}
    for key, (tag, value) in members.items():
        name = key.replace('_', '-')
        result[name] = Attribute(name, tag, value if isinstance(value, list) else [value])
    return result


# --- printer model (server side) --------------------------------------------

JOB_PENDING, JOB_PROCESSING, JOB_CANCELED, JOB_ABORTED, JOB_COMPLETED = 3, 5, 7, 8, 9
PRINTER_IDLE = 3
SUPPORTED_VERSIONS = ((1, 0), (1, 1), (2, 0), (2, 1), (2, 2))
SERVED_OPERATIONS = ('Print-Job', 'Validate-Job', 'Cancel-Job', 'Get-Job-Attributes', 'Get-Jobs',
                     'Get-Printer-Attributes')
DOCUMENT_FORMATS = ('application/octet-stream', 'application/pdf', 'application/postscript',
                    'application/vnd.hp-pcl', 'image/jpeg', 'image/pwg-raster', 'image/urf',
                    'text/plain')
# (PWG 5101.1 name, width, height in hundredths of mm)
MEDIA = (('iso_a4_210x297mm', 21000, 29700), ('iso_a3_297x420mm', 29700, 42000),
         ('iso_a5_148x210mm', 14800, 21000), ('na_letter_8.5x11in', 21590, 27940),
         ('na_legal_8.5x14in', 21590, 35560))
JOB_DESCRIPTION = ('job-id', 'job-uri', 'job-printer-uri', 'job-more-info', 'job-name',
                   'job-originating-user-name', 'job-originating-host-name', 'job-state',
                   'job-state-reasons', 'job-state-message', 'number-of-documents',
                   'time-at-creation', 'time-at-processing', 'time-at-completed',
                   'job-printer-up-time', 'date-time-at-creation', 'date-time-at-processing',
                   'date-time-at-completed', 'job-k-octets', 'document-format')


@dataclass
class Job:
    id: int
    name: str
    user: str
    host: str
    size: int
    document_format: str
    created: float      # reactor.seconds()
    state: int = JOB_COMPLETED


@dataclass
class Context:
    """Where a request came from and how it was addressed, for URIs and the witness record."""

    host: str            # Host header authority (host[:port]) the client used
    path: str            # request path
    secure: bool
    peer: str
    port: int

    @property
    def printer_uri(self) -> str:
        path = self.path.rstrip('/') or ''
        # A POST to "/" or to a job URI below the printer still names the printer.
        match = re.match(r'^(/ipp/(?:print|printer))(?:/.*)?$', path)
        path = match.group(1) if match else (path or '')
        return f'{"ipps" if self.secure else "ipp"}://{self.host}{path or "/"}'

    @property
    def more_info(self) -> str:
        return f'{"https" if self.secure else "http"}://{self.host}/'


class Printer:
    """The state one IPP listener serves: identity, start time, recent jobs."""

    def __init__(self, reactor, persona: Persona) -> None:
        self.reactor = reactor
        self.persona = persona
        self.started = reactor.seconds()
        self.jobs: deque[Job] = deque(maxlen=MAX_JOBS)
        self.next_job_id = 1
        identity = persona.identity
        vendor = identity.get('vendor') or 'Generic'
        self.make_model = str(identity.get('make_model') or f'{vendor} IPP Printer')[:127]
        self.name = str(identity.get('printer_name') or persona.host)[:127]
        self.location = str(identity.get('location') or '')[:127]
        self.info = str(identity.get('printer_info') or f'{self.name} ({self.make_model})')[:127]
        self.color = persona_data.flag(identity, 'color', True)
        self.ppm = persona_data.number(identity, 'pages_per_minute', 30)
        self.versions = persona_data.words(identity, 'ipp_versions') or ('1.0', '1.1', '2.0')
        self.supplies = persona_data.supplies(identity)
        self.uuid = uuid.uuid5(uuid.NAMESPACE_DNS, f'{persona.host}.ipp.safeq-lab')
        # A persona imported from a real printer: its attributes, as captured (PersonaDataError
        # at listen time when malformed).
        self.imported = {name: imported_attribute(name, entry)
                         for name, entry in persona_data.ipp_attributes(identity).items()}
        formats = self.imported.get('document-format-supported')
        self.formats = tuple(formats.values if formats is not None
                             else persona_data.words(identity, 'document_formats') or DOCUMENT_FORMATS)
        # (printer URI, more-info URI, TLS) -> (the built attribute set, positions of the live ones)
        self._attribute_sets: dict[tuple[str, str, bool], tuple[list[tuple[str, Attribute]], list[int]]] = {}

    def up_time(self, at: float | None = None) -> int:
        at = self.reactor.seconds() if at is None else at
        return max(1, int(at - self.started) + 1)

    def now(self, at: float | None = None) -> datetime.datetime:
        at = self.reactor.seconds() if at is None else at
        return datetime.datetime.fromtimestamp(int(at), datetime.timezone.utc)

    def device_id(self) -> str:
        vendor = self.persona.identity.get('vendor') or self.make_model.split(' ')[0]
        same = self.make_model.lower().startswith(vendor.lower())
        model = self.make_model[len(vendor):].strip() if same else self.make_model
        commands = ','.join(f.split('/')[-1].upper() for f in self.formats if f != 'application/octet-stream')
        return f'MFG:{vendor};MDL:{model};CMD:{commands};'

    # --- attribute sets ---

    def printer_attributes(self, ctx: Context) -> list[tuple[str, Attribute]]:
        """(group, attribute) pairs; group is 'description' or 'template'.

        Every Get-Printer-Attributes asks for the same set but its clock values: the set is built
        and encoded once per address a client uses (a printer URI), the clock values each time."""
        key = (ctx.printer_uri, ctx.more_info, ctx.secure)
        built = self._attribute_sets.get(key)
        if built is None:
            pairs = self._build_printer_attributes(ctx)
            live = [index for index, (_, attribute) in enumerate(pairs)
                    if attribute.name in _CLOCK_ATTRIBUTES and attribute.name not in self.imported]
            for index, (_, attribute) in enumerate(pairs):
                if index not in live:
                    out: list[bytes] = []
                    _pack_values(attribute.name, attribute.tags, attribute.values, out)
                    attribute.packed = b''.join(out)
            if len(self._attribute_sets) >= MAX_ATTRIBUTE_SETS:   # a client varying its Host header
                self._attribute_sets.pop(next(iter(self._attribute_sets)))
            built = self._attribute_sets[key] = (pairs, live)
        pairs, live = built
        if not live:
            return list(pairs)
        now = self.reactor.seconds()
        clock = {'printer-up-time': (INTEGER, self.up_time(now)), 'printer-current-time': (DATE_TIME, self.now(now))}
        fresh = list(pairs)
        for index in live:
            group, attribute = fresh[index]
            tag, value = clock[attribute.name]
            fresh[index] = (group, Attribute(attribute.name, tag, [value]))
        return fresh

    def _build_printer_attributes(self, ctx: Context) -> list[tuple[str, Attribute]]:
        a4 = MEDIA[0]

        def size(entry):
            return collection(x_dimension=(INTEGER, entry[1]), y_dimension=(INTEGER, entry[2]))

        def media_col(entry):
            return collection(media_size=(BEG_COLLECTION, size(entry)),
                              media_type=(KEYWORD, 'stationery'), media_source=(KEYWORD, 'auto'))

        description = [
            ('printer-uri-supported', URI, [ctx.printer_uri]),
            ('uri-security-supported', KEYWORD, ['tls' if ctx.secure else 'none']),
            ('uri-authentication-supported', KEYWORD, ['none']),
            ('printer-name', NAME, [self.name]),
            ('printer-location', TEXT, [self.location]),
            ('printer-info', TEXT, [self.info]),
            ('printer-more-info', URI, [ctx.more_info]),
            ('printer-make-and-model', TEXT, [self.make_model]),
            ('printer-device-id', TEXT, [self.device_id()]),
            ('printer-uuid', URI, [self.uuid.urn]),
            ('printer-state', ENUM, [PRINTER_IDLE]),
            ('printer-state-reasons', KEYWORD, ['none']),
            ('printer-state-message', TEXT, ['Idle']),
            ('printer-is-accepting-jobs', BOOLEAN, [True]),
            ('queued-job-count', INTEGER, [0]),
            ('printer-up-time', INTEGER, [self.up_time()]),
            ('printer-current-time', DATE_TIME, [self.now()]),
            ('ipp-versions-supported', KEYWORD, list(self.versions)),
            ('operations-supported', ENUM, [OP[name] for name in SERVED_OPERATIONS]),
            ('charset-configured', CHARSET, ['utf-8']),
            ('charset-supported', CHARSET, ['utf-8']),
            ('natural-language-configured', LANGUAGE, ['en']),
            ('generated-natural-language-supported', LANGUAGE, ['en']),
            ('document-format-default', MIME, ['application/octet-stream']),
            ('document-format-supported', MIME, list(self.formats)),
            ('compression-supported', KEYWORD, ['none']),
            ('pdl-override-supported', KEYWORD, ['attempted']),
            ('color-supported', BOOLEAN, [self.color]),
            ('pages-per-minute', INTEGER, [self.ppm]),
            *([('pages-per-minute-color', INTEGER, [self.ppm])] if self.color else []),
            ('multiple-document-jobs-supported', BOOLEAN, [False]),
            ('multiple-operation-time-out', INTEGER, [60]),
            ('job-k-octets-supported', RANGE, [Range(0, (1 << 31) - 1)]),
            ('which-jobs-supported', KEYWORD, ['completed', 'not-completed', 'all']),
            # PWG 5100.13 marker attributes (CUPS reads these): the persona's toner cartridges.
            ('marker-names', NAME, [s.description for s in self.supplies]),
            ('marker-colors', NAME, [MARKER_COLOURS.get(s.colour, '#none') for s in self.supplies]),
            ('marker-types', KEYWORD, ['ink-cartridge' if s.kind == 'ink' else 'toner' for s in self.supplies]),
            ('marker-levels', INTEGER, [_percent(s.level, s.capacity) for s in self.supplies]),
            ('marker-low-levels', INTEGER, [5] * len(self.supplies)),
            ('marker-high-levels', INTEGER, [100] * len(self.supplies)),
        ]
        template = [
            ('copies-default', INTEGER, [1]),
            ('copies-supported', RANGE, [Range(1, 999)]),
            ('finishings-default', ENUM, [3]),
            ('finishings-supported', ENUM, [3]),
            ('media-default', KEYWORD, [a4[0]]),
            ('media-ready', KEYWORD, [a4[0], MEDIA[3][0]]),
            ('media-supported', KEYWORD, [entry[0] for entry in MEDIA]),
            ('media-col-default', BEG_COLLECTION, [media_col(a4)]),
            ('media-col-ready', BEG_COLLECTION, [media_col(a4), media_col(MEDIA[3])]),
            ('media-col-database', BEG_COLLECTION, [media_col(entry) for entry in MEDIA]),
            ('media-col-supported', KEYWORD, ['media-size', 'media-type', 'media-source']),
            ('media-size-supported', BEG_COLLECTION, [size(entry) for entry in MEDIA]),
            ('media-type-supported', KEYWORD, ['stationery']),
            ('media-source-supported', KEYWORD, ['auto', 'tray-1', 'manual']),
            ('orientation-requested-default', ENUM, [3]),
            ('orientation-requested-supported', ENUM, [3, 4, 5, 6]),
            ('output-bin-default', KEYWORD, ['face-down']),
            ('output-bin-supported', KEYWORD, ['face-down']),
            ('print-quality-default', ENUM, [4]),
            ('print-quality-supported', ENUM, [3, 4, 5]),
            ('printer-resolution-default', RESOLUTION, [Resolution(600, 600, 3)]),
            ('printer-resolution-supported', RESOLUTION, [Resolution(600, 600, 3),
                                                          Resolution(1200, 1200, 3)]),
            ('sides-default', KEYWORD, ['one-sided']),
            ('sides-supported', KEYWORD, ['one-sided', 'two-sided-long-edge', 'two-sided-short-edge']),
            ('number-up-default', INTEGER, [1]),
            ('number-up-supported', INTEGER, [1, 2, 4]),
            ('job-sheets-default', KEYWORD, ['none']),
            ('job-sheets-supported', KEYWORD, ['none']),
            ('print-color-mode-default', KEYWORD, ['color' if self.color else 'monochrome']),
            ('print-color-mode-supported', KEYWORD, ['monochrome', 'color'] if self.color else ['monochrome']),
        ]
        generated = ([('printer-description', Attribute(n, t, v)) for n, t, v in description]
                     + [('job-template', Attribute(n, t, v)) for n, t, v in template])
        return self._with_imported(generated)

    def _with_imported(self, generated: list[tuple[str, Attribute]]) -> list[tuple[str, Attribute]]:
        """Imported attributes replace generated ones of the same name; new ones are description."""
        if not self.imported:
            return generated
        merged = [(group, self.imported.get(attribute.name, attribute)) for group, attribute in generated]
        known = {attribute.name for _, attribute in generated}
        merged += [('printer-description', attribute) for name, attribute in self.imported.items()
                   if name not in known]
        return merged

    def job_attributes(self, job: Job, ctx: Context) -> list[Attribute]:
        created = self.up_time(job.created)
        state_reason, message = {
            JOB_COMPLETED: ('job-completed-successfully', 'Job completed'),
            JOB_CANCELED: ('job-canceled-by-user', 'Job canceled'),
        }.get(job.state, ('none', 'Job pending'))
        finished = job.state >= JOB_CANCELED
        return [
            Attribute('job-id', INTEGER, [job.id]),
            Attribute('job-uri', URI, [f'{ctx.printer_uri}/{job.id}']),
            Attribute('job-printer-uri', URI, [ctx.printer_uri]),
            Attribute('job-more-info', URI, [f'{ctx.more_info}jobs/{job.id}']),
            Attribute('job-name', NAME, [job.name]),
            Attribute('job-originating-user-name', NAME, [job.user]),
            Attribute('job-originating-host-name', NAME, [job.host]),
            Attribute('job-state', ENUM, [job.state]),
            Attribute('job-state-reasons', KEYWORD, [state_reason]),
            Attribute('job-state-message', TEXT, [message]),
            Attribute('number-of-documents', INTEGER, [1]),
            Attribute('time-at-creation', INTEGER, [created]),
            Attribute('time-at-processing', INTEGER, [created]),
            Attribute('time-at-completed', *((INTEGER, [created]) if finished else (NO_VALUE, [None]))),
            Attribute('job-printer-up-time', INTEGER, [self.up_time()]),
            Attribute('date-time-at-creation', DATE_TIME, [self.now(job.created)]),
            Attribute('date-time-at-processing', DATE_TIME, [self.now(job.created)]),
            Attribute('date-time-at-completed',
                      *((DATE_TIME, [self.now(job.created)]) if finished else (NO_VALUE, [None]))),
            Attribute('job-k-octets', INTEGER, [math.ceil(job.size / 1024)]),
            Attribute('document-format', MIME, [job.document_format]),
        ]

    def find_job(self, job_id) -> Job | None:
        for job in self.jobs:
            if job.id == job_id:
                return job
        return None


_CLOCK_ATTRIBUTES = ('printer-up-time', 'printer-current-time')   # what changes between requests
MARKER_COLOURS = {'black': '#000000', 'cyan': '#00FFFF', 'magenta': '#FF00FF', 'yellow': '#FFFF00'}
_SYNTAX_TAGS = {
    'textWithoutLanguage': TEXT, 'nameWithoutLanguage': NAME, 'textWithLanguage': TEXT,
    'nameWithLanguage': NAME, 'keyword': KEYWORD, 'uri': URI, 'uriScheme': URI_SCHEME, 'charset': CHARSET,
    'naturalLanguage': LANGUAGE, 'mimeMediaType': MIME, 'integer': INTEGER, 'boolean': BOOLEAN,
    'enum': ENUM, 'rangeOfInteger': RANGE, 'resolution': RESOLUTION, 'dateTime': DATE_TIME,
    'octetString': OCTET_STRING, 'no-value': NO_VALUE, 'unknown': UNKNOWN,
}


def _percent(level: int, capacity: int) -> int:
    """A Printer-MIB supply level as marker-levels wants it (-1 unknown, -3 some left)."""
    if level < 0 or capacity <= 0:
        return -3 if level == -3 else -1
    return min(100, round(level * 100 / capacity))


def imported_attribute(name: str, entry: dict) -> Attribute:
    """A validated ``ipp_attributes`` entry as the Attribute the stub encodes.

    textWithLanguage/nameWithLanguage are served without language (ipptool does not print the
    language); a dateTime is served as captured."""
    syntax, values = entry['syntax'], entry['values']
    tag = _SYNTAX_TAGS[syntax]
    if tag in (NO_VALUE, UNKNOWN):
        return Attribute(name, tag, [None])
    if tag == RANGE:
        values = [Range(*value) for value in values]
    elif tag == RESOLUTION:
        values = [_resolution(value) for value in values]
    elif tag == DATE_TIME:
        values = [datetime.datetime.fromisoformat(value.replace('Z', '+00:00')) for value in values]
    elif tag == OCTET_STRING:
        values = [value.encode('utf-8') for value in values]
    attribute = Attribute(name, tag, list(values))
    try:
        _pack_values(name, attribute.tags, attribute.values, [])   # fail at listen, not per request
    except IppError as exc:
        raise persona_data.PersonaDataError(f'ipp_attributes[{name}]: {exc}') from None
    return attribute


def _resolution(text: str) -> Resolution:
    match = re.fullmatch(r'(\d+)x(\d+)(dpi|dpcm)', text)
    if match is None:
        raise persona_data.PersonaDataError(f'resolution {text!r} is not like 600x600dpi')
    return Resolution(int(match.group(1)), int(match.group(2)), 3 if match.group(3) == 'dpi' else 4)


def _requested(message: Message, default: tuple[str, ...]) -> set[str]:
    found = message.get('requested-attributes', OPERATION)
    if found is None:
        return set(default)
    return {value for value in found.values if isinstance(value, str)}


def _select(attributes: list[tuple[str, Attribute]], requested: set[str]) -> list[Attribute]:
    if 'all' in requested:
        return [attribute for _, attribute in attributes]
    return [attribute for group, attribute in attributes
            if attribute.name in requested or group in requested]


def _response(request: Message, status: int, message: str = '') -> Message:
    version = request.version if request.version in SUPPORTED_VERSIONS else (1, 1)
    response = Message(code=status, request_id=request.request_id, version=version)
    operation = response.add_group(OPERATION)
    operation.add('attributes-charset', CHARSET, 'utf-8')
    operation.add('attributes-natural-language', LANGUAGE, 'en')
    operation.add('status-message', TEXT, message or status_name(status))
    return response


def _unsupported(response: Message, *attributes: Attribute) -> Message:
    group = response.add_group(UNSUPPORTED_GROUP)
    group.attributes.extend(attributes)
    return response


def _check_request(message: Message) -> Message | None:
    """An error response for a request RFC 8011 section 4.1 rejects, else None."""
    if message.version not in SUPPORTED_VERSIONS:
        return _response(message, S['server-error-version-not-supported'],
                         f'IPP/{message.version[0]}.{message.version[1]} is not supported')
    if message.request_id <= 0:
        return _response(message, S['client-error-bad-request'], 'request-id must be 1..2147483647')
    operation = message.groups[0] if message.groups and message.groups[0].tag == OPERATION else None
    if operation is None or len(operation.attributes) < 2:
        return _response(message, S['client-error-bad-request'], 'missing operation attributes')
    first, second = operation.attributes[:2]
    if first.name != 'attributes-charset' or first.tag != CHARSET:
        return _response(message, S['client-error-bad-request'],
                         'attributes-charset must be the first operation attribute')
    if second.name != 'attributes-natural-language' or second.tag != LANGUAGE:
        return _response(message, S['client-error-bad-request'],
                         'attributes-natural-language must be the second operation attribute')
    if str(first.value).lower() not in ('utf-8', 'us-ascii'):
        return _unsupported(_response(message, S['client-error-charset-not-supported']), first)
    if sum(1 for group in message.groups if group.tag == OPERATION) > 1:
        return _response(message, S['client-error-bad-request'], 'more than one operation group')
    if message.code not in {OP[name] for name in SERVED_OPERATIONS}:
        return _response(message, S['server-error-operation-not-supported'],
                         f'{operation_name(message.code)} is not supported')
    target = operation.get('printer-uri') or operation.get('job-uri')
    if target is None or target.tag != URI:
        return _response(message, S['client-error-bad-request'], 'missing printer-uri')
    return None


def _job_from_request(printer: Printer, message: Message) -> tuple[Job | None, Message | None]:
    job_id = message.value('job-id', OPERATION)
    if job_id is None:
        job_uri = message.value('job-uri', OPERATION)
        match = re.search(r'/(\d+)$', job_uri) if isinstance(job_uri, str) else None
        job_id = int(match.group(1)) if match else None
    if not isinstance(job_id, int) or isinstance(job_id, bool):
        return None, _response(message, S['client-error-bad-request'], 'missing job-id')
    job = printer.find_job(job_id)
    if job is None:
        return None, _response(message, S['client-error-not-found'], f'job {job_id} does not exist')
    return job, None


def handle(printer: Printer, message: Message, ctx: Context, document_size: int | None = None
           ) -> tuple[Message, dict[str, Any]]:
    """The response to one decoded request, and the witness record for it.

    ``document_size`` is the length of the data after the attributes when the
    caller did not keep it in ``message.data`` (large documents).
    """
    size = len(message.data) if document_size is None else document_size
    record: dict[str, Any] = {'op': operation_name(message.code), 'request_id': message.request_id,
                              'version': f'{message.version[0]}.{message.version[1]}'}
    response = _check_request(message)
    if response is None:
        response = _OPERATION_HANDLERS[message.code](printer, message, ctx, size, record)
    record['ipp_status'] = status_name(response.code)
    return response, record


def _document_checks(printer: Printer, message: Message) -> Message | None:
    document_format = message.get('document-format', OPERATION)
    if document_format is not None and document_format.value not in printer.formats:
        return _unsupported(_response(message, S['client-error-document-format-not-supported'],
                                      f'{document_format.value} is not supported'), document_format)
    compression = message.get('compression', OPERATION)
    if compression is not None and compression.value != 'none':
        return _unsupported(_response(message, S['client-error-compression-not-supported']),
                            compression)
    return None


def _print_job(printer: Printer, message: Message, ctx: Context, size: int, record: dict) -> Message:
    error = _document_checks(printer, message)
    if error is not None:
        return error
    user = message.value('requesting-user-name', OPERATION) or 'anonymous'
    name = message.value('job-name', OPERATION) or message.value('document-name', OPERATION) or 'Untitled'
    user = user.text if isinstance(user, LangString) else str(user)
    name = name.text if isinstance(name, LangString) else str(name)
    job = Job(id=printer.next_job_id, name=name[:255], user=user[:255], host=ctx.peer, size=size,
              document_format=str(message.value('document-format', OPERATION) or 'application/octet-stream'),
              created=printer.reactor.seconds())
    printer.next_job_id += 1
    printer.jobs.append(job)
    record.update({'document_bytes': size, 'job_id': job.id, 'user': job.user, 'job': job.name,
                   'document_format': job.document_format})
    response = _response(message, S['successful-ok'])
    wanted = ('job-id', 'job-uri', 'job-state', 'job-state-reasons', 'job-state-message',
              'job-originating-host-name')
    group = response.add_group(JOB)
    group.attributes.extend(a for a in printer.job_attributes(job, ctx) if a.name in wanted)
    return response


def _validate_job(printer: Printer, message: Message, ctx: Context, size: int, record: dict) -> Message:
    return _document_checks(printer, message) or _response(message, S['successful-ok'])


def _get_printer_attributes(printer: Printer, message: Message, ctx: Context, size: int,
                            record: dict) -> Message:
    requested = _requested(message, ('all',))
    response = _response(message, S['successful-ok'])
    response.add_group(PRINTER).attributes.extend(_select(printer.printer_attributes(ctx), requested))
    record['requested'] = sorted(requested)[:8]
    return response


def _job_group(printer: Printer, job: Job, ctx: Context, requested: set[str]) -> list[Attribute]:
    pairs = [('job-description', attribute) for attribute in printer.job_attributes(job, ctx)]
    return _select(pairs, requested)


def _get_jobs(printer: Printer, message: Message, ctx: Context, size: int, record: dict) -> Message:
    which = message.get('which-jobs', OPERATION)
    which_value = which.value if which is not None else 'not-completed'
    if which_value not in ('completed', 'not-completed', 'all'):
        return _unsupported(_response(message, S['client-error-attributes-or-values-not-supported']),
                            which)
    jobs = [job for job in reversed(printer.jobs)
            if which_value == 'all' or (job.state >= JOB_CANCELED) == (which_value == 'completed')]
    if message.value('my-jobs', OPERATION) is True:
        user = message.value('requesting-user-name', OPERATION)
        user = user.text if isinstance(user, LangString) else user
        jobs = [job for job in jobs if job.user == user]
    limit = message.value('limit', OPERATION)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        jobs = jobs[:limit]
    requested = _requested(message, ('job-id', 'job-uri'))
    response = _response(message, S['successful-ok'])
    for job in jobs:
        response.add_group(JOB).attributes.extend(_job_group(printer, job, ctx, requested))
    record['jobs'] = len(jobs)
    return response


def _get_job_attributes(printer: Printer, message: Message, ctx: Context, size: int,
                        record: dict) -> Message:
    job, error = _job_from_request(printer, message)
    if error is not None:
        return error
    record['job_id'] = job.id
    response = _response(message, S['successful-ok'])
    response.add_group(JOB).attributes.extend(
        _job_group(printer, job, ctx, _requested(message, ('all',))))
    return response


def _cancel_job(printer: Printer, message: Message, ctx: Context, size: int, record: dict) -> Message:
    job, error = _job_from_request(printer, message)
    if error is not None:
        return error
    record['job_id'] = job.id
    if job.state >= JOB_CANCELED:
        return _response(message, S['client-error-not-possible'], f'job {job.id} is already finished')
    job.state = JOB_CANCELED
    return _response(message, S['successful-ok'])


_OPERATION_HANDLERS = {
    OP['Print-Job']: _print_job,
    OP['Validate-Job']: _validate_job,
    OP['Get-Printer-Attributes']: _get_printer_attributes,
    OP['Get-Jobs']: _get_jobs,
    OP['Get-Job-Attributes']: _get_job_attributes,
    OP['Cancel-Job']: _cancel_job,
}


# --- server stub (twisted.web) ----------------------------------------------

_HOST_HEADER = re.compile(r'^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$')


class IppResource(Resource):
    """POST application/ipp -> the printer's IPP response; any path below it too (job URIs).

    Mounted in the ``http`` module's Site, which adds the Server and lab headers and
    reports every request through ``on_request``; this resource adds the IPP fields to
    that record with ``http.note`` ('op', 'ipp_status', 'document_bytes', 'job_id', ...).
    """

    isLeaf = True

    def __init__(self, printer: Printer) -> None:
        super().__init__()
        self.printer = printer

    def _context(self, request) -> Context:
        local = request.getHost()
        # Bytes, decoded leniently: a str name makes Twisted decode the value as strict UTF-8,
        # which a hostile byte turns into an unhandled UnicodeDecodeError (a 500 and a traceback).
        host = (request.getHeader(b'host') or b'').decode('latin-1').strip()
        if not _HOST_HEADER.match(host):
            host = f'{local.host}:{local.port}'
        return Context(host=host, path=request.path.decode('latin-1'), secure=request.isSecure(),
                       peer=request.getClientAddress().host, port=local.port)

    def _keep_document(self, body, offset: int, record: dict, peer: str) -> None:
        """An accepted Print-Job's document, into the host's jobstore (a workflow passes it on)."""
        body.seek(offset)
        digest, kept, size = hashlib.sha256(), bytearray(), 0
        while chunk := body.read(1 << 16):
            digest.update(chunk)
            size += len(chunk)
            if len(kept) + len(chunk) <= jobstore.MAX_DOCUMENT_BYTES:
                kept += chunk
        jobstore.store_for(self.printer.persona.host).keep(jobstore.Document(
            record['job'], 'print-job', size, digest.hexdigest(), via='ipp', peer=peer,
            owner=record['user'], data=bytes(kept) if len(kept) == size else None))

    @staticmethod
    def _plain(request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader('content-type', 'text/plain; charset=utf-8')
        return f'{code} {web_http.RESPONSES.get(code, b"").decode()}: {text}\n'.encode()

    def render(self, request) -> bytes:
        if request.method != b'POST':
            request.setHeader('allow', 'POST')
            return self._plain(request, web_http.NOT_ALLOWED, 'IPP requests are POSTs')
        return self.render_POST(request)

    def render_POST(self, request) -> bytes:
        raw_type = request.getHeader(b'content-type') or b''
        try:
            content_type = raw_type.decode('ascii').split(';')[0].strip().lower()
        except UnicodeDecodeError:
            return self._plain(request, web_http.BAD_REQUEST, 'Content-Type is not ASCII')
        if content_type != CONTENT_TYPE:
            return self._plain(request, web_http.BAD_REQUEST,
                               f'Content-Type must be {CONTENT_TYPE}, got {content_type or "none"!r}')
        body = request.content
        body.seek(0, io.SEEK_END)
        total = body.tell()
        body.seek(0)
        # Only the attributes are read into memory; the document is counted, not kept.
        head = body.read(min(total, MAX_ATTRIBUTES))
        try:
            message, offset = decode_attributes(head)
        except IppError as exc:
            if total > MAX_ATTRIBUTES and 'truncated' in str(exc):
                reason = f'attributes exceed {MAX_ATTRIBUTES} octets'
            else:
                reason = f'malformed IPP message: {exc}'
            return self._plain(request, web_http.BAD_REQUEST, reason)
        response, record = handle(self.printer, message, self._context(request),
                                  document_size=total - offset)
        if record['op'] == 'Print-Job' and 'job' in record:   # accepted: _print_job named the job
            self._keep_document(body, offset, record, request.getClientAddress().host)
        try:
            payload = encode(response)
        except IppError:  # a bug in the printer model, not the client's fault
            _log.failure('cannot encode the IPP response to {op}', op=record['op'])
            return self._plain(request, web_http.INTERNAL_SERVER_ERROR, 'cannot encode the response')
        http.note(request, **record)
        request.setHeader('content-type', CONTENT_TYPE)
        return payload


class _IppDirectory(Resource):
    """/ipp: /ipp/print and /ipp/printer are the printer."""

    def __init__(self, ipp: IppResource) -> None:
        super().__init__()
        for name in PRINTER_PATHS:
            self.putChild(name, ipp)

    def getChild(self, path, request):
        from twisted.web.pages import notFound
        return notFound()


def resources(reactor, persona: Persona) -> dict[bytes, Resource]:
    """One printer's resources for ``http.site_for``: /ipp/print, /ipp/printer and POST /."""
    ipp = IppResource(Printer(reactor, persona))
    return {b'ipp': _IppDirectory(ipp), b'': ipp}


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve IPP (IPPS when listener.security is 'tls') on ``listener``.

    The Site is the ``http`` module's, so the port also answers what an HTTP client asks
    a printer (GET / status, the persona's REST endpoints such as an install page).
    """
    if listener.transport != 'tcp':
        raise ValueError(f'ipp runs over tcp, not {listener.transport!r}')
    persona = ipps_persona(persona)
    site = http.site_for(listener, persona, resources(reactor, persona), reactor=reactor,
                         on_request=on_request)
    return http.listen_site(reactor, listener, persona, site, interface=interface)


def ipps_persona(persona: Persona) -> Persona:
    """The persona with TLS capped at 1.2 unless it says otherwise: CUPS 2.4 (GnuTLS) clients
    with a timeout misread a TLS 1.3 NewSessionTicket as an empty response (see ``tls``)."""
    if persona.identity.get('tls_max_version'):
        return persona
    return dataclasses.replace(persona, identity={**persona.identity, 'tls_max_version': IPPS_TLS_MAX})


# --- client probe -------------------------------------------------------------

PRINTER_STATES = {3: 'idle', 4: 'processing', 5: 'stopped'}
JOB_STATES = {3: 'pending', 4: 'pending-held', 5: 'processing', 6: 'processing-stopped',
              7: 'canceled', 8: 'aborted', 9: 'completed'}
PROBE_REQUESTED = ('printer-name', 'printer-make-and-model', 'printer-state', 'printer-state-reasons',
                   'printer-is-accepting-jobs', 'printer-uri-supported', 'operations-supported',
                   'document-format-supported', 'ipp-versions-supported')
USER_AGENT = 'CUPS/2.4 (Linux; x86_64) IPP/2.0'


def _size_text(size: int) -> str:
    return f'{size // 1024} KiB' if size >= 1024 and size % 1024 == 0 else f'{size} B'


def _operation_group(message: Message, printer_uri: str, user: str) -> Group:
    group = message.add_group(OPERATION)
    group.add('attributes-charset', CHARSET, 'utf-8')
    group.add('attributes-natural-language', LANGUAGE, 'en')
    group.add('printer-uri', URI, printer_uri)
    group.add('requesting-user-name', NAME, user)
    return group


def get_printer_attributes_request(request_id: int, printer_uri: str, user: str,
                                   requested: tuple[str, ...] = PROBE_REQUESTED) -> Message:
    message = Message(OP['Get-Printer-Attributes'], request_id)
    _operation_group(message, printer_uri, user).add('requested-attributes', KEYWORD, *requested)
    return message


def print_job_request(request_id: int, printer_uri: str, user: str, job_name: str,
                      document: bytes, document_format: str) -> Message:
    message = Message(OP['Print-Job'], request_id, data=document)
    group = _operation_group(message, printer_uri, user)
    group.add('job-name', NAME, job_name)
    group.add('document-format', MIME, document_format)
    message.add_group(JOB).add('copies', INTEGER, 1)
    return message


class _PrinterExchange(http.HttpVerdict):
    """Get-Printer-Attributes [+ Print-Job] on one keep-alive connection (``http.HttpClient``).

    ``done`` fires once the verdict is known *and* every connection is closed.
    """

    awaited = 'IPP exchange'

    def __init__(self, reactor, target: ProbeTarget) -> None:
        super().__init__(reactor, target)
        options = target.options or {}
        self.secure = target.security == 'tls'
        self.mode = options.get('mode') or 'print'
        self.path = str(options.get('path') or DEFAULT_PATH)
        authority = f'{target.server_name or target.host}:{target.port}'
        self.printer_uri = f'{"ipps" if self.secure else "ipp"}://{authority}{self.path}'
        self.user = str(options.get('user') or 'safeq')
        self.document_format = str(options.get('document_format') or 'application/pdf')
        self.document_size = max(target.size, MIN_DOCUMENT)
        self.request_id = 0
        self._pending: Deferred | None = None
        self.summary = ''   # what came back, for the exchange column
        self.peer_header: str | None = None

    @property
    def exchange(self) -> str:
        text = f'{"IPPS" if self.secure else "IPP"}/2.0 Get-Printer-Attributes'
        if self.mode == 'print':
            text += f' + Print-Job {_size_text(self.document_size)}'
        return f'{text} -> {self.summary}' if self.summary else text

    def start(self) -> Deferred[ProbeResult]:
        if self.mode not in ('print', 'status'):
            self.decide('error', f'options.mode must be print or status, got {self.mode!r}')
            return self.done
        try:
            self.client = http.HttpClient(self.reactor, self.target, keep_alive=True, user_agent=USER_AGENT)
        except Exception as exc:  # TLSMaterialMissing, unreadable CA file
            self.decide('error', f'tls: {exc}')
            return self.done
        self.arm()
        self._send(get_printer_attributes_request(self._next_id(), self.printer_uri, self.user),
                   self._after_printer_attributes)
        return self.done

    def _next_id(self) -> int:
        self.request_id += 1
        return self.request_id

    def _send(self, message: Message, then) -> None:
        d = Deferred.fromCoroutine(self.client.request('POST', self.path, {'content-type': CONTENT_TYPE},
                                                       encode(message)))
        d.addCallback(self._check, message)
        d.addCallback(then)
        d.addErrback(self._failed)
        self._pending = d

    def _check(self, reply: http.Reply, request: Message) -> Message:
        operation = operation_name(request.code)
        # The lab's HTTP stack names the client address it saw (X-Lab-Peer).
        self.peer_header = reply.header('x-lab-peer') or self.peer_header
        if reply.status != 200:
            raise http.Reject(f'{operation}: HTTP {reply.status} {reply.phrase}'.rstrip())
        if reply.media != CONTENT_TYPE:
            raise http.Reject(f'{operation}: Content-Type {reply.header("content-type")!r}, not {CONTENT_TYPE}')
        try:
            answer = decode(reply.body)
        except IppError as exc:
            raise http.Reject(f'{operation}: malformed IPP response: {exc}') from None
        if answer.request_id != request.request_id:
            raise http.Reject(f'{operation}: response request-id {answer.request_id}, '
                              f'sent {request.request_id}')
        if answer.code >= 0x0100:
            message = answer.value('status-message', OPERATION)
            raise http.Reject(f'{operation} -> {status_name(answer.code)}'
                              + (f' ({message})' if isinstance(message, str) and message else ''))
        return answer

    def _after_printer_attributes(self, reply: Message) -> None:
        if self.result is not None:
            return
        name = reply.value('printer-name', PRINTER)
        model = reply.value('printer-make-and-model', PRINTER)
        state = reply.value('printer-state', PRINTER)
        if not isinstance(state, int) or isinstance(state, bool):
            raise http.Reject('Get-Printer-Attributes: no printer-state in the response')
        self.state = PRINTER_STATES.get(state, f'state {state}')
        accepting = reply.value('printer-is-accepting-jobs', PRINTER)
        self.printer = f'{_text(name) or "?"} ({_text(model) or "?"}) {self.state}'
        if accepting is False:
            self.printer += ', not accepting jobs'
        if self.mode == 'status':
            self.summary = self.state
            self.decide('ok', f'answered by {self.printer}', peer_seen=self.peer_header)
            return
        job_name, document = self._job()
        if document is None:
            self.decide('error', job_name)   # a workflow hop whose holder does not have the job
            return
        self._send(print_job_request(self._next_id(), self.printer_uri, self.user,
                                     job_name, document, self.document_format),
                   self._after_print_job)

    def _job(self) -> tuple[str, bytes | None]:
        """(job-name, document): the job the holder keeps under ``carries`` (or a new one it then
        keeps), else a new document named after the probe; (why, None) when the holder has the job
        without its bytes."""
        make = lambda: print_document(self.document_size, self.document_format)  # noqa: E731
        carried, why = jobstore.to_send(self.target.options or {}, ('print-job',), make)
        if why:
            return why, None
        if carried is not None:
            self.document_size = carried.size
            return carried.name, carried.data
        return f'safeq-lab {self.target.id or "probe"}', make()

    def _after_print_job(self, reply: Message) -> None:
        if self.result is not None:
            return
        job_id = reply.value('job-id', JOB)
        if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id <= 0:
            raise http.Reject('Print-Job: successful-ok but no job-id in the response')
        state = reply.value('job-state', JOB)
        peer = reply.value('job-originating-host-name', JOB)
        self.summary = f'job {job_id}'
        self.decide('ok', f'answered by {self.printer}; job {job_id} '
                          f'{JOB_STATES.get(state, "state unknown")} ({self.document_size} B)',
                    peer_seen=_text(peer) or self.peer_header)

    def _failed(self, failure) -> None:
        if self.result is not None:
            return None  # e.g. the cancellation our own verdict caused
        self.decide(*http.classify_failure(failure, 'IPP response'))
        return None

    def _release(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()   # aborts a connection attempt or an unfinished response
        super()._release()


def _text(value) -> str:
    if isinstance(value, LangString):
        return value.text
    return value if isinstance(value, str) else ''


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Get-Printer-Attributes [+ Print-Job] against ``target``; always fires with a ProbeResult."""
    try:
        if target.transport == 'tcp':
            return _PrinterExchange(reactor, target).start()
    except Exception as exc:
        return crashed(target, f'ipp/{target.transport}', exc)
    return error_result(target, f'ipp/{target.transport}', f'ipp runs over tcp, not {target.transport}')
