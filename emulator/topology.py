"""Declarative lab topologies: zones, hosts, the roles each host runs, firewalls, link shapes.

Every zone sits behind exactly one firewall node (its gateway, at .1 of the zone). With several
firewall nodes, one transit segment joins them and each routes to the others' zones through it,
so a flow between zones of two nodes crosses both. Any host may also carry a host firewall
(`rules:`), which filters what enters (INPUT) and leaves (OUTPUT) that host.

Links (emulator.impair): a zone's `link:` and a firewall node's `wan:` (its link to the transit
segment, named wan-<node>) take bw, delay_ms, jitter_ms and loss, applied by a shaper node; a
single host's `link:` takes bw only.

Pure data and validation; nothing here touches Mininet (see emulator.lab).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Mapping, NamedTuple

import yaml

from emulator import userfile
from emulator.errors import LabError
from emulator.impair import Impairment, wan_link
from emulator.profile import DeploymentProfile, parse_profile

TOPOLOGIES_DIR = Path(__file__).resolve().parent.parent / "topologies"
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
DEFAULT_TOPOLOGY = "single-site"

# Every link a run creates in the host's namespace is named sqlab<N><run> (bridge N) or
# sqlab<N>p<M><run> (its port M), <run> being the run's id (RUN_ID): two labs never share a name,
# `safeq-lab clean` and the tests find leftovers by the prefix. Linux caps names at 15 chars:
# 5 + 2 + 1 + 4 + 3, so up to 99 bridges of up to 9999 ports (a bridge takes 1023, BRIDGE_PORTS_MAX).
BRIDGE_PREFIX = "sqlab"
RUN_ID = re.compile(r"^[a-z][a-z0-9]{2}$")  # a letter first: the digits of N and M end where the id begins
BRIDGE_PORTS_MAX = 1023  # a Linux bridge numbers its ports 1..1023 (BR_MAX_PORTS 1024, port 0 reserved)
MAX_HOSTS = 10_000  # hosts of one topology, listed and fleet devices together
FLEET_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
FLEET_NAME_DEFAULT = "mfd"
FLEET_INDEX_DIGITS = 4  # fleet devices are <name>-0000, <name>-0001, ...
MFD_ROLE = "mfd"  # every fleet device's role; mfd-<vendor> and embedded-terminal-<vendor>* add the vendor's
EMBEDDED_TERMINAL = "embedded-terminal-"
_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")  # 40%, 12.5%
# Mininet names interfaces "<host>-eth0"; Linux caps interface names at 15 chars.
HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,9}$")
ZONE_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
TOPOLOGY_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
FIRST_HOST_OFFSET = 10  # .1 is the firewall; hosts start at .10 unless given an address
INTERFACE_MAX = 15  # Linux's limit on interface names
TRANSIT = "transit"  # a firewall node's transit interface is <node>-transit
HOOKS = ("output", "forward", "input")
MAX_TOPOLOGY_BYTES = 1024 * 1024  # the shipped topologies are a few KiB
TOPOLOGY_FILE = userfile.Expected(
    label="{path}:", what="a topology file", give="the topology's YAML", max_bytes=MAX_TOPOLOGY_BYTES,
    when_empty="a topology needs at least `name:` and `zones:` (copy one from topologies/)",
    encoding_fix="save the file as UTF-8")
MAX_DEPTH = 32  # YAML nesting; a topology needs about six levels
# C0/C1 controls except tab and newline, and the bidirectional overrides that reorder what a terminal shows
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


LinkShape = Impairment  # a link's shape in a topology is the impairment the lab applies to it (emulator.impair)


@dataclass(frozen=True)
class HostSpec:
    name: str
    zone: str
    address: str
    roles: tuple[str, ...]
    link: LinkShape = LinkShape()
    rules: Path | None = None  # the host's own firewall (INPUT/OUTPUT), loaded when the lab is built
    fleet: str = ""  # the fleet (its name) that declared this device, "" for a listed host
    persona: str = ""  # an entry of the topology's persona files that overrides what its roles say


@dataclass(frozen=True)
class FirewallNode:
    """A routing firewall: the gateway of its zones, and a member of the transit segment when there are several."""

    name: str
    zones: tuple[str, ...]
    transit_address: str | None = None  # None with a single firewall node (no transit segment)
    rules: Path | None = None  # default rules for this node, loaded when the lab is built
    wan: LinkShape = LinkShape()  # the shape of its link to the transit segment (its WAN)

    @property
    def transit_interface(self) -> str:
        return f"{self.name}-{TRANSIT}"

    @property
    def wan_link(self) -> str:
        """The name of its link to the transit segment (emulator.impair): wan-<node>."""
        return wan_link(self.name)


class Enforcer(NamedTuple):
    """A ruleset a packet of a flow meets: the node holding it and the hook it is met in."""

    node: str
    hook: str  # 'output' (client's host firewall) | 'forward' (a firewall node) | 'input' (server's host firewall)


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
    firewall: str  # the first firewall node's name (the only one in single-firewall topologies)
    zones: tuple[Zone, ...]
    firewalls: tuple[FirewallNode, ...] = ()  # () when built by hand: one node `firewall` owning every zone
    transit: ipaddress.IPv4Network | None = None  # the segment joining several firewall nodes
    profile: DeploymentProfile = field(default_factory=DeploymentProfile)
    personas: Mapping[str, Mapping] = field(default_factory=dict, hash=False)  # persona name -> entry (persona files)

    def __post_init__(self):
        if not self.firewalls:
            object.__setattr__(self, "firewalls", (FirewallNode(self.firewall, tuple(z.name for z in self.zones)),))

    @property
    def hosts(self) -> list[HostSpec]:
        return [h for z in self.zones for h in z.hosts]

    @cached_property
    def _hosts_by_name(self) -> dict[str, HostSpec]:
        return {h.name: h for h in self.hosts}

    def host(self, name: str) -> HostSpec:
        found = self._hosts_by_name.get(name)
        if found is None:
            raise LabError(f"topology {self.name} has no host {name!r}; hosts: {', '.join(h.name for h in self.hosts)}")
        return found

    def zone(self, name: str) -> Zone:
        for z in self.zones:
            if z.name == name:
                return z
        raise LabError(f"topology {self.name} has no zone {name!r}")

    def hosts_with_role(self, role: str) -> list[HostSpec]:
        return [h for h in self.hosts if role in h.roles]

    def with_host_rules(self, host_rules: dict[str, str]) -> "Topology":
        """The same topology with these hosts carrying their own firewall (`--rules HOST=FILE`)."""
        unknown = sorted(set(host_rules) - set(self._hosts_by_name))
        if unknown:
            raise LabError(f"--rules names {', '.join(unknown)}: not a firewall node or host of topology {self.name} "
                           f"(nodes: {', '.join(self.filtering_nodes)}; hosts: {', '.join(self._hosts_by_name)})")
        zones = tuple(replace(zone, hosts=tuple(replace(h, rules=Path(host_rules[h.name])) if h.name in host_rules
                                                else h for h in zone.hosts)) for zone in self.zones)
        return replace(self, zones=zones)

    def hosts_with_rules(self) -> list[HostSpec]:
        return [h for h in self.hosts if h.rules is not None]

    # -- firewalls ---------------------------------------------------------------------------------
    def firewall_node(self, name: str) -> FirewallNode:
        for node in self.firewalls:
            if node.name == name:
                return node
        raise LabError(f"topology {self.name} has no firewall node {name!r}; "
                       f"firewall nodes: {', '.join(n.name for n in self.firewalls)}")

    def is_firewall(self, name: str) -> bool:
        return any(node.name == name for node in self.firewalls)

    def zone_firewall(self, zone: Zone | str) -> FirewallNode:
        """The firewall node that is the gateway of this zone."""
        zone_name = zone if isinstance(zone, str) else zone.name
        for node in self.firewalls:
            if zone_name in node.zones:
                return node
        raise LabError(f"topology {self.name} has no zone {zone_name!r}")

    def firewall_interface(self, zone: Zone | str) -> str:
        zone_name = zone if isinstance(zone, str) else zone.name
        return f"{self.zone_firewall(zone_name).name}-{zone_name}"

    @property
    def filtering_nodes(self) -> tuple[str, ...]:
        """Every node that holds a ruleset: the firewall nodes, then the hosts with a host firewall."""
        return tuple(n.name for n in self.firewalls) + tuple(h.name for h in self.hosts_with_rules())

    @property
    def rules_files(self) -> dict[str, Path]:
        """node -> the rules file the topology gives it (loaded when the lab is built)."""
        files = {n.name: n.rules for n in self.firewalls if n.rules is not None}
        files.update((h.name, h.rules) for h in self.hosts_with_rules())
        return files

    def _spec(self, host: HostSpec | str) -> HostSpec:
        return self.host(host) if isinstance(host, str) else host

    def firewalls_between(self, client: HostSpec | str, server: HostSpec | str) -> tuple[str, ...]:
        """The firewall nodes a packet from client to server is forwarded by, in path order."""
        client, server = self._spec(client), self._spec(server)
        if client.zone == server.zone:
            return ()  # one segment: the bridge carries it, no firewall node routes it
        first, last = self.zone_firewall(client.zone).name, self.zone_firewall(server.zone).name
        return (first,) if first == last else (first, last)

    def crosses_firewall(self, client: HostSpec | str, server: HostSpec | str) -> bool:
        return bool(self.firewalls_between(client, server))

    def enforcers(self, client: HostSpec | str, server: HostSpec | str) -> tuple[Enforcer, ...]:
        """Every ruleset the client's first packet to the server meets, in path order.

        The client's host firewall (output), each firewall node crossed (forward), the server's
        host firewall (input). Nothing when client and server are one host (loopback).
        """
        client, server = self._spec(client), self._spec(server)
        if client.name == server.name:
            return ()
        path = [Enforcer(client.name, "output")] if client.rules is not None else []
        path += [Enforcer(node, "forward") for node in self.firewalls_between(client, server)]
        if server.rules is not None:
            path.append(Enforcer(server.name, "input"))
        return tuple(path)

    # -- links a lab can impair (emulator.impair) ---------------------------------------------------
    @property
    def link_names(self) -> tuple[str, ...]:
        """Every link a shaper can sit on: each zone's (named after the zone), then each firewall
        node's link to the transit segment (wan-<node>) when there is one."""
        return tuple(z.name for z in self.zones) + (
            tuple(fw.wan_link for fw in self.firewalls) if self.transit is not None else ())

    def link_shape(self, link: str) -> LinkShape:
        """The shape the topology gives a link (see link_names)."""
        for zone in self.zones:
            if zone.name == link:
                return zone.link
        for fw in self.firewalls:
            if self.transit is not None and fw.wan_link == link:
                return fw.wan
        raise LabError(f"topology {self.name} has no link {link!r}; links: {', '.join(self.link_names)}")

    @property
    def shaped_links(self) -> tuple[str, ...]:
        """The links whose topology entry sets an impairment."""
        return tuple(link for link in self.link_names if self.link_shape(link).shaped)

    # -- bridges ---------------------------------------------------------------------------------
    def bridge(self, zone: Zone, run_id: str = "") -> str:
        """The zone's bridge in run `run_id` (without one: the name's topology part, sqlab<N>)."""
        return bridge_name(self.zones.index(zone) + 1, run_id)

    @property
    def transit_bridge(self) -> str | None:
        return self.run_transit_bridge("")

    def run_transit_bridge(self, run_id: str) -> str | None:
        return bridge_name(len(self.zones) + 1, run_id) if self.transit is not None else None

    @property
    def bridges(self) -> list[str]:
        return self.run_bridges("")

    def run_bridges(self, run_id: str) -> list[str]:
        """Every bridge of run `run_id`: one per zone, then the transit segment's."""
        return [self.bridge(z, run_id) for z in self.zones] + (
            [self.run_transit_bridge(run_id)] if self.transit is not None else [])


def bridge_name(index: int, run_id: str = "") -> str:
    """Bridge `index` (from 1) of a run: sqlab<N><run>."""
    return f"{BRIDGE_PREFIX}{index}{run_id}"


def port_name(index: int, port: int, run_id: str = "") -> str:
    """Port `port` (from 1) of bridge `index`, the root-side end of a veth pair: sqlab<N>p<M><run>."""
    return f"{BRIDGE_PREFIX}{index}p{port}{run_id}"


def fleet_vendors(known_roles) -> dict[str, tuple[str, ...]]:
    """vendor -> the roles of one of its MFDs, from the catalog's role names.

    A vendor is the <vendor> of a role mfd-<vendor>, or of an embedded-terminal-<vendor> role that
    extends no other vendor (Brother, OKI: terminals without an MFD role of their own). An MFD runs
    `mfd`, its vendor's mfd-<vendor> and every embedded-terminal-<vendor>[-<model>] role, a terminal
    going to the longest vendor it names (embedded-terminal-fuji-xerox-xcp to fuji-xerox-xcp, not
    fuji-xerox).
    """
    mfd_vendors = {r.removeprefix("mfd-") for r in known_roles if r.startswith("mfd-")}
    terminals = sorted(r.removeprefix(EMBEDDED_TERMINAL) for r in known_roles if r.startswith(EMBEDDED_TERMINAL))
    vendors = set(mfd_vendors)
    for terminal in terminals:  # sorted: a base name comes before the names that extend it
        if not any(terminal == v or terminal.startswith(f"{v}-") for v in vendors):
            vendors.add(terminal)

    def owner(terminal: str) -> str:
        return max((v for v in vendors if terminal == v or terminal.startswith(f"{v}-")), key=len)

    return {v: (MFD_ROLE,) + ((f"mfd-{v}",) if v in mfd_vendors else ())
            + tuple(f"{EMBEDDED_TERMINAL}{t}" for t in terminals if owner(t) == v)
            for v in sorted(vendors)}


def available_topologies() -> list[str]:
    return sorted(p.stem for p in TOPOLOGIES_DIR.glob("*.yaml"))


def resolve_topology_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise LabError(f"topology file {path} does not exist; give a file name in topologies/ or the path of a .yaml file")
        if not path.is_file():
            raise LabError(f"topology file {path} is not a regular file; give the path of a .yaml file")
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
    return _parse(path, read_topology_yaml(path), set(known_roles))


def read_topology_yaml(path: Path):
    """The YAML of a topology file as plain data, refusing what a topology never needs.

    Refused, each with the line: files above MAX_TOPOLOGY_BYTES, bytes that are not UTF-8,
    anchors and aliases (a kilobyte of nested aliases expands to gigabytes), nesting deeper than
    MAX_DEPTH, a key given twice in one mapping (YAML would keep only the last), and control
    characters in a value (they would reach the terminal).
    """
    text = userfile.read_text(path, TOPOLOGY_FILE)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise LabError(f"{path}: line {exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}:" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise LabError(f"{path}:{where} not valid YAML ({problem}); fix the YAML at that line") from None
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1 if isinstance(exc.position, int) else "?"
        raise LabError(f"{path}: line {line}: character #x{exc.character:04x} is not allowed in YAML; remove it") from None
    except yaml.YAMLError as exc:
        raise LabError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]}); fix the YAML") from None


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a topology file may not use; the problem names the fix."""

    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors/aliases, deep nesting, duplicate keys or control characters."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:  # an AliasEvent (*x) or a node with an anchor (&x)
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _Refused(f"{sign}{event.anchor}: anchors and aliases are not allowed in a topology; "
                           "write the value out", event.start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep; a topology needs about six", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key_node, _value in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in first_line:
                    raise _Refused(f"key {key_node.value!r} is given twice in one mapping (first on line "
                                   f"{first_line[key_node.value]}) and YAML would keep only the last; merge them",
                                   key_node.start_mark)
                first_line[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_scalar(self, node):
        value = super().construct_scalar(node)
        bad = _CONTROL.search(value)
        if bad:
            raise _Refused(f"control character {bad.group()!r} in a value would reach the terminal; remove it",
                           node.start_mark)
        return value


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


LINK_KEYS = ("bw", "delay_ms", "jitter_ms", "loss")


def _parse_link(path, where, raw, keys=LINK_KEYS, refused: str = "") -> LinkShape:
    """A link's shape; keys outside `keys` are refused with `refused` as the fix."""
    if raw is None:
        return LinkShape()
    _check_keys(path, where, raw, LINK_KEYS)
    values = {}
    for key, value in raw.items():
        if key not in keys:
            raise _fail(path, f"{where}.{key}", refused)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise _fail(path, f"{where}.{key}", f"expected a non-negative number, got {value!r}")
        if key == "loss" and value > 100:
            raise _fail(path, f"{where}.{key}", "loss is a percentage (0-100)")
        values[key] = float(value)
    try:
        return LinkShape(**values)
    except LabError as exc:
        raise _fail(path, where, str(exc)) from None


def _parse_host_link(path, where, raw, zone: str) -> LinkShape:
    """A single host's link: bandwidth only (delay, jitter and loss sit on the zone's link, in a shaper)."""
    return _parse_link(path, where, raw, keys=("bw",),
                       refused=f"a host's link takes only bw; delay, jitter and loss go on its zone's link "
                               f"(zones[{zone}].link), where a shaper node applies them")


def _parse_rules_file(path: Path, where: str, value) -> Path:
    """A node's rules file, relative to the topology file; it must exist (its content is checked when loaded)."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, where, f"expected the path of a rules file, got {value!r}")
    rules = path.parent / value
    if not rules.is_file():
        raise _fail(path, where, f"rules file {rules} does not exist")
    return rules


def _parse_persona_files(path: Path, value) -> dict[str, dict]:
    """{persona name: entry} from the files `personas:` lists (relative to the topology file), as
    `safeq-lab persona import` writes them; each entry is checked the way the stubs will use it."""
    from emulator import persona_import

    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(path, "personas", "expected a list of persona files (YAML written by `safeq-lab persona import`)")
    personas: dict[str, dict] = {}
    for file in value:
        where = path.parent / file
        if not where.is_file():
            raise _fail(path, "personas", f"persona file {where} does not exist")
        if not where.read_bytes().strip():
            raise LabError(f"{where}: the persona file is empty; write one with `safeq-lab persona import`")
        data = read_topology_yaml(where)
        if not isinstance(data, dict) or not all(isinstance(e, dict) for e in data.values()):
            raise LabError(f"{where}: expected `name: {{persona fields}}` entries, as `safeq-lab persona import` writes")
        for name, entry in data.items():
            if name in personas:
                raise LabError(f"{where}: persona {name!r} is also in another of the topology's persona files")
            try:
                persona_import.snmp_objects(entry)
                persona_import.ipp_attributes(entry)
            except ValueError as exc:
                raise LabError(f"{where}: persona {name!r}: {exc}") from None
            personas[str(name)] = entry
    return personas


def _parse_firewalls(path: Path, raw) -> list[dict]:
    """The firewall nodes as given (name, zones or None for 'every zone', rules, address); zones checked later."""
    if "firewall" in raw and "firewalls" in raw:
        raise _fail(path, "top level", "give either `firewall` (one node for every zone) or `firewalls`, not both")
    if "firewalls" not in raw:
        name = raw.get("firewall", "fw")
        if not isinstance(name, str) or not HOST_NAME.match(name):
            raise _fail(path, "firewall", f"{name!r} is not a valid node name (lowercase, at most 10 chars)")
        return [{"name": name, "zones": None, "rules": None, "address": None, "where": "firewall"}]
    if not isinstance(raw["firewalls"], list) or not raw["firewalls"]:
        raise _fail(path, "firewalls", "expected a non-empty list of firewall nodes")
    nodes, owner = [], {}
    for fi, fraw in enumerate(raw["firewalls"]):
        fwhere = f"firewalls[{fi}]"
        _check_keys(path, fwhere, fraw, ("name", "zones", "rules", "transit_address", "wan", "description"),
                    ("name", "zones"))
        name = fraw["name"]
        if not isinstance(name, str) or not HOST_NAME.match(name):
            raise _fail(path, f"{fwhere}.name", f"{name!r} is not a valid node name (lowercase letters/digits/'-', at most 10 chars)")
        if any(n["name"] == name for n in nodes):
            raise _fail(path, f"{fwhere}.name", f"duplicate firewall node {name!r}")
        zones = fraw["zones"]
        if not isinstance(zones, list) or not zones or not all(isinstance(z, str) for z in zones):
            raise _fail(path, f"{fwhere}.zones", "expected a non-empty list of zone names")
        for zone in zones:
            if zone in owner:
                raise _fail(path, f"{fwhere}.zones", f"zone {zone!r} already belongs to firewall node {owner[zone]}; "
                                                     "every zone has exactly one firewall node")
            owner[zone] = name
        rules = _parse_rules_file(path, f"{fwhere}.rules", fraw["rules"]) if "rules" in fraw else None
        nodes.append({"name": name, "zones": tuple(zones), "rules": rules, "address": fraw.get("transit_address"),
                      "wan": _parse_link(path, f"{fwhere}.wan", fraw.get("wan")), "where": fwhere})
    return nodes


def _parse_transit(path: Path, raw, nodes: list[dict], subnets) -> tuple[ipaddress.IPv4Network | None, list[str | None]]:
    """The transit segment and each node's address on it (None, [None] with a single node)."""
    if len(nodes) == 1:
        if "transit" in raw:
            raise _fail(path, "transit", f"a transit segment joins several firewall nodes; this topology has one ({nodes[0]['name']})")
        if nodes[0].get("wan", LinkShape()).shaped:
            raise _fail(path, f"{nodes[0]['where']}.wan", "only firewall nodes joined by a transit segment have a WAN link")
        if nodes[0]["address"] is not None:
            raise _fail(path, f"{nodes[0]['where']}.transit_address", "only firewall nodes joined by a transit segment have one")
        return None, [None]
    if "transit" not in raw:
        raise _fail(path, "transit", f"missing: {len(nodes)} firewall nodes need a transit subnet of {LAB_RANGE} joining them")
    try:
        transit = ipaddress.ip_network(str(raw["transit"]))
    except ValueError as exc:
        raise _fail(path, "transit", f"{exc}; give a subnet of {LAB_RANGE} in CIDR form") from None
    if transit.version != 4 or not transit.subnet_of(LAB_RANGE):
        raise _fail(path, "transit", f"{transit} is outside the lab range {LAB_RANGE}")
    for zone_name, subnet in subnets:
        if transit.overlaps(subnet):
            raise _fail(path, "transit", f"{transit} overlaps zone {zone_name} ({subnet})")
    usable = list(transit.hosts())
    if len(usable) < len(nodes):
        raise _fail(path, "transit", f"{transit} has no room for {len(nodes)} firewall nodes")
    addresses: list[str | None] = []
    for index, node in enumerate(nodes):
        if node["address"] is None:
            addresses.append(str(usable[index]))
            continue
        try:
            address = ipaddress.ip_address(str(node["address"]))
        except ValueError as exc:
            raise _fail(path, f"{node['where']}.transit_address", f"{exc}; give an address of the transit subnet") from None
        if address not in usable:
            raise _fail(path, f"{node['where']}.transit_address", f"{address} is not a host address of the transit {transit}")
        addresses.append(str(address))
    if len(set(addresses)) != len(addresses):
        raise _fail(path, "firewalls", "two firewall nodes share a transit address; give each its own transit_address")
    return transit, addresses


def _parse_share(path: Path, where: str, value) -> Fraction:
    """A vendor's share of a fleet, in percent: 40% (or the number 40)."""
    if isinstance(value, str) and _SHARE.match(value):
        share = Fraction(_SHARE.match(value)[1])
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf"):
        share = Fraction(str(value))
    else:
        raise _fail(path, where, f"{value!r} is not a share; give a percentage such as 40%")
    if not 0 < share <= 100:
        raise _fail(path, where, f"{value!r}: a share is more than 0% and at most 100%; drop a vendor the fleet has none of")
    return share


def _fleet_counts(count: int, shares: dict[str, Fraction]) -> dict[str, int]:
    """Devices per vendor: largest remainder on the shares, ties to the vendor listed first."""
    quotas = {v: count * share / 100 for v, share in shares.items()}
    counts = {v: int(q) for v, q in quotas.items()}  # floor: quotas are non-negative
    order = list(shares)
    by_remainder = sorted(order, key=lambda v: (-(quotas[v] - counts[v]), order.index(v)))
    for vendor in by_remainder[:count - sum(counts.values())]:
        counts[vendor] += 1
    return counts


def _interleave(counts: dict[str, int]) -> list[str]:
    """The vendor of each device in order, spread evenly: vendor v's k-th device at (k + 1/2) / n_v of
    the fleet, ties in the order the mix lists them, so any prefix of the fleet holds every vendor
    in about its share."""
    order = list(counts)
    slots = [(Fraction(2 * k + 1, 2 * n), order.index(v), v) for v, n in counts.items() for k in range(n)]
    return [v for _key, _index, v in sorted(slots)]


def _smallest_prefix(addresses: int) -> int:
    """The longest prefix whose subnet has this many host addresses."""
    prefix = 30
    while prefix > 0 and 2 ** (32 - prefix) - 2 < addresses:
        prefix -= 1
    return prefix


def _parse_fleet(path: Path, where: str, raw, zname: str, subnet, usable: list, listed: list[HostSpec],
                 seen_hosts: set[str], known_roles: set[str], room: int) -> list[HostSpec]:
    """A zone's `fleet:`: `count` MFDs of the vendors in `mix`, as hosts after the listed ones."""
    _check_keys(path, where, raw, ("count", "name", "mix"), ("count", "mix"))
    count = raw["count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise _fail(path, f"{where}.count", f"{count!r}: give the number of devices, a whole number of at least 1")
    per_zone = BRIDGE_PORTS_MAX - 1
    if len(listed) + count > per_zone:
        raise _fail(path, f"{where}.count", f"{len(listed)} listed hosts and {count} devices: a zone's bridge takes at "
                                            f"most {BRIDGE_PORTS_MAX} ports, one for the firewall node and one per host, "
                                            f"so a zone holds at most {per_zone} hosts; split the fleet over several zones")
    if count > room:
        raise _fail(path, f"{where}.count", f"{count} devices would give the topology more than {MAX_HOSTS} hosts; "
                                            "make the fleets smaller")
    name = raw.get("name", FLEET_NAME_DEFAULT)
    width = max(FLEET_INDEX_DIGITS, len(str(count - 1)))
    last = f"{name}-{count - 1:0{width}d}" if isinstance(name, str) else ""
    if not isinstance(name, str) or not FLEET_NAME.match(name) or not HOST_NAME.match(last):
        raise _fail(path, f"{where}.name", f"{name!r}: devices are named <name>-{'0' * width}, at most 10 chars: "
                                           f"give lowercase letters/digits/'-', at most {9 - width} chars")
    vendors = fleet_vendors(known_roles)
    mix = raw["mix"]
    if not isinstance(mix, dict) or not mix:
        raise _fail(path, f"{where}.mix", "expected a mapping of vendor to share, such as {konica-minolta: 60%, ricoh: 40%}")
    shares = {}
    for vendor, value in mix.items():
        if vendor not in vendors:
            raise _fail(path, f"{where}.mix", f"unknown vendor {vendor!r}; vendors: {', '.join(vendors)}")
        shares[vendor] = _parse_share(path, f"{where}.mix.{vendor}", value)
    total = sum(shares.values())
    if total != 100:
        raise _fail(path, f"{where}.mix", f"the shares add up to {float(total):g}%; make them add up to 100%")
    taken = {h.address for h in listed}
    start = FIRST_HOST_OFFSET - 1 + len(listed)  # after the listed hosts, as another listed host would be
    addresses = [a for a in (str(u) for u in usable[start:start + count + len(taken)]) if a not in taken][:count]
    if len(addresses) < count:
        need = start + count + sum(1 for a in taken if start < len(usable) and ipaddress.ip_address(a) >= usable[start])
        raise _fail(path, f"{where}.count", f"{count} devices after {len(listed)} listed hosts do not fit {subnet} "
                                            f"(hosts from .{FIRST_HOST_OFFSET}); give the zone a "
                                            f"/{_smallest_prefix(need)} or larger subnet")
    hosts = []
    for index, (vendor, address) in enumerate(zip(_interleave(_fleet_counts(count, shares)), addresses)):
        hname = f"{name}-{index:0{width}d}"
        if hname in seen_hosts:
            raise _fail(path, f"{where}.name", f"device {hname} has the name of another node; give the fleet another name")
        seen_hosts.add(hname)
        hosts.append(HostSpec(hname, zname, address, vendors[vendor], fleet=name))
    return hosts


def _check_link_names(path: Path, zones: list[Zone], transit_ports: int) -> None:
    """Every link a run names in the host's namespace fits Linux's INTERFACE_MAX chars."""
    sizes = [len(z.hosts) + 1 for z in zones] + ([transit_ports] if transit_ports else [])
    for index, size in enumerate(sizes, start=1):
        for name in (bridge_name(index, "run"), port_name(index, size, "run")):
            if len(name) > INTERFACE_MAX:
                raise _fail(path, "zones", f"the lab would name a link {name} (<run> being 3 chars), longer than "
                                           f"Linux's {INTERFACE_MAX} chars; use fewer zones or fewer hosts per zone")


def _parse(path: Path, raw, known_roles: set[str]) -> Topology:
    _check_keys(path, "top level", raw, ("name", "description", "firewall", "firewalls", "transit", "profile",
                                         "personas", "zones"), ("name", "zones"))
    if not isinstance(raw["name"], str) or not TOPOLOGY_NAME.match(raw["name"]):
        raise _fail(path, "name", f"{raw['name']!r}: lowercase letters, digits and '-' only")
    personas = _parse_persona_files(path, raw.get("personas", []))
    nodes = _parse_firewalls(path, raw)
    owner = {z: n["name"] for n in nodes if n["zones"] is not None for z in n["zones"]}
    if not isinstance(raw["zones"], list) or not raw["zones"]:
        raise _fail(path, "zones", "expected a non-empty list of zones")
    zones, seen_hosts, subnets = [], {n["name"] for n in nodes}, []
    for zi, zraw in enumerate(raw["zones"]):
        zwhere = f"zones[{zi}]"
        _check_keys(path, zwhere, zraw, ("name", "subnet", "link", "hosts", "fleet", "description"), ("name", "subnet"))
        zname = zraw["name"]
        if not isinstance(zname, str) or not ZONE_NAME.match(zname):
            raise _fail(path, f"{zwhere}.name", f"{zname!r}: lowercase letters/digits, at most 12 chars")
        if any(z.name == zname for z in zones):
            raise _fail(path, f"{zwhere}.name", f"duplicate zone {zname!r}")
        if len(nodes) == 1 and nodes[0]["zones"] is None:
            firewall = nodes[0]["name"]
        elif zname in owner:
            firewall = owner[zname]
        else:
            raise _fail(path, f"{zwhere}.name", f"zone {zname!r} has no firewall node: list it in the zones of one of firewalls")
        if len(nodes) > 1 and zname == TRANSIT:
            raise _fail(path, f"{zwhere}.name", f"{TRANSIT!r} names the firewall nodes' transit interfaces; rename the zone")
        if len(f"{firewall}-{zname}") > INTERFACE_MAX:
            raise _fail(path, f"{zwhere}.name", f"interface name {firewall}-{zname} exceeds {INTERFACE_MAX} chars; shorten it")
        try:
            subnet = ipaddress.ip_network(str(zraw["subnet"]))
        except ValueError as exc:
            raise _fail(path, f"{zwhere}.subnet", f"{exc}; give a subnet of {LAB_RANGE} in CIDR form, such as 198.18.1.0/24") from None
        if subnet.version != 4:
            raise _fail(path, f"{zwhere}.subnet", f"{subnet} is IPv6; the lab is IPv4 only: give a subnet of {LAB_RANGE}")
        if not subnet.subnet_of(LAB_RANGE):
            raise _fail(path, f"{zwhere}.subnet", f"{subnet} is outside the lab range {LAB_RANGE}")
        for other_name, other in subnets:
            if subnet.overlaps(other):
                raise _fail(path, f"{zwhere}.subnet", f"{subnet} overlaps zone {other_name} ({other}); give each zone a subnet of its own")
        subnets.append((zname, subnet))
        listed = zraw.get("hosts", [])
        if not isinstance(listed, list) or not (listed or "fleet" in zraw):
            raise _fail(path, f"{zwhere}.hosts", "expected a non-empty list of hosts (or a fleet: of devices)")
        usable = list(subnet.hosts())
        gateway = str(usable[0])
        hosts = []
        for hi, hraw in enumerate(listed):
            hwhere = f"{zwhere}.hosts[{hi}]"
            _check_keys(path, hwhere, hraw, ("name", "roles", "address", "link", "rules", "persona", "description"),
                        ("name", "roles"))
            hname = hraw["name"]
            if not isinstance(hname, str) or not HOST_NAME.match(hname):
                raise _fail(path, f"{hwhere}.name", f"{hname!r}: lowercase letters/digits/'-', at most 10 chars")
            if hname in seen_hosts:
                raise _fail(path, f"{hwhere}.name", f"duplicate node name {hname!r}; every host and firewall node needs a name of its own")
            seen_hosts.add(hname)
            roles = hraw["roles"]
            if not isinstance(roles, list) or not roles:
                raise _fail(path, f"{hwhere}.roles", "expected a non-empty list of role ids")
            for role in roles:
                if not isinstance(role, str):
                    raise _fail(path, f"{hwhere}.roles", f"{role!r} is not a role id; `safeq-lab catalog --roles` lists them")
                if role not in known_roles:
                    raise _fail(path, f"{hwhere}.roles", f"unknown role {role!r}; `safeq-lab catalog --roles` lists them")
            if "address" in hraw:
                try:
                    address = ipaddress.ip_address(str(hraw["address"]))
                except ValueError as exc:
                    raise _fail(path, f"{hwhere}.address", f"{exc}; give an address of the zone's subnet, or none to have one assigned") from None
                if address not in subnet or str(address) == gateway:
                    raise _fail(path, f"{hwhere}.address", f"{address} is not a host address of {subnet} other than the firewall's {gateway}")
            else:
                if FIRST_HOST_OFFSET + hi >= len(usable):
                    raise _fail(path, f"{hwhere}", f"subnet {subnet} has no room for another host")
                address = usable[FIRST_HOST_OFFSET - 1 + hi]
            rules = _parse_rules_file(path, f"{hwhere}.rules", hraw["rules"]) if "rules" in hraw else None
            persona = hraw.get("persona", "")
            if persona not in ("", *personas):
                known = ", ".join(sorted(personas)) or "none: list persona files under `personas:`"
                raise _fail(path, f"{hwhere}.persona", f"unknown persona {persona!r}; the topology's persona files hold {known}")
            hosts.append(HostSpec(hname, zname, str(address), tuple(roles),
                                  _parse_host_link(path, f"{hwhere}.link", hraw.get("link"), zname), rules, persona=persona))
        addresses = [h.address for h in hosts]
        if len(set(addresses)) != len(addresses):
            raise _fail(path, f"{zwhere}.hosts", "two hosts share an address")
        if len(hosts) > BRIDGE_PORTS_MAX - 1:
            raise _fail(path, f"{zwhere}.hosts", f"{len(hosts)} hosts: a zone's bridge takes at most {BRIDGE_PORTS_MAX} "
                                                 f"ports, one for the firewall node and one per host; split the zone")
        if "fleet" in zraw:
            room = MAX_HOSTS - sum(len(z.hosts) for z in zones) - len(hosts)
            hosts += _parse_fleet(path, f"{zwhere}.fleet", zraw["fleet"], zname, subnet, usable, hosts, seen_hosts,
                                  known_roles, room)
        zones.append(Zone(zname, subnet, gateway, tuple(hosts), _parse_link(path, f"{zwhere}.link", zraw.get("link"))))
    zone_names = [z.name for z in zones]
    for node in nodes:
        for zone in node["zones"] or ():
            if zone not in zone_names:
                raise _fail(path, f"{node['where']}.zones", f"unknown zone {zone!r}; zones: {', '.join(zone_names)}")
    if sum(len(z.hosts) for z in zones) > MAX_HOSTS:
        raise _fail(path, "zones", f"{sum(len(z.hosts) for z in zones)} hosts; the lab takes at most {MAX_HOSTS}")
    transit, transit_addresses = _parse_transit(path, raw, nodes, subnets)
    _check_link_names(path, zones, len(nodes) if transit is not None else 0)
    firewalls = []
    for node, transit_address in zip(nodes, transit_addresses):
        owned = tuple(z for z in zone_names if node["zones"] is None or z in node["zones"])
        if transit is not None and len(f"{node['name']}-{TRANSIT}") > INTERFACE_MAX:
            raise _fail(path, f"{node['where']}.name", f"interface name {node['name']}-{TRANSIT} exceeds "
                                                       f"{INTERFACE_MAX} chars; shorten the node name")
        firewalls.append(FirewallNode(node["name"], owned, transit_address, node["rules"], node.get("wan", LinkShape())))
    profile = parse_profile(path, raw.get("profile"))
    description = raw.get("description") or ""
    if not isinstance(description, (str, int, float)) or isinstance(description, bool):
        raise _fail(path, "description", "expected one line of text")
    return Topology(str(raw["name"]), " ".join(str(description).split()), path, firewalls[0].name, tuple(zones),
                    tuple(firewalls), transit, profile, personas)
