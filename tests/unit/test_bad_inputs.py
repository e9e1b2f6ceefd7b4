"""Bad input files (tests/data/bad/): one line naming the file, the place and the fix, exit 4.

No root here: every case fails before a ruleset would be loaded into a namespace, and the audit
cases run with the lab's preflight and the lab itself replaced by stand-ins that fail the test
if anything is built. tests/lab/test_bad_inputs_lab.py runs the same files as root.
"""
from __future__ import annotations

import datetime
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import emulator.lab
from emulator import pki, rules
from emulator.cli import _one_line, main
from emulator.errors import LabError
from emulator.topology import MAX_TOPOLOGY_BYTES, load_topology

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"

# file in tests/data/bad/topology -> words its one-line error must hold (besides the file's path)
TOPOLOGY_CASES = {
    "alias-bomb.yaml": ("line 2", "anchors and aliases are not allowed", "write the value out"),
    "bad-prefix.yaml": ("zones[0].subnet", "198.18.1.0/33", "in CIDR form"),
    "binary.yaml": ("line 2", "not UTF-8", "save the file as UTF-8"),
    "control-byte.yaml": ("line 2", "#x001b", "remove it"),
    "deeply-nested.yaml": ("line 2", "nested more than 32 levels"),
    "duplicate-hosts.yaml": ("zones[0].hosts[1].name", "duplicate node name 'h1'", "a name of its own"),
    "duplicate-key.yaml": ("line 4", "'zones' is given twice", "first on line 2", "merge them"),
    "empty.yaml": ("the file is empty", "`name:` and `zones:`"),
    "escape-sequence.yaml": ("line 2", "control character '\\x1b'", "remove it"),
    "host-name-shell.yaml": ("zones[0].hosts[0].name", "'h1;reboot'", "at most 10 chars"),
    "host-name-too-long.yaml": ("zones[0].hosts[0].name", "'printserver01'", "at most 10 chars"),
    "interface-name-too-long.yaml": ("zones[0].name", "firewall01-servers exceeds 15 chars", "shorten it"),
    "ipv6-subnet.yaml": ("zones[0].subnet", "is IPv6", "give a subnet of 198.18.0.0/15"),
    "link-not-a-number.yaml": ("zones[0].link.bw", "non-negative number"),
    "non-utf8.yaml": ("line 2", "byte 0xe9 is not UTF-8", "save the file as UTF-8"),
    "not-a-mapping.yaml": ("top level", "expected a mapping"),
    "out-of-range-subnet.yaml": ("zones[0].subnet", "outside the lab range"),
    "overlapping-subnets.yaml": ("zones[1].subnet", "overlaps zone a", "a subnet of its own"),
    "role-not-a-string.yaml": ("zones[0].hosts[0].roles", "is not a role id", "catalog --roles"),
    "syntax-error.yaml": ("line 3", "not valid YAML", "fix the YAML"),
    "tab-indent.yaml": ("line 3", "not valid YAML", "fix the YAML"),
    "unknown-role.yaml": ("zones[0].hosts[0].roles", "unknown role 'no-such-role'", "catalog --roles"),
    "zone-name-shell.yaml": ("zones[0].name", "'a$(id)'", "at most 12 chars"),
}

# file in tests/data/bad/rules -> words of its one-line error; None: only a real load (root) finds it
RULES_CASES = {
    "binary.rules": ("not readable text", "line 2", "saved as UTF-8"),
    "empty.rules": ("is empty", "rules generate"),
    "no-commit.rules": ("without COMMIT", "must end with COMMIT"),
    "non-utf8.rules": ("not readable text", "line 3: byte 0xe9", "saved as UTF-8"),
    "nul-byte.nft": ("not readable text", "line 2: a NUL byte"),
    "prose.rules": ("neither an iptables-save ruleset", "nor an nft ruleset"),
    "unknown-interface.nft": ("line 4", "'fw-nowhere' is not an interface of", "fw-servers", "iifname"),
    "syntax-error.nft": None,
    "unknown-target.rules": None,
}


def run(capsys, *argv):
    """main() in this process: (exit status, stderr); pytest keeps its own signal handlers."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        status = main(list(argv))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return status, capsys.readouterr().err


def assert_one_line(status, err, *needles):
    lines = err.strip().splitlines()
    assert status == 4, err
    assert len(lines) == 1 and lines[0].startswith("safeq-lab: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    assert "\x1b" not in err and "\x07" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_every_corpus_file_has_an_expected_error():
    assert sorted(p.name for p in (BAD / "topology").iterdir()) == sorted(TOPOLOGY_CASES)
    assert sorted(p.name for p in (BAD / "rules").iterdir()) == sorted(RULES_CASES)


@pytest.mark.parametrize("name", sorted(TOPOLOGY_CASES))
def test_bad_topology_is_one_line_naming_file_place_and_fix(capsys, name):
    path = str(BAD / "topology" / name)
    status, err = run(capsys, "topology", "--topology", path)
    assert_one_line(status, err, path, *TOPOLOGY_CASES[name])


@pytest.mark.parametrize("name", sorted(TOPOLOGY_CASES))
def test_bad_topology_raises_lab_error_from_the_loader(name):
    with pytest.raises(LabError) as info:
        load_topology(str(BAD / "topology" / name), known_roles={"user", "mfd"})
    assert str(info.value).startswith(str(BAD / "topology" / name))


def test_alias_bomb_is_refused_before_it_grows():
    # Refused at the first anchor: the loader never builds a node for it, let alone 9**10.
    with pytest.raises(LabError, match="anchors and aliases"):
        load_topology(str(BAD / "topology" / "alias-bomb.yaml"), known_roles={"user"})


def test_description_is_one_line_of_text(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("name: t\ndescription: >\n  two\n  lines\n\n  and a paragraph\nzones:\n"
                    "  - {name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user]}]}\n")
    assert load_topology(str(path), known_roles={"user"}).description == "two lines and a paragraph"


def test_topology_above_the_size_limit_is_refused(capsys, tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: t\n" + "# padding\n" * (MAX_TOPOLOGY_BYTES // 10 + 1))
    status, err = run(capsys, "topology", "--topology", str(path))
    assert_one_line(status, err, str(path), "at most 1024 KiB")


def test_topology_that_is_a_directory(capsys, tmp_path):
    status, err = run(capsys, "topology", "--topology", str(tmp_path))
    assert_one_line(status, err, str(tmp_path), "not a regular file")


# -- rules -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n, needles in RULES_CASES.items() if needles))
def test_bad_rules_file_is_one_line_before_any_load(capsys, name):
    path = str(BAD / "rules" / name)
    status, err = run(capsys, "rules", "check", path)
    assert_one_line(status, err, path, *RULES_CASES[name])


def test_rules_file_above_the_size_limit_is_refused(capsys, tmp_path):
    path = tmp_path / "huge.rules"
    line = "-A FORWARD -s 198.18.1.10/32 -d 198.18.2.10/32 -p tcp -m tcp --dport 9100 -j ACCEPT\n"
    with path.open("w") as out:
        out.write("*filter\n:FORWARD DROP [0:0]\n")
        out.write(line * (50 * 1024 * 1024 // len(line) + 1))
        out.write("COMMIT\n")
    assert path.stat().st_size > 50 * 1024 * 1024
    status, err = run(capsys, "rules", "check", str(path))
    assert_one_line(status, err, str(path), "at most 8 MiB")


def test_an_interface_of_another_node_is_named_with_the_nodes_own(capsys):
    path = str(BAD / "accepted" / "interfaces.nft")
    status, err = run(capsys, "rules", "check", path, "--topology", "branch-office", "--node", "bfw")
    assert_one_line(status, err, path, "line 7", "'fw-users' is not an interface of firewall node bfw",
                    "bfw-branch, bfw-transit")
    status, err = run(capsys, "rules", "check", path, "--node", "nosuch")
    assert_one_line(status, err, "--node nosuch", "not a firewall node or host")


def test_interfaces_named_by_nft_iif_and_oif():
    text = (BAD / "accepted" / "interfaces.nft").read_text()
    text += 'iif $lan accept\noif != "fw-mgmt" accept comment "iif not-this"\n'
    names = [name for _line, name in rules._interfaces_named(text)]
    assert names == ["fw-users", "fw-servers", "fw-devices", "lo", "fw-mgmt"]


def test_node_interfaces():
    single = load_topology("single-site")
    assert rules.node_interfaces(single, "fw")[:3] == ("lo", "fw-servers", "fw-mgmt")
    assert rules.node_interfaces(single, "db1") == ("lo", "db1-eth0")
    branch = load_topology("branch-office")
    assert rules.node_interfaces(branch, "bfw") == ("lo", "bfw-branch", "bfw-transit")


def test_nat_rules_are_recognised():
    nat = BAD / "accepted" / "nat-table.rules"
    assert rules.translates_addresses(rules.Ruleset("iptables", nat.read_text(), str(nat)))
    assert not rules.translates_addresses(rules.Ruleset("iptables", "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", "x"))
    assert rules.translates_addresses(rules.Ruleset("nft", "table ip n {\n chain p { type nat hook postrouting "
                                                           "priority srcnat; masquerade\n }\n}\n", "x"))


def test_byte_order_mark_is_dropped():
    assert rules.detect_format((BAD / "accepted" / "utf8-bom.rules").read_text(encoding="utf-8")) == "iptables"


# -- command line --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["audit", "--bogus"], ("unrecognized arguments: --bogus", "--help")),
    ([], ("required: COMMAND", "`safeq-lab --help`")),
    (["rules"], ("required: ACTION", "`safeq-lab rules --help`")),
    (["rules", "generate", "--format", "pf"], ("invalid choice: 'pf'", "`safeq-lab rules generate --help`")),
    (["catalog", "--port", "x"], ("--port", "invalid int value", "`safeq-lab catalog --help`")),
    (["audit", "--timeout", "0"], ("--timeout", "above 0", "`safeq-lab audit --help`")),
    (["audit", "--timeout", "-1"], ("--timeout", "above 0",)),
    (["audit", "--timeout", "nan"], ("--timeout", "above 0",)),
    (["audit", "--timeout", "inf"], ("--timeout", "at most 600",)),
    (["audit", "--timeout", "soon"], ("--timeout", "'soon' is not a number of seconds")),
    (["topology", "--bogus\x1b[2J"], ("unrecognized arguments", "\\x1b[2J")),
])
def test_argument_errors_are_one_line_exit_4(capsys, argv, needles):
    status, err = run(capsys, *argv)
    assert_one_line(status, err, *needles)


def test_help_still_prints_usage_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "emulator.cli", "audit", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--timeout" in proc.stdout


def test_unknown_flag_from_the_real_entry_point():
    proc = subprocess.run([sys.executable, "-m", "emulator.cli", "audit", "--no-such-flag"], capture_output=True,
                          text=True, timeout=60)
    assert_one_line(proc.returncode, proc.stderr, "--no-such-flag", "--help")
    assert proc.stdout == ""


def test_one_line_escapes_what_would_drive_the_terminal():
    assert _one_line("a\nb\r\n c\x1b[2J\x07\u202e") == "a b c\\x1b[2J\\x07\\u202e"


@pytest.mark.parametrize("output, needles", [
    ("missing/dir/fw.rules", ("directory", "missing/dir does not exist", "create it")),
    (".", ("is a directory", "give a file name")),
])
def test_rules_generate_into_a_missing_directory(capsys, tmp_path, output, needles):
    target = tmp_path / output
    status, err = run(capsys, "rules", "generate", "-o", str(target))
    assert_one_line(status, err, "-o", *needles)


def test_aerleon_into_a_path_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    status, err = run(capsys, "rules", "generate", "--format", "aerleon", "-o", str(tmp_path / "file" / "policy"))
    assert_one_line(status, err, "-o", "give a writable directory")


class _NoLab:
    """Stands in for emulator.lab.Lab: bad input must be refused before a lab is built."""

    def __init__(self, *args, **kwargs):
        pytest.fail("a lab was built for bad input")


@pytest.fixture
def no_lab(monkeypatch):
    monkeypatch.setattr(emulator.lab, "preflight", lambda: None)
    monkeypatch.setattr(emulator.lab, "Lab", _NoLab)


def test_json_into_a_missing_directory_is_refused_before_the_lab(capsys, tmp_path, no_lab):
    target = tmp_path / "nowhere" / "report.json"
    status, err = run(capsys, "audit", "--json", str(target))
    assert_one_line(status, err, "--json", str(target), "does not exist")


# -- certificates ----------------------------------------------------------------------------------
def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _issue(ca: pki.LabCA, host: str, not_before, not_after):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(pki._name(pki.server_name(host))).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(pki.server_name(host))]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return cert, key


def make_certs(directory: Path, case: str, host: str = "site1") -> tuple[Path, tuple[str, ...]]:
    """A --certs directory with one defect; returns it and the words its one-line error must hold."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.LabCA("ACME Issuing CA")
    (directory / "ca.pem").write_bytes(_pem(ca.cert))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert, key = ca.issue(host, "")
    cert_file, key_file = directory / f"{host}.pem", directory / f"{host}.key"
    if case == "cert-without-key":
        cert_file.write_bytes(_pem(cert))
        return directory, (str(cert_file), "has no key", str(key_file), "is missing")
    if case == "key-without-cert":
        key_file.write_bytes(_key_pem(key))
        return directory, (str(key_file), "has no certificate", str(cert_file))
    cert_file.write_bytes(_pem(cert))
    key_file.write_bytes(_key_pem(key))
    if case == "mismatched":
        key_file.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
        return directory, (str(key_file), "does not match", str(cert_file))
    if case == "expired":
        old, old_key = _issue(ca, host, now - datetime.timedelta(days=400), now - datetime.timedelta(days=35))
        cert_file.write_bytes(_pem(old))
        key_file.write_bytes(_key_pem(old_key))
        return directory, (str(cert_file), "expired on", "issue a new certificate")
    if case == "not-yet-valid":
        early, early_key = _issue(ca, host, now + datetime.timedelta(days=2), now + datetime.timedelta(days=40))
        cert_file.write_bytes(_pem(early))
        key_file.write_bytes(_key_pem(early_key))
        return directory, (str(cert_file), "is not valid before")
    if case == "other-ca":
        other, other_key = pki.LabCA("Someone Else CA").issue(host, "")
        cert_file.write_bytes(_pem(other))
        key_file.write_bytes(_key_pem(other_key))
        return directory, (str(cert_file), "is not signed by", "ca.pem")
    if case == "encrypted-key":
        key_file.write_bytes(_key_pem(key, b"secret"))
        return directory, (str(key_file), "encrypted private key", "unencrypted")
    if case == "garbage-cert":
        cert_file.write_text("not a certificate\n")
        return directory, (str(cert_file), "not a PEM certificate", "BEGIN CERTIFICATE")
    if case == "garbage-ca":
        (directory / "ca.pem").write_bytes(b"\x00\x01binary")
        return directory, (str(directory / "ca.pem"), "not a PEM certificate")
    if case == "no-ca":
        (directory / "ca.pem").unlink()
        return directory, (str(directory), "has no ca.pem")
    raise ValueError(case)


CERT_CASES = ("cert-without-key", "key-without-cert", "mismatched", "expired", "not-yet-valid", "other-ca",
              "encrypted-key", "garbage-cert", "garbage-ca", "no-ca")


@pytest.mark.parametrize("case", CERT_CASES)
def test_bad_certificate_directories_name_the_file(tmp_path, case):
    directory, needles = make_certs(tmp_path / case, case)
    with pytest.raises(LabError) as info:
        pki.load_pki_dir(str(directory), ["site1", "site2"])
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_good_certificate_directory_with_a_chain_loads(tmp_path):
    root = pki.LabCA("ACME Root")
    cert, key = root.issue("site1", "198.18.1.12")
    (tmp_path / "ca.pem").write_bytes(_pem(root.cert))
    (tmp_path / "site1.pem").write_bytes(_pem(cert))
    (tmp_path / "site1.key").write_bytes(_key_pem(key))
    assert set(pki.load_pki_dir(str(tmp_path), ["site1", "site2"])) == {"site1"}


@pytest.mark.parametrize("case", ["cert-without-key", "expired", "mismatched"])
def test_audit_with_bad_certificates_stops_before_the_lab(capsys, tmp_path, no_lab, case):
    directory, needles = make_certs(tmp_path / "certs", case)
    status, err = run(capsys, "audit", "--certs", str(directory))
    assert_one_line(status, err, *needles)
