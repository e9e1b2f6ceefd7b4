"""The Aerleon export: files Aerleon parses and renders, one term per crossing flow group, then a deny."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aerleon.lib import naming
from aerleon.lib import yaml as aerleon_yaml

from emulator import aerleon_policy as ap
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


@pytest.fixture(scope="module")
def files(world):
    _catalog, topology, checks = world
    return ap.policy_files(topology, checks)


@pytest.fixture(scope="module")
def rendered(files):
    return {target: ap.render(files, target) for target in ap.TARGETS}


def write(files: dict[str, str], root: Path) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def parsed_terms(files, root: Path):
    """The policy's terms as Aerleon itself reads them from disk (the aclgen path), names resolved."""
    write(files, root)
    definitions = naming.Naming(str(root / "def"))
    policy = aerleon_yaml.ParseFile(ap.POLICY_FILE, base_dir=str(root), definitions=definitions)
    [(_header, terms)] = policy.filters
    return terms


def crossing_required(topology, checks):
    return [c for c in checks if c.kind == "required"
            and topology.host(c.client_host).zone != topology.host(c.server_host).zone]


def term_key(term):
    """(src, dst, transport, port|None) of an accept term, from Aerleon's resolved term."""
    [src], [dst], [proto] = term.source_address, term.destination_address, term.protocol
    ports = {low for low, high in term.destination_port if low == high}
    assert len(ports) == len(term.destination_port) <= 1, term.name
    return str(src), str(dst), proto, next(iter(ports), None)


def test_the_files_parse_with_aerleon(files, world, tmp_path):
    _catalog, topology, checks = world
    assert set(files) == {ap.NETWORKS_FILE, ap.SERVICES_FILE, ap.POLICY_FILE, ap.HELPERS_FILE}
    terms = parsed_terms(files, tmp_path)
    groups = rules.grouped(topology, checks)
    assert [t.name for t in terms][0] == "established"
    assert len(terms) == len(groups) + 2
    assert len({t.name for t in terms}) == len(terms)
    definitions = naming.Naming(str(tmp_path / "def"))
    for host in topology.hosts:
        assert [str(n) for n in definitions.GetNet(ap.network_name(host.name))] == [f"{host.address}/32"]
    for zone in topology.zones:
        assert [str(n) for n in definitions.GetNet(ap.network_name(zone.name, "ZONE"))] == [str(zone.subnet)]


def test_every_crossing_required_check_has_its_term(files, world, tmp_path):
    _catalog, topology, checks = world
    terms = {term_key(t): t for t in parsed_terms(files, tmp_path) if t.action == ["accept"] and t.protocol}
    required = crossing_required(topology, checks)
    assert required
    for c in required:
        key = (f"{topology.host(c.client_host).address}/32", f"{topology.host(c.server_host).address}/32",
               c.endpoint.transport, c.endpoint.port)
        assert key in terms, c.key
        term = terms[key]
        assert c.flow_id in " ".join(term.comment) or " ".join(term.comment).endswith("..."), c.key
        if c.endpoint.transport == "icmp":
            assert set(term.icmp_type) == {"echo-request"}
    # and nothing else: each accept term serves some required check
    needed = {(f"{topology.host(c.client_host).address}/32", f"{topology.host(c.server_host).address}/32",
               c.endpoint.transport, c.endpoint.port) for c in required}
    assert set(terms) == needed


def test_the_policy_ends_with_a_deny(files, rendered, tmp_path):
    last = parsed_terms(files, tmp_path)[-1]
    assert last.action == ["deny"]
    assert not (last.source_address or last.destination_address or last.protocol or last.destination_port)
    ipt = rendered["iptables"].splitlines()
    assert "-P FORWARD DROP" in ipt
    assert [l for l in ipt if l.startswith("-A FORWARD ")][-1] == "-A FORWARD -j F_default-deny"
    assert ipt[-1] == "-A F_default-deny -p all -j DROP"
    nft = rendered["nftables"]
    assert "type filter hook forward priority 0; policy drop;" in nft
    assert re.findall(r"jump (\S+)", nft)[-1] == "default-deny"
    assert re.search(r"chain default-deny \{\n(\s+comment .*\n)?\s+drop\n\s+\}", nft)


def test_both_targets_render_stateful_forward_filters(rendered, world):
    _catalog, topology, checks = world
    groups = rules.grouped(topology, checks)
    ipt, nft = rendered["iptables"], rendered["nftables"]
    assert ipt.startswith("# Iptables FORWARD Policy")
    assert ipt.count("\n-A FORWARD -j F_") == len(groups) + 2
    assert nft.startswith("table inet filtering_policies {")
    assert len(re.findall(r"^\s+jump ", nft, re.M)) == len(groups) + 1  # 'established' is iptables-only
    # replies are accepted before any term: nft in its base chain, iptables through the first term
    assert re.search(r"policy drop;\n\s+ct state established,related accept\n\s+jump ", nft)
    assert ipt.split("\n-A FORWARD ")[1].startswith("-j F_established")
    assert "-A F_established -p all -m state --state ESTABLISHED,RELATED -j ACCEPT" in ipt
    # ICMP is echo-request only
    icmp_ipt = [l for l in ipt.splitlines() if " -p icmp " in l]
    icmp_nft = [l for l in nft.splitlines() if " icmp " in l]
    assert icmp_ipt and all("--icmp-type 8 " in l for l in icmp_ipt)
    assert icmp_nft and all("icmp type { echo-request, echo-request }" in l for l in icmp_nft)


def test_output_is_deterministic(files, rendered, world):
    _catalog, topology, checks = world
    assert ap.policy_files(topology, checks) == files
    assert ap.render(files, "nftables") == rendered["nftables"]


def test_aclgen_on_the_command_line_renders_the_same(files, rendered, tmp_path):
    """The module docstring's reproduce-by-hand command: what a network team would run."""
    write(files, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "aerleon", "--base_directory=.", "--definitions_directory=def",
                           f"--policy_file={ap.POLICY_FILE}", "--output_directory=out"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "safeq-lab").read_text() == rendered["iptables"]
    assert (tmp_path / "out" / "safeq-lab.nft").read_text() == rendered["nftables"]


def test_to_ruleset_wraps_iptables_and_adds_the_ftp_helper(files, world):
    _catalog, topology, checks = world
    ruleset = ap.to_ruleset(files, "iptables")
    assert ruleset.format == "iptables" == rules.detect_format(ruleset.text)
    lines = ruleset.text.splitlines()
    assert lines[1] == "*filter" and lines.count("COMMIT") == 2
    assert lines[lines.index("*raw") - 1] == "COMMIT" and lines[-1] == "COMMIT"
    ftp = rules._ftp_servers(topology, checks)
    helpers = [l for l in lines if "--helper ftp" in l]
    assert ftp and len(helpers) == len(ftp)
    # the same helper rules as the generated least-privilege ruleset
    assert set(helpers) <= set(rules.generate(topology, checks, "iptables").text.splitlines())


def test_to_ruleset_keeps_the_nft_table_and_adds_the_ftp_helper(files, world, rendered):
    _catalog, topology, checks = world
    ruleset = ap.to_ruleset(files, "nftables")
    assert ruleset.format == "nft" == rules.detect_format(ruleset.text)
    assert rendered["nftables"].rstrip("\n") in ruleset.text
    helpers = [l.strip() for l in ruleset.text.splitlines() if "ct helper set" in l]
    assert len(helpers) == len(rules._ftp_servers(topology, checks))
    generated = {l.strip() for l in rules.generate(topology, checks, "nft").text.splitlines()}
    assert set(helpers) <= generated
    assert 'ct helper ftp_helper { type "ftp" protocol tcp; }' in ruleset.text


def test_long_host_names_get_short_stable_unique_term_names():
    names = {ap.term_name("abcdefghij", f"klmnopqrs{i}", "tcp", 65535) for i in range(10)}
    assert len(names) == 10 and all(len(n) <= ap.TERM_NAME_MAX for n in names)
    assert ap.term_name("abcdefghij", "klmnopqrs0", "tcp", 65535) in names
    assert ap.term_name("pc1", "site1", "icmp", None) == "pc1-site1-icmp"


def test_long_names_render_end_to_end(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(
        "name: long-names\nfirewall: fw\nzones:\n"
        "  - name: servers\n    subnet: 198.18.100.0/24\n    hosts:\n"
        "      - {name: terminalsv, roles: [terminal-server, spooler-controller]}\n"
        "  - name: devices\n    subnet: 198.18.101.0/24\n    hosts:\n"
        "      - {name: konicamfd1, roles: [mfd, mfd-konica-minolta, embedded-terminal-konica-minolta]}\n"
        "      - {name: userpc0001, roles: [user]}\n")
    topology = load_topology(str(path))
    checks = audit_plan(load_catalog(), topology)
    files = ap.policy_files(topology, checks)
    names = [t["name"] for t in yaml.safe_load(files[ap.POLICY_FILE])["filters"][0]["terms"]]
    assert any(len(f"{n}") == ap.TERM_NAME_MAX for n in names)
    for target in ap.TARGETS:
        assert ap.render(files, target)


def test_only_the_requested_targets_get_headers(world):
    _catalog, topology, checks = world
    files = ap.policy_files(topology, checks, targets=("iptables",))
    policy = yaml.safe_load(files[ap.POLICY_FILE])
    assert policy["filters"][0]["header"]["targets"] == {"iptables": "FORWARD DROP"}
    assert "echo-request echo-request" not in files[ap.POLICY_FILE]  # the nftables workaround is not needed
    assert ap.render(files, "iptables")
    with pytest.raises(LabError, match="no nftables header"):
        ap.render(files, "nftables")


def test_unknown_targets_are_lab_errors(files, world):
    _catalog, topology, checks = world
    with pytest.raises(LabError, match="unknown Aerleon target.*cisco"):
        ap.policy_files(topology, checks, targets=("cisco",))
    with pytest.raises(LabError, match="use iptables or nftables"):
        ap.render(files, "cisco")


def test_missing_aerleon_is_a_lab_error_naming_the_fix(files, monkeypatch):
    monkeypatch.setattr(ap, "aerleon_api", None)
    with pytest.raises(LabError, match=r"pip install aerleon"):
        ap.render(files, "iptables")


def test_a_rendering_failure_is_a_one_line_lab_error(files):
    broken = dict(files, **{ap.SERVICES_FILE: "services:\n  UDP_1:\n  - port: 1\n    protocol: udp\n"})
    with pytest.raises(LabError, match="could not render") as caught:
        ap.render(broken, "nftables")
    assert "\n" not in str(caught.value) and "regenerate" in str(caught.value)
    with pytest.raises(LabError, match="lack pol/safeq-lab.yaml"):
        ap.render({k: v for k, v in files.items() if k != ap.POLICY_FILE}, "iptables")
    with pytest.raises(LabError, match="not an Aerleon YAML policy"):
        ap.render(dict(files, **{ap.POLICY_FILE: "- just a list\n"}), "iptables")


@pytest.mark.parametrize("text, where", [
    ("ftp:\n- {address: 198.18.1.10, port: x}\n", r"ftp\[0\]\.port"),
    ("ftp:\n- {address: nowhere, port: 21}\n", r"ftp\[0\]\.address"),
    ("ftp:\n- {address: 198.18.1.10}\n", r"ftp\[0\]: expected exactly"),
    ("helpers: []\n", "expected one key, ftp"),
])
def test_the_helper_file_is_validated(files, text, where):
    with pytest.raises(LabError, match=where):
        ap.ftp_helpers(dict(files, **{ap.HELPERS_FILE: text}))
