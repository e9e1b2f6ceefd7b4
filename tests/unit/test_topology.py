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
