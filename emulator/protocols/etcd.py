"""``etcd``: the etcd v3 JSON gateway (grpc-gateway) subset that keeps device locks, stub and probe.

etcd 3.x serves its gRPC KV API also as JSON over HTTP on the client port (``/v3/...``, what
``curl -d '{"key": "Zm9v"}' http://host:2379/v3/kv/range`` talks to). The stub serves that
subset with ``twisted.web`` through the lab's HTTP plumbing (``http.lab_site``: bounded bodies,
``X-Lab-Host``/``X-Lab-Peer`` headers, one ``on_request`` record per request, idle timeout):

``POST /v3/kv/put``          ``{"key": b64, "value": b64, "prev_kv": bool, "lease": int}``
                             -> ``{"header": {...}}`` (+ ``prev_kv`` when asked and present)
``POST /v3/kv/range``        ``{"key": b64, "range_end": b64, "limit": int, "keys_only": bool,
                             "count_only": bool}`` -> ``{"header", "kvs": [{"key", "value",
                             "create_revision", "mod_revision", "version"}], "count"}``
``POST /v3/kv/deleterange``  ``{"key": b64, "range_end": b64, "prev_kv": bool}``
                             -> ``{"header", "deleted"}`` (+ ``prev_kvs``)
``GET /version``             ``{"etcdserver": "3.5.9", "etcdcluster": "3.5.0"}``
``GET /health``              ``{"health": "true", "reason": ""}``

Real, as etcd 3.5 does it: bytes fields are base64 (standard or URL-safe accepted), int64
fields are JSON strings, zero/empty fields are left out (``count`` of an empty range,
``deleted`` when nothing matched); ``header`` carries ``cluster_id``, ``member_id``,
``revision`` and ``raft_term``; the store revision starts at 1 and grows by one per put and
per delete that removed something; each key keeps ``create_revision``, ``mod_revision`` and
``version`` (puts since creation); ``range_end`` ``"\\0"`` means every key >= ``key``, otherwise
``[key, range_end)``; an empty key is ``etcdserver: key is not provided`` (gRPC code 3, HTTP
400); a nonzero lease is ``etcdserver: requested lease not found`` (code 5, HTTP 404), since
the stub grants no leases. Errors are ``{"error", "code", "message"}`` as grpc-gateway v1 writes
them; an unknown path is Go's ``404 page not found``.

Invented: the limits (``MAX_KEY`` bytes per key, ``MAX_VALUE`` per value, ``MAX_KEYS`` keys,
the least recently written key evicted first; a larger put is ``etcdserver: request is too
large``), the 405 answer to a wrong method, ``member_id``/``cluster_id`` (derived from the
persona's host name), ``raft_term`` fixed at 2, unknown JSON fields ignored, no watch, txn,
lease or auth API. The store lives per listener port, in memory.

Security: 'tls' gets implicit TLS (``http.listen_site``); the catalog's etcd ports are plain.

Stub records: ``op`` (put | range | deleterange | version | health), ``key`` (text, shortened),
``revision`` plus the HTTP fields ``http.lab_site`` adds.

Probe: takes a device exclusivity lock the way the Terminal Server does: puts
``/safeq/locks/<device>`` (option ``device``; default ``mfd-<nonce>``, so parallel probes never
share a key) with an owner value carrying a nonce, reads it back with a range (value, key and
``mod_revision`` = the put's revision must match), then releases it with a deleterange
(``deleted`` must be 1). ``curl`` does the same by hand::

    curl -d '{"key": "L3NhZmVxL2xvY2tzL21mZC0x", "value": "b3duZXI="}' http://HOST:PORT/v3/kv/put
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request

from . import http
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .probing import OnRequest
from .serving import loads_json

PROTOCOL_IDS = ('etcd',)

SERVER_VERSION = '3.5.9'
CLUSTER_VERSION = '3.5.0'
RAFT_TERM = 2
MAX_BODY = 1 << 20          # one JSON request
MAX_KEY = 4 << 10           # invented bound: bytes of one key
MAX_VALUE = 256 << 10       # invented bound: bytes of one value (etcd's own limit is the 1.5 MiB request)
MAX_KEYS = 1024             # invented bound: keys held; the least recently written goes first
LOCK_PREFIX = '/safeq/locks/'
NOT_FOUND_PAGE = b'404 page not found\n'

# gRPC status codes and the HTTP statuses grpc-gateway maps them to
INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED = 3, 5, 12
HTTP_STATUS = {INVALID_ARGUMENT: 400, NOT_FOUND: 404, UNIMPLEMENTED: 501}


class GatewayError(Exception):
    """A gRPC error the gateway turns into ``{"error", "code", "message"}``."""

    def __init__(self, code: int, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status or HTTP_STATUS.get(code, 500)


# --- the key-value store (no I/O) ----------------------------------------------------------

@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int

    def to_json(self, keys_only: bool = False) -> dict[str, Any]:
        out = {'key': b64(self.key), 'create_revision': str(self.create_revision),
               'mod_revision': str(self.mod_revision), 'version': str(self.version)}
        if not keys_only and self.value:
            out['value'] = b64(self.value)
        return out


class KeyValueStore:
    """etcd's MVCC store reduced to the latest revision of each key, bounded to MAX_KEYS."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.revision = 1          # etcd starts a fresh cluster at revision 1
        self.max_keys = max_keys
        self._kvs: OrderedDict[bytes, KeyValue] = OrderedDict()   # least recently written first

    def put(self, key: bytes, value: bytes) -> KeyValue | None:
        """Store ``value`` at a new revision; the previous KeyValue, if any."""
        previous = self._kvs.pop(key, None)
        while len(self._kvs) >= self.max_keys:
            self._kvs.popitem(last=False)
        self.revision += 1
        self._kvs[key] = KeyValue(key, value, previous.create_revision if previous else self.revision,
                                  self.revision, previous.version + 1 if previous else 1)
        return previous

    def range(self, key: bytes, range_end: bytes = b'') -> list[KeyValue]:
        """The KeyValues etcd's Range selects, sorted by key."""
        if not range_end:
            found = self._kvs.get(key)
            return [found] if found else []
        return [self._kvs[k] for k in sorted(self._kvs) if k >= key and (range_end == b'\0' or k < range_end)]

    def delete(self, key: bytes, range_end: bytes = b'') -> list[KeyValue]:
        gone = self.range(key, range_end)
        for kv in gone:
            del self._kvs[kv.key]
        if gone:
            self.revision += 1
        return gone


# --- JSON fields ---------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode('ascii')


def unb64(text: Any, field: str) -> bytes:
    """A bytes field as grpc-gateway reads it: standard or URL-safe base64."""
    if not isinstance(text, str):
        raise GatewayError(INVALID_ARGUMENT, f'bad value for field "{field}": expected base64 string')
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            return decode(text + '=' * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
    raise GatewayError(INVALID_ARGUMENT, f'bad value for field "{field}": illegal base64 data')


def _int64(value: Any, field: str) -> int:
    # jsonpb takes an int64 as a JSON number or a decimal string
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise GatewayError(INVALID_ARGUMENT, f'bad value for field "{field}": expected int64')
    try:
        return int(value)
    except ValueError:
        raise GatewayError(INVALID_ARGUMENT, f'bad value for field "{field}": expected int64') from None


def _flag(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise GatewayError(INVALID_ARGUMENT, f'bad value for field "{field}": expected bool')
    return value


def _key(body: dict[str, Any]) -> bytes:
    key = unb64(body.get('key', ''), 'key')
    if not key:
        raise GatewayError(INVALID_ARGUMENT, 'etcdserver: key is not provided')
    if len(key) > MAX_KEY:
        raise GatewayError(INVALID_ARGUMENT, 'etcdserver: request is too large')
    return key


def key_text(key: bytes) -> str:
    return key.decode('utf-8', 'replace')[:200]


# --- server --------------------------------------------------------------------------------

def _member_id(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big')


class EtcdGateway(Resource):
    """The JSON gateway of one etcd member: routes, decodes, answers; the store does the rest."""

    isLeaf = True
    POST_ROUTES = {b'/v3/kv/put': 'put', b'/v3/kv/range': 'range', b'/v3/kv/deleterange': 'deleterange'}
    GET_ROUTES = {b'/version': 'version', b'/health': 'health'}

    def __init__(self, persona: Persona, store: KeyValueStore | None = None) -> None:
        super().__init__()
        self.store = store or KeyValueStore()
        self.member_id = _member_id(f'etcd-member:{persona.host}')
        self.cluster_id = _member_id('etcd-cluster:safeq-lab')

    def header(self) -> dict[str, str]:
        return {'cluster_id': str(self.cluster_id), 'member_id': str(self.member_id),
                'revision': str(self.store.revision), 'raft_term': str(RAFT_TERM)}

    def render(self, request: Request) -> bytes:
        path = request.path.rstrip(b'/') or b'/'
        method = request.method
        op = self.POST_ROUTES.get(path) or self.GET_ROUTES.get(path)
        if op is None:
            return http.respond(request, 404, NOT_FOUND_PAGE, 'text/plain; charset=utf-8')
        http.note(request, op=op)
        wanted = b'POST' if path in self.POST_ROUTES else b'GET'
        if method != wanted and not (wanted == b'GET' and method == b'HEAD'):
            return self._error(request, GatewayError(UNIMPLEMENTED, 'Method Not Allowed', status=405))
        try:
            if op == 'version':
                return http.json_response(request, 200, {'etcdserver': SERVER_VERSION,
                                                         'etcdcluster': CLUSTER_VERSION})
            if op == 'health':
                return http.json_response(request, 200, {'health': 'true', 'reason': ''})
            reply = getattr(self, f'_{op}')(request, self._body(request))
        except GatewayError as exc:
            return self._error(request, exc)
        return http.json_response(request, 200, {'header': self.header(), **reply})

    @staticmethod
    def _error(request: Request, exc: GatewayError) -> bytes:
        http.note(request, error=str(exc))
        return http.json_response(request, exc.status,
                                  {'error': str(exc), 'code': exc.code, 'message': str(exc)})

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        if request.lab_body > MAX_BODY:
            raise GatewayError(INVALID_ARGUMENT, 'etcdserver: request is too large')
        data = request.body()
        try:
            body = loads_json(data) if data.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise GatewayError(INVALID_ARGUMENT, f'invalid JSON body: {exc}') from None
        if not isinstance(body, dict):
            raise GatewayError(INVALID_ARGUMENT, 'request body must be a JSON object')
        return body

    def _put(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        key = _key(body)
        value = unb64(body.get('value', ''), 'value')
        if len(value) > MAX_VALUE:
            raise GatewayError(INVALID_ARGUMENT, 'etcdserver: request is too large')
        if _int64(body.get('lease', 0), 'lease'):
            raise GatewayError(NOT_FOUND, 'etcdserver: requested lease not found')
        want_previous = _flag(body, 'prev_kv')     # every field checked before the store changes
        previous = self.store.put(key, value)
        http.note(request, key=key_text(key), revision=self.store.revision, stored=len(value))
        return {'prev_kv': previous.to_json()} if previous and want_previous else {}

    def _range(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        key = _key(body)
        range_end = unb64(body.get('range_end', ''), 'range_end')
        limit = _int64(body.get('limit', 0), 'limit')
        count_only, keys_only = _flag(body, 'count_only'), _flag(body, 'keys_only')
        found = self.store.range(key, range_end)
        http.note(request, key=key_text(key), revision=self.store.revision, found=len(found))
        reply: dict[str, Any] = {}
        if found and not count_only:
            shown = found[:limit] if limit > 0 else found
            reply['kvs'] = [kv.to_json(keys_only) for kv in shown]
            if len(shown) < len(found):
                reply['more'] = True
        if found:
            reply['count'] = str(len(found))
        return reply

    def _deleterange(self, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        key = _key(body)
        range_end, want_previous = unb64(body.get('range_end', ''), 'range_end'), _flag(body, 'prev_kv')
        gone = self.store.delete(key, range_end)
        http.note(request, key=key_text(key), revision=self.store.revision, deleted=len(gone))
        reply: dict[str, Any] = {}
        if gone:
            reply['deleted'] = str(len(gone))
            if want_previous:
                reply['prev_kvs'] = [kv.to_json() for kv in gone]
        return reply


def http_resources(reactor, persona: Persona) -> dict[bytes, EtcdGateway]:
    """The gateway's first path segments, for another HTTP site sharing its port."""
    gateway = EtcdGateway(persona)
    return {b'v3': gateway, b'version': gateway, b'health': gateway}


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve the etcd v3 JSON gateway on ``listener`` (one in-memory store per port)."""
    site = http.lab_site(EtcdGateway(persona), persona, reactor=reactor, on_request=on_request)
    return http.listen_site(reactor, listener, persona, site, interface=interface)


# --- client probe --------------------------------------------------------------------------

async def _call(x, op: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await x.request('POST', f'/v3/kv/{op}', {'content-type': 'application/json'},
                            json.dumps(body).encode('utf-8'), label='etcd')
    http.expect(reply, 200)
    value = http.json_object(reply)
    header = value.get('header')
    if not isinstance(header, dict) or not str(header.get('revision', '')).isdigit():
        raise http.Reject(f'{op} reply has no header with a revision: {str(value)[:120]}')
    return value


async def _lock_read_release(x) -> str:
    device = str(x.target.options.get('device') or f'mfd-{x.nonce}')
    key = f'{LOCK_PREFIX}{device}'.encode('utf-8')
    owner = json.dumps({'owner': f'safeq-lab-probe-{x.nonce}', 'device': device}).encode('utf-8')
    put = await _call(x, 'put', {'key': b64(key), 'value': b64(owner)})
    revision = int(put['header']['revision'])
    got = await _call(x, 'range', {'key': b64(key)})
    kvs = got.get('kvs')
    if not isinstance(kvs, list) or len(kvs) != 1 or not isinstance(kvs[0], dict):
        raise http.Reject(f'range of {key_text(key)} returned {str(kvs)[:120]}, expected one key')
    kv = kvs[0]
    try:
        read_key, read_value = unb64(kv.get('key', ''), 'key'), unb64(kv.get('value', ''), 'value')
    except GatewayError as exc:
        raise http.Reject(f'range reply: {exc}') from None
    if read_key != key or read_value != owner:
        raise http.Reject(f'range returned {read_key[:64]!r} = {read_value[:64]!r}, put {owner[:64]!r}')
    if str(kv.get('mod_revision')) != str(revision):
        raise http.Reject(f'lock has mod_revision {kv.get("mod_revision")!r}, the put made revision {revision}')
    gone = await _call(x, 'deleterange', {'key': b64(key)})
    if str(gone.get('deleted')) != '1':
        raise http.Reject(f'deleterange deleted {gone.get("deleted")!r} keys, expected 1')
    member = put['header'].get('member_id', '?')
    return f'lock {key_text(key)} taken at revision {revision}, read back and released (member {member})'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Take, read back and release a device lock over the v3 JSON gateway."""
    return http.run_plan(reactor, target, _lock_read_release)
