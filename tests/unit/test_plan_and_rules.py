"""The audit plan and the generated ruleset, from the catalog and the default topology."""
import re
from pathlib import Path

import pytest

import roles
from emulator import rules
from emulator.audit import probe_targets
from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.plan import administrative_ports, audit_plan
from emulator.topology import load_topology


@pytest.fixture(scope="module")
def world():
    catalog = load_catalog()
    topology = load_topology("single-site")
    return catalog, topology, audit_plan(catalog, topology)


def test_every_exercisable_flow_of_the_topology_gets_a_check(world):
    catalog, topology, checks = world
    checked = {c.flow_id for c in checks if c.flow_id}
    for flow in catalog.flows:
        if flow.client and topology.hosts_with_role(flow.client) and topology.hosts_with_role(flow.server):
            assert flow.id in checked, flow.id


def test_required_checks_go_from_client_role_host_to_server_role_host(world):
    catalog, topology, checks = world
    for c in checks:
        if c.kind == "required":
            flow = catalog.flow(c.flow_id)
            assert flow.client in topology.host(c.client_host).roles
            assert flow.server in topology.host(c.server_host).roles
            assert c.client_host != c.server_host
            assert c.endpoint in flow.endpoints and c.endpoint.channel == "service"


def test_roles_sharing_a_host_are_local_not_probed(world):
    _catalog, topology, checks = world
    # Terminal Server and Spooler Controller share site1: 5556 between them is loopback there.
    local = [c for c in checks if c.kind == "local" and c.client_host == "site1"]
    assert local
    assert not any(c.kind == "required" and c.client_host == c.server_host for c in checks)


def test_exposure_checks_cover_jmx_and_databases_from_users(world):
    _catalog, topology, checks = world
    exposed = {(c.server_host, c.endpoint.port) for c in checks if c.kind == "exposure" and c.client_host == "pc1"}
    jmx = {ep.port for f in load_catalog().filter(protocol="jmx") for ep in f.endpoints}
    assert any(("site1", p) in exposed for p in jmx)
    db = {ep.port for f in load_catalog().filter(protocol="pgsql") for ep in f.endpoints}
    assert any(("db1", p) in exposed for p in db)


def test_exposure_checks_never_target_a_hosts_business(world):
    _catalog, topology, checks = world
    business = {(c.client_host, c.server_host, c.endpoint.transport, c.endpoint.port)
                for c in checks if c.kind == "required"}
    exposures = [c for c in checks if c.kind == "exposure"]
    assert exposures
    for c in exposures:
        assert (c.client_host, c.server_host, c.endpoint.transport, c.endpoint.port) not in business
        assert c.enforcers, c.key  # only where a firewall could block it


def test_every_host_scouts_not_only_the_first_of_its_zone(world):
    _catalog, topology, checks = world
    scouts = {c.client_host for c in checks if c.kind == "exposure"}
    assert scouts == {h.name for h in topology.hosts}


def test_exposure_covers_administrative_ports_and_ports_nothing_listens_on(world):
    catalog, topology, checks = world
    targeted = {(c.client_host, c.server_host, c.endpoint.transport, c.endpoint.port)
                for c in checks if c.kind == "exposure"}
    listening = {(l.transport, l.port) for l in roles.listeners(topology.host("dir").roles, catalog)}
    admin = [ep for ep in administrative_ports() if (ep.transport, ep.port) not in listening]
    assert admin and all(("pc1", "dir", ep.transport, ep.port) in targeted for ep in admin)


def test_same_zone_checks_have_no_firewall_on_their_path(world):
    _catalog, topology, checks = world
    for c in checks:
        if c.kind == "required":
            same = topology.host(c.client_host).zone == topology.host(c.server_host).zone
            assert (not c.enforcers) == same, c.key
    # databases, Management and JMX now sit where the firewall sees them
    assert any(c.kind == "required" and c.server_host == "db1" and c.enforcers for c in checks)


def test_profile_picks_one_vendor_alternative(world):
    catalog, topology, checks = world
    pgsql = {c.endpoint.port for c in checks if c.kind == "required" and c.flow_id == "database-server-03"}
    assert len(pgsql) == 1  # external or embedded, never both
    mssql = [c for c in checks if c.flow_id in ("database-server-01", "database-server-02")]
    assert mssql and all(c.kind == "not-exercisable" and "not used" in c.detail for c in mssql)


def test_secured_only_turns_plain_variants_into_exposures(tmp_path):
    catalog = load_catalog()
    text = Path(load_topology("single-site").path).read_text().replace("security: mixed", "security: secured-only")
    path = tmp_path / "secured.yaml"
    path.write_text(text)
    topology = load_topology(str(path))
    checks = audit_plan(catalog, topology)
    required = [c for c in checks if c.kind == "required"]
    for c in required:
        flow = catalog.flow(c.flow_id)
        assert not (c.endpoint.security == "plain" and any(e.security != "plain" for e in flow.endpoints)), c.key
    plain = [c for c in checks if c.kind == "exposure" and "secured-only" in c.detail]
    assert plain


def test_jmx_is_remote_only_before_mu38(tmp_path):
    catalog = load_catalog()
    base = load_topology("single-site")
    assert not any(c.kind == "required" and c.endpoint.protocol == "jmx" for c in audit_plan(catalog, base))
    path = tmp_path / "old.yaml"
    path.write_text(Path(base.path).read_text().replace("version: MU38", "version: MU37"))
    old = audit_plan(catalog, load_topology(str(path)))
    assert any(c.kind == "required" and c.endpoint.protocol == "jmx" for c in old)
    jmx = [l for l in roles.listeners(("spooler-controller",), catalog, base.profile) if l.protocol == "jmx"]
    assert jmx and all(l.bind == "127.0.0.1" for l in jmx)


def test_listeners_cover_every_served_port_once(world):
    catalog, topology, _ = world
    site1 = topology.host("site1")
    listeners = roles.listeners(site1.roles, catalog)
    keys = [(l.transport, l.port) for l in listeners]
    assert len(keys) == len(set(keys))
    served = {(ep.transport, ep.port) for r in site1.roles for _f, ep in catalog.served_endpoints(r)
              if ep.port is not None}
    assert set(keys) == served


def test_generated_iptables_allows_each_crossing_flow_exactly(world):
    catalog, topology, checks = world
    text = rules.generate(topology, checks, "iptables").text
    assert ":FORWARD DROP" in text and "--ctstate RELATED,ESTABLISHED" in text
    # the accepts sit in per-source chains (tests/unit/test_rules_nodes.py checks the jumps reach them)
    accepts = [l for l in text.splitlines() if l.startswith("-A ") and l.endswith("-j ACCEPT") and " -d " in l]
    crossing = {(topology.host(c.client_host).address, topology.host(c.server_host).address, c.endpoint.transport,
                 c.endpoint.port) for c in checks if c.kind == "required"
                and topology.host(c.client_host).zone != topology.host(c.server_host).zone}
    assert len(accepts) == len(crossing)
    for line in accepts:
        m = re.match(r"-A \S+ -s (\S+)/32 -d (\S+)/32 -p (\w+)(?: -m \w+ --dport (\d+))?", line)
        port = int(m.group(4)) if m.group(4) else None
        assert (m.group(1), m.group(2), m.group(3), port) in crossing
    # FTP data ranges ride the conntrack helper instead of opening 1024-65535
    assert "--helper ftp" in text and "1024:65535" not in text


def test_generated_rules_never_admit_a_planned_exposure(world):
    _catalog, topology, checks = world
    text = rules.generate(topology, checks, "iptables").text
    allowed = set(re.findall(r"-s (\S+)/32 -d (\S+)/32 -p (\w+) -m \w+ --dport (\d+)", text))
    for c in checks:
        if c.kind == "exposure":
            key = (topology.host(c.client_host).address, topology.host(c.server_host).address,
                   c.endpoint.transport, str(c.endpoint.port))
            assert key not in allowed


def test_nft_ruleset_mirrors_iptables(world):
    _catalog, topology, checks = world
    ipt = rules.generate(topology, checks, "iptables").text
    nft = rules.generate(topology, checks, "nft").text
    assert nft.count(" accept comment ") == ipt.count("--ctstate NEW -m comment")
    assert 'ct helper set "ftp_helper"' in nft


@pytest.mark.parametrize("text, fmt", [("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", "iptables"),
                                       ("# c\ntable inet x {\n}\n", "nft"), ("hello\n", "unknown")])
def test_detect_format(text, fmt):
    assert rules.detect_format(text) == fmt


def test_bad_rules_files_get_one_line_errors(tmp_path):
    missing = tmp_path / "none.rules"
    with pytest.raises(LabError, match="does not exist"):
        rules.load_rules_file(str(missing))
    junk = tmp_path / "junk.rules"
    junk.write_text("this is not a ruleset\n")
    with pytest.raises(LabError, match="neither an iptables-save ruleset"):
        rules.load_rules_file(str(junk))
    nocommit = tmp_path / "nocommit.rules"
    nocommit.write_text("*filter\n:INPUT ACCEPT [0:0]\n")
    with pytest.raises(LabError, match="without COMMIT"):
        rules.load_rules_file(str(nocommit))
    binary = tmp_path / "bin.rules"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(LabError, match="not readable text"):
        rules.load_rules_file(str(binary))


def test_flow_specific_requests_come_from_role_data_not_protocol_modules(world):
    catalog, topology, checks = world
    # a target's id is its check's index
    targets = {checks[int(t.id)].flow_id: t for ts in probe_targets(checks, topology).values() for t in ts}
    assert targets["mfd-20"].options == {"mode": "status"}   # status polling: no Print-Job
    assert targets["ldap-03"].options == {"query": "users"}  # the replicator reads users
    assert targets["mfd-23"].options == {}
