"""Audits of the default lab through a real Mininet network and firewall node."""
from __future__ import annotations

import re

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


# --- nmap -sV names what the stubs speak (issue 10) -----------------------------------------------
# catalog protocol -> the service names nmap's own probes give a generic server of it (nmap-service-probes)
NMAP_NAMES = {
    "ssh": {"ssh"}, "smtp": {"smtp"}, "pop3": {"pop3"}, "imap": {"imap"}, "ftp": {"ftp"},
    "ldap": {"ldap"}, "snmp": {"snmp"}, "ipp": {"ipp", "http"}, "raw": {"jetdirect", "hp-pjl"},
    "pgsql": {"postgresql"}, "mssql": {"ms-sql-s"}, "jmx": {"java-rmi", "rmiregistry"},
    "ajp": {"ajp13"}, "amqp": {"amqp"}, "netbios-ns": {"netbios-ns"},
    "smb": {"microsoft-ds", "netbios-ssn"},
}
HTTP_PROTOCOLS = {"http", "soap", "webdav", "etcd", "infinispan"}
NMAP_BLIND = {("snmp", "tcp")}   # nmap has no SNMP-over-TCP probe (RFC 3430): it names 161/tcp from its table
OPEN_RULES = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
NMAP_TIMEOUT = 600


NMAP_CHUNK = 4              # ports per nmap run: runs go in parallel, so a slow port delays only its chunk


def one_server_per_port(lab):
    """{(host, transport, port): protocol}: each catalog service port of a protocol nmap can name,
    at one host serving it (the first in topology order), so nmap sees every port once."""
    from emulator.plan import listeners_for

    chosen, seen = {}, set()
    for host in lab.topology.hosts:
        for listener in listeners_for(lab.catalog, host, lab.topology.profile):
            key = (listener.transport, listener.port)
            named = listener.protocol in NMAP_NAMES or listener.protocol in HTTP_PROTOCOLS
            if listener.bind or key in seen or not named or (listener.protocol, listener.transport) in NMAP_BLIND:
                continue
            seen.add(key)
            chosen[(host.name, *key)] = listener.protocol
    return chosen


def nmap_services(lab, client, address, ports):
    """{(transport, port): (state, <service> element)} of `nmap -sV` run in `client` against `address`."""
    import xml.etree.ElementTree as ET

    spec = ",".join(f"{transport[0].upper()}:{port}" for transport, port in sorted(ports))
    scans = ["-sT"] + (["-sU"] if any(t == "udp" for t, _ in ports) else [])
    args = ["nmap", "-Pn", "-n", *scans, "-sV", "--allports", "-oX", "-", "-p", spec, address]
    proc = lab.node(client).popen(args, stdout=-1, stderr=-1, text=True)
    out, err = proc.communicate(timeout=NMAP_TIMEOUT)
    assert proc.returncode == 0, err
    return {(port.get("protocol"), int(port.get("portid"))): (port.find("state").get("state"), port.find("service"))
            for port in ET.fromstring(out).iter("port")}


def test_nmap_names_the_protocol_of_the_catalog_ports_by_its_probes(default_lab, record_summary):
    """nmap -sV from a host the rules admit names by its probes (not its port table) >= 90 % of the
    service ports of protocols nmap knows; SafeQ's HTTP services give HTTP answers nmap recognises."""
    from concurrent.futures import ThreadPoolExecutor

    lab, checks = default_lab
    lab.apply_rules(rules.Ruleset("iptables", OPEN_RULES, "open"))
    client = lab.topology.hosts_with_role("user")[0].name
    servers = one_server_per_port(lab)
    by_host = {}
    for host, transport, port in servers:
        by_host.setdefault(host, []).append((transport, port))
    runs = [(host, ports[i:i + NMAP_CHUNK]) for host, ports in by_host.items() for i in range(0, len(ports), NMAP_CHUNK)]
    found = {}
    with ThreadPoolExecutor(len(runs)) as pool:
        for (host, _ports), scan in zip(runs, pool.map(
                lambda run: nmap_services(lab, client, lab.topology.host(run[0]).address, run[1]), runs)):
            found.update({(host, *key): value for key, value in scan.items()})
    known, named, misses, http_misses, lines = 0, 0, [], [], []
    for (host, transport, port), protocol in sorted(servers.items()):
        state, service = found.get((host, transport, port), ("missing", None))
        name = service.get("name") if service is not None else ""
        method = service.get("method") if service is not None else ""
        tunnel = service.get("tunnel", "") if service is not None else ""
        shown = f"{tunnel + '/' if tunnel else ''}{name} ({method}) {service.get('product', '') if service is not None else ''}"
        lines.append(f"{host:12} {transport}/{port:<6} {protocol:11} {state:6} {shown}")
        if protocol in NMAP_NAMES:
            known += 1
            if method == "probed" and name in NMAP_NAMES[protocol]:
                named += 1
            else:
                misses.append(f"{host} {transport}/{port} {protocol}: {state} {shown}")
        else:
            fingerprint = service.get("servicefp", "") if service is not None else ""
            # nmap's fingerprint escapes the dot: "HTTP/1\.0\x20200\x20OK"
            if not ((method == "probed" and name in ("http", "http-proxy", "https", "https-alt"))
                    or re.search(r"HTTP/1\\\.[01]\\x20[1-5]\d\d", fingerprint)):
                http_misses.append(f"{host} {transport}/{port} {protocol}: {state} {shown}")
    rate = named / known if known else 0.0
    record_summary(f"nmap -sV from {client}: {named}/{known} ports of protocols nmap knows named by its "
                   f"probes ({rate:.0%})\n" + "\n".join(lines))
    assert known >= 20
    assert rate >= 0.9, misses
    assert http_misses == []
