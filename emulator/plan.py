"""Catalog x topology x deployment profile: what each host serves, and which checks an audit runs.

Pure data: no Mininet, no sockets. The lab runs what this module plans.

* Required checks: one per catalog flow, host pair and endpoint the site's profile uses.
* Exposure checks: from every host to every other host it reaches through a firewall (a
  firewall node or the target's own host firewall), on every port of the target's zone that
  the catalog names and on the common administrative and database ports, except the ports the
  scout has a required flow to. A port where nothing listens counts too: the firewall letting
  the packet through is the finding.
"""
from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml

import roles
from emulator.catalog import HERE, Catalog, Endpoint, Flow
from emulator.catalog.alternatives import load_alternatives
from emulator.profile import DeploymentProfile
from emulator.protocols.base import Listener
from emulator.topology import HostSpec, Topology

EXPOSURE_PORTS_PATH = HERE / "exposure_ports.yaml"


class CheckKind(StrEnum):
    REQUIRED = "required"            # must pass: a catalog flow the site uses
    EXPOSURE = "exposure"            # must be blocked: nothing the site uses needs it
    LOCAL = "local"                  # client and server roles share a host
    NOT_EXERCISABLE = "not-exercisable"
    NO_PEER = "no-peer"


@dataclass(frozen=True, slots=True)
class Check:
    """One verdict line of an audit: a flow (or an exposure probe) between two hosts."""

    kind: CheckKind
    flow_id: str | None
    client_host: str | None
    server_host: str | None
    endpoint: Endpoint | None
    detail: str = ""
    variant: str = ""  # a protocol mode the flow is checked in, e.g. FTP 'passive' / 'active'
    enforcers: tuple = ()  # the filtering nodes on the path, in order (topology.enforcers)

    @property
    def label(self) -> str:
        label = self.endpoint.label() if self.endpoint else "-"
        return f"{label} {self.variant}" if self.variant else label

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.flow_id}:{self.client_host}>{self.server_host}:{self.label}"

    @property
    def probed(self) -> bool:
        return self.kind in (CheckKind.REQUIRED, CheckKind.EXPOSURE)

    @property
    def filtered(self) -> bool:
        """True when some firewall (node or host) stands between client and server."""
        return bool(self.enforcers)


def listeners_for(catalog: Catalog, host: HostSpec, profile: DeploymentProfile | None = None) -> list[Listener]:
    return roles.listeners(host.roles, catalog, profile)


# -- what the profile makes of a catalog endpoint ------------------------------------------------
def excluded_by_profile(flow: Flow, ep: Endpoint, profile: DeploymentProfile) -> str:
    """Why the site's profile does not use this endpoint of a flow between two hosts ('' = it does)."""
    for group in load_alternatives().values():
        if group.covers(flow, ep) and not group.chosen(flow, ep, profile.choices.get(group.name)):
            picked = ", ".join(profile.choices.get(group.name) or group.default)
            return f"an alternative the site does not use ({group.name}: {picked})"
    if ep.protocol == "jmx" and not profile.jmx_remote:
        return f"JMX listens on localhost only from MU38 (profile version {profile.version})"
    if profile.secured_only and ep.security == "plain" and any(e.security != "plain" for e in flow.endpoints):
        return "the plain variant of a flow with a secured port (profile: secured-only)"
    return ""


def flow_checks(catalog: Catalog, topology: Topology) -> list[Check]:
    """One check per catalog flow, host pair and endpoint the site uses, for the flows this topology holds."""
    checks: list[Check] = []
    profile = topology.profile
    active_ftp = _active_ftp_flows(catalog)
    for flow in catalog.flows:
        clients = topology.hosts_with_role(flow.client) if flow.client else []
        servers = topology.hosts_with_role(flow.server) if flow.server else []
        if not servers or (flow.client and not clients):
            continue  # the topology does not deploy this flow's roles
        if not flow.exercisable:
            checks.append(Check(CheckKind.NOT_EXERCISABLE, flow.id, None, servers[0].name, None, flow.why_not))
            continue
        pairs = [(c, s) for c in clients for s in servers if c.name != s.name]
        if not pairs:
            if flow.client == flow.server:
                checks.append(Check(CheckKind.NO_PEER, flow.id, clients[0].name, None, None,
                                    f"a {flow.client} cluster flow: the topology has one {flow.client} host"))
            else:
                checks.append(Check(CheckKind.LOCAL, flow.id, clients[0].name, clients[0].name, None,
                                    "client and server share a host: loopback, not on the network"))
            continue
        used = [ep for ep in _probed_endpoints(flow) if not excluded_by_profile(flow, ep, profile)]
        if not used:
            why = excluded_by_profile(flow, _probed_endpoints(flow)[0], profile)
            checks.append(Check(CheckKind.NOT_EXERCISABLE, flow.id, None, servers[0].name, None,
                                f"not used by this site: {why}"))
            continue
        for client, server in pairs:
            enforcers = tuple(topology.enforcers(client.name, server.name))
            for ep in used:
                for variant in _variants(ep, flow, active_ftp):
                    checks.append(Check(CheckKind.REQUIRED, flow.id, client.name, server.name, ep,
                                        variant=variant, enforcers=enforcers))
        for client in clients:
            if any(client.name == s.name for s in servers):
                checks.append(Check(CheckKind.LOCAL, flow.id, client.name, client.name, None,
                                    "also served on the client's own host: loopback, not on the network"))
    return checks


def _probed_endpoints(flow: Flow) -> list[Endpoint]:
    # FTP data ranges are opened by the FTP session itself; they are not listeners to probe.
    return [ep for ep in flow.endpoints if ep.channel == "service"]


def _active_ftp_flows(catalog: Catalog) -> set[str]:
    """FTP flows whose data channel may also run in active mode: the catalog's active-data row names them."""
    named = set()
    for flow in catalog.flows:
        if not flow.exercisable and any(ep.protocol == "ftp-data" for ep in flow.endpoints):
            named.update(re.findall(r"[a-z][a-z-]*-\d{2}\b", flow.why_not))
    return named


def _variants(ep: Endpoint, flow: Flow, active_ftp: set[str]) -> tuple[str, ...]:
    if ep.protocol != "ftp":
        return ("",)
    return ("passive", "active") if flow.id in active_ftp else ("passive",)


# -- exposure -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def administrative_ports() -> tuple[Endpoint, ...]:
    raw = yaml.safe_load(Path(EXPOSURE_PORTS_PATH).read_text()) or {}
    return tuple(Endpoint(transport=transport, protocol=name, port=int(port))
                 for transport, named in raw.items() for name, port in named.items())


def _zone_ports(catalog: Catalog, topology: Topology) -> dict[str, dict[tuple[str, int], Endpoint]]:
    """Per zone: every catalog port its hosts' roles serve, plus the administrative ports."""
    ports: dict[str, dict[tuple[str, int], Endpoint]] = {}
    for zone in topology.zones:
        found = {(ep.transport, ep.port): ep for ep in administrative_ports()}
        for host in zone.hosts:
            for role in host.roles:
                for _flow, ep in catalog.served_endpoints(role):
                    if ep.port is not None and ep.transport != "icmp":
                        found[(ep.transport, ep.port)] = Endpoint(ep.transport, ep.protocol, ep.security, ep.port)
        ports[zone.name] = found
    return ports


def _unused_reasons(catalog: Catalog, topology: Topology) -> dict[tuple[str, str, str, int], str]:
    """(scout, target, transport, port) -> why a catalog flow on it is not required (profile)."""
    reasons = {}
    for flow in catalog.flows:
        if not flow.exercisable:
            continue
        for ep in _probed_endpoints(flow):
            why = excluded_by_profile(flow, ep, topology.profile)
            if not why or ep.port is None:
                continue
            for client in topology.hosts_with_role(flow.client):
                for server in topology.hosts_with_role(flow.server):
                    reasons.setdefault((client.name, server.name, ep.transport, ep.port), f"flow {flow.id}: {why}")
    return reasons


FLEET_EXPOSURE_SAMPLE = 2  # devices of each kind (fleet, role set) the exposure sweep covers


def exposure_scouts(topology: Topology) -> list[HostSpec]:
    """The hosts the exposure sweep knocks from and on: every listed host, and of each fleet the first
    FLEET_EXPOSURE_SAMPLE devices of each role set. Devices of one kind differ only in address, and
    every device against every host is millions of knocks at a thousand devices; their required
    flows are still checked for every device."""
    taken: Counter = Counter()
    chosen = []
    for host in topology.hosts:
        if host.fleet:
            taken[(host.fleet, host.roles)] += 1
            if taken[(host.fleet, host.roles)] > FLEET_EXPOSURE_SAMPLE:
                continue
        chosen.append(host)
    return chosen


def exposure_checks(catalog: Catalog, topology: Topology, required: list[Check]) -> list[Check]:
    """Every port a host has no business reaching on another host behind a firewall (`exposure_scouts`)."""
    business = defaultdict(set)
    for check in required:
        if check.kind == CheckKind.REQUIRED and check.endpoint.port is not None:
            business[(check.client_host, check.server_host)].add((check.endpoint.transport, check.endpoint.port))
    # each zone's ports sorted and labelled once, not once per (scout, target) pair: 69,208 checks
    zone_ports = {zone: [(key, ep, ep.label()) for key, ep in sorted(found.items())]
                  for zone, found in _zone_ports(catalog, topology).items()}
    unused = _unused_reasons(catalog, topology)
    serving = {host.name: {(l.transport, l.port) for l in listeners_for(catalog, host, topology.profile) if not l.bind}
               for host in topology.hosts}
    checks = []
    scouts = exposure_scouts(topology)
    for scout in scouts:
        for target in scouts:
            if target.name == scout.name:
                continue
            enforcers = tuple(topology.enforcers(scout.name, target.name))
            if not any(e.hook in ("forward", "input") for e in enforcers):
                continue  # no firewall protects the target from this scout (a scout's own OUTPUT rules do not)
            needed = business[(scout.name, target.name)]
            for (transport, port), ep, label in zone_ports[target.zone]:
                if (transport, port) in needed:
                    continue
                why = unused.get((scout.name, target.name, transport, port)) or \
                    f"no catalog flow from {scout.name} to {target.name} on {label}"
                if (transport, port) not in serving[target.name]:
                    why += " (nothing listens there for other hosts)"
                checks.append(Check(CheckKind.EXPOSURE, None, scout.name, target.name, ep, why, enforcers=enforcers))
    return checks


def audit_plan(catalog: Catalog, topology: Topology, exposures: bool = True) -> list[Check]:
    checks = flow_checks(catalog, topology)
    if exposures:
        checks += exposure_checks(catalog, topology, checks)
    return checks
