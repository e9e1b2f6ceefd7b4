"""The HTTP server of every lab host: one ``twisted.web`` Site per listener port serving REST
(the persona's endpoints of the surface data), SOAP and WebDAV, plus resources other modules
mount (IPP); the lab plumbing of every Site (``lab_site``: Server and X-Lab-* headers, bodies
over ``MAX_BODY`` refused unread, one ``on_request`` record per request, idle timeout); and
binding a Site to a listener (``listen_site``, implicit TLS for 'tls')."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from functools import lru_cache
from io import BytesIO
from typing import Any
from urllib.parse import parse_qsl, quote, unquote
from xml.sax.saxutils import escape as xml_escape

from twisted import version as twisted_version
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from .. import jobstore
from ..base import Listener, Persona
from ..payloads import make_png
from ..probing import OnRequest, report
from ..serving import IDLE_TIMEOUT, LISTEN_BACKLOG, loads_json
from .soap import SOAP_CONTENT_TYPE, SoapFault, local_name, parse_soap, soap_envelope, soap_fault, soap_params
from .surface import MAX_PREVIEW_SIDE, Endpoint, Surface, load_surface, mounted_endpoints, render
from .webdav import (DavStore, allprop_response, dav_props, http_date, iso_date, multistatus, multistatus_of,
                     parse_propfind, response_xml)

MAX_BODY = 64 << 20          # any request body; larger: 413 and close, unread
MAX_XML_BODY = 1 << 20       # SOAP envelopes and PROPFIND bodies
MAX_JSON_BODY = 1 << 20      # JSON / form bodies of REST endpoints
SERVER_HEADER = f'TwistedWeb/{twisted_version.short()}'   # what serves SafeQ's HTTP in the lab


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


def respond(request: Request, status: int, body: bytes, content_type: str,
             headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b'content-type', content_type.encode('latin-1'))
    for name, value in (headers or {}).items():
        request.setHeader(name.encode('latin-1'), value.encode('latin-1'))
    return body


def json_response(request: Request, status: int, value: Any, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps(value, ensure_ascii=False).encode('utf-8')
    return respond(request, status, body, 'application/json; charset=utf-8', headers)


def _error(request: Request, status: int, message: str, **extra: str) -> bytes:
    return json_response(request, status, {'error': message, 'status': status}, extra)


def _media_type(request: Request) -> str:
    value = request.getHeader(b'content-type') or b''
    return value.decode('latin-1').split(';', 1)[0].strip().lower()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _State:
    """What one Site serves: persona, data, mounted endpoints and in-memory stores."""

    def __init__(self, reactor, persona: Persona, surface: Surface) -> None:
        self.reactor = reactor
        self.persona = persona
        self.surface = surface
        self.endpoints = mounted_endpoints(surface, persona.identity.get('http_endpoints', ()))
        self.soap_enabled = bool(persona.identity.get('http_soap', False))
        self.dav_enabled = bool(persona.identity.get('http_webdav', False))
        self.dav = DavStore()
        self.dav.created = reactor.seconds()

    def context(self, request: Request, **more: Any) -> dict[str, Any]:
        identity = self.persona.identity
        return {'host': self.persona.host, 'roles': ','.join(self.persona.roles),
                'vendor': identity.get('vendor', ''), 'product': identity.get('product', ''),
                'model': identity.get('make_model') or identity.get('product') or self.persona.host,
                'port': request.getHost().port, 'peer': getattr(request.getClientAddress(), 'host', '?'),
                'uuid': str(uuid.uuid4()), 'now': iso_date(self.reactor.seconds()), **more}


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
            return respond(request, 204, b'', 'text/plain', {'allow': ', '.join(sorted(allowed | {'OPTIONS'}))})
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
        return json_response(request, 200, value)

    def _json(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str]) -> bytes:
        fields = self._fields(request, endpoint, params)
        ctx = self.state.context(request, req=fields, **self._user(endpoint, fields))
        try:
            reply = render(endpoint.reply, ctx)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _BadRequest(400, f'request lacks what the reply needs: {exc}') from None
        return json_response(request, endpoint.status, reply)

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
        return respond(request, 200, image, 'image/png', {'cache-control': 'no-store'})

    def _upload(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str]) -> bytes:
        fields = self._fields(request, endpoint, params, body_is_data=False)
        data = request.body()
        if not data:
            raise _BadRequest(400, 'empty document')
        digest = hashlib.sha256(data).hexdigest()
        note(request, stored=len(data))
        ctx = self.state.context(request, req=fields, size=len(data), sha256=digest)
        return json_response(request, endpoint.status, render(endpoint.reply, ctx))

    def _html(self, request: _LabRequest, endpoint: Endpoint, params: dict[str, str]) -> bytes:
        fields = self._fields(request, endpoint, params, body_is_data=False)
        page = render(endpoint.template, self.state.context(request, req=fields))
        return respond(request, 200, page.encode('utf-8'), 'text/html; charset=utf-8')


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
            return respond(request, 500, soap_fault(version, fault.code, fault.reason),
                            SOAP_CONTENT_TYPE[version])

    def _call(self, request: _LabRequest, version: str) -> bytes:
        if request.lab_body > MAX_XML_BODY:
            raise SoapFault('Client', f'message exceeds {MAX_XML_BODY} B')
        _found, element = parse_soap(request.body(), version)
        namespace, name = local_name(element.tag)
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
        if name == 'GetJobList':
            reply = self._held_jobs(reply, str(params.get('userName', '')))
        return respond(request, 200, soap_envelope(version, surface.soap_namespace, operation.response, reply),
                        SOAP_CONTENT_TYPE[version])

    def _held_jobs(self, reply: dict[str, Any], user: str) -> dict[str, Any]:
        """The job list with the user's jobs this host holds (a FlexiSpooler on the Terminal
        Server's host spooled them) after the data's sample jobs."""
        held = [{'id': doc.name, 'name': doc.name, 'bytes': doc.size, 'sha256': doc.sha256}
                for doc in jobstore.store_for(self.state.persona.host).documents()
                if doc.kind == 'print-job' and doc.owner == user]
        jobs = dict(reply.get('jobs') or {})
        listed = jobs.get('job', [])
        jobs['job'] = (listed if isinstance(listed, list) else [listed]) + held
        return {**reply, 'jobs': jobs}

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
        return respond(request, 200, b'', 'text/plain', {'dav': '1', 'allow': self.ALLOW,
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
            entries = [(self._href(name), dav_props(name, doc, doc.created))]
        else:
            entries = [(self.prefix + '/', dav_props(self.prefix[1:], None, store.created))]
            if depth != '0' and mode == 'allprop':   # what a listing usually asks: each document's, built once
                responses = [response_xml(*entries[0], mode, wanted)]
                responses += [allprop_response(n, d, self._href) for n, d in store.docs.items()]
                note(request, depth=depth, entries=len(responses))
                return respond(request, 207, multistatus_of(responses), 'application/xml; charset=utf-8')
            if depth != '0':  # 'infinity' is the same as 1 here: the collection is flat
                entries += [(self._href(n), dav_props(n, d, d.created)) for n, d in store.docs.items()]
        note(request, depth=depth, entries=len(entries))
        return respond(request, 207, multistatus(entries, mode, wanted), 'application/xml; charset=utf-8')

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
        kept = jobstore.store_for(self.state.persona.host).keep(jobstore.document(
            jobstore.name_of(name), 'scan', data, via='webdav', peer=getattr(request.getClientAddress(), 'host', '')))
        replaced = self.state.dav.put(name, data, _media_type(request) or 'application/octet-stream',
                                      self.state.reactor.seconds(), sha256=kept.sha256)
        note(request, stored=len(data))
        doc = self.state.dav.docs[name]
        return respond(request, 204 if replaced else 201, b'', 'text/plain',
                        {'etag': doc.etag, 'location': self._href(name)})

    def _get(self, request: _LabRequest, name: str) -> bytes:
        store = self.state.dav
        if not name:
            items = ''.join(f'<li><a href="{xml_escape(self._href(n))}">{xml_escape(n)}</a> {d.size} B</li>'
                            for n, d in store.docs.items())
            page = f'<!DOCTYPE html><html><body><h1>{self.prefix}/</h1><ul>{items}</ul></body></html>'
            return respond(request, 200, page.encode('utf-8'), 'text/html; charset=utf-8')
        doc = store.docs.get(name)
        if doc is None:
            return _error(request, 404, f'{self._href(name)} not found')
        try:
            data = doc.content()
        except OSError as exc:
            return _error(request, 500, f'{self._href(name)} cannot be read: {exc.strerror or exc}')
        note(request, sent=len(data))
        return respond(request, 200, data, doc.content_type,
                        {'etag': doc.etag, 'last-modified': http_date(doc.modified)})

    _head = _get

    def _delete(self, request: _LabRequest, name: str) -> bytes:
        if not name:
            return _error(request, 403, 'cannot delete the collection')
        if not self.state.dav.delete(name):
            return _error(request, 404, f'{self._href(name)} not found')
        return respond(request, 204, b'', 'text/plain')

    def _mkcol(self, request: _LabRequest, name: str) -> bytes:
        if not name:
            return _error(request, 405, 'the collection exists', allow=self.ALLOW)
        return _error(request, 403, f'{self.prefix}/ is flat: no sub-collections')


def site_for(listener: Listener, persona: Persona, extra_resources: dict[bytes, Resource] | None = None,
             *, reactor, on_request: OnRequest | None = None, surface: Surface | None = None) -> Site:
    """The HTTP Site for one listener: REST + SOAP + WebDAV, plus ``extra_resources``.

    ``extra_resources`` maps a first path segment to a Resource (``b''``: POST & co. on ``/``);
    see the package docstring. Bind it with ``listen_site``.
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
        from .. import tls
        factory = _tls_factory()(tls.server_options(persona), False, site, clock=reactor)
        return reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG, interface=interface)
    # 'optional' and 'starttls': plain HTTP on the same port (no HTTP upgrade is emulated).
    return reactor.listenTCP(listener.port, site, backlog=LISTEN_BACKLOG, interface=interface)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '', extra_resources: dict[bytes, Resource] | None = None):
    """Serve HTTP(S) (REST, SOAP and WebDAV) on ``listener``, plus the surfaces of the HTTP-based
    protocols ``listener.also`` names (their module's ``http_resources``); bind errors propagate."""
    from .. import module_for

    extra = dict(extra_resources or {})
    for protocol in listener.also:
        extra.update(module_for(protocol).http_resources(reactor, persona))
    site = site_for(listener, persona, extra, reactor=reactor, on_request=on_request)
    return listen_site(reactor, listener, persona, site, interface=interface)

