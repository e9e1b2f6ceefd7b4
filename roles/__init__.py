"""Roles: a SafeQ component or device is data - the catalog flows it serves and starts.

No class per role or per vendor: everything a role does comes from the catalog (ports,
protocols, peers). Protocol stubs plug in per wire protocol (emulator.protocols), so a new
faithful stub changes every role that serves that protocol at once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

import yaml

from emulator.catalog import Catalog, Endpoint, Flow, Role, load_catalog
from emulator.profile import DeploymentProfile
from emulator.protocols.base import Listener
from emulator.protocols.persona_schema import check_identity

LOCALHOST = "127.0.0.1"

# Where one host serves a port for several flows or roles, the more specific protocol wins the
# listener (an IPP printer and an HTTP install endpoint on one port are one HTTP server in reality).
_UPGRADABLE = {"plain", "starttls", "optional"}
_LISTENER_PRECEDENCE = ("ftp", "ldap", "snmp", "lpr", "raw", "ipp", "soap", "webdav", "http")
# Protocols that are HTTP underneath: on a port one of _HTTP_SITES serves for another role of the
# host, they are mounted on that HTTP site (one socket, both surfaces), as one Tomcat would serve both.
_MOUNTED_ON_HTTP = frozenset({"etcd", "infinispan"})
_HTTP_SITES = frozenset({"http", "soap", "webdav"})


@dataclass(frozen=True)
class RoleProfile:
    role: Role
    serves: tuple[tuple[Flow, Endpoint], ...]
    initiates: tuple[Flow, ...]


def profile(role_id: str, catalog: Catalog | None = None) -> RoleProfile:
    catalog = catalog or load_catalog()
    role = catalog.role(role_id)
    return RoleProfile(role, tuple(catalog.served_endpoints(role_id)),
                       tuple(f for f in catalog.flows if f.client == role_id))


def listeners(role_ids, catalog: Catalog | None = None, site: DeploymentProfile | None = None) -> list[Listener]:
    """Every (transport, port) a host running these roles listens on, one listener each.

    With a profile whose SafeQ version keeps JMX on localhost (MU38 and later), JMX listeners bind
    to 127.0.0.1 as the real services do, so a firewall that lets JMX through reaches a closed port.
    """
    catalog = catalog or load_catalog()
    site = site or DeploymentProfile()
    chosen: dict[tuple[str, int], Listener] = {}
    mounted: dict[tuple[str, int], set[str]] = {}  # HTTP-based protocols that share a port with others
    for role_id in role_ids:
        for _flow, ep in profile(role_id, catalog).serves:
            if ep.port is None or ep.transport == "icmp":
                continue  # the kernel answers ICMP; FTP data ranges are opened per session
            candidate = Listener(ep.transport, ep.port, ep.protocol, ep.security)
            current = chosen.get((ep.transport, ep.port))
            if ep.protocol in _MOUNTED_ON_HTTP:
                mounted.setdefault((ep.transport, ep.port), set()).add(ep.protocol)
            if current is None or _rank(candidate.protocol) < _rank(current.protocol):
                chosen[(ep.transport, ep.port)] = candidate
            elif current.protocol == candidate.protocol and current.security != candidate.security:
                # one port, plain for some flows and upgraded for others: serve both
                if {current.security, candidate.security} <= _UPGRADABLE:
                    chosen[(ep.transport, ep.port)] = Listener(ep.transport, ep.port, ep.protocol, "optional")
    for key, protocols in mounted.items():
        served = chosen[key]
        also = tuple(sorted(protocols - {served.protocol}))
        if also and served.protocol in _HTTP_SITES:
            chosen[key] = replace(served, also=also)
    if not site.jmx_remote:
        chosen = {key: replace(item, bind=LOCALHOST) if item.protocol == "jmx" else item for key, item in chosen.items()}
    return sorted(chosen.values(), key=lambda item: (item.port, item.transport))


def _rank(protocol: str) -> int:
    return _LISTENER_PRECEDENCE.index(protocol) if protocol in _LISTENER_PRECEDENCE else len(_LISTENER_PRECEDENCE)


PERSONAS_FILE = Path(__file__).with_name("personas.yaml")
HTTP_SURFACES_FILE = Path(__file__).with_name("http_surfaces.yaml")


class PersonaFileError(ValueError):
    """roles/personas.yaml or roles/http_surfaces.yaml is wrong; the message is one line."""


@lru_cache(maxsize=None)
def _personas() -> dict:
    """Every role's persona entry, checked against the persona schema (types and field names)."""
    data = yaml.safe_load(PERSONAS_FILE.read_text()) or {}
    if not isinstance(data, dict):
        raise PersonaFileError(f"{PERSONAS_FILE.name}: must map role ids to persona entries")
    return {role_id: check_identity(entry or {}, f"{PERSONAS_FILE.name}: {role_id}")
            for role_id, entry in data.items()}


@lru_cache(maxsize=None)
def _http_surfaces() -> dict:
    data = yaml.safe_load(HTTP_SURFACES_FILE.read_text()) or {}
    where = HTTP_SURFACES_FILE.name
    endpoints = data.get("endpoints") or {}
    for name, patterns in [*endpoints.items(), ("soap", data.get("soap", [])), ("webdav", data.get("webdav", []))]:
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise PersonaFileError(f"{where}: {name} must be a list of role id patterns")
    return {"endpoints": endpoints, "soap": data.get("soap", []), "webdav": data.get("webdav", [])}


def _served_by(patterns, role_ids) -> bool:
    return any(fnmatch(role_id, pattern) for pattern in patterns for role_id in role_ids)


def http_surface(role_ids) -> dict:
    """The persona fields saying which parts of the lab HTTP surface a host of these roles serves."""
    surfaces = _http_surfaces()
    return {"http_endpoints": [name for name, patterns in surfaces["endpoints"].items()
                               if _served_by(patterns, role_ids)],
            "http_soap": _served_by(surfaces["soap"], role_ids),
            "http_webdav": _served_by(surfaces["webdav"], role_ids)}


def identity(role_ids) -> dict:
    """Persona data of a host: its roles' entries merged; a vendor's entry beats a generic one.
    Values keep their schema types (emulator/protocols/persona_schema.py)."""
    merged: dict = {}
    for role_id in sorted(role_ids, key=lambda r: "vendor" not in (_personas().get(r) or {})):
        for key, value in (_personas().get(role_id) or {}).items():
            merged.setdefault(key, value)
    return {**merged, **http_surface(role_ids)}


def daemon_spec(host_name: str, role_ids, log_path: str, catalog: Catalog | None = None,
                persona: dict | None = None, site: DeploymentProfile | None = None) -> dict:
    """What `python -m emulator.roled` needs to impersonate these roles on one host."""
    catalog, site = catalog or load_catalog(), site or DeploymentProfile()
    # Once per role set, not per host: a fleet's thousand devices share a dozen role sets (3.6 ms each).
    key = (tuple(role_ids), id(catalog), repr(site))  # an entry holds its catalog: that id stays its own
    cached = _ROLE_SET_SPECS.get(key)
    if cached is None:
        if len(_ROLE_SET_SPECS) >= 256:
            _ROLE_SET_SPECS.clear()
        cached = _ROLE_SET_SPECS[key] = (catalog, tuple(item.to_dict() for item in listeners(role_ids, catalog, site)),
                                         identity(role_ids))
    _catalog, listened, known = cached
    return {"host": host_name, "roles": list(role_ids), "listeners": [dict(item) for item in listened],
            "log": log_path, "persona": {**(persona or {}), "identity": copy.deepcopy(known)}}


_ROLE_SET_SPECS: dict[tuple, tuple] = {}


PROBE_OPTIONS_FILE = Path(__file__).with_name("probe_options.yaml")


@lru_cache(maxsize=None)
def _probe_options() -> dict:
    return yaml.safe_load(PROBE_OPTIONS_FILE.read_text()) or {}


def probe_options(flow_id: str) -> dict:
    """The request a flow's client makes where it differs from the protocol's default (data, by flow id)."""
    return dict(_probe_options().get(flow_id) or {})
