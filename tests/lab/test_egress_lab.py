"""Nothing leaves the lab, and the host gains no IPv6 neighbours from it.

- every link the lab creates in the host's namespace carries no IPv6 address (not even link-local),
  and the lab's namespaces have none either;
- a lab host's packet to an address outside 198.18.0.0/15 is dropped and counted in that host;
  one that gets past a host is dropped and counted by the firewall node that would route it;
- the egress table survives a new ruleset, and an audit reports the count.
"""
from __future__ import annotations

import subprocess

import pytest

from emulator import rules
from emulator.audit import run_audit
from emulator.catalog import load_catalog
from emulator.lab import EGRESS_TABLE, EGRESS_TABLE_NAME, Lab
from emulator.plan import audit_plan
from emulator.report import format_report
from emulator.topology import load_topology
from tests.lab.helpers import footprint, small_topology

pytestmark = pytest.mark.lab
OUTSIDE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): outside the lab, and routed nowhere anyway
CONNECT = ("python3 -c \"import socket,sys\ns=socket.socket()\ns.settimeout(2)\n"
           "try:\n s.connect(('%s', 9))\nexcept OSError as e:\n print(type(e).__name__, e.errno)\"" % OUTSIDE)
LINK_LOCAL_MULTICAST = "224.0.0.251"
SEND_UDP = "python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('%s', 9))\"" % OUTSIDE


def _ipv6_interfaces() -> set[str]:
    out = subprocess.run(["ip", "-6", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split()[1].split("@")[0] for line in out.splitlines()}


def test_the_lab_keeps_to_itself(lab_host, tmp_path):
    catalog = load_catalog()
    topology = load_topology(small_topology(tmp_path))
    checks = audit_plan(catalog, topology)
    with Lab(topology, catalog) as lab:
        # no IPv6 on the lab's links in the host's namespace, nor inside the lab
        assert lab.interfaces and not _ipv6_interfaces() & set(lab.interfaces)
        assert not {n for n in _ipv6_interfaces() if n.startswith("sqlab")}
        for name in ("fw", "ts1", "pc9"):
            assert lab.node(name).cmd("ip -6 -o addr show").strip() == "", name

        # a host's packet to an outside address: dropped and counted in the host, never sent
        before = lab.egress_drops()
        assert set(before) == {"fw", "ts1", "km1", "pc9"}
        said = lab.node("pc9").cmd(CONNECT)
        after = lab.egress_drops()
        assert "Error" in said, said  # never connected: the host's own output hook dropped the SYN
        assert after["pc9"] > before["pc9"]
        assert after["fw"] == before["fw"]  # nothing reached the firewall node

        # link-local multicast (IGMP reports, mDNS) is dropped without being counted as an escape
        lab.node("pc9").cmd(SEND_UDP.replace(OUTSIDE, LINK_LOCAL_MULTICAST))
        assert lab.egress_drops() == after

        # past a host (its table removed): the firewall node drops it instead of routing it
        lab.nft("pc9", ["delete", "table", "inet", EGRESS_TABLE_NAME])
        lab.node("pc9").cmd(SEND_UDP)
        lab.nft_load("pc9", EGRESS_TABLE)  # back, counting from zero
        routed = lab.egress_drops()
        assert routed["pc9"] == 0 and routed["fw"] > after["fw"]

        # a ruleset replaces the node's whole ruleset: the egress table comes back with it, counting again
        lab.apply_rules(rules.generate(topology, checks))
        assert lab.egress_drops()["fw"] == 0
        assert f"table inet {EGRESS_TABLE_NAME}" in lab.nft("fw", ["list", "tables"])

        report = run_audit(lab, checks, "generated")
        assert report.egress_drops == 0 and report.to_dict()["egress_drops"] == 0
        assert "egress: 0 packets to addresses outside the lab were dropped" in format_report(report)
        assert report.exit_status == 0
    assert footprint() == {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
