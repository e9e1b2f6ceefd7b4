"""The SafeQ 6 flow catalog: every row of the vendor's network-communication table as data.

flows.yaml and roles.yaml next to this file are reviewed data owned by this project (the
vendor text is never parsed at run time).  load_catalog() reads and validates them; any
problem is a CatalogError whose one-line message names the file, the entry and the field.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import yaml

from emulator.errors import LabError

HERE = Path(__file__).resolve().parent
FLOWS_PATH = HERE / 'flows.yaml'
ROLES_PATH = HERE / 'roles.yaml'

PROTOCOL_IDS = frozenset({
    'http', 'soap', 'webdav', 'ftp', 'ftp-data', 'ldap', 'snmp', 'snmp-trap', 'lpr', 'raw', 'ipp', 'time',
    'terminal', 'discovery', 'safeq', 'jmx', 'ajp', 'smtp', 'pop3', 'imap', 'mdns', 'smb', 'ssh', 'pgsql',
    'mssql', 'jgroups', 'amqp', 'icmp', 'netbios-ns', 'netbios-dgm', 'etcd', 'infinispan',
})
NUMERIC_SHAPES = frozenset({'single', 'list', 'alternatives', 'range', 'mixed'})
NAMED_SHAPES = frozenset({'user_defined', 'device_dependent', 'not_applicable', 'unspecified'})
SHAPES = NUMERIC_SHAPES | NAMED_SHAPES
TRANSPORTS = frozenset({'tcp', 'udp', 'icmp'})
SECURITIES = frozenset({'plain', 'tls', 'starttls', 'optional'})
CHANNELS = frozenset({'service', 'data'})
ROLE_KINDS = frozenset({'safeq', 'terminal', 'device', 'client', 'external'})
NO_ROLE = '–'  # the vendor's cell for "no client"

_ROLE_ID = re.compile(r'[a-z0-9]+(-[a-z0-9]+)*')


class CatalogError(LabError):
    """The catalog data is wrong or a lookup names something the catalog does not have."""


@dataclass(frozen=True)
class PortSpec:
    shape: str
    text: str
    ports: tuple[int, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()
    is_default: bool = False


@dataclass(frozen=True)
class Endpoint:
    transport: str
    protocol: str
    security: str = 'plain'
    port: int | None = None
    port_range: tuple[int, int] | None = None
    channel: str = 'service'

    def label(self) -> str:
        if self.transport == 'icmp':
            return 'icmp'
        where = self.port if self.port is not None else '-'.join(map(str, self.port_range))
        return f'{where}/{self.transport}'

    def covers(self, port: int) -> bool:
        if self.port_range is not None:
            return self.port_range[0] <= port <= self.port_range[1]
        return self.port == port


@dataclass(frozen=True)
class Flow:
    id: str
    section: str
    row: int
    client: str | None
    server: str | None
    client_text: str
    server_text: str
    network: str
    application: str
    data: str
    unsecured: PortSpec
    secured: PortSpec
    endpoints: tuple[Endpoint, ...]
    note: str = ''
    why_not: str = ''

    @property
    def exercisable(self) -> bool:
        return bool(self.why_not == '' and self.client and self.server and self.endpoints)

    @property
    def protocols(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.protocol for e in self.endpoints))


@dataclass(frozen=True)
class Role:
    id: str
    name: str
    kind: str
    aliases: tuple[str, ...]


class Catalog:
    def __init__(self, flows: Iterable[Flow], roles: dict[str, Role]):
        self.flows = tuple(flows)
        self.roles = dict(roles)
        self._flows = {f.id: f for f in self.flows}
        # Vendor wordings differ only in case at times ('FlexiSpooler' / 'Flexispooler').
        self._role_names = {r.id.lower(): r.id for r in self.roles.values()}
        self._role_names.update({a.lower(): r.id for r in self.roles.values() for a in r.aliases})

    def flow(self, flow_id: str) -> Flow:
        try:
            return self._flows[flow_id]
        except KeyError:
            raise CatalogError(f'unknown flow id {flow_id!r}') from None

    def role(self, role_id: str) -> Role:
        try:
            return self.roles[role_id]
        except KeyError:
            raise CatalogError(f'unknown role id {role_id!r}') from None

    def sections(self) -> list[str]:
        return list(dict.fromkeys(f.section for f in self.flows))

    def resolve_role(self, name: str) -> str:
        """Role id for a role id or a vendor wording, case-insensitive."""
        try:
            return self._role_names[name.strip().lower()]
        except KeyError:
            raise CatalogError(f'unknown role {name!r} (neither a role id nor a vendor wording)') from None

    def filter(self, role: str | None = None, port: int | None = None, protocol: str | None = None,
               section: str | None = None) -> list[Flow]:
        """Flows matching every given criterion.

        role: role id or vendor wording; port: endpoint port or inside an endpoint range;
        protocol: wire id or substring of the vendor application cell; section: section name.
        All case-insensitive; an unknown role or section raises CatalogError (a typo, not "no flows").
        """
        flows = list(self.flows)
        if role is not None:
            rid = self.resolve_role(role)
            flows = [f for f in flows if rid in (f.client, f.server)]
        if port is not None:
            flows = [f for f in flows if any(e.covers(port) for e in f.endpoints)]
        if protocol is not None:
            p = protocol.strip().lower()
            flows = [f for f in flows if p in f.protocols or p in f.application.lower()]
        if section is not None:
            wanted = {s.lower(): s for s in self.sections()}.get(section.strip().lower())
            if wanted is None:
                raise CatalogError(f'unknown section {section!r}')
            flows = [f for f in flows if f.section == wanted]
        return flows

    def served_endpoints(self, role_id: str) -> list[tuple[Flow, Endpoint]]:
        self.role(role_id)
        return [(f, e) for f in self.flows if f.server == role_id
                for e in f.endpoints if e.channel == 'service']


def load_catalog(flows_path: str | Path | None = None, roles_path: str | Path | None = None) -> Catalog:
    """Load and validate the catalog; the package's own files (the default) are read once."""
    if flows_path is None and roles_path is None:
        return _default_catalog()
    return _load(Path(flows_path or FLOWS_PATH), Path(roles_path or ROLES_PATH))


@functools.lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    return _load(FLOWS_PATH, ROLES_PATH)


def slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')


# --- loading and validation ----------------------------------------------------------------

class _Entry:
    """Where we are in a file, so every error names file, entry and field."""

    def __init__(self, path: Path, index: int, raw: Any):
        self.path, self.index = path, index
        self.name = f'#{index}'
        if isinstance(raw, dict) and isinstance(raw.get('id'), str):
            self.name = f'{raw["id"]!r} (#{index})'

    def fail(self, field: str, problem: str) -> CatalogError:
        return CatalogError(f'{self.path}: entry {self.name}: field {field!r}: {problem}')

    def keys(self, raw: Any, field: str, required: set[str], optional: frozenset[str] = frozenset()) -> dict:
        if not isinstance(raw, dict):
            raise self.fail(field or '(entry)', f'expected a mapping, got {type(raw).__name__}')
        unknown = sorted(set(raw) - required - optional, key=str)
        if unknown:
            raise self.fail(f'{field}.{unknown[0]}' if field else str(unknown[0]), 'unknown key')
        missing = sorted(required - set(raw))
        if missing:
            raise self.fail(f'{field}.{missing[0]}' if field else missing[0], 'missing key')
        return raw

    def typed(self, value: Any, field: str, kind: type) -> Any:
        # bool is an int in Python; a port of True is a typo, not a port.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(field, f'expected {kind.__name__}, got {value!r}')
        return value

    def one_of(self, value: Any, field: str, allowed: frozenset[str]) -> str:
        if value not in allowed:
            raise self.fail(field, f'{value!r} is not one of {", ".join(sorted(allowed))}')
        return value

    def port(self, value: Any, field: str) -> int:
        self.typed(value, field, int)
        if not 1 <= value <= 65535:
            raise self.fail(field, f'port {value} is outside 1..65535')
        return value

    def port_range(self, value: Any, field: str) -> tuple[int, int]:
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail(field, f'expected [low, high], got {value!r}')
        lo, hi = self.port(value[0], field), self.port(value[1], field)
        if lo > hi:
            raise self.fail(field, f'range {lo}-{hi} is reversed')
        return lo, hi


# libyaml's parser when PyYAML has it: flows.yaml loads in 0.1 s instead of 0.6 s, same objects
_SAFE_LOADER = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)


def _read_list(path: Path) -> list:
    try:
        data = yaml.load(path.read_text(encoding='utf-8'), Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise CatalogError(f'{path}: cannot read: {exc.strerror}') from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' at line {mark.line + 1}' if mark else ''
        raise CatalogError(f'{path}: invalid YAML{where}: {getattr(exc, "problem", exc)}') from None
    if not isinstance(data, list):
        raise CatalogError(f'{path}: expected a list of entries at top level')
    return data


def _load(flows_path: Path, roles_path: Path) -> Catalog:
    roles = _load_roles(roles_path)
    wording = {alias: role.id for role in roles.values() for alias in role.aliases}
    flows: list[Flow] = []
    seen: set[str] = set()
    for index, raw in enumerate(_read_list(flows_path), 1):
        flow = _parse_flow(_Entry(flows_path, index, raw), raw, roles, wording)
        if flow.id in seen:
            raise _Entry(flows_path, index, raw).fail('id', f'duplicate id {flow.id!r}')
        seen.add(flow.id)
        flows.append(flow)
    return Catalog(flows, roles)


def _load_roles(path: Path) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    owner: dict[str, str] = {}  # lower-cased alias -> role id: a wording must mean one role only
    for index, raw in enumerate(_read_list(path), 1):
        at = _Entry(path, index, raw)
        at.keys(raw, '', {'id', 'name', 'kind', 'aliases'})
        rid = at.typed(raw['id'], 'id', str)
        if not _ROLE_ID.fullmatch(rid):
            raise at.fail('id', f'{rid!r} is not a lowercase-hyphen id')
        if rid in roles:
            raise at.fail('id', f'duplicate id {rid!r}')
        aliases = at.typed(raw['aliases'], 'aliases', list)
        if not aliases:
            raise at.fail('aliases', 'needs at least one vendor wording')
        for i, alias in enumerate(aliases):
            at.typed(alias, f'aliases[{i}]', str)
            other = owner.setdefault(alias.lower(), rid)
            if other != rid:
                raise at.fail(f'aliases[{i}]', f'{alias!r} already belongs to role {other!r}')
        roles[rid] = Role(id=rid, name=at.typed(raw['name'], 'name', str),
                          kind=at.one_of(raw['kind'], 'kind', ROLE_KINDS), aliases=tuple(aliases))
    return roles


_FLOW_KEYS = {'id', 'section', 'row', 'client', 'client_text', 'server', 'server_text', 'network',
              'application', 'data', 'unsecured', 'secured', 'endpoints'}


def _parse_flow(at: _Entry, raw: Any, roles: dict[str, Role], wording: dict[str, str]) -> Flow:
    at.keys(raw, '', _FLOW_KEYS, frozenset({'note', 'why_not'}))
    text = {k: at.typed(raw.get(k, ''), k, str)
            for k in ('id', 'section', 'client_text', 'server_text', 'network', 'application', 'data',
                      'note', 'why_not')}
    row = at.typed(raw['row'], 'row', int)
    expected_id = f'{slug(text["section"])}-{row:02d}'
    if text['id'] != expected_id:
        raise at.fail('id', f'expected {expected_id!r} (section slug + 2-digit row)')
    client = _parse_role(at, raw['client'], 'client', text['client_text'], roles, wording)
    server = _parse_role(at, raw['server'], 'server', text['server_text'], roles, wording)
    unsecured = _parse_spec(at, raw['unsecured'], 'unsecured')
    secured = _parse_spec(at, raw['secured'], 'secured')
    endpoints = tuple(_parse_endpoint(at, e, f'endpoints[{i}]')
                      for i, e in enumerate(at.typed(raw['endpoints'], 'endpoints', list)))
    _check_endpoints_match_specs(at, endpoints, unsecured, secured)
    return Flow(id=text['id'], section=text['section'], row=row, client=client, server=server,
                client_text=text['client_text'], server_text=text['server_text'], network=text['network'],
                application=text['application'], data=text['data'], unsecured=unsecured, secured=secured,
                endpoints=endpoints, note=text['note'], why_not=text['why_not'])


def _parse_role(at: _Entry, value: Any, field: str, vendor_text: str,
                roles: dict[str, Role], wording: dict[str, str]) -> str | None:
    if value is None:
        if vendor_text != NO_ROLE:
            raise at.fail(field, f'is empty but {field}_text is {vendor_text!r}, not {NO_ROLE!r}')
        return None
    at.typed(value, field, str)
    if value not in roles:
        raise at.fail(field, f'unknown role id {value!r} (not in roles.yaml)')
    # The vendor wording must be one of this role's aliases: keeps roles.yaml and flows.yaml honest.
    if wording.get(vendor_text) != value:
        raise at.fail(f'{field}_text', f'{vendor_text!r} is not an alias of role {value!r} in roles.yaml')
    return value


def _parse_spec(at: _Entry, raw: Any, field: str) -> PortSpec:
    at.keys(raw, field, {'shape', 'text', 'ports'}, frozenset({'ranges', 'is_default'}))
    shape = at.one_of(raw['shape'], f'{field}.shape', SHAPES)
    text = at.typed(raw['text'], f'{field}.text', str)
    ports = tuple(at.port(p, f'{field}.ports[{i}]')
                  for i, p in enumerate(at.typed(raw['ports'], f'{field}.ports', list)))
    ranges = tuple(at.port_range(r, f'{field}.ranges[{i}]')
                   for i, r in enumerate(at.typed(raw.get('ranges', []), f'{field}.ranges', list)))
    is_default = at.typed(raw.get('is_default', False), f'{field}.is_default', bool)
    counts = {'single': (ports and len(ports) == 1 and not ranges),
              'list': (len(ports) >= 2 and not ranges), 'alternatives': (len(ports) >= 2 and not ranges),
              'range': (not ports and len(ranges) == 1), 'mixed': (ports and ranges)}
    if shape in NUMERIC_SHAPES:
        if not counts[shape]:
            raise at.fail(f'{field}.shape', f'{shape!r} does not fit ports {list(ports)} and ranges {list(ranges)}')
        if is_default:
            raise at.fail(f'{field}.is_default', 'vendor numbers are never defaults')
        # The numbers must be the vendor's: every number in the cell text, and nothing else.
        in_text = {int(n) for n in re.findall(r'\d+', text)}
        in_data = set(ports) | {n for r in ranges for n in r}
        if in_text != in_data:
            raise at.fail(f'{field}.ports', f'{sorted(in_data)} do not match the cell text {text!r}')
    else:
        if ranges:
            raise at.fail(f'{field}.ranges', f'{shape!r} cells have no vendor ranges')
        if bool(ports) != is_default:
            raise at.fail(f'{field}.is_default', f'must be {bool(ports)} when ports are {list(ports)}')
    return PortSpec(shape=shape, text=text, ports=ports, ranges=ranges, is_default=is_default)


def _parse_endpoint(at: _Entry, raw: Any, field: str) -> Endpoint:
    at.keys(raw, field, {'transport', 'protocol'}, frozenset({'security', 'port', 'port_range', 'channel'}))
    transport = at.one_of(raw['transport'], f'{field}.transport', TRANSPORTS)
    protocol = at.one_of(raw['protocol'], f'{field}.protocol', PROTOCOL_IDS)
    security = at.one_of(raw.get('security', 'plain'), f'{field}.security', SECURITIES)
    channel = at.one_of(raw.get('channel', 'service'), f'{field}.channel', CHANNELS)
    port = at.port(raw['port'], f'{field}.port') if 'port' in raw else None
    port_range = at.port_range(raw['port_range'], f'{field}.port_range') if 'port_range' in raw else None
    if port is not None and port_range is not None:
        raise at.fail(field, 'has both port and port_range')
    if transport == 'icmp':
        if port is not None or port_range is not None:
            raise at.fail(f'{field}.port', 'icmp has no port')
    elif port is None and port_range is None:
        raise at.fail(f'{field}.port', f'{transport} endpoint needs a port or port_range')
    # A range is never listened on as a whole: only FTP data channels are ranges.
    if port_range is not None and channel != 'data':
        raise at.fail(f'{field}.channel', 'a port_range is only allowed on channel data')
    if channel == 'data' and port_range is None:
        raise at.fail(f'{field}.channel', 'channel data needs a port_range')
    return Endpoint(transport=transport, protocol=protocol, security=security, port=port,
                    port_range=port_range, channel=channel)


def _check_endpoints_match_specs(at: _Entry, endpoints: tuple[Endpoint, ...], *specs: PortSpec) -> None:
    """Endpoints use exactly the ports of the cells (vendor numbers or our defaults)."""
    spec_ports = {p for s in specs for p in s.ports}
    spec_ranges = {r for s in specs for r in s.ranges}
    for i, e in enumerate(endpoints):
        if e.port is not None and e.port not in spec_ports:
            raise at.fail(f'endpoints[{i}].port', f'{e.port} is in neither unsecured nor secured ports')
        if e.port_range is not None and e.port_range not in spec_ranges:
            raise at.fail(f'endpoints[{i}].port_range', f'{e.port_range} is in neither port cell')
    unused = (spec_ports - {e.port for e in endpoints}) | (spec_ranges - {e.port_range for e in endpoints})
    if unused:
        raise at.fail('endpoints', f'no endpoint for {sorted(unused, key=str)} of the port cells')
