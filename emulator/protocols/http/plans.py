"""The ``http`` probe: what it asks of a target (a plan: the health check, a REST endpoint of
the surface data, a SOAP operation, a WebDAV store-and-list) and the exchange that runs a plan
through ``client.HttpClient`` to one verdict. ``run_plan`` runs any plan, so modules that are
HTTP underneath (etcd, infinispan) probe with their own."""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import CancelledError, Deferred

from .. import jobstore
from ..base import ProbeResult, ProbeTarget
from ..payloads import check_png, noise, print_job, scanned_pdf
from ..probing import error_result
from .client import HttpClient, HttpVerdict, Reject, Reply, classify_failure, expect, json_object
from .soap import SOAP_CONTENT_TYPE, SOAP_ENV, SoapFault, fault_text, local_name, parse_soap, soap_envelope, soap_params
from .surface import MAX_PREVIEW_SIDE, Endpoint, Surface, check_fields, load_surface, render
from .webdav import parse_multistatus

PREVIEW_WIDTH = 256          # probe's preview request: 8-bit gray, this wide
DOC_FLOOR = 200 << 10        # a probe's document (scan, print job, preview) is at least this big


def make_document(kind: str, size: int) -> bytes:
    """A document an upload endpoint takes (surface ``document``), exactly ``size`` bytes."""
    if kind == 'pdf':
        return scanned_pdf(size)
    if kind == 'pjl':
        return print_job(size)
    return noise(size)


class HttpExchange(HttpVerdict):
    """One probe: one or more HTTP requests, one verdict; ``done`` fires once the verdict is
    known and every connection it opened is closed. Its requests share one persistent
    connection, as an HTTP/1.1 client's do (a WebDAV client's PROPFIND, PUT and PROPFIND):
    one TCP connection and one TLS handshake per probe, not per request."""

    def __init__(self, reactor, target: ProbeTarget, surface: Surface | None) -> None:
        super().__init__(reactor, target)
        self.surface = surface
        self.client = HttpClient(reactor, target, keep_alive=True)   # TLSMaterialMissing -> 'error'
        self.tls = self.client.secure
        self.nonce = secrets.token_hex(6)
        self.steps: list[str] = []
        self.label = 'HTTPS' if self.tls else 'HTTP'
        self.peer_seen: str | None = None
        self.answered_by = ''
        self._run: Deferred | None = None

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
        self.decide(*classify_failure(failure))

    def _timed_out(self) -> None:
        super()._timed_out()
        if self._run is not None and not self._run.called:
            self._run.cancel()

    @property
    def reached(self) -> bool:
        return self.client.made

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

    # -- one request ------------------------------------------------------------------------
    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes | None = None, label: str | None = None) -> Reply:
        step = f'{label or self.label} {method} {path.split("?", 1)[0]}'
        if body is not None and method in ('PUT', 'POST'):
            step += f' {len(body)} B'
        self.steps.append(step)
        reply = await self.client.request(method, path, headers, body)
        self.steps[-1] = f'{step} -> {reply.status}{" " + reply.media if reply.media else ""}'
        self.peer_seen = reply.header('x-lab-peer') or self.peer_seen
        host = reply.header('x-lab-host')
        if host:
            self.answered_by = f'{host} on port {self.target.port}'
        return reply


def _doc_size(target: ProbeTarget) -> int:
    floor = target.options.get('size_floor', DOC_FLOOR)
    if not isinstance(floor, int) or isinstance(floor, bool) or floor < 0:
        floor = DOC_FLOOR
    return max(target.size, floor, 1)


def _send_fields(x: HttpExchange, endpoint: Endpoint, fields: dict[str, Any]) -> tuple[str, dict, bytes | None]:
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


async def _plan_health(x: HttpExchange, endpoint: Endpoint) -> str:
    reply = await x.request('GET', '/', {'accept': 'application/json'})
    expect(reply, 200)
    value = json_object(reply)
    if value.get('status') != 'UP' or not isinstance(value.get('host'), str):
        raise Reject(f'health reply lacks status UP and host: {str(value)[:120]}')
    return f'health UP from {value["host"]} ({",".join(map(str, value.get("roles") or ())) or "-"})'


async def _plan_json(x: HttpExchange, endpoint: Endpoint) -> str:
    fields = render(endpoint.example, {'nonce': x.nonce})
    path, headers, body = _send_fields(x, endpoint, fields)
    reply = await x.request(endpoint.method, path, {'accept': 'application/json', **headers}, body)
    expect(reply, endpoint.status)
    value = json_object(reply)
    problems = check_fields(endpoint.reply, value, _client_ctx(x.surface, endpoint.user_by, fields))
    if problems:
        raise Reject(f'{endpoint.name} reply: {"; ".join(problems)}')
    return f'{endpoint.name}: {len(value)} fields as expected'


async def _plan_preview(x: HttpExchange, endpoint: Endpoint) -> str:
    fields = render(endpoint.example, {'nonce': x.nonce})
    height = min(MAX_PREVIEW_SIDE, max(1, math.ceil(_doc_size(x.target) / (PREVIEW_WIDTH + 1))))
    path = endpoint.build_path(fields) + '?' + urlencode({'width': PREVIEW_WIDTH, 'height': height})
    reply = await x.request('GET', path, {'accept': 'image/png'})
    expect(reply, 200)
    if reply.media != 'image/png':
        raise Reject(f'preview is {reply.media or "untyped"}, not image/png')
    try:
        size = check_png(reply.body)
    except ValueError as exc:
        raise Reject(f'preview: {exc}') from None
    if size != (PREVIEW_WIDTH, height):
        raise Reject(f'preview is {size[0]}x{size[1]}, asked {PREVIEW_WIDTH}x{height}')
    return f'preview PNG {size[0]}x{size[1]}, {len(reply.body)} B'


async def _plan_upload(x: HttpExchange, endpoint: Endpoint) -> str:
    fields = render(endpoint.example, {'nonce': x.nonce})
    document = make_document(endpoint.document, _doc_size(x.target))
    path = endpoint.build_path(fields)
    reply = await x.request(endpoint.method, path, {'content-type': endpoint.content_type,
                                                    'accept': 'application/json'}, document)
    expect(reply, endpoint.status)
    value = json_object(reply)
    ctx = {'req': fields, 'size': len(document), 'sha256': hashlib.sha256(document).hexdigest()}
    problems = check_fields(endpoint.reply, value, ctx)
    if problems:
        raise Reject(f'{endpoint.name} reply: {"; ".join(problems)}')
    return f'{endpoint.name}: {len(document)} B {endpoint.document} stored intact (sha256 matches)'


async def _plan_html(x: HttpExchange, endpoint: Endpoint) -> str:
    reply = await x.request('GET', endpoint.build_path(render(endpoint.example, {'nonce': x.nonce})),
                            {'accept': 'text/html'})
    expect(reply, 200)
    if reply.media != 'text/html':
        raise Reject(f'page is {reply.media or "untyped"}, not text/html')
    page = reply.body.decode('utf-8', 'replace')
    if endpoint.marker not in page:
        raise Reject(f'page lacks {endpoint.marker!r}')
    title = re.search(r'<title>(.*?)</title>', page, re.S)
    return f'page {title.group(1).strip()!r}' if title else f'page of {len(page)} characters'


_PLANS = {'health': _plan_health, 'json': _plan_json, 'preview': _plan_preview, 'upload': _plan_upload,
          'html': _plan_html}


async def _plan_soap(x: HttpExchange) -> str:
    surface, options = x.surface, x.target.options
    name = options.get('operation') or surface.soap_default
    if name not in surface.soap_operations:
        raise Reject(f'no SOAP operation {name!r} in the lab data')
    version = str(options.get('soap_version', '1.1'))
    if version not in SOAP_ENV:
        raise Reject(f'soap_version must be 1.1 or 1.2, not {version!r}')
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
        raise Reject(f'HTTP {reply.status}, not a SOAP {version} envelope: {exc.reason}') from None
    local = local_name(element.tag)[1]
    if local == 'Fault':
        x.steps[-1] += ' Fault'
        raise Reject(f'SOAP Fault {fault_text(element)}')
    x.steps[-1] += f' {local}'
    expect(reply, 200)
    if local != operation.response:
        raise Reject(f'expected {operation.response}, got {local}')
    params = soap_params(element)
    problems = check_fields(operation.reply, params, _client_ctx(surface, operation.user_by, fields))
    if problems:
        raise Reject(f'{operation.response}: {"; ".join(problems)}')
    carried, _holder = jobstore.carried(options)
    if carried:
        return _listed(params, carried, str(fields.get('userName', '')))
    return f'{operation.response} as expected'


def _listed(params: dict[str, Any], name: str, user: str) -> str:
    """A job list's verdict for the job ``name`` the probe looks for (option ``carries``)."""
    jobs = (params.get('jobs') or {}).get('job', []) if isinstance(params.get('jobs'), dict) else []
    jobs = jobs if isinstance(jobs, list) else [jobs]
    found = [j for j in jobs if isinstance(j, dict) and j.get('id') == name]
    if not found:
        raise Reject(f'the job list of {user} ({len(jobs)} job(s)) does not show {name}')
    return f'the job list of {user} shows {name} ({found[0].get("bytes", "?")} B) among {len(jobs)} job(s)'


async def _plan_webdav(x: HttpExchange) -> str:
    collection = '/' + x.surface.dav_collection + '/'
    label = 'WebDAVS' if x.tls else 'WebDAV'
    allprop = (b'<?xml version="1.0" encoding="utf-8"?>'
               b'<D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>')
    xml = {'content-type': 'application/xml; charset=utf-8'}
    # Depth 0, as a scanner checking that its destination folder exists: a listing (Depth 1) of the
    # collection a fleet's hundreds of scanners share grows with it, and cost each probe 3x more at fleet-200
    reply = await x.request('PROPFIND', collection, {**xml, 'depth': '0'}, allprop, label=label)
    expect(reply, 207)
    try:
        listing = parse_multistatus(reply.body)
    except ValueError as exc:
        raise Reject(f'PROPFIND: {exc}') from None
    if not listing.get(collection, {}).get('collection'):
        raise Reject(f'PROPFIND listing does not show {collection} as a collection')
    document, name = scanned_pdf(_doc_size(x.target)), f'scan-{x.nonce}.pdf'
    if x.target.options.get('carries'):
        held, why = jobstore.need_held(x.target.options, ('scan',))
        if held is None:
            raise Reject(why)
        document, name = held.data, f'{held.name}.pdf'
    reply = await x.request('PUT', collection + name, {'content-type': 'application/pdf'}, document, label=label)
    expect(reply, 201, 204)
    wanted = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop>'
              b'<D:getcontentlength/><D:getetag/></D:prop></D:propfind>')
    reply = await x.request('PROPFIND', collection + name, {**xml, 'depth': '0'}, wanted, label=label)
    expect(reply, 207)
    try:
        props = parse_multistatus(reply.body).get(collection + name)
    except ValueError as exc:
        raise Reject(f'PROPFIND: {exc}') from None
    if props is None:
        raise Reject(f'PROPFIND of {collection + name} does not list it')
    if props.get('getcontentlength') != str(len(document)):
        raise Reject(f'stored size {props.get("getcontentlength")!r}, sent {len(document)} B')
    return f'{len(document)} B scan stored ({len(listing) - 1} document(s) were listed before)'


def plan_for(target: ProbeTarget, surface: Surface | None = None) -> tuple[str, Callable]:
    """(description, async plan) of what a probe of ``target`` will do."""
    surface = surface or load_surface()
    if target.protocol == 'soap':
        return 'soap', _plan_soap
    if target.protocol == 'webdav':
        return 'webdav', _plan_webdav
    name = target.options.get('endpoint') or 'health'
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
        return HttpExchange(reactor, target, surface).start(plan)
    except Exception as exc:
        return _misconfigured(target, exc)


def _misconfigured(target: ProbeTarget, exc: Exception) -> Deferred[ProbeResult]:
    # ValueError covers TLSMaterialMissing (no ca_file / certificate) and DataError.
    detail = (f'probe misconfigured: {exc}' if isinstance(exc, (ValueError, OSError))
              else f'probe crashed: {type(exc).__name__}: {exc}')
    return error_result(target, f'{target.protocol}/{target.transport}', detail)


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Run the exchange for ``target`` (see the package docstring); always fires with a ProbeResult."""
    try:
        surface = load_surface()
        _name, plan = plan_for(target, surface)
    except Exception as exc:
        return _misconfigured(target, exc)
    return run_plan(reactor, target, plan, surface)

