"""WebDAV class 1 codec for one flat collection of scanned documents: the bounded store (its
documents' bytes in the daemon's jobstore spool files when it has one, else in memory), PROPFIND request parsing, 207 Multi-Status bodies (server side) and their parsing
(probe side). The resource that serves them is ``server``'s."""

from __future__ import annotations

import datetime
import email.utils
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import escape as xml_escape

from .. import jobstore
from .soap import SoapFault, local_name, parse_xml

DAV_NS = 'DAV:'
DAV_MAX_STORE = 256 << 20    # all documents of one WebDAV collection; oldest evicted first
# Each probe stores one document then reads it back: 500 concurrent probes (of DOC_FLOOR each)
# must all find theirs, so the count bound leaves room for twice that many.
DAV_MAX_DOCS = 1024


@dataclass
class DavDocument:
    size: int
    sha256: str             # hashed once at PUT, not at every PROPFIND (a scan is a MiB)
    content_type: str
    created: float
    modified: float
    data: bytes | None = None   # the content, when no spool file holds it
    file: str = ''              # the jobstore spool file holding it
    listed: tuple[str, dict[str, str]] | None = None   # (name, its props): every PROPFIND lists them all
    listed_xml: tuple[str, str] | None = None          # (name, its allprop <D:response>): likewise

    @property
    def etag(self) -> str:
        return '"' + self.sha256[:32] + '"'

    def content(self) -> bytes:
        """The document's bytes; OSError when its spool file is unreadable."""
        return self.data if self.data is not None else Path(self.file).read_bytes()


class DavStore:
    """Documents of one flat collection, bounded in count and bytes (oldest evicted first)."""

    def __init__(self, max_bytes: int = DAV_MAX_STORE, max_docs: int = DAV_MAX_DOCS) -> None:
        self.max_bytes = max_bytes
        self.max_docs = max_docs
        self.docs: OrderedDict[str, DavDocument] = OrderedDict()
        self.created = None

    @property
    def size(self) -> int:
        return sum(doc.size for doc in self.docs.values())

    def put(self, name: str, data: bytes, content_type: str, now: float, sha256: str = '') -> bool:
        """Store (``sha256``: of ``data``, when the caller has it); True when it replaced a document."""
        old = self.docs.pop(name, None)
        if old is not None:
            jobstore.unspool(old.file)
        size = self.size   # once: the loop below would make each PUT quadratic in the count
        while self.docs and (len(self.docs) >= self.max_docs or size + len(data) > self.max_bytes):
            evicted = self.docs.popitem(last=False)[1]
            size -= evicted.size
            jobstore.unspool(evicted.file)
        file = jobstore.spool(data)
        self.docs[name] = DavDocument(len(data), sha256 or hashlib.sha256(data).hexdigest(), content_type,
                                      old.created if old else now, now, None if file else data, file)
        return old is not None

    def delete(self, name: str) -> bool:
        """Remove ``name``; False when there is none."""
        doc = self.docs.pop(name, None)
        if doc is not None:
            jobstore.unspool(doc.file)
        return doc is not None


_DAV_PROPS = ('resourcetype', 'displayname', 'getcontentlength', 'getcontenttype', 'getlastmodified',
              'getetag', 'creationdate')


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def iso_date(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def dav_props(name: str, doc: DavDocument | None, created: float) -> dict[str, str]:
    """prop local name -> inner XML, for the collection (doc None) or one document."""
    if doc is None:
        return {'resourcetype': '<D:collection/>', 'displayname': xml_escape(name),
                'getlastmodified': http_date(created), 'creationdate': iso_date(created)}
    if doc.listed is None or doc.listed[0] != name:
        doc.listed = (name, {'resourcetype': '', 'displayname': xml_escape(name), 'getcontentlength': str(doc.size),
                             'getcontenttype': xml_escape(doc.content_type), 'getlastmodified': http_date(doc.modified),
                             'getetag': xml_escape(doc.etag), 'creationdate': iso_date(doc.created)})
    return doc.listed[1]


def parse_propfind(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    """('allprop' | 'propname' | 'prop', [(namespace, name), ...]); SoapFault if malformed."""
    if not data.strip():
        return 'allprop', []
    root = parse_xml(data, 'PROPFIND body')
    if root.tag != f'{{{DAV_NS}}}propfind':
        raise SoapFault('Client', 'PROPFIND body is not a DAV:propfind element')
    for child in root:
        if child.tag == f'{{{DAV_NS}}}allprop':
            return 'allprop', []
        if child.tag == f'{{{DAV_NS}}}propname':
            return 'propname', []
        if child.tag == f'{{{DAV_NS}}}prop':
            return 'prop', [local_name(p.tag) for p in child]
    raise SoapFault('Client', 'DAV:propfind holds no allprop, propname or prop')


def multistatus(entries: list[tuple[str, dict[str, str]]], mode: str,
                wanted: list[tuple[str, str]]) -> bytes:
    """A 207 body: one response per (href, props)."""
    return multistatus_of([response_xml(href, props, mode, wanted) for href, props in entries])


def multistatus_of(responses: list[str]) -> bytes:
    """A 207 body around ready <D:response> elements."""
    return ('<?xml version="1.0" encoding="utf-8"?><D:multistatus xmlns:D="DAV:">' + ''.join(responses)
            + '</D:multistatus>').encode('utf-8')


def allprop_response(name: str, doc: DavDocument, href: Callable[[str], str]) -> str:
    """The allprop <D:response> of ``doc`` (stored as ``name``, at ``href(name)``), built once: a listing
    of the collection repeats every document's, and the collection holds up to DAV_MAX_DOCS."""
    if doc.listed_xml is None or doc.listed_xml[0] != name:
        doc.listed_xml = (name, response_xml(href(name), dav_props(name, doc, doc.created), 'allprop', []))
    return doc.listed_xml[1]


def response_xml(href: str, props: dict[str, str], mode: str, wanted: list[tuple[str, str]]) -> str:
    """One <D:response> of a 207 body: ``props`` of ``href`` as ``mode`` asks."""
    out = [f'<D:response><D:href>{xml_escape(href)}</D:href>']
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
    return ''.join(out)


def parse_multistatus(data: bytes) -> dict[str, dict[str, Any]]:
    """href -> {prop name: text, 'collection': bool} for the 200 propstats of a 207 body."""
    try:
        root = parse_xml(data, 'Multi-Status body')
    except SoapFault as exc:
        raise ValueError(exc.reason) from None
    if root.tag != f'{{{DAV_NS}}}multistatus':
        raise ValueError(f'root element is {root.tag!r}, not DAV:multistatus')
    out: dict[str, dict[str, Any]] = {}
    # findall of one tag (C), not ElementPath paths (Python): a listing holds a thousand responses.
    for response in root.findall(_RESPONSE):
        href = (response.findtext(_HREF) or '').strip()
        props: dict[str, Any] = {'collection': False}
        for propstat in response.findall(_PROPSTAT):
            status = propstat.findtext(_STATUS) or ''
            if ' 200 ' not in status + ' ':
                continue
            for group in propstat.findall(_PROP):
                for prop in group:
                    name = prop.tag.rpartition('}')[2]
                    props[name] = (prop.text or '').strip()
                    if name == 'resourcetype' and prop.find(_COLLECTION) is not None:
                        props['collection'] = True
        out[unquote(href) if '%' in href else href] = props
    return out


_RESPONSE, _HREF, _PROPSTAT, _STATUS, _PROP, _COLLECTION = (
    f'{{{DAV_NS}}}{name}' for name in ('response', 'href', 'propstat', 'status', 'prop', 'collection'))

