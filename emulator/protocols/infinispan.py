"""``infinispan``: the Infinispan Server REST API v2 subset SafeQ's job services cache into, stub and probe.

Served with ``twisted.web`` through the lab's HTTP plumbing (``http.lab_site``: bounded bodies,
``X-Lab-Host``/``X-Lab-Peer`` headers, one ``on_request`` record per request, idle timeout):

``PUT /rest/v2/caches/{cache}/{key}``     store (create or replace): 204
``POST /rest/v2/caches/{cache}/{key}``    create: 204, or 409 when the key exists
``GET|HEAD /rest/v2/caches/{cache}/{key}`` the value with the Content-Type it was stored with,
                                          ``ETag`` and ``Last-Modified``; missing key: 404
``DELETE /rest/v2/caches/{cache}/{key}``  204; missing key: 404
``GET /rest/v2/caches``                   JSON array of cache names
``GET /rest/v2/caches/{cache}?action=keys|size``  JSON array of keys / the entry count
``POST /rest/v2/caches/{cache}``          create a cache (the configuration body is not read): 200
``DELETE /rest/v2/caches/{cache}``        remove a cache and its entries: 200
``GET /rest/v2/server``                   ``{"version": "Infinispan 'Flying Saucer' 14.0.21.Final"}``

Real, as Infinispan 14 does it: the paths and methods, 204 for a write, 404 with an empty body
for a missing key, 409 for a POST on an existing key, the stored media type returned on GET,
path segments percent-decoded (a ``/`` in a key is sent as ``%2F``), an operation on a cache that
does not exist is a 404.

Invented: no authentication (a real server asks for DIGEST/BASIC by default), the caches present
at start (``DEFAULT_CACHES``; a persona's ``identity['caches']``, comma-separated, replaces them),
the error texts, the ETag (a SHA-1 prefix of the value), no expiration/``timeToLiveSeconds``,
no query, counters or cluster endpoints, and the bounds: ``MAX_VALUE`` per entry, ``MAX_ENTRIES``
entries and ``MAX_STORE`` bytes over all caches (the least recently written entry goes first),
``MAX_CACHES`` caches. The store lives per listener port, in memory.

Security: 'tls' gets implicit TLS (``http.listen_site``); the catalog's Infinispan ports are plain.

Stub records: ``op`` (put | create | get | head | delete | list-caches | keys | size |
create-cache | delete-cache | server), ``cache``, ``key`` (shortened), ``stored`` (bytes) plus
the HTTP fields ``http.lab_site`` adds.

Probe: stores job metadata (a JSON document of ``target.size`` bytes, at most ``MAX_VALUE``)
under a fresh ``job-<nonce>`` key of cache ``jobs`` (option ``cache``), reads it back (bytes and
Content-Type must match), then deletes it. By hand::

    curl -X PUT -H 'Content-Type: application/json' -d '{"id": "J-1"}' http://HOST:PORT/rest/v2/caches/jobs/J-1
    curl http://HOST:PORT/rest/v2/caches/jobs/J-1
"""

from __future__ import annotations

import email.utils
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request

from . import http
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .probing import OnRequest

PROTOCOL_IDS = ('infinispan',)

SERVER_VERSION = "Infinispan 'Flying Saucer' 14.0.21.Final"
DEFAULT_CACHES = ('jobs', 'sessions', 'devices')   # invented: what a SafeQ cluster would configure
PROBE_CACHE = 'jobs'
API = '/rest/v2'
MAX_VALUE = 1 << 20          # invented bound: bytes of one entry
MAX_ENTRIES = 4 << 10        # invented bound: entries over all caches
MAX_STORE = 64 << 20         # invented bound: bytes over all caches
MAX_CACHES = 64
MAX_NAME = 1024              # bytes of a cache name or key
DEFAULT_MEDIA = 'application/octet-stream'
JSON_MEDIA = 'application/json'


class RestError(Exception):
    def __init__(self, status: int, message: str = '') -> None:
        super().__init__(message)
        self.status = status


# --- the caches (no I/O) -------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    value: bytes
    media_type: str
    modified: float

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha1(self.value).hexdigest()[:16] + '"'


class CacheStore:
    """Named caches of key -> Entry, bounded over all caches together."""

    def __init__(self, names: tuple[str, ...] = DEFAULT_CACHES) -> None:
        self.caches: dict[str, None] = dict.fromkeys(names)     # ordered set of names
        self._entries: OrderedDict[tuple[str, bytes], Entry] = OrderedDict()   # least recently written first
        self._bytes = 0

    def need_cache(self, cache: str) -> None:
        if cache not in self.caches:
            raise RestError(404, f"cache '{cache}' does not exist")

    def get(self, cache: str, key: bytes) -> Entry | None:
        self.need_cache(cache)
        return self._entries.get((cache, key))

    def put(self, cache: str, key: bytes, entry: Entry) -> None:
        self.need_cache(cache)
        self.delete(cache, key)
        while self._entries and (len(self._entries) >= MAX_ENTRIES or self._bytes + len(entry.value) > MAX_STORE):
            _old_key, old = self._entries.popitem(last=False)
            self._bytes -= len(old.value)
        self._entries[(cache, key)] = entry
        self._bytes += len(entry.value)

    def delete(self, cache: str, key: bytes) -> Entry | None:
        self.need_cache(cache)
        old = self._entries.pop((cache, key), None)
        if old is not None:
            self._bytes -= len(old.value)
        return old

    def keys(self, cache: str) -> list[bytes]:
        self.need_cache(cache)
        return [key for name, key in self._entries if name == cache]

    def create_cache(self, cache: str) -> None:
        if cache in self.caches:
            raise RestError(409, f"cache '{cache}' already exists")
        if len(self.caches) >= MAX_CACHES:
            raise RestError(507, f'no room for more than {MAX_CACHES} caches')
        self.caches[cache] = None

    def delete_cache(self, cache: str) -> None:
        for key in self.keys(cache):
            self.delete(cache, key)
        del self.caches[cache]


def _caches_of(persona: Persona) -> tuple[str, ...]:
    names = tuple(n.strip() for n in str(persona.identity.get('caches', '')).split(',') if n.strip())
    return names or DEFAULT_CACHES


def _segment(raw: bytes, what: str) -> bytes:
    value = unquote_to_bytes(raw)
    if not value or len(value) > MAX_NAME:
        raise RestError(400, f'{what} must be 1-{MAX_NAME} bytes')
    return value


def _text(value: bytes) -> str:
    return value.decode('utf-8', 'replace')[:200]


# --- server --------------------------------------------------------------------------------

class RestServer(Resource):
    """``/rest/v2/...`` of one Infinispan server; anything else is 404."""

    isLeaf = True

    def __init__(self, reactor, store: CacheStore) -> None:
        super().__init__()
        self.reactor = reactor
        self.store = store

    def render(self, request: Request) -> bytes:
        parts = request.path.split(b'/')          # b'', b'rest', b'v2', ...
        try:
            if parts[:3] != [b'', b'rest', b'v2'] or len(parts) < 4:
                raise RestError(404, 'not an Infinispan REST v2 resource')
            resource = parts[3:]
            if resource == [b'server']:
                return self._server(request)
            if resource[0] != b'caches' or len(resource) > 3:
                raise RestError(404, 'not an Infinispan REST v2 resource')
            if len(resource) == 1 or resource[1] == b'':
                return self._list_caches(request)
            cache = _segment(resource[1], 'cache name').decode('utf-8', 'replace')
            if len(resource) == 2 or resource[2] == b'':
                return self._cache(request, cache)
            return self._entry(request, cache, _segment(resource[2], 'key'))
        except RestError as exc:
            return self._error(request, exc)

    @staticmethod
    def _error(request: Request, exc: RestError) -> bytes:
        if str(exc):
            http.note(request, error=str(exc))
        return http.respond(request, exc.status, str(exc).encode('utf-8'), 'text/plain; charset=utf-8')

    @staticmethod
    def _allow(request: Request, *methods: bytes) -> None:
        if request.method not in methods:
            raise RestError(405, f'{request.method.decode("latin-1")} is not allowed here')

    def _server(self, request: Request) -> bytes:
        self._allow(request, b'GET', b'HEAD')
        http.note(request, op='server')
        return http.json_response(request, 200, {'version': SERVER_VERSION})

    def _list_caches(self, request: Request) -> bytes:
        self._allow(request, b'GET', b'HEAD')
        http.note(request, op='list-caches')
        return http.json_response(request, 200, list(self.store.caches))

    def _cache(self, request: Request, cache: str) -> bytes:
        self._allow(request, b'GET', b'HEAD', b'POST', b'DELETE')
        http.note(request, cache=cache)
        if request.method == b'POST':
            http.note(request, op='create-cache')
            self.store.create_cache(cache)
            return http.respond(request, 200, b'', 'text/plain')
        if request.method == b'DELETE':
            http.note(request, op='delete-cache')
            self.store.need_cache(cache)
            self.store.delete_cache(cache)
            return http.respond(request, 200, b'', 'text/plain')
        action = (request.args.get(b'action') or [b''])[0]
        if action == b'keys':
            http.note(request, op='keys')
            return http.json_response(request, 200, [_text(k) for k in self.store.keys(cache)])
        if action == b'size':
            http.note(request, op='size')
            return http.json_response(request, 200, len(self.store.keys(cache)))
        raise RestError(400, 'this stub answers ?action=keys and ?action=size on a cache')

    def _entry(self, request: Request, cache: str, key: bytes) -> bytes:
        method = request.method
        self._allow(request, b'GET', b'HEAD', b'PUT', b'POST', b'DELETE')
        http.note(request, op={b'PUT': 'put', b'POST': 'create'}.get(method, method.decode().lower()),
                  cache=cache, key=_text(key))
        if method in (b'PUT', b'POST'):
            if request.lab_body > MAX_VALUE:
                raise RestError(413, f'an entry holds at most {MAX_VALUE} B')
            if method == b'POST' and self.store.get(cache, key) is not None:
                raise RestError(409, f'key exists in cache {cache!r}')
            media = (request.getHeader(b'content-type') or b'').decode('latin-1').strip() or DEFAULT_MEDIA
            value = request.body()
            self.store.put(cache, key, Entry(value, media, self.reactor.seconds()))
            http.note(request, stored=len(value))
            return http.respond(request, 204, b'', 'text/plain')
        if method == b'DELETE':
            if self.store.delete(cache, key) is None:
                raise RestError(404)
            return http.respond(request, 204, b'', 'text/plain')
        entry = self.store.get(cache, key)
        if entry is None:
            raise RestError(404)
        return http.respond(request, 200, entry.value, entry.media_type,
                            {'etag': entry.etag,
                             'last-modified': email.utils.formatdate(entry.modified, usegmt=True)})


def http_resources(reactor, persona: Persona) -> dict[bytes, RestServer]:
    """The REST API as a first path segment of another HTTP site sharing its port."""
    return {b'rest': RestServer(reactor, CacheStore(_caches_of(persona)))}


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve the Infinispan REST v2 subset on ``listener`` (one in-memory store per port)."""
    root = RestServer(reactor, CacheStore(_caches_of(persona)))
    site = http.lab_site(root, persona, reactor=reactor, on_request=on_request)
    return http.listen_site(reactor, listener, persona, site, interface=interface)


# --- client probe --------------------------------------------------------------------------

def job_metadata(job_id: str, size: int) -> bytes:
    """A JSON job record padded to ``size`` bytes (never shorter than the record itself)."""
    record = {'id': job_id, 'owner': 'alice', 'queue': 'secure-print', 'pages': 12, 'color': False,
              'duplex': True, 'pad': ''}
    base = len(json.dumps(record))
    record['pad'] = 'x' * max(0, size - base)
    return json.dumps(record).encode('ascii')


async def _store_read_remove(x) -> str:
    cache = str(x.target.options.get('cache') or PROBE_CACHE)
    job_id = f'job-{x.nonce}'
    document = job_metadata(job_id, min(x.target.size, MAX_VALUE))
    path = f'{API}/caches/{quote(cache, safe="")}/{quote(job_id, safe="")}'
    reply = await x.request('PUT', path, {'content-type': JSON_MEDIA}, document, label='Infinispan')
    http.expect(reply, 200, 204)
    reply = await x.request('GET', path, {'accept': JSON_MEDIA}, label='Infinispan')
    http.expect(reply, 200)
    if reply.media != JSON_MEDIA:
        raise http.Reject(f'entry came back as {reply.media or "untyped"}, stored as {JSON_MEDIA}')
    if reply.body != document:
        raise http.Reject(f'read back {len(reply.body)} B that differ from the {len(document)} B stored')
    reply = await x.request('DELETE', path, label='Infinispan')
    http.expect(reply, 204)
    return f'{len(document)} B job metadata stored in cache {cache}, read back intact and removed'


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Store job metadata under a fresh key, read it back, delete it."""
    return http.run_plan(reactor, target, _store_read_remove)
