"""Differential audits: two rulesets that differ in exactly one line, audited in one real lab.

`emulator.report.diff(before, after)` must list exactly the checks that line affects (computed
from what the line says, over the plan), and each changed check names that line on at least one
side (`run_audit(..., explain_all=True)` attributes passing checks too). The command line does the
same end to end: `safeq-lab audit --rules A --against B`.
"""
from __future__ import annotations

import difflib
import time
from pathlib import Path

import pytest

from emulator import rules
from emulator.audit import EXIT_BLOCKED, AuditReport, run_audit
from emulator.catalog import load_catalog
from emulator.evidence import PASSED, Verdict
from emulator.lab import Lab
from emulator.plan import CheckKind, administrative_ports, audit_plan
from emulator.report import diff
from emulator.topology import load_topology
from tests.lab.helpers import footprint, policy_line, run_cli

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
DATA = Path(__file__).resolve().parents[1] / "data"
TOPOLOGY = DATA / "defects.yaml"
GOOD = {"iptables": DATA / "defects-good.rules", "nft": DATA / "defects-good.nft"}
TIMEOUT = 2.0
FW = "fw"
CATALOG = load_catalog()
SITE = load_topology(str(TOPOLOGY))

# The line removed: the users' accept for the Management web interface (flows management-01 and -06).
WEB = tuple(ep.port for ep in CATALOG.flow("management-01").endpoints if ep.channel == "service")
REMOVED = {"iptables": '--comment "Management web"', "nft": 'comment "Management web"'}
# The line added: remote support from the users zone to the Site Server (SSH and RDP).
SUPPORT = tuple(ep.port for ep in administrative_ports() if ep.protocol in ("ssh", "rdp"))
ADDED = {"iptables": (f"-A FORWARD -s {SITE.zone('users').subnet} -d {SITE.host('site1').address}/32 -p tcp "
                      f"-m multiport --dports {','.join(map(str, SUPPORT))} -m comment --comment \"remote support\" -j ACCEPT"),
         "nft": ("\t\tip saddr $user_net ip daddr $site1 tcp dport { "
                 f"{', '.join(map(str, SUPPORT))} }} accept comment \"remote support\"")}


def without_line(source: Path, needle: str, out: Path) -> tuple[Path, int]:
    """A copy of `source` without its one line containing `needle`; that line's number in `source`."""
    lines = source.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if needle in line]
    assert len(at) == 1, (source, needle)
    out.write_text("".join(lines[:at[0]] + lines[at[0] + 1:]))
    return out, at[0] + 1


def with_line(source: Path, after: str, line: str, out: Path) -> tuple[Path, int]:
    """A copy of `source` with `line` inserted after its one line containing `after`; the new line's number."""
    lines = source.read_text().splitlines(keepends=True)
    at = [i for i, text in enumerate(lines) if after in text]
    assert len(at) == 1, (source, after)
    out.write_text("".join(lines[:at[0] + 1] + [line + "\n"] + lines[at[0] + 1:]))
    return out, at[0] + 2


def one_line_apart(a: Path, b: Path) -> list[str]:
    changed = [d for d in difflib.ndiff(a.read_text().splitlines(), b.read_text().splitlines())
               if d[:2] in ("- ", "+ ")]
    assert len(changed) == 1, changed
    return changed



def names(v, path: Path, line: int) -> bool:
    return v.rule.startswith(f"{FW} {path}:{line}: ")


@pytest.fixture(scope="class")
def diff_lab(lab_host):
    checks = audit_plan(CATALOG, SITE)
    with Lab(SITE, CATALOG) as lab:
        yield lab, checks, {}
    assert footprint() == CLEAN


def audit(lab, checks, path: Path) -> AuditReport:
    ruleset = rules.load_rules_file(str(path))
    lab.apply_rules({FW: ruleset})
    started = time.monotonic()
    report = run_audit(lab, checks, ruleset.source, timeout=TIMEOUT, rulesets={FW: ruleset}, explain_all=True)
    print(f"audit of {path.name}: {time.monotonic() - started:.2f}s")
    return report


def good_audit(diff_lab, fmt: str) -> AuditReport:
    lab, checks, cache = diff_lab
    if fmt not in cache:
        cache[fmt] = audit(lab, checks, GOOD[fmt])
        assert not [v for v in cache[fmt].verdicts if v.verdict in (Verdict.BLOCKED, Verdict.BROKEN, Verdict.EXPOSED)]
    return cache[fmt]


def zone_hosts(topology, zone: str) -> set[str]:
    return {h.name for h in topology.zone(zone).hosts}


class TestOneLineApart:
    """One lab; the good ruleset's audit is shared by the tests of each format."""

    @pytest.mark.parametrize("fmt", ("iptables", "nft"))
    def test_removing_one_accept_changes_exactly_its_checks(self, diff_lab, fmt, tmp_path):
        lab, checks, _ = diff_lab
        topology = lab.topology
        before_path = GOOD[fmt]
        after_path, removed_line = without_line(before_path, REMOVED[fmt], tmp_path / f"minus-web{before_path.suffix}")
        [change] = one_line_apart(before_path, after_path)
        assert change.startswith("- ") and all(str(p) in change for p in WEB)
        before = good_audit(diff_lab, fmt)
        after = audit(lab, checks, after_path)

        # what the line admitted: the users zone to Management's web ports
        expected = {c.key for c in checks if c.kind == CheckKind.REQUIRED and c.client_host in zone_hosts(topology, "users")
                    and c.server_host == "mgmt1" and c.endpoint.transport == "tcp" and c.endpoint.port in WEB}
        changed = diff(before, after)
        assert expected and {new.check.key for _old, new in changed} == expected
        for old, new in changed:
            assert old.verdict in PASSED and new.verdict == Verdict.BLOCKED, new.check.key
            assert names(old, before_path, removed_line), (new.check.key, old.rule)  # the line that admitted it
            assert names(new, after_path, policy_line(after_path)), (new.check.key, new.rule)

    @pytest.mark.parametrize("fmt", ("iptables", "nft"))
    def test_adding_one_accept_changes_exactly_its_checks(self, diff_lab, fmt, tmp_path):
        lab, checks, _ = diff_lab
        topology = lab.topology
        before_path = GOOD[fmt]
        after_path, added_line = with_line(before_path, REMOVED[fmt], ADDED[fmt], tmp_path / f"plus-support{before_path.suffix}")
        [change] = one_line_apart(before_path, after_path)
        assert change.startswith("+ ")
        before = good_audit(diff_lab, fmt)
        after = audit(lab, checks, after_path)

        # what the line opens: every host of the users zone to the Site Server on the support ports
        expected = {c.key for c in checks if c.kind == CheckKind.EXPOSURE and c.client_host in zone_hosts(topology, "users")
                    and c.server_host == "site1" and c.endpoint.transport == "tcp" and c.endpoint.port in SUPPORT}
        changed = diff(before, after)
        assert len(expected) == len(zone_hosts(topology, "users")) * len(SUPPORT)
        assert {new.check.key for _old, new in changed} == expected
        for old, new in changed:
            assert (old.verdict, new.verdict) == (Verdict.CLOSED, Verdict.EXPOSED), new.check.key
            assert names(new, after_path, added_line), (new.check.key, new.rule)


def test_the_command_line_differential_names_the_line(lab_host, tmp_path):
    """`safeq-lab audit --rules A --against B` end to end (its own lab: the class's is down by now)."""
    good = GOOD["iptables"]
    minus, removed_line = without_line(good, REMOVED["iptables"], tmp_path / "minus-web.rules")
    started = time.monotonic()
    proc = run_cli("audit", "--topology", str(TOPOLOGY), "--rules", str(good), "--against", str(minus),
                   "--timeout", str(TIMEOUT))
    print(f"safeq-lab audit --against: {time.monotonic() - started:.2f}s")
    assert proc.returncode == EXIT_BLOCKED, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert f"{good}:{removed_line}: " in proc.stdout, proc.stdout
    assert f"{minus}:{policy_line(minus)}: " in proc.stdout, proc.stdout
    assert footprint() == CLEAN
