"""``http``: HTTP/HTTPS stubs and probes for REST (JSON), SOAP 1.1/1.2 and WebDAV.

One ``twisted.web`` Site per listener port serves all three, because one SafeQ port often
carries several catalog rows (Terminal Server 5021: REST for some terminals, SOAP for
Konica Minolta; an MFD's port 80: IPP and the terminal install page). Requests are told
apart the way real servers do:

* **SOAP** -- a POST with a ``SOAPAction`` header (SOAP 1.1, ``text/xml``) or a
  ``Content-Type: application/soap+xml`` (SOAP 1.2), on any path. The operation is the
  first element of the Body; its child elements are the parameters. Operations are data
  (``http_personas.yaml`` ``soap``: LoginByCard, LoginByPin, GetJobList, GetCredit, Logout).
  A malformed envelope, a DTD, an unknown operation or a missing parameter gets a SOAP
  Fault with HTTP 500 (``soap:Client`` in 1.1, ``env:Sender`` in 1.2).
* **WebDAV** -- under ``/scan/`` (data: ``webdav.collection``): one flat collection of
  scanned documents held in memory (bounded), class 1: OPTIONS, PROPFIND (Depth 0/1,
  207 Multi-Status), PUT (201 new / 204 replaced), GET/HEAD, DELETE.
* **REST** -- everything else: the endpoints of ``http_personas.yaml`` whose ``roles``
  match the persona's roles (job preview PNG on the Spooler Controller, accounting,
  terminal login and application data, IMS registration, payment credit, EUI login,
  MFD install page, ...), plus ``GET /`` (JSON health with the persona's host and roles)
  on every host. Unknown path: 404, wrong method: 405.

Every response carries ``Server:`` (persona ``identity['http_server']``) and two lab
headers, ``X-Lab-Host`` (who answered) and ``X-Lab-Peer`` (the client IP the server saw),
so a probe's result proves end to end which host answered and whom it saw. Every request
that reaches a resource is reported once through ``on_request`` when its response is
done: ``{'transport': 'tcp', 'port', 'peer', 'method', 'path', 'bytes' (request body),
'status', 'tls', ...}`` plus what the handler noted ('op', 'soap', 'stored', ...).

Bodies larger than ``MAX_BODY`` get ``413`` and a closed connection before they are read.

Security: ``tls`` listeners use implicit TLS with the persona's certificate
(``tls.listen_tls``). ``optional`` and ``starttls`` are served as plain HTTP (HTTP has no
upgrade anyone uses); probes say so in their exchange text.

Reuse by other modules (e.g. ``ipp``, whose printers serve IPP and the install page on one
port)::

    site = http.site_for(listener, persona, {b'ipp': ipp_resource, b'printers': ...},
                         reactor=reactor, on_request=on_request)
    port = http.listen_site(reactor, listener, persona, site, interface=interface)

or simply ``http.listen(..., extra_resources={...})``. A protocol that is HTTP underneath but
serves only its own API (``etcd``, ``infinispan``) mounts its root alone with
``http.lab_site(root, persona, reactor=..., on_request=...)`` and probes with
``http.run_plan(reactor, target, plan)``. Extra resources are children of
the root (``b'ipp'`` serves ``/ipp/...``); the key ``b''`` receives requests for ``/``
itself except GET/HEAD (which stay the health check). They inherit the Server and lab
headers and the ``on_request`` record; call ``http.note(request, op='Print-Job', ...)``
to add fields to that record instead of calling ``on_request`` yourself.

The probe (``probe``) uses ``twisted.web.client.Agent``; for HTTPS it connects with
``tls.client_creator(target)``, so the chain (target.ca_file) and host name
(target.server_name) are verified. What it asks depends on target.protocol and
target.flow (data ``flows`` / ``soap.flows``); options: ``endpoint`` (REST endpoint name),
``operation`` and ``soap_version`` ('1.1' | '1.2'), ``size_floor`` (bytes; documents
smaller than this are sent at this size, default 200 KiB).
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import json
import math
import os
import re
import secrets
import string
import struct
import uuid
import xml.etree.ElementTree as ET
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import cached_property, lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode
from xml.sax.saxutils import escape as xml_escape

import yaml
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.web.http import HTTPChannel, PotentialDataLoss
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from .base import Listener, Persona, ProbeResult, ProbeTarget
from twisted import version as twisted_version

from .serving import LISTEN_BACKLOG, loads_json
from .probing import (BytesProducer, OnRequest, Verdict, classify_os_error, connect_timeout,
                      error_result, no_connection_detail, report)

PROTOCOL_IDS = ('http', 'soap', 'webdav')

DATA_FILE = Path(__file__).with_name('http_personas.yaml')

MAX_BODY = 64 << 20          # any request body; larger: 413 and close, unread
MAX_XML_BODY = 1 << 20       # SOAP envelopes and PROPFIND bodies
MAX_JSON_BODY = 1 << 20      # JSON / form bodies of REST endpoints
DAV_MAX_STORE = 256 << 20    # all documents of one WebDAV collection; oldest evicted first
# Each probe stores one document then reads it back: 500 concurrent probes (of DOC_FLOOR each)
# must all find theirs, so the count bound leaves room for twice that many.
DAV_MAX_DOCS = 1024
MAX_REPLY = 16 << 20         # a probe reads at most this much of one response body
PREVIEW_WIDTH = 256          # probe's preview request: 8-bit gray, this wide
MAX_PREVIEW_SIDE = 4096
DOC_FLOOR = 200 << 10        # a probe's document (scan, print job, preview) is at least this big
IDLE_TIMEOUT = 60            # seconds a server keeps a silent connection
SERVER_HEADER = f'TwistedWeb/{twisted_version.short()}'   # what serves SafeQ's HTTP in the lab
CLOSE_GRACE = 2.0            # seconds a probe waits for its sockets to close after the verdict
USER_AGENT = b'safeq-lab-probe/1'

SOAP11_ENV = 'http://schemas.xmlsoap.org/soap/envelope/'
SOAP12_ENV = 'http://www.w3.org/2003/05/soap-envelope'
SOAP_ENV = {'1.1': SOAP11_ENV, '1.2': SOAP12_ENV}
SOAP_CONTENT_TYPE = {'1.1': 'text/xml; charset=utf-8', '1.2': 'application/soap+xml; charset=utf-8'}
DAV_NS = 'DAV:'

KINDS = ('health', 'json', 'preview', 'upload', 'html')
METHODS = ('GET', 'POST', 'PUT', 'DELETE')
ENCODINGS = ('json', 'form', 'query')
DOCUMENTS = ('pdf', 'pjl', 'bytes')
TEMPLATE_NAMES = {'req', 'user', 'host', 'roles', 'vendor', 'model', 'product', 'port', 'peer',
                  'uuid', 'now', 'size', 'sha256'}


class DataError(ValueError):
    """http_personas.yaml does not describe a usable surface."""


# --- data: the role-specific surface -------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    kind: str
    roles: tuple[str, ...]
    status: int = 200
    required: tuple[str, ...] = ()
    user_by: str = ''
    reply: Any = None
    example: dict = field(default_factory=dict, hash=False)
    encoding: str = 'query'
    document: str = 'bytes'
    content_type: str = 'application/octet-stream'
    marker: str = ''
    template: str = ''
    pattern: re.Pattern = field(default=None, hash=False, compare=False)
    params: tuple[str, ...] = ()

    def serves(self, roles: tuple[str, ...]) -> bool:
        return _matches(roles, self.roles)

    def match(self, raw_path: str) -> dict[str, str] | None:
        found = self.pattern.match(raw_path)
        if found is None:
            return None
        return {name: unquote(value) for name, value in found.groupdict().items()}

    def build_path(self, fields: dict[str, Any]) -> str:
        out = []
        for literal, name, spec, _conv in string.Formatter().parse(self.path):
            out.append(literal)
            if name is not None:
                out.append(quote(str(fields[name]), safe='/' if spec == 'path' else ''))
        return ''.join(out)


@dataclass(frozen=True)
class SoapOperation:
    name: str
    response: str
    required: tuple[str, ...] = ()
    user_by: str = ''
    reply: dict = field(default_factory=dict, hash=False)
    example: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Surface:
    users: tuple[dict, ...]
    user_keys: dict
    endpoints: dict[str, Endpoint]
    flows: dict[str, str]
    soap_namespace: str
    soap_path: str
    soap_default: str
    soap_operations: dict[str, SoapOperation]
    soap_flows: dict[str, str]
    dav_collection: str
    soap_roles: tuple[str, ...] = ('*',)
    dav_roles: tuple[str, ...] = ('*',)

    def find_user(self, by: str, value: Any) -> dict | None:
        key = self.user_keys.get(by, by)
        for user in self.users:
            if str(user.get(key)) == str(value):
                return user
        return None


def _template_fields(value: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(value, str):
        for _literal, name, _spec, _conv in string.Formatter().parse(value):
            if name is not None:
                names.add(re.split(r'[.\[]', name, maxsplit=1)[0])
    elif isinstance(value, dict):
        for item in value.values():
            names |= _template_fields(item)
    elif isinstance(value, list):
        for item in value:
            names |= _template_fields(item)
    return names


def _compile_path(path: str) -> tuple[re.Pattern, tuple[str, ...]]:
    regex, params = ['^'], []
    for literal, name, spec, _conv in string.Formatter().parse(path):
        regex.append(re.escape(literal))
        if name is not None:
            if not name.isidentifier() or spec not in ('', 'path'):
                raise DataError(f'bad path parameter {{{name}:{spec}}} in {path!r}')
            regex.append(f'(?P<{name}>.+)' if spec == 'path' else f'(?P<{name}>[^/]+)')
            params.append(name)
    if path != '/':
        regex.append('/?')
    regex.append('$')
    return re.compile(''.join(regex)), tuple(params)


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise DataError(f'{where}: {what}')


def _endpoint(name: str, item: Any) -> Endpoint:
    where = f'endpoints.{name}'
    _need(isinstance(item, dict), where, 'must be a mapping')
    known = {'method', 'path', 'kind', 'roles', 'status', 'required', 'user_by', 'reply', 'example',
             'encoding', 'document', 'content_type', 'marker', 'template'}
    unknown = sorted(set(item) - known)
    _need(not unknown, where, f'unknown key(s) {unknown}')
    _need(item.get('method') in METHODS, where, f'method must be one of {METHODS}')
    path = item.get('path')
    _need(isinstance(path, str) and path.startswith('/'), where, 'path must start with /')
    _need(item.get('kind') in KINDS, where, f'kind must be one of {KINDS}')
    roles = item.get('roles')
    _need(isinstance(roles, list) and roles and all(isinstance(r, str) and r for r in roles),
          where, 'roles must be a non-empty list of role patterns')
    status = item.get('status', 200)
    _need(isinstance(status, int) and 200 <= status < 300, where, 'status must be a 2xx code')
    encoding = item.get('encoding', 'query')
    _need(encoding in ENCODINGS, where, f'encoding must be one of {ENCODINGS}')
    document = item.get('document', 'bytes')
    _need(document in DOCUMENTS, where, f'document must be one of {DOCUMENTS}')
    example = item.get('example', {})
    _need(isinstance(example, dict), where, 'example must be a mapping')
    pattern, params = _compile_path(path)
    missing = [p for p in params if p not in example]
    _need(not missing, where, f'example lacks path parameter(s) {missing}')
    reply = item.get('reply')
    unknown_names = _template_fields(reply) - TEMPLATE_NAMES
    _need(not unknown_names, where, f'reply uses unknown name(s) {sorted(unknown_names)}')
    user_by = item.get('user_by', '')
    _need('user' not in _template_fields(reply) or user_by, where, 'reply uses user[...] without user_by')
    if item['kind'] in ('json', 'upload'):
        _need(isinstance(reply, dict), where, 'reply must be a mapping')
    if item['kind'] == 'html':
        _need(isinstance(item.get('template'), str) and isinstance(item.get('marker'), str)
              and item['marker'], where, 'html needs template and marker')
        _need(item['marker'] in item['template'], where, 'marker must occur in template')
    return Endpoint(name=name, method=item['method'], path=path, kind=item['kind'], roles=tuple(roles),
                    status=status, required=tuple(item.get('required', ())), user_by=user_by,
                    reply=reply, example=example, encoding=encoding, document=document,
                    content_type=item.get('content_type', 'application/octet-stream'),
                    marker=item.get('marker', ''), template=item.get('template', ''),
                    pattern=pattern, params=params)


def parse_surface(data: Any) -> Surface:
    _need(isinstance(data, dict), 'http data', 'must be a mapping')
    users = data.get('users') or []
    _need(isinstance(users, list) and all(isinstance(u, dict) and u.get('login') for u in users),
          'users', 'must be a list of mappings with a login')
    endpoints = {name: _endpoint(name, item) for name, item in (data.get('endpoints') or {}).items()}
    _need('health' in endpoints and endpoints['health'].kind == 'health', 'endpoints',
          'needs a health endpoint of kind health')
    flows = data.get('flows') or {}
    bad = sorted(f for f, e in flows.items() if e not in endpoints)
    _need(not bad, 'flows', f'name unknown endpoints: {bad}')
    soap = data.get('soap') or {}
    operations = {}
    for name, item in (soap.get('operations') or {}).items():
        where = f'soap.operations.{name}'
        _need(isinstance(item, dict) and isinstance(item.get('response'), str), where, 'needs a response name')
        reply = item.get('reply') or {}
        _need(isinstance(reply, dict), where, 'reply must be a mapping')
        unknown_names = _template_fields(reply) - TEMPLATE_NAMES
        _need(not unknown_names, where, f'reply uses unknown name(s) {sorted(unknown_names)}')
        _need('user' not in _template_fields(reply) or item.get('user_by'), where,
              'reply uses user[...] without user_by')
        operations[name] = SoapOperation(name=name, response=item['response'],
                                         required=tuple(item.get('required', ())),
                                         user_by=item.get('user_by', ''), reply=reply,
                                         example=item.get('example') or {})
    default = soap.get('default_operation', '')
    _need(not operations or default in operations, 'soap.default_operation', 'must name an operation')
    soap_flows = soap.get('flows') or {}
    bad = sorted(f for f, op in soap_flows.items() if op not in operations)
    _need(not bad, 'soap.flows', f'name unknown operations: {bad}')
    collection = (data.get('webdav') or {}).get('collection', 'scan')
    _need(isinstance(collection, str) and collection and '/' not in collection, 'webdav.collection',
          'must be one path segment')
    shadowed = sorted(e.name for e in endpoints.values()
                      if e.path == f'/{collection}' or e.path.startswith(f'/{collection}/'))
    _need(not shadowed, 'endpoints', f'{shadowed} lie under the WebDAV collection /{collection}/')
    soap_roles = soap.get('roles', ['*'])
    dav_roles = (data.get('webdav') or {}).get('roles', ['*'])
    for where, roles in (('soap.roles', soap_roles), ('webdav.roles', dav_roles)):
        _need(isinstance(roles, list) and roles and all(isinstance(r, str) and r for r in roles),
              where, 'must be a non-empty list of role patterns')
    return Surface(soap_roles=tuple(soap_roles), dav_roles=tuple(dav_roles), users=tuple(users), user_keys=dict(data.get('user_keys') or {}), endpoints=endpoints,
                   flows=dict(flows), soap_namespace=soap.get('namespace', 'urn:safeq-lab:terminal'),
                   soap_path=soap.get('path', '/'), soap_default=default, soap_operations=operations,
                   soap_flows=dict(soap_flows), dav_collection=collection)


@lru_cache(maxsize=None)
def load_surface(path: str = str(DATA_FILE)) -> Surface:
    with open(path, encoding='utf-8') as handle:
        return parse_surface(yaml.safe_load(handle))


def warm() -> None:
    load_surface()


# --- templates (shared by server replies and probe checks) -----------------------------------

_FORMATTER = string.Formatter()
_SINGLE = re.compile(r'^\{([^{}]+)\}$')


def render(template: Any, ctx: dict[str, Any]) -> Any:
    """Fill a reply/example template. KeyError (or IndexError/TypeError) when a name is missing."""
    if isinstance(template, str):
        single = _SINGLE.match(template)
        if single:
            return _FORMATTER.get_field(single.group(1), (), ctx)[0]
        return _FORMATTER.vformat(template, (), ctx)
    if isinstance(template, dict):
        return {key: render(value, ctx) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, ctx) for value in template]
    return template


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def check_fields(template: dict, got: dict, ctx: dict[str, Any]) -> list[str]:
    """What is wrong with ``got`` as an answer rendered from ``template`` (empty: nothing).

    Every key must be there; values the client can compute (constants, request echoes,
    the lab user's data, sizes and digests) must match; server-only ones (uuid, host,
    ...) are only required to exist.
    """
    problems = []
    for key, tmpl in template.items():
        if key not in got:
            problems.append(f'{key} missing')
            continue
        try:
            want = render(tmpl, ctx)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
        if isinstance(want, (dict, list)):
            if not isinstance(got[key], (dict, list)) and want:
                problems.append(f'{key} is not structured')
        elif _scalar_text(want) != _scalar_text(got[key]):
            problems.append(f'{key}={got[key]!r}, expected {want!r}')
    return problems


# --- documents (what the probes send and the preview returns) ------------------------------

def _fill(head: bytes, tail: bytes, size: int) -> bytes:
    """head + random filler + tail, exactly ``size`` bytes (truncated if the frame is bigger)."""
    room = size - len(head) - len(tail)
    if room < 0:
        return (head + tail)[:size]
    return head + os.urandom(room) + tail


def scanned_pdf(size: int) -> bytes:
    """A one-page PDF holding a JPEG-like (incompressible) scan image, exactly ``size`` bytes."""
    header = (b'%PDF-1.7\n%\xe2\xe3\xcf\xd3\n'
              b'1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n'
              b'2 0 obj <</Type /Pages /Kids [3 0 R] /Count 1>> endobj\n'
              b'3 0 obj <</Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] '
              b'/Resources <</XObject <</Im0 4 0 R>>>> /Contents 5 0 R>> endobj\n'
              b'5 0 obj <</Length 31>> stream\nq 595 0 0 842 0 0 cm /Im0 Do Q\nendstream endobj\n')
    image_head = b'4 0 obj <</Type /XObject /Subtype /Image /Width 2480 /Height 3508 ' \
                 b'/ColorSpace /DeviceGray /BitsPerComponent 8 /Filter /DCTDecode>> stream\n' \
                 b'\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x01\x01,\x01,\x00\x00'
    trailer = (b'\xff\xd9\nendstream endobj\n'
               b'trailer <</Root 1 0 R /Size 6>>\n%%EOF\n')
    return _fill(header + image_head, trailer, size)


def print_job(size: int) -> bytes:
    """A PJL-wrapped PDF print job, exactly ``size`` bytes."""
    uel = b'\x1b%-12345X'
    head = (uel + b'@PJL JOB NAME="safeq-lab"\r\n@PJL SET USERNAME="alice"\r\n'
            b'@PJL SET DUPLEX=ON\r\n@PJL ENTER LANGUAGE=PDF\r\n')
    tail = uel + b'@PJL EOJ NAME="safeq-lab"\r\n' + uel
    pdf = scanned_pdf(max(0, size - len(head) - len(tail)))
    return (head + pdf + tail)[:size]


def make_document(kind: str, size: int) -> bytes:
    if kind == 'pdf':
        return scanned_pdf(size)
    if kind == 'pjl':
        return print_job(size)
    return os.urandom(size)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def make_png(width: int, height: int) -> bytes:
    """An 8-bit gray PNG of noise (stored, not deflated): about width*height bytes."""
    rows = b''.join(b'\x00' + os.urandom(width) for _ in range(height))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
            + _png_chunk(b'IDAT', zlib.compress(rows, 0)) + _png_chunk(b'IEND', b''))


def check_png(data: bytes) -> tuple[int, int]:
    """(width, height) of a well-formed PNG; ValueError saying what is wrong otherwise."""
    if not data.startswith(b'\x89PNG\r\n\x1a\n'):
        raise ValueError('not a PNG (bad signature)')
    offset, chunks, size = 8, [], None
    while offset < len(data):
        if offset + 12 > len(data):
            raise ValueError('truncated PNG chunk')
        (length,) = struct.unpack('>I', data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        crc = data[offset + 8 + length:offset + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise ValueError(f'truncated PNG {kind!r} chunk')
        if struct.unpack('>I', crc)[0] != zlib.crc32(kind + body):
            raise ValueError(f'PNG {kind!r} chunk CRC mismatch')
        if not chunks and kind != b'IHDR':
            raise ValueError('PNG does not start with IHDR')
        if kind == b'IHDR':
            size = struct.unpack('>II', body[:8])
        chunks.append(kind)
        offset += 12 + length
    if not chunks or chunks[-1] != b'IEND' or b'IDAT' not in chunks:
        raise ValueError('PNG lacks IDAT or does not end with IEND')
    return size


# --- SOAP codec (shared by server and probe) ------------------------------------------------

class SoapFault(Exception):
    """code: 'Client' | 'Server' | 'VersionMismatch' (SOAP 1.1 names; 1.2 maps them)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_FAULT_12 = {'Client': 'Sender', 'Server': 'Receiver', 'VersionMismatch': 'VersionMismatch'}


def _local(tag: str) -> tuple[str, str]:
    if tag.startswith('{'):
        ns, _, local = tag[1:].partition('}')
        return ns, local
    return '', tag


def _xml_fields(fields: dict[str, Any], prefix: str) -> str:
    out = []
    for name, value in fields.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                inner = _xml_fields(item, prefix)
            else:
                inner = xml_escape(_scalar_text(item))
            out.append(f'<{prefix}:{name}>{inner}</{prefix}:{name}>')
    return ''.join(out)


def soap_envelope(version: str, namespace: str, element: str, fields: dict[str, Any]) -> bytes:
    """A SOAP envelope whose Body holds ``<element xmlns=namespace>`` with ``fields`` as children."""
    return ('<?xml version="1.0" encoding="utf-8"?>'
            f'<soap:Envelope xmlns:soap="{SOAP_ENV[version]}"><soap:Body>'
            f'<t:{element} xmlns:t="{xml_escape(namespace)}">{_xml_fields(fields, "t")}</t:{element}>'
            '</soap:Body></soap:Envelope>').encode('utf-8')


def soap_fault(version: str, code: str, reason: str) -> bytes:
    env = SOAP_ENV[version]
    if version == '1.1':
        body = (f'<soap:Fault><faultcode>soap:{code}</faultcode>'
                f'<faultstring>{xml_escape(reason)}</faultstring></soap:Fault>')
    else:
        body = (f'<soap:Fault><soap:Code><soap:Value>soap:{_FAULT_12.get(code, code)}</soap:Value></soap:Code>'
                f'<soap:Reason><soap:Text xml:lang="en">{xml_escape(reason)}</soap:Text></soap:Reason>'
                '</soap:Fault>')
    return ('<?xml version="1.0" encoding="utf-8"?>'
            f'<soap:Envelope xmlns:soap="{env}"><soap:Body>{body}</soap:Body></soap:Envelope>').encode('utf-8')


def _parse_xml(data: bytes, what: str) -> ET.Element:
    # SOAP 1.1/1.2 and our WebDAV forbid DTDs; refusing them also rules out entity tricks.
    if b'<!DOCTYPE' in data or b'<!ENTITY' in data:
        raise SoapFault('Client', f'{what} must not contain a DTD')
    try:
        return ET.fromstring(data)
    except (ET.ParseError, ValueError, LookupError) as exc:
        raise SoapFault('Client', f'{what} is not well-formed XML: {exc}') from None


def parse_soap(data: bytes, version: str | None = None) -> tuple[str, ET.Element]:
    """(version, first Body element) of a SOAP envelope; SoapFault if it is not one."""
    root = _parse_xml(data, 'SOAP message')
    ns, local = _local(root.tag)
    if local != 'Envelope':
        raise SoapFault('Client', f'root element is {local!r}, not a SOAP Envelope')
    found = {env: v for v, env in SOAP_ENV.items()}.get(ns)
    if found is None or (version is not None and found != version):
        raise SoapFault('VersionMismatch', f'Envelope namespace {ns!r} does not match SOAP {version or "1.1/1.2"}')
    body = root.find(f'{{{ns}}}Body')
    if body is None:
        raise SoapFault('Client', 'Envelope has no Body')
    children = list(body)
    if not children:
        raise SoapFault('Client', 'Body is empty')
    return found, children[0]


def soap_params(element: ET.Element) -> dict[str, Any]:
    """Child elements as a dict: text for leaves, nested dicts, repeated names as lists."""
    out: dict[str, Any] = {}
    for child in element:
        name = _local(child.tag)[1]
        value: Any = soap_params(child) if len(child) else (child.text or '').strip()
        if name in out:
            out[name] = out[name] if isinstance(out[name], list) else [out[name]]
            out[name].append(value)
        else:
            out[name] = value
    return out


def fault_text(element: ET.Element) -> str:
    """'<code>: <reason>' of a Fault element (1.1 or 1.2)."""
    params = soap_params(element)
    if 'faultcode' in params:
        return f'{params.get("faultcode")}: {params.get("faultstring", "")}'
    code = params.get('Code', {})
    reason = params.get('Reason', {})
    return f'{code.get("Value", "?") if isinstance(code, dict) else code}: ' \
           f'{reason.get("Text", "") if isinstance(reason, dict) else reason}'


# --- WebDAV codec -----------------------------------------------------------------------------

@dataclass
class DavDocument:
    data: bytes
    content_type: str
    created: float
    modified: float

    @cached_property  # a scan is a MiB: hash it once, not at every PROPFIND
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:32] + '"'


class DavStore:
    """Documents of one flat collection, bounded in count and bytes (oldest evicted first)."""

    def __init__(self, max_bytes: int = DAV_MAX_STORE, max_docs: int = DAV_MAX_DOCS) -> None:
        self.max_bytes = max_bytes
        self.max_docs = max_docs
        self.docs: OrderedDict[str, DavDocument] = OrderedDict()
        self.created = None

    @property
    def size(self) -> int:
        return sum(len(doc.data) for doc in self.docs.values())

    def put(self, name: str, data: bytes, content_type: str, now: float) -> bool:
        """Store; True when it replaced a document."""
        old = self.docs.pop(name, None)
        size = self.size   # once: the loop below would make each PUT quadratic in the count
        while self.docs and (len(self.docs) >= self.max_docs or size + len(data) > self.max_bytes):
            size -= len(self.docs.popitem(last=False)[1].data)
        self.docs[name] = DavDocument(data, content_type, old.created if old else now, now)
        return old is not None


_DAV_PROPS = ('resourcetype', 'displayname', 'getcontentlength', 'getcontenttype', 'getlastmodified',
              'getetag', 'creationdate')


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _iso_date(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _dav_props(name: str, doc: DavDocument | None, created: float) -> dict[str, str]:
    """prop local name -> inner XML, for the collection (doc None) or one document."""
    if doc is None:
        return {'resourcetype': '<D:collection/>', 'displayname': xml_escape(name),
                'getlastmodified': _http_date(created), 'creationdate': _iso_date(created)}
    return {'resourcetype': '', 'displayname': xml_escape(name), 'getcontentlength': str(len(doc.data)),
            'getcontenttype': xml_escape(doc.content_type), 'getlastmodified': _http_date(doc.modified),
            'getetag': xml_escape(doc.etag), 'creationdate': _iso_date(doc.created)}


def parse_propfind(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    """('allprop' | 'propname' | 'prop', [(namespace, name), ...]); SoapFault if malformed."""
    if not data.strip():
        return 'allprop', []
    root = _parse_xml(data, 'PROPFIND body')
    if root.tag != f'{{{DAV_NS}}}propfind':
        raise SoapFault('Client', 'PROPFIND body is not a DAV:propfind element')
    for child in root:
        if child.tag == f'{{{DAV_NS}}}allprop':
            return 'allprop', []
        if child.tag == f'{{{DAV_NS}}}propname':
            return 'propname', []
        if child.tag == f'{{{DAV_NS}}}prop':
            return 'prop', [_local(p.tag) for p in child]
    raise SoapFault('Client', 'DAV:propfind holds no allprop, propname or prop')


def multistatus(entries: list[tuple[str, dict[str, str]]], mode: str,
                wanted: list[tuple[str, str]]) -> bytes:
    """A 207 body: one response per (href, props)."""
    out = ['<?xml version="1.0" encoding="utf-8"?><D:multistatus xmlns:D="DAV:">']
    for href, props in entries:
        out.append(f'<D:response><D:href>{xml_escape(href)}</D:href>')
        if mode == 'prop':
            found = [(ns, n) for ns, n in wanted if ns == DAV_NS and n in props]
            missing = [(ns, n) for ns, n in wanted if (ns, n) not in found]
        else:
            found, missing = [(DAV_NS, n) for n in props], []
        if found or not missing:
            inner = ''.join(f'<D:{n}/>' if mode == 'propname' or props[n] == '' else f'<D:{n}>{props[n]}</D:{n}>'
                            for _ns, n in found)
            out.append(f'<D:propstat><D:prop>{inner}</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>')
        if missing:
            inner = ''.join(f'<x:{n} xmlns:x="{xml_escape(ns)}"/>' for ns, n in missing)
            out.append(f'<D:propstat><D:prop>{inner}</D:prop>'
                       '<D:status>HTTP/1.1 404 Not Found</D:status></D:propstat>')
        out.append('</D:response>')
    out.append('</D:multistatus>')
    return ''.join(out).encode('utf-8')


def parse_multistatus(data: bytes) -> dict[str, dict[str, Any]]:
    """href -> {prop name: text, 'collection': bool} for the 200 propstats of a 207 body."""
    try:
        root = _parse_xml(data, 'Multi-Status body')
    except SoapFault as exc:
        raise ValueError(exc.reason) from None
    if root.tag != f'{{{DAV_NS}}}multistatus':
        raise ValueError(f'root element is {root.tag!r}, not DAV:multistatus')
    out: dict[str, dict[str, Any]] = {}
    for response in root.findall(f'{{{DAV_NS}}}response'):
        href = (response.findtext(f'{{{DAV_NS}}}href') or '').strip()
        props: dict[str, Any] = {'collection': False}
        for propstat in response.findall(f'{{{DAV_NS}}}propstat'):
            status = propstat.findtext(f'{{{DAV_NS}}}status') or ''
            if ' 200 ' not in status + ' ':
                continue
            for prop in propstat.findall(f'{{{DAV_NS}}}prop/*'):
                name = _local(prop.tag)[1]
                props[name] = (prop.text or '').strip()
                if name == 'resourcetype' and prop.find(f'{{{DAV_NS}}}collection') is not None:
                    props['collection'] = True
        out[unquote(href)] = props
    return out


# --- server -----------------------------------------------------------------------------------

def note(request: Request, **fields: Any) -> None:
    """Add fields to the on_request record of ``request`` (for resources mounted via site_for)."""
    notes = getattr(request, 'lab_notes', None)
    if notes is not None:
        notes.update(fields)


class _LabChannel(HTTPChannel):
    """HTTPChannel refusing oversized bodies before reading them."""

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > MAX_BODY:
            self.requests[-1].refuse_body()
            return
        super().allHeadersReceived()


class _LabRequest(Request):
    lab_notes: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lab_notes = {}
        self.lab_body = 0
        self._refused = False

    def refuse_body(self) -> None:
        """413 and close: the body (too big) is never read; later bytes are discarded."""
        self._refused = True
        self.content = BytesIO()
        channel = self.channel
        channel.transport.write(b'HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n'
                                b'Connection: close\r\n\r\n')
        channel.loseConnection()

    def gotLength(self, length: int | None) -> None:
        if not self._refused:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self.lab_body += len(data)
        if self.lab_body > MAX_BODY:  # chunked: no length known up front
            self.refuse_body()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def body(self) -> bytes:
        self.content.seek(0)
        return self.content.read()


class _LabSite(Site):
    noisy = False
    protocol = _LabChannel

    def __init__(self, root: Resource, reactor, persona: Persona, on_request: OnRequest | None) -> None:
        # Bodies are parsed by the resources themselves (bounded), not into request.args.
        super().__init__(root, requestFactory=_LabRequest, reactor=reactor, timeout=IDLE_TIMEOUT,
                         parsePOSTFormSubmission=False)
        self.persona = persona
        self.on_request = on_request
        # A device persona names its vendor's server; SafeQ's own services say what really answers
        # (nmap -sV names it from this header instead of trying every probe it has).
        self.server_header = str(persona.identity.get('http_server') or SERVER_HEADER).encode('latin-1', 'replace')

    # Access logging is replaced by on_request (and its per-second clock timer by nothing).
    def startFactory(self) -> None:
        pass

    def stopFactory(self) -> None:
        pass

    def log(self, request: Request) -> None:
        pass

    def getResourceFor(self, request: _LabRequest):
        request.setHeader(b'server', self.server_header)
        request.setHeader(b'x-lab-host', self.persona.host.encode('utf-8', 'replace'))
        peer = request.getClientAddress()
        request.setHeader(b'x-lab-peer', getattr(peer, 'host', '?').encode('ascii', 'replace'))
        # Known now: once the response is done the request no longer has its channel.
        tls = request.isSecure()
        request.notifyFinish().addBoth(self._record, request, tls)
        return super().getResourceFor(request)

    def _record(self, outcome: Any, request: _LabRequest, tls: bool) -> None:
        peer = request.getClientAddress()
        record = {'transport': 'tcp', 'port': request.getHost().port, 'peer': getattr(peer, 'host', '?'),
                  'method': request.method.decode('latin-1'),
                  'path': request.path.decode('latin-1')[:200], 'bytes': request.lab_body,
                  'status': request.code, 'tls': tls}
        if outcome is not None:  # a Failure: the client went away before the response was done
            record['aborted'] = True
        report(self.on_request, {**record, **request.lab_notes})


def _respond(request: Request, status: int, body: bytes, content_type: str,
             headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b'content-type', content_type.encode('latin-1'))
    for name, value in (headers or {}).items():
        request.setHeader(name.encode('latin-1'), value.encode('latin-1'))
    return body


def _json(request: Request, status: int, value: Any, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps(value, ensure_ascii=False).encode('utf-8')
    return _respond(request, status, body, 'application/json; charset=utf-8', headers)


def _error(request: Request, status: int, message: str, **extra: str) -> bytes:
    return _json(request, status, {'error': message, 'status': status}, extra)


def _media_type(request: Request) -> str:
    value = request.getHeader(b'content-type') or b''
    return value.decode('latin-1').split(';', 1)[0].strip().lower()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _matches(roles: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(role, pattern) for pattern in patterns for role in roles)


class _State:
    """What one Site serves: persona, data, mounted endpoints and in-memory stores."""

    def __init__(self, reactor, persona: Persona, surface: Surface) -> None:
        self.reactor = reactor
        self.persona = persona
        self.surface = surface
        roles = tuple(r.strip().lower().replace('_', '-') for r in persona.roles)
        self.endpoints = [e for e in surface.endpoints.values() if e.serves(roles)]
        self.soap_enabled = _matches(roles, surface.soap_roles)
        self.dav_enabled = _matches(roles, surface.dav_roles)
        self.dav = DavStore()
        self.dav.created = reactor.seconds()

    def context(self, request: Request, **more: Any) -> dict[str, Any]:
        identity = self.persona.identity
        return {'host': self.persona.host, 'roles': ','.join(self.persona.roles),
                'vendor': identity.get('vendor', ''), 'product': identity.get('product', ''),
                'model': identity.get('make_model') or identity.get('product') or self.persona.host,
                'port': request.getHost().port, 'peer': getattr(request.getClientAddress(), 'host', '?'),
                'uuid': str(uuid.uuid4()), 'now': _iso_date(self.reactor.seconds()), **more}


class _Root(Resource):
    """Dispatch: SOAP by content type, extra resources and WebDAV by first segment, else REST."""

    def __init__(self, state: _State, extra: dict[bytes, Resource]) -> None:
        super().__init__()
        self.state = state
        self.extra = dict(extra)
        self.soap = _SoapResource(state)
        self.dav = _DavResource(state)
        self.rest = _RestResource(state)
        self.dav_name = state.surface.dav_collection.encode('utf-8')

    def getChildWithDefault(self, name: bytes, request: Request) -> Resource:
        if self.state.soap_enabled and request.method == b'POST' and (
                request.getHeader(b'soapaction') is not None
                or _media_type(request) == 'application/soap+xml'):
            return self.soap
        if name in self.extra and (name != b'' or request.method not in (b'GET', b'HEAD')):
            return self.extra[name]
        if name == self.dav_name and self.state.dav_enabled:
            return self.dav
        return self.rest

    def render(self, request: Request) -> bytes:  # only if traversal ever stops here
        return self.rest.render(request)


class _RestResource(Resource):
    isLeaf = True

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def render(self, request: _LabRequest) -> bytes:
        raw = request.path.decode('latin-1')
        method = request.method.decode('latin-1')
        allowed = set()
        for endpoint in self.state.endpoints:
            params = endpoint.match(raw)
            if params is None:
                continue
            methods = {endpoint.method} | ({'HEAD'} if endpoint.method == 'GET' else set())
            if method not in methods:
                allowed |= methods
                continue
            note(request, endpoint=endpoint.name)
            try:
                return getattr(self, f'_{endpoint.kind}')(request, endpoint, params)
            except _BadRequest as exc:
                return _error(request, exc.status, str(exc))
        if method == 'OPTIONS' and allowed:
            return _respond(request, 204, b'', 'text/plain', {'allow': ', '.join(sorted(allowed | {'OPTIONS'}))})
        if allowed:
            return _error(request, 405, f'{method} not allowed on {raw}', allow=', '.join(sorted(allowed)))
        return _error(request, 404, f'no such resource on {self.state.persona.host}: {raw}')

    # -- request fields --------------------------------------------------------------------
    def _fields(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str],
                body_is_data: bool = True) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        query = request.uri.split(b'?', 1)[1] if b'?' in request.uri else b''
        try:
            fields.update(parse_qsl(query.decode('utf-8'), keep_blank_values=True))
        except UnicodeDecodeError:
            raise _BadRequest(400, 'query string is not UTF-8') from None
        if body_is_data and request.lab_body:
            if request.lab_body > MAX_JSON_BODY:
                raise _BadRequest(413, f'body exceeds {MAX_JSON_BODY} B')
            media, data = _media_type(request), request.body()
            try:
                if media == 'application/json' or media.endswith('+json'):
                    value = loads_json(data)
                    if not isinstance(value, dict):
                        raise _BadRequest(400, 'JSON body must be an object')
                    fields.update(value)
                elif media == 'application/x-www-form-urlencoded':
                    fields.update(parse_qsl(data.decode('utf-8'), keep_blank_values=True))
                else:
                    raise _BadRequest(415, f'expected application/json or a form, got {media or "nothing"}')
            except (ValueError, UnicodeDecodeError) as exc:
                if isinstance(exc, _BadRequest):
                    raise
                raise _BadRequest(400, f'unreadable {media} body: {exc}') from None
        fields.update(params)
        missing = [name for name in endpoint.required if fields.get(name) in (None, '')]
        if missing:
            raise _BadRequest(400, f'missing field(s): {", ".join(missing)}')
        return fields

    def _user(self, endpoint: Endpoint, fields: dict[str, Any]) -> dict[str, Any]:
        if not endpoint.user_by:
            return {}
        user = self.state.surface.find_user(endpoint.user_by, fields.get(endpoint.user_by))
        if user is None:
            raise _BadRequest(404, f'unknown user {endpoint.user_by}={fields.get(endpoint.user_by)!r}')
        return {'user': user}

    # -- kinds -----------------------------------------------------------------------------
    def _health(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str]) -> bytes:
        ctx = self.state.context(request)
        identity = self.state.persona.identity
        value = {'status': 'UP', 'host': ctx['host'], 'roles': list(self.state.persona.roles),
                 'port': ctx['port'], 'peer': ctx['peer'], 'time': ctx['now']}
        for key in ('vendor', 'product', 'make_model'):
            if identity.get(key):
                value[key] = identity[key]
        return _json(request, 200, value)

    def _json(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str]) -> bytes:
        fields = self._fields(request, endpoint, params)
        ctx = self.state.context(request, req=fields, **self._user(endpoint, fields))
        try:
            reply = render(endpoint.reply, ctx)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _BadRequest(400, f'request lacks what the reply needs: {exc}') from None
        return _json(request, endpoint.status, reply)

    def _preview(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str]) -> bytes:
        fields = self._fields(request, endpoint, params, body_is_data=False)
        try:
            width = int(fields.get('width', 200))
            height = int(fields.get('height', 283))
        except ValueError:
            raise _BadRequest(400, 'width and height must be integers') from None
        if not (1 <= width <= MAX_PREVIEW_SIDE and 1 <= height <= MAX_PREVIEW_SIDE):
            raise _BadRequest(400, f'width and height must be 1-{MAX_PREVIEW_SIDE}')
        image = make_png(width, height)
        note(request, job=fields.get('job', ''), sent=len(image))
        return _respond(request, 200, image, 'image/png', {'cache-control': 'no-store'})

    def _upload(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str]) -> bytes:
        fields = self._fields(request, endpoint, params, body_is_data=False)
        data = request.body()
        if not data:
            raise _BadRequest(400, 'empty document')
        digest = hashlib.sha256(data).hexdigest()
        note(request, stored=len(data))
        ctx = self.state.context(request, req=fields, size=len(data), sha256=digest)
        return _json(request, endpoint.status, render(endpoint.reply, ctx))

    def _html(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str]) -> bytes:
        fields = self._fields(request, endpoint, params, body_is_data=False)
        page = render(endpoint.template, self.state.context(request, req=fields))
        return _respond(request, 200, page.encode('utf-8'), 'text/html; charset=utf-8')


class _SoapResource(Resource):
    isLeaf = True

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def render(self, request: _LabRequest) -> bytes:
        version = '1.2' if _media_type(request) == 'application/soap+xml' else '1.1'
        note(request, soap=version)
        try:
            return self._call(request, version)
        except SoapFault as fault:
            note(request, fault=fault.code)
            return _respond(request, 500, soap_fault(version, fault.code, fault.reason),
                            SOAP_CONTENT_TYPE[version])

    def _call(self, request: _LabRequest, version: str) -> bytes:
        if request.lab_body > MAX_XML_BODY:
            raise SoapFault('Client', f'message exceeds {MAX_XML_BODY} B')
        _found, element = parse_soap(request.body(), version)
        namespace, name = _local(element.tag)
        note(request, op=name)
        surface = self.state.surface
        if namespace != surface.soap_namespace or name not in surface.soap_operations:
            raise SoapFault('Client', f'unknown operation {{{namespace}}}{name}')
        action = self._action(request, version)
        if action and not re.search(rf'(^|[/#:]){re.escape(name)}$', action):
            raise SoapFault('Client', f'SOAPAction {action!r} does not match the Body operation {name}')
        operation = surface.soap_operations[name]
        params = soap_params(element)
        missing = [p for p in operation.required if params.get(p) in (None, '')]
        if missing:
            raise SoapFault('Client', f'{name}: missing parameter(s) {", ".join(missing)}')
        more: dict[str, Any] = {'req': params}
        if operation.user_by:
            user = surface.find_user(operation.user_by, params.get(operation.user_by))
            if user is None:
                raise SoapFault('Client', f'{name}: unknown user {operation.user_by}={params.get(operation.user_by)!r}')
            more['user'] = user
        reply = render(operation.reply, self.state.context(request, **more))
        return _respond(request, 200, soap_envelope(version, surface.soap_namespace, operation.response, reply),
                        SOAP_CONTENT_TYPE[version])

    @staticmethod
    def _action(request: Request, version: str) -> str:
        if version == '1.1':
            return (request.getHeader(b'soapaction') or b'').decode('latin-1').strip().strip('"')
        ctype = (request.getHeader(b'content-type') or b'').decode('latin-1')
        found = re.search(r';\s*action\s*=\s*"?([^";]*)"?', ctype)
        return found.group(1).strip() if found else ''


class _DavResource(Resource):
    isLeaf = True
    ALLOW = 'OPTIONS, GET, HEAD, PUT, DELETE, PROPFIND'

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state
        self.prefix = '/' + state.surface.dav_collection

    def render(self, request: _LabRequest) -> bytes:
        rest = unquote(request.path.decode('latin-1'))[len(self.prefix):]
        if rest not in ('', '/') and not rest.startswith('/'):
            # e.g. /scanner: not our collection at all
            return _RestResource(self.state).render(request)
        name = rest[1:] if rest.startswith('/') else ''
        method = request.method.decode('latin-1')
        note(request, op=method, dav=name or '/')
        handler = getattr(self, f'_{method.lower()}', None) if method.isalpha() else None
        if handler is None:
            return _error(request, 405, f'{method} not supported', allow=self.ALLOW)
        return handler(request, name)

    def _href(self, name: str) -> str:
        return quote(f'{self.prefix}/{name}')

    def _options(self, request: Request, name: str) -> bytes:
        return _respond(request, 200, b'', 'text/plain', {'dav': '1', 'allow': self.ALLOW,
                                                          'ms-author-via': 'DAV'})

    def _propfind(self, request: _LabRequest, name: str) -> bytes:
        depth = (request.getHeader(b'depth') or b'infinity').decode('latin-1').strip().lower()
        if depth not in ('0', '1', 'infinity'):
            return _error(request, 400, f'bad Depth {depth!r}')
        if request.lab_body > MAX_XML_BODY:
            return _error(request, 413, f'PROPFIND body exceeds {MAX_XML_BODY} B')
        try:
            mode, wanted = parse_propfind(request.body())
        except SoapFault as exc:
            return _error(request, 400, exc.reason)
        store = self.state.dav
        if name.rstrip('/'):
            doc = store.docs.get(name)
            if doc is None:
                return _error(request, 404, f'{self._href(name)} not found')
            entries = [(self._href(name), _dav_props(name, doc, doc.created))]
        else:
            entries = [(self.prefix + '/', _dav_props(self.prefix[1:], None, store.created))]
            if depth != '0':  # 'infinity' is the same as 1 here: the collection is flat
                entries += [(self._href(n), _dav_props(n, d, d.created)) for n, d in store.docs.items()]
        note(request, depth=depth, entries=len(entries))
        return _respond(request, 207, multistatus(entries, mode, wanted), 'application/xml; charset=utf-8')

    def _put(self, request: _LabRequest, name: str) -> bytes:
        if not name:
            return _error(request, 405, 'cannot PUT the collection', allow=self.ALLOW)
        if '/' in name:
            return _error(request, 409, f'{self.prefix}/ is flat: no collection {name.rsplit("/", 1)[0]!r}')
        if request.getHeader(b'content-range') is not None:
            return _error(request, 400, 'Content-Range on PUT is not supported')
        data = request.body()
        if len(data) > self.state.dav.max_bytes:
            return _error(request, 413, f'document exceeds {self.state.dav.max_bytes} B')
        replaced = self.state.dav.put(name, data, _media_type(request) or 'application/octet-stream',
                                      self.state.reactor.seconds())
        note(request, stored=len(data))
        doc = self.state.dav.docs[name]
        return _respond(request, 204 if replaced else 201, b'', 'text/plain',
                        {'etag': doc.etag, 'location': self._href(name)})

    def _get(self, request: _LabRequest, name: str) -> bytes:
        store = self.state.dav
        if not name:
            items = ''.join(f'<li><a href="{xml_escape(self._href(n))}">{xml_escape(n)}</a> {len(d.data)} B</li>'
                            for n, d in store.docs.items())
            page = f'<!DOCTYPE html><html><body><h1>{self.prefix}/</h1><ul>{items}</ul></body></html>'
            return _respond(request, 200, page.encode('utf-8'), 'text/html; charset=utf-8')
        doc = store.docs.get(name)
        if doc is None:
            return _error(request, 404, f'{self._href(name)} not found')
        note(request, sent=len(doc.data))
        return _respond(request, 200, doc.data, doc.content_type,
                        {'etag': doc.etag, 'last-modified': _http_date(doc.modified)})

    _head = _get

    def _delete(self, request: _LabRequest, name: str) -> bytes:
        if not name:
            return _error(request, 403, 'cannot delete the collection')
        if self.state.dav.docs.pop(name, None) is None:
            return _error(request, 404, f'{self._href(name)} not found')
        return _respond(request, 204, b'', 'text/plain')

    def _mkcol(self, request: _LabRequest, name: str) -> bytes:
        if not name:
            return _error(request, 405, 'the collection exists', allow=self.ALLOW)
        return _error(request, 403, f'{self.prefix}/ is flat: no sub-collections')


def site_for(listener: Listener, persona: Persona, extra_resources: dict[bytes, Resource] | None = None,
             *, reactor, on_request: OnRequest | None = None, surface: Surface | None = None) -> Site:
    """The HTTP Site for one listener: REST + SOAP + WebDAV, plus ``extra_resources``.

    ``extra_resources`` maps a first path segment to a Resource (``b''``: POST & co. on ``/``);
    see the module docstring. Bind it with ``listen_site``.
    """
    state = _State(reactor, persona, surface or load_surface())
    return lab_site(_Root(state, extra_resources or {}), persona, reactor=reactor, on_request=on_request)


def lab_site(root: Resource, persona: Persona, *, reactor, on_request: OnRequest | None = None) -> Site:
    """A Site serving ``root`` alone with the lab's plumbing: Server and X-Lab-* headers, bodies
    over MAX_BODY refused, one ``on_request`` record per request (``note`` adds to it), idle
    timeout. For protocols that are HTTP underneath (etcd, infinispan); bind with ``listen_site``."""
    return _LabSite(root, reactor, persona, on_request)


@lru_cache(maxsize=None)
def _tls_factory():
    from twisted.internet.interfaces import ISSLTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

    @implementer(ISSLTransport)
    class _SecureTLSProtocol(TLSMemoryBIOProtocol):
        """Declares what it is, so request.isSecure() is True behind it."""

    class _SecureTLSFactory(TLSMemoryBIOFactory):
        protocol = _SecureTLSProtocol
        noisy = False

    return _SecureTLSFactory


def listen_site(reactor, listener: Listener, persona: Persona, site: Site, interface: str = ''):
    """Bind ``site`` on the listener's port: implicit TLS for 'tls', plain HTTP otherwise."""
    if listener.transport != 'tcp':
        raise ValueError(f'http cannot listen on {listener.transport!r}')
    if listener.security == 'tls':
        # What reactor.listenSSL (tls.listen_tls) does, but with the injected reactor as the
        # TLS layer's clock: listenSSL's TLSMemoryBIOFactory schedules its write flushes on
        # the *global* reactor, so TLS stalls on any other one (fresh test reactors).
        from . import tls
        factory = _tls_factory()(tls.server_options(persona), False, site, clock=reactor)
        return reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG, interface=interface)
    # 'optional' and 'starttls': plain HTTP on the same port (no HTTP upgrade is emulated).
    return reactor.listenTCP(listener.port, site, backlog=LISTEN_BACKLOG, interface=interface)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '', extra_resources: dict[bytes, Resource] | None = None):
    """Serve HTTP(S) (REST, SOAP and WebDAV) on ``listener``; bind errors propagate."""
    site = site_for(listener, persona, extra_resources, reactor=reactor, on_request=on_request)
    return listen_site(reactor, listener, persona, site, interface=interface)


# --- client probe -----------------------------------------------------------------------------

class _Reject(Exception):
    """The server answered, but not what the exchange expects: protocol_error."""


@dataclass
class _Reply:
    status: int
    headers: Any
    body: bytes

    def header(self, name: str) -> str:
        values = self.headers.getRawHeaders(name.encode('latin-1'))
        return values[0].decode('latin-1') if values else ''

    @property
    def media(self) -> str:
        return self.header('content-type').split(';', 1)[0].strip().lower()

    def json(self) -> Any:
        if not (self.media == 'application/json' or self.media.endswith('+json')):
            raise _Reject(f'expected JSON, got {self.media or "no content type"}')
        try:
            return loads_json(self.body)
        except ValueError as exc:
            raise _Reject(f'reply is not JSON: {exc}') from None


class _BodyReader(Protocol):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            self.done.errback(_Reject(f'reply body exceeds {self.limit} B'))
            return
        self.parts.append(data)

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        from twisted.web.client import ResponseDone
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b''.join(self.parts))
        else:
            self.done.errback(reason)


class _TrackingFactory(Factory):
    """Wraps the Agent's protocol factory to learn when each connection closes."""

    noisy = False

    def __init__(self, inner, exchange: _HttpExchange) -> None:
        self.inner = inner
        self.exchange = exchange

    def buildProtocol(self, addr):
        protocol = self.inner.buildProtocol(addr)
        if protocol is None:
            return None
        exchange, lost = self.exchange, protocol.connectionLost

        def connection_lost(reason):
            try:
                lost(reason)
            finally:
                exchange.closed(protocol)

        protocol.connectionLost = connection_lost
        return protocol


class _TrackingEndpoint:
    def __init__(self, inner, exchange: _HttpExchange) -> None:
        self.inner = inner
        self.exchange = exchange

    def connect(self, factory) -> Deferred:
        exchange = self.exchange
        exchange.pending += 1
        d = self.inner.connect(_TrackingFactory(factory, exchange))

        def made(protocol):
            exchange.pending -= 1
            exchange.opened(protocol)
            return protocol

        def failed(failure):
            exchange.pending -= 1
            exchange.maybe_fire()
            return failure

        return d.addCallbacks(made, failed)


def _certificate_detail(failure) -> str | None:
    """'certificate: ...' / 'tls: ...' for a TLS failure, else None."""
    from OpenSSL import SSL
    try:
        from service_identity.exceptions import VerificationError
    except ImportError:  # pragma: no cover - service_identity is a dependency of TLS probes
        VerificationError = ()
    value = failure.value
    if VerificationError and isinstance(value, VerificationError):
        names = []
        for err in getattr(value, 'errors', ()):
            wanted = getattr(err, 'mismatched_id', None)
            name = getattr(wanted, 'hostname', None) or getattr(wanted, 'ip', None)
            if name is not None:
                names.append(name.decode('ascii', 'replace') if isinstance(name, bytes) else str(name))
        return f'certificate: issued to other names than {", ".join(names) or "the server name"} ({value})'
    if isinstance(value, SSL.Error):
        text = failure.getErrorMessage()
        if 'certificate' in text.lower() or 'verify' in text.lower():
            return f'certificate: {text}'
        return f'tls: handshake failed: {text}'
    return None


def _classify_failure(failure) -> tuple[str, str]:
    from twisted.web.client import (RequestGenerationFailed, RequestTransmissionFailed, ResponseFailed,
                                    ResponseNeverReceived)
    value = failure.value
    if isinstance(value, _Reject):
        return 'protocol_error', str(value)
    if isinstance(value, (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed,
                          RequestGenerationFailed)):
        reasons = value.reasons
        for reason in reasons:
            detail = _certificate_detail(reason)
            if detail:
                return 'protocol_error', detail
        first = reasons[0] if reasons else None
        what = first.getErrorMessage() if first is not None else 'unknown reason'
        if isinstance(value, ResponseFailed) and first is not None and not first.check(
                net_error.ConnectionDone, net_error.ConnectionLost):
            return 'protocol_error', f'malformed HTTP response: {type(first.value).__name__}: {what}'
        return 'protocol_error', f'connection closed before a complete response: {what}'
    detail = _certificate_detail(failure)
    if detail:
        return 'protocol_error', detail
    if type(value).__name__ == 'TLSMaterialMissing':
        return 'error', f'probe misconfigured: {value}'
    return classify_os_error(value)


class _HttpExchange(Verdict):
    """One probe: one or more HTTP requests through an Agent, one verdict.

    ``done`` fires once the verdict is known and every connection it opened is closed.
    """

    def __init__(self, reactor, target: ProbeTarget, surface: Surface | None) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool
        super().__init__(reactor, target)
        self.surface = surface
        self.tls = target.security == 'tls'
        self.nonce = secrets.token_hex(6)
        self.steps: list[str] = []
        self.label = 'HTTPS' if self.tls else 'HTTP'
        self.peer_seen: str | None = None
        self.answered_by = ''
        self.pending = 0
        self.connections: set = set()
        self.made = False
        self._grace = None
        self._run: Deferred | None = None
        self._creator = None
        if self.tls:
            from . import tls
            self._creator = tls.client_creator(target)  # TLSMaterialMissing -> 'error'
        self.agent = Agent.usingEndpointFactory(reactor, self, HTTPConnectionPool(reactor, persistent=False))
        name = target.server_name or target.host
        self.authority = f'{name}:{target.port}'

    # -- IAgentEndpointFactory -------------------------------------------------------------
    def endpointForURI(self, uri):
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
        endpoint = TCP4ClientEndpoint(self.reactor, self.target.host, self.target.port,
                                      timeout=connect_timeout(self.target))
        if self._creator is not None:
            endpoint = wrapClientTLS(self._creator, endpoint, clock=self.reactor)
        return _TrackingEndpoint(endpoint, self)

    def opened(self, protocol) -> None:
        self.made = True
        self.connections.add(protocol)
        if self.result is not None and self.result.outcome != 'ok':
            protocol.transport.abortConnection()

    def closed(self, protocol) -> None:
        self.connections.discard(protocol)
        self.maybe_fire()

    # -- run --------------------------------------------------------------------------------
    def start(self, plan) -> Deferred[ProbeResult]:
        self.arm()
        self._run = Deferred.fromCoroutine(plan(self))
        self._run.addCallbacks(self._finished, self._failed)
        return self.done

    def _finished(self, detail: str) -> None:
        self.decide('ok', detail)

    def _failed(self, failure) -> None:
        if failure.check(CancelledError) and self.result is not None:
            return  # our own cancel after a timeout
        self.decide(*_classify_failure(failure))

    def _timed_out(self) -> None:
        super()._timed_out()
        if self._run is not None and not self._run.called:
            self._run.cancel()

    @property
    def reached(self) -> bool:
        return bool(self.made)

    def _tls_transports(self):
        return [protocol.transport for protocol in self.connections]

    def _timeout_detail(self) -> str:
        if self.made:
            return f'connected, but no complete answer within {self.target.timeout:g} s'
        return no_connection_detail(self.target)

    @property
    def exchange(self) -> str:
        text = '; '.join(self.steps) or f'{self.label} {self.target.protocol}'
        if self.target.security in ('optional', 'starttls'):
            text += f' ({self.target.security} TLS: plain HTTP)'
        return text

    def decide(self, outcome: str, detail: str = '') -> None:
        if outcome == 'ok' and self.answered_by:
            detail = f'{detail}; answered by {self.answered_by}' if detail else f'answered by {self.answered_by}'
        self.settle(outcome, detail, self.exchange, self.peer_seen)

    def _release(self) -> None:
        if self.result.outcome != 'ok':
            for protocol in list(self.connections):
                protocol.transport.abortConnection()
        self._grace = self.reactor.callLater(CLOSE_GRACE, self._force_close)
        self.maybe_fire()

    def _force_close(self) -> None:
        self._grace = None
        for protocol in list(self.connections):
            protocol.transport.abortConnection()
        self.connections.clear()
        self.pending = 0
        self.maybe_fire()

    def maybe_fire(self) -> None:
        if self.result is None or self.done.called or self.connections or self.pending:
            return
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        self.done.callback(self.result)

    # -- one request ------------------------------------------------------------------------
    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes | None = None, label: str | None = None) -> _Reply:
        from twisted.web.http_headers import Headers
        step = f'{label or self.label} {method} {path.split("?", 1)[0]}'
        if body is not None and method in ('PUT', 'POST'):
            step += f' {len(body)} B'
        self.steps.append(step)
        raw = {b'user-agent': [USER_AGENT]}
        for name, value in (headers or {}).items():
            raw[name.lower().encode('latin-1')] = [value.encode('latin-1')]
        scheme = 'https' if self.tls else 'http'
        response = await self.agent.request(method.encode('ascii'), f'{scheme}://{self.authority}{path}'.encode(),
                                            Headers(raw), BytesProducer(body) if body is not None else None)
        reader = _BodyReader(MAX_REPLY)
        response.deliverBody(reader)
        data = await reader.done
        reply = _Reply(response.code, response.headers, data)
        self.steps[-1] = f'{step} -> {reply.status}{" " + reply.media if reply.media else ""}'
        self.peer_seen = reply.header('x-lab-peer') or self.peer_seen
        host = reply.header('x-lab-host')
        if host:
            self.answered_by = f'{host} on port {self.target.port}'
        return reply


def _expect(reply: _Reply, *statuses: int) -> None:
    if reply.status not in statuses:
        excerpt = reply.body[:160].decode('utf-8', 'replace').strip()
        raise _Reject(f'HTTP {reply.status}, expected {"/".join(map(str, statuses))}'
                      + (f': {excerpt}' if excerpt else ''))


def _json_object(reply: _Reply) -> dict[str, Any]:
    value = reply.json()
    if not isinstance(value, dict):
        raise _Reject(f'reply is a JSON {type(value).__name__}, not an object')
    return value


def _doc_size(target: ProbeTarget) -> int:
    floor = target.options.get('size_floor', DOC_FLOOR)
    if not isinstance(floor, int) or isinstance(floor, bool) or floor < 0:
        floor = DOC_FLOOR
    return max(target.size, floor, 1)


def _send_fields(x: _HttpExchange, endpoint: Endpoint, fields: dict[str, Any]) -> tuple[str, dict, bytes | None]:
    path = endpoint.build_path(fields)
    rest = {k: v for k, v in fields.items() if k not in endpoint.params}
    if endpoint.encoding == 'query' or endpoint.method == 'GET':
        return (path + ('?' + urlencode(rest) if rest else '')), {}, None
    if endpoint.encoding == 'form':
        return path, {'content-type': 'application/x-www-form-urlencoded'}, urlencode(rest).encode('utf-8')
    return path, {'content-type': 'application/json'}, json.dumps(rest).encode('utf-8')


def _client_ctx(surface: Surface, by: str, fields: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = {'req': fields}
    if by:
        user = surface.find_user(by, fields.get(by))
        if user is not None:
            ctx['user'] = user
    return ctx


async def _plan_health(x: _HttpExchange, endpoint: Endpoint) -> str:
    reply = await x.request('GET', '/', {'accept': 'application/json'})
    _expect(reply, 200)
    value = _json_object(reply)
    if value.get('status') != 'UP' or not isinstance(value.get('host'), str):
        raise _Reject(f'health reply lacks status UP and host: {str(value)[:120]}')
    return f'health UP from {value["host"]} ({",".join(map(str, value.get("roles") or ())) or "-"})'


async def _plan_json(x: _HttpExchange, endpoint: Endpoint) -> str:
    fields = render(endpoint.example, {'nonce': x.nonce})
    path, headers, body = _send_fields(x, endpoint, fields)
    reply = await x.request(endpoint.method, path, {'accept': 'application/json', **headers}, body)
    _expect(reply, endpoint.status)
    value = _json_object(reply)
    problems = check_fields(endpoint.reply, value, _client_ctx(x.surface, endpoint.user_by, fields))
    if problems:
        raise _Reject(f'{endpoint.name} reply: {"; ".join(problems)}')
    return f'{endpoint.name}: {len(value)} fields as expected'


async def _plan_preview(x: _HttpExchange, endpoint: Endpoint) -> str:
    fields = render(endpoint.example, {'nonce': x.nonce})
    height = min(MAX_PREVIEW_SIDE, max(1, math.ceil(_doc_size(x.target) / (PREVIEW_WIDTH + 1))))
    path = endpoint.build_path(fields) + '?' + urlencode({'width': PREVIEW_WIDTH, 'height': height})
    reply = await x.request('GET', path, {'accept': 'image/png'})
    _expect(reply, 200)
    if reply.media != 'image/png':
        raise _Reject(f'preview is {reply.media or "untyped"}, not image/png')
    try:
        size = check_png(reply.body)
    except ValueError as exc:
        raise _Reject(f'preview: {exc}') from None
    if size != (PREVIEW_WIDTH, height):
        raise _Reject(f'preview is {size[0]}x{size[1]}, asked {PREVIEW_WIDTH}x{height}')
    return f'preview PNG {size[0]}x{size[1]}, {len(reply.body)} B'


async def _plan_upload(x: _HttpExchange, endpoint: Endpoint) -> str:
    fields = render(endpoint.example, {'nonce': x.nonce})
    document = make_document(endpoint.document, _doc_size(x.target))
    path = endpoint.build_path(fields)
    reply = await x.request(endpoint.method, path, {'content-type': endpoint.content_type,
                                                    'accept': 'application/json'}, document)
    _expect(reply, endpoint.status)
    value = _json_object(reply)
    ctx = {'req': fields, 'size': len(document), 'sha256': hashlib.sha256(document).hexdigest()}
    problems = check_fields(endpoint.reply, value, ctx)
    if problems:
        raise _Reject(f'{endpoint.name} reply: {"; ".join(problems)}')
    return f'{endpoint.name}: {len(document)} B {endpoint.document} stored intact (sha256 matches)'


async def _plan_html(x: _HttpExchange, endpoint: Endpoint) -> str:
    reply = await x.request('GET', endpoint.build_path(render(endpoint.example, {'nonce': x.nonce})),
                            {'accept': 'text/html'})
    _expect(reply, 200)
    if reply.media != 'text/html':
        raise _Reject(f'page is {reply.media or "untyped"}, not text/html')
    page = reply.body.decode('utf-8', 'replace')
    if endpoint.marker not in page:
        raise _Reject(f'page lacks {endpoint.marker!r}')
    title = re.search(r'<title>(.*?)</title>', page, re.S)
    return f'page {title.group(1).strip()!r}' if title else f'page of {len(page)} characters'


_PLANS = {'health': _plan_health, 'json': _plan_json, 'preview': _plan_preview, 'upload': _plan_upload,
          'html': _plan_html}


async def _plan_soap(x: _HttpExchange) -> str:
    surface, options = x.surface, x.target.options
    name = options.get('operation') or surface.soap_flows.get(x.target.flow) or surface.soap_default
    if name not in surface.soap_operations:
        raise _Reject(f'no SOAP operation {name!r} in the lab data')
    version = str(options.get('soap_version', '1.1'))
    if version not in SOAP_ENV:
        raise _Reject(f'soap_version must be 1.1 or 1.2, not {version!r}')
    operation = surface.soap_operations[name]
    fields = render(operation.example, {'nonce': x.nonce})
    action = f'{surface.soap_namespace}#{name}'
    if version == '1.1':
        headers = {'content-type': SOAP_CONTENT_TYPE['1.1'], 'soapaction': f'"{action}"'}
    else:
        headers = {'content-type': f'{SOAP_CONTENT_TYPE["1.2"]}; action="{action}"'}
    label = f'SOAP {version}{"/HTTPS" if x.tls else ""}'
    reply = await x.request('POST', surface.soap_path, headers,
                            soap_envelope(version, surface.soap_namespace, name, fields), label=label)
    x.steps[-1] = f'{label} {name} -> {reply.status}'
    try:
        _version, element = parse_soap(reply.body, version)
    except SoapFault as exc:
        raise _Reject(f'HTTP {reply.status}, not a SOAP {version} envelope: {exc.reason}') from None
    local = _local(element.tag)[1]
    if local == 'Fault':
        x.steps[-1] += ' Fault'
        raise _Reject(f'SOAP Fault {fault_text(element)}')
    x.steps[-1] += f' {local}'
    _expect(reply, 200)
    if local != operation.response:
        raise _Reject(f'expected {operation.response}, got {local}')
    problems = check_fields(operation.reply, soap_params(element),
                            _client_ctx(surface, operation.user_by, fields))
    if problems:
        raise _Reject(f'{operation.response}: {"; ".join(problems)}')
    return f'{operation.response} as expected'


async def _plan_webdav(x: _HttpExchange) -> str:
    collection = '/' + x.surface.dav_collection + '/'
    label = 'WebDAVS' if x.tls else 'WebDAV'
    allprop = (b'<?xml version="1.0" encoding="utf-8"?>'
               b'<D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>')
    xml = {'content-type': 'application/xml; charset=utf-8'}
    reply = await x.request('PROPFIND', collection, {**xml, 'depth': '1'}, allprop, label=label)
    _expect(reply, 207)
    try:
        listing = parse_multistatus(reply.body)
    except ValueError as exc:
        raise _Reject(f'PROPFIND: {exc}') from None
    if not listing.get(collection, {}).get('collection'):
        raise _Reject(f'PROPFIND listing does not show {collection} as a collection')
    document = scanned_pdf(_doc_size(x.target))
    name = f'scan-{x.nonce}.pdf'
    reply = await x.request('PUT', collection + name, {'content-type': 'application/pdf'}, document, label=label)
    _expect(reply, 201, 204)
    wanted = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop>'
              b'<D:getcontentlength/><D:getetag/></D:prop></D:propfind>')
    reply = await x.request('PROPFIND', collection + name, {**xml, 'depth': '0'}, wanted, label=label)
    _expect(reply, 207)
    try:
        props = parse_multistatus(reply.body).get(collection + name)
    except ValueError as exc:
        raise _Reject(f'PROPFIND: {exc}') from None
    if props is None:
        raise _Reject(f'PROPFIND of {collection + name} does not list it')
    if props.get('getcontentlength') != str(len(document)):
        raise _Reject(f'stored size {props.get("getcontentlength")!r}, sent {len(document)} B')
    return f'{len(document)} B scan stored ({len(listing) - 1} document(s) were listed before)'


def plan_for(target: ProbeTarget, surface: Surface | None = None) -> tuple[str, Callable]:
    """(description, async plan) of what a probe of ``target`` will do."""
    surface = surface or load_surface()
    if target.protocol == 'soap':
        return 'soap', _plan_soap
    if target.protocol == 'webdav':
        return 'webdav', _plan_webdav
    name = target.options.get('endpoint') or surface.flows.get(target.flow) or 'health'
    endpoint = surface.endpoints.get(name)
    if endpoint is None:
        raise ValueError(f'no REST endpoint {name!r} in the lab data')
    plan = _PLANS[endpoint.kind]
    return name, lambda x: plan(x, endpoint)


def run_plan(reactor, target: ProbeTarget, plan: Callable, surface: Surface | None = None) -> Deferred[ProbeResult]:
    """Probe ``target`` with ``plan``: an async function of the exchange ``x`` that sends requests
    with ``await x.request(method, path, headers, body)``, returns the detail of an 'ok' and raises
    ``Reject`` for a wrong answer. Always fires with a ProbeResult."""
    try:
        if target.transport != 'tcp':
            raise ValueError(f'{target.protocol} speaks tcp, not {target.transport}')
        return _HttpExchange(reactor, target, surface).start(plan)
    except Exception as exc:
        return _misconfigured(target, exc)


def _misconfigured(target: ProbeTarget, exc: Exception) -> Deferred[ProbeResult]:
    # ValueError covers TLSMaterialMissing (no ca_file / certificate) and DataError.
    detail = (f'probe misconfigured: {exc}' if isinstance(exc, (ValueError, OSError))
              else f'probe crashed: {type(exc).__name__}: {exc}')
    return error_result(target, f'{target.protocol}/{target.transport}', detail)


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Run the exchange for ``target`` (see module docstring); always fires with a ProbeResult."""
    try:
        surface = load_surface()
        _name, plan = plan_for(target, surface)
    except Exception as exc:
        return _misconfigured(target, exc)
    return run_plan(reactor, target, plan, surface)


# Public names for the modules built on this server and client (etcd, infinispan).
Reject = _Reject
Reply = _Reply
expect = _expect
json_object = _json_object
respond = _respond
json_response = _json


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'site_for', 'listen_site', 'note', 'load_surface',
           'parse_surface', 'render', 'check_fields', 'soap_envelope', 'soap_fault', 'parse_soap',
           'make_png', 'check_png', 'scanned_pdf', 'print_job', 'DavStore', 'lab_site', 'run_plan',
           'Reject', 'Reply', 'expect', 'json_object', 'respond', 'json_response']
