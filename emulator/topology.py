"""Declarative lab topologies: zones, hosts, the roles each host runs, link shapes.

Pure data and validation; nothing here touches Mininet (see emulator.lab).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from emulator.errors import LabError

TOPOLOGIES_DIR = Path(__file__).resolve().parent.parent / "topologies"
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
DEFAULT_TOPOLOGY = "single-site"

BRIDGE_PREFIX = "sqlab"  # every bridge the lab creates is sqlab<N>; `safeq-lab clean` looks for it
# Mininet names interfaces "<host>-eth0"; Linux caps interface names at 15 chars.
HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,9}$")
ZONE_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
TOPOLOGY_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
FIRST_HOST_OFFSET = 10  # .1 is the firewall; hosts start at .10 unless given an address


@dataclass(frozen=True)
class LinkShape:
    """Properties of the link between a host (or a zone's switch) and the network."""

    bw: float | None = None  # Mbit/s
    delay_ms: float | None = None
    loss: float | None = None  # percent

    @property
    def shaped(self) -> bool:
        return any(v is not None for v in (self.bw, self.delay_ms, self.loss))


@dataclass(frozen=True)
class HostSpec:
    name: str
    zone: str
    address: str
    roles: tuple[str, ...]
    link: LinkShape = LinkShape()


@dataclass(frozen=True)
class Zone:
    name: str
    subnet: ipaddress.IPv4Network
    gateway: str
    hosts: tuple[HostSpec, ...]
    link: LinkShape = LinkShape()


@dataclass(frozen=True)
class Topology:
    name: str
    description: str
    path: Path
    firewall: str
    zones: tuple[Zone, ...]

    @property
    def hosts(self) -> list[HostSpec]:
        return [h for z in self.zones for h in z.hosts]

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"topology {self.name} has no host {name!r}; hosts: {', '.join(h.name for h in self.hosts)}")

    def zone(self, name: str) -> Zone:
        for z in self.zones:
            if z.name == name:
                return z
        raise LabError(f"topology {self.name} has no zone {name!r}")

    def hosts_with_role(self, role: str) -> list[HostSpec]:
        return [h for h in self.hosts if role in h.roles]

    def firewall_interface(self, zone: Zone) -> str:
        return f"{self.firewall}-{zone.name}"[:15]

    def bridge(self, zone: Zone) -> str:
        # Short on purpose: Mininet names the bridge's ports "<bridge>-eth<N>" (15 chars at most).
        return f"{BRIDGE_PREFIX}{self.zones.index(zone) + 1}"

    @property
    def bridges(self) -> list[str]:
        return [self.bridge(z) for z in self.zones]


def available_topologies() -> list[str]:
    return sorted(p.stem for p in TOPOLOGIES_DIR.glob("*.yaml"))


def resolve_topology_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise LabError(f"topology file {path} does not exist")
        return path
    candidate = TOPOLOGIES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise LabError(
            f"unknown topology {name_or_path!r}: use one of {', '.join(available_topologies())} or a path to a .yaml file"
        )
    return candidate


def load_topology(name_or_path: str = DEFAULT_TOPOLOGY, known_roles=None) -> Topology:
    """Load and validate a topology; `known_roles` (ids) defaults to the catalog's roles."""
    path = resolve_topology_path(name_or_path)
    if known_roles is None:
        from emulator.catalog import load_catalog

        known_roles = set(load_catalog().roles)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LabError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return _parse(path, raw, set(known_roles))


def _fail(path: Path, where: str, message: str) -> LabError:
    return LabError(f"{path}: {where}: {message}")


def _check_keys(path, where, mapping, allowed, required=()):
    if not isinstance(mapping, dict):
        raise _fail(path, where, f"expected a mapping, got {type(mapping).__name__}")
    unknown = set(mapping) - set(allowed)
    if unknown:
        raise _fail(path, where, f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in mapping:
            raise _fail(path, where, f"missing key {key!r}")


def _parse_link(path, where, raw) -> LinkShape:
    if raw is None:
        return LinkShape()
    _check_keys(path, where, raw, ("bw", "delay_ms", "loss"))
    values = {}
    for key, value in raw.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise _fail(path, f"{where}.{key}", f"expected a non-negative number, got {value!r}")
        if key == "loss" and value > 100:
            raise _fail(path, f"{where}.{key}", "loss is a percentage (0-100)")
        values[key] = float(value)
    return LinkShape(**values)


def _parse(path: Path, raw, known_roles: set[str]) -> Topology:
    _check_keys(path, "top level", raw, ("name", "description", "firewall", "zones"), ("name", "zones"))
    if not isinstance(raw["name"], str) or not TOPOLOGY_NAME.match(raw["name"]):
        raise _fail(path, "name", f"{raw['name']!r}: lowercase letters, digits and '-' only")
    firewall = raw.get("firewall", "fw")
    if not isinstance(firewall, str) or not HOST_NAME.match(firewall):
        raise _fail(path, "firewall", f"{firewall!r} is not a valid node name (lowercase, at most 10 chars)")
    if not isinstance(raw["zones"], list) or not raw["zones"]:
        raise _fail(path, "zones", "expected a non-empty list of zones")
    zones, seen_hosts, subnets = [], {firewall}, []
    for zi, zraw in enumerate(raw["zones"]):
        zwhere = f"zones[{zi}]"
        _check_keys(path, zwhere, zraw, ("name", "subnet", "link", "hosts", "description"), ("name", "subnet", "hosts"))
        zname = zraw["name"]
        if not isinstance(zname, str) or not ZONE_NAME.match(zname):
            raise _fail(path, f"{zwhere}.name", f"{zname!r}: lowercase letters/digits, at most 12 chars")
        if len(f"{firewall}-{zname}") > 15:
            raise _fail(path, f"{zwhere}.name", f"interface name {firewall}-{zname} exceeds 15 chars; shorten it")
        try:
            subnet = ipaddress.ip_network(str(zraw["subnet"]))
        except ValueError as exc:
            raise _fail(path, f"{zwhere}.subnet", str(exc)) from None
        if not subnet.subnet_of(LAB_RANGE):
            raise _fail(path, f"{zwhere}.subnet", f"{subnet} is outside the lab range {LAB_RANGE}")
        for other_name, other in subnets:
            if subnet.overlaps(other):
                raise _fail(path, f"{zwhere}.subnet", f"{subnet} overlaps zone {other_name} ({other})")
        subnets.append((zname, subnet))
        if not isinstance(zraw["hosts"], list) or not zraw["hosts"]:
            raise _fail(path, f"{zwhere}.hosts", "expected a non-empty list of hosts")
        usable = list(subnet.hosts())
        gateway = str(usable[0])
        hosts = []
        for hi, hraw in enumerate(zraw["hosts"]):
            hwhere = f"{zwhere}.hosts[{hi}]"
            _check_keys(path, hwhere, hraw, ("name", "roles", "address", "link", "description"), ("name", "roles"))
            hname = hraw["name"]
            if not isinstance(hname, str) or not HOST_NAME.match(hname):
                raise _fail(path, f"{hwhere}.name", f"{hname!r}: lowercase letters/digits/'-', at most 10 chars")
            if hname in seen_hosts:
                raise _fail(path, f"{hwhere}.name", f"duplicate node name {hname!r}")
            seen_hosts.add(hname)
            roles = hraw["roles"]
            if not isinstance(roles, list) or not roles:
                raise _fail(path, f"{hwhere}.roles", "expected a non-empty list of role ids")
            for role in roles:
                if role not in known_roles:
                    raise _fail(path, f"{hwhere}.roles", f"unknown role {role!r}; `safeq-lab catalog --roles` lists them")
            if "address" in hraw:
                try:
                    address = ipaddress.ip_address(str(hraw["address"]))
                except ValueError as exc:
                    raise _fail(path, f"{hwhere}.address", str(exc)) from None
                if address not in subnet or str(address) == gateway:
                    raise _fail(path, f"{hwhere}.address", f"{address} is not a host address of {subnet} other than the firewall's {gateway}")
            else:
                if FIRST_HOST_OFFSET + hi >= len(usable):
                    raise _fail(path, f"{hwhere}", f"subnet {subnet} has no room for another host")
                address = usable[FIRST_HOST_OFFSET - 1 + hi]
            hosts.append(HostSpec(hname, zname, str(address), tuple(roles), _parse_link(path, f"{hwhere}.link", hraw.get("link"))))
        addresses = [h.address for h in hosts]
        if len(set(addresses)) != len(addresses):
            raise _fail(path, f"{zwhere}.hosts", "two hosts share an address")
        zones.append(Zone(zname, subnet, gateway, tuple(hosts), _parse_link(path, f"{zwhere}.link", zraw.get("link"))))
    return Topology(str(raw["name"]), str(raw.get("description", "")), path, firewall, tuple(zones))
