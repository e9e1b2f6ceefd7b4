"""Audits of the default lab through a real Mininet network and firewall node."""
from __future__ import annotations

import pytest

from emulator import rules
from emulator.audit import EXIT_BLOCKED, EXIT_EXPOSED, run_audit
from emulator.evidence import PASSED, Verdict
from emulator.catalog import load_catalog
from emulator.lab import Lab
from emulator.plan import audit_plan
from emulator.topology import load_topology
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def default_lab(lab_host):
    catalog = load_catalog()
    topology = load_topology("single-site")
    checks = audit_plan(catalog, topology)
    with Lab(topology, catalog) as lab:
        yield lab, checks
    assert footprint() == {"bridges": [], "processes": [], "state": [], "mininet_shells": []}


def generated(lab, checks):
    return rules.generate(lab.topology, checks)


def applied(lab, ruleset):
    lab.apply_rules(ruleset)
    return {lab.topology.firewall: ruleset}


def with_rule(ruleset, rule, source):
    """The generated ruleset with one more FORWARD rule placed first."""
    lines = ruleset.text.splitlines()
    at = lines.index("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    lines.insert(at, rule)
    return rules.Ruleset("iptables", "\n".join(lines) + "\n", source)


def crossing(lab, check):
    t = lab.topology
    return t.host(check.client_host).zone != t.host(check.server_host).zone


def test_generated_rules_pass_every_required_flow_and_expose_nothing(default_lab):
    lab, checks = default_lab
    report = run_audit(lab, checks, "generated", rulesets=applied(lab, generated(lab, checks)))
    bad = [v for v in report.verdicts if v.verdict not in PASSED + (Verdict.SAME_SEGMENT, Verdict.CLOSED,
                                                                    Verdict.LOCAL, Verdict.NO_PEER, Verdict.NOT_EXERCISED)]
    assert bad == [], [(v.check.key, v.observed, v.detail) for v in bad[:10]]
    required = [v for v in report.verdicts if v.check.kind == "required"]
    assert required and all(v.verdict in PASSED for v in required if v.check.enforcers)
    # a check is graded as firewall evidence only when a firewall is on its path
    assert all(v.verdict == Verdict.SAME_SEGMENT for v in required if not v.check.enforcers)
    assert report.counts["CLOSED"] == sum(c.kind == "exposure" for c in checks) > 0
    assert report.exit_status == 0
    # the second witness: each stub recorded every required request from the client's own address
    seen = {(r["host"], r["transport"], r["port"], r["peer"]) for r in lab.request_log()}
    for v in required:
        c = v.check
        if c.endpoint.transport != "icmp":
            key = (c.server_host, c.endpoint.transport, c.endpoint.port, lab.topology.host(c.client_host).address)
            assert key in seen, c.key


def test_dropping_the_raw_port_blocks_exactly_its_flows_and_names_the_rule(default_lab):
    lab, checks = default_lab
    raw_port = next(ep.port for f in load_catalog().filter(protocol="raw") for ep in f.endpoints if ep.protocol == "raw")
    rule = f"-A FORWARD -p tcp -m tcp --dport {raw_port} -j DROP"
    ruleset = with_rule(generated(lab, checks), rule, f"drop {raw_port}")
    report = run_audit(lab, checks, ruleset.source, rulesets=applied(lab, ruleset))
    blocked = {v.check.key: v for v in report.verdicts if v.verdict == "BLOCKED"}
    expected = {c.key for c in checks if c.kind == "required" and c.endpoint.port == raw_port
                and c.endpoint.transport == "tcp" and crossing(lab, c)}
    assert expected and set(blocked) == expected
    line = ruleset.text.splitlines().index(rule) + 1
    for v in blocked.values():
        assert v.node == "fw" and v.rule == f"fw {ruleset.source}:{line}: {rule}", v.rule
        assert v.fix.startswith("-I FORWARD -s ") and f"--dport {raw_port}" in v.fix
    assert report.counts["BROKEN"] == report.counts["EXPOSED"] == 0
    assert report.exit_status == EXIT_BLOCKED


def test_opening_jmx_to_the_users_zone_exposes_it_from_every_user_host(default_lab):
    lab, checks = default_lab
    jmx_flow = next(f for f in load_catalog().filter(role="proactivecare", protocol="jmx")
                    if f.server == "spooler-controller" and f.application == "JMX")
    jmx_port = jmx_flow.endpoints[0].port
    users = lab.topology.zone("users")
    rule = f"-A FORWARD -s {users.subnet} -p tcp -m tcp --dport {jmx_port} -j ACCEPT"
    ruleset = with_rule(generated(lab, checks), rule, f"jmx {jmx_port} open to users")
    report = run_audit(lab, checks, ruleset.source, rulesets=applied(lab, ruleset))
    exposed = {(v.check.client_host, v.check.server_host, v.check.endpoint.port): v
               for v in report.verdicts if v.verdict == "EXPOSED"}
    # from every host of the zone, not only its first, to every host the rule opens the port on:
    # JMX listens on localhost only (MU38), so the finding is the firewall letting the packet
    # reach the host's kernel, whether or not anything listens there
    users_hosts = {u.name for u in users.hosts}
    expected = {(c.client_host, c.server_host, c.endpoint.port) for c in checks if c.kind == "exposure"
                and c.client_host in users_hosts and c.endpoint.port == jmx_port and c.endpoint.transport == "tcp"}
    sc_hosts = {h.name for h in lab.topology.hosts_with_role("spooler-controller")}
    assert {(u, h, jmx_port) for u in users_hosts for h in sc_hosts} <= expected
    assert set(exposed) == expected
    line = ruleset.text.splitlines().index(rule) + 1
    assert all(v.rule == f"fw {ruleset.source}:{line}: {rule}" for v in exposed.values())
    assert report.counts["BLOCKED"] == 0
    assert report.exit_status == EXIT_EXPOSED
