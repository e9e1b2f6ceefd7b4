"""Bad inputs as root, through `safeq-lab audit` and `rules check`: one line, exit 4, host untouched.

Every case must fail before the lab is built, so each run is quick and leaves no state, no
sqlab* bridge, no process (tests/lab/helpers.footprint). The corpus and the words each error
must hold live in tests/unit/test_bad_inputs.py.
"""
from __future__ import annotations

import subprocess

import pytest

from tests.lab.helpers import footprint, run_cli, small_topology
from tests.unit.test_bad_inputs import BAD, CERT_CASES, RULES_CASES, TOPOLOGY_CASES, make_certs

pytestmark = pytest.mark.lab


def one_line_error(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("safeq-lab: error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "internal error" not in proc.stderr
    assert "\x1b" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def host_rules() -> tuple[str, str]:
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    ipt = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return nft, "\n".join(l for l in ipt.splitlines() if not l.startswith("#"))  # iptables-save stamps the time


@pytest.mark.parametrize("name", sorted(TOPOLOGY_CASES))
def test_audit_refuses_a_bad_topology_and_builds_nothing(lab_host, name):
    path = str(BAD / "topology" / name)
    one_line_error(run_cli("audit", "--topology", path), path, *TOPOLOGY_CASES[name])
    assert not any(footprint().values()), footprint()


SYNTAX_ERRORS = {"syntax-error.nft": ("not a valid nft ruleset", "line 4", "syntax error"),
                 "unknown-target.rules": ("not a valid iptables ruleset", "NOSUCHTARGET", "line: 4")}


@pytest.mark.parametrize("name", sorted(RULES_CASES))
def test_audit_refuses_a_bad_rules_file_and_builds_nothing(lab_host, name):
    path = str(BAD / "rules" / name)
    needles = RULES_CASES[name] or SYNTAX_ERRORS[name]
    before = host_rules()
    one_line_error(run_cli("audit", "--rules", path), path, *needles)
    one_line_error(run_cli("rules", "check", path), path, *needles)
    assert not any(footprint().values()) and host_rules() == before


@pytest.mark.parametrize("name, says", [
    ("nat-table.rules", "with NAT rules: allowed"),
    ("flush-ruleset.nft", "valid nft ruleset"),
    ("interfaces.nft", "valid nft ruleset"),
    ("utf8-bom.rules", "valid iptables ruleset"),
])
def test_accepted_edge_cases_pass_the_check(lab_host, name, says):
    proc = run_cli("rules", "check", str(BAD / "accepted" / name))
    assert proc.returncode == 0, proc.stderr
    assert says in proc.stdout


def test_flush_ruleset_in_a_checked_file_cannot_touch_the_host(lab_host):
    canary = ["nft", "add", "table", "inet", "safeq_lab_canary"]
    subprocess.run(canary, check=True)
    try:
        before = host_rules()
        assert "safeq_lab_canary" in before[0]
        proc = run_cli("rules", "check", str(BAD / "accepted" / "flush-ruleset.nft"))
        assert proc.returncode == 0, proc.stderr
        assert host_rules() == before
    finally:
        subprocess.run(["nft", "delete", "table", "inet", "safeq_lab_canary"], check=False)


def test_interfaces_of_the_firewall_node_load_in_the_lab_topology(lab_host, tmp_path):
    topo = small_topology(tmp_path)
    nft = tmp_path / "iif.nft"
    nft.write_text('table inet site {\n  chain forward {\n    type filter hook forward priority filter; policy accept;\n'
                   '    iif "fw-devices" oif "fw-servers" accept\n  }\n}\n')
    checked = run_cli("rules", "check", str(nft), "--topology", topo, "--node", "fw")
    assert checked.returncode == 0, checked.stderr
    wrong = run_cli("rules", "check", str(nft), "--topology", topo, "--node", "km1")
    one_line_error(wrong, str(nft), "line 4", "'fw-devices' is not an interface of host km1", "km1-eth0")


def test_rules_above_the_size_limit_are_refused_before_the_lab(lab_host, tmp_path):
    path = tmp_path / "huge.rules"
    line = "-A FORWARD -s 198.18.1.10/32 -d 198.18.2.10/32 -p tcp -m tcp --dport 9100 -j ACCEPT\n"
    with path.open("w") as out:
        out.write("*filter\n:FORWARD DROP [0:0]\n" + line * (50 * 1024 * 1024 // len(line) + 1) + "COMMIT\n")
    one_line_error(run_cli("audit", "--rules", str(path)), str(path), "at most 8 MiB")
    assert not any(footprint().values()), footprint()


@pytest.mark.parametrize("case", CERT_CASES)
def test_audit_refuses_bad_certificates_before_the_lab(lab_host, tmp_path, case):
    directory, needles = make_certs(tmp_path / "certs", case)
    one_line_error(run_cli("audit", "--certs", str(directory)), *needles)
    assert not any(footprint().values()), footprint()


@pytest.mark.parametrize("args, needles", [
    (("audit", "--json", "/nonexistent/dir/report.json"), ("--json", "/nonexistent/dir does not exist")),
    (("audit", "--timeout", "0"), ("--timeout", "above 0", "--help")),
    (("audit", "--no-such-flag"), ("--no-such-flag", "--help")),
    (("up", "--rules"), ("--rules", "expected one argument", "--help")),
])
def test_bad_arguments_are_refused_before_the_lab(lab_host, args, needles):
    one_line_error(run_cli(*args), *needles)
    assert not any(footprint().values()), footprint()
