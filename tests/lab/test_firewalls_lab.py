"""Several firewall nodes and host firewalls in a real lab: per-node rules, the path a flow crosses,
and each node's own trace of the packet it decided (`nft monitor trace`)."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

import roles
from emulator import rules
from emulator.catalog import load_catalog
from emulator.lab import Lab
from emulator.pki import server_name
from emulator.plan import flow_checks
from emulator.protocols.base import ProbeTarget
from emulator.topology import load_topology
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
HOST_FIREWALL = str(Path(__file__).resolve().parents[1] / "data" / "host-firewall.yaml")
TIMEOUT = 2.0
BURST = 2000


def targets(lab, checks, timeout=TIMEOUT) -> dict[str, list[ProbeTarget]]:
    """One probe per check, from the client's host; the id is the check's index."""
    by_host: dict[str, list[ProbeTarget]] = {}
    for index, c in enumerate(checks):
        ep = c.endpoint
        by_host.setdefault(c.client_host, []).append(ProbeTarget(
            id=str(index), host=lab.topology.host(c.server_host).address, transport=ep.transport,
            protocol=ep.protocol, port=ep.port, security=ep.security, timeout=timeout,
            server_name=server_name(c.server_host), ca_file=lab.ca_file,
            options={**roles.probe_options(c.flow_id or ""), **({"mode": c.variant} if c.variant else {})}))
    return by_host


def outcomes(lab, checks) -> list[str]:
    results = lab.run_probes(targets(lab, checks))
    return [str(results[str(i)].outcome) for i in range(len(checks))]


def traced(text: str, src: str, dst: str, transport: str, port: int | None) -> dict[str, list[str]]:
    """Trace id -> the lines of each first packet from src to dst on that port (raw text, no parser)."""
    wanted = re.compile(rf"ip saddr {re.escape(src)} ip daddr {re.escape(dst)} .*"
                        + (rf"{transport} dport {port} " if port is not None else ""))
    ids = {line.split()[2] for line in text.splitlines()
           if line.startswith("trace id ") and " packet: " in line and wanted.search(line)}
    by_id: dict[str, list[str]] = {i: [] for i in ids}
    for line in text.splitlines():
        if line.startswith("trace id ") and line.split()[2] in by_id:
            by_id[line.split()[2]].append(line)
    return by_id


def flow_key(lab, check):
    t = lab.topology
    return t.host(check.client_host).address, t.host(check.server_host).address, check.endpoint.transport, check.endpoint.port


def accept_match(src: str, dst: str, transport: str, port: int) -> str:
    return f" -s {src}/32 -d {dst}/32 -p {transport} -m {transport} --dport {port} "


def accept_chain(text: str, src: str, dst: str, transport: str, port: int) -> str:
    """The chain of a generated iptables ruleset that holds the flow's accept."""
    return next(l.split()[1] for l in text.splitlines() if l.startswith("-A ") and accept_match(src, dst, transport, port) in l)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


# -- two firewall nodes -------------------------------------------------------------------------
@pytest.fixture(scope="class")
def branch_lab(lab_host):
    catalog = load_catalog()
    topology = load_topology("branch-office")
    checks = flow_checks(catalog, topology)
    monitors: list[int] = []
    with Lab(topology, catalog) as lab:
        generated = {node: rules.generate(topology, checks, node=node) for node in lab.rule_nodes}
        lab.apply_rules(generated)
        yield lab, checks, generated, monitors
    assert footprint() == CLEAN
    assert not [pid for pid in monitors if alive(pid)], "trace monitors outlived the lab"


def branch_to_site(lab, checks):
    chosen = [c for c in checks if c.kind == "required" and c.client_host == "site3" and c.server_host == "mgmt1"
              and c.endpoint.transport == "tcp"]
    assert chosen and all(lab.topology.enforcers(c.client_host, c.server_host) == (("bfw", "forward"), ("fw", "forward"))
                          for c in chosen)
    return chosen


class TestTwoFirewallNodes:
    """One lab of branch-office for these tests (class scope: down before the next lab is built)."""

    def test_a_branch_to_site_flow_crosses_both_firewalls_and_passes(self, branch_lab):
        lab, checks, generated, monitors = branch_lab
        assert lab.rule_nodes == ("fw", "bfw") and lab.rulesets == generated
        flows = branch_to_site(lab, checks)
        lab.start_trace()
        monitors += [p.pid for p in lab._monitors.values()]
        try:
            seen = outcomes(lab, flows)
        finally:
            traces = lab.stop_trace()
        assert seen == ["ok"] * len(flows)
        assert set(traces) == {"fw", "bfw"} and lab.trace_lost == {"fw": 0, "bfw": 0}
        for check in flows:
            for node in ("bfw", "fw"):
                packets = traced(traces[node], *flow_key(lab, check))
                assert packets, (node, check.key)
                # a new connection is accepted in the chain FORWARD jumped to for its source, the rest
                # of it by FORWARD's stateful accept
                chain = accept_chain(generated[node].text, *flow_key(lab, check))
                accepted = [{l.split()[5] for l in lines if " ip filter " in l and " rule " in l and "(verdict accept)" in l}
                            for lines in packets.values()]
                assert all(a and a <= {"FORWARD", chain} for a in accepted) and any(chain in a for a in accepted), \
                    (node, check.key, chain, accepted)


    def test_a_missing_accept_on_the_branch_firewall_shows_as_its_drop(self, branch_lab):
        lab, checks, generated, _monitors = branch_lab
        flows = branch_to_site(lab, checks)
        victim = flows[0]
        src, dst, transport, port = flow_key(lab, victim)
        accept = accept_match(src, dst, transport, port)
        text = generated["bfw"].text
        assert text.count(accept) == 1 and accept_chain(text, src, dst, transport, port) != "FORWARD"
        lab.apply_rules({"bfw": rules.Ruleset("iptables", "\n".join(l for l in text.splitlines() if accept not in l) + "\n",
                                              f"bfw without {port}/{transport}")})
        try:
            lab.start_trace()
            try:
                seen = outcomes(lab, flows)
            finally:
                traces = lab.stop_trace()
            others = [o for c, o in zip(flows, seen) if c.endpoint.port != port]
            assert seen[0] == "timeout" and others == ["ok"] * len(others), seen
            dropped = traced(traces["bfw"], src, dst, transport, port)
            assert dropped and all(any("ip filter FORWARD policy drop" in l for l in lines) for lines in dropped.values()), \
                traces["bfw"][-3000:]
            assert traced(traces["fw"], src, dst, transport, port) == {}  # it never reached the site firewall
        finally:
            lab.apply_rules({"bfw": generated["bfw"]})


    def test_the_trace_keeps_every_packet_of_a_syn_burst(self, branch_lab):
        lab, _checks, generated, monitors = branch_lab
        mgmt1 = lab.topology.host("mgmt1").address
        ports = range(40000, 40000 + BURST)  # no catalog flow opens these: bfw drops each first packet
        assert not any(f"--dport {p} " in generated["bfw"].text for p in ports)
        lab.start_trace(["bfw"])
        monitors += [p.pid for p in lab._monitors.values()]
        started = time.monotonic()
        assert lab.run_knocks({"site3": [[mgmt1, "tcp", p] for p in ports]}) == []
        sent = time.monotonic() - started
        traces = lab.stop_trace()
        written = time.monotonic() - started
        drops = [i for i, lines in traced(traces["bfw"], lab.topology.host("site3").address, mgmt1, "tcp", None).items()
                 if any("policy drop" in l for l in lines)]
        print(f"{BURST} SYNs sent in {sent:.3f}s, traced in {written:.2f}s; events lost: {lab.trace_lost['bfw']}")
        assert lab.trace_lost == {"bfw": 0} and "lost" not in traces["bfw"]
        assert len(drops) == BURST


    def test_rule_listing_and_no_trace_leftovers(self, branch_lab):
        lab, _checks, _generated, _monitors = branch_lab
        listing = lab.rule_listing("bfw")
        assert '"nftables"' in listing and '"FORWARD"' in listing and '"handle"' in listing
        assert "safeq_lab_trace" not in lab.nft("bfw", ["list", "tables"]) + lab.nft("fw", ["list", "tables"])
        assert lab._monitors == {}


    def test_a_stopped_daemon_is_a_lab_error_on_its_own_checks_only(self, branch_lab):
        lab, checks, _generated, _monitors = branch_lab
        assert lab.dead_daemons() == {} and lab.daemon_alive("mfd-b1")
        lab.stop_daemon("mfd-b1")
        assert not lab.daemon_alive("mfd-b1") and set(lab.dead_daemons()) == {"mfd-b1"}
        assert lab.dead_daemons()["mfd-b1"].startswith("stopped by the lab")
        from_mfd = [c for c in checks if c.kind == "required" and c.client_host == "mfd-b1"][:3]
        site = branch_to_site(lab, checks)
        flows = site + from_mfd
        results = lab.run_probes(targets(lab, flows))
        assert [str(results[str(i)].outcome) for i in range(len(site))] == ["ok"] * len(site)
        assert from_mfd
        for i in range(len(site), len(flows)):
            assert results[str(i)].outcome == "error"
            assert results[str(i)].detail.startswith("prober on mfd-b1 unavailable: its daemon is not running")


# -- a host firewall ----------------------------------------------------------------------------
def test_a_host_firewall_drops_a_same_segment_flow_and_its_trace_says_so(lab_host):
    catalog = load_catalog()
    topology = load_topology(HOST_FIREWALL)
    checks = flow_checks(catalog, topology)
    to_ts1 = [c for c in checks if c.kind == "required" and c.server_host == "ts1"]
    same_segment = next(c for c in to_ts1 if c.client_host == "km1" and c.endpoint.protocol != "ftp")
    across = next(c for c in to_ts1 if c.client_host == "tp9" and c.endpoint.transport == "tcp")
    assert topology.enforcers("km1", "ts1") == (("ts1", "input"),)
    assert topology.enforcers("tp9", "ts1") == (("fw", "forward"), ("ts1", "input"))
    with Lab(topology, catalog) as lab:
        assert lab.rule_nodes == ("fw", "ts1")
        assert lab.rulesets["ts1"].source.endswith("host-closed.rules")  # the topology's rules, at build time
        lab.apply_rules(rules.generate(topology, checks))  # a single ruleset: the firewall node's
        lab.start_trace()
        try:
            seen = outcomes(lab, [same_segment, across])
        finally:
            traces = lab.stop_trace()
        assert seen == ["timeout", "timeout"]
        for check in (same_segment, across):
            dropped = traced(traces["ts1"], *flow_key(lab, check))
            assert dropped and all(any("ip filter INPUT policy drop" in l for l in lines) for lines in dropped.values()), \
                (check.key, traces["ts1"][-3000:])
        assert traced(traces["fw"], *flow_key(lab, same_segment)) == {}  # one segment: the firewall node never sees it
        assert traced(traces["fw"], *flow_key(lab, across))
        # the host's generated rules admit every flow it serves, FTP data channels included
        lab.apply_rules({"ts1": rules.generate(topology, checks, node="ts1")})
        seen = outcomes(lab, to_ts1)
        assert seen == ["ok"] * len(to_ts1), [(c.key, o) for c, o in zip(to_ts1, seen) if o != "ok"]
        assert any(c.endpoint.protocol == "ftp" and c.variant == "passive" for c in to_ts1)
        # a trace still running when the lab goes down ends with it
        lab.start_trace()
        monitors = [p.pid for p in lab._monitors.values()]
    assert monitors and not [pid for pid in monitors if alive(pid)]
    assert footprint() == CLEAN
