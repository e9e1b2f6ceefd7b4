"""Rulesets per filtering node: each firewall node admits what it forwards, each host firewall what it serves."""
import ipaddress
import re
from collections import defaultdict
from pathlib import Path

import pytest

from emulator import rules
from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.plan import Check, flow_checks
from emulator.topology import load_topology

HOST_FIREWALL = str(Path(__file__).resolve().parents[1] / "data" / "host-firewall.yaml")
RULE = re.compile(r"-A (\S+) (.*)$")
ACCEPT = re.compile(r"-s (\S+)/32 -d (\S+)/32 -p (\w+)(?: -m \w+ --dport (\d+))?.* -j ACCEPT$")
JUMP = re.compile(r"(-[sd]) (\S+) -j (\S+)$")


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def branch(catalog):
    topology = load_topology("branch-office")
    return topology, flow_checks(catalog, topology)


@pytest.fixture(scope="module")
def host_fw(catalog):
    topology = load_topology(HOST_FIREWALL)
    return topology, flow_checks(catalog, topology)


def filter_chains(text: str) -> dict[str, list[str]]:
    """Chain -> its rules (after `-A CHAIN `) in the *filter table of an iptables-restore ruleset."""
    chains, table = defaultdict(list), None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif table == "filter" and (m := RULE.match(line)):
            chains[m.group(1)].append(m.group(2))
    return chains


def accepts(text: str) -> set[tuple]:
    """(base chain, src, dst, transport, port) of every accept a new packet can reach in an
    iptables-restore ruleset: from INPUT or FORWARD through jumps whose -s/-d blocks hold its addresses."""
    chains, found = filter_chains(text), set()

    def walk(base: str, chain: str, blocks: tuple) -> None:
        for rule in chains[chain]:
            if m := ACCEPT.match(rule):
                src, dst, transport, port = m.groups()
                if all(ipaddress.ip_address(src if flag == "-s" else dst) in block for flag, block in blocks):
                    found.add((base, src, dst, transport, int(port) if port else None))
            elif m := JUMP.match(rule):
                walk(base, m.group(3), blocks + ((m.group(1), ipaddress.ip_network(m.group(2))),))

    for base in ("INPUT", "FORWARD"):
        walk(base, base, ())
    return found


def most_walked(text: str, base: str = "FORWARD") -> int:
    """The most rules a new packet meets in `base` and the chains it jumps to (one per dispatching chain)."""
    chains = filter_chains(text)

    def walk(chain: str) -> int:
        return len(chains[chain]) + max((walk(m.group(3)) for r in chains[chain] if (m := JUMP.match(r))), default=0)
    return walk(base)


def expected(topology, checks, node, hook, chain):
    return {(chain, topology.host(c.client_host).address, topology.host(c.server_host).address,
             c.endpoint.transport, c.endpoint.port)
            for c in checks if c.kind == "required" and (node, hook) in topology.enforcers(c.client_host, c.server_host)}


def test_each_firewall_node_admits_exactly_what_it_forwards(branch):
    topology, checks = branch
    for node in ("fw", "bfw"):
        text = rules.generate(topology, checks, "iptables", node=node).text
        want = expected(topology, checks, node, "forward", "FORWARD")
        assert want and accepts(text) == want, node
        assert ":FORWARD DROP" in text and f"firewall node {node} in topology branch-office" in text


def test_a_branch_to_site_flow_is_admitted_by_both_nodes_a_site_flow_only_by_the_site(branch):
    topology, checks = branch
    fw = accepts(rules.generate(topology, checks, node="fw").text)
    bfw = accepts(rules.generate(topology, checks, node="bfw").text)
    site3, mgmt1 = topology.host("site3").address, topology.host("mgmt1").address
    mgmt1, db1 = topology.host("mgmt1").address, topology.host("db1").address
    crossing = {(s, d) for _c, s, d, _t, _p in fw & bfw}
    assert (site3, mgmt1) in crossing
    assert any((s, d) == (mgmt1, db1) for _c, s, d, _t, _p in fw)
    assert not any((s, d) == (mgmt1, db1) for _c, s, d, _t, _p in bfw)
    # branch-internal flows meet no firewall node: no rule anywhere
    branch_addresses = {h.address for h in topology.zone("branch").hosts}
    assert not any(s in branch_addresses and d in branch_addresses for _c, s, d, _t, _p in fw | bfw)


def test_nft_per_node_mirrors_iptables(branch):
    topology, checks = branch
    for node in ("fw", "bfw"):
        ipt = rules.generate(topology, checks, "iptables", node=node).text
        nft = rules.generate(topology, checks, "nft", node=node).text
        assert nft.count(" accept comment ") == len(accepts(ipt))


def test_the_default_node_is_the_first_firewall_and_single_firewall_text_is_unchanged(catalog):
    topology = load_topology("single-site")
    checks = flow_checks(catalog, topology)
    default = rules.generate(topology, checks)
    assert default == rules.generate(topology, checks, node="fw")
    assert default.source == "generated for topology single-site"
    assert default.text.startswith("# safeq-lab least-privilege ruleset for topology single-site (iptables-restore format)")


def test_a_host_firewall_admits_what_its_host_serves_on_input(host_fw):
    topology, checks = host_fw
    ruleset = rules.generate(topology, checks, "iptables", node="ts1")
    text = ruleset.text
    want = expected(topology, checks, "ts1", "input", "INPUT")
    km1, tp9 = topology.host("km1").address, topology.host("tp9").address
    assert {src for _c, src, _d, _t, _p in want} == {km1, tp9}  # the same segment and across the firewall node
    assert accepts(text) == want
    assert ":INPUT DROP" in text and ":OUTPUT ACCEPT" in text and "-A FORWARD" not in text
    assert "host firewall of ts1" in ruleset.source
    # the FTP the host serves rides the helper on the way in (prerouting), not an open range
    ftp = {(topology.host(c.server_host).address, c.endpoint.port) for c in checks
           if c.kind == "required" and c.endpoint.protocol == "ftp" and c.server_host == "ts1"}
    assert ftp and all(f"-A PREROUTING -d {a}/32 -p tcp -m tcp --dport {p} " in text for a, p in ftp)
    nft = rules.generate(topology, checks, "nft", node="ts1").text
    assert nft.count(" accept comment ") == len(want)
    body = nft.split("chain input {")[1].split("}")[0]
    assert body.count(" accept comment ") == len(want) and "policy drop" in body


def test_the_firewall_node_still_admits_flows_that_a_host_firewall_also_filters(host_fw):
    topology, checks = host_fw
    fw = accepts(rules.generate(topology, checks, node="fw").text)
    assert fw == expected(topology, checks, "fw", "forward", "FORWARD") and fw
    assert not any(s == topology.host("km1").address for _c, s, _d, _t, _p in fw)  # km1 -> ts1 is one segment


def test_a_client_host_firewall_attaches_the_ftp_helper_on_output(catalog, tmp_path):
    text = Path(HOST_FIREWALL).read_text().replace("{name: ts1, roles: [terminal-server, spooler-controller], rules: host-closed.rules}",
                                                  "{name: ts1, roles: [terminal-server, spooler-controller]}")
    text = text.replace("embedded-terminal-konica-minolta]}", "embedded-terminal-konica-minolta], rules: host-closed.rules}")
    (tmp_path / "host-closed.rules").write_text("*filter\nCOMMIT\n")
    (tmp_path / "t.yaml").write_text(text)
    topology = load_topology(str(tmp_path / "t.yaml"))
    checks = flow_checks(catalog, topology)
    out = rules.generate(topology, checks, node="km1").text
    ftp = {(topology.host(c.server_host).address, c.endpoint.port) for c in checks
           if c.kind == "required" and c.endpoint.protocol == "ftp" and c.client_host == "km1"}
    assert ftp and all(f"-A OUTPUT -d {a}/32 -p tcp -m tcp --dport {p} " in out for a, p in ftp)
    nft = rules.generate(topology, checks, "nft", node="km1").text
    assert "type filter hook output priority filter; policy accept;" in nft and 'ct helper set "ftp_helper"' in nft


def test_only_required_checks_produce_accepts(branch):
    topology, checks = branch
    required = [c for c in checks if c.kind == "required"]
    others = [Check(kind, c.flow_id, c.client_host, c.server_host, c.endpoint)
              for c in required[:20] for kind in ("exposure", "must-close", "local")]
    for node in ("fw", "bfw"):
        assert accepts(rules.generate(topology, others, node=node).text) == set()
        assert rules.grouped(topology, others, node) == []


def test_grouped_is_public_and_the_old_names_still_work(branch):
    topology, checks = branch
    assert rules._grouped is rules.grouped
    assert rules.grouped(topology, checks) == rules.grouped(topology, checks, "fw")
    groups = rules.grouped(topology, checks, "bfw")
    assert groups and all(isinstance(ids, list) and ids for _key, ids in groups)
    assert rules._ftp_servers(topology, checks) == rules._ftp_servers(topology, checks, "fw")


def test_rules_for_a_node_that_filters_nothing_are_refused(branch):
    topology, checks = branch
    with pytest.raises(LabError, match="'pcb1' holds no ruleset in topology branch-office"):
        rules.generate(topology, checks, node="pcb1")


@pytest.mark.parametrize("name, walked", [("single-site", 40), ("fleet-200", 50)])
def test_a_firewall_node_ruleset_is_structured_so_a_packet_walks_a_few_dozen_rules(catalog, name, walked):
    topology = load_topology(name)
    checks = flow_checks(catalog, topology)
    text = rules.generate(topology, checks, "iptables").text
    want = expected(topology, checks, topology.firewall, "forward", "FORWARD")
    assert accepts(text) == want and len(want) > 10 * walked
    assert most_walked(text) == rules.walked_at_most(topology, checks)[1] <= walked
    chains = filter_chains(text)
    assert chains["FORWARD"][0] == "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    assert all(len(chain) <= 28 and f":{chain} - [0:0]" in text for chain in chains if chain not in ("INPUT", "FORWARD"))
    jumps = {r for chain in chains.values() for r in chain if JUMP.match(r)}
    names = {h.address: h.name.replace("-", "_") for h in topology.hosts}
    assert {f"-s {src}/32 -j from_{names[src]}" for _c, src, _d, _t, _p in want} <= jumps  # a chain per source host
    # a jump on the wrong block strands the accepts behind it: the walk above sees it
    jump = next(r for r in chains["FORWARD"] if JUMP.match(r))
    block = JUMP.match(jump).group(2)
    moved = text.replace(f"-A FORWARD {jump}", f"-A FORWARD {jump.replace(block, '198.19.255.255/32')}")
    assert accepts(moved) < want
    nft = rules.generate(topology, checks, "nft").text
    assert nft.count(" accept comment ") == len(want) and nft.count(" jump ") == text.count(" -j ") - text.count(" -j ACCEPT") - text.count(" -j CT ")
