"""The HTTP surface as data: the schema of ``http_personas.yaml`` (REST endpoints, SOAP
operations, the WebDAV collection, lab users), its loading and validation, and the reply
templates that both the server (to answer) and the probe (to check an answer) render.

No I/O beyond reading the YAML, no Twisted: a ``DataError`` names the entry and field that
is wrong.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import yaml

from .soap import scalar_text

DATA_FILE = Path(__file__).with_name('http_personas.yaml')

KINDS = ('health', 'json', 'preview', 'upload', 'html')
METHODS = ('GET', 'POST', 'PUT', 'DELETE')
ENCODINGS = ('json', 'form', 'query')
DOCUMENTS = ('pdf', 'pjl', 'bytes')
TEMPLATE_NAMES = {'req', 'user', 'host', 'roles', 'vendor', 'model', 'product', 'port', 'peer',
                  'uuid', 'now', 'size', 'sha256'}


class DataError(ValueError):
    """http_personas.yaml does not describe a usable surface."""

MAX_PREVIEW_SIDE = 4096      # a preview's width and height (both the endpoint's bound and the probe's)


# --- data: the role-specific surface -------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    kind: str
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
    soap_namespace: str
    soap_path: str
    soap_default: str
    soap_operations: dict[str, SoapOperation]
    dav_collection: str

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
    known = {'method', 'path', 'kind', 'status', 'required', 'user_by', 'reply', 'example',
             'encoding', 'document', 'content_type', 'marker', 'template'}
    unknown = sorted(set(item) - known)
    _need(not unknown, where, f'unknown key(s) {unknown}')
    _need(item.get('method') in METHODS, where, f'method must be one of {METHODS}')
    path = item.get('path')
    _need(isinstance(path, str) and path.startswith('/'), where, 'path must start with /')
    _need(item.get('kind') in KINDS, where, f'kind must be one of {KINDS}')
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
    return Endpoint(name=name, method=item['method'], path=path, kind=item['kind'],
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
    collection = (data.get('webdav') or {}).get('collection', 'scan')
    _need(isinstance(collection, str) and collection and '/' not in collection, 'webdav.collection',
          'must be one path segment')
    shadowed = sorted(e.name for e in endpoints.values()
                      if e.path == f'/{collection}' or e.path.startswith(f'/{collection}/'))
    _need(not shadowed, 'endpoints', f'{shadowed} lie under the WebDAV collection /{collection}/')
    return Surface(users=tuple(users), user_keys=dict(data.get('user_keys') or {}), endpoints=endpoints,
                   soap_namespace=soap.get('namespace', 'urn:safeq-lab:terminal'),
                   soap_path=soap.get('path', '/'), soap_default=default, soap_operations=operations,
                   dav_collection=collection)


@lru_cache(maxsize=None)
def load_surface(path: str = str(DATA_FILE)) -> Surface:
    with open(path, encoding='utf-8') as handle:
        return parse_surface(yaml.safe_load(handle))


def mounted_endpoints(surface: Surface, names) -> list[Endpoint]:
    """The health check and the endpoints a persona names (identity['http_endpoints']), in data order."""
    unknown = sorted(set(names) - set(surface.endpoints))
    if unknown:
        raise DataError(f"identity['http_endpoints'] names unknown endpoint(s) {unknown}")
    return [e for e in surface.endpoints.values() if e.kind == 'health' or e.name in names]



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
        elif scalar_text(want) != scalar_text(got[key]):
            problems.append(f'{key}={got[key]!r}, expected {want!r}')
    return problems

