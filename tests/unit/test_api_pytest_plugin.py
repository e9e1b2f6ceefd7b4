"""The pytest plugin without a lab: it is registered, costs nothing unused, and its helpers'
failure messages name the check and the rule that decided it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from emulator import pytest_plugin
from emulator.audit import AuditReport, FlowVerdict
from emulator.catalog import Endpoint
from emulator.evidence import Verdict
from emulator.plan import Check, CheckKind

DROP_RULE = "fw site.rules:7: -A FORWARD -p tcp -m tcp --dport 5021 -j DROP"
OPEN_RULE = "fw site.rules:9: -A FORWARD -d 198.18.7.10/32 -j ACCEPT"

# A report as an audit writes it, built by hand: pytester runs the helpers over it.
FAKE_REPORTS = '''
from emulator.audit import AuditReport, FlowVerdict
from emulator.catalog import Endpoint
from emulator.evidence import Verdict
from emulator.plan import Check, CheckKind


def verdict(kind, flow, client, server, port, result, rule="", fix="", detail=""):
    check = Check(CheckKind(kind), flow, client, server, Endpoint("tcp", "soap", "plain", port))
    return FlowVerdict(check, Verdict(result), rule=rule, fix=fix, detail=detail, node="fw" if rule else "")


GOOD = AuditReport("single-site", "fw: generated", [
    verdict("required", "terminal-server-11", "mfd-km", "site1", 5021, "ALLOWED"),
    verdict("required", "terminal-server-11", "mfd-km", "site1", 5022, "ALLOWED"),
    verdict("exposure", None, "mfd-km", "db1", 5432, "CLOSED")])
BAD = AuditReport("single-site", "fw: site.rules", [
    verdict("required", "terminal-server-11", "mfd-km", "site1", 5021, "BLOCKED", rule=%(drop)r,
            fix="-A FORWARD -s 198.18.2.10/32 -d 198.18.1.10/32 -p tcp -m tcp --dport 5021 -j ACCEPT",
            detail="fw dropped the request"),
    verdict("required", "terminal-server-11", "mfd-km", "site1", 5022, "ALLOWED"),
    verdict("exposure", None, "mfd-km", "db1", 5432, "EXPOSED", rule=%(open)r)])
''' % {"drop": DROP_RULE, "open": OPEN_RULE}


def run_pytest(tmp_path, test_code: str, *args) -> subprocess.CompletedProcess:
    """pytest in a directory of its own: the plugin comes from its entry point, as in a user's project."""
    (tmp_path / "reports.py").write_text(FAKE_REPORTS)
    (tmp_path / "test_user.py").write_text(textwrap.dedent(test_code))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rN", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)


def test_the_plugin_is_registered_by_its_entry_point():
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("safeq_lab") == "emulator.pytest_plugin"


def test_options_are_in_pytest_help(tmp_path):
    proc = run_pytest(tmp_path, "", "--help")
    for option in ("--safeq-lab-topology", "--safeq-lab-rules", "--safeq-lab-scope", "safeq_lab_scope"):
        assert option in proc.stdout


def test_failing_helpers_name_the_check_and_the_rule(tmp_path):
    proc = run_pytest(tmp_path, """
        from emulator.pytest_plugin import assert_flow_allowed, assert_no_exposures, assert_rules_equivalent
        from reports import BAD, GOOD

        def test_allowed():
            assert_flow_allowed(BAD, flow="terminal-server-11", client="mfd-km", server="site1")

        def test_exposures():
            assert_no_exposures(BAD)

        def test_equivalent():
            assert_rules_equivalent(GOOD, BAD)

        def test_passing():
            assert_flow_allowed(GOOD, flow="terminal-server-11", client="mfd-km")
            assert_no_exposures(GOOD)
            assert_rules_equivalent(GOOD, GOOD)

        def test_nothing_matches():
            assert_flow_allowed(GOOD, flow="no-such-flow")
    """)
    out = proc.stdout
    assert proc.returncode == 1 and "4 failed, 1 passed" in out, out[-3000:]
    allowed = section(out, "test_allowed")
    assert ("1 of 2 checks of flow=terminal-server-11, client=mfd-km, server=site1 are not allowed" in allowed
            and "terminal-server-11 mfd-km -> site1 5021/tcp: BLOCKED (expected allow); rule: " + DROP_RULE in allowed
            and "fix: -A FORWARD -s 198.18.2.10/32" in allowed and "5022/tcp" not in allowed), allowed
    exposures = section(out, "test_exposures")
    assert "1 exposures" in exposures and f"exposure mfd-km -> db1 5432/tcp: EXPOSED (expected block); rule: {OPEN_RULE}" \
        in exposures, exposures
    equivalent = section(out, "test_equivalent")
    assert "2 checks change verdict from fw: generated to fw: site.rules" in equivalent
    assert "terminal-server-11 mfd-km -> site1 5021/tcp: ALLOWED -> BLOCKED" in equivalent
    assert f"after: {DROP_RULE}" in equivalent and f"after: {OPEN_RULE}" in equivalent, equivalent
    assert "no required check matches flow=no-such-flow" in section(out, "test_nothing_matches")
    assert "Traceback" not in out and "emulator/pytest_plugin.py" not in out  # the helpers hide their frames


def section(out: str, test: str) -> str:
    """The failure report of one test in pytest's output."""
    start = out.index(f"_ {test} _")
    end = out.find("\n___", start + 1)
    return out[start:end if end != -1 else len(out)]


def test_a_project_that_does_not_use_the_fixture_builds_no_lab_and_imports_nothing_heavy(tmp_path):
    proc = run_pytest(tmp_path, """
        import sys

        def test_plain():
            assert "emulator.lab" not in sys.modules and "mininet" not in sys.modules
            assert not any(m.startswith("twisted") for m in sys.modules)
    """)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_scope_and_rules_settings():
    class Config:
        def __init__(self, option=None, ini=""):
            self.option, self.ini = option, ini

        def getoption(self, _name):
            return self.option

        def getini(self, _name):
            return self.ini

    assert pytest_plugin._scope("safeq_lab", Config()) == "module"
    assert pytest_plugin._scope("safeq_lab", Config(ini="session")) == "session"
    assert pytest_plugin._scope("safeq_lab", Config(option="function", ini="session")) == "function"
    with pytest.raises(pytest.UsageError, match="safeq_lab_scope"):
        pytest_plugin._scope("safeq_lab", Config(ini="forever"))
    assert pytest_plugin.rules_setting("") is None
    assert pytest_plugin.rules_setting("generated") == "generated"
    assert pytest_plugin.rules_setting("site.rules") == "site.rules"
    assert pytest_plugin.rules_setting("fw=site.rules, db1=db1.rules") == {"fw": "site.rules", "db1": "db1.rules"}
    with pytest.raises(pytest.UsageError):
        pytest_plugin.rules_setting("fw=")


def test_a_report_checks_only_the_flows_it_holds():
    check = Check(CheckKind.REQUIRED, "terminal-server-11", "mfd-km", "site1", Endpoint("tcp", "soap", "plain", 5021))
    report = AuditReport("single-site", "fw: generated", [FlowVerdict(check, Verdict.ALLOWED)])
    pytest_plugin.assert_flow_allowed(report, flow="terminal-server-11", port=5021)
    with pytest.raises(AssertionError, match="no required check matches flow=terminal-server-11, port=5022"):
        pytest_plugin.assert_flow_allowed(report, flow="terminal-server-11", port=5022)
