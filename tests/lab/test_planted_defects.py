"""Hand-written rulesets with planted defects, audited in a real lab (issue 7's acceptance).

tests/data/defects.yaml is a small site; defects-good.{rules,nft} is its correct ruleset written
the way a site admin writes one (zones by subnet, grouped ports, comments). The defective copies:
  defects.{rules,nft}                 the local defects of `PLANTED`, each rule after `# planted: NAME`
  defects-stateless.{rules,nft}       no state rule: every reply meets the FORWARD policy
  defects-ftp-no-helper.{rules,nft}   no FTP conntrack helper: the data channels are new connections
For each, the expected findings are computed from the defect's definition over the plan (never
from the audit's output) and must equal the audit's findings exactly; every finding names the
rule's file and line (or the chain policy's line), and applying the fixes the audit proposes
clears every blocked flow. A stopped stub is NO-SERVICE on its own checks, never BLOCKED.
"""
from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from emulator import rules
from emulator.audit import EXIT_BLOCKED, EXIT_EXPOSED, EXIT_LAB_FAULT, AuditReport, run_audit
from emulator.catalog import load_catalog
from emulator.evidence import Verdict
from emulator.lab import Lab
from emulator.plan import Check, CheckKind, administrative_ports, audit_plan
from emulator.topology import load_topology
from tests.lab.helpers import footprint, policy_line

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
DATA = Path(__file__).resolve().parents[1] / "data"
TOPOLOGY = DATA / "defects.yaml"
SUFFIXES = ("rules", "nft")  # iptables-save and nft
TIMEOUT = 2.0  # seconds a probe may take: a dropped SYN costs this once per host
FW = "fw"
PASSING = {Verdict.ALLOWED, Verdict.UNENCRYPTED, Verdict.CLOSED, Verdict.LOCAL, Verdict.NO_PEER,
           Verdict.NOT_EXERCISED}
CATALOG = load_catalog()


# -- the ports the defects are about, named by the catalog (the one place ports live) -----------
def flow_ports(flow_id: str, protocol: str | None = None) -> tuple[int, ...]:
    return tuple(ep.port for ep in CATALOG.flow(flow_id).endpoints
                 if ep.channel == "service" and ep.port is not None and protocol in (None, ep.protocol))


def admin_port(name: str) -> int:
    return next(ep.port for ep in administrative_ports() if ep.protocol == name)


LPR = flow_ports("flexi-spooler-03", "lpr")             # User -> FlexiSpooler
RAW = flow_ports("mfd-23", "raw")                       # FlexiSpooler -> MFD
SNMP = flow_ports("mfd-03", "snmp")                     # Terminal Server -> MFD (Konica Minolta)
PGSQL = flow_ports("database-server-03")[:1]            # Management -> PostgreSQL, its main port
JMX = flow_ports("spooler-controller-14", "jmx")        # ProactiveCare -> Spooler Controller group
OPENAPI = flow_ports("mfd-02")                          # Terminal Server -> KM OpenAPI: two ports
TERMINAL = flow_ports("terminal-server-11")             # embedded terminal -> Terminal Server
SSH, RDP = (admin_port("ssh"),), (admin_port("rdp"),)


@dataclass(frozen=True)
class Planted:
    """One defect of defects.{rules,nft}: which checks it must turn into which verdict, and why."""

    name: str                 # the file's `# planted: NAME` marker; the planted rule is the next line
    verdict: Verdict
    kind: CheckKind
    clients: str              # a zone or a host of defects.yaml
    servers: str
    transport: str
    ports: tuple[int, ...]
    blame: str = "rule"       # 'rule': the planted rule's line; 'policy': the FORWARD chain policy's line


PLANTED = (
    # a required port missing: the KM OpenAPI rule lists only the first of its two ports
    Planted("missing-50003", Verdict.BLOCKED, CheckKind.REQUIRED, "servers", "devices", "tcp", OPENAPI[1:], "policy"),
    # JMX (localhost only since MU38: nothing listens for other hosts) and PostgreSQL open to the users
    Planted("jmx-to-users", Verdict.EXPOSED, CheckKind.EXPOSURE, "users", "site1", "tcp", JMX),
    Planted("pgsql-to-users", Verdict.EXPOSED, CheckKind.EXPOSURE, "users", "data", "tcp", PGSQL),
    # a hole for the second host of the users zone only
    Planted("ssh-for-pc2", Verdict.EXPOSED, CheckKind.EXPOSURE, "pc2", "servers", "tcp", SSH),
    # an accept for a port where nothing listens, from every host of the mgmt zone
    Planted("rdp-nothing-listens", Verdict.EXPOSED, CheckKind.EXPOSURE, "mgmt", "site1", "tcp", RDP),
    # SNMP written MFD -> server: the server's SNMP to the MFD is blocked, the reverse is exposed
    Planted("snmp-reversed", Verdict.BLOCKED, CheckKind.REQUIRED, "servers", "devices", "udp", SNMP, "policy"),
    Planted("snmp-reversed", Verdict.EXPOSED, CheckKind.EXPOSURE, "devices", "servers", "udp", SNMP),
    # the embedded terminal's rule names 198.18.153.0/24 for the devices zone: its flows meet the policy
    Planted("typo-subnet", Verdict.BLOCKED, CheckKind.REQUIRED, "devices", "site1", "tcp", TERMINAL, "policy"),
    # an explicit REJECT (the server's own RAW jobs) and an explicit DROP (LPR, above its accept)
    Planted("reject-raw", Verdict.BLOCKED, CheckKind.REQUIRED, "servers", "devices", "tcp", RAW),
    Planted("drop-lpr", Verdict.BLOCKED, CheckKind.REQUIRED, "users", "site1", "tcp", LPR),
)


def hosts(topology, name: str) -> set[str]:
    """The hosts of a zone, or the host itself."""
    if any(z.name == name for z in topology.zones):
        return {h.name for h in topology.zone(name).hosts}
    return {topology.host(name).name}


def hit_by(topology, defect: Planted, checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.kind == defect.kind and c.client_host in hosts(topology, defect.clients)
            and c.server_host in hosts(topology, defect.servers) and c.endpoint.transport == defect.transport
            and c.endpoint.port in defect.ports]


# -- the files: lines by marker, policy line ------------------------------------------------------
def path_of(name: str, suffix: str) -> Path:
    return DATA / f"{name}.{suffix}"


def planted_line(path: Path, name: str) -> int:
    """The line of the rule after `# planted: NAME` (1-based)."""
    lines = path.read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip().split(" (")[0] == f"# planted: {name}"]
    assert len(marks) == 1, f"{path}: one `# planted: {name}` line expected"
    return marks[0] + 2



def line_text(path: Path, line: int) -> str:
    return " ".join(path.read_text().splitlines()[line - 1].split())


# -- the lab -------------------------------------------------------------------------------------
@pytest.fixture(scope="class")
def defects_lab(lab_host):
    topology = load_topology(str(TOPOLOGY))
    checks = audit_plan(CATALOG, topology)
    with Lab(topology, CATALOG) as lab:
        yield lab, checks
    assert footprint() == CLEAN


def audit(lab, checks, path: Path, label: str = "") -> tuple[AuditReport, rules.Ruleset]:
    ruleset = rules.load_rules_file(str(path))
    lab.apply_rules({FW: ruleset})
    report = audited(lab, checks, ruleset.source, {FW: ruleset}, label or path.name)
    return report, ruleset


def audited(lab, checks, source: str, rulesets: dict | None, label: str) -> AuditReport:
    started = time.monotonic()
    report = run_audit(lab, checks, source, timeout=TIMEOUT, rulesets=rulesets)
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
    print(f"audit of {label}: {time.monotonic() - started:.2f}s ({phases})")
    return report


def findings(report: AuditReport) -> set[tuple[str, str]]:
    return {(str(v.verdict), v.check.key) for v in report.verdicts if v.verdict not in PASSING}


def apply_fixes(lab, report: AuditReport, fmt: str) -> list[str]:
    """Run every distinct fix the audit proposed on the firewall node, as the admin would."""
    fixes = sorted({v.fix for v in report.verdicts if v.fix})
    for fix in fixes:
        argv = ["iptables", *shlex.split(fix)] if fmt == "iptables" else ["nft", fix]
        proc = lab.node(FW).popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"{fix}: {err or out}"
    return fixes


def address(lab, host: str) -> str:
    return lab.topology.host(host).address


class TestPlantedDefects:
    """One lab for every ruleset (class scope: it is down before the next lab of this module is built)."""

    def test_the_planted_ports_are_where_the_rulesets_put_them(self):
        # the definitions above name catalog ports; the files were written with the same numbers
        rule_lines = [l for l in path_of("defects", "rules").read_text().splitlines() if l.startswith("-A FORWARD")]
        assert len(OPENAPI) == 2
        assert any(f"--dport {OPENAPI[0]} " in l for l in rule_lines) and not any(str(OPENAPI[1]) in l for l in rule_lines)
        for name, ports in (("jmx-to-users", JMX), ("pgsql-to-users", PGSQL), ("ssh-for-pc2", SSH),
                            ("rdp-nothing-listens", RDP), ("snmp-reversed", SNMP), ("reject-raw", RAW),
                            ("drop-lpr", LPR)):
            for suffix in SUFFIXES:
                path = path_of("defects", suffix)
                assert f"dport {ports[0]}" in line_text(path, planted_line(path, name)), (path, name)

    @pytest.mark.parametrize("suffix", SUFFIXES)
    def test_the_good_ruleset_passes_everything_and_exposes_nothing(self, defects_lab, suffix):
        lab, checks = defects_lab
        report, _ = audit(lab, checks, path_of("defects-good", suffix))
        assert findings(report) == set()
        assert report.exit_status == 0
        required = [v for v in report.verdicts if v.check.kind == CheckKind.REQUIRED]
        assert required and all(v.verdict in (Verdict.ALLOWED, Verdict.UNENCRYPTED) for v in required)
        assert report.counts[Verdict.CLOSED] == sum(c.kind == CheckKind.EXPOSURE for c in checks) > 0

    @pytest.mark.parametrize("suffix", SUFFIXES)
    def test_each_planted_defect_is_reported_with_its_line_and_nothing_else(self, defects_lab, suffix):
        lab, checks = defects_lab
        topology, path = lab.topology, path_of("defects", suffix)
        report, ruleset = audit(lab, checks, path)
        fmt = ruleset.format

        expected: dict[str, tuple[Planted, int]] = {}  # check key -> (defect, the line it must name)
        for defect in PLANTED:
            hit = hit_by(topology, defect, checks)
            assert hit, f"{defect.name}: the plan has no check it could hit"
            line = policy_line(path) if defect.blame == "policy" else planted_line(path, defect.name)
            for c in hit:
                assert c.key not in expected, f"{c.key}: two defects claim it"
                expected[c.key] = (defect, line)
        assert findings(report) == {(str(d.verdict), key) for key, (d, _line) in expected.items()}
        assert report.exit_status == EXIT_BLOCKED | EXIT_EXPOSED

        for v in report.verdicts:
            if v.check.key not in expected:
                continue
            defect, line = expected[v.check.key]
            c = v.check
            where = f"{FW} {ruleset.source}:{line}: "
            if defect.blame == "policy":
                assert v.rule.startswith(where + "no rule matched: chain "), (c.key, v.rule)
            else:
                assert v.rule == where + line_text(path, line), (c.key, v.rule)
            assert v.node == FW and v.direction == "request", c.key
            if v.verdict == Verdict.EXPOSED:
                assert v.fix == ""
                continue
            # a blocked flow: the rule that admits it, in the file's own format; put first when a
            # rule (not the policy) stopped it, else appended
            src, dst = address(lab, c.client_host), address(lab, c.server_host)
            verb = {"iptables": ("-A FORWARD", "-I FORWARD"), "nft": ("add rule", "insert rule")}[fmt]
            assert v.fix.startswith(verb[defect.blame == "rule"]), (c.key, v.fix)
            assert src in v.fix and dst in v.fix and f"dport {c.endpoint.port}" in v.fix, (c.key, v.fix)
            if fmt == "nft":
                assert " inet filter forward " in v.fix  # the user's own table and chain
        # the REJECT answers (tcp reset), the DROP and the missing accepts leave the client waiting
        observed = {d.name: {v.observed for v in report.verdicts if expected.get(v.check.key, (None,))[0] == d}
                    for d in PLANTED if d.verdict == Verdict.BLOCKED}
        assert observed["reject-raw"] == {"refused"}
        assert observed["drop-lpr"] == observed["typo-subnet"] == {"timeout"}

        # the fixes, applied as proposed, admit every blocked flow and change nothing else
        fixes = apply_fixes(lab, report, fmt)
        assert len(fixes) == sum(v.verdict == Verdict.BLOCKED for v in report.verdicts)
        fixed = audited(lab, checks, f"{path.name} + {len(fixes)} fixes", None, f"{path.name} + fixes")
        assert findings(fixed) == {f for f in findings(report) if f[0] == Verdict.EXPOSED}

    @pytest.mark.parametrize("suffix", SUFFIXES)
    def test_a_stateless_ruleset_is_reported_as_dropped_replies(self, defects_lab, suffix):
        lab, checks = defects_lab
        path = path_of("defects-stateless", suffix)
        report, ruleset = audit(lab, checks, path)
        # every required flow crosses the firewall; each request passes, each reply meets the policy
        expected = {(str(Verdict.BLOCKED), c.key) for c in checks if c.kind == CheckKind.REQUIRED and c.filtered}
        assert expected and findings(report) == expected
        where = f"{FW} {ruleset.source}:{policy_line(path)}: no rule matched: chain "
        state_rule = {"iptables": "-I FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                      "nft": "insert rule inet filter forward ct state established,related accept"}[ruleset.format]
        for v in report.verdicts:
            if v.verdict == Verdict.BLOCKED:
                assert (v.node, v.direction) == (FW, "reply"), v.check.key
                assert v.rule.startswith(where), (v.check.key, v.rule)
                assert v.fix == state_rule, (v.check.key, v.fix)
        apply_fixes(lab, report, ruleset.format)
        assert findings(audited(lab, checks, "fixed", None, f"{path.name} + fix")) == set()

    @pytest.mark.parametrize("suffix", SUFFIXES)
    def test_ftp_without_the_helper_is_reported_as_dropped_data_channels(self, defects_lab, suffix):
        lab, checks = defects_lab
        path = path_of("defects-ftp-no-helper", suffix)
        report, ruleset = audit(lab, checks, path)
        ftp = [c for c in checks if c.kind == CheckKind.REQUIRED and c.endpoint.protocol == "ftp"]
        assert {c.variant for c in ftp} == {"passive", "active"}
        assert findings(report) == {(str(Verdict.BLOCKED), c.key) for c in ftp}
        where = f"{FW} {ruleset.source}:{policy_line(path)}: no rule matched: chain "
        for v in report.verdicts:
            if v.verdict == Verdict.BLOCKED:
                c = v.check
                assert (v.node, v.direction) == (FW, "data"), c.key
                assert v.rule.startswith(where), (c.key, v.rule)
                server, port = address(lab, c.server_host), c.endpoint.port
                if ruleset.format == "iptables":
                    assert v.fix == f"-t raw -A PREROUTING -d {server}/32 -p tcp -m tcp --dport {port} -j CT --helper ftp"
                else:
                    assert v.fix.endswith(f'ip daddr {server} tcp dport {port} ct helper set "ftp-standard"'), v.fix
        apply_fixes(lab, report, ruleset.format)
        assert findings(audited(lab, checks, "fixed", None, f"{path.name} + fix")) == set()


def test_a_stopped_stub_is_no_service_on_its_own_checks_and_never_blocked(lab_host):
    """In a lab of its own: a stub that is down stays down for the rest of a lab's life."""
    topology = load_topology(str(TOPOLOGY))
    checks = audit_plan(CATALOG, topology)
    stopped = "db1"
    assert not [c for c in checks if c.kind == CheckKind.REQUIRED and c.client_host == stopped]  # a server only
    with Lab(topology, CATALOG) as lab:
        report, _ = audit(lab, checks, path_of("defects-good", "rules"), f"defects-good.rules, {stopped} stopped")
        assert findings(report) == set()  # the same lab, before the stub stops
        lab.stop_daemon(stopped)
        report = audited(lab, checks, "defects-good.rules", {FW: lab.rulesets[FW]}, f"defects-good.rules, {stopped} down")
    assert footprint() == CLEAN

    served = {c.key for c in checks if c.kind == CheckKind.REQUIRED and c.server_host == stopped}
    scouted = {c.key for c in checks if c.kind == CheckKind.EXPOSURE and c.client_host == stopped}
    assert served and scouted
    by_verdict = {}
    for v in report.verdicts:
        by_verdict.setdefault(v.verdict, set()).add(v.check.key)
    assert Verdict.BLOCKED not in by_verdict and Verdict.BROKEN not in by_verdict and Verdict.EXPOSED not in by_verdict
    assert by_verdict[Verdict.NO_SERVICE] == served
    # its knocks could not be sent: lab faults on its own exposure checks, each saying why
    assert by_verdict[Verdict.LAB_ERROR] == scouted
    assert {v.detail for v in report.verdicts if v.check.key in scouted} == {f"the daemon on {stopped} is down: its knock was not sent"}
    assert report.exit_status == EXIT_LAB_FAULT
