"""`fleet:` in a topology zone: MFDs expanded at load time into ordinary hosts; lab link names."""
import ipaddress
from collections import Counter

import pytest

from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.plan import FLEET_EXPOSURE_SAMPLE, audit_plan, exposure_scouts
from emulator.state import _id_of, _ports
from emulator.topology import (BRIDGE_PORTS_MAX, INTERFACE_MAX, RUN_ID, bridge_name, fleet_vendors, load_topology,
                               port_name)

ROLES = set(load_catalog().roles)
MIX = "{konica-minolta: 40%, ricoh: 20%, xerox: 20%, sharp: 20%}"


def write(tmp_path, text):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return str(path)


def fleet(tmp_path, fleet_yaml, subnet="198.18.8.0/22", hosts="hosts: [{name: tp4, roles: [terminal-pro]}]", extra=""):
    text = (f"name: t\nzones:\n  - {{name: devices, subnet: {subnet}, {hosts}{', ' if hosts else ''}"
            f"fleet: {fleet_yaml}}}\n{extra}")
    return load_topology(write(tmp_path, text), known_roles=ROLES)


def devices(topology):
    return [h for h in topology.hosts if "mfd" in h.roles]


def vendor(host):
    return next(r.removeprefix("mfd-") for r in host.roles if r.startswith("mfd-"))


def test_vendors_come_from_the_catalog_and_match_single_site():
    vendors = fleet_vendors(ROLES)
    assert {"konica-minolta", "xerox", "fuji-xerox", "fuji-xerox-xcp", "sharp", "sharp-esf", "brother", "oki"} <= set(vendors)
    assert vendors["brother"] == ("mfd", "embedded-terminal-brother")  # no mfd-brother role in the catalog
    assert vendors["fuji-xerox"] == ("mfd", "mfd-fuji-xerox", "embedded-terminal-fuji-xerox")
    assert set(vendors["oki"]) == {"mfd", "embedded-terminal-oki", "embedded-terminal-oki-sxp2"}
    # every MFD of single-site runs exactly the roles a fleet device of its vendor gets
    by_roles = {frozenset(roles) for roles in vendors.values()}
    mfds = [h for h in load_topology("single-site").hosts if "mfd" in h.roles]
    assert len(mfds) == len(vendors)
    assert all(frozenset(h.roles) in by_roles for h in mfds)


def test_counts_per_vendor_names_and_addresses(tmp_path):
    topo = fleet(tmp_path, f"{{count: 1000, mix: {MIX}}}")
    mfds = devices(topo)
    assert len(mfds) == 1000 and len(topo.hosts) == 1001
    assert Counter(map(vendor, mfds)) == {"konica-minolta": 400, "ricoh": 200, "xerox": 200, "sharp": 200}
    assert [h.name for h in mfds[:2]] == ["mfd-0000", "mfd-0001"] and mfds[-1].name == "mfd-0999"
    assert topo.hosts[0].address == "198.18.8.10"  # the listed host first
    assert [h.address for h in mfds[:2]] == ["198.18.8.11", "198.18.8.12"]
    assert mfds[-1].address == str(ipaddress.ip_address("198.18.8.11") + 999)
    assert all(h.zone == "devices" for h in mfds)
    xerox = next(h for h in mfds if vendor(h) == "xerox")
    assert set(xerox.roles) == {"mfd", "mfd-xerox", "embedded-terminal-xerox", "embedded-terminal-xerox-versalink",
                                "embedded-terminal-xerox-altalink"}


def test_devices_are_interleaved_so_any_prefix_is_mixed(tmp_path):
    mfds = devices(fleet(tmp_path, f"{{count: 1000, mix: {MIX}}}"))
    assert [vendor(h) for h in mfds[:5]] == ["konica-minolta", "ricoh", "xerox", "sharp", "konica-minolta"]
    for size in (10, 50, 100, 333):
        counts = Counter(vendor(h) for h in mfds[:size])
        assert abs(counts["konica-minolta"] - 0.4 * size) <= 2 and all(abs(counts[v] - 0.2 * size) <= 2
                                                                          for v in ("ricoh", "xerox", "sharp"))


def test_largest_remainder_and_a_custom_name(tmp_path):
    topo = fleet(tmp_path, "{count: 7, name: prn, mix: {ricoh: 50%, hp: 25%, epson: 25%}}", hosts="")
    mfds = devices(topo)
    assert Counter(map(vendor, mfds)) == {"ricoh": 3, "hp": 2, "epson": 2}  # 3.5/1.75/1.75: the largest remainders
    tie = devices(fleet(tmp_path, "{count: 6, mix: {ricoh: 50%, hp: 25%, epson: 25%}}", hosts=""))
    assert Counter(map(vendor, tie)) == {"ricoh": 3, "hp": 2, "epson": 1}  # 3/1.5/1.5: a tie goes to the first listed
    thirds = devices(fleet(tmp_path, "{count: 100, mix: {ricoh: 33.4%, hp: 33.3%, epson: 33.3%}}", hosts=""))
    assert Counter(map(vendor, thirds)) == {"ricoh": 34, "hp": 33, "epson": 33}
    assert [h.name for h in mfds] == [f"prn-{i:04d}" for i in range(7)]
    assert mfds[0].address == "198.18.8.10"  # no listed hosts: the fleet starts where they would
    # the same file gives the same fleet
    assert devices(fleet(tmp_path, "{count: 7, name: prn, mix: {ricoh: 50%, hp: 25%, epson: 25%}}", hosts="")) == mfds


def test_fleet_skips_addresses_of_listed_hosts(tmp_path):
    topo = fleet(tmp_path, "{count: 3, mix: {ricoh: 100%}}", subnet="198.18.8.0/24",
                 hosts="hosts: [{name: a, roles: [user]}, {name: b, roles: [user], address: 198.18.8.13}]")
    assert [h.address for h in devices(topo)] == ["198.18.8.12", "198.18.8.14", "198.18.8.15"]


def test_fleet_and_hosts_downstream_are_plain_hosts(tmp_path):
    topo = fleet(tmp_path, "{count: 5, mix: {sharp: 100%}}", subnet="198.18.8.0/24")
    assert topo.host("mfd-0004").roles == ("mfd", "mfd-sharp", "embedded-terminal-sharp")
    assert len(topo.hosts_with_role("mfd-sharp")) == 5


@pytest.mark.parametrize("fleet_yaml, subnet, message", [
    ("{count: 10, mix: {ricoh: 50%, hp: 40%}}", "198.18.8.0/24", r"fleet\.mix: the shares add up to 90%; make them add up to 100%"),
    ("{count: 10, mix: {ricoh: 60%, hp: 60%}}", "198.18.8.0/24", "add up to 120%"),
    ("{count: 10, mix: {canon: 100%}}", "198.18.8.0/24", r"fleet\.mix: unknown vendor 'canon'; vendors: brother, epson, .*xerox"),
    ("{count: 10, mix: {ricoh: lots}}", "198.18.8.0/24", r"fleet\.mix\.ricoh: 'lots' is not a share; give a percentage such as 40%"),
    ("{count: 10, mix: {ricoh: 0%, hp: 100%}}", "198.18.8.0/24", "more than 0%"),
    ("{count: 10, mix: {}}", "198.18.8.0/24", r"fleet\.mix: expected a mapping of vendor to share"),
    ("{count: 300, mix: {ricoh: 100%}}", "198.18.8.0/24", r"fleet\.count: 300 devices after 1 listed hosts do not fit 198\.18\.8\.0/24 .*give the zone a /23 or larger subnet"),
    ("{count: 1022, mix: {ricoh: 100%}}", "198.18.8.0/21", r"1 listed hosts and 1022 devices: a zone's bridge takes at most 1023 ports.*split the fleet over several zones"),
    ("{count: 0, mix: {ricoh: 100%}}", "198.18.8.0/24", r"fleet\.count: 0: give the number of devices, a whole number of at least 1"),
    ("{count: -3, mix: {ricoh: 100%}}", "198.18.8.0/24", "a whole number of at least 1"),
    ("{count: 2.5, mix: {ricoh: 100%}}", "198.18.8.0/24", "a whole number of at least 1"),
    ("{count: '10', mix: {ricoh: 100%}}", "198.18.8.0/24", "a whole number of at least 1"),
    ("{count: true, mix: {ricoh: 100%}}", "198.18.8.0/24", "a whole number of at least 1"),
    ("{count: 10, mix: {ricoh: 100%}, colour: red}", "198.18.8.0/24", r"fleet: unknown key\(s\) colour; allowed: count, name, mix"),
    ("{mix: {ricoh: 100%}}", "198.18.8.0/24", r"fleet: missing key 'count'"),
    ("{count: 10}", "198.18.8.0/24", r"fleet: missing key 'mix'"),
    ("[mfd]", "198.18.8.0/24", r"fleet: expected a mapping"),
    ("{count: 10, name: printer, mix: {ricoh: 100%}}", "198.18.8.0/24", r"fleet\.name: 'printer': devices are named <name>-0000, at most 10 chars.*at most 5 chars"),
    ("{count: 10, name: Mfd, mix: {ricoh: 100%}}", "198.18.8.0/24", r"fleet\.name: 'Mfd'"),
    ("{count: 10, name: tp, mix: {ricoh: 100%}}", "198.18.8.0/24", None),  # tp-0000 does not clash with tp4
])
def test_fleet_errors(tmp_path, fleet_yaml, subnet, message):
    if message is None:
        assert len(devices(fleet(tmp_path, fleet_yaml, subnet=subnet))) == 10
        return
    with pytest.raises(LabError, match=message) as caught:
        fleet(tmp_path, fleet_yaml, subnet=subnet)
    assert "\n" not in str(caught.value)


def test_fleet_names_must_not_collide(tmp_path):
    with pytest.raises(LabError, match=r"fleet\.name: device mfd-0001 has the name of another node; give the fleet another name"):
        fleet(tmp_path, "{count: 5, mix: {ricoh: 100%}}", subnet="198.18.8.0/24", hosts="hosts: [{name: mfd-0001, roles: [user]}]")
    two_fleets = ("  - {name: more, subnet: 198.18.12.0/24, fleet: {count: 3, mix: {hp: 100%}}}\n")
    with pytest.raises(LabError, match=r"zones\[1\]\.fleet\.name: device mfd-0000 has the name of another node"):
        fleet(tmp_path, "{count: 5, mix: {ricoh: 100%}}", subnet="198.18.8.0/24", extra=two_fleets)
    renamed = two_fleets.replace("count: 3,", "count: 3, name: prn,")
    topo = fleet(tmp_path, "{count: 5, mix: {ricoh: 100%}}", subnet="198.18.8.0/24", extra=renamed)
    assert [h.name for h in topo.zone("more").hosts] == ["prn-0000", "prn-0001", "prn-0002"]
    # a listed host after the fleet (a later zone) meets the usual duplicate check
    later = "  - {name: more, subnet: 198.18.12.0/24, hosts: [{name: mfd-0002, roles: [user]}]}\n"
    with pytest.raises(LabError, match=r"zones\[1\]\.hosts\[0\]\.name: duplicate node name 'mfd-0002'"):
        fleet(tmp_path, "{count: 5, mix: {ricoh: 100%}}", subnet="198.18.8.0/24", extra=later)


def test_a_zone_needs_hosts_or_a_fleet(tmp_path):
    with pytest.raises(LabError, match=r"zones\[0\]\.hosts: expected a non-empty list of hosts \(or a fleet: of devices\)"):
        load_topology(write(tmp_path, "name: t\nzones:\n  - {name: a, subnet: 198.18.1.0/24}\n"), known_roles=ROLES)


def test_total_host_cap(tmp_path):
    zones = "".join(f"  - {{name: z{i}, subnet: 198.18.{4 * i}.0/22, fleet: {{count: 1000, name: m{i}, mix: {{hp: 100%}}}}}}\n"
                    for i in range(11))
    with pytest.raises(LabError, match=r"zones\[10\]\.fleet\.count: 1000 devices would give the topology more than 10000 hosts"):
        load_topology(write(tmp_path, "name: t\nzones:\n" + zones), known_roles=ROLES)


def test_listed_hosts_alone_are_capped_by_the_bridge(tmp_path):
    hosts = ", ".join(f"{{name: h{i}, roles: [user]}}" for i in range(BRIDGE_PORTS_MAX))
    with pytest.raises(LabError, match=r"zones\[0\]\.hosts: 1023 hosts: a zone's bridge takes at most 1023 ports"):
        load_topology(write(tmp_path, f"name: t\nzones:\n  - {{name: a, subnet: 198.18.0.0/21, hosts: [{hosts}]}}\n"),
                      known_roles=ROLES)


def test_shipped_fleet_topologies():
    for name, count, subnet in (("fleet-200", 200, "198.18.8.0/24"), ("fleet-1000", 1000, "198.18.8.0/22")):
        topo = load_topology(name)
        assert str(topo.zone("devices").subnet) == subnet
        assert len(devices(topo)) == count
        assert Counter(map(vendor, devices(topo))) == {"konica-minolta": count * 2 // 5, "ricoh": count // 5,
                                                       "xerox": count // 5, "sharp": count // 5}


# -- link names in the host's namespace ---------------------------------------------------------------
def test_port_names_fit_linux_for_99_bridges_of_9999_ports():
    assert port_name(99, 9999, "abc") == "sqlab99p9999abc" and len(port_name(99, 9999, "abc")) == INTERFACE_MAX
    assert len(bridge_name(99, "abc")) <= INTERFACE_MAX
    assert port_name(1, 1) == "sqlab1p1"
    assert RUN_ID.match("abc")


def test_port_names_and_run_ids_parse_back():
    assert _id_of("sqlab99p9999abc") == "abc" and _id_of("sqlab1p23") == "p23" and _id_of("sqlab1-eth2abc") == "abc"
    ports = _ports("sqlab3abc")
    assert ports.match("sqlab3p1022abc") and ports.match("sqlab3-eth2abc")  # an older run's port name too
    assert not ports.match("sqlab3p2abd") and not ports.match("sqlab33p2abc")
    assert _ports("sqlab1p23").match("sqlab1p5p23")  # run p23's bridge 1 and its port 5
    assert not _ports("sqlab1").match("sqlab1p23")  # runs without an id never had p<M> ports


def test_a_fleet_of_1000_fits_the_names():
    topo = load_topology("fleet-1000")
    size = len(topo.zone("devices").hosts) + 1
    index = topo.zones.index(topo.zone("devices")) + 1
    assert size <= BRIDGE_PORTS_MAX and len(port_name(index, size, "abc")) <= INTERFACE_MAX


def test_link_names_longer_than_linux_takes_are_refused(tmp_path):
    zones = "".join(f"  - {{name: z{i}, subnet: 198.18.{i}.0/24, hosts: [{{name: h{i}, roles: [user]}}]}}\n"
                    for i in range(99))
    assert len(load_topology(write(tmp_path, "name: t\nzones:\n" + zones), known_roles=ROLES).zones) == 99
    big = "  - {name: big, subnet: 198.18.100.0/22, fleet: {count: 1000, mix: {hp: 100%}}}\n"  # bridge 100, port 1001
    with pytest.raises(LabError, match=r"zones: the lab would name a link sqlab100p1001run \(<run> being 3 chars\), "
                                       r"longer than Linux's 15 chars; use fewer zones or fewer hosts per zone"):
        load_topology(write(tmp_path, "name: t\nzones:\n" + zones + big), known_roles=ROLES)


def test_the_exposure_sweep_takes_every_listed_host_and_two_devices_of_each_kind():
    topology = load_topology("fleet-200")
    scouts = exposure_scouts(topology)
    listed = [h for h in topology.hosts if not h.fleet]
    kinds = {h.roles for h in topology.hosts if h.fleet}
    assert [h for h in scouts if not h.fleet] == listed
    sampled = [h for h in scouts if h.fleet]
    assert len(sampled) == FLEET_EXPOSURE_SAMPLE * len(kinds)
    assert {h.roles for h in sampled} == kinds
    checks = audit_plan(load_catalog(), topology)
    knocked = {c.client_host for c in checks if c.kind == "exposure"} | {c.server_host for c in checks if c.kind == "exposure"}
    assert knocked <= {h.name for h in scouts}
    # required flows are still planned for every device
    required = {c.client_host for c in checks if c.kind == "required"} | {c.server_host for c in checks if c.kind == "required"}
    assert {h.name for h in topology.hosts if h.fleet} <= required
