"""The audit plan and the generated ruleset, from the catalog and the default topology."""
import re

import pytest

import roles
from emulator import rules
from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.plan import audit_plan
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


def test_exposure_checks_never_target_a_zones_business(world):
    _catalog, topology, checks = world
    business = {(topology.host(c.client_host).zone, c.server_host, c.endpoint.transport, c.endpoint.port)
                for c in checks if c.kind == "required"}
    for c in checks:
        if c.kind == "exposure":
            assert (topology.host(c.client_host).zone, c.server_host, c.endpoint.transport, c.endpoint.port) not in business
            assert topology.host(c.client_host).zone != topology.host(c.server_host).zone


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
    accepts = [l for l in text.splitlines() if l.startswith("-A FORWARD -s")]
    crossing = {(topology.host(c.client_host).address, topology.host(c.server_host).address, c.endpoint.transport,
                 c.endpoint.port) for c in checks if c.kind == "required"
                and topology.host(c.client_host).zone != topology.host(c.server_host).zone}
    assert len(accepts) == len(crossing)
    for line in accepts:
        m = re.match(r"-A FORWARD -s (\S+)/32 -d (\S+)/32 -p (\w+)(?: -m \w+ --dport (\d+))?", line)
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
    assert nft.count(" accept comment ") == ipt.count("-A FORWARD -s")
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
