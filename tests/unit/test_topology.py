import ipaddress

import pytest

from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.topology import LAB_RANGE, available_topologies, load_topology

ROLES = {"management", "mfd", "user"}


def write(tmp_path, text):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return str(path)


def test_default_topology_holds_every_catalog_role():
    catalog = load_catalog()
    topo = load_topology("single-site")
    deployed = {r for h in topo.hosts for r in h.roles}
    assert set(catalog.roles) - deployed == set()


def test_default_topology_addresses_are_lab_addresses_and_unique():
    topo = load_topology("single-site")
    addresses = [h.address for h in topo.hosts] + [z.gateway for z in topo.zones]
    assert len(addresses) == len(set(addresses))
    assert all(ipaddress.ip_address(a) in LAB_RANGE for a in addresses)
    assert {z.name for z in topo.zones} >= {"servers", "devices", "users", "enterprise", "cloud"}


def test_every_shipped_topology_loads():
    for name in available_topologies():
        assert load_topology(name).hosts


def test_unknown_topology_names_the_choices():
    with pytest.raises(LabError, match="unknown topology 'nope'.*single-site"):
        load_topology("nope")


@pytest.mark.parametrize("text, message", [
    ("name: t\nzones:\n  - {name: a, subnet: 203.0.113.0/24, hosts: [{name: h1, roles: [user]}]}\n", "outside the lab range"),
    ("name: t\nzones:\n  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [nosuchrole]}]}\n", r"zones\[0\].hosts\[0\].roles: unknown role 'nosuchrole'"),
    ("name: t\nzones:\n  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user], colour: red}]}\n", "unknown key"),
    ("name: t\nzones:\n  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user]}]}\n"
     "  - {name: b, subnet: 198.18.1.128/25, hosts: [{name: h2, roles: [user]}]}\n", "overlaps zone a"),
    ("name: t\nzones:\n  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user]}, {name: h1, roles: [mfd]}]}\n", "duplicate node name"),
    ("name: t\nzones:\n  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: averyveryverylongname, roles: [user]}]}\n", "at most 10 chars"),
    ("name: t\nzones: [\n", "not valid YAML"),
    ("name: ../../etc\nzones:\n  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user]}]}\n", "name: '../../etc'"),
    ("name: t\nzones:\n  - {name: a, subnet: 198.18.1.0/24, link: {loss: 150}, hosts: [{name: h1, roles: [user]}]}\n", "percentage"),
])
def test_bad_topologies_name_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(LabError, match=message) as info:
        load_topology(path, known_roles=ROLES)
    assert str(info.value).startswith(path)
    assert "\n" not in str(info.value)


def test_addresses_are_assigned_from_dot_ten_and_gateway_is_dot_one(tmp_path):
    path = write(tmp_path, "name: t\nzones:\n  - {name: a, subnet: 198.18.7.0/24, hosts: [{name: h1, roles: [user]}, "
                           "{name: h2, roles: [mfd], address: 198.18.7.99}, {name: h3, roles: [mfd]}]}\n")
    topo = load_topology(path, known_roles=ROLES)
    assert [h.address for h in topo.hosts] == ["198.18.7.10", "198.18.7.99", "198.18.7.12"]
    assert topo.zones[0].gateway == "198.18.7.1"
    assert topo.firewall_interface(topo.zones[0]) == "fw-a"


# -- several firewall nodes, host firewalls, profile ---------------------------------------------
MULTI = """\
name: two
firewalls:
  - {name: fw, zones: [a, b], rules: site.rules}
  - {name: bfw, zones: [c]}
transit: 198.18.254.0/24
profile: {version: MU37, security: secured-only}
zones:
  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: a1, roles: [user], rules: a1.rules}, {name: a2, roles: [mfd]}]}
  - {name: b, subnet: 198.18.2.0/24, hosts: [{name: b1, roles: [management]}]}
  - {name: c, subnet: 198.18.3.0/24, hosts: [{name: c1, roles: [user]}, {name: c2, roles: [mfd], rules: c2.rules}]}
"""


def write_multi(tmp_path, text=MULTI, rules=("site.rules", "a1.rules", "c2.rules")):
    for name in rules:
        (tmp_path / name).write_text("*filter\nCOMMIT\n")
    return write(tmp_path, text)


def test_several_firewall_nodes_share_a_transit_segment(tmp_path):
    topo = load_topology(write_multi(tmp_path), known_roles=ROLES)
    assert [(fw.name, fw.zones, fw.transit_address) for fw in topo.firewalls] == [
        ("fw", ("a", "b"), "198.18.254.1"), ("bfw", ("c",), "198.18.254.2")]
    assert topo.firewall == "fw"
    assert str(topo.transit) == "198.18.254.0/24"
    assert topo.firewalls[0].rules == tmp_path / "site.rules" and topo.firewalls[1].rules is None
    assert topo.firewalls[1].transit_interface == "bfw-transit"
    assert topo.firewall_interface(topo.zone("c")) == "bfw-c" and topo.firewall_interface("a") == "fw-a"
    assert topo.zone_firewall("b").name == "fw"
    assert topo.host("a1").rules == tmp_path / "a1.rules" and topo.host("a2").rules is None
    assert topo.filtering_nodes == ("fw", "bfw", "a1", "c2")
    assert topo.rules_files == {"fw": tmp_path / "site.rules", "a1": tmp_path / "a1.rules", "c2": tmp_path / "c2.rules"}
    assert topo.bridges == ["sqlab1", "sqlab2", "sqlab3", "sqlab4"] and topo.transit_bridge == "sqlab4"
    assert (topo.profile.version, topo.profile.security) == ("MU37", "secured-only")


def test_enforcers_follow_the_path(tmp_path):
    topo = load_topology(write_multi(tmp_path), known_roles=ROLES)
    assert topo.enforcers("a2", "b1") == (("fw", "forward"),)  # two zones of one node
    assert topo.enforcers("a1", "b1") == (("a1", "output"), ("fw", "forward"))
    assert topo.enforcers("b1", "c2") == (("fw", "forward"), ("bfw", "forward"), ("c2", "input"))
    assert topo.enforcers("c1", "a2") == (("bfw", "forward"), ("fw", "forward"))
    assert topo.enforcers("c1", "c2") == (("c2", "input"),)  # same segment: only the host firewall
    assert topo.enforcers("a2", "a2") == ()
    assert topo.enforcers("c1", "a2")[0].node == "bfw" and topo.enforcers("c1", "a2")[0].hook == "forward"
    assert topo.crosses_firewall("c1", "b1") and topo.crosses_firewall("a1", "b1")
    assert not topo.crosses_firewall("c1", "c2")
    assert topo.firewalls_between(topo.host("b1"), topo.host("c1")) == ("fw", "bfw")


def test_the_single_firewall_form_is_one_node_for_every_zone(tmp_path):
    topo = load_topology(write(tmp_path, "name: t\nfirewall: gw\nzones:\n"
                                         "  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user]}]}\n"
                                         "  - {name: b, subnet: 198.18.2.0/24, hosts: [{name: h2, roles: [user]}]}\n"),
                         known_roles=ROLES)
    assert [(fw.name, fw.zones, fw.transit_address, fw.rules) for fw in topo.firewalls] == [("gw", ("a", "b"), None, None)]
    assert topo.transit is None and topo.bridges == ["sqlab1", "sqlab2"]
    assert topo.filtering_nodes == ("gw",)
    assert topo.enforcers("h1", "h2") == (("gw", "forward"),)
    assert topo.profile.version == "MU38" and topo.profile.security == "mixed"  # the defaults


A_B = ("zones:\n  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user]}]}\n"
       "  - {name: b, subnet: 198.18.2.0/24, hosts: [{name: h2, roles: [user]}]}\n")
TWO_NODES = "firewalls:\n  - {name: fw, zones: [a]}\n  - {name: bfw, zones: [b]}\n"


@pytest.mark.parametrize("text, message", [
    ("name: t\nfirewalls:\n  - {name: fw, zones: [a, b, nope]}\n" + A_B, r"firewalls\[0\]\.zones: unknown zone 'nope'"),
    ("name: t\nfirewalls:\n  - {name: fw, zones: [a]}\n" + A_B, r"zones\[1\]\.name: zone 'b' has no firewall node"),
    ("name: t\nfirewalls:\n  - {name: fw, zones: [a, b]}\n  - {name: bfw, zones: [b]}\ntransit: 198.18.254.0/24\n" + A_B,
     r"firewalls\[1\]\.zones: zone 'b' already belongs to firewall node fw"),
    ("name: t\n" + TWO_NODES + A_B, "transit: missing: 2 firewall nodes need a transit subnet"),
    ("name: t\n" + TWO_NODES + "transit: 198.18.2.0/25\n" + A_B, r"transit: 198.18.2.0/25 overlaps zone b"),
    ("name: t\n" + TWO_NODES + "transit: 203.0.113.0/24\n" + A_B, r"transit: 203.0.113.0/24 is outside the lab range"),
    ("name: t\n" + TWO_NODES + "transit: 198.18.254.1/24\n" + A_B, r"transit: .*host bits set"),
    ("name: t\n" + TWO_NODES + "transit: 198.18.254.0/32\n" + A_B, r"transit: .*no room for 2 firewall nodes"),
    ("name: t\nfirewall: fw\ntransit: 198.18.254.0/24\n" + A_B, r"transit: a transit segment joins several firewall nodes"),
    ("name: t\nfirewall: fw\n" + TWO_NODES + A_B, r"top level: give either `firewall`"),
    ("name: t\nfirewalls:\n  - {name: fw, zones: [a]}\n  - {name: fw, zones: [b]}\ntransit: 198.18.254.0/24\n" + A_B,
     r"firewalls\[1\]\.name: duplicate firewall node 'fw'"),
    ("name: t\nfirewalls:\n  - {name: h1, zones: [a, b]}\n" + A_B, r"zones\[0\]\.hosts\[0\]\.name: duplicate node name 'h1'"),
    ("name: t\nfirewalls:\n  - {name: fw, zones: []}\n" + A_B, r"firewalls\[0\]\.zones: expected a non-empty list"),
    ("name: t\nfirewalls:\n  - {name: fw, zones: [a, b], colour: red}\n" + A_B, r"firewalls\[0\]: unknown key\(s\) colour"),
    ("name: t\nfirewalls:\n  - {name: branchfw1, zones: [a]}\n  - {name: fw, zones: [b]}\ntransit: 198.18.254.0/24\n" + A_B,
     r"firewalls\[0\]\.name: interface name branchfw1-transit exceeds 15 chars"),
    ("name: t\nfirewall: firewall01\nzones:\n  - {name: servers, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user]}]}\n",
     r"zones\[0\]\.name: interface name firewall01-servers exceeds 15 chars"),
    ("name: t\nfirewalls:\n  - {name: fw, zones: [a, b], rules: missing.rules}\n" + A_B,
     r"firewalls\[0\]\.rules: rules file .*missing.rules does not exist"),
    ("name: t\nzones:\n  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user], rules: gone.rules}]}\n",
     r"zones\[0\]\.hosts\[0\]\.rules: rules file .*gone.rules does not exist"),
    ("name: t\nfirewalls:\n  - {name: fw, zones: [a], transit_address: 198.18.9.1}\n  - {name: bfw, zones: [b]}\n"
     "transit: 198.18.254.0/24\n" + A_B, r"firewalls\[0\]\.transit_address: 198.18.9.1 is not a host address of the transit"),
    ("name: t\nprofile: {security: paranoid}\n" + A_B, r"profile\.security: 'paranoid'"),
])
def test_bad_firewall_layouts_name_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(LabError, match=message) as info:
        load_topology(path, known_roles=ROLES)
    assert str(info.value).startswith(path)
    assert "\n" not in str(info.value)


def test_default_topology_keeps_management_databases_and_servers_apart():
    topo = load_topology("single-site")
    zone_of = {h.name: h.zone for h in topo.hosts}
    assert {h: zone_of[h] for h in ("site1", "site2", "jobs1", "jobs2", "wps", "payment")} == dict.fromkeys(
        ("site1", "site2", "jobs1", "jobs2", "wps", "payment"), "servers")
    assert {zone_of[h] for h in ("mgmt1", "mgmt2", "monitor")} == {"mgmt"}
    assert {zone_of[h] for h in ("db1", "db2")} == {"data"}
    assert [fw.name for fw in topo.firewalls] == ["fw"] and topo.transit is None
    assert topo.profile.version == "MU38" and topo.profile.choices["database"] == ("pgsql",)
    # JMX (ProactiveCare -> Management), databases and Management links now cross the firewall
    assert topo.enforcers("monitor", "site1") == (("fw", "forward"),)
    assert topo.enforcers("site1", "db1") == (("fw", "forward"),)
    assert topo.enforcers("site1", "mgmt1") == (("fw", "forward"),)
    assert topo.enforcers("mgmt1", "mgmt2") == () and not topo.crosses_firewall("site1", "site2")


def test_branch_office_puts_the_branch_behind_a_second_firewall():
    topo = load_topology("branch-office")
    assert [(fw.name, fw.zones) for fw in topo.firewalls] == [
        ("fw", ("servers", "mgmt", "data", "devices", "users")), ("bfw", ("branch",))]
    assert topo.transit is not None
    assert all(ipaddress.ip_address(fw.transit_address) in topo.transit for fw in topo.firewalls)
    branch = topo.zone("branch")
    roles = {r for h in branch.hosts for r in h.roles}
    assert {"spooler-controller", "terminal-server", "flexispooler", "mfd", "user"} <= roles
    assert any(r.startswith("embedded-terminal-") for r in roles)
    assert set(topo.host("site3").roles) == {"spooler-controller", "terminal-server", "flexispooler"}
    assert topo.enforcers("site3", "mgmt1") == (("bfw", "forward"), ("fw", "forward"))
    assert topo.enforcers("mgmt1", "site3") == (("fw", "forward"), ("bfw", "forward"))
    assert topo.enforcers("site1", "db1") == (("fw", "forward"),)
    assert topo.enforcers("pcb1", "site3") == () and not topo.crosses_firewall("pcb1", "site3")
    assert topo.crosses_firewall("pcb1", "site1")
    assert topo.firewall_interface("branch") == "bfw-branch"


def test_a_host_firewall_given_on_the_command_line_changes_the_path():
    topology = load_topology("single-site")
    assert topology.enforcers("mgmt1", "mgmt2") == ()
    guarded = topology.with_host_rules({"mgmt2": "/tmp/mgmt2.rules"})
    assert guarded.enforcers("mgmt1", "mgmt2") == (("mgmt2", "input"),)
    assert "mgmt2" in guarded.filtering_nodes and guarded.host("mgmt2").rules.name == "mgmt2.rules"
    assert topology.host("mgmt2").rules is None  # the loaded topology is left as it was
    with pytest.raises(LabError, match="not a firewall node or host"):
        topology.with_host_rules({"nosuch": "x.rules"})
