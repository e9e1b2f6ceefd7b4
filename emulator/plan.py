"""Catalog x topology: what each host serves, and which checks an audit runs.

Pure data: no Mininet, no sockets. The lab runs what this module plans.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from emulator.catalog import Catalog, Endpoint, Flow
from emulator.protocols.base import Listener
import roles
from emulator.topology import HostSpec, Topology

@dataclass(frozen=True)
class Check:
    """One verdict line of an audit: a flow (or an exposure probe) between two hosts."""

    kind: str  # 'required' | 'exposure' | 'local' | 'not-exercisable' | 'no-peer'
    flow_id: str | None
    client_host: str | None
    server_host: str | None
    endpoint: Endpoint | None
    detail: str = ""
    variant: str = ""  # a protocol mode the flow is checked in, e.g. FTP 'passive' / 'active'

    @property
    def label(self) -> str:
        label = self.endpoint.label() if self.endpoint else "-"
        return f"{label} {self.variant}" if self.variant else label

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.flow_id}:{self.client_host}>{self.server_host}:{self.label}"

    @property
    def probed(self) -> bool:
        return self.kind in ("required", "exposure")


def listeners_for(catalog: Catalog, host: HostSpec) -> list[Listener]:
    return roles.listeners(host.roles, catalog)


def flow_checks(catalog: Catalog, topology: Topology) -> list[Check]:
    """One check per catalog flow, host pair and endpoint, for the flows this topology holds."""
    checks: list[Check] = []
    active_ftp = _active_ftp_flows(catalog)
    for flow in catalog.flows:
        clients = topology.hosts_with_role(flow.client) if flow.client else []
        servers = topology.hosts_with_role(flow.server) if flow.server else []
        if not servers or (flow.client and not clients):
            continue  # the topology does not deploy this flow's roles
        if not flow.exercisable:
            checks.append(Check("not-exercisable", flow.id, None, servers[0].name, None, flow.why_not))
            continue
        pairs = [(c, s) for c in clients for s in servers if c.name != s.name]
        if not pairs:
            if flow.client == flow.server:
                checks.append(Check("no-peer", flow.id, clients[0].name, None, None,
                                    f"a {flow.client} cluster flow: the topology has one {flow.client} host"))
            else:
                checks.append(Check("local", flow.id, clients[0].name, clients[0].name, None,
                                    "client and server share a host: loopback, not on the network"))
            continue
        for client, server in pairs:
            for ep in _probed_endpoints(flow):
                for variant in _variants(ep, flow, active_ftp):
                    checks.append(Check("required", flow.id, client.name, server.name, ep, variant=variant))
        for client in clients:
            if any(client.name == s.name for s in servers):
                checks.append(Check("local", flow.id, client.name, client.name, None,
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


def exposure_checks(catalog: Catalog, topology: Topology, required: list[Check]) -> list[Check]:
    """Ports a zone has no business reaching, probed from the zone's first host.

    A port is a zone's business when any required flow goes from a host of that zone to it.
    """
    business = defaultdict(set)
    for check in required:
        if check.kind == "required" and check.endpoint.port is not None:
            zone = topology.host(check.client_host).zone
            business[zone].add((check.server_host, check.endpoint.transport, check.endpoint.port))
    checks = []
    for zone in topology.zones:
        scout = zone.hosts[0]
        for target in topology.hosts:
            if target.zone == zone.name:
                continue  # same-zone traffic never crosses the firewall
            for listener in listeners_for(catalog, target):
                if (target.name, listener.transport, listener.port) in business[zone.name]:
                    continue
                ep = Endpoint(transport=listener.transport, protocol=listener.protocol,
                              security=listener.security, port=listener.port)
                checks.append(Check("exposure", None, scout.name, target.name, ep,
                                    f"no catalog flow from zone {zone.name} to {target.name} {ep.label()}"))
    return checks


def audit_plan(catalog: Catalog, topology: Topology, exposures: bool = True) -> list[Check]:
    checks = flow_checks(catalog, topology)
    if exposures:
        checks += exposure_checks(catalog, topology, checks)
    return checks
