"""Audits across several firewall nodes and host firewalls: findings name the node, file and line."""
from __future__ import annotations

from pathlib import Path

import pytest

from emulator import rules
from emulator.audit import run_audit
from emulator.catalog import load_catalog
from emulator.evidence import PASSED, Verdict
from emulator.lab import Lab
from emulator.plan import administrative_ports, audit_plan
from emulator.topology import load_topology
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
HOST_FIREWALL = str(Path(__file__).resolve().parents[1] / "data" / "host-firewall.yaml")
FINDINGS = (Verdict.BLOCKED, Verdict.BROKEN, Verdict.EXPOSED, Verdict.LAB_ERROR, Verdict.NO_SERVICE)


def findings(report):
    return {v.check.key: v for v in report.verdicts if v.verdict in FINDINGS}


def line_of(ruleset, text):
    return ruleset.text.splitlines().index(text) + 1


def policy_line(ruleset, chain):
    return line_of(ruleset, f":{chain} DROP [0:0]")


def audit(lab, checks, rulesets):
    lab.apply_rules(rulesets)
    return run_audit(lab, checks, "test", rulesets={**lab.rulesets, **rulesets})


def test_two_firewall_nodes_findings_name_the_node_that_dropped(lab_host):
    catalog = load_catalog()
    topology = load_topology("branch-office")
    checks = audit_plan(catalog, topology)
    generated = {node: rules.generate(topology, checks, node=node) for node in topology.filtering_nodes}
    with Lab(topology, catalog) as lab:
        report = audit(lab, checks, generated)
        assert findings(report) == {}, list(findings(report))[:5]
        both = [v for v in report.verdicts if tuple(e.node for e in v.check.enforcers) == ("bfw", "fw")
                and v.check.kind == "required"]
        assert both and all(v.verdict in PASSED for v in both)

        # the branch firewall loses one accept: exactly the checks of that accept are blocked, at bfw
        victim = next(v.check for v in both if v.check.endpoint.transport == "tcp")
        src, dst = topology.host(victim.client_host).address, topology.host(victim.server_host).address
        port = victim.endpoint.port
        lines = generated["bfw"].text.splitlines()
        accept = next(l for l in lines if f"-s {src}/32 -d {dst}/32 " in l and f"--dport {port} " in l)
        broken = rules.Ruleset("iptables", "\n".join(l for l in lines if l != accept) + "\n", "bfw-missing.rules")
        report = audit(lab, checks, {"bfw": broken})
        expected = {c.key for c in checks if c.kind == "required" and c.endpoint.transport == "tcp"
                    and c.endpoint.port == port and (topology.host(c.client_host).address,
                                                     topology.host(c.server_host).address) == (src, dst)}
        got = findings(report)
        assert set(got) == expected
        for v in got.values():
            assert (v.verdict, v.node) == (Verdict.BLOCKED, "bfw")
            assert v.rule.startswith(f"bfw bfw-missing.rules:{policy_line(broken, 'FORWARD')}: no rule matched"), v.rule
            assert v.fix == f"-A FORWARD -s {src}/32 -d {dst}/32 -p tcp -m tcp --dport {port} -m conntrack --ctstate NEW -j ACCEPT"
    assert footprint() == CLEAN


def test_a_host_firewall_grades_same_segment_flows(lab_host):
    catalog = load_catalog()
    topology = load_topology(HOST_FIREWALL)
    checks = audit_plan(catalog, topology)
    fw, ts1 = (rules.generate(topology, checks, node=node) for node in ("fw", "ts1"))
    to_ts1 = [c for c in checks if c.kind == "required" and c.server_host == "ts1"]
    same_segment = [c for c in to_ts1 if c.client_host == "km1"]
    assert same_segment and all(c.enforcers == (("ts1", "input"),) for c in same_segment)
    with Lab(topology, catalog) as lab:
        closed = lab.rulesets["ts1"]  # the topology's own host-closed.rules, applied at build time
        report = audit(lab, checks, {"fw": fw})
        got = findings(report)
        assert {c.key for c in to_ts1} <= set(got)
        for c in to_ts1:
            v = got[c.key]
            assert (v.verdict, v.node) == (Verdict.BLOCKED, "ts1"), (c.key, v.verdict, v.detail)
            assert f"host-closed.rules:{policy_line(closed, 'INPUT')}: no rule matched" in v.rule, v.rule
            assert v.fix.startswith("-A INPUT -s ")

        # the host's generated rules admit what it serves; one extra accept opens an admin port to its neighbour
        admin = next(ep for ep in administrative_ports() if ep.transport == "tcp")
        extra = f"-A INPUT -s {topology.host('km1').address}/32 -p tcp -m tcp --dport {admin.port} -j ACCEPT"
        lines = ts1.text.splitlines()
        lines.insert(lines.index("COMMIT", lines.index("*filter")), extra)
        opened = rules.Ruleset("iptables", "\n".join(lines) + "\n", "ts1-open.rules")
        report = audit(lab, checks, {"ts1": opened})
        got = findings(report)
        assert list(got) == [next(c.key for c in checks if c.kind == "exposure" and c.client_host == "km1"
                                  and c.server_host == "ts1" and c.endpoint.port == admin.port
                                  and c.endpoint.transport == "tcp")]
        v = next(iter(got.values()))
        assert v.verdict == Verdict.EXPOSED and v.rule == f"ts1 ts1-open.rules:{line_of(opened, extra)}: {extra}"
        assert all(v.verdict in PASSED for v in report.verdicts if v.check in same_segment)
    assert footprint() == CLEAN
